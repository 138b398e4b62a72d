//! Privileged end-to-end tests: real packets from a client namespace through
//! the real XDP/tcx programs, driven by the real `xlb agent`, to real servers
//! in pod namespaces. Run by `cargo xtask test` (as root).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{ClientIPConfig, ServiceSpec, SessionAffinityConfig};
use xlb_tests::{
    Agent, CLIENT_ADDR, CLIENT_ADDR_2, Conn, Links, NODE_ADDR, Topology, ns_cmd, ns_sh,
    objects::{self, endpoint_slice, endpoint_slice_in, service, spec_mut, to_yaml},
    scrape::{http_get, sample},
    sh, snmp_counter, tcp_request,
    traffic::{PythonServer, answer_once, read_from},
    udp_request, wait_until, xlb_bin,
};

const WEB: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const DNS: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 11);
const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 12);

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the end-to-end tests need root (network namespaces, XDP): run `cargo xtask test` as root"
    );
}

/// Writes the node objects and the `web` service (TCP 80 → 8080, UDP 53 →
/// 8080) over pods a, b (local) and c (remote).
fn web_service(t: &Topology, adjust: impl FnOnce(&mut ServiceSpec)) -> Result<()> {
    t.write_manifest("nodes.yaml", &t.nodes_manifest())?;
    let mut web = service(
        "web",
        WEB,
        &[("http", "TCP", 80, "8080"), ("dns", "UDP", 53, "8080")],
    );
    adjust(spec_mut(&mut web));
    t.write_manifest("web.yaml", &to_yaml(&web))?;
    write_web_endpoints(t, &["pod-a", "pod-b", "pod-c"])
}

/// The reference topology with servers on 8080, the `web` service
/// (its spec changed by `adjust`) and a ready agent that programmed it.
fn web_topology(adjust: impl FnOnce(&mut ServiceSpec)) -> Result<(Topology, Agent)> {
    require_root();
    let t = Topology::new()?;
    t.start_servers(&[8080])?;
    web_service(&t, adjust)?;
    let agent = t.start_agent()?;
    wait_backends(&t, 6)?;
    Ok((t, agent))
}

fn write_web_endpoints(t: &Topology, pods: &[&str]) -> Result<()> {
    let eps: Vec<(Ipv4Addr, &str, bool)> = pods
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
    )
}

/// Waits until the agent has programmed `n` backends in total.
fn wait_backends(t: &Topology, n: usize) -> Result<()> {
    wait_until(
        &format!("{n} backends programmed"),
        Duration::from_secs(5),
        || t.inspect("backends").map(|b| b.len() == n).unwrap_or(false),
    )
}

fn tally(replies: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in replies {
        *m.entry(r.clone()).or_insert(0) += 1;
    }
    m
}

fn assert_even(what: &str, counts: &BTreeMap<String, usize>, total: usize, backends: usize) {
    assert_eq!(
        counts.len(),
        backends,
        "{what}: not every backend answered: {counts:?}"
    );
    let even = total as f64 / backends as f64;
    for (b, n) in counts {
        let dev = (*n as f64 - even).abs() / even;
        assert!(
            dev <= 0.30,
            "{what}: backend {b} got {n} of {total} (more than 30% off even): {counts:?}"
        );
    }
}

/// The forward hook fits the link kind (native XDP on wires, tcx ingress on
/// container nodes), tcx egress is always there, the links outlive the agent
/// and `xlb reset` removes them all.
#[test]
fn smoke_attach_outlives_the_agent_and_reset_detaches() -> Result<()> {
    require_root();
    let t = Topology::new()?;
    t.write_manifest("nodes.yaml", &t.nodes_manifest())?;
    let mut agent = t.start_agent()?;
    let link = ns_sh(&t.node, &["ip", "-d", "link", "show", "dev", "uplink"])?;
    let hooks = t.attached(&t.node, "uplink")?;
    match t.links {
        Links::Wires => {
            assert!(
                link.contains("xdp ") || link.contains("xdpdrv"),
                "XDP not attached in native mode:\n{link}\n{}",
                agent.log_text()
            );
            assert!(!hooks.contains("xlb_tc_ingress"), "{hooks}");
        }
        Links::ContainerNodes => {
            assert!(
                hooks.contains("xlb_tc_ingress") && !link.contains("prog/xdp"),
                "a veth uplink must get tcx ingress, not XDP:\n{hooks}\n{link}\n{}",
                agent.log_text()
            );
        }
    }
    assert!(hooks.contains("xlb_tc_egress"), "{hooks}");
    agent.stop()?;
    // Still attached after the agent stopped: the links are pinned.
    let after_stop = t.attached(&t.node, "uplink")?;
    assert_eq!(after_stop, hooks, "links changed when the agent stopped");
    t.xlb(&["reset"])?;
    let after_reset = t.attached(&t.node, "uplink")?;
    assert!(
        !after_reset.contains("xlb_"),
        "still attached after reset:\n{after_reset}"
    );
    Ok(())
}

#[test]
fn tcp_and_udp_reach_every_backend_evenly() -> Result<()> {
    let (t, _agent) = web_topology(|_| ())?;

    let mut tcp = Vec::new();
    for _ in 0..300 {
        tcp.push(tcp_request(&t.client, SocketAddrV4::new(WEB, 80))?.backend);
    }
    assert_even("TCP", &tally(&tcp), 300, 3);

    let mut udp = Vec::new();
    for _ in 0..300 {
        udp.push(udp_request(&t.client, SocketAddrV4::new(WEB, 53))?.backend);
    }
    assert_even("UDP", &tally(&udp), 300, 3);
    // A reused client port may meet its closing flow again, so fewer new
    // flows than connections can be counted; packets are exact lower bounds.
    assert!(t.stat("new_flows")? > 0);
    assert!(t.stat("packets")? >= 300 * 3 + 300);
    let node = t.inspect("stats")?.pop().context("node row")?;
    match t.links {
        // Replies of the remote backend came back through the uplink and
        // were redirected by XDP, not handed to the kernel.
        Links::Wires => assert!(node["redirected"].as_u64().unwrap_or(0) > 0, "{node}"),
        // tcx ingress translates and lets the kernel forward, keeping the
        // skb's checksum state: it never redirects.
        Links::ContainerNodes => {
            assert_eq!(node["redirected"].as_u64(), Some(0), "{node}");
            assert!(
                node["translated_passed"].as_u64().unwrap_or(0) > 0,
                "{node}"
            );
        }
    }
    Ok(())
}

