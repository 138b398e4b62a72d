//! BGP announcement against real routers: two xlb nodes peer with BIRD and
//! FRR (tests/src/bgp_lab.rs); the routers' RIBs and a client behind BIRD
//! show what the agents announced.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddrV4, TcpListener},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::{Value, json};

use xlb_tests::{
    bgp_lab::{
        BIRD_ADDR, BgpLab, CLIENT, FRR_ADDR, LAN_API_ADDR, LIAR_ADDR, NODE_A, NODE_B, POD_A, POD_B,
        SERVICE_PORT, TARGET_PORT, lan_v6,
    },
    fake_api::FakeApi,
    in_netns, objects,
    rbac::{assert_all_granted_used, assert_deploy_rbac_allows},
    scrape::sample,
    tcp_request, wait_until,
};

const SERVICE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const PREFIX: &str = "10.200.0.10/32";
/// Long enough for an agent restart in every test but the one that kills.
const RESTART_TIME: u16 = 60;

fn service_manifest(lab: &BgpLab, local: bool, endpoints: &[(Ipv4Addr, usize)]) -> String {
    let mut service = objects::service(
        "web",
        SERVICE,
        &[("http", "TCP", SERVICE_PORT.into(), "8080")],
    );
    if local {
        objects::spec_mut(&mut service).external_traffic_policy = Some("Local".into());
    }
    let endpoints: Vec<(Ipv4Addr, &str, bool)> = endpoints
        .iter()
        .map(|&(addr, node)| (addr, lab.node_names[node].as_str(), true))
        .collect();
    let slice = objects::endpoint_slice("web", &endpoints, &[("http", "TCP", TARGET_PORT.into())]);
    format!(
        "{}---\n{}",
        objects::to_yaml(&service),
        objects::to_yaml(&slice)
    )
}

/// A lab with both routers, the Node objects and the peers (manifests).
fn lab_with_routers(restart_time: u16) -> Result<BgpLab> {
    let mut lab = BgpLab::new()?;
    lab.start_bird()?;
    lab.start_frr()?;
    lab.write_manifest("nodes.yaml", &lab.nodes_manifest())?;
    lab.write_manifest(
        "peers.yaml",
        &format!(
            "{}---\n{}",
            BgpLab::peer_manifest("bird", BIRD_ADDR, restart_time),
            BgpLab::peer_manifest("frr", FRR_ADDR, restart_time)
        ),
    )?;
    Ok(lab)
}

/// [`lab_with_routers`] and a Service over a pod on each node.
fn lab_with(restart_time: u16, local: bool, endpoints: &[(Ipv4Addr, usize)]) -> Result<BgpLab> {
    let lab = lab_with_routers(restart_time)?;
    lab.write_manifest("web.yaml", &service_manifest(&lab, local, endpoints))?;
    Ok(lab)
}

/// The node that carried a request, from what the backend saw: a local
/// backend sees the client, a remote one the SNAT address of the node.
fn node_of(reply: &xlb_tests::Reply) -> Result<usize> {
    let peer = reply.peer.ip();
    Ok(match (reply.backend.as_str(), peer) {
        ("pod-a", p) if p == IpAddr::V4(CLIENT) => 0,
        ("pod-b", p) if p == IpAddr::V4(CLIENT) => 1,
        ("pod-a", p) if p == IpAddr::V4(NODE_B) => 1,
        ("pod-b", p) if p == IpAddr::V4(NODE_A) => 0,
        _ => bail!("unexpected reply {reply:?}"),
    })
}

fn request(lab: &BgpLab) -> Result<xlb_tests::Reply> {
    tcp_request(&lab.client, SocketAddrV4::new(SERVICE, SERVICE_PORT))
}

