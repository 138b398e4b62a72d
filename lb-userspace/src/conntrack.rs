//! The flow sweeper: deletes flow pairs idle past their timeout, flows of
//! frontends that no longer exist, and UDP flows whose backend left (so UDP
//! clients fail over, as kube-proxy does by clearing conntrack; TCP flows
//! keep their backend until they end).

use std::collections::HashSet;

use crate::flags;
use lb_common::{
    FLOW_F_ACKED, FLOW_F_ANSWERED, FLOW_F_CLOSING, FLOW_F_REPLY, Flow, FlowKey, PROTO_TCP,
};

/// Idle timeouts, close to the kernel's conntrack defaults as kube-proxy
/// tunes them. The UDP ones are flags; the flag defaults are
/// [`Timeouts::default`]'s.
#[derive(Clone, Copy, Debug, clap::Args)]
pub struct Timeouts {
    /// A TCP pair whose handshake has not completed (no answer from the
    /// backend, or no ACK from the client): netfilter gives SYN_SENT 120 s
    /// and SYN_RECV 60 s. Without it one client that drops SYN-ACKs holds a
    /// SNAT port per SYN for the established timeout.
    #[arg(skip = Timeouts::default().tcp_handshake_ns)]
    pub tcp_handshake_ns: u64,
    #[arg(skip = Timeouts::default().tcp_established_ns)]
    pub tcp_established_ns: u64,
    #[arg(skip = Timeouts::default().tcp_closing_ns)]
    pub tcp_closing_ns: u64,
    /// Idle timeout of UDP flows, seconds.
    #[arg(long = "udp-timeout", value_name = "UDP_TIMEOUT", env = "XLB_UDP_TIMEOUT", default_value = "120",
          value_parser = flags::seconds_as_nanoseconds)]
    pub udp_ns: u64,
    /// Idle timeout of UDP flows the backend never answered, seconds: such
    /// flows give their SNAT port back sooner.
    #[arg(long = "udp-unanswered-timeout", value_name = "UDP_UNANSWERED_TIMEOUT", env = "XLB_UDP_UNANSWERED_TIMEOUT",
          default_value = "30", value_parser = flags::seconds_as_nanoseconds)]
    pub udp_unanswered_ns: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        const S: u64 = 1_000_000_000;
        Self {
            tcp_handshake_ns: 60 * S,
            tcp_established_ns: 86_400 * S,
            tcp_closing_ns: 120 * S,
            udp_ns: 120 * S,
            udp_unanswered_ns: 30 * S,
        }
    }
}

/// The other direction's key, derived from an entry's rewrite: the forward
/// entry rewrites to (src', dst') so the reply arrives as (dst' → src'); the
/// reply entry rewrites to (frontend → client), the reverse of the forward
/// key.
pub fn partner_key(key: &FlowKey, flow: &Flow) -> FlowKey {
    FlowKey {
        src_addr: flow.dst_addr,
        dst_addr: flow.src_addr,
        src_port: flow.dst_port,
        dst_port: flow.src_port,
        proto: key.proto,
        family: key.family,
        _pad: [0; 2],
    }
}

/// The entry found at an entry's partner key, if it really is its partner:
/// its own rewrite must lead back to the entry. After a client reuses its
/// tuple, an old reply entry's partner key names the *new* connection's
/// forward entry, which rewrites to another reply key; judging or deleting it
/// with the old entry would kill a live connection (audit A-4).
pub fn true_partner(key: &FlowKey, flow: &Flow, candidate: Option<Flow>) -> Option<Flow> {
    let candidate = candidate?;
    let partner = partner_key(key, flow);
    (partner_key(&partner, &candidate) == *key && is_reply(&candidate) != is_reply(flow))
        .then_some(candidate)
}

/// Why an entry goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    Expired,
    ServiceGone,
    UdpBackendGone,
}

