//! The NAT core shared by every hook: find the flow a packet belongs to, or
//! create it (source ranges, affinity, Maglev; the SNAT port from
//! `snat.rs`), and say which tuple
//! the packet must be rewritten to. It reads and writes maps only; applying
//! the rewrite to the packet is the hook's job (XDP writes the bytes itself,
//! TC goes through the skb helpers that know about partial checksums).

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_coarse_ns};
use lb_common::{
    Affinity, AffinityKey, BACKEND_F_LOCAL, Be32, CONFIG_KEY, FLOW_F_ACKED, FLOW_F_ANSWERED,
    FLOW_F_CLOSING, FLOW_F_REPLY, FLOW_F_RESET, FLOW_F_SNAT, Flow, FlowKey, FrontendKey,
    MAGLEV_TABLE_SIZE, PROTO_TCP, SERVICE_F_AFFINITY, SERVICE_F_LOCAL_ONLY,
    SERVICE_F_SOURCE_RANGES, SOURCE_RANGE_ID_BITS, Service,
};

use crate::{
    hash::flow_hash,
    host,
    maps::{
        AFFINITY, BACKENDS, CONFIG, FLOWS, MAGLEV, NewFlowScratch, SCRATCH, SERVICES, SOURCE_RANGES,
    },
    packet::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    reverse_path, snat,
    stats::{global, service as stats},
    words,
};

/// How often a flow's `last_seen_ns` is refreshed: writing it on every packet
/// would bounce the cache line between CPUs.
const TOUCH_INTERVAL_NS: u64 = 1_000_000_000;

/// CLOCK_MONOTONIC, as of the last tick. Flow ages, affinity and the agent's
/// heartbeat are kept in seconds, so a few milliseconds of lag cost nothing,
/// while the precise clock (`bpf_ktime_get_ns`) reads the TSC, a third of a
/// flow hit's cost on this rig. The agent compares with `clock_gettime`'s
/// CLOCK_MONOTONIC, which runs at most one tick ahead.
#[inline(always)]
pub(crate) fn clock_ns() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// What happens to a packet that is not rewritten. The NAT core returns
/// `Result<&Flow, Verdict>`: `Ok` is the tuple to rewrite the packet to, in
/// the map (or the per-CPU scratch) where it lives for the packet's time:
/// a copy would take 56 bytes of the hook's stack frame.
pub enum Verdict {
    /// Not ours: hand the packet on untouched.
    Pass,
    /// Ours, and dropped (the reason is already counted).
    Drop,
}

/// Where a packet is seen: replies seen at an ingress hook must pass the
/// reverse-path check (`reverse_path.rs`) before they change anything.
#[derive(Clone, Copy)]
pub enum Arrival {
    Egress,
    Ingress {
        ctx: *mut core::ffi::c_void,
        ifindex: u32,
    },
}

