//! The real `xlb_xdp` program on crafted frames (BPF_PROG_TEST_RUN, through
//! aya's `TestRun`): every
//! malformed or unsupported packet is passed untouched or dropped and
//! counted, never mis-translated; valid ones come out with correct
//! checksums. Needs root (loads the program).

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    programs::{SchedClassifier, Xdp},
};
use lb_common::{
    Be16, CONFIG_F_POD_SOURCE_GUARD, CONFIG_F_REVERSE_PATH, Config, FAMILY_V4, FLOW_F_ACKED,
    FLOW_F_ANSWERED, FLOW_F_CLOSING, FLOW_F_RESET, Flow, FlowKey, GlobalStats, ServiceStats,
};
use xlb::{
    conntrack::Timeouts,
    dataplane::{self, Limits, Maps, PinDir},
    egress_guard::EgressGuard,
    model::{Backend, DesiredState, Frontend, FrontendSpec, Network, Protocol, ServiceRef},
    reconcile::{Reconciler, frontend_key},
};
use xlb_tests::packet::{
    FrameSpec, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, TestRunSpec, checksum, fragments, frame,
    icmp_frame, pseudo_checksum, test_run, test_run_tc, with_ip_id,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const FRONTEND: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const CLIENT2: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 8);
const FRONTEND2: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 11);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 2);
const REMOTE2: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 3);
const NODE: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
/// FRONTEND's TCP port served by REMOTE (source-translated).
const SNAT_PORT: u16 = 90;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The datapath loaded, redirect off, with:
/// - TCP and UDP FRONTEND:80 → BACKEND:8080 (node-local, so no SNAT);
/// - TCP FRONTEND2:80 → the same BACKEND:8080 (a second frontend of it);
/// - TCP FRONTEND:90 → REMOTE:8080 (on another node: SNAT to 10.0.1.1).
struct Datapath {
    pins: PinDir,
    maps: Maps,
    ebpf: Ebpf,
    reconciler: Reconciler,
    desired: DesiredState,
}

fn frontend_spec(backend: Ipv4Addr, local: bool) -> FrontendSpec {
    FrontendSpec {
        service: ServiceRef {
            namespace: "t".into(),
            name: "web".into(),
            port_name: String::new(),
        },
        backends: vec![Backend {
            addr: IpAddr::V4(backend),
            port: 8080,
            local,
            terminating: false,
        }],
        local_only: false,
        affinity_timeout: None,
        source_ranges: vec![],
    }
}

fn frontend(addr: Ipv4Addr, port: u16, protocol: Protocol) -> Frontend {
    Frontend {
        addr: IpAddr::V4(addr),
        port,
        protocol,
    }
}

impl Datapath {
    fn new() -> Result<Self> {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "packet tests need root");
        let bpffs = std::path::Path::new("/sys/fs/bpf");
        dataplane::ensure_bpffs(bpffs)?;
        let node = format!(
            "pkt{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let pins = PinDir::new(bpffs, &node);
        let limits = Limits {
            max_services: 16,
            max_backends: 64,
            max_flows: 1024,
        };
        let mut ebpf = dataplane::load(&pins, limits)?;
        let mut maps = Maps::take(&mut ebpf)?;
        maps.write_config(&Config {
            node_addr: lb_common::addr_v4(NODE.octets()),
            snat_port_min: 32768,
            snat_port_max: 60999,
            flags: 0,
            ..Config::default()
        })?;
        let mut desired = DesiredState::default();
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            desired.frontends.insert(
                frontend(FRONTEND, 80, protocol),
                frontend_spec(BACKEND, true),
            );
        }
        desired.frontends.insert(
            frontend(FRONTEND2, 80, Protocol::Tcp),
            frontend_spec(BACKEND, true),
        );
        desired.frontends.insert(
            frontend(FRONTEND, SNAT_PORT, Protocol::Tcp),
            frontend_spec(REMOTE, false),
        );
        let mut dp = Datapath {
            pins,
            maps,
            ebpf,
            reconciler: Reconciler::new(limits.max_services, limits.max_backends),
            desired,
        };
        dp.apply()?;
        Ok(dp)
    }

    fn apply(&mut self) -> Result<()> {
        let summary = self.reconciler.apply(&self.desired, &mut self.maps);
        anyhow::ensure!(summary.errors.is_empty(), "{:?}", summary.errors);
        Ok(())
    }

    /// The `FLOWS` entry of a TCP tuple, if any.
    fn flow(&self, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Option<Flow> {
        self.maps.flows.get(&tcp_key(src, dst), 0).ok()
    }

    /// Runs the program once on `frame`: (verdict, frame as it left).
    fn run(&self, input: &[u8]) -> Result<(u32, Vec<u8>)> {
        let program: &Xdp = self
            .ebpf
            .program("xlb_xdp")
            .context("xlb_xdp")?
            .try_into()?;
        let outcome = test_run(program, input, TestRunSpec::ONCE)?;
        Ok((outcome.verdict, outcome.frame))
    }

    /// Runs the tcx egress program once on `frame`: (return value, frame
    /// as it left).
    fn run_egress(&self, input: &[u8]) -> Result<(i32, Vec<u8>)> {
        let program: &SchedClassifier = self
            .ebpf
            .program("xlb_tc_egress")
            .context("xlb_tc_egress")?
            .try_into()?;
        test_run_tc(program, input)
    }

    fn stats(&self, protocol: Protocol) -> Result<ServiceStats> {
        self.stats_of(&frontend(FRONTEND, 80, protocol))
    }

    fn stats_of(&self, frontend: &Frontend) -> Result<ServiceStats> {
        let key = frontend_key(frontend)?;
        let service = self.maps.services.get(&key, 0)?;
        self.maps.service_stats(service.service_id)
    }

    fn global(&self) -> Result<GlobalStats> {
        self.maps.global_stats()
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        let _ = dataplane::attach::reset(&self.pins);
    }
}

/// A UDP datagram from CLIENT to FRONTEND:80, to adjust.
fn spec() -> FrameSpec {
    FrameSpec::new(CLIENT, FRONTEND)
}