pub fn judge(
    key: &FlowKey,
    flow: &Flow,
    partner: Option<&Flow>,
    now_ns: u64,
    timeouts: &Timeouts,
    services: &HashSet<u32>,
    backends: &HashSet<u32>,
) -> Verdict {
    if !services.contains(&flow.service_id) {
        return Verdict::ServiceGone;
    }
    if key.proto != PROTO_TCP && !backends.contains(&flow.backend_id) {
        return Verdict::UdpBackendGone;
    }
    let flags = flow.flags | partner.map_or(0, |p| p.flags);
    let closing = flags & FLOW_F_CLOSING != 0;
    let timeout = if key.proto == PROTO_TCP {
        let established =
            flags & (FLOW_F_ANSWERED | FLOW_F_ACKED) == FLOW_F_ANSWERED | FLOW_F_ACKED;
        if !established {
            timeouts.tcp_handshake_ns.min(timeouts.tcp_established_ns)
        } else if closing {
            timeouts.tcp_closing_ns
        } else {
            timeouts.tcp_established_ns
        }
    } else if flags & FLOW_F_ANSWERED != 0 {
        timeouts.udp_ns
    } else {
        timeouts.udp_unanswered_ns.min(timeouts.udp_ns)
    };
    let last = flow.last_seen_ns.max(partner.map_or(0, |p| p.last_seen_ns));
    // The datapath refreshes last_seen at most once a second.
    if now_ns.saturating_sub(last) > timeout + 1_000_000_000 {
        Verdict::Expired
    } else {
        Verdict::Keep
    }
}

