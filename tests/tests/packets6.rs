//! The real programs on crafted IPv6 frames (BPF_PROG_TEST_RUN): IPv6
//! frontends translated with valid checksums at every hook, SNAT to the
//! node's IPv6 address, extension headers walked, fragments, truncated
//! headers and UDP without a checksum never translated, neighbour
//! discovery untouched, and a dual-stack service's families kept apart.
//! Needs root (loads the programs).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    programs::{SchedClassifier, Xdp},
};
use lb_common::{Config, GlobalStats, ServiceStats};
use xlb::{
    dataplane::{self, Limits, Maps, PinDir},
    model::{Backend, DesiredState, Frontend, FrontendSpec, Protocol, ServiceRef},
    reconcile::{Reconciler, frontend_key},
};
use xlb_tests::packet::{
    FrameSpec, FrameSpec6, TCP_ACK, TCP_SYN, TestRunSpec, fragment_header, frame, frame6,
    icmp6_frame, l3_of, l4_of, padding_options, pseudo_checksum6, test_run, test_run_tc,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
/// tcx: hand on to the next program or the stack.
const TCX_NEXT: i32 = -1;
const FRONTEND: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x10);
const BACKEND: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 2);
const REMOTE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 3, 0, 0, 0, 0, 2);
const CLIENT: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);
const NODE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 1, 0, 0, 0, 0, 1);
const FRONTEND4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const BACKEND4: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const NODE4: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
/// FRONTEND's TCP port served by REMOTE (source-translated).
const SNAT_PORT: u16 = 90;
const ICMPV6: u8 = 58;

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn spec_of(backend: IpAddr, local: bool) -> FrontendSpec {
    FrontendSpec {
        service: ServiceRef {
            namespace: "t".into(),
            name: "web".into(),
            port_name: String::new(),
        },
        backends: vec![Backend {
            addr: backend,
            port: 8080,
            local,
            terminating: false,
        }],
        local_only: false,
        affinity_timeout: None,
        source_ranges: vec![],
    }
}

fn frontend(addr: IpAddr, port: u16, protocol: Protocol) -> Frontend {
    Frontend {
        addr,
        port,
        protocol,
    }
}

/// The datapath loaded, redirect and reverse-path check off, with one
/// dual-stack service:
/// - TCP and UDP [FRONTEND]:80 → [BACKEND]:8080 (node-local);
/// - TCP [FRONTEND]:90 → [REMOTE]:8080 (another node: SNAT to NODE);
/// - TCP FRONTEND4:80 → BACKEND4:8080 (the service's IPv4 half).
struct Datapath {
    pins: PinDir,
    maps: Maps,
    ebpf: Ebpf,
}

impl Datapath {
    fn new() -> Result<Self> {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "packet tests need root");
        let bpffs = std::path::Path::new("/sys/fs/bpf");
        dataplane::ensure_bpffs(bpffs)?;
        let node = format!(
            "pkt6-{}-{}",
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
            node_addr: lb_common::addr_v4(NODE4.octets()),
            node_addr_v6: NODE.octets(),
            snat_port_min: 32768,
            snat_port_max: 60999,
            flags: 0,
            ..Config::default()
        })?;
        let mut desired = DesiredState::default();
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            desired.frontends.insert(
                frontend(FRONTEND.into(), 80, protocol),
                spec_of(BACKEND.into(), true),
            );
        }
        desired.frontends.insert(
            frontend(FRONTEND.into(), SNAT_PORT, Protocol::Tcp),
            spec_of(REMOTE.into(), false),
        );
        desired.frontends.insert(
            frontend(FRONTEND4.into(), 80, Protocol::Tcp),
            spec_of(BACKEND4.into(), true),
        );
        let mut reconciler = Reconciler::new(limits.max_services, limits.max_backends);
        let summary = reconciler.apply(&desired, &mut maps);
        anyhow::ensure!(summary.errors.is_empty(), "{:?}", summary.errors);
        Ok(Datapath { pins, maps, ebpf })
    }

    fn xdp(&self, input: &[u8]) -> Result<(u32, Vec<u8>)> {
        let program: &Xdp = self
            .ebpf
            .program("xlb_xdp")
            .context("xlb_xdp")?
            .try_into()?;
        let outcome = test_run(program, input, TestRunSpec::ONCE)?;
        Ok((outcome.verdict, outcome.frame))
    }

    fn tc(&self, name: &str, input: &[u8]) -> Result<(i32, Vec<u8>)> {
        let program: &SchedClassifier = self.ebpf.program(name).context("tc")?.try_into()?;
        test_run_tc(program, input)
    }

    fn stats(&self, addr: IpAddr, port: u16, protocol: Protocol) -> Result<ServiceStats> {
        let key = frontend_key(&frontend(addr, port, protocol))?;
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

/// The addresses, ports and L4 protocol of an IPv6 frame built like
/// [`frame6`]'s, after its extension headers (`l4` is where L4 starts).
fn tuple(f: &[u8], l3: usize, l4: usize) -> ((Ipv6Addr, u16), (Ipv6Addr, u16)) {
    let addr = |at: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&f[at..at + 16]).unwrap());
    let port = |at: usize| u16::from_be_bytes([f[at], f[at + 1]]);
    ((addr(l3 + 8), port(l4)), (addr(l3 + 24), port(l4 + 2)))
}

