//! Programs used only by `cargo xtask bench`; never loaded by the agent.
//! Built by `cargo xtask build-ebpf` like lb-ebpf, into
//! `target/ebpf/bpfel-unknown-none/release/xlb-bench-ebpf`.
//!
//! - `bench_gen`: run with `BPF_PROG_TEST_RUN` (live frames or not). Writes a
//!   flow's tuple (IPv4 or IPv6) into the template frame (absolutely, because live-frame
//!   pages are recycled with whatever the last run left in them), fixes the
//!   checksums, then either redirects the frame out of `ifindex` (traffic
//!   generator) or tail-calls `TARGET[0]` (to time another XDP program on a
//!   fresh tuple every repetition).
//! - `bench_sink`: counts and drops IPv4 and IPv6 frames (not ARP,
//!   ICMPv6 or MLD) on the sink's veth, and keeps a sample of what arrived.
//! - `bench_ceiling`: redirects every frame to `CEILING_PORT[0]`: the
//!   machine's limit for an XDP forwarder.
//! - `bench_forward`: the shape of the kernel's `xdp_redirect_map` sample
//!   with header access, as a minimal L3 forwarder would do it: parses
//!   Ethernet, IPv4 (or IPv6) and the TCP/UDP ports as xlb does, rewrites
//!   both MACs, decrements the TTL (with the IPv4 checksum update) or hop
//!   limit, and redirects to `FORWARD_PORT[0]`: the limit for an XDP
//!   forwarder that touches the packet.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_ktime_get_ns, bpf_redirect},
    macros::{map, xdp},
    maps::{Array, DevMap, PerCpuArray, ProgramArray},
    programs::XdpContext,
};
use xlb_bench_common::{ForwardConfig, GenConfig, GenState};

#[map]
static GEN_CONFIG: Array<GenConfig> = Array::with_max_entries(1, 0);
#[map]
static GEN_STATE: PerCpuArray<GenState> = PerCpuArray::with_max_entries(1, 0);
/// The template frame's first 64 bytes: restored into every frame, because
/// a recycled live-frame page holds whatever the last receiver wrote into it
/// (a forwarding stack rewrites MACs and TTL in place).
/// The template frame's first 80 bytes (IPv4 frames use 64 of them):
/// restored into every frame, because a recycled live-frame page holds
/// whatever the last receiver wrote into it (a forwarding stack rewrites
/// MACs, TTL, addresses and checksums in place).
#[map]
static TEMPLATE: Array<[u64; 10]> = Array::with_max_entries(1, 0);
#[map]
static TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);
#[map]
static SINK_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);
/// Every 4096th frame the sink counts, as it arrived (its first 64 bytes,
/// as many whole words of them as the frame has): the harness checks that
/// the system under test translated it.
#[map]
static SINK_SAMPLE: PerCpuArray<[u64; 8]> = PerCpuArray::with_max_entries(1, 0);
#[map]
static CEILING_PORT: DevMap = DevMap::with_max_entries(1, 0);
#[map]
static FORWARD_PORT: DevMap = DevMap::with_max_entries(1, 0);
#[map]
static FORWARD_CONFIG: Array<ForwardConfig> = Array::with_max_entries(1, 0);

const L3: usize = 14;

/// Where a family's flow tuple sits in the frame: the 32 bits of each
/// address the generator varies, and the L4 header.
struct Layout {
    src: usize,
    dst: usize,
    l4: usize,
}