pub fn is_reply(flow: &Flow) -> bool {
    flow.flags & FLOW_F_REPLY != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{Be16, PROTO_UDP, addr_v4};

    fn pair() -> (FlowKey, Flow, FlowKey, Flow) {
        let fwd_key = FlowKey {
            src_addr: addr_v4([192, 0, 2, 1]),
            dst_addr: addr_v4([10, 200, 0, 1]),
            src_port: Be16::from_host(40000),
            dst_port: Be16::from_host(80),
            proto: PROTO_TCP,
            family: 4,
            _pad: [0; 2],
        };
        let fwd = Flow {
            src_addr: addr_v4([10, 0, 0, 2]),
            dst_addr: addr_v4([10, 1, 0, 5]),
            src_port: Be16::from_host(33000),
            dst_port: Be16::from_host(8080),
            service_id: 1,
            backend_id: 7,
            last_seen_ns: 100,
            ..Flow::default()
        };
        let rev_key = partner_key(&fwd_key, &fwd);
        let rev = Flow {
            src_addr: fwd_key.dst_addr,
            dst_addr: fwd_key.src_addr,
            src_port: fwd_key.dst_port,
            dst_port: fwd_key.src_port,
            flags: FLOW_F_REPLY,
            service_id: 1,
            backend_id: 7,
            last_seen_ns: 100,
            ..Flow::default()
        };
        (fwd_key, fwd, rev_key, rev)
    }

    #[test]
    fn partner_of_partner_is_self() {
        let (fk, f, rk, r) = pair();
        assert_eq!(rk.src_addr, addr_v4([10, 1, 0, 5]));
        assert_eq!(rk.dst_port.host(), 33000);
        assert_eq!(partner_key(&rk, &r), fk);
        let _ = f;
    }

    #[test]
    fn only_an_entry_that_leads_back_is_a_partner() {
        let (fk, f, rk, r) = pair();
        assert_eq!(true_partner(&rk, &r, Some(f)), Some(f));
        assert_eq!(true_partner(&fk, &f, Some(r)), Some(r));
        assert_eq!(true_partner(&fk, &f, None), None);
        // The client reused its tuple: the forward entry now rewrites to a
        // new SNAT port, so it is no longer the old reply entry's partner.
        let mut reused = f;
        reused.src_port = Be16::from_host(33001);
        assert_eq!(true_partner(&rk, &r, Some(reused)), None);
    }

    /// The IPv6 pair of a SNAT flow: client 2001:db8::1 → frontend
    /// 2001:db8::10, rewritten to node fd00::2 → backend fd00:10:1::5.
    fn pair_v6() -> (FlowKey, Flow, FlowKey, Flow) {
        let ip = |text: &str| text.parse::<std::net::Ipv6Addr>().unwrap().octets();
        let (fk, mut f, _, _) = pair();
        let fk = FlowKey {
            src_addr: ip("2001:db8::1"),
            dst_addr: ip("2001:db8::10"),
            family: lb_common::FAMILY_V6,
            ..fk
        };
        f.src_addr = ip("fd00::2");
        f.dst_addr = ip("fd00:10:1::5");
        let rk = partner_key(&fk, &f);
        let r = Flow {
            src_addr: fk.dst_addr,
            dst_addr: fk.src_addr,
            src_port: fk.dst_port,
            dst_port: fk.src_port,
            flags: FLOW_F_REPLY,
            ..f
        };
        (fk, f, rk, r)
    }

    #[test]
    fn ipv6_pairs_use_all_sixteen_bytes_and_keep_their_family() {
        let (fk, f, rk, r) = pair_v6();
        assert_eq!(rk.family, lb_common::FAMILY_V6);
        assert_eq!(rk.src_addr, f.dst_addr);
        assert_eq!(rk.dst_addr, f.src_addr);
        assert_eq!(partner_key(&rk, &r), fk);
        assert_eq!(true_partner(&rk, &r, Some(f)), Some(f));
        assert_eq!(true_partner(&fk, &f, Some(r)), Some(r));
        // A forward entry that differs only in the last byte of its
        // rewritten address leads elsewhere: no partner.
        let mut other = f;
        other.dst_addr[15] ^= 1;
        assert_eq!(true_partner(&rk, &r, Some(other)), None);
        // The same bytes under the IPv4 family are another key.
        let as_v4 = FlowKey { family: 4, ..fk };
        assert_ne!(partner_key(&as_v4, &f), rk);
    }

    #[test]
    fn timeouts_use_the_fresher_direction() {
        let (fk, mut f, _, mut r) = pair();
        f.flags |= FLOW_F_ACKED;
        r.flags |= FLOW_F_ANSWERED;
        let t = Timeouts::default();
        let s: HashSet<u32> = [1].into();
        let b: HashSet<u32> = [7].into();
        let late = 100 + t.tcp_established_ns + 2_000_000_000;
        assert_eq!(judge(&fk, &f, Some(&r), late, &t, &s, &b), Verdict::Expired);
        r.last_seen_ns = late - 10;
        assert_eq!(judge(&fk, &f, Some(&r), late, &t, &s, &b), Verdict::Keep);
        r.flags |= FLOW_F_CLOSING;
        r.last_seen_ns = 100;
        assert_eq!(
            judge(
                &fk,
                &f,
                Some(&r),
                100 + t.tcp_closing_ns + 2_000_000_000,
                &t,
                &s,
                &b
            ),
            Verdict::Expired
        );
    }

    /// Audit A-2: a handshake that never completes holds its flow (and SNAT
    /// port) for a minute, not for the established timeout.
    #[test]
    fn tcp_flows_without_a_complete_handshake_expire_after_a_minute() {
        let (fk, mut f, _, mut r) = pair();
        let t = Timeouts::default();
        let s: HashSet<u32> = [1].into();
        let b: HashSet<u32> = [7].into();
        let at = 100 + 300 * 1_000_000_000;
        // SYN only; SYN and SYN-ACK (the client drops the SYN-ACK); a bare
        // ACK that the backend never answered.
        assert_eq!(judge(&fk, &f, Some(&r), at, &t, &s, &b), Verdict::Expired);
        r.flags |= FLOW_F_ANSWERED;
        assert_eq!(judge(&fk, &f, Some(&r), at, &t, &s, &b), Verdict::Expired);
        r.flags &= !FLOW_F_ANSWERED;
        f.flags |= FLOW_F_ACKED;
        assert_eq!(judge(&fk, &f, Some(&r), at, &t, &s, &b), Verdict::Expired);
        // Within the minute it stays; a completed handshake stays longer.
        let soon = 100 + 50 * 1_000_000_000;
        assert_eq!(judge(&fk, &f, Some(&r), soon, &t, &s, &b), Verdict::Keep);
        r.flags |= FLOW_F_ANSWERED;
        assert_eq!(judge(&fk, &f, Some(&r), at, &t, &s, &b), Verdict::Keep);
    }

    #[test]
    fn unanswered_udp_flows_expire_sooner() {
        let (mut fk, f, _, mut r) = pair();
        fk.proto = PROTO_UDP;
        let t = Timeouts::default();
        let s: HashSet<u32> = [1].into();
        let b: HashSet<u32> = [7].into();
        let at = 100 + t.udp_unanswered_ns + 2_000_000_000;
        assert_eq!(judge(&fk, &f, Some(&r), at, &t, &s, &b), Verdict::Expired);
        r.flags |= FLOW_F_ANSWERED;
        assert_eq!(judge(&fk, &f, Some(&r), at, &t, &s, &b), Verdict::Keep);
    }

    #[test]
    fn gone_services_and_udp_backends() {
        let (mut fk, f, _, _) = pair();
        let t = Timeouts::default();
        let b: HashSet<u32> = HashSet::new();
        assert_eq!(
            judge(&fk, &f, None, 100, &t, &HashSet::new(), &b),
            Verdict::ServiceGone
        );
        let s: HashSet<u32> = [1].into();
        assert_eq!(
            judge(&fk, &f, None, 100, &t, &s, &b),
            Verdict::Keep,
            "TCP keeps its backend"
        );
        fk.proto = PROTO_UDP;
        assert_eq!(
            judge(&fk, &f, None, 100, &t, &s, &b),
            Verdict::UdpBackendGone
        );
    }
}
