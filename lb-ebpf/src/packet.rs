//! Header layouts and the one-pass parser shared by the XDP and TC hooks.
//! All packet access goes through [`ptr_at`], which bounds-checks against
//! `data_end` in the form the verifier understands.

use lb_common::{Be16, FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP};

use crate::{maps::OFFSET, words::addr_words};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
/// IPv6 extension headers the parser walks (RFC 8200 section 4.1), and
/// "no next header".
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
/// Extension headers walked before giving up (the packet is then passed
/// untouched): real traffic carries one or two; a longer chain is an
/// attempt to make the parser give up, and giving up passes.
const MAX_EXTENSION_HEADERS: usize = 4;
/// The fragment header's offset field (in 8-byte units, high 13 bits).
const IPV6_OFFSET_MASK: u16 = 0xfff8;
/// IPv4 "don't fragment" and "more fragments" flags, and the offset mask.
pub const IPV4_DF: u16 = 0x4000;
pub const IPV4_MF: u16 = 0x2000;
pub const IPV4_OFFSET_MASK: u16 = 0x1fff;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: u16,
}

#[repr(C)]
pub struct VlanHdr {
    pub tci: u16,
    pub ether_type: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    /// Version (4 bits), traffic class, flow label.
    pub vtc_flow: u32,
    pub payload_len: u16,
    pub nexthdr: u8,
    pub hop_limit: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// The first two bytes every walked IPv6 extension header starts with.
#[repr(C)]
struct Ipv6ExtHdr {
    nexthdr: u8,
    /// Length in 8-byte units, not counting the first 8 bytes.
    len: u8,
}

#[repr(C)]
struct Ipv6FragHdr {
    nexthdr: u8,
    reserved: u8,
    frag_off: u16,
    id: u32,
}

pub const IPV6_LEN: usize = core::mem::size_of::<Ipv6Hdr>();

/// The part of TCP and UDP headers both share: the ports.
#[repr(C)]
pub struct Ports {
    pub source: u16,
    pub dest: u16,
}

#[repr(C)]
pub struct TcpHdr {
    pub source: u16,
    pub dest: u16,
    pub seq: u32,
    pub ack_seq: u32,
    /// Data offset (high 4 bits) and reserved bits.
    pub data_offset: u8,
    pub flags: u8,
    pub window: u16,
    pub check: u16,
    pub urg_ptr: u16,
}

#[repr(C)]
pub struct UdpHdr {
    pub source: u16,
    pub dest: u16,
    pub len: u16,
    pub check: u16,
}

// Field offsets, from the header layouts so they cannot drift from them.
pub const IPV4_TTL_OFFSET: usize = core::mem::offset_of!(Ipv4Hdr, ttl);
pub const IPV4_CHECK_OFFSET: usize = core::mem::offset_of!(Ipv4Hdr, check);
pub const IPV4_SADDR_OFFSET: usize = core::mem::offset_of!(Ipv4Hdr, saddr);
pub const IPV4_DADDR_OFFSET: usize = core::mem::offset_of!(Ipv4Hdr, daddr);
pub const IPV6_SADDR_OFFSET: usize = core::mem::offset_of!(Ipv6Hdr, saddr);
pub const IPV6_DADDR_OFFSET: usize = core::mem::offset_of!(Ipv6Hdr, daddr);
pub const PORTS_SOURCE_OFFSET: usize = core::mem::offset_of!(Ports, source);
pub const PORTS_DEST_OFFSET: usize = core::mem::offset_of!(Ports, dest);
pub const TCP_CHECK_OFFSET: usize = core::mem::offset_of!(TcpHdr, check);
pub const UDP_CHECK_OFFSET: usize = core::mem::offset_of!(UdpHdr, check);
/// Offset of the TCP flags byte (FIN=0x01, SYN=0x02, RST=0x04).
pub const TCP_FLAGS_OFFSET: usize = core::mem::offset_of!(TcpHdr, flags);
/// How much of an skb the tc hook pulls into the linear area before parsing:
/// the headers `parse` and `icmp::parse_error` read (Ethernet, a VLAN tag,
/// IPv4, ICMP, the quoted IPv4 header and TCP up to its checksum), or
/// Ethernet, a tag, IPv6, ICMPv6, the quoted IPv6 header and TCP up to its
/// checksum (which also covers 64 bytes of extension headers before TCP).
pub const MAX_HEADERS_LEN: usize = 18 + 40 + 8 + 40 + 20 + 24;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_RST: u8 = 0x04;

/// What `too_big` answers with (`xdp_path`, `tc_path`), beside the MTU in
/// the low 16 bits: the family, and "time exceeded" instead of "too big".
pub const ANSWER_V6: u32 = 1 << 16;
pub const ANSWER_TIME_EXCEEDED: u32 = 1 << 17;

/// Why a packet is not translated.
pub enum Skip {
    /// Not IPv4 or IPv6 TCP/UDP (or an IPv6 header chain the parser does not
    /// walk to its end): pass it on untouched.
    NotIpv4L4,
    /// Shorter than its headers claim.
    Malformed,
    /// IPv4 with options, or an IPv6 first fragment or routing header: the
    /// ports are known (in the key) but xlb does not translate it. Passed unless it is for a frontend, then dropped and
    /// counted.
    Unsupported(FlowKey),
    /// A later fragment (IPv4 header at this offset): no ports to look at;
    /// translated only like its first fragment was (`fragments.rs`).
    Fragment(usize),
    /// IPv4 ICMP; the header starts at this offset. Errors that quote a
    /// translated flow are the business of `icmp.rs`.
    Icmp(usize),
    /// ICMPv6 right after the fixed IPv6 header, which starts at this
    /// offset. Errors that quote a translated flow are the business of
    /// `icmp6.rs`; neighbour discovery and the rest pass untouched.
    Icmp6(usize),
}

/// A parsed IPv4 TCP/UDP packet: offsets from the start of the frame and the
/// flow key as seen on the wire.
pub struct Parsed {
    pub l3: usize,
    /// The "don't fragment" flag is set.
    pub df: bool,
    pub l4: usize,
    pub key: FlowKey,
    pub tcp_flags: u8,
    pub ip_len: u16,
    /// The first fragment of a datagram (more fragments follow): what it is
    /// translated to is remembered for them.
    pub first_fragment: bool,
    /// The IP id as on the wire.
    pub ip_id: u16,
    /// TTL (IPv4) or hop limit (IPv6) as it arrived.
    pub ttl: u8,
}

impl Parsed {
    /// The IP id and protocol as `fragments::remember` takes them.
    #[inline(always)]
    pub fn id_proto(&self) -> u32 {
        self.ip_id as u32 | (self.key.proto as u32) << 16
    }
}

#[inline(always)]
pub fn ptr_at<T>(data: usize, data_end: usize, offset: usize) -> Result<*mut T, Skip> {
    let start = data + offset;
    if start + core::mem::size_of::<T>() > data_end {
        return Err(Skip::Malformed);
    }
    Ok(start as *mut T)
}

/// The network layer of a frame: where its header starts, after Ethernet
/// and at most one 802.1Q/802.1ad tag, and its EtherType. The hooks split
/// here into one subprogram per family, so that neither family's parsing
/// and rewriting adds to the other's stack frame (the new-flow call chain
/// shares the 512-byte limit with it) or to its verification.
#[inline(always)]
pub fn network(data: usize, data_end: usize) -> Result<(usize, u16), Skip> {
    let eth: *mut EthHdr = ptr_at(data, data_end, 0)?;
    let mut l3 = core::mem::size_of::<EthHdr>();
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let vlan: *mut VlanHdr = ptr_at(data, data_end, l3)?;
        ether_type = u16::from_be(unsafe { (*vlan).ether_type });
        l3 += core::mem::size_of::<VlanHdr>();
    }
    Ok((l3, ether_type))
}

