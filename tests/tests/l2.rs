//! L2 announcement end to end (issue 12): two nodes and two clients on one
//! bridge, Service addresses in the segment's subnet and no route to them
//! anywhere. The clients' own kernels resolve the addresses with ARP and
//! neighbour discovery (and `arping` as a second client), and every answer
//! comes from the xlb datapath of the node that announces the address.
//! Needs root.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddrV4, SocketAddrV6, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::NodeCondition;
use xlb_tests::{
    Agent, Reply,
    fake_api::FakeApi,
    in_netns, ns_sh,
    objects::{
        dual_stack_node, dual_stack_service, endpoint_slice, endpoint_slice_v6, spec_mut, to_json,
        to_yaml, to_yaml_documents,
    },
    parse_reply,
    rbac::{assert_all_granted_used, assert_deploy_rbac_allows},
    segment::{
        API_ADDR, NODE_ADDRS, NODE_ADDRS_V6, POD_ADDRS, POD_ADDRS_V6, POD_PORT, Segment,
        UNASSIGNED, VIP, VIP_V6,
    },
    tcp_request, tcp_request_v6, wait_until,
};

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the L2 tests need root (network namespaces, XDP)"
    );
}

/// The dual-stack Service `web` (VIP, VIP_V6 port 80) with one pod on each
/// node as its endpoints, in manifest form.
fn web_manifest(s: &Segment) -> String {
    let service = to_yaml(&dual_stack_service(
        "web",
        VIP,
        VIP_V6,
        &[("http", "TCP", 80, &POD_PORT.to_string())],
    ));
    let ports = [("http", "TCP", POD_PORT as i32)];
    let v4 = endpoint_slice(
        "web",
        &[
            (POD_ADDRS[0], &s.node_names[0], true),
            (POD_ADDRS[1], &s.node_names[1], true),
        ],
        &ports,
    );
    let v6 = endpoint_slice_v6(
        "web",
        &[
            (POD_ADDRS_V6[0], &s.node_names[0], true),
            (POD_ADDRS_V6[1], &s.node_names[1], true),
        ],
        &ports,
    );
    // The Nodes: their addresses are cluster networks, so a pod's reply to
    // the other node's SNAT address is not taken for a leak.
    let nodes: Vec<_> = (0..2)
        .map(|i| dual_stack_node(&s.node_names[i], NODE_ADDRS[i], NODE_ADDRS_V6[i]))
        .collect();
    format!(
        "{service}---\n{}---\n{}---\n{}",
        to_yaml_documents(&[v4]),
        to_yaml_documents(&[v6]),
        to_yaml_documents(&nodes)
    )
}

fn web() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, 80)
}

fn web_v6() -> SocketAddrV6 {
    SocketAddrV6::new(VIP_V6, 80, 0, 0)
}

#[test]
fn the_client_resolves_the_service_address_to_the_announcer_and_reaches_a_backend() -> Result<()> {
    require_root();
    let s = Segment::new()?;
    s.write_manifest("web.yaml", &web_manifest(&s))?;
    let manifests = s.manifests().to_string_lossy().into_owned();
    // Manifests: the node given --l2-announce announces what it programs;
    // the other programs the same Service and stays silent.
    let mut announcer = s.start_agent(0, &["--manifests", &manifests, "--l2-announce"])?;
    let _quiet = s.start_agent(1, &["--manifests", &manifests])?;
    let mac = s.node_mac(0)?;
    assert_ne!(mac, s.node_mac(1)?);

    s.flush_neighbours(&s.client)?;
    let reply = tcp_request(&s.client, web()).context("IPv4 request to the announced address")?;
    assert!(
        reply.backend == "pod-1" || reply.backend == "pod-2",
        "{reply:?}"
    );
    assert_eq!(
        s.neighbour(&s.client, &VIP.to_string())?,
        Some(mac.clone()),
        "the client's kernel resolved the address to the announcer"
    );
    let reply = tcp_request_v6(&s.client, web_v6()).context("IPv6 request")?;
    assert!(
        reply.backend == "pod-1" || reply.backend == "pod-2",
        "{reply:?}"
    );
    assert_eq!(
        s.neighbour(&s.client, &VIP_V6.to_string())?,
        Some(mac.clone()),
        "neighbour discovery resolved the IPv6 address to the announcer"
    );

    // A second client, with Debian's arping.
    assert_eq!(
        s.arping(&s.client2, VIP, Duration::from_secs(2))?,
        Some(mac.clone())
    );
    // An address in the subnet that no Service has is never answered.
    assert_eq!(
        s.arping(&s.client2, UNASSIGNED, Duration::from_secs(1))?,
        None
    );

    // What the announcer says about it.
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&s.xlb(0, &["inspect", "l2", "--json"])?)?;
    let addresses: Vec<&str> = rows
        .iter()
        .filter_map(|r| r.get("address").and_then(|a| a.as_str()))
        .collect();
    assert!(addresses.contains(&VIP.to_string().as_str()), "{rows:?}");
    assert!(addresses.contains(&VIP_V6.to_string().as_str()), "{rows:?}");
    assert!(
        rows.iter()
            .all(|r| r["interface"] == "uplink" && r["answering"] == true)
    );

    // Its agent stops: the address is answered no more (the agent silences
    // the responder on its way out; the pinned entries stay).
    announcer.stop()?;
    assert_eq!(s.arping(&s.client2, VIP, Duration::from_secs(1))?, None);
    Ok(())
}

