//! `cargo xtask demo`: the reference topology in network namespaces, a few
//! Services as manifests, the real agent, real traffic, and what happened;
//! then an address from a pool answered with ARP on an L2 segment, and a
//! route announced to a BIRD router over BGP.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::Result;
use xlb_tests::{
    Topology,
    bgp_lab::{BIRD_ADDR, BgpLab, POD_A, POD_B, ROUTER_ASN, SERVICE_PORT, TARGET_PORT},
    objects::{NAMESPACE, endpoint_slice, service, service_in, spec_mut, to_yaml},
    segment::{POD_ADDRS, Segment},
    tcp_request, udp_request, wait_until,
};

const WEB: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const DNS: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 11);
const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 12);

fn main() -> Result<()> {
    println!("== building the topology: client -> node (xlb) -> pod-a, pod-b; node2 -> pod-c");
    let t = Topology::new()?;
    t.start_servers(&[8080])?;
    t.write_manifest("nodes.yaml", &t.nodes_manifest())?;
    let all: Vec<(Ipv4Addr, &str, bool)> = t
        .pods
        .iter()
        .map(|p| (p.addr, t.node_of(p), true))
        .collect();
    let services: [(&str, Ipv4Addr, &str, i32, bool); 3] = [
        ("web", WEB, "TCP", 80, false),
        ("dns", DNS, "UDP", 53, false),
        ("local", LOCAL, "TCP", 80, true),
    ];
    for (name, ip, proto, port, local) in services {
        let mut object = service(name, ip, &[("p", proto, port, "8080")]);
        if local {
            spec_mut(&mut object).external_traffic_policy = Some("Local".into());
        }
        let text = to_yaml(&object);
        println!(
            "-- manifest {name}.yaml ({proto} {ip}:{port} -> :8080{})",
            if local {
                ", externalTrafficPolicy: Local"
            } else {
                ""
            }
        );
        t.write_manifest(&format!("{name}.yaml"), &text)?;
        t.write_manifest(
            &format!("{name}-endpoints.yaml"),
            &to_yaml(&endpoint_slice(name, &all, &[("p", proto, 8080)])),
        )?;
    }
    println!(
        "== starting `xlb agent --iface uplink,n2 --node-name {}`",
        t.node_name
    );
    let agent = t.start_agent()?;
    wait_until("backends programmed", Duration::from_secs(5), || {
        t.inspect("backends").map(|b| b.len() == 8).unwrap_or(false)
    })?;

    for (label, to, udp, n) in [
        (
            "TCP web 10.200.0.10:80 (Cluster)",
            SocketAddrV4::new(WEB, 80),
            false,
            30,
        ),
        (
            "UDP dns 10.200.0.11:53 (Cluster)",
            SocketAddrV4::new(DNS, 53),
            true,
            30,
        ),
        (
            "TCP local 10.200.0.12:80 (Local)",
            SocketAddrV4::new(LOCAL, 80),
            false,
            20,
        ),
    ] {
        println!("\n== {n} requests to {label}");
        let mut per_backend: BTreeMap<String, (usize, String)> = BTreeMap::new();
        for i in 0..n {
            let r = if udp {
                udp_request(&t.client, to)?
            } else {
                tcp_request(&t.client, to)?
            };
            if i < 6 {
                println!(
                    "   request {i:>2}: answered by {:<6} which saw source {}",
                    r.backend, r.peer
                );
            }
            let e = per_backend.entry(r.backend).or_insert((0, String::new()));
            e.0 += 1;
            e.1 = r.peer.ip().to_string();
        }
        for (backend, (count, peer)) in per_backend {
            println!("   {backend}: {count:>3} answers, source seen {peer}");
        }
    }
    println!("\n== xlb inspect services");
    print!("{}", t.xlb(&["inspect", "services"])?);
    println!("\n== xlb inspect stats");
    print!("{}", t.xlb(&["inspect", "stats"])?);
    drop(agent);
    println!("\n== removing everything the demo created");
    drop(t);
    pools_and_arp()?;
    bgp_to_bird()?;
    println!("done");
    Ok(())
}

