//! xlb datapath: the program entry points, nothing else.
//!
//! - `xlb_xdp` (XDP, on every uplink, `xdp_path.rs`): forward translation of
//!   packets for a frontend (DNAT, and SNAT for remote backends) and reverse
//!   translation of replies that come back through an uplink (remote
//!   backends).
//! - `xlb_tc_egress` (tcx egress, on every uplink, `tc_path.rs`): reverse
//!   translation of replies from node-local backends.
//! - `xlb_tc_ingress` (tcx ingress, `tc_path.rs`): `xlb_xdp`'s job on
//!   uplinks where XDP would see packets without their checksum state
//!   (virtual devices, drivers without native XDP).
//!
//! `xlb_xdp` and `xlb_tc_ingress` also answer ARP requests and neighbour
//! solicitations for the Service addresses this node announces
//! (`announce.rs`).
//!
//! Both parse with `packet.rs` and decide with the NAT core in `nat.rs`
//! (SNAT ports from `snat.rs`, the flow hash from `hash.rs`);
//! maps are declared in `maps.rs`, counters reached through `stats.rs`.
#![no_std]
#![no_main]

mod announce;
mod checksum;
mod fragments;
mod hash;
mod host;
mod icmp;
mod icmp6;
mod leak;
mod maps;
mod nat;
mod packet;
mod reverse_path;
mod snat;
mod stats;
mod tc_path;
mod words;
mod xdp_path;

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

#[xdp]
pub fn xlb_xdp(ctx: XdpContext) -> u32 {
    xdp_path::run(&ctx)
}

#[classifier]
pub fn xlb_tc_egress(ctx: TcContext) -> i32 {
    tc_path::egress(&ctx)
}

#[classifier]
pub fn xlb_tc_ingress(ctx: TcContext) -> i32 {
    tc_path::ingress(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
