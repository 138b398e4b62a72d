//! Typed handles on every datapath map, opened either from a freshly loaded
//! `Ebpf` (the agent) or from their pins (`xlb inspect`, tests).

use std::path::Path;

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuHashMap, xdp::DevMapHash},
};
use lb_common::{
    Affinity, AffinityKey, Backend, ClusterNetwork, Config, Flow, FlowKey, FrontendKey,
    GlobalStats, L2Answer, L2Key, L2Liveness, L2Stats, LocalBackendKey, Service, ServiceStats,
    SourceRange,
};

pub struct Maps {
    pub services: HashMap<MapData, FrontendKey, Service>,
    pub backends: HashMap<MapData, u32, Backend>,
    pub maglev: Array<MapData, u32>,
    /// `maglev`'s slots mapped into memory (`BPF_F_MMAPABLE`), which the
    /// reconciler writes through; `None` for a pin without the flag (an
    /// older agent's, opened by `inspect`): then slots go through syscalls.
    pub maglev_slots: Option<super::mmap::MappedU32Array>,
    pub flows: HashMap<MapData, FlowKey, Flow>,
    /// SNAT reply key → the forward key that holds the port.
    pub snat_owners: HashMap<MapData, FlowKey, FlowKey>,
    pub affinity: HashMap<MapData, AffinityKey, Affinity>,
    pub source_ranges: LpmTrie<MapData, SourceRange, u32>,
    /// Node-local backends, for the reply-leak check at egress.
    pub local_backends: HashMap<MapData, LocalBackendKey, u32>,
    /// The cluster's networks, which that check spares.
    pub cluster_networks: LpmTrie<MapData, ClusterNetwork, u32>,
    pub stats: PerCpuArray<MapData, ServiceStats>,
    pub global: PerCpuArray<MapData, GlobalStats>,
    pub config: Array<MapData, Config>,
    /// Addresses this node answers ARP/NDP for, per interface.
    pub l2_addresses: HashMap<MapData, L2Key, L2Answer>,
    /// The agent's liveness, which gates those answers.
    pub l2_liveness: Array<MapData, L2Liveness>,
    /// The responder's counters per ifindex.
    pub l2_stats: PerCpuHashMap<MapData, u32, L2Stats>,
    pub tx_ports: DevMapHash<MapData>,
}

/// Map names as pinned (and as declared in lb-ebpf/src/maps.rs).
pub mod names {
    pub const SERVICES: &str = "XLB_SERVICES";
    pub const BACKENDS: &str = "XLB_BACKENDS";
    pub const MAGLEV: &str = "XLB_MAGLEV";
    pub const FLOWS: &str = "XLB_FLOWS";
    pub const SNAT_OWNERS: &str = "XLB_SNAT_OWNERS";
    pub const AFFINITY: &str = "XLB_AFFINITY";
    pub const SOURCE_RANGES: &str = "XLB_SRC_RANGES";
    pub const LOCAL_BACKENDS: &str = "XLB_LOCAL_BACKS";
    pub const CLUSTER_NETWORKS: &str = "XLB_CLUSTER_NET";
    pub const STATS: &str = "XLB_STATS";
    pub const GLOBAL: &str = "XLB_GLOBAL";
    pub const CONFIG: &str = "XLB_CONFIG";
    pub const TX_PORTS: &str = "XLB_TX_PORTS";
    pub const L2_ADDRESSES: &str = "XLB_L2_ADDRS";
    pub const L2_LIVENESS: &str = "XLB_L2_LIVE";
    pub const L2_STATS: &str = "XLB_L2_STATS";
}

