//! What the agent tells operators about itself: Prometheus metrics on
//! `/metrics`, liveness on `/healthz`, readiness on `/readyz`
//! (`--metrics-addr`).
//!
//! - [`datapath`]: the datapath's counters, read from the pinned per-CPU
//!   maps when scraped (the programs pay nothing per packet for them), and
//!   the tables that name every field of `ServiceStats` and `GlobalStats`.
//! - [`health`]: loop heartbeats and the first-sync flag.
//! - [`server`]: the HTTP endpoint.
//!
//! The agent's own counters (programming, watches, leadership, flow-table
//! occupancy the sweeper measured) live in one process-wide [`Telemetry`],
//! like a Prometheus client's default registry: the loops that update them
//! are spread over the sources and the sweeper, and none of them has to
//! carry a handle.

pub mod datapath;
pub mod health;
pub mod server;
#[cfg(test)]
mod tests;

use std::{
    collections::BTreeMap,
    sync::{LazyLock, RwLock},
};

use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
        info::Info,
    },
    registry::{Registry, Unit},
};

use crate::{
    pools::{Allocation, Pools},
    reconcile::Reconciler,
    translate::families::Family as IpFamily,
};

/// The labels of one service id's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceLabels {
    pub namespace: String,
    pub service: String,
    /// `address:port/protocol`: one Service has a frontend per port and
    /// load-balancer address, each with its own counters.
    pub frontend: String,
}

/// The label set of a per-resource counter (`resource="services"`).
pub type ResourceLabel = [(&'static str, &'static str); 1];

