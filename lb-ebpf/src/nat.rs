//! The NAT core shared by every hook: find the flow a packet belongs to, or
//! create it (source ranges, affinity, Maglev, SNAT port), and say which tuple
//! the packet must be rewritten to. It reads and writes maps only; applying
//! the rewrite to the packet is the hook's job (XDP writes the bytes itself,
//! TC goes through the skb helpers that know about partial checksums).

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, BPF_NOEXIST, bpf_sock_tuple},
    helpers::{
        bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release,
    },
    maps::lpm_trie::Key,
};
use lb_common::{
    Affinity, AffinityKey, BACKEND_F_LOCAL, Backend, Be16, Be32, CONFIG_KEY, FLOW_F_ACKED,
    FLOW_F_ANSWERED, FLOW_F_CLOSING, FLOW_F_REPLY, FLOW_F_RESET, FLOW_F_SNAT, Flow, FlowKey,
    FrontendKey, MAGLEV_TABLE_SIZE, PROTO_TCP, SERVICE_F_AFFINITY, SERVICE_F_LOCAL_ONLY,
    SERVICE_F_SOURCE_RANGES, SOURCE_RANGE_ID_BITS, Service, SourceRange,
};

use crate::{
    maps::{
        AFFINITY, BACKENDS, CONFIG, FLOWS, MAGLEV, NewFlowScratch, SCRATCH, SERVICES, SOURCE_RANGES,
    },
    packet::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, v4_raw},
    stats::service as stats,
};

/// How often a flow's `last_seen_ns` is refreshed: writing it on every packet
/// would bounce the cache line between CPUs.
const TOUCH_INTERVAL_NS: u64 = 1_000_000_000;
/// SNAT ports tried per packet before giving up (counted drop). At 70 %
/// occupancy of one backend's ports, 32 probes all fail once in ~60 000.
const SNAT_TRIES: u32 = 32;

/// What happens to a packet that is not rewritten. The NAT core returns
/// `Result<Flow, Verdict>`: `Ok` is the tuple to rewrite the packet to.
pub enum Verdict {
    /// Not ours: hand the packet on untouched.
    Pass,
    /// Ours, and dropped (the reason is already counted).
    Drop,
}

/// murmur3's 32-bit finaliser: cheap and mixes every input bit.
#[inline(always)]
fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of the 5-tuple; the Maglev slot and the first SNAT port come from it.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    let ports = ((key.src_port.wire() as u32) << 16) | key.dst_port.wire() as u32;
    mix(v4_raw(&key.src_addr) ^ mix(v4_raw(&key.dst_addr) ^ mix(ports ^ mix(key.proto as u32))))
}