#[test]
fn both_routers_learn_the_service_from_both_nodes_and_withdraw_it_on_delete() -> Result<()> {
    let lab = lab_with(RESTART_TIME, false, &[(POD_A, 0), (POD_B, 1)])?;
    let _a = lab.start_agent(0)?;
    let _b = lab.start_agent(1)?;
    lab.wait_next_hops(PREFIX, &[NODE_A, NODE_B], Duration::from_secs(20))?;

    // ECMP at BIRD's kernel: the client's connections go through both
    // nodes, and every one is answered.
    let mut through = [0usize; 2];
    for _ in 0..24 {
        let reply = request(&lab).context("request through the router")?;
        through[node_of(&reply)?] += 1;
    }
    assert!(
        through[0] > 0 && through[1] > 0,
        "connections per node {through:?}: ECMP should spread them"
    );

    // What the agent says about its sessions.
    let sessions = lab.inspect_bgp(0)?;
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    for session in &sessions {
        assert_eq!(session["state"], "Established", "{session:?}");
        assert_eq!(session["announced_prefixes"], 1, "{session:?}");
    }
    let metrics = lab.metrics(0)?;
    for peer in ["xlb/bird", "xlb/frr"] {
        let labels = [("peer", peer)];
        assert_eq!(
            sample(&metrics, "xlb_bgp_session_up", &labels),
            Some(1.0),
            "{metrics}"
        );
        assert_eq!(
            sample(&metrics, "xlb_bgp_announced_prefixes", &labels),
            Some(1.0)
        );
        assert!(sample(&metrics, "xlb_bgp_updates_sent_total", &labels).is_some_and(|n| n >= 1.0));
    }

    lab.remove_manifest("web.yaml")?;
    let deleted = Instant::now();
    lab.wait_next_hops(PREFIX, &[], Duration::from_secs(3))?;
    let took = deleted.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "withdrawn after {took:?} (both routers within a second)"
    );
    Ok(())
}

#[test]
fn local_policy_routes_only_through_the_node_with_the_endpoint_and_follow_it() -> Result<()> {
    let lab = lab_with(RESTART_TIME, true, &[(POD_A, 0)])?;
    let _a = lab.start_agent(0)?;
    let _b = lab.start_agent(1)?;
    lab.wait_next_hops(PREFIX, &[NODE_A], Duration::from_secs(20))?;
    for _ in 0..8 {
        let reply = request(&lab)?;
        assert_eq!(reply.backend, "pod-a");
        assert_eq!(
            reply.peer.ip(),
            IpAddr::V4(CLIENT),
            "Local keeps the client address"
        );
    }
    // The endpoint moves to node-b: so does the route.
    lab.write_manifest("web.yaml", &service_manifest(&lab, true, &[(POD_B, 1)]))?;
    lab.wait_next_hops(PREFIX, &[NODE_B], Duration::from_secs(3))?;
    wait_until("traffic through node-b", Duration::from_secs(3), || {
        request(&lab).is_ok_and(|r| r.backend == "pod-b")
    })?;
    for _ in 0..8 {
        let reply = request(&lab)?;
        assert_eq!(reply.backend, "pod-b");
        assert_eq!(reply.peer.ip(), IpAddr::V4(CLIENT));
    }
    Ok(())
}

