//! ICMPv6 errors of translated flows, `icmp.rs`'s IPv6 twin: an error
//! (destination unreachable, packet too big, time exceeded) that quotes a
//! packet of a translated flow is translated so it reaches the flow's other
//! end, and a translated packet too big for its route is answered with a
//! "packet too big" from the frontend (IPv6 routers never fragment, so
//! without it a smaller-MTU link is a black hole). Neighbour discovery and
//! everything else of ICMPv6 is never touched.
//!
//! Simplifications, both passed untouched: errors whose outer or quoted
//! packet carries extension headers.

use lb_common::{Be16, FAMILY_V6, Flow, FlowKey, PROTO_TCP, PROTO_UDP};

use crate::{
    checksum::CsumDelta,
    icmp::{self, fold, sum},
    packet::{
        IPV6_LEN, Ipv6Hdr, PROTO_ICMPV6, Ports, Skip, TCP_CHECK_OFFSET, UDP_CHECK_OFFSET, ptr_at,
    },
    words,
};

pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Icmp6Hdr {
    pub kind: u8,
    pub code: u8,
    pub check: u16,
    /// The MTU of "packet too big"; unused (0) in the other errors.
    pub mtu: u32,
}

const ICMP6_LEN: usize = core::mem::size_of::<Icmp6Hdr>();

/// Offsets, from the outer IPv6 header, of what a translation writes.
pub const OUTER_SADDR: usize = core::mem::offset_of!(Ipv6Hdr, saddr);
pub const OUTER_DADDR: usize = core::mem::offset_of!(Ipv6Hdr, daddr);
pub const ICMP_CHECK: usize = IPV6_LEN + core::mem::offset_of!(Icmp6Hdr, check);
pub const INNER_SADDR: usize = IPV6_LEN + ICMP6_LEN + OUTER_SADDR;
pub const INNER_DADDR: usize = IPV6_LEN + ICMP6_LEN + OUTER_DADDR;
pub const INNER_PORTS: usize = 2 * IPV6_LEN + ICMP6_LEN;

/// Parses the ICMPv6 message of the IPv6 packet at `l3` (ICMPv6 right after
/// the fixed header): an error quoting a TCP or UDP packet whose sender it
/// is addressed to gives the key an answer to the quoted packet hits;
/// anything else is `NotIpv4L4`, never translated.
#[inline(always)]
pub fn parse_error(data: usize, data_end: usize, l3: usize) -> Result<FlowKey, Skip> {
    let ip: *mut Ipv6Hdr = ptr_at(data, data_end, l3)?;
    let icmp: *mut Icmp6Hdr = ptr_at(data, data_end, l3 + IPV6_LEN)?;
    let inner: *mut Ipv6Hdr = ptr_at(data, data_end, l3 + IPV6_LEN + ICMP6_LEN)?;
    // Every error quotes at least the ports (and UDP's checksum).
    let _: *mut [u8; 8] = ptr_at(data, data_end, l3 + INNER_PORTS)?;
    let ports: *mut Ports = ptr_at(data, data_end, l3 + INNER_PORTS)?;
    unsafe {
        let kind = (*icmp).kind;
        if (*ip).nexthdr != PROTO_ICMPV6
            || (kind != ICMPV6_DEST_UNREACH
                && kind != ICMPV6_PACKET_TOO_BIG
                && kind != ICMPV6_TIME_EXCEEDED)
        {
            return Err(Skip::NotIpv4L4);
        }
        let proto = (*inner).nexthdr;
        let outer_dst = words::addr_words(&(*ip).daddr);
        let inner_src = words::addr_words(&(*inner).saddr);
        // An error about someone else's packet is not ours to deliver.
        if (proto != PROTO_TCP && proto != PROTO_UDP) || outer_dst != inner_src {
            return Err(Skip::NotIpv4L4);
        }
        let inner_dst = words::addr_words(&(*inner).daddr);
        Ok(FlowKey {
            src_addr: core::mem::transmute::<[u32; 4], [u8; 16]>(inner_dst),
            dst_addr: core::mem::transmute::<[u32; 4], [u8; 16]>(inner_src),
            src_port: Be16::from_wire((*ports).dest),
            dst_port: Be16::from_wire((*ports).source),
            proto,
            family: FAMILY_V6,
            _pad: [0; 2],
        })
    }
}