const V4: Layout = Layout {
    src: L3 + 12,
    dst: L3 + 16,
    l4: L3 + 20,
};
/// The last 32 bits of the IPv6 source and destination addresses.
const V6: Layout = Layout {
    src: L3 + 8 + 12,
    dst: L3 + 24 + 12,
    l4: L3 + 40,
};

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
    if data + 64 > end {
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
    let ipv6 = cfg.ipv6 != 0;
    if data + if ipv6 { 80 } else { 64 } > end {
        return xdp_action::XDP_ABORTED;
    }
    unsafe {
        let words = data as *mut u64;
        for (i, w) in template.iter().enumerate().take(if ipv6 { 10 } else { 8 }) {
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
    // The pseudo-header covers the addresses in both families.
    let mut l4_delta = ip_delta;
    l4_delta = add(l4_delta, cfg.src_port_tmpl, src_port);
    l4_delta = add(l4_delta, cfg.dst_port_tmpl, dst_port);
    let l4_check = fold(cfg.l4_check_base, l4_delta);
    let p = data as *mut u8;
    unsafe {
        if ipv6 {
            // No IP header checksum; UDP's is mandatory and never 0 (a
            // computed 0 is sent as 0xffff).
            let udp_check = if l4_check == 0 { 0xffff } else { l4_check };
            write_tuple(
                p, &V6, cfg.proto, src_addr, dst_addr, src_port, dst_port, l4_check, udp_check,
            );
        } else {
            *(p.add(L3 + 10) as *mut u16) = fold(cfg.ip_check_base, ip_delta);
            // UDP over IPv4: no checksum.
            write_tuple(
                p, &V4, cfg.proto, src_addr, dst_addr, src_port, dst_port, l4_check, 0,
            );
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

/// Writes a flow's tuple and its L4 checksum (TCP: `tcp_check`, UDP:
/// `udp_check`) at `at`. The caller checked that the frame holds `at`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn write_tuple(
    p: *mut u8,
    at: &Layout,
    proto: u8,
    src_addr: u32,
    dst_addr: u32,
    src_port: u16,
    dst_port: u16,
    tcp_check: u16,
    udp_check: u16,
) {
    unsafe {
        (p.add(at.src) as *mut u32).write_unaligned(src_addr);
        (p.add(at.dst) as *mut u32).write_unaligned(dst_addr);
        (p.add(at.l4) as *mut u16).write_unaligned(src_port);
        (p.add(at.l4 + 2) as *mut u16).write_unaligned(dst_port);
        if proto == 6 {
            (p.add(at.l4 + 16) as *mut u16).write_unaligned(tcp_check);
        } else {
            (p.add(at.l4 + 6) as *mut u16).write_unaligned(udp_check);
        }
    }
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
    // IPv4 and IPv6 are counted, except ICMPv6; ARP and neighbour
    // discovery must reach the stack so the device under test can resolve
    // the sink.
    let ether_type = unsafe { *((data + 12) as *const u16) };
    if ether_type == 0x86ddu16.to_be() {
        if data + L3 + 40 > end {
            return xdp_action::XDP_PASS;
        }
        let next_header = unsafe { *((data + L3 + 6) as *const u8) };
        // ICMPv6, and hop-by-hop options (MLD reports, ICMPv6 behind a
        // router alert): the generator sends neither.
        if next_header == 58 || next_header == 0 {
            return xdp_action::XDP_PASS;
        }
    } else if ether_type != 0x0800u16.to_be() {
        return xdp_action::XDP_PASS;
    }
    if let Some(c) = SINK_COUNT.get_ptr_mut(0) {
        let seen = unsafe { *c };
        unsafe { *c = seen + 1 };
        if seen & 0xfff == 0
            && let Some(sample) = SINK_SAMPLE.get_ptr_mut(0)
        {
            let words = data as *const u64;
            for i in 0..8 {
                if data + (i + 1) * 8 > end {
                    break;
                }
                unsafe { (*sample)[i] = words.add(i).read_unaligned() };
            }
        }
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

#[xdp]
pub fn bench_forward(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + L3 > end {
        return xdp_action::XDP_PASS;
    }
    let ether_type = unsafe { *((data + 12) as *const u16) };
    let l4 = if ether_type == 0x0800u16.to_be() {
        if data + L3 + 20 > end {
            return xdp_action::XDP_PASS;
        }
        let ip = (data + L3) as *mut u8;
        let ihl = (unsafe { *ip } & 0x0f) as usize * 4;
        let ttl = unsafe { *ip.add(8) };
        let proto = unsafe { *ip.add(9) };
        // Fragments and options go to the stack, as in xlb.
        let frag = unsafe { *(ip.add(6) as *const u16) } & 0x3fffu16.to_be();
        if ihl != 20 || frag != 0 || ttl <= 1 || (proto != 6 && proto != 17) {
            return xdp_action::XDP_PASS;
        }
        // TTL - 1 and the checksum with it, as the kernel's
        // ip_decrease_ttl: the TTL is the high byte of its 16-bit word.
        unsafe {
            *ip.add(8) = ttl - 1;
            let check = ip.add(10) as *mut u16;
            let mut c = u16::from_be(*check) as u32 + 0x0100;
            c = (c & 0xffff) + (c >> 16);
            *check = (c as u16).to_be();
        }
        L3 + 20
    } else if ether_type == 0x86ddu16.to_be() {
        if data + L3 + 40 > end {
            return xdp_action::XDP_PASS;
        }
        let ip = (data + L3) as *mut u8;
        let next_header = unsafe { *ip.add(6) };
        let hop_limit = unsafe { *ip.add(7) };
        if hop_limit <= 1 || (next_header != 6 && next_header != 17) {
            return xdp_action::XDP_PASS;
        }
        unsafe { *ip.add(7) = hop_limit - 1 };
        L3 + 40
    } else {
        return xdp_action::XDP_PASS;
    };
    // The ports, as a flow lookup would read them; port 0 is no flow.
    if data + l4 + 4 > end {
        return xdp_action::XDP_PASS;
    }
    let dst_port = unsafe { ((data + l4 + 2) as *const u16).read_unaligned() };
    if dst_port == 0 {
        return xdp_action::XDP_DROP;
    }
    let Some(cfg) = FORWARD_CONFIG.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    unsafe {
        let eth = data as *mut u8;
        for i in 0..6 {
            *eth.add(i) = cfg.dst_mac[i];
            *eth.add(6 + i) = cfg.src_mac[i];
        }
    }
    FORWARD_PORT
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
