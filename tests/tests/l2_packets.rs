//! The ARP/NDP responder (`lb-ebpf/src/announce.rs`) on crafted frames
//! through the real programs (BPF_PROG_TEST_RUN, XDP and tcx ingress): the
//! exact reply bytes for an announced address, nothing for an address not
//! announced (or announced on another interface), nothing once the agent's
//! liveness is stale, and malformed or foreign requests passed untouched.
//! Needs root (loads the programs).

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    programs::{SchedClassifier, Xdp},
};
use lb_common::{FAMILY_V4, FAMILY_V6, L2Answer, L2Key, L2Stats, addr_v4};
use xlb::{
    dataplane::{self, Limits, Maps, PinDir},
    netdev::monotonic_ns,
};
use xlb_tests::packet::{
    TestRunSpec, arp_request, neighbour_solicitation, pseudo_checksum6, solicited_node, test_run,
    test_run_tc_from,
};

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TCX_NEXT: i32 = -1;
const TC_ACT_REDIRECT: i32 = 7;
/// The interface the test frames arrive on (loopback: always there, and
/// not in `TX_PORTS`, so the answer goes out with `XDP_TX`).
const IFINDEX: u32 = 1;
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xcc];
const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const OTHER_VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 11);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x10);
const OTHER_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x11);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 2);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The datapath loaded with VIP and VIP6 announced on [`IFINDEX`] and
/// OTHER_VIP on another interface, the agent alive.
struct Datapath {
    pins: PinDir,
    maps: Maps,
    ebpf: Ebpf,
}

impl Datapath {
    fn new() -> Result<Self> {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "packet tests need root");
        let bpffs = std::path::Path::new("/sys/fs/bpf");
        dataplane::ensure_bpffs(bpffs)?;
        let node = format!(
            "l2pkt-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let pins = PinDir::new(bpffs, &node);
        let limits = Limits {
            max_services: 16,
            max_backends: 64,
            max_flows: 1024,
        };
        let mut ebpf = dataplane::load(&pins, limits)?;
        let mut maps = Maps::take(&mut ebpf)?;
        let answer = L2Answer {
            mac: NODE_MAC,
            _pad: [0; 2],
        };
        maps.put_l2(&key(IFINDEX, FAMILY_V4, addr_v4(VIP.octets())), &answer)?;
        maps.put_l2(&key(IFINDEX, FAMILY_V6, VIP6.octets()), &answer)?;
        maps.put_l2(
            &key(IFINDEX + 1000, FAMILY_V4, addr_v4(OTHER_VIP.octets())),
            &answer,
        )?;
        maps.put_l2(
            &key(IFINDEX + 1000, FAMILY_V6, OTHER_VIP6.octets()),
            &answer,
        )?;
        maps.ensure_l2_stats(IFINDEX)?;
        maps.write_l2_liveness(monotonic_ns(), 5_000_000_000)?;
        Ok(Datapath { pins, maps, ebpf })
    }

    fn xdp(&self, input: &[u8]) -> Result<(u32, Vec<u8>)> {
        let program: &Xdp = self
            .ebpf
            .program("xlb_xdp")
            .context("xlb_xdp")?
            .try_into()?;
        let outcome = test_run(program, input, TestRunSpec::ONCE)?;
        Ok((outcome.verdict, outcome.frame))
    }

    fn tc(&self, input: &[u8]) -> Result<(i32, Vec<u8>)> {
        let program: &SchedClassifier = self
            .ebpf
            .program("xlb_tc_ingress")
            .context("xlb_tc_ingress")?
            .try_into()?;
        test_run_tc_from(program, input, Some(IFINDEX))
    }

    fn stats(&self) -> Result<L2Stats> {
        self.maps.l2_stats(IFINDEX)
    }

    /// Asserts that neither hook answers `frame`: both pass it unchanged.
    fn assert_passed(&self, frame: &[u8], what: &str) -> Result<()> {
        let (verdict, out) = self.xdp(frame)?;
        assert_eq!(verdict, XDP_PASS, "XDP answered {what}");
        assert_eq!(out, frame, "XDP changed {what}");
        let (rc, out) = self.tc(frame)?;
        assert_eq!(rc, TCX_NEXT, "tcx answered {what}");
        assert_eq!(out, frame, "tcx changed {what}");
        Ok(())
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        let _ = dataplane::attach::reset(&self.pins);
    }
}

fn key(ifindex: u32, family: u8, addr: [u8; 16]) -> L2Key {
    L2Key {
        ifindex,
        family,
        _pad: [0; 3],
        addr,
    }
}

