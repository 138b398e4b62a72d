//! The reference model: from the maps (read from userspace) and a frame, what
//! each program must do with it, and the judgement of what it did. Every
//! output must be the input byte for byte (pass or drop) or the translation
//! the model computes from the `FLOWS` entry the packet belongs to. For a
//! new flow the entry the program just made is read back and checked first
//! (a backend of the service, SNAT from `CONFIG`'s range for remote
//! backends, the reply entry the exact reverse).

use std::collections::HashMap;

use aya::maps::{MapData, lpm_trie::Key};
use lb_common::{
    BACKEND_F_LOCAL, Backend, Be32, CONFIG_F_REDIRECT, Config, FLOW_F_CLOSING, FLOW_F_REPLY,
    FLOW_F_SNAT, Flow, FrontendKey, SERVICE_F_LOCAL_ONLY, SERVICE_F_SOURCE_RANGES,
    SOURCE_RANGE_ID_BITS, Service, SourceRange,
};
use xlb::dataplane::Maps;

use super::{
    Program,
    checksum::{Delta, csum_replace4, dword_at, l4_csum_replace, put_dword, put_word, word_at},
    fixture::Routes,
    generator::KnownFlow,
    headers::{
        self, IP_CHECK, IP_DST, IP_SRC, IP_TOT_LEN, IP_TTL, IcmpError, PROTO_TCP, PROTO_UDP, Parse,
        Parsed, TCP_CHECK, Tuple, UDP_CHECK, be16, fragment_key,
    },
};
use crate::packet::{checksum, pseudo_checksum};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;
/// tcx: `TCX_NEXT` (-1) and `TC_ACT_SHOT`.
pub const TC_NEXT: u32 = u32::MAX;
pub const TC_SHOT: u32 = 2;
/// `TC_ACT_REDIRECT`: an answer sent back out of the ingress device.
pub const TC_REDIRECT: u32 = 7;

/// `XLB_FRAGMENTS` as bytes: key {src, dst, IP id, protocol, pad}, value
/// {translated src, translated dst, ifindex (host order)}.
pub type FragmentMap = aya::maps::HashMap<MapData, [u8; 12], [u8; 12]>;

/// Where a frame is run: the maps, the device the program sees it on, and
/// the fragment records it reads.
pub struct Hook<'a> {
    pub maps: &'a Maps,
    /// What the program reads as the device (XDP: the ingress device; tc
    /// ingress: `ingress_ifindex`; tc egress: the skb's device).
    pub ifindex: u32,
    pub fragments: &'a FragmentMap,
}

/// A fragment record: the translated source and destination, the device.
fn record(value: &[u8; 12]) -> ([u8; 4], [u8; 4], u32) {
    let at = |i: usize| [value[i], value[i + 1], value[i + 2], value[i + 3]];
    (at(0), at(4), u32::from_ne_bytes(at(8)))
}

/// One frontend as the maps hold it.
#[derive(Clone, Debug)]
pub struct ServiceView {
    pub service: Service,
    pub backends: Vec<(u32, Backend)>,
}

/// What the model expects, decided before the program runs.
#[derive(Clone, Debug)]
pub enum Expect {
    Unchanged {
        drop: bool,
        why: &'static str,
    },
    /// Rewritten to an entry that exists now.
    Existing {
        parsed: Parsed,
        entry: Flow,
    },
    /// A new flow of `service`; its entries are read after the run.
    NewFlow {
        parsed: Parsed,
        service: ServiceView,
        /// Another flow holds a reply key this one may need: a counted
        /// drop is allowed.
        may_conflict: bool,
        /// The closed forward entry this one replaces (its backend left):
        /// its reply entry must be gone.
        replaces: Option<Flow>,
    },
    Icmp {
        error: IcmpError,
        entry: Flow,
    },
    /// A later fragment whose first fragment left a record: its addresses
    /// become these.
    Fragment {
        l3: usize,
        src: [u8; 4],
        dst: [u8; 4],
    },
    /// An ICMP error that would be translated, while ICMP translation is
    /// not checked (`XLB_FUZZ_ICMP=0`).
    SkippedIcmp,
}

/// A frame the program handled as the model said: its outcome class, and
/// the flow it made, if any.
pub struct Judged {
    pub class: &'static str,
    pub new_flow: Option<KnownFlow>,
}

/// A frame the program did not handle as the model said.
#[derive(Debug)]
pub struct Mismatch {
    pub class: &'static str,
    pub expected: String,
}

fn mismatch(class: &'static str, expected: impl Into<String>) -> Mismatch {
    Mismatch {
        class,
        expected: expected.into(),
    }
}

pub struct Model {
    services: HashMap<FrontendKey, ServiceView>,
    config: Config,
    routes: Routes,
    icmp: bool,
}

fn raw(addr: &[u8; 16]) -> u32 {
    u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]])
}

fn v4(addr: &[u8; 16]) -> [u8; 4] {
    [addr[0], addr[1], addr[2], addr[3]]
}

impl Model {
    /// Reads the services, backends and configuration from the maps.
    pub fn read(maps: &Maps, routes: Routes, icmp: bool) -> anyhow::Result<Model> {
        let config = maps.config.get(&lb_common::CONFIG_KEY, 0)?;
        let mut backends: Vec<(u32, Backend)> = Vec::new();
        for entry in maps.backends.iter() {
            backends.push(entry?);
        }
        let mut services = HashMap::new();
        for entry in maps.services.iter() {
            let (key, service) = entry?;
            let own = backends
                .iter()
                .filter(|(_, b)| b.service_id == service.service_id)
                .copied()
                .collect();
            services.insert(
                key,
                ServiceView {
                    service,
                    backends: own,
                },
            );
        }
        Ok(Model {
            services,
            config,
            routes,
            icmp,
        })
    }

