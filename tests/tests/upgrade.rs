//! Privileged tests of restarts and upgrades (issue 15, audit A-7): what a
//! new agent does with the maps and links a previous one pinned. Real
//! agents, real connections through the real programs; maps of other
//! layouts are pinned by hand the way an older build would have left them.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::maps::MapData;
use xlb_tests::{
    Agent, Conn, Reply, Topology, in_netns, ns_cmd,
    objects::{endpoint_slice, service, to_yaml, to_yaml_documents},
    parse_reply, tcp_request, udp_request, wait_until, xlb_bin,
};

const WEB: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
/// `BPF_MAP_TYPE_LRU_HASH` and `BPF_MAP_TYPE_PERCPU_ARRAY`.
const LRU_HASH: u32 = 9;
const PERCPU_ARRAY: u32 = 6;

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the upgrade tests need root (network namespaces, XDP): run `cargo xtask test` as root"
    );
}

/// The topology with servers on 8080 and the `web` service (TCP 80, UDP
/// 53 → 8080 on pods a, b (local) and c (remote)); no agent yet.
fn web() -> Result<Topology> {
    require_root();
    let t = Topology::new()?;
    t.start_servers(&[8080])?;
    t.write_manifest("nodes.yaml", &t.nodes_manifest())?;
    t.write_manifest(
        "web.yaml",
        &to_yaml(&service(
            "web",
            WEB,
            &[("http", "TCP", 80, "8080"), ("dns", "UDP", 53, "8080")],
        )),
    )?;
    let eps: Vec<(Ipv4Addr, &str, bool)> = ["pod-a", "pod-b", "pod-c"]
        .iter()
        .map(|p| {
            let pod = t.pod(p);
            (pod.addr, t.node_of(pod), true)
        })
        .collect();
    t.write_manifest(
        "web-endpoints.yaml",
        &to_yaml(&endpoint_slice(
            "web",
            &eps,
            &[("http", "TCP", 8080), ("dns", "UDP", 8080)],
        )),
    )?;
    Ok(t)
}

fn start(t: &Topology, extra: &[&str]) -> Result<Agent> {
    let agent = t.start_agent_with(extra)?;
    wait_until("6 backends programmed", Duration::from_secs(5), || {
        t.inspect("backends").map(|b| b.len() == 6).unwrap_or(false)
    })?;
    Ok(agent)
}

fn pins(t: &Topology) -> PathBuf {
    PathBuf::from("/sys/fs/bpf/xlb").join(&t.node_name)
}

fn map_pin(t: &Topology, name: &str) -> PathBuf {
    pins(t).join("maps").join(name)
}

/// (key size, value size, max entries) of a pinned map, from the kernel.
fn shape(path: &std::path::Path) -> Result<(u32, u32, u32)> {
    let info = MapData::from_pin(path)
        .and_then(|m| m.info())
        .with_context(|| format!("reading {}", path.display()))?;
    Ok((info.key_size(), info.value_size(), info.max_entries()))
}

/// Pins a map of the given shape at `path`, replacing what is pinned there:
/// what an agent of another build would have left.
fn pin_by_hand(
    path: &std::path::Path,
    name: &str,
    map_type: u32,
    key: u32,
    value: u32,
    entries: u32,
) -> Result<()> {
    let _ = std::fs::remove_file(path);
    std::fs::create_dir_all(path.parent().unwrap())?;
    let definition = aya_obj::Map::new_from_params(map_type, key, value, entries, 0);
    let map = MapData::create(definition, name, None).context("creating the map")?;
    map.pin(path)
        .with_context(|| format!("pinning {}", path.display()))?;
    Ok(())
}

/// TCP connections to the frontend until both a node-local backend and the
/// remote (SNAT'd) one hold some, with the backend that answered first.
fn local_and_remote_connections(t: &Topology) -> Result<Vec<(Conn, Reply)>> {
    let mut conns = Vec::new();
    for _ in 0..40 {
        let mut c = Conn::open(&t.client, SocketAddrV4::new(WEB, 80), None)?;
        let r = c.ask("before")?;
        conns.push((c, r));
        let backends: BTreeSet<&str> = conns.iter().map(|(_, r)| r.backend.as_str()).collect();
        if conns.len() >= 6 && backends.contains("pod-c") && backends.len() >= 2 {
            return Ok(conns);
        }
    }
    bail!("40 connections did not reach both a local backend and pod-c");
}

