//! `cargo xtask bench [--quick]`: see `harness.rs` and
//! docs/benchmarks.md. Writes target/bench/{results.json,report.md,plot.svg}.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::json;
use xlb::{
    dataplane::{self, Limits, Maps, PinDir},
    model::{Backend, DesiredState, Frontend, FrontendSpec, Protocol, ServiceRef},
    reconcile::{Reconciler, frontend_key},
};
mod harness;

use harness::{
    AgentRun, Bench, DUT_ADDR, PORT_BASE, RunResult, backend, feed, iptables_ruleset,
    iptables_service, nft_ruleset, nft_service, process_cpu_ns, rss_bytes, service_manifest,
    template,
};
use xlb_tests::{fake_api::FakeApi, scoped_in_netns};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum System {
    Xlb,
    Iptables,
    Nftables,
    Ceiling,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Xlb => "xlb",
            System::Iptables => "iptables",
            System::Nftables => "nftables",
            System::Ceiling => "ceiling",
        }
    }
}

/// Flows of the "many flows" traffic: below the 3 x 28 232 SNAT ports one
/// service with three remote backends has, so no system runs out of ports.
const MANY_FLOWS: u32 = 60_000;

struct Traffic {
    name: &'static str,
    proto: u8,
    flows: u32,
}

const TRAFFIC: [Traffic; 4] = [
    Traffic {
        name: "udp-60k-flows",
        proto: 17,
        flows: MANY_FLOWS,
    },
    Traffic {
        name: "tcp-syn-60k-flows",
        proto: 6,
        flows: MANY_FLOWS,
    },
    Traffic {
        name: "udp-1-flow",
        proto: 17,
        flows: 1,
    },
    // Every packet a new flow: conntrack creation and, for iptables, the
    // rule walk, on every packet.
    Traffic {
        name: "udp-new-flows",
        proto: 17,
        flows: u32::MAX,
    },
];

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let out_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/bench");
    fs::create_dir_all(&out_dir)?;
    // XLB_BENCH_SCALES=1,100 and XLB_BENCH_ONLY=xlb,iptables narrow a run
    // down while investigating; the report covers whatever ran.
    let scales: Vec<u32> = match std::env::var("XLB_BENCH_SCALES") {
        Ok(v) if !v.is_empty() => v.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
        _ if quick => vec![1, 100],
        _ => vec![1, 100, 1000, 10_000],
    };
    let only = std::env::var("XLB_BENCH_ONLY").unwrap_or_default();
    let seconds = if quick { 0.4 } else { 1.5 };
    let started = Instant::now();

    let mut bench = Bench::new()?;
    let mut rows = Vec::new();
    let mut apply = Vec::new();
    let mut footprint = serde_json::Value::Null;

    for system in [
        System::Ceiling,
        System::Xlb,
        System::Iptables,
        System::Nftables,
    ] {
        if !only.is_empty() && !only.split(',').any(|o| o == system.name()) {
            continue;
        }
        let sizes: Vec<u32> = if system == System::Ceiling {
            vec![1]
        } else {
            scales.clone()
        };
        for &n in &sizes {
            eprintln!(
                "[{:>5.0}s] {} with {n} services",
                started.elapsed().as_secs_f64(),
                system.name()
            );
            let setup_started = Instant::now();
            let guard = setup(&mut bench, system, n)?;
            let setup_time = setup_started.elapsed();
            bench.net.pin_dut_napi()?;
            // Warm-up: neighbours, conntrack, flow tables.
            bench.run(17, n, MANY_FLOWS, 0, seconds / 2.0)?;
            for t in &TRAFFIC {
                if t.flows == 1 && n != 1 {
                    continue;
                }
                let r = bench.run(t.proto, n, t.flows, 0, seconds)?;
                eprintln!(
                    "    {:<18} offered {:>6.3} Mpps delivered {:>6.3} Mpps, {:>6.0} ns/pkt on the DUT CPU",
                    t.name,
                    r.offered_pps / 1e6,
                    r.delivered_pps / 1e6,
                    r.dut_ns_per_packet
                );
                rows.push(row(system, n, t.name, "overload", &r));
                if !quick && n == 1 && t.flows == MANY_FLOWS && t.proto == 17 {
                    let nl = bench.no_loss_rate(t.proto, n, t.flows, r.offered_pps, seconds)?;
                    eprintln!(
                        "    {:<18} no-loss {:>6.3} Mpps",
                        t.name,
                        nl.offered_pps / 1e6
                    );
                    rows.push(row(system, n, t.name, "no-loss", &nl));
                }
            }
            if system != System::Ceiling {
                let one_more = apply_one_more(&bench, system, n, &guard)?;
                apply.push(json!({
                    "system": system.name(), "services": n,
                    "apply_one_more_us": one_more.as_secs_f64() * 1e6,
                    "initial_setup_s": setup_time.as_secs_f64(),
                }));
            }
            if system == System::Xlb
                && n == *scales.last().unwrap()
                && let Guard::Agent(a) = &guard
            {
                footprint = agent_footprint(&bench, a, if quick { 1.0 } else { 5.0 })?;
            }
            teardown(&mut bench, guard)?;
        }
    }

    // The harness works only if every system that ran carried traffic: a
    // broken topology or generator must fail the run, not report zeros.
    for r in &rows {
        let delivered = r["delivered_pps"].as_f64().unwrap_or(0.0);
        if r["traffic"] == "udp-60k-flows" && r["load"] == "overload" && delivered <= 0.0 {
            anyhow::bail!("harness broken: {} delivered nothing: {r}", r["system"]);
        }
    }
    let kube = if only.is_empty() || only.split(',').any(|o| o == "xlb") {
        let n = *scales.last().unwrap();
        eprintln!(
            "[{:>5.0}s] xlb on the Kubernetes API with {n} services",
            started.elapsed().as_secs_f64()
        );
        kube_source(&bench, n, if quick { 1.0 } else { 5.0 })?
    } else {
        serde_json::Value::Null
    };
    let alone = xdp_alone(&mut bench, &scales, quick)?;
    let machine = json!({
        "kernel": fs::read_to_string("/proc/sys/kernel/osrelease")?.trim(),
        "cpus": std::thread::available_parallelism()?.get(),
        "cpu_model": fs::read_to_string("/proc/cpuinfo")?.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()),
        "date_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
        "quick": quick,
        "seconds_per_run": seconds,
    });
    let results = json!({
        "machine": machine, "throughput": rows, "apply": apply,
        "xdp_alone_ns": alone, "agent_footprint": footprint, "kube_source": kube,
    });
    fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    fs::write(out_dir.join("plot.svg"), plot(&results))?;
    fs::write(out_dir.join("report.md"), report(&results))?;
    println!("{}", report(&results));
    println!(
        "bench: wrote {} in {:.0}s",
        out_dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn row(system: System, n: u32, traffic: &str, load: &str, r: &RunResult) -> serde_json::Value {
    json!({
        "system": system.name(), "services": n, "traffic": traffic, "load": load,
        "offered_pps": r.offered_pps, "delivered_pps": r.delivered_pps,
        "loss": r.loss, "dut_ns_per_packet": r.dut_ns_per_packet,
    })
}

enum Guard {
    Agent(AgentRun),
    Rules(aya::programs::xdp::XdpLinkId),
    Ceiling(aya::programs::xdp::XdpLinkId),
}

fn setup(bench: &mut Bench, system: System, n: u32) -> Result<Guard> {
    let dut = bench.net.dut.clone();
    Ok(match system {
        System::Xlb => Guard::Agent(AgentRun::start(&bench.net, n)?),
        System::Iptables => {
            feed(&dut, &["iptables-restore"], &iptables_ruleset(n))?;
            Guard::Rules(bench.attach_pass()?)
        }
        System::Nftables => {
            feed(&dut, &["nft", "-f", "-"], &nft_ruleset(n))?;
            Guard::Rules(bench.attach_pass()?)
        }
        System::Ceiling => Guard::Ceiling(bench.attach_ceiling()?),
    })
}

fn teardown(bench: &mut Bench, guard: Guard) -> Result<()> {
    let dut = bench.net.dut.clone();
    match guard {
        Guard::Agent(a) => a.stop()?,
        Guard::Rules(pass) => {
            bench.detach_pass(pass)?;
            feed(&dut, &["iptables-restore"], "*nat\nCOMMIT\n")?;
            let _ = xlb_tests::ns_sh(&dut, &["nft", "delete", "table", "ip", "xlb-bench"]);
            let _ = xlb_tests::ns_sh(&dut, &["conntrack", "-F"]);
        }
        Guard::Ceiling(id) => bench.detach_ceiling(id)?,
    }
    Ok(())
}

/// Time until one more service is in effect.
fn apply_one_more(bench: &Bench, system: System, n: u32, guard: &Guard) -> Result<Duration> {
    let dut = &bench.net.dut;
    match (system, guard) {
        (System::Xlb, Guard::Agent(a)) => {
            // End to end through the manifest source: file written → the
            // frontend is in the pinned SERVICES map.
            let maps = Maps::open_pinned(
                &PinDir::new(std::path::Path::new("/sys/fs/bpf"), &a.node_name).maps(),
            )?;
            let key = frontend_key(&Frontend {
                addr: IpAddr::V4(DUT_ADDR),
                port: PORT_BASE + n as u16,
                protocol: Protocol::Udp,
            })?;
            let started = Instant::now();
            fs::write(
                bench.net.dir.join("manifests/extra.yaml"),
                service_manifest(n),
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
            let (decl, rules) = iptables_service(n, false);
            feed(
                dut,
                &["iptables-restore", "--noflush"],
                &format!("*nat\n{decl}{rules}COMMIT\n"),
            )
        }
        (System::Nftables, _) => {
            let (chains, elements) = nft_service(n);
            feed(
                dut,
                &["nft", "-f", "-"],
                &format!("{chains}add element ip xlb-bench service-ips {{ {elements} }}\n"),
            )
        }
        _ => Ok(Duration::ZERO),
    }
}

/// Resident memory and CPU of the agent, idle and while one manifest file
/// is rewritten 100 times a second.
fn agent_footprint(bench: &Bench, a: &AgentRun, seconds: f64) -> Result<serde_json::Value> {
    let pid = a.pid();
    let cpu0 = process_cpu_ns(pid)?;
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let idle_cpu = (process_cpu_ns(pid)? - cpu0) as f64 / (seconds * 1e9);
    let idle_rss = rss_bytes(pid)?;
    let cpu1 = process_cpu_ns(pid)?;
    let started = Instant::now();
    let mut writes = 0u64;
    let mut max_rss = idle_rss;
    while started.elapsed().as_secs_f64() < seconds {
        let mut text = service_manifest(50_000);
        if writes % 2 == 1 {
            text = text.replacen("nodeName: remote", "nodeName: elsewhere", 1);
        }
        fs::write(bench.net.dir.join("manifests/churn.yaml"), text)?;
        writes += 1;
        max_rss = max_rss.max(rss_bytes(pid)?);
        std::thread::sleep(Duration::from_millis(10));
    }
    let churn_cpu = (process_cpu_ns(pid)? - cpu1) as f64 / started.elapsed().as_secs_f64() / 1e9;
    Ok(json!({
        "idle_rss_bytes": idle_rss, "idle_cpu_fraction": idle_cpu,
        "churn_writes_per_s": writes as f64 / started.elapsed().as_secs_f64(),
        "churn_max_rss_bytes": max_rss, "churn_cpu_fraction": churn_cpu,
    }))
}

/// The agent on the Kubernetes API (the fake API server, in the DUT
/// namespace) with `n` services: time to the first complete programming,
/// latency of one EndpointSlice change until its map writes are done, and
/// CPU while EndpointSlices change 50 times a second.
fn kube_source(bench: &Bench, n: u32, seconds: f64) -> Result<serde_json::Value> {
    let dut = &bench.net.dut;
    let node_name = format!("{dut}-kube");
    let api = FakeApi::start_in_netns(dut, "127.0.0.1:0".parse()?)?;
    let kubeconfig = bench.net.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let text = harness::manifests(n, &node_name);
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
        slice["endpoints"][0]["addresses"][0] = json!(format!(
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

    let cpu0 = process_cpu_ns(pid)?;
    let churn_started = Instant::now();
    let mut changes = 0usize;
    while churn_started.elapsed().as_secs_f64() < seconds {
        change_slice((changes * 104_729) % slices.len());
        changes += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let churn_s = churn_started.elapsed().as_secs_f64();
    let churn_cpu = (process_cpu_ns(pid)? - cpu0) as f64 / churn_s / 1e9;
    let rss = rss_bytes(pid)?;

    agent.stop()?;
    eprintln!(
        "    initial {:.1}s, one slice change {:.0} ms (median), churn {:.0}/s at {:.1} % CPU",
        initial.as_secs_f64(),
        latencies[latencies.len() / 2],
        changes as f64 / churn_s,
        churn_cpu * 100.0
    );
    Ok(json!({
        "services": n, "initial_s": initial.as_secs_f64(),
        "slice_change_ms_median": latencies[latencies.len() / 2],
        "churn_changes_per_s": changes as f64 / churn_s, "churn_cpu_fraction": churn_cpu,
        "rss_bytes": rss,
    }))
}

/// ns/packet of `xlb_xdp` alone (BPF_PROG_TEST_RUN, 10^6 repetitions).
fn xdp_alone(bench: &mut Bench, scales: &[u32], quick: bool) -> Result<serde_json::Value> {
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
            let (frame, mut cfg) = template(17, [2; 6], [4; 6], DUT_ADDR, services, flows);
            cfg.dst_port_base = port_base;
            if let Some(src) = src {
                cfg.src_addr_base = u32::from(src);
            }
            scoped_in_netns(&dut, || bench.xdp_alone_ns(&target_fd, cfg, &frame, reps))?
        };
        let ct_hit = measure(1, 1, PORT_BASE, None, repeat)?;
        let new_flow = measure(u32::MAX, n, PORT_BASE, None, repeat)?;
        let not_service = measure(1, 1, 9_000, None, repeat)?;
        let mut entry = json!({
            "ct_hit": ct_hit, "new_flow": new_flow, "not_service": not_service,
            "program_all_ms": program_time.as_secs_f64() * 1e3,
            "reconcile_one_more_us": one_more.as_secs_f64() * 1e6,
            "full_diff_unchanged_us": full_diff.as_secs_f64() * 1e6,
        });
        if n == *sizes.last().unwrap() && !quick {
            // Fill the flow table to about a million flows, then again.
            measure(
                u32::MAX,
                n,
                PORT_BASE,
                Some(std::net::Ipv4Addr::new(10, 102, 0, 0)),
                1_000_000,
            )?;
            entry["ct_hit_1m_flows"] = json!(measure(1, 1, PORT_BASE, None, repeat)?);
            entry["new_flow_1m_flows"] = json!(measure(
                u32::MAX,
                n,
                PORT_BASE,
                Some(std::net::Ipv4Addr::new(10, 103, 0, 0)),
                repeat
            )?);
            entry["flows_in_table"] = json!(maps.flows.keys().count());
        }
        eprintln!("xdp alone, {n} services: {entry}");
        out.insert(n.to_string(), entry);
    }
    drop(maps);
    drop(ebpf);
    dataplane::attach::reset(&pins)?;
    Ok(json!(out))
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
                        addr: IpAddr::V4(backend(i, j)),
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

// ------------------------------------------------------------------ output

fn get<'a>(
    results: &'a serde_json::Value,
    system: &str,
    n: u64,
    traffic: &str,
    load: &str,
) -> Option<&'a serde_json::Value> {
    results["throughput"].as_array()?.iter().find(|r| {
        r["system"] == system && r["services"] == n && r["traffic"] == traffic && r["load"] == load
    })
}

fn mpps(v: Option<&serde_json::Value>) -> String {
    v.and_then(|r| r["delivered_pps"].as_f64())
        .map(|p| format!("{:.2}", p / 1e6))
        .unwrap_or_else(|| "-".into())
}

fn report(results: &serde_json::Value) -> String {
    let mut s = String::new();
    let m = &results["machine"];
    let _ = writeln!(s, "# xlb benchmark\n");
    let _ = writeln!(
        s,
        "Kernel {}, {} CPUs ({}), {} s per run{}. Generator: BPF_PROG_TEST_RUN live frames on CPU 0; device under test: dut0's threaded NAPI on CPU 1; sink: XDP counter. Delivered = frames counted at the sink.\n",
        m["kernel"].as_str().unwrap_or("?"),
        m["cpus"],
        m["cpu_model"].as_str().unwrap_or("?"),
        m["seconds_per_run"],
        if m["quick"].as_bool() == Some(true) {
            " (--quick)"
        } else {
            ""
        }
    );
    let systems = ["xlb", "iptables", "nftables"];
    let sizes: Vec<u64> = {
        let mut v: Vec<u64> = results["throughput"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["services"].as_u64())
            .collect();
        v.sort();
        v.dedup();
        v
    };
    for traffic in ["udp-60k-flows", "tcp-syn-60k-flows", "udp-new-flows"] {
        let _ = writeln!(s, "## Delivered Mpps under overload, {traffic}\n");
        let _ = writeln!(
            s,
            "| services | xlb | iptables | nftables | xlb/iptables | xlb/nftables |\n|---|---|---|---|---|---|"
        );
        for &n in &sizes {
            let x = get(results, "xlb", n, traffic, "overload")
                .and_then(|r| r["delivered_pps"].as_f64());
            let i = get(results, "iptables", n, traffic, "overload")
                .and_then(|r| r["delivered_pps"].as_f64());
            let f = get(results, "nftables", n, traffic, "overload")
                .and_then(|r| r["delivered_pps"].as_f64());
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.1}x", a / b),
                _ => "-".into(),
            };
            let _ = writeln!(
                s,
                "| {n} | {} | {} | {} | {} | {} |",
                mpps(get(results, "xlb", n, traffic, "overload")),
                mpps(get(results, "iptables", n, traffic, "overload")),
                mpps(get(results, "nftables", n, traffic, "overload")),
                ratio(x, i),
                ratio(x, f)
            );
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(
        s,
        "## DUT CPU ns per delivered packet (udp-60k-flows, overload)\n"
    );
    let _ = writeln!(
        s,
        "| services | xlb | iptables | nftables |\n|---|---|---|---|"
    );
    for &n in &sizes {
        let ns = |sys: &str| {
            get(results, sys, n, "udp-60k-flows", "overload")
                .and_then(|r| r["dut_ns_per_packet"].as_f64())
                .map(|v| format!("{v:.0}"))
                .unwrap_or("-".into())
        };
        let _ = writeln!(
            s,
            "| {n} | {} | {} | {} |",
            ns("xlb"),
            ns("iptables"),
            ns("nftables")
        );
    }
    let ceiling = get(results, "ceiling", 1, "udp-60k-flows", "overload")
        .and_then(|r| r["delivered_pps"].as_f64());
    let xlb1 = get(results, "xlb", 1, "udp-60k-flows", "overload")
        .and_then(|r| r["delivered_pps"].as_f64());
    let _ = writeln!(s, "\n## Ceiling and single flow\n");
    let _ = writeln!(
        s,
        "Bare XDP redirect (ceiling): {} Mpps; xlb at 1 service: {} Mpps = {} of the ceiling.\n",
        ceiling
            .map(|c| format!("{:.2}", c / 1e6))
            .unwrap_or("-".into()),
        xlb1.map(|c| format!("{:.2}", c / 1e6))
            .unwrap_or("-".into()),
        match (xlb1, ceiling) {
            (Some(x), Some(c)) => format!("{:.0} %", 100.0 * x / c),
            _ => "-".into(),
        }
    );
    let _ = writeln!(
        s,
        "| system | udp-1-flow Mpps | no-loss Mpps (udp-60k-flows, 1 service) |\n|---|---|---|"
    );
    for sys in systems.iter().chain(["ceiling"].iter()) {
        let _ = writeln!(
            s,
            "| {sys} | {} | {} |",
            mpps(get(results, sys, 1, "udp-1-flow", "overload")),
            get(results, sys, 1, "udp-60k-flows", "no-loss")
                .and_then(|r| r["offered_pps"].as_f64())
                .map(|p| format!("{:.2}", p / 1e6))
                .unwrap_or("-".into())
        );
    }
    let _ = writeln!(s, "\n## Applying one more service\n");
    let _ = writeln!(
        s,
        "| system | services | one more (µs) | initial set-up (s) |\n|---|---|---|---|"
    );
    for a in results["apply"].as_array().unwrap() {
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {:.2} |",
            a["system"].as_str().unwrap_or(""),
            a["services"],
            a["apply_one_more_us"].as_f64().unwrap_or(0.0),
            a["initial_setup_s"].as_f64().unwrap_or(0.0)
        );
    }
    let _ = writeln!(
        s,
        "\nxlb's figure is end to end through the manifest directory (inotify, 100 ms debounce, re-reading every file); the reconciler's own map writes for one more service are in the next table.\n"
    );
    let _ = writeln!(s, "## xlb_xdp alone (BPF_PROG_TEST_RUN, ns per packet)\n");
    let _ = writeln!(
        s,
        "| services | flow hit | new flow | not a service | flow hit, ~1M flows | new flow, ~1M flows | program all (ms) | reconcile one more (µs) |\n|---|---|---|---|---|---|---|---|"
    );
    if let Some(o) = results["xdp_alone_ns"].as_object() {
        let mut keys: Vec<&String> = o.keys().collect();
        keys.sort_by_key(|k| k.parse::<u64>().unwrap_or(0));
        for k in keys {
            let e = &o[k];
            let f = |name: &str| {
                e[name]
                    .as_f64()
                    .map(|v| format!("{v:.0}"))
                    .unwrap_or("-".into())
            };
            let _ = writeln!(
                s,
                "| {k} | {} | {} | {} | {} | {} | {} | {} |",
                f("ct_hit"),
                f("new_flow"),
                f("not_service"),
                f("ct_hit_1m_flows"),
                f("new_flow_1m_flows"),
                f("program_all_ms"),
                f("reconcile_one_more_us")
            );
        }
    }
    let fp = &results["agent_footprint"];
    if fp.is_object() {
        let _ = writeln!(s, "\n## Agent footprint at the largest size\n");
        let _ = writeln!(
            s,
            "Idle: {:.1} MiB resident, {:.1} % of a CPU. Manifest churn ({:.0} file writes/s): up to {:.1} MiB, {:.1} % of a CPU.",
            fp["idle_rss_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            fp["idle_cpu_fraction"].as_f64().unwrap_or(0.0) * 100.0,
            fp["churn_writes_per_s"].as_f64().unwrap_or(0.0),
            fp["churn_max_rss_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            fp["churn_cpu_fraction"].as_f64().unwrap_or(0.0) * 100.0
        );
    }
    let k = &results["kube_source"];
    if !k.is_null() {
        let _ = writeln!(s, "\n## Kubernetes source\n");
        let _ = writeln!(
            s,
            "The agent on the (fake) Kubernetes API with {} services and as many EndpointSlices: \
             first complete programming {:.1} s after start (lists included); one EndpointSlice \
             change programmed {:.0} ms after the API server took it (median of 5; 100 ms of it \
             is the agent's deliberate settle time); EndpointSlice churn at {:.0} changes/s: \
             {:.1} % of a CPU, {:.1} MiB resident. Each change re-translates and re-programs only \
             its Service.",
            k["services"],
            k["initial_s"].as_f64().unwrap_or(0.0),
            k["slice_change_ms_median"].as_f64().unwrap_or(0.0),
            k["churn_changes_per_s"].as_f64().unwrap_or(0.0),
            k["churn_cpu_fraction"].as_f64().unwrap_or(0.0) * 100.0,
            k["rss_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        );
    }
    s
}

/// Delivered Mpps vs number of services, one line per system (SVG).
fn plot(results: &serde_json::Value) -> String {
    let (w, h, l, r, t, b) = (640.0, 400.0, 60.0, 120.0, 30.0, 50.0);
    let rows = results["throughput"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let pts = |sys: &str| -> Vec<(f64, f64)> {
        let mut v: Vec<(f64, f64)> = rows
            .iter()
            .filter(|x| {
                x["system"] == sys && x["traffic"] == "udp-60k-flows" && x["load"] == "overload"
            })
            .filter_map(|x| Some((x["services"].as_f64()?, x["delivered_pps"].as_f64()? / 1e6)))
            .collect();
        v.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        v
    };
    let max_y = rows
        .iter()
        .filter_map(|x| x["delivered_pps"].as_f64())
        .fold(0.1f64, f64::max)
        / 1e6
        * 1.1;
    let max_x = rows
        .iter()
        .filter_map(|x| x["services"].as_f64())
        .fold(1.0f64, f64::max)
        .max(10.0);
    let sx = |x: f64| l + (x.max(1.0).log10() / max_x.log10()) * (w - l - r);
    let sy = |y: f64| h - b - y / max_y * (h - t - b);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"18\" text-anchor=\"middle\">Delivered Mpps vs services (UDP, 60k flows, overload)</text>",
        w / 2.0
    );
    let _ = writeln!(
        s,
        "<line x1=\"{l}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{}\" stroke=\"black\"/>",
        h - b,
        w - r,
        h - b,
        h - b
    );
    let mut x = 1.0;
    while x <= max_x {
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x}</text>",
            sx(x),
            h - b + 16.0
        );
        x *= 10.0;
    }
    for i in 0..=4 {
        let y = max_y * i as f64 / 4.0;
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{y:.1}</text>",
            l - 6.0,
            sy(y) + 4.0
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">services (log)</text>",
        (l + w - r) / 2.0,
        h - 12.0
    );
    for (i, (sys, color)) in [
        ("xlb", "#d62728"),
        ("iptables", "#1f77b4"),
        ("nftables", "#2ca02c"),
        ("ceiling", "#7f7f7f"),
    ]
    .iter()
    .enumerate()
    {
        let mut p = pts(sys);
        if *sys == "ceiling"
            && let Some(c) = p.first().copied()
        {
            p = vec![(1.0, c.1), (max_x, c.1)];
        }
        if p.is_empty() {
            continue;
        }
        let path: Vec<String> = p
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        let dash = if *sys == "ceiling" {
            " stroke-dasharray=\"6,4\""
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{dash} points=\"{}\"/>",
            path.join(" ")
        );
        for (x, y) in &p {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>",
                sx(*x),
                sy(*y)
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{sys}</text>",
            w - r + 10.0,
            t + 20.0 + i as f64 * 18.0
        );
    }
    s.push_str("</svg>\n");
    s
}
