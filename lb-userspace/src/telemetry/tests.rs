//! The metrics as text: fake datapath counters in, OpenMetrics out; every
//! counter field exported; the Grafana dashboard queries only what exists.

use std::collections::BTreeSet;

use anyhow::Result;
use lb_common::{GlobalStats, ServiceStats};

use super::{
    ServiceLabels, Telemetry,
    datapath::{DatapathCollector, Field, GLOBAL_COUNTERS, Read, SERVICE_COUNTERS, Snapshot},
};

#[derive(Debug)]
struct Fixed(Snapshot);

impl Read for Fixed {
    fn snapshot(&self) -> Result<Snapshot> {
        Ok(self.0.clone())
    }
}

#[derive(Debug)]
struct Broken;

impl Read for Broken {
    fn snapshot(&self) -> Result<Snapshot> {
        anyhow::bail!("map gone")
    }
}

fn web(frontend: &str) -> ServiceLabels {
    ServiceLabels {
        namespace: "default".into(),
        service: "web".into(),
        frontend: frontend.into(),
    }
}

fn snapshot() -> Snapshot {
    Snapshot {
        services: vec![
            (
                web("10.200.0.10:80/TCP"),
                ServiceStats {
                    packets: 7,
                    bytes: 700,
                    reply_packets: 5,
                    reply_bytes: 5000,
                    new_flows: 2,
                    drop_source_range: 1,
                    drop_no_backend: 3,
                    ..ServiceStats::default()
                },
            ),
            (
                web("10.200.0.10:53/UDP"),
                ServiceStats {
                    packets: 11,
                    new_flows: 11,
                    drop_flow_conflict: 4,
                    ..ServiceStats::default()
                },
            ),
        ],
        global: GlobalStats {
            passed: 100,
            redirected: 20,
            translated_passed: 30,
            malformed: 1,
            icmp_translated: 2,
            frag_needed_sent: 3,
            reply_wrong_interface: 4,
            flow_halves_restored: 5,
            host_socket: 6,
            stale_passed: 7,
            fragments_translated: 8,
            reply_leaks_dropped: 9,
            time_exceeded_sent: 10,
        },
        flow_capacity: 262_144,
        interfaces: vec![("uplink".into(), "xdp"), ("uplink".into(), "tcx-egress")],
    }
}

fn render(telemetry: &Telemetry, read: impl Read) -> String {
    let registry = telemetry.registry(DatapathCollector::new(read));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
    out
}

/// The sample lines, `name{labels} value`.
fn samples(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.starts_with('#')).collect()
}

/// The names of the samples in `text`.
fn sample_names(text: &str) -> BTreeSet<String> {
    samples(text)
        .iter()
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect()
}