#[test]
fn remote_backend_sees_node_address_local_backends_see_client() -> Result<()> {
    let (t, _agent) = web_topology(|_| ())?;
    let mut seen = BTreeMap::new();
    for _ in 0..60 {
        let r = tcp_request(&t.client, SocketAddrV4::new(WEB, 80))?;
        seen.insert(r.backend.clone(), r.peer);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    for (backend, peer) in &seen {
        match backend.as_str() {
            "pod-c" => {
                assert_eq!(
                    peer.ip(),
                    NODE_ADDR,
                    "remote backend must see the node address"
                );
                assert!((1024..=29999).contains(&peer.port()), "SNAT port {peer}");
                // Audit A-11: never a port the kernel may hand a node socket.
                let range = ns_sh(&t.node, &["cat", "/proc/sys/net/ipv4/ip_local_port_range"])?;
                let mut ends = range.split_whitespace().map(|n| n.parse::<u16>());
                let (Some(Ok(min)), Some(Ok(max))) = (ends.next(), ends.next()) else {
                    bail!("ip_local_port_range: {range:?}");
                };
                assert!(
                    !(min..=max).contains(&peer.port()),
                    "SNAT port {peer} in the node's ephemeral range {min}-{max}"
                );
            }
            _ => assert_eq!(
                peer.ip(),
                CLIENT_ADDR,
                "local backend {backend} must see the client"
            ),
        }
    }
    Ok(())
}

#[test]
fn local_policy_keeps_client_address_and_drops_without_local_backend() -> Result<()> {
    require_root();
    let t = Topology::new()?;
    t.start_servers(&[8080])?;
    t.write_manifest("nodes.yaml", &t.nodes_manifest())?;
    let local = |name: &str, ip: Ipv4Addr| {
        let mut local = service(name, ip, &[("http", "TCP", 80, "8080")]);
        spec_mut(&mut local).external_traffic_policy = Some("Local".into());
        to_yaml(&local)
    };
    t.write_manifest("local.yaml", &local("local", LOCAL))?;
    let all: Vec<(Ipv4Addr, &str, bool)> = t
        .pods
        .iter()
        .map(|p| (p.addr, t.node_of(p), true))
        .collect();
    t.write_manifest(
        "local-endpoints.yaml",
        &to_yaml(&endpoint_slice("local", &all, &[("http", "TCP", 8080)])),
    )?;
    // A Local service whose only endpoint is on the other node.
    t.write_manifest("remote-only.yaml", &local("remote-only", DNS))?;
    let pod_c = t.pod("pod-c");
    t.write_manifest(
        "remote-only-endpoints.yaml",
        &to_yaml(&endpoint_slice(
            "remote-only",
            &[(pod_c.addr, t.node_of(pod_c), true)],
            &[("http", "TCP", 8080)],
        )),
    )?;
    let _agent = t.start_agent()?;
    wait_backends(&t, 2)?;

    let mut backends = BTreeMap::new();
    for _ in 0..60 {
        let r = tcp_request(&t.client, SocketAddrV4::new(LOCAL, 80))?;
        assert_eq!(
            r.peer.ip(),
            CLIENT_ADDR,
            "Local policy must keep the client address"
        );
        *backends.entry(r.backend).or_insert(0) += 1;
    }
    assert_eq!(
        backends.keys().cloned().collect::<Vec<_>>(),
        vec!["pod-a".to_string(), "pod-b".to_string()],
        "only node-local backends may answer"
    );
    assert!(
        tcp_request(&t.client, SocketAddrV4::new(DNS, 80)).is_err(),
        "a Local service without a local backend must not answer"
    );
    assert!(t.stat("drop_no_backend")? > 0, "the drop must be counted");
    Ok(())
}

#[test]
fn named_target_port_resolves_through_endpoint_slice() -> Result<()> {
    require_root();
    let t = Topology::new()?;
    t.start_servers(&[8080, 8081])?;
    t.write_manifest("nodes.yaml", &t.nodes_manifest())?;
    t.write_manifest(
        "named.yaml",
        &to_yaml(&service(
            "named",
            WEB,
            &[("http", "TCP", 80, "web"), ("alt", "TCP", 81, "8080")],
        )),
    )?;
    let eps: Vec<(Ipv4Addr, &str, bool)> = t
        .pods
        .iter()
        .map(|p| (p.addr, t.node_of(p), true))
        .collect();
    // The endpoints controller resolves the named port `web` to 8081 and
    // names the slice port after the Service port (`http`).
    t.write_manifest(
        "named-endpoints.yaml",
        &to_yaml(&endpoint_slice(
            "named",
            &eps,
            &[("http", "TCP", 8081), ("alt", "TCP", 8080)],
        )),
    )?;
    let _agent = t.start_agent()?;
    wait_backends(&t, 6)?;
    for _ in 0..10 {
        assert_eq!(
            tcp_request(&t.client, SocketAddrV4::new(WEB, 80))?.port,
            8081
        );
        assert_eq!(
            tcp_request(&t.client, SocketAddrV4::new(WEB, 81))?.port,
            8080
        );
    }
    Ok(())
}

#[test]
fn established_flow_survives_backend_removal() -> Result<()> {
    let (t, _agent) = web_topology(|_| ())?;

    // One established connection per backend.
    let mut conns: BTreeMap<String, Conn> = BTreeMap::new();
    for _ in 0..200 {
        let mut c = Conn::open(&t.client, SocketAddrV4::new(WEB, 80), None)?;
        let b = c.ask("first")?.backend;
        conns.entry(b).or_insert(c);
        if conns.len() == 3 {
            break;
        }
    }
    assert_eq!(conns.len(), 3);

    for removed in ["pod-c", "pod-a"] {
        let remaining: Vec<&str> = ["pod-a", "pod-b", "pod-c"]
            .into_iter()
            .filter(|p| *p != removed && !(removed == "pod-a" && *p == "pod-c"))
            .collect();
        write_web_endpoints(&t, &remaining)?;
        wait_backends(&t, remaining.len() * 2)?;
        // The established connection to the removed backend still works.
        let c = conns.get_mut(removed).unwrap();
        for i in 0..5 {
            let r = c.ask(&format!("still there {i}"))?;
            assert_eq!(
                r.backend, removed,
                "established flow moved to another backend"
            );
        }
        // New connections avoid it.
        for _ in 0..50 {
            let r = tcp_request(&t.client, SocketAddrV4::new(WEB, 80))?;
            assert_ne!(
                r.backend, removed,
                "a new connection reached a removed backend"
            );
        }
    }
    Ok(())
}

#[test]
fn established_flow_survives_agent_restart() -> Result<()> {
    let (t, mut agent) = web_topology(|_| ())?;
    let mut conns = Vec::new();
    for _ in 0..12 {
        let mut c = Conn::open(&t.client, SocketAddrV4::new(WEB, 80), None)?;
        let b = c.ask("before")?.backend;
        conns.push((c, b));
    }
    agent.stop()?;
    // Agent down: traffic keeps flowing through the pinned program.
    for (c, b) in conns.iter_mut() {
        assert_eq!(&c.ask("agent down")?.backend, b);
    }
    assert!(tcp_request(&t.client, SocketAddrV4::new(WEB, 80)).is_ok());
    let agent2 = t.start_agent()?;
    let adopted = format!("adopted pinned {} link", t.forward_hook());
    assert!(
        agent2.log_text().contains(&adopted),
        "no '{adopted}' in:\n{}",
        agent2.log_text()
    );
    wait_backends(&t, 6)?;
    for (c, b) in conns.iter_mut() {
        assert_eq!(
            &c.ask("after restart")?.backend,
            b,
            "flow moved after restart"
        );
    }
    let mut backends = std::collections::BTreeSet::new();
    for _ in 0..60 {
        backends.insert(tcp_request(&t.client, SocketAddrV4::new(WEB, 80))?.backend);
    }
    assert_eq!(backends.len(), 3);
    Ok(())
}

/// Audit A-17 item 6: pinned maps that no agent keeps up to date (xlb
/// deleted, an agent crash-looping) must not keep sending new clients to pod
/// addresses Kubernetes may have given to other pods. Once the agent's
/// heartbeat is older than --stale-after, new flows are left to the kernel;
/// established ones keep going, and a new agent takes new flows again.
#[test]
fn a_datapath_nobody_keeps_up_to_date_takes_no_new_clients() -> Result<()> {
    require_root();
    let t = Topology::new()?;
    t.start_servers(&[8080])?;
    web_service(&t, |_| ())?;
    let mut agent = t.start_agent_with(&["--stale-after", "3"])?;
    wait_backends(&t, 6)?;
    let to = SocketAddrV4::new(WEB, 80);
    let mut conn = Conn::open(&t.client, to, None)?;
    let backend = conn.ask("before")?.backend;
    // Alive, its beats keep the datapath fresh past the bound.
    std::thread::sleep(Duration::from_secs(5));
    tcp_request(&t.client, to).context("a live agent's datapath takes new clients")?;
    agent.stop()?;
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        tcp_request(&t.client, to).is_err(),
        "a datapath without an agent took a new client"
    );
    assert!(t.stat("stale_passed")? > 0, "left to the kernel, counted");
    assert_eq!(
        conn.ask("after")?.backend,
        backend,
        "the established connection keeps going"
    );
    let _agent = t.start_agent_with(&["--stale-after", "3"])?;
    wait_until("new clients again", Duration::from_secs(5), || {
        tcp_request(&t.client, to).is_ok()
    })?;
    Ok(())
}