    fn frontend(&self, t: &Tuple) -> Option<&ServiceView> {
        self.services.get(&FrontendKey {
            addr: lb_common::addr_v4(t.dst),
            port: lb_common::Be16::from_host(t.dport),
            proto: t.proto,
            family: lb_common::FAMILY_V4,
        })
    }

    /// What `program` must do with `frame`, given the maps as they are now.
    pub fn expect(&self, program: Program, frame: &[u8], hook: &Hook) -> Expect {
        let maps = hook.maps;
        let creates = program != Program::TcEgress;
        if let Some(error) = headers::icmp_error(frame) {
            let k = error.lookup();
            let addressed = headers::addr_at(frame, error.l3 + IP_DST) == error.inner.src;
            if let Ok(entry) = maps.flows.get(&k.key(), 0)
                && addressed
                && (creates || entry.flags & FLOW_F_REPLY != 0)
            {
                return if self.icmp {
                    Expect::Icmp { error, entry }
                } else {
                    Expect::SkippedIcmp
                };
            }
        }
        let pass = |why| Expect::Unchanged { drop: false, why };
        match headers::parse(frame) {
            Parse::NotIpv4L4 => pass("not IPv4 TCP/UDP"),
            Parse::Malformed => pass("malformed"),
            Parse::Fragment(l3) => {
                // Options: their first fragment is never translated.
                if frame[l3] != 0x45 {
                    return pass("later fragment with options");
                }
                match hook.fragments.get(&fragment_key(frame, l3), 0) {
                    Ok(value) => {
                        let (src, dst, ifindex) = record(&value);
                        if ifindex == hook.ifindex {
                            Expect::Fragment { l3, src, dst }
                        } else {
                            pass("later fragment, its record made on another device")
                        }
                    }
                    Err(_) => pass("later fragment without a record"),
                }
            }
            Parse::Unsupported(t) => {
                if creates && self.frontend(&t).is_some() {
                    Expect::Unchanged {
                        drop: true,
                        why: "options for a frontend",
                    }
                } else {
                    pass("options, not for a frontend")
                }
            }
            Parse::Parsed(parsed) => {
                let t = parsed.tuple;
                let mut replaces = None;
                if let Ok(entry) = maps.flows.get(&t.key(), 0)
                    && (creates || entry.flags & FLOW_F_REPLY != 0)
                {
                    // A SYN on a closed forward entry whose backend has left
                    // starts afresh (the old reply entry goes), as if there
                    // were no entry; the stateless egress never does.
                    let afresh = creates
                        && t.proto == PROTO_TCP
                        && parsed.tcp_flags & TCP_SYN != 0
                        && entry.flags & (FLOW_F_CLOSING | FLOW_F_REPLY) == FLOW_F_CLOSING
                        && !still_serves(&entry, maps);
                    if !afresh {
                        return Expect::Existing { parsed, entry };
                    }
                    replaces = Some(entry);
                }
                if !creates {
                    return pass("egress, no reply entry");
                }
                if t.proto == PROTO_TCP && parsed.tcp_flags & 0x12 != 0x02 {
                    return pass("TCP without flow, not a SYN");
                }
                let Some(view) = self.frontend(&t) else {
                    return pass("no flow, not a frontend");
                };
                if view.service.flags & SERVICE_F_SOURCE_RANGES != 0 {
                    let range = Key::new(
                        SOURCE_RANGE_ID_BITS + 128,
                        SourceRange {
                            service_id: Be32::from_host(view.service.service_id),
                            family: lb_common::FAMILY_V4,
                            addr: lb_common::addr_v4(t.src),
                            _pad: [0; 3],
                        },
                    );
                    if maps.source_ranges.get(&range, 0).is_err() {
                        return Expect::Unchanged {
                            drop: true,
                            why: "source not in the service's ranges",
                        };
                    }
                }
                if view.service.backend_count == 0 {
                    return Expect::Unchanged {
                        drop: true,
                        why: "service without backends",
                    };
                }
                let may_conflict = view.backends.iter().any(|(_, b)| {
                    b.flags & BACKEND_F_LOCAL != 0
                        && maps
                            .flows
                            .get(
                                &Tuple {
                                    src: v4(&b.addr),
                                    dst: t.src,
                                    sport: b.port.host(),
                                    dport: t.sport,
                                    proto: t.proto,
                                }
                                .key(),
                                0,
                            )
                            .is_ok()
                });
                Expect::NewFlow {
                    parsed,
                    service: view.clone(),
                    may_conflict,
                    replaces,
                }
            }
        }
    }

