//! The XDP hook: parse, find or create the flow, rewrite in place with
//! incremental checksums, then forward with `bpf_fib_lookup` + redirect where
//! the egress device takes XDP frames, or hand the rewritten packet to the
//! kernel.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action, xdp_md,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    CONFIG_F_REDIRECT, CONFIG_KEY, FAMILY_V6, FLOW_F_REPLY, FLOW_F_SNAT, Flow, PROTO_TCP, PROTO_UDP,
};

use crate::{
    announce,
    checksum::CsumDelta,
    fragments, icmp, icmp6,
    maps::{CONFIG, FLOWS, ROUTE, TX_PORTS},
    nat::{self, Arrival, Lookup, Verdict},
    packet::{
        ANSWER_TIME_EXCEEDED, ANSWER_V6, ETH_P_IP, ETH_P_IPV6, EthHdr, IPV4_TTL_OFFSET, IPV6_LEN,
        Ipv4Hdr, Ipv6Hdr, Parsed, Ports, Skip, TCP_CHECK_OFFSET, UDP_CHECK_OFFSET, VlanHdr,
        network, parse_v4, parse_v6, ptr_at, v4_raw,
    },
    reverse_path,
    stats::global,
    words,
};

const AF_INET: u8 = 2;

#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    match network(ctx.data(), ctx.data_end()) {
        Ok((l3, ETH_P_IP)) => run_v4(ctx.ctx, l3),
        Ok((l3, ETH_P_IPV6)) => run_v6(ctx.ctx, l3),
        Ok((l3, announce::ETH_P_ARP)) => announce::xdp_arp(ctx.ctx, l3),
        Ok(_) => pass(),
        Err(_) => malformed(),
    }
}

/// An IPv4 packet whose header starts at `l3`.
// Not inlined, like `run_v6`: each family's path is a subprogram of its
// own (see `packet::network`).
#[inline(never)]
fn run_v4(xdp: *mut xdp_md, l3: usize) -> u32 {
    let ctx = &XdpContext::new(xdp);
    handle(ctx, parse_v4(ctx.data(), ctx.data_end(), l3))
}

/// An IPv6 packet whose header starts at `l3`.
#[inline(never)]
fn run_v6(xdp: *mut xdp_md, l3: usize) -> u32 {
    let ctx = &XdpContext::new(xdp);
    handle(ctx, parse_v6(ctx.data(), ctx.data_end(), l3))
}

/// What happens to a parsed packet, for either family.
#[inline(always)]
fn handle(ctx: &XdpContext, parsed: Result<Parsed, Skip>) -> u32 {
    let data_end = ctx.data_end();
    let data = ctx.data();
    let parsed = match parsed {
        // Claims more than the frame holds: cut short, never translated.
        Ok(p) if p.l3 + p.ip_len as usize > data_end - data => return malformed(),
        Ok(p) => p,
        Err(Skip::Icmp(l3)) => return icmp_error(ctx.ctx, l3),
        // Errors of translated flows; neighbour discovery, router
        // advertisements and echo pass.
        Err(Skip::Icmp6(l3)) => return icmp6_error(ctx.ctx, l3),
        Err(Skip::Unsupported(key)) => {
            return match nat::frontend_of(&key) {
                Some(service) => nat::unsupported(service).xdp_action(),
                None => pass(),
            };
        }
        Err(Skip::Fragment(l3)) => return later_fragment(ctx.ctx, l3),
        Err(Skip::Malformed) => return malformed(),
        Err(_) => return pass(),
    };
    let bytes = parsed.ip_len as u64;
    let arrival = Arrival::Ingress {
        ctx: ctx.ctx.cast(),
        ifindex: ctx.ingress_ifindex() as u32,
    };
    let flow = match nat::existing_flow(&parsed.key, parsed.tcp_flags, bytes, arrival) {
        Lookup::Hit(flow) => flow,
        Lookup::Refused => return xdp_action::XDP_PASS,
        Lookup::Miss => match nat::new_flow(
            ctx.ctx.cast(),
            ctx.ingress_ifindex() as u32,
            &parsed.key,
            parsed.tcp_flags,
            bytes,
        ) {
            Ok(flow) => flow,
            Err(verdict) => return verdict.xdp_action(),
        },
    };
    forward(ctx, &parsed, flow)
}

