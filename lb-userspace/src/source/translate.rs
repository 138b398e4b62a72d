//! Kubernetes objects → [`DesiredState`], with the semantics a node agent for
//! `type: LoadBalancer` Services must have to stand in for kube-proxy and
//! K3s ServiceLB:
//!
//! - frontends: every IPv4 `status.loadBalancer.ingress[].ip` (and
//!   `spec.loadBalancerIP`) × every `spec.ports[]`;
//! - backends: the Service's EndpointSlices (label
//!   `kubernetes.io/service-name`), whose ports are named after the Service
//!   ports and carry the already resolved target port;
//! - ready endpoints, else serving-and-terminating ones (KEP-1669,
//!   "ProxyTerminatingEndpoints"), chosen among the local endpoints only with
//!   `externalTrafficPolicy: Local`;
//! - `loadBalancerSourceRanges` fail closed: one invalid entry withdraws the
//!   whole Service rather than opening it to every source.
//!
//! A problem with one Service, port, address or EndpointSlice is reported and
//! skips only that part; everything else is still translated.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::{
    api::{
        core::v1::{Node, Service, ServicePort, ServiceSpec},
        discovery::v1::{EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{
        apis::meta::v1::{ObjectMeta, Time},
        util::intstr::IntOrString,
    },
};

use super::{manifest::Objects, node_mode};
use crate::model::{
    Backend, DesiredState, Frontend, FrontendSpec, Protocol, ServiceRef, SourceRange,
};

/// Label by which an EndpointSlice names the Service it belongs to.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `sessionAffinityConfig.clientIP.timeoutSeconds` default and maximum, as
/// the API server applies and validates them (3 hours, 1 day).
const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
const MAX_AFFINITY_TIMEOUT: u32 = 86_400;

/// A part of an object that could not be translated and was skipped.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {reason}")]
pub struct TranslateError {
    /// Kind and `namespace/name`: `Service shop/web`, `EndpointSlice shop/web-x2vzq`.
    pub object: String,
    pub reason: String,
    /// The `reason` of the Kubernetes Event that reports it.
    pub event_reason: &'static str,
}

/// Event reasons of [`TranslateError`]s.
pub const INVALID_SPEC: &str = "InvalidSpec";
/// Two Services ask for the same frontend; the later one loses it.
pub const ADDRESS_CONFLICT: &str = "AddressConflict";
/// Node mode: the later of two Services on one port stays pending.
pub const PORT_CONFLICT: &str = "PortConflict";

/// Where a Service's frontend addresses come from (`--address-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AddressMode {
    /// MetalLB-style: `status.loadBalancer.ingress` (and
    /// `spec.loadBalancerIP`), assigned by whoever owns the addresses; xlb
    /// writes nothing.
    #[default]
    Status,
    /// K3s ServiceLB-style: the addresses of the nodes that run xlb, which
    /// the elected leader writes into `status.loadBalancer.ingress`.
    Node,
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
) -> (DesiredState, Vec<TranslateError>) {
    let (translator, errors) = Translator::build(objects, node_name, mode);
    (translator.desired, errors)
}

/// `namespace/name` of a Service.
pub type ServiceKey = node_mode::ServiceKey;

/// Claim order of a Service: creation time, then `namespace/name`.
type Order = (Option<Time>, String, String);

/// What one Service translated to: its frontends (their specs live in
/// [`Claims`] or, for the holder, in the desired state).
struct Translated {
    order: Order,
    frontends: Vec<Frontend>,
}

/// The Services that claim one frontend. Each spec is stored once: the
/// holder's (first in [`Order`]) is the desired state's, the others wait
/// here for the holder to let go.
struct Claims {
    holder: Order,
    waiting: BTreeMap<Order, FrontendSpec>,
}

/// The translation, kept current one Service at a time: a source that knows
/// which Services changed (a watch event on a Service or one of its
/// EndpointSlices) re-translates only those, and learns which frontends
/// changed, so one event costs O(that Service), not O(all Services).
/// [`translate`] is the same machine fed every Service at once.
pub struct Translator {
    node_name: String,
    node_plan: Option<NodePlan>,
    services: HashMap<ServiceKey, Translated>,
    claims: HashMap<Frontend, Claims>,
    desired: DesiredState,
}

