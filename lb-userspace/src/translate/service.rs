//! One Service → its frontends and their backends, with the semantics a
//! node agent for `type: LoadBalancer` Services must have (see the
//! [module docs](super)). A problem with one port, address or EndpointSlice
//! is reported and skips only that part.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;
use k8s_openapi::{
    api::{
        core::v1::{ObjectReference, Service, ServicePort, ServiceSpec},
        discovery::v1::{EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::{
    families::{Families, Family, service_families},
    node_mode::NodePlan,
    objects::{SOURCE_RANGES_ANNOTATION, ServiceKey, endpoint_ready, port_number, port_protocol},
    problem::{EventReason, Problem, reference_to},
};
use crate::model::{Backend, Frontend, FrontendSpec, Protocol, ServiceRef, SourceRange};

/// `sessionAffinityConfig.clientIP.timeoutSeconds` default and maximum, as
/// the API server applies and validates them (3 hours, 1 day).
const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
const MAX_AFFINITY_TIMEOUT: u32 = 86_400;

/// One Service being translated, and where its problems go.
pub(super) struct ServiceContext<'a> {
    /// The Service, for its Events.
    object: ObjectReference,
    key: &'a ServiceKey,
    node_name: &'a str,
    addresses: AddressSource<'a>,
    problems: &'a mut Vec<Problem>,
}

/// Where this Service's frontend addresses come from.
#[derive(Clone, Copy)]
pub(super) enum AddressSource<'a> {
    /// `status.loadBalancer.ingress`.
    Status,
    /// This node's addresses, unless the Service waits for a port.
    Node(&'a NodePlan),
    /// What the pool allocator assigned it (empty: nothing).
    Pool(&'a [IpAddr]),
}

/// A Service port that passed validation.
struct ValidPort<'a> {
    port: &'a ServicePort,
    number: u16,
    protocol: Protocol,
}

impl ValidPort<'_> {
    fn name(&self) -> &str {
        self.port.name.as_deref().unwrap_or("")
    }
}

/// One endpoint of an EndpointSlice, with its conditions as the API defines
/// their defaults: `ready` and `serving` nil mean true, `terminating` nil
/// means false.
struct EndpointView {
    /// Of the slice's family.
    addresses: Vec<IpAddr>,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
}

/// An IPv4 or IPv6 EndpointSlice of the Service, its addresses already
/// parsed.
struct SliceView<'a> {
    object: ObjectReference,
    family: Family,
    ports: &'a [EndpointPort],
    endpoints: Vec<EndpointView>,
}

impl<'a> ServiceContext<'a> {
    pub(super) fn new(
        service: &Service,
        key: &'a ServiceKey,
        node_name: &'a str,
        addresses: AddressSource<'a>,
        problems: &'a mut Vec<Problem>,
    ) -> Self {
        ServiceContext {
            object: reference_to(service),
            key,
            node_name,
            addresses,
            problems,
        }
    }

    pub(super) fn report(&mut self, message: String) {
        self.report_as(EventReason::InvalidSpec, message);
    }

    fn report_as(&mut self, reason: EventReason, message: String) {
        self.problems
            .push(Problem::new(self.object.clone(), reason, message));
    }

    /// The frontends `service` asks for on this node, each with its
    /// backends from `slices`.
    pub(super) fn frontends(
        &mut self,
        service: &Service,
        slices: &[&EndpointSlice],
    ) -> Vec<(Frontend, FrontendSpec)> {
        let Some(spec) = service.spec.as_ref() else {
            tracing::debug!(service = %self.key, "skipping Service without spec");
            return Vec::new();
        };
        if spec.type_.as_deref() != Some("LoadBalancer") {
            tracing::debug!(
                service = %self.key,
                r#type = spec.type_.as_deref().unwrap_or("ClusterIP"),
                "skipping Service that is not of type LoadBalancer"
            );
            return Vec::new();
        }
        // First, so that an invalid range withdraws the Service before
        // anything else is built for it.
        let Some(source_ranges) = self.source_ranges(service, spec) else {
            return Vec::new();
        };
        let local_only = self.local_only(spec);
        let affinity_timeout = self.affinity_timeout(spec);
        let ports = self.ports(spec);
        let families = service_families(spec);
        for problem in &families.problems {
            self.report(problem.clone());
        }
        let addresses: BTreeSet<IpAddr> = match self.addresses {
            AddressSource::Status => self.frontend_addresses(service, &families),
            // The allocator gave only addresses of the Service's families.
            AddressSource::Pool(assigned) => assigned.iter().copied().collect(),
            AddressSource::Node(plan) => {
                if let Some(conflict) = plan.allocation.pending.get(self.key) {
                    self.report_as(EventReason::PortConflict, conflict.message());
                    return Vec::new();
                }
                // The node's addresses of the families the Service has.
                plan.addresses
                    .iter()
                    .copied()
                    .filter(|address| families.contains(Family::of(*address)))
                    .collect()
            }
        };
        if ports.is_empty() {
            return Vec::new();
        }
        if addresses.is_empty() {
            tracing::debug!(
                service = %self.key,
                "LoadBalancer Service has no address yet (pending)"
            );
            return Vec::new();
        }
        let slices: Vec<SliceView> = slices
            .iter()
            .filter_map(|slice| self.slice_view(slice))
            .collect();

        let address_families: BTreeSet<Family> = addresses
            .iter()
            .map(|address| Family::of(*address))
            .collect();
        let mut frontends = Vec::new();
        for port in &ports {
            // Each family's frontends get that family's endpoints only.
            let mut backends_of: BTreeMap<Family, Vec<Backend>> = BTreeMap::new();
            for &family in &address_families {
                let same_family: Vec<&SliceView> = slices
                    .iter()
                    .filter(|slice| slice.family == family)
                    .collect();
                let backends = self.backends(port, &same_family, local_only);
                tracing::debug!(
                    service = %self.key,
                    port = port.name(),
                    %family,
                    backends = backends.len(),
                    "translated Service port"
                );
                backends_of.insert(family, backends);
            }
            let service_ref = ServiceRef {
                namespace: self.key.namespace.clone(),
                name: self.key.name.clone(),
                port_name: port.name().to_owned(),
            };
            for &address in &addresses {
                let frontend = Frontend {
                    addr: address,
                    port: port.number,
                    protocol: port.protocol,
                };
                let spec = FrontendSpec {
                    service: service_ref.clone(),
                    backends: backends_of[&Family::of(address)].clone(),
                    local_only,
                    affinity_timeout,
                    source_ranges: source_ranges.clone(),
                };
                frontends.push((frontend, spec));
            }
        }
        frontends
    }

