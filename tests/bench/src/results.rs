//! What a benchmark run measured, as one typed value: written to
//! `target/bench/results.json` (and kept as docs/benchmarks.json), read back
//! by the report and the plot.

use std::{collections::BTreeMap, fmt, fmt::Write as _};

use serde::{Deserialize, Serialize};

/// A system that carries the traffic from dut0 to dut1.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum System {
    Xlb,
    Iptables,
    Nftables,
    /// A bare XDP redirect: the machine's limit for an XDP forwarder.
    Ceiling,
}

impl System {
    /// In the order the benchmark runs them.
    pub const ALL: [System; 4] = [
        System::Ceiling,
        System::Xlb,
        System::Iptables,
        System::Nftables,
    ];

    pub fn name(self) -> &'static str {
        match self {
            System::Xlb => "xlb",
            System::Iptables => "iptables",
            System::Nftables => "nftables",
            System::Ceiling => "ceiling",
        }
    }
}

/// The IP family of the traffic (and of the Services, rules and routes
/// that carry it).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Default, Serialize, Deserialize)]
pub enum Family {
    /// Runs made before IPv6 was measured are all IPv4.
    #[default]
    #[serde(rename = "IPv4")]
    V4,
    #[serde(rename = "IPv6")]
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    /// What the system is called in this family (ip6tables for iptables).
    pub fn system_name(self, system: System) -> &'static str {
        match (self, system) {
            (Family::V6, System::Iptables) => "ip6tables",
            _ => system.name(),
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// Flows of the "many flows" traffic: below the 3 x 28 232 SNAT ports one
/// service with three remote backends has, so no system runs out of ports.
pub const MANY_FLOWS: u32 = 60_000;

/// The traffic the generator offers.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Traffic {
    #[serde(rename = "udp-60k-flows")]
    UdpManyFlows,
    #[serde(rename = "tcp-syn-60k-flows")]
    TcpSynManyFlows,
    #[serde(rename = "udp-1-flow")]
    UdpOneFlow,
    /// Every packet a new flow: conntrack creation and, for iptables, the
    /// rule walk, on every packet.
    #[serde(rename = "udp-new-flows")]
    UdpNewFlows,
}

impl Traffic {
    pub const ALL: [Traffic; 4] = [
        Traffic::UdpManyFlows,
        Traffic::TcpSynManyFlows,
        Traffic::UdpOneFlow,
        Traffic::UdpNewFlows,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Traffic::UdpManyFlows => "udp-60k-flows",
            Traffic::TcpSynManyFlows => "tcp-syn-60k-flows",
            Traffic::UdpOneFlow => "udp-1-flow",
            Traffic::UdpNewFlows => "udp-new-flows",
        }
    }

    /// IP protocol number.
    pub fn proto(self) -> u8 {
        match self {
            Traffic::TcpSynManyFlows => 6,
            _ => 17,
        }
    }

    pub fn flows(self) -> u32 {
        match self {
            Traffic::UdpManyFlows | Traffic::TcpSynManyFlows => MANY_FLOWS,
            Traffic::UdpOneFlow => 1,
            Traffic::UdpNewFlows => u32::MAX,
        }
    }
}

impl fmt::Display for Traffic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// How hard the generator pushes.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Load {
    /// As fast as the generator goes.
    Overload,
    /// The highest paced rate with < 0.1 % loss.
    NoLoss,
}

/// One throughput measurement.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub system: System,
    #[serde(default)]
    pub family: Family,
    pub services: u32,
    pub traffic: Traffic,
    pub load: Load,
    pub offered_pps: f64,
    pub delivered_pps: f64,
    pub loss: f64,
    /// DUT CPU time per delivered packet; none when nothing was delivered.
    pub dut_ns_per_packet: Option<f64>,
}

/// Time to apply one more service on top of `services`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Apply {
    pub system: System,
    #[serde(default)]
    pub family: Family,
    pub services: u32,
    pub apply_one_more_us: f64,
    pub initial_setup_s: f64,
}

/// `xlb_xdp` alone under BPF_PROG_TEST_RUN at one number of services:
/// ns per packet, and the reconciler's own times.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct XdpAlone {
    pub ct_hit: f64,
    pub new_flow: f64,
    pub not_service: f64,
    pub program_all_ms: f64,
    pub reconcile_one_more_us: f64,
    pub full_diff_unchanged_us: f64,
    /// Full runs only: with about a million flows in the table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ct_hit_1m_flows: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_flow_1m_flows: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows_in_table: Option<u64>,
}