/// Checks an IPv4 packet at `l3` the way a receiving kernel would: header
/// checksum, then the L4 checksum over the pseudo-header (UDP 0 = none).
fn assert_checksums_valid(f: &[u8], l3: usize) {
    let ihl = (f[l3] & 0x0f) as usize * 4;
    assert_eq!(checksum(&f[l3..l3 + ihl]), 0, "IPv4 header checksum");
    let proto = f[l3 + 9];
    let total = u16::from_be_bytes([f[l3 + 2], f[l3 + 3]]) as usize;
    let l4 = &f[l3 + ihl..l3 + total];
    let src = Ipv4Addr::new(f[l3 + 12], f[l3 + 13], f[l3 + 14], f[l3 + 15]);
    let dst = Ipv4Addr::new(f[l3 + 16], f[l3 + 17], f[l3 + 18], f[l3 + 19]);
    if proto == 17 && l4[6] == 0 && l4[7] == 0 {
        return;
    }
    assert_eq!(
        pseudo_checksum(&src, &dst, proto, l4),
        0,
        "L4 checksum (protocol {proto})"
    );
}

fn src_of(f: &[u8], l3: usize) -> (Ipv4Addr, u16) {
    let ihl = (f[l3] & 0x0f) as usize * 4;
    (
        Ipv4Addr::new(f[l3 + 12], f[l3 + 13], f[l3 + 14], f[l3 + 15]),
        u16::from_be_bytes([f[l3 + ihl], f[l3 + ihl + 1]]),
    )
}

/// The `FLOWS` key of a TCP packet from `src` to `dst`.
fn tcp_key(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> FlowKey {
    FlowKey {
        src_addr: lb_common::addr_v4(src.0.octets()),
        dst_addr: lb_common::addr_v4(dst.0.octets()),
        src_port: Be16::from_host(src.1),
        dst_port: Be16::from_host(dst.1),
        proto: 6,
        family: FAMILY_V4,
        _pad: [0; 2],
    }
}

/// A TCP segment without payload from `src` to `dst` with `flags`.
fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Vec<u8> {
    frame(&FrameSpec {
        proto: 6,
        sport: src.1,
        dport: dst.1,
        tcp_flags: flags,
        payload: 0,
        ..FrameSpec::new(src.0, dst.0)
    })
}

fn dst_of(f: &[u8], l3: usize) -> (Ipv4Addr, u16) {
    let ihl = (f[l3] & 0x0f) as usize * 4;
    (
        Ipv4Addr::new(f[l3 + 16], f[l3 + 17], f[l3 + 18], f[l3 + 19]),
        u16::from_be_bytes([f[l3 + ihl + 2], f[l3 + ihl + 3]]),
    )
}

#[test]
fn valid_tcp_and_udp_are_translated_with_correct_checksums() -> Result<()> {
    let dp = Datapath::new()?;
    for proto in [6u8, 17] {
        let input = frame(&FrameSpec {
            proto,
            payload: 33,
            ..spec()
        });
        assert_checksums_valid(&input, 14);
        let (verdict, out) = dp.run(&input)?;
        assert_eq!(
            verdict, XDP_PASS,
            "translated, handed to the kernel (redirect off)"
        );
        assert_eq!(dst_of(&out, 14), (BACKEND, 8080), "protocol {proto}");
        assert_checksums_valid(&out, 14);
    }
    Ok(())
}

#[test]
fn vlan_tagged_packet_is_translated_and_keeps_its_tag() -> Result<()> {
    let dp = Datapath::new()?;
    let input = frame(&FrameSpec {
        vlan: Some(42),
        ..spec()
    });
    let (verdict, out) = dp.run(&input)?;
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(&out[12..16], &[0x81, 0x00, 0, 42]);
    assert_eq!(dst_of(&out, 18), (BACKEND, 8080));
    assert_checksums_valid(&out, 18);
    Ok(())
}

#[test]
fn udp_without_checksum_keeps_zero() -> Result<()> {
    let dp = Datapath::new()?;
    let input = frame(&FrameSpec {
        udp_checksum: false,
        ..spec()
    });
    let (_, out) = dp.run(&input)?;
    assert_eq!(dst_of(&out, 14), (BACKEND, 8080));
    assert_eq!(
        &out[14 + 20 + 6..14 + 20 + 8],
        &[0, 0],
        "UDP checksum 0 must stay 0"
    );
    assert_checksums_valid(&out, 14);
    Ok(())
}

#[test]
fn ip_options_for_a_frontend_are_dropped_and_counted() -> Result<()> {
    let dp = Datapath::new()?;
    let before = dp.stats(Protocol::Udp)?.drop_unsupported;
    for spec in [
        FrameSpec {
            options: 4,
            ..spec()
        },
        // A first fragment with options as well.
        FrameSpec {
            options: 8,
            frag: 0x2000,
            ..spec()
        },
    ] {
        let input = frame(&spec);
        let (verdict, _) = dp.run(&input)?;
        assert_eq!(verdict, XDP_DROP);
    }
    assert_eq!(dp.stats(Protocol::Udp)?.drop_unsupported - before, 2);
    Ok(())
}

#[test]
fn malformed_and_foreign_packets_pass_untouched() -> Result<()> {
    let dp = Datapath::new()?;
    let valid = frame(&spec());
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("Ethernet header only", valid[..14].to_vec()),
        ("IPv4 header cut short", valid[..14 + 12].to_vec()),
        ("UDP header cut short", valid[..14 + 20 + 4].to_vec()),
        (
            "TCP header cut short",
            frame(&FrameSpec { proto: 6, ..spec() })[..14 + 20 + 10].to_vec(),
        ),
        (
            "later fragment",
            frame(&FrameSpec {
                frag: 0x0010,
                ..spec()
            }),
        ),
        (
            "other port on the frontend address",
            frame(&FrameSpec {
                dport: 81,
                ..spec()
            }),
        ),
        (
            "not a frontend address",
            frame(&FrameSpec {
                dst: Ipv4Addr::new(10, 200, 0, 99),
                ..spec()
            }),
        ),
    ];
    let mut bad_ihl = valid.clone();
    bad_ihl[14] = 0x44; // IHL 4 < 5
    cases.push(("IHL below 5", bad_ihl));
    let mut icmp = valid.clone();
    icmp[14 + 9] = 1;
    cases.push(("ICMP to the frontend", icmp));
    let mut arp = valid[..42].to_vec();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    cases.push(("ARP", arp));
    let mut ipv6 = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x86, 0xdd, 0x60];
    ipv6.resize(14 + 40 + 8, 0);
    cases.push(("IPv6", ipv6));

    let malformed_before = dp.global()?.malformed;
    for (what, input) in &cases {
        let (verdict, out) = dp.run(input)?;
        assert_eq!(verdict, XDP_PASS, "{what}: must be passed");
        assert_eq!(&out, input, "{what}: must leave untouched");
    }
    assert!(
        dp.global()?.malformed - malformed_before >= 3,
        "truncated headers must be counted as malformed"
    );
    Ok(())
}