/// Parses an IPv4 packet (see [`network`]): the header at `l3` (no options), then TCP or
/// UDP.
#[inline(always)]
pub fn parse_v4(data: usize, data_end: usize, l3: usize) -> Result<Parsed, Skip> {
    let ip: *mut Ipv4Hdr = ptr_at(data, data_end, l3)?;
    let (version_ihl, protocol, frag_off) = unsafe {
        (
            (*ip).version_ihl,
            (*ip).protocol,
            u16::from_be((*ip).frag_off),
        )
    };
    if protocol == PROTO_ICMP {
        return Err(Skip::Icmp(l3));
    }
    if protocol != PROTO_TCP && protocol != PROTO_UDP {
        return Err(Skip::NotIpv4L4);
    }
    if version_ihl >> 4 != 4 {
        return Err(Skip::Malformed);
    }
    // Fragment offset set: a later fragment, it carries no L4 header.
    if frag_off & IPV4_OFFSET_MASK != 0 {
        return Err(Skip::Fragment(l3));
    }
    let ihl = (version_ihl & 0x0f) as usize;
    if ihl < 5 {
        return Err(Skip::Malformed);
    }
    let l4 = l3 + ihl * 4;
    let ports: *mut Ports = ptr_at(data, data_end, l4)?;
    let mut tcp_flags = 0;
    if protocol == PROTO_TCP {
        // A TCP header is at least 20 bytes; make sure the checksum and flags
        // are inside the packet before anyone reads them.
        let flags: *mut u8 = ptr_at(data, data_end, l4 + TCP_FLAGS_OFFSET)?;
        let _: *mut u16 = ptr_at(data, data_end, l4 + TCP_CHECK_OFFSET)?;
        tcp_flags = unsafe { *flags };
    } else {
        let _: *mut u16 = ptr_at(data, data_end, l4 + UDP_CHECK_OFFSET)?;
    }
    let key = unsafe {
        FlowKey {
            src_addr: v4_addr((*ip).saddr),
            dst_addr: v4_addr((*ip).daddr),
            src_port: Be16::from_wire((*ports).source),
            dst_port: Be16::from_wire((*ports).dest),
            proto: protocol,
            family: FAMILY_V4,
            _pad: [0; 2],
        }
    };
    // IP options: the key is known, translating is not supported.
    if ihl != 5 {
        return Err(Skip::Unsupported(key));
    }
    let (ip_len, ip_id, ttl) = unsafe { (u16::from_be((*ip).tot_len), (*ip).id, (*ip).ttl) };
    // A total length that does not even cover the headers read is a lie;
    // one longer than the frame is checked by the hook, which knows the
    // packet's full length.
    let l4_needed = if protocol == PROTO_TCP {
        TCP_CHECK_OFFSET + 2
    } else {
        UDP_CHECK_OFFSET + 2
    };
    if (ip_len as usize) < ihl * 4 + l4_needed {
        return Err(Skip::Malformed);
    }
    Ok(Parsed {
        l3,
        df: frag_off & IPV4_DF != 0,
        l4,
        key,
        tcp_flags,
        ip_len,
        first_fragment: frag_off & IPV4_MF != 0,
        ip_id,
        ttl,
    })
}

