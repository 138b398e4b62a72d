//! The layout stamp of each pinned map: a fingerprint of its key and value
//! types (every field's name, offset and size), kept in a map of its own,
//! `XLB_LAYOUT` (map name → fingerprint), that only the agent reads and
//! writes.
//!
//! The kernel knows a map's key and value *sizes*, which catches a type
//! that grew or shrank (GlobalStats 48 → 56 bytes). It cannot see two
//! fields of the same size swapped, or a field renamed because its meaning
//! changed: the stamp does. Pins written by an agent older than the stamps
//! have no `XLB_LAYOUT`; they are judged by the kernel's sizes alone.

use std::{
    collections::BTreeMap,
    mem::{offset_of, size_of},
    path::Path,
};

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData};
use lb_common::{
    Affinity, AffinityKey, Backend, ClusterNetwork, Config, Flow, FlowKey, FrontendKey,
    GlobalStats, L2Answer, L2Key, L2Liveness, L2Stats, LocalBackendKey, Service, ServiceStats,
    SourceRange,
};

use super::maps::names;

/// The pin name of the stamp map.
pub const STAMPS: &str = "XLB_LAYOUT";
/// Room for more maps than the datapath has.
const STAMP_CAPACITY: u32 = 64;
/// A map name, NUL-padded (the kernel's map names are 16 bytes too).
type StampKey = [u8; 16];

/// FNV-1a, 64 bit: stable across builds and Rust versions (unlike
/// `DefaultHasher`), which a stamp written by one agent and read by the
/// next must be.
#[derive(Clone, Copy)]
struct Fingerprint(u64);