/// Checks the L4 checksum of an IPv6 frame the way a receiving kernel
/// would: over the pseudo-header and the whole L4 part; UDP 0 is invalid.
fn assert_checksum_valid(f: &[u8], l3: usize, l4: usize, proto: u8) {
    let ((src, _), (dst, _)) = tuple(f, l3, l4);
    let seg = &f[l4..];
    if proto == 17 {
        assert_ne!([seg[6], seg[7]], [0, 0], "UDP over IPv6 without a checksum");
    }
    assert_eq!(
        pseudo_checksum6(&src, &dst, proto, seg),
        0,
        "L4 checksum (protocol {proto})"
    );
}

fn tcp6(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), flags: u8) -> FrameSpec6 {
    FrameSpec6 {
        sport: src.1,
        dport: dst.1,
        tcp_flags: flags,
        ..FrameSpec6::new(src.0, dst.0)
    }
}

#[test]
fn an_ipv6_client_reaches_a_local_backend_and_its_answer_leaves_as_the_frontend() -> Result<()> {
    let dp = Datapath::new()?;
    let syn = tcp6((CLIENT, 40000), (FRONTEND, 80), TCP_SYN);
    let (verdict, out) = dp.xdp(&frame6(&syn))?;
    assert_eq!(verdict, XDP_PASS);
    let (l3, l4) = (l3_of(&syn), l4_of(&syn));
    assert_eq!(
        tuple(&out, l3, l4),
        ((CLIENT, 40000), (BACKEND, 8080)),
        "destination translated, source kept"
    );
    assert_checksum_valid(&out, l3, l4, 6);
    assert_eq!(out[l3 + 7], 64, "passed to the kernel, which decrements");
    assert_eq!(dp.stats(FRONTEND.into(), 80, Protocol::Tcp)?.new_flows, 1);

    // The backend's SYN-ACK, leaving through the uplink's tcx egress.
    let syn_ack = tcp6((BACKEND, 8080), (CLIENT, 40000), TCP_SYN | TCP_ACK);
    let (rc, out) = dp.tc("xlb_tc_egress", &frame6(&syn_ack))?;
    assert_eq!(rc, TCX_NEXT);
    assert_eq!(
        tuple(&out, l3, l4),
        ((FRONTEND, 80), (CLIENT, 40000)),
        "the reply leaves from the frontend"
    );
    assert_checksum_valid(&out, l3, l4, 6);
    Ok(())
}

#[test]
fn an_ipv6_flow_to_a_remote_backend_is_source_translated_to_the_nodes_ipv6_address() -> Result<()> {
    let dp = Datapath::new()?;
    let syn = tcp6((CLIENT, 40000), (FRONTEND, SNAT_PORT), TCP_SYN);
    let (verdict, out) = dp.xdp(&frame6(&syn))?;
    assert_eq!(verdict, XDP_PASS);
    let (l3, l4) = (l3_of(&syn), l4_of(&syn));
    let ((src, sport), dst) = tuple(&out, l3, l4);
    assert_eq!(src, NODE, "source translated to the node's IPv6 address");
    assert!((32768..=60999).contains(&sport), "SNAT port {sport}");
    assert_eq!(dst, (REMOTE, 8080));
    assert_checksum_valid(&out, l3, l4, 6);

    // The remote backend's answer comes in through the uplink.
    let syn_ack = tcp6((REMOTE, 8080), (NODE, sport), TCP_SYN | TCP_ACK);
    let (verdict, out) = dp.xdp(&frame6(&syn_ack))?;
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        tuple(&out, l3, l4),
        ((FRONTEND, SNAT_PORT), (CLIENT, 40000))
    );
    assert_checksum_valid(&out, l3, l4, 6);
    Ok(())
}

