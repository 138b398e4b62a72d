//! Typed Kubernetes objects for the tests, built with `k8s_openapi` and
//! serialized to YAML for manifest files (as an operator would write them)
//! or to JSON for the fake API server. One builder per kind, so every test
//! writes the same shapes.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::{
    api::{
        core::v1::{
            LoadBalancerIngress, LoadBalancerStatus, Node, NodeAddress, NodeStatus, Service,
            ServicePort, ServiceSpec, ServiceStatus,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use serde::Serialize;

/// Namespace every test Service and EndpointSlice lives in.
pub const NAMESPACE: &str = "default";

/// A Node whose InternalIP is `addr`.
pub fn node(name: &str, addr: Ipv4Addr) -> Node {
    node_with_addresses(name, &[addr.into()])
}

/// A dual-stack Node: InternalIPs `ipv4` then `ipv6`, as a dual-stack
/// kubelet reports them.
pub fn dual_stack_node(name: &str, ipv4: Ipv4Addr, ipv6: Ipv6Addr) -> Node {
    node_with_addresses(name, &[ipv4.into(), ipv6.into()])
}

/// A Node with these InternalIPs, in this order.
fn node_with_addresses(name: &str, addresses: &[IpAddr]) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..ObjectMeta::default()
        },
        status: Some(NodeStatus {
            addresses: Some(
                addresses
                    .iter()
                    .map(|addr| NodeAddress {
                        type_: "InternalIP".into(),
                        address: addr.to_string(),
                    })
                    .collect(),
            ),
            ..NodeStatus::default()
        }),
        ..Node::default()
    }
}

/// One Service port: name, protocol, port, and the target port as written
/// in a manifest (a number, or a container port name).
pub type Port<'a> = (&'a str, &'a str, i32, &'a str);

fn target_port(target: &str) -> IntOrString {
    match target.parse() {
        Ok(number) => IntOrString::Int(number),
        Err(_) => IntOrString::String(target.to_string()),
    }
}

/// A LoadBalancer Service `namespace/name` with `ports`, its status
/// already holding `frontend` (what a load-balancer controller writes), or
/// no status at all when `frontend` is `None`.
pub fn service_in(
    namespace: &str,
    name: &str,
    frontend: Option<Ipv4Addr>,
    ports: &[Port],
) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            ports: Some(
                ports
                    .iter()
                    .map(|&(name, protocol, port, target)| ServicePort {
                        name: Some(name.to_string()),
                        protocol: Some(protocol.to_string()),
                        port,
                        target_port: Some(target_port(target)),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        status: frontend.map(|addr| ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some(addr.to_string()),
                    ..LoadBalancerIngress::default()
                }]),
            }),
            ..ServiceStatus::default()
        }),
    }
}

/// A `RequireDualStack` LoadBalancer Service (`ipFamilies: [IPv4, IPv6]`)
/// in the test namespace, its status holding one frontend per family.
pub fn dual_stack_service(name: &str, ipv4: Ipv4Addr, ipv6: Ipv6Addr, ports: &[Port]) -> Service {
    let mut service = service(name, ipv4, ports);
    let spec = spec_mut(&mut service);
    spec.ip_family_policy = Some("RequireDualStack".into());
    spec.ip_families = Some(vec!["IPv4".into(), "IPv6".into()]);
    if let Some(ingress) = service
        .status
        .as_mut()
        .and_then(|status| status.load_balancer.as_mut())
        .and_then(|load_balancer| load_balancer.ingress.as_mut())
    {
        ingress.push(LoadBalancerIngress {
            ip: Some(ipv6.to_string()),
            ..LoadBalancerIngress::default()
        });
    }
    service
}

/// [`service_in`] the test namespace, with its frontend in the status.
pub fn service(name: &str, frontend: Ipv4Addr, ports: &[Port]) -> Service {
    service_in(NAMESPACE, name, Some(frontend), ports)
}

/// The spec of a Service built here, to adjust (traffic policy, affinity,
/// source ranges, class).
pub fn spec_mut(service: &mut Service) -> &mut ServiceSpec {
    service.spec.get_or_insert_with(ServiceSpec::default)
}

/// One endpoint: pod address, node name, ready.
pub type EndpointOf<'a> = (Ipv4Addr, &'a str, bool);

