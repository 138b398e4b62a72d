//! ICMP for translated flows, shared by the XDP and tcx hooks (both write
//! the bytes directly: nothing here changes the L4 sum a partial checksum
//! would cover).
//!
//! - **Errors** (destination unreachable, "fragmentation needed" among them,
//!   and time exceeded) quote the packet they answer. When that packet
//!   belongs to a translated flow, the error is translated the way the
//!   flow's next packet in its direction would be: the quoted header becomes
//!   what the other end sent, and the error goes to that end. Without this,
//!   path MTU discovery and fast failures break, and backend addresses leak
//!   in quoted headers (netfilter does the same for RELATED packets).
//! - **"Fragmentation needed"** is made here when a translated packet with DF
//!   does not fit the device it would leave through. The kernel would send
//!   its own to the translated source: the node itself for SNAT, never the
//!   client.

use lb_common::{Be16, FAMILY_V4, Flow, FlowKey, PROTO_TCP, PROTO_UDP};

use crate::{
    checksum::CsumDelta,
    packet::{
        IPV4_MF, IPV4_OFFSET_MASK, Ipv4Hdr, PROTO_ICMP, Ports, Skip, TCP_CHECK_OFFSET,
        UDP_CHECK_OFFSET, ptr_at, v4_addr, v4_raw,
    },
};

pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;
pub const ICMP_TIME_EXCEEDED: u8 = 11;

#[repr(C)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub check: u16,
    pub unused: u16,
    /// Next-hop MTU of "fragmentation needed" (RFC 1191).
    pub mtu: u16,
}

const IPV4_LEN: usize = core::mem::size_of::<Ipv4Hdr>();
const ICMP_LEN: usize = core::mem::size_of::<IcmpHdr>();
/// Version 4, header length 5 words: no options.
const IPV4_PLAIN: u8 = 0x45;

/// An ICMP error quoting a TCP or UDP packet, addressed to that packet's
/// sender.
pub struct IcmpError {
    /// Offset of the outer IPv4 header.
    pub l3: usize,
    /// The quoted packet's tuple reversed: the key of the flow entry that
    /// an answer to the quoted packet hits.
    pub key: FlowKey,
}

/// Parses the ICMP message whose IPv4 header is at `l3`. Anything but an
/// error quoting a TCP or UDP packet whose sender it is addressed to is
/// `NotIpv4L4`: never translated.
#[inline(always)]
pub fn parse_error(data: usize, data_end: usize, l3: usize) -> Result<IcmpError, Skip> {
    let ip: *mut Ipv4Hdr = ptr_at(data, data_end, l3)?;
    let (version_ihl, frag_off, daddr) =
        unsafe { ((*ip).version_ihl, u16::from_be((*ip).frag_off), (*ip).daddr) };
    if version_ihl != IPV4_PLAIN || frag_off & (IPV4_MF | IPV4_OFFSET_MASK) != 0 {
        return Err(Skip::NotIpv4L4);
    }
    let icmp: *mut IcmpHdr = ptr_at(data, data_end, l3 + IPV4_LEN)?;
    let kind = unsafe { (*icmp).kind };
    if kind != ICMP_DEST_UNREACH && kind != ICMP_TIME_EXCEEDED {
        return Err(Skip::NotIpv4L4);
    }
    let inner: *mut Ipv4Hdr = ptr_at(data, data_end, l3 + IPV4_LEN + ICMP_LEN)?;
    let (inner_version_ihl, inner_frag_off, proto, inner_saddr, inner_daddr) = unsafe {
        (
            (*inner).version_ihl,
            u16::from_be((*inner).frag_off),
            (*inner).protocol,
            (*inner).saddr,
            (*inner).daddr,
        )
    };
    // A quoted later fragment has no ports; an error about someone else's
    // packet is not ours to deliver.
    if inner_version_ihl != IPV4_PLAIN
        || inner_frag_off & IPV4_OFFSET_MASK != 0
        || (proto != PROTO_TCP && proto != PROTO_UDP)
        || inner_saddr != daddr
    {
        return Err(Skip::NotIpv4L4);
    }
    let inner_l4 = l3 + 2 * IPV4_LEN + ICMP_LEN;
    // Every error quotes at least 8 bytes of L4: the ports and, for UDP,
    // the checksum.
    let _: *mut [u8; 8] = ptr_at(data, data_end, inner_l4)?;
    let ports: *mut Ports = ptr_at(data, data_end, inner_l4)?;
    let key = unsafe {
        FlowKey {
            src_addr: v4_addr(inner_daddr),
            dst_addr: v4_addr(inner_saddr),
            src_port: Be16::from_wire((*ports).dest),
            dst_port: Be16::from_wire((*ports).source),
            proto,
            family: FAMILY_V4,
            _pad: [0; 2],
        }
    };
    Ok(IcmpError { l3, key })
}