    /// Judges what `program` did (`verdict`, `out`) with `input`.
    pub fn judge(
        &self,
        program: Program,
        input: &[u8],
        expect: &Expect,
        verdict: u32,
        out: &[u8],
        hook: &Hook,
    ) -> Result<Judged, Mismatch> {
        let maps = hook.maps;
        let (pass, drop) = match program {
            Program::Xdp => (XDP_PASS, XDP_DROP),
            _ => (TC_NEXT, TC_SHOT),
        };
        let judged = |class| {
            Ok(Judged {
                class,
                new_flow: None,
            })
        };
        match expect {
            Expect::SkippedIcmp => judged("ICMP error of a flow (not checked)"),
            Expect::Unchanged { drop: dropped, why } => {
                let want = if *dropped { drop } else { pass };
                if verdict != want || out != input {
                    return Err(mismatch(
                        "changed or wrong verdict where the model leaves the frame alone",
                        format!(
                            "{} unchanged ({why})",
                            if *dropped { "dropped" } else { "passed" }
                        ),
                    ));
                }
                judged(if *dropped {
                    "dropped"
                } else {
                    "passed unchanged"
                })
            }
            Expect::Existing { parsed, entry } => {
                let reply = entry.flags & FLOW_F_REPLY != 0;
                if reply && program != Program::TcEgress && verdict == pass && out == input {
                    // The reverse-path check (on in the fixture) refuses a
                    // reply entry's packet that arrives from the wrong side.
                    return judged("reply passed untranslated");
                }
                let sent = self.judge_translation(program, input, parsed, entry, verdict, out)?;
                judge_record(input, parsed, entry, sent, hook)?;
                judged(if reply {
                    "translated reply"
                } else {
                    "translated forward (existing flow)"
                })
            }
            Expect::NewFlow {
                parsed,
                service,
                may_conflict,
                replaces,
            } => {
                if verdict == drop && out == input && *may_conflict {
                    return judged("dropped (reply key held by another flow)");
                }
                let made = self.made_flow(parsed, service, maps)?;
                if let Some(old) = replaces {
                    let old_reply = reply_key_of(old, parsed.tuple.proto);
                    if old_reply != reply_key_of(&made, parsed.tuple.proto)
                        && maps.flows.get(&old_reply.key(), 0).is_ok()
                    {
                        return Err(mismatch(
                            "new flow over a closed one: the old reply entry stayed",
                            format!("no entry at {old_reply:?}"),
                        ));
                    }
                }
                let sent = self.judge_translation(program, input, parsed, &made, verdict, out)?;
                judge_record(input, parsed, &made, sent, hook)?;
                Ok(Judged {
                    class: if replaces.is_some() {
                        "translated forward (new flow over a closed one whose backend left)"
                    } else {
                        "translated forward (new flow)"
                    },
                    new_flow: Some(KnownFlow {
                        original: parsed.tuple,
                        translated: Tuple {
                            src: v4(&made.src_addr),
                            dst: v4(&made.dst_addr),
                            sport: made.src_port.host(),
                            dport: made.dst_port.host(),
                            proto: parsed.tuple.proto,
                        },
                    }),
                })
            }
            Expect::Fragment { l3, src, dst } => {
                self.judge_fragment(program, input, *l3, (*src, *dst), verdict, out)?;
                judged("later fragment translated by its record")
            }
            Expect::Icmp { error, entry } => {
                let reply = entry.flags & FLOW_F_REPLY != 0;
                if verdict == pass && out == input {
                    if error.open.is_some() {
                        return judged("ICMP error left alone (case the spec leaves open)");
                    }
                    if reply && program == Program::Xdp {
                        return judged("ICMP error on a reply entry passed untranslated");
                    }
                }
                self.judge_icmp(program, input, error, entry, verdict, out)?;
                // ICMP errors carry no connection state: the entry is as it
                // was.
                if maps.flows.get(&error.lookup().key(), 0).ok() != Some(*entry) {
                    return Err(mismatch(
                        "ICMP error changed its flow entry",
                        format!("{entry:?} untouched"),
                    ));
                }
                judged(if reply {
                    "ICMP error translated (reply entry)"
                } else {
                    "ICMP error translated (forward entry)"
                })
            }
        }
    }

    /// The flow the program just made for `parsed`, checked against the
    /// service and the configuration.
    fn made_flow(
        &self,
        parsed: &Parsed,
        view: &ServiceView,
        maps: &Maps,
    ) -> Result<Flow, Mismatch> {
        let t = parsed.tuple;
        let forward = maps.flows.get(&t.key(), 0).map_err(|_| {
            mismatch(
                "new flow: no forward entry after the run",
                "a forward entry for the packet's tuple",
            )
        })?;
        let bad = |what: String| Err(mismatch("new flow: inconsistent entries", what));
        let Some((_, backend)) = view
            .backends
            .iter()
            .find(|(id, _)| *id == forward.backend_id)
        else {
            return bad(format!(
                "backend id {} of service {}, got {forward:?}",
                forward.backend_id, view.service.service_id
            ));
        };
        if forward.dst_addr != backend.addr
            || forward.dst_port != backend.port
            || forward.service_id != view.service.service_id
            || forward.flags & FLOW_F_REPLY != 0
        {
            return bad(format!("forward entry to {backend:?}, got {forward:?}"));
        }
        let snat =
            backend.flags & BACKEND_F_LOCAL == 0 && view.service.flags & SERVICE_F_LOCAL_ONLY == 0;
        let source_ok = if snat {
            forward.src_addr == self.config.node_addr
                && (self.config.snat_port_min..=self.config.snat_port_max)
                    .contains(&forward.src_port.host())
                && forward.flags & FLOW_F_SNAT != 0
        } else {
            forward.src_addr == lb_common::addr_v4(t.src)
                && forward.src_port.host() == t.sport
                && forward.flags & FLOW_F_SNAT == 0
        };
        if !source_ok {
            return bad(format!(
                "source {} (snat {snat}, config {:?}), got {forward:?}",
                if snat {
                    "node address + SNAT port"
                } else {
                    "the client's"
                },
                self.config
            ));
        }
        let reply_key = reply_key_of(&forward, t.proto);
        let Ok(reply) = maps.flows.get(&reply_key.key(), 0) else {
            return bad(format!("a reply entry at {reply_key:?}"));
        };
        let want_flags = FLOW_F_REPLY | if snat { FLOW_F_SNAT } else { 0 };
        if reply.src_addr != lb_common::addr_v4(t.dst)
            || reply.src_port.host() != t.dport
            || reply.dst_addr != lb_common::addr_v4(t.src)
            || reply.dst_port.host() != t.sport
            || reply.flags & (FLOW_F_REPLY | FLOW_F_SNAT) != want_flags
            || reply.service_id != forward.service_id
            || reply.backend_id != forward.backend_id
        {
            return bad(format!(
                "reply entry at {reply_key:?} the exact reverse of {t:?}, got {reply:?}"
            ));
        }
        Ok(forward)
    }

