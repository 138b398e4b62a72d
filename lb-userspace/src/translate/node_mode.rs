//! `--address-mode node`, K3s ServiceLB's model: a LoadBalancer Service is
//! reached at the addresses of the nodes that run xlb, on its own ports.
//!
//! - Which nodes: those labelled `xlb.dev/enabled=true` when any node carries
//!   that label, else all; never those labelled
//!   `node.kubernetes.io/exclude-from-external-load-balancers` (the upstream
//!   label every load-balancer controller honours) or being deleted.
//! - Which addresses: each such node's `InternalIP` and `ExternalIP` of the
//!   Service's families (`spec.ipFamilies`), written to
//!   `status.loadBalancer.ingress` family by family in the order of
//!   `spec.ipFamilies`, as K3s ServiceLB does.
//! - Every agent programs its own node's addresses; the leader (see
//!   `crate::kubernetes::lease`) writes the addresses of the nodes that are Ready into
//!   `status.loadBalancer.ingress`, only those with a ready local endpoint
//!   for `externalTrafficPolicy: Local`, since the others drop the traffic.
//! - All Services share the node addresses, so two of them asking for the
//!   same port and protocol in the same family conflict (an IPv4-only and an
//!   IPv6-only Service may both have port 80): the one created first keeps it, the
//!   later one stays pending (no frontend anywhere, empty status) with an
//!   Event naming the Service that holds the port, until that one lets go.
//!
//! Every agent computes the same allocation from the same objects, so they
//! agree on who is pending without talking to each other.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

use super::{
    families::{Families, Family, service_families},
    objects::{
        ServiceKey, claim_order, endpoint_ready, node_addresses, port_number, port_protocol,
        slice_service,
    },
};
use crate::model::Protocol;

/// Nodes with this label set to `true`, if any node has it, are the only
/// ones that serve node-mode Services.
pub const ENABLED_LABEL: &str = "xlb.dev/enabled";
/// Upstream label: nodes carrying it are never load-balancer targets.
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// A Service left pending because an earlier one holds one of its ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub family: Family,
    pub port: u16,
    pub protocol: Protocol,
    /// The Service that holds the port.
    pub holder: ServiceKey,
}

impl Conflict {
    /// The text of the Event on the pending Service.
    pub fn message(&self) -> String {
        format!(
            "port {}/{} on the node {} addresses is already used by Service {}, which was \
             created earlier; this Service stays pending (no address) until that port is free",
            self.port, self.protocol, self.family, self.holder
        )
    }
}

/// What node mode decides for this node: the addresses it serves, and
/// which Services are pending.
#[derive(Clone, Debug)]
pub struct NodePlan {
    /// Both families; each Service uses those of its own families.
    pub addresses: Vec<IpAddr>,
    pub allocation: Allocation,
}

impl NodePlan {
    pub fn new<'a>(
        nodes: &[Node],
        node_name: &str,
        services: impl IntoIterator<Item = &'a Service>,
    ) -> Self {
        NodePlan {
            addresses: own_addresses(nodes, node_name),
            allocation: allocate(services),
        }
    }
}

/// Which node-mode Services are pending, and why.
#[derive(Clone, Debug, Default)]
pub struct Allocation {
    pub pending: BTreeMap<ServiceKey, Conflict>,
}

/// Assigns ports to the LoadBalancer Services of `services` in claim
/// order ([`super::objects::Order`]).
pub fn allocate<'a>(services: impl IntoIterator<Item = &'a Service>) -> Allocation {
    let mut held: BTreeMap<(Family, u16, Protocol), ServiceKey> = BTreeMap::new();
    let mut allocation = Allocation::default();
    for service in claim_order(services) {
        if !is_load_balancer(service) {
            continue;
        }
        let key = ServiceKey::of(service);
        let claims = port_claims(service);
        let conflict = claims.iter().find_map(|claim| {
            held.get(claim).map(|holder| Conflict {
                family: claim.0,
                port: claim.1,
                protocol: claim.2,
                holder: holder.clone(),
            })
        });
        match conflict {
            Some(conflict) => {
                allocation.pending.insert(key, conflict);
            }
            None => {
                for claim in claims {
                    held.insert(claim, key.clone());
                }
            }
        }
    }
    allocation
}