/// What the flow table says of a packet.
pub enum Lookup {
    /// Its entry: the tuple to rewrite it to.
    Hit(&'static Flow),
    /// No entry (or one that must start afresh).
    Miss,
    /// It matches a reply entry but came in where the backend's replies do
    /// not, or a forward entry at an egress hook (where only replies are
    /// translated): it is left alone, and the entry untouched.
    Refused,
}

/// Looks the packet's tuple up in `FLOWS`, refreshes the entry and follows
/// the TCP state the packet proves (see `tcp_state`).
#[inline(always)]
pub fn existing_flow(key: &FlowKey, tcp_flags: u8, bytes: u64, arrival: Arrival) -> Lookup {
    let Some(flow) = FLOWS.get_ptr_mut(key) else {
        return Lookup::Miss;
    };
    let flow = unsafe { &mut *flow };
    // A packet leaving the node on a client's tuple (the node's own or a
    // hairpinned one) is not the client's: it must not refresh, count or
    // close the client's flow (audit A-20h).
    if flow.flags & FLOW_F_REPLY == 0 && matches!(arrival, Arrival::Egress) {
        return Lookup::Refused;
    }
    if flow.flags & FLOW_F_REPLY != 0
        && let Arrival::Ingress { ctx, ifindex } = arrival
        && !reverse_path::holds(ctx, ifindex, key)
    {
        if let Some(g) = global() {
            g.reply_wrong_interface += 1;
        }
        return Lookup::Refused;
    }
    let now = clock_ns();
    if now.wrapping_sub(flow.last_seen_ns) > TOUCH_INTERVAL_NS {
        flow.last_seen_ns = now;
        // Once a second per entry, not per packet: is the other half still
        // there?
        keep_pair(key, flow, now);
    }
    if key.proto == PROTO_TCP {
        if tcp_flags & TCP_SYN != 0
            && flow.flags & (FLOW_F_CLOSING | FLOW_F_REPLY) == FLOW_F_CLOSING
            && !backend_still_serves(flow)
        {
            // A new connection on a closed flow whose backend has left: it
            // starts afresh (new_flow overwrites the forward entry); the old
            // reply entry goes now, so nothing is left that names it.
            let _ = FLOWS.remove(reply_key_of(key, flow));
            return Lookup::Miss;
        }
        tcp_state(flow, tcp_flags);
    }
    if flow.flags & (FLOW_F_REPLY | FLOW_F_ANSWERED) == FLOW_F_REPLY {
        flow.flags |= FLOW_F_ANSWERED;
    }
    if let Some(s) = stats(flow.service_id) {
        if flow.flags & FLOW_F_REPLY != 0 {
            s.reply_packets += 1;
            s.reply_bytes += bytes;
        } else {
            s.packets += 1;
            s.bytes += bytes;
        }
    }
    Lookup::Hit(flow)
}

/// A flow is a pair that lives and dies together, but the flow table is an
/// LRU map that evicts entries one at a time: a one-way stream keeps its
/// forward entry hot while the reply entry goes cold and may be evicted
/// (audit A-6), or the reverse. The surviving half, still in use, puts the
/// missing one back. `BPF_NOEXIST`: if the key has been taken meanwhile (a
/// new connection on the same tuple), it is left to its new owner. A SNAT
/// port cannot have been taken, `XLB_SNAT_OWNERS` keeps it while this
/// entry lives.
// Not inlined and working in the scratch map: it runs once a second per
// entry, and its key and value would not fit the hook's 512-byte frame.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(never)]
fn keep_pair(key: &FlowKey, flow: &Flow, now: u64) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let scratch = unsafe { &mut *scratch };
    // The partner's key answers this entry's rewrite; its value rewrites
    // back to this entry's key (`conntrack::partner_key` in the agent).
    scratch.other_key = reply_key_of(key, flow);
    if FLOWS.get_ptr(&scratch.other_key).is_some() {
        return;
    }
    scratch.reply = Flow {
        last_seen_ns: now,
        src_addr: key.dst_addr,
        dst_addr: key.src_addr,
        src_port: key.dst_port,
        dst_port: key.src_port,
        service_id: flow.service_id,
        backend_id: flow.backend_id,
        flags: (flow.flags ^ FLOW_F_REPLY) & (FLOW_F_REPLY | FLOW_F_SNAT),
        _pad: 0,
        _pad2: 0,
    };
    if FLOWS
        .insert(&scratch.other_key, &scratch.reply, BPF_NOEXIST as u64)
        .is_ok()
        && let Some(g) = global()
    {
        g.flow_halves_restored += 1;
    }
}

