//! Crafted frames for XDP programs: a frame builder (Ethernet, optional
//! 802.1Q tag, IPv4 with options, TCP SYN or UDP), the Internet checksum,
//! and a `BPF_PROG_TEST_RUN` wrapper over aya's [`TestRun`].

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use anyhow::{Context, Result};
use aya::programs::{SchedClassifier, TestRun, TestRunAttrs, TestRunOptions, Xdp};

/// The Internet checksum (RFC 1071) of `bytes`.
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in bytes.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            (c[0] as u16) << 8
        };
        sum += w as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The checksum over the IPv4 pseudo-header (RFC 793, RFC 768) and `l4`
/// (0 when `l4` already holds a correct checksum).
pub fn pseudo_checksum(src: &Ipv4Addr, dst: &Ipv4Addr, proto: u8, l4: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(l4);
    checksum(&pseudo)
}

/// The L4 checksum to send: a computed 0 goes out as 0xffff for UDP,
/// where 0 means "no checksum" (RFC 768).
pub fn l4_checksum(src: &Ipv4Addr, dst: &Ipv4Addr, proto: u8, l4: &[u8]) -> u16 {
    let c = pseudo_checksum(src, dst, proto, l4);
    if proto == 17 && c == 0 { 0xffff } else { c }
}

/// What [`frame`] builds: Ethernet (optionally 802.1Q-tagged) + IPv4 (+
/// NOP options) + a TCP SYN or a UDP datagram from `src`:40000, with
/// correct checksums.
#[derive(Clone, Debug)]
pub struct FrameSpec {
    pub vlan: Option<u16>,
    /// Bytes of IPv4 options (a multiple of 4).
    pub options: usize,
    /// Flags and fragment offset, as on the wire.
    pub frag: u16,
    /// 6 (TCP) or 17 (UDP).
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    /// TCP only: the flags byte (SYN by default).
    pub tcp_flags: u8,
    /// UDP only: false sends checksum 0 (none).
    pub udp_checksum: bool,
    pub payload: usize,
}

impl FrameSpec {
    /// A UDP datagram with a 16-byte payload from `src` to `dst`:80, DF set.
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr) -> FrameSpec {
        FrameSpec {
            vlan: None,
            options: 0,
            frag: 0x4000, // DF
            proto: 17,
            src,
            dst,
            sport: 40000,
            dport: 80,
            tcp_flags: TCP_SYN,
            udp_checksum: true,
            payload: 16,
        }
    }
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The frame `spec` describes.
pub fn frame(spec: &FrameSpec) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    if let Some(vid) = spec.vlan {
        f.extend_from_slice(&[0x81, 0x00]);
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&[0x08, 0x00]);
    let l4_len = if spec.proto == 6 { 20 } else { 8 } + spec.payload;
    let ihl = 5 + spec.options / 4;
    let mut ip = vec![(0x40 | ihl) as u8, 0];
    ip.extend_from_slice(&((ihl * 4 + l4_len) as u16).to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34]);
    ip.extend_from_slice(&spec.frag.to_be_bytes());
    ip.extend_from_slice(&[64, spec.proto, 0, 0]);
    ip.extend_from_slice(&spec.src.octets());
    ip.extend_from_slice(&spec.dst.octets());
    ip.extend(std::iter::repeat_n(1u8, spec.options)); // NOP options
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut l4 = Vec::new();
    l4.extend_from_slice(&spec.sport.to_be_bytes());
    l4.extend_from_slice(&spec.dport.to_be_bytes());
    if spec.proto == 6 {
        l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, spec.tcp_flags, 0xff, 0xff]);
        l4.extend_from_slice(&[0, 0, 0, 0]);
    } else {
        l4.extend_from_slice(&(l4_len as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
    }
    l4.extend(std::iter::repeat_n(0xabu8, spec.payload));
    let check_at = if spec.proto == 6 { 16 } else { 6 };
    if spec.proto == 6 || spec.udp_checksum {
        let c = l4_checksum(&spec.src, &spec.dst, spec.proto, &l4);
        l4[check_at..check_at + 2].copy_from_slice(&c.to_be_bytes());
    }
    f.extend_from_slice(&ip);
    f.extend_from_slice(&l4);
    f
}

/// An ICMP message (`kind`, `code`, the 4 bytes after the checksum as
/// `rest`: the next-hop MTU of "fragmentation needed" in its low half) from
/// `src` to `dst` quoting `quoted` (an IPv4 packet, or its first bytes),
/// framed like [`frame`]'s, with correct checksums.
pub fn icmp_frame(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    kind: u8,
    code: u8,
    rest: u32,
    quoted: &[u8],
) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + 8 + quoted.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0x56, 0x78, 0, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut icmp = vec![kind, code, 0, 0];
    icmp.extend_from_slice(&rest.to_be_bytes());
    icmp.extend_from_slice(quoted);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

/// Runs a tc program once on `frame` through aya's `TestRun`: (return
/// value, frame as it left).
pub fn test_run_tc(program: &SchedClassifier, frame: &[u8]) -> Result<(i32, Vec<u8>)> {
    test_run_tc_from(program, frame, None)
}

/// [`test_run_tc`] with the skb's `ingress_ifindex` set (the kernel then
/// runs it on that device; 1 is loopback).
pub fn test_run_tc_from(
    program: &SchedClassifier,
    frame: &[u8],
    ingress_ifindex: Option<u32>,
) -> Result<(i32, Vec<u8>)> {
    // `struct __sk_buff` (kernel uapi) up to `ifindex`: len, pkt_type,
    // mark, queue_mapping, protocol, vlan_present, vlan_tci, vlan_proto,
    // priority, ingress_ifindex, ifindex; the kernel takes a prefix.
    let context: Option<Vec<u8>> = ingress_ifindex.map(|ifindex| {
        [0u32, 0, 0, 0, 0, 0, 0, 0, 0, ifindex, ifindex]
            .iter()
            .flat_map(|field| field.to_ne_bytes())
            .collect()
    });
    let mut out = vec![0u8; frame.len() + HEADROOM_OUT];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(out.as_mut_slice()),
            ctx_in: context.as_deref(),
            ctx_out: None,
            repeat: 1,
            attrs: TestRunAttrs::new(),
        })
        .context("BPF_PROG_TEST_RUN (tc)")?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value as i32, out))
}

