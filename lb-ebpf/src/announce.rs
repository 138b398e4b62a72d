//! L2 announcement: ARP requests (RFC 826) and IPv6 neighbour solicitations
//! (RFC 4861 section 7) for a Service address this node was elected to
//! announce are answered here, from `L2_ADDRESSES`, instead of by the
//! kernel (which does not own the address). The answer is built in place
//! from the request (same length, no head or tail adjustment) and sent back
//! out of the interface it came in on.
//!
//! Answers are gated on the agent's liveness (`L2_LIVENESS`): entries pinned
//! by an agent that died stop claiming their addresses one window later, so
//! the node the surviving agents elect next is the only one answering.
//!
//! Only what a well-formed request looks like is answered; everything else
//! (other ARP operations or hardware types, a probe or announcement, a
//! solicitation with a bad checksum, hop limit or destination, with
//! options other than the source link-layer address, a DAD probe from the
//! unspecified address, a frame with a VLAN tag) is passed to the kernel
//! untouched, which does not answer for an address it does not hold.

use lb_common::{FAMILY_V4, FAMILY_V6, L2_LIVENESS_KEY, L2Answer, L2Key};

use aya_ebpf::{
    bindings::{__sk_buff, xdp_action, xdp_md},
    helpers::bpf_redirect,
    programs::{TcContext, XdpContext},
};

use crate::{
    icmp::{fold, sum},
    maps::{L2_ADDRESSES, L2_LIVENESS, L2_STATS, TX_PORTS},
    packet::{EthHdr, IPV6_LEN, Ipv6Hdr, PROTO_ICMPV6, ptr_at},
    words,
};

pub const ETH_P_ARP: u16 = 0x0806;
const ETH_LEN: usize = core::mem::size_of::<EthHdr>();
const ARP_HTYPE_ETHERNET: u16 = 1;
const ARP_OP_REQUEST: u16 = 1;
const ARP_OP_REPLY: u16 = 2;
pub const ND_NEIGHBOR_SOLICIT: u8 = 135;
const ND_NEIGHBOR_ADVERT: u8 = 136;
/// Neighbour discovery options (RFC 4861 section 4.6.1).
const ND_OPT_SOURCE_LL: u8 = 1;
const ND_OPT_TARGET_LL: u8 = 2;
/// Neighbour advertisement flags: solicited, override (section 4.4).
const NA_SOLICITED_OVERRIDE: u32 = 0x6000_0000;

/// An Ethernet/IPv4 ARP packet after the Ethernet header.
#[repr(C)]
struct ArpPacket {
    htype: u16,
    ptype: u16,
    hlen: u8,
    plen: u8,
    oper: u16,
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
}

/// A neighbour solicitation or advertisement without options.
#[repr(C)]
struct NdMessage {
    kind: u8,
    code: u8,
    check: u16,
    /// Reserved in a solicitation; R/S/O flags in an advertisement.
    flags: u32,
    target: [u8; 16],
}

/// A link-layer address option (8 bytes on Ethernet).
#[repr(C)]
struct NdLinkOption {
    kind: u8,
    /// In units of 8 bytes.
    len: u8,
    mac: [u8; 6],
}

const ND_LEN: usize = core::mem::size_of::<NdMessage>();
const ND_OPTION_LEN: usize = core::mem::size_of::<NdLinkOption>();

/// Counts one event for the interface (`L2_STATS`, created by the agent).
#[inline(always)]
fn count(ifindex: u32, reply: bool, stale: bool) {
    if let Some(stats) = L2_STATS.get_ptr_mut(ifindex) {
        let stats = unsafe { &mut *stats };
        if stale {
            stats.stale += 1;
        } else if reply {
            stats.replies += 1;
        } else {
            stats.requests += 1;
        }
    }
}

/// Is the agent's liveness fresh (see `L2Liveness`)?
#[inline(always)]
fn agent_alive() -> bool {
    let Some(live) = L2_LIVENESS.get(L2_LIVENESS_KEY) else {
        return false;
    };
    // The agent's refresh every 250 ms against a 1.5 s window: the coarse
    // clock's tick of lag is nothing.
    let now = crate::nat::clock_ns();
    live.refreshed_ns != 0 && now.saturating_sub(live.refreshed_ns) <= live.stale_after_ns
}