impl Maps {
    /// Takes the maps out of a loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))
        };
        Self::build(&mut take)
    }

    /// Opens the maps pinned in `dir` (`<bpffs>/xlb/<node>/maps`).
    pub fn open_pinned(dir: &Path) -> Result<Self> {
        let mut open = |name: &str| -> Result<Map> {
            let path = dir.join(name);
            let data = MapData::from_pin(&path).with_context(|| {
                format!(
                    "opening pinned map {} (is the xlb agent running on this node?)",
                    path.display()
                )
            })?;
            Ok(match name {
                names::MAGLEV | names::CONFIG | names::L2_LIVENESS => Map::Array(data),
                names::FLOWS | names::AFFINITY => Map::LruHashMap(data),
                names::SOURCE_RANGES | names::CLUSTER_NETWORKS => Map::LpmTrie(data),
                names::STATS | names::GLOBAL => Map::PerCpuArray(data),
                names::TX_PORTS => Map::DevMapHash(data),
                names::L2_STATS => Map::PerCpuHashMap(data),
                _ => Map::HashMap(data),
            })
        };
        Self::build(&mut open)
    }

    fn build(get: &mut dyn FnMut(&str) -> Result<Map>) -> Result<Self> {
        macro_rules! typed {
            ($name:expr) => {
                get($name)?
                    .try_into()
                    .with_context(|| format!("map {} has an unexpected type", $name))?
            };
        }
        let maglev = get(names::MAGLEV)?;
        let maglev_slots = match &maglev {
            Map::Array(data) => map_slots(data),
            _ => None,
        };
        Ok(Self {
            services: typed!(names::SERVICES),
            backends: typed!(names::BACKENDS),
            maglev: maglev
                .try_into()
                .with_context(|| format!("map {} has an unexpected type", names::MAGLEV))?,
            maglev_slots,
            flows: typed!(names::FLOWS),
            snat_owners: typed!(names::SNAT_OWNERS),
            affinity: typed!(names::AFFINITY),
            source_ranges: typed!(names::SOURCE_RANGES),
            local_backends: typed!(names::LOCAL_BACKENDS),
            cluster_networks: typed!(names::CLUSTER_NETWORKS),
            stats: typed!(names::STATS),
            global: typed!(names::GLOBAL),
            config: typed!(names::CONFIG),
            tx_ports: typed!(names::TX_PORTS),
            l2_addresses: typed!(names::L2_ADDRESSES),
            l2_liveness: typed!(names::L2_LIVENESS),
            l2_stats: typed!(names::L2_STATS),
        })
    }

    /// Sums a service's per-CPU counters.
    pub fn service_stats(&self, service_id: u32) -> Result<ServiceStats> {
        let per_cpu = self.stats.get(&service_id, 0)?;
        Ok(ServiceStats::accumulate(per_cpu.iter()))
    }

    pub fn global_stats(&self) -> Result<GlobalStats> {
        let per_cpu = self.global.get(&lb_common::GLOBAL_STATS_KEY, 0)?;
        Ok(GlobalStats::accumulate(per_cpu.iter()))
    }
}

impl crate::reconcile::MapWriter for Maps {
    fn put_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.backends
            .insert(id, backend, 0)
            .with_context(|| format!("writing backend {id} to {}", names::BACKENDS))
    }
    fn delete_backend(&mut self, id: u32) -> Result<()> {
        ignore_missing(self.backends.remove(&id))
            .with_context(|| format!("deleting backend {id} from {}", names::BACKENDS))
    }
    fn put_maglev_slots(&mut self, slots: &[(u32, u32)]) -> Result<()> {
        let Some(mapped) = &mut self.maglev_slots else {
            for &(index, backend_id) in slots {
                self.maglev
                    .set(index, backend_id, 0)
                    .with_context(|| format!("writing slot {index} of {}", names::MAGLEV))?;
            }
            return Ok(());
        };
        for &(index, backend_id) in slots {
            mapped
                .store(index, backend_id)
                .with_context(|| format!("writing slot {index} of {}", names::MAGLEV))?;
        }
        // Before the service entry that the reconciler writes next.
        mapped.publish();
        Ok(())
    }
    fn put_service(&mut self, key: &FrontendKey, service: &Service) -> Result<()> {
        self.services.insert(key, service, 0).with_context(|| {
            format!(
                "writing service {} to {}",
                service.service_id,
                names::SERVICES
            )
        })
    }
    fn delete_service(&mut self, key: &FrontendKey) -> Result<()> {
        ignore_missing(self.services.remove(key))
            .with_context(|| format!("deleting a frontend from {}", names::SERVICES))
    }
    fn put_source_range(&mut self, key: &SourceRange, prefix_len: u32) -> Result<()> {
        self.source_ranges
            .insert(&aya::maps::lpm_trie::Key::new(prefix_len, *key), 1, 0)
            .with_context(|| format!("writing a range to {}", names::SOURCE_RANGES))
    }
    fn delete_source_range(&mut self, key: &SourceRange, prefix_len: u32) -> Result<()> {
        ignore_missing(
            self.source_ranges
                .remove(&aya::maps::lpm_trie::Key::new(prefix_len, *key)),
        )
        .with_context(|| format!("deleting a range from {}", names::SOURCE_RANGES))
    }
    fn reset_stats(&mut self, service_id: u32) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let zeros = aya::maps::PerCpuValues::try_from(vec![ServiceStats::default(); cpus])?;
        self.stats
            .set(service_id, zeros, 0)
            .with_context(|| format!("clearing counters of service {service_id}"))
    }
}