impl Translator {
    /// A translator for `node_name` with the Nodes of `objects`, and every
    /// Service of `objects` translated; plus what could not be translated.
    pub fn build(
        objects: &Objects,
        node_name: &str,
        mode: AddressMode,
    ) -> (Translator, Vec<TranslateError>) {
        let services: Vec<&Service> = objects.services.iter().collect();
        let slices: Vec<&EndpointSlice> = objects.endpoint_slices.iter().collect();
        Self::build_from(&services, &slices, &objects.nodes, node_name, mode)
    }

    /// [`Translator::build`] on borrowed objects (a watch cache's), so that
    /// a rebuild does not copy every object first.
    pub fn build_from(
        services: &[&Service],
        endpoint_slices: &[&EndpointSlice],
        nodes: &[Node],
        node_name: &str,
        mode: AddressMode,
    ) -> (Translator, Vec<TranslateError>) {
        let mut translator = Translator {
            node_name: node_name.to_owned(),
            node_plan: match mode {
                AddressMode::Status => None,
                AddressMode::Node => Some(NodePlan {
                    addresses: node_mode::own_addresses(nodes, node_name),
                    allocation: node_mode::allocate(services.iter().copied()),
                }),
            },
            services: HashMap::new(),
            claims: HashMap::new(),
            desired: DesiredState {
                node_addr: node_address_of(nodes, node_name),
                ..DesiredState::default()
            },
        };
        let mut errors = Vec::new();
        let mut slices_by_service: HashMap<ServiceKey, Vec<&EndpointSlice>> = HashMap::new();
        for &slice in endpoint_slices {
            if let Some(key) = slice_service(slice) {
                slices_by_service.entry(key).or_default().push(slice);
            }
        }
        let mut changed = BTreeSet::new();
        // In claim order, so that conflicts are reported on the later
        // Service. Stable: of two definitions of one Service, the first read
        // comes first.
        for service in node_mode::claim_order(services.iter().copied()) {
            let namespace = namespace_of(&service.metadata);
            let Some(name) = service.metadata.name.as_deref() else {
                errors.push(TranslateError {
                    object: format!("Service {namespace}/(unnamed)"),
                    reason: "metadata.name missing; Service skipped".to_owned(),
                    event_reason: INVALID_SPEC,
                });
                continue;
            };
            let key = (namespace.to_owned(), name.to_owned());
            if translator.services.contains_key(&key) {
                errors.push(TranslateError {
                    object: format!("Service {namespace}/{name}"),
                    reason: "defined more than once; the first definition is used".to_owned(),
                    event_reason: INVALID_SPEC,
                });
                continue;
            }
            let slices = slices_by_service.get(&key).map(Vec::as_slice);
            translator.update(
                &key,
                Some(service),
                slices.unwrap_or_default(),
                &mut errors,
                &mut changed,
            );
        }
        (translator, errors)
    }

    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// Node mode: re-runs the port allocation over `services` (every Service
    /// xlb handles) and returns the Services whose pending state changed,
    /// which must then be [`Translator::update`]d.
    pub fn reallocate<'a>(
        &mut self,
        services: impl IntoIterator<Item = &'a Service>,
    ) -> BTreeSet<ServiceKey> {
        let Some(plan) = self.node_plan.as_mut() else {
            return BTreeSet::new();
        };
        let allocation = node_mode::allocate(services);
        let mut moved = BTreeSet::new();
        for (key, conflict) in &allocation.pending {
            if plan.allocation.pending.get(key) != Some(conflict) {
                moved.insert(key.clone());
            }
        }
        for key in plan.allocation.pending.keys() {
            if !allocation.pending.contains_key(key) {
                moved.insert(key.clone());
            }
        }
        plan.allocation = allocation;
        moved
    }

    /// Re-translates Service `key`: `service` is its current version (`None`
    /// when it is gone or not handled) and `slices` its EndpointSlices.
    /// Frontends whose spec changed (added, changed, removed) go into
    /// `changed`; problems of this Service into `errors`.
    pub fn update(
        &mut self,
        key: &ServiceKey,
        service: Option<&Service>,
        slices: &[&EndpointSlice],
        errors: &mut Vec<TranslateError>,
        changed: &mut BTreeSet<Frontend>,
    ) {
        let mut touched = BTreeSet::new();
        let mut frontends = Vec::new();
        if let Some(service) = service {
            let mut slices = slices.to_vec();
            slices.sort_by(|left, right| left.metadata.name.cmp(&right.metadata.name));
            let mut context = ServiceContext {
                object: format!("Service {}/{}", key.0, key.1),
                namespace: &key.0,
                name: &key.1,
                node_name: &self.node_name,
                node_plan: self.node_plan.as_ref(),
                errors,
            };
            for (frontend, spec) in context.translate(service, &slices) {
                if frontends.iter().any(|(f, _)| *f == frontend) {
                    context.report(format!(
                        "frontend {frontend} listed twice (same port and protocol); the first \
                         port is used"
                    ));
                } else {
                    frontends.push((frontend, spec));
                }
            }
        }
        let order = service.map(|service| {
            (
                service.metadata.creation_timestamp.clone(),
                key.0.clone(),
                key.1.clone(),
            )
        });
        touched.extend(frontends.iter().map(|(frontend, _)| *frontend));
        if let Some(old) = self.services.get(key) {
            touched.extend(old.frontends.iter().copied());
        }
        let before: BTreeMap<Frontend, (Option<FrontendSpec>, Option<Order>)> = touched
            .iter()
            .map(|frontend| {
                let holder = self.claims.get(frontend).map(|c| c.holder.clone());
                (
                    *frontend,
                    (self.desired.frontends.get(frontend).cloned(), holder),
                )
            })
            .collect();

        if let Some(old) = self.services.remove(key) {
            for frontend in &old.frontends {
                self.withdraw(frontend, &old.order);
            }
        }
        if let Some(order) = order {
            let mut claimed = Vec::with_capacity(frontends.len());
            for (frontend, spec) in frontends {
                claimed.push(frontend);
                self.claim(frontend, order.clone(), spec);
            }
            self.services.insert(
                key.clone(),
                Translated {
                    order,
                    frontends: claimed,
                },
            );
        }

        for (frontend, (spec_before, holder_before)) in before {
            if self.desired.frontends.get(&frontend) != spec_before.as_ref() {
                changed.insert(frontend);
            }
            self.report_waiting(&frontend, key, holder_before.as_ref(), errors);
        }
    }

    /// `order` claims `frontend` with `spec`: it holds it if it comes first.
    fn claim(&mut self, frontend: Frontend, order: Order, spec: FrontendSpec) {
        match self.claims.get_mut(&frontend) {
            None => {
                self.claims.insert(
                    frontend,
                    Claims {
                        holder: order,
                        waiting: BTreeMap::new(),
                    },
                );
                self.desired.frontends.insert(frontend, spec);
            }
            Some(claims) if order < claims.holder => {
                let previous = std::mem::replace(&mut claims.holder, order);
                if let Some(held) = self.desired.frontends.insert(frontend, spec) {
                    claims.waiting.insert(previous, held);
                }
            }
            Some(claims) => {
                claims.waiting.insert(order, spec);
            }
        }
    }

    /// `order` gives `frontend` up; the next in line takes it over.
    fn withdraw(&mut self, frontend: &Frontend, order: &Order) {
        let Some(claims) = self.claims.get_mut(frontend) else {
            return;
        };
        if claims.holder != *order {
            claims.waiting.remove(order);
            return;
        }
        match claims.waiting.pop_first() {
            Some((next, spec)) => {
                claims.holder = next;
                self.desired.frontends.insert(*frontend, spec);
            }
            None => {
                self.claims.remove(frontend);
                self.desired.frontends.remove(frontend);
            }
        }
    }

    /// A conflict on `frontend` is reported on the Service just updated if it
    /// waits, and on the previous holder if it just lost the frontend.
    fn report_waiting(
        &self,
        frontend: &Frontend,
        updated: &ServiceKey,
        holder_before: Option<&Order>,
        errors: &mut Vec<TranslateError>,
    ) {
        let Some(claims) = self.claims.get(frontend) else {
            return;
        };
        let Some(holder) = self
            .desired
            .frontends
            .get(frontend)
            .map(|s| s.service.to_string())
        else {
            return;
        };
        for waiting in claims.waiting.keys() {
            let is_updated = waiting.1 == updated.0 && waiting.2 == updated.1;
            if is_updated || holder_before == Some(waiting) {
                errors.push(TranslateError {
                    object: format!("Service {}/{}", waiting.1, waiting.2),
                    reason: format!(
                        "frontend {frontend} is already used by Service {holder}, which was \
                         created first and keeps it; frontend skipped"
                    ),
                    event_reason: ADDRESS_CONFLICT,
                });
            }
        }
    }
}

