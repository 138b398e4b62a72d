//! Map values of the benchmark's own eBPF programs (`tests/bench/ebpf`),
//! shared with the harness (`tests/bench/src`). Test-only: the agent's
//! contract is `lb-common`, which this crate keeps out of.
#![no_std]

/// What `bench_gen` writes into each frame. Addresses and ports are in
/// network byte order; `*_base` values are the template's, from which the
/// checksums are derived. For IPv6 frames the "addresses" are the last 32
/// bits of the source and destination addresses: the generator varies only
/// those, the rest stays as in the template.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GenConfig {
    /// Output interface (redirect) or 0 (tail call into TARGET[0]).
    pub ifindex: u32,
    /// Distinct flows to cycle through (1 = one established flow).
    pub flows: u32,
    /// Services: flow f goes to port `dst_port_base + f % services`.
    pub services: u32,
    pub dst_addr: u32,
    pub dst_port_base: u16,
    /// 6 = TCP SYN, 17 = UDP.
    pub proto: u8,
    /// 0: Ethernet + IPv4 frames (64 bytes); 1: Ethernet + IPv6 frames
    /// (80 bytes, no IP checksum, the UDP checksum always set).
    pub ipv6: u8,
    /// Source addresses start here (host order), 50 000 ports each.
    pub src_addr_base: u32,
    /// The template's IPv4 header checksum (unused for IPv6) and L4
    /// checksum (TCP, or UDP over IPv6), as stored.
    pub ip_check_base: u16,
    pub l4_check_base: u16,
    /// Template values those checksums were computed with (network order).
    pub src_addr_tmpl: u32,
    pub dst_addr_tmpl: u32,
    pub src_port_tmpl: u16,
    pub dst_port_tmpl: u16,
    /// Frames per second to send (0: as fast as possible). Frames ahead of
    /// schedule are dropped by the generator, never sent: a schedule on
    /// `bpf_ktime_get_ns`, so the offered load is smooth, not bursty.
    pub rate_pps: u64,
}

/// Per-CPU generator state, reset by userspace before each run.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GenState {
    /// When the next frame may leave (paced runs).
    pub start_ns: u64,
    /// Frames actually sent (redirected or tail-called).
    pub sent: u64,
}

/// The MACs `bench_forward` writes into every frame it forwards from dut0
/// to dut1: the next hop's (sink1) and the egress device's (dut1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ForwardConfig {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: both types are #[repr(C)], made of integers, without implicit
    // padding: any bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for GenConfig {}
    unsafe impl aya::Pod for GenState {}
    unsafe impl aya::Pod for ForwardConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, size_of};

    #[test]
    fn layouts_are_pinned() {
        assert_eq!((size_of::<GenConfig>(), align_of::<GenConfig>()), (48, 8));
        assert_eq!((size_of::<GenState>(), align_of::<GenState>()), (16, 8));
        assert_eq!(
            (size_of::<ForwardConfig>(), align_of::<ForwardConfig>()),
            (12, 1)
        );
    }
}