/// Routes, rewrites and sends a packet of a flow.
#[inline(always)]
fn forward(ctx: &XdpContext, parsed: &Parsed, flow: &Flow) -> u32 {
    let family = if parsed.key.family == FAMILY_V6 {
        ANSWER_V6
    } else {
        0
    };
    // A client's packet that may not be forwarded once more (TTL or hop
    // limit 1) on a source-translated flow: answered here, from the
    // frontend and quoting what the client sent, as a router would. The
    // kernel's own answer would go to the translated source, the node.
    if flow.flags & (FLOW_F_SNAT | FLOW_F_REPLY) == FLOW_F_SNAT && parsed.ttl <= 1 {
        return too_big(ctx.ctx, parsed.l3, family | ANSWER_TIME_EXCEEDED);
    }
    let route = route(ctx, parsed, flow);
    if let Route::TooBig { mtu } = route {
        return too_big(ctx.ctx, parsed.l3, mtu as u32 | family);
    }
    fragments::remember_first(parsed, flow, ctx.ingress_ifindex() as u32);
    if rewrite(ctx.data(), ctx.data_end(), parsed, flow).is_err() {
        return xdp_action::XDP_DROP;
    }
    match route {
        Route::Redirect(fib) if parsed.key.family == FAMILY_V6 => redirect_v6(ctx, parsed.l3, fib),
        Route::Redirect(fib) => redirect(ctx, parsed.l3, fib),
        _ => translated_passed(),
    }
}

/// An ICMP error: translated when it quotes a packet of a translated flow
/// (either direction), then forwarded like the flow's packets.
// Not inlined: its lookup and rewrite get a stack frame of their own
// instead of adding to the hook's, which the new-flow call shares.
#[inline(never)]
fn icmp_error(xdp: *mut xdp_md, l3: usize) -> u32 {
    let ctx = &XdpContext::new(xdp);
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let error = match icmp::parse_error(data, data_end, l3) {
        Ok(error) => error,
        Err(_) => return pass(),
    };
    let Some(entry) = (unsafe { FLOWS.get(error.key) }) else {
        return pass();
    };
    let written = icmp::error_rewrite(data, data_end, &error, entry)
        .and_then(|rewrite| rewrite.write(data, data_end, l3));
    if written.is_err() {
        return xdp_action::XDP_DROP;
    }
    if let Some(g) = global() {
        g.icmp_translated += 1;
    }
    send_translated(ctx, l3)
}

/// Routes and sends a packet translated in place (an ICMP error, a later
/// fragment) whose IPv4 header is at `l3`.
#[inline(always)]
fn send_translated(ctx: &XdpContext, l3: usize) -> u32 {
    let Some(fib) = ROUTE.get_ptr_mut(0) else {
        return xdp_action::XDP_DROP;
    };
    let fib = unsafe { &mut *fib };
    match lookup(ctx, l3, fib) {
        Route::Redirect(fib) => redirect(ctx, l3, fib),
        _ => translated_passed(),
    }
}

/// An ICMPv6 message: translated when it is an error quoting a packet of
/// a translated flow (either direction), then forwarded like the flow's
/// packets; passed otherwise.
// Not inlined, like `icmp_error`.
// The key by reference: by value it would be copied again.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(never)]
fn icmp6_error(xdp: *mut xdp_md, l3: usize) -> u32 {
    let ctx = &XdpContext::new(xdp);
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let l3 = l3 & 0x1f;
    if let Some(action) = announce::xdp_solicitation(xdp, l3) {
        return action;
    }
    let Ok(key) = icmp6::parse_error(data, data_end, l3) else {
        return pass();
    };
    let Some(entry) = (unsafe { FLOWS.get(&key) }) else {
        return pass();
    };
    let written = icmp6::error_rewrite(data, data_end, l3, &key, entry)
        .and_then(|checks| checks.write(data, data_end, l3, entry));
    if written.is_err() {
        return xdp_action::XDP_DROP;
    }
    if let Some(g) = global() {
        g.icmp_translated += 1;
    }
    let Some(fib) = ROUTE.get_ptr_mut(0) else {
        return xdp_action::XDP_DROP;
    };
    let fib = unsafe { &mut *fib };
    match lookup_v6(ctx, l3, fib) {
        Route::Redirect(fib) => redirect_v6(ctx, l3, fib),
        _ => translated_passed(),
    }
}