/// An EndpointSlice `namespace/<slice>` owned by Service `service` with
/// `endpoints` and `(port name, protocol, port)` ports.
pub fn endpoint_slice_in(
    namespace: &str,
    slice: &str,
    service: &str,
    endpoints: &[EndpointOf],
    ports: &[(&str, &str, i32)],
) -> EndpointSlice {
    let endpoints: Vec<(IpAddr, &str, bool)> = endpoints
        .iter()
        .map(|&(addr, node, ready)| (addr.into(), node, ready))
        .collect();
    slice_of_family(namespace, slice, service, "IPv4", &endpoints, ports)
}

/// An `addressType: IPv6` EndpointSlice `<service>-v6` of `service` in the
/// test namespace: the IPv6 half of a dual-stack Service's endpoints.
pub fn endpoint_slice_v6(
    service: &str,
    endpoints: &[(Ipv6Addr, &str, bool)],
    ports: &[(&str, &str, i32)],
) -> EndpointSlice {
    let endpoints: Vec<(IpAddr, &str, bool)> = endpoints
        .iter()
        .map(|&(addr, node, ready)| (addr.into(), node, ready))
        .collect();
    slice_of_family(
        NAMESPACE,
        &format!("{service}-v6"),
        service,
        "IPv6",
        &endpoints,
        ports,
    )
}

fn slice_of_family(
    namespace: &str,
    slice: &str,
    service: &str,
    address_type: &str,
    endpoints: &[(IpAddr, &str, bool)],
    ports: &[(&str, &str, i32)],
) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(slice.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".to_string(),
                service.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        address_type: address_type.into(),
        endpoints: Some(
            endpoints
                .iter()
                .map(|&(addr, node, ready)| Endpoint {
                    addresses: vec![addr.to_string()],
                    node_name: Some(node.to_string()),
                    conditions: Some(EndpointConditions {
                        ready: Some(ready),
                        serving: Some(ready),
                        terminating: Some(false),
                    }),
                    ..Endpoint::default()
                })
                .collect(),
        ),
        ports: Some(
            ports
                .iter()
                .map(|&(name, protocol, port)| EndpointPort {
                    name: Some(name.to_string()),
                    protocol: Some(protocol.to_string()),
                    port: Some(port),
                    ..EndpointPort::default()
                })
                .collect(),
        ),
    }
}

/// The EndpointSlice `<service>-abc` of `service` in the test namespace.
pub fn endpoint_slice(
    service: &str,
    endpoints: &[EndpointOf],
    ports: &[(&str, &str, i32)],
) -> EndpointSlice {
    endpoint_slice_in(
        NAMESPACE,
        &format!("{service}-abc"),
        service,
        endpoints,
        ports,
    )
}

/// One YAML document (k8s_openapi writes `apiVersion` and `kind`).
pub fn to_yaml(object: &impl Serialize) -> String {
    serde_yaml::to_string(object).expect("Kubernetes objects serialize to YAML")
}

/// Several objects as one multi-document YAML file.
pub fn to_yaml_documents<T: Serialize>(objects: &[T]) -> String {
    objects
        .iter()
        .map(to_yaml)
        .collect::<Vec<_>>()
        .join("---\n")
}

/// The object as the JSON the fake API server stores.
pub fn to_json(object: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(object).expect("Kubernetes objects serialize to JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_yaml_has_type_meta_and_typed_ports() {
        let yaml = to_yaml(&service(
            "web",
            Ipv4Addr::new(10, 200, 0, 10),
            &[("http", "TCP", 80, "8080"), ("named", "TCP", 81, "web")],
        ));
        let value: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(value["apiVersion"], "v1");
        assert_eq!(value["kind"], "Service");
        assert_eq!(value["spec"]["ports"][0]["targetPort"], 8080);
        assert_eq!(value["spec"]["ports"][1]["targetPort"], "web");
        assert_eq!(
            value["status"]["loadBalancer"]["ingress"][0]["ip"],
            "10.200.0.10"
        );
    }

    #[test]
    fn endpoint_slice_json_is_labelled_with_its_service() {
        let json = to_json(&endpoint_slice(
            "web",
            &[(Ipv4Addr::new(10, 244, 1, 2), "node-a", true)],
            &[("http", "TCP", 8080)],
        ));
        assert_eq!(json["apiVersion"], "discovery.k8s.io/v1");
        assert_eq!(json["metadata"]["name"], "web-abc");
        assert_eq!(
            json["metadata"]["labels"]["kubernetes.io/service-name"],
            "web"
        );
        assert_eq!(json["endpoints"][0]["conditions"]["ready"], true);
    }
}