    /// `None` when any entry is invalid: the Service must then not be
    /// programmed at all, since dropping the bad entry could widen the set of
    /// allowed sources to everyone.
    /// `spec.loadBalancerSourceRanges`, else the K3s/kube-proxy annotation
    /// (audit A-13: ignoring it left such Services open to every source).
    /// `None` (the Service is skipped, closed) when an entry is invalid.
    fn source_ranges(&mut self, service: &Service, spec: &ServiceSpec) -> Option<Vec<SourceRange>> {
        let field: Vec<&str> = spec
            .load_balancer_source_ranges
            .iter()
            .flatten()
            .map(String::as_str)
            .collect();
        let (entries, origin) = if field.is_empty() {
            let annotation = service
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(SOURCE_RANGES_ANNOTATION));
            let entries = annotation
                .map(|text| text.split(',').filter(|e| !e.trim().is_empty()).collect())
                .unwrap_or_default();
            (entries, SOURCE_RANGES_ANNOTATION)
        } else {
            (field, "loadBalancerSourceRanges")
        };
        let mut ranges = Vec::new();
        for text in entries {
            match parse_source_range(text) {
                Some(range) => ranges.push(range),
                None => {
                    self.report(format!(
                        "{origin} entry {text:?} is not a CIDR or an IP \
                         address; Service skipped so that it is not open to every source"
                    ));
                    return None;
                }
            }
        }
        ranges.sort();
        ranges.dedup();
        Some(ranges)
    }

    fn local_only(&mut self, spec: &ServiceSpec) -> bool {
        match spec.external_traffic_policy.as_deref() {
            None | Some("Cluster") => false,
            Some("Local") => true,
            Some(other) => {
                self.report(format!(
                    "unknown externalTrafficPolicy {other:?} (expected Cluster or Local); \
                     using Cluster"
                ));
                false
            }
        }
    }

    fn affinity_timeout(&mut self, spec: &ServiceSpec) -> Option<u32> {
        match spec.session_affinity.as_deref() {
            None | Some("None") => None,
            Some("ClientIP") => {
                let configured = spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|config| config.client_ip.as_ref())
                    .and_then(|client_ip| client_ip.timeout_seconds);
                let Some(seconds) = configured else {
                    return Some(DEFAULT_AFFINITY_TIMEOUT);
                };
                match u32::try_from(seconds) {
                    Ok(seconds) if (1..=MAX_AFFINITY_TIMEOUT).contains(&seconds) => Some(seconds),
                    _ => {
                        self.report(format!(
                            "sessionAffinityConfig.clientIP.timeoutSeconds {seconds} out of \
                             range 1-{MAX_AFFINITY_TIMEOUT}; using the default \
                             {DEFAULT_AFFINITY_TIMEOUT}"
                        ));
                        Some(DEFAULT_AFFINITY_TIMEOUT)
                    }
                }
            }
            Some(other) => {
                self.report(format!(
                    "unknown sessionAffinity {other:?} (expected None or ClientIP); \
                     no affinity"
                ));
                None
            }
        }
    }

    fn ports<'s>(&mut self, spec: &'s ServiceSpec) -> Vec<ValidPort<'s>> {
        let ports = spec.ports.as_deref().unwrap_or_default();
        if ports.is_empty() {
            self.report("no ports in spec.ports; Service skipped".to_owned());
            return Vec::new();
        }
        let mut valid = Vec::new();
        for port in ports {
            let label = match port.name.as_deref() {
                Some(name) if !name.is_empty() => format!("port {} ({name})", port.port),
                _ => format!("port {}", port.port),
            };
            let Some(protocol) = port_protocol(port) else {
                self.report(format!(
                    "{label}: protocol {} is not supported (only TCP and UDP); port skipped",
                    port.protocol.as_deref().unwrap_or_default()
                ));
                continue;
            };
            let Some(number) = port_number(port.port) else {
                self.report(format!("{label} out of range 1-65535; port skipped"));
                continue;
            };
            valid.push(ValidPort {
                port,
                number,
                protocol,
            });
        }
        valid
    }

    /// The addresses clients reach the Service at, deduplicated and sorted:
    /// `status.loadBalancer.ingress` only. `spec.loadBalancerIP` is a
    /// request anyone who may create a Service can write, for the owner of
    /// the addresses to grant or refuse (MetalLB honours it only inside a
    /// pool the Service may use); programming it would let any tenant take
    /// any address and port on every node (audit A-1). `status` is a
    /// subresource only the address owner writes. An address of a family the
    /// Service does not have is skipped, as kube-proxy does: no endpoint of
    /// that family would ever serve it.
    fn frontend_addresses(&mut self, service: &Service, families: &Families) -> BTreeSet<IpAddr> {
        let ingress = service
            .status
            .as_ref()
            .and_then(|status| status.load_balancer.as_ref())
            .and_then(|load_balancer| load_balancer.ingress.as_deref())
            .unwrap_or_default()
            .iter()
            // An ingress with only a hostname is a cloud load balancer's DNS
            // name: nothing this node can answer for.
            .filter_map(|ingress| ingress.ip.as_deref())
            .map(|text| ("status.loadBalancer.ingress ip", text));

        let mut addresses = BTreeSet::new();
        for (field, text) in ingress {
            if text.is_empty() {
                continue;
            }
            match text.parse::<IpAddr>() {
                Ok(address) if families.contains(Family::of(address)) => {
                    addresses.insert(address);
                }
                Ok(address) => self.report(format!(
                    "{field} {text} is {}, a family the Service does not have \
                     (ipFamilies: {}); address skipped",
                    Family::of(address),
                    families
                        .list
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
                Err(_) => self.report(format!(
                    "{field} {text:?} is not an IP address; address skipped"
                )),
            }
        }
        addresses
    }

    /// Parses an EndpointSlice of the Service once, reporting invalid
    /// addresses on the slice itself. `None` for `FQDN` slices (no address
    /// to translate to).
    fn slice_view<'s>(&mut self, slice: &'s EndpointSlice) -> Option<SliceView<'s>> {
        let object = reference_to(slice);
        let Some(family) = Family::parse(&slice.address_type) else {
            tracing::debug!(
                slice = ?object.name,
                address_type = %slice.address_type,
                "skipping EndpointSlice that is neither IPv4 nor IPv6"
            );
            return None;
        };
        let mut endpoints = Vec::new();
        for endpoint in slice.endpoints.iter().flatten() {
            let mut addresses = Vec::new();
            for text in &endpoint.addresses {
                match text.parse::<IpAddr>() {
                    Ok(address) if Family::of(address) == family => addresses.push(address),
                    _ => self.problems.push(Problem::new(
                        object.clone(),
                        EventReason::InvalidSpec,
                        format!(
                            "endpoint address {text:?} is not an {family} address; address skipped"
                        ),
                    )),
                }
            }
            let conditions = endpoint.conditions.as_ref();
            endpoints.push(EndpointView {
                addresses,
                ready: endpoint_ready(endpoint),
                serving: conditions.and_then(|c| c.serving).unwrap_or(true),
                terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
                local: endpoint.node_name.as_deref() == Some(self.node_name),
            });
        }
        Some(SliceView {
            object,
            family,
            ports: slice.ports.as_deref().unwrap_or_default(),
            endpoints,
        })
    }

    /// The backends of one Service port, sorted and deduplicated.
    fn backends(
        &mut self,
        port: &ValidPort,
        slices: &[&SliceView],
        local_only: bool,
    ) -> Vec<Backend> {
        // (endpoint, backend port) of every slice that serves this port.
        let mut candidates: Vec<(&EndpointView, u16)> = Vec::new();
        for slice in slices {
            let Some(backend_port) = self.backend_port(port, slice) else {
                continue;
            };
            candidates.extend(
                slice
                    .endpoints
                    .iter()
                    // Local traffic policy: remote endpoints are never used,
                    // so the terminating fallback below looks at local ones
                    // only (as kube-proxy does).
                    .filter(|endpoint| !local_only || endpoint.local)
                    .map(|endpoint| (endpoint, backend_port)),
            );
        }
        // Ready endpoints; if there is none, serving endpoints that are
        // terminating keep taking new flows rather than dropping them, which
        // matters most during a rolling update of a Local Service.
        let any_ready = candidates.iter().any(|(endpoint, _)| endpoint.ready);
        let terminating = !any_ready;
        let mut backends: Vec<Backend> = candidates
            .into_iter()
            .filter(|(endpoint, _)| {
                if any_ready {
                    endpoint.ready
                } else {
                    endpoint.serving && endpoint.terminating
                }
            })
            .flat_map(|(endpoint, backend_port)| {
                endpoint.addresses.iter().map(move |&address| Backend {
                    addr: address,
                    port: backend_port,
                    local: endpoint.local,
                    terminating,
                })
            })
            .collect();
        backends.sort();
        // The same address and port listed twice (in two slices, say) is one
        // backend; flags only differ in contradictory input.
        backends.dedup_by_key(|backend| (backend.addr, backend.port));
        backends
    }

    /// The port `slice`'s endpoints serve `port` on. EndpointSlice ports are
    /// named after the Service ports and already hold the resolved target
    /// port, named `targetPort`s included; so match by name and protocol,
    /// as kube-proxy does, and use the slice's number.
    fn backend_port(&mut self, port: &ValidPort, slice: &SliceView) -> Option<u16> {
        let Some(slice_port) = slice.ports.iter().find(|slice_port| {
            slice_port.name.as_deref().unwrap_or("") == port.name()
                && slice_port.protocol.as_deref().unwrap_or("TCP") == port.protocol.to_string()
        }) else {
            tracing::debug!(
                service = %self.key,
                port = port.name(),
                slice = ?slice.object.name,
                "EndpointSlice has no port of this name and protocol"
            );
            return None;
        };
        if let Some(raw) = slice_port.port {
            let number = port_number(raw);
            if number.is_none() {
                self.problems.push(Problem::new(
                    slice.object.clone(),
                    EventReason::InvalidSpec,
                    format!(
                        "port {:?} number {raw} out of range 1-65535; port skipped",
                        port.name()
                    ),
                ));
            }
            return number;
        }
        // A slice port without a number (allowed for slices not derived from
        // a Service, such as hand-written ones): the Service's own numeric
        // target port, which defaults to its port.
        match &port.port.target_port {
            None => Some(port.number),
            Some(IntOrString::Int(target)) => {
                let number = port_number(*target);
                if number.is_none() {
                    self.report(format!(
                        "port {} targetPort {target} out of range 1-65535; port has no backends",
                        port.number
                    ));
                }
                number
            }
            Some(IntOrString::String(target)) => {
                tracing::debug!(
                    service = %self.key,
                    target_port = %target,
                    slice = ?slice.object.name,
                    "named targetPort, but the EndpointSlice port has no number to resolve it"
                );
                None
            }
        }
    }
}

