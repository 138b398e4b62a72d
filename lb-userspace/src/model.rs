//! The desired state of the node's datapath, as every source (manifest
//! directory, Kubernetes API) produces it: pure data, no aya, no kube. The
//! reconciler diffs two of these and writes only what changed.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// Transport protocol of a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            lb_common::PROTO_TCP => Some(Protocol::Tcp),
            lb_common::PROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// What a client reaches: address, port, protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.protocol),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.protocol),
        }
    }
}

/// The Kubernetes object a frontend comes from: `namespace/name` and the
/// Service port's name (empty when unnamed).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port_name.is_empty() {
            write!(f, "{}/{}", self.namespace, self.name)
        } else {
            write!(f, "{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }
}

/// One eligible backend of a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
    /// On this node (EndpointSlice `nodeName` equals the agent's node).
    pub local: bool,
    /// Chosen although terminating, because no endpoint was ready.
    pub terminating: bool,
}

/// A CIDR of `loadBalancerSourceRanges`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct SourceRange {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl fmt::Display for SourceRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// One of the cluster's own networks (a Node's pod CIDR or address,
/// `--cluster-cidr`), host bits clear.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Network {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl From<ipnet::IpNet> for Network {
    fn from(network: ipnet::IpNet) -> Self {
        let network = network.trunc();
        Network {
            addr: network.network(),
            prefix_len: network.prefix_len(),
        }
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Everything the datapath needs for one frontend.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FrontendSpec {
    pub service: ServiceRef,
    /// Sorted, without duplicates. With `local_only`, only local backends.
    pub backends: Vec<Backend>,
    /// `externalTrafficPolicy: Local`.
    pub local_only: bool,
    /// `sessionAffinity: ClientIP` timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// Sorted; empty means every source is allowed.
    pub source_ranges: Vec<SourceRange>,
}

/// The whole desired datapath of a node.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DesiredState {
    pub frontends: BTreeMap<Frontend, FrontendSpec>,
    /// Address remote-backend flows are source-translated to: the Node's
    /// InternalIP when known (else the agent uses the uplink's first IPv4).
    pub node_addr: Option<Ipv4Addr>,
    /// The same for IPv6 flows: the Node's IPv6 InternalIP when known (else
    /// the agent uses the uplink's first global IPv6 address).
    pub node_addr_v6: Option<Ipv6Addr>,
    /// The cluster's networks the Node objects name (their pod CIDRs and
    /// addresses): a node-local backend's packets to them are never
    /// taken for replies of lost flows.
    pub cluster_networks: BTreeSet<Network>,
}