/// How to run an XDP program with `BPF_PROG_TEST_RUN`.
#[derive(Clone, Copy, Debug)]
pub struct TestRunSpec {
    /// Runs of the program on the frame in one call.
    pub repeat: u32,
    /// Live frames (`BPF_F_TEST_XDP_LIVE_FRAMES`) in batches of this many:
    /// redirected frames really leave through their device.
    pub live_batch: Option<u32>,
    /// `xdp_md.ingress_ifindex` the program sees.
    pub ingress_ifindex: u32,
}

impl TestRunSpec {
    /// One run, frame returned, arriving on interface 1 (loopback).
    pub const ONCE: TestRunSpec = TestRunSpec {
        repeat: 1,
        live_batch: None,
        ingress_ifindex: 1,
    };
}

/// What one `BPF_PROG_TEST_RUN` call reported.
#[derive(Clone, Debug)]
pub struct TestRunOutcome {
    /// The program's return value (the XDP verdict).
    pub verdict: u32,
    /// Mean time per repetition, as the kernel measured it.
    pub per_run: Duration,
    /// The frame as the program left it (empty with live frames, where
    /// frames leave through a device).
    pub frame: Vec<u8>,
}

/// Room for a program that grows the frame (encapsulation, VLAN push).
const HEADROOM_OUT: usize = 256;

/// Runs `program` on `frame` through aya's `TestRun`.
pub fn test_run(program: &Xdp, frame: &[u8], spec: TestRunSpec) -> Result<TestRunOutcome> {
    // `struct xdp_md` (kernel uapi) as ctx_in: data, data_end, data_meta,
    // ingress_ifindex, rx_queue_index, egress_ifindex.
    let context: Vec<u8> = [0, frame.len() as u32, 0, spec.ingress_ifindex, 0, 0]
        .iter()
        .flat_map(|field: &u32| field.to_ne_bytes())
        .collect();
    let mut out = vec![
        0u8;
        if spec.live_batch.is_some() {
            0
        } else {
            frame.len() + HEADROOM_OUT
        }
    ];
    let attrs = match spec.live_batch {
        Some(batch) => TestRunAttrs::new().xdp_live_frames(batch),
        None => TestRunAttrs::new(),
    };
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: (!out.is_empty()).then_some(out.as_mut_slice()),
            ctx_in: Some(&context),
            ctx_out: None,
            repeat: spec.repeat,
            attrs,
        })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(result.data_size_out as usize);
    Ok(TestRunOutcome {
        verdict: result.return_value,
        per_run: result.duration,
        frame: out,
    })
}