/// The Service an EndpointSlice belongs to, from its
/// `kubernetes.io/service-name` label.
pub fn slice_service(slice: &EndpointSlice) -> Option<ServiceKey> {
    let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some((namespace_of(&slice.metadata).to_owned(), service.clone()))
}

/// The first IPv4 `InternalIP` of the Node named `node_name`: the address
/// remote-backend flows are source-translated to.
pub fn node_address_of(nodes: &[Node], node_name: &str) -> Option<Ipv4Addr> {
    nodes
        .iter()
        .find(|node| node.metadata.name.as_deref() == Some(node_name))?
        .status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|address| address.type_ == "InternalIP")
        .find_map(|address| address.address.parse::<Ipv4Addr>().ok())
}

/// Objects without a namespace are in `default`, as the API server and
/// `kubectl apply` would place them.
fn namespace_of(metadata: &ObjectMeta) -> &str {
    metadata.namespace.as_deref().unwrap_or("default")
}

/// Node mode: this node's addresses and which Services are pending.
struct NodePlan {
    addresses: Vec<Ipv4Addr>,
    allocation: node_mode::Allocation,
}

/// One Service being translated, and where its problems go.
struct ServiceContext<'a> {
    /// `Service namespace/name`, for error messages.
    object: String,
    namespace: &'a str,
    name: &'a str,
    node_name: &'a str,
    node_plan: Option<&'a NodePlan>,
    errors: &'a mut Vec<TranslateError>,
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
    addresses: Vec<Ipv4Addr>,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
}

