//! Copying the entries of a pinned map into its resized successor (same
//! key, value and layout, another `max_entries`): the flow table with every
//! established flow, the services, backends, Maglev rows, ranges, affinity
//! pins, local backends and counters. A key beyond a smaller array, or entries beyond a
//! smaller hash map, are what a shrink cannot keep; they are counted.

use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key};
use lb_common::{
    Affinity, AffinityKey, Backend, Flow, FlowKey, FrontendKey, LocalBackendKey, MAGLEV_TABLE_SIZE,
    Service, ServiceStats, SourceRange,
};

use super::{maps::names, mmap::MappedU32Array};

/// `BPF_NOEXIST`: the second pass never overwrites what the new datapath
/// already wrote.
const NO_EXIST: u64 = 1;

/// What one copy moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    pub copied: usize,
    /// Entries that did not fit, or were already there (second pass).
    pub skipped: usize,
}

/// Which pass: before the new programs run (every entry), or after they
/// replaced the old ones (entries the old datapath made meanwhile; those
/// the new one already has win).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Bulk,
    Catchup,
}

/// Whether `name`'s entries can be carried over by [`copy`].
pub fn copyable(name: &str) -> bool {
    matches!(
        name,
        names::SERVICES
            | names::BACKENDS
            | names::MAGLEV
            | names::FLOWS
            | names::SNAT_OWNERS
            | names::AFFINITY
            | names::SOURCE_RANGES
            | names::LOCAL_BACKENDS
            | names::STATS
    )
}

/// Opens the map pinned at `path` as the typed handle `T` (which checks
/// the kernel's key and value sizes against `T`'s).
fn open<T>(path: &Path) -> Result<T>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let data = MapData::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    let map = Map::from_map_data(data)?;
    T::try_from(map).with_context(|| format!("{} is not the map expected", path.display()))
}

/// Copies `name`'s entries from the map pinned at `from` to the one at `to`.
/// `services` is the new services map's pin (for the Maglev rows in use).
pub fn copy(name: &str, from: &Path, to: &Path, services: &Path, pass: Pass) -> Result<Copied> {
    let flags = match pass {
        Pass::Bulk => 0,
        Pass::Catchup => NO_EXIST,
    };
    match name {
        names::FLOWS => copy_hash::<FlowKey, Flow>(from, to, flags),
        names::SNAT_OWNERS => copy_hash::<FlowKey, FlowKey>(from, to, flags),
        names::AFFINITY => copy_hash::<AffinityKey, Affinity>(from, to, flags),
        names::SERVICES => copy_hash::<FrontendKey, Service>(from, to, flags),
        names::BACKENDS => copy_hash::<u32, Backend>(from, to, flags),
        // With the backends that left their Services and are still kept.
        names::LOCAL_BACKENDS => copy_hash::<LocalBackendKey, u32>(from, to, flags),
        names::SOURCE_RANGES => copy_trie(from, to, flags),
        // Written by the agent only (the Maglev rows) or counters: the
        // bulk pass is all there is.
        names::MAGLEV if pass == Pass::Bulk => copy_maglev(from, to, services),
        names::STATS if pass == Pass::Bulk => copy_stats(from, to),
        _ => Ok(Copied::default()),
    }
}

fn copy_hash<K: aya::Pod, V: aya::Pod>(from: &Path, to: &Path, flags: u64) -> Result<Copied> {
    let old: HashMap<MapData, K, V> = open(from)?;
    let mut new: HashMap<MapData, K, V> = open(to)?;
    let mut copied = Copied::default();
    for entry in old.iter() {
        // An entry deleted between the key walk and its read is skipped.
        let Ok((key, value)) = entry else {
            continue;
        };
        match new.insert(key, value, flags) {
            Ok(()) => copied.copied += 1,
            Err(_) => copied.skipped += 1,
        }
    }
    Ok(copied)
}

fn copy_trie(from: &Path, to: &Path, flags: u64) -> Result<Copied> {
    let old: LpmTrie<MapData, SourceRange, u32> = open(from)?;
    let mut new: LpmTrie<MapData, SourceRange, u32> = open(to)?;
    let mut copied = Copied::default();
    for entry in old.iter() {
        let Ok((key, value)) = entry else { continue };
        let key = Key::new(key.prefix_len(), key.data());
        match new.insert(&key, value, flags) {
            Ok(()) => copied.copied += 1,
            Err(_) => copied.skipped += 1,
        }
    }
    Ok(copied)
}

/// Only the rows the services use (`table_id`): the array holds
/// `max_services` rows of 1021 slots, most of them unused. Each side is
/// read or written through its mapping when it has `BPF_F_MMAPABLE`, else
/// one syscall per slot (what an upgrade from an agent before the flag
/// meets once: about 0.3 µs a slot, seconds at 10 000 Services, while the
/// previous agent's datapath keeps forwarding).
fn copy_maglev(from: &Path, to: &Path, services: &Path) -> Result<Copied> {
    let old: Array<MapData, u32> = open(from)?;
    let mut new: Array<MapData, u32> = open(to)?;
    let mut old_mapped = mapped(from);
    let mut new_mapped = mapped(to);
    let services: HashMap<MapData, FrontendKey, Service> = open(services)?;
    let mut rows: Vec<u32> = services.iter().flatten().map(|(_, s)| s.table_id).collect();
    rows.sort_unstable();
    rows.dedup();
    let mut copied = Copied::default();
    for row in rows {
        let Some(start) = row.checked_mul(MAGLEV_TABLE_SIZE).filter(|s| {
            s.checked_add(MAGLEV_TABLE_SIZE)
                .is_some_and(|end| end <= old.len())
        }) else {
            copied.skipped += MAGLEV_TABLE_SIZE as usize;
            continue;
        };
        for index in start..start + MAGLEV_TABLE_SIZE {
            let backend = match &mut old_mapped {
                Some(m) => m.load(index).ok(),
                None => old.get(&index, 0).ok(),
            };
            let written = backend.is_some_and(|backend| match &mut new_mapped {
                Some(m) => m.store(index, backend).is_ok(),
                None => new.set(index, backend, 0).is_ok(),
            });
            if written {
                copied.copied += 1;
            } else {
                copied.skipped += 1;
            }
        }
    }
    Ok(copied)
}

/// The array pinned at `path` mapped into memory, if it has
/// `BPF_F_MMAPABLE`.
fn mapped(path: &Path) -> Option<MappedU32Array> {
    use std::os::fd::AsFd;
    let data = MapData::from_pin(path).ok()?;
    let info = data.info().ok()?;
    if info.map_flags() & lb_common::MAGLEV_MAP_FLAGS == 0 {
        return None;
    }
    MappedU32Array::map(data.fd().as_fd(), info.max_entries(), info.value_size()).ok()
}

fn copy_stats(from: &Path, to: &Path) -> Result<Copied> {
    let old: PerCpuArray<MapData, ServiceStats> = open(from)?;
    let mut new: PerCpuArray<MapData, ServiceStats> = open(to)?;
    let mut copied = Copied::default();
    let shared = old.len().min(new.len());
    for index in 0..shared {
        let values = old.get(&index, 0)?;
        if values.iter().all(|v| *v == ServiceStats::default()) {
            continue;
        }
        new.set(index, values, 0)?;
        copied.copied += 1;
    }
    copied.skipped = old.len().saturating_sub(shared) as usize;
    Ok(copied)
}