#[test]
fn ipv6_udp_is_translated_with_a_checksum_and_udp_without_one_is_never_translated() -> Result<()> {
    let dp = Datapath::new()?;
    let udp = FrameSpec6 {
        proto: 17,
        ..FrameSpec6::new(CLIENT, FRONTEND)
    };
    let (verdict, out) = dp.xdp(&frame6(&udp))?;
    assert_eq!(verdict, XDP_PASS);
    let (l3, l4) = (l3_of(&udp), l4_of(&udp));
    assert_eq!(tuple(&out, l3, l4).1, (BACKEND, 8080));
    assert_checksum_valid(&out, l3, l4, 17);

    let before = dp.global()?.malformed;
    let bare = FrameSpec6 {
        udp_checksum: false,
        sport: 40001,
        ..udp
    };
    let input = frame6(&bare);
    let (verdict, out) = dp.xdp(&input)?;
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, input, "UDP checksum 0 over IPv6 is passed untouched");
    assert_eq!(dp.global()?.malformed, before + 1);
    Ok(())
}

#[test]
fn extension_headers_are_walked_and_kept() -> Result<()> {
    let dp = Datapath::new()?;
    let spec = FrameSpec6 {
        extensions: vec![(0, padding_options()), (60, padding_options())],
        ..tcp6((CLIENT, 40002), (FRONTEND, 80), TCP_SYN)
    };
    let input = frame6(&spec);
    let (verdict, out) = dp.xdp(&input)?;
    assert_eq!(verdict, XDP_PASS);
    let (l3, l4) = (l3_of(&spec), l4_of(&spec));
    assert_eq!(tuple(&out, l3, l4).1, (BACKEND, 8080));
    assert_eq!(
        &out[l3 + 40..l4],
        &input[l3 + 40..l4],
        "extension headers kept"
    );
    assert_checksum_valid(&out, l3, l4, 6);

    // Five extension headers: more than the parser walks, passed as is.
    let long = FrameSpec6 {
        extensions: vec![(60, padding_options()); 5],
        ..tcp6((CLIENT, 40003), (FRONTEND, 80), TCP_SYN)
    };
    let input = frame6(&long);
    let (verdict, out) = dp.xdp(&input)?;
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, input);
    Ok(())
}

#[test]
fn a_first_fragment_for_a_frontend_is_dropped_and_counted_and_later_ones_pass() -> Result<()> {
    let dp = Datapath::new()?;
    let first = FrameSpec6 {
        proto: 17,
        extensions: vec![(44, fragment_header(0, true))],
        ..FrameSpec6::new(CLIENT, FRONTEND)
    };
    let (verdict, _) = dp.xdp(&frame6(&first))?;
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(
        dp.stats(FRONTEND.into(), 80, Protocol::Udp)?
            .drop_unsupported,
        1
    );
    // A later fragment carries no ports: left to the kernel, which cannot
    // reassemble it without the first.
    let later = FrameSpec6 {
        extensions: vec![(44, fragment_header(3, false))],
        ..first.clone()
    };
    let input = frame6(&later);
    let (verdict, out) = dp.xdp(&input)?;
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, input);
    // A first fragment for no frontend is not ours.
    let other = FrameSpec6 { dport: 81, ..first };
    let input = frame6(&other);
    let (verdict, out) = dp.xdp(&input)?;
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, input);
    Ok(())
}

#[test]
fn a_routing_header_for_a_frontend_is_dropped_and_counted() -> Result<()> {
    let dp = Datapath::new()?;
    // Type 4 (segment routing) with no segments left: the checksum's
    // pseudo-header would name the final destination.
    let spec = FrameSpec6 {
        extensions: vec![(43, vec![0, 0, 4, 0, 0, 0, 0, 0])],
        ..tcp6((CLIENT, 40004), (FRONTEND, 80), TCP_SYN)
    };
    let (verdict, _) = dp.xdp(&frame6(&spec))?;
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(
        dp.stats(FRONTEND.into(), 80, Protocol::Tcp)?
            .drop_unsupported,
        1
    );
    Ok(())
}

#[test]
fn truncated_ipv6_frames_pass_untouched() -> Result<()> {
    let dp = Datapath::new()?;
    let spec = FrameSpec6 {
        extensions: vec![(0, padding_options())],
        ..tcp6((CLIENT, 40005), (FRONTEND, 80), TCP_SYN)
    };
    let whole = frame6(&spec);
    let l4 = l4_of(&spec);
    // Cut inside the IPv6 header, the extension header, and TCP before its
    // checksum.
    for len in [20, 14 + 39, 14 + 44, l4 + 10, l4 + 17] {
        let input = &whole[..len];
        let (verdict, out) = dp.xdp(input)?;
        assert_eq!(verdict, XDP_PASS, "cut at {len}");
        assert_eq!(out, input, "cut at {len}");
    }
    // A payload length shorter than the headers read.
    let mut lying = whole.clone();
    lying[18..20].copy_from_slice(&10u16.to_be_bytes());
    let (verdict, out) = dp.xdp(&lying)?;
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, lying);
    Ok(())
}