    /// The TCP/UDP translation of `input` to `entry`, by `program`'s rules,
    /// then sent on as `bpf_fib_lookup` would decide. True when the packet
    /// went on translated (not answered with "fragmentation needed").
    fn judge_translation(
        &self,
        program: Program,
        input: &[u8],
        parsed: &Parsed,
        entry: &Flow,
        verdict: u32,
        out: &[u8],
    ) -> Result<bool, Mismatch> {
        // TTL 1 on a source-translated flow's forward packet: answered with
        // "time exceeded" from the frontend, back out of the ingress device
        // (XDP_TX or a redirect from XDP, a redirect from tcx).
        if program != Program::TcEgress
            && entry.flags & (FLOW_F_SNAT | FLOW_F_REPLY) == FLOW_F_SNAT
            && input[parsed.l3 + 8] <= 1
        {
            // A router drops such a packet; the answer is best effort (a
            // frame the helpers cannot reshape is dropped unanswered).
            let (sent, dropped) = match program {
                Program::Xdp => (
                    verdict == XDP_TX || verdict == XDP_REDIRECT,
                    verdict == XDP_DROP,
                ),
                _ => (verdict == TC_REDIRECT, verdict == TC_SHOT),
            };
            if dropped {
                return Ok(false);
            }
            if !sent {
                return Err(mismatch(
                    "TTL 1 on a source-translated flow not answered",
                    "ICMP time exceeded sent back, or a drop",
                ));
            }
            return time_exceeded(program, input, parsed, out).map(|()| false);
        }
        let rewritten = match program {
            Program::Xdp => rewrite_xdp(input, parsed, entry),
            _ => rewrite_tc(input, parsed, entry),
        };
        let described = || format!("translated to {entry:?}: {}", super::hex(&rewritten));
        match program {
            Program::Xdp => {
                let route = self.route_of(&rewritten, parsed.l3);
                match (verdict, route) {
                    (XDP_PASS, Route::Redirect { .. }) => {
                        return Err(mismatch(
                            "translated and passed where the FIB has a neighbour on a TX port",
                            format!("redirect, {}", described()),
                        ));
                    }
                    (XDP_PASS, _) if out == rewritten => {}
                    (XDP_REDIRECT, Route::Redirect { dmac, smac }) => {
                        let sent = redirected(&rewritten, parsed.l3, dmac, smac);
                        if out != sent {
                            return Err(mismatch(
                                "wrong bytes after redirect",
                                format!("{} (TTL - 1, MACs)", super::hex(&sent)),
                            ));
                        }
                    }
                    // Back out of the ingress device: through TX_PORTS
                    // when it is there, XDP_TX otherwise.
                    (XDP_TX | XDP_REDIRECT, Route::FragNeeded { mtu }) => {
                        return frag_needed(input, parsed, mtu, out).map(|()| false);
                    }
                    _ => {
                        return Err(mismatch(
                            "mistranslated (TCP/UDP)",
                            format!("verdict for {route:?}, {}", described()),
                        ));
                    }
                }
            }
            _ => {
                if verdict != TC_NEXT || out != rewritten {
                    return Err(mismatch("mistranslated (TCP/UDP)", described()));
                }
            }
        }
        // The exact bytes matched; the model's incremental checksums must
        // agree with a full recompute: valid stays valid, invalid stays
        // invalid, UDP's "no checksum" stays.
        let (l3, l4) = (parsed.l3, parsed.l4);
        let fields_end = l4
            + if parsed.tuple.proto == PROTO_TCP {
                TCP_CHECK + 2
            } else {
                UDP_CHECK + 2
            };
        let end = headers::l4_end(input, l3, fields_end);
        let valid_l4 = |f: &[u8]| {
            let t = Tuple::read(f, l3, l4);
            pseudo_checksum(&t.src.into(), &t.dst.into(), t.proto, &f[l4..end]) == 0
        };
        let no_udp_sum = |f: &[u8]| parsed.tuple.proto == PROTO_UDP && f[l4 + 6..l4 + 8] == [0, 0];
        if valid_ipv4(input, l3) != valid_ipv4(out, l3)
            || no_udp_sum(input) != no_udp_sum(out)
            || (!no_udp_sum(input) && valid_l4(input) != valid_l4(out))
        {
            return Err(mismatch(
                "checksum validity changed by the translation",
                "valid in, valid out; invalid in, invalid out",
            ));
        }
        Ok(true)
    }

    /// A later fragment's translation to its record's addresses: the IPv4
    /// header only (XDP: one delta; tc: the helper per address), then sent
    /// on as the route says (XDP; one too big for it is passed).
    fn judge_fragment(
        &self,
        program: Program,
        input: &[u8],
        l3: usize,
        (src, dst): ([u8; 4], [u8; 4]),
        verdict: u32,
        out: &[u8],
    ) -> Result<(), Mismatch> {
        let mut rewritten = input.to_vec();
        let (old_src, old_dst) = (dword_at(input, l3 + IP_SRC), dword_at(input, l3 + IP_DST));
        let (new_src, new_dst) = (u32::from_ne_bytes(src), u32::from_ne_bytes(dst));
        let check = word_at(input, l3 + IP_CHECK);
        let check = match program {
            Program::Xdp => {
                let mut delta = Delta::default();
                delta.dword(old_src, new_src);
                delta.dword(old_dst, new_dst);
                delta.apply(check)
            }
            _ => csum_replace4(csum_replace4(check, old_src, new_src), old_dst, new_dst),
        };
        put_word(&mut rewritten, l3 + IP_CHECK, check);
        put_dword(&mut rewritten, l3 + IP_SRC, new_src);
        put_dword(&mut rewritten, l3 + IP_DST, new_dst);
        let ok = match program {
            Program::Xdp => match (verdict, self.route_of(&rewritten, l3)) {
                (XDP_PASS, Route::Redirect { .. }) => false,
                (XDP_PASS, _) => out == rewritten,
                (XDP_REDIRECT, Route::Redirect { dmac, smac }) => {
                    out == redirected(&rewritten, l3, dmac, smac)
                }
                _ => false,
            },
            _ => verdict == TC_NEXT && out == rewritten,
        };
        if !ok {
            return Err(mismatch(
                "later fragment mistranslated or not translated",
                format!("addresses {src:?} -> {dst:?}: {}", super::hex(&rewritten)),
            ));
        }
        if valid_ipv4(input, l3) != valid_ipv4(out, l3) {
            return Err(mismatch(
                "checksum validity changed by the fragment translation",
                "valid in, valid out; invalid in, invalid out",
            ));
        }
        Ok(())
    }