#[test]
fn source_range_blocks_client_outside_it() -> Result<()> {
    let (t, _agent) = web_topology(|spec| {
        spec.load_balancer_source_ranges = Some(vec![format!("{CLIENT_ADDR}/32")]);
    })?;
    let to = SocketAddrV4::new(WEB, 80);
    for _ in 0..5 {
        let mut c = Conn::open(&t.client, to, Some(CLIENT_ADDR))?;
        c.ask("allowed")?;
    }
    let blocked = Conn::open(&t.client, to, Some(CLIENT_ADDR_2));
    assert!(
        blocked.is_err(),
        "a client outside loadBalancerSourceRanges got through"
    );
    assert!(t.stat("drop_source_range")? > 0, "the drop must be counted");
    Ok(())
}

#[test]
fn malformed_manifests_are_reported_and_others_keep_working() -> Result<()> {
    require_root();
    let t = Topology::new()?;
    t.start_servers(&[8080])?;
    web_service(&t, |_| ())?;
    t.write_manifest(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: [not, a, map\n",
    )?;
    t.write_manifest(
        "bad-port.yaml",
        &to_yaml(&service("bad-port", DNS, &[("http", "TCP", 70000, "8080")])),
    )?;
    t.write_manifest(
        "bad-proto.yaml",
        &to_yaml(&service(
            "bad-proto",
            LOCAL,
            &[("http", "SCTP", 80, "8080")],
        )),
    )?;
    let agent = t.start_agent()?;
    wait_backends(&t, 6)?;
    let log = agent.log_text();
    for needle in ["broken.yaml", "bad-port", "70000", "bad-proto", "SCTP"] {
        assert!(
            log.contains(needle),
            "agent log does not mention {needle}:\n{log}"
        );
    }
    assert_eq!(
        tcp_request(&t.client, SocketAddrV4::new(WEB, 80))?.port,
        8080
    );

    // A new broken file while running changes nothing for the others.
    t.write_manifest("broken2.yml", "{{{{")?;
    std::thread::sleep(Duration::from_millis(500));
    wait_until("broken2.yml reported", Duration::from_secs(3), || {
        agent.log_text().contains("broken2.yml")
    })?;
    assert_eq!(
        t.inspect("services")?.len(),
        2,
        "web's two frontends must stay"
    );
    assert!(tcp_request(&t.client, SocketAddrV4::new(WEB, 80)).is_ok());
    Ok(())
}

#[test]
fn checksums_are_accepted_by_the_receiving_kernels() -> Result<()> {
    let (t, _agent) = web_topology(|_| ())?;
    for _ in 0..60 {
        let mut c = Conn::open(&t.client, SocketAddrV4::new(WEB, 80), None)?;
        c.ask("a")?;
        c.ask(&"x".repeat(1200))?;
        udp_request(&t.client, SocketAddrV4::new(WEB, 53))?;
    }
    // Every namespace that received translated packets verified their
    // checksums (tx offload is off everywhere): no errors may be counted.
    let mut namespaces = vec![t.client.clone()];
    namespaces.extend(t.pods.iter().map(|p| p.ns.clone()));
    for ns in namespaces {
        for (proto, field) in [("Tcp", "InCsumErrors"), ("Udp", "InCsumErrors")] {
            assert_eq!(
                snmp_counter(&ns, proto, field)?,
                0,
                "{proto} {field} in {ns}"
            );
        }
    }
    Ok(())
}

#[test]
fn non_service_traffic_passes_untouched() -> Result<()> {
    let (t, _agent) = web_topology(|_| ())?;
    // ICMP to the node and through it to a pod.
    ns_sh(
        &t.client,
        &["ping", "-c", "2", "-W", "1", &NODE_ADDR.to_string()],
    )?;
    ns_sh(
        &t.client,
        &[
            "ping",
            "-c",
            "2",
            "-W",
            "1",
            &t.pod("pod-a").addr.to_string(),
        ],
    )?;
    // Direct TCP to a pod address (not a frontend) reaches that pod,
    // untranslated: the pod sees the client. On a port that is no
    // Service's: the answers from a backend's port to outside the
    // cluster's networks are dropped as replies of lost flows unless
    // `--allow-pod-source-egress` (pod networks routed without NAT).
    t.start_servers(&[9090])?;
    let r = tcp_request(&t.client, SocketAddrV4::new(t.pod("pod-b").addr, 9090))?;
    assert_eq!(
        (r.backend.as_str(), r.peer.ip()),
        ("pod-b", CLIENT_ADDR.into())
    );
    // Another port on a frontend address is not a service: nothing answers
    // it (no translation), and the node's own listener on its address works.
    assert!(tcp_request(&t.client, SocketAddrV4::new(WEB, 8080)).is_err());
    let passed_before = t
        .inspect("stats")?
        .last()
        .and_then(|r| r["passed"].as_u64())
        .unwrap_or(0);
    let listener = xlb_tests::in_netns(&t.node, || std::net::TcpListener::bind("10.0.1.1:9999"))??;
    let accept = std::thread::spawn(move || listener.accept().map(|(_, peer)| peer));
    let _conn = xlb_tests::in_netns(&t.client, || {
        std::net::TcpStream::connect_timeout(
            &"10.0.1.1:9999".parse().unwrap(),
            Duration::from_secs(1),
        )
    })??;
    let peer = accept.join().unwrap()?;
    assert_eq!(peer.ip(), CLIENT_ADDR);
    let passed_after = t
        .inspect("stats")?
        .last()
        .and_then(|r| r["passed"].as_u64())
        .unwrap_or(0);
    assert!(
        passed_after > passed_before,
        "passed packets must be counted"
    );
    Ok(())
}

#[test]
fn service_removal_stops_the_frontend() -> Result<()> {
    let (t, _agent) = web_topology(|_| ())?;
    tcp_request(&t.client, SocketAddrV4::new(WEB, 80))?;
    t.remove_manifest("web.yaml")?;
    wait_backends(&t, 0)?;
    if tcp_request(&t.client, SocketAddrV4::new(WEB, 80)).is_ok() {
        bail!("a removed service still answered");
    }
    let services = t.inspect("services")?;
    assert!(services.is_empty(), "{services:?}");
    let _ = sh(&["true"]).context("sanity")?;
    Ok(())
}

#[test]
fn client_ip_affinity_pins_a_client_to_one_backend() -> Result<()> {
    let (t, _agent) = web_topology(|spec| {
        spec.session_affinity = Some("ClientIP".into());
        spec.session_affinity_config = Some(SessionAffinityConfig {
            client_ip: Some(ClientIPConfig {
                timeout_seconds: Some(60),
            }),
        });
    })?;
    for from in [CLIENT_ADDR, CLIENT_ADDR_2] {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..30 {
            let mut c = Conn::open(&t.client, SocketAddrV4::new(WEB, 80), Some(from))?;
            seen.insert(c.ask("hi")?.backend);
        }
        assert_eq!(seen.len(), 1, "client {from} was spread over {seen:?}");
    }
    let services = t.inspect("services")?;
    assert!(
        services
            .iter()
            .all(|s| s["flags"].as_str().unwrap_or("").contains("affinity"))
    );
    Ok(())
}

#[test]
fn snat_never_takes_a_port_the_node_uses() -> Result<()> {
    require_root();
    let t = Topology::new()?;
    t.start_servers(&[8080])?;
    t.write_manifest("nodes.yaml", &t.nodes_manifest())?;
    t.write_manifest(
        "remote.yaml",
        &to_yaml(&service("remote", DNS, &[("dns", "UDP", 53, "8080")])),
    )?;
    let pod_c = t.pod("pod-c");
    t.write_manifest(
        "remote-endpoints.yaml",
        &to_yaml(&endpoint_slice(
            "remote",
            &[(pod_c.addr, t.node_of(pod_c), true)],
            &[("dns", "UDP", 8080)],
        )),
    )?;
    // The node's own socket holds 40000 of the two SNAT ports.
    let _own = xlb_tests::in_netns(&t.node, || std::net::UdpSocket::bind("10.0.1.1:40000"))??;
    let agent = t.start_agent_with(&["--snat-ports", "40000-40001"])?;
    wait_backends(&t, 1)?;
    // Inside the node's ephemeral range: the operator is told.
    assert!(
        agent
            .log_text()
            .contains("overlaps net.ipv4.ip_local_port_range"),
        "{}",
        agent.log_text()
    );
    let first = udp_request(&t.client, SocketAddrV4::new(DNS, 53))?;
    assert_eq!(first.backend, "pod-c");
    assert_eq!(
        (first.peer.ip(), first.peer.port()),
        (std::net::IpAddr::from(NODE_ADDR), 40001),
        "SNAT must skip the port the node's socket uses"
    );
    // A second flow finds no free port: dropped and counted, never given
    // the node's port.
    assert!(udp_request(&t.client, SocketAddrV4::new(DNS, 53)).is_err());
    assert!(t.stat("drop_snat_exhausted")? > 0);
    Ok(())
}

/// `--xdp-mode generic` used to rewrite GRO'd and offloaded packets as if
/// their checksums were complete (audit A-8); it now runs the forward path
/// in tcx ingress, on the same skbs, and bulk TCP arrives intact.
#[test]
fn generic_xdp_mode_means_tcx_ingress_and_carries_bulk_tcp_intact() -> Result<()> {
    require_root();
    let t = Topology::new()?;
    t.start_servers(&[8080])?;
    web_service(&t, |_| ())?;
    let agent = t.start_agent_with(&["--xdp-mode", "generic"])?;
    wait_backends(&t, 6)?;
    let link = ns_sh(&t.node, &["ip", "-d", "link", "show", "dev", "uplink"])?;
    assert!(
        !link.contains("xdpgeneric"),
        "generic XDP attached:\n{link}"
    );
    let hooks = t.attached(&t.node, "uplink")?;
    assert!(hooks.contains("xlb_tc_ingress"), "{hooks}");
    assert!(agent.log_text().contains("using tcx ingress"));
    let mut seen = BTreeMap::new();
    for _ in 0..60 {
        let r = tcp_request(&t.client, SocketAddrV4::new(WEB, 80))?;
        seen.insert(r.backend.clone(), r.peer.ip());
        udp_request(&t.client, SocketAddrV4::new(WEB, 53))?;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(seen["pod-c"], std::net::IpAddr::from(NODE_ADDR));
    assert_eq!(seen["pod-a"], std::net::IpAddr::from(CLIENT_ADDR));
    bulk_through_every_backend(&t)?;
    for ns in [&t.client, &t.pod("pod-a").ns, &t.pod("pod-c").ns] {
        assert_eq!(snmp_counter(ns, "Tcp", "InCsumErrors")?, 0, "{ns}");
    }
    drop(agent);
    Ok(())
}

/// 200 KB up and 200 KB back through a connection to each backend, local
/// and remote: every byte must come back, each in well under a second.
fn bulk_through_every_backend(t: &Topology) -> Result<()> {
    let mut done = BTreeMap::new();
    for _ in 0..60 {
        if done.len() == 3 {
            break;
        }
        let mut c = Conn::open(&t.client, SocketAddrV4::new(WEB, 80), None)?;
        let backend = c.ask("which")?.backend;
        if done.contains_key(&backend) {
            continue;
        }
        let took = c
            .bulk(200_000)
            .with_context(|| format!("200 KB through {backend}"))?;
        assert!(
            took < Duration::from_secs(1),
            "200 KB through {backend} took {took:?}"
        );
        done.insert(backend, took);
    }
    assert_eq!(done.len(), 3, "not every backend was reached: {done:?}");
    Ok(())
}

/// Bulk TCP through local and remote backends, on both link kinds: on
/// container nodes every packet between namespaces carries a partial
/// checksum, which an XDP rewrite corrupted for remote backends' replies.
#[test]
fn bulk_tcp_through_local_and_remote_backends_arrives_intact() -> Result<()> {
    let (t, _agent) = web_topology(|_| ())?;
    bulk_through_every_backend(&t)?;
    for ns in [&t.client, &t.pod("pod-a").ns, &t.pod("pod-c").ns] {
        assert_eq!(snmp_counter(ns, "Tcp", "InCsumErrors")?, 0, "{ns}");
    }
    Ok(())
}

/// Path MTU (issue 14, audit A-10): with the links to the other node and
/// to one local pod at MTU 1400 and the client's at 1500, 200 KB up and
/// back through every backend completes in well under a second. A
/// translated packet that does not fit its route is answered with
/// "fragmentation needed" from the frontend, which is what lowers the
/// client's MTU; the kernel would have sent its own to the translated
/// source (the node itself, for a remote backend).
#[test]
fn bulk_tcp_crosses_a_smaller_mtu_link() -> Result<()> {
    let (t, _agent) = web_topology(|_| ())?;
    let pod_a = &t.pod("pod-a").ns;
    for (ns, dev) in [
        (&t.node, "n2"),
        (&t.node2, "n1"),
        (&t.node, "h0"),
        (pod_a, "eth0"),
    ] {
        ns_sh(ns, &["ip", "link", "set", "dev", dev, "mtu", "1400"])?;
    }
    bulk_through_every_backend(&t)?;
    assert!(
        t.stat("frag_needed_sent")? > 0,
        "the client learnt its MTU from xlb"
    );
    Ok(())
}

/// Audit A-5 (TCP part): in node address mode a Service port is a port on
/// the node's own address. A reply to one of the node's own connections that
/// happens to use that port locally (a SYN-ACK, then ACKs) is not a new
/// client: it reaches the node's socket, and nothing is load-balanced.
#[test]
fn node_mode_leaves_replies_to_the_nodes_own_connections_alone() -> Result<()> {
    require_root();
    let t = Topology::new()?;
    t.start_servers(&[8080])?;
    t.write_manifest("nodes.yaml", &t.nodes_manifest())?;
    let web = objects::service_in("default", "web", None, &[("http", "TCP", 45000, "8080")]);
    t.write_manifest("web.yaml", &to_yaml(&web))?;
    write_web_endpoints(&t, &["pod-a", "pod-b", "pod-c"])?;
    let _agent = t.start_agent_with(&["--address-mode", "node"])?;
    // The Service answers on the node's address.
    wait_until(
        "the Service on the node address",
        Duration::from_secs(5),
        || tcp_request(&t.client, SocketAddrV4::new(NODE_ADDR, 45000)).is_ok(),
    )?;
    let new_flows = t.stat("new_flows")?;
    // A server on the client; the node connects to it from local port 45000.
    let server = answer_once(
        &t.client,
        SocketAddrV4::new(CLIENT_ADDR, 8000),
        "hello from the client",
    )?;
    let answer = read_from(
        &t.node,
        SocketAddrV4::new(CLIENT_ADDR, 8000),
        Some(SocketAddrV4::new(NODE_ADDR, 45000)),
    );
    drop(server);
    let answer = answer.context("the node's own connection from the Service port")?;
    assert!(answer.contains("hello from the client"), "{answer}");
    assert_eq!(
        t.stat("new_flows")?,
        new_flows,
        "the node's connection must not become a flow"
    );
    Ok(())
}

/// Audit A-5 (the rest): in node address mode a port of the node's own
/// address may belong to the node. A daemon listening there keeps its
/// clients, and the answer to the node's own UDP socket on that port comes
/// back to it; neither becomes a flow of the Service on the same port.
#[test]
fn node_mode_leaves_the_nodes_own_sockets_alone() -> Result<()> {
    require_root();
    let t = Topology::new()?;
    t.start_servers(&[8080])?;
    t.write_manifest("nodes.yaml", &t.nodes_manifest())?;
    let web = objects::service_in(
        "default",
        "web",
        None,
        &[("http", "TCP", 2222, "8080"), ("dns", "UDP", 45001, "8080")],
    );
    t.write_manifest("web.yaml", &to_yaml(&web))?;
    write_web_endpoints(&t, &["pod-a", "pod-b", "pod-c"])?;
    let _agent = t.start_agent_with(&["--address-mode", "node"])?;
    // Nothing of the node's holds 2222 yet: the Service answers there.
    wait_until(
        "the Service on the node address",
        Duration::from_secs(5),
        || tcp_request(&t.client, SocketAddrV4::new(NODE_ADDR, 2222)).is_ok(),
    )?;
    let new_flows = t.stat("new_flows")?;

    // A host daemon on the node's address and the Service's port.
    let daemon = answer_once(
        &t.node,
        SocketAddrV4::new(NODE_ADDR, 2222),
        "the node's daemon",
    )?;
    let answer = read_from(&t.client, SocketAddrV4::new(NODE_ADDR, 2222), None);
    drop(daemon);
    let answer = answer.context("the node's daemon on a Service port")?;
    assert!(answer.contains("the node's daemon"), "{answer}");

    // The node's own UDP socket on local port 45001 asks a server on the
    // client, whose answer comes back to that port.
    let server = PythonServer::start(
        &t.client,
        &format!(
            "import socket\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.bind(('{CLIENT_ADDR}', 5300)); s.settimeout(10)\n\
             print('ready', flush=True)\n\
             d, a = s.recvfrom(100); s.sendto(b'answer to ' + d, a)\n"
        ),
    )
    .context("starting the UDP server")?;
    let asked = ns_sh(
        &t.node,
        &[
            "python3",
            "-c",
            &format!(
                "import socket\n\
                 s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                 s.bind(('{NODE_ADDR}', 45001)); s.settimeout(3)\n\
                 s.sendto(b'the node', ('{CLIENT_ADDR}', 5300))\n\
                 print(s.recvfrom(100)[0].decode())\n"
            ),
        ],
    );
    drop(server);
    let asked = asked.context("the node's own UDP socket on a Service port")?;
    assert!(asked.contains("answer to the node"), "{asked}");

    assert_eq!(
        t.stat("new_flows")?,
        new_flows,
        "the node's own traffic must not become flows"
    );
    assert!(t.stat("host_socket")? >= 2, "left to the host, counted");
    Ok(())
}

/// Audit A-1: in status mode a Service that names a node's address in
/// `spec.loadBalancerIP` (a request anyone who may create a Service can
/// write) takes nothing: the node's own daemon on that port still answers.
#[test]
fn spec_load_balancer_ip_cannot_take_a_nodes_port() -> Result<()> {
    require_root();
    let t = Topology::new()?;
    t.start_servers(&[8080])?;
    t.write_manifest("nodes.yaml", &t.nodes_manifest())?;
    let mut squatter = objects::service_in(
        "default",
        "squatter",
        None,
        &[("kubelet", "TCP", 10250, "8080")],
    );
    spec_mut(&mut squatter).load_balancer_ip = Some(NODE_ADDR.to_string());
    t.write_manifest("squatter.yaml", &to_yaml(&squatter))?;
    t.write_manifest(
        "squatter-endpoints.yaml",
        &to_yaml(&endpoint_slice_in(
            "default",
            "squatter",
            "squatter",
            &[(t.pod("pod-a").addr, t.node_of(t.pod("pod-a")), true)],
            &[("kubelet", "TCP", 8080)],
        )),
    )?;
    // The node's daemon on its own address and port.
    let daemon = answer_once(
        &t.node,
        SocketAddrV4::new(NODE_ADDR, 10250),
        "the node daemon",
    )?;
    let agent = t.start_agent()?;
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        t.inspect("services")?.is_empty(),
        "no frontend may come from spec.loadBalancerIP: {:?}\n{}",
        t.inspect("services")?,
        agent.log_text()
    );
    let answer = read_from(&t.client, SocketAddrV4::new(NODE_ADDR, 10250), None);
    drop(daemon);
    let answer = answer.context("connecting to the node's port")?;
    assert!(answer.contains("the node daemon"), "{answer}");
    Ok(())
}

/// A configuration error (a missing manifest directory, a kubeconfig that
/// is missing or no kubeconfig at all) stops the agent before it touches
/// the kernel: it exits non-zero naming the problem, and the uplink has no
/// program attached and nothing is pinned for the node.
#[test]
fn configuration_errors_are_reported_before_anything_is_attached_or_pinned() -> Result<()> {
    require_root();
    let t = Topology::new()?;
    let garbage = t.dir.join("garbage-kubeconfig");
    std::fs::write(&garbage, "{ this is: [not a kubeconfig")?;
    let garbage = garbage.to_string_lossy().into_owned();
    let missing_dir = t
        .dir
        .join("no-such-manifests")
        .to_string_lossy()
        .into_owned();
    let missing_file = t
        .dir
        .join("no-such-kubeconfig")
        .to_string_lossy()
        .into_owned();
    let state_dir = t.dir.join("state").to_string_lossy().into_owned();
    let pins = std::path::Path::new("/sys/fs/bpf/xlb").join(&t.node_name);
    for (source, expected) in [
        (["--manifests", missing_dir.as_str()], missing_dir.as_str()),
        (
            ["--kubeconfig", missing_file.as_str()],
            missing_file.as_str(),
        ),
        (["--kubeconfig", garbage.as_str()], garbage.as_str()),
    ] {
        let bin = xlb_bin().to_string_lossy().into_owned();
        let mut args = vec![
            bin.as_str(),
            "agent",
            "--iface",
            "uplink",
            "--node-name",
            &t.node_name,
            "--state-dir",
            &state_dir,
        ];
        args.extend(source);
        let out = ns_cmd(&t.node, &args)
            .env("XLB_LOG", "info")
            .env_remove("KUBECONFIG")
            .output()?;
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "{source:?}: the agent started:\n{log}"
        );
        let error = log
            .lines()
            .find(|l| l.starts_with("xlb: error:"))
            .unwrap_or_else(|| panic!("{source:?}: no error line:\n{log}"));
        assert!(
            error.contains(expected),
            "{source:?}: the error does not name {expected}: {error}"
        );
        let hooks = t.attached(&t.node, "uplink")?;
        assert!(
            !hooks.contains("xlb_"),
            "{source:?}: a program was attached by an agent that failed to start:\n{hooks}\n{log}"
        );
        let link = ns_sh(&t.node, &["ip", "-d", "link", "show", "dev", "uplink"])?;
        assert!(
            !link.contains("prog/xdp"),
            "{source:?}: XDP attached:\n{link}"
        );
        assert!(
            !pins.exists(),
            "{source:?}: {} was pinned by an agent that failed to start:\n{log}",
            pins.display()
        );
    }
    Ok(())
}