#[test]
fn neighbour_discovery_for_a_frontend_passes_untouched() -> Result<()> {
    let dp = Datapath::new()?;
    // A neighbour solicitation for FRONTEND from CLIENT (checksum left 0:
    // the datapath must not even look at it).
    let mut f = vec![0x33, 0x33, 0xff, 0, 0, 0x10, 2, 0, 0, 0, 0, 2, 0x86, 0xdd];
    f.extend_from_slice(&[0x60, 0, 0, 0, 0, 32, ICMPV6, 255]);
    f.extend_from_slice(&CLIENT.octets());
    f.extend_from_slice(&FRONTEND.octets());
    f.extend_from_slice(&[135, 0, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&FRONTEND.octets());
    f.extend_from_slice(&[1, 1, 2, 0, 0, 0, 0, 2]);
    let (verdict, out) = dp.xdp(&f)?;
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, f);
    let (rc, out) = dp.tc("xlb_tc_ingress", &f)?;
    assert_eq!(rc, TCX_NEXT);
    assert_eq!(out, f);
    Ok(())
}

#[test]
fn at_tcx_ingress_an_ipv6_flow_is_translated_too() -> Result<()> {
    let dp = Datapath::new()?;
    let spec = FrameSpec6 {
        vlan: Some(7),
        ..tcp6((CLIENT, 40006), (FRONTEND, SNAT_PORT), TCP_SYN)
    };
    let (rc, out) = dp.tc("xlb_tc_ingress", &frame6(&spec))?;
    assert_eq!(rc, TCX_NEXT);
    let (l3, l4) = (l3_of(&spec), l4_of(&spec));
    let ((src, _), dst) = tuple(&out, l3, l4);
    assert_eq!((src, dst), (NODE, (REMOTE, 8080)));
    assert_checksum_valid(&out, l3, l4, 6);
    Ok(())
}

#[test]
fn a_dual_stack_service_keeps_each_family_to_its_own_backends() -> Result<()> {
    let dp = Datapath::new()?;
    let v4 = FrameSpec {
        proto: 6,
        tcp_flags: TCP_SYN,
        ..FrameSpec::new(CLIENT4, FRONTEND4)
    };
    let (verdict, out) = dp.xdp(&frame(&v4))?;
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        &out[30..34],
        &BACKEND4.octets(),
        "IPv4 client to the IPv4 backend"
    );
    let v6 = tcp6((CLIENT, 40007), (FRONTEND, 80), TCP_SYN);
    let (verdict, out) = dp.xdp(&frame6(&v6))?;
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(tuple(&out, 14, l4_of(&v6)).1, (BACKEND, 8080));
    assert_eq!(dp.stats(FRONTEND4.into(), 80, Protocol::Tcp)?.new_flows, 1);
    assert_eq!(dp.stats(FRONTEND.into(), 80, Protocol::Tcp)?.new_flows, 1);
    Ok(())
}

/// A router on the client's side.
const ROUTER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 9, 0, 0, 0, 0, 1);

/// Checks an ICMPv6 message's checksum (over the pseudo-header and the
/// whole message) in a frame from [`icmp6_frame`] after translation.
fn assert_icmp6_checksum_valid(f: &[u8]) {
    let ((src, _), (dst, _)) = tuple(f, 14, 54);
    assert_eq!(
        pseudo_checksum6(&src, &dst, ICMPV6, &f[54..]),
        0,
        "ICMPv6 checksum"
    );
}