impl crate::egress_guard::GuardMaps for Maps {
    fn put_local_backend(&mut self, key: &LocalBackendKey) -> Result<()> {
        self.local_backends
            .insert(key, 1, 0)
            .with_context(|| format!("writing {}", names::LOCAL_BACKENDS))
    }
    fn delete_local_backend(&mut self, key: &LocalBackendKey) -> Result<()> {
        ignore_missing(self.local_backends.remove(key))
            .with_context(|| format!("deleting from {}", names::LOCAL_BACKENDS))
    }
    fn local_backends(&self) -> Result<Vec<LocalBackendKey>> {
        self.local_backends
            .keys()
            .collect::<Result<_, _>>()
            .with_context(|| format!("listing {}", names::LOCAL_BACKENDS))
    }
    fn put_cluster_network(&mut self, network: &crate::model::Network) -> Result<()> {
        let (key, prefix_len) = crate::encode::cluster_network_key(network);
        self.cluster_networks
            .insert(&aya::maps::lpm_trie::Key::new(prefix_len, key), 1, 0)
            .with_context(|| format!("writing {network} to {}", names::CLUSTER_NETWORKS))
    }
    fn delete_cluster_network(&mut self, network: &crate::model::Network) -> Result<()> {
        let (key, prefix_len) = crate::encode::cluster_network_key(network);
        ignore_missing(
            self.cluster_networks
                .remove(&aya::maps::lpm_trie::Key::new(prefix_len, key)),
        )
        .with_context(|| format!("deleting {network} from {}", names::CLUSTER_NETWORKS))
    }
    fn cluster_networks(&self) -> Result<Vec<crate::model::Network>> {
        self.cluster_networks
            .keys()
            .map(|key| {
                key.map(|key| {
                    crate::encode::cluster_network_from_key(&key.data(), key.prefix_len())
                })
            })
            .collect::<Result<_, _>>()
            .with_context(|| format!("listing {}", names::CLUSTER_NETWORKS))
    }
}

impl crate::reconcile::MapReader for Maps {
    fn service(&self, key: &FrontendKey) -> Result<Option<Service>> {
        absent_is_none(self.services.get(key, 0))
            .with_context(|| format!("reading {}", names::SERVICES))
    }
    fn service_keys(&self) -> Result<Vec<FrontendKey>> {
        self.services
            .keys()
            .collect::<Result<_, _>>()
            .with_context(|| format!("listing {}", names::SERVICES))
    }
    fn backend(&self, id: u32) -> Result<Option<Backend>> {
        absent_is_none(self.backends.get(&id, 0))
            .with_context(|| format!("reading backend {id} from {}", names::BACKENDS))
    }
}

/// Maps the Maglev array into memory when it has `BPF_F_MMAPABLE`.
fn map_slots(data: &MapData) -> Option<super::mmap::MappedU32Array> {
    use std::os::fd::AsFd;
    let info = data.info().ok()?;
    if info.map_flags() & lb_common::MAGLEV_MAP_FLAGS == 0 {
        return None;
    }
    match super::mmap::MappedU32Array::map(data.fd().as_fd(), info.max_entries(), info.value_size())
    {
        Ok(mapped) => Some(mapped),
        Err(e) => {
            tracing::warn!(error = %e, "mapping {} into memory failed; its slots are written one syscall each", names::MAGLEV);
            None
        }
    }
}

