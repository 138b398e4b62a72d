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
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_SHOT},
    programs::TcContext,
};
use lb_common::{FLOW_F_REPLY, Flow, PROTO_UDP};

use crate::{
    nat::{self, Verdict},
    packet::{
        IPV4_CHECK_OFFSET, IPV4_DADDR_OFFSET, IPV4_SADDR_OFFSET, MAX_HEADERS_LEN,
        PORTS_DEST_OFFSET, PORTS_SOURCE_OFFSET, Parsed, Skip, TCP_CHECK_OFFSET, UDP_CHECK_OFFSET,
        parse, v4_raw,
    },
    stats::global,
};

/// tcx: let the next program (or the stack) decide.
const TCX_NEXT: i32 = -1;

/// Parses the skb, pulling headers that sit in its non-linear part into the
/// linear area first when the first look finds them cut short.
#[inline(always)]
fn parse_skb(ctx: &TcContext) -> Result<Parsed, Skip> {
    match parse(ctx.data(), ctx.data_end()) {
        Err(Skip::Malformed) => {
            let want = core::cmp::min(ctx.len(), MAX_HEADERS_LEN as u32);
            if ctx.pull_data(want).is_err() {
                return Err(Skip::Malformed);
            }
            parse(ctx.data(), ctx.data_end())
        }
        other => other,
    }
}

/// tcx egress: replies of node-local backends.
#[inline(always)]
pub fn egress(ctx: &TcContext) -> i32 {
    let Ok(parsed) = parse_skb(ctx) else {
        return TCX_NEXT;
    };
    let bytes = parsed.ip_len as u64;
    // Only reply entries apply at egress: forward entries are the ingress
    // hook's.
    match nat::existing_flow(&parsed.key, parsed.tcp_flags, bytes) {
        Some(flow) if flow.flags & FLOW_F_REPLY != 0 => {
            if rewrite(ctx, &parsed, &flow).is_err() {
                return TC_ACT_SHOT;
            }
            TCX_NEXT
        }
        _ => TCX_NEXT,
    }
}

/// tcx ingress: what `xdp_path::run` does, for uplinks without XDP.
#[inline(always)]
pub fn ingress(ctx: &TcContext) -> i32 {
    let parsed = match parse_skb(ctx) {
        Ok(p) => p,
        Err(Skip::Unsupported(key)) => {
            return match nat::frontend_of(&key) {
                Some(service) => nat::unsupported(service).tc_action(),
                None => Verdict::Pass.tc_action(),
            };
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
    let flow = match nat::existing_flow(&parsed.key, parsed.tcp_flags, bytes) {
        Some(flow) => flow,
        None => match nat::new_flow(ctx.skb.skb.cast(), &parsed.key, parsed.tcp_flags, bytes) {
            Ok(flow) => flow,
            Err(verdict) => return verdict.tc_action(),
        },
    };
    if rewrite(ctx, &parsed, &flow).is_err() {
        return TC_ACT_SHOT;
    }
    if let Some(g) = global() {
        g.translated_passed += 1;
    }
    TCX_NEXT
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
