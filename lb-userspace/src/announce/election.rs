//! Which node announces an address on L2 (pure: no kernel, no API).
//!
//! Every agent computes the same answer from the same inputs without
//! talking to the others: the eligible nodes for an address, then one of
//! them by rendezvous hashing (highest random weight: each node scores
//! `hash(address, node)`, the highest wins). Unlike "hash mod the sorted
//! set", a node leaving or joining moves only the addresses it wins or
//! held, not a share of every other node's.
//!
//! Eligible, for an address (issue 12): the node runs xlb and is alive
//! (its per-node Lease is fresh), its Node is Ready, it does not carry
//! `node.kubernetes.io/exclude-from-external-load-balancers`, it matches
//! the announcement settings' node selector, and for a Service with
//! `externalTrafficPolicy: Local`, it has a ready endpoint of that Service.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use kube::core::{Selector, SelectorExt};

/// The label that keeps a node out of every external load balancer
/// (Kubernetes well-known label; kube-proxy and cloud providers honour it).
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// How an address is announced on L2: the settings of the address pool it
/// comes from (`AddressPool.spec.l2`), or the defaults for addresses from
/// elsewhere (`status.loadBalancer.ingress` in status mode).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct L2Settings {
    /// Nodes that may announce (the pool's `spec.l2.nodeSelector`, labels
    /// and expressions). None: every node.
    pub node_selector: Option<Selector>,
    /// Interfaces the address is announced on, by name. Empty: every
    /// uplink (`--iface`). Names that are not uplinks are ignored: the
    /// responder runs only where the datapath is attached.
    pub interfaces: Vec<String>,
}

impl L2Settings {
    /// Does `labels` satisfy the node selector?
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.node_selector
            .as_ref()
            .is_none_or(|selector| selector.matches(labels))
    }

    /// The uplinks among `uplinks` the address is announced on.
    pub fn interfaces_among<'a>(&'a self, uplinks: &'a [String]) -> Vec<&'a str> {
        uplinks
            .iter()
            .filter(|u| self.interfaces.is_empty() || self.interfaces.contains(u))
            .map(String::as_str)
            .collect()
    }
}

/// What the election knows of a node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeState {
    pub labels: BTreeMap<String, String>,
    /// The Node's `Ready` condition is `True`.
    pub ready: bool,
    /// Its agent's Lease is fresh.
    pub alive: bool,
}

impl NodeState {
    fn may_announce(&self, settings: &L2Settings) -> bool {
        self.alive
            && self.ready
            && !self.labels.contains_key(EXCLUDE_LABEL)
            && settings.selects(&self.labels)
    }
}

/// One address to announce and what restricts who may.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressClaim {
    pub addr: IpAddr,
    pub settings: L2Settings,
    /// `Some` for `externalTrafficPolicy: Local`: the nodes with a ready
    /// endpoint of the Service (any of them, for any of its ports).
    pub local_nodes: Option<BTreeSet<String>>,
}

/// The nodes that may announce `claim`, sorted by name.
pub fn eligible<'a>(claim: &AddressClaim, nodes: &'a BTreeMap<String, NodeState>) -> Vec<&'a str> {
    nodes
        .iter()
        .filter(|(name, node)| {
            node.may_announce(&claim.settings)
                && claim
                    .local_nodes
                    .as_ref()
                    .is_none_or(|local| local.contains(name.as_str()))
        })
        .map(|(name, _)| name.as_str())
        .collect()
}

/// The node that announces `addr` among `eligible`: the highest
/// rendezvous score, ties (a 64-bit collision) to the smaller name.
/// `None` when nobody is eligible.
pub fn announcer<'a>(addr: IpAddr, eligible: &[&'a str]) -> Option<&'a str> {
    eligible
        .iter()
        .map(|node| (score(addr, node), std::cmp::Reverse(*node)))
        .max()
        .map(|(_, std::cmp::Reverse(node))| node)
}

/// The announcer of every claim (absent: nobody eligible).
pub fn elect(
    claims: &[AddressClaim],
    nodes: &BTreeMap<String, NodeState>,
) -> BTreeMap<IpAddr, String> {
    claims
        .iter()
        .filter_map(|claim| {
            let candidates = eligible(claim, nodes);
            announcer(claim.addr, &candidates).map(|node| (claim.addr, node.to_string()))
        })
        .collect()
}