/// An IPv4 EndpointSlice of the Service, its addresses already parsed.
struct SliceView<'a> {
    object: String,
    ports: &'a [EndpointPort],
    endpoints: Vec<EndpointView>,
}

impl ServiceContext<'_> {
    fn report(&mut self, reason: String) {
        self.report_as(INVALID_SPEC, reason);
    }

    fn report_as(&mut self, event_reason: &'static str, reason: String) {
        self.errors.push(TranslateError {
            object: self.object.clone(),
            reason,
            event_reason,
        });
    }

    fn translate(
        &mut self,
        service: &Service,
        slices: &[&EndpointSlice],
    ) -> Vec<(Frontend, FrontendSpec)> {
        let Some(spec) = service.spec.as_ref() else {
            tracing::debug!(service = %self.object, "skipping Service without spec");
            return Vec::new();
        };
        if spec.type_.as_deref() != Some("LoadBalancer") {
            tracing::debug!(
                service = %self.object,
                r#type = spec.type_.as_deref().unwrap_or("ClusterIP"),
                "skipping Service that is not of type LoadBalancer"
            );
            return Vec::new();
        }
        // First, so that an invalid range withdraws the Service before
        // anything else is built for it.
        let Some(source_ranges) = self.source_ranges(spec) else {
            return Vec::new();
        };
        let local_only = self.local_only(spec);
        let affinity_timeout = self.affinity_timeout(spec);
        let ports = self.ports(spec);
        let addresses = match self.node_plan {
            None => self.frontend_addresses(service),
            Some(plan) => {
                let key = (self.namespace.to_owned(), self.name.to_owned());
                if let Some(conflict) = plan.allocation.pending.get(&key) {
                    self.report_as(PORT_CONFLICT, conflict.message());
                    return Vec::new();
                }
                plan.addresses.iter().copied().collect()
            }
        };
        if ports.is_empty() {
            return Vec::new();
        }
        if addresses.is_empty() {
            tracing::debug!(
                service = %self.object,
                "LoadBalancer Service has no address yet (pending)"
            );
            return Vec::new();
        }
        let slices: Vec<SliceView> = slices
            .iter()
            .filter_map(|slice| self.slice_view(slice))
            .collect();

        let mut frontends = Vec::new();
        for port in &ports {
            let backends = self.backends(port, &slices, local_only);
            tracing::debug!(
                service = %self.object,
                port = port.name(),
                backends = backends.len(),
                "translated Service port"
            );
            let service_ref = ServiceRef {
                namespace: self.namespace.to_owned(),
                name: self.name.to_owned(),
                port_name: port.name().to_owned(),
            };
            for &address in &addresses {
                let frontend = Frontend {
                    addr: IpAddr::V4(address),
                    port: port.number,
                    protocol: port.protocol,
                };
                let spec = FrontendSpec {
                    service: service_ref.clone(),
                    backends: backends.clone(),
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
    fn source_ranges(&mut self, spec: &ServiceSpec) -> Option<Vec<SourceRange>> {
        let mut ranges = Vec::new();
        for text in spec.load_balancer_source_ranges.iter().flatten() {
            match parse_source_range(text) {
                Some(range) => ranges.push(range),
                None => {
                    self.report(format!(
                        "loadBalancerSourceRanges entry {text:?} is not a CIDR or an IP \
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

    /// The addresses clients reach the Service at, deduplicated and sorted.
    fn frontend_addresses(&mut self, service: &Service) -> BTreeSet<Ipv4Addr> {
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
        let requested = service
            .spec
            .as_ref()
            .and_then(|spec| spec.load_balancer_ip.as_deref())
            .map(|text| ("spec.loadBalancerIP", text));

        let mut addresses = BTreeSet::new();
        for (field, text) in ingress.chain(requested) {
            if text.is_empty() {
                continue;
            }
            match text.parse::<IpAddr>() {
                Ok(IpAddr::V4(address)) => {
                    addresses.insert(address);
                }
                Ok(IpAddr::V6(_)) => self.report(format!(
                    "{field} {text} is IPv6, which xlb does not support yet; address skipped"
                )),
                Err(_) => self.report(format!(
                    "{field} {text:?} is not an IP address; address skipped"
                )),
            }
        }
        addresses
    }

    /// Parses an EndpointSlice of the Service once, reporting invalid
    /// addresses on the slice itself. `None` for slices of another address
    /// family.
    fn slice_view<'s>(&mut self, slice: &'s EndpointSlice) -> Option<SliceView<'s>> {
        let object = format!(
            "EndpointSlice {}/{}",
            namespace_of(&slice.metadata),
            slice.metadata.name.as_deref().unwrap_or("(unnamed)")
        );
        if slice.address_type != "IPv4" {
            tracing::debug!(
                slice = %object,
                address_type = %slice.address_type,
                "skipping EndpointSlice that is not IPv4"
            );
            return None;
        }
        let mut endpoints = Vec::new();
        for endpoint in slice.endpoints.iter().flatten() {
            let mut addresses = Vec::new();
            for text in &endpoint.addresses {
                match text.parse::<Ipv4Addr>() {
                    Ok(address) => addresses.push(address),
                    Err(_) => self.errors.push(TranslateError {
                        object: object.clone(),
                        reason: format!(
                            "endpoint address {text:?} is not an IPv4 address; address skipped"
                        ),
                        event_reason: INVALID_SPEC,
                    }),
                }
            }
            let conditions = endpoint.conditions.as_ref();
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            endpoints.push(EndpointView {
                addresses,
                ready,
                serving: conditions.and_then(|c| c.serving).unwrap_or(true),
                terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
                local: endpoint.node_name.as_deref() == Some(self.node_name),
            });
        }
        Some(SliceView {
            object,
            ports: slice.ports.as_deref().unwrap_or_default(),
            endpoints,
        })
    }

    /// The backends of one Service port, sorted and deduplicated.
    fn backends(
        &mut self,
        port: &ValidPort,
        slices: &[SliceView],
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
                    addr: IpAddr::V4(address),
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
                service = %self.object,
                port = port.name(),
                slice = %slice.object,
                "EndpointSlice has no port of this name and protocol"
            );
            return None;
        };
        if let Some(raw) = slice_port.port {
            let number = port_number(raw);
            if number.is_none() {
                self.errors.push(TranslateError {
                    object: slice.object.clone(),
                    reason: format!(
                        "port {:?} number {raw} out of range 1-65535; port skipped",
                        port.name()
                    ),
                    event_reason: INVALID_SPEC,
                });
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
                    service = %self.object,
                    target_port = %target,
                    slice = %slice.object,
                    "named targetPort, but the EndpointSlice port has no number to resolve it"
                );
                None
            }
        }
    }
}

/// A Service port's protocol, TCP when unset; `None` for protocols xlb does
/// not handle (SCTP).
pub(super) fn port_protocol(port: &ServicePort) -> Option<Protocol> {
    match port.protocol.as_deref() {
        None | Some("TCP") => Some(Protocol::Tcp),
        Some("UDP") => Some(Protocol::Udp),
        Some(_) => None,
    }
}

pub(super) fn port_number(number: i32) -> Option<u16> {
    u16::try_from(number).ok().filter(|&number| number != 0)
}

/// A CIDR (`10.0.0.0/8`) or a bare address (one host), surrounding white
/// space ignored as kube-proxy does. Host bits are cleared, as Go's
/// `net.ParseCIDR` does, so `10.1.2.3/8` means `10.0.0.0/8`.
fn parse_source_range(text: &str) -> Option<SourceRange> {
    let text = text.trim();
    let (address_text, prefix_text) = match text.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix)),
        None => (text, None),
    };
    let address: IpAddr = address_text.parse().ok()?;
    let max_prefix: u8 = if address.is_ipv4() { 32 } else { 128 };
    let prefix_len = match prefix_text {
        None => max_prefix,
        // Digits only: u8's parser would also take "+8".
        Some(prefix) if !prefix.is_empty() && prefix.bytes().all(|b| b.is_ascii_digit()) => {
            let prefix_len: u8 = prefix.parse().ok()?;
            if prefix_len > max_prefix {
                return None;
            }
            prefix_len
        }
        Some(_) => return None,
    };
    let addr = match address {
        IpAddr::V4(address) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(address) & mask))
        }
        IpAddr::V6(address) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(address) & mask))
        }
    };
    Some(SourceRange { addr, prefix_len })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::source::manifest::{Format, parse};

    const NODE: &str = "node-1";

    /// Parses YAML through the manifest loader, as the agent does.
    fn objects(yaml: &str) -> Objects {
        let (objects, errors) = parse(Path::new("test.yaml"), Format::Yaml, yaml);
        assert!(errors.is_empty(), "manifest errors: {errors:?}");
        objects
    }

    fn run(yaml: &str) -> (DesiredState, Vec<String>) {
        let (state, errors) = translate(&objects(yaml), NODE, AddressMode::Status);
        (state, errors.iter().map(ToString::to_string).collect())
    }

    fn frontend(address: [u8; 4], port: u16, protocol: Protocol) -> Frontend {
        Frontend {
            addr: IpAddr::V4(Ipv4Addr::from(address)),
            port,
            protocol,
        }
    }

    fn backend(address: [u8; 4], port: u16, local: bool, terminating: bool) -> Backend {
        Backend {
            addr: IpAddr::V4(Ipv4Addr::from(address)),
            port,
            local,
            terminating,
        }
    }

    /// A LoadBalancer Service `shop/web` at 192.0.2.10; `spec` is extra
    /// spec lines (indented 2 spaces), `ports` the port list lines.
    fn service(name: &str, spec: &str, ports: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: shop\n\
             spec:\n  type: LoadBalancer\n{spec}  ports:\n{ports}\
             status:\n  loadBalancer:\n    ingress:\n    - ip: 192.0.2.10\n---\n"
        )
    }

    const HTTP_PORT: &str = "  - name: http\n    port: 80\n    targetPort: 8080\n";

    /// An EndpointSlice of `shop/<service>` with one port and the given
    /// endpoint lines.
    fn slice(name: &str, service: &str, port: &str, endpoints: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n\
             \x20 namespace: shop\n  labels:\n    kubernetes.io/service-name: {service}\n\
             addressType: IPv4\nports:\n{port}endpoints:\n{endpoints}---\n"
        )
    }

    const SLICE_HTTP_PORT: &str = "- name: http\n  port: 8080\n  protocol: TCP\n";

    fn endpoint(address: &str, node: &str, conditions: &str) -> String {
        format!("- addresses: [{address}]\n  nodeName: {node}\n  conditions: {conditions}\n")
    }

    fn web_frontend() -> Frontend {
        frontend([192, 0, 2, 10], 80, Protocol::Tcp)
    }

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
    fn ipv6_and_invalid_ingress_addresses_are_reported_and_skipped() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\n\
                    spec:\n  type: LoadBalancer\n  ports:\n  - port: 80\n\
                    status:\n  loadBalancer:\n    ingress:\n    - ip: 2001:db8::10\n\
                    \x20   - ip: not-an-ip\n    - ip: 192.0.2.10\n";
        let (state, errors) = run(yaml);
        assert_eq!(
            errors,
            [
                "Service shop/web: status.loadBalancer.ingress ip 2001:db8::10 is IPv6, which \
                 xlb does not support yet; address skipped",
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

    #[test]
    fn frontend_conflict_goes_to_the_service_that_sorts_first() {
        // Read in reverse order on purpose.
        let yaml = service("zeta", "", HTTP_PORT) + &service("alpha", "", HTTP_PORT);
        let (state, errors) = run(&yaml);
        assert_eq!(state.frontends[&web_frontend()].service.name, "alpha");
        assert_eq!(
            errors,
            [
                "Service shop/zeta: frontend 192.0.2.10:80/TCP is already used by Service \
              shop/alpha:http, which was created first and keeps it; frontend skipped"
            ]
        );
    }

    #[test]
    fn frontend_conflict_goes_to_the_service_created_first_whatever_its_name() {
        let created = |name: &str, at: &str| {
            service(name, "", HTTP_PORT).replacen(
                "namespace: shop\n",
                &format!("namespace: shop\n  creationTimestamp: \"{at}\"\n"),
                1,
            )
        };
        let yaml =
            created("alpha", "2026-02-01T00:00:00Z") + &created("zeta", "2026-01-01T00:00:00Z");
        let (state, errors) = run(&yaml);
        assert_eq!(state.frontends[&web_frontend()].service.name, "zeta");
        assert_eq!(errors.len(), 1);
        assert!(errors[0].starts_with("Service shop/alpha: "), "{errors:?}");
    }

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
        assert_eq!(errors[0].event_reason, PORT_CONFLICT);
        assert!(errors[0].reason.contains("shop/web"), "{errors:?}");

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
    }
}