/// The checksums of a translated error (the addresses and ports come from
/// the flow entry as they are written): the ICMPv6 checksum, whose
/// pseudo-header covers the outer addresses; the quoted L4 checksum when
/// quoted; and whether the error's source becomes the entry's source.
pub struct ErrorChecks {
    pub icmp_check: u16,
    /// The quoted L4 checksum's offset (from the outer header) and new
    /// value; offset 0 when it is not quoted.
    pub l4_check_at: usize,
    pub l4_check: u16,
    /// The entry rewrites the source (a reply entry, or SNAT): the error
    /// then comes from the entry's source, so no backend or router address
    /// behind xlb shows.
    pub from_entry_source: bool,
}

/// Works out the translation of the error at `l3` for the flow entry
/// `entry` that its key hit, as `icmp::error_rewrite` does for IPv4: the
/// quoted packet becomes what the other end sent (source `entry.dst`,
/// destination `entry.src`), the error goes to that end (`entry.dst`).
/// Word by word, straight from the packet and the entry: sixteen address
/// copies would not fit the stack.
#[inline(always)]
pub fn error_rewrite(
    data: usize,
    data_end: usize,
    l3: usize,
    key: &FlowKey,
    entry: &Flow,
) -> Result<ErrorChecks, Skip> {
    let ip: *mut Ipv6Hdr = ptr_at(data, data_end, l3)?;
    let icmp: *mut Icmp6Hdr = ptr_at(data, data_end, l3 + IPV6_LEN)?;
    let inner: *mut Ipv6Hdr = ptr_at(data, data_end, l3 + IPV6_LEN + ICMP6_LEN)?;
    let inner_l4 = l3 + INNER_PORTS;
    let ports: *mut Ports = ptr_at(data, data_end, inner_l4)?;
    let from_entry_source = entry.src_addr != key.src_addr;
    let word = |addr: &[u8; 16], i: usize| unsafe {
        core::ptr::read_volatile((addr.as_ptr() as *const u32).add(i))
    };
    let mut quoted = CsumDelta::new();
    let mut icmp_delta = CsumDelta::new();
    unsafe {
        for i in 0..4 {
            let (old_src, new_src) = (word(&(*inner).saddr, i), word(&entry.dst_addr, i));
            let (old_dst, new_dst) = (word(&(*inner).daddr, i), word(&entry.src_addr, i));
            quoted.dword(old_src, new_src);
            quoted.dword(old_dst, new_dst);
            icmp_delta.dword(old_src, new_src);
            icmp_delta.dword(old_dst, new_dst);
            // The outer destination becomes the quoted source.
            icmp_delta.dword(word(&(*ip).daddr, i), new_src);
            if from_entry_source {
                icmp_delta.dword(word(&(*ip).saddr, i), new_dst);
            }
        }
        let (sport, dport) = (entry.dst_port.wire(), entry.src_port.wire());
        quoted.word((*ports).source, sport);
        quoted.word((*ports).dest, dport);
        icmp_delta.word((*ports).source, sport);
        icmp_delta.word((*ports).dest, dport);
        let udp = (*inner).nexthdr == PROTO_UDP;
        let offset = if udp {
            UDP_CHECK_OFFSET
        } else {
            TCP_CHECK_OFFSET
        };
        let mut l4_check_at = 0;
        let mut l4_check = 0;
        // The TCP checksum is quoted only when the error carries more than
        // the minimum.
        if let Ok(check) = ptr_at::<u16>(data, data_end, inner_l4 + offset) {
            let old = *check;
            l4_check = quoted.apply(old);
            if l4_check == 0 && udp {
                l4_check = 0xffff;
            }
            l4_check_at = INNER_PORTS + offset;
            icmp_delta.word(old, l4_check);
        }
        Ok(ErrorChecks {
            icmp_check: icmp_delta.apply((*icmp).check),
            l4_check_at,
            l4_check,
            from_entry_source,
        })
    }
}

impl ErrorChecks {
    /// Writes the translation into the packet directly (XDP).
    #[inline(always)]
    pub fn write(&self, data: usize, data_end: usize, l3: usize, entry: &Flow) -> Result<(), Skip> {
        let ip: *mut Ipv6Hdr = ptr_at(data, data_end, l3)?;
        let icmp: *mut Icmp6Hdr = ptr_at(data, data_end, l3 + IPV6_LEN)?;
        let inner: *mut Ipv6Hdr = ptr_at(data, data_end, l3 + IPV6_LEN + ICMP6_LEN)?;
        let ports: *mut Ports = ptr_at(data, data_end, l3 + INNER_PORTS)?;
        if self.l4_check_at != 0 {
            let check: *mut u16 = ptr_at(data, data_end, l3 + self.l4_check_at)?;
            unsafe { *check = self.l4_check };
        }
        unsafe {
            words::store_addr(&mut (*inner).saddr, words::addr_words(&entry.dst_addr));
            words::store_addr(&mut (*inner).daddr, words::addr_words(&entry.src_addr));
            (*ports).source = entry.dst_port.wire();
            (*ports).dest = entry.src_port.wire();
            (*icmp).check = self.icmp_check;
            if self.from_entry_source {
                words::store_addr(&mut (*ip).saddr, words::addr_words(&entry.src_addr));
            }
            words::store_addr(&mut (*ip).daddr, words::addr_words(&entry.dst_addr));
        }
        Ok(())
    }
}