#[test]
fn an_agent_restart_keeps_the_route_in_both_ribs_and_traffic_flowing() -> Result<()> {
    let lab = lab_with(RESTART_TIME, true, &[(POD_A, 0)])?;
    let mut a = lab.start_agent(0)?;
    let _b = lab.start_agent(1)?;
    lab.wait_next_hops(PREFIX, &[NODE_A], Duration::from_secs(20))?;

    // Poll both RIBs and the data path from before the agent stops until
    // well after its successor has sent End-of-RIB.
    let (checks, a2) = std::thread::scope(|scope| -> Result<(usize, xlb_tests::Agent)> {
        let poller = scope.spawn(|| -> Result<usize> {
            let started = Instant::now();
            let mut checks = 0;
            while started.elapsed() < Duration::from_secs(8) {
                let bird = lab.bird_next_hops(PREFIX)?;
                let frr = lab.frr_next_hops(PREFIX)?;
                if bird != [NODE_A] || frr != [NODE_A] {
                    bail!(
                        "during the restart BIRD had {bird:?}, FRR {frr:?}\n{}",
                        lab.logs()
                    );
                }
                let reply = request(&lab).context("traffic during the restart")?;
                assert_eq!(reply.backend, "pod-a");
                checks += 1;
            }
            Ok(checks)
        });
        std::thread::sleep(Duration::from_millis(300));
        a.stop()?;
        let a2 = lab.start_agent(0)?;
        let checks = poller.join().expect("poller panicked")?;
        Ok((checks, a2))
    })?;
    assert!(checks > 5, "only {checks} checks");
    wait_until("both sessions back", Duration::from_secs(10), || {
        lab.bird_established(0).unwrap_or(false)
            && lab.frr_state(NODE_A).is_ok_and(|s| s == "Established")
    })?;
    // After End-of-RIB the route is still there (sent again, not stale).
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(lab.bird_next_hops(PREFIX)?, [NODE_A]);
    assert_eq!(lab.frr_next_hops(PREFIX)?, [NODE_A]);
    let bird_route = lab.birdc(&["show", "route", PREFIX, "all"])?;
    assert!(!bird_route.contains("stale"), "{bird_route}");
    drop(a2);
    Ok(())
}

#[test]
fn a_vanished_node_is_withdrawn_by_the_hold_timer_and_traffic_moves() -> Result<()> {
    // The backend is on node-b: node-a forwards to it while it is there,
    // and its own pods would vanish with it.
    let lab = lab_with(RESTART_TIME, false, &[(POD_B, 1)])?;
    let mut a = lab.start_agent(0)?;
    let _b = lab.start_agent(1)?;
    lab.wait_next_hops(PREFIX, &[NODE_A, NODE_B], Duration::from_secs(20))?;
    let mut through = [0usize; 2];
    for _ in 0..24 {
        through[node_of(&request(&lab)?)?] += 1;
    }
    assert!(through[0] > 0 && through[1] > 0, "{through:?}");
    // The node drops off the network (no FIN reaches the routers), then its
    // agent dies.
    xlb_tests::ns_sh(&lab.nodes[0], &["ip", "link", "set", "uplink", "down"])?;
    let gone = Instant::now();
    a.kill()?;
    lab.wait_next_hops(PREFIX, &[NODE_B], Duration::from_secs(8))?;
    let took = gone.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "withdrawn after {took:?}: before the 3 s hold time could expire?"
    );
    for _ in 0..8 {
        let reply = request(&lab).context("traffic after the withdrawal")?;
        assert_eq!(node_of(&reply)?, 1, "{reply:?}");
    }
    Ok(())
}