/// The addresses this node serves node-mode Services at: empty when the
/// node is not one of the [`eligible`] ones (or is unknown).
pub fn own_addresses(nodes: &[Node], node_name: &str) -> Vec<IpAddr> {
    eligible(nodes)
        .into_iter()
        .find(|node| node.metadata.name.as_deref() == Some(node_name))
        .map(node_addresses)
        .unwrap_or_default()
}

/// The nodes that serve node-mode Services.
pub fn eligible(nodes: &[Node]) -> Vec<&Node> {
    fn labelled<'n>(node: &'n Node, label: &str) -> Option<&'n str> {
        node.metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(label))
            .map(String::as_str)
    }
    let opt_in = nodes
        .iter()
        .any(|node| labelled(node, ENABLED_LABEL) == Some("true"));
    nodes
        .iter()
        .filter(|node| !opt_in || labelled(node, ENABLED_LABEL) == Some("true"))
        .filter(|node| labelled(node, EXCLUDE_LABEL).is_none())
        .filter(|node| node.metadata.deletion_timestamp.is_none())
        .collect()
}

/// A node whose `Ready` condition is `False` or `Unknown` (the node
/// controller's verdict on an unreachable kubelet) is not advertised.
pub fn is_ready(node: &Node) -> bool {
    !node
        .status
        .iter()
        .flat_map(|status| status.conditions.iter().flatten())
        .any(|condition| condition.type_ == "Ready" && condition.status != "True")
}

/// What the leader writes into `status.loadBalancer.ingress` of every
/// LoadBalancer Service in `objects` (already filtered to the classes xlb
/// handles): the addresses of the eligible, Ready nodes (with a ready local
/// endpoint for `Local`) of the Service's families, in [`ingress_order`];
/// nothing for pending Services.
pub fn desired_ingress(
    services: &[&Service],
    endpoint_slices: &[&EndpointSlice],
    nodes: &[Node],
) -> BTreeMap<ServiceKey, Vec<IpAddr>> {
    let allocation = allocate(services.iter().copied());
    let serving: Vec<&Node> = eligible(nodes)
        .into_iter()
        .filter(|node| is_ready(node))
        .collect();
    let all: BTreeSet<IpAddr> = serving
        .iter()
        .flat_map(|node| node_addresses(node))
        .collect();
    let mut ready_nodes: BTreeMap<ServiceKey, BTreeSet<&str>> = BTreeMap::new();
    for slice in endpoint_slices {
        let Some(key) = slice_service(slice) else {
            continue;
        };
        for endpoint in slice.endpoints.iter().flatten() {
            if let (true, Some(node)) = (endpoint_ready(endpoint), endpoint.node_name.as_deref()) {
                ready_nodes.entry(key.clone()).or_default().insert(node);
            }
        }
    }

    let mut desired = BTreeMap::new();
    for &service in services {
        if !is_load_balancer(service) {
            continue;
        }
        let key = ServiceKey::of(service);
        let ingress = if allocation.pending.contains_key(&key) {
            Vec::new()
        } else if is_local(service) {
            let with_endpoints = ready_nodes.get(&key);
            let local: BTreeSet<IpAddr> = serving
                .iter()
                .filter(|node| {
                    with_endpoints.is_some_and(|names| {
                        node.metadata
                            .name
                            .as_deref()
                            .is_some_and(|name| names.contains(name))
                    })
                })
                .flat_map(|node| node_addresses(node))
                .collect();
            local.into_iter().collect()
        } else {
            all.iter().copied().collect()
        };
        let families = families_of(service);
        let ingress = ingress_order(
            &families,
            ingress
                .into_iter()
                .filter(|addr| families.contains(Family::of(*addr))),
        );
        desired.insert(key, ingress);
    }
    desired
}

/// The addresses `status.loadBalancer.ingress` holds now, in
/// [`ingress_order`]; `None` when it holds anything else (a hostname, text
/// that is no address), which the leader replaces.
pub fn current_ingress(service: &Service) -> Option<Vec<IpAddr>> {
    let mut found = Vec::new();
    for ingress in service
        .status
        .iter()
        .filter_map(|status| status.load_balancer.as_ref())
        .flat_map(|lb| lb.ingress.iter().flatten())
    {
        if ingress.hostname.is_some() {
            return None;
        }
        found.push(ingress.ip.as_deref()?.parse::<IpAddr>().ok()?);
    }
    Some(ingress_order(&families_of(service), found))
}