/// What translating an error changes: the outer addresses, the quoted
/// tuple, and every checksum over them (outer IPv4, quoted IPv4, quoted L4
/// when quoted, ICMP). The hooks write it: XDP directly, tcx through the
/// store helper (direct writes would make the verifier unclone every skb
/// the hook sees).
pub struct ErrorRewrite {
    pub outer_src: u32,
    pub outer_dst: u32,
    pub outer_check: u16,
    pub icmp_check: u16,
    pub inner_src: u32,
    pub inner_dst: u32,
    pub inner_check: u16,
    pub inner_sport: u16,
    pub inner_dport: u16,
    /// The quoted L4 checksum's offset and new value; offset 0 when it is
    /// not quoted or is a UDP "no checksum".
    pub l4_check_at: usize,
    pub l4_check: u16,
}

/// Offsets of the fields an [`ErrorRewrite`] writes, from the outer IPv4
/// header.
pub const OUTER_SADDR: usize = core::mem::offset_of!(Ipv4Hdr, saddr);
pub const OUTER_DADDR: usize = core::mem::offset_of!(Ipv4Hdr, daddr);
pub const OUTER_CHECK: usize = core::mem::offset_of!(Ipv4Hdr, check);
pub const ICMP_CHECK: usize = IPV4_LEN + core::mem::offset_of!(IcmpHdr, check);
pub const INNER_SADDR: usize = IPV4_LEN + ICMP_LEN + OUTER_SADDR;
pub const INNER_DADDR: usize = IPV4_LEN + ICMP_LEN + OUTER_DADDR;
pub const INNER_CHECK: usize = IPV4_LEN + ICMP_LEN + OUTER_CHECK;
pub const INNER_PORTS: usize = 2 * IPV4_LEN + ICMP_LEN;

/// Works out the translation of an error for the flow entry `entry` (the
/// one `error.key` hits): the quoted packet becomes the reverse of the
/// entry's rewrite (what the other end sent), the error goes to that end,
/// and its source becomes the entry's source when the entry rewrites the
/// source (reply entries and SNAT), so no backend or router address behind
/// xlb shows. Checksums are updated incrementally.
#[inline(always)]
pub fn error_rewrite(
    data: usize,
    data_end: usize,
    error: &IcmpError,
    entry: &Flow,
) -> Result<ErrorRewrite, Skip> {
    let l3 = error.l3;
    let ip: *mut Ipv4Hdr = ptr_at(data, data_end, l3)?;
    let icmp: *mut IcmpHdr = ptr_at(data, data_end, l3 + IPV4_LEN)?;
    let inner: *mut Ipv4Hdr = ptr_at(data, data_end, l3 + IPV4_LEN + ICMP_LEN)?;
    let inner_l4 = l3 + INNER_PORTS;
    let ports: *mut Ports = ptr_at(data, data_end, inner_l4)?;

    let inner_src = v4_raw(&entry.dst_addr);
    let inner_dst = v4_raw(&entry.src_addr);
    let inner_sport = entry.dst_port.wire();
    let inner_dport = entry.src_port.wire();
    unsafe {
        let outer_src = if entry.src_addr != error.key.src_addr {
            inner_dst
        } else {
            (*ip).saddr
        };
        let outer_dst = inner_src;
        let mut icmp_delta = CsumDelta::new();

        // The quoted L4 checksum covers the quoted addresses (pseudo-header)
        // and ports.
        let mut l4_delta = CsumDelta::new();
        l4_delta.dword((*inner).saddr, inner_src);
        l4_delta.dword((*inner).daddr, inner_dst);
        l4_delta.word((*ports).source, inner_sport);
        l4_delta.word((*ports).dest, inner_dport);
        let mut l4_check_at = 0;
        let mut l4_check = 0;
        if (*inner).protocol == PROTO_UDP {
            let check: *mut u16 = ptr_at(data, data_end, inner_l4 + UDP_CHECK_OFFSET)?;
            let old = *check;
            if old != 0 {
                l4_check = match l4_delta.apply(old) {
                    0 => 0xffff,
                    c => c,
                };
                l4_check_at = INNER_PORTS + UDP_CHECK_OFFSET;
                icmp_delta.word(old, l4_check);
            }
        } else if let Ok(check) = ptr_at::<u16>(data, data_end, inner_l4 + TCP_CHECK_OFFSET) {
            // Quoted only when the error carries more than the minimum.
            let old = *check;
            l4_check = l4_delta.apply(old);
            l4_check_at = INNER_PORTS + TCP_CHECK_OFFSET;
            icmp_delta.word(old, l4_check);
        }

        let mut inner_ip_delta = CsumDelta::new();
        inner_ip_delta.dword((*inner).saddr, inner_src);
        inner_ip_delta.dword((*inner).daddr, inner_dst);
        let inner_check = inner_ip_delta.apply((*inner).check);
        icmp_delta.word((*inner).check, inner_check);
        icmp_delta.dword((*inner).saddr, inner_src);
        icmp_delta.dword((*inner).daddr, inner_dst);
        icmp_delta.word((*ports).source, inner_sport);
        icmp_delta.word((*ports).dest, inner_dport);

        let mut ip_delta = CsumDelta::new();
        ip_delta.dword((*ip).saddr, outer_src);
        ip_delta.dword((*ip).daddr, outer_dst);
        Ok(ErrorRewrite {
            outer_src,
            outer_dst,
            outer_check: ip_delta.apply((*ip).check),
            icmp_check: icmp_delta.apply((*icmp).check),
            inner_src,
            inner_dst,
            inner_check,
            inner_sport,
            inner_dport,
            l4_check_at,
            l4_check,
        })
    }
}

