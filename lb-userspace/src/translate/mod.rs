//! Kubernetes objects → [`DesiredState`], with the semantics a node agent for
//! `type: LoadBalancer` Services must have to stand in for kube-proxy and
//! K3s ServiceLB:
//!
//! - frontends: every `status.loadBalancer.ingress[].ip` of the Service's
//!   families ([`families`]: `spec.ipFamilies`, `spec.ipFamilyPolicy`) ×
//!   every `spec.ports[]` (never `spec.loadBalancerIP`, a tenant's request);
//! - backends: the Service's EndpointSlices (label
//!   `kubernetes.io/service-name`) of the frontend's own family (an IPv6
//!   frontend gets the `addressType: IPv6` slices), whose ports are named
//!   after the Service ports and carry the already resolved target port;
//! - ready endpoints, else serving-and-terminating ones (KEP-1669,
//!   "ProxyTerminatingEndpoints"), chosen among the local endpoints only with
//!   `externalTrafficPolicy: Local`;
//! - `loadBalancerSourceRanges` fail closed: one invalid entry withdraws the
//!   whole Service rather than opening it to every source.
//!
//! A problem with one Service, port, address or EndpointSlice is reported and
//! skips only that part; everything else is still translated.
//!
//! Pure: no network, no kube client, no aya. [`objects`] is the vocabulary
//! (which Service, in which order), [`service`] turns one Service into
//! frontends and backends, [`claims`] settles which Service holds a frontend
//! several ask for, [`node_mode`] allocates node addresses and ports.

pub mod claims;
pub mod families;
#[cfg(test)]
mod fixtures;
pub mod node_mode;
pub mod objects;
pub mod problem;
pub mod service;

pub use claims::Translator;
pub use objects::{
    DEFAULT_LB_CLASS, Objects, Order, ServiceKey, cluster_networks, handles_class, node_address_of,
    node_address_v6_of, slice_service,
};
pub use problem::{EventReason, Problem};

use crate::model::DesiredState;

/// Where a Service's frontend addresses come from (`--address-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AddressMode {
    /// MetalLB-style: `status.loadBalancer.ingress`, assigned by whoever
    /// owns the addresses; xlb writes nothing. `spec.loadBalancerIP` is a
    /// request to that owner and never a frontend by itself.
    #[default]
    Status,
    /// K3s ServiceLB-style: the addresses of the nodes that run xlb, which
    /// the elected leader writes into `status.loadBalancer.ingress`.
    Node,
    /// xlb's own IPAM: addresses from `AddressPool` resources
    /// ([`crate::pools`]); the elected leader writes them into
    /// `status.loadBalancer.ingress`, every agent programs them.
    Pool,
}

/// What a translation is for: whose datapath, which Services (by class),
/// and where their addresses come from.
#[derive(Clone, Debug)]
pub struct Scope {
    pub node_name: String,
    /// `spec.loadBalancerClass` values handled besides none.
    pub lb_classes: Vec<String>,
    pub address_mode: AddressMode,
}