#[test]
fn a_killed_agents_node_stops_answering_within_the_liveness_window() -> Result<()> {
    require_root();
    let s = Segment::new()?;
    s.write_manifest("web.yaml", &web_manifest(&s))?;
    let manifests = s.manifests().to_string_lossy().into_owned();
    let mut announcer = s.start_agent(0, &["--manifests", &manifests, "--l2-announce"])?;
    let mac = s.node_mac(0)?;
    assert_eq!(
        s.arping(&s.client2, VIP, Duration::from_secs(2))?,
        Some(mac)
    );
    // SIGKILL: nothing silences the responder, its liveness runs out.
    announcer.kill()?;
    let killed = Instant::now();
    wait_until(
        "the dead agent's node to stop answering ARP",
        Duration::from_secs(3),
        || matches!(s.arping(&s.client2, VIP, Duration::from_secs(1)), Ok(None)),
    )?;
    let silent_after = killed.elapsed();
    assert!(
        silent_after < Duration::from_millis(2600),
        "answered for {silent_after:?} after the agent died"
    );
    Ok(())
}

/// One request on a new TCP connection whose connect gives up after
/// `timeout` (one SYN).
fn quick_request(ns: &str, to: SocketAddrV4, timeout: Duration) -> Result<Reply> {
    let stream = in_netns(ns, move || TcpStream::connect_timeout(&to.into(), timeout))??;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut writer = stream.try_clone()?;
    writer.write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    parse_reply(&line)
}

/// A Node that is Ready, as the kubelet reports it.
fn ready_node(s: &Segment, i: usize) -> serde_json::Value {
    let mut node = dual_stack_node(&s.node_names[i], NODE_ADDRS[i], NODE_ADDRS_V6[i]);
    node.status.get_or_insert_default().conditions = Some(vec![NodeCondition {
        type_: "Ready".into(),
        status: "True".into(),
        ..NodeCondition::default()
    }]);
    to_json(&node)
}

/// The fake API server on the segment with `web` (endpoints on the nodes
/// in `endpoints_on`, `Local` policy when asked) and both Nodes Ready; the
/// kubeconfig path.
fn cluster(s: &Segment, local: bool, endpoints_on: &[usize]) -> Result<(FakeApi, String)> {
    let api = FakeApi::start_in_netns(&s.lan, SocketAddrV4::new(API_ADDR, 0).into())?;
    let kubeconfig = s.dir().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let mut service = dual_stack_service(
        "web",
        VIP,
        VIP_V6,
        &[("http", "TCP", 80, &POD_PORT.to_string())],
    );
    if local {
        spec_mut(&mut service).external_traffic_policy = Some("Local".into());
    }
    api.apply(to_json(&service));
    apply_endpoints(s, &api, endpoints_on);
    for i in 0..2 {
        api.apply(ready_node(s, i));
    }
    Ok((api, kubeconfig.to_string_lossy().into_owned()))
}

fn apply_endpoints(s: &Segment, api: &FakeApi, on: &[usize]) {
    let ports = [("http", "TCP", POD_PORT as i32)];
    let v4: Vec<_> = on
        .iter()
        .map(|&i| (POD_ADDRS[i], s.node_names[i].as_str(), true))
        .collect();
    api.apply(to_json(&endpoint_slice("web", &v4, &ports)));
}

/// The addresses node `i`'s responder answers for (`xlb inspect l2`).
fn held(s: &Segment, i: usize) -> Result<Vec<String>> {
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&s.xlb(i, &["inspect", "l2", "--json"])?)?;
    Ok(rows
        .iter()
        .filter_map(|r| r["address"].as_str().map(str::to_string))
        .collect())
}

