//! Host traffic is the host's (audit A-5). A frontend may be one of the
//! node's own addresses (node address mode, or a VIP that keepalived or
//! kube-vip keeps on the node), and then a port of it may belong to the node
//! itself: a daemon listening there (sshd, the kubelet), or one of the
//! node's UDP sockets whose answers come back to it (the resolver, an NTP
//! client that picked that local port). Such packets are not new clients of
//! the Service: the kernel gets them. (TCP replies to the node's own
//! connections never get this far: only a SYN starts a flow.)

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, BPF_FIB_LKUP_RET_NOT_FWDED, bpf_sock_tuple},
    helpers::{bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release},
};
use lb_common::{FAMILY_V6, FlowKey, PROTO_TCP};

use crate::{maps::SCRATCH, packet::v4_raw, reverse_path, stats::global, words};

/// Fills a socket tuple from 16-byte addresses of `family` and raw ports.
#[inline(always)]
pub fn set_tuple(
    tuple: &mut bpf_sock_tuple,
    family: u8,
    src: &[u8; 16],
    dst: &[u8; 16],
    sport: u16,
    dport: u16,
) {
    if family == FAMILY_V6 {
        let t = unsafe { &mut tuple.__bindgen_anon_1.ipv6 };
        t.saddr = words::addr_words(src);
        t.daddr = words::addr_words(dst);
        t.sport = sport;
        t.dport = dport;
    } else {
        let t = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
        t.saddr = v4_raw(src);
        t.daddr = v4_raw(dst);
        t.sport = sport;
        t.dport = dport;
    }
}

/// Does a socket of the node own the packet `key` (a would-be new flow that
/// came in through `ifindex`)? Looked up for every new flow; the route
/// lookup only when a socket matched.
// Not inlined: it works in the scratch maps, in a frame of its own.
#[inline(never)]
pub fn owns(ctx: *mut core::ffi::c_void, key: &FlowKey, family: u8, ifindex: u32) -> bool {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    let tuple = unsafe { &mut (*scratch).tuple };
    words::zero(tuple);
    set_tuple(
        tuple,
        family,
        &key.src_addr,
        &key.dst_addr,
        key.src_port.wire(),
        key.dst_port.wire(),
    );
    if !socket_exists(ctx, family, key.proto, tuple) {
        return false;
    }
    // A socket bound to the wildcard address matches any destination, also
    // a frontend the node only forwards for: it counts only when the
    // frontend is an address of this node (the route to it is local).
    let local = reverse_path::route(ctx, ifindex, family, &key.src_addr, &key.dst_addr, 0)
        .is_some_and(|(rc, _)| rc == BPF_FIB_LKUP_RET_NOT_FWDED as i64);
    if local && let Some(g) = global() {
        g.host_socket += 1;
    }
    local
}

/// Would the node's own stack receive the packet `tuple` describes (an
/// established or listening TCP socket, a bound or connected UDP one, in
/// this network namespace)?
#[inline(always)]
pub fn socket_exists(
    ctx: *mut core::ffi::c_void,
    family: u8,
    proto: u8,
    tuple: &mut bpf_sock_tuple,
) -> bool {
    // The helper tells the families apart by the tuple's size.
    let addr = if family == FAMILY_V6 { 16 } else { 4 };
    let size = (addr * 2 + core::mem::size_of::<u16>() * 2) as u32;
    let netns = BPF_F_CURRENT_NETNS as u64;
    let socket = unsafe {
        if proto == PROTO_TCP {
            bpf_sk_lookup_tcp(ctx, tuple, size, netns, 0)
        } else {
            bpf_sk_lookup_udp(ctx, tuple, size, netns, 0)
        }
    };
    if socket.is_null() {
        return false;
    }
    unsafe { bpf_sk_release(socket.cast()) };
    true
}
