//! The vocabulary of the Kubernetes objects the translation reads: which
//! Service an object names, in which order Services claim what they share,
//! and the few fields whose defaults the API defines. A leaf: every other
//! translation module builds on it, and it imports none of them.

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, ObjectReference, Service, ServicePort},
        discovery::v1::{Endpoint, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use kube::runtime::reflector::ObjectRef;

use crate::{
    model::{Network, Protocol},
    pools::AddressPool,
};

/// Label by which an EndpointSlice names the Service it belongs to.
/// The annotation K3s (and kube-proxy, for Services without the field)
/// reads source ranges from: comma-separated CIDRs. The field
/// `spec.loadBalancerSourceRanges` wins when it is set.
pub const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The class a Service may carry to be handled by xlb, besides none.
pub const DEFAULT_LB_CLASS: &str = "xlb.dev/xlb";

/// The objects a source knows about, in the order it read them.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
    /// Pool mode's `AddressPool`s, and the Namespaces whose labels their
    /// scopes may select.
    pub pools: Vec<AddressPool>,
    pub namespaces: Vec<Namespace>,
}

impl Objects {
    /// Moves every object of `other` to the end of `self`.
    pub fn append(&mut self, mut other: Objects) {
        self.services.append(&mut other.services);
        self.endpoint_slices.append(&mut other.endpoint_slices);
        self.nodes.append(&mut other.nodes);
        self.pools.append(&mut other.pools);
        self.namespaces.append(&mut other.namespaces);
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.endpoint_slices.is_empty()
            && self.nodes.is_empty()
            && self.pools.is_empty()
            && self.namespaces.is_empty()
    }

    /// Keeps the Services xlb handles ([`handles_class`]). Services of other
    /// classes are never touched.
    pub fn retain_classes(&mut self, classes: &[String]) {
        self.services
            .retain(|service| handles_class(service, classes));
    }
}

/// Which Service: `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ServiceKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of `service`, in `default` when it names no namespace.
    pub fn of(service: &Service) -> Self {
        ServiceKey::new(
            namespace_of(&service.metadata),
            service.metadata.name.clone().unwrap_or_default(),
        )
    }

    /// The Service in a reflector store.
    pub fn object_ref(&self) -> ObjectRef<Service> {
        ObjectRef::new(&self.name).within(&self.namespace)
    }

    /// A reference an Event can point at, for a Service known only by name.
    pub fn object_reference(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            namespace: Some(self.namespace.clone()),
            name: Some(self.name.clone()),
            ..ObjectReference::default()
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The order in which Services claim what they share (a frontend, a node
/// port): the one created first, then the one whose `namespace/name` sorts
/// first. Objects without a creation time (manifest files) come first.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Order {
    pub created: Option<Time>,
    pub key: ServiceKey,
}

impl Order {
    pub fn of(service: &Service) -> Self {
        Order {
            created: service.metadata.creation_timestamp.clone(),
            key: ServiceKey::of(service),
        }
    }
}

/// Services in [`Order`]. Stable: of two definitions of one Service, the
/// first read comes first.
pub fn claim_order<'a>(services: impl IntoIterator<Item = &'a Service>) -> Vec<&'a Service> {
    let mut services: Vec<&Service> = services.into_iter().collect();
    services.sort_by_cached_key(|service| Order::of(service));
    services
}

/// Where objects without a namespace are, as the API server and `kubectl
/// apply` would place them.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The namespace of an object, [`DEFAULT_NAMESPACE`] when it names none.
pub fn namespace_of(metadata: &ObjectMeta) -> &str {
    metadata.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
}

/// A Service port's protocol, TCP when unset; `None` for protocols xlb does
/// not handle (SCTP).
pub fn port_protocol(port: &ServicePort) -> Option<Protocol> {
    match port.protocol.as_deref() {
        None | Some("TCP") => Some(Protocol::Tcp),
        Some("UDP") => Some(Protocol::Udp),
        Some(_) => None,
    }
}

/// A port number in 1-65535.
pub fn port_number(number: i32) -> Option<u16> {
    u16::try_from(number).ok().filter(|&number| number != 0)
}