/// The answer for `addr` on `ifindex`, counting the request; `None` when
/// the address is not announced here or the agent is not alive.
#[inline(always)]
// The key by reference: by value it would be copied onto the stack.
#[allow(clippy::needless_borrows_for_generic_args)]
fn lookup(ifindex: u32, family: u8, addr: [u32; 4]) -> Option<L2Answer> {
    // Zeroed by words, then filled: a literal with the 3-byte pad becomes
    // a bytewise `memset` (see `words.rs`).
    let mut slot = core::mem::MaybeUninit::<L2Key>::uninit();
    let key = words::zeroed(&mut slot);
    key.ifindex = ifindex;
    key.family = family;
    words::store_addr(&mut key.addr, addr);
    let answer = unsafe { L2_ADDRESSES.get(&*key) }?;
    count(ifindex, false, false);
    if !agent_alive() {
        count(ifindex, false, true);
        return None;
    }
    Some(*answer)
}

/// Turns an ARP request for an announced address (untagged, at `l3`) into
/// the reply, in place. True when the frame now holds the reply.
#[inline(always)]
pub fn arp(data: usize, data_end: usize, l3: usize, ifindex: u32) -> bool {
    if l3 != ETH_LEN {
        return false;
    }
    let (Ok(eth), Ok(arp)) = (
        ptr_at::<EthHdr>(data, data_end, 0),
        ptr_at::<ArpPacket>(data, data_end, ETH_LEN),
    ) else {
        return false;
    };
    let (eth, arp) = unsafe { (&mut *eth, &mut *arp) };
    if u16::from_be(arp.htype) != ARP_HTYPE_ETHERNET
        || u16::from_be(arp.ptype) != crate::packet::ETH_P_IP
        || arp.hlen != 6
        || arp.plen != 4
        || u16::from_be(arp.oper) != ARP_OP_REQUEST
    {
        return false;
    }
    let spa = u32::from_ne_bytes(arp.spa);
    let tpa = u32::from_ne_bytes(arp.tpa);
    // A probe (RFC 5227: sender 0.0.0.0) or an announcement (sender =
    // target) asks nobody; a group sender address is forged.
    if spa == 0 || spa == tpa || arp.sha[0] & 1 != 0 {
        return false;
    }
    let Some(answer) = lookup(ifindex, FAMILY_V4, [tpa, 0, 0, 0]) else {
        return false;
    };
    let requester = arp.sha;
    words::copy_bytes(&mut eth.dst, &requester);
    words::copy_bytes(&mut eth.src, &answer.mac);
    arp.oper = ARP_OP_REPLY.to_be();
    words::copy_bytes(&mut arp.tha, &requester);
    words::copy_bytes(&mut arp.sha, &answer.mac);
    arp.tpa = spa.to_ne_bytes();
    arp.spa = tpa.to_ne_bytes();
    count(ifindex, true, false);
    true
}