/// The agent's endpoint, scraped from inside the node's namespace.
const METRICS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9479);

fn scrape(t: &Topology) -> Result<String> {
    let (status, body) = http_get(&t.node, METRICS, "/metrics")?;
    if status != 200 {
        bail!("/metrics answered {status}: {body}");
    }
    Ok(body)
}

/// `/metrics` counts, per service, what was sent through its frontends
/// (read from the per-CPU maps when scraped), `/readyz` and `/healthz`
/// answer 200 once the agent has programmed its first sync.
#[test]
fn metrics_count_what_was_sent_and_the_probes_answer() -> Result<()> {
    require_root();
    let t = Topology::new()?;
    t.start_servers(&[8080])?;
    web_service(&t, |_| {})?;
    let agent = t.start_agent_with(&["--metrics-addr", &METRICS.to_string()])?;
    wait_backends(&t, 6)?;
    for probe in ["/readyz", "/healthz"] {
        let (status, body) = http_get(&t.node, METRICS, probe)?;
        assert_eq!(status, 200, "{probe}: {body}\n{}", agent.log_text());
    }
    let (status, _) = http_get(&t.node, METRICS, "/nothing")?;
    assert_eq!(status, 404);

    let http = [
        ("namespace", "default"),
        ("service", "web"),
        ("frontend", "10.200.0.10:80/TCP"),
    ];
    let dns = [
        ("namespace", "default"),
        ("service", "web"),
        ("frontend", "10.200.0.10:53/UDP"),
    ];
    let before = scrape(&t)?;
    let value = |text: &str, name: &str, labels: &[(&str, &str)]| {
        sample(text, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{text}"))
    };
    const CONNECTIONS: usize = 20;
    const DATAGRAMS: usize = 15;
    for _ in 0..CONNECTIONS {
        tcp_request(&t.client, SocketAddrV4::new(WEB, 80))?;
    }
    let mut remote_answers = 0;
    for _ in 0..DATAGRAMS {
        if udp_request(&t.client, SocketAddrV4::new(WEB, 53))?.backend == "pod-c" {
            remote_answers += 1;
        }
    }
    let after = scrape(&t)?;
    let moved = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    let n = CONNECTIONS as f64;
    let m = DATAGRAMS as f64;
    assert_eq!(moved("xlb_service_new_flows_total", &http), n, "{after}");
    assert_eq!(moved("xlb_service_new_flows_total", &dns), m, "{after}");
    assert_eq!(
        moved("xlb_service_new_flows_total", &[("service", "web")]),
        n + m
    );
    // A connection is at least SYN, the request and FIN one way, SYN-ACK
    // and the answer the other.
    assert!(
        moved("xlb_service_packets_total", &http) >= 3.0 * n,
        "{after}"
    );
    assert!(
        moved("xlb_service_reply_packets_total", &http) >= 2.0 * n,
        "{after}"
    );
    // One datagram each way; "hello" is 33 bytes of IP packet.
    assert_eq!(moved("xlb_service_packets_total", &dns), m, "{after}");
    assert_eq!(moved("xlb_service_bytes_total", &dns), 33.0 * m, "{after}");
    assert_eq!(moved("xlb_service_reply_packets_total", &dns), m, "{after}");
    assert!(
        moved("xlb_service_reply_bytes_total", &dns) > 33.0 * m,
        "{after}"
    );
    assert_eq!(
        value(&after, "xlb_service_drops_total", &[]),
        0.0,
        "{after}"
    );
    for reason in [
        "source_range",
        "no_backend",
        "snat_exhausted",
        "unsupported",
        "flow_conflict",
    ] {
        assert!(
            sample(&after, "xlb_service_drops_total", &[("reason", reason)]).is_some(),
            "no drop reason {reason}:\n{after}"
        );
    }
    // The inspect command reads the same maps.
    assert_eq!(
        t.stat("new_flows")? as f64,
        value(&after, "xlb_service_new_flows_total", &[])
    );

    // The sweeper (every second here) counts the table: the UDP flows stay
    // for their timeout, two entries each; those answered by the remote pod
    // hold a SNAT port.
    wait_until(
        "the sweeper counted the UDP flows",
        Duration::from_secs(5),
        || {
            scrape(&t).is_ok_and(|text| {
                sample(&text, "xlb_flow_table_entries", &[]).is_some_and(|e| e >= 2.0 * m)
                    && sample(&text, "xlb_snat_ports_in_use", &[])
                        .is_some_and(|s| s >= remote_answers as f64)
            })
        },
    )
    .with_context(|| scrape(&t).unwrap_or_default())?;
    let text = scrape(&t)?;
    assert_eq!(value(&text, "xlb_flow_table_capacity", &[]), 262_144.0);
    assert_eq!(value(&text, "xlb_snat_ports_capacity", &[]), 28_976.0);
    let ingress = match t.links {
        Links::Wires => "xdp",
        Links::ContainerNodes => "tcx-ingress",
    };
    for (iface, hook) in [
        ("uplink", ingress),
        ("uplink", "tcx-egress"),
        ("n2", "tcx-egress"),
    ] {
        assert_eq!(
            sample(
                &text,
                "xlb_interface_attached",
                &[("interface", iface), ("hook", hook)]
            ),
            Some(1.0),
            "{iface} {hook}:\n{text}"
        );
    }
    assert!(value(&text, "xlb_programming_duration_seconds_count", &[]) >= 1.0);
    assert_eq!(value(&text, "xlb_programming_errors_total", &[]), 0.0);
    assert_eq!(
        value(&text, "xlb_leader", &[]),
        0.0,
        "no Lease with manifests"
    );
    assert_eq!(
        sample(
            &text,
            "xlb_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0),
        "{text}"
    );
    Ok(())
}

/// Audit A-14: a service entry deleted from the pinned map behind the
/// agent's back (a lost write, a tool) is written again by the periodic
/// resync, and the frontend answers again within the interval.
#[test]
fn resync_restores_a_service_entry_removed_behind_the_agents_back() -> Result<()> {
    require_root();
    let t = Topology::new()?;
    t.start_servers(&[8080])?;
    web_service(&t, |_| {})?;
    let agent = t.start_agent_with(&["--resync-interval", "2"])?;
    wait_backends(&t, 6)?;
    let dns = SocketAddrV4::new(WEB, 53);
    udp_request(&t.client, dns).context("before the removal")?;

    let pins = xlb::dataplane::PinDir::new(std::path::Path::new("/sys/fs/bpf"), &t.node_name);
    let mut maps = xlb::dataplane::Maps::open_pinned(&pins.maps())?;
    let key = xlb::reconcile::frontend_key(&xlb::model::Frontend {
        addr: WEB.into(),
        port: 53,
        protocol: xlb::model::Protocol::Udp,
    })?;
    maps.services.remove(&key)?;
    assert!(
        udp_request(&t.client, dns).is_err(),
        "the frontend still answers without its service entry"
    );
    wait_until("the frontend answers again", Duration::from_secs(6), || {
        udp_request(&t.client, dns).is_ok()
    })
    .with_context(|| agent.log_text())?;
    assert!(
        agent
            .log_text()
            .contains("the maps differ from what the agent wrote"),
        "{}",
        agent.log_text()
    );
    Ok(())
}

// ---- Safe restarts and fail closed (issue 15: audit A-15) ----

/// Opens `n` connections to `to`, each asked once; with the backend each
/// reached.
fn open_conns(t: &Topology, to: SocketAddrV4, n: usize) -> Result<Vec<(Conn, String)>> {
    (0..n)
        .map(|i| {
            let mut c = Conn::open(&t.client, to, None)?;
            let b = c.ask(&format!("open {i}"))?.backend;
            Ok((c, b))
        })
        .collect()
}

/// Every connection still answers, from the backend it had.
fn assert_conns_alive(conns: &mut [(Conn, String)], when: &str, agent: &Agent) {
    for (i, (c, b)) in conns.iter_mut().enumerate() {
        match c.ask(&format!("{when} {i}")) {
            Ok(r) => assert_eq!(&r.backend, b, "{when}: connection {i} moved"),
            Err(e) => panic!(
                "{when}: established connection {i} (backend {b}) lost: {e:#}\n{}",
                agent.log_text()
            ),
        }
    }
}

/// Audit A-15: a Service withdrawn for a moment (a bad
/// `loadBalancerSourceRanges` written into its manifest, fixed a second
/// later) comes back with its old service id, so the sweeps that ran
/// meanwhile and after leave its established connections alone; new
/// connections were refused while it was withdrawn.
#[test]
fn a_service_withdrawn_for_a_moment_keeps_its_established_connections() -> Result<()> {
    let (t, agent) = web_topology(|_| ())?;
    let to = SocketAddrV4::new(WEB, 80);
    let mut conns = open_conns(&t, to, 12)?;

    web_service(&t, |spec| {
        spec.load_balancer_source_ranges = Some(vec!["not-a-cidr".into()]);
    })?;
    wait_until("the Service withdrawn", Duration::from_secs(5), || {
        t.inspect("services").map(|s| s.is_empty()).unwrap_or(false)
    })?;
    assert!(
        tcp_request(&t.client, to).is_err(),
        "a withdrawn Service took a new connection"
    );
    // At least one sweep (every second here) runs while it is withdrawn.
    std::thread::sleep(Duration::from_millis(1200));
    web_service(&t, |_| ())?;
    wait_backends(&t, 6)?;
    // Sweeps after the comeback.
    std::thread::sleep(Duration::from_secs(3));
    assert_conns_alive(&mut conns, "after the comeback", &agent);
    assert!(tcp_request(&t.client, to).is_ok());
    Ok(())
}

/// Audit A-15: a manifest directory that cannot be read (here: moved away,
/// as when a volume goes; root reads through any mode bits, so `chmod 000`
/// would prove nothing) is not an empty one: the Services read before stay
/// programmed and their connections keep working, the failure is logged,
/// and once a directory is back (a new one, as a volume mounted again) it is
/// watched and changes apply again.
#[test]
fn an_unreadable_manifest_directory_withdraws_nothing() -> Result<()> {
    let (t, agent) = web_topology(|_| ())?;
    let to = SocketAddrV4::new(WEB, 80);
    let mut conns = open_conns(&t, to, 6)?;
    let dir = t.manifests();
    let away = dir.with_file_name("manifests.away");

    std::fs::rename(&dir, &away)?;
    // inotify follows the moved directory: a change in it makes the agent
    // read its path again, where there is nothing now.
    std::fs::write(away.join("poke.yaml"), "# a change\n")?;
    wait_until(
        "the unreadable directory reported",
        Duration::from_secs(5),
        || {
            // Before and after the fix alike (then: "cannot read directory").
            agent.log_text().contains("cannot read")
        },
    )
    .with_context(|| agent.log_text())?;
    // Retries (with backoff) keep failing meanwhile.
    std::thread::sleep(Duration::from_secs(3));
    let services = t.inspect("services")?;
    assert_eq!(services.len(), 2, "frontends withdrawn: {services:?}");
    assert_conns_alive(&mut conns, "directory gone", &agent);
    tcp_request(&t.client, to).context("a new connection while the directory is gone")?;

    // A new directory with the same files.
    std::fs::create_dir(&dir)?;
    for entry in std::fs::read_dir(&away)? {
        let path = entry?.path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap()))?;
    }
    wait_until("the directory reads again", Duration::from_secs(20), || {
        agent.log_text().contains("watching the new one")
    })
    .with_context(|| agent.log_text())?;
    t.write_manifest(
        "dns.yaml",
        &to_yaml(&service("dns", DNS, &[("dns", "UDP", 53, "8080")])),
    )?;
    wait_until("a change applies again", Duration::from_secs(5), || {
        t.inspect("services").map(|s| s.len() == 3).unwrap_or(false)
    })
    .with_context(|| agent.log_text())?;
    assert_conns_alive(&mut conns, "directory back", &agent);
    Ok(())
}