/// Part 2: an address from an AddressPool, announced with ARP answered in
/// XDP, on a plain L2 segment with no route to the Service address.
fn pools_and_arp() -> Result<()> {
    println!(
        "\n== part 2: addresses of its own: a bridge with a client and two nodes; no route to 10.0.5.0/24 but the segment itself"
    );
    let mut s = Segment::new()?;
    let pool = "apiVersion: xlb.dev/v1alpha1\nkind: AddressPool\nmetadata:\n  name: lan\n\
                spec:\n  addresses: [10.0.5.100-10.0.5.110]\n";
    println!("-- manifest pool.yaml (AddressPool lan: 10.0.5.100-10.0.5.110)");
    s.write_manifest("pool.yaml", pool)?;
    let mut web = service_in(NAMESPACE, "web", None, &[("http", "TCP", 80, "8080")]);
    spec_mut(&mut web).load_balancer_ip = None;
    println!("-- manifest web.yaml (type LoadBalancer, no address asked for)");
    s.write_manifest("web.yaml", &to_yaml(&web))?;
    let pods: Vec<(Ipv4Addr, &str, bool)> = (0..2)
        .map(|i| (POD_ADDRS[i], s.node_names[i].as_str(), true))
        .collect();
    s.write_manifest(
        "web-endpoints.yaml",
        &to_yaml(&endpoint_slice("web", &pods, &[("http", "TCP", 8080)])),
    )?;
    let manifests = s.manifests().to_string_lossy().into_owned();
    println!("== starting `xlb agent --address-mode pool --l2-announce` on node 1");
    let _agent = s.start_agent(
        0,
        &[
            "--manifests",
            &manifests,
            "--address-mode",
            "pool",
            "--l2-announce",
        ],
    )?;
    wait_until("an address from the pool", Duration::from_secs(10), || {
        s.xlb(0, &["inspect", "l2", "--json"])
            .is_ok_and(|out| out.contains("10.0.5.100"))
    })?;
    println!("\n== xlb inspect services (the address came from the pool)");
    print!("{}", s.xlb(0, &["inspect", "services"])?);
    println!("\n== xlb inspect l2 (what node 1 answers ARP/NDP for)");
    print!("{}", s.xlb(0, &["inspect", "l2"])?);
    println!("\n== the client: arping 10.0.5.100, then 10 requests to 10.0.5.100:80");
    let mac = s.arping(
        &s.client,
        Ipv4Addr::new(10, 0, 5, 100),
        Duration::from_secs(2),
    )?;
    println!(
        "   arping: answered by {} (node 1's uplink is {})",
        mac.as_deref().unwrap_or("nobody"),
        s.node_mac(0)?
    );
    let to = SocketAddrV4::new(Ipv4Addr::new(10, 0, 5, 100), 80);
    let mut answered: std::collections::BTreeMap<String, usize> = Default::default();
    for _ in 0..10 {
        *answered
            .entry(tcp_request(&s.client, to)?.backend)
            .or_default() += 1;
    }
    for (backend, n) in &answered {
        println!("   {backend} (on node {}): {n}", &backend[4..]);
    }
    println!(
        "   ip neigh on the client: {}",
        s.neighbour(&s.client, "10.0.5.100")?
            .unwrap_or_else(|| "no entry".into())
    );
    let unassigned = s.arping(
        &s.client,
        Ipv4Addr::new(10, 0, 5, 200),
        Duration::from_secs(1),
    )?;
    println!(
        "   arping 10.0.5.200 (in the subnet, no Service): {}",
        unassigned.as_deref().unwrap_or("no answer")
    );
    s.quiet();
    Ok(())
}

/// Part 3: the same Service address announced over BGP by two nodes to a
/// BIRD router, which routes a client's connections over both (ECMP).
fn bgp_to_bird() -> Result<()> {
    println!(
        "\n== part 3: BGP: two nodes peer with a BIRD router; a client sits behind the router"
    );
    let mut lab = BgpLab::new()?;
    lab.start_bird()?;
    lab.write_manifest("nodes.yaml", &lab.nodes_manifest())?;
    println!("-- manifest peers.yaml (BGPPeer bird: {BIRD_ADDR}, AS {ROUTER_ASN})");
    lab.write_manifest("peers.yaml", &BgpLab::peer_manifest("bird", BIRD_ADDR, 60))?;
    let service = service(
        "web",
        Ipv4Addr::new(10, 200, 0, 10),
        &[("http", "TCP", SERVICE_PORT.into(), "8080")],
    );
    let slice = endpoint_slice(
        "web",
        &[
            (POD_A, lab.node_names[0].as_str(), true),
            (POD_B, lab.node_names[1].as_str(), true),
        ],
        &[("http", "TCP", TARGET_PORT.into())],
    );
    println!("-- manifest web.yaml (10.200.0.10:80, a pod on each node)");
    lab.write_manifest(
        "web.yaml",
        &format!("{}---\n{}", to_yaml(&service), to_yaml(&slice)),
    )?;
    println!("== starting an agent on each node");
    let _a = lab.start_agent(0)?;
    let _b = lab.start_agent(1)?;
    wait_until(
        "BIRD learns the route from both nodes",
        Duration::from_secs(30),
        || {
            lab.bird_next_hops("10.200.0.10/32")
                .is_ok_and(|hops| hops.len() == 2)
        },
    )?;
    println!("\n== birdc show route for 10.200.0.10/32 all");
    print!(
        "{}",
        lab.birdc(&["show", "route", "for", "10.200.0.10/32", "all"])?
    );
    println!("\n== xlb inspect bgp (node a)");
    let sessions = lab.inspect_bgp(0)?;
    for s in &sessions {
        println!(
            "   peer {} state {} prefixes {}",
            s["peer"], s["state"], s["announced_prefixes"]
        );
    }
    println!("\n== 12 requests from the client behind BIRD to 10.200.0.10:80");
    let mut seen = BTreeMap::new();
    for _ in 0..12 {
        let r = tcp_request(
            &lab.client,
            SocketAddrV4::new(Ipv4Addr::new(10, 200, 0, 10), 80),
        )?;
        *seen
            .entry(format!("{} (seen from {})", r.backend, r.peer.ip()))
            .or_insert(0) += 1;
    }
    for (what, n) in seen {
        println!("   {what}: {n}");
    }
    println!("\n== removing the Service: BIRD withdraws the route");
    lab.remove_manifest("web.yaml")?;
    wait_until("the route withdrawn", Duration::from_secs(5), || {
        lab.bird_next_hops("10.200.0.10/32")
            .is_ok_and(|hops| hops.is_empty())
    })?;
    println!("   BIRD has no route to 10.200.0.10/32 any more");
    Ok(())
}