/// Looks the packet's tuple up in `FLOWS`, refreshes the entry and follows
/// the TCP state the packet proves (see `tcp_state`).
#[inline(always)]
pub fn existing_flow(key: &FlowKey, tcp_flags: u8, bytes: u64) -> Option<Flow> {
    let flow = FLOWS.get_ptr_mut(key)?;
    let flow = unsafe { &mut *flow };
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(flow.last_seen_ns) > TOUCH_INTERVAL_NS {
        flow.last_seen_ns = now;
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
            return None;
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
    Some(*flow)
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
/// create both directions of the flow.
// Not inlined: the new-flow path's keys and flows get a stack frame of their
// own instead of crowding the hook's 512-byte frame.
#[inline(never)]
pub fn new_flow(
    ctx: *mut core::ffi::c_void,
    key: &FlowKey,
    tcp_flags: u8,
    bytes: u64,
) -> Result<Flow, Verdict> {
    // Only a SYN starts a TCP flow. Anything else without an entry is not a
    // connection xlb knows (a stray ACK, a reply to one of the node's own
    // sockets on a frontend address): the kernel answers it as it would.
    if key.proto == PROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return Err(Verdict::Pass);
    }
    let Some(service) = frontend_of(key) else {
        return Err(Verdict::Pass);
    };
    let service = *service;
    let Some(st) = stats(service.service_id) else {
        return Err(Verdict::Drop);
    };
    st.packets += 1;
    st.bytes += bytes;

    if service.flags & SERVICE_F_SOURCE_RANGES != 0 {
        let range = Key::new(
            SOURCE_RANGE_ID_BITS + 128,
            SourceRange {
                service_id: Be32::from_host(service.service_id),
                addr: key.src_addr,
            },
        );
        if SOURCE_RANGES.get(&range).is_none() {
            st.drop_source_range += 1;
            return Err(Verdict::Drop);
        }
    }
    if service.backend_count == 0 {
        st.drop_no_backend += 1;
        return Err(Verdict::Drop);
    }

    let hash = flow_hash(key);
    let now = unsafe { bpf_ktime_get_ns() };
    let Some((backend_id, backend)) = pick_backend(&service, key, hash, now) else {
        st.drop_no_backend += 1;
        return Err(Verdict::Drop);
    };

    let snat = backend.flags & BACKEND_F_LOCAL == 0 && service.flags & SERVICE_F_LOCAL_ONLY == 0;
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Err(Verdict::Drop);
    };
    let scratch = unsafe { &mut *scratch };
    scratch.forward = Flow {
        last_seen_ns: now,
        src_addr: key.src_addr,
        dst_addr: backend.addr,
        src_port: key.src_port,
        dst_port: backend.port,
        service_id: service.service_id,
        backend_id,
        flags: 0,
        _pad: [0; 3],
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
        _pad: [0; 3],
    };
    // The reply entry goes in first: a backend's answer must never find the
    // forward entry without its reverse.
    if snat {
        match snat_allocate(ctx, key, &backend, hash, scratch) {
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
    Ok(scratch.forward)
}

/// A new flow's reply key is taken. It may be overwritten when it is this
/// flow's own (same frontend: the flow is being made again) or stale (the
/// forward entry it answers is gone or leads elsewhere); not when it answers
/// another live flow, whose replies would then leave from this frontend.
/// Not inlined: its keys would not fit the caller's 512-byte stack frame, and
/// it runs only when a claim failed.
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

/// `sessionAffinity: ClientIP` first, then the service's Maglev table.
#[inline(always)]
fn pick_backend(service: &Service, key: &FlowKey, hash: u32, now: u64) -> Option<(u32, Backend)> {
    let affinity_key = AffinityKey {
        service_id: service.service_id,
        family: key.family,
        _pad: [0; 3],
        client: key.src_addr,
    };
    let affinity = service.flags & SERVICE_F_AFFINITY != 0;
    if affinity && let Some(pinned) = AFFINITY.get_ptr_mut(affinity_key) {
        let pinned = unsafe { &mut *pinned };
        let timeout_ns = service.affinity_timeout as u64 * 1_000_000_000;
        if now.wrapping_sub(pinned.last_seen_ns) < timeout_ns
            && let Some(backend) = unsafe { BACKENDS.get(pinned.backend_id) }
            && backend.service_id == service.service_id
        {
            pinned.last_seen_ns = now;
            return Some((pinned.backend_id, *backend));
        }
    }
    let slot = service.table_id * MAGLEV_TABLE_SIZE + hash % MAGLEV_TABLE_SIZE;
    let backend_id = *MAGLEV.get(slot)?;
    let backend = *unsafe { BACKENDS.get(backend_id) }?;
    if affinity {
        let pin = Affinity {
            last_seen_ns: now,
            backend_id,
            _pad: 0,
        };
        let _ = AFFINITY.insert(affinity_key, pin, 0);
    }
    Some((backend_id, backend))
}

/// Picks a node port for a source-translated flow and inserts its reply
/// entry. A port is taken only if no flow of ours uses it towards this
/// backend (`BPF_NOEXIST` insert, so two CPUs cannot take the same one) and
/// the node itself has no socket that would receive the backend's replies.
#[inline(always)]
fn snat_allocate(
    ctx: *mut core::ffi::c_void,
    key: &FlowKey,
    backend: &Backend,
    hash: u32,
    scratch: &mut NewFlowScratch,
) -> Option<([u8; 16], Be16)> {
    let config = CONFIG.get(CONFIG_KEY)?;
    let node_raw = v4_raw(&config.node_addr);
    if node_raw == 0 || config.snat_port_max < config.snat_port_min {
        return None;
    }
    let span = (config.snat_port_max - config.snat_port_min) as u32 + 1;
    // A random start, not one derived from the flow: a flow whose probes all
    // failed must probe other ports when its next packet (a retransmit)
    // tries again.
    let start = mix(hash ^ unsafe { bpf_get_prandom_u32() }) % span;
    // One key and one socket tuple, in the scratch map and reused by every
    // probe: not even one copy fits the 512-byte BPF stack any more.
    scratch.reply_key = FlowKey {
        src_addr: backend.addr,
        dst_addr: config.node_addr,
        src_port: backend.port,
        dst_port: Be16::default(),
        proto: key.proto,
        family: key.family,
        _pad: [0; 2],
    };
    scratch.tuple = unsafe { core::mem::zeroed() };
    scratch.tuple.__bindgen_anon_1.ipv4.saddr = v4_raw(&backend.addr);
    scratch.tuple.__bindgen_anon_1.ipv4.daddr = node_raw;
    scratch.tuple.__bindgen_anon_1.ipv4.sport = backend.port.wire();
    for i in 0..SNAT_TRIES {
        // Stride through the range so collisions do not cluster.
        let port = config.snat_port_min as u32 + (start + i * 7919) % span;
        let port = Be16::from_host(port as u16);
        scratch.reply_key.dst_port = port;
        // A plain lookup first: cheap, and unlike a failing insert into a
        // full LRU map it never evicts anything. Only a free port pays for
        // the socket lookup and the claiming insert.
        if FLOWS.get_ptr(&scratch.reply_key).is_some() {
            continue;
        }
        scratch.tuple.__bindgen_anon_1.ipv4.dport = port.wire();
        if node_socket_exists(ctx, key.proto, &mut scratch.tuple) {
            continue;
        }
        if FLOWS
            .insert(&scratch.reply_key, &scratch.reply, BPF_NOEXIST as u64)
            .is_ok()
        {
            return Some((config.node_addr, port));
        }
    }
    None
}

/// Would the node's own stack receive the packet `tuple` describes (the
/// backend's reply to a SNAT port)?
#[inline(always)]
fn node_socket_exists(ctx: *mut core::ffi::c_void, proto: u8, tuple: &mut bpf_sock_tuple) -> bool {
    let size = core::mem::size_of::<u32>() as u32 * 2 + core::mem::size_of::<u16>() as u32 * 2;
    let netns = BPF_F_CURRENT_NETNS as u64;
    let sk = unsafe {
        if proto == PROTO_TCP {
            bpf_sk_lookup_tcp(ctx, tuple, size, netns, 0)
        } else {
            bpf_sk_lookup_udp(ctx, tuple, size, netns, 0)
        }
    };
    if sk.is_null() {
        return false;
    }
    unsafe { bpf_sk_release(sk.cast()) };
    true
}