/// Every connection still answered by the backend (and seen from the peer
/// address) it had before.
fn assert_unmoved(conns: &mut [(Conn, Reply)], when: &str) -> Result<()> {
    for (i, (c, before)) in conns.iter_mut().enumerate() {
        let now = c
            .ask(when)
            .with_context(|| format!("connection {i} to {} {when}", before.backend))?;
        assert_eq!(
            (&now.backend, now.peer),
            (&before.backend, before.peer),
            "connection {i} moved {when}"
        );
    }
    Ok(())
}

/// Runs `xlb agent` expecting it to fail to start; returns its output.
fn failing_agent(t: &Topology, ifaces: &str, extra: &[&str]) -> Result<String> {
    let manifests = t.manifests().to_string_lossy().into_owned();
    let state = t.dir.join("state").to_string_lossy().into_owned();
    let bin = xlb_bin().to_string_lossy().into_owned();
    let mut args = vec![
        bin.as_str(),
        "agent",
        "--iface",
        ifaces,
        "--node-name",
        &t.node_name,
        "--state-dir",
        &state,
        "--manifests",
        &manifests,
    ];
    args.extend_from_slice(extra);
    let mut child = ns_cmd(&t.node, &args)
        .env("XLB_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let started = Instant::now();
    while child.try_wait()?.is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            bail!("the agent did not exit within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "the agent started:\n{text}");
    Ok(text)
}

/// Files pinned under the node's pin directory, relative to it.
fn pinned_files(t: &Topology) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for dir in ["maps", "links"] {
        if let Ok(entries) = std::fs::read_dir(pins(t).join(dir)) {
            for e in entries.flatten() {
                out.insert(format!("{dir}/{}", e.file_name().to_string_lossy()));
            }
        }
    }
    out
}

/// Audit A-7, step 1-2: a flow table of another layout pinned where the
/// agent looks (value 48 bytes, as before `Flow` grew) is never read; the
/// agent says so, replaces it, and forwards.
#[test]
fn incompatible_pinned_flow_table_is_replaced_and_reported() -> Result<()> {
    let t = web()?;
    let flows = map_pin(&t, "XLB_FLOWS");
    pin_by_hand(&flows, "XLB_FLOWS", LRU_HASH, 40, 48, 1024)?;
    let agent = start(&t, &[])?;
    let log = agent.log_text();
    assert!(
        log.contains("incompatible pinned map XLB_FLOWS (value 48 want 56)"),
        "no clear message about XLB_FLOWS in:\n{log}"
    );
    assert_eq!(
        shape(&flows)?,
        (40, 56, 262_144),
        "the pin was not replaced"
    );
    for _ in 0..10 {
        tcp_request(&t.client, SocketAddrV4::new(WEB, 80))?;
        udp_request(&t.client, SocketAddrV4::new(WEB, 53))?;
    }
    assert!(
        !pinned_files(&t).iter().any(|f| f.ends_with(":pending")),
        "a map was left pinned aside: {:?}",
        pinned_files(&t)
    );
    Ok(())
}

/// Audit A-7, step 3: a new `--max-flows` and `--max-services` get maps of
/// those sizes, and the flows and services of the old ones are copied: the
/// established connections keep their backends.
#[test]
fn new_map_sizes_keep_established_flows() -> Result<()> {
    let t = web()?;
    let mut agent = start(&t, &["--max-flows", "4096", "--max-services", "16"])?;
    let mut conns = local_and_remote_connections(&t)?;
    agent.stop()?;
    let agent = start(&t, &["--max-flows", "8192", "--max-services", "32"])?;
    let log = agent.log_text();
    assert!(
        log.contains("pinned map XLB_FLOWS has 4096 entries, this agent wants 8192"),
        "no message about the resize in:\n{log}"
    );
    assert!(
        log.contains("pinned map XLB_SERVICES has 16 entries, this agent wants 32"),
        "no message about the services resize in:\n{log}"
    );
    let copied: usize = log
        .split("resized successor map=XLB_FLOWS copied=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no copy of XLB_FLOWS in:\n{log}"))?;
    // Both entries of every connection opened.
    assert!(
        copied >= 2 * conns.len(),
        "{copied} flow entries copied for {} connections",
        conns.len()
    );
    assert_eq!(shape(&map_pin(&t, "XLB_FLOWS"))?.2, 8192);
    assert_eq!(shape(&map_pin(&t, "XLB_SERVICES"))?.2, 32);
    assert_eq!(shape(&map_pin(&t, "XLB_STATS"))?.2, 32);
    assert_unmoved(&mut conns, "after the resize")?;
    // Room for the new size: 20 more frontends than the old map held.
    let more: Vec<_> = (0..20u8)
        .map(|i| {
            service(
                &format!("more-{i}"),
                Ipv4Addr::new(10, 200, 0, 100 + i),
                &[("http", "TCP", 80, "8080")],
            )
        })
        .collect();
    t.write_manifest("more.yaml", &to_yaml_documents(&more))?;
    wait_until("22 frontends programmed", Duration::from_secs(10), || {
        t.inspect("services")
            .map(|s| s.len() == 22)
            .unwrap_or(false)
    })?;
    // New connections still reach every backend.
    let mut backends = BTreeSet::new();
    for _ in 0..60 {
        backends.insert(tcp_request(&t.client, SocketAddrV4::new(WEB, 80))?.backend);
    }
    assert_eq!(backends.len(), 3);
    Ok(())
}

