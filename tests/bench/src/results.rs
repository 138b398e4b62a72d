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
    /// An XDP forwarder that parses the headers, rewrites the MACs and
    /// decrements the TTL before its redirect: the limit for an XDP
    /// forwarder that touches the packet.
    Forwarder,
    /// klipper-lb as K3s deploys it: the node's hostPort DNAT into the
    /// svclb pod's namespace, klipper's DNAT to the ClusterIP there, then
    /// kube-proxy's iptables chains on the node.
    #[serde(rename = "klipper")]
    KlipperTwoHop,
}

impl System {
    /// In the order the benchmark runs them.
    pub const ALL: [System; 6] = [
        System::Ceiling,
        System::Forwarder,
        System::Xlb,
        System::Iptables,
        System::KlipperTwoHop,
        System::Nftables,
    ];

    /// The baselines xlb is compared with, in the report's order.
    pub const BASELINES: [System; 3] = [System::Iptables, System::Nftables, System::KlipperTwoHop];

    /// Its name in `XLB_BENCH_ONLY` and in the report.
    pub fn name(self) -> &'static str {
        match self {
            System::Xlb => "xlb",
            System::Iptables => "iptables",
            System::Nftables => "nftables",
            System::Ceiling => "ceiling",
            System::Forwarder => "forwarder",
            System::KlipperTwoHop => "klipper",
        }
    }

    /// A limit of the rig rather than a load balancer: run at one service,
    /// forwards frames untranslated, nothing to apply.
    pub fn is_limit(self) -> bool {
        matches!(self, System::Ceiling | System::Forwarder)
    }

    /// The families it runs in (klipper's two-hop path: IPv4 only).
    pub fn runs_in(self, family: Family) -> bool {
        self != System::KlipperTwoHop || family == Family::V4
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
    /// The highest paced rate with < 0.1 % loss (runs before 2026-12-05;
    /// on this rig it measured the veth rings' bursts, ~0.1 Mpps for every
    /// system, and was replaced by `Capacity`).
    NoLoss,
    /// The most delivered under overload or with the generator paced a
    /// little above that figure (1.2, 1.5 and 2 times): see
    /// [`Results::capacity_section`].
    Capacity,
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
    /// The flow hit with forwarding on: `bpf_fib_lookup` and the egress
    /// check added (runs before 2026-12-04 did not measure it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ct_hit_routed: Option<f64>,
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
    /// After the churn.
    pub rss_bytes: u64,
    /// After the first slice changes, before the churn; absent from runs
    /// made before it was measured.
    #[serde(default)]
    pub idle_rss_bytes: Option<u64>,
    /// The most sampled during the churn.
    #[serde(default)]
    pub churn_max_rss_bytes: Option<u64>,
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

/// A whole number, or `-`.
fn whole(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into())
}