fn absent_is_none<V>(r: Result<V, aya::maps::MapError>) -> Result<Option<V>, aya::maps::MapError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Does a forward entry (found at an owner's key) still rewrite to the SNAT
/// tuple whose reply key is `reply_key`?
fn owner_holds(reply_key: &FlowKey, forward: Option<&Flow>) -> bool {
    forward.is_some_and(|f| {
        f.dst_addr == reply_key.src_addr
            && f.dst_port == reply_key.src_port
            && f.src_addr == reply_key.dst_addr
            && f.src_port == reply_key.dst_port
    })
}

fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// What the sweeper removed.
#[derive(Clone, Copy, Debug, Default)]
pub struct SweepSummary {
    pub scanned: usize,
    pub expired: usize,
    pub service_gone: usize,
    pub udp_backend_gone: usize,
    /// Entries left in the table after the sweep.
    pub remaining: usize,
    /// Of those, forward entries that hold a SNAT port.
    pub snat_held: usize,
    /// SNAT port owners removed because their flow is gone.
    pub stale_owners: usize,
}

impl SweepSummary {
    /// Counts an entry found (`+1`) or removed (`-1`). A partner removed
    /// with its entry is counted once: its second removal finds nothing.
    fn count(&mut self, flow: &Flow, delta: isize) {
        self.remaining = self.remaining.saturating_add_signed(delta);
        if flow.flags & (lb_common::FLOW_F_SNAT | lb_common::FLOW_F_REPLY) == lb_common::FLOW_F_SNAT
        {
            self.snat_held = self.snat_held.saturating_add_signed(delta);
        }
    }
}

impl Maps {
    /// One pass of the flow sweeper (see `conntrack`).
    pub fn sweep_flows(
        &mut self,
        timeouts: &crate::conntrack::Timeouts,
        services: &std::collections::HashSet<u32>,
        backends: &std::collections::HashSet<u32>,
    ) -> SweepSummary {
        use crate::conntrack::{Verdict, judge, partner_key, true_partner};
        let now = crate::netdev::monotonic_ns();
        let mut summary = SweepSummary::default();
        let mut doomed = Vec::new();
        for entry in self.flows.iter() {
            let Ok((key, flow)) = entry else { continue };
            summary.scanned += 1;
            summary.count(&flow, 1);
            // Cheap verdict first; the partner is read only when needed.
            let alone = judge(&key, &flow, None, now, timeouts, services, backends);
            if alone == Verdict::Keep {
                continue;
            }
            let partner_at = partner_key(&key, &flow);
            let partner = true_partner(&key, &flow, self.flows.get(&partner_at, 0).ok());
            let verdict = if alone == Verdict::Expired {
                judge(
                    &key,
                    &flow,
                    partner.as_ref(),
                    now,
                    timeouts,
                    services,
                    backends,
                )
            } else {
                alone
            };
            match verdict {
                Verdict::Keep => continue,
                Verdict::Expired => summary.expired += 1,
                Verdict::ServiceGone => summary.service_gone += 1,
                Verdict::UdpBackendGone => summary.udp_backend_gone += 1,
            }
            doomed.push((key, flow));
            if let Some(p) = partner {
                doomed.push((partner_at, p));
            }
        }
        // The datapath keeps working during the scan: an entry that changed
        // since it was judged (a new connection on the same tuple) stays.
        for (key, judged) in doomed {
            if self.flows.get(&key, 0).is_ok_and(|now| now == judged)
                && self.flows.remove(&key).is_ok()
            {
                summary.count(&judged, -1);
            }
        }
        summary.stale_owners = self.sweep_snat_owners();
        summary
    }

    /// Removes the owner records of SNAT ports whose flow is gone: the port
    /// is then free again for the datapath (which would also take over such
    /// a record), and the owner map, which nothing evicts, does not fill up.
    /// An owner is live while its forward entry rewrites to the port's tuple
    /// (the datapath's `held_by_live_flow`) or the port's reply entry exists.
    fn sweep_snat_owners(&mut self) -> usize {
        let mut stale = Vec::new();
        for entry in self.snat_owners.iter() {
            let Ok((reply_key, owner)) = entry else {
                continue;
            };
            if owner_holds(&reply_key, self.flows.get(&owner, 0).ok().as_ref())
                || self.flows.get(&reply_key, 0).is_ok()
            {
                continue;
            }
            stale.push((reply_key, owner));
        }
        let mut removed = 0;
        for (reply_key, owner) in stale {
            // Claimed again since the scan: the new owner stays.
            if self
                .snat_owners
                .get(&reply_key, 0)
                .is_ok_and(|now| now == owner)
                && self.snat_owners.remove(&reply_key).is_ok()
            {
                removed += 1;
            }
        }
        removed
    }

    /// Everything the reconciler needs to adopt pinned state.
    pub fn snapshot_for_adoption(&self) -> crate::reconcile::Adoption {
        let services = self
            .services
            .iter()
            .flatten()
            .map(|(key, value)| crate::reconcile::AdoptedService { key, value })
            .collect();
        let backends = self.backends.iter().flatten().collect();
        let ranges = self
            .source_ranges
            .iter()
            .flatten()
            .map(|(k, _)| (k.data(), k.prefix_len()))
            .collect();
        crate::reconcile::Adoption {
            services,
            backends,
            source_ranges: ranges,
        }
    }

    pub fn write_config(&mut self, config: &Config) -> Result<()> {
        self.config
            .set(lb_common::CONFIG_KEY, config, 0)
            .with_context(|| format!("writing {}", names::CONFIG))
    }

    /// Answers ARP/NDP for `key`'s address on its interface with `answer`.
    pub fn put_l2(&mut self, key: &L2Key, answer: &L2Answer) -> Result<()> {
        self.l2_addresses
            .insert(key, answer, 0)
            .with_context(|| format!("writing {}", names::L2_ADDRESSES))
    }

    /// Stops answering for `key` (absent already is fine).
    pub fn remove_l2(&mut self, key: &L2Key) -> Result<()> {
        ignore_missing(self.l2_addresses.remove(key))
            .with_context(|| format!("deleting from {}", names::L2_ADDRESSES))
    }

    /// Every address answered for, as pinned (a restarted agent's start).
    pub fn l2_entries(&self) -> Result<Vec<(L2Key, L2Answer)>> {
        self.l2_addresses
            .iter()
            .collect::<Result<_, _>>()
            .with_context(|| format!("listing {}", names::L2_ADDRESSES))
    }

    /// Says the agent is alive for the next `stale_after_ns`; 0 for
    /// `now_ns` stops every answer at once.
    pub fn write_l2_liveness(&mut self, now_ns: u64, stale_after_ns: u64) -> Result<()> {
        let live = L2Liveness {
            refreshed_ns: now_ns,
            stale_after_ns,
        };
        self.l2_liveness
            .set(lb_common::L2_LIVENESS_KEY, live, 0)
            .with_context(|| format!("writing {}", names::L2_LIVENESS))
    }

    /// Creates `ifindex`'s responder counters unless they exist.
    pub fn ensure_l2_stats(&mut self, ifindex: u32) -> Result<()> {
        if self.l2_stats.get(&ifindex, 0).is_ok() {
            return Ok(());
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let zeros = aya::maps::PerCpuValues::try_from(vec![L2Stats::default(); cpus])?;
        self.l2_stats
            .insert(ifindex, zeros, 0)
            .with_context(|| format!("writing {}", names::L2_STATS))
    }

    /// `ifindex`'s responder counters, summed over the CPUs (zero when
    /// the agent never created them).
    pub fn l2_stats(&self, ifindex: u32) -> Result<L2Stats> {
        match self.l2_stats.get(&ifindex, 0) {
            Ok(per_cpu) => Ok(L2Stats::accumulate(per_cpu.iter())),
            Err(aya::maps::MapError::KeyNotFound) => Ok(L2Stats::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", names::L2_STATS)),
        }
    }
}