/// Parses an IPv6 packet (see [`network`]): the fixed header at `l3`, then at most
/// [`MAX_EXTENSION_HEADERS`] hop-by-hop, destination-options, routing or
/// fragment headers, then TCP or UDP.
#[inline(always)]
pub fn parse_v6(data: usize, data_end: usize, l3: usize) -> Result<Parsed, Skip> {
    let ip: *mut Ipv6Hdr = ptr_at(data, data_end, l3)?;
    let (version, payload_len, mut next, ttl) = unsafe {
        (
            *(ip as *const u8) >> 4,
            u16::from_be((*ip).payload_len),
            (*ip).nexthdr,
            (*ip).hop_limit,
        )
    };
    if version != 6 {
        return Err(Skip::Malformed);
    }
    let mut l4 = l3 + IPV6_LEN;
    let mut unsupported = false;
    if is_extension(next) {
        let walked = walk_extensions(data, data_end, l4, next);
        if walked == WALK_MALFORMED {
            return Err(Skip::Malformed);
        }
        if walked == WALK_LATER_FRAGMENT {
            // A later fragment: no ports to look at. Its first fragment
            // was dropped if it was for a frontend, so the kernel can
            // never reassemble the datagram.
            return Err(Skip::NotIpv4L4);
        }
        l4 = (walked & 0xffff) as usize;
        next = (walked >> 16) as u8;
        unsupported = walked & WALK_UNSUPPORTED != 0;
    }
    // ICMPv6 after extension headers is left alone (never translated).
    if next == PROTO_ICMPV6 && l4 != l3 + IPV6_LEN {
        return Err(Skip::NotIpv4L4);
    }
    // From here on the offsets are two unknown values (see
    // `opaque_offsets`), whatever tag and extension headers led here.
    let (l3, l4) = opaque_offsets(l3, l4)?;
    if next == PROTO_ICMPV6 {
        return Err(Skip::Icmp6(l3));
    }
    if next != PROTO_TCP && next != PROTO_UDP {
        return Err(Skip::NotIpv4L4);
    }
    let ports: *mut Ports = ptr_at(data, data_end, l4)?;
    let mut tcp_flags = 0;
    if next == PROTO_TCP {
        let flags: *mut u8 = ptr_at(data, data_end, l4 + TCP_FLAGS_OFFSET)?;
        let _: *mut u16 = ptr_at(data, data_end, l4 + TCP_CHECK_OFFSET)?;
        tcp_flags = unsafe { *flags };
    } else {
        let check: *mut u16 = ptr_at(data, data_end, l4 + UDP_CHECK_OFFSET)?;
        // UDP over IPv6 must carry a checksum (RFC 8200 section 8.1); the
        // kernel drops a 0, and so is never handed a translated one.
        if unsafe { *check } == 0 && !unsupported {
            return Err(Skip::Malformed);
        }
    }
    // Addresses by words: a 16-byte copy out of the packet becomes a
    // bytewise `memmove`.
    let key = unsafe {
        FlowKey {
            src_addr: core::mem::transmute::<[u32; 4], [u8; 16]>(addr_words(&(*ip).saddr)),
            dst_addr: core::mem::transmute::<[u32; 4], [u8; 16]>(addr_words(&(*ip).daddr)),
            src_port: Be16::from_wire((*ports).source),
            dst_port: Be16::from_wire((*ports).dest),
            proto: next,
            family: FAMILY_V6,
            _pad: [0; 2],
        }
    };
    if unsupported {
        return Err(Skip::Unsupported(key));
    }
    let l4_needed = if next == PROTO_TCP {
        TCP_CHECK_OFFSET + 2
    } else {
        UDP_CHECK_OFFSET + 2
    };
    // A payload length that does not cover the headers read is a lie (and
    // 0, a jumbogram, is one here too).
    let headers = l4 - l3 - IPV6_LEN;
    if (payload_len as usize) < headers + l4_needed {
        return Err(Skip::Malformed);
    }
    Ok(Parsed {
        l3,
        // Routers never fragment IPv6: every packet is "don't fragment".
        df: true,
        l4,
        key,
        tcp_flags,
        ip_len: payload_len.saturating_add(IPV6_LEN as u16),
        first_fragment: false,
        ip_id: 0,
        ttl,
    })
}