#[test]
fn garbage_from_a_peer_gets_a_notification_and_the_other_sessions_stay_up() -> Result<()> {
    let lab = lab_with(RESTART_TIME, false, &[(POD_A, 0), (POD_B, 1)])?;
    // A peer that answers the OPEN with text.
    let listener = in_netns(&lab.liar_ns, || TcpListener::bind((LIAR_ADDR, 179)))??;
    lab.write_manifest(
        "liar.yaml",
        &BgpLab::peer_manifest("liar", LIAR_ADDR, RESTART_TIME),
    )?;
    let _a = lab.start_agent(0)?;
    let _b = lab.start_agent(1)?;
    lab.wait_next_hops(PREFIX, &[NODE_A, NODE_B], Duration::from_secs(20))?;

    listener.set_nonblocking(false)?;
    let mut notifications = Vec::new();
    let started = Instant::now();
    // Two connections: the answer, and the retry after backoff.
    for _ in 0..2 {
        let (mut stream, from) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut open = [0u8; 19];
        stream.read_exact(&mut open)?;
        assert_eq!(open[18], 1, "the first message from {from} is an OPEN");
        let length = usize::from(u16::from_be_bytes([open[16], open[17]]));
        let mut rest = vec![0u8; length - 19];
        stream.read_exact(&mut rest)?;
        stream.write_all(b"GET / HTTP/1.1\r\nHost: xlb\r\n\r\n")?;
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        notifications.push((from, answer));
        if started.elapsed() > Duration::from_secs(20) {
            break;
        }
    }
    for (from, answer) in &notifications {
        assert!(answer.len() >= 21, "{from} answered {answer:?}");
        assert!(answer[..16].iter().all(|&b| b == 0xff), "{answer:?}");
        assert_eq!(answer[18], 3, "a NOTIFICATION from {from}: {answer:?}");
        assert_eq!(
            (answer[19], answer[20]),
            (1, 1),
            "Message Header Error / Connection Not Synchronized (RFC 4271 §6.1)"
        );
    }
    // The real routers never noticed.
    for (i, node) in [NODE_A, NODE_B].into_iter().enumerate() {
        assert!(lab.bird_established(i)?, "BIRD's session with {node}");
        assert_eq!(lab.frr_state(node)?, "Established");
    }
    assert_eq!(lab.bird_next_hops(PREFIX)?, [NODE_A, NODE_B]);
    let liar = lab
        .inspect_bgp(0)?
        .into_iter()
        .find(|s| s["peer"] == "xlb/liar")
        .context("the liar in inspect bgp")?;
    assert_ne!(liar["state"], "Established", "{liar:?}");
    assert!(
        liar["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("ConnectionNotSynchronized")),
        "{liar:?}"
    );
    Ok(())
}

#[test]
fn ipv6_service_addresses_reach_both_routers_over_mp_bgp() -> Result<()> {
    let lab = lab_with(RESTART_TIME, false, &[(POD_A, 0), (POD_B, 1)])?;
    let service_v6: std::net::Ipv6Addr = "fd00:200::10".parse()?;
    let mut service = objects::dual_stack_service(
        "web",
        SERVICE,
        service_v6,
        &[("http", "TCP", SERVICE_PORT.into(), "8080")],
    );
    objects::spec_mut(&mut service).external_traffic_policy = Some("Cluster".into());
    let v4 = objects::endpoint_slice(
        "web",
        &[
            (POD_A, lab.node_names[0].as_str(), true),
            (POD_B, lab.node_names[1].as_str(), true),
        ],
        &[("http", "TCP", TARGET_PORT.into())],
    );
    let v6 = objects::endpoint_slice_v6(
        "web",
        &[
            ("fd00:244:1::2".parse()?, lab.node_names[0].as_str(), true),
            ("fd00:244:2::2".parse()?, lab.node_names[1].as_str(), true),
        ],
        &[("http", "TCP", TARGET_PORT.into())],
    );
    lab.write_manifest("web.yaml", &objects::to_yaml_documents(&[service]))?;
    lab.write_manifest(
        "web-slices.yaml",
        &format!("{}---\n{}", objects::to_yaml(&v4), objects::to_yaml(&v6)),
    )?;
    let _a = lab.start_agent(0)?;
    let _b = lab.start_agent(1)?;
    lab.wait_next_hops(PREFIX, &[NODE_A, NODE_B], Duration::from_secs(20))?;
    // IPv6 over the IPv4 sessions (MP_REACH_NLRI), each node's IPv6
    // address as next hop.
    let want = [lan_v6(NODE_A), lan_v6(NODE_B)];
    let prefix_v6 = "fd00:200::10/128";
    let mut last = (Vec::new(), Vec::new());
    let found = wait_until(
        "the IPv6 route on both routers",
        Duration::from_secs(10),
        || {
            last = (
                lab.bird_next_hops_v6(prefix_v6).unwrap_or_default(),
                lab.frr_next_hops_v6(prefix_v6).unwrap_or_default(),
            );
            last.0 == want && last.1 == want
        },
    );
    if found.is_err() {
        bail!(
            "BIRD {:?}, FRR {:?}, want {want:?}\n{}",
            last.0,
            last.1,
            lab.logs()
        );
    }
    // Deleting the Service withdraws both families.
    lab.remove_manifest("web.yaml")?;
    lab.wait_next_hops(PREFIX, &[], Duration::from_secs(3))?;
    wait_until("the IPv6 route withdrawn", Duration::from_secs(3), || {
        lab.bird_next_hops_v6(prefix_v6).is_ok_and(|h| h.is_empty())
            && lab.frr_next_hops_v6(prefix_v6).is_ok_and(|h| h.is_empty())
    })
    .with_context(|| {
        format!(
            "BIRD {:?}, FRR {:?}\n{}",
            lab.bird_next_hops_v6(prefix_v6),
            lab.frr_next_hops_v6(prefix_v6),
            lab.logs()
        )
    })?;
    Ok(())
}

/// A BGPPeer for the API (`xlb-system`, the agents' namespace), from the
/// lab's manifest, with `node_selector` if given.
fn api_peer(name: &str, address: Ipv4Addr, node_selector: Option<(&str, &str)>) -> Result<Value> {
    let mut peer: Value =
        serde_yaml::from_str(&BgpLab::peer_manifest(name, address, RESTART_TIME))?;
    peer["metadata"]["namespace"] = json!("xlb-system");
    if let Some((key, value)) = node_selector {
        peer["spec"]["nodeSelector"] = json!({ key: value });
    }
    Ok(peer)
}

/// A Secret of the agents' namespace with `password` under key `password`.
fn md5_secret(password: &str) -> Value {
    use k8s_openapi::{ByteString, api::core::v1::Secret};
    let mut secret = serde_json::to_value(Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some("bird-md5".into()),
            namespace: Some("xlb-system".into()),
            ..Default::default()
        },
        data: Some(
            [(
                "password".to_string(),
                ByteString(password.as_bytes().to_vec()),
            )]
            .into(),
        ),
        ..Secret::default()
    })
    .expect("a Secret serializes");
    secret["apiVersion"] = json!("v1");
    secret["kind"] = json!("Secret");
    secret
}

