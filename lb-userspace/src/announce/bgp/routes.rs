//! What this node announces: a host route for every Service address it
//! can serve, derived from the same desired state the datapath is
//! programmed from. Pure; the sessions only send what this says.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;

use crate::model::{DesiredState, Frontend};

/// The host routes of one node, and the next hops the node offers for
/// families its sessions do not run over (an IPv6 route over an IPv4
/// session needs an IPv6 next hop).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routes {
    pub addresses: BTreeSet<IpAddr>,
    pub node_v4: Option<Ipv4Addr>,
    pub node_v6: Option<Ipv6Addr>,
    /// The path attributes of addresses whose pool sets some
    /// (`AddressPool.spec.bgp`); the others have the defaults.
    pub attributes: BTreeMap<IpAddr, RouteAttributes>,
}

/// What an address pool adds to its routes (`spec.bgp`).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteAttributes {
    /// COMMUNITIES (RFC 1997), sorted, each once.
    pub communities: Vec<u32>,
    /// LOCAL_PREF towards iBGP peers; `None`: 100. Never sent to eBGP
    /// peers (RFC 4271 §5.1.5).
    pub local_preference: Option<u32>,
    /// Announce the prefix of this length that holds the address instead
    /// of its host route (IPv4, IPv6).
    pub aggregation_length: Option<u8>,
    pub aggregation_length_v6: Option<u8>,
}

/// RFC 1997 and RFC 3765 well-known communities, by the names routers
/// print.
const WELL_KNOWN: [(&str, u32); 4] = [
    ("no-export", 0xFFFF_FF01),
    ("no-advertise", 0xFFFF_FF02),
    ("no-export-subconfed", 0xFFFF_FF03),
    ("no-peer", 0xFFFF_FF04),
];

/// A community as written in a pool: `ASN:value` (each 0-65535) or a
/// well-known name (`no-export`, `no-advertise`, `no-export-subconfed`,
/// `no-peer`).
pub fn parse_community(text: &str) -> Result<u32, String> {
    let text = text.trim();
    if let Some((_, value)) = WELL_KNOWN
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(text))
    {
        return Ok(*value);
    }
    let (high, low) = text
        .split_once(':')
        .ok_or_else(|| format!("community {text:?} is neither ASN:value nor a well-known name"))?;
    let part = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("community {text:?}: {p:?} is not a number from 0 to 65535"))
    };
    Ok((u32::from(part(high)?) << 16) | u32::from(part(low)?))
}

impl RouteAttributes {
    /// From a pool's `spec.bgp` fields; the first bad community or length
    /// is the error.
    pub fn parse(
        communities: &[String],
        local_preference: Option<u32>,
        aggregation_length: Option<u8>,
        aggregation_length_v6: Option<u8>,
    ) -> Result<Self, String> {
        let mut parsed = communities
            .iter()
            .map(|c| parse_community(c))
            .collect::<Result<Vec<_>, _>>()?;
        parsed.sort_unstable();
        parsed.dedup();
        if aggregation_length.is_some_and(|l| l == 0 || l > 32) {
            return Err(format!(
                "aggregationLength {} is not from 1 to 32",
                aggregation_length.unwrap_or_default()
            ));
        }
        if aggregation_length_v6.is_some_and(|l| l == 0 || l > 128) {
            return Err(format!(
                "aggregationLengthV6 {} is not from 1 to 128",
                aggregation_length_v6.unwrap_or_default()
            ));
        }
        Ok(RouteAttributes {
            communities: parsed,
            local_preference,
            aggregation_length,
            aggregation_length_v6,
        })
    }

    /// The prefix announced for `address`: its host route, or the
    /// aggregate that holds it.
    pub fn prefix(&self, address: IpAddr) -> IpNet {
        let length = match address {
            IpAddr::V4(_) => self.aggregation_length.unwrap_or(32),
            IpAddr::V6(_) => self.aggregation_length_v6.unwrap_or(128),
        };
        IpNet::new(address, length)
            .map(|net| net.trunc())
            .unwrap_or_else(|_| IpNet::from(address))
    }
}

/// Does `spec` give this node something to send its address's traffic to?
fn serves(spec: &crate::model::FrontendSpec) -> bool {
    if spec.local_only {
        spec.backends.iter().any(|b| b.local && !b.terminating)
    } else {
        !spec.backends.is_empty()
    }
}

/// The addresses to announce: every frontend address with a backend to
/// send its traffic to, and that is `programmed` in this node's maps (one
/// whose writes failed would be passed to the kernel, which has no route
/// for it). With `externalTrafficPolicy: Local` that must be a ready
/// backend on this node: a node without one would drop the traffic, so it
/// must not attract it (the route moves with the endpoint). A terminating
/// backend, kept only because nothing else is left, does not count.
///
/// Kept up to date sync by sync: a sync of a few changed
/// frontends updates only theirs (at 10 000 Services the walk over every
/// frontend was most of an EndpointSlice change's CPU), and `generation`
/// moves only when what would be announced changed, so that nothing
/// downstream is rebuilt for an endpoint change that moves no route.
#[derive(Debug, Default)]
pub struct Announcing {
    /// The frontends that serve and are programmed.
    serving: BTreeSet<Frontend>,
    /// How many of them each address has.
    addresses: BTreeMap<IpAddr, u32>,
    node_v4: Option<Ipv4Addr>,
    node_v6: Option<Ipv6Addr>,
    generation: u64,
}

