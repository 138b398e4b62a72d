//! Source NAT for flows to backends on other nodes (klipper-lb's
//! `MASQUERADE`): the node address and a free port from the SNAT range, so
//! the backend's replies come back through this node.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_get_prandom_u32};
use lb_common::{Be16, CONFIG_KEY, FAMILY_V6, FlowKey};

use crate::{
    hash::mix,
    host,
    maps::{CONFIG, FLOWS, NewFlowScratch, SNAT_OWNERS},
    words,
};

/// SNAT ports tried per packet before giving up (counted drop). At 70 %
/// occupancy of one backend's ports, 32 probes all fail once in ~60 000.
const SNAT_TRIES: u32 = 32;

/// Picks a node port for a source-translated flow and inserts its reply
/// entry. A port is taken only if no flow of ours uses it towards this
/// backend (no reply entry, and no live forward entry that rewrites to it:
/// see `held_by_live_flow`), the node itself has no socket that would
/// receive the backend's replies, and the claiming `BPF_NOEXIST` insert
/// wins (so two CPUs cannot take the same one).
// Map keys and values are passed by reference into the scratch map: by
// value they would be copied onto the 512-byte BPF stack they are kept off.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(always)]
pub fn allocate(
    ctx: *mut core::ffi::c_void,
    key: &FlowKey,
    family: u8,
    hash: u32,
    scratch: &mut NewFlowScratch,
) -> Option<([u8; 16], Be16)> {
    // The chosen backend, in the scratch map with everything else.
    let (backend_addr, backend_port) = (scratch.backend.addr, scratch.backend.port);
    let config = CONFIG.get(CONFIG_KEY)?;
    let node_addr = if family == FAMILY_V6 {
        &config.node_addr_v6
    } else {
        &config.node_addr
    };
    // All zero: no SNAT address of this family. Copied by words (a 16-byte
    // copy becomes a bytewise `memmove`).
    let words = words::addr_words(node_addr);
    let node_addr = &unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) };
    if words[0] | words[1] | words[2] | words[3] == 0 || config.snat_port_max < config.snat_port_min
    {
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
        src_addr: backend_addr,
        dst_addr: *node_addr,
        src_port: backend_port,
        dst_port: Be16::default(),
        proto: key.proto,
        family,
        _pad: [0; 2],
    };
    words::zero(&mut scratch.tuple);
    host::set_tuple(
        &mut scratch.tuple,
        family,
        &backend_addr,
        node_addr,
        backend_port.wire(),
        0,
    );
    for i in 0..SNAT_TRIES {
        // Stride through the range so collisions do not cluster.
        let port = config.snat_port_min as u32 + (start + i * 7919) % span;
        let port = Be16::from_host(port as u16);
        scratch.reply_key.dst_port = port;
        // A plain lookup first: cheap, and unlike a failing insert into a
        // full LRU map it never evicts anything. Only a free port pays for
        // the socket lookup and the claiming insert.
        if FLOWS.get_ptr(&scratch.reply_key).is_some() || held_by_live_flow(scratch) {
            continue;
        }
        if family == FAMILY_V6 {
            scratch.tuple.__bindgen_anon_1.ipv6.dport = port.wire();
        } else {
            scratch.tuple.__bindgen_anon_1.ipv4.dport = port.wire();
        }
        // Would the backend's reply reach one of the node's own sockets?
        if host::socket_exists(ctx, family, key.proto, &mut scratch.tuple) {
            continue;
        }
        if FLOWS
            .insert(&scratch.reply_key, &scratch.reply, BPF_NOEXIST as u64)
            .is_ok()
        {
            // The port is ours once its owner is recorded; without the
            // record an eviction of the reply entry could hand it out again
            // while this flow lives, so no record, no flow.
            if SNAT_OWNERS.insert(&scratch.reply_key, key, 0).is_err() {
                let _ = FLOWS.remove(&scratch.reply_key);
                return None;
            }
            return Some((*node_addr, port));
        }
    }
    None
}

/// The reply entry of a SNAT port is gone, but is the port still used? Its
/// owner's forward entry may be alive (the LRU evicted only the reply half):
/// then the backend would see two clients as one peer, and every reply would
/// go to the newer one (audit A-6). The port is held while the owner's entry
/// still rewrites to exactly this tuple; an owner whose entry is gone or
/// now leads elsewhere (a new connection on its tuple) holds nothing.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(always)]
fn held_by_live_flow(scratch: &NewFlowScratch) -> bool {
    let Some(owner) = (unsafe { SNAT_OWNERS.get(&scratch.reply_key) }) else {
        return false;
    };
    let Some(forward) = (unsafe { FLOWS.get(owner) }) else {
        return false;
    };
    let reply = &scratch.reply_key;
    forward.dst_addr == reply.src_addr
        && forward.dst_port == reply.src_port
        && forward.src_addr == reply.dst_addr
        && forward.src_port == reply.dst_port
}