/// The ARP reply RFC 826 asks for, byte for byte.
fn expected_arp_reply(request: &[u8]) -> Vec<u8> {
    let mut r = request.to_vec();
    r[0..6].copy_from_slice(&CLIENT_MAC);
    r[6..12].copy_from_slice(&NODE_MAC);
    r[20..22].copy_from_slice(&2u16.to_be_bytes());
    r[22..28].copy_from_slice(&NODE_MAC);
    r[28..32].copy_from_slice(&VIP.octets());
    r[32..38].copy_from_slice(&CLIENT_MAC);
    r[38..42].copy_from_slice(&CLIENT.octets());
    r
}

#[test]
fn an_arp_request_for_an_announced_address_gets_the_reply_from_both_hooks() -> Result<()> {
    let dp = Datapath::new()?;
    let request = arp_request(CLIENT_MAC, CLIENT, VIP);
    let (verdict, out) = dp.xdp(&request)?;
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out, expected_arp_reply(&request));
    let (rc, out) = dp.tc(&request)?;
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(out, expected_arp_reply(&request));
    let stats = dp.stats()?;
    assert_eq!((stats.requests, stats.replies, stats.stale), (2, 2, 0));
    Ok(())
}

#[test]
fn a_neighbour_solicitation_gets_a_solicited_advertisement_with_a_valid_checksum() -> Result<()> {
    let dp = Datapath::new()?;
    for multicast in [true, false] {
        let ns = neighbour_solicitation(CLIENT_MAC, CLIENT6, VIP6, multicast);
        let (verdict, xdp_out) = dp.xdp(&ns)?;
        assert_eq!(verdict, XDP_TX, "multicast {multicast}");
        let (rc, tc_out) = dp.tc(&ns)?;
        assert_eq!(rc, TC_ACT_REDIRECT, "multicast {multicast}");
        assert_eq!(xdp_out, tc_out);
        let na = xdp_out;
        assert_eq!(na.len(), ns.len());
        assert_eq!(&na[0..6], &CLIENT_MAC, "to the solicitor's MAC");
        assert_eq!(&na[6..12], &NODE_MAC);
        assert_eq!(&na[12..14], &[0x86, 0xdd]);
        let src = Ipv6Addr::from(<[u8; 16]>::try_from(&na[22..38])?);
        let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&na[38..54])?);
        assert_eq!((src, dst), (VIP6, CLIENT6));
        assert_eq!(na[20], 58);
        assert_eq!(na[21], 255, "hop limit");
        let icmp = &na[54..];
        assert_eq!((icmp[0], icmp[1]), (136, 0), "a neighbour advertisement");
        assert_eq!(&icmp[4..8], &[0x60, 0, 0, 0], "solicited and override");
        assert_eq!(&icmp[8..24], &VIP6.octets());
        if multicast {
            assert_eq!(&icmp[24..26], &[2, 1], "target link-layer option");
            assert_eq!(&icmp[26..32], &NODE_MAC);
        } else {
            assert_eq!(icmp.len(), 24);
        }
        assert_eq!(pseudo_checksum6(&src, &dst, 58, icmp), 0, "checksum");
    }
    let stats = dp.stats()?;
    assert_eq!((stats.requests, stats.replies), (4, 4));
    Ok(())
}

#[test]
fn addresses_not_announced_on_the_interface_are_never_answered() -> Result<()> {
    let dp = Datapath::new()?;
    let nowhere = Ipv4Addr::new(10, 200, 0, 99);
    dp.assert_passed(
        &arp_request(CLIENT_MAC, CLIENT, nowhere),
        "an unknown address",
    )?;
    // Announced, but on another interface.
    dp.assert_passed(
        &arp_request(CLIENT_MAC, CLIENT, OTHER_VIP),
        "another interface's address",
    )?;
    let nowhere6 = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x99);
    for multicast in [true, false] {
        dp.assert_passed(
            &neighbour_solicitation(CLIENT_MAC, CLIENT6, nowhere6, multicast),
            "an unknown IPv6 address",
        )?;
        dp.assert_passed(
            &neighbour_solicitation(CLIENT_MAC, CLIENT6, OTHER_VIP6, multicast),
            "another interface's IPv6 address",
        )?;
    }
    assert_eq!(dp.stats()?, L2Stats::default());
    Ok(())
}