/// Audit A-2: only a SYN starts a TCP flow. A stray ACK, FIN, RST or
/// SYN-ACK for a frontend without a flow is handed to the kernel untouched
/// and creates nothing (no flow, no SNAT port).
#[test]
fn only_a_syn_starts_a_tcp_flow() -> Result<()> {
    let dp = Datapath::new()?;
    let client = (CLIENT, 40001);
    for (to, what) in [((FRONTEND, 80), "local"), ((FRONTEND, SNAT_PORT), "remote")] {
        let before = dp.stats_of(&frontend(to.0, to.1, Protocol::Tcp))?.new_flows;
        for flags in [TCP_ACK, TCP_SYN | TCP_ACK, TCP_RST, TCP_FIN | TCP_ACK] {
            let input = tcp(client, to, flags);
            let (verdict, out) = dp.run(&input)?;
            assert_eq!(verdict, XDP_PASS, "{what}, flags {flags:#x}");
            assert_eq!(out, input, "{what}, flags {flags:#x}: must leave untouched");
        }
        assert!(
            dp.flow(client, to).is_none(),
            "{what}: no flow without a SYN"
        );
        let (_, out) = dp.run(&tcp(client, to, TCP_SYN))?;
        assert_ne!(dst_of(&out, 14), to, "{what}: the SYN is translated");
        assert_checksums_valid(&out, 14);
        let after = dp.stats_of(&frontend(to.0, to.1, Protocol::Tcp))?.new_flows;
        assert_eq!(after - before, 1, "{what}: one flow, from the SYN");
        // The rest of the connection follows its flow.
        let (_, out) = dp.run(&tcp(client, to, TCP_ACK))?;
        assert_ne!(dst_of(&out, 14), to, "{what}: the ACK follows the flow");
    }
    Ok(())
}

/// Audit A-20h: a packet leaving through tcx egress on a client's forward
/// tuple (the node's own, or hairpinned) is not the client's: it is left
/// alone, and the client's flow is neither counted nor closed.
#[test]
fn a_packet_leaving_on_a_clients_tuple_leaves_the_clients_flow_alone() -> Result<()> {
    let dp = Datapath::new()?;
    let (client, to) = ((CLIENT, 40005), (FRONTEND, 80));
    dp.run(&tcp(client, to, TCP_SYN))?;
    dp.run(&tcp(client, to, TCP_ACK))?;
    let before = dp.flow(client, to).context("flow")?;
    let stats_before = dp.stats_of(&frontend(to.0, to.1, Protocol::Tcp))?;
    for flags in [TCP_ACK, TCP_RST, TCP_FIN | TCP_ACK] {
        let input = tcp(client, to, flags);
        let (verdict, out) = dp.run_egress(&input)?;
        assert_eq!(verdict, TCX_NEXT, "flags {flags:#x}");
        assert_eq!(out, input, "flags {flags:#x}: left untouched");
    }
    let after = dp.flow(client, to).context("flow")?;
    let stats_after = dp.stats_of(&frontend(to.0, to.1, Protocol::Tcp))?;
    assert_eq!(after.flags, before.flags, "not closed: {:#x}", after.flags);
    assert_eq!(stats_after.packets, stats_before.packets, "not counted");
    // The client's own packets still follow the flow.
    let (_, out) = dp.run(&tcp(client, to, TCP_ACK))?;
    assert_ne!(dst_of(&out, 14), to);
    Ok(())
}

/// Audit A-3: a forged RST and a SYN on a guessed tuple neither move an
/// established flow to another SNAT port or backend, nor leave it closing
/// once its own packets keep coming.
#[test]
fn a_forged_rst_and_syn_cannot_move_or_end_a_flow() -> Result<()> {
    let dp = Datapath::new()?;
    let (client, to) = ((CLIENT, 40002), (FRONTEND, SNAT_PORT));
    let (_, out) = dp.run(&tcp(client, to, TCP_SYN))?;
    let snat = src_of(&out, 14);
    assert_eq!(snat.0, NODE, "source-translated to the node");
    assert_eq!(dst_of(&out, 14), (REMOTE, 8080));
    dp.run(&tcp(client, to, TCP_ACK))?;

    // A forged RST: passed on (the backend judges its sequence number), the
    // flow marked closing.
    let (_, out) = dp.run(&tcp(client, to, TCP_RST | TCP_ACK))?;
    assert_eq!(src_of(&out, 14), snat);
    let flags = dp.flow(client, to).context("flow")?.flags;
    assert_eq!(flags & FLOW_F_CLOSING, FLOW_F_CLOSING);
    // The real client's next segment shows the RST was not its own.
    dp.run(&tcp(client, to, TCP_ACK))?;
    let flags = dp.flow(client, to).context("flow")?.flags;
    assert_eq!(flags & (FLOW_F_CLOSING | FLOW_F_RESET), 0, "{flags:#x}");

    // RST, then a bare SYN on the same tuple: same SNAT port, same backend.
    dp.run(&tcp(client, to, TCP_RST))?;
    let (_, out) = dp.run(&tcp(client, to, TCP_SYN))?;
    assert_eq!(src_of(&out, 14), snat, "the SYN kept the SNAT port");
    assert_eq!(dst_of(&out, 14), (REMOTE, 8080), "and the backend");
    assert_checksums_valid(&out, 14);
    // The backend's answers still reach the client from the frontend.
    let (_, out) = dp.run(&tcp((REMOTE, 8080), snat, TCP_SYN | TCP_ACK))?;
    assert_eq!(src_of(&out, 14), to);
    assert_eq!(dst_of(&out, 14), client);
    Ok(())
}

/// Audit: a closed flow whose backend has left starts afresh on a
/// new SYN, and its old reply entry goes with it (nothing keeps naming the
/// old SNAT port).
#[test]
fn a_closed_flow_whose_backend_left_starts_afresh() -> Result<()> {
    let mut dp = Datapath::new()?;
    let (client, to) = ((CLIENT, 40004), (FRONTEND, SNAT_PORT));
    let (_, out) = dp.run(&tcp(client, to, TCP_SYN))?;
    let old_snat = src_of(&out, 14);
    dp.run(&tcp(client, to, TCP_FIN | TCP_ACK))?;
    assert!(dp.flow((REMOTE, 8080), old_snat).is_some());
    dp.desired.frontends.insert(
        frontend(FRONTEND, SNAT_PORT, Protocol::Tcp),
        frontend_spec(REMOTE2, false),
    );
    dp.apply()?;
    let (_, out) = dp.run(&tcp(client, to, TCP_SYN))?;
    assert_eq!(dst_of(&out, 14), (REMOTE2, 8080), "a backend that serves");
    assert!(
        dp.flow((REMOTE, 8080), old_snat).is_none(),
        "the old reply entry must go"
    );
    let new_snat = src_of(&out, 14);
    let reply = dp
        .flow((REMOTE2, 8080), new_snat)
        .context("new reply entry")?;
    assert_eq!(reply.dst_port.host(), client.1);
    Ok(())
}