/// `--bgp` with the Kubernetes API: each agent peers with the BGPPeers of
/// its namespace that select its Node by label, signing with the TCP MD5
/// key of the Secret a BGPPeer names (BIRD requires it: a wrong key gets
/// no session, the right one does); a BGPPeer deleted closes its session
/// (the router withdraws at once); a wrong one is a Warning Event on it
/// and the other sessions stay up. deploy/rbac.yaml and rbac-bgp.yaml
/// allow all the agents ask for, and rbac-bgp.yaml grants nothing unused.
#[test]
fn peers_from_the_kubernetes_api_select_nodes_by_label_and_follow_their_objects() -> Result<()> {
    let mut lab = BgpLab::new()?;
    lab.bird_password = Some("s3cret".into());
    lab.start_bird()?;
    lab.start_frr()?;
    let api = FakeApi::start_in_netns(&lab.lan, SocketAddrV4::new(LAN_API_ADDR, 0).into())?;
    let kubeconfig = lab.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    // Only node a carries the label FRR's peer selects.
    for (i, addr) in [NODE_A, NODE_B].into_iter().enumerate() {
        let mut node = objects::to_json(&objects::dual_stack_node(
            &lab.node_names[i],
            addr,
            lan_v6(addr),
        ));
        if i == 0 {
            node["metadata"]["labels"] = json!({"rack": "frr"});
        }
        api.apply(node);
    }
    for object in serde_yaml::Deserializer::from_str(&service_manifest(
        &lab,
        false,
        &[(POD_A, 0), (POD_B, 1)],
    )) {
        api.apply(Value::deserialize(object)?);
    }
    let mut bird = api_peer("bird", BIRD_ADDR, None)?;
    bird["spec"]["passwordSecret"] = json!({"name": "bird-md5", "key": "password"});
    api.apply(bird);
    api.apply(md5_secret("not-the-key"));
    api.apply(api_peer("frr", FRR_ADDR, Some(("rack", "frr")))?);
    let kubeconfig = kubeconfig.to_string_lossy().into_owned();
    let source = ["--kubeconfig", kubeconfig.as_str(), "--bgp"];
    let _a = lab.start_agent_with(0, &source)?;
    let _b = lab.start_agent_with(1, &source)?;

    let hops = |frr: bool| {
        if frr {
            lab.frr_next_hops(PREFIX).unwrap_or_default()
        } else {
            lab.bird_next_hops(PREFIX).unwrap_or_default()
        }
    };
    // The wrong key: FRR's session comes up, BIRD's does not.
    wait_until("FRR via node a", Duration::from_secs(20), || {
        hops(true) == [NODE_A]
    })?;
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        hops(false).is_empty(),
        "BIRD took a session signed with the wrong key"
    );
    assert!(!lab.bird_established(0)?);
    // The right key: the sessions start again, signed with it.
    api.apply(md5_secret("s3cret"));
    wait_until(
        "BIRD via both nodes, FRR via node a only",
        Duration::from_secs(20),
        || hops(false) == [NODE_A, NODE_B] && hops(true) == [NODE_A],
    )?;
    // FRR never heard from node b: it is not configured there.
    assert_ne!(lab.frr_state(NODE_B)?, "Established");
    request(&lab).context("a request through BIRD")?;

    // A wrong BGPPeer: skipped, said so, nothing else moves.
    let mut bad = api_peer("bad", LIAR_ADDR, None)?;
    bad["spec"]["holdTime"] = json!(1);
    api.apply(bad);
    wait_until(
        "a Warning Event on BGPPeer bad",
        Duration::from_secs(10),
        || {
            api.list("events.k8s.io/v1", "Event").iter().any(|e| {
                e["regarding"]["kind"] == "BGPPeer"
                    && e["regarding"]["name"] == "bad"
                    && e["type"] == "Warning"
                    && e["note"].as_str().is_some_and(|n| n.contains("holdTime"))
            })
        },
    )?;
    assert_eq!(hops(false), [NODE_A, NODE_B]);
    assert_eq!(hops(true), [NODE_A]);

    // BIRD's BGPPeer goes: both sessions to BIRD close, and BIRD withdraws.
    api.delete("xlb.dev/v1alpha1", "BGPPeer", Some("xlb-system"), "bird");
    wait_until("BIRD to withdraw the route", Duration::from_secs(5), || {
        hops(false).is_empty()
    })?;
    assert_eq!(hops(true), [NODE_A]);

    let used = assert_deploy_rbac_allows(&api, &["rbac.yaml", "rbac-bgp.yaml"]);
    assert_all_granted_used(&["rbac-bgp.yaml"], &used, &[]);
    Ok(())
}

