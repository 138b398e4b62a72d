//! The datapath's counters as Prometheus metrics, read when scraped: the
//! programs count into per-CPU arrays (`XLB_STATS`, `XLB_GLOBAL`) without
//! contention, and a scrape sums the CPUs' copies. Nothing is counted per
//! packet for the metrics' sake.
//!
//! Every field of `lb_common::ServiceStats` and `GlobalStats` is named in
//! [`SERVICE_COUNTERS`] or [`GLOBAL_COUNTERS`]; a new field needs one line
//! there (a unit test fails until it has one).

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
};

use anyhow::{Context, Result};
use aya::maps::MapData;
use lb_common::{GlobalStats, ServiceStats};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
};

use super::{ServiceLabels, Telemetry};
use crate::dataplane::{Maps, PinDir, attach, maps::names};

/// One datapath counter: the metric family it belongs to (without the
/// `_total` the encoder appends), an optional label that tells it from the
/// family's other members (`reason="no_backend"`), and where it is in the
/// counters' struct.
pub struct Field<S> {
    pub family: &'static str,
    pub help: &'static str,
    pub label: Option<(&'static str, &'static str)>,
    pub read: fn(&S) -> u64,
}

const DROPS: &str = "xlb_service_drops";
const DROPS_HELP: &str = "Packets for the frontend that xlb dropped, by reason";

/// Per-service counters, labelled `namespace`, `service`, `frontend`.
/// Members of one family are consecutive.
pub const SERVICE_COUNTERS: &[Field<ServiceStats>] = &[
    Field {
        family: "xlb_service_packets",
        help: "Packets from clients to the frontend that xlb translated",
        label: None,
        read: |s| s.packets,
    },
    Field {
        family: "xlb_service_bytes",
        help: "Bytes (IP packets) from clients to the frontend that xlb translated",
        label: None,
        read: |s| s.bytes,
    },
    Field {
        family: "xlb_service_reply_packets",
        help: "Packets from the frontend's backends back to clients",
        label: None,
        read: |s| s.reply_packets,
    },
    Field {
        family: "xlb_service_reply_bytes",
        help: "Bytes (IP packets) from the frontend's backends back to clients",
        label: None,
        read: |s| s.reply_bytes,
    },
    Field {
        family: "xlb_service_new_flows",
        help: "Flows (TCP connections, UDP conversations) the frontend accepted",
        label: None,
        read: |s| s.new_flows,
    },
    Field {
        family: DROPS,
        help: DROPS_HELP,
        label: Some(("reason", "source_range")),
        read: |s| s.drop_source_range,
    },
    Field {
        family: DROPS,
        help: DROPS_HELP,
        label: Some(("reason", "no_backend")),
        read: |s| s.drop_no_backend,
    },
    Field {
        family: DROPS,
        help: DROPS_HELP,
        label: Some(("reason", "snat_exhausted")),
        read: |s| s.drop_snat_exhausted,
    },
    Field {
        family: DROPS,
        help: DROPS_HELP,
        label: Some(("reason", "unsupported")),
        read: |s| s.drop_unsupported,
    },
    Field {
        family: DROPS,
        help: DROPS_HELP,
        label: Some(("reason", "flow_conflict")),
        read: |s| s.drop_flow_conflict,
    },
];