/// The Service an EndpointSlice belongs to, from its
/// `kubernetes.io/service-name` label.
pub fn slice_service(slice: &EndpointSlice) -> Option<ServiceKey> {
    let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some(ServiceKey::new(namespace_of(&slice.metadata), service))
}

/// An endpoint's `ready` condition; nil means ready, as the API defines it.
pub fn endpoint_ready(endpoint: &Endpoint) -> bool {
    endpoint
        .conditions
        .as_ref()
        .and_then(|conditions| conditions.ready)
        .unwrap_or(true)
}

/// The first IPv4 `InternalIP` of the Node named `node_name`: the address
/// remote-backend flows are source-translated to.
pub fn node_address_of(nodes: &[Node], node_name: &str) -> Option<Ipv4Addr> {
    first_internal_ip(nodes, node_name)
}

/// The first IPv6 `InternalIP` of the Node named `node_name`: the address
/// IPv6 remote-backend flows are source-translated to.
pub fn node_address_v6_of(nodes: &[Node], node_name: &str) -> Option<Ipv6Addr> {
    first_internal_ip(nodes, node_name)
}

/// The first `InternalIP` that parses as `A` (an address of one family:
/// the other family's text does not parse).
fn first_internal_ip<A: FromStr>(nodes: &[Node], node_name: &str) -> Option<A> {
    nodes
        .iter()
        .find(|node| node.metadata.name.as_deref() == Some(node_name))?
        .status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|address| address.type_ == "InternalIP")
        .find_map(|address| address.address.parse::<A>().ok())
}

/// The networks the Nodes name: every Node's pod CIDRs and its addresses
/// (one host each), both families. Unparsable entries are skipped: they
/// name nothing a packet could be sent to.
pub fn cluster_networks(nodes: &[Node]) -> BTreeSet<Network> {
    let mut found = BTreeSet::new();
    for node in nodes {
        let pod_cidrs = node
            .spec
            .iter()
            .flat_map(|spec| spec.pod_cidrs.iter().flatten().chain(spec.pod_cidr.iter()));
        found.extend(
            pod_cidrs
                .filter_map(|cidr| cidr.trim().parse::<ipnet::IpNet>().ok())
                .map(Network::from),
        );
        let addresses = node
            .status
            .iter()
            .flat_map(|status| status.addresses.iter().flatten());
        found.extend(
            addresses
                .filter(|address| matches!(address.type_.as_str(), "InternalIP" | "ExternalIP"))
                .filter_map(|address| address.address.parse::<IpAddr>().ok())
                .map(|addr| Network::from(ipnet::IpNet::from(addr))),
        );
    }
    found
}

/// A node's `InternalIP` and `ExternalIP` addresses of both families, in
/// that order (the Node's own order within each type).
pub fn node_addresses(node: &Node) -> Vec<IpAddr> {
    let mut found = Vec::new();
    for kind in ["InternalIP", "ExternalIP"] {
        for address in node
            .status
            .iter()
            .flat_map(|status| status.addresses.iter().flatten())
            .filter(|address| address.type_ == kind)
        {
            if let Ok(ip) = address.address.parse::<IpAddr>()
                && !found.contains(&ip)
            {
                found.push(ip);
            }
        }
    }
    found
}

/// Whether xlb handles `service`: no `spec.loadBalancerClass`, or one of
/// `classes`.
pub fn handles_class(service: &Service, classes: &[String]) -> bool {
    match service
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_class.as_deref())
    {
        None => true,
        Some(class) => classes.iter().any(|c| c == class),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, class: Option<&str>) -> Service {
        let mut s = Service::default();
        s.metadata.name = Some(name.into());
        s.spec = Some(k8s_openapi::api::core::v1::ServiceSpec {
            load_balancer_class: class.map(str::to_string),
            ..Default::default()
        });
        s
    }

    #[test]
    fn other_classes_are_left_alone() {
        let mut objects = Objects {
            services: vec![
                service("plain", None),
                service("ours", Some(DEFAULT_LB_CLASS)),
                service("metallb", Some("metallb.io/metallb")),
            ],
            ..Objects::default()
        };
        objects.retain_classes(&[DEFAULT_LB_CLASS.to_string()]);
        let names: Vec<_> = objects
            .services
            .iter()
            .map(|s| s.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["plain", "ours"]);
    }
}