/// Waits until each Service address is held by exactly one node, the same
/// one for 1.5 s (both agents know each other then: until an agent has
/// seen the other's Lease it holds everything, and the second to start
/// claims its share a moment after it is ready). Returns the index of the
/// node holding [`VIP`].
fn settled_holder(s: &Segment) -> Result<usize> {
    type Holders = (Vec<String>, Vec<String>);
    let mut since: Option<(Instant, Holders)> = None;
    let mut holder = 0;
    wait_until(
        "each address on exactly one node, for 1.5 s",
        Duration::from_secs(15),
        || {
            let (Ok(mut first), Ok(mut second)) = (held(s, 0), held(s, 1)) else {
                return false;
            };
            first.sort();
            second.sort();
            let once =
                |a: String| (first.contains(&a) as usize) + (second.contains(&a) as usize) == 1;
            if !(once(VIP.to_string()) && once(VIP_V6.to_string())) {
                since = None;
                return false;
            }
            holder = if first.contains(&VIP.to_string()) {
                0
            } else {
                1
            };
            let now = (first, second);
            match &since {
                Some((at, seen)) if *seen == now => at.elapsed() >= Duration::from_millis(1500),
                _ => {
                    since = Some((Instant::now(), now));
                    false
                }
            }
        },
    )?;
    Ok(holder)
}

/// Both nodes' agents on the fake API with `--l2-announce`, a Cluster
/// policy Service with an endpoint on each node, and the nodes' MACs.
fn both_announcing(s: &Segment) -> Result<(FakeApi, [Agent; 2], [String; 2])> {
    let (api, kubeconfig) = cluster(s, false, &[0, 1])?;
    let args = ["--kubeconfig", kubeconfig.as_str(), "--l2-announce"];
    let agents = [s.start_agent(0, &args)?, s.start_agent(1, &args)?];
    let macs = [s.node_mac(0)?, s.node_mac(1)?];
    Ok((api, agents, macs))
}

/// Which node's MAC answers `arping` for VIP now (index), if any.
fn answering(s: &Segment, macs: &[String; 2]) -> Option<usize> {
    let mac = s
        .arping(&s.client2, VIP, Duration::from_secs(1))
        .ok()
        .flatten()?;
    macs.iter().position(|m| *m == mac)
}

#[test]
fn the_address_moves_to_the_other_node_within_3s_when_its_announcer_dies() -> Result<()> {
    require_root();
    let s = Segment::new()?;
    let (api, mut agents, macs) = both_announcing(&s)?;
    // Each address is held by exactly one node (each is elected on its
    // own: the IPv6 one may be on either).
    let held = |i: usize| held(&s, i);
    let dead = settled_holder(&s)?;
    let survivor = 1 - dead;
    assert_eq!(answering(&s, &macs), Some(dead), "arping names the holder");
    // Only the survivor's pod serves from here on, so that every new
    // connection after the failover has a live backend.
    apply_endpoints(&s, &api, &[survivor]);
    let survivor_pod = if survivor == 0 { "pod-1" } else { "pod-2" };
    s.flush_neighbours(&s.client)?;
    wait_until("the endpoint change", Duration::from_secs(10), || {
        tcp_request(&s.client, web()).is_ok_and(|r| r.backend == survivor_pod)
    })?;
    assert_eq!(
        s.neighbour(&s.client, &VIP.to_string())?,
        Some(macs[dead].clone())
    );

    // The announcing node dies: its agent is killed and its uplink goes
    // down (a kernel that keeps forwarding from pinned maps would answer
    // the client otherwise). The client still has the dead node's MAC.
    agents[dead].kill()?;
    ns_sh(&s.nodes[dead], &["ip", "link", "set", "uplink", "down"])?;
    let died = Instant::now();
    let mut attempts = 0;
    // New connections every 200 ms (each its own SYN), as a client
    // retrying would.
    let reply = loop {
        attempts += 1;
        match quick_request(&s.client, web(), Duration::from_millis(200)) {
            Ok(reply) => break reply,
            Err(_) if died.elapsed() < Duration::from_secs(10) => continue,
            Err(e) => return Err(e.context("no new connection 10 s after the announcer died")),
        }
    };
    let failover = died.elapsed();
    println!(
        "failover: a new connection succeeded {failover:?} after the announcer died ({attempts} attempts)"
    );
    assert!(
        failover < Duration::from_secs(3),
        "failover took {failover:?} (default settings: 2 s node Lease)"
    );
    assert_eq!(reply.backend, survivor_pod);
    // The survivor answers for the address within the same 3 s, and the
    // client's entry follows its gratuitous ARP.
    let left = Duration::from_secs(3)
        .saturating_sub(died.elapsed())
        .max(Duration::from_millis(200));
    wait_until("the survivor to hold the address", left, || {
        held(survivor).is_ok_and(|h| h.contains(&VIP.to_string()))
    })?;
    wait_until(
        "the gratuitous ARP to move the client's entry",
        Duration::from_secs(1),
        || s.neighbour(&s.client, &VIP.to_string()).ok().flatten() == Some(macs[survivor].clone()),
    )?;
    // The Service says who announces it: an Event from each taker.
    let survivor_name = s.node_names[survivor].clone();
    wait_until(
        "the survivor's L2Announcing Event",
        Duration::from_secs(5),
        || {
            api.list("events.k8s.io/v1", "Event").iter().any(|e| {
                e["reason"] == "L2Announcing"
                    && e["regarding"]["name"] == "web"
                    && e["note"]
                        .as_str()
                        .is_some_and(|n| n.contains(&survivor_name) && n.contains(&VIP.to_string()))
            })
        },
    )?;
    Ok(())
}

