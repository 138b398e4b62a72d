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
/// `max_services` rows of 1021 slots, most of them unused. The new array
/// is `BPF_F_MMAPABLE` (written through its mmap); the old one is read
/// through its mmap too when it has the flag, else a row per
/// `BPF_MAP_LOOKUP_BATCH` (what an upgrade from an agent before the flag
/// meets: 20 000 rows are 20 M slots, seconds one syscall each).
fn copy_maglev(from: &Path, to: &Path, services: &Path) -> Result<Copied> {
    let old: Array<MapData, u32> = open(from)?;
    let mut new: Array<MapData, u32> = open(to)?;
    let old_fd = MapData::from_pin(from).with_context(|| format!("opening {}", from.display()))?;
    let mut old_mapped = mapped(from);
    let mut new_mapped = mapped(to);
    let services: HashMap<MapData, FrontendKey, Service> = open(services)?;
    let mut rows: Vec<u32> = services.iter().flatten().map(|(_, s)| s.table_id).collect();
    rows.sort_unstable();
    rows.dedup();
    let mut copied = Copied::default();
    let mut row_values = vec![0u32; MAGLEV_TABLE_SIZE as usize];
    for row in rows {
        let Some(start) = row.checked_mul(MAGLEV_TABLE_SIZE).filter(|s| {
            s.checked_add(MAGLEV_TABLE_SIZE)
                .is_some_and(|end| end <= old.len())
        }) else {
            copied.skipped += MAGLEV_TABLE_SIZE as usize;
            continue;
        };
        let read = match &mut old_mapped {
            Some(m) => (0..MAGLEV_TABLE_SIZE)
                .zip(row_values.iter_mut())
                .all(|(slot, v)| m.load(start + slot).map(|b| *v = b).is_ok()),
            None => {
                use std::os::fd::AsFd;
                lookup_batch(old_fd.fd().as_fd(), start, &mut row_values).is_ok()
            }
        };
        for slot in 0..MAGLEV_TABLE_SIZE {
            let index = start + slot;
            let backend = if read {
                row_values[slot as usize]
            } else {
                match old.get(&index, 0) {
                    Ok(b) => b,
                    Err(_) => {
                        copied.skipped += 1;
                        continue;
                    }
                }
            };
            let written = match &mut new_mapped {
                Some(m) => m.store(index, backend).is_ok(),
                None => new.set(index, backend, 0).is_ok(),
            };
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

/// Reads `values.len()` elements of the `u32` array `map` (a map of 4-byte
/// keys and values) from index
/// `start` with one `BPF_MAP_LOOKUP_BATCH` (Linux 5.6). aya 0.14 has no
/// batch operations, hence the raw syscall. The kernel walks the keys after
/// `in_batch` (the key before `start`; none for 0) and writes each key and
/// value, then the last key to `out_batch`.
fn lookup_batch(
    map: std::os::fd::BorrowedFd<'_>,
    start: u32,
    values: &mut [u32],
) -> std::io::Result<()> {
    use aya_obj::generated::{bpf_attr, bpf_cmd};
    use std::os::fd::AsRawFd;
    let count = values.len() as u32;
    let mut keys = vec![0u32; values.len()];
    let before = start.wrapping_sub(1);
    let mut out = 0u32;
    // SAFETY: an all-zero bpf_attr is valid (a plain C union).
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // The `batch` member of the union (writing a union field is safe).
    attr.batch.in_batch = if start == 0 {
        0
    } else {
        &before as *const u32 as u64
    };
    attr.batch.out_batch = &mut out as *mut u32 as u64;
    attr.batch.keys = keys.as_mut_ptr() as u64;
    attr.batch.values = values.as_mut_ptr() as u64;
    attr.batch.count = count;
    attr.batch.map_fd = map.as_raw_fd() as u32;
    // SAFETY: the attribute points at buffers of `count` keys and values of
    // 4 bytes (the map's sizes, checked by the typed handle), alive for
    // the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_MAP_LOOKUP_BATCH as libc::c_long,
            &mut attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: reading back the count the kernel wrote.
    let got = unsafe { attr.batch.count };
    let in_order = keys.iter().enumerate().all(|(i, k)| *k == start + i as u32);
    if got != count || !in_order {
        return Err(std::io::Error::other(format!(
            "batch lookup returned {got} of {count} elements"
        )));
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The raw `BPF_MAP_LOOKUP_BATCH` reads the rows asked for (from 0 and
    /// from inside the array) of an array without `BPF_F_MMAPABLE`, as an
    /// older agent pinned it. Needs root to create a map; skipped without.
    #[test]
    fn lookup_batch_reads_rows_of_an_unmapped_array() -> Result<()> {
        use std::os::fd::AsFd;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: creating a BPF map needs root");
            return Ok(());
        }
        let size = MAGLEV_TABLE_SIZE;
        let definition = aya_obj::Map::new_from_params(
            aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
            4,
            4,
            3 * size,
            0,
        );
        let data = MapData::create(definition, "xlb_batch_test", None)?;
        let fd = data.fd().as_fd().try_clone_to_owned()?;
        let mut array: Array<MapData, u32> = Array::try_from(Map::Array(data))?;
        for i in 0..3 * size {
            array.set(i, i * 7 + 1, 0)?;
        }
        let mut row = vec![0u32; size as usize];
        for start in [0, size, 2 * size] {
            lookup_batch(fd.as_fd(), start, &mut row)?;
            let want: Vec<u32> = (start..start + size).map(|i| i * 7 + 1).collect();
            assert_eq!(row, want, "row from {start}");
        }
        Ok(())
    }
}