#[test]
fn a_stale_agent_liveness_stops_every_answer() -> Result<()> {
    let mut dp = Datapath::new()?;
    // Refreshed 2 s ago with a 1 s window: the agent is gone.
    dp.maps
        .write_l2_liveness(monotonic_ns() - 2_000_000_000, 1_000_000_000)?;
    dp.assert_passed(&arp_request(CLIENT_MAC, CLIENT, VIP), "with a stale agent")?;
    dp.assert_passed(
        &neighbour_solicitation(CLIENT_MAC, CLIENT6, VIP6, true),
        "with a stale agent",
    )?;
    // Never refreshed.
    dp.maps.write_l2_liveness(0, u64::MAX)?;
    dp.assert_passed(&arp_request(CLIENT_MAC, CLIENT, VIP), "with no agent")?;
    let stats = dp.stats()?;
    assert_eq!(stats.replies, 0);
    assert_eq!(stats.stale, 6, "each refusal counted");
    // Fresh again: answered again.
    dp.maps.write_l2_liveness(monotonic_ns(), 1_000_000_000)?;
    let (verdict, _) = dp.xdp(&arp_request(CLIENT_MAC, CLIENT, VIP))?;
    assert_eq!(verdict, XDP_TX);
    Ok(())
}

#[test]
fn malformed_or_foreign_arp_is_passed_untouched() -> Result<()> {
    let dp = Datapath::new()?;
    let good = arp_request(CLIENT_MAC, CLIENT, VIP);
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    cases.push(("truncated", good[..40].to_vec()));
    let mut reply = good.clone();
    reply[21] = 2;
    cases.push(("a reply", reply));
    let mut hlen = good.clone();
    hlen[18] = 8;
    cases.push(("a hardware length of 8", hlen));
    let mut ptype = good.clone();
    ptype[16..18].copy_from_slice(&0x86ddu16.to_be_bytes());
    cases.push(("a protocol type not IPv4", ptype));
    let mut htype = good.clone();
    htype[14..16].copy_from_slice(&6u16.to_be_bytes());
    cases.push(("a hardware type not Ethernet", htype));
    cases.push((
        "a probe from 0.0.0.0",
        arp_request(CLIENT_MAC, Ipv4Addr::UNSPECIFIED, VIP),
    ));
    cases.push(("an announcement", arp_request(CLIENT_MAC, VIP, VIP)));
    cases.push((
        "a group sender MAC",
        arp_request([0x01, 0, 0x5e, 0, 0, 1], CLIENT, VIP),
    ));
    // An 802.1Q tag between Ethernet and ARP.
    let mut tagged = good[..12].to_vec();
    tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x64]);
    tagged.extend_from_slice(&good[12..]);
    cases.push(("a tagged request", tagged));
    for (what, frame) in &cases {
        dp.assert_passed(frame, what)?;
    }
    assert_eq!(dp.stats()?.replies, 0);
    Ok(())
}

#[test]
fn malformed_or_foreign_solicitations_are_passed_untouched() -> Result<()> {
    let dp = Datapath::new()?;
    let good = neighbour_solicitation(CLIENT_MAC, CLIENT6, VIP6, true);
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut check = good.clone();
    check[56] ^= 0x01;
    cases.push(("a bad checksum", check));
    let mut hop = good.clone();
    hop[21] = 64;
    cases.push(("a hop limit below 255", hop));
    let mut code = good.clone();
    code[55] = 1;
    cases.push(("code 1", code));
    cases.push(("truncated", good[..good.len() - 8].to_vec()));
    cases.push((
        "DAD from the unspecified address",
        neighbour_solicitation(CLIENT_MAC, Ipv6Addr::UNSPECIFIED, VIP6, true),
    ));
    // Sent to some other group than the target's solicited-node one
    // (checksum made right for it).
    let mut group = good.clone();
    let wrong = solicited_node(OTHER_VIP6);
    group[38..54].copy_from_slice(&wrong.octets());
    refresh_checksum(&mut group);
    cases.push(("the wrong group", group));
    // A multicast solicitation without the source link-layer option.
    let mut bare = good[..good.len() - 8].to_vec();
    bare[18..20].copy_from_slice(&24u16.to_be_bytes());
    refresh_checksum(&mut bare);
    cases.push(("multicast without the source option", bare));
    // Another option kind where the source link-layer address goes.
    let mut option = good.clone();
    option[78] = 14;
    refresh_checksum(&mut option);
    cases.push(("a nonce option", option));
    for (what, frame) in &cases {
        dp.assert_passed(frame, what)?;
    }
    assert_eq!(dp.stats()?.replies, 0);
    Ok(())
}

/// Recomputes the ICMPv6 checksum of an untagged frame with IPv6 at 14.
fn refresh_checksum(frame: &mut [u8]) {
    frame[56..58].copy_from_slice(&[0, 0]);
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&frame[22..38]).unwrap());
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&frame[38..54]).unwrap());
    let len = u16::from_be_bytes([frame[18], frame[19]]) as usize;
    let check = pseudo_checksum6(&src, &dst, 58, &frame[54..54 + len]);
    frame[56..58].copy_from_slice(&check.to_be_bytes());
}