impl Fingerprint {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn add(mut self, text: &str) -> Self {
        for byte in text.bytes().chain([0]) {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self
    }
    fn add_number(self, n: usize) -> Self {
        self.add(&n.to_string())
    }
}

/// One type's layout: its name, size and each field's (name, offset, size).
struct Layout {
    name: &'static str,
    size: usize,
    fields: Vec<(&'static str, usize, usize)>,
}

impl Layout {
    fn scalar<T>(name: &'static str) -> Self {
        Self {
            name,
            size: size_of::<T>(),
            fields: Vec::new(),
        }
    }
    fn fingerprint(&self, into: Fingerprint) -> Fingerprint {
        let mut f = into.add(self.name).add_number(self.size);
        for (name, offset, size) in &self.fields {
            f = f.add(name).add_number(*offset).add_number(*size);
        }
        f
    }
}

/// The size of a field's type, named through an accessor (no value needed).
const fn field_size<T, F>(_: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

/// `layout!(Type { field, ... })`: every field must be listed; the unit
/// test below checks that the listed sizes add up to the type's size.
macro_rules! layout {
    ($ty:ident { $($field:ident),* $(,)? }) => {
        Layout {
            name: stringify!($ty),
            size: size_of::<$ty>(),
            fields: vec![$((
                stringify!($field),
                offset_of!($ty, $field),
                field_size(|v: &$ty| &v.$field),
            )),*],
        }
    };
}

fn frontend_key() -> Layout {
    layout!(FrontendKey {
        addr,
        port,
        proto,
        family
    })
}
fn service() -> Layout {
    layout!(Service {
        service_id,
        table_id,
        backend_count,
        flags,
        affinity_timeout
    })
}
fn backend() -> Layout {
    layout!(Backend {
        addr,
        port,
        family,
        flags,
        service_id
    })
}
fn flow_key() -> Layout {
    layout!(FlowKey {
        src_addr,
        dst_addr,
        src_port,
        dst_port,
        proto,
        family,
        _pad
    })
}
fn flow() -> Layout {
    layout!(Flow {
        last_seen_ns,
        src_addr,
        dst_addr,
        src_port,
        dst_port,
        service_id,
        backend_id,
        flags,
        _pad,
        _pad2
    })
}
fn affinity_key() -> Layout {
    layout!(AffinityKey {
        service_id,
        family,
        _pad,
        _pad2,
        client
    })
}
fn affinity() -> Layout {
    layout!(Affinity {
        last_seen_ns,
        backend_id,
        _pad
    })
}
fn source_range() -> Layout {
    layout!(SourceRange {
        service_id,
        family,
        addr,
        _pad
    })
}
fn local_backend_key() -> Layout {
    layout!(LocalBackendKey {
        addr,
        port,
        proto,
        family
    })
}
fn cluster_network() -> Layout {
    layout!(ClusterNetwork { family, addr, _pad })
}
fn service_stats() -> Layout {
    layout!(ServiceStats {
        packets,
        bytes,
        reply_packets,
        reply_bytes,
        new_flows,
        drop_source_range,
        drop_no_backend,
        drop_snat_exhausted,
        drop_unsupported,
        drop_flow_conflict
    })
}
fn global_stats() -> Layout {
    layout!(GlobalStats {
        passed,
        redirected,
        translated_passed,
        malformed,
        icmp_translated,
        frag_needed_sent,
        reply_wrong_interface,
        flow_halves_restored,
        host_socket,
        stale_passed,
        fragments_translated,
        reply_leaks_dropped,
        time_exceeded_sent
    })
}
fn config() -> Layout {
    layout!(Config {
        node_addr,
        snat_port_min,
        snat_port_max,
        flags,
        stale_after_s,
        _pad,
        heartbeat_ns,
        node_addr_v6
    })
}

fn l2_key() -> Layout {
    layout!(L2Key {
        ifindex,
        family,
        _pad,
        addr
    })
}
fn l2_answer() -> Layout {
    layout!(L2Answer { mac, _pad })
}
fn l2_liveness() -> Layout {
    layout!(L2Liveness {
        refreshed_ns,
        stale_after_ns
    })
}
fn l2_stats() -> Layout {
    layout!(L2Stats {
        requests,
        replies,
        stale
    })
}

/// Key and value layouts of every stamped map. `XLB_TX_PORTS` is not
/// stamped: its value is the kernel's `bpf_devmap_val`, not ours.
fn map_layouts() -> Vec<(&'static str, Layout, Layout)> {
    vec![
        (names::SERVICES, frontend_key(), service()),
        (names::BACKENDS, Layout::scalar::<u32>("u32"), backend()),
        (
            names::MAGLEV,
            Layout::scalar::<u32>("u32"),
            Layout::scalar::<u32>("u32"),
        ),
        (names::FLOWS, flow_key(), flow()),
        (names::SNAT_OWNERS, flow_key(), flow_key()),
        (names::AFFINITY, affinity_key(), affinity()),
        (
            names::SOURCE_RANGES,
            // The trie key is {prefix_len: u32, data}.
            Layout::scalar::<u32>("lpm_prefix_len"),
            source_range(),
        ),
        (
            names::LOCAL_BACKENDS,
            local_backend_key(),
            Layout::scalar::<u32>("u32"),
        ),
        (
            names::CLUSTER_NETWORKS,
            Layout::scalar::<u32>("lpm_prefix_len"),
            cluster_network(),
        ),
        (names::STATS, Layout::scalar::<u32>("u32"), service_stats()),
        (names::GLOBAL, Layout::scalar::<u32>("u32"), global_stats()),
        (names::CONFIG, Layout::scalar::<u32>("u32"), config()),
        (names::L2_ADDRESSES, l2_key(), l2_answer()),
        (
            names::L2_LIVENESS,
            Layout::scalar::<u32>("u32"),
            l2_liveness(),
        ),
        (
            names::L2_STATS,
            Layout::scalar::<u32>("ifindex"),
            l2_stats(),
        ),
    ]
}

/// This build's stamp of each stamped map.
pub fn wanted() -> BTreeMap<&'static str, u64> {
    map_layouts()
        .into_iter()
        .map(|(name, key, value)| {
            let f = value.fingerprint(key.fingerprint(Fingerprint::new().add(name)));
            (name, f.0)
        })
        .collect()
}

fn stamp_key(name: &str) -> StampKey {
    let mut key = [0u8; 16];
    let len = name.len().min(15);
    key[..len].copy_from_slice(&name.as_bytes()[..len]);
    key
}

/// The stamps pinned at `path`: `None` when there is no stamp map (a fresh
/// node, or pins of an agent older than the stamps).
pub fn read(path: &Path) -> Result<Option<BTreeMap<String, u64>>> {
    if !path.exists() {
        return Ok(None);
    }
    let map = open_stamps(path)?;
    let mut out = BTreeMap::new();
    for entry in map.iter() {
        let (key, stamp) = entry.context("reading the layout stamps")?;
        let end = key.iter().position(|b| *b == 0).unwrap_or(key.len());
        out.insert(String::from_utf8_lossy(&key[..end]).into_owned(), stamp);
    }
    Ok(Some(out))
}

/// Writes this build's stamps to the stamp map at `path`, creating and
/// pinning it when absent (or when what is there is not a stamp map).
pub fn write(path: &Path) -> Result<()> {
    let mut map = match open_stamps(path) {
        Ok(map) => map,
        Err(e) => {
            if path.exists() {
                tracing::warn!(error = %format!("{e:#}"), pin = %path.display(), "replacing an unreadable layout stamp map");
                std::fs::remove_file(path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
            let definition = aya_obj::Map::new_from_params(
                aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_HASH as u32,
                size_of::<StampKey>() as u32,
                size_of::<u64>() as u32,
                STAMP_CAPACITY,
                0,
            );
            let data = MapData::create(definition, STAMPS, None)
                .context("creating the layout stamp map")?;
            data.pin(path)
                .with_context(|| format!("pinning the layout stamps at {}", path.display()))?;
            HashMap::try_from(Map::from_map_data(data)?)?
        }
    };
    for (name, stamp) in wanted() {
        map.insert(stamp_key(name), stamp, 0)
            .with_context(|| format!("writing the layout stamp of {name}"))?;
    }
    Ok(())
}

fn open_stamps(path: &Path) -> Result<HashMap<MapData, StampKey, u64>> {
    let data = MapData::from_pin(path)
        .with_context(|| format!("opening the layout stamps {}", path.display()))?;
    HashMap::try_from(Map::from_map_data(data)?)
        .with_context(|| format!("{} is not xlb's layout stamp map", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_is_listed() {
        // A field added to a type but not to its `layout!` would leave the
        // stamp blind to it: the listed sizes must cover the whole type
        // (lb-common has no implicit padding).
        for (map, key, value) in map_layouts() {
            for layout in [key, value] {
                if layout.fields.is_empty() {
                    continue;
                }
                let listed: usize = layout.fields.iter().map(|(_, _, size)| size).sum();
                assert_eq!(
                    listed, layout.size,
                    "{map}: {} has unlisted fields",
                    layout.name
                );
            }
        }
    }

    #[test]
    fn a_swap_of_same_size_fields_changes_the_stamp() {
        let mut swapped = service();
        // service_id and table_id trade places: same sizes, same total.
        swapped.fields[0].1 = 4;
        swapped.fields[1].1 = 0;
        let base = Fingerprint::new();
        assert_ne!(service().fingerprint(base).0, swapped.fingerprint(base).0);
    }

    #[test]
    fn stamps_differ_per_map() {
        let stamps = wanted();
        let distinct: std::collections::BTreeSet<_> = stamps.values().collect();
        assert_eq!(distinct.len(), stamps.len());
    }
}
