//! Privileged end-to-end tests over IPv6 and dual-stack (issue 10): real
//! IPv6 packets from the client namespace through the real XDP/tcx
//! programs, driven by the real `xlb agent` from manifests, to real servers
//! listening on the pods' IPv6 addresses. The IPv4 half of the same
//! Services carries traffic alongside. Run by `cargo xtask test` (as root),
//! on both link kinds.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    time::Duration,
};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{ClientIPConfig, ServiceSpec, SessionAffinityConfig};
use xlb_tests::{
    Agent, CLIENT_ADDR, CLIENT_ADDR_2, CLIENT_ADDR_V6, CLIENT_ADDR_V6_2, Conn, NODE_ADDR,
    NODE_ADDR_V6, Topology, ns_sh,
    objects::{self, dual_stack_service, endpoint_slice, endpoint_slice_v6, spec_mut, to_yaml},
    scrape::{http_get, sample},
    snmp_counter, tcp_request, tcp_request_v6, udp_request, udp_request_v6, wait_until,
};

const WEB: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const WEB_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x10);
const PODS: [&str; 3] = ["pod-a", "pod-b", "pod-c"];

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the end-to-end tests need root (network namespaces, XDP): run `cargo xtask test` as root"
    );
}

fn web_v6(port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(WEB_V6, port, 0, 0)
}

/// The dual-stack `web` Service (TCP 80 → 8080, UDP 53 → 8080, frontends
/// `WEB` and `WEB_V6`) over pods a, b (local) and c (remote) in both
/// families, its spec changed by `adjust`, and the node objects.
fn dual_stack_web(t: &Topology, adjust: impl FnOnce(&mut ServiceSpec)) -> Result<()> {
    t.write_manifest("nodes.yaml", &t.nodes_manifest())?;
    let mut web = dual_stack_service(
        "web",
        WEB,
        WEB_V6,
        &[("http", "TCP", 80, "8080"), ("dns", "UDP", 53, "8080")],
    );
    adjust(spec_mut(&mut web));
    t.write_manifest("web.yaml", &to_yaml(&web))?;
    write_endpoints(t, &PODS, &PODS)
}

/// The IPv4 and the IPv6 EndpointSlice of `web`, each with its own pods.
fn write_endpoints(t: &Topology, ipv4_pods: &[&str], ipv6_pods: &[&str]) -> Result<()> {
    let ports = [("http", "TCP", 8080), ("dns", "UDP", 8080)];
    let ipv4: Vec<(Ipv4Addr, &str, bool)> = ipv4_pods
        .iter()
        .map(|p| (t.pod(p).addr, t.node_of(t.pod(p)), true))
        .collect();
    t.write_manifest(
        "web-endpoints.yaml",
        &to_yaml(&endpoint_slice("web", &ipv4, &ports)),
    )?;
    let ipv6: Vec<(Ipv6Addr, &str, bool)> = ipv6_pods
        .iter()
        .map(|p| (t.pod(p).addr_v6, t.node_of(t.pod(p)), true))
        .collect();
    t.write_manifest(
        "web-endpoints-v6.yaml",
        &to_yaml(&endpoint_slice_v6("web", &ipv6, &ports)),
    )
}

/// The reference topology with servers on 8080 (both families), the
/// dual-stack `web` Service and a ready agent that programmed all 12
/// backends (3 pods × 2 ports × 2 families).
fn web_topology(adjust: impl FnOnce(&mut ServiceSpec)) -> Result<(Topology, Agent)> {
    web_topology_with(12, adjust)
}

/// [`web_topology`] for a spec with `backends` backends in the maps (fewer
/// with `externalTrafficPolicy: Local`, which programs only local ones).
fn web_topology_with(
    backends: usize,
    adjust: impl FnOnce(&mut ServiceSpec),
) -> Result<(Topology, Agent)> {
    require_root();
    let t = Topology::new()?;
    t.start_servers(&[8080])?;
    dual_stack_web(&t, adjust)?;
    let agent = t.start_agent()?;
    wait_backends(&t, backends)?;
    Ok((t, agent))
}