/// The flags a TCP packet may change on its entry. Without sequence tracking
/// no single packet is trusted to end or move a flow:
/// - FIN or RST marks the entry closing (short timeout); a RST also marks it
///   reset, and the next ordinary packet in the same direction clears both,
///   because a real RST is its sender's last packet.
/// - A SYN on a closing entry (the client reusing its port, or a forged
///   RST + SYN) starts over on the same flow: same backend, same SNAT port.
///   Nothing a client sends moves its flow to another backend or port, so
///   guessing a tuple gains an attacker nothing. (Only when the backend has
///   left does such a SYN start a new flow: see `existing_flow`.)
/// - A client ACK without SYN marks the forward entry acknowledged (the
///   handshake's third packet), which moves the pair to the established
///   timeout once the backend has answered.
///
/// Only flags are written, and only when they change.
#[inline(always)]
fn tcp_state(flow: &mut Flow, tcp_flags: u8) {
    let flags = flow.flags;
    let mut next = flags;
    if tcp_flags & TCP_RST != 0 {
        next |= FLOW_F_CLOSING | FLOW_F_RESET;
    } else if tcp_flags & TCP_FIN != 0 {
        next |= FLOW_F_CLOSING;
    } else if tcp_flags & TCP_SYN != 0 {
        if flags & FLOW_F_CLOSING != 0 {
            next &= !(FLOW_F_CLOSING | FLOW_F_RESET | FLOW_F_ACKED);
        }
    } else if flags & FLOW_F_RESET != 0 {
        next &= !(FLOW_F_CLOSING | FLOW_F_RESET);
    }
    if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_ACK && flags & FLOW_F_REPLY == 0 {
        next |= FLOW_F_ACKED;
    }
    if next != flags {
        flow.flags = next;
    }
}

/// Is the forward entry's backend still one of its service's backends?
#[inline(always)]
fn backend_still_serves(flow: &Flow) -> bool {
    match unsafe { BACKENDS.get(flow.backend_id) } {
        Some(b) => {
            b.service_id == flow.service_id && b.addr == flow.dst_addr && b.port == flow.dst_port
        }
        None => false,
    }
}

/// The key of a forward entry's reply entry: the backend answers the tuple
/// the forward entry rewrites to.
#[inline(always)]
fn reply_key_of(key: &FlowKey, forward: &Flow) -> FlowKey {
    FlowKey {
        src_addr: forward.dst_addr,
        dst_addr: forward.src_addr,
        src_port: forward.dst_port,
        dst_port: forward.src_port,
        proto: key.proto,
        family: key.family,
        _pad: [0; 2],
    }
}

/// The frontend a packet is addressed to, if any.
#[inline(always)]
pub fn frontend_of(key: &FlowKey) -> Option<&'static Service> {
    let frontend = FrontendKey {
        addr: key.dst_addr,
        port: key.dst_port,
        proto: key.proto,
        family: key.family,
    };
    unsafe { SERVICES.get(frontend) }
}

/// Counts a packet for a frontend that xlb does not translate (IP options,
/// fragments) and says to drop it.
#[inline(always)]
pub fn unsupported(service: &Service) -> Verdict {
    if let Some(s) = stats(service.service_id) {
        s.drop_unsupported += 1;
    }
    Verdict::Drop
}

/// A packet without a flow entry: if it is for a frontend, pick a backend and
/// create both directions of the flow. The checks that let most such packets
/// go (not a SYN, not a frontend) run inline; only a flow to be made pays
/// for the call into `create_flow`.
#[inline(always)]
pub fn new_flow(
    ctx: *mut core::ffi::c_void,
    ifindex: u32,
    key: &FlowKey,
    tcp_flags: u8,
    bytes: u64,
) -> Result<&'static Flow, Verdict> {
    // Only a SYN starts a TCP flow. Anything else without an entry is not a
    // connection xlb knows (a stray ACK, a reply to one of the node's own
    // sockets on a frontend address): the kernel answers it as it would.
    if key.proto == PROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return Err(Verdict::Pass);
    }
    let Some(service) = frontend_of(key) else {
        return Err(Verdict::Pass);
    };
    // The family as an argument, not read from `key`: the verifier knows an
    // argument's value, but not a byte of a key in the caller's frame, and
    // would check every family branch below for both families.
    let family = key.family;
    if host::owns(ctx, key, family, ifindex) {
        return Err(Verdict::Pass);
    }
    // (BPF calls take five arguments, the result's slot counting as one.)
    create_flow(ctx, key, service, bytes | (family as u64) << 56)
}

