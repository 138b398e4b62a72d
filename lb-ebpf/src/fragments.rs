//! IPv4 fragments of translated flows. Only a datagram's first fragment
//! carries the L4 header that names its flow; the others carry the same
//! (source, destination, IP id, protocol) and nothing else. So the first
//! fragment is translated like any packet of its flow, and what it became
//! (its new addresses, and the device it came through) is remembered under
//! that key; a later fragment with a record gets the same addresses, a later
//! fragment without one is left alone. Later fragments never touch a flow.
//! Records are not deleted: fragments may come reordered or twice, and the
//! LRU map forgets old datagrams (Cilium's IPv4 fragment map works alike).

use crate::{
    maps::FRAGMENTS,
    packet::{Ipv4Hdr, Parsed, ptr_at, v4_raw},
};
use lb_common::Flow;

/// A datagram as its fragments show it on the wire (raw network-order
/// addresses and id).
#[repr(C)]
pub struct FragmentKey {
    pub src: u32,
    pub dst: u32,
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// What the first fragment became.
#[repr(C)]
pub struct Fragment {
    pub src: u32,
    pub dst: u32,
    /// The device the first fragment was seen on: later fragments from
    /// elsewhere are not its datagram's.
    pub ifindex: u32,
}

/// If `parsed` is a first fragment, remembers how it is translated (to
/// `flow`'s tuple), for the later fragments that arrive through `ifindex`.
#[inline(always)]
pub fn remember_first(parsed: &Parsed, flow: &Flow, ifindex: u32) {
    if parsed.first_fragment {
        remember(
            v4_raw(&parsed.key.src_addr),
            v4_raw(&parsed.key.dst_addr),
            parsed.id_proto(),
            flow,
            ifindex,
        );
    }
}

/// Remembers how the first fragment of a datagram was translated.
/// `src`, `dst` and `id_proto` (IP id in the low 16 bits, protocol above)
/// are as on the wire before the rewrite.
// Not inlined: its key and value get a frame of their own, after the
// new-flow call has returned. Scalars, so the caller keeps nothing on its
// stack for it.
#[inline(never)]
pub fn remember(src: u32, dst: u32, id_proto: u32, flow: &Flow, ifindex: u32) {
    let key = FragmentKey {
        src,
        dst,
        id: id_proto as u16,
        proto: (id_proto >> 16) as u8,
        _pad: 0,
    };
    let record = Fragment {
        src: v4_raw(&flow.src_addr),
        dst: v4_raw(&flow.dst_addr),
        ifindex,
    };
    let _ = FRAGMENTS.insert(&key, &record, 0);
}

/// A later fragment at `l3` that has a record made on `ifindex`: its IPv4
/// header and what its addresses become.
#[inline(always)]
pub fn later(
    data: usize,
    data_end: usize,
    l3: usize,
    ifindex: u32,
) -> Option<(*mut Ipv4Hdr, &'static Fragment)> {
    let ip: *mut Ipv4Hdr = ptr_at(data, data_end, l3).ok()?;
    let key = unsafe {
        // Options are not supported: their first fragment was not
        // translated, so there is no record for them anyway.
        if (*ip).version_ihl != 0x45 {
            return None;
        }
        FragmentKey {
            src: (*ip).saddr,
            dst: (*ip).daddr,
            id: (*ip).id,
            proto: (*ip).protocol,
            _pad: 0,
        }
    };
    let record = unsafe { FRAGMENTS.get(&key) }?;
    if record.ifindex != ifindex {
        return None;
    }
    Some((ip, record))
}