/// Waits until the agent has programmed `n` backends in total.
fn wait_backends(t: &Topology, n: usize) -> Result<()> {
    wait_until(
        &format!("{n} backends programmed"),
        Duration::from_secs(5),
        || t.inspect("backends").map(|b| b.len() == n).unwrap_or(false),
    )
}

/// Which peer each backend saw, per backend (all the peers it reported).
type Seen = BTreeMap<String, BTreeSet<IpAddr>>;

fn note(seen: &mut Seen, backend: String, peer: IpAddr) {
    seen.entry(backend).or_default().insert(peer);
}

/// Every backend answered; the remote one (pod-c) saw only `node` (SNAT),
/// the local ones only `client`.
fn assert_spread_and_peers(what: &str, seen: &Seen, client: IpAddr, node: IpAddr) {
    assert_eq!(
        seen.keys().map(String::as_str).collect::<Vec<_>>(),
        PODS,
        "{what}: not every backend answered: {seen:?}"
    );
    for (backend, peers) in seen {
        let want = if backend == "pod-c" { node } else { client };
        assert_eq!(
            peers,
            &BTreeSet::from([want]),
            "{what}: {backend} saw the wrong peer"
        );
    }
}

/// A dual-stack Service answers TCP and UDP over IPv6 and over IPv4 at the
/// same time, from local and remote backends; the remote backend sees the
/// node's address of the packet's family (SNAT), local ones the client's.
#[test]
fn a_dual_stack_service_answers_both_families_from_local_and_remote_backends() -> Result<()> {
    let (t, _agent) = web_topology(|_| ())?;
    let (mut tcp6, mut udp6, mut tcp4, mut udp4) =
        (Seen::new(), Seen::new(), Seen::new(), Seen::new());
    for i in 0..90 {
        let r = tcp_request_v6(&t.client, web_v6(80)).with_context(|| format!("TCP6 #{i}"))?;
        note(&mut tcp6, r.backend, r.peer.ip());
        let r = udp_request_v6(&t.client, web_v6(53)).with_context(|| format!("UDP6 #{i}"))?;
        note(&mut udp6, r.backend, r.peer.ip());
        // The IPv4 half of the same Service, interleaved.
        let r = tcp_request(&t.client, SocketAddrV4::new(WEB, 80))?;
        note(&mut tcp4, r.backend, r.peer.ip());
        let r = udp_request(&t.client, SocketAddrV4::new(WEB, 53))?;
        note(&mut udp4, r.backend, r.peer.ip());
    }
    let (client6, node6) = (IpAddr::V6(CLIENT_ADDR_V6), IpAddr::V6(NODE_ADDR_V6));
    let (client4, node4) = (IpAddr::V4(CLIENT_ADDR), IpAddr::V4(NODE_ADDR));
    assert_spread_and_peers("TCP over IPv6", &tcp6, client6, node6);
    assert_spread_and_peers("UDP over IPv6", &udp6, client6, node6);
    assert_spread_and_peers("TCP over IPv4", &tcp4, client4, node4);
    assert_spread_and_peers("UDP over IPv4", &udp4, client4, node4);
    // Both frontends are xlb's, in their usual notation.
    let frontends: BTreeSet<String> = t
        .inspect("services")?
        .iter()
        .filter_map(|s| s["frontend"].as_str().map(str::to_string))
        .collect();
    assert!(
        frontends.contains(&format!("[{WEB_V6}]:80/TCP"))
            && frontends.contains(&format!("{WEB}:80/TCP")),
        "{frontends:?}"
    );
    for ns in [&t.client, &t.pod("pod-a").ns, &t.pod("pod-c").ns] {
        assert_eq!(snmp_counter(ns, "Tcp", "InCsumErrors")?, 0, "{ns}");
    }
    Ok(())
}