/// The label set of a per-interface counter (`interface="eth0"`).
pub type InterfaceLabel = [(&'static str, String); 1];
/// The label set of a per-address gauge (`address="10.0.0.1"`).
pub type AddressLabel = [(&'static str, String); 1];
/// The labels of a pool gauge: `pool`, `family` (`IPv4`, `IPv6`).
pub type PoolLabels = [(&'static str, String); 2];
/// The label set of a per-BGP-peer metric (`peer="namespace/name"`).
pub type PeerLabel = [(&'static str, String); 1];

/// The agent's own metrics and health.
#[derive(Debug)]
pub struct Telemetry {
    pub programming_duration: Histogram,
    pub programming_errors: Counter,
    pub resyncs: Counter,
    /// Reads of the manifest directory that failed as a whole.
    pub source_read_errors: Counter,
    pub watch_relists: Family<ResourceLabel, Counter>,
    pub leader: Gauge,
    /// Flow-table entries the last sweep found (it walks the table anyway;
    /// counting a 256k-entry LRU map at every scrape would not be free).
    pub flow_entries: Gauge,
    /// SNAT ports held by live flows to remote backends, as the last sweep
    /// counted them.
    pub snat_ports_in_use: Gauge,
    /// Size of `--snat-ports`.
    pub snat_ports_capacity: Gauge,
    /// Pool mode: usable addresses of each pool and family, and those
    /// assigned.
    pub pool_addresses: Family<PoolLabels, Gauge>,
    pub pool_addresses_in_use: Family<PoolLabels, Gauge>,
    /// Per BGP peer (`peer="namespace/name"`): 1 while Established.
    pub bgp_session_up: Family<PeerLabel, Gauge>,
    /// Per BGP peer: host routes in its Adj-RIB-Out.
    pub bgp_announced_prefixes: Family<PeerLabel, Gauge>,
    pub bgp_updates_sent: Family<PeerLabel, Counter>,
    pub bgp_updates_received: Family<PeerLabel, Counter>,
    /// Who each programmed service id is, for the datapath's counters.
    pub services: RwLock<BTreeMap<u32, ServiceLabels>>,
    pub health: health::Health,
    /// The ARP/NDP responder's counters, carried over from `XLB_L2_STATS`
    /// by the agent's liveness refresh (`announce::l2`).
    pub l2_requests: Family<InterfaceLabel, Counter>,
    pub l2_replies: Family<InterfaceLabel, Counter>,
    pub l2_stale: Family<InterfaceLabel, Counter>,
    pub l2_gratuitous: Family<InterfaceLabel, Counter>,
    /// 1 for each address this node announces on L2.
    pub l2_announced: Family<AddressLabel, Gauge>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            // 0.5 ms .. 8 s: one changed Service takes well under a
            // millisecond, a full sync of thousands of frontends seconds.
            programming_duration: Histogram::new(exponential_buckets(0.0005, 4.0, 8)),
            programming_errors: Counter::default(),
            resyncs: Counter::default(),
            source_read_errors: Counter::default(),
            watch_relists: Family::default(),
            leader: Gauge::default(),
            flow_entries: Gauge::default(),
            snat_ports_in_use: Gauge::default(),
            snat_ports_capacity: Gauge::default(),
            pool_addresses: Family::default(),
            pool_addresses_in_use: Family::default(),
            bgp_session_up: Family::default(),
            bgp_announced_prefixes: Family::default(),
            bgp_updates_sent: Family::default(),
            bgp_updates_received: Family::default(),
            services: RwLock::default(),
            health: health::Health::default(),
            l2_requests: Family::default(),
            l2_replies: Family::default(),
            l2_stale: Family::default(),
            l2_gratuitous: Family::default(),
            l2_announced: Family::default(),
        }
    }
}

static TELEMETRY: LazyLock<Telemetry> = LazyLock::new(Telemetry::default);

/// The process's telemetry.
pub fn telemetry() -> &'static Telemetry {
    &TELEMETRY
}

impl Telemetry {
    /// A registry with every metric of `self`, the build info, and the
    /// datapath's counters from `datapath`.
    pub fn registry(&self, datapath: datapath::DatapathCollector) -> Registry {
        let mut r = Registry::default();
        r.register(
            "xlb_build",
            "The running xlb agent's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        r.register_with_unit(
            "xlb_programming_duration",
            "Time to write one sync's changes into the BPF maps",
            Unit::Seconds,
            self.programming_duration.clone(),
        );
        r.register(
            "xlb_programming_errors",
            "Frontends whose map writes failed (each is retried)",
            self.programming_errors.clone(),
        );
        r.register(
            "xlb_resyncs",
            "Periodic full comparisons of the desired state with the maps (--resync-interval)",
            self.resyncs.clone(),
        );
        r.register(
            "xlb_source_read_errors",
            "Reads of the manifest directory that failed as a whole (the Services read before stay programmed)",
            self.source_read_errors.clone(),
        );
        r.register(
            "xlb_watch_relists",
            "Complete lists of a watched Kubernetes resource: the first one, and one after each watch failure",
            self.watch_relists.clone(),
        );
        r.register(
            "xlb_leader",
            "1 while this agent holds the leader Lease (posts Events, writes status in node mode)",
            self.leader.clone(),
        );
        r.register(
            "xlb_flow_table_entries",
            "Flow-table entries (two per flow) at the last sweep",
            self.flow_entries.clone(),
        );
        r.register(
            "xlb_snat_ports_in_use",
            "Flows to remote backends holding a SNAT port, at the last sweep",
            self.snat_ports_in_use.clone(),
        );
        r.register(
            "xlb_snat_ports_capacity",
            "SNAT ports per backend address and port (--snat-ports)",
            self.snat_ports_capacity.clone(),
        );
        r.register(
            "xlb_l2_requests",
            "ARP requests and neighbour solicitations for an address this node announces, per interface",
            self.l2_requests.clone(),
        );
        r.register(
            "xlb_l2_replies",
            "ARP replies and neighbour advertisements the datapath sent, per interface",
            self.l2_replies.clone(),
        );
        r.register(
            "xlb_l2_stale",
            "Requests not answered because the agent's liveness had expired, per interface",
            self.l2_stale.clone(),
        );
        r.register(
            "xlb_l2_gratuitous",
            "Gratuitous ARP and unsolicited neighbour advertisements sent on taking addresses over, per interface",
            self.l2_gratuitous.clone(),
        );
        r.register(
            "xlb_l2_announcing",
            "1 for each Service address this node announces on L2 (answers ARP/NDP for)",
            self.l2_announced.clone(),
        );
        r.register(
            "xlb_pool_addresses",
            "Addresses an AddressPool can hand out, per family (0 for a pool not in use; saturated at 2^63-1)",
            self.pool_addresses.clone(),
        );
        r.register(
            "xlb_pool_addresses_in_use",
            "Addresses of an AddressPool assigned to Services, per family",
            self.pool_addresses_in_use.clone(),
        );
        r.register(
            "xlb_bgp_session_up",
            "1 while the BGP session to the peer is Established",
            self.bgp_session_up.clone(),
        );
        r.register(
            "xlb_bgp_announced_prefixes",
            "Host routes announced to the peer (its Adj-RIB-Out; a gauge, it falls on withdrawals)",
            self.bgp_announced_prefixes.clone(),
        );
        r.register(
            "xlb_bgp_updates_sent",
            "BGP UPDATE messages sent to the peer",
            self.bgp_updates_sent.clone(),
        );
        r.register(
            "xlb_bgp_updates_received",
            "BGP UPDATE messages received from the peer (xlb uses none of their routes)",
            self.bgp_updates_received.clone(),
        );
        r.register_collector(Box::new(datapath));
        r
    }

    /// Advances the responder's counters of `interface` from `before` to
    /// `now` (a reset map, `now` below `before`, counts from zero).
    pub fn count_l2(&self, interface: &str, before: &lb_common::L2Stats, now: &lb_common::L2Stats) {
        let label = [("interface", interface.to_string())];
        let delta = |b: u64, n: u64| if n >= b { n - b } else { n };
        self.l2_requests
            .get_or_create(&label)
            .inc_by(delta(before.requests, now.requests));
        self.l2_replies
            .get_or_create(&label)
            .inc_by(delta(before.replies, now.replies));
        self.l2_stale
            .get_or_create(&label)
            .inc_by(delta(before.stale, now.stale));
    }

    /// One gratuitous ARP / unsolicited NA sent on `interface`.
    pub fn count_gratuitous(&self, interface: &str) {
        self.l2_gratuitous
            .get_or_create(&[("interface", interface.to_string())])
            .inc();
    }

    /// The addresses this node announces now.
    pub fn publish_l2_announced(&self, addresses: std::collections::BTreeSet<std::net::IpAddr>) {
        self.l2_announced.clear();
        for addr in addresses {
            self.l2_announced
                .get_or_create(&[("address", addr.to_string())])
                .set(1);
        }
    }

    /// Publishes each pool's size and use after an allocation; pools that
    /// went lose their series.
    pub fn publish_pools(&self, pools: &Pools, allocation: &Allocation) {
        self.pool_addresses.clear();
        self.pool_addresses_in_use.clear();
        for name in pools.readiness.keys() {
            let in_use = allocation.in_use.get(name);
            for family in [IpFamily::V4, IpFamily::V6] {
                let labels: PoolLabels = [("pool", name.clone()), ("family", family.to_string())];
                let gauge = |n: u128| i64::try_from(n).unwrap_or(i64::MAX);
                self.pool_addresses
                    .get_or_create(&labels)
                    .set(gauge(pools.addresses(name, family)));
                self.pool_addresses_in_use.get_or_create(&labels).set(gauge(
                    in_use.and_then(|f| f.get(&family)).copied().unwrap_or(0),
                ));
            }
        }
    }

    /// Publishes who each programmed service id is.
    /// Updated in place: at 10 000 Services a new map of every label set
    /// beside the old one was a transient of several MiB for each Service
    /// added or removed.
    pub fn publish_services(&self, reconciler: &Reconciler) {
        use std::fmt::Write;
        let mut services = self.services.write().unwrap_or_else(|e| e.into_inner());
        let mut ids = std::collections::BTreeSet::new();
        let mut name = String::new();
        let before = services.len();
        for (id, frontend, spec) in reconciler.programmed() {
            ids.insert(id);
            name.clear();
            let _ = write!(name, "{frontend}");
            let labels = services.entry(id).or_default();
            if labels.frontend != name {
                labels.frontend.clone_from(&name);
            }
            // A frontend whose last write failed has no spec until it is
            // retried: it keeps the names it had.
            if let Some(spec) = spec {
                if labels.namespace != spec.service.namespace {
                    labels.namespace.clone_from(&spec.service.namespace);
                }
                if labels.service != spec.service.name {
                    labels.service.clone_from(&spec.service.name);
                }
            }
        }
        services.retain(|id, _| ids.contains(id));
        if services.len() > before + 1024 {
            // Many entries inserted one by one (the first publication).
            *services = crate::reconcile::compact(std::mem::take(&mut *services));
        }
    }
}
