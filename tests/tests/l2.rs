//! L2 announcement end to end (issue 12): two nodes and two clients on one
//! bridge, Service addresses in the segment's subnet and no route to them
//! anywhere. The clients' own kernels resolve the addresses with ARP and
//! neighbour discovery (and `arping` as a second client), and every answer
//! comes from the xlb datapath of the node that announces the address.
//! Needs root.

use std::{
    net::{SocketAddrV4, SocketAddrV6},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use xlb_tests::{
    objects::{
        dual_stack_node, dual_stack_service, endpoint_slice, endpoint_slice_v6, to_yaml,
        to_yaml_documents,
    },
    segment::{
        NODE_ADDRS, NODE_ADDRS_V6, POD_ADDRS, POD_ADDRS_V6, POD_PORT, Segment, UNASSIGNED, VIP,
        VIP_V6,
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