/// Node-wide counters. Members of one family are consecutive.
pub const GLOBAL_COUNTERS: &[Field<GlobalStats>] = &[
    Field {
        family: "xlb_passed_packets",
        help: "Packets that were neither for a frontend nor a reply of a flow, left to the kernel untouched",
        label: None,
        read: |g| g.passed,
    },
    Field {
        family: "xlb_redirected_packets",
        help: "Translated packets sent out directly (bpf_redirect_map)",
        label: None,
        read: |g| g.redirected,
    },
    Field {
        family: "xlb_translated_passed_packets",
        help: "Translated packets handed to the kernel to forward or deliver",
        label: None,
        read: |g| g.translated_passed,
    },
    Field {
        family: "xlb_malformed_packets",
        help: "Packets with truncated or malformed headers",
        label: None,
        read: |g| g.malformed,
    },
    Field {
        family: "xlb_icmp_errors_translated_packets",
        help: "ICMP errors quoting a translated flow, translated and sent on to the end that sent the quoted packet",
        label: None,
        read: |g| g.icmp_translated,
    },
    Field {
        family: "xlb_frag_needed_sent_packets",
        help: "ICMP 'fragmentation needed' sent for translated packets with DF too big for their route",
        label: None,
        read: |g| g.frag_needed_sent,
    },
    Field {
        family: "xlb_reply_wrong_interface_packets",
        help: "Packets matching a flow's reply tuple that came in through an interface the route to their source does not use, passed untranslated",
        label: None,
        read: |g| g.reply_wrong_interface,
    },
    Field {
        family: "xlb_flow_halves_restored",
        help: "Flow entries put back by the other entry of their pair after the flow table evicted them; a rising count means --max-flows is too small",
        label: None,
        read: |g| g.flow_halves_restored,
    },
    Field {
        family: "xlb_host_socket_packets",
        help: "Packets that would have started a flow to a frontend that is a node address, on a port a socket of the node holds (a host daemon, a reply to the node's own UDP socket), left to the kernel",
        label: None,
        read: |g| g.host_socket,
    },
    Field {
        family: "xlb_stale_passed_packets",
        help: "Packets that would have started a flow, left to the kernel because the agent's heartbeat was older than --stale-after",
        label: None,
        read: |g| g.stale_passed,
    },
    Field {
        family: "xlb_fragments_translated",
        help: "Later IPv4 fragments given the addresses their datagram's first fragment was translated to",
        label: None,
        read: |g| g.fragments_translated,
    },
    Field {
        family: "xlb_reply_leaks_dropped_packets",
        help: "Packets from a node-local backend's address and port, with no flow, to a destination outside the cluster's networks, dropped at uplink egress: replies of flows xlb no longer has, which would leave with the pod's address",
        label: None,
        read: |g| g.reply_leaks_dropped,
    },
    Field {
        family: "xlb_time_exceeded_sent_packets",
        help: "ICMP time exceeded sent to clients whose packet reached a source-translated flow with TTL or hop limit 1",
        label: None,
        read: |g| g.time_exceeded_sent,
    },
];

/// What one scrape read from the datapath.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<(ServiceLabels, ServiceStats)>,
    pub global: GlobalStats,
    /// The flow table's size (`--max-flows` when the map was created).
    pub flow_capacity: u64,
    /// `(interface, hook)` of every pinned link of a configured interface:
    /// `xdp`, `tcx-ingress`, `tcx-egress`.
    pub interfaces: Vec<(String, &'static str)>,
}

/// Where a scrape's [`Snapshot`] comes from: the pinned maps, or a test.
pub trait Read: std::fmt::Debug + Send + Sync + 'static {
    fn snapshot(&self) -> Result<Snapshot>;
}

/// The [`Collector`] of the datapath's metrics.
#[derive(Debug)]
pub struct DatapathCollector {
    read: Box<dyn Read>,
}

impl DatapathCollector {
    pub fn new(read: impl Read) -> Self {
        DatapathCollector {
            read: Box::new(read),
        }
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let snapshot = match self.read.snapshot() {
            Ok(s) => s,
            Err(e) => {
                // The agent's own metrics still go out.
                tracing::warn!(error = %format!("{e:#}"), "reading the datapath counters failed");
                return Ok(());
            }
        };
        encode(&snapshot, &mut encoder)
    }
}