/// Source ranges, backend choice, SNAT, and both entries of a new flow.
// Not inlined: the new-flow path's keys and flows get a stack frame of their
// own instead of crowding the hook's 512-byte frame.
// Map keys and values are passed by reference into the scratch map: by
// value they would be copied onto the 512-byte BPF stack they are kept off.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(never)]
fn create_flow(
    ctx: *mut core::ffi::c_void,
    key: &FlowKey,
    service: &Service,
    bytes_family: u64,
) -> Result<&'static Flow, Verdict> {
    let (bytes, family) = (bytes_family & 0xffff_ffff, (bytes_family >> 56) as u8);
    let now = clock_ns();
    if agent_gone(now) {
        if let Some(g) = global() {
            g.stale_passed += 1;
        }
        return Err(Verdict::Pass);
    }
    // Read in place, not copied: the copy would cost the new-flow frame
    // bytes the 512-byte stack limit cannot spare.
    let Some(st) = stats(service.service_id) else {
        return Err(Verdict::Drop);
    };
    st.packets += 1;
    st.bytes += bytes;

    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Err(Verdict::Drop);
    };
    let scratch = unsafe { &mut *scratch };
    if service.flags & SERVICE_F_SOURCE_RANGES != 0 {
        // Field by field: the key is packed, and a whole-struct write
        // becomes a bytewise memset of its padding. `_pad` is never written
        // (zero since the scratch map was made).
        scratch.range.prefix_len = SOURCE_RANGE_ID_BITS + 128;
        scratch.range.data.service_id = Be32::from_host(service.service_id);
        scratch.range.data.family = family;
        scratch.range.data.addr = key.src_addr;
        if SOURCE_RANGES.get(&scratch.range).is_none() {
            st.drop_source_range += 1;
            return Err(Verdict::Drop);
        }
    }
    if service.backend_count == 0 {
        st.drop_no_backend += 1;
        return Err(Verdict::Drop);
    }

    let hash = flow_hash(key);
    let Some(backend_id) = pick_backend(service, key, hash, now, scratch) else {
        st.drop_no_backend += 1;
        return Err(Verdict::Drop);
    };
    let snat =
        scratch.backend.flags & BACKEND_F_LOCAL == 0 && service.flags & SERVICE_F_LOCAL_ONLY == 0;
    scratch.forward = Flow {
        last_seen_ns: now,
        src_addr: key.src_addr,
        dst_addr: scratch.backend.addr,
        src_port: key.src_port,
        dst_port: scratch.backend.port,
        service_id: service.service_id,
        backend_id,
        flags: 0,
        _pad: 0,
        _pad2: 0,
    };
    scratch.reply = Flow {
        last_seen_ns: now,
        src_addr: key.dst_addr,
        dst_addr: key.src_addr,
        src_port: key.dst_port,
        dst_port: key.src_port,
        service_id: service.service_id,
        backend_id,
        flags: FLOW_F_REPLY | if snat { FLOW_F_SNAT } else { 0 },
        _pad: 0,
        _pad2: 0,
    };
    // The reply entry goes in first: a backend's answer must never find the
    // forward entry without its reverse.
    if snat {
        match snat::allocate(ctx, key, family, hash, scratch) {
            Some((node_addr, port)) => {
                scratch.forward.src_addr = node_addr;
                scratch.forward.src_port = port;
                scratch.forward.flags = FLOW_F_SNAT;
            }
            None => {
                st.drop_snat_exhausted += 1;
                return Err(Verdict::Drop);
            }
        }
    } else {
        // Without SNAT the reply key names no frontend: the same client
        // ip:port reaching one backend through two frontends would share it.
        // It is claimed, never overwritten while another flow lives on it.
        scratch.reply_key = reply_key_of(key, &scratch.forward);
        if FLOWS
            .insert(&scratch.reply_key, &scratch.reply, BPF_NOEXIST as u64)
            .is_err()
            && !take_over_reply(scratch)
        {
            st.drop_flow_conflict += 1;
            return Err(Verdict::Drop);
        }
    }
    if FLOWS.insert(key, &scratch.forward, 0).is_err() {
        return Err(Verdict::Drop);
    }
    st.new_flows += 1;
    Ok(&scratch.forward)
}