/// Whether a UDP datagram sent from the client's side of the wire with the
/// node's own address as its source reaches a socket on the node.
fn node_hears_its_own_address_from_the_wire(t: &Topology) -> Result<bool> {
    let listen = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('{NODE_ADDR}', 7777)); s.settimeout(2)\n\
         print('ready', flush=True)\n\
         try:\n    print(s.recv(100).decode())\nexcept socket.timeout:\n    print('nothing')\n"
    );
    let listener = PythonServer::start(&t.node, &listen)?;
    // A raw IPv4 header: the client's kernel sends any source as it is.
    let send = format!(
        "import socket, struct, time\n\
         node = socket.inet_aton('{NODE_ADDR}'); data = b'spoofed'\n\
         udp = struct.pack('!HHHH', 5555, 7777, 8 + len(data), 0) + data\n\
         ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, node, node)\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)\n\
         for _ in range(5):\n    s.sendto(ip + udp, ('{NODE_ADDR}', 0)); time.sleep(0.1)\n"
    );
    ns_sh(&t.client, &["python3", "-c", &send])?;
    Ok(listener.output()?.contains("spoofed"))
}

/// Audit A-17 (4): the agent sets `accept_local=1` on its uplinks, because
/// the kernel must take the source-NATed packets xlb hands it (tcx ingress
/// always, XDP when it passes instead of redirecting), whose source is the
/// node's address. That also lets the wire claim the node's address towards
/// the node's own sockets. The README's guard (drop, on the input hook only,
/// what arrives on an uplink with a local source) closes that, and xlb's
/// SNAT traffic, which is forwarded and never meets the input hook, still
/// flows.
#[test]
fn the_readme_guard_closes_accept_local_and_snat_still_flows() -> Result<()> {
    let (t, _agent) = web_topology(|_| ())?;
    assert!(
        node_hears_its_own_address_from_the_wire(&t)?,
        "the exposure the README describes is not there: update the README"
    );
    for rule in [
        "add table inet xlb_guard",
        "add chain inet xlb_guard input { type filter hook input priority 0 ; }",
        "add rule inet xlb_guard input iifname \"uplink\" fib saddr type local drop",
    ] {
        ns_sh(&t.node, &["sh", "-c", &format!("nft '{rule}'")])?;
    }
    assert!(
        !node_hears_its_own_address_from_the_wire(&t)?,
        "the guard let a packet with the node's own address in"
    );
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..60 {
        seen.insert(tcp_request(&t.client, SocketAddrV4::new(WEB, 80))?.backend);
        seen.insert(udp_request(&t.client, SocketAddrV4::new(WEB, 53))?.backend);
    }
    assert_eq!(seen.len(), 3, "every backend, pod-c by SNAT: {seen:?}");
    Ok(())
}