#[test]
fn a_packet_too_big_for_a_reply_reaches_the_backend_translated() -> Result<()> {
    let dp = Datapath::new()?;
    // The flow: CLIENT → FRONTEND:80 → BACKEND:8080 (local).
    let syn = tcp6((CLIENT, 40010), (FRONTEND, 80), TCP_SYN);
    dp.xdp(&frame6(&syn))?;
    // A router towards the client cannot take a 1500-byte reply, which
    // left as FRONTEND:80 → CLIENT:40010, and says so to FRONTEND.
    let reply = FrameSpec6 {
        payload: 40,
        ..tcp6((FRONTEND, 80), (CLIENT, 40010), TCP_ACK)
    };
    let quoted = frame6(&reply)[14..].to_vec();
    let error = icmp6_frame(ROUTER, FRONTEND, 2, 0, 1280, &quoted);
    let before = dp.global()?.icmp_translated;
    let (verdict, out) = dp.xdp(&error)?;
    assert_eq!(verdict, XDP_PASS);
    // To the backend that sent it, quoting what the backend sent; from the
    // router (the entry does not rewrite sources).
    assert_eq!(tuple(&out, 14, 14).0.0, ROUTER);
    assert_eq!(tuple(&out, 14, 14).1.0, BACKEND);
    assert_eq!(
        tuple(&out, 62, 102),
        ((BACKEND, 8080), (CLIENT, 40010)),
        "the quoted packet is the backend's"
    );
    assert_eq!(&out[58..62], &1280u32.to_be_bytes(), "the MTU is kept");
    assert_icmp6_checksum_valid(&out);
    assert_checksum_valid(&out[..], 62, 102, 6);
    assert_eq!(dp.global()?.icmp_translated, before + 1);
    Ok(())
}

#[test]
fn a_local_backends_port_unreachable_leaves_as_the_frontends() -> Result<()> {
    let dp = Datapath::new()?;
    let udp = FrameSpec6 {
        proto: 17,
        sport: 40011,
        ..FrameSpec6::new(CLIENT, FRONTEND)
    };
    let (_, translated) = dp.xdp(&frame6(&udp))?;
    // The pod answers the translated datagram with port unreachable.
    let error = icmp6_frame(BACKEND, CLIENT, 1, 4, 0, &translated[14..]);
    let (rc, out) = dp.tc("xlb_tc_egress", &error)?;
    assert_eq!(rc, TCX_NEXT);
    assert_eq!(
        (tuple(&out, 14, 14).0.0, tuple(&out, 14, 14).1.0),
        (FRONTEND, CLIENT),
        "from the frontend: no pod address leaves"
    );
    assert_eq!(
        tuple(&out, 62, 102),
        ((CLIENT, 40011), (FRONTEND, 80)),
        "quoting what the client sent"
    );
    assert_icmp6_checksum_valid(&out);
    assert_checksum_valid(&out[..], 62, 102, 17);
    Ok(())
}

#[test]
fn an_error_about_someone_elses_packet_is_left_alone() -> Result<()> {
    let dp = Datapath::new()?;
    let syn = tcp6((CLIENT, 40012), (FRONTEND, 80), TCP_SYN);
    dp.xdp(&frame6(&syn))?;
    let reply = tcp6((FRONTEND, 80), (CLIENT, 40012), TCP_ACK);
    let quoted = frame6(&reply)[14..].to_vec();
    // Addressed to someone who did not send the quoted packet.
    let error = icmp6_frame(ROUTER, NODE, 2, 0, 1280, &quoted);
    let (verdict, out) = dp.xdp(&error)?;
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, error);
    Ok(())
}

#[test]
fn a_source_translated_packet_with_hop_limit_1_is_answered_with_time_exceeded() -> Result<()> {
    let dp = Datapath::new()?;
    let syn = FrameSpec6 {
        hop_limit: 1,
        ..tcp6((CLIENT, 40020), (FRONTEND, SNAT_PORT), TCP_SYN)
    };
    let input = frame6(&syn);
    let (verdict, out) = dp.xdp(&input)?;
    assert_eq!(verdict, 3, "sent back (XDP_TX)");
    assert_eq!(out[14 + 6], ICMPV6);
    assert_eq!(tuple(&out, 14, 14).0.0, FRONTEND);
    assert_eq!(tuple(&out, 14, 14).1.0, CLIENT);
    assert_eq!((out[54], out[55]), (3, 0), "hop limit exceeded in transit");
    assert_icmp6_checksum_valid(&out);
    assert_eq!(
        &out[62..62 + 72],
        &input[14..14 + 72],
        "the client's packet, quoted"
    );
    assert_eq!(dp.global()?.time_exceeded_sent, 1);
    // The same at tcx ingress (uplinks without XDP).
    let other = FrameSpec6 {
        sport: 40021,
        ..syn
    };
    let (rc, out) = dp.tc("xlb_tc_ingress", &frame6(&other))?;
    assert_eq!(rc, 7, "redirected back out (TC_ACT_REDIRECT)");
    assert_eq!((out[54], out[55]), (3, 0));
    assert_icmp6_checksum_valid(&out);
    assert_eq!(dp.global()?.time_exceeded_sent, 2);
    Ok(())
}
