//! What the datapath sees in a frame, written from its rules (not its code):
//! where the headers are, the TCP/UDP tuple, and whether a frame is an ICMP
//! error the datapath must translate. Offsets are from the frame's start.

use lb_common::{Be16, FAMILY_V4, FlowKey};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
/// Offsets inside an IPv4 header.
pub const IP_TOT_LEN: usize = 2;
pub const IP_ID: usize = 4;
pub const IP_FRAG: usize = 6;
pub const IP_TTL: usize = 8;
pub const IP_PROTO: usize = 9;
pub const IP_CHECK: usize = 10;
pub const IP_SRC: usize = 12;
pub const IP_DST: usize = 16;
pub const TCP_FLAGS: usize = 13;
pub const TCP_CHECK: usize = 16;
pub const UDP_CHECK: usize = 6;

/// A TCP/UDP 5-tuple as its bytes sit on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

impl Tuple {
    /// The `FLOWS` key of a packet with this tuple.
    pub fn key(&self) -> FlowKey {
        FlowKey {
            src_addr: lb_common::addr_v4(self.src),
            dst_addr: lb_common::addr_v4(self.dst),
            src_port: Be16::from_host(self.sport),
            dst_port: Be16::from_host(self.dport),
            proto: self.proto,
            family: FAMILY_V4,
            _pad: [0; 2],
        }
    }

    pub fn reversed(&self) -> Tuple {
        Tuple {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
        }
    }

    /// The tuple of the IPv4 header at `l3` with its ports at `l4`.
    pub fn read(frame: &[u8], l3: usize, l4: usize) -> Tuple {
        Tuple {
            src: addr_at(frame, l3 + IP_SRC),
            dst: addr_at(frame, l3 + IP_DST),
            sport: be16(frame, l4),
            dport: be16(frame, l4 + 2),
            proto: frame[l3 + IP_PROTO],
        }
    }
}

pub fn be16(frame: &[u8], offset: usize) -> u16 {
    u16::from_be_bytes([frame[offset], frame[offset + 1]])
}

pub fn addr_at(frame: &[u8], offset: usize) -> [u8; 4] {
    frame[offset..offset + 4].try_into().expect("4 bytes")
}

/// Where the frame's IPv4 header starts (after Ethernet and at most one
/// 802.1Q/802.1ad tag), if its EtherType is IPv4; `None` also for a frame cut
/// inside those headers.
pub fn l3_offset(frame: &[u8]) -> Option<usize> {
    if frame.len() < 14 {
        return None;
    }
    let mut l3 = 14;
    let mut ether_type = be16(frame, 12);
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        if frame.len() < 18 {
            return None;
        }
        ether_type = be16(frame, 16);
        l3 = 18;
    }
    (ether_type == ETH_P_IP).then_some(l3)
}

/// What the TCP/UDP path makes of a frame.
#[derive(Clone, Copy, Debug)]
pub enum Parse {
    /// Not IPv4 TCP/UDP (or cut before the IPv4 header): passed on.
    NotIpv4L4,
    /// Cut short or impossible headers: passed on.
    Malformed,
    /// A later fragment (IPv4 header at this offset): translated as its
    /// first fragment was when that left a record, else passed on.
    Fragment(usize),
    /// IP options: dropped if for a frontend, else passed on.
    Unsupported(Tuple),
    Parsed(Parsed),
}

#[derive(Clone, Copy, Debug)]
pub struct Parsed {
    pub l3: usize,
    pub l4: usize,
    pub tuple: Tuple,
    pub tcp_flags: u8,
    /// MF set (offset 0): translated like any packet, and remembered for
    /// the datagram's later fragments.
    pub first_fragment: bool,
}

