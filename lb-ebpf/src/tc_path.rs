//! The tcx hooks, where packets are skbs and the kernel knows their checksum
//! state. The skb helpers used here keep partial checksums (offloaded TX of
//! pods and of veth peers) correct, which an XDP-style in-place rewrite
//! would not: XDP sees only bytes, and on a veth the bytes of a
//! CHECKSUM_PARTIAL packet hold a pseudo-header sum, not a checksum.
//!
//! - egress, on every uplink: reverse translation of replies from
//!   node-local backends. The kernel routes those from the pod's veth to the
//!   uplink, so one hook there sees them all and pods need no hook of their
//!   own.
//! - ingress, on uplinks where XDP is not used (virtual devices such as the
//!   veths that join kind/k3d nodes, or drivers without native XDP): the
//!   whole XDP job (forward translation and replies of remote backends).
//!   The translated packet goes on to the kernel, which forwards it with its
//!   checksum state intact; nothing is redirected from here.

use aya_ebpf::{
    bindings::{
        __sk_buff, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM,
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH,
        TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        bpf_check_mtu_ret::BPF_MTU_CHK_RET_SUCCESS, bpf_fib_lookup,
    },
    helpers::{bpf_check_mtu, bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use lb_common::{FAMILY_V6, FLOW_F_REPLY, FLOW_F_SNAT, Flow, FlowKey, PROTO_UDP};

use crate::{
    announce,
    checksum::CsumDelta,
    fragments,
    icmp::{self, ErrorRewrite},
    icmp6, leak,
    maps::FLOWS,
    nat::{self, Arrival, Lookup, Verdict},
    packet::{
        ANSWER_TIME_EXCEEDED, ANSWER_V6, ETH_P_IP, ETH_P_IPV6, EthHdr, IPV4_CHECK_OFFSET,
        IPV4_DADDR_OFFSET, IPV4_SADDR_OFFSET, IPV6_DADDR_OFFSET, IPV6_SADDR_OFFSET, Ipv6Hdr,
        MAX_HEADERS_LEN, PORTS_DEST_OFFSET, PORTS_SOURCE_OFFSET, PROTO_ICMPV6, Parsed, Skip,
        TCP_CHECK_OFFSET, UDP_CHECK_OFFSET, network, parse_v4, parse_v6, ptr_at, v4_raw,
    },
    reverse_path,
    stats::global,
    words,
};

/// tcx: let the next program (or the stack) decide.
const TCX_NEXT: i32 = -1;

/// Parses the skb with `parse` (one family's parser), pulling headers that
/// sit in its non-linear part into the linear area first when the first
/// look finds them cut short.
#[inline(always)]
fn parse_skb<F: Fn(usize, usize) -> Result<Parsed, Skip>>(
    ctx: &TcContext,
    parse: F,
) -> Result<Parsed, Skip> {
    // One parser body for both looks (a second inlined copy would double
    // this frame): the first look, and after a pull the second.
    let mut pulled = false;
    loop {
        match parse(ctx.data(), ctx.data_end()) {
            Err(Skip::Malformed) if !pulled => {
                if pull_headers(ctx).is_err() {
                    return Err(Skip::Malformed);
                }
                pulled = true;
            }
            other => return other,
        }
    }
}

#[inline(always)]
fn pull_headers(ctx: &TcContext) -> Result<(), i64> {
    let want = core::cmp::min(ctx.len(), MAX_HEADERS_LEN as u32);
    ctx.pull_data(want).map(|_| ())
}

/// Where the network header starts and its EtherType (see
/// `packet::network`), pulling the link headers in if need be.
#[inline(always)]
fn network_skb(ctx: &TcContext) -> Option<(usize, u16)> {
    match network(ctx.data(), ctx.data_end()) {
        Ok(found) => Some(found),
        Err(_) => {
            pull_headers(ctx).ok()?;
            network(ctx.data(), ctx.data_end()).ok()
        }
    }
}

/// Is the IPv6 packet at `l3` ICMPv6 right after its fixed header? Such
/// packets go to `icmp6_error` straight from the hook: called from the
/// per-family subprogram its frame would stack on that one's, past the
/// 512-byte limit.
#[inline(always)]
fn icmp6_first(ctx: &TcContext, l3: usize) -> bool {
    // Read in place, not through `bpf_skb_load_bytes`: its buffer would
    // give the hook a stack frame, which the new-flow chain cannot spare.
    // A header outside the linear part is taken for not ICMPv6 (the parser
    // then passes the packet).
    ptr_at::<Ipv6Hdr>(ctx.data(), ctx.data_end(), l3)
        .is_ok_and(|ip| unsafe { (*ip).nexthdr } == PROTO_ICMPV6)
}

/// One subprogram per hook and family (see `packet::network`).
macro_rules! per_family {
    ($name:ident, $parse:ident, $handle:ident) => {
        #[inline(never)]
        fn $name(skb: *mut __sk_buff, l3: usize) -> i32 {
            let ctx = &TcContext::new(skb);
            $handle(
                ctx,
                parse_skb(ctx, |data, data_end| $parse(data, data_end, l3)),
            )
        }
    };
}
per_family!(egress_v4, parse_v4, egress_parsed);
per_family!(egress_v6, parse_v6, egress_parsed);
per_family!(ingress_v4, parse_v4, ingress_parsed);
per_family!(ingress_v6, parse_v6, ingress_parsed);

/// Does the packet claim more than the skb holds? Such a packet is never
/// translated.
#[inline(always)]
fn cut_short(ctx: &TcContext, p: &Parsed) -> bool {
    p.l3 + p.ip_len as usize > ctx.len() as usize
}

/// tcx egress: replies of node-local backends.
#[inline(always)]
pub fn egress(ctx: &TcContext) -> i32 {
    match network_skb(ctx) {
        Some((l3, ETH_P_IP)) => egress_v4(ctx.skb.skb, l3),
        Some((l3, ETH_P_IPV6)) if icmp6_first(ctx, l3) => icmp6_error(ctx.skb.skb, l3, true),
        Some((l3, ETH_P_IPV6)) => egress_v6(ctx.skb.skb, l3),
        _ => TCX_NEXT,
    }
}

#[inline(always)]
fn egress_parsed(ctx: &TcContext, parsed: Result<Parsed, Skip>) -> i32 {
    let parsed = match parsed {
        Ok(p) if cut_short(ctx, &p) => return TCX_NEXT,
        Ok(p) => p,
        // Errors from node-local backends, or from the node about packets
        // it forwarded to them: reply entries only, as for their packets.
        Err(Skip::Icmp(l3)) => return icmp_error(ctx.skb.skb, l3, true),
        // Handled before parsing (see `icmp6_first`).
        Err(Skip::Icmp6(_)) => return TCX_NEXT,
        Err(Skip::Fragment(l3)) => {
            let ifindex = unsafe { (*ctx.skb.skb).ifindex };
            return later_fragment(ctx.skb.skb, l3, ifindex, false);
        }
        Err(_) => return TCX_NEXT,
    };
    let bytes = parsed.ip_len as u64;
    // Only reply entries apply at egress: forward entries are the ingress
    // hook's.
    match nat::existing_flow(&parsed.key, parsed.tcp_flags, bytes, Arrival::Egress) {
        Lookup::Hit(flow) if flow.flags & FLOW_F_REPLY != 0 => {
            fragments::remember_first(&parsed, flow, unsafe { (*ctx.skb.skb).ifindex });
            if rewrite(ctx, &parsed, flow).is_err() {
                return TC_ACT_SHOT;
            }
            TCX_NEXT
        }
        _ if leak::reply_without_flow(&parsed.key) => TC_ACT_SHOT,
        _ => TCX_NEXT,
    }
}

/// tcx ingress: what `xdp_path::run` does, for uplinks without XDP.
#[inline(always)]
pub fn ingress(ctx: &TcContext) -> i32 {
    match network_skb(ctx) {
        Some((l3, ETH_P_IP)) => ingress_v4(ctx.skb.skb, l3),
        Some((l3, ETH_P_IPV6)) if icmp6_first(ctx, l3) => icmp6_error(ctx.skb.skb, l3, false),
        Some((l3, ETH_P_IPV6)) => ingress_v6(ctx.skb.skb, l3),
        Some((l3, announce::ETH_P_ARP)) => announce::tc_arp(ctx.skb.skb, l3),
        Some(_) => Verdict::Pass.tc_action(),
        None => {
            if let Some(g) = global() {
                g.malformed += 1;
            }
            TCX_NEXT
        }
    }
}

#[inline(always)]
fn ingress_parsed(ctx: &TcContext, parsed: Result<Parsed, Skip>) -> i32 {
    let parsed = match parsed {
        Ok(p) if cut_short(ctx, &p) => {
            if let Some(g) = global() {
                g.malformed += 1;
            }
            return TCX_NEXT;
        }
        Ok(p) => p,
        Err(Skip::Icmp(l3)) => return icmp_error(ctx.skb.skb, l3, false),
        Err(Skip::Icmp6(_)) => return Verdict::Pass.tc_action(),
        Err(Skip::Unsupported(key)) => {
            return match nat::frontend_of(&key) {
                Some(service) => nat::unsupported(service).tc_action(),
                None => Verdict::Pass.tc_action(),
            };
        }
        Err(Skip::Fragment(l3)) => {
            let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
            return later_fragment(ctx.skb.skb, l3, ifindex, true);
        }
        Err(Skip::Malformed) => {
            if let Some(g) = global() {
                g.malformed += 1;
            }
            return TCX_NEXT;
        }
        Err(_) => return Verdict::Pass.tc_action(),
    };
    let bytes = parsed.ip_len as u64;
    let arrival = Arrival::Ingress {
        ctx: ctx.skb.skb.cast(),
        ifindex: unsafe { (*ctx.skb.skb).ingress_ifindex },
    };
    let flow = match nat::existing_flow(&parsed.key, parsed.tcp_flags, bytes, arrival) {
        Lookup::Hit(flow) => flow,
        Lookup::Refused => return TCX_NEXT,
        Lookup::Miss => {
            let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
            match nat::new_flow(
                ctx.skb.skb.cast(),
                ifindex,
                &parsed.key,
                parsed.tcp_flags,
                bytes,
            ) {
                Ok(flow) => flow,
                Err(verdict) => return verdict.tc_action(),
            }
        }
    };
    if let Some(action) = answered(ctx.skb.skb, &parsed, flow) {
        return action;
    }
    fragments::remember_first(&parsed, flow, unsafe { (*ctx.skb.skb).ingress_ifindex });
    if rewrite(ctx, &parsed, flow).is_err() {
        return TC_ACT_SHOT;
    }
    if let Some(g) = global() {
        g.translated_passed += 1;
    }
    TCX_NEXT
}

/// Does the packet get an ICMP answer instead of being translated: "time
/// exceeded" for TTL or hop limit 1 on a source-translated flow (see
/// `xdp_path::forward`), "fragmentation needed" / "packet too big" when it
/// does not fit its route once translated? Then the action that sends it.
// Not inlined: its values get a frame of their own, off the per-family
// subprogram's (which the new-flow chain shares).
#[inline(never)]
fn answered(skb: *mut __sk_buff, parsed: &Parsed, flow: &Flow) -> Option<i32> {
    let v6 = parsed.key.family == FAMILY_V6;
    let family = if v6 { ANSWER_V6 } else { 0 };
    if flow.flags & (FLOW_F_SNAT | FLOW_F_REPLY) == FLOW_F_SNAT && parsed.ttl <= 1 {
        return Some(frag_needed(skb, parsed.l3, family | ANSWER_TIME_EXCEEDED));
    }
    let len = unsafe { (*skb).len } as usize;
    if parsed.df && len > parsed.l3 + if v6 { ALWAYS_FITS_V6 } else { ALWAYS_FITS } {
        let mtu = too_big(skb, flow, parsed.key.family)?;
        return Some(frag_needed(skb, parsed.l3, mtu as u32 | family));
    }
    None
}

/// A later fragment seen on `ifindex`: given its first fragment's addresses
/// if that one was translated there (no L4 header here, so only the IPv4
/// checksum changes), then left to the kernel like the flow's packets;
/// left alone otherwise (and, at ingress, counted as passed).
// Not inlined, for the same reason as `icmp_error`.
#[inline(never)]
fn later_fragment(skb: *mut __sk_buff, l3: usize, ifindex: u32, ingress: bool) -> i32 {
    let ctx = &TcContext::new(skb);
    let Some((ip, record)) = fragments::later(ctx.data(), ctx.data_end(), l3, ifindex) else {
        return if ingress {
            Verdict::Pass.tc_action()
        } else {
            TCX_NEXT
        };
    };
    let (old_src, old_dst) = unsafe { ((*ip).saddr, (*ip).daddr) };
    let (new_src, new_dst) = (record.src, record.dst);
    let ip_check = l3 + IPV4_CHECK_OFFSET;
    let written = ctx
        .l3_csum_replace(ip_check, old_src as u64, new_src as u64, 4)
        .and_then(|_| ctx.l3_csum_replace(ip_check, old_dst as u64, new_dst as u64, 4))
        .and_then(|_| ctx.store(l3 + IPV4_SADDR_OFFSET, &new_src, 0))
        .and_then(|_| ctx.store(l3 + IPV4_DADDR_OFFSET, &new_dst, 0));
    if written.is_err() {
        return TC_ACT_SHOT;
    }
    if let Some(g) = global() {
        g.fragments_translated += 1;
    }
    TCX_NEXT
}

/// IPv4 guarantees 576 bytes, IPv6 1280: smaller packets are not checked
/// against the MTU.
const ALWAYS_FITS: usize = 576;
const ALWAYS_FITS_V6: usize = 1280;

/// The MTU of the device the packet would leave through once translated to
/// `flow`, if it does not fit it (for a GSO skb: if its segments do not).
/// The kernel would answer such a packet itself, but to its translated
/// source: the node, for SNAT.
// Not inlined: its lookup gets a stack frame of its own.
#[inline(never)]
// Scalars and the raw skb, not references: a reference would force the
// caller to keep the value in its own (tight) stack frame.
fn too_big(skb: *mut __sk_buff, flow: &Flow, family: u8) -> Option<u16> {
    let mut room = core::mem::MaybeUninit::<bpf_fib_lookup>::uninit();
    let fib = words::zeroed(&mut room);
    reverse_path::set_addresses(fib, family, &flow.src_addr, &flow.dst_addr);
    fib.ifindex = unsafe { (*skb).ingress_ifindex };
    // No length given: the helper checks the skb against the egress
    // device's MTU itself (GSO skbs always pass that check).
    let rc = unsafe {
        fib_lookup(
            skb.cast(),
            fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    let mtu = unsafe { fib.__bindgen_anon_1.mtu_result };
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        return Some(mtu);
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return None;
    }
    // A GSO skb: would its segments fit?
    let mut len = 0u32;
    let rc = unsafe { bpf_check_mtu(skb.cast(), fib.ifindex, &mut len, 0, 0) };
    if rc == BPF_MTU_CHK_RET_SUCCESS as i64 || rc < 0 {
        return None;
    }
    Some(len as u16)
}

/// Answers a packet too big for its route with ICMP "fragmentation needed"
/// or ICMPv6 "packet too big" (`mtu_family`: the MTU, bit 16 set for
/// IPv6), sent back out of the device it came in on: the skb is cut to the
/// quoted part (which ends GSO), grown after its L2 header by the new IP
/// and ICMP headers, and its Ethernet addresses swapped.
// Not inlined, for the same reason as `icmp_error`.
#[inline(never)]
fn frag_needed(skb: *mut __sk_buff, l3: usize, mtu_family: u32) -> i32 {
    let ctx = &TcContext::new(skb);
    let (mtu, v6) = (mtu_family as u16, mtu_family & ANSWER_V6 != 0);
    let exceeded = mtu_family & ANSWER_TIME_EXCEEDED != 0;
    let (quotable, headers_len) = if v6 {
        (icmp6::QUOTABLE_LEN, icmp6::TOO_BIG_HEADERS_LEN)
    } else {
        (icmp::QUOTABLE_LEN, icmp::FRAG_NEEDED_HEADERS_LEN)
    };
    let Ok(eth) = ctx.load::<EthHdr>(0) else {
        return TC_ACT_SHOT;
    };
    let quoted = l3 + headers_len;
    let keep = (l3 + quotable) as u32;
    if unsafe { bpf_skb_change_tail(skb, keep, 0) } != 0
        || ctx
            .adjust_room(headers_len as i32, BPF_ADJ_ROOM_MAC, 0)
            .is_err()
        || ctx.pull_data((quoted + quotable) as u32).is_err()
    {
        return TC_ACT_SHOT;
    }
    let fixed = if v6 {
        icmp6::partial_checksum_fixed_point(ctx.data(), ctx.data_end(), quoted)
    } else {
        icmp::partial_checksum_fixed_point(ctx.data(), ctx.data_end(), quoted)
    };
    match fixed {
        Ok(Some((at, value))) => {
            if ctx
                .store(quoted + at, &value, BPF_F_RECOMPUTE_CSUM as u64)
                .is_err()
            {
                return TC_ACT_SHOT;
            }
        }
        Ok(None) => {}
        Err(_) => return TC_ACT_SHOT,
    }
    let stored = if v6 {
        let Ok(headers) = icmp6::too_big(ctx.data(), ctx.data_end(), quoted, mtu, exceeded) else {
            return TC_ACT_SHOT;
        };
        ctx.store(l3, &headers, BPF_F_RECOMPUTE_CSUM as u64)
    } else {
        let Ok(headers) = icmp::frag_needed(ctx.data(), ctx.data_end(), quoted, mtu, exceeded)
        else {
            return TC_ACT_SHOT;
        };
        ctx.store(l3, &headers, BPF_F_RECOMPUTE_CSUM as u64)
    };
    let swapped = EthHdr {
        dst: eth.src,
        src: eth.dst,
        ether_type: eth.ether_type,
    };
    if stored.is_err() || ctx.store(0, &swapped, 0).is_err() {
        return TC_ACT_SHOT;
    }
    if let Some(g) = global() {
        if exceeded {
            g.time_exceeded_sent += 1;
        } else {
            g.frag_needed_sent += 1;
        }
    }
    unsafe { bpf_redirect((*skb).ifindex, 0) as i32 }
}

/// An ICMP error: translated when it quotes a packet of a translated flow
/// (at egress only replies' flows), then left to the kernel.
// Not inlined: a stack frame of its own, away from the new-flow call's.
#[inline(never)]
fn icmp_error(skb: *mut __sk_buff, l3: usize, replies_only: bool) -> i32 {
    let ctx = &TcContext::new(skb);
    let error = match icmp::parse_error(ctx.data(), ctx.data_end(), l3) {
        Ok(error) => error,
        Err(Skip::Malformed) => {
            // The quoted headers may lie in the skb's non-linear part.
            let want = core::cmp::min(ctx.len(), MAX_HEADERS_LEN as u32);
            if ctx.pull_data(want).is_err() {
                return TCX_NEXT;
            }
            match icmp::parse_error(ctx.data(), ctx.data_end(), l3) {
                Ok(error) => error,
                Err(_) => return TCX_NEXT,
            }
        }
        Err(_) => return TCX_NEXT,
    };
    let Some(entry) = (unsafe { FLOWS.get(error.key) }) else {
        return TCX_NEXT;
    };
    if replies_only && entry.flags & FLOW_F_REPLY == 0 {
        return TCX_NEXT;
    }
    let Ok(rewrite) = icmp::error_rewrite(ctx.data(), ctx.data_end(), &error, entry) else {
        return TCX_NEXT;
    };
    if store_error(ctx, l3, &rewrite).is_err() {
        return TC_ACT_SHOT;
    }
    if let Some(g) = global() {
        g.icmp_translated += 1;
    }
    TCX_NEXT
}

/// An ICMPv6 message: translated when it is an error quoting a packet of a
/// translated flow (at egress only replies' flows), then left to the
/// kernel.
// Not inlined, like `icmp_error`.
// The key by reference: by value it would be copied again.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(never)]
fn icmp6_error(skb: *mut __sk_buff, l3: usize, replies_only: bool) -> i32 {
    let l3 = l3 & 0x1f;
    if !replies_only && let Some(action) = announce::tc_solicitation(skb, l3) {
        return action;
    }
    let ctx = &TcContext::new(skb);
    // The quoted headers may lie in the skb's non-linear part: one parser
    // body for the look before and the look after pulling them in.
    let mut pulled = false;
    let key = loop {
        match icmp6::parse_error(ctx.data(), ctx.data_end(), l3) {
            Ok(key) => break key,
            Err(Skip::Malformed) if !pulled => {
                if pull_headers(ctx).is_err() {
                    return TCX_NEXT;
                }
                pulled = true;
            }
            Err(_) => return TCX_NEXT,
        }
    };
    let Some(entry) = (unsafe { FLOWS.get(&key) }) else {
        return TCX_NEXT;
    };
    if replies_only && entry.flags & FLOW_F_REPLY == 0 {
        return TCX_NEXT;
    }
    match translate_error6(skb, l3, &key, entry) {
        Translated::Yes => {
            if let Some(g) = global() {
                g.icmp_translated += 1;
            }
            TCX_NEXT
        }
        Translated::No => TCX_NEXT,
        Translated::Broken => TC_ACT_SHOT,
    }
}

enum Translated {
    Yes,
    /// Left as it was.
    No,
    /// Half written: must not leave.
    Broken,
}

/// Works out and writes an ICMPv6 error's translation.
#[inline(always)]
fn translate_error6(skb: *mut __sk_buff, l3: usize, key: &FlowKey, entry: &Flow) -> Translated {
    let ctx = &TcContext::new(skb);
    let l3 = l3 & 0x1f;
    let Ok(checks) = icmp6::error_rewrite(ctx.data(), ctx.data_end(), l3, key, entry) else {
        return Translated::No;
    };
    if store_error6(ctx, l3, &checks, entry).is_err() {
        return Translated::Broken;
    }
    Translated::Yes
}

/// Writes an ICMPv6 error's translation through the store helper, every
/// store with `BPF_F_RECOMPUTE_CSUM`: the ICMPv6 checksum covers the outer
/// addresses through its pseudo-header, so unlike IPv4 the changes do not
/// cancel out in the packet's own sum, and a CHECKSUM_COMPLETE skb's sum
/// must follow each of them. Addresses and ports are stored straight from
/// the flow entry.
#[inline(always)]
fn store_error6(
    ctx: &TcContext,
    l3: usize,
    c: &icmp6::ErrorChecks,
    entry: &Flow,
) -> Result<(), i64> {
    let recompute = BPF_F_RECOMPUTE_CSUM as u64;
    let ports = l3 + icmp6::INNER_PORTS;
    if c.l4_check_at != 0 {
        ctx.store(l3 + c.l4_check_at, &c.l4_check, recompute)?;
    }
    ctx.store(ports + PORTS_SOURCE_OFFSET, &entry.dst_port, recompute)?;
    ctx.store(ports + PORTS_DEST_OFFSET, &entry.src_port, recompute)?;
    ctx.store(l3 + icmp6::INNER_SADDR, &entry.dst_addr, recompute)?;
    ctx.store(l3 + icmp6::INNER_DADDR, &entry.src_addr, recompute)?;
    ctx.store(l3 + icmp6::ICMP_CHECK, &c.icmp_check, recompute)?;
    if c.from_entry_source {
        ctx.store(l3 + icmp6::OUTER_SADDR, &entry.src_addr, recompute)?;
    }
    ctx.store(l3 + icmp6::OUTER_DADDR, &entry.dst_addr, recompute)?;
    Ok(())
}

/// Writes an ICMP error's translation through the store helper. Every
/// change is offset by a checksum in the same packet (nothing is in a
/// pseudo-header of the outer packet), so a complete checksum of the skb
/// stays right.
#[inline(always)]
fn store_error(ctx: &TcContext, l3: usize, r: &ErrorRewrite) -> Result<(), i64> {
    let ports = l3 + icmp::INNER_PORTS;
    if r.l4_check_at != 0 {
        ctx.store(l3 + r.l4_check_at, &r.l4_check, 0)?;
    }
    ctx.store(ports + PORTS_SOURCE_OFFSET, &r.inner_sport, 0)?;
    ctx.store(ports + PORTS_DEST_OFFSET, &r.inner_dport, 0)?;
    ctx.store(l3 + icmp::INNER_SADDR, &r.inner_src, 0)?;
    ctx.store(l3 + icmp::INNER_DADDR, &r.inner_dst, 0)?;
    ctx.store(l3 + icmp::INNER_CHECK, &r.inner_check, 0)?;
    ctx.store(l3 + icmp::ICMP_CHECK, &r.icmp_check, 0)?;
    ctx.store(l3 + icmp::OUTER_SADDR, &r.outer_src, 0)?;
    ctx.store(l3 + icmp::OUTER_DADDR, &r.outer_dst, 0)?;
    ctx.store(l3 + icmp::OUTER_CHECK, &r.outer_check, 0)?;
    Ok(())
}

impl Verdict {
    /// The tcx action for a packet that is not rewritten; a pass is counted.
    #[inline(always)]
    pub fn tc_action(self) -> i32 {
        match self {
            Verdict::Pass => {
                if let Some(g) = global() {
                    g.passed += 1;
                }
                TCX_NEXT
            }
            Verdict::Drop => TC_ACT_SHOT,
        }
    }
}

/// Rewrites addresses and ports through the skb helpers, which update the
/// checksums correctly whether the skb carries a full or a partial
/// (offloaded) L4 checksum.
#[inline(always)]
fn rewrite(ctx: &TcContext, p: &Parsed, flow: &Flow) -> Result<(), i64> {
    if p.key.family == FAMILY_V6 {
        return rewrite_v6(ctx.skb.skb, p, flow);
    }
    let udp = p.key.proto == PROTO_UDP;
    let l4_check = p.l4
        + if udp {
            UDP_CHECK_OFFSET
        } else {
            TCP_CHECK_OFFSET
        };
    // UDP over IPv4 may carry no checksum (0): BPF_F_MARK_MANGLED_0 leaves it
    // at 0 and turns a computed 0 into 0xffff (RFC 768).
    let mangled = if udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    let ip_check = p.l3 + IPV4_CHECK_OFFSET;

    let old_src = v4_raw(&p.key.src_addr);
    let old_dst = v4_raw(&p.key.dst_addr);
    let new_src = v4_raw(&flow.src_addr);
    let new_dst = v4_raw(&flow.dst_addr);
    let addr_flags = BPF_F_PSEUDO_HDR as u64 | mangled | 4;
    let port_flags = mangled | 2;
    ctx.l4_csum_replace(l4_check, old_src as u64, new_src as u64, addr_flags)?;
    ctx.l4_csum_replace(l4_check, old_dst as u64, new_dst as u64, addr_flags)?;
    ctx.l4_csum_replace(
        l4_check,
        p.key.src_port.wire() as u64,
        flow.src_port.wire() as u64,
        port_flags,
    )?;
    ctx.l4_csum_replace(
        l4_check,
        p.key.dst_port.wire() as u64,
        flow.dst_port.wire() as u64,
        port_flags,
    )?;
    ctx.l3_csum_replace(ip_check, old_src as u64, new_src as u64, 4)?;
    ctx.l3_csum_replace(ip_check, old_dst as u64, new_dst as u64, 4)?;
    ctx.store(p.l3 + IPV4_SADDR_OFFSET, &new_src, 0)?;
    ctx.store(p.l3 + IPV4_DADDR_OFFSET, &new_dst, 0)?;
    ctx.store(p.l4 + PORTS_SOURCE_OFFSET, &flow.src_port.wire(), 0)?;
    ctx.store(p.l4 + PORTS_DEST_OFFSET, &flow.dst_port.wire(), 0)?;
    Ok(())
}

/// [`rewrite`] for IPv6. The address change goes into the L4 checksum as
/// one difference (`bpf_l4_csum_replace` with size 0). IPv6 has no header
/// checksum to absorb the new addresses, so they are stored with
/// `BPF_F_RECOMPUTE_CSUM`: for a CHECKSUM_COMPLETE skb the helper's
/// pseudo-header adjustment of `skb->csum` (right for IPv4, where the
/// header checksum absorbs the address change) is then offset by the
/// stored bytes, and `skb->csum` stays the sum of the packet.
// Not inlined: the address words get a frame of their own, off the hook's.
#[inline(never)]
fn rewrite_v6(skb: *mut __sk_buff, p: &Parsed, flow: &Flow) -> Result<(), i64> {
    let ctx = &TcContext::new(skb);
    let udp = p.key.proto == PROTO_UDP;
    let l4_check = p.l4
        + if udp {
            UDP_CHECK_OFFSET
        } else {
            TCP_CHECK_OFFSET
        };
    // The parser refused UDP with checksum 0; a computed 0 becomes 0xffff.
    let mangled = if udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    let old_src = words::addr_words(&p.key.src_addr);
    let old_dst = words::addr_words(&p.key.dst_addr);
    let new_src = words::addr_words(&flow.src_addr);
    let new_dst = words::addr_words(&flow.dst_addr);
    let mut delta = CsumDelta::new();
    for i in 0..4 {
        delta.dword(old_src[i], new_src[i]);
        delta.dword(old_dst[i], new_dst[i]);
    }
    ctx.l4_csum_replace(
        l4_check,
        0,
        delta.sum() as u64,
        BPF_F_PSEUDO_HDR as u64 | mangled,
    )?;
    let port_flags = mangled | 2;
    ctx.l4_csum_replace(
        l4_check,
        p.key.src_port.wire() as u64,
        flow.src_port.wire() as u64,
        port_flags,
    )?;
    ctx.l4_csum_replace(
        l4_check,
        p.key.dst_port.wire() as u64,
        flow.dst_port.wire() as u64,
        port_flags,
    )?;
    let recompute = BPF_F_RECOMPUTE_CSUM as u64;
    ctx.store(p.l3 + IPV6_SADDR_OFFSET, &new_src, recompute)?;
    ctx.store(p.l3 + IPV6_DADDR_OFFSET, &new_dst, recompute)?;
    ctx.store(p.l4 + PORTS_SOURCE_OFFSET, &flow.src_port.wire(), 0)?;
    ctx.store(p.l4 + PORTS_DEST_OFFSET, &flow.dst_port.wire(), 0)?;
    Ok(())
}