/// Audit A-10 (part 2): a UDP answer larger than the MTU leaves its backend
/// as fragments. Those of a node-local backend pass tcx egress, those of a
/// remote one come back through the node's uplink hook; only the first
/// carries the ports, the others get the addresses it was translated to.
/// The client receives every 3000-byte answer whole, from the frontend,
/// through a local backend and a remote one.
const BIG: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 13);

#[test]
fn a_udp_answer_larger_than_the_mtu_reaches_the_client_whole() -> Result<()> {
    let (t, _agent) = web_topology(|_| ())?;
    let pods = ["pod-a", "pod-c"];
    let mut servers = Vec::new();
    for name in pods {
        let pod = t.pod(name);
        // Answers every datagram with 3000 bytes: its name, then dots.
        let script = format!(
            "import socket\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.bind(('{}', 9000))\n\
             print('ready', flush=True)\n\
             while True:\n    d, a = s.recvfrom(100)\n    s.sendto(b'{name}'.ljust(3000, b'.'), a)\n",
            pod.addr
        );
        servers.push(PythonServer::start(&pod.ns, &script).context("starting the UDP server")?);
    }
    t.write_manifest(
        "big.yaml",
        &to_yaml(&service("big", BIG, &[("dns", "UDP", 53, "9000")])),
    )?;
    let eps: Vec<(Ipv4Addr, &str, bool)> = pods
        .iter()
        .map(|p| {
            let pod = t.pod(p);
            (pod.addr, t.node_of(pod), true)
        })
        .collect();
    t.write_manifest(
        "big-endpoints.yaml",
        &to_yaml(&endpoint_slice("big", &eps, &[("dns", "UDP", 9000)])),
    )?;
    wait_backends(&t, 8)?;
    // Each ask from a fresh socket (a new flow, a new Maglev pick): who
    // answered, how many bytes, from where.
    let asked = ns_sh(
        &t.client,
        &[
            "python3",
            "-c",
            &format!(
                "import socket\n\
                 for _ in range(40):\n    \
                     s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)\n    \
                     s.sendto(b'big?', ('{BIG}', 53))\n    \
                     try:\n        d, a = s.recvfrom(5000)\n    \
                     except socket.timeout:\n        print('timeout'); continue\n    \
                     name = d.rstrip(b'.').decode()\n    \
                     whole = d == name.encode().ljust(3000, b'.')\n    \
                     print(name, len(d), '%s:%d' % a, whole)\n"
            ),
        ],
    );
    drop(servers);
    let asked = asked.context("asking the big service")?;
    let mut answered = BTreeMap::new();
    for line in asked.lines() {
        assert_eq!(
            line.split_whitespace().skip(1).collect::<Vec<_>>(),
            ["3000", &format!("{BIG}:53"), "True"],
            "every answer whole and from the frontend: {asked}"
        );
        *answered
            .entry(
                line.split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            )
            .or_insert(0) += 1;
    }
    assert_eq!(
        answered.keys().map(String::as_str).collect::<Vec<_>>(),
        pods,
        "both the local and the remote backend answered: {asked}"
    );
    assert!(t.stat("fragments_translated")? > 0, "counted");
    Ok(())
}