/// Writes `snapshot` as metric families.
pub fn encode(snapshot: &Snapshot, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
    encode_counters(
        encoder,
        SERVICE_COUNTERS,
        snapshot.services.iter().map(|(labels, stats)| {
            (
                vec![
                    ("namespace", labels.namespace.as_str()),
                    ("service", labels.service.as_str()),
                    ("frontend", labels.frontend.as_str()),
                ],
                stats,
            )
        }),
    )?;
    encode_counters(
        encoder,
        GLOBAL_COUNTERS,
        std::iter::once((Vec::new(), &snapshot.global)),
    )?;
    let capacity = encoder.encode_descriptor(
        "xlb_flow_table_capacity",
        "Flow-table entries the map can hold (two per flow)",
        None,
        MetricType::Gauge,
    )?;
    encode_gauge(capacity, snapshot.flow_capacity as i64)?;
    let mut attached = encoder.encode_descriptor(
        "xlb_interface_attached",
        "1 for each hook xlb's programs are attached to on an interface (pinned link)",
        None,
        MetricType::Gauge,
    )?;
    for (interface, hook) in &snapshot.interfaces {
        let labels = [("interface", interface.as_str()), ("hook", *hook)];
        encode_gauge(attached.encode_family(&labels)?, 1)?;
    }
    Ok(())
}

fn encode_gauge(
    mut metric: prometheus_client::encoding::MetricEncoder,
    value: i64,
) -> std::fmt::Result {
    metric.encode_gauge(&value)
}

/// One descriptor per family of `fields`, then one sample per member and
/// label set of `rows`.
fn encode_counters<'a, S: 'a>(
    encoder: &mut DescriptorEncoder,
    fields: &[Field<S>],
    rows: impl Iterator<Item = (Vec<(&'static str, &'a str)>, &'a S)> + Clone,
) -> std::fmt::Result {
    let mut start = 0;
    while start < fields.len() {
        let family = fields[start].family;
        let end = fields[start..]
            .iter()
            .position(|f| f.family != family)
            .map_or(fields.len(), |n| start + n);
        let mut metric =
            encoder.encode_descriptor(family, fields[start].help, None, MetricType::Counter)?;
        for (labels, stats) in rows.clone() {
            for field in &fields[start..end] {
                let mut labels = labels.clone();
                labels.extend(field.label);
                metric
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&(field.read)(stats), None)?;
            }
        }
        start = end;
    }
    Ok(())
}

/// Reads the node's pinned maps: its own file descriptors, so a scrape never
/// waits for the agent's loop.
pub struct PinnedMaps {
    maps: Mutex<Maps>,
    flow_capacity: u64,
    pins: PinDir,
    ifaces: Vec<String>,
    telemetry: &'static Telemetry,
}

impl std::fmt::Debug for PinnedMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedMaps")
            .field("pins", &self.pins.root)
            .finish()
    }
}

impl PinnedMaps {
    pub fn open(
        bpffs: &Path,
        node_name: &str,
        ifaces: &[String],
        telemetry: &'static Telemetry,
    ) -> Result<Self> {
        let pins = PinDir::new(bpffs, node_name);
        let dir: PathBuf = pins.maps();
        let maps = Maps::open_pinned(&dir)?;
        let flows = dir.join(names::FLOWS);
        let flow_capacity = MapData::from_pin(&flows)
            .and_then(|m| m.info())
            .with_context(|| format!("reading the size of {}", flows.display()))?
            .max_entries()
            .into();
        Ok(PinnedMaps {
            maps: Mutex::new(maps),
            flow_capacity,
            pins,
            ifaces: ifaces.to_vec(),
            telemetry,
        })
    }
}

impl Read for PinnedMaps {
    fn snapshot(&self) -> Result<Snapshot> {
        let ids = self
            .telemetry
            .services
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        let mut services = Vec::with_capacity(ids.len());
        for (id, labels) in ids {
            services.push((labels, maps.service_stats(id)?));
        }
        let interfaces = self
            .ifaces
            .iter()
            .flat_map(|iface| {
                attach::attached_hooks(&self.pins, iface)
                    .into_iter()
                    .map(|hook| (iface.clone(), hook))
            })
            .collect();
        Ok(Snapshot {
            services,
            global: maps.global_stats()?,
            flow_capacity: self.flow_capacity,
            interfaces,
        })
    }
}