/// Audit A-9: one client ip:port reaching the same local backend through two
/// frontends. The reply tuple (backend → client) names no frontend, so the
/// second flow cannot have its own: it is refused and counted, and the first
/// flow's replies keep leaving from the first frontend.
#[test]
fn a_reply_tuple_held_by_a_live_flow_is_never_taken_over() -> Result<()> {
    let dp = Datapath::new()?;
    let client = (CLIENT, 40003);
    let (_, out) = dp.run(&tcp(client, (FRONTEND, 80), TCP_SYN))?;
    assert_eq!(dst_of(&out, 14), (BACKEND, 8080));
    let second = frontend(FRONTEND2, 80, Protocol::Tcp);
    let input = tcp(client, (FRONTEND2, 80), TCP_SYN);
    let (verdict, out) = dp.run(&input)?;
    assert_eq!(verdict, XDP_DROP, "the second flow is refused");
    assert_eq!(out, input);
    assert_eq!(dp.stats_of(&second)?.drop_flow_conflict, 1);
    let (_, out) = dp.run(&tcp((BACKEND, 8080), client, TCP_SYN | TCP_ACK))?;
    assert_eq!(
        src_of(&out, 14),
        (FRONTEND, 80),
        "replies keep their frontend"
    );
    assert_eq!(dst_of(&out, 14), client);
    Ok(())
}

/// Audit A-4: the sweeper judges and deletes an entry's partner only if the
/// partner leads back to it. An old reply entry whose partner key now names
/// a new connection's forward entry (the client reused its tuple) goes alone;
/// the live connection stays.
#[test]
fn the_sweeper_never_deletes_a_live_flow_as_an_old_entrys_partner() -> Result<()> {
    let mut dp = Datapath::new()?;
    let (client, to) = ((CLIENT, 40005), (FRONTEND, SNAT_PORT));
    let (_, out) = dp.run(&tcp(client, to, TCP_SYN))?;
    let old_snat = src_of(&out, 14);
    let now = xlb::netdev::monotonic_ns();
    let seconds_ago = |s: u64| now - s * 1_000_000_000;
    // The state a reused tuple leaves: the new connection (established,
    // idle for 150 s) rewrites to a new SNAT port and has its own reply
    // entry; the old reply entry (closing, idle for 300 s) still names the
    // forward key as its partner.
    let new_snat = (old_snat.0, old_snat.1.wrapping_add(1));
    let mut old_reply = dp.flow((REMOTE, 8080), old_snat).context("reply entry")?;
    let mut new_reply = old_reply;
    new_reply.flags |= FLOW_F_ANSWERED;
    new_reply.last_seen_ns = seconds_ago(150);
    dp.maps
        .flows
        .insert(tcp_key((REMOTE, 8080), new_snat), new_reply, 0)?;
    let mut forward = dp.flow(client, to).context("forward entry")?;
    forward.src_port = Be16::from_host(new_snat.1);
    forward.flags |= FLOW_F_ACKED;
    forward.last_seen_ns = seconds_ago(150);
    dp.maps.flows.insert(tcp_key(client, to), forward, 0)?;
    old_reply.flags |= FLOW_F_CLOSING;
    old_reply.last_seen_ns = seconds_ago(300);
    dp.maps
        .flows
        .insert(tcp_key((REMOTE, 8080), old_snat), old_reply, 0)?;

    let service = dp
        .maps
        .services
        .get(
            &frontend_key(&frontend(FRONTEND, SNAT_PORT, Protocol::Tcp))?,
            0,
        )?
        .service_id;
    let summary = dp.maps.sweep_flows(
        &Timeouts::default(),
        &[service].into(),
        &std::collections::HashSet::new(),
    );
    assert!(summary.expired >= 1, "{summary:?}");
    assert!(
        dp.flow((REMOTE, 8080), old_snat).is_none(),
        "old reply entry expired"
    );
    assert!(
        dp.flow(client, to).is_some() && dp.flow((REMOTE, 8080), new_snat).is_some(),
        "the live connection must stay whole"
    );
    Ok(())
}

