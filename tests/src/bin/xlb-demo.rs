//! `cargo xtask demo`: the reference topology in network namespaces, a few
//! Services as manifests, the real agent, real traffic, and what happened.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::Result;
use xlb_tests::{
    Topology,
    objects::{endpoint_slice, service, spec_mut, to_yaml},
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
    println!("done");
    Ok(())
}