/// An upgrade across a layout change: the pins an agent before commit
/// 1d8deee left (node counters of 48 bytes, no layout stamps). The new
/// agent replaces only that map; every established connection, to local
/// and remote backends, keeps its backend, and the counters work.
#[test]
fn upgrade_across_a_layout_change_keeps_established_flows() -> Result<()> {
    let t = web()?;
    let mut agent = start(&t, &[])?;
    let mut conns = local_and_remote_connections(&t)?;
    agent.stop()?;
    // The older build's pins: its `GlobalStats` had 6 counters, and it
    // wrote no stamps. Its programs (here: the ones still attached) keep
    // forwarding meanwhile.
    pin_by_hand(
        &map_pin(&t, "XLB_GLOBAL"),
        "XLB_GLOBAL",
        PERCPU_ARRAY,
        4,
        48,
        1,
    )?;
    std::fs::remove_file(map_pin(&t, "XLB_LAYOUT"))?;
    assert_unmoved(&mut conns, "with the older pins, agent down")?;
    let agent = start(&t, &[])?;
    let log = agent.log_text();
    let message = format!(
        "incompatible pinned map XLB_GLOBAL (value 48 want {})",
        std::mem::size_of::<lb_common::GlobalStats>()
    );
    assert!(log.contains(&message), "no '{message}' in:\n{log}");
    assert!(
        !log.contains("incompatible pinned map XLB_FLOWS"),
        "the flow table was replaced:\n{log}"
    );
    assert_eq!(
        shape(&map_pin(&t, "XLB_GLOBAL"))?.1 as usize,
        std::mem::size_of::<lb_common::GlobalStats>()
    );
    assert_unmoved(&mut conns, "after the upgrade")?;
    let stats = t.xlb(&["inspect", "stats", "--json"])?;
    assert!(
        stats.contains("passed"),
        "no node counters after the upgrade: {stats}"
    );
    Ok(())
}