impl Announcing {
    /// After a sync: `changed` names the frontends it touched (`None`:
    /// every one may have changed); `node` is the node's addresses (the
    /// next hops).
    pub fn update(
        &mut self,
        desired: &DesiredState,
        changed: Option<&BTreeSet<Frontend>>,
        node: (Option<Ipv4Addr>, Option<Ipv6Addr>),
        programmed: impl Fn(&Frontend) -> bool,
    ) {
        let before = self.generation;
        if (self.node_v4, self.node_v6) != node {
            (self.node_v4, self.node_v6) = node;
            self.generation += 1;
        }
        match changed {
            Some(changed) => {
                for frontend in changed {
                    let on = desired
                        .frontends
                        .get(frontend)
                        .is_some_and(|spec| serves(spec) && programmed(frontend));
                    self.set(frontend, on);
                }
            }
            None => {
                let gone: Vec<Frontend> = self
                    .serving
                    .iter()
                    .filter(|f| !desired.frontends.contains_key(f))
                    .copied()
                    .collect();
                for frontend in &gone {
                    self.set(frontend, false);
                }
                for (frontend, spec) in &desired.frontends {
                    self.set(frontend, serves(spec) && programmed(frontend));
                }
                // A complete sync may also have moved what the routes
                // carry besides their addresses (a pool's attributes).
                if self.generation == before {
                    self.generation += 1;
                }
            }
        }
    }

    fn set(&mut self, frontend: &Frontend, on: bool) {
        if on {
            if self.serving.insert(*frontend) {
                let count = self.addresses.entry(frontend.addr).or_default();
                *count += 1;
                if *count == 1 {
                    self.generation += 1;
                }
            }
        } else if self.serving.remove(frontend)
            && let Some(count) = self.addresses.get_mut(&frontend.addr)
        {
            *count -= 1;
            if *count == 0 {
                self.addresses.remove(&frontend.addr);
                self.generation += 1;
            }
        }
    }

    /// Moves whenever [`Announcing::routes`] may differ from before.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn routes(&self) -> Routes {
        Routes {
            addresses: self.addresses.keys().copied().collect(),
            node_v4: self.node_v4,
            node_v6: self.node_v6,
            attributes: BTreeMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, FrontendSpec, Protocol, ServiceRef};

    /// The routes of `desired` from a complete walk, the reference the
    /// incremental updates must equal.
    fn routes(desired: &DesiredState, programmed: impl Fn(&Frontend) -> bool) -> Routes {
        let mut announcing = Announcing::default();
        let node = (desired.node_addr, desired.node_addr_v6);
        announcing.update(desired, None, node, programmed);
        announcing.routes()
    }

    fn frontend(addr: &str, port: u16) -> Frontend {
        Frontend {
            addr: addr.parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
        }
    }

    fn backend(addr: &str, local: bool, terminating: bool) -> Backend {
        Backend {
            addr: addr.parse().unwrap(),
            port: 80,
            local,
            terminating,
        }
    }

    fn spec(local_only: bool, backends: Vec<Backend>) -> FrontendSpec {
        FrontendSpec {
            service: ServiceRef {
                namespace: "shop".into(),
                name: "web".into(),
                port_name: "http".into(),
            },
            backends,
            local_only,
            affinity_timeout: None,
            source_ranges: Vec::new(),
        }
    }