/// FNV-1a 64 of the address bytes (4 or 16) and the node name, finished
/// with a 64-bit mixer so that near-identical inputs spread. Fixed here,
/// not `std`'s `DefaultHasher` (whose algorithm may change between Rust
/// releases): agents of one version must agree, and should across
/// versions during a rolling upgrade.
fn score(addr: IpAddr, node: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    let octets: Vec<u8> = match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    for b in octets.iter().chain([0xffu8].iter()).chain(node.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(PRIME);
    }
    // splitmix64's finaliser.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn node(ready: bool, alive: bool, labels: &[(&str, &str)]) -> NodeState {
        NodeState {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ready,
            alive,
        }
    }

    fn claim(addr: IpAddr) -> AddressClaim {
        AddressClaim {
            addr,
            settings: L2Settings::default(),
            local_nodes: None,
        }
    }

    fn cluster(n: usize) -> BTreeMap<String, NodeState> {
        (0..n)
            .map(|i| (format!("node-{i}"), node(true, true, &[])))
            .collect()
    }

    #[test]
    fn the_announcer_does_not_depend_on_the_order_nodes_are_listed_in() {
        let a = IpAddr::V4(Ipv4Addr::new(10, 200, 0, 10));
        let forward = ["n1", "n2", "n3", "n4"];
        let mut backward = forward;
        backward.reverse();
        assert_eq!(announcer(a, &forward), announcer(a, &backward));
        assert_eq!(announcer(a, &[]), None);
        assert_eq!(announcer(a, &["only"]), Some("only"));
    }

    #[test]
    fn addresses_spread_over_the_nodes() {
        let nodes = cluster(4);
        let claims: Vec<AddressClaim> = (0..400u32)
            .map(|i| claim(IpAddr::V4(Ipv4Addr::from(0x0ac8_0000 + i))))
            .collect();
        let elected = elect(&claims, &nodes);
        assert_eq!(elected.len(), 400);
        let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
        for node in elected.values() {
            *per_node.entry(node).or_default() += 1;
        }
        assert_eq!(per_node.len(), 4, "{per_node:?}");
        assert!(per_node.values().all(|&n| n > 60), "{per_node:?}");
    }

    #[test]
    fn a_node_leaving_moves_only_its_own_addresses() {
        let mut nodes = cluster(5);
        let claims: Vec<AddressClaim> = (0..300u32)
            .map(|i| {
                claim(IpAddr::V6(Ipv6Addr::from(
                    0xfd00_0200_u128 << 96 | i as u128,
                )))
            })
            .collect();
        let before = elect(&claims, &nodes);
        nodes.get_mut("node-2").unwrap().alive = false;
        let after = elect(&claims, &nodes);
        for (addr, was) in &before {
            if was != "node-2" {
                assert_eq!(&after[addr], was, "{addr} moved though its node stayed");
            } else {
                assert_ne!(after[addr], "node-2");
            }
        }
    }

    #[test]
    fn only_live_ready_selected_unexcluded_nodes_are_eligible() {
        let mut nodes = BTreeMap::new();
        nodes.insert("dead".to_string(), node(true, false, &[("zone", "a")]));
        nodes.insert("unready".to_string(), node(false, true, &[("zone", "a")]));
        nodes.insert(
            "excluded".to_string(),
            node(true, true, &[("zone", "a"), (EXCLUDE_LABEL, "")]),
        );
        nodes.insert("other-zone".to_string(), node(true, true, &[("zone", "b")]));
        nodes.insert("good".to_string(), node(true, true, &[("zone", "a")]));
        nodes.insert("good-2".to_string(), node(true, true, &[("zone", "a")]));
        let mut c = claim(IpAddr::V4(Ipv4Addr::new(10, 200, 0, 1)));
        assert_eq!(
            eligible(&c, &nodes),
            ["good", "good-2", "other-zone"],
            "no selector: every live, ready, unexcluded node"
        );
        c.settings.node_selector = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                match_labels: Some([("zone".to_string(), "a".to_string())].into()),
                ..Default::default()
            }
            .try_into()
            .unwrap(),
        );
        assert_eq!(eligible(&c, &nodes), ["good", "good-2"]);
        // Expressions too.
        c.settings.node_selector = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                match_expressions: Some(vec![
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                        key: "zone".into(),
                        operator: "NotIn".into(),
                        values: Some(vec!["a".into()]),
                    },
                ]),
                ..Default::default()
            }
            .try_into()
            .unwrap(),
        );
        assert_eq!(eligible(&c, &nodes), ["other-zone"]);
        c.settings.node_selector = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                match_labels: Some([("zone".to_string(), "a".to_string())].into()),
                ..Default::default()
            }
            .try_into()
            .unwrap(),
        );
        c.local_nodes = Some(["good-2".to_string(), "dead".to_string()].into());
        assert_eq!(eligible(&c, &nodes), ["good-2"], "Local: endpoint nodes");
        c.local_nodes = Some(BTreeSet::new());
        assert_eq!(elect(&[c], &nodes), BTreeMap::new(), "no endpoint: nobody");
    }

    #[test]
    fn interfaces_default_to_every_uplink_and_ignore_names_that_are_not_uplinks() {
        let uplinks = vec!["eth0".to_string(), "eth1".to_string()];
        let mut s = L2Settings::default();
        assert_eq!(s.interfaces_among(&uplinks), ["eth0", "eth1"]);
        s.interfaces = vec!["eth1".into(), "bond9".into()];
        assert_eq!(s.interfaces_among(&uplinks), ["eth1"]);
    }
}