/// An announcer whose agent stalls longer than the node Lease (SIGSTOP:
/// CPU starvation, a frozen cgroup) loses the address to the other node,
/// which moves the clients; when it runs again it is the address's
/// announcer again, and it moves the clients back at once, not when their
/// neighbour entries expire (tens of seconds later).
#[test]
fn a_stalled_announcer_takes_its_address_and_its_clients_back() -> Result<()> {
    require_root();
    let s = Segment::new()?;
    let (api, mut agents, macs) = both_announcing(&s)?;
    let holds = |i: usize| held(&s, i).is_ok_and(|h| h.contains(&VIP.to_string()));
    let client_mac = || s.neighbour(&s.client, &VIP.to_string()).ok().flatten();
    let holder = settled_holder(&s)?;
    let other = 1 - holder;
    s.flush_neighbours(&s.client)?;
    tcp_request(&s.client, web())?;
    assert_eq!(client_mac(), Some(macs[holder].clone()));

    agents[holder].pause(true)?;
    let taken = wait_until(
        "the other node to take over",
        Duration::from_secs(5),
        || holds(other) && client_mac() == Some(macs[other].clone()),
    );
    agents[holder].pause(false)?;
    taken?;
    tcp_request(&s.client, web())?;

    // Back: the address returns to its announcer (same election), and so
    // do the clients.
    wait_until(
        "the announcer to hold the address again",
        Duration::from_secs(5),
        || holds(holder) && !holds(other),
    )?;
    wait_until(
        "the client's entry to move back",
        Duration::from_secs(2),
        || client_mac() == Some(macs[holder].clone()),
    )?;
    let reply = tcp_request(&s.client, web())?;
    assert!(reply.backend.starts_with("pod-"));

    // deploy/rbac.yaml and rbac-l2.yaml allow everything the agents asked
    // for, and rbac-l2.yaml grants nothing unused (an agent that stops
    // deletes its Lease).
    agents[other].stop()?;
    let used = assert_deploy_rbac_allows(&api, &["rbac.yaml", "rbac-l2.yaml"]);
    assert_all_granted_used(&["rbac-l2.yaml"], &used, &[]);
    Ok(())
}

#[test]
fn with_local_policy_the_node_with_the_endpoint_announces() -> Result<()> {
    require_root();
    let s = Segment::new()?;
    let (api, kubeconfig) = cluster(&s, true, &[1])?;
    let args = ["--kubeconfig", kubeconfig.as_str(), "--l2-announce"];
    let _agents = [s.start_agent(0, &args)?, s.start_agent(1, &args)?];
    let macs = [s.node_mac(0)?, s.node_mac(1)?];
    wait_until(
        "node 2 (the endpoint's) to announce",
        Duration::from_secs(10),
        || answering(&s, &macs) == Some(1),
    )?;
    let reply = tcp_request(&s.client, web())?;
    assert_eq!(reply.backend, "pod-2");
    // The endpoint moves to node 1: so does the announcement.
    apply_endpoints(&s, &api, &[0]);
    wait_until("node 1 to announce", Duration::from_secs(10), || {
        answering(&s, &macs) == Some(0)
    })?;
    s.flush_neighbours(&s.client)?;
    let reply = tcp_request(&s.client, web())?;
    assert_eq!(reply.backend, "pod-1");
    assert_eq!(
        s.neighbour(&s.client, &VIP.to_string())?,
        Some(macs[0].clone())
    );
    Ok(())
}