/// Has the agent stopped keeping the maps up to date (audit A-17 item 6)?
/// Its backends may be pods that are gone, their addresses given to other
/// pods since (after `kubectl delete` of xlb, or an agent that crash-loops
/// before its first sync): new clients are not sent there once the
/// heartbeat is older than `stale_after_s`. Established flows keep going.
#[inline(always)]
fn agent_gone(now: u64) -> bool {
    let Some(config) = CONFIG.get(CONFIG_KEY) else {
        return false;
    };
    config.stale_after_s != 0
        && now.saturating_sub(config.heartbeat_ns) > config.stale_after_s as u64 * 1_000_000_000
}

/// A new flow's reply key is taken. It may be overwritten when it is this
/// flow's own (same frontend: the flow is being made again) or stale (the
/// forward entry it answers is gone or leads elsewhere); not when it answers
/// another live flow, whose replies would then leave from this frontend.
/// Not inlined: its keys would not fit the caller's 512-byte stack frame, and
/// it runs only when a claim failed.
// Map keys and values are passed by reference into the scratch map: by
// value they would be copied onto the 512-byte BPF stack they are kept off.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(never)]
fn take_over_reply(scratch: &mut NewFlowScratch) -> bool {
    let reply_key = &scratch.reply_key;
    let reply = &scratch.reply;
    if let Some(held) = unsafe { FLOWS.get(reply_key) } {
        let same_frontend = held.src_addr == reply.src_addr && held.src_port == reply.src_port;
        // The held entry rewrites to (frontend → client): its forward entry
        // is keyed (client → frontend).
        scratch.other_key = FlowKey {
            src_addr: held.dst_addr,
            dst_addr: held.src_addr,
            src_port: held.dst_port,
            dst_port: held.src_port,
            proto: reply_key.proto,
            family: reply_key.family,
            _pad: [0; 2],
        };
        let live = !same_frontend
            && unsafe { FLOWS.get(&scratch.other_key) }.is_some_and(|f| {
                f.dst_addr == scratch.reply_key.src_addr && f.dst_port == scratch.reply_key.src_port
            });
        if live {
            return false;
        }
    }
    FLOWS.insert(&scratch.reply_key, &scratch.reply, 0).is_ok()
}

/// `sessionAffinity: ClientIP` first, then the service's Maglev table. The
/// backend is copied to `scratch.backend`; its id is returned.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(always)]
fn pick_backend(
    service: &Service,
    key: &FlowKey,
    hash: u32,
    now: u64,
    scratch: &mut NewFlowScratch,
) -> Option<u32> {
    scratch.affinity_key = AffinityKey {
        service_id: service.service_id,
        family: key.family,
        _pad: 0,
        _pad2: 0,
        client: key.src_addr,
    };
    let affinity = service.flags & SERVICE_F_AFFINITY != 0;
    if affinity && let Some(pinned) = AFFINITY.get_ptr_mut(&scratch.affinity_key) {
        let pinned = unsafe { &mut *pinned };
        let timeout_ns = service.affinity_timeout as u64 * 1_000_000_000;
        if now.wrapping_sub(pinned.last_seen_ns) < timeout_ns
            && let Some(backend) = unsafe { BACKENDS.get(pinned.backend_id) }
            && backend.service_id == service.service_id
        {
            pinned.last_seen_ns = now;
            words::copy(&mut scratch.backend, backend);
            return Some(pinned.backend_id);
        }
    }
    let slot = service.table_id * MAGLEV_TABLE_SIZE + hash % MAGLEV_TABLE_SIZE;
    let backend_id = *MAGLEV.get(slot)?;
    words::copy(&mut scratch.backend, unsafe { BACKENDS.get(backend_id) }?);
    if affinity {
        let pin = Affinity {
            last_seen_ns: now,
            backend_id,
            _pad: 0,
        };
        let _ = AFFINITY.insert(&scratch.affinity_key, pin, 0);
    }
    Some(backend_id)
}