    fn judge_icmp(
        &self,
        program: Program,
        input: &[u8],
        error: &IcmpError,
        entry: &Flow,
        verdict: u32,
        out: &[u8],
    ) -> Result<(), Mismatch> {
        let (rewritten, sums) = rewrite_icmp(input, error, entry);
        let fits = |f: &[u8], want: &[u8]| same_but_zero_sums(f, want, &sums);
        let ok = match program {
            Program::Xdp => match (verdict, self.route_of(&rewritten, error.l3)) {
                (XDP_PASS, _) => fits(out, &rewritten),
                (XDP_REDIRECT, Route::Redirect { dmac, smac }) => {
                    fits(out, &redirected(&rewritten, error.l3, dmac, smac))
                }
                _ => false,
            },
            _ => verdict == TC_NEXT && fits(out, &rewritten),
        };
        if !ok {
            return Err(mismatch(
                "ICMP error mistranslated or not translated",
                format!(
                    "translated by {entry:?} (lookup {:?}): {}",
                    error.lookup(),
                    super::hex(&rewritten)
                ),
            ));
        }
        // Over the whole frame: a total length that differs from it makes
        // the case open, and the frame holds every word translated.
        let valid_icmp = |f: &[u8]| checksum(&f[error.icmp..]) == 0;
        if valid_ipv4(input, error.l3) != valid_ipv4(out, error.l3)
            || valid_ipv4(input, error.inner_l3) != valid_ipv4(out, error.inner_l3)
            || valid_icmp(input) != valid_icmp(out)
        {
            return Err(mismatch(
                "checksum validity changed by the ICMP translation",
                "valid in, valid out; invalid in, invalid out",
            ));
        }
        Ok(())
    }

    /// Where `bpf_fib_lookup` sends the translated packet, with redirect on.
    fn route_of(&self, f: &[u8], l3: usize) -> Route {
        if self.config.flags & CONFIG_F_REDIRECT == 0 {
            return Route::Pass;
        }
        let dst = headers::addr_at(f, l3 + IP_DST);
        self.routes
            .route(dst, be16(f, l3 + IP_TOT_LEN), f[l3 + IP_TTL])
    }
}

/// A first fragment that went on translated to `entry` left the record its
/// later fragments get: the translated addresses, the device.
fn judge_record(
    input: &[u8],
    parsed: &Parsed,
    entry: &Flow,
    sent: bool,
    hook: &Hook,
) -> Result<(), Mismatch> {
    if !parsed.first_fragment || !sent {
        return Ok(());
    }
    let want = (v4(&entry.src_addr), v4(&entry.dst_addr), hook.ifindex);
    match hook.fragments.get(&fragment_key(input, parsed.l3), 0) {
        Ok(value) if record(&value) == want => Ok(()),
        other => Err(mismatch(
            "first fragment translated without its record",
            format!("record {want:?}, got {other:?}"),
        )),
    }
}

/// The key of a forward entry's reply entry: the tuple it rewrites to,
/// reversed.
fn reply_key_of(forward: &Flow, proto: u8) -> Tuple {
    Tuple {
        src: v4(&forward.dst_addr),
        dst: v4(&forward.src_addr),
        sport: forward.dst_port.host(),
        dport: forward.src_port.host(),
        proto,
    }
}

/// Is a forward entry's backend still one of its service's backends?
fn still_serves(entry: &Flow, maps: &Maps) -> bool {
    maps.backends.get(&entry.backend_id, 0).is_ok_and(|b| {
        b.service_id == entry.service_id && b.addr == entry.dst_addr && b.port == entry.dst_port
    })
}

const TCP_SYN: u8 = 0x02;

/// What the FIB (and the TTL check) make of a translated packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Handed to the kernel: no route, no neighbour, egress not a TX port,
    /// TTL at 1 or less.
    Pass,
    Redirect {
        dmac: [u8; 6],
        smac: [u8; 6],
    },
    /// Longer than the egress MTU.
    FragNeeded {
        mtu: u16,
    },
}

fn valid_ipv4(f: &[u8], l3: usize) -> bool {
    checksum(&f[l3..l3 + 20]) == 0
}