/// The agent's resident memory and CPU, idle and under manifest churn.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentFootprint {
    pub idle_rss_bytes: u64,
    pub idle_cpu_fraction: f64,
    pub churn_writes_per_s: f64,
    pub churn_max_rss_bytes: u64,
    pub churn_cpu_fraction: f64,
}

/// The agent on the (fake) Kubernetes API.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KubeSource {
    pub services: u32,
    pub initial_s: f64,
    pub slice_change_ms_median: f64,
    pub churn_changes_per_s: f64,
    pub churn_cpu_fraction: f64,
    pub rss_bytes: u64,
}

/// The machine the run was made on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: Option<String>,
    pub date_unix: u64,
    pub quick: bool,
    pub seconds_per_run: f64,
}

/// Everything one run measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Results {
    pub machine: Machine,
    pub throughput: Vec<Row>,
    pub apply: Vec<Apply>,
    /// By number of services.
    pub xdp_alone_ns: BTreeMap<u32, XdpAlone>,
    pub agent_footprint: Option<AgentFootprint>,
    /// Absent from runs made before the Kubernetes source was measured.
    #[serde(default)]
    pub kube_source: Option<KubeSource>,
}

/// Mpps with two decimals, or `-`.
fn mpps(pps: Option<f64>) -> String {
    pps.map(|p| format!("{:.2}", p / 1e6))
        .unwrap_or_else(|| "-".into())
}

/// `a / b` as a ratio, or `-`.
fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.1}x", a / b),
        _ => "-".into(),
    }
}

impl Results {
    pub fn row(
        &self,
        system: System,
        family: Family,
        services: u32,
        traffic: Traffic,
        load: Load,
    ) -> Option<&Row> {
        self.throughput.iter().find(|r| {
            r.system == system
                && r.family == family
                && r.services == services
                && r.traffic == traffic
                && r.load == load
        })
    }

    /// Delivered packets per second under overload.
    fn delivered(
        &self,
        system: System,
        family: Family,
        services: u32,
        traffic: Traffic,
    ) -> Option<f64> {
        self.row(system, family, services, traffic, Load::Overload)
            .map(|r| r.delivered_pps)
    }

    /// Every number of services measured in `family`, ascending.
    fn sizes(&self, family: Family) -> Vec<u32> {
        let mut sizes: Vec<u32> = self
            .throughput
            .iter()
            .filter(|r| r.family == family)
            .map(|r| r.services)
            .collect();
        sizes.sort();
        sizes.dedup();
        sizes
    }

    /// The families measured, IPv4 first.
    fn families(&self) -> Vec<Family> {
        Family::ALL
            .into_iter()
            .filter(|f| self.throughput.iter().any(|r| r.family == *f))
            .collect()
    }

    /// The Markdown report.
    pub fn report(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(s, "# xlb benchmark\n");
        let _ = writeln!(
            s,
            "Kernel {}, {} CPUs ({}), {} s per run{}. Generator: BPF_PROG_TEST_RUN live frames on CPU 0; device under test: dut0's threaded NAPI on CPU 1; sink: XDP counter. Delivered = frames counted at the sink.\n",
            m.kernel,
            m.cpus,
            m.cpu_model.as_deref().unwrap_or("?"),
            m.seconds_per_run,
            if m.quick { " (--quick)" } else { "" }
        );
        self.delivered_tables(&mut s);
        self.family_ratios(&mut s);
        self.cpu_table(&mut s);
        self.ceiling_section(&mut s);
        self.apply_table(&mut s);
        self.xdp_alone_table(&mut s);
        self.footprint_sections(&mut s);
        s
    }

    fn delivered_tables(&self, s: &mut String) {
        for family in self.families() {
            let ipt = family.system_name(System::Iptables);
            for traffic in [
                Traffic::UdpManyFlows,
                Traffic::TcpSynManyFlows,
                Traffic::UdpNewFlows,
            ] {
                let _ = writeln!(
                    s,
                    "## Delivered Mpps under overload, {traffic} ({family})\n"
                );
                let _ = writeln!(
                    s,
                    "| services | xlb | {ipt} | nftables | xlb/{ipt} | xlb/nftables |\n|---|---|---|---|---|---|"
                );
                for n in self.sizes(family) {
                    let x = self.delivered(System::Xlb, family, n, traffic);
                    let i = self.delivered(System::Iptables, family, n, traffic);
                    let f = self.delivered(System::Nftables, family, n, traffic);
                    let _ = writeln!(
                        s,
                        "| {n} | {} | {} | {} | {} | {} |",
                        mpps(x),
                        mpps(i),
                        mpps(f),
                        ratio(x, i),
                        ratio(x, f)
                    );
                }
                let _ = writeln!(s);
            }
        }
    }