/// Audit A-6: the LRU flow table evicts entries one at a time. When it
/// drops the reply half of a SNAT'd flow whose forward half is still in use,
/// the SNAT port must stay that flow's (a second client given the same port
/// would receive the first one's replies), and the surviving half puts the
/// missing one back. The eviction is made by deleting the entry: the
/// datapath cannot tell one from the other.
#[test]
fn an_evicted_half_never_frees_its_snat_port_and_is_put_back() -> Result<()> {
    let mut dp = Datapath::new()?;
    // One SNAT port: whoever takes it must be the only one.
    dp.maps.write_config(&Config {
        node_addr: lb_common::addr_v4(NODE.octets()),
        snat_port_min: 40000,
        snat_port_max: 40000,
        flags: 0,
        ..Config::default()
    })?;
    let to = (FRONTEND, SNAT_PORT);
    let (first, second) = ((CLIENT, 41000), (CLIENT2, 41001));
    let (_, out) = dp.run(&tcp(first, to, TCP_SYN))?;
    let snat = src_of(&out, 14);
    assert_eq!(snat, (NODE, 40000));
    let reply_key = tcp_key((REMOTE, 8080), snat);
    dp.maps.flows.remove(&reply_key)?;

    // The port is still held by the first client's live forward entry.
    let input = tcp(second, to, TCP_SYN);
    let (verdict, out) = dp.run(&input)?;
    assert_eq!(verdict, XDP_DROP, "no free port: the new flow is refused");
    assert_eq!(out, input);
    let service = frontend(FRONTEND, SNAT_PORT, Protocol::Tcp);
    assert_eq!(dp.stats_of(&service)?.drop_snat_exhausted, 1);
    assert!(
        dp.flow((REMOTE, 8080), snat).is_none(),
        "the port was not given to the second client"
    );

    // The first client's next packet, a second after the last one it
    // refreshed, puts the reply half back; the backend's answer reaches it.
    let mut forward = dp.flow(first, to).context("forward entry")?;
    forward.last_seen_ns = xlb::netdev::monotonic_ns() - 2_000_000_000;
    dp.maps.flows.insert(tcp_key(first, to), forward, 0)?;
    let (_, out) = dp.run(&tcp(first, to, TCP_ACK))?;
    assert_eq!(src_of(&out, 14), snat);
    assert_eq!(dp.global()?.flow_halves_restored, 1);
    let (_, out) = dp.run(&tcp((REMOTE, 8080), snat, TCP_SYN | TCP_ACK))?;
    assert_eq!(dst_of(&out, 14), first, "the reply reaches its own client");
    assert_eq!(src_of(&out, 14), to);

    // The other way round: the forward half evicted, a reply puts it back.
    dp.maps.flows.remove(&tcp_key(first, to))?;
    let mut reply = dp.flow((REMOTE, 8080), snat).context("reply entry")?;
    reply.last_seen_ns = xlb::netdev::monotonic_ns() - 2_000_000_000;
    dp.maps.flows.insert(reply_key, reply, 0)?;
    dp.run(&tcp((REMOTE, 8080), snat, TCP_ACK))?;
    assert_eq!(dp.global()?.flow_halves_restored, 2);
    let (_, out) = dp.run(&tcp(first, to, TCP_ACK))?;
    assert_eq!(dst_of(&out, 14), (REMOTE, 8080));
    assert_eq!(src_of(&out, 14), snat, "same backend, same SNAT port");

    // Once the flow is gone for good, the sweeper frees its owner record
    // and the port serves the next client.
    dp.maps.flows.remove(&tcp_key(first, to))?;
    dp.maps.flows.remove(&reply_key)?;
    let id = dp
        .maps
        .services
        .get(&frontend_key(&service)?, 0)?
        .service_id;
    let summary = dp.maps.sweep_flows(
        &Timeouts::default(),
        &[id].into(),
        &std::collections::HashSet::new(),
    );
    assert_eq!(summary.stale_owners, 1, "{summary:?}");
    let (_, out) = dp.run(&tcp(second, to, TCP_SYN))?;
    assert_eq!(src_of(&out, 14), snat, "the freed port is taken again");
    let (_, out) = dp.run(&tcp((REMOTE, 8080), snat, TCP_SYN | TCP_ACK))?;
    assert_eq!(dst_of(&out, 14), second);
    Ok(())
}

/// tcx: "let the next program or the stack decide".
const TCX_NEXT: i32 = -1;
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const ICMP_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;

/// The IPv4 packet inside a frame built by `frame`/`tcp` (no VLAN).
fn ip_packet(f: &[u8]) -> &[u8] {
    &f[14..]
}

/// What an ICMP error frame says: outer source and destination, then the
/// quoted packet's source and destination (address, port).
struct Error {
    outer: (Ipv4Addr, Ipv4Addr),
    quoted_src: (Ipv4Addr, u16),
    quoted_dst: (Ipv4Addr, u16),
}

/// Reads an ICMP error frame and checks every checksum a receiver could:
/// outer IPv4, ICMP, quoted IPv4 header, and the quoted L4 checksum when
/// the whole quoted packet is there.
fn read_error(f: &[u8]) -> Error {
    let l3 = 14;
    assert_eq!(f[l3 + 9], 1, "ICMP");
    assert_eq!(checksum(&f[l3..l3 + 20]), 0, "outer IPv4 checksum");
    assert_eq!(checksum(&f[l3 + 20..]), 0, "ICMP checksum");
    let inner = l3 + 28;
    assert_eq!(checksum(&f[inner..inner + 20]), 0, "quoted IPv4 checksum");
    let total = u16::from_be_bytes([f[inner + 2], f[inner + 3]]) as usize;
    if inner + total <= f.len() {
        assert_checksums_valid(&f[..inner + total], inner);
    }
    let addr = |at: usize| Ipv4Addr::new(f[at], f[at + 1], f[at + 2], f[at + 3]);
    Error {
        outer: (addr(l3 + 12), addr(l3 + 16)),
        quoted_src: src_of(f, inner),
        quoted_dst: dst_of(f, inner),
    }
}

/// Audit A-10: errors about packets xlb translated reach the end that sent
/// them, translated like the flow (outer and quoted headers, every
/// checksum). From the client's side: a router's "fragmentation needed"
/// (about a reply of a node-local backend) goes to the backend, a router's
/// "time exceeded" (about a reply of a SNAT'd remote backend) goes to the
/// remote backend from the node's address, with nothing of the frontend
/// left.
#[test]
fn errors_from_the_clients_side_reach_the_backend() -> Result<()> {
    let dp = Datapath::new()?;
    // Node-local backend, no SNAT.
    let client = (CLIENT, 41000);
    dp.run(&tcp(client, (FRONTEND, 80), TCP_SYN))?;
    let reply = tcp((FRONTEND, 80), client, TCP_SYN | TCP_ACK);
    let input = icmp_frame(ROUTER, FRONTEND, ICMP_UNREACH, 4, 1400, ip_packet(&reply));
    let (verdict, out) = dp.run(&input)?;
    assert_eq!(verdict, XDP_PASS, "translated, to the kernel");
    let e = read_error(&out);
    assert_eq!(e.outer, (ROUTER, BACKEND), "the router stays the source");
    assert_eq!((e.quoted_src, e.quoted_dst), ((BACKEND, 8080), client));
    let icmp = 14 + 20;
    assert_eq!(
        (&out[icmp..icmp + 2], &out[icmp + 4..icmp + 8]),
        (&input[icmp..icmp + 2], &input[icmp + 4..icmp + 8]),
        "type, code, MTU"
    );

    // Remote backend behind SNAT.
    let client = (CLIENT, 41001);
    let (_, forwarded) = dp.run(&tcp(client, (FRONTEND, SNAT_PORT), TCP_SYN))?;
    let snat = src_of(&forwarded, 14);
    let reply = tcp((FRONTEND, SNAT_PORT), client, TCP_SYN | TCP_ACK);
    let input = icmp_frame(
        ROUTER,
        FRONTEND,
        ICMP_TIME_EXCEEDED,
        0,
        0,
        ip_packet(&reply),
    );
    let (verdict, out) = dp.run(&input)?;
    assert_eq!(verdict, XDP_PASS);
    let e = read_error(&out);
    assert_eq!(e.outer, (NODE, REMOTE), "from the SNAT address");
    assert_eq!((e.quoted_src, e.quoted_dst), ((REMOTE, 8080), snat));
    assert_eq!(dp.global()?.icmp_translated, 2);
    Ok(())
}