/// `lb-ebpf/src/xdp_path.rs` `rewrite`: one delta per checksum.
fn rewrite_xdp(input: &[u8], p: &Parsed, entry: &Flow) -> Vec<u8> {
    let mut f = input.to_vec();
    let (l3, l4) = (p.l3, p.l4);
    let (new_src, new_dst) = (raw(&entry.src_addr), raw(&entry.dst_addr));
    let (new_sport, new_dport) = (entry.src_port.wire(), entry.dst_port.wire());
    let (old_src, old_dst) = (dword_at(&f, l3 + IP_SRC), dword_at(&f, l3 + IP_DST));
    let mut ip = Delta::default();
    ip.dword(old_src, new_src);
    ip.dword(old_dst, new_dst);
    let mut l4_delta = ip;
    l4_delta.word(word_at(&f, l4), new_sport);
    l4_delta.word(word_at(&f, l4 + 2), new_dport);
    if p.tuple.proto == PROTO_TCP {
        let c = l4_delta.apply(word_at(&f, l4 + TCP_CHECK));
        put_word(&mut f, l4 + TCP_CHECK, c);
    } else {
        let c = word_at(&f, l4 + UDP_CHECK);
        if c != 0 {
            let c = l4_delta.apply(c);
            put_word(&mut f, l4 + UDP_CHECK, if c == 0 { 0xffff } else { c });
        }
    }
    put_dword(&mut f, l3 + IP_SRC, new_src);
    put_dword(&mut f, l3 + IP_DST, new_dst);
    let c = ip.apply(word_at(&f, l3 + IP_CHECK));
    put_word(&mut f, l3 + IP_CHECK, c);
    put_word(&mut f, l4, new_sport);
    put_word(&mut f, l4 + 2, new_dport);
    f
}

/// `lb-ebpf/src/tc_path.rs` `rewrite`: the kernel helpers, one field at a
/// time, in the program's order.
fn rewrite_tc(input: &[u8], p: &Parsed, entry: &Flow) -> Vec<u8> {
    let mut f = input.to_vec();
    let (l3, l4) = (p.l3, p.l4);
    let udp = p.tuple.proto == PROTO_UDP;
    let at = l4 + if udp { UDP_CHECK } else { TCP_CHECK };
    let (new_src, new_dst) = (raw(&entry.src_addr), raw(&entry.dst_addr));
    let (new_sport, new_dport) = (entry.src_port.wire(), entry.dst_port.wire());
    let (old_src, old_dst) = (dword_at(&f, l3 + IP_SRC), dword_at(&f, l3 + IP_DST));
    let mut c = word_at(&f, at);
    c = l4_csum_replace(c, old_src, new_src, udp);
    c = l4_csum_replace(c, old_dst, new_dst, udp);
    c = l4_csum_replace(c, word_at(&f, l4) as u32, new_sport as u32, udp);
    c = l4_csum_replace(c, word_at(&f, l4 + 2) as u32, new_dport as u32, udp);
    put_word(&mut f, at, c);
    let mut ip = word_at(&f, l3 + IP_CHECK);
    ip = csum_replace4(ip, old_src, new_src);
    ip = csum_replace4(ip, old_dst, new_dst);
    put_word(&mut f, l3 + IP_CHECK, ip);
    put_dword(&mut f, l3 + IP_SRC, new_src);
    put_dword(&mut f, l3 + IP_DST, new_dst);
    put_word(&mut f, l4, new_sport);
    put_word(&mut f, l4 + 2, new_dport);
    f
}

/// A redirected frame: TTL - 1 (header checksum updated), the neighbour's
/// and the egress device's MAC addresses.
fn redirected(f: &[u8], l3: usize, dmac: [u8; 6], smac: [u8; 6]) -> Vec<u8> {
    let mut f = f.to_vec();
    let old = word_at(&f, l3 + IP_TTL);
    f[l3 + IP_TTL] -= 1;
    let mut delta = Delta::default();
    delta.word(old, word_at(&f, l3 + IP_TTL));
    let c = delta.apply(word_at(&f, l3 + IP_CHECK));
    put_word(&mut f, l3 + IP_CHECK, c);
    f[0..6].copy_from_slice(&dmac);
    f[6..12].copy_from_slice(&smac);
    f
}

/// The ICMP translation spec: the quoted tuple becomes the reverse of the
/// entry's rewrite, the outer destination its destination, the outer source
/// its source when the entry rewrites sources; every checksum updated
/// incrementally. Returns the frame and the offsets of the checksums whose
/// zero may be either 0x0000 or 0xffff (the spec does not fix how the sums
/// are folded).
fn rewrite_icmp(input: &[u8], e: &IcmpError, entry: &Flow) -> (Vec<u8>, Vec<usize>) {
    let mut f = input.to_vec();
    let (l3, il3, il4) = (e.l3, e.inner_l3, e.inner_l4);
    let lookup = e.lookup();
    let old_osrc = dword_at(&f, l3 + IP_SRC);
    let old_odst = dword_at(&f, l3 + IP_DST);
    let new_odst = raw(&entry.dst_addr);
    let new_osrc = if v4(&entry.src_addr) != lookup.src {
        raw(&entry.src_addr)
    } else {
        old_osrc
    };
    let mut outer = Delta::default();
    outer.dword(old_osrc, new_osrc);
    outer.dword(old_odst, new_odst);
    let c = outer.apply(word_at(&f, l3 + IP_CHECK));
    put_word(&mut f, l3 + IP_CHECK, c);
    put_dword(&mut f, l3 + IP_SRC, new_osrc);
    put_dword(&mut f, l3 + IP_DST, new_odst);

    let (new_isrc, new_isport) = (raw(&entry.dst_addr), entry.dst_port.wire());
    let (new_idst, new_idport) = (raw(&entry.src_addr), entry.src_port.wire());
    let mut inner = Delta::default();
    inner.dword(dword_at(&f, il3 + IP_SRC), new_isrc);
    inner.dword(dword_at(&f, il3 + IP_DST), new_idst);
    let mut inner_l4 = inner;
    inner_l4.word(word_at(&f, il4), new_isport);
    inner_l4.word(word_at(&f, il4 + 2), new_idport);
    let c = inner.apply(word_at(&f, il3 + IP_CHECK));
    put_word(&mut f, il3 + IP_CHECK, c);
    let mut sums = vec![l3 + IP_CHECK, il3 + IP_CHECK, e.icmp + 2];
    let l4_check = if e.inner.proto == PROTO_UDP {
        (word_at(&f, il4 + UDP_CHECK) != 0).then_some(il4 + UDP_CHECK)
    } else {
        (il4 + TCP_CHECK + 2 <= f.len()).then_some(il4 + TCP_CHECK)
    };
    if let Some(at) = l4_check {
        let c = inner_l4.apply(word_at(&f, at));
        put_word(&mut f, at, c);
        sums.push(at);
    }
    put_dword(&mut f, il3 + IP_SRC, new_isrc);
    put_dword(&mut f, il3 + IP_DST, new_idst);
    put_word(&mut f, il4, new_isport);
    put_word(&mut f, il4 + 2, new_idport);
    // The ICMP checksum: every word of the message that changed.
    let mut icmp = Delta::default();
    let mut at = e.icmp + 8;
    while at + 2 <= f.len() {
        let (old, new) = (word_at(input, at), word_at(&f, at));
        if old != new {
            icmp.word(old, new);
        }
        at += 2;
    }
    let c = icmp.apply(word_at(&f, e.icmp + 2));
    put_word(&mut f, e.icmp + 2, c);
    (f, sums)
}