/// The datapath's parse: Ethernet (one tag at most), IPv4, TCP or UDP.
pub fn parse(frame: &[u8]) -> Parse {
    if frame.len() < 14 {
        return Parse::Malformed;
    }
    let ether_type = be16(frame, 12);
    if (ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD) && frame.len() < 18 {
        return Parse::Malformed;
    }
    let Some(l3) = l3_offset(frame) else {
        return Parse::NotIpv4L4;
    };
    if frame.len() < l3 + 20 {
        return Parse::Malformed;
    }
    let proto = frame[l3 + IP_PROTO];
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Parse::NotIpv4L4;
    }
    if frame[l3] >> 4 != 4 {
        return Parse::Malformed;
    }
    let frag = be16(frame, l3 + IP_FRAG);
    if frag & 0x1fff != 0 {
        return Parse::Fragment(l3);
    }
    let ihl = (frame[l3] & 0x0f) as usize;
    if ihl < 5 {
        return Parse::Malformed;
    }
    let l4 = l3 + ihl * 4;
    let needed = if proto == PROTO_TCP { 18 } else { 8 };
    if frame.len() < l4 + needed {
        return Parse::Malformed;
    }
    let tuple = Tuple::read(frame, l3, l4);
    if ihl != 5 {
        return Parse::Unsupported(tuple);
    }
    // A total length shorter than the headers read, or longer than the
    // frame: cut short, never translated.
    let total = be16(frame, l3 + 2) as usize;
    if total < l4 - l3 + needed || l3 + total > frame.len() {
        return Parse::Malformed;
    }
    let tcp_flags = if proto == PROTO_TCP {
        frame[l4 + TCP_FLAGS]
    } else {
        0
    };
    Parse::Parsed(Parsed {
        l3,
        l4,
        tuple,
        tcp_flags,
        first_fragment: frag & 0x2000 != 0,
    })
}

/// An ICMP error the datapath must translate when its flow is found (the
/// rules of the ICMP translation spec), with the headers' offsets.
#[derive(Clone, Copy, Debug)]
pub struct IcmpError {
    pub l3: usize,
    pub icmp: usize,
    pub inner_l3: usize,
    pub inner_l4: usize,
    /// The quoted packet's tuple.
    pub inner: Tuple,
    /// Set when the spec leaves open whether this one is translated (a
    /// field it does not mention is odd): either outcome is accepted.
    pub open: Option<&'static str>,
}

impl IcmpError {
    /// The `FLOWS` key looked up: the quoted tuple reversed.
    pub fn lookup(&self) -> Tuple {
        self.inner.reversed()
    }
}

/// The frame as an ICMP error that may be translated: outer IPv4 without
/// options nor fragmentation, ICMP type 3 or 11, a quoted IPv4 header of 20
/// bytes and 8 bytes of its TCP or UDP header.
pub fn icmp_error(frame: &[u8]) -> Option<IcmpError> {
    let l3 = l3_offset(frame)?;
    if frame.len() < l3 + 20 || frame[l3 + IP_PROTO] != PROTO_ICMP {
        return None;
    }
    if frame[l3] & 0x0f != 5 || be16(frame, l3 + IP_FRAG) & 0x3fff != 0 {
        return None;
    }
    let icmp = l3 + 20;
    if frame.len() < icmp + 8 || !matches!(frame[icmp], 3 | 11) {
        return None;
    }
    let inner_l3 = icmp + 8;
    if frame.len() < inner_l3 + 20 || frame[inner_l3] & 0x0f != 5 {
        return None;
    }
    let proto = frame[inner_l3 + IP_PROTO];
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let inner_l4 = inner_l3 + 20;
    if frame.len() < inner_l4 + 8 {
        return None;
    }
    let open = if frame[l3] >> 4 != 4 {
        Some("outer IP version is not 4")
    } else if frame[inner_l3] >> 4 != 4 {
        Some("quoted IP version is not 4")
    } else if be16(frame, inner_l3 + IP_FRAG) & 0x1fff != 0 {
        Some("quoted packet is a later fragment")
    } else if be16(frame, l3 + IP_TOT_LEN) as usize != frame.len() - l3 {
        Some("outer total length differs from the frame")
    } else {
        None
    };
    Some(IcmpError {
        l3,
        icmp,
        inner_l3,
        inner_l4,
        inner: Tuple::read(frame, inner_l3, inner_l4),
        open,
    })
}

/// The end of the bytes an L4 checksum is checked over: where the IPv4 total
/// length says, or the frame's end when that length is not believable (past
/// the frame, or short of `fields_end`, the end of the fields a translation
/// changes, which the range must hold for the check to say anything).
pub fn l4_end(frame: &[u8], l3: usize, fields_end: usize) -> usize {
    let claimed = l3 + be16(frame, l3 + IP_TOT_LEN) as usize;
    if claimed >= fields_end && claimed <= frame.len() {
        claimed
    } else {
        frame.len()
    }
}

/// The `XLB_FRAGMENTS` key of the IPv4 packet at `l3`: source, destination,
/// id (as on the wire), protocol, a pad byte.
pub fn fragment_key(frame: &[u8], l3: usize) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[..8].copy_from_slice(&frame[l3 + IP_SRC..l3 + IP_DST + 4]);
    key[8..10].copy_from_slice(&frame[l3 + IP_ID..l3 + IP_ID + 2]);
    key[10] = frame[l3 + IP_PROTO];
    key
}
