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

use crate::reconcile::Reconciler;

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
    /// Per BGP peer (`peer="namespace/name"`): 1 while Established.
    pub bgp_session_up: Family<PeerLabel, Gauge>,
    /// Per BGP peer: host routes in its Adj-RIB-Out.
    pub bgp_announced_prefixes: Family<PeerLabel, Gauge>,
    pub bgp_updates_sent: Family<PeerLabel, Counter>,
    pub bgp_updates_received: Family<PeerLabel, Counter>,
    /// Who each programmed service id is, for the datapath's counters.
    pub services: RwLock<BTreeMap<u32, ServiceLabels>>,
    pub health: health::Health,
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
            bgp_session_up: Family::default(),
            bgp_announced_prefixes: Family::default(),
            bgp_updates_sent: Family::default(),
            bgp_updates_received: Family::default(),
            services: RwLock::default(),
            health: health::Health::default(),
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

    /// Publishes who each programmed service id is.
    pub fn publish_services(&self, reconciler: &Reconciler) {
        let mut services = self.services.write().unwrap_or_else(|e| e.into_inner());
        let labels = reconciler
            .programmed()
            .map(|(id, frontend, spec)| {
                let labels = match spec {
                    Some(spec) => ServiceLabels {
                        namespace: spec.service.namespace.clone(),
                        service: spec.service.name.clone(),
                        frontend: frontend.to_string(),
                    },
                    // A frontend whose last write failed has no spec until
                    // it is retried: it keeps the names it had.
                    None => services.get(&id).cloned().unwrap_or_else(|| ServiceLabels {
                        frontend: frontend.to_string(),
                        ..ServiceLabels::default()
                    }),
                };
                (id, labels)
            })
            .collect();
        *services = labels;
    }
}