/// `a / b` as a ratio, or `-`.
/// `a` as a share of `b`, in per cent.
fn share(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.0} %", 100.0 * a / b),
        _ => "-".into(),
    }
}

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

    /// Whether `system` has rows in `family`.
    fn ran(&self, system: System, family: Family) -> bool {
        self.throughput
            .iter()
            .any(|r| r.system == system && r.family == family)
    }

    /// DUT CPU ns per delivered packet, udp-60k-flows under overload.
    fn dut_ns(&self, system: System, family: Family, services: u32) -> Option<f64> {
        self.row(
            system,
            family,
            services,
            Traffic::UdpManyFlows,
            Load::Overload,
        )
        .and_then(|r| r.dut_ns_per_packet)
    }

    /// The rig's cost per packet in `family`: what the bare ceiling spends
    /// on the DUT CPU (veth receive, redirect, the sink), which every
    /// system pays on top of its own work. The ceiling runs at 1 service.
    pub fn rig_ns(&self, family: Family) -> Option<f64> {
        self.dut_ns(System::Ceiling, family, 1)
    }

    /// A system's own cost per packet: its DUT ns/packet minus the rig's.
    /// The limits run at one service only, and stand for every size.
    pub fn system_ns(&self, system: System, family: Family, services: u32) -> Option<f64> {
        let n = if system.is_limit() { 1 } else { services };
        Some(self.dut_ns(system, family, n)? - self.rig_ns(family)?)
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
        self.capacity_section(&mut s);
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
                let klipper = self.ran(System::KlipperTwoHop, family);
                let _ = writeln!(
                    s,
                    "| services | xlb | {ipt} | nftables | xlb/{ipt} | xlb/nftables |{}\n|---|---|---|---|---|---|{}",
                    if klipper {
                        " klipper two-hop | xlb/klipper two-hop |"
                    } else {
                        ""
                    },
                    if klipper { "---|---|" } else { "" }
                );
                for n in self.sizes(family) {
                    let x = self.delivered(System::Xlb, family, n, traffic);
                    let i = self.delivered(System::Iptables, family, n, traffic);
                    let f = self.delivered(System::Nftables, family, n, traffic);
                    let mut line = format!(
                        "| {n} | {} | {} | {} | {} | {} |",
                        mpps(x),
                        mpps(i),
                        mpps(f),
                        ratio(x, i),
                        ratio(x, f)
                    );
                    if klipper {
                        let k = self.delivered(System::KlipperTwoHop, family, n, traffic);
                        let _ = write!(line, " {} | {} |", mpps(k), ratio(x, k));
                    }
                    let _ = writeln!(s, "{line}");
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
            "| family | services | xlb | iptables / ip6tables | nftables | klipper two-hop |\n|---|---|---|---|---|---|"
        );
        for family in self.families() {
            for n in self.sizes(family) {
                let ns = |system: System| whole(self.dut_ns(system, family, n));
                let _ = writeln!(
                    s,
                    "| {family} | {n} | {} | {} | {} | {} |",
                    ns(System::Xlb),
                    ns(System::Iptables),
                    ns(System::Nftables),
                    ns(System::KlipperTwoHop)
                );
            }
        }
        self.cost_split_tables(s);
    }

    /// DUT CPU per packet split into the rig's cost (the bare ceiling's, of
    /// the same family) and the system's own (the rest), and xlb's ratios
    /// of own cost beside its delivered ratios.
    fn cost_split_tables(&self, s: &mut String) {
        let families: Vec<Family> = self
            .families()
            .into_iter()
            .filter(|&f| self.rig_ns(f).is_some())
            .collect();
        if families.is_empty() {
            return;
        }
        let _ = writeln!(
            s,
            "\n## DUT CPU ns per packet: rig cost + system cost (udp-60k-flows, overload)\n"
        );
        let _ = writeln!(
            s,
            "Rig cost: the bare ceiling's DUT ns/packet in the same family (veth receive, redirect, the sink), paid by every system. System cost: a system's DUT ns/packet minus the rig cost. The ceiling and the forwarder ran at 1 service; their figures stand for every size.\n"
        );
        let systems = [
            System::Forwarder,
            System::Xlb,
            System::Iptables,
            System::Nftables,
            System::KlipperTwoHop,
        ];
        let _ = writeln!(
            s,
            "| family | services | rig (ceiling) | forwarder | xlb | iptables / ip6tables | nftables | klipper two-hop |\n|---|---|---|---|---|---|---|---|"
        );
        for &family in &families {
            for n in self.sizes(family) {
                let mut line = format!("| {family} | {n} | {} |", whole(self.rig_ns(family)));
                for system in systems {
                    let n = if system.is_limit() { 1 } else { n };
                    let cell = match (
                        self.dut_ns(system, family, n),
                        self.system_ns(system, family, n),
                    ) {
                        (Some(total), Some(own)) if own < 0.0 => {
                            format!("{total:.0} = rig - {:.0}", -own)
                        }
                        (Some(total), Some(own)) => format!("{total:.0} = rig + {own:.0}"),
                        _ => "-".into(),
                    };
                    let _ = write!(line, " {cell} |");
                }
                let _ = writeln!(s, "{line}");
            }
        }
        let _ = writeln!(
            s,
            "\n## xlb against each system: system cost and delivered (udp-60k-flows, overload)\n"
        );
        let _ = writeln!(
            s,
            "Against a baseline: its system cost over xlb's, and xlb's delivered Mpps over its (higher is better for xlb in both). Against the forwarder: xlb's system cost over the forwarder's, and xlb's delivered Mpps over the forwarder's (at 1 service).\n"
        );
        let _ = writeln!(
            s,
            "| family | services | cost iptables/xlb | delivered xlb/iptables | cost nftables/xlb | delivered xlb/nftables | cost klipper two-hop/xlb | delivered xlb/klipper two-hop | cost xlb/forwarder | delivered xlb/forwarder |\n|---|---|---|---|---|---|---|---|---|---|"
        );
        for &family in &families {
            for n in self.sizes(family) {
                let xlb_cost = self.system_ns(System::Xlb, family, n);
                if xlb_cost.is_none() {
                    continue;
                }
                let xlb = self.delivered(System::Xlb, family, n, Traffic::UdpManyFlows);
                let mut line = format!("| {family} | {n} |");
                for system in System::BASELINES {
                    let _ = write!(
                        line,
                        " {} | {} |",
                        ratio(self.system_ns(system, family, n), xlb_cost),
                        ratio(
                            xlb,
                            self.delivered(system, family, n, Traffic::UdpManyFlows)
                        )
                    );
                }
                let _ = write!(
                    line,
                    " {} | {} |",
                    ratio(xlb_cost, self.system_ns(System::Forwarder, family, n)),
                    ratio(
                        xlb,
                        self.delivered(System::Forwarder, family, 1, Traffic::UdpManyFlows)
                    )
                );
                let _ = writeln!(s, "{line}");
            }
        }
    }

    fn ceiling_section(&self, s: &mut String) {
        let _ = writeln!(s, "\n## Ceiling and single flow\n");
        for family in self.families() {
            let ceiling = self.delivered(System::Ceiling, family, 1, Traffic::UdpManyFlows);
            let xlb = self.delivered(System::Xlb, family, 1, Traffic::UdpManyFlows);
            let _ = write!(
                s,
                "{family}: bare XDP redirect (ceiling): {} Mpps; xlb at 1 service: {} Mpps = {} of the ceiling.",
                mpps(ceiling),
                mpps(xlb),
                share(xlb, ceiling)
            );
            let forwarder = self.delivered(System::Forwarder, family, 1, Traffic::UdpManyFlows);
            if forwarder.is_some() {
                let _ = write!(
                    s,
                    " Header-touching XDP forwarder: {} Mpps; xlb = {} of it.",
                    mpps(forwarder),
                    share(xlb, forwarder)
                );
            }
            let _ = writeln!(s, "\n");
        }
        let _ = writeln!(
            s,
            "| system | family | udp-1-flow Mpps | udp-1-flow at capacity Mpps |\n|---|---|---|---|"
        );
        for family in self.families() {
            for system in [
                System::Xlb,
                System::Iptables,
                System::Nftables,
                System::KlipperTwoHop,
                System::Ceiling,
                System::Forwarder,
            ] {
                if !self.ran(system, family)
                    && matches!(system, System::KlipperTwoHop | System::Forwarder)
                {
                    continue;
                }
                let _ = writeln!(
                    s,
                    "| {} | {family} | {} | {} |",
                    family.system_name(system),
                    mpps(self.delivered(system, family, 1, Traffic::UdpOneFlow)),
                    mpps(
                        self.row(system, family, 1, Traffic::UdpOneFlow, Load::Capacity)
                            .map(|r| r.delivered_pps)
                    )
                );
            }
        }
    }

    /// Delivered at capacity: overload on this rig is not free for the
    /// device under test. The generator's surplus frames are dropped at the
    /// full veth ring and returned to the page pool they came from, whose
    /// lock the DUT CPU takes for every frame it frees: the further a
    /// system falls below the offered rate, the more of its CPU goes to
    /// that lock (`__pv_queued_spin_lock_slowpath` under
    /// `page_pool_put_unrefed_netmem`: 13 % of the DUT CPU for xlb at
    /// udp-1-flow, 1.4 % for the forwarder). A NIC drops a surplus in
    /// hardware at no cost to the host, so the paced figure is the one a
    /// wire would show; both are reported.
    fn capacity_section(&self, s: &mut String) {
        if !self.throughput.iter().any(|r| r.load == Load::Capacity) {
            return;
        }
        let _ = writeln!(
            s,
            "\n## Delivered Mpps at capacity (the best of overload and the generator paced at 1.2, 1.5 and 2 times that figure)\n"
        );
        let capacity = |system: System, family: Family, n: u32, traffic: Traffic| {
            let n = if system.is_limit() { 1 } else { n };
            self.row(system, family, n, traffic, Load::Capacity)
                .map(|r| r.delivered_pps)
        };
        let _ = writeln!(
            s,
            "| family | traffic | services | xlb | iptables / ip6tables | nftables | ceiling | forwarder | xlb/iptables | xlb/nftables | xlb/ceiling | xlb/forwarder |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for family in self.families() {
            for traffic in [Traffic::UdpManyFlows, Traffic::UdpOneFlow] {
                for n in self.sizes(family) {
                    let x = capacity(System::Xlb, family, n, traffic);
                    if x.is_none() {
                        continue;
                    }
                    let i = capacity(System::Iptables, family, n, traffic);
                    let f = capacity(System::Nftables, family, n, traffic);
                    let c = capacity(System::Ceiling, family, n, traffic);
                    let w = capacity(System::Forwarder, family, n, traffic);
                    let _ = writeln!(
                        s,
                        "| {family} | {traffic} | {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        mpps(x),
                        mpps(i),
                        mpps(f),
                        mpps(c),
                        mpps(w),
                        ratio(x, i),
                        ratio(x, f),
                        share(x, c),
                        share(x, w)
                    );
                }
            }
        }
    }

    fn apply_table(&self, s: &mut String) {
        let _ = writeln!(s, "\n## Applying one more service\n");
        let _ = writeln!(
            s,
            "| system | family | services | one more (µs, median of 5) | initial set-up (s) |\n|---|---|---|---|---|"
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
            "\nxlb's figure is end to end through the manifest directory (one file written, until the frontend is in the pinned map: inotify; only the changed file is read and its Services re-translated; the agent's settle ends 2 ms after the last change); the others' is their command (`iptables-restore --noflush`, `nft -f`) from start to exit. The reconciler's own map writes for one more service are in the next table.\n"
        );
    }

    fn xdp_alone_table(&self, s: &mut String) {
        let _ = writeln!(s, "## xlb_xdp alone (BPF_PROG_TEST_RUN, ns per packet)\n");
        let _ = writeln!(
            s,
            "| services | flow hit | flow hit, forwarding on | new flow | not a service | flow hit, ~1M flows | new flow, ~1M flows | program all (ms) | reconcile one more (µs) |\n|---|---|---|---|---|---|---|---|---|"
        );
        let whole = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or("-".into());
        for (n, e) in &self.xdp_alone_ns {
            let _ = writeln!(
                s,
                "| {n} | {} | {} | {} | {} | {} | {} | {} | {} |",
                whole(Some(e.ct_hit)),
                whole(e.ct_hit_routed),
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
                 {:.1} % of a CPU, {}{:.1} MiB resident after it. Each change re-translates and re-programs only \
                 its Service.",
                k.services,
                k.initial_s,
                k.slice_change_ms_median,
                k.churn_changes_per_s,
                k.churn_cpu_fraction * 100.0,
                match (k.idle_rss_bytes, k.churn_max_rss_bytes) {
                    (Some(idle), Some(max)) => format!(
                        "{:.1} MiB resident idle, up to {:.1} MiB during it, ",
                        idle as f64 / MIB,
                        max as f64 / MIB
                    ),
                    _ => String::new(),
                },
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
        // The committed run (2026-12-05) measured both families.
        assert_eq!(results.families(), vec![Family::V4, Family::V6]);
        // Rows written before the family field read as IPv4.
        let old_row = r#"{"system":"xlb","services":1,"traffic":"udp-60k-flows","load":"overload","offered_pps":1.0,"delivered_pps":1.0,"loss":0.0,"dut_ns_per_packet":null}"#;
        let row: Row = serde_json::from_str(old_row).unwrap();
        assert_eq!(row.family, Family::V4);
        let again: Results =
            serde_json::from_str(&serde_json::to_string(&results).unwrap()).unwrap();
        assert_eq!(again.report(), report, "a round trip changes nothing");
        // Every table's delimiter row has as many cells as its header, or
        // Markdown does not render it as a table.
        let lines: Vec<&str> = report.lines().collect();
        for pair in lines.windows(2) {
            if pair[1].starts_with("|---") {
                assert_eq!(
                    pair[0].matches('|').count(),
                    pair[1].matches('|').count(),
                    "{}\n{}",
                    pair[0],
                    pair[1]
                );
            }
        }
        assert!(report.contains("## Delivered Mpps at capacity"), "{report}");
    }

    /// IPv6 rows get their own tables and a ratio per family, with
    /// ip6tables named as such, and keep their family through JSON.
    #[test]
    fn ipv6_rows_are_reported_per_family() {
        let text = include_str!("../../../docs/benchmarks.json");
        // The committed run has both families at 1 and 10 000 services.
        let results: Results = serde_json::from_str(text).unwrap();
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

    fn synthetic_row(system: System, family: Family, services: u32, mpps: f64, ns: f64) -> Row {
        Row {
            system,
            family,
            services,
            traffic: Traffic::UdpManyFlows,
            load: Load::Overload,
            offered_pps: 6e6,
            delivered_pps: mpps * 1e6,
            loss: 0.0,
            dut_ns_per_packet: Some(ns),
        }
    }

    fn synthetic(rows: Vec<Row>) -> Results {
        let text = include_str!("../../../docs/benchmarks.json");
        let mut results: Results = serde_json::from_str(text).unwrap();
        results.throughput = rows;
        results.apply.clear();
        results
    }

    /// The capacity table takes the capacity rows (not the overload ones),
    /// with the limits' one-service figures at every size.
    #[test]
    fn capacity_rows_are_reported_with_their_shares_of_the_limits() {
        let capacity = |system, services, mpps| Row {
            load: Load::Capacity,
            ..synthetic_row(system, Family::V4, services, mpps, 100.0)
        };
        let r = synthetic(vec![
            synthetic_row(System::Xlb, Family::V4, 1, 1.0, 700.0),
            synthetic_row(System::Ceiling, Family::V4, 1, 5.0, 170.0),
            capacity(System::Xlb, 1, 2.0),
            capacity(System::Xlb, 10_000, 1.5),
            capacity(System::Iptables, 1, 0.5),
            capacity(System::Ceiling, 1, 5.0),
            capacity(System::Forwarder, 1, 4.0),
        ]);
        let report = r.report();
        assert!(report.contains("## Delivered Mpps at capacity"), "{report}");
        assert!(
            report.contains(
                "| IPv4 | udp-60k-flows | 1 | 2.00 | 0.50 | - | 5.00 | 4.00 | 4.0x | - | 40 % | 50 % |"
            ),
            "{report}"
        );
        assert!(
            report.contains(
                "| IPv4 | udp-60k-flows | 10000 | 1.50 | - | - | 5.00 | 4.00 | - | - | 30 % | 38 % |"
            ),
            "{report}"
        );
    }

    /// Rig cost is the ceiling's ns/packet of the same family; a system's
    /// own cost is the rest; the limits (1 service) stand for every size.
    #[test]
    fn cost_splits_into_rig_and_system() {
        let results = synthetic(vec![
            synthetic_row(System::Ceiling, Family::V4, 1, 5.0, 200.0),
            synthetic_row(System::Forwarder, Family::V4, 1, 4.0, 250.0),
            synthetic_row(System::Xlb, Family::V4, 1, 1.0, 800.0),
            synthetic_row(System::Xlb, Family::V4, 100, 1.0, 700.0),
            synthetic_row(System::Iptables, Family::V4, 1, 0.5, 1400.0),
            synthetic_row(System::KlipperTwoHop, Family::V4, 1, 0.25, 2600.0),
            synthetic_row(System::Ceiling, Family::V6, 1, 5.0, 100.0),
            synthetic_row(System::Xlb, Family::V6, 1, 1.0, 900.0),
        ]);
        assert_eq!(results.rig_ns(Family::V4), Some(200.0));
        assert_eq!(results.rig_ns(Family::V6), Some(100.0));
        assert_eq!(results.system_ns(System::Xlb, Family::V4, 1), Some(600.0));
        assert_eq!(results.system_ns(System::Xlb, Family::V6, 1), Some(800.0));
        assert_eq!(
            results.system_ns(System::Forwarder, Family::V4, 100),
            Some(50.0)
        );
        assert_eq!(results.system_ns(System::Forwarder, Family::V6, 1), None);
        assert_eq!(results.system_ns(System::Nftables, Family::V4, 1), None);
        let report = results.report();
        assert!(
            report.contains("## DUT CPU ns per packet: rig cost + system cost"),
            "{report}"
        );
        assert!(
            report.contains(
                "| IPv4 | 1 | 200 | 250 = rig + 50 | 800 = rig + 600 | 1400 = rig + 1200 | - | 2600 = rig + 2400 |"
            ),
            "{report}"
        );
        assert!(
            report.contains("| IPv4 | 100 | 200 | 250 = rig + 50 | 700 = rig + 500 | - | - | - |"),
            "{report}"
        );
        assert!(
            report.contains("| IPv6 | 1 | 100 | - | 900 = rig + 800 | - | - | - |"),
            "{report}"
        );
        // Cost ratios beside delivered ratios: iptables 1200/600, delivered
        // 1.0/0.5; nftables absent; klipper 2400/600 and 4x; the forwarder
        // 600/50 and 1.0/4.0.
        assert!(
            report.contains("| IPv4 | 1 | 2.0x | 2.0x | - | - | 4.0x | 4.0x | 12.0x | 0.2x |"),
            "{report}"
        );
        assert!(
            report.contains("| IPv4 | 100 | - | - | - | - | - | - | 10.0x | 0.2x |"),
            "{report}"
        );
        assert!(
            report.contains("| IPv6 | 1 | - | - | - | - | - | - | - | - |"),
            "{report}"
        );
        assert!(report.contains("Header-touching XDP forwarder: 4.00 Mpps; xlb = 25 % of it."));
        assert!(report.contains("| klipper | IPv4 |"), "{report}");
        assert!(!report.contains("| klipper | IPv6 |"), "{report}");
        assert!(report.contains("| forwarder | IPv4 |"), "{report}");
    }

    /// A limit measured below the ceiling (noise) shows a negative own
    /// cost as such, and no ratio over it.
    #[test]
    fn own_cost_below_the_rig_is_shown_negative() {
        let results = synthetic(vec![
            synthetic_row(System::Ceiling, Family::V4, 1, 5.0, 180.0),
            synthetic_row(System::Forwarder, Family::V4, 1, 5.5, 170.0),
            synthetic_row(System::Xlb, Family::V4, 1, 1.0, 800.0),
        ]);
        let report = results.report();
        assert!(
            report.contains("| IPv4 | 1 | 180 | 170 = rig - 10 | 800 = rig + 620 |"),
            "{report}"
        );
        assert!(report.contains("| - | - | 0.2x |"), "{report}");
    }

    /// klipper's two-hop path gets its columns in the delivered tables of
    /// the family it ran in, and the new systems keep their names through
    /// JSON.
    #[test]
    fn klipper_columns_and_names() {
        let results = synthetic(vec![
            synthetic_row(System::Xlb, Family::V4, 1, 1.0, 800.0),
            synthetic_row(System::Iptables, Family::V4, 1, 0.5, 1400.0),
            synthetic_row(System::KlipperTwoHop, Family::V4, 1, 0.25, 2600.0),
            synthetic_row(System::Xlb, Family::V6, 1, 1.0, 900.0),
        ]);
        let json = serde_json::to_string(&results).unwrap();
        assert!(json.contains("\"system\":\"klipper\""), "{json}");
        let report = serde_json::from_str::<Results>(&json).unwrap().report();
        assert!(
            report.contains(
                "| services | xlb | iptables | nftables | xlb/iptables | xlb/nftables | klipper two-hop | xlb/klipper two-hop |"
            ),
            "{report}"
        );
        assert!(
            report.contains("| 1 | 1.00 | 0.50 | - | 2.0x | - | 0.25 | 4.0x |"),
            "{report}"
        );
        assert!(
            report.contains(
                "| services | xlb | ip6tables | nftables | xlb/ip6tables | xlb/nftables |\n"
            ),
            "{report}"
        );
        // No ceiling: no split.
        assert!(!report.contains("rig cost + system cost"), "{report}");
        for system in System::ALL {
            let back: System =
                serde_json::from_str(&serde_json::to_string(&system).unwrap()).unwrap();
            assert_eq!(back, system);
            assert_eq!(
                serde_json::to_string(&system).unwrap(),
                format!("\"{}\"", system.name())
            );
        }
    }
}