/// `a` equals `b`, except that a checksum at one of `sums` may hold either
/// zero (0x0000 or 0xffff) where the other holds one.
fn same_but_zero_sums(a: &[u8], b: &[u8], sums: &[usize]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let zero = |w: u16| w == 0 || w == 0xffff;
    let mut i = 0;
    while i < a.len() {
        if sums.contains(&i) && i + 2 <= a.len() {
            let (x, y) = (word_at(a, i), word_at(b, i));
            if x != y && !(zero(x) && zero(y)) {
                return false;
            }
            i += 2;
        } else {
            if a[i] != b[i] {
                return false;
            }
            i += 1;
        }
    }
    true
}

/// An ICMP "fragmentation needed" answer to `input` (XDP_TX): from the
/// original destination to the client, quoting the client's header and at
/// least 8 bytes after it unmodified, the next-hop MTU given.
fn frag_needed(input: &[u8], p: &Parsed, mtu: u16, out: &[u8]) -> Result<(), Mismatch> {
    let mut rest = [0u8; 4];
    rest[2..].copy_from_slice(&mtu.to_be_bytes());
    icmp_answer(
        Program::Xdp,
        input,
        p,
        out,
        (3, 4),
        rest,
        "bad fragmentation-needed answer",
    )
}

/// An ICMP "time exceeded in transit" answer to `input`, likewise, quoting
/// zeros past the end of a short packet. At tcx the quoted L4 checksum is
/// set to the value a later checksum completion would leave alone
/// (`icmp::partial_checksum_fixed_point`), so those two bytes are not
/// compared there.
fn time_exceeded(program: Program, input: &[u8], p: &Parsed, out: &[u8]) -> Result<(), Mismatch> {
    icmp_answer(
        program,
        input,
        p,
        out,
        (11, 0),
        [0; 4],
        "bad time-exceeded answer",
    )
}

/// An ICMP answer (`kind`, `code`, the 4 bytes after the checksum as
/// `rest`) to `input`, sent back out of the device it came in on.
fn icmp_answer(
    program: Program,
    input: &[u8],
    p: &Parsed,
    out: &[u8],
    (kind, code): (u8, u8),
    rest: [u8; 4],
    class: &'static str,
) -> Result<(), Mismatch> {
    let wrong = |what: &str| {
        Err(mismatch(
            class,
            format!("ICMP {kind}/{code} ({rest:?}) quoting the input ({what})"),
        ))
    };
    let l3 = p.l3;
    if out.len() < l3 + 20 + 8 + 28 {
        return wrong("too short");
    }
    if out[..6] != input[6..12] || out[6..12] != input[..6] || out[12..l3] != input[12..l3] {
        return wrong("Ethernet addresses swapped, tag and type kept");
    }
    let ihl = (out[l3] & 0x0f) as usize * 4;
    let icmp = l3 + ihl;
    if out[l3] >> 4 != 4 || ihl < 20 || out[l3 + 9] != 1 || !valid_ipv4(out, l3) {
        return wrong("outer IPv4 header");
    }
    if headers::addr_at(out, l3 + IP_SRC) != p.tuple.dst
        || headers::addr_at(out, l3 + IP_DST) != p.tuple.src
    {
        return wrong("addresses: from the frontend to the client");
    }
    let end = (l3 + be16(out, l3 + IP_TOT_LEN) as usize).min(out.len());
    if out[icmp] != kind || out[icmp + 1] != code || out[icmp + 4..icmp + 8] != rest {
        return wrong("type, code, rest");
    }
    if end < icmp + 8 + 28 || checksum(&out[icmp..end]) != 0 {
        return wrong("ICMP checksum");
    }
    let sent = &input[l3..];
    let in_ihl = (input[l3] & 0x0f) as usize * 4;
    let check = in_ihl
        + if p.tuple.proto == PROTO_TCP {
            TCP_CHECK
        } else {
            UDP_CHECK
        };
    for (i, byte) in out[icmp + 8..end].iter().enumerate() {
        let skipped = program != Program::Xdp && (i == check || i == check + 1);
        if !skipped && *byte != sent.get(i).copied().unwrap_or(0) {
            return wrong("quote");
        }
    }
    Ok(())
}

