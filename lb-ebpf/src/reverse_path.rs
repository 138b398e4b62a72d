//! The reverse-path check of replies (audit A-12). A packet that matches a
//! flow's reply tuple is translated towards the client; anyone who can put
//! a packet with a backend's source address on the node's client side could
//! otherwise inject into a flow by guessing its SNAT port. Replies of
//! remote backends come in through the interface the route to the backend
//! leaves by; one arriving anywhere else is not theirs. (Replies of
//! node-local backends are translated at tc egress, after the kernel routed
//! them, and are not checked here.)

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH, bpf_fib_lookup},
    helpers::bpf_fib_lookup as fib_lookup,
};
use lb_common::{CONFIG_F_REVERSE_PATH, CONFIG_KEY, FAMILY_V6, FlowKey};

use crate::{
    maps::{CONFIG, ROUTE},
    packet::v4_raw,
    words,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Did a packet with flow key `key` come in through `ifindex`, the
/// interface the route to its source leaves by? True when the check is off
/// (`--no-reverse-path-check`).
// Not inlined, and scalars only: its lookup gets a frame of its own, off
// the hook's.
#[inline(never)]
pub fn holds(ctx: *mut core::ffi::c_void, ifindex: u32, key: &FlowKey) -> bool {
    let on = CONFIG
        .get(CONFIG_KEY)
        .is_some_and(|c| c.flags & CONFIG_F_REVERSE_PATH != 0);
    if !on {
        return true;
    }
    route(
        ctx,
        ifindex,
        key.family,
        &key.dst_addr,
        &key.src_addr,
        BPF_FIB_LOOKUP_SKIP_NEIGH,
    )
    .is_some_and(|(rc, fib)| rc == BPF_FIB_LKUP_RET_SUCCESS as i64 && fib.ifindex == ifindex)
}

/// Fills the family and addresses of a route lookup (16-byte map-key
/// addresses of `family`); everything else is the caller's.
#[inline(always)]
pub fn set_addresses(fib: &mut bpf_fib_lookup, family: u8, src: &[u8; 16], dst: &[u8; 16]) {
    if family == FAMILY_V6 {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = words::addr_words(src);
        fib.__bindgen_anon_4.ipv6_dst = words::addr_words(dst);
    } else {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = v4_raw(src);
        fib.__bindgen_anon_4.ipv4_dst = v4_raw(dst);
    }
}

/// `bpf_fib_lookup` of a packet from `src` to `dst` (16-byte addresses of
/// `family`) arriving on `ifindex`, in the per-CPU `XLB_ROUTE` room: the
/// return code and the result. Shared by the checks made before a packet
/// is translated.
#[inline(always)]
pub fn route(
    ctx: *mut core::ffi::c_void,
    ifindex: u32,
    family: u8,
    src: &[u8; 16],
    dst: &[u8; 16],
    flags: u32,
) -> Option<(i64, &'static bpf_fib_lookup)> {
    let fib = unsafe { &mut *ROUTE.get_ptr_mut(0)? };
    words::zero(fib);
    set_addresses(fib, family, src, dst);
    fib.ifindex = ifindex;
    let rc = unsafe {
        fib_lookup(
            ctx,
            fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            flags,
        )
    };
    Some((rc, fib))
}
