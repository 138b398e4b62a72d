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

/// The addresses to announce: every frontend address with a backend to
/// send its traffic to, and that is `programmed` in this node's maps (one
/// whose writes failed would be passed to the kernel, which has no route
/// for it). With `externalTrafficPolicy: Local` that must be a ready
/// backend on this node: a node without one would drop the traffic, so it
/// must not attract it (the route moves with the endpoint). A terminating
/// backend, kept only because nothing else is left, does not count.
pub fn routes(desired: &DesiredState, programmed: impl Fn(&Frontend) -> bool) -> Routes {
    let mut addresses = BTreeSet::new();
    for (frontend, spec) in &desired.frontends {
        let serves = if spec.local_only {
            spec.backends.iter().any(|b| b.local && !b.terminating)
        } else {
            !spec.backends.is_empty()
        };
        if serves && programmed(frontend) {
            addresses.insert(frontend.addr);
        }
    }
    Routes {
        addresses,
        node_v4: desired.node_addr,
        node_v6: desired.node_addr_v6,
        attributes: BTreeMap::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, FrontendSpec, Protocol, ServiceRef};

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
}