/// Audit A-10: an error about a packet xlb sent to a remote backend
/// (host unreachable from the backend's node, quoting only the 8 bytes of
/// TCP every error carries) reaches the client, from the frontend, quoting
/// the client's own packet; no backend or node address is left in it.
#[test]
fn errors_from_the_backends_side_reach_the_client() -> Result<()> {
    let dp = Datapath::new()?;
    let client = (CLIENT, 41002);
    let (_, forwarded) = dp.run(&tcp(client, (FRONTEND, SNAT_PORT), TCP_SYN))?;
    let snat = src_of(&forwarded, 14);
    let sent = ip_packet(&forwarded);
    let backend_node = Ipv4Addr::new(10, 244, 3, 1);
    let input = icmp_frame(backend_node, NODE, ICMP_UNREACH, 1, 0, &sent[..28]);
    let (verdict, out) = dp.run(&input)?;
    assert_eq!(verdict, XDP_PASS);
    let e = read_error(&out);
    assert_eq!(e.outer, (FRONTEND, CLIENT));
    assert_eq!(
        (e.quoted_src, e.quoted_dst),
        (client, (FRONTEND, SNAT_PORT))
    );
    assert_eq!(out.len(), input.len(), "nothing added or cut");
    assert_ne!(snat.0, CLIENT);
    Ok(())
}

/// Audit A-10: a node-local backend's "port unreachable" leaves through tc
/// egress translated (from the frontend, quoting the client's datagram to
/// the frontend): neither the pod's address nor its port leaks.
#[test]
fn a_local_backends_error_leaves_as_the_frontends() -> Result<()> {
    let dp = Datapath::new()?;
    let client = (CLIENT, 41003);
    let datagram = frame(&FrameSpec {
        sport: client.1,
        ..spec()
    });
    let (_, delivered) = dp.run(&datagram)?;
    assert_eq!(dst_of(&delivered, 14), (BACKEND, 8080));
    let input = icmp_frame(BACKEND, CLIENT, ICMP_UNREACH, 3, 0, ip_packet(&delivered));
    let (verdict, out) = dp.run_egress(&input)?;
    assert_eq!(verdict, TCX_NEXT);
    let e = read_error(&out);
    assert_eq!(e.outer, (FRONTEND, CLIENT));
    assert_eq!((e.quoted_src, e.quoted_dst), (client, (FRONTEND, 80)));
    Ok(())
}

/// ICMP that is not an error about a translated flow is never touched:
/// errors addressed to someone other than the quoted packet's sender,
/// quoting no flow, quoting IP options or cut short; echo requests to a
/// frontend; and at tc egress, errors about a flow's forward direction.
#[test]
fn other_icmp_passes_untouched() -> Result<()> {
    let dp = Datapath::new()?;
    let client = (CLIENT, 41004);
    dp.run(&tcp(client, (FRONTEND, 80), TCP_SYN))?;
    let reply = tcp((FRONTEND, 80), client, TCP_SYN | TCP_ACK);
    let quoted = ip_packet(&reply);
    let mut with_options = frame(&FrameSpec {
        proto: 6,
        options: 4,
        sport: 80,
        dport: client.1,
        ..FrameSpec::new(FRONTEND, CLIENT)
    });
    with_options.drain(..14);
    let stranger = tcp((FRONTEND, 80), (CLIENT, 1), TCP_SYN | TCP_ACK);
    let cases = [
        (
            "addressed to another",
            icmp_frame(ROUTER, NODE, ICMP_UNREACH, 4, 1400, quoted),
        ),
        (
            "no flow",
            icmp_frame(
                ROUTER,
                FRONTEND,
                ICMP_UNREACH,
                4,
                1400,
                ip_packet(&stranger),
            ),
        ),
        (
            "quoted options",
            icmp_frame(ROUTER, FRONTEND, ICMP_UNREACH, 4, 1400, &with_options),
        ),
        (
            "cut short",
            icmp_frame(ROUTER, FRONTEND, ICMP_UNREACH, 4, 1400, &quoted[..24]),
        ),
        (
            "echo request",
            icmp_frame(CLIENT, FRONTEND, 8, 0, 7, quoted),
        ),
        (
            "parameter problem",
            icmp_frame(ROUTER, FRONTEND, 12, 0, 0, quoted),
        ),
    ];
    for (what, input) in &cases {
        let (verdict, out) = dp.run(input)?;
        assert_eq!(verdict, XDP_PASS, "{what}");
        assert_eq!(&out, input, "{what}: untouched");
    }
    // At egress, only replies' flows: this error is about the client's
    // side of the flow.
    let input = icmp_frame(ROUTER, FRONTEND, ICMP_UNREACH, 4, 1400, quoted);
    let (verdict, out) = dp.run_egress(&input)?;
    assert_eq!(verdict, TCX_NEXT);
    assert_eq!(out, input, "egress leaves forward-direction errors alone");
    assert_eq!(dp.global()?.icmp_translated, 0);
    Ok(())
}

/// Audit A-12: with the reverse-path check on (the agent's default), a
/// packet that matches a SNAT'd flow's reply tuple but comes in through an
/// interface the route to the backend does not use (here loopback, where
/// the test runs frames) is not translated and changes nothing: a forged
/// RST leaves the reply entry as it was. With the check off, the same
/// packet is translated (what the check guards against).
#[test]
fn a_reply_from_the_wrong_side_is_not_translated() -> Result<()> {
    let mut dp = Datapath::new()?;
    let config = |flags| Config {
        node_addr: lb_common::addr_v4(NODE.octets()),
        snat_port_min: 32768,
        snat_port_max: 60999,
        flags,
        ..Config::default()
    };
    let client = (CLIENT, 41005);
    let (_, forwarded) = dp.run(&tcp(client, (FRONTEND, SNAT_PORT), TCP_SYN))?;
    let snat = src_of(&forwarded, 14);
    let before = dp.flow((REMOTE, 8080), snat).context("reply entry")?;
    dp.maps.write_config(&config(CONFIG_F_REVERSE_PATH))?;
    let forged = tcp((REMOTE, 8080), snat, TCP_RST);
    let (verdict, out) = dp.run(&forged)?;
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, forged, "not translated");
    assert_eq!(dp.global()?.reply_wrong_interface, 1);
    let after = dp.flow((REMOTE, 8080), snat).context("reply entry")?;
    assert_eq!(after.flags, before.flags, "the entry is untouched");

    dp.maps.write_config(&config(0))?;
    let (_, out) = dp.run(&tcp((REMOTE, 8080), snat, TCP_SYN | TCP_ACK))?;
    assert_eq!(
        dst_of(&out, 14),
        client,
        "without the check it is translated"
    );
    Ok(())
}