/// Turns a neighbour solicitation for an announced address (ICMPv6 right
/// after the untagged IPv6 header at `l3`) into the solicited
/// advertisement, in place. True when the frame now holds it.
#[inline(always)]
pub fn solicitation(data: usize, data_end: usize, l3: usize, ifindex: u32) -> bool {
    if l3 != ETH_LEN {
        return false;
    }
    const L4: usize = ETH_LEN + IPV6_LEN;
    let (Ok(eth), Ok(ip), Ok(nd)) = (
        ptr_at::<EthHdr>(data, data_end, 0),
        ptr_at::<Ipv6Hdr>(data, data_end, ETH_LEN),
        ptr_at::<NdMessage>(data, data_end, L4),
    ) else {
        return false;
    };
    let (eth, ip, nd) = unsafe { (&mut *eth, &mut *ip, &mut *nd) };
    // RFC 4861 section 7.1.1: hop limit 255 (never routed), code 0.
    if nd.kind != ND_NEIGHBOR_SOLICIT
        || nd.code != 0
        || ip.nexthdr != PROTO_ICMPV6
        || ip.hop_limit != 255
    {
        return false;
    }
    let src = words::addr_words(&ip.saddr);
    let dst = words::addr_words(&ip.daddr);
    let target = words::addr_words(&nd.target);
    // DAD (unspecified source) defends nothing here; a group target is
    // invalid.
    if src == [0; 4] || nd.target[0] == 0xff {
        return false;
    }
    // Sent to the target itself or to its solicited-node group
    // ff02::1:ffXX:XXXX (RFC 4291 section 2.7.1).
    let solicited_node = [
        u32::from_ne_bytes([0xff, 0x02, 0, 0]),
        0,
        u32::from_ne_bytes([0, 0, 0, 1]),
        u32::from_ne_bytes([0xff, nd.target[13], nd.target[14], nd.target[15]]),
    ];
    let multicast = dst == solicited_node;
    if !multicast && dst != target {
        return false;
    }
    // The message: 24 bytes, or 32 with the source link-layer option
    // (which a multicast solicitation from a specified address must carry,
    // section 7.1.1). Ethernet padding may follow.
    let len = u16::from_be(ip.payload_len) as usize;
    let with_option = if len == ND_LEN + ND_OPTION_LEN {
        true
    } else if len == ND_LEN && !multicast {
        false
    } else {
        return false;
    };
    let option = if with_option {
        let Ok(option) = ptr_at::<NdLinkOption>(data, data_end, L4 + ND_LEN) else {
            return false;
        };
        let option = unsafe { &mut *option };
        if option.kind != ND_OPT_SOURCE_LL || option.len != 1 {
            return false;
        }
        Some(option)
    } else {
        None
    };
    let l4 = nd as *mut NdMessage as usize;
    let message_sum = if let Some(option) = &option {
        sum(l4, ND_LEN) as u64 + sum(*option as *const NdLinkOption as usize, ND_OPTION_LEN) as u64
    } else {
        sum(l4, ND_LEN) as u64
    };
    let pseudo = icmp6_sum_pseudo(len, src, dst);
    if fold(message_sum + pseudo) != 0xffff {
        return false;
    }
    let Some(answer) = lookup(ifindex, FAMILY_V6, target) else {
        return false;
    };
    // The advertisement goes to the solicitor's unicast address and MAC
    // (section 7.2.4), from the target address.
    let requester = eth.src;
    words::copy_bytes(&mut eth.dst, &requester);
    words::copy_bytes(&mut eth.src, &answer.mac);
    words::store_addr(&mut ip.daddr, src);
    words::store_addr(&mut ip.saddr, target);
    ip.hop_limit = 255;
    nd.kind = ND_NEIGHBOR_ADVERT;
    nd.check = 0;
    nd.flags = NA_SOLICITED_OVERRIDE.to_be();
    let message_sum = if let Some(option) = option {
        option.kind = ND_OPT_TARGET_LL;
        words::copy_bytes(&mut option.mac, &answer.mac);
        sum(l4, ND_LEN) as u64 + sum(option as *const NdLinkOption as usize, ND_OPTION_LEN) as u64
    } else {
        sum(l4, ND_LEN) as u64
    };
    nd.check = !fold(message_sum + icmp6_sum_pseudo(len, target, src));
    count(ifindex, true, false);
    true
}

/// The one's complement sum of the ICMPv6 pseudo-header (RFC 8200
/// section 8.1) of a message of `len` bytes between these addresses.
#[inline(always)]
fn icmp6_sum_pseudo(len: usize, src: [u32; 4], dst: [u32; 4]) -> u64 {
    let mut total = 0u64;
    for i in 0..4 {
        total += (src[i] & 0xffff) as u64 + (src[i] >> 16) as u64;
        total += (dst[i] & 0xffff) as u64 + (dst[i] >> 16) as u64;
    }
    total + (len as u16).to_be() as u64 + (PROTO_ICMPV6 as u16).to_be() as u64
}

/// An ARP frame not answered counts as passed, like every other frame
/// that is neither for a frontend nor a flow's reply.
#[inline(always)]
fn passed() {
    if let Some(g) = crate::stats::global() {
        g.passed += 1;
    }
}

