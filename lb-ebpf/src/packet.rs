//! Header layouts and the one-pass parser shared by the XDP and TC hooks.
//! All packet access goes through [`ptr_at`], which bounds-checks against
//! `data_end` in the form the verifier understands.

use lb_common::{Be16, FAMILY_V4, FlowKey, PROTO_TCP, PROTO_UDP};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const PROTO_ICMP: u8 = 1;
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
pub const PORTS_SOURCE_OFFSET: usize = core::mem::offset_of!(Ports, source);
pub const PORTS_DEST_OFFSET: usize = core::mem::offset_of!(Ports, dest);
pub const TCP_CHECK_OFFSET: usize = core::mem::offset_of!(TcpHdr, check);
pub const UDP_CHECK_OFFSET: usize = core::mem::offset_of!(UdpHdr, check);
/// Offset of the TCP flags byte (FIN=0x01, SYN=0x02, RST=0x04).
pub const TCP_FLAGS_OFFSET: usize = core::mem::offset_of!(TcpHdr, flags);
/// How much of an skb the tc hook pulls into the linear area before parsing:
/// the headers `parse` and `icmp::parse_error` read (Ethernet, a VLAN tag,
/// IPv4, ICMP, the quoted IPv4 header and TCP up to its checksum).
pub const MAX_HEADERS_LEN: usize = 18 + 20 + 8 + 20 + 18;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_RST: u8 = 0x04;

/// Why a packet is not translated.
pub enum Skip {
    /// Not IPv4 TCP/UDP: pass it on untouched.
    NotIpv4L4,
    /// Shorter than its headers claim.
    Malformed,
    /// IPv4 with options: the ports are known (in the key) but xlb does not
    /// translate it. Passed unless it is for a frontend, then dropped and
    /// counted.
    Unsupported(FlowKey),
    /// A later fragment (IPv4 header at this offset): no ports to look at;
    /// translated only like its first fragment was (`fragments.rs`).
    Fragment(usize),
    /// IPv4 ICMP; the header starts at this offset. Errors that quote a
    /// translated flow are the business of `icmp.rs`.
    Icmp(usize),
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

/// Parses Ethernet (with at most one 802.1Q/802.1ad tag), IPv4 without
/// options, TCP or UDP.
#[inline(always)]
pub fn parse(data: usize, data_end: usize) -> Result<Parsed, Skip> {
    let eth: *mut EthHdr = ptr_at(data, data_end, 0)?;
    let mut l3 = core::mem::size_of::<EthHdr>();
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let vlan: *mut VlanHdr = ptr_at(data, data_end, l3)?;
        ether_type = u16::from_be(unsafe { (*vlan).ether_type });
        l3 += core::mem::size_of::<VlanHdr>();
    }
    if ether_type != ETH_P_IP {
        return Err(Skip::NotIpv4L4);
    }
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
    let (ip_len, ip_id) = unsafe { (u16::from_be((*ip).tot_len), (*ip).id) };
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
    })
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