/// A later fragment: given its first fragment's addresses if that one was
/// translated (no L4 header here, so only the IPv4 checksum changes), and
/// forwarded like the flow's packets; left alone otherwise.
// Not inlined, for the same reason as `icmp_error`.
#[inline(never)]
fn later_fragment(xdp: *mut xdp_md, l3: usize) -> u32 {
    let ctx = &XdpContext::new(xdp);
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some((ip, record)) = fragments::later(data, data_end, l3, ctx.ingress_ifindex() as u32)
    else {
        return pass();
    };
    unsafe {
        let mut delta = CsumDelta::new();
        delta.dword((*ip).saddr, record.src);
        delta.dword((*ip).daddr, record.dst);
        (*ip).saddr = record.src;
        (*ip).daddr = record.dst;
        (*ip).check = delta.apply((*ip).check);
    }
    if let Some(g) = global() {
        g.fragments_translated += 1;
    }
    send_translated(ctx, l3)
}

impl Verdict {
    /// The XDP action for a packet that is not rewritten; a pass is counted.
    #[inline(always)]
    pub fn xdp_action(self) -> u32 {
        match self {
            Verdict::Pass => pass(),
            Verdict::Drop => xdp_action::XDP_DROP,
        }
    }
}

/// A packet cut short or with impossible headers: counted, and left to the
/// kernel, which drops what it cannot use.
#[inline(always)]
fn malformed() -> u32 {
    if let Some(g) = global() {
        g.malformed += 1;
    }
    xdp_action::XDP_PASS
}

#[inline(always)]
fn pass() -> u32 {
    if let Some(g) = global() {
        g.passed += 1;
    }
    xdp_action::XDP_PASS
}

/// Rewrites the IPv4 addresses and L4 ports to the flow's tuple and updates
/// the IPv4 header checksum and the L4 checksum (whose pseudo-header covers
/// the addresses) incrementally.
#[inline(always)]
fn rewrite(data: usize, data_end: usize, p: &Parsed, flow: &Flow) -> Result<(), Skip> {
    if p.key.family == FAMILY_V6 {
        // The frame's bounds are those the caller read (nothing resized it).
        return if rewrite_v6(data, data_end, p.l3 | p.l4 << 16, p.key.proto, flow) {
            Ok(())
        } else {
            Err(Skip::Malformed)
        };
    }
    let ip: *mut Ipv4Hdr = ptr_at(data, data_end, p.l3)?;
    let ports: *mut Ports = ptr_at(data, data_end, p.l4)?;
    let new_src = v4_raw(&flow.src_addr);
    let new_dst = v4_raw(&flow.dst_addr);
    let new_sport = flow.src_port.wire();
    let new_dport = flow.dst_port.wire();
    unsafe {
        let mut ip_delta = CsumDelta::new();
        ip_delta.dword((*ip).saddr, new_src);
        ip_delta.dword((*ip).daddr, new_dst);
        let mut l4_delta = CsumDelta::new();
        l4_delta.dword((*ip).saddr, new_src);
        l4_delta.dword((*ip).daddr, new_dst);
        l4_delta.word((*ports).source, new_sport);
        l4_delta.word((*ports).dest, new_dport);

        if p.key.proto == PROTO_TCP {
            let check: *mut u16 = ptr_at(data, data_end, p.l4 + TCP_CHECK_OFFSET)?;
            *check = l4_delta.apply(*check);
        } else if p.key.proto == PROTO_UDP {
            let check: *mut u16 = ptr_at(data, data_end, p.l4 + UDP_CHECK_OFFSET)?;
            // 0 means "no checksum" for UDP over IPv4 and stays 0; a computed
            // 0 is sent as 0xffff (RFC 768).
            if *check != 0 {
                let c = l4_delta.apply(*check);
                *check = if c == 0 { 0xffff } else { c };
            }
        }
        (*ip).saddr = new_src;
        (*ip).daddr = new_dst;
        (*ip).check = ip_delta.apply((*ip).check);
        (*ports).source = new_sport;
        (*ports).dest = new_dport;
    }
    Ok(())
}