#[cfg(test)]
mod incremental_tests {
    use serde_json::json;

    use super::*;

    /// xorshift: reproducible without a dependency.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// A Service whose address and ports come from small pools, so that
    /// Services often claim the same frontends.
    fn random_service(rng: &mut Rng, name: &str, created: u64) -> Service {
        let ip = format!("192.0.2.{}", 1 + rng.below(3));
        let mut ports = vec![json!({"name": "a", "port": 80 + rng.below(2), "protocol": "TCP"})];
        if rng.below(2) == 0 {
            ports.push(json!({"name": "b", "port": 53, "protocol": "UDP"}));
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns",
                         "creationTimestamp": format!("2026-01-01T00:{:02}:00Z", created % 60)},
            "spec": {"type": "LoadBalancer", "ports": ports,
                     "externalTrafficPolicy": if rng.below(3) == 0 { "Local" } else { "Cluster" }},
            "status": {"loadBalancer": {"ingress": [{"ip": ip}]}}
        }))
        .unwrap()
    }

    fn random_slice(rng: &mut Rng, service: &str) -> EndpointSlice {
        let endpoints: Vec<_> = (0..rng.below(4))
            .map(|i| {
                json!({"addresses": [format!("10.244.{}.{}", rng.below(3), i + 2)],
                       "nodeName": if rng.below(2) == 0 { "node-1" } else { "node-2" },
                       "conditions": {"ready": rng.below(4) != 0}})
            })
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": format!("{service}-x"), "namespace": "ns",
                         "labels": {SERVICE_NAME_LABEL: service}},
            "addressType": "IPv4",
            "ports": [{"name": "a", "port": 8080, "protocol": "TCP"},
                      {"name": "b", "port": 5353, "protocol": "UDP"}],
            "endpoints": endpoints
        }))
        .unwrap()
    }

    fn node() -> k8s_openapi::api::core::v1::Node {
        serde_json::from_value(json!({"metadata": {"name": "node-1"},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]}}))
        .unwrap()
    }

    /// Random changes to single Services, fed to the translator one at a
    /// time, always end where a full translation of the same objects ends,
    /// and report exactly the frontends whose spec changed.
    fn incremental_equals_full(mode: AddressMode, seed: u64) {
        let mut rng = Rng(seed);
        let names: Vec<String> = (0..12).map(|i| format!("s{i}")).collect();
        let mut objects = Objects {
            nodes: vec![node()],
            ..Objects::default()
        };
        let (mut translator, _) = Translator::build(&objects, "node-1", mode);
        let mut clock = 0;
        for step in 0..400 {
            let name = &names[rng.below(names.len() as u64) as usize];
            let present = objects
                .services
                .iter()
                .position(|s| s.metadata.name.as_deref() == Some(name.as_str()));
            match (rng.below(4), present) {
                // Delete it (and its slice).
                (0, Some(index)) => {
                    objects.services.remove(index);
                    objects
                        .endpoint_slices
                        .retain(|s| slice_service(s) != Some(("ns".into(), name.clone())));
                }
                // Change its slice.
                (1, Some(_)) => {
                    objects
                        .endpoint_slices
                        .retain(|s| slice_service(s) != Some(("ns".into(), name.clone())));
                    objects.endpoint_slices.push(random_slice(&mut rng, name));
                }
                // Change the Service, keeping its creation time.
                (_, Some(index)) => {
                    let created = objects.services[index].metadata.creation_timestamp.clone();
                    let mut service = random_service(&mut rng, name, 0);
                    service.metadata.creation_timestamp = created;
                    objects.services[index] = service;
                }
                // Create it.
                (_, None) => {
                    clock += 1;
                    objects.services.push(random_service(&mut rng, name, clock));
                    objects.endpoint_slices.push(random_slice(&mut rng, name));
                }
            }

            let before = translator.desired().clone();
            let key: ServiceKey = ("ns".into(), name.clone());
            let mut keys = translator.reallocate(&objects.services);
            keys.insert(key);
            let mut changed = BTreeSet::new();
            let mut errors = Vec::new();
            for key in &keys {
                let service = objects
                    .services
                    .iter()
                    .find(|s| s.metadata.name.as_deref() == Some(key.1.as_str()));
                let slices: Vec<&EndpointSlice> = objects
                    .endpoint_slices
                    .iter()
                    .filter(|s| slice_service(s).as_ref() == Some(key))
                    .collect();
                translator.update(key, service, &slices, &mut errors, &mut changed);
            }

            let (full, _) = translate(&objects, "node-1", mode);
            assert_eq!(
                translator.desired(),
                &full,
                "step {step} ({mode:?}, seed {seed})"
            );
            let differing: BTreeSet<Frontend> = before
                .frontends
                .keys()
                .chain(full.frontends.keys())
                .filter(|f| before.frontends.get(f) != full.frontends.get(f))
                .copied()
                .collect();
            assert_eq!(changed, differing, "step {step} ({mode:?}, seed {seed})");
        }
    }

    #[test]
    fn incremental_updates_equal_a_full_translation_in_status_mode() {
        for seed in [1, 7, 1234567] {
            incremental_equals_full(AddressMode::Status, seed);
        }
    }

    #[test]
    fn incremental_updates_equal_a_full_translation_in_node_mode() {
        for seed in [3, 99, 7654321] {
            incremental_equals_full(AddressMode::Node, seed);
        }
    }

    #[test]
    fn a_conflict_is_reported_on_the_later_service_also_when_the_earlier_comes_second() {
        let mut rng = Rng(5);
        let mut older = random_service(&mut rng, "older", 1);
        let mut younger = older.clone();
        younger.metadata.name = Some("younger".into());
        younger.metadata.creation_timestamp =
            random_service(&mut rng, "x", 2).metadata.creation_timestamp;
        for service in [&mut older, &mut younger] {
            let spec = service.spec.as_mut().unwrap();
            spec.ports.as_mut().unwrap().truncate(1);
        }
        let objects = Objects {
            nodes: vec![node()],
            ..Objects::default()
        };
        let (mut translator, _) = Translator::build(&objects, "node-1", AddressMode::Status);
        let (mut errors, mut changed) = (Vec::new(), BTreeSet::new());
        let key = |name: &str| ("ns".to_string(), name.to_string());
        translator.update(
            &key("younger"),
            Some(&younger),
            &[],
            &mut errors,
            &mut changed,
        );
        assert!(errors.is_empty());
        translator.update(&key("older"), Some(&older), &[], &mut errors, &mut changed);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].object, "Service ns/younger");
        assert_eq!(errors[0].event_reason, ADDRESS_CONFLICT);
        // An update of the holder does not repeat it.
        errors.clear();
        translator.update(&key("older"), Some(&older), &[], &mut errors, &mut changed);
        assert!(errors.is_empty(), "{errors:?}");
        let frontend = *translator.desired().frontends.keys().next().unwrap();
        assert_eq!(
            translator.desired().frontends[&frontend].service.name,
            "older"
        );
    }
}