/// Issue 11: agents before the Maglev array was mapped into memory pinned
/// it without `BPF_F_MMAPABLE`. The new agent copies the rows in use into a
/// mapped array, rather than starting from an empty one (whose slots would
/// send new flows nowhere until the first apply), and established
/// connections keep their backends.
#[test]
fn maglev_array_pinned_without_mmapable_is_copied() -> Result<()> {
    const ARRAY: u32 = 2;
    let t = web()?;
    let mut agent = start(&t, &[])?;
    let mut conns = local_and_remote_connections(&t)?;
    agent.stop()?;
    // The older build's array: the same slots, without the flag.
    let path = map_pin(&t, "XLB_MAGLEV");
    let (_, _, entries) = shape(&path)?;
    let services: aya::maps::HashMap<MapData, lb_common::FrontendKey, lb_common::Service> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(MapData::from_pin(map_pin(
            &t,
            "XLB_SERVICES",
        ))?))?;
    let rows: BTreeSet<u32> = services.iter().flatten().map(|(_, s)| s.table_id).collect();
    assert_eq!(rows.len(), 2, "the TCP and the UDP frontend");
    let current: aya::maps::Array<MapData, u32> =
        aya::maps::Array::try_from(aya::maps::Map::Array(MapData::from_pin(&path)?))?;
    let mut slots = Vec::new();
    for row in &rows {
        for index in row * lb_common::MAGLEV_TABLE_SIZE..(row + 1) * lb_common::MAGLEV_TABLE_SIZE {
            slots.push((index, current.get(&index, 0)?));
        }
    }
    drop(current);
    pin_by_hand(&path, "XLB_MAGLEV", ARRAY, 4, 4, entries)?;
    let mut old: aya::maps::Array<MapData, u32> =
        aya::maps::Array::try_from(aya::maps::Map::Array(MapData::from_pin(&path)?))?;
    for (index, backend) in &slots {
        old.set(*index, backend, 0)?;
    }
    drop(old);
    assert_unmoved(&mut conns, "with the older pin, agent down")?;

    let agent = start(&t, &[])?;
    let log = agent.log_text();
    assert!(
        log.contains("pinned map XLB_MAGLEV has flags 0x0, this agent wants 0x400"),
        "no message about the flag in:\n{log}"
    );
    assert!(
        !log.contains("incompatible pinned map XLB_MAGLEV"),
        "the Maglev array was replaced, not copied:\n{log}"
    );
    let copied: usize = log
        .split("resized successor map=XLB_MAGLEV copied=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no copy of XLB_MAGLEV in:\n{log}"))?;
    assert_eq!(copied, slots.len());
    let flags = MapData::from_pin(&path)?.info()?.map_flags();
    assert_eq!(
        flags & lb_common::MAGLEV_MAP_FLAGS,
        lb_common::MAGLEV_MAP_FLAGS
    );
    // The rows as they were (the agent's first apply writes the same).
    let new: aya::maps::Array<MapData, u32> =
        aya::maps::Array::try_from(aya::maps::Map::Array(MapData::from_pin(&path)?))?;
    for (index, backend) in &slots {
        assert_eq!(new.get(index, 0)?, *backend, "slot {index}");
    }
    assert_unmoved(&mut conns, "after the upgrade")?;
    let mut backends = BTreeSet::new();
    for _ in 0..60 {
        backends.insert(tcp_request(&t.client, SocketAddrV4::new(WEB, 80))?.backend);
    }
    assert_eq!(backends.len(), 3);
    Ok(())
}

/// A layout change the sizes cannot show (a stamp that differs, as a swap
/// of two same-size fields would make) replaces the map all the same:
/// never misread.
#[test]
fn layout_stamp_change_replaces_a_map_of_equal_sizes() -> Result<()> {
    let t = web()?;
    let mut agent = start(&t, &[])?;
    agent.stop()?;
    // Another build's stamp for the affinity map.
    let stamps = map_pin(&t, "XLB_LAYOUT");
    let data = MapData::from_pin(&stamps)?;
    let mut map: aya::maps::HashMap<MapData, [u8; 16], u64> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))?;
    let mut key = [0u8; 16];
    key[..12].copy_from_slice(b"XLB_AFFINITY");
    let stamp = map.get(&key, 0)?;
    map.insert(key, stamp ^ 1, 0)?;
    let agent = start(&t, &[])?;
    let log = agent.log_text();
    assert!(
        log.contains("incompatible pinned map XLB_AFFINITY (layout stamp"),
        "no message about the stamp in:\n{log}"
    );
    tcp_request(&t.client, SocketAddrV4::new(WEB, 80))?;
    Ok(())
}

