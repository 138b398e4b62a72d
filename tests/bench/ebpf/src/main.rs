//! Programs used only by `cargo xtask bench`; never loaded by the agent.
//! Built by `cargo xtask build-ebpf` like lb-ebpf, into
//! `target/ebpf/bpfel-unknown-none/release/xlb-bench-ebpf`.
//!
//! - `bench_gen`: run with `BPF_PROG_TEST_RUN` (live frames or not). Writes a
//!   flow's tuple into the template frame (absolutely, because live-frame
//!   pages are recycled with whatever the last run left in them), fixes the
//!   checksums, then either redirects the frame out of `ifindex` (traffic
//!   generator) or tail-calls `TARGET[0]` (to time another XDP program on a
//!   fresh tuple every repetition).
//! - `bench_sink`: counts and drops IPv4 frames on the sink's veth.
//! - `bench_ceiling`: redirects every frame to `CEILING_PORT[0]`: the
//!   machine's limit for an XDP forwarder.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_ktime_get_ns, bpf_redirect},
    macros::{map, xdp},
    maps::{Array, DevMap, PerCpuArray, ProgramArray},
    programs::XdpContext,
};
use xlb_bench_common::{GenConfig, GenState};

#[map]
static GEN_CONFIG: Array<GenConfig> = Array::with_max_entries(1, 0);
#[map]
static GEN_STATE: PerCpuArray<GenState> = PerCpuArray::with_max_entries(1, 0);
/// The template frame's first 64 bytes: restored into every frame, because
/// a recycled live-frame page holds whatever the last receiver wrote into it
/// (a forwarding stack rewrites MACs and TTL in place).
#[map]
static TEMPLATE: Array<[u64; 8]> = Array::with_max_entries(1, 0);
#[map]
static TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);
#[map]
static SINK_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);
#[map]
static CEILING_PORT: DevMap = DevMap::with_max_entries(1, 0);

const L3: usize = 14;
const L4: usize = 34;

#[inline(always)]
fn add(sum: u32, old: u16, new: u16) -> u32 {
    sum + (!old) as u32 + new as u32
}

#[inline(always)]
fn fold(check: u16, delta: u32) -> u16 {
    let mut s = (!check) as u32 + delta;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

#[xdp]
pub fn bench_gen(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + L4 + 20 > end {
        return xdp_action::XDP_ABORTED;
    }
    let Some(cfg) = GEN_CONFIG.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let Some(state) = GEN_STATE.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let state = unsafe { &mut *state };
    // Unpaced when rate_pps is 0.
    if let Some(interval) = 1_000_000_000u64.checked_div(cfg.rate_pps) {
        // A schedule, not a bucket: the next frame may leave at `start_ns`;
        // a sender that fell behind (the gap between two test-run calls)
        // restarts from now instead of bursting to catch up.
        let now = unsafe { bpf_ktime_get_ns() };
        if now < state.start_ns {
            return xdp_action::XDP_DROP;
        }
        let next = state.start_ns + interval;
        state.start_ns = if next + 2_000 < now { now } else { next };
    }
    let n = state.sent;
    state.sent = n + 1;
    let flows = if cfg.flows == 0 { 1 } else { cfg.flows } as u64;
    let services = if cfg.services == 0 { 1 } else { cfg.services } as u64;
    let f = n % flows;
    let client = f / services;
    let dst_port = (cfg.dst_port_base as u64 + f % services) as u16;
    let src_port = (1024 + client % 50_000) as u16;
    let src_addr = cfg.src_addr_base.wrapping_add((client / 50_000) as u32);

    let Some(template) = TEMPLATE.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    if data + 64 > end {
        return xdp_action::XDP_ABORTED;
    }
    unsafe {
        let words = data as *mut u64;
        for (i, w) in template.iter().enumerate() {
            words.add(i).write_unaligned(*w);
        }
    }
    let (src_addr, dst_addr) = (src_addr.to_be(), cfg.dst_addr);
    let (src_port, dst_port) = (src_port.to_be(), dst_port.to_be());
    let mut ip_delta = 0u32;
    ip_delta = add(ip_delta, cfg.src_addr_tmpl as u16, src_addr as u16);
    ip_delta = add(
        ip_delta,
        (cfg.src_addr_tmpl >> 16) as u16,
        (src_addr >> 16) as u16,
    );
    ip_delta = add(ip_delta, cfg.dst_addr_tmpl as u16, dst_addr as u16);
    ip_delta = add(
        ip_delta,
        (cfg.dst_addr_tmpl >> 16) as u16,
        (dst_addr >> 16) as u16,
    );
    let mut l4_delta = ip_delta;
    l4_delta = add(l4_delta, cfg.src_port_tmpl, src_port);
    l4_delta = add(l4_delta, cfg.dst_port_tmpl, dst_port);
    unsafe {
        let p = data as *mut u8;
        *(p.add(L3 + 12) as *mut u32) = src_addr;
        *(p.add(L3 + 16) as *mut u32) = dst_addr;
        *(p.add(L3 + 10) as *mut u16) = fold(cfg.ip_check_base, ip_delta);
        *(p.add(L4) as *mut u16) = src_port;
        *(p.add(L4 + 2) as *mut u16) = dst_port;
        if cfg.proto == 6 {
            *(p.add(L4 + 16) as *mut u16) = fold(cfg.l4_check_base, l4_delta);
        } else {
            // UDP over IPv4: no checksum.
            *(p.add(L4 + 6) as *mut u16) = 0;
        }
    }
    if cfg.ifindex != 0 {
        return unsafe { bpf_redirect(cfg.ifindex, 0) } as u32;
    }
    unsafe {
        TARGET.tail_call(&ctx, 0);
    }
    xdp_action::XDP_ABORTED
}

/// Tail-call target that does nothing: `bench_gen`'s own cost.
#[xdp]
pub fn bench_noop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// On dut0 for the iptables and nftables runs: hands every frame to the
/// kernel stack (the veth's XDP receive path takes redirected frames).
#[xdp]
pub fn bench_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn bench_sink(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + 14 > end {
        return xdp_action::XDP_PASS;
    }
    // Only IPv4 is counted; ARP must reach the stack so the device under
    // test can resolve the sink.
    let ether_type = unsafe { *((data + 12) as *const u16) };
    if ether_type != 0x0800u16.to_be() {
        return xdp_action::XDP_PASS;
    }
    if let Some(c) = SINK_COUNT.get_ptr_mut(0) {
        unsafe { *c += 1 };
    }
    if let Some(c) = SINK_COUNT.get_ptr_mut(1) {
        unsafe { *c += (end - data) as u64 };
    }
    xdp_action::XDP_DROP
}

#[xdp]
pub fn bench_ceiling(_ctx: XdpContext) -> u32 {
    CEILING_PORT
        .redirect(0, 0)
        .unwrap_or(xdp_action::XDP_ABORTED)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