/// `/metrics` counts an IPv6 frontend's flows under its usual notation
/// (`[addr]:port/proto`), apart from the IPv4 half of the same Service.
#[test]
fn metrics_name_ipv6_frontends_in_their_usual_notation() -> Result<()> {
    require_root();
    let t = Topology::new()?;
    t.start_servers(&[8080])?;
    dual_stack_web(&t, |_| ())?;
    let metrics = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9479);
    let agent = t.start_agent_with(&["--metrics-addr", &metrics.to_string()])?;
    wait_backends(&t, 12)?;
    let scrape = || -> Result<String> {
        let (status, body) = http_get(&t.node, metrics, "/metrics")?;
        anyhow::ensure!(status == 200, "/metrics answered {status}: {body}");
        Ok(body)
    };
    let v6 = format!("[{WEB_V6}]:80/TCP");
    let v4 = format!("{WEB}:80/TCP");
    let flows = |text: &str, frontend: &str| {
        sample(
            text,
            "xlb_service_new_flows_total",
            &[("service", "web"), ("frontend", frontend)],
        )
        .unwrap_or(0.0)
    };
    let before = scrape()?;
    const CONNECTIONS: usize = 7;
    for _ in 0..CONNECTIONS {
        tcp_request_v6(&t.client, web_v6(80))?;
    }
    tcp_request(&t.client, SocketAddrV4::new(WEB, 80))?;
    let after = scrape()?;
    assert_eq!(
        flows(&after, &v6) - flows(&before, &v6),
        CONNECTIONS as f64,
        "{after}\n{}",
        agent.log_text()
    );
    assert_eq!(flows(&after, &v4) - flows(&before, &v4), 1.0, "{after}");
    Ok(())
}

/// `externalTrafficPolicy: Local` over IPv6: only the node's own backends
/// answer, and they see the client's IPv6 address.
#[test]
fn local_policy_over_ipv6_keeps_the_client_address() -> Result<()> {
    // pod-a and pod-b, two ports, two families.
    let (t, _agent) = web_topology_with(8, |spec| {
        spec.external_traffic_policy = Some("Local".into())
    })?;
    let mut seen = Seen::new();
    for i in 0..60 {
        let r = tcp_request_v6(&t.client, web_v6(80)).with_context(|| format!("TCP6 #{i}"))?;
        note(&mut seen, r.backend, r.peer.ip());
        let r = udp_request_v6(&t.client, web_v6(53)).with_context(|| format!("UDP6 #{i}"))?;
        note(&mut seen, r.backend, r.peer.ip());
    }
    let client = BTreeSet::from([IpAddr::V6(CLIENT_ADDR_V6)]);
    assert_eq!(
        seen,
        BTreeMap::from([
            ("pod-a".to_string(), client.clone()),
            ("pod-b".to_string(), client),
        ]),
        "only node-local backends may answer, seeing the client's address"
    );
    Ok(())
}

/// `sessionAffinity: ClientIP` over IPv6: each client address always
/// reaches one backend.
#[test]
fn client_ip_affinity_over_ipv6_pins_a_client_to_one_backend() -> Result<()> {
    let (t, _agent) = web_topology(|spec| {
        spec.session_affinity = Some("ClientIP".into());
        spec.session_affinity_config = Some(SessionAffinityConfig {
            client_ip: Some(ClientIPConfig {
                timeout_seconds: Some(60),
            }),
        });
    })?;
    for from in [CLIENT_ADDR_V6, CLIENT_ADDR_V6_2] {
        let mut seen = BTreeSet::new();
        for _ in 0..30 {
            let mut c = Conn::open_v6(&t.client, web_v6(80), Some(from))?;
            seen.insert(c.ask("hi")?.backend);
        }
        assert_eq!(seen.len(), 1, "client {from} was spread over {seen:?}");
    }
    // Without affinity 30 connections from one address would have reached
    // more than one of three backends; the IPv6 frontend has the flag.
    let services = t.inspect("services")?;
    assert!(
        services.iter().any(
            |s| s["frontend"].as_str().is_some_and(|f| f.starts_with('['))
                && s["flags"].as_str().unwrap_or("").contains("affinity")
        ),
        "{services:?}"
    );
    Ok(())
}