/// A UDP datagram of `payload` bytes from `src` to `dst`, unfragmented
/// (no DF: routers may fragment it).
fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: usize) -> Vec<u8> {
    frame(&FrameSpec {
        sport: src.1,
        dport: dst.1,
        frag: 0,
        payload,
        ..FrameSpec::new(src.0, dst.0)
    })
}

/// Checks two fragments as the receiver reassembles them: each IPv4 header
/// checksum, the same addresses and id, the UDP checksum (in the first)
/// over the whole datagram, and the payload as sent. Returns the
/// datagram's (source, destination).
fn assert_reassembles(
    first: &[u8],
    later: &[u8],
    sent: &[u8],
) -> ((Ipv4Addr, u16), (Ipv4Addr, u16)) {
    let l3 = 14;
    assert_eq!(
        checksum(&first[l3..l3 + 20]),
        0,
        "first fragment's IPv4 checksum"
    );
    assert_eq!(
        checksum(&later[l3..l3 + 20]),
        0,
        "later fragment's IPv4 checksum"
    );
    assert_eq!(&first[l3 + 4..l3 + 8], &[0x12, 0x34, 0x20, 0], "id, MF");
    assert_eq!(&later[l3 + 4..l3 + 6], &[0x12, 0x34], "id");
    assert_eq!(
        &first[l3 + 12..l3 + 20],
        &later[l3 + 12..l3 + 20],
        "both fragments carry the same addresses"
    );
    let mut whole = first.to_vec();
    whole.extend_from_slice(&later[l3 + 20..]);
    let total = (whole.len() - l3) as u16;
    whole[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
    whole[l3 + 6..l3 + 8].copy_from_slice(&[0, 0]);
    whole[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
    let c = checksum(&whole[l3..l3 + 20]);
    whole[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    assert_checksums_valid(&whole, l3);
    assert_eq!(&whole[l3 + 28..], &sent[l3 + 28..], "payload as sent");
    (src_of(&whole, l3), dst_of(&whole, l3))
}

/// Audit A-10 (part 2): a node-local backend's UDP reply larger than the
/// MTU, fragmented by the kernel before tcx egress, leaves as the
/// frontend's: the first fragment through its flow, the later one through
/// the record the first left; the datagram's UDP checksum is right.
#[test]
fn a_local_backends_fragmented_reply_leaves_as_the_frontends() -> Result<()> {
    let dp = Datapath::new()?;
    let client = (CLIENT, 42000);
    let (_, delivered) = dp.run(&udp(client, (FRONTEND, 80), 16))?;
    assert_eq!(dst_of(&delivered, 14), (BACKEND, 8080));
    let reply = udp((BACKEND, 8080), client, 300);
    let (first, later) = fragments(&reply, 14, 104);
    let (verdict, first_out) = dp.run_egress(&first)?;
    assert_eq!(verdict, TCX_NEXT);
    let (verdict, later_out) = dp.run_egress(&later)?;
    assert_eq!(verdict, TCX_NEXT);
    let (src, dst) = assert_reassembles(&first_out, &later_out, &reply);
    assert_eq!((src, dst), ((FRONTEND, 80), client));
    assert_eq!(dp.global()?.fragments_translated, 1);
    Ok(())
}

/// The same for a remote backend's reply reaching XDP (source-translated
/// flow): it leaves to the client from the frontend, not to the node.
#[test]
fn a_remote_backends_fragmented_reply_reaches_the_client() -> Result<()> {
    let mut dp = Datapath::new()?;
    dp.desired.frontends.insert(
        frontend(FRONTEND, SNAT_PORT, Protocol::Udp),
        frontend_spec(REMOTE, false),
    );
    dp.apply()?;
    let client = (CLIENT, 42001);
    let (_, forwarded) = dp.run(&udp(client, (FRONTEND, SNAT_PORT), 16))?;
    assert_eq!(dst_of(&forwarded, 14), (REMOTE, 8080));
    let snat = src_of(&forwarded, 14);
    assert_eq!(snat.0, NODE);
    let reply = udp((REMOTE, 8080), snat, 1000);
    let (first, later) = fragments(&reply, 14, 512);
    let (verdict, first_out) = dp.run(&first)?;
    assert_eq!(
        verdict, XDP_PASS,
        "translated, to the kernel (redirect off)"
    );
    let (verdict, later_out) = dp.run(&later)?;
    assert_eq!(verdict, XDP_PASS);
    let (src, dst) = assert_reassembles(&first_out, &later_out, &reply);
    assert_eq!((src, dst), ((FRONTEND, SNAT_PORT), client));
    assert_eq!(dp.global()?.fragments_translated, 1);
    Ok(())
}

/// A client's fragmented datagram to a frontend: its first fragment starts
/// the flow and is translated like any packet of it, the later one gets the
/// same addresses. A later fragment changes no flow state.
#[test]
fn a_clients_fragmented_datagram_reaches_the_backend() -> Result<()> {
    let dp = Datapath::new()?;
    let client = (CLIENT, 42002);
    let datagram = udp(client, (FRONTEND, 80), 200);
    let (first, later) = fragments(&datagram, 14, 64);
    let (verdict, first_out) = dp.run(&first)?;
    assert_eq!(verdict, XDP_PASS);
    let key = FlowKey {
        proto: 17,
        ..tcp_key(client, (FRONTEND, 80))
    };
    let entry = dp.maps.flows.get(&key, 0).context("the flow")?;
    let (verdict, later_out) = dp.run(&later)?;
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        dp.maps.flows.get(&key, 0)?,
        entry,
        "a later fragment leaves its flow as it was"
    );
    let (src, dst) = assert_reassembles(&first_out, &later_out, &datagram);
    assert_eq!((src, dst), (client, (BACKEND, 8080)));
    assert_eq!(dp.stats(Protocol::Udp)?.new_flows, 1);
    Ok(())
}

/// A later fragment without a record is never translated: another
/// datagram's (other id), one whose first fragment was not for a frontend,
/// one seen before its first fragment.
#[test]
fn a_later_fragment_without_a_record_is_untouched() -> Result<()> {
    let dp = Datapath::new()?;
    let client = (CLIENT, 42003);
    let datagram = udp(client, (FRONTEND, 80), 200);
    let (first, later) = fragments(&datagram, 14, 64);
    // Before its first fragment: nothing to go by.
    let (verdict, out) = dp.run(&later)?;
    assert_eq!((verdict, &out), (XDP_PASS, &later), "before its first");
    dp.run(&first)?;
    let other = with_ip_id(&later, 14, 0x4321);
    let (verdict, out) = dp.run(&other)?;
    assert_eq!((verdict, &out), (XDP_PASS, &other), "another datagram's");
    let stranger = udp(client, (NODE, 80), 200);
    let (first, later) = fragments(&stranger, 14, 64);
    let (_, out) = dp.run(&first)?;
    assert_eq!(out, first, "not for a frontend");
    let (verdict, out) = dp.run(&later)?;
    assert_eq!(
        (verdict, &out),
        (XDP_PASS, &later),
        "nor its later fragment"
    );
    // At egress, only reply flows leave records.
    let (verdict, out) = dp.run_egress(&later)?;
    assert_eq!((verdict, &out), (TCX_NEXT, &later), "egress");
    assert_eq!(dp.global()?.fragments_translated, 0);
    Ok(())
}

/// What tcx egress returns for a dropped packet.
const TC_ACT_SHOT: i32 = 2;

impl Datapath {
    /// Turns the reply-leak check on (or off) and programs its maps as the
    /// agent does: the local backends of `desired`, and `networks`.
    fn guard(&mut self, on: bool, networks: &[(Ipv4Addr, u8)]) -> Result<()> {
        let mut config = self.maps.config.get(&lb_common::CONFIG_KEY, 0)?;
        config.flags = if on { CONFIG_F_POD_SOURCE_GUARD } else { 0 };
        self.maps.write_config(&config)?;
        let mut guard = EgressGuard::new(networks.iter().map(|(addr, prefix_len)| Network {
            addr: IpAddr::V4(*addr),
            prefix_len: *prefix_len,
        }));
        guard.apply(
            &self.desired,
            None,
            &mut self.maps,
            std::time::Instant::now(),
        )
    }
}

/// Audit A-10 part 3: a node-local backend's packet that matches no flow
/// (its flow swept, ended with its Service, or evicted) never leaves an
/// uplink towards the outside with the pod's address; the same packet to
/// the cluster's own networks, a packet from a port that is no backend's,
/// and anything with the check turned off pass untouched.
#[test]
fn a_local_backends_reply_without_a_flow_never_leaves_for_the_outside() -> Result<()> {
    let mut dp = Datapath::new()?;
    // The pod network and the node network (NODE and its peer 10.0.2.2).
    let networks = [
        (Ipv4Addr::new(10, 244, 0, 0), 16),
        (Ipv4Addr::new(10, 0, 0, 0), 16),
    ];
    dp.guard(true, &networks)?;
    let lost = [
        tcp((BACKEND, 8080), (CLIENT, 41020), TCP_ACK),
        udp((BACKEND, 8080), (CLIENT, 41021), 20),
    ];
    for packet in &lost {
        let before = dp.global()?.reply_leaks_dropped;
        let (verdict, _) = dp.run_egress(packet)?;
        assert_eq!(verdict, TC_ACT_SHOT, "a lost flow's reply must not leave");
        assert_eq!(dp.global()?.reply_leaks_dropped, before + 1);
    }
    let untouched = [
        // Cluster traffic from the same pod port: to a pod on another node
        // (a ClusterIP reply) and to another node's host.
        tcp((BACKEND, 8080), (REMOTE, 41022), TCP_ACK),
        udp((BACKEND, 8080), (Ipv4Addr::new(10, 0, 2, 2), 41023), 20),
        // Another port of the pod: no backend.
        tcp((BACKEND, 9999), (CLIENT, 41024), TCP_ACK),
        // Another pod's address with the backend's port.
        tcp((REMOTE2, 8080), (CLIENT, 41025), TCP_ACK),
    ];
    for packet in &untouched {
        let (verdict, out) = dp.run_egress(packet)?;
        assert_eq!((verdict, &out), (TCX_NEXT, packet));
    }
    // A reply whose flow exists is still translated.
    let client = (CLIENT, 41026);
    let (_, delivered) = dp.run(&tcp(client, (FRONTEND, 80), TCP_SYN))?;
    assert_eq!(dst_of(&delivered, 14), (BACKEND, 8080));
    let (verdict, out) = dp.run_egress(&tcp((BACKEND, 8080), client, TCP_SYN | TCP_ACK))?;
    assert_eq!(verdict, TCX_NEXT);
    assert_eq!(src_of(&out, 14), (FRONTEND, 80));
    let dropped = dp.global()?.reply_leaks_dropped;
    assert_eq!(dropped, 2, "only the two lost replies were counted");
    // `--allow-pod-source-egress`: the check is off.
    dp.guard(false, &networks)?;
    for packet in &lost {
        let (verdict, out) = dp.run_egress(packet)?;
        assert_eq!((verdict, &out), (TCX_NEXT, packet));
    }
    assert_eq!(dp.global()?.reply_leaks_dropped, dropped);
    Ok(())
}

#[test]
fn a_source_translated_packet_with_ttl_1_is_answered_with_time_exceeded_from_the_frontend()
-> Result<()> {
    let dp = Datapath::new()?;
    let mut syn = tcp((CLIENT, 40100), (FRONTEND, SNAT_PORT), TCP_SYN);
    // TTL 1, header checksum redone.
    syn[14 + 8] = 1;
    syn[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
    let c = checksum(&syn[14..34]);
    syn[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
    let before = dp.global()?;
    let (verdict, out) = dp.run(&syn)?;
    assert_eq!(verdict, 3, "sent back (XDP_TX)");
    // From the frontend to the client: ICMP type 11, code 0, quoting the
    // client's own header (TTL 1, its addresses and ports).
    assert_eq!(out[14 + 9], 1, "ICMP");
    assert_eq!(&out[26..30], &FRONTEND.octets());
    assert_eq!(&out[30..34], &CLIENT.octets());
    assert_eq!((out[34], out[35]), (11, 0), "time exceeded in transit");
    assert_eq!(checksum(&out[14..34]), 0, "IPv4 header checksum");
    assert_eq!(checksum(&out[34..]), 0, "ICMP checksum");
    assert_eq!(&out[42..62], &syn[14..34], "the client's header, quoted");
    assert_eq!(&out[62..66], &syn[34..38], "its ports, quoted");
    let after = dp.global()?;
    assert_eq!(after.time_exceeded_sent, before.time_exceeded_sent + 1);
    // A local backend's flow (no SNAT) is the kernel's to answer.
    let mut local = tcp((CLIENT, 40101), (FRONTEND, 80), TCP_SYN);
    local[14 + 8] = 1;
    local[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
    let c = checksum(&local[14..34]);
    local[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
    let (verdict, _) = dp.run(&local)?;
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(dp.global()?.time_exceeded_sent, after.time_exceeded_sent);
    Ok(())
}