    /// xlb's delivered ratios over iptables / ip6tables and nftables, side
    /// by side per family, at the sizes both families ran.
    fn family_ratios(&self, s: &mut String) {
        let families = self.families();
        if families.len() < 2 {
            return;
        }
        let sizes: Vec<u32> = self
            .sizes(Family::V6)
            .into_iter()
            .filter(|n| self.sizes(Family::V4).contains(n))
            .collect();
        let _ = writeln!(s, "## xlb's ratio per family (delivered, overload)\n");
        let mut header = String::from("| traffic | services |");
        for family in &families {
            let _ = write!(
                header,
                " {family} xlb/{} | {family} xlb/nftables |",
                family.system_name(System::Iptables)
            );
        }
        let _ = writeln!(
            s,
            "{header}\n|---|---|{}",
            "---|---|".repeat(families.len())
        );
        for traffic in Traffic::ALL {
            for &n in &sizes {
                let mut line = format!("| {traffic} | {n} |");
                let mut any = false;
                for &family in &families {
                    let x = self.delivered(System::Xlb, family, n, traffic);
                    any |= x.is_some();
                    let i = self.delivered(System::Iptables, family, n, traffic);
                    let f = self.delivered(System::Nftables, family, n, traffic);
                    let _ = write!(line, " {} | {} |", ratio(x, i), ratio(x, f));
                }
                if any {
                    let _ = writeln!(s, "{line}");
                }
            }
        }
        let _ = writeln!(s);
    }