/// Splits the unfragmented IPv4 packet of `frame` (its header at `l3`,
/// without options) into a first fragment carrying the first `at` bytes of
/// its payload (a multiple of 8) and a later fragment carrying the rest,
/// as a router would: same id, MF on the first, offset on the later one,
/// header checksums recomputed.
pub fn fragments(frame: &[u8], l3: usize, at: usize) -> (Vec<u8>, Vec<u8>) {
    assert_eq!(at % 8, 0, "fragment offsets count 8-byte units");
    assert_eq!(frame[l3] & 0x0f, 5, "no IP options");
    let payload = &frame[l3 + 20..];
    assert!(at < payload.len(), "both fragments carry payload");
    let piece = |bytes: &[u8], frag: u16| {
        let mut f = frame[..l3 + 20].to_vec();
        f[l3 + 2..l3 + 4].copy_from_slice(&((20 + bytes.len()) as u16).to_be_bytes());
        f[l3 + 6..l3 + 8].copy_from_slice(&frag.to_be_bytes());
        f[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
        let c = checksum(&f[l3..l3 + 20]);
        f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(bytes);
        f
    };
    (
        piece(&payload[..at], 0x2000),
        piece(&payload[at..], (at / 8) as u16),
    )
}

/// `frame` with the IPv4 id (header at `l3`) set to `id`, header checksum
/// recomputed.
pub fn with_ip_id(frame: &[u8], l3: usize, id: u16) -> Vec<u8> {
    let mut f = frame.to_vec();
    let ihl = (f[l3] & 0x0f) as usize * 4;
    f[l3 + 4..l3 + 6].copy_from_slice(&id.to_be_bytes());
    f[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
    let c = checksum(&f[l3..l3 + ihl]);
    f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    f
}

/// The checksum over the IPv6 pseudo-header (RFC 8200 section 8.1) and
/// `l4` (0 when `l4` already holds a correct checksum).
pub fn pseudo_checksum6(src: &Ipv6Addr, dst: &Ipv6Addr, proto: u8, l4: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, proto]);
    pseudo.extend_from_slice(l4);
    checksum(&pseudo)
}

/// What [`frame6`] builds: Ethernet (optionally 802.1Q-tagged) + IPv6 (+
/// extension headers) + a TCP segment or a UDP datagram, with a correct
/// checksum unless told otherwise.
#[derive(Clone, Debug)]
pub struct FrameSpec6 {
    pub vlan: Option<u16>,
    /// Extension headers before the L4 header, each as (type, bytes): the
    /// builder chains them and fills in each one's next-header byte.
    pub extensions: Vec<(u8, Vec<u8>)>,
    /// 6 (TCP) or 17 (UDP).
    pub proto: u8,
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub sport: u16,
    pub dport: u16,
    /// TCP only: the flags byte.
    pub tcp_flags: u8,
    /// UDP only: false sends checksum 0 (invalid over IPv6).
    pub udp_checksum: bool,
    pub payload: usize,
    pub hop_limit: u8,
}

impl FrameSpec6 {
    /// A TCP SYN with a 16-byte payload from `src`:40000 to `dst`:80.
    pub fn new(src: Ipv6Addr, dst: Ipv6Addr) -> FrameSpec6 {
        FrameSpec6 {
            vlan: None,
            extensions: Vec::new(),
            proto: 6,
            src,
            dst,
            sport: 40000,
            dport: 80,
            tcp_flags: TCP_SYN,
            udp_checksum: true,
            payload: 16,
            hop_limit: 64,
        }
    }
}

/// A hop-by-hop or destination-options header of 8 bytes (PadN only), as
/// [`FrameSpec6::extensions`] takes it.
pub fn padding_options() -> Vec<u8> {
    vec![0, 0, 1, 4, 0, 0, 0, 0]
}

/// A fragment header (offset in 8-byte units, more-fragments flag).
pub fn fragment_header(offset: u16, more: bool) -> Vec<u8> {
    let field = (offset << 3) | more as u16;
    let mut h = vec![0, 0];
    h.extend_from_slice(&field.to_be_bytes());
    h.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    h
}

/// Offset of the IPv6 header in a [`frame6`] frame.
pub fn l3_of(spec: &FrameSpec6) -> usize {
    if spec.vlan.is_some() { 18 } else { 14 }
}