/// What a test run's verdict is called in the report.
pub fn verdict_name(program: Program, verdict: u32) -> &'static str {
    match (program, verdict) {
        (Program::Xdp, XDP_DROP) => "XDP_DROP",
        (Program::Xdp, XDP_PASS) => "XDP_PASS",
        (Program::Xdp, XDP_TX) => "XDP_TX",
        (Program::Xdp, XDP_REDIRECT) => "XDP_REDIRECT",
        (Program::Xdp, _) => "XDP other",
        (_, TC_NEXT) => "TCX_NEXT",
        (_, TC_SHOT) => "TC_ACT_SHOT",
        _ => "tc other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::Be16;

    fn put_check(bytes: &mut [u8], at: usize, c: u16) {
        bytes[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }

    /// An ICMP port unreachable from `router` to `quoted.src`, quoting the
    /// whole of a small `quoted` packet, every checksum valid.
    fn icmp_error_frame(router: [u8; 4], quoted: Tuple) -> Vec<u8> {
        let l4_len = if quoted.proto == PROTO_TCP { 20 } else { 8 } + 4;
        let mut inner = vec![
            0x45,
            0,
            0,
            (20 + l4_len) as u8,
            0,
            1,
            0x40,
            0,
            64,
            quoted.proto,
        ];
        inner.extend_from_slice(&[0, 0]);
        inner.extend_from_slice(&quoted.src);
        inner.extend_from_slice(&quoted.dst);
        let c = checksum(&inner);
        put_check(&mut inner, 10, c);
        let mut l4 = quoted.sport.to_be_bytes().to_vec();
        l4.extend_from_slice(&quoted.dport.to_be_bytes());
        if quoted.proto == PROTO_TCP {
            l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
        } else {
            l4.extend_from_slice(&[0, l4_len as u8, 0, 0]);
        }
        l4.extend_from_slice(&[1, 2, 3, 4]);
        let c = pseudo_checksum(&quoted.src.into(), &quoted.dst.into(), quoted.proto, &l4);
        put_check(&mut l4, if quoted.proto == PROTO_TCP { 16 } else { 6 }, c);
        let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&inner);
        icmp.extend_from_slice(&l4);
        let c = checksum(&icmp);
        put_check(&mut icmp, 2, c);
        let mut outer = vec![0x45, 0, 0, (20 + icmp.len()) as u8, 0, 2, 0, 0, 64, 1, 0, 0];
        outer.extend_from_slice(&router);
        outer.extend_from_slice(&quoted.src);
        let c = checksum(&outer);
        put_check(&mut outer, 10, c);
        let mut frame = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 8, 0];
        frame.extend_from_slice(&outer);
        frame.extend_from_slice(&icmp);
        frame
    }

    fn entry(src: ([u8; 4], u16), dst: ([u8; 4], u16), flags: u8) -> Flow {
        Flow {
            src_addr: lb_common::addr_v4(src.0),
            dst_addr: lb_common::addr_v4(dst.0),
            src_port: Be16::from_host(src.1),
            dst_port: Be16::from_host(dst.1),
            flags,
            ..Flow::default()
        }
    }

    /// The model's ICMP translation, checked against full recomputes: the
    /// spec's addresses and ports, and every checksum (outer IPv4, ICMP,
    /// quoted IPv4, quoted L4) still valid.
    fn check(router: [u8; 4], quoted: Tuple, t: Flow, outer_src: [u8; 4]) {
        let frame = icmp_error_frame(router, quoted);
        let e = headers::icmp_error(&frame).expect("an ICMP error");
        assert_eq!(e.open, None);
        let (out, _) = rewrite_icmp(&frame, &e, &t);
        assert!(valid_ipv4(&out, e.l3), "outer header checksum");
        assert!(valid_ipv4(&out, e.inner_l3), "quoted header checksum");
        assert_eq!(checksum(&out[e.icmp..]), 0, "ICMP checksum");
        let inner = Tuple::read(&out, e.inner_l3, e.inner_l4);
        assert_eq!(
            pseudo_checksum(
                &inner.src.into(),
                &inner.dst.into(),
                inner.proto,
                &out[e.inner_l4..]
            ),
            0,
            "quoted L4 checksum"
        );
        assert_eq!(
            (inner.src, inner.sport),
            (v4(&t.dst_addr), t.dst_port.host())
        );
        assert_eq!(
            (inner.dst, inner.dport),
            (v4(&t.src_addr), t.src_port.host())
        );
        assert_eq!(headers::addr_at(&out, e.l3 + IP_DST), v4(&t.dst_addr));
        assert_eq!(headers::addr_at(&out, e.l3 + IP_SRC), outer_src);
    }

    const CLIENT: ([u8; 4], u16) = ([192, 0, 2, 7], 40001);
    const FRONTEND: ([u8; 4], u16) = ([10, 200, 0, 10], 90);
    const SNAT: ([u8; 4], u16) = ([10, 0, 1, 1], 33000);
    const BACKEND: ([u8; 4], u16) = ([10, 244, 3, 2], 8080);
    const ROUTER: [u8; 4] = [10, 244, 0, 254];

    #[test]
    fn an_error_about_a_translated_packet_goes_to_the_client_from_the_frontend() {
        for proto in [PROTO_TCP, PROTO_UDP] {
            // The node sent SNAT → backend; a router answers the node.
            let quoted = Tuple {
                src: SNAT.0,
                dst: BACKEND.0,
                sport: SNAT.1,
                dport: BACKEND.1,
                proto,
            };
            let reply = entry(FRONTEND, CLIENT, FLOW_F_REPLY | FLOW_F_SNAT);
            check(ROUTER, quoted, reply, FRONTEND.0);
        }
    }

    #[test]
    fn an_error_about_a_reply_goes_to_the_backend() {
        for proto in [PROTO_TCP, PROTO_UDP] {
            // The node sent frontend → client; a router answers the
            // frontend. With SNAT the error leaves from the node address.
            let quoted = Tuple {
                src: FRONTEND.0,
                dst: CLIENT.0,
                sport: FRONTEND.1,
                dport: CLIENT.1,
                proto,
            };
            let forward = entry(SNAT, BACKEND, FLOW_F_SNAT);
            check(ROUTER, quoted, forward, SNAT.0);
            // Without SNAT the router's address stays.
            let forward = entry(CLIENT, BACKEND, 0);
            check(ROUTER, quoted, forward, ROUTER);
        }
    }
}