    fn addresses(desired: &DesiredState) -> Vec<String> {
        routes(desired, |_| true)
            .addresses
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn communities_parse_by_number_and_by_name_and_bad_ones_are_named() {
        let attributes = RouteAttributes::parse(
            &[
                "64500:42".into(),
                "no-export".into(),
                " 64500:42 ".into(),
                "0:65535".into(),
            ],
            Some(250),
            Some(24),
            None,
        )
        .unwrap();
        assert_eq!(
            attributes.prefix("192.0.2.77".parse().unwrap()).to_string(),
            "192.0.2.0/24"
        );
        assert_eq!(
            attributes
                .prefix("2001:db8::1".parse().unwrap())
                .to_string(),
            "2001:db8::1/128"
        );
        assert!(RouteAttributes::parse(&[], None, Some(33), None).is_err());
        assert!(RouteAttributes::parse(&[], None, Some(0), None).is_err());
        assert!(RouteAttributes::parse(&[], None, None, Some(129)).is_err());
        assert_eq!(
            attributes.communities,
            [0x0000_FFFF, (64500 << 16) | 42, 0xFFFF_FF01]
        );
        assert_eq!(attributes.local_preference, Some(250));
        for bad in ["64500", "65536:1", "1:x", "no-such"] {
            let error = RouteAttributes::parse(&[bad.into()], None, None, None).unwrap_err();
            assert!(error.contains(bad), "{error}");
        }
    }

    #[test]
    fn cluster_policy_announces_every_address_with_a_backend_once() {
        let mut desired = DesiredState::default();
        let remote = || vec![backend("10.42.1.5", false, false)];
        desired
            .frontends
            .insert(frontend("192.0.2.10", 80), spec(false, remote()));
        desired
            .frontends
            .insert(frontend("192.0.2.10", 443), spec(false, remote()));
        desired
            .frontends
            .insert(frontend("2001:db8::10", 80), spec(false, remote()));
        desired
            .frontends
            .insert(frontend("192.0.2.11", 80), spec(false, Vec::new()));
        assert_eq!(addresses(&desired), ["192.0.2.10", "2001:db8::10"]);
    }

    #[test]
    fn local_policy_announces_only_with_a_ready_local_backend() {
        let mut desired = DesiredState::default();
        desired.frontends.insert(
            frontend("192.0.2.20", 80),
            spec(true, vec![backend("10.42.0.5", true, false)]),
        );
        // Only a terminating local endpoint left: withdraw.
        desired.frontends.insert(
            frontend("192.0.2.21", 80),
            spec(true, vec![backend("10.42.0.6", true, true)]),
        );
        desired
            .frontends
            .insert(frontend("192.0.2.22", 80), spec(true, Vec::new()));
        // One port of an address is enough to attract its traffic.
        desired.frontends.insert(
            frontend("192.0.2.23", 80),
            spec(true, vec![backend("10.42.0.7", true, false)]),
        );
        desired
            .frontends
            .insert(frontend("192.0.2.23", 81), spec(true, Vec::new()));
        assert_eq!(addresses(&desired), ["192.0.2.20", "192.0.2.23"]);
    }

    /// A sync of a few frontends updates the routes as a walk over every
    /// frontend would, and the generation moves only when they moved.
    #[test]
    fn incremental_updates_equal_a_complete_walk_and_move_the_generation_only_with_the_routes() {
        let remote = || vec![backend("10.42.1.5", false, false)];
        let mut desired = DesiredState::default();
        let a80 = frontend("192.0.2.10", 80);
        let a81 = frontend("192.0.2.10", 81);
        let b80 = frontend("192.0.2.11", 80);
        let c80 = frontend("192.0.2.12", 80);
        desired.frontends.insert(a80, spec(false, remote()));
        desired.frontends.insert(a81, spec(false, remote()));
        desired.frontends.insert(b80, spec(false, Vec::new()));
        desired.frontends.insert(c80, spec(false, remote()));
        let node = (Some("10.0.0.1".parse().unwrap()), None);
        // c80's writes failed: not programmed, not announced.
        let programmed = |f: &Frontend| *f != c80;
        let mut announcing = Announcing::default();
        announcing.update(&desired, None, node, programmed);
        let check = |announcing: &Announcing,
                     desired: &DesiredState,
                     node: (Option<Ipv4Addr>, Option<Ipv6Addr>)| {
            let expected = Routes {
                node_v4: node.0,
                node_v6: node.1,
                ..routes(desired, programmed)
            };
            assert_eq!(announcing.routes(), expected);
        };
        check(&announcing, &desired, node);
        assert_eq!(
            announcing.routes().addresses,
            BTreeSet::from(["192.0.2.10".parse().unwrap()])
        );
        let mut generation = announcing.generation();
        let mut sync = |announcing: &mut Announcing,
                        desired: &DesiredState,
                        changed: &[Frontend],
                        moves: bool,
                        node| {
            announcing.update(
                desired,
                Some(&changed.iter().copied().collect()),
                node,
                programmed,
            );
            check(announcing, desired, node);
            assert_eq!(announcing.generation() != generation, moves, "{changed:?}");
            generation = announcing.generation();
        };
        // An endpoint change that moves no route.
        desired
            .frontends
            .get_mut(&a80)
            .unwrap()
            .backends
            .push(backend("10.42.1.6", false, false));
        sync(&mut announcing, &desired, &[a80], false, node);
        // One of the address's two frontends loses its backends: it stays.
        desired.frontends.get_mut(&a80).unwrap().backends.clear();
        sync(&mut announcing, &desired, &[a80], false, node);
        // The other one goes: the address goes.
        desired.frontends.remove(&a81);
        sync(&mut announcing, &desired, &[a81], true, node);
        // Another address gets a backend.
        desired.frontends.get_mut(&b80).unwrap().backends = remote();
        sync(&mut announcing, &desired, &[b80], true, node);
        // The node's address (the next hop) changes.
        sync(
            &mut announcing,
            &desired,
            &[],
            true,
            (Some("10.0.0.2".parse().unwrap()), None),
        );
        // A complete sync always moves it (pools' attributes).
        let before = announcing.generation();
        announcing.update(
            &desired,
            None,
            (Some("10.0.0.2".parse().unwrap()), None),
            programmed,
        );
        assert_ne!(announcing.generation(), before);
        assert_eq!(announcing.routes().addresses.len(), 1);
    }
}
