//! `cargo xtask bench [--quick]`: xlb against the iptables and nftables
//! paths (and klipper-lb's two-hop path as K3s deploys it), a bare XDP
//! redirect (the ceiling) and a header-touching XDP forwarder, on one topology (`network`), with one
//! generator and one sink (`generator`); the systems are set up by
//! `systems`, the results typed in `results`. See docs/benchmarks.md. Writes target/bench/{results.json,report.md,plot.svg}.

use std::{
    collections::BTreeMap,
    fs,
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use xlb::{
    dataplane::{self, Limits, Maps, PinDir},
    model::{Backend, DesiredState, Frontend, FrontendSpec, Protocol, ServiceRef},
    reconcile::{Reconciler, frontend_key},
};
mod generator;
mod network;
mod plot;
mod results;
mod systems;

use generator::{Bench, RunResult, template};
use network::{DUT_ADDR, PORT_BASE, dut_addr, dut_sink_side};
use systems::{
    AgentRun, backend, feed, iptables_restore, iptables_ruleset, iptables_service, is_backend,
    klipper_node_ruleset, klipper_node_service, klipper_pod_ruleset, klipper_pod_service,
    nft_family, nft_ruleset, nft_service, process_cpu_ns, rss_bytes, rss_split, service_manifest,
};
use xlb_tests::{fake_api::FakeApi, scoped_in_netns};

use crate::results::{
    AgentFootprint, Apply, Family, KubeSource, Load, MANY_FLOWS, Machine, Results, Row, System,
    Traffic, XdpAlone,
};

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let out_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/bench");
    fs::create_dir_all(&out_dir)?;
    // XLB_BENCH_SCALES=1,100, XLB_BENCH_ONLY=xlb,iptables (names:
    // ceiling, forwarder, xlb, iptables, klipper, nftables),
    // XLB_BENCH_FAMILIES=ipv6 and XLB_BENCH_TRAFFIC (below) narrow a run
    // down while investigating; XLB_BENCH_FOOTPRINT_ONLY=1 measures only the
    // agent's footprint (both sources, largest scale, no traffic). The
    // report covers whatever ran.
    let scales: Vec<u32> = match std::env::var("XLB_BENCH_SCALES") {
        Ok(v) if !v.is_empty() => v.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
        _ if quick => vec![1, 100],
        _ => vec![1, 100, 1000, 10_000],
    };
    let only = std::env::var("XLB_BENCH_ONLY").unwrap_or_default();
    let families = std::env::var("XLB_BENCH_FAMILIES").unwrap_or_default();
    // XLB_BENCH_SECONDS: seconds per measurement (longer for profiling).
    let seconds = match std::env::var("XLB_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(s) => s,
        None if quick => 0.4,
        None => 1.5,
    };
    let started = Instant::now();
    let largest = *scales.last().context("XLB_BENCH_SCALES names no scale")?;
    let footprint_only = std::env::var("XLB_BENCH_FOOTPRINT_ONLY").is_ok_and(|v| v == "1");

    let mut bench = Bench::new()?;
    let mut rows = Vec::new();
    let mut apply = Vec::new();
    let mut footprint = None;

    for system in System::ALL {
        if !only.is_empty() && !only.split(',').any(|o| o == system.name()) {
            continue;
        }
        for family in Family::ALL {
            if !families.is_empty()
                && !families
                    .split(',')
                    .any(|f| f.eq_ignore_ascii_case(family.name()))
                || !system.runs_in(family)
            {
                continue;
            }
            // IPv6 at the ends of the range: one service and the largest
            // scale, enough for the ratio per family.
            let sizes: Vec<u32> = match (system, family) {
                (s, _) if s.is_limit() => vec![1],
                (_, Family::V4) => scales.clone(),
                (_, Family::V6) => scales
                    .iter()
                    .copied()
                    .filter(|&n| n == 1 || n == largest)
                    .collect(),
            };
            for &n in &sizes {
                if footprint_only {
                    if system == System::Xlb && family == Family::V4 && n == largest {
                        eprintln!(
                            "[{:>5.0}s] xlb footprint with {n} services",
                            started.elapsed().as_secs_f64()
                        );
                        let agent = AgentRun::start(&bench.net, n, family)?;
                        let fp = agent_footprint(&bench, &agent, if quick { 1.0 } else { 5.0 })?;
                        eprintln!("    {fp:?}");
                        footprint = Some(fp);
                        agent.stop()?;
                    }
                    continue;
                }
                let measured = measure(&mut bench, system, family, n, seconds, started)?;
                rows.extend(measured.rows);
                apply.extend(measured.apply);
                if system == System::Xlb
                    && family == Family::V4
                    && n == largest
                    && let Guard::Agent(a) = &measured.guard
                {
                    footprint = Some(agent_footprint(&bench, a, if quick { 1.0 } else { 5.0 })?);
                }
                teardown(&mut bench, measured.guard, family)?;
            }
        }
    }

    // The harness works only if every system that ran carried traffic: a
    // broken topology or generator must fail the run, not report zeros.
    for r in &rows {
        if r.traffic == Traffic::UdpManyFlows && r.load == Load::Overload && r.delivered_pps <= 0.0
        {
            anyhow::bail!(
                "harness broken: {} ({}) delivered nothing: {r:?}",
                r.family.system_name(r.system),
                r.family
            );
        }
    }
    let kube = if only.is_empty() || only.split(',').any(|o| o == "xlb") {
        let n = largest;
        eprintln!(
            "[{:>5.0}s] xlb on the Kubernetes API with {n} services",
            started.elapsed().as_secs_f64()
        );
        Some(kube_source(&bench, n, if quick { 1.0 } else { 5.0 })?)
    } else {
        None
    };
    let alone = if footprint_only {
        BTreeMap::new()
    } else {
        xdp_alone(&mut bench, &scales, quick)?
    };
    let machine = Machine {
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")?
            .trim()
            .to_string(),
        cpus: std::thread::available_parallelism()?.get(),
        cpu_model: fs::read_to_string("/proc/cpuinfo")?
            .lines()
            .find(|l| l.starts_with("model name"))
            .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()),
        date_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
        quick,
        seconds_per_run: seconds,
    };
    let results = Results {
        machine,
        throughput: rows,
        apply,
        xdp_alone_ns: alone,
        agent_footprint: footprint,
        kube_source: kube,
    };
    fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    fs::write(out_dir.join("plot.svg"), plot::plot(&results))?;
    let report = results.report();
    fs::write(out_dir.join("report.md"), &report)?;
    println!("{report}");
    println!(
        "bench: wrote {} in {:.0}s",
        out_dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What one system at one size and family measured; `guard` keeps it set
/// up (the agent footprint is measured on it) until `teardown`.
struct Measured {
    rows: Vec<Row>,
    apply: Option<Apply>,
    guard: Guard,
}

/// Sets `system` up with `n` services of `family` and runs every traffic
/// kind through it.
fn measure(
    bench: &mut Bench,
    system: System,
    family: Family,
    n: u32,
    seconds: f64,
    started: Instant,
) -> Result<Measured> {
    eprintln!(
        "[{:>5.0}s] {} ({family}) with {n} services",
        started.elapsed().as_secs_f64(),
        family.system_name(system),
    );
    let setup_started = Instant::now();
    let guard = setup(bench, system, family, n)?;
    let setup_time = setup_started.elapsed();
    bench.net.pin_dut_napi()?;
    let mut rows = Vec::new();
    // Warm-up: neighbours, conntrack, flow tables.
    bench.run(family, 17, n, MANY_FLOWS, 0, seconds / 2.0)?;
    // XLB_BENCH_TRAFFIC=udp-1-flow,... narrows the traffic kinds.
    let traffic = std::env::var("XLB_BENCH_TRAFFIC").unwrap_or_default();
    for t in Traffic::ALL {
        if t.flows() == 1 && n != 1 {
            continue;
        }
        if !traffic.is_empty() && !traffic.split(',').any(|x| x == t.name()) {
            continue;
        }
        let r = bench.run(family, t.proto(), n, t.flows(), 0, seconds)?;
        eprintln!(
            "    {:<18} offered {:>6.3} Mpps delivered {:>6.3} Mpps, {:>6.0} ns/pkt on the DUT CPU{}",
            t.name(),
            r.offered_pps / 1e6,
            r.delivered_pps / 1e6,
            r.dut_ns_per_packet,
            r.sample
                .map(|d| format!(
                    ", e.g. {} -> {}",
                    d.src,
                    std::net::SocketAddr::new(d.dst, d.dst_port)
                ))
                .unwrap_or_default()
        );
        check_translated(system, family, t, &r)?;
        rows.push(row(system, family, n, t, Load::Overload, &r));
        // At capacity: the most delivered by the overload run or one paced
        // a little above its figure, where the generator's surplus no longer
        // costs the DUT CPU (see `Results::capacity_section`). Pacing slows
        // the generator itself (about 4.8 Mpps at most here), so a system
        // faster than that keeps its overload figure. The limits at one
        // service only.
        if matches!(t, Traffic::UdpManyFlows | Traffic::UdpOneFlow)
            && (n == 1 || !system.is_limit())
        {
            let mut best = r;
            for factor in [1.2, 1.5, 2.0] {
                let rate = (r.delivered_pps * factor) as u64;
                let p = bench.run(family, t.proto(), n, t.flows(), rate, seconds)?;
                eprintln!(
                    "    {:<18} paced at {:>6.3} Mpps: offered {:>6.3} delivered {:>6.3} Mpps",
                    t.name(),
                    rate as f64 / 1e6,
                    p.offered_pps / 1e6,
                    p.delivered_pps / 1e6
                );
                if p.delivered_pps > best.delivered_pps {
                    best = p;
                }
            }
            check_translated(system, family, t, &best)?;
            rows.push(row(system, family, n, t, Load::Capacity, &best));
        }
    }
    let apply = if !system.is_limit() {
        // The median of five (each a single process or file write, so one
        // slow fork or wake-up would decide a single sample), each an
        // isolated change: 200 ms apart, so that what the previous one left
        // to do (xlb rewrites its inspect names, O(services), after the map
        // writes) is not counted in the next.
        let mut times = (0..5)
            .map(|i| {
                std::thread::sleep(Duration::from_millis(200));
                apply_one_more(bench, system, family, n + i, &guard)
            })
            .collect::<Result<Vec<_>>>()?;
        times.sort();
        let one_more = times[times.len() / 2];
        Some(Apply {
            system,
            family,
            services: n,
            apply_one_more_us: one_more.as_secs_f64() * 1e6,
            initial_setup_s: setup_time.as_secs_f64(),
        })
    } else {
        None
    };
    Ok(Measured { rows, apply, guard })
}

/// A system that translates must deliver DNATed frames (to a backend's
/// port 8080) with the node's address as their source (SNAT, masquerade);
/// the ceiling and the forwarder deliver them untranslated. Checked on the sink's sample,
/// which any run delivering more than two sampling periods has.
fn check_translated(system: System, family: Family, t: Traffic, r: &RunResult) -> Result<()> {
    let Some(d) = r.sample else {
        anyhow::ensure!(
            r.delivered < 2 * 4096,
            "{} ({family}, {t}): {} frames delivered but none sampled",
            family.system_name(system),
            r.delivered
        );
        return Ok(());
    };
    let translated = d.dst_port == 8080 && is_backend(d.dst) && d.src == dut_sink_side(family);
    let untouched = d.dst == dut_addr(family);
    anyhow::ensure!(
        if system.is_limit() {
            untouched
        } else {
            translated
        },
        "{} ({family}, {t}) delivered {d:?}",
        family.system_name(system)
    );
    Ok(())
}

fn row(
    system: System,
    family: Family,
    services: u32,
    traffic: Traffic,
    load: Load,
    r: &RunResult,
) -> Row {
    Row {
        system,
        family,
        services,
        traffic,
        load,
        offered_pps: r.offered_pps,
        delivered_pps: r.delivered_pps,
        loss: r.loss,
        // NaN (nothing delivered) was written as null before the type.
        dut_ns_per_packet: (!r.dut_ns_per_packet.is_nan()).then_some(r.dut_ns_per_packet),
    }
}

enum Guard {
    Agent(AgentRun),
    Rules(aya::programs::xdp::XdpLinkId),
    Ceiling(aya::programs::xdp::XdpLinkId),
    Forwarder(aya::programs::xdp::XdpLinkId),
    /// klipper-lb's two-hop path: the node's rules as `Rules`, and the
    /// svclb pod's namespace (deleted on drop).
    TwoHop(aya::programs::xdp::XdpLinkId, xlb_tests::netns::Namespace),
}

fn setup(bench: &mut Bench, system: System, family: Family, n: u32) -> Result<Guard> {
    let dut = bench.net.dut.clone();
    Ok(match system {
        System::Xlb => Guard::Agent(AgentRun::start(&bench.net, n, family)?),
        System::Iptables => {
            feed(
                &dut,
                &[iptables_restore(family)],
                &iptables_ruleset(family, n),
            )?;
            Guard::Rules(bench.attach_pass()?)
        }
        System::Nftables => {
            feed(&dut, &["nft", "-f", "-"], &nft_ruleset(family, n))?;
            Guard::Rules(bench.attach_pass()?)
        }
        System::Ceiling => Guard::Ceiling(bench.attach_ceiling()?),
        System::Forwarder => Guard::Forwarder(bench.attach_forwarder()?),
        System::KlipperTwoHop => {
            let pod = bench.net.add_pod()?;
            feed(pod.name(), &["iptables-restore"], &klipper_pod_ruleset(n))?;
            feed(&dut, &["iptables-restore"], &klipper_node_ruleset(n))?;
            Guard::TwoHop(bench.attach_pass()?, pod)
        }
    })
}

fn teardown(bench: &mut Bench, guard: Guard, family: Family) -> Result<()> {
    let dut = bench.net.dut.clone();
    match guard {
        Guard::Agent(a) => a.stop()?,
        Guard::Rules(pass) => {
            bench.detach_pass(pass)?;
            feed(&dut, &[iptables_restore(family)], "*nat\nCOMMIT\n")?;
            let _ = xlb_tests::ns_sh(
                &dut,
                &["nft", "delete", "table", nft_family(family), "xlb-bench"],
            );
            let conntrack_family = match family {
                Family::V4 => "ipv4",
                Family::V6 => "ipv6",
            };
            let _ = xlb_tests::ns_sh(&dut, &["conntrack", "-F", "-f", conntrack_family]);
        }
        Guard::Ceiling(id) => bench.detach_ceiling(id)?,
        Guard::Forwarder(id) => bench.detach_forwarder(id)?,
        Guard::TwoHop(pass, pod) => {
            bench.detach_pass(pass)?;
            // Both hops NATed: conntrack entries in the pod and on the node
            // (the node's twice as many: client → pod, pod → ClusterIP).
            let count = |ns: &str| -> u64 {
                xlb_tests::ns_sh(ns, &["conntrack", "-C"])
                    .ok()
                    .and_then(|c| c.trim().parse().ok())
                    .unwrap_or(0)
            };
            let (in_pod, on_node) = (count(pod.name()), count(&dut));
            eprintln!("    conntrack entries: {in_pod} in the svclb pod, {on_node} on the node");
            // Failed NAT (no free masquerade port) shows as drops here.
            for (place, ns) in [("pod", pod.name()), ("node", dut.as_str())] {
                let stats = xlb_tests::ns_sh(ns, &["conntrack", "-S"]).unwrap_or_default();
                let mut sums: BTreeMap<String, u64> = BTreeMap::new();
                for field in stats.split_whitespace() {
                    if let Some((k, v)) = field.split_once('=')
                        && let Ok(v) = v.parse::<u64>()
                        && v > 0
                        && k != "cpu"
                    {
                        *sums.entry(k.to_string()).or_default() += v;
                    }
                }
                eprintln!("    conntrack -S ({place}): {sums:?}");
            }
            anyhow::ensure!(
                in_pod > 0 && on_node > in_pod,
                "klipper's two hops: {in_pod} conntrack entries in the pod, {on_node} on the node"
            );
            feed(&dut, &["iptables-restore"], "*nat\nCOMMIT\n")?;
            let _ = xlb_tests::ns_sh(&dut, &["conntrack", "-F", "-f", "ipv4"]);
            // The pod's namespace goes with its rules, conntrack and veth.
            drop(pod);
        }
    }
    Ok(())
}

/// Time until one more service (of `family`) is in effect.
fn apply_one_more(
    bench: &Bench,
    system: System,
    family: Family,
    n: u32,
    guard: &Guard,
) -> Result<Duration> {
    let dut = &bench.net.dut;
    match (system, guard) {
        (System::Xlb, Guard::Agent(a)) => {
            // End to end through the manifest source: file written → the
            // frontend is in the pinned SERVICES map. The same file each
            // time: the previous extra Service goes, this one comes.
            let maps = Maps::open_pinned(
                &PinDir::new(std::path::Path::new("/sys/fs/bpf"), &a.node_name).maps(),
            )?;
            let key = frontend_key(&Frontend {
                addr: dut_addr(family),
                port: PORT_BASE + n as u16,
                protocol: Protocol::Udp,
            })?;
            let started = Instant::now();
            fs::write(
                bench.net.dir.join("manifests/extra.yaml"),
                service_manifest(n, family),
            )?;
            while maps.services.get(&key, 0).is_err() {
                if started.elapsed() > Duration::from_secs(60) {
                    anyhow::bail!("the extra service never appeared");
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            Ok(started.elapsed())
        }
        (System::Iptables, _) => {
            let (decl, rules) = iptables_service(family, n, false);
            feed(
                dut,
                &[iptables_restore(family), "--noflush"],
                &format!("*nat\n{decl}{rules}COMMIT\n"),
            )
        }
        (System::KlipperTwoHop, Guard::TwoHop(_, pod)) => {
            // A new Service in K3s: its svclb pod's rules, the node's
            // hostPort and kube-proxy rules.
            let started = Instant::now();
            feed(
                pod.name(),
                &["iptables-restore", "--noflush"],
                &format!("*nat\n{}COMMIT\n", klipper_pod_service(n)),
            )?;
            let (decl, rules) = klipper_node_service(n);
            feed(
                dut,
                &["iptables-restore", "--noflush"],
                &format!("*nat\n{decl}{rules}COMMIT\n"),
            )?;
            Ok(started.elapsed())
        }
        (System::Nftables, _) => {
            let (chains, elements) = nft_service(family, n);
            feed(
                dut,
                &["nft", "-f", "-"],
                &format!(
                    "{chains}add element {} xlb-bench service-ips {{ {elements} }}\n",
                    nft_family(family)
                ),
            )
        }
        _ => Ok(Duration::ZERO),
    }
}

/// Resident memory and CPU of the agent, idle and while one manifest file
/// is rewritten 100 times a second.
fn agent_footprint(bench: &Bench, a: &AgentRun, seconds: f64) -> Result<AgentFootprint> {
    let pid = a.pid();
    let cpu0 = process_cpu_ns(pid)?;
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let idle_cpu = (process_cpu_ns(pid)? - cpu0) as f64 / (seconds * 1e9);
    let idle_rss = rss_bytes(pid)?;
    eprintln!("    idle: {}", rss_split(pid));
    let cpu1 = process_cpu_ns(pid)?;
    let started = Instant::now();
    let mut writes = 0u64;
    let mut max_rss = idle_rss;
    while started.elapsed().as_secs_f64() < seconds {
        let mut text = service_manifest(50_000, Family::V4);
        if writes % 2 == 1 {
            text = text.replacen("nodeName: remote", "nodeName: elsewhere", 1);
        }
        fs::write(bench.net.dir.join("manifests/churn.yaml"), text)?;
        writes += 1;
        max_rss = max_rss.max(rss_bytes(pid)?);
        std::thread::sleep(Duration::from_millis(10));
    }
    let churn_cpu = (process_cpu_ns(pid)? - cpu1) as f64 / started.elapsed().as_secs_f64() / 1e9;
    Ok(AgentFootprint {
        idle_rss_bytes: idle_rss,
        idle_cpu_fraction: idle_cpu,
        churn_writes_per_s: writes as f64 / started.elapsed().as_secs_f64(),
        churn_max_rss_bytes: max_rss,
        churn_cpu_fraction: churn_cpu,
    })
}

/// The agent on the Kubernetes API (the fake API server, in the DUT
/// namespace) with `n` services: time to the first complete programming,
/// latency of one EndpointSlice change until its map writes are done, and
/// CPU while EndpointSlices change 50 times a second.
fn kube_source(bench: &Bench, n: u32, seconds: f64) -> Result<KubeSource> {
    let dut = &bench.net.dut;
    let node_name = format!("{dut}-kube");
    let api = FakeApi::start_in_netns(dut, "127.0.0.1:0".parse()?)?;
    let kubeconfig = bench.net.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let text = systems::manifests(n, &node_name, Family::V4);
    let mut slices = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let object: serde_json::Value = serde::Deserialize::deserialize(document)?;
        if object["kind"] == "EndpointSlice" {
            slices.push(object.clone());
        }
        api.apply(object);
    }
    let kubeconfig = kubeconfig.to_string_lossy().into_owned();
    let started = Instant::now();
    let agent = AgentRun::spawn(
        &bench.net,
        node_name,
        &["--kubeconfig", &kubeconfig],
        "agent-kube.log",
    )?;
    let initial = started.elapsed();
    let pid = agent.pid();
    let log = agent.log.clone();

    // One slice at a time: its first endpoint moves to another address.
    let mut round = 0u32;
    let mut change_slice = |i: usize| {
        round += 1;
        let mut slice = slices[i].clone();
        slice["endpoints"][0]["addresses"][0] = serde_json::Value::from(format!(
            "10.{}.{}.{}",
            130 + round % 100,
            (i / 256) % 256,
            i % 256
        ));
        api.apply(slice);
    };
    let programmed = || -> usize {
        fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("services programmed")
            .count()
    };
    let mut latencies = Vec::new();
    for k in 0..5 {
        let before = programmed();
        let t = Instant::now();
        change_slice((k * 7919) % slices.len());
        while programmed() == before {
            if t.elapsed() > Duration::from_secs(30) {
                anyhow::bail!("a slice change was never programmed");
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(200));
    }
    latencies.sort_by(f64::total_cmp);

    let idle_rss = rss_bytes(pid)?;
    eprintln!("    idle: {}", rss_split(pid));
    let mut max_rss = idle_rss;
    let cpu0 = process_cpu_ns(pid)?;
    let churn_started = Instant::now();
    let mut changes = 0usize;
    // About 100 changes a second, as the manifest churn (issue 11's rate).
    while churn_started.elapsed().as_secs_f64() < seconds {
        change_slice((changes * 104_729) % slices.len());
        changes += 1;
        max_rss = max_rss.max(rss_bytes(pid)?);
        std::thread::sleep(Duration::from_millis(10));
    }
    let churn_s = churn_started.elapsed().as_secs_f64();
    let churn_cpu = (process_cpu_ns(pid)? - cpu0) as f64 / churn_s / 1e9;
    let rss = rss_bytes(pid)?;

    agent.stop()?;
    eprintln!(
        "    initial {:.1}s, one slice change {:.0} ms (median), churn {:.0}/s at {:.1} % CPU; \
         idle {:.1} MiB, churn up to {:.1} MiB",
        initial.as_secs_f64(),
        latencies[latencies.len() / 2],
        changes as f64 / churn_s,
        churn_cpu * 100.0,
        idle_rss as f64 / 1_048_576.0,
        max_rss as f64 / 1_048_576.0,
    );
    Ok(KubeSource {
        services: n,
        initial_s: initial.as_secs_f64(),
        slice_change_ms_median: latencies[latencies.len() / 2],
        churn_changes_per_s: changes as f64 / churn_s,
        churn_cpu_fraction: churn_cpu,
        rss_bytes: rss,
        idle_rss_bytes: Some(idle_rss),
        churn_max_rss_bytes: Some(max_rss),
    })
}

/// ns/packet of `xlb_xdp` alone (BPF_PROG_TEST_RUN, 10^6 repetitions).
/// `XLB_BENCH_PROFILE=hit|new|miss:SECONDS`: see `xdp_alone`.
fn profile_case() -> Option<(String, f64)> {
    let v = std::env::var("XLB_BENCH_PROFILE").ok()?;
    let (case, secs) = v.split_once(':')?;
    Some((case.to_string(), secs.parse().ok()?))
}

fn xdp_alone(bench: &mut Bench, scales: &[u32], quick: bool) -> Result<BTreeMap<u32, XdpAlone>> {
    let repeat = if quick { 200_000 } else { 1_000_000 };
    let node = format!("{}-alone", bench.net.dut);
    let pins = PinDir::new(std::path::Path::new("/sys/fs/bpf"), &node);
    let limits = Limits {
        max_services: 32_768,
        max_backends: 131_072,
        max_flows: 4_194_304,
    };
    let mut ebpf = dataplane::load(&pins, limits)?;
    let mut maps = Maps::take(&mut ebpf)?;
    let mut reconciler = Reconciler::new(limits.max_services, limits.max_backends);
    let target_fd = {
        let p: &aya::programs::Xdp = ebpf.program("xlb_xdp").context("xlb_xdp")?.try_into()?;
        p.fd()?.try_clone()?
    };
    let sizes: Vec<u32> = [1u32, *scales.last().unwrap()].into_iter().collect();
    let mut out = BTreeMap::new();
    let dut = bench.net.dut.clone();
    for &n in &sizes {
        // Local backends: the XDP-alone runs measure lookup and translation,
        // not SNAT port allocation.
        let desired = desired_local(n);
        let started = Instant::now();
        let summary = reconciler.apply(&desired, &mut maps);
        let program_time = started.elapsed();
        anyhow::ensure!(summary.errors.is_empty(), "{:?}", summary.errors);
        // One more service, applied alone: the reconciler's map writes.
        // One more service, as a watch event would deliver it: only its
        // map writes (the diff over every frontend is not part of it).
        let more = desired_local(n + 1);
        let extra: std::collections::BTreeSet<Frontend> = more
            .frontends
            .keys()
            .filter(|f| !desired.frontends.contains_key(*f))
            .copied()
            .collect();
        let t = Instant::now();
        let s = reconciler.apply_changed(&more, &extra, &mut maps);
        let one_more = t.elapsed();
        anyhow::ensure!(s.added == 1, "{s:?}");
        let t = Instant::now();
        reconciler.apply(&more, &mut maps);
        let full_diff = t.elapsed();
        reconciler.apply(&desired, &mut maps);

        let mut measure = |flows: u32,
                           services: u32,
                           port_base: u16,
                           src: Option<std::net::Ipv4Addr>,
                           reps: u32|
         -> Result<f64> {
            let (frame, mut cfg) = template(17, [2; 6], [4; 6], DUT_ADDR.into(), services, flows);
            cfg.dst_port_base = port_base;
            if let Some(src) = src {
                cfg.src_addr_base = u32::from(src);
            }
            scoped_in_netns(&dut, || bench.xdp_alone_ns(&target_fd, cfg, &frame, reps))?
        };
        // XLB_BENCH_PROFILE=hit|new|miss:SECONDS repeats one case for that
        // long (for `perf record -a` alongside), prints its figure, and
        // stops the run there.
        if let Some((case, secs)) = profile_case() {
            let until = Instant::now() + Duration::from_secs_f64(secs);
            while Instant::now() < until {
                let ns = match case.as_str() {
                    "hit" => measure(1, 1, PORT_BASE, None, repeat)?,
                    "new" => measure(u32::MAX, n, PORT_BASE, None, repeat)?,
                    _ => measure(1, 1, 9_000, None, repeat)?,
                };
                eprintln!("profile {case}, {n} services: {ns} ns");
            }
            drop(maps);
            drop(ebpf);
            dataplane::attach::reset(&pins)?;
            anyhow::bail!("XLB_BENCH_PROFILE: profiling run, no report");
        }
        let ct_hit = measure(1, 1, PORT_BASE, None, repeat)?;
        // The same hit with forwarding on (the agent's default): the route
        // and neighbour lookup (`bpf_fib_lookup`) and the egress check come
        // on top. Nothing is in the egress devmap here, so the frame is
        // passed after the lookup instead of redirected.
        maps.write_config(&lb_common::Config {
            flags: lb_common::CONFIG_F_REDIRECT,
            ..Default::default()
        })?;
        let ct_hit_routed = measure(1, 1, PORT_BASE, None, repeat)?;
        maps.write_config(&lb_common::Config::default())?;
        let new_flow = measure(u32::MAX, n, PORT_BASE, None, repeat)?;
        let not_service = measure(1, 1, 9_000, None, repeat)?;
        let mut entry = XdpAlone {
            ct_hit,
            ct_hit_routed: Some(ct_hit_routed),
            new_flow,
            not_service,
            program_all_ms: program_time.as_secs_f64() * 1e3,
            reconcile_one_more_us: one_more.as_secs_f64() * 1e6,
            full_diff_unchanged_us: full_diff.as_secs_f64() * 1e6,
            ..XdpAlone::default()
        };
        if n == *sizes.last().unwrap() && !quick {
            // Fill the flow table to about a million flows, then again.
            measure(
                u32::MAX,
                n,
                PORT_BASE,
                Some(std::net::Ipv4Addr::new(10, 102, 0, 0)),
                1_000_000,
            )?;
            entry.ct_hit_1m_flows = Some(measure(1, 1, PORT_BASE, None, repeat)?);
            entry.new_flow_1m_flows = Some(measure(
                u32::MAX,
                n,
                PORT_BASE,
                Some(std::net::Ipv4Addr::new(10, 103, 0, 0)),
                repeat,
            )?);
            entry.flows_in_table = Some(maps.flows.keys().count() as u64);
        }
        eprintln!("xdp alone, {n} services: {entry:?}");
        out.insert(n, entry);
    }
    drop(maps);
    drop(ebpf);
    dataplane::attach::reset(&pins)?;
    Ok(out)
}

fn desired_local(n: u32) -> DesiredState {
    let mut d = DesiredState::default();
    for i in 0..n {
        d.frontends.insert(
            Frontend {
                addr: IpAddr::V4(DUT_ADDR),
                port: PORT_BASE + i as u16,
                protocol: Protocol::Udp,
            },
            FrontendSpec {
                service: ServiceRef {
                    namespace: "bench".into(),
                    name: format!("s{i}"),
                    port_name: "u".into(),
                },
                backends: (0..3)
                    .map(|j| Backend {
                        addr: backend(Family::V4, i, j),
                        port: 8080,
                        local: true,
                        terminating: false,
                    })
                    .collect(),
                local_only: false,
                affinity_timeout: None,
                source_ranges: vec![],
            },
        );
    }
    d
}