/// [`rewrite`] for IPv6: no header checksum; the L4 checksum's
/// pseudo-header covers both 128-bit addresses. UDP over IPv6 always has a
/// checksum (the parser refused a 0), and a computed 0 is sent as 0xffff.
// Not inlined, scalars and the map value only: the address words get a
// frame of their own, off the hook's.
// (BPF calls take at most five arguments: the two offsets share one.)
#[inline(never)]
fn rewrite_v6(data: usize, data_end: usize, offsets: usize, proto: u8, flow: &Flow) -> bool {
    // Masked so the verifier knows their bounds: L3 starts within the
    // first 22 bytes, L4 within 16 KiB (40 + 4 extension headers of at
    // most 2 KiB).
    let (l3, l4) = (offsets & 0xff, (offsets >> 16) & 0x3fff);
    let Ok(ip) = ptr_at::<Ipv6Hdr>(data, data_end, l3) else {
        return false;
    };
    let Ok(ports) = ptr_at::<Ports>(data, data_end, l4) else {
        return false;
    };
    let new_src = words::addr_words(&flow.src_addr);
    let new_dst = words::addr_words(&flow.dst_addr);
    let new_sport = flow.src_port.wire();
    let new_dport = flow.dst_port.wire();
    unsafe {
        let old_src = words::addr_words(&(*ip).saddr);
        let old_dst = words::addr_words(&(*ip).daddr);
        let mut delta = CsumDelta::new();
        for i in 0..4 {
            delta.dword(old_src[i], new_src[i]);
            delta.dword(old_dst[i], new_dst[i]);
        }
        delta.word((*ports).source, new_sport);
        delta.word((*ports).dest, new_dport);
        let at = if proto == PROTO_TCP {
            TCP_CHECK_OFFSET
        } else {
            UDP_CHECK_OFFSET
        };
        let Ok(check) = ptr_at::<u16>(data, data_end, l4 + at) else {
            return false;
        };
        let c = delta.apply(*check);
        *check = if c == 0 && proto == PROTO_UDP {
            0xffff
        } else {
            c
        };
        words::store_addr(&mut (*ip).saddr, new_src);
        words::store_addr(&mut (*ip).daddr, new_dst);
        (*ports).source = new_sport;
        (*ports).dest = new_dport;
    }
    true
}

#[inline(always)]
fn translated_passed() -> u32 {
    if let Some(g) = global() {
        g.translated_passed += 1;
    }
    xdp_action::XDP_PASS
}