    fn cpu_table(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "## DUT CPU ns per delivered packet (udp-60k-flows, overload)\n"
        );
        let _ = writeln!(
            s,
            "| family | services | xlb | iptables / ip6tables | nftables |\n|---|---|---|---|---|"
        );
        for family in self.families() {
            for n in self.sizes(family) {
                let ns = |system: System| {
                    self.row(system, family, n, Traffic::UdpManyFlows, Load::Overload)
                        .and_then(|r| r.dut_ns_per_packet)
                        .map(|v| format!("{v:.0}"))
                        .unwrap_or("-".into())
                };
                let _ = writeln!(
                    s,
                    "| {family} | {n} | {} | {} | {} |",
                    ns(System::Xlb),
                    ns(System::Iptables),
                    ns(System::Nftables)
                );
            }
        }
    }

    fn ceiling_section(&self, s: &mut String) {
        let _ = writeln!(s, "\n## Ceiling and single flow\n");
        for family in self.families() {
            let ceiling = self.delivered(System::Ceiling, family, 1, Traffic::UdpManyFlows);
            let xlb = self.delivered(System::Xlb, family, 1, Traffic::UdpManyFlows);
            let _ = writeln!(
                s,
                "{family}: bare XDP redirect (ceiling): {} Mpps; xlb at 1 service: {} Mpps = {} of the ceiling.\n",
                mpps(ceiling),
                mpps(xlb),
                match (xlb, ceiling) {
                    (Some(x), Some(c)) => format!("{:.0} %", 100.0 * x / c),
                    _ => "-".into(),
                }
            );
        }
        let _ = writeln!(
            s,
            "| system | family | udp-1-flow Mpps | no-loss Mpps (udp-60k-flows, 1 service) |\n|---|---|---|---|"
        );
        for family in self.families() {
            for system in [
                System::Xlb,
                System::Iptables,
                System::Nftables,
                System::Ceiling,
            ] {
                let _ = writeln!(
                    s,
                    "| {} | {family} | {} | {} |",
                    family.system_name(system),
                    mpps(self.delivered(system, family, 1, Traffic::UdpOneFlow)),
                    mpps(
                        self.row(system, family, 1, Traffic::UdpManyFlows, Load::NoLoss)
                            .map(|r| r.offered_pps)
                    )
                );
            }
        }
    }

    fn apply_table(&self, s: &mut String) {
        let _ = writeln!(s, "\n## Applying one more service\n");
        let _ = writeln!(
            s,
            "| system | family | services | one more (µs) | initial set-up (s) |\n|---|---|---|---|---|"
        );
        for a in &self.apply {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.0} | {:.2} |",
                a.family.system_name(a.system),
                a.family,
                a.services,
                a.apply_one_more_us,
                a.initial_setup_s
            );
        }
        let _ = writeln!(
            s,
            "\nxlb's figure is end to end through the manifest directory (inotify; only the changed file is read and its Services re-translated; the agent's settle ends 2 ms after the last change); the reconciler's own map writes for one more service are in the next table.\n"
        );
    }

    fn xdp_alone_table(&self, s: &mut String) {
        let _ = writeln!(s, "## xlb_xdp alone (BPF_PROG_TEST_RUN, ns per packet)\n");
        let _ = writeln!(
            s,
            "| services | flow hit | new flow | not a service | flow hit, ~1M flows | new flow, ~1M flows | program all (ms) | reconcile one more (µs) |\n|---|---|---|---|---|---|---|---|"
        );
        let whole = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or("-".into());
        for (n, e) in &self.xdp_alone_ns {
            let _ = writeln!(
                s,
                "| {n} | {} | {} | {} | {} | {} | {} | {} |",
                whole(Some(e.ct_hit)),
                whole(Some(e.new_flow)),
                whole(Some(e.not_service)),
                whole(e.ct_hit_1m_flows),
                whole(e.new_flow_1m_flows),
                whole(Some(e.program_all_ms)),
                whole(Some(e.reconcile_one_more_us))
            );
        }
    }

    fn footprint_sections(&self, s: &mut String) {
        const MIB: f64 = 1_048_576.0;
        if let Some(fp) = &self.agent_footprint {
            let _ = writeln!(s, "\n## Agent footprint at the largest size\n");
            let _ = writeln!(
                s,
                "Idle: {:.1} MiB resident, {:.1} % of a CPU. Manifest churn ({:.0} file writes/s): up to {:.1} MiB, {:.1} % of a CPU.",
                fp.idle_rss_bytes as f64 / MIB,
                fp.idle_cpu_fraction * 100.0,
                fp.churn_writes_per_s,
                fp.churn_max_rss_bytes as f64 / MIB,
                fp.churn_cpu_fraction * 100.0
            );
        }
        if let Some(k) = &self.kube_source {
            let _ = writeln!(s, "\n## Kubernetes source\n");
            let _ = writeln!(
                s,
                "The agent on the (fake) Kubernetes API with {} services and as many EndpointSlices: \
                 first complete programming {:.1} s after start (lists included); one EndpointSlice \
                 change programmed {:.0} ms after the API server took it (median of 5, the \
                 agent's settle included: it ends 2 ms after the last change); EndpointSlice churn at {:.0} changes/s: \
                 {:.1} % of a CPU, {:.1} MiB resident. Each change re-translates and re-programs only \
                 its Service.",
                k.services,
                k.initial_s,
                k.slice_change_ms_median,
                k.churn_changes_per_s,
                k.churn_cpu_fraction * 100.0,
                k.rss_bytes as f64 / MIB,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed results stay readable by the report code.
    #[test]
    fn committed_results_parse_and_report() {
        let text = include_str!("../../../docs/benchmarks.json");
        let results: Results = serde_json::from_str(text).expect("docs/benchmarks.json parses");
        assert!(!results.throughput.is_empty());
        let report = results.report();
        assert!(report.contains("## Delivered Mpps under overload, udp-60k-flows (IPv4)"));
        assert!(report.contains("| 10000 |"), "{report}");
        assert!(
            results.throughput.iter().all(|r| r.family == Family::V4),
            "rows without a family are IPv4"
        );
        let again: Results =
            serde_json::from_str(&serde_json::to_string(&results).unwrap()).unwrap();
        assert_eq!(again.report(), report, "a round trip changes nothing");
    }

    /// IPv6 rows get their own tables and a ratio per family, with
    /// ip6tables named as such.
    #[test]
    fn ipv6_rows_are_reported_per_family() {
        let text = include_str!("../../../docs/benchmarks.json");
        let mut results: Results = serde_json::from_str(text).unwrap();
        let v6: Vec<Row> = results
            .throughput
            .iter()
            .filter(|r| r.services == 1 || r.services == 10_000)
            .map(|r| Row {
                family: Family::V6,
                delivered_pps: r.delivered_pps / 2.0,
                ..r.clone()
            })
            .collect();
        results.throughput.extend(v6);
        let json = serde_json::to_string(&results).unwrap();
        assert!(json.contains("\"family\":\"IPv6\""), "{json}");
        let report: Results = serde_json::from_str(&json).unwrap();
        let report = report.report();
        assert!(report.contains("## Delivered Mpps under overload, udp-60k-flows (IPv6)"));
        assert!(report.contains("| services | xlb | ip6tables | nftables | xlb/ip6tables |"));
        assert!(report.contains("## xlb's ratio per family"), "{report}");
        assert!(report.contains("| udp-60k-flows | 10000 |"), "{report}");
        assert!(!report.contains("| udp-60k-flows | 100 |"), "{report}");
    }
}