/// `loadBalancerSourceRanges` of both families: per family, the client
/// address inside its range connects and the one outside does not.
#[test]
fn source_ranges_of_both_families_admit_only_their_clients() -> Result<()> {
    let (t, _agent) = web_topology(|spec| {
        spec.load_balancer_source_ranges = Some(vec![
            format!("{CLIENT_ADDR_V6}/128"),
            format!("{CLIENT_ADDR}/32"),
        ]);
    })?;
    for _ in 0..5 {
        Conn::open_v6(&t.client, web_v6(80), Some(CLIENT_ADDR_V6))?.ask("allowed over IPv6")?;
        Conn::open(&t.client, SocketAddrV4::new(WEB, 80), Some(CLIENT_ADDR))?
            .ask("allowed over IPv4")?;
    }
    let blocked_v6 = Conn::open_v6(&t.client, web_v6(80), Some(CLIENT_ADDR_V6_2))
        .and_then(|mut c| c.ask("blocked"));
    assert!(
        blocked_v6.is_err(),
        "an IPv6 client outside loadBalancerSourceRanges got through"
    );
    let blocked_v4 = Conn::open(&t.client, SocketAddrV4::new(WEB, 80), Some(CLIENT_ADDR_2))
        .and_then(|mut c| c.ask("blocked"));
    assert!(
        blocked_v4.is_err(),
        "an IPv4 client outside loadBalancerSourceRanges got through"
    );
    assert!(
        t.stat("drop_source_range")? >= 2,
        "the drops must be counted"
    );
    Ok(())
}

/// An established IPv6 connection keeps its backend when the backend
/// leaves the IPv6 EndpointSlice, and again across an agent restart; new
/// connections avoid removed backends.
#[test]
fn established_ipv6_flows_survive_backend_removal_and_agent_restart() -> Result<()> {
    let (t, mut agent) = web_topology(|_| ())?;
    let mut conns: BTreeMap<String, Conn> = BTreeMap::new();
    for _ in 0..200 {
        let mut c = Conn::open_v6(&t.client, web_v6(80), None)?;
        let backend = c.ask("first")?.backend;
        conns.entry(backend).or_insert(c);
        if conns.len() == 3 {
            break;
        }
    }
    assert_eq!(conns.len(), 3, "{:?}", conns.keys().collect::<Vec<_>>());

    // pod-c (remote) leaves, then pod-a (local): only pod-b stays.
    for (removed, remaining) in [("pod-c", &["pod-a", "pod-b"][..]), ("pod-a", &["pod-b"])] {
        write_endpoints(&t, &PODS, remaining)?;
        wait_backends(&t, 6 + remaining.len() * 2)?;
        let c = conns.get_mut(removed).expect("a connection per backend");
        for i in 0..5 {
            let r = c.ask(&format!("still there {i}"))?;
            assert_eq!(
                r.backend, removed,
                "established flow moved to another backend"
            );
        }
        for _ in 0..30 {
            let r = tcp_request_v6(&t.client, web_v6(80))?;
            assert!(
                remaining.contains(&r.backend.as_str()),
                "a new connection reached {} after {removed} left",
                r.backend
            );
        }
    }

    agent.stop()?;
    for (backend, c) in conns.iter_mut() {
        assert_eq!(&c.ask("agent down")?.backend, backend);
    }
    let agent2 = t.start_agent()?;
    let adopted = format!("adopted pinned {} link", t.forward_hook());
    assert!(
        agent2.log_text().contains(&adopted),
        "no '{adopted}' in:\n{}",
        agent2.log_text()
    );
    wait_backends(&t, 8)?;
    for (backend, c) in conns.iter_mut() {
        for i in 0..3 {
            assert_eq!(
                &c.ask(&format!("after restart {i}"))?.backend,
                backend,
                "flow moved after the restart"
            );
        }
    }
    assert_eq!(tcp_request_v6(&t.client, web_v6(80))?.backend, "pod-b");
    Ok(())
}