/// Pool mode: the Service's address comes from an AddressPool whose
/// `spec.bgp` sets communities and an aggregation length of 24, and both
/// routers have the /24 (not the /32) from both nodes, with the
/// communities (the pool's local preference goes to iBGP peers only: these
/// are eBGP; the UPDATE encoding is unit-tested).
#[test]
fn a_pools_communities_and_aggregate_reach_both_routers() -> Result<()> {
    const AGGREGATE: &str = "10.200.0.0/24";
    let lab = lab_with_routers(RESTART_TIME)?;
    lab.write_manifest(
        "pool.yaml",
        &format!(
            "apiVersion: xlb.dev/v1alpha1\nkind: AddressPool\nmetadata:\n  name: edge\nspec:\n\
             \x20 addresses: [{SERVICE}/32]\n  bgp:\n    communities: [\"64500:42\", no-export]\n\
             \x20   localPreference: 250\n    aggregationLength: 24\n"
        ),
    )?;
    // No address asked for: the pool gives its only one.
    let service = objects::service_in(
        objects::NAMESPACE,
        "web",
        None,
        &[("http", "TCP", SERVICE_PORT.into(), "8080")],
    );
    let slice = objects::endpoint_slice(
        "web",
        &[
            (POD_A, lab.node_names[0].as_str(), true),
            (POD_B, lab.node_names[1].as_str(), true),
        ],
        &[("http", "TCP", TARGET_PORT.into())],
    );
    lab.write_manifest(
        "web.yaml",
        &format!(
            "{}---\n{}",
            objects::to_yaml(&service),
            objects::to_yaml(&slice)
        ),
    )?;
    let manifests = lab.manifests().to_string_lossy().into_owned();
    let source = ["--manifests", manifests.as_str(), "--address-mode", "pool"];
    let _a = lab.start_agent_with(0, &source)?;
    let _b = lab.start_agent_with(1, &source)?;
    lab.wait_next_hops(AGGREGATE, &[NODE_A, NODE_B], Duration::from_secs(20))?;
    assert!(
        lab.bird_next_hops(PREFIX)?.is_empty(),
        "no host route besides"
    );

    let bird = lab.birdc(&["show", "route", AGGREGATE, "all"])?;
    assert_eq!(
        bird.matches("BGP.community: (64500,42) (65535,65281)")
            .count(),
        2,
        "both nodes' routes carry the pool's communities on BIRD:\n{bird}"
    );
    assert!(
        !bird.contains("BGP.local_pref: 250"),
        "eBGP: no LOCAL_PREF\n{bird}"
    );
    let frr: Value = serde_json::from_str(&lab.vtysh(&format!("show ip bgp {AGGREGATE} json"))?)?;
    let paths = frr["paths"].as_array().cloned().unwrap_or_default();
    assert_eq!(paths.len(), 2, "{frr}");
    for path in &paths {
        assert_eq!(path["community"]["string"], "64500:42 no-export", "{frr}");
    }
    request(&lab).context("a request through BIRD")?;
    Ok(())
}