/// A packet socket in `ns` counting, until `stop` is set, the IPv4 packets
/// that arrive with source `from` and with source `control`: (from,
/// control). The control count shows the socket saw the traffic at all.
fn count_sources(
    ns: &str,
    from: Ipv4Addr,
    control: Ipv4Addr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<std::thread::JoinHandle<Result<(u64, u64)>>> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let socket = xlb_tests::in_netns(ns, || {
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM,
                (libc::ETH_P_IP as u16).to_be() as i32,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: a valid fd and a timeval of the size given.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(fd)
    })??;
    Ok(std::thread::spawn(move || {
        let (mut seen, mut controls) = (0, 0);
        let mut buf = [0u8; 2048];
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            // SAFETY: a valid fd and a buffer of the length given.
            let n =
                unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 20 {
                continue;
            }
            let source = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
            if source == from {
                seen += 1;
            } else if source == control {
                controls += 1;
            }
        }
        Ok((seen, controls))
    }))
}

/// Audit A-10 part 3: a node-local backend keeps sending on a flow xlb
/// ended (its Service removed, the removal grace over). Its packets must
/// not reach the client with the pod's address: they are dropped at the
/// uplink and counted.
#[test]
fn a_removed_services_local_backend_never_reaches_the_client_with_its_address() -> Result<()> {
    use std::{
        io::{Read, Write},
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
    };
    require_root();
    const STREAM: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 13);
    let t = Topology::new()?;
    let pod_a = t.pod("pod-a");
    let (pod_addr, pod_ns) = (pod_a.addr, pod_a.ns.clone());
    // pod-a writes a line every 20 ms to whoever connects, until it fails.
    let listener = xlb_tests::in_netns(&pod_ns, move || {
        std::net::TcpListener::bind(SocketAddrV4::new(pod_addr, 9090))
    })??;
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                while stream.write_all(&[b'x'; 99]).is_ok() && stream.write_all(b"\n").is_ok() {
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
    });
    t.write_manifest("nodes.yaml", &t.nodes_manifest())?;
    t.write_manifest(
        "stream.yaml",
        &to_yaml(&service("stream", STREAM, &[("s", "TCP", 80, "9090")])),
    )?;
    t.write_manifest(
        "stream-endpoints.yaml",
        &to_yaml(&endpoint_slice(
            "stream",
            &[(pod_addr, t.node_of(pod_a), true)],
            &[("s", "TCP", 9090)],
        )),
    )?;
    let _agent = t.start_agent_with(&["--removal-grace", "1"])?;
    wait_backends(&t, 1)?;

    let stop = Arc::new(AtomicBool::new(false));
    let counting = count_sources(&t.client, pod_addr, STREAM, stop.clone())?;
    let mut client = xlb_tests::in_netns(&t.client, move || {
        std::net::TcpStream::connect_timeout(
            &SocketAddrV4::new(STREAM, 80).into(),
            Duration::from_secs(2),
        )
    })??;
    client.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut first = [0u8; 100];
    client
        .read_exact(&mut first)
        .context("the stream through the frontend")?;
    // The client keeps reading (an open window), so pod-a keeps sending.
    let reader_stop = stop.clone();
    let reading = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while !reader_stop.load(Ordering::SeqCst) {
            match client.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => break,
            }
        }
    });

    t.remove_manifest("stream.yaml")?;
    wait_backends(&t, 0)?;
    wait_until("the flow ended", Duration::from_secs(10), || {
        t.inspect("flows").map(|f| f.is_empty()).unwrap_or(false)
    })?;
    // pod-a's segments (new data, then retransmissions) keep coming.
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::SeqCst);
    let (leaked, through_frontend) = counting
        .join()
        .map_err(|_| anyhow::anyhow!("the counting thread panicked"))??;
    let _ = reading.join();
    assert!(
        through_frontend > 0,
        "the capture saw none of the stream through the frontend"
    );
    assert_eq!(
        leaked, 0,
        "{leaked} packets reached the client with pod-a's address"
    );
    let dropped = t.stat("reply_leaks_dropped")?;
    assert!(dropped > 0, "no lost reply was counted");
    Ok(())
}