/// Where a translated packet goes.
enum Route {
    /// `bpf_fib_lookup` found the route and the neighbour, and the egress
    /// device is in `TX_PORTS`: the lookup result (in `XLB_ROUTE`) says how.
    Redirect(&'static bpf_fib_lookup),
    /// The kernel routes it (and resolves the neighbour for later packets).
    Pass,
    /// It has DF set and does not fit the egress device's MTU.
    TooBig { mtu: u16 },
}

/// IPv4 guarantees 576 bytes, IPv6 1280: smaller packets are not checked
/// against the MTU unless the route is looked up anyway (for a redirect).
const ALWAYS_FITS: u16 = 576;
const ALWAYS_FITS_V6: u16 = 1280;

/// Looks up the route of the packet as it will be after translation to
/// `flow`, before anything is rewritten: a packet too big for it is answered
/// with its original header intact. The lookup is made for every packet when
/// redirects are on, and otherwise only for those that might not fit.
#[inline(always)]
fn route(ctx: &XdpContext, p: &Parsed, flow: &Flow) -> Route {
    let redirect_on = redirects_on();
    let v6 = p.key.family == FAMILY_V6;
    let check_size = if v6 {
        p.ip_len > ALWAYS_FITS_V6
    } else {
        p.df && p.ip_len > ALWAYS_FITS && p.ip_len as usize >= icmp::QUOTABLE_LEN
    };
    if !redirect_on && !check_size {
        return Route::Pass;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    // Looked up only when a route lookup is made: most packets with
    // redirects off need none.
    let Some(fib) = ROUTE.get_ptr_mut(0) else {
        return Route::Pass;
    };
    let fib = unsafe { &mut *fib };
    // The room is shared: nothing of the last packet's lookup may remain.
    words::zero(fib);
    if !v6 {
        let Ok(ip) = ptr_at::<Ipv4Hdr>(data, data_end, p.l3) else {
            return Route::Pass;
        };
        unsafe { fib.__bindgen_anon_2.tos = (*ip).tos };
    }
    fib.l4_protocol = p.key.proto;
    fib.__bindgen_anon_1.tot_len = p.ip_len;
    reverse_path::set_addresses(fib, p.key.family, &flow.src_addr, &flow.dst_addr);
    fib.ifindex = ctx.ingress_ifindex() as u32;
    match fib_result(ctx, fib, redirect_on) {
        Route::TooBig { mtu } if check_size => Route::TooBig { mtu },
        // Without DF the kernel fragments it.
        Route::TooBig { .. } => Route::Pass,
        other => other,
    }
}

/// Are redirects on (`--no-redirect` not given)?
#[inline(always)]
fn redirects_on() -> bool {
    CONFIG
        .get(CONFIG_KEY)
        .is_some_and(|c| c.flags & CONFIG_F_REDIRECT != 0)
}

/// The route of a packet translated in place, once `fib` holds its
/// addresses: an error too big for its route is left to the kernel.
#[inline(always)]
fn lookup_filled(ctx: &XdpContext, fib: &'static mut bpf_fib_lookup) -> Route {
    fib.ifindex = ctx.ingress_ifindex() as u32;
    match fib_result(ctx, fib, true) {
        Route::TooBig { .. } => Route::Pass,
        other => other,
    }
}

/// Looks up the route of the (already translated) packet at `l3`.
#[inline(always)]
fn lookup(ctx: &XdpContext, l3: usize, fib: &'static mut bpf_fib_lookup) -> Route {
    if !redirects_on() {
        return Route::Pass;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Ok(ip) = ptr_at::<Ipv4Hdr>(data, data_end, l3) else {
        return Route::Pass;
    };
    words::zero(fib);
    unsafe {
        fib.family = AF_INET;
        fib.l4_protocol = (*ip).protocol;
        fib.__bindgen_anon_1.tot_len = u16::from_be((*ip).tot_len);
        fib.__bindgen_anon_2.tos = (*ip).tos;
        fib.__bindgen_anon_3.ipv4_src = (*ip).saddr;
        fib.__bindgen_anon_4.ipv4_dst = (*ip).daddr;
    }
    lookup_filled(ctx, fib)
}

/// [`lookup`] for the IPv6 packet at `l3`.
#[inline(always)]
fn lookup_v6(ctx: &XdpContext, l3: usize, fib: &'static mut bpf_fib_lookup) -> Route {
    if !redirects_on() {
        return Route::Pass;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Ok(ip) = ptr_at::<Ipv6Hdr>(data, data_end, l3) else {
        return Route::Pass;
    };
    words::zero(fib);
    unsafe {
        fib.l4_protocol = (*ip).nexthdr;
        fib.__bindgen_anon_1.tot_len = u16::from_be((*ip).payload_len) + IPV6_LEN as u16;
        reverse_path::set_addresses(fib, FAMILY_V6, &(*ip).saddr, &(*ip).daddr);
    }
    lookup_filled(ctx, fib)
}

#[inline(always)]
fn fib_result(ctx: &XdpContext, fib: &'static mut bpf_fib_lookup, redirect_on: bool) -> Route {
    let rc = unsafe {
        fib_lookup(
            ctx.ctx.cast(),
            fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        return Route::TooBig {
            mtu: unsafe { fib.__bindgen_anon_1.mtu_result },
        };
    }
    if !redirect_on || rc != BPF_FIB_LKUP_RET_SUCCESS as i64 || TX_PORTS.get(fib.ifindex).is_none()
    {
        return Route::Pass;
    }
    Route::Redirect(fib)
}

/// Sends the rewritten packet to the device and neighbour the lookup found.
#[inline(always)]
fn redirect(ctx: &XdpContext, l3: usize, fib: &bpf_fib_lookup) -> u32 {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Ok(ip) = ptr_at::<Ipv4Hdr>(data, data_end, l3) else {
        return translated_passed();
    };
    let Ok(eth) = ptr_at::<EthHdr>(data, data_end, 0) else {
        return translated_passed();
    };
    unsafe {
        // Forwarding: TTL - 1 like any router; at 1 let the kernel answer
        // with ICMP time exceeded.
        if (*ip).ttl <= 1 {
            return translated_passed();
        }
        // TTL and protocol share the 16-bit word the checksum covers.
        let ttl_word = (ip as *mut u8).add(IPV4_TTL_OFFSET) as *mut u16;
        let old = *ttl_word;
        (*ip).ttl -= 1;
        let mut delta = CsumDelta::new();
        delta.word(old, *ttl_word);
        (*ip).check = delta.apply((*ip).check);
        words::copy_bytes(&mut (*eth).dst, &fib.dmac);
        words::copy_bytes(&mut (*eth).src, &fib.smac);
    }
    match TX_PORTS.redirect(fib.ifindex, 0) {
        Ok(action) => {
            if let Some(g) = global() {
                g.redirected += 1;
            }
            action
        }
        Err(action) => action,
    }
}

/// [`redirect`] for IPv6: the hop limit has no checksum to follow.
#[inline(always)]
fn redirect_v6(ctx: &XdpContext, l3: usize, fib: &bpf_fib_lookup) -> u32 {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Ok(ip) = ptr_at::<Ipv6Hdr>(data, data_end, l3) else {
        return translated_passed();
    };
    // Checked on its own: the compiler would drop this check as implied by
    // the one above (`l3 + 40 >= 14`), which the verifier cannot tell when
    // `l3` is not a constant (an ICMPv6 error's).
    let Ok(eth) = ptr_at::<EthHdr>(core::hint::black_box(data), data_end, 0) else {
        return translated_passed();
    };
    unsafe {
        // At 1 the kernel answers with ICMPv6 time exceeded.
        if (*ip).hop_limit <= 1 {
            return translated_passed();
        }
        (*ip).hop_limit -= 1;
        words::copy_bytes(&mut (*eth).dst, &fib.dmac);
        words::copy_bytes(&mut (*eth).src, &fib.smac);
    }
    match TX_PORTS.redirect(fib.ifindex, 0) {
        Ok(action) => {
            if let Some(g) = global() {
                g.redirected += 1;
            }
            action
        }
        Err(action) => action,
    }
}

/// Answers a packet too big for its route with ICMP "fragmentation needed"
/// or ICMPv6 "packet too big" (`mtu_family`: the MTU, and bit 16 set for
/// IPv6), sent back out of the device it came in on: the frame is cut to
/// the quoted part, grown at the front by the new IP and ICMP headers, and
/// its Ethernet addresses swapped.
// Not inlined, for the same reason as `icmp_error`.
#[inline(never)]
fn too_big(xdp: *mut xdp_md, l3: usize, mtu_family: u32) -> u32 {
    let ctx = &XdpContext::new(xdp);
    let l3 = l3 & 0x1f;
    let mtu = mtu_family as u16;
    let exceeded = mtu_family & ANSWER_TIME_EXCEEDED != 0;
    // One body per family, each with its sizes as constants (shared, the
    // compiler merges the two families' bounds checks into forms the
    // verifier cannot follow).
    if mtu_family & ANSWER_V6 != 0 {
        answer_too_big::<true>(ctx, l3, mtu, exceeded)
    } else {
        answer_too_big::<false>(ctx, l3, mtu, exceeded)
    }
}

#[inline(always)]
fn answer_too_big<const V6: bool>(ctx: &XdpContext, l3: usize, mtu: u16, exceeded: bool) -> u32 {
    let v6 = V6;
    let (quotable, headers_len) = if v6 {
        (icmp6::QUOTABLE_LEN, icmp6::TOO_BIG_HEADERS_LEN)
    } else {
        (icmp::QUOTABLE_LEN, icmp::FRAG_NEEDED_HEADERS_LEN)
    };
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Ok(eth) = ptr_at::<EthHdr>(data, data_end, 0) else {
        return xdp_action::XDP_DROP;
    };
    let (dst, src, ether_type) = unsafe { ((*eth).dst, (*eth).src, (*eth).ether_type) };
    let vlan = l3 > core::mem::size_of::<EthHdr>();
    let tag = match ptr_at::<VlanHdr>(data, data_end, core::mem::size_of::<EthHdr>()) {
        Ok(v) if vlan => unsafe { ((*v).tci, (*v).ether_type) },
        _ => (0, 0),
    };
    let keep = l3 + quotable;
    // The frame's length first, as a value of its own: folded into
    // `data_end - (keep + data)` it would subtract a packet pointer from a
    // number, which the verifier refuses.
    let frame_len = core::hint::black_box(data_end - data);
    // Negative for a packet shorter than the quote (a SYN answered with
    // "time exceeded"): the frame then grows, and the kernel zeroes what
    // it adds; the quoted header's length still says what was sent.
    let cut = frame_len as i32 - keep as i32;
    unsafe {
        if bpf_xdp_adjust_tail(ctx.ctx, -cut) != 0
            || bpf_xdp_adjust_head(ctx.ctx, -(headers_len as i32)) != 0
        {
            return xdp_action::XDP_DROP;
        }
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Ok(eth) = ptr_at::<EthHdr>(data, data_end, 0) else {
        return xdp_action::XDP_DROP;
    };
    unsafe {
        words::copy_bytes(&mut (*eth).dst, &src);
        words::copy_bytes(&mut (*eth).src, &dst);
        (*eth).ether_type = ether_type;
    }
    if vlan {
        let Ok(v) = ptr_at::<VlanHdr>(data, data_end, core::mem::size_of::<EthHdr>()) else {
            return xdp_action::XDP_DROP;
        };
        unsafe {
            (*v).tci = tag.0;
            (*v).ether_type = tag.1;
        }
    }
    let quoted = l3 + headers_len;
    if v6 {
        let Ok(headers) = icmp6::too_big(data, data_end, quoted, mtu, exceeded) else {
            return xdp_action::XDP_DROP;
        };
        // Checked on its own (see `redirect_v6`): implied by the quote's
        // check, which the verifier cannot tell with `l3` not a constant.
        let Ok(room) = ptr_at::<icmp6::TooBig>(core::hint::black_box(data), data_end, l3) else {
            return xdp_action::XDP_DROP;
        };
        words::copy(unsafe { &mut *room }, &headers);
    } else {
        let Ok(headers) = icmp::frag_needed(data, data_end, quoted, mtu, exceeded) else {
            return xdp_action::XDP_DROP;
        };
        let Ok(room) = ptr_at::<icmp::FragNeeded>(core::hint::black_box(data), data_end, l3) else {
            return xdp_action::XDP_DROP;
        };
        unsafe { *room = headers };
    }
    if let Some(g) = global() {
        if exceeded {
            g.time_exceeded_sent += 1;
        } else {
            g.frag_needed_sent += 1;
        }
    }
    // Back out of the device it came in on. Through `TX_PORTS` when the
    // device is there (every uplink is, with redirects on), XDP_TX
    // otherwise: a veth hands XDP_TX frames to its peer without waking the
    // peer's NAPI unless the peer runs XDP itself, so they would wait there
    // for unrelated traffic; a redirect flushes them.
    match TX_PORTS.redirect(ctx.ingress_ifindex() as u32, xdp_action::XDP_TX as u64) {
        Ok(action) | Err(action) => action,
    }
}