/// The order of `status.loadBalancer.ingress`: family by family as
/// `spec.ipFamilies` lists them (K3s ServiceLB's order, which clients that
/// take the first address rely on), sorted within a family, no duplicates.
pub fn ingress_order(
    families: &Families,
    addresses: impl IntoIterator<Item = IpAddr>,
) -> Vec<IpAddr> {
    let mut ordered: Vec<IpAddr> = addresses.into_iter().collect();
    ordered.sort_by_key(|addr| (families.rank(Family::of(*addr)), *addr));
    ordered.dedup();
    ordered
}

fn families_of(service: &Service) -> Families {
    service
        .spec
        .as_ref()
        .map(service_families)
        .unwrap_or_else(|| service_families(&Default::default()))
}

fn is_load_balancer(service: &Service) -> bool {
    service.metadata.name.is_some()
        && service
            .spec
            .as_ref()
            .is_some_and(|spec| spec.type_.as_deref() == Some("LoadBalancer"))
}

fn is_local(service: &Service) -> bool {
    service
        .spec
        .as_ref()
        .and_then(|spec| spec.external_traffic_policy.as_deref())
        == Some("Local")
}

/// The (family, port, protocol) triples a Service asks for, one per port
/// and family of the Service; ports the translation rejects (bad number or
/// protocol) claim nothing.
fn port_claims(service: &Service) -> Vec<(Family, u16, Protocol)> {
    let families = families_of(service);
    let mut claims: Vec<(Family, u16, Protocol)> = service
        .spec
        .iter()
        .flat_map(|spec| spec.ports.iter().flatten())
        .filter_map(|port| Some((port_number(port.port)?, port_protocol(port)?)))
        .flat_map(|(port, protocol)| {
            families
                .list
                .iter()
                .map(move |family| (*family, port, protocol))
        })
        .collect();
    claims.sort();
    claims.dedup();
    claims
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn service(name: &str, created: &str, ports: &[(i32, &str)]) -> Service {
        let ports: Vec<_> = ports
            .iter()
            .map(|(port, protocol)| json!({"port": port, "protocol": protocol}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default", "creationTimestamp": created},
            "spec": {"type": "LoadBalancer", "ports": ports}
        }))
        .unwrap()
    }

    fn node(name: &str, labels: serde_json::Value, addresses: &[(&str, &str)]) -> Node {
        let addresses: Vec<_> = addresses
            .iter()
            .map(|(kind, ip)| json!({"type": kind, "address": ip}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "status": {"addresses": addresses}
        }))
        .unwrap()
    }

    #[test]
    fn the_later_service_on_a_port_is_pending_whatever_its_name() {
        let services = vec![
            service("zz-old", "2026-01-01T00:00:00Z", &[(80, "TCP")]),
            service(
                "aa-new",
                "2026-02-01T00:00:00Z",
                &[(443, "TCP"), (80, "TCP")],
            ),
            // Same number, other protocol: no conflict.
            service("dns", "2026-03-01T00:00:00Z", &[(80, "UDP")]),
        ];
        let allocation = allocate(&services);
        assert_eq!(allocation.pending.len(), 1, "{allocation:?}");
        let conflict = &allocation.pending[&ServiceKey::new("default", "aa-new")];
        assert_eq!(conflict.port, 80);
        assert_eq!(conflict.holder, ServiceKey::new("default", "zz-old"));
        assert!(conflict.message().contains("default/zz-old"));

        // The pending one claims nothing: its 443 stays free for others.
        let mut more = services.clone();
        more.push(service("tls", "2026-04-01T00:00:00Z", &[(443, "TCP")]));
        assert_eq!(allocate(&more).pending.len(), 1);

        // The holder goes away: the pending one gets its ports.
        assert!(allocate(&services[1..]).pending.is_empty());
    }

    #[test]
    fn the_enabled_label_narrows_and_the_exclude_label_removes() {
        let nodes = vec![
            node("a", json!({}), &[("InternalIP", "10.0.0.1")]),
            node(
                "b",
                json!({}),
                &[
                    ("InternalIP", "10.0.0.2"),
                    ("ExternalIP", "203.0.113.2"),
                    ("InternalIP", "fd00::2"),
                    ("Hostname", "b"),
                ],
            ),
            node(
                "c",
                json!({EXCLUDE_LABEL: ""}),
                &[("InternalIP", "10.0.0.3")],
            ),
        ];
        let names = |nodes: Vec<&Node>| -> Vec<String> {
            nodes
                .iter()
                .map(|n| n.metadata.name.clone().unwrap())
                .collect()
        };
        assert_eq!(names(eligible(&nodes)), ["a", "b"]);
        // Both families: each Service takes those of its own.
        assert_eq!(
            own_addresses(&nodes, "b"),
            [
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "fd00::2".parse().unwrap(),
                "203.0.113.2".parse().unwrap()
            ]
        );
        assert!(own_addresses(&nodes, "c").is_empty());

        let mut labelled = nodes.clone();
        labelled[1].metadata.labels = Some([(ENABLED_LABEL.into(), "true".into())].into());
        assert_eq!(names(eligible(&labelled)), ["b"]);
        assert!(own_addresses(&labelled, "a").is_empty());
    }

    #[test]
    fn ingress_lists_ready_nodes_and_for_local_only_those_with_endpoints() {
        let mut nodes = vec![
            node("a", json!({}), &[("InternalIP", "10.0.0.1")]),
            node("b", json!({}), &[("InternalIP", "10.0.0.2")]),
            node("c", json!({}), &[("InternalIP", "10.0.0.3")]),
        ];
        nodes[2].status.as_mut().unwrap().conditions = Some(vec![
            serde_json::from_value(json!({"type": "Ready", "status": "Unknown"})).unwrap(),
        ]);
        let mut local = service("local", "2026-01-01T00:00:00Z", &[(81, "TCP")]);
        local.spec.as_mut().unwrap().external_traffic_policy = Some("Local".into());
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "local-x", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "local"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.244.1.2"], "nodeName": "b"},
                {"addresses": ["10.244.1.3"], "nodeName": "a",
                 "conditions": {"ready": false}}
            ]
        }))
        .unwrap();
        let services = [
            service("web", "2026-01-01T00:00:00Z", &[(80, "TCP")]),
            service("late", "2026-02-01T00:00:00Z", &[(80, "TCP")]),
            local,
        ];
        let services: Vec<&Service> = services.iter().collect();
        let desired = desired_ingress(&services, &[&slice], &nodes);
        let ips =
            |list: &[&str]| -> Vec<IpAddr> { list.iter().map(|s| s.parse().unwrap()).collect() };
        assert_eq!(
            desired[&ServiceKey::new("default", "web")],
            ips(&["10.0.0.1", "10.0.0.2"])
        );
        assert_eq!(desired[&ServiceKey::new("default", "late")], ips(&[]));
        assert_eq!(
            desired[&ServiceKey::new("default", "local")],
            ips(&["10.0.0.2"])
        );
    }

    #[test]
    fn current_ingress_reads_ips_and_flags_anything_else() {
        let with = |ingress: serde_json::Value| -> Service {
            serde_json::from_value(json!({"metadata": {"name": "s"},
                "status": {"loadBalancer": {"ingress": ingress}}}))
            .unwrap()
        };
        assert_eq!(
            current_ingress(&with(
                json!([{"ip": "10.0.0.2", "ipMode": "VIP"}, {"ip": "10.0.0.1"}])
            )),
            Some(vec![
                "10.0.0.1".parse().unwrap(),
                "10.0.0.2".parse().unwrap()
            ])
        );
        assert_eq!(
            current_ingress(&with(json!([{"hostname": "lb.example"}]))),
            None
        );
        assert_eq!(
            current_ingress(&with(json!([{"ip": "fd00::1"}]))),
            Some(vec!["fd00::1".parse().unwrap()])
        );
        assert_eq!(current_ingress(&with(json!([{"ip": "node-1"}]))), None);
        assert_eq!(current_ingress(&Service::default()), Some(vec![]));
    }

    fn with_families(mut service: Service, policy: &str, families: &[&str]) -> Service {
        let spec = service.spec.as_mut().unwrap();
        spec.ip_family_policy = Some(policy.into());
        spec.ip_families = Some(families.iter().map(ToString::to_string).collect());
        service
    }

    #[test]
    fn port_claims_hold_per_family() {
        let services = vec![
            with_families(
                service("v4", "2026-01-01T00:00:00Z", &[(80, "TCP")]),
                "SingleStack",
                &["IPv4"],
            ),
            // Port 80 in the other family only: no conflict.
            with_families(
                service("v6", "2026-02-01T00:00:00Z", &[(80, "TCP")]),
                "SingleStack",
                &["IPv6"],
            ),
            // Both families: its IPv4 port 80 is taken.
            with_families(
                service("dual", "2026-03-01T00:00:00Z", &[(80, "TCP")]),
                "RequireDualStack",
                &["IPv6", "IPv4"],
            ),
        ];
        let allocation = allocate(&services);
        assert_eq!(allocation.pending.len(), 1, "{allocation:?}");
        let conflict = &allocation.pending[&ServiceKey::new("default", "dual")];
        assert_eq!(
            (conflict.family, &conflict.holder),
            (Family::V4, &ServiceKey::new("default", "v4"))
        );

        // Without the IPv4 holder, the IPv6 one still blocks it.
        let allocation = allocate(&services[1..]);
        let conflict = &allocation.pending[&ServiceKey::new("default", "dual")];
        assert_eq!(conflict.family, Family::V6);
        assert_eq!(conflict.holder, ServiceKey::new("default", "v6"));
        assert!(
            conflict.message().contains("node IPv6 addresses"),
            "{}",
            conflict.message()
        );

        // Single-stack Services of both families, no dual one: all served.
        assert!(allocate(&services[..2]).pending.is_empty());
    }

    #[test]
    fn ingress_lists_each_family_of_the_service_in_ip_families_order() {
        let nodes = vec![
            node(
                "a",
                json!({}),
                &[("InternalIP", "10.0.0.1"), ("InternalIP", "fd00::1")],
            ),
            node(
                "b",
                json!({}),
                &[
                    ("InternalIP", "fd00::2"),
                    ("InternalIP", "10.0.0.2"),
                    ("ExternalIP", "2001:db8::2"),
                ],
            ),
        ];
        let services = [
            with_families(
                service("v6-first", "2026-01-01T00:00:00Z", &[(80, "TCP")]),
                "PreferDualStack",
                &["IPv6", "IPv4"],
            ),
            with_families(
                service("v4-first", "2026-01-01T00:00:00Z", &[(81, "TCP")]),
                "RequireDualStack",
                &["IPv4", "IPv6"],
            ),
            with_families(
                service("v6-only", "2026-01-01T00:00:00Z", &[(82, "TCP")]),
                "SingleStack",
                &["IPv6"],
            ),
            // No ipFamilies (a manifest): IPv4, as before dual-stack.
            service("plain", "2026-01-01T00:00:00Z", &[(83, "TCP")]),
        ];
        let services: Vec<&Service> = services.iter().collect();
        let desired = desired_ingress(&services, &[], &nodes);
        let ips =
            |list: &[&str]| -> Vec<IpAddr> { list.iter().map(|s| s.parse().unwrap()).collect() };
        assert_eq!(
            desired[&ServiceKey::new("default", "v6-first")],
            ips(&["2001:db8::2", "fd00::1", "fd00::2", "10.0.0.1", "10.0.0.2"])
        );
        assert_eq!(
            desired[&ServiceKey::new("default", "v4-first")],
            ips(&["10.0.0.1", "10.0.0.2", "2001:db8::2", "fd00::1", "fd00::2"])
        );
        assert_eq!(
            desired[&ServiceKey::new("default", "v6-only")],
            ips(&["2001:db8::2", "fd00::1", "fd00::2"])
        );
        assert_eq!(
            desired[&ServiceKey::new("default", "plain")],
            ips(&["10.0.0.1", "10.0.0.2"])
        );

        // What the API holds is read in the same order, so a status
        // written as desired is seen as in place whatever order it lists.
        let mut written = services[0].clone();
        written.status = Some(
            serde_json::from_value(json!({"loadBalancer": {"ingress": [
                {"ip": "10.0.0.2"}, {"ip": "fd00::2"}, {"ip": "10.0.0.1"},
                {"ip": "2001:db8::2"}, {"ip": "fd00::1"}
            ]}}))
            .unwrap(),
        );
        assert_eq!(
            current_ingress(&written).as_ref(),
            Some(&desired[&ServiceKey::new("default", "v6-first")])
        );
    }
}