/// Offset of the L4 header in a [`frame6`] frame.
pub fn l4_of(spec: &FrameSpec6) -> usize {
    l3_of(spec) + 40 + spec.extensions.iter().map(|(_, b)| b.len()).sum::<usize>()
}

/// The frame `spec` describes.
pub fn frame6(spec: &FrameSpec6) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    if let Some(vid) = spec.vlan {
        f.extend_from_slice(&[0x81, 0x00]);
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&[0x86, 0xdd]);
    let mut l4 = Vec::new();
    l4.extend_from_slice(&spec.sport.to_be_bytes());
    l4.extend_from_slice(&spec.dport.to_be_bytes());
    let l4_len = if spec.proto == 6 { 20 } else { 8 } + spec.payload;
    if spec.proto == 6 {
        l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, spec.tcp_flags, 0xff, 0xff]);
        l4.extend_from_slice(&[0, 0, 0, 0]);
    } else {
        l4.extend_from_slice(&(l4_len as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
    }
    l4.extend(std::iter::repeat_n(0xabu8, spec.payload));
    let check_at = if spec.proto == 6 { 16 } else { 6 };
    if spec.proto == 6 || spec.udp_checksum {
        let c = pseudo_checksum6(&spec.src, &spec.dst, spec.proto, &l4);
        let c = if spec.proto == 17 && c == 0 {
            0xffff
        } else {
            c
        };
        l4[check_at..check_at + 2].copy_from_slice(&c.to_be_bytes());
    }
    let mut chain = Vec::new();
    for (i, (_, bytes)) in spec.extensions.iter().enumerate() {
        let mut h = bytes.clone();
        h[0] = spec.extensions.get(i + 1).map_or(spec.proto, |(t, _)| *t);
        chain.extend_from_slice(&h);
    }
    let first = spec.extensions.first().map_or(spec.proto, |(t, _)| *t);
    let payload_len = chain.len() + l4.len();
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(payload_len as u16).to_be_bytes());
    f.extend_from_slice(&[first, spec.hop_limit]);
    f.extend_from_slice(&spec.src.octets());
    f.extend_from_slice(&spec.dst.octets());
    f.extend_from_slice(&chain);
    f.extend_from_slice(&l4);
    f
}

/// An ICMPv6 error (`kind`, `code`, the 4 bytes after the checksum as
/// `rest`: the MTU of "packet too big") from `src` to `dst` quoting
/// `quoted` (an IPv6 packet, or its first bytes), in an Ethernet frame,
/// with a correct checksum.
pub fn icmp6_frame(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    kind: u8,
    code: u8,
    rest: u32,
    quoted: &[u8],
) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x86, 0xdd];
    let mut icmp = vec![kind, code, 0, 0];
    icmp.extend_from_slice(&rest.to_be_bytes());
    icmp.extend_from_slice(quoted);
    let c = pseudo_checksum6(&src, &dst, 58, &icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 64]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&icmp);
    f
}

/// An Ethernet ARP request (RFC 826) from `sender` (MAC, IPv4) asking for
/// `target`, broadcast and padded to the 60-byte Ethernet minimum.
pub fn arp_request(sender_mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f.resize(60, 0);
    f
}

/// The solicited-node multicast group of `target` (RFC 4291 2.7.1).
pub fn solicited_node(target: Ipv6Addr) -> Ipv6Addr {
    let t = target.octets();
    Ipv6Addr::from([
        0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, t[13], t[14], t[15],
    ])
}

/// An Ethernet IPv6 neighbour solicitation (RFC 4861 4.3) for `target`
/// from `src` (`sender_mac`), hop limit 255, with a correct checksum: to
/// the solicited-node group with the source link-layer option when
/// `multicast`, else unicast to `target` without options.
pub fn neighbour_solicitation(
    sender_mac: [u8; 6],
    src: Ipv6Addr,
    target: Ipv6Addr,
    multicast: bool,
) -> Vec<u8> {
    let dst = if multicast {
        solicited_node(target)
    } else {
        target
    };
    let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&target.octets());
    if multicast {
        icmp.extend_from_slice(&[1, 1]);
        icmp.extend_from_slice(&sender_mac);
    }
    let check = pseudo_checksum6(&src, &dst, 58, &icmp);
    icmp[2..4].copy_from_slice(&check.to_be_bytes());
    let dst_mac = if multicast {
        let d = dst.octets();
        [0x33, 0x33, d[12], d[13], d[14], d[15]]
    } else {
        [0x02, 0, 0, 0, 0, 0xaa]
    };
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&icmp);
    f
}