/// Sends an answer built in place back out of the device it came in on:
/// through `TX_PORTS` when the device is there, `XDP_TX` otherwise (see
/// `xdp_path::too_big` for why a redirect: a veth peer without XDP is not
/// woken for XDP_TX frames).
#[inline(always)]
fn xdp_send_back(ifindex: u32) -> u32 {
    match TX_PORTS.redirect(ifindex, xdp_action::XDP_TX as u64) {
        Ok(action) | Err(action) => action,
    }
}

/// XDP: an ARP frame (`ETH_P_ARP` at `l3`): answered when it asks for an
/// announced address, passed otherwise.
// Not inlined: a frame of its own, off the IP paths.
#[inline(never)]
pub fn xdp_arp(xdp: *mut xdp_md, l3: usize) -> u32 {
    let ctx = XdpContext::new(xdp);
    let ifindex = ctx.ingress_ifindex() as u32;
    if arp(ctx.data(), ctx.data_end(), l3, ifindex) {
        xdp_send_back(ifindex)
    } else {
        passed();
        xdp_action::XDP_PASS
    }
}

/// XDP: an ICMPv6 message right after the IPv6 header at `l3`: `Some`
/// action when it was a neighbour solicitation for an announced address
/// (now the advertisement), `None` for everything else.
#[inline(always)]
pub fn xdp_solicitation(xdp: *mut xdp_md, l3: usize) -> Option<u32> {
    let ctx = XdpContext::new(xdp);
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let kind = ptr_at::<u8>(data, data_end, ETH_LEN + IPV6_LEN).ok()?;
    if unsafe { *kind } != ND_NEIGHBOR_SOLICIT {
        return None;
    }
    let ifindex = ctx.ingress_ifindex() as u32;
    solicitation(data, data_end, l3, ifindex).then(|| xdp_send_back(ifindex))
}

/// The longest request answered: Ethernet, IPv6, a solicitation with one
/// option. ARP is shorter.
const LONGEST_REQUEST: u32 = (ETH_LEN + IPV6_LEN + ND_LEN + ND_OPTION_LEN) as u32;

/// tcx ingress: makes sure the request's bytes are in the skb's linear
/// part (the answer is written there directly).
#[inline(always)]
fn tc_linear(ctx: &TcContext) -> bool {
    let want = core::cmp::min(ctx.len(), LONGEST_REQUEST);
    ctx.data_end() - ctx.data() >= want as usize || ctx.pull_data(want).is_ok()
}

/// tcx ingress: [`xdp_arp`]'s twin. The answer leaves by the device's
/// egress (`bpf_redirect`); `TCX_NEXT` for anything not answered.
#[inline(never)]
pub fn tc_arp(skb: *mut __sk_buff, l3: usize) -> i32 {
    let ctx = TcContext::new(skb);
    let ifindex = unsafe { (*skb).ingress_ifindex };
    if tc_linear(&ctx) && arp(ctx.data(), ctx.data_end(), l3, ifindex) {
        unsafe { bpf_redirect(ifindex, 0) as i32 }
    } else {
        passed();
        TCX_NEXT
    }
}

/// tcx ingress: [`xdp_solicitation`]'s twin. The ICMPv6 checksum is
/// computed over the whole message, so the skb's checksum state is not
/// needed.
#[inline(always)]
pub fn tc_solicitation(skb: *mut __sk_buff, l3: usize) -> Option<i32> {
    let ctx = TcContext::new(skb);
    if !tc_linear(&ctx) {
        return None;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let kind = ptr_at::<u8>(data, data_end, ETH_LEN + IPV6_LEN).ok()?;
    if unsafe { *kind } != ND_NEIGHBOR_SOLICIT {
        return None;
    }
    let ifindex = unsafe { (*skb).ingress_ifindex };
    solicitation(data, data_end, l3, ifindex).then(|| unsafe { bpf_redirect(ifindex, 0) as i32 })
}

/// tcx: let the next program (or the stack) decide.
const TCX_NEXT: i32 = -1;