/// Translates `objects` into the datapath `node_name` should have.
///
/// Two Services claiming the same frontend: the one created first keeps it
/// (then the one whose `namespace/name` sorts first), so the outcome does not
/// depend on the order objects were read in and a new Service never takes a
/// frontend away from a working one. A Service read twice (same
/// `namespace/name`): the first definition counts.
pub fn translate(
    objects: &Objects,
    node_name: &str,
    mode: AddressMode,
) -> (DesiredState, Vec<Problem>) {
    let (translator, problems) = Translator::build(objects, node_name, mode);
    (translator.into_desired(), problems)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::{fixtures::*, *};

    #[test]
    fn node_mode_serves_this_nodes_addresses_and_leaves_the_later_service_pending() {
        let node = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-1\nstatus:\n  addresses:\n\
                    \x20 - type: InternalIP\n    address: 10.0.0.1\n\
                    \x20 - type: ExternalIP\n    address: 203.0.113.1\n---\n";
        let yaml = node.to_owned()
            + &service("web", "", HTTP_PORT)
            + &service("zz-later", "", HTTP_PORT)
            + &slice(
                "web-1",
                "web",
                SLICE_HTTP_PORT,
                &endpoint("10.244.1.5", NODE, "{}"),
            );
        let (state, errors) = translate(&objects(&yaml), NODE, AddressMode::Node);
        // The status address (192.0.2.10) is not used in node mode.
        let frontends: Vec<String> = state.frontends.keys().map(ToString::to_string).collect();
        assert_eq!(frontends, ["10.0.0.1:80/TCP", "203.0.113.1:80/TCP"]);
        assert!(state.frontends.values().all(|s| s.service.name == "web"));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].reason, EventReason::PortConflict);
        assert!(errors[0].message.contains("shop/web"), "{errors:?}");

        // Another node, not in the objects: nothing to serve.
        let (state, _) = translate(&objects(&yaml), "node-9", AddressMode::Node);
        assert!(state.frontends.is_empty());
    }

    #[test]
    fn node_address_is_the_first_ipv4_internal_ip_of_this_node() {
        let yaml = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-2\nstatus:\n  addresses:\n\
                    \x20 - type: InternalIP\n    address: 10.0.0.2\n---\n\
                    apiVersion: v1\nkind: Node\nmetadata:\n  name: node-1\nstatus:\n  addresses:\n\
                    \x20 - type: Hostname\n    address: node-1\n\
                    \x20 - type: ExternalIP\n    address: 203.0.113.1\n\
                    \x20 - type: InternalIP\n    address: fd00::1\n\
                    \x20 - type: InternalIP\n    address: 10.0.0.1\n";
        let objects = objects(yaml);
        assert_eq!(
            node_address_of(&objects.nodes, NODE),
            Some(Ipv4Addr::new(10, 0, 0, 1))
        );
        assert_eq!(node_address_of(&objects.nodes, "node-3"), None);
        let (state, _) = translate(&objects, NODE, AddressMode::Status);
        assert_eq!(state.node_addr, Some(Ipv4Addr::new(10, 0, 0, 1)));
        // The IPv6 SNAT address: the first IPv6 InternalIP.
        assert_eq!(
            node_address_v6_of(&objects.nodes, NODE),
            Some("fd00::1".parse().unwrap())
        );
        assert_eq!(state.node_addr_v6, Some("fd00::1".parse().unwrap()));
        assert_eq!(node_address_v6_of(&objects.nodes, "node-2"), None);
    }

    #[test]
    fn node_mode_serves_each_service_the_node_addresses_of_its_families() {
        let node = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-1\nstatus:\n  addresses:\n\
                    \x20 - type: InternalIP\n    address: 10.0.0.1\n\
                    \x20 - type: InternalIP\n    address: fd00::1\n---\n";
        let dual = service(
            "dual",
            "  ipFamilyPolicy: PreferDualStack\n  ipFamilies: [IPv6, IPv4]\n",
            HTTP_PORT,
        );
        let v6 = service(
            "v6",
            "  ipFamilies: [IPv6]\n",
            "  - name: dns\n    port: 53\n    protocol: UDP\n",
        );
        let v4 = service("v4", "", "  - name: tls\n    port: 443\n");
        let yaml = node.to_owned()
            + &dual
            + &v6
            + &v4
            + &slice(
                "dual-4",
                "dual",
                SLICE_HTTP_PORT,
                &endpoint("10.244.1.5", NODE, "{}"),
            )
            + &slice(
                "dual-6",
                "dual",
                SLICE_HTTP_PORT,
                &endpoint("\"fd00:244::5\"", NODE, "{}"),
            )
            .replace("addressType: IPv4", "addressType: IPv6");
        let (state, errors) = translate(&objects(&yaml), NODE, AddressMode::Node);
        assert!(errors.is_empty(), "{errors:?}");
        let frontends: Vec<(String, String, Vec<String>)> = state
            .frontends
            .iter()
            .map(|(frontend, spec)| {
                (
                    frontend.to_string(),
                    spec.service.name.clone(),
                    spec.backends.iter().map(|b| b.addr.to_string()).collect(),
                )
            })
            .collect();
        let row = |f: &str, s: &str, b: &[&str]| {
            (
                f.to_owned(),
                s.to_owned(),
                b.iter().map(|b| b.to_string()).collect::<Vec<_>>(),
            )
        };
        assert_eq!(
            frontends,
            [
                row("10.0.0.1:80/TCP", "dual", &["10.244.1.5"]),
                row("10.0.0.1:443/TCP", "v4", &[]),
                row("[fd00::1]:53/UDP", "v6", &[]),
                row("[fd00::1]:80/TCP", "dual", &["fd00:244::5"]),
            ]
        );
    }

    #[test]
    fn cluster_networks_are_every_nodes_pod_cidrs_and_addresses() {
        let yaml = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-2\nspec:\n  podCIDR: 10.42.1.0/24\n\
                    \x20 podCIDRs: [10.42.1.0/24, 'fd00:42:1::/64']\nstatus:\n  addresses:\n\
                    \x20 - type: InternalIP\n    address: 10.0.0.2\n\
                    \x20 - type: Hostname\n    address: node-2\n---\n\
                    apiVersion: v1\nkind: Node\nmetadata:\n  name: node-1\nspec:\n  podCIDR: 10.42.0.7/24\n\
                    status:\n  addresses:\n\
                    \x20 - type: ExternalIP\n    address: 203.0.113.1\n\
                    \x20 - type: InternalIP\n    address: fd00::1\n";
        let (state, _) = translate(&objects(yaml), NODE, AddressMode::Status);
        let networks: Vec<String> = state
            .cluster_networks
            .iter()
            .map(ToString::to_string)
            .collect();
        // Host bits cleared; a Hostname is no address.
        assert_eq!(
            networks,
            [
                "10.0.0.2/32",
                "10.42.0.0/24",
                "10.42.1.0/24",
                "203.0.113.1/32",
                "fd00::1/128",
                "fd00:42:1::/64"
            ]
        );
    }
}