/// Issue 12 without a cluster: `--address-mode pool` with the AddressPool
/// in the manifest directory. Services get addresses from it (the lowest
/// free one, or the one asked for inside the pool), real traffic reaches
/// them there, a request outside every pool is refused and logged, and a
/// pool that shrinks moves only the Service it no longer covers.
#[test]
fn pool_mode_assigns_addresses_from_a_pool_in_the_manifest_directory() -> Result<()> {
    require_root();
    let t = Topology::new()?;
    t.start_servers(&[8080])?;
    t.write_manifest("nodes.yaml", &t.nodes_manifest())?;
    let pool = |addresses: &str| {
        format!(
            "apiVersion: xlb.dev/v1alpha1\nkind: AddressPool\nmetadata:\n  name: lab\n\
             spec:\n  addresses: [{addresses}]\n"
        )
    };
    t.write_manifest("pool.yaml", &pool("10.200.0.20-10.200.0.22"))?;
    let asking = |name: &str, ip: Option<&str>| {
        let mut service = objects::service_in(
            objects::NAMESPACE,
            name,
            None,
            &[("http", "TCP", 80, "8080")],
        );
        spec_mut(&mut service).load_balancer_ip = ip.map(str::to_string);
        to_yaml(&service)
    };
    t.write_manifest("web.yaml", &asking("web", None))?;
    t.write_manifest("api.yaml", &asking("api", Some("10.200.0.21")))?;
    t.write_manifest("stray.yaml", &asking("stray", Some("10.200.0.99")))?;
    for (service, pod) in [("web", "pod-a"), ("api", "pod-c"), ("stray", "pod-b")] {
        let pod = t.pod(pod);
        t.write_manifest(
            &format!("{service}-endpoints.yaml"),
            &to_yaml(&endpoint_slice(
                service,
                &[(pod.addr, t.node_of(pod), true)],
                &[("http", "TCP", 8080)],
            )),
        )?;
    }
    let agent = t.start_agent_with(&["--address-mode", "pool"])?;
    let frontends = || -> BTreeMap<String, String> {
        t.inspect("services")
            .unwrap_or_default()
            .iter()
            .filter_map(|s| {
                Some((
                    s["frontend"].as_str()?.to_owned(),
                    s["service"].as_str()?.to_owned(),
                ))
            })
            .collect()
    };
    let service_at = |ip: &str| frontends().get(&format!("{ip}:80/TCP")).cloned();
    wait_until("web and api programmed", Duration::from_secs(5), || {
        frontends().len() == 2
    })?;
    assert!(
        service_at("10.200.0.20").is_some_and(|s| s.starts_with("default/web")),
        "{:?}",
        frontends()
    );
    assert!(
        service_at("10.200.0.21").is_some_and(|s| s.starts_with("default/api")),
        "{:?}",
        frontends()
    );
    let at = |last: u8| SocketAddrV4::new(Ipv4Addr::new(10, 200, 0, last), 80);
    assert_eq!(tcp_request(&t.client, at(20))?.backend, "pod-a");
    assert_eq!(tcp_request(&t.client, at(21))?.backend, "pod-c");
    assert!(
        tcp_request(&t.client, at(99)).is_err(),
        "an address outside the pool answered"
    );
    let log = agent.log_text();
    assert!(
        log.contains("AllocationFailed") && log.contains("10.200.0.99 is in no usable AddressPool"),
        "{log}"
    );

    // The pool loses .20: web moves to .22, api stays.
    t.write_manifest("pool.yaml", &pool("'10.200.0.21/32', '10.200.0.22/32'"))?;
    wait_until("web moved to .22", Duration::from_secs(5), || {
        service_at("10.200.0.22").is_some_and(|s| s.starts_with("default/web"))
    })?;
    assert!(service_at("10.200.0.20").is_none(), "{:?}", frontends());
    assert!(service_at("10.200.0.21").is_some_and(|s| s.starts_with("default/api")));
    assert_eq!(tcp_request(&t.client, at(22))?.backend, "pod-a");
    assert!(
        tcp_request(&t.client, at(20)).is_err(),
        "the old address still answers"
    );
    Ok(())
}