impl ErrorRewrite {
    /// Writes the rewrite into the packet directly (XDP).
    #[inline(always)]
    pub fn write(&self, data: usize, data_end: usize, l3: usize) -> Result<(), Skip> {
        let ip: *mut Ipv4Hdr = ptr_at(data, data_end, l3)?;
        let icmp: *mut IcmpHdr = ptr_at(data, data_end, l3 + IPV4_LEN)?;
        let inner: *mut Ipv4Hdr = ptr_at(data, data_end, l3 + IPV4_LEN + ICMP_LEN)?;
        let ports: *mut Ports = ptr_at(data, data_end, l3 + INNER_PORTS)?;
        if self.l4_check_at != 0 {
            let check: *mut u16 = ptr_at(data, data_end, l3 + self.l4_check_at)?;
            unsafe { *check = self.l4_check };
        }
        unsafe {
            (*inner).check = self.inner_check;
            (*inner).saddr = self.inner_src;
            (*inner).daddr = self.inner_dst;
            (*ports).source = self.inner_sport;
            (*ports).dest = self.inner_dport;
            (*icmp).check = self.icmp_check;
            (*ip).check = self.outer_check;
            (*ip).saddr = self.outer_src;
            (*ip).daddr = self.outer_dst;
        }
        Ok(())
    }
}

/// How much of the too-big packet a "fragmentation needed" quotes: its IPv4
/// header and this much of what follows. RFC 792 asks for 8 bytes; 32 cover
/// a TCP header's checksum (the tcx hook needs it, see
/// `partial_checksum_fixed_point`) and keep the sums at a fixed size.
pub const QUOTED_L4_LEN: usize = 32;
/// The length of the IPv4 packet a "fragmentation needed" is.
pub const FRAG_NEEDED_LEN: usize = IPV4_LEN + ICMP_LEN + IPV4_LEN + QUOTED_L4_LEN;
/// What a "fragmentation needed" adds in front of the quoted packet.
pub const FRAG_NEEDED_HEADERS_LEN: usize = IPV4_LEN + ICMP_LEN;
/// The shortest packet a "fragmentation needed" is made for.
pub const QUOTABLE_LEN: usize = IPV4_LEN + QUOTED_L4_LEN;

/// The IPv4 and ICMP headers of a "fragmentation needed", in wire order.
#[repr(C)]
pub struct FragNeeded {
    pub ip: Ipv4Hdr,
    pub icmp: IcmpHdr,
}