/// A CIDR (`10.0.0.0/8`) or a bare address (one host), surrounding white
/// space ignored as kube-proxy does. Host bits are cleared, as Go's
/// `net.ParseCIDR` does, so `10.1.2.3/8` means `10.0.0.0/8`.
fn parse_source_range(text: &str) -> Option<SourceRange> {
    let text = text.trim();
    let (address, network) = match text.split_once('/') {
        Some((address, _)) => (address, text.parse::<IpNet>().ok()?),
        // No prefix: one host.
        None => (text, IpNet::from(text.parse::<IpAddr>().ok()?)),
    };
    // ipnet reads `010.0.0.0` as 10.0.0.0; the standard parser, like Go's
    // since 1.17, rejects leading zeros, which some parsers read as octal.
    // Fail closed rather than guess.
    address.parse::<IpAddr>().ok()?;
    let network = network.trunc();
    // The datapath's own type, so that the reconciler needs no new vocabulary.
    Some(SourceRange {
        addr: network.network(),
        prefix_len: network.prefix_len(),
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::{super::fixtures::*, *};

    #[test]
    fn load_balancer_service_with_ready_endpoints() {
        let endpoints = endpoint("10.1.0.5", NODE, "{ready: true}")
            + &endpoint("10.1.0.4", "node-2", "{}")
            + &endpoint("10.1.0.6", "node-2", "{ready: false}");
        let yaml =
            service("web", "", HTTP_PORT) + &slice("web-1", "web", SLICE_HTTP_PORT, &endpoints);
        let (state, errors) = run(&yaml);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(state.frontends.len(), 1);
        let spec = &state.frontends[&web_frontend()];
        assert_eq!(
            spec.service,
            ServiceRef {
                namespace: "shop".into(),
                name: "web".into(),
                port_name: "http".into()
            }
        );
        assert_eq!(
            spec.backends,
            [
                backend([10, 1, 0, 4], 8080, false, false),
                backend([10, 1, 0, 5], 8080, true, false)
            ]
        );
        assert!(!spec.local_only);
        assert_eq!(spec.affinity_timeout, None);
        assert!(spec.source_ranges.is_empty());
    }

    #[test]
    fn services_of_other_types_are_skipped_silently() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata:\n  name: internal\n\
                    spec:\n  type: ClusterIP\n  ports:\n  - port: 80\n---\n\
                    apiVersion: v1\nkind: Service\nmetadata:\n  name: bare\n";
        let (state, errors) = run(yaml);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(state.frontends.is_empty());
    }

    #[test]
    fn every_address_times_every_port_is_a_frontend() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata:\n  name: dns\n\
                    spec:\n  type: LoadBalancer\n  loadBalancerIP: 192.0.2.20\n  ports:\n\
                    \x20 - name: dns\n    port: 53\n    protocol: UDP\n\
                    \x20 - name: dns-tcp\n    port: 53\n    protocol: TCP\n\
                    status:\n  loadBalancer:\n    ingress:\n    - ip: 192.0.2.20\n\
                    \x20   - ip: 192.0.2.21\n    - hostname: lb.example.com\n";
        let (state, errors) = run(yaml);
        assert!(errors.is_empty(), "{errors:?}");
        let frontends: Vec<Frontend> = state.frontends.keys().copied().collect();
        assert_eq!(
            frontends,
            [
                frontend([192, 0, 2, 20], 53, Protocol::Tcp),
                frontend([192, 0, 2, 20], 53, Protocol::Udp),
                frontend([192, 0, 2, 21], 53, Protocol::Tcp),
                frontend([192, 0, 2, 21], 53, Protocol::Udp),
            ]
        );
        let udp = &state.frontends[&frontend([192, 0, 2, 21], 53, Protocol::Udp)];
        assert_eq!(udp.service.namespace, "default");
        assert_eq!(udp.service.port_name, "dns");
        assert!(udp.backends.is_empty());
    }

    /// Audit A-1: a Service's own request for an address is not a frontend;
    /// only the status its address owner wrote is.
    #[test]
    fn spec_load_balancer_ip_alone_is_never_a_frontend() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata:\n  name: squatter\n\
                    spec:\n  type: LoadBalancer\n  loadBalancerIP: 10.0.1.1\n  ports:\n\
                    \x20 - port: 10250\n";
        let (state, errors) = run(yaml);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(state.frontends.is_empty(), "{:?}", state.frontends.keys());
        // A request that differs from what was granted adds nothing either.
        let yaml = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n\
                    spec:\n  type: LoadBalancer\n  loadBalancerIP: 10.0.1.1\n  ports:\n\
                    \x20 - port: 80\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 192.0.2.30\n";
        let (state, _) = run(yaml);
        let frontends: Vec<Frontend> = state.frontends.keys().copied().collect();
        assert_eq!(frontends, [frontend([192, 0, 2, 30], 80, Protocol::Tcp)]);
    }

    #[test]
    fn pending_service_has_no_frontend_and_no_error() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n\
                    spec:\n  type: LoadBalancer\n  ports:\n  - port: 80\n";
        let (state, errors) = run(yaml);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(state.frontends.is_empty());
    }

    #[test]
    fn service_without_ports_is_an_error() {
        let yaml = service("web", "", "    []\n");
        let (state, errors) = run(&yaml);
        assert!(state.frontends.is_empty());
        assert_eq!(
            errors,
            ["Service shop/web: no ports in spec.ports; Service skipped"]
        );
    }

    #[test]
    fn sctp_port_is_skipped_with_an_error() {
        let ports = "  - name: sig\n    port: 3868\n    protocol: SCTP\n".to_owned() + HTTP_PORT;
        let (state, errors) = run(&service("web", "", &ports));
        assert_eq!(
            errors,
            [
                "Service shop/web: port 3868 (sig): protocol SCTP is not supported (only TCP and \
              UDP); port skipped"
            ]
        );
        assert_eq!(
            state.frontends.keys().copied().collect::<Vec<_>>(),
            [web_frontend()]
        );
    }

    #[test]
    fn port_out_of_range_is_skipped_with_an_error() {
        let ports = "  - port: 70000\n".to_owned() + HTTP_PORT;
        let (state, errors) = run(&service("web", "", &ports));
        assert_eq!(
            errors,
            ["Service shop/web: port 70000 out of range 1-65535; port skipped"]
        );
        assert_eq!(state.frontends.len(), 1);
    }

    #[test]
    fn ingress_addresses_of_another_family_or_invalid_are_reported_and_skipped() {
        // No ipFamilies, no clusterIP: an IPv4 Service.
        let yaml = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\n\
                    spec:\n  type: LoadBalancer\n  ports:\n  - port: 80\n\
                    status:\n  loadBalancer:\n    ingress:\n    - ip: 2001:db8::10\n\
                    \x20   - ip: not-an-ip\n    - ip: 192.0.2.10\n";
        let (state, errors) = run(yaml);
        assert_eq!(
            errors,
            [
                "Service shop/web: status.loadBalancer.ingress ip 2001:db8::10 is IPv6, a \
                 family the Service does not have (ipFamilies: IPv4); address skipped",
                "Service shop/web: status.loadBalancer.ingress ip \"not-an-ip\" is not an IP \
                 address; address skipped",
            ]
        );
        assert_eq!(
            state.frontends.keys().copied().collect::<Vec<_>>(),
            [web_frontend()]
        );
    }

    #[test]
    fn named_target_port_is_resolved_through_the_slice_port_name() {
        let ports = "  - name: http\n    port: 80\n    targetPort: web\n";
        let yaml = service("web", "", ports)
            + &slice(
                "web-1",
                "web",
                SLICE_HTTP_PORT,
                &endpoint("10.1.0.5", "node-2", "{}"),
            );
        let (state, errors) = run(&yaml);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            state.frontends[&web_frontend()].backends,
            [backend([10, 1, 0, 5], 8080, false, false)]
        );
    }

    #[test]
    fn numeric_target_port_of_an_unnamed_port() {
        let ports = "  - port: 80\n    targetPort: 9090\n";
        let slice_port = "- port: 9090\n";
        let yaml = service("web", "", ports)
            + &slice(
                "web-1",
                "web",
                slice_port,
                &endpoint("10.1.0.5", "node-2", "{}"),
            );
        let (state, errors) = run(&yaml);
        assert!(errors.is_empty(), "{errors:?}");
        let spec = &state.frontends[&web_frontend()];
        assert_eq!(spec.service.port_name, "");
        assert_eq!(spec.backends, [backend([10, 1, 0, 5], 9090, false, false)]);
    }

    #[test]
    fn slice_port_without_number_falls_back_to_the_target_port() {
        let ports = "  - port: 80\n    targetPort: 9090\n  - name: b\n    port: 81\n";
        let slice_ports = "- name: \"\"\n- name: b\n";
        let yaml = service("web", "", ports)
            + &slice(
                "web-1",
                "web",
                slice_ports,
                &endpoint("10.1.0.5", "node-2", "{}"),
            );
        let (state, errors) = run(&yaml);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            state.frontends[&web_frontend()].backends,
            [backend([10, 1, 0, 5], 9090, false, false)]
        );
        // No targetPort: the Service port itself.
        assert_eq!(
            state.frontends[&frontend([192, 0, 2, 10], 81, Protocol::Tcp)].backends,
            [backend([10, 1, 0, 5], 81, false, false)]
        );
    }

    #[test]
    fn slices_without_a_matching_port_or_of_another_service_or_family_contribute_nothing() {
        let other_name = "- name: metrics\n  port: 9100\n";
        let udp = "- name: http\n  port: 8080\n  protocol: UDP\n";
        let ipv6 = slice(
            "web-6",
            "web",
            SLICE_HTTP_PORT,
            "- addresses: [\"fd00::5\"]\n",
        )
        .replace("addressType: IPv4", "addressType: IPv6");
        let yaml = service("web", "", HTTP_PORT)
            + &slice(
                "web-1",
                "web",
                other_name,
                &endpoint("10.1.0.1", NODE, "{}"),
            )
            + &slice("web-2", "web", udp, &endpoint("10.1.0.2", NODE, "{}"))
            + &slice(
                "api-1",
                "api",
                SLICE_HTTP_PORT,
                &endpoint("10.1.0.3", NODE, "{}"),
            )
            + &ipv6
            + &slice(
                "web-4",
                "web",
                SLICE_HTTP_PORT,
                &endpoint("10.1.0.4", NODE, "{}"),
            );
        let (state, errors) = run(&yaml);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            state.frontends[&web_frontend()].backends,
            [backend([10, 1, 0, 4], 8080, true, false)]
        );
    }

    #[test]
    fn invalid_endpoint_address_is_reported_on_the_slice() {
        let endpoints = "- addresses: [\"10.1.0.300\", \"10.1.0.5\"]\n";
        let yaml =
            service("web", "", HTTP_PORT) + &slice("web-1", "web", SLICE_HTTP_PORT, endpoints);
        let (state, errors) = run(&yaml);
        assert_eq!(
            errors,
            [
                "EndpointSlice shop/web-1: endpoint address \"10.1.0.300\" is not an IPv4 address; \
              address skipped"
            ]
        );
        assert_eq!(
            state.frontends[&web_frontend()].backends,
            [backend([10, 1, 0, 5], 8080, false, false)]
        );
    }

    #[test]
    fn backends_are_sorted_and_deduplicated_across_slices() {
        let yaml = service("web", "", HTTP_PORT)
            + &slice(
                "web-1",
                "web",
                SLICE_HTTP_PORT,
                &endpoint("10.1.0.9", "node-2", "{}"),
            )
            + &slice(
                "web-2",
                "web",
                SLICE_HTTP_PORT,
                &(endpoint("10.1.0.9", "node-2", "{}") + &endpoint("10.1.0.2", "node-2", "{}")),
            );
        let (state, _) = run(&yaml);
        assert_eq!(
            state.frontends[&web_frontend()].backends,
            [
                backend([10, 1, 0, 2], 8080, false, false),
                backend([10, 1, 0, 9], 8080, false, false)
            ]
        );
    }

    #[test]
    fn terminating_serving_endpoints_are_used_only_when_none_is_ready() {
        let terminating = "{ready: false, serving: true, terminating: true}";
        let gone = "{ready: false, serving: false, terminating: true}";
        let endpoints = endpoint("10.1.0.1", "node-2", terminating)
            + &endpoint("10.1.0.2", "node-2", gone)
            + &endpoint("10.1.0.3", "node-2", "{ready: false}");
        let yaml =
            service("web", "", HTTP_PORT) + &slice("web-1", "web", SLICE_HTTP_PORT, &endpoints);
        let (state, _) = run(&yaml);
        assert_eq!(
            state.frontends[&web_frontend()].backends,
            [backend([10, 1, 0, 1], 8080, false, true)]
        );

        // One ready endpoint, even in another slice: terminating ones are not used.
        let yaml = yaml
            + &slice(
                "web-2",
                "web",
                SLICE_HTTP_PORT,
                &endpoint("10.1.0.4", "node-2", "{}"),
            );
        let (state, _) = run(&yaml);
        assert_eq!(
            state.frontends[&web_frontend()].backends,
            [backend([10, 1, 0, 4], 8080, false, false)]
        );
    }

    #[test]
    fn local_policy_keeps_only_local_endpoints() {
        let endpoints = endpoint("10.1.0.1", NODE, "{}") + &endpoint("10.1.0.2", "node-2", "{}");
        let yaml = service("web", "  externalTrafficPolicy: Local\n", HTTP_PORT)
            + &slice("web-1", "web", SLICE_HTTP_PORT, &endpoints);
        let (state, errors) = run(&yaml);
        assert!(errors.is_empty(), "{errors:?}");
        let spec = &state.frontends[&web_frontend()];
        assert!(spec.local_only);
        assert_eq!(spec.backends, [backend([10, 1, 0, 1], 8080, true, false)]);
    }

    #[test]
    fn local_policy_falls_back_to_local_terminating_despite_remote_ready_endpoints() {
        let endpoints = endpoint(
            "10.1.0.1",
            NODE,
            "{ready: false, serving: true, terminating: true}",
        ) + &endpoint("10.1.0.2", "node-2", "{ready: true}");
        let yaml = service("web", "  externalTrafficPolicy: Local\n", HTTP_PORT)
            + &slice("web-1", "web", SLICE_HTTP_PORT, &endpoints);
        let (state, _) = run(&yaml);
        assert_eq!(
            state.frontends[&web_frontend()].backends,
            [backend([10, 1, 0, 1], 8080, true, true)]
        );
    }

    #[test]
    fn local_policy_without_local_endpoints_has_no_backends() {
        let yaml = service("web", "  externalTrafficPolicy: Local\n", HTTP_PORT)
            + &slice(
                "web-1",
                "web",
                SLICE_HTTP_PORT,
                &endpoint("10.1.0.2", "node-2", "{}"),
            );
        let (state, _) = run(&yaml);
        let spec = &state.frontends[&web_frontend()];
        assert!(spec.local_only);
        assert!(spec.backends.is_empty());
    }

    #[test]
    fn client_ip_affinity_default_explicit_and_invalid_timeouts() {
        let timeout = |spec: &str| {
            let (state, errors) = run(&service("web", spec, HTTP_PORT));
            (state.frontends[&web_frontend()].affinity_timeout, errors)
        };
        assert_eq!(
            timeout("  sessionAffinity: ClientIP\n"),
            (Some(10_800), vec![])
        );
        let explicit = "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      \
                        timeoutSeconds: 60\n";
        assert_eq!(timeout(explicit), (Some(60), vec![]));
        let (value, errors) = timeout(&explicit.replace("60", "86401"));
        assert_eq!(value, Some(10_800));
        assert_eq!(
            errors,
            [
                "Service shop/web: sessionAffinityConfig.clientIP.timeoutSeconds 86401 out of \
              range 1-86400; using the default 10800"
            ]
        );
        assert_eq!(timeout("  sessionAffinity: None\n"), (None, vec![]));
    }

    #[test]
    fn source_ranges_are_parsed_normalised_and_sorted() {
        let spec = "  loadBalancerSourceRanges:\n  - \" 198.51.100.0/24 \"\n  - 10.1.2.3/8\n\
                    \x20 - 203.0.113.7\n  - 10.0.0.0/8\n";
        let (state, errors) = run(&service("web", spec, HTTP_PORT));
        assert!(errors.is_empty(), "{errors:?}");
        let ranges: Vec<String> = state.frontends[&web_frontend()]
            .source_ranges
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(ranges, ["10.0.0.0/8", "198.51.100.0/24", "203.0.113.7/32"]);
    }

    /// Audit A-13: K3s users set source ranges with the annotation; without
    /// the field it applies, with the field the field wins, and a bad entry
    /// closes the Service as a bad field entry does.
    #[test]
    fn the_source_ranges_annotation_applies_when_the_field_is_empty() {
        let annotated = |spec: &str, value: &str| {
            service("web", spec, HTTP_PORT).replacen(
                "  namespace: shop\n",
                &format!(
                    "  namespace: shop\n  annotations:\n    \
                     service.beta.kubernetes.io/load-balancer-source-ranges: \"{value}\"\n"
                ),
                1,
            )
        };
        let ranges = |yaml: &str| -> Vec<String> {
            let (state, errors) = run(yaml);
            assert!(errors.is_empty(), "{errors:?}");
            state.frontends[&web_frontend()]
                .source_ranges
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(
            ranges(&annotated("", "10.0.0.0/8, 203.0.113.7")),
            ["10.0.0.0/8", "203.0.113.7/32"]
        );
        assert_eq!(
            ranges(&annotated(
                "  loadBalancerSourceRanges:\n  - 198.51.100.0/24\n",
                "10.0.0.0/8"
            )),
            ["198.51.100.0/24"]
        );
        let (state, errors) = run(&annotated("", "10.0.0.0/8,any"));
        assert!(state.frontends.is_empty(), "an invalid entry must close it");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("load-balancer-source-ranges"),
            "{errors:?}"
        );
    }

    #[test]
    fn invalid_source_range_withdraws_the_whole_service() {
        for bad in ["10.0.0.0/33", "10.0.0/8", "10.0.0.0/+8", "", "any"] {
            let spec = format!("  loadBalancerSourceRanges:\n  - 10.0.0.0/8\n  - {bad:?}\n");
            let yaml = service("web", &spec, HTTP_PORT)
                + &service("api", "", HTTP_PORT.replace("80", "81").as_str());
            let (state, errors) = run(&yaml);
            assert_eq!(
                errors,
                [format!(
                    "Service shop/web: loadBalancerSourceRanges entry {bad:?} is not a CIDR or \
                     an IP address; Service skipped so that it is not open to every source"
                )]
            );
            // Only the other Service remains.
            assert!(
                state
                    .frontends
                    .values()
                    .all(|spec| spec.service.name == "api"),
                "{bad}"
            );
            assert_eq!(state.frontends.len(), 1);
        }
    }

    #[test]
    fn parse_source_range_rejects_leading_zeros_and_zones() {
        for bad in [
            "010.0.0.0/8",
            "fe80::1%eth0",
            "10.0.0.0/ 8",
            "2001:db8::/129",
        ] {
            assert_eq!(parse_source_range(bad), None, "{bad}");
        }
        assert_eq!(
            parse_source_range("10.1.0.0/08"),
            Some(SourceRange {
                addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)),
                prefix_len: 8
            })
        );
    }

    #[test]
    fn parse_source_range_accepts_ipv6() {
        assert_eq!(
            parse_source_range("2001:db8::1/32"),
            Some(SourceRange {
                addr: "2001:db8::".parse().unwrap(),
                prefix_len: 32
            })
        );
        assert_eq!(
            parse_source_range("0.0.0.0/0"),
            Some(SourceRange {
                addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                prefix_len: 0
            })
        );
    }

    /// `shop/web`, port http 80 → 8080, with the given families and
    /// ingress addresses; `extra` is more spec lines.
    fn family_service(families: &str, policy: &str, ingress: &[&str], extra: &str) -> String {
        let ingress: String = ingress
            .iter()
            .map(|ip| format!("    - ip: \"{ip}\"\n"))
            .collect();
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\n\
             spec:\n  type: LoadBalancer\n  ipFamilyPolicy: {policy}\n  ipFamilies: {families}\n\
             {extra}  ports:\n{HTTP_PORT}\
             status:\n  loadBalancer:\n    ingress:\n{ingress}---\n"
        )
    }

    fn ipv6_slice(name: &str, endpoints: &str) -> String {
        slice(name, "web", SLICE_HTTP_PORT, endpoints)
            .replace("addressType: IPv4", "addressType: IPv6")
    }

    fn at(address: &str, port: u16) -> Frontend {
        Frontend {
            addr: address.parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
        }
    }

    fn backend_at(address: &str, port: u16, local: bool) -> Backend {
        Backend {
            addr: address.parse().unwrap(),
            port,
            local,
            terminating: false,
        }
    }

    #[test]
    fn a_dual_stack_service_is_a_frontend_per_family_each_with_its_familys_endpoints() {
        let fqdn = slice(
            "web-dns",
            "web",
            SLICE_HTTP_PORT,
            "- addresses: [\"backend.example\"]\n",
        )
        .replace("addressType: IPv4", "addressType: FQDN");
        let yaml = family_service(
            "[IPv6, IPv4]",
            "RequireDualStack",
            &["192.0.2.10", "2001:db8::10"],
            "  loadBalancerSourceRanges: [\"198.51.100.0/24\", \"2001:db8:100::/48\"]\n",
        ) + &slice(
            "web-4",
            "web",
            SLICE_HTTP_PORT,
            &(endpoint("10.1.0.4", NODE, "{}") + &endpoint("10.1.0.5", "node-2", "{}")),
        ) + &ipv6_slice(
            "web-6",
            &(endpoint("\"fd00:10:1::4\"", NODE, "{}")
                + &endpoint("\"fd00:10:1::5\"", "node-2", "{ready: false}")),
        ) + &fqdn;
        let (state, errors) = run(&yaml);
        assert!(errors.is_empty(), "{errors:?}");
        let frontends: Vec<String> = state.frontends.keys().map(ToString::to_string).collect();
        assert_eq!(frontends, ["192.0.2.10:80/TCP", "[2001:db8::10]:80/TCP"]);
        let ipv4 = &state.frontends[&at("192.0.2.10", 80)];
        assert_eq!(
            ipv4.backends,
            [
                backend_at("10.1.0.4", 8080, true),
                backend_at("10.1.0.5", 8080, false)
            ]
        );
        let ipv6 = &state.frontends[&at("2001:db8::10", 80)];
        assert_eq!(ipv6.backends, [backend_at("fd00:10:1::4", 8080, true)]);
        // Both families' ranges on both frontends: the trie key carries the
        // family, so each range only ever matches clients of its own.
        let ranges: Vec<String> = ipv6.source_ranges.iter().map(ToString::to_string).collect();
        assert_eq!(ranges, ["198.51.100.0/24", "2001:db8:100::/48"]);
        assert_eq!(ipv4.source_ranges, ipv6.source_ranges);
    }

    #[test]
    fn ranges_of_one_family_keep_the_other_familys_frontend_closed() {
        let yaml = family_service(
            "[IPv4, IPv6]",
            "PreferDualStack",
            &["192.0.2.10", "2001:db8::10"],
            "",
        )
        .replace(
            "metadata:\n  name: web\n",
            "metadata:\n  name: web\n  annotations:\n    \
             service.beta.kubernetes.io/load-balancer-source-ranges: \"2001:db8:100::/48\"\n",
        );
        let (state, errors) = run(&yaml);
        assert!(errors.is_empty(), "{errors:?}");
        // The IPv4 frontend has ranges (all IPv6): flagged, so no IPv4
        // client is let in, rather than every one.
        for address in ["192.0.2.10", "2001:db8::10"] {
            let spec = &state.frontends[&at(address, 80)];
            assert_eq!(spec.source_ranges.len(), 1, "{address}");
            let value = crate::encode::service_value(1, spec);
            assert_ne!(value.flags & lb_common::SERVICE_F_SOURCE_RANGES, 0);
        }
    }

    #[test]
    fn a_single_stack_ipv6_service_takes_ipv6_addresses_and_slices_only() {
        let yaml = family_service("[IPv6]", "SingleStack", &["2001:db8::10", "192.0.2.10"], "")
            + &ipv6_slice(
                "web-6",
                &(endpoint("\"fd00:10:1::4\"", NODE, "{}") + "- addresses: [\"10.1.0.9\"]\n"),
            )
            + &slice(
                "web-4",
                "web",
                SLICE_HTTP_PORT,
                &endpoint("10.1.0.4", NODE, "{}"),
            );
        let (state, errors) = run(&yaml);
        assert_eq!(
            errors,
            [
                "Service shop/web: status.loadBalancer.ingress ip 192.0.2.10 is IPv4, a family \
                 the Service does not have (ipFamilies: IPv6); address skipped",
                "EndpointSlice shop/web-6: endpoint address \"10.1.0.9\" is not an IPv6 address; \
                 address skipped",
            ]
        );
        let frontends: Vec<Frontend> = state.frontends.keys().copied().collect();
        assert_eq!(frontends, [at("2001:db8::10", 80)]);
        assert_eq!(
            state.frontends[&at("2001:db8::10", 80)].backends,
            [backend_at("fd00:10:1::4", 8080, true)]
        );
    }

    #[test]
    fn an_ipv6_load_balancer_ip_alone_is_never_a_frontend_either() {
        let yaml = family_service(
            "[IPv6]",
            "SingleStack",
            &[],
            "  loadBalancerIP: 2001:db8::20\n",
        )
        .replace("    ingress:\n", "    ingress: []\n");
        let (state, errors) = run(&yaml);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(state.frontends.is_empty(), "{:?}", state.frontends);
    }

    #[test]
    fn the_terminating_fallback_is_decided_per_family() {
        // IPv4 has a ready endpoint, IPv6 only a terminating one: the IPv6
        // frontend falls back to it without the IPv4 one doing so.
        let yaml = family_service(
            "[IPv4, IPv6]",
            "RequireDualStack",
            &["192.0.2.10", "2001:db8::10"],
            "",
        ) + &slice(
            "web-4",
            "web",
            SLICE_HTTP_PORT,
            &(endpoint("10.1.0.4", NODE, "{}")
                + &endpoint(
                    "10.1.0.5",
                    NODE,
                    "{ready: false, serving: true, terminating: true}",
                )),
        ) + &ipv6_slice(
            "web-6",
            &endpoint(
                "\"fd00:10:1::5\"",
                NODE,
                "{ready: false, serving: true, terminating: true}",
            ),
        );
        let (state, errors) = run(&yaml);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            state.frontends[&at("192.0.2.10", 80)].backends,
            [backend_at("10.1.0.4", 8080, true)]
        );
        assert_eq!(
            state.frontends[&at("2001:db8::10", 80)].backends,
            [Backend {
                terminating: true,
                ..backend_at("fd00:10:1::5", 8080, true)
            }]
        );
    }
}