/// A Service address whose frontend this node could not program (here its
/// service map is full: `--max-services 1`) is not announced: the node
/// would attract traffic it passes to a kernel that has no route for it.
/// The Service that fits is announced as usual.
#[test]
fn an_address_the_node_could_not_program_is_not_announced() -> Result<()> {
    const SECOND: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 11);
    let lab = lab_with(RESTART_TIME, false, &[(POD_A, 0), (POD_B, 1)])?;
    let second = objects::service(
        "second",
        SECOND,
        &[("http", "TCP", SERVICE_PORT.into(), "8080")],
    );
    lab.write_manifest("second.yaml", &objects::to_yaml(&second))?;
    let slice = objects::endpoint_slice(
        "second",
        &[(POD_A, lab.node_names[0].as_str(), true)],
        &[("http", "TCP", TARGET_PORT.into())],
    );
    lab.write_manifest("second-endpoints.yaml", &objects::to_yaml(&slice))?;
    let manifests = lab.manifests().to_string_lossy().into_owned();
    let source = ["--manifests", manifests.as_str(), "--max-services", "1"];
    let a = lab.start_agent_with(0, &source)?;
    let _b = lab.start_agent_with(1, &source)?;
    // 10.200.0.10 sorts first and takes the one service slot.
    lab.wait_next_hops(PREFIX, &[NODE_A, NODE_B], Duration::from_secs(20))?;
    wait_until(
        "node a to say the second failed",
        Duration::from_secs(10),
        || a.log_text().contains("programming failed"),
    )?;
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        lab.bird_next_hops("10.200.0.11/32")?.is_empty()
            && lab.frr_next_hops("10.200.0.11/32")?.is_empty(),
        "an address nobody programmed was announced"
    );
    Ok(())
}