/// How much of the too-big packet a "packet too big" quotes: its IPv6
/// header and this much of what follows (RFC 4443 asks for as much as fits
/// in 1280 bytes; the ports and TCP's checksum are what the sender's stack
/// needs to find the connection, and a fixed size keeps the sum simple).
pub const QUOTED_L4_LEN: usize = icmp::QUOTED_L4_LEN;
/// What a "packet too big" adds in front of the quoted packet.
pub const TOO_BIG_HEADERS_LEN: usize = IPV6_LEN + ICMP6_LEN;
/// The quoted part: the shortest packet a "packet too big" is made for.
pub const QUOTABLE_LEN: usize = IPV6_LEN + QUOTED_L4_LEN;

/// The IPv6 and ICMPv6 headers of a "packet too big", in wire order.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TooBig {
    pub ip: Ipv6Hdr,
    pub icmp: Icmp6Hdr,
}

/// Works out the headers of a "packet too big" (or, with `exceeded`, a
/// "hop limit exceeded in transit") for the packet quoted at `quoted` (its
/// IPv6 header, then `QUOTED_L4_LEN` bytes): from the quoted packet's
/// destination (the frontend, or the node for a reply) back to its
/// sender, with `mtu` as the MTU.
#[inline(always)]
pub fn too_big(
    data: usize,
    data_end: usize,
    quoted: usize,
    mtu: u16,
    exceeded: bool,
) -> Result<TooBig, Skip> {
    let (kind, mtu) = if exceeded {
        (ICMPV6_TIME_EXCEEDED, 0)
    } else {
        (ICMPV6_PACKET_TOO_BIG, mtu)
    };
    let header: *mut Ipv6Hdr = ptr_at(data, data_end, quoted)?;
    let quote: *mut [u8; QUOTABLE_LEN] = ptr_at(data, data_end, quoted)?;
    let (src, dst) = unsafe {
        (
            words::addr_words(&(*header).daddr),
            words::addr_words(&(*header).saddr),
        )
    };
    let length = (ICMP6_LEN + QUOTABLE_LEN) as u32;
    let mut headers = TooBig {
        ip: Ipv6Hdr {
            vtc_flow: 0x6000_0000u32.to_be(),
            payload_len: (length as u16).to_be(),
            nexthdr: PROTO_ICMPV6,
            hop_limit: 255,
            saddr: unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(src) },
            daddr: unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(dst) },
        },
        icmp: Icmp6Hdr {
            kind,
            code: 0,
            check: 0,
            mtu: (mtu as u32).to_be(),
        },
    };
    // Pseudo-header (addresses, length, next header), then the message.
    let mut total = sum(quote as usize, QUOTABLE_LEN) as u64;
    for i in 0..4 {
        total += (src[i] & 0xffff) as u64 + (src[i] >> 16) as u64;
        total += (dst[i] & 0xffff) as u64 + (dst[i] >> 16) as u64;
    }
    total += (length as u16).to_be() as u64 + (PROTO_ICMPV6 as u16).to_be() as u64;
    total += u16::from_ne_bytes([kind, 0]) as u64;
    let mtu_be = headers.icmp.mtu;
    total += (mtu_be & 0xffff) as u64 + (mtu_be >> 16) as u64;
    headers.icmp.check = !fold(total);
    Ok(headers)
}

/// `icmp::partial_checksum_fixed_point` for a quoted IPv6 packet: the value
/// the quoted L4 checksum field gets in the tcx hook, and where it is (from
/// the quoted IPv6 header); `None` when it is neither TCP nor UDP.
#[inline(always)]
pub fn partial_checksum_fixed_point(
    data: usize,
    data_end: usize,
    quoted: usize,
) -> Result<Option<(usize, u16)>, Skip> {
    let header: *mut Ipv6Hdr = ptr_at(data, data_end, quoted)?;
    let proto = unsafe { (*header).nexthdr };
    icmp::fixed_point_after(data, data_end, quoted, IPV6_LEN, proto)
}