#[test]
fn per_service_counters_carry_the_summed_values_and_the_service_labels() {
    let text = render(&Telemetry::default(), Fixed(snapshot()));
    let lines = samples(&text);
    let tcp = r#"namespace="default",service="web",frontend="10.200.0.10:80/TCP""#;
    let udp = r#"namespace="default",service="web",frontend="10.200.0.10:53/UDP""#;
    for expected in [
        format!("xlb_service_packets_total{{{tcp}}} 7"),
        format!("xlb_service_bytes_total{{{tcp}}} 700"),
        format!("xlb_service_reply_packets_total{{{tcp}}} 5"),
        format!("xlb_service_reply_bytes_total{{{tcp}}} 5000"),
        format!("xlb_service_new_flows_total{{{tcp}}} 2"),
        format!(r#"xlb_service_drops_total{{{tcp},reason="source_range"}} 1"#),
        format!(r#"xlb_service_drops_total{{{tcp},reason="no_backend"}} 3"#),
        format!(r#"xlb_service_drops_total{{{tcp},reason="snat_exhausted"}} 0"#),
        format!("xlb_service_packets_total{{{udp}}} 11"),
        format!("xlb_service_new_flows_total{{{udp}}} 11"),
        format!(r#"xlb_service_drops_total{{{udp},reason="flow_conflict"}} 4"#),
        "xlb_passed_packets_total 100".to_owned(),
        "xlb_redirected_packets_total 20".to_owned(),
        "xlb_translated_passed_packets_total 30".to_owned(),
        "xlb_malformed_packets_total 1".to_owned(),
        "xlb_fragments_translated_total 8".to_owned(),
        "xlb_reply_leaks_dropped_packets_total 9".to_owned(),
        "xlb_time_exceeded_sent_packets_total 10".to_owned(),
        "xlb_flow_table_capacity 262144".to_owned(),
        r#"xlb_interface_attached{interface="uplink",hook="xdp"} 1"#.to_owned(),
        r#"xlb_interface_attached{interface="uplink",hook="tcx-egress"} 1"#.to_owned(),
        format!(
            r#"xlb_build_info{{version="{}"}} 1"#,
            env!("CARGO_PKG_VERSION")
        ),
    ] {
        assert!(
            lines.contains(&expected.as_str()),
            "missing {expected} in:\n{text}"
        );
    }
    // One descriptor per family, however many services and reasons.
    assert_eq!(
        text.matches("# TYPE xlb_service_drops counter").count(),
        1,
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
}

#[test]
fn the_agents_own_metrics_follow_what_it_recorded() {
    let telemetry = Telemetry::default();
    telemetry.programming_duration.observe(0.002);
    telemetry.programming_errors.inc_by(2);
    telemetry.leader.set(1);
    telemetry.flow_entries.set(6);
    telemetry.snat_ports_in_use.set(1);
    telemetry
        .watch_relists
        .get_or_create(&[("resource", "services")])
        .inc();
    let text = render(&telemetry, Fixed(Snapshot::default()));
    let lines = samples(&text);
    for expected in [
        "xlb_programming_duration_seconds_count 1",
        "xlb_programming_duration_seconds_sum 0.002",
        r#"xlb_programming_duration_seconds_bucket{le="0.008"} 1"#,
        r#"xlb_programming_duration_seconds_bucket{le="0.0005"} 0"#,
        "xlb_programming_errors_total 2",
        "xlb_leader 1",
        "xlb_flow_table_entries 6",
        "xlb_snat_ports_in_use 1",
        r#"xlb_watch_relists_total{resource="services"} 1"#,
    ] {
        assert!(lines.contains(&expected), "missing {expected} in:\n{text}");
    }
}

#[test]
fn a_failed_map_read_still_serves_the_agents_own_metrics() {
    let text = render(&Telemetry::default(), Broken);
    assert!(text.contains("xlb_build_info"), "{text}");
    assert!(!text.contains("xlb_passed_packets"), "{text}");
    assert!(text.ends_with("# EOF\n"), "{text}");
}

/// The struct as its `u64` fields, each set to its position + 1.
fn numbered<S: Default + Copy>() -> S {
    assert_eq!(size_of::<S>() % 8, 0);
    let mut value = S::default();
    // SAFETY: the counter structs are #[repr(C)] and made of u64s only
    // (the size check above and the map contract's layout tests).
    let fields = unsafe {
        std::slice::from_raw_parts_mut((&mut value as *mut S).cast::<u64>(), size_of::<S>() / 8)
    };
    for (i, f) in fields.iter_mut().enumerate() {
        *f = i as u64 + 1;
    }
    value
}

/// Every field of `S` is read by exactly one entry of `table`.
fn covers_every_field<S: Default + Copy>(table: &[Field<S>]) {
    let value = numbered::<S>();
    let read: BTreeSet<u64> = table.iter().map(|f| (f.read)(&value)).collect();
    let fields = (size_of::<S>() / 8) as u64;
    assert_eq!(
        read,
        (1..=fields).collect(),
        "a counter field has no metric (or two metrics read one field): add it to the table in telemetry/datapath.rs"
    );
    assert_eq!(table.len() as u64, fields);
}

#[test]
fn every_counter_of_the_map_contract_is_exported() {
    covers_every_field(SERVICE_COUNTERS);
    covers_every_field(GLOBAL_COUNTERS);
}

#[test]
fn the_members_of_a_family_are_consecutive() {
    for families in [
        SERVICE_COUNTERS
            .iter()
            .map(|f| f.family)
            .collect::<Vec<_>>(),
        GLOBAL_COUNTERS.iter().map(|f| f.family).collect(),
    ] {
        let mut seen = BTreeSet::new();
        for (i, family) in families.iter().enumerate() {
            if i == 0 || families[i - 1] != *family {
                assert!(seen.insert(*family), "{family} is split in the table");
            }
        }
    }
}

/// The metric names a PromQL expression uses (`xlb_...`).
fn queried_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("xlb_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.push(name);
    }
    names
}

fn exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(o) => {
            for (k, v) in o {
                match v {
                    serde_json::Value::String(s) if k == "expr" || k == "query" => {
                        out.push(s.clone())
                    }
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[test]
fn the_grafana_dashboard_queries_only_metrics_the_agent_exports() {
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../../deploy/grafana-dashboard.json"))
            .expect("deploy/grafana-dashboard.json is valid JSON");
    let telemetry = Telemetry::default();
    // Every family has a sample: a histogram observation, a labelled
    // re-list.
    telemetry.programming_duration.observe(0.001);
    telemetry
        .watch_relists
        .get_or_create(&[("resource", "services")])
        .inc();
    let exported = sample_names(&render(&telemetry, Fixed(snapshot())));
    let mut queries = Vec::new();
    exprs(&dashboard, &mut queries);
    assert!(
        queries.len() >= 8,
        "the dashboard lost its panels: {queries:?}"
    );
    let mut used = BTreeSet::new();
    for q in &queries {
        for name in queried_names(q) {
            assert!(
                exported.contains(&name),
                "the dashboard queries {name}, which the agent does not export ({q}); exported: {exported:?}"
            );
            used.insert(name);
        }
    }
    for wanted in [
        "xlb_service_packets_total",
        "xlb_service_drops_total",
        "xlb_flow_table_entries",
        "xlb_flow_table_capacity",
        "xlb_snat_ports_in_use",
        "xlb_programming_duration_seconds_bucket",
    ] {
        assert!(
            used.contains(wanted),
            "the dashboard does not show {wanted}"
        );
    }
}

#[test]
fn pool_gauges_count_addresses_per_pool_and_family_and_forget_removed_pools() {
    use serde_json::json;

    use crate::pools::{AddressPool, Pools, allocate};

    let pool = |name: &str, addresses: &[&str]| -> AddressPool {
        serde_json::from_value(json!({"metadata": {"name": name},
                                      "spec": {"addresses": addresses}}))
        .unwrap()
    };
    let service: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}
    }))
    .unwrap();
    let telemetry = Telemetry::default();
    let pools = Pools::new(&[
        pool("lab", &["192.0.2.0/30", "2001:db8::/64"]),
        pool("old", &["198.51.100.0/31"]),
    ]);
    let allocation = allocate(&pools, &[&service], &Default::default());
    telemetry.publish_pools(&pools, &allocation);
    let text = render(&telemetry, Fixed(Snapshot::default()));
    let lines = samples(&text);
    for expected in [
        r#"xlb_pool_addresses{pool="lab",family="IPv4"} 4"#,
        r#"xlb_pool_addresses{pool="lab",family="IPv6"} 9223372036854775807"#,
        r#"xlb_pool_addresses_in_use{pool="lab",family="IPv4"} 1"#,
        r#"xlb_pool_addresses_in_use{pool="lab",family="IPv6"} 0"#,
        r#"xlb_pool_addresses{pool="old",family="IPv4"} 2"#,
    ] {
        assert!(lines.contains(&expected), "missing {expected} in:\n{text}");
    }
    let pools = Pools::new(&[pool("lab", &["192.0.2.0/30"])]);
    telemetry.publish_pools(&pools, &allocate(&pools, &[&service], &Default::default()));
    let text = render(&telemetry, Fixed(Snapshot::default()));
    assert!(!text.contains(r#"pool="old""#), "{text}");
}