const WALK_MALFORMED: u64 = u64::MAX;
const WALK_LATER_FRAGMENT: u64 = u64::MAX - 1;
/// Set by a fragment header (a first fragment: later ones pass) or a
/// routing header (the checksum's pseudo-header then names the final
/// destination, not the one on the wire): the tuple is known, the packet
/// is not translated.
const WALK_UNSUPPORTED: u64 = 1 << 32;

#[inline(always)]
fn is_extension(next: u8) -> bool {
    next == NEXTHDR_HOP
        || next == NEXTHDR_DEST
        || next == NEXTHDR_ROUTING
        || next == NEXTHDR_FRAGMENT
}

/// Walks the extension headers from `l4` on, `next` being the first's
/// type: the offset after them (low 16 bits), the header that follows
/// (next 8 bits) and [`WALK_UNSUPPORTED`]; or [`WALK_MALFORMED`] /
/// [`WALK_LATER_FRAGMENT`]. A subprogram of its own that returns a
/// scalar: the unrolled walk's registers spill into its frame, not the
/// hook's.
#[inline(never)]
fn walk_extensions(data: usize, data_end: usize, l4: usize, next: u8) -> u64 {
    walk(data, data_end, l4, next).unwrap_or(WALK_MALFORMED)
}

#[inline(always)]
fn walk(data: usize, data_end: usize, mut l4: usize, mut next: u8) -> Result<u64, Skip> {
    let mut unsupported = false;
    for _ in 0..MAX_EXTENSION_HEADERS {
        if next == NEXTHDR_FRAGMENT {
            let frag: *mut Ipv6FragHdr = ptr_at(data, data_end, l4)?;
            let (nexthdr, frag_off) = unsafe { ((*frag).nexthdr, u16::from_be((*frag).frag_off)) };
            if frag_off & IPV6_OFFSET_MASK != 0 {
                return Ok(WALK_LATER_FRAGMENT);
            }
            unsupported = true;
            next = nexthdr;
            l4 += core::mem::size_of::<Ipv6FragHdr>();
        } else if next == NEXTHDR_HOP || next == NEXTHDR_DEST || next == NEXTHDR_ROUTING {
            let ext: *mut Ipv6ExtHdr = ptr_at(data, data_end, l4)?;
            let (nexthdr, len) = unsafe { ((*ext).nexthdr, (*ext).len) };
            if next == NEXTHDR_ROUTING {
                unsupported = true;
            }
            next = nexthdr;
            l4 += (len as usize + 1) * 8;
        } else {
            break;
        }
    }
    Ok(l4 as u64 | (next as u64) << 16 | if unsupported { WALK_UNSUPPORTED } else { 0 })
}

