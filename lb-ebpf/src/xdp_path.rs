//! The XDP hook: parse, find or create the flow, rewrite in place with
//! incremental checksums, then forward with `bpf_fib_lookup` + redirect where
//! the egress device takes XDP frames, or hand the rewritten packet to the
//! kernel.

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action},
    helpers::bpf_fib_lookup as fib_lookup,
    programs::XdpContext,
};
use lb_common::{CONFIG_F_REDIRECT, CONFIG_KEY, Flow, PROTO_TCP, PROTO_UDP};

use crate::{
    checksum::CsumDelta,
    maps::{CONFIG, TX_PORTS},
    nat::{self, Verdict},
    packet::{
        EthHdr, IPV4_TTL_OFFSET, Ipv4Hdr, Parsed, Ports, Skip, TCP_CHECK_OFFSET, UDP_CHECK_OFFSET,
        parse, ptr_at, v4_raw,
    },
    stats::global,
};

const AF_INET: u8 = 2;

#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let parsed = match parse(data, data_end) {
        Ok(p) => p,
        Err(Skip::Unsupported(key)) => {
            return match nat::frontend_of(&key) {
                Some(service) => nat::unsupported(service).xdp_action(),
                None => pass(),
            };
        }
        Err(Skip::Malformed) => {
            if let Some(g) = global() {
                g.malformed += 1;
            }
            return xdp_action::XDP_PASS;
        }
        Err(_) => return pass(),
    };
    let bytes = parsed.ip_len as u64;
    let flow = match nat::existing_flow(&parsed.key, parsed.tcp_flags, bytes) {
        Some(flow) => flow,
        None => match nat::new_flow(ctx.ctx.cast(), &parsed.key, parsed.tcp_flags, bytes) {
            Ok(flow) => flow,
            Err(verdict) => return verdict.xdp_action(),
        },
    };
    if rewrite(data, data_end, &parsed, &flow).is_err() {
        return xdp_action::XDP_DROP;
    }
    forward(ctx, &parsed)
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

/// Sends the rewritten packet on its way: redirect when the FIB has a route
/// and a neighbour and the egress device is in `TX_PORTS`, else `XDP_PASS` so
/// the kernel routes it (and resolves the neighbour for the next packets).
#[inline(always)]
fn forward(ctx: &XdpContext, p: &Parsed) -> u32 {
    let passed = || {
        if let Some(g) = global() {
            g.translated_passed += 1;
        }
        xdp_action::XDP_PASS
    };
    let redirect_on = CONFIG
        .get(CONFIG_KEY)
        .map(|c| c.flags & CONFIG_F_REDIRECT != 0)
        .unwrap_or(false);
    if !redirect_on {
        return passed();
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Ok(ip) = ptr_at::<Ipv4Hdr>(data, data_end, p.l3) else {
        return passed();
    };
    let Ok(eth) = ptr_at::<EthHdr>(data, data_end, 0) else {
        return passed();
    };
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    unsafe {
        fib.family = AF_INET;
        fib.l4_protocol = (*ip).protocol;
        fib.__bindgen_anon_1.tot_len = u16::from_be((*ip).tot_len);
        fib.__bindgen_anon_2.tos = (*ip).tos;
        fib.__bindgen_anon_3.ipv4_src = (*ip).saddr;
        fib.__bindgen_anon_4.ipv4_dst = (*ip).daddr;
        fib.ifindex = ctx.ingress_ifindex() as u32;
    }
    let rc = unsafe {
        fib_lookup(
            ctx.ctx.cast(),
            &mut fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return passed();
    }
    if TX_PORTS.get(fib.ifindex).is_none() {
        return passed();
    }
    unsafe {
        // Forwarding: TTL - 1 like any router; at 1 let the kernel answer
        // with ICMP time exceeded.
        if (*ip).ttl <= 1 {
            return passed();
        }
        // TTL and protocol share the 16-bit word the checksum covers.
        let ttl_word = (ip as *mut u8).add(IPV4_TTL_OFFSET) as *mut u16;
        let old = *ttl_word;
        (*ip).ttl -= 1;
        let mut delta = CsumDelta::new();
        delta.word(old, *ttl_word);
        (*ip).check = delta.apply((*ip).check);
        (*eth).dst = fib.dmac;
        (*eth).src = fib.smac;
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