/// Ten restarts (SIGTERM, same flags, new agent) under continuous TCP and
/// UDP traffic: no established flow is lost or moved, to local or remote
/// (SNAT'd) backends, and no answer is late by more than the client's 1-2 s
/// read timeout.
#[test]
fn ten_restarts_under_traffic_lose_no_flow() -> Result<()> {
    let t = web()?;
    let mut agent = start(&t, &[])?;
    let conns = local_and_remote_connections(&t)?;
    // A UDP conversation: one source port, one backend.
    let udp = in_netns(&t.client, || UdpSocket::bind("0.0.0.0:0"))??;
    udp.set_read_timeout(Some(Duration::from_secs(1)))?;
    let to = SocketAddrV4::new(WEB, 53);
    udp.send_to(b"hello", to)?;
    let mut buf = [0u8; 2048];
    let (n, _) = udp.recv_from(&mut buf).context("first UDP answer")?;
    let udp_first = parse_reply(&String::from_utf8_lossy(&buf[..n]))?;

    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<usize> {
            let mut conns = conns;
            let mut rounds = 0;
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                assert_unmoved(&mut conns, &format!("in round {rounds}"))?;
                udp.send_to(b"again", to)?;
                let (n, _) = udp
                    .recv_from(&mut buf)
                    .with_context(|| format!("UDP answer in round {rounds}"))?;
                let r = parse_reply(&String::from_utf8_lossy(&buf[..n]))?;
                if (&r.backend, r.peer) != (&udp_first.backend, udp_first.peer) {
                    bail!(
                        "the UDP conversation moved in round {rounds}: {r:?} after {udp_first:?}"
                    );
                }
                rounds += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(rounds)
        })
    };
    let mut restarts = 0;
    let result = (|| -> Result<()> {
        for i in 0..10 {
            agent.stop()?;
            // Mostly quick restarts; twice the 3 s a rollout takes, when
            // the flows run on the pinned programs alone.
            let gap = if i % 5 == 0 { 3000 } else { 300 };
            std::thread::sleep(Duration::from_millis(gap));
            agent = start(&t, &[])?;
            restarts += 1;
            if traffic.is_finished() {
                break;
            }
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let rounds = traffic.join().expect("traffic thread panicked")?;
    result?;
    assert_eq!(restarts, 10);
    assert!(rounds > 20, "only {rounds} rounds of traffic ran");
    let log = agent.log_text();
    assert!(
        !log.contains("incompatible pinned map") && !log.contains("this agent wants"),
        "a restart with the same build replaced or resized a map:\n{log}"
    );
    Ok(())
}

/// A start that fails partway (an interface that cannot take native XDP,
/// after the first one got it) on a fresh node leaves nothing behind.
#[test]
fn failed_start_on_a_fresh_node_leaves_nothing() -> Result<()> {
    let t = web()?;
    let out = failing_agent(&t, "uplink,lo", &["--xdp-mode", "native"])?;
    assert!(
        out.contains("lo"),
        "the error does not name the interface:\n{out}"
    );
    assert!(
        !pins(&t).exists(),
        "pins left behind: {:?}",
        pinned_files(&t)
    );
    assert_eq!(t.attached(&t.node, "uplink")?, "", "uplink still attached");
    Ok(())
}

/// A start that fails partway over a previous agent's pins (with a map
/// resize pending) leaves them as they were, still forwarding, and the
/// next good start adopts them.
#[test]
fn failed_start_leaves_the_previous_datapath_forwarding() -> Result<()> {
    let t = web()?;
    let mut agent = start(&t, &[])?;
    let mut conns = local_and_remote_connections(&t)?;
    agent.stop()?;
    let before = pinned_files(&t);
    let attached_before = t.attached(&t.node, "uplink")?;
    let flows_before = shape(&map_pin(&t, "XLB_FLOWS"))?;
    // lo refuses native XDP. On wires the uplinks' pinned XDP links wait
    // for their update; on container nodes (tcx before) native XDP is
    // attached to them first and must be removed again.
    let out = failing_agent(
        &t,
        "uplink,n2,lo",
        &["--max-flows", "8192", "--xdp-mode", "native"],
    )?;
    assert!(
        out.contains("keep forwarding"),
        "the failure does not say the previous datapath stays:\n{out}"
    );
    assert_eq!(pinned_files(&t), before, "the pins changed");
    assert_eq!(shape(&map_pin(&t, "XLB_FLOWS"))?, flows_before);
    assert_eq!(t.attached(&t.node, "uplink")?, attached_before);
    assert_unmoved(&mut conns, "after the failed start")?;
    let agent = start(&t, &[])?;
    assert_unmoved(&mut conns, "after the next good start")?;
    drop(agent);
    Ok(())
}
