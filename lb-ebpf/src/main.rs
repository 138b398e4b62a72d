//! xlb datapath.
//!
//! - `xlb_xdp` (XDP, on every uplink): forward translation of packets for a
//!   frontend (DNAT, and SNAT for remote backends) and reverse translation of
//!   replies that come back through an uplink (remote backends).
//! - `xlb_tc_egress` (tcx egress, on every uplink): reverse translation of
//!   replies from node-local backends. Those are routed by the kernel from
//!   the pod's veth to the uplink, so one hook on the uplink sees them all
//!   and pods need no hook of their own; the skb helpers there keep partial
//!   checksums (pods' offloaded TX) correct.
//!
//! Both use the NAT core in `nat.rs`.
#![no_std]
#![no_main]

mod checksum;
mod maps;
mod nat;
mod packet;
mod xdp_path;

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_SHOT, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{FLOW_F_REPLY, Flow, GLOBAL_STATS_KEY, GlobalStats, PROTO_UDP};

use crate::{
    maps::GLOBAL_STATS,
    nat::Decision,
    packet::{Parsed, Skip, TCP_CHECK_OFFSET, UDP_CHECK_OFFSET, parse, v4_raw},
};

/// tcx: let the next program (or the stack) decide.
const TCX_NEXT: i32 = -1;

#[inline(always)]
fn global() -> Option<&'static mut GlobalStats> {
    GLOBAL_STATS
        .get_ptr_mut(GLOBAL_STATS_KEY)
        .map(|p| unsafe { &mut *p })
}

#[xdp]
pub fn xlb_xdp(ctx: XdpContext) -> u32 {
    xdp_path::run(&ctx)
}

#[classifier]
pub fn xlb_tc_egress(ctx: TcContext) -> i32 {
    let parsed = match parse(ctx.data(), ctx.data_end()) {
        Ok(p) => p,
        // Headers may sit in a non-linear part of the skb: pull them in and
        // look again.
        Err(Skip::Malformed) => {
            let want = core::cmp::min(ctx.len(), 78);
            if ctx.pull_data(want).is_err() {
                return TCX_NEXT;
            }
            match parse(ctx.data(), ctx.data_end()) {
                Ok(p) => p,
                Err(_) => return TCX_NEXT,
            }
        }
        Err(_) => return TCX_NEXT,
    };
    let bytes = parsed.ip_len as u64;
    // Only reply entries apply at egress: forward entries are XDP's.
    match nat::existing_flow(&parsed.key, parsed.tcp_flags, bytes) {
        Some(flow) if flow.flags & FLOW_F_REPLY != 0 => {
            if tc_rewrite(&ctx, &parsed, &flow).is_err() {
                return TC_ACT_SHOT;
            }
            TCX_NEXT
        }
        _ => TCX_NEXT,
    }
}

/// Rewrites addresses and ports through the skb helpers, which update the
/// checksums correctly whether the skb carries a full or a partial
/// (offloaded) L4 checksum.
#[inline(always)]
fn tc_rewrite(ctx: &TcContext, p: &Parsed, flow: &Flow) -> Result<(), i64> {
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
    let ip_check = p.l3 + 10;

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
    ctx.store(p.l3 + 12, &new_src, 0)?;
    ctx.store(p.l3 + 16, &new_dst, 0)?;
    ctx.store(p.l4, &flow.src_port.wire(), 0)?;
    ctx.store(p.l4 + 2, &flow.dst_port.wire(), 0)?;
    Ok(())
}

/// Outcome of a packet in XDP, folded into an action.
#[inline(always)]
fn xdp_verdict(d: &Decision) -> Option<u32> {
    match d {
        Decision::Pass => Some(xdp_action::XDP_PASS),
        Decision::Drop => Some(xdp_action::XDP_DROP),
        Decision::Translate(_) => None,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