/// The network and transport offsets of an IPv6 packet, as the verifier
/// will see them from here on: any values below 32 and 16 KiB. Every
/// combination of a VLAN tag and walked extension headers gives the
/// offsets different known values, and the verifier would check all the
/// code after the parse once per combination (which took it past half a
/// million instructions); read back from a map, they are unknown values
/// and that code is checked once. Costs one per-CPU array access.
#[inline(always)]
fn opaque_offsets(l3: usize, l4: usize) -> Result<(usize, usize), Skip> {
    let slot = OFFSET.get_ptr_mut(0).ok_or(Skip::Malformed)?;
    let read = unsafe {
        core::ptr::write_volatile(slot, (l3 << 16 | l4) as u32);
        core::ptr::read_volatile(slot) as usize
    };
    Ok(((read >> 16) & 0x1f, read & 0x3fff))
}

/// A raw (network-order) IPv4 address as the 16-byte address of a map key,
/// the rest zero. Built as four words: zeroing the tail bytewise becomes a
/// call to the BPF `memset`, a byte loop that cost every packet ~25 ns.
#[inline(always)]
pub fn v4_addr(raw: u32) -> [u8; 16] {
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>([raw, 0, 0, 0]) }
}

/// First four bytes of a 16-byte address as the raw (network-order) u32 a
/// header holds.
#[inline(always)]
pub fn v4_raw(addr: &[u8; 16]) -> u32 {
    u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]])
}