/// Works out the headers of a "fragmentation needed" (or, with
/// `exceeded`, a "time exceeded in transit") for the packet quoted at
/// `quoted` (its IPv4 header, then `QUOTED_L4_LEN` bytes): from the quoted
/// packet's destination (the frontend, or the node for a reply) back to
/// its sender, with `mtu` as the next-hop MTU.
#[inline(always)]
pub fn frag_needed(
    data: usize,
    data_end: usize,
    quoted: usize,
    mtu: u16,
    exceeded: bool,
) -> Result<FragNeeded, Skip> {
    let (kind, code, mtu) = if exceeded {
        (ICMP_TIME_EXCEEDED, 0, 0)
    } else {
        (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, mtu)
    };
    let header: *mut Ipv4Hdr = ptr_at(data, data_end, quoted)?;
    let quote: *mut [u8; QUOTABLE_LEN] = ptr_at(data, data_end, quoted)?;
    let mut headers = FragNeeded {
        ip: Ipv4Hdr {
            version_ihl: IPV4_PLAIN,
            tos: 0,
            tot_len: (FRAG_NEEDED_LEN as u16).to_be(),
            id: 0,
            frag_off: 0,
            ttl: 64,
            protocol: PROTO_ICMP,
            check: 0,
            saddr: unsafe { (*header).daddr },
            daddr: unsafe { (*header).saddr },
        },
        icmp: IcmpHdr {
            kind,
            code,
            check: 0,
            unused: 0,
            mtu: mtu.to_be(),
        },
    };
    let icmp_words = (u16::from_ne_bytes([kind, code]) as u32) + headers.icmp.mtu as u32;
    headers.icmp.check = !fold(sum(quote as usize, QUOTABLE_LEN) as u64 + icmp_words as u64);
    let ip = &headers.ip;
    let ip_words = u16::from_ne_bytes([ip.version_ihl, ip.tos]) as u64
        + ip.tot_len as u64
        + u16::from_ne_bytes([ip.ttl, ip.protocol]) as u64
        + (ip.saddr & 0xffff) as u64
        + (ip.saddr >> 16) as u64
        + (ip.daddr & 0xffff) as u64
        + (ip.daddr >> 16) as u64;
    headers.ip.check = !fold(ip_words);
    Ok(headers)
}

/// The value the quoted L4 checksum field of a "fragmentation needed" gets
/// in the tcx hook, and where it is (from the quoted IPv4 header); `None`
/// when the quoted packet is neither TCP nor UDP.
///
/// The hook makes the error from an skb that may carry a partial
/// (offloaded) checksum of the original packet, still pointing at the
/// quoted L4 header. If a device later completed it, the quoted bytes, and
/// with them the ICMP checksum, would change. At the fixed point
/// `v = ~fold(S + v)` (S the sum of the other quoted L4 bytes), which is
/// `v = rotr1(~S)` (halving in one's complement arithmetic), a completion
/// writes what is already there.
#[inline(always)]
pub fn partial_checksum_fixed_point(
    data: usize,
    data_end: usize,
    quoted: usize,
) -> Result<Option<(usize, u16)>, Skip> {
    let header: *mut Ipv4Hdr = ptr_at(data, data_end, quoted)?;
    let proto = unsafe { (*header).protocol };
    fixed_point_after(data, data_end, quoted, IPV4_LEN, proto)
}

/// The fixed point of the quoted L4 checksum for a quoted packet whose L4
/// header (`proto`) starts `header_len` bytes after `quoted` (shared with
/// `icmp6`); the field's offset from `quoted` and its value.
#[inline(always)]
pub fn fixed_point_after(
    data: usize,
    data_end: usize,
    quoted: usize,
    header_len: usize,
    proto: u8,
) -> Result<Option<(usize, u16)>, Skip> {
    let l4 = quoted + header_len;
    let quoted_l4: *mut [u8; QUOTED_L4_LEN] = ptr_at(data, data_end, l4)?;
    let offset = match proto {
        PROTO_TCP => TCP_CHECK_OFFSET,
        PROTO_UDP => UDP_CHECK_OFFSET,
        _ => return Ok(None),
    };
    let check: *mut u16 = ptr_at(data, data_end, l4 + offset)?;
    // The sum without the field: adding its complement takes it out.
    let all = sum(quoted_l4 as usize, QUOTED_L4_LEN) as u64;
    let others = fold(all + (!unsafe { *check }) as u64);
    Ok(Some((header_len + offset, (!others).rotate_right(1))))
}

/// The one's complement sum (unfolded) of `len` bytes at `at`, a multiple
/// of 4.
#[inline(always)]
pub fn sum(at: usize, len: usize) -> u32 {
    let s = unsafe {
        aya_ebpf::helpers::bpf_csum_diff(core::ptr::null_mut(), 0, at as *mut u32, len as u32, 0)
    };
    s as u32
}

#[inline(always)]
pub fn fold(sum: u64) -> u16 {
    let s = (sum & 0xffff) + (sum >> 16);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    s as u16
}