/// `--address-mode node` with dual-stack Node objects: a dual-stack
/// Service is reached on the node's IPv6 address (and on its IPv4 one),
/// spread over local and remote backends.
#[test]
fn node_mode_serves_a_dual_stack_service_on_the_nodes_ipv6_address() -> Result<()> {
    require_root();
    let t = Topology::new()?;
    t.start_servers(&[8080])?;
    t.write_manifest("nodes.yaml", &t.nodes_manifest())?;
    let mut web = objects::service_in("default", "web", None, &[("http", "TCP", 45000, "8080")]);
    let spec = spec_mut(&mut web);
    spec.ip_family_policy = Some("PreferDualStack".into());
    spec.ip_families = Some(vec!["IPv6".into(), "IPv4".into()]);
    t.write_manifest("web.yaml", &to_yaml(&web))?;
    write_endpoints(&t, &PODS, &PODS)?;
    let _agent = t.start_agent_with(&["--address-mode", "node"])?;
    let node6 = SocketAddrV6::new(NODE_ADDR_V6, 45000, 0, 0);
    wait_until(
        "the Service on the node's IPv6 address",
        Duration::from_secs(5),
        || tcp_request_v6(&t.client, node6).is_ok(),
    )?;
    let mut seen = Seen::new();
    for i in 0..60 {
        let r = tcp_request_v6(&t.client, node6).with_context(|| format!("TCP6 #{i}"))?;
        note(&mut seen, r.backend, r.peer.ip());
    }
    assert_spread_and_peers(
        "node mode over IPv6",
        &seen,
        IpAddr::V6(CLIENT_ADDR_V6),
        IpAddr::V6(NODE_ADDR_V6),
    );
    assert!(tcp_request(&t.client, SocketAddrV4::new(NODE_ADDR, 45000)).is_ok());
    let frontends: BTreeSet<String> = t
        .inspect("services")?
        .iter()
        .filter_map(|s| s["frontend"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        frontends,
        BTreeSet::from([
            format!("[{NODE_ADDR_V6}]:45000/TCP"),
            format!("{NODE_ADDR}:45000/TCP")
        ])
    );
    Ok(())
}

/// Path MTU over IPv6: IPv6 routers never fragment, so with the link to the
/// other node at MTU 1400 (the client's at 1500) a 200 KB upload through
/// the remote backend only completes if the client hears "packet too big"
/// for the frontend — which xlb sends, since the kernel would send its own
/// to the translated source (the node itself).
#[test]
fn bulk_ipv6_tcp_to_the_remote_backend_crosses_a_smaller_mtu_link() -> Result<()> {
    let (t, _agent) = web_topology(|_| ())?;
    for (ns, dev) in [(&t.node, "n2"), (&t.node2, "n1")] {
        ns_sh(ns, &["ip", "link", "set", "dev", dev, "mtu", "1400"])?;
    }
    let mut through_pod_c = None;
    for _ in 0..60 {
        let mut c = Conn::open_v6(&t.client, web_v6(80), None)?;
        if c.ask("which")?.backend == "pod-c" {
            through_pod_c = Some(c);
            break;
        }
    }
    let mut c = through_pod_c.context("no connection reached pod-c")?;
    let took = c.bulk(200_000).context("200 KB over IPv6 through pod-c")?;
    assert!(
        took < Duration::from_secs(3),
        "200 KB over IPv6 through pod-c took {took:?}"
    );
    assert!(
        t.stat("frag_needed_sent")? > 0,
        "the client learnt its path MTU from xlb"
    );
    Ok(())
}
