//! Which Service holds a frontend that several ask for, kept current one
//! Service at a time: the [`Translator`] claims each Service's frontends
//! in [`Order`], withdraws them when the Service changes or goes, and
//! reports the Services left waiting.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

use super::{
    AddressMode,
    node_mode::{self, NodePlan},
    objects::{
        Objects, Order, ServiceKey, claim_order, cluster_networks, node_address_of,
        node_address_v6_of, slice_service,
    },
    problem::{EventReason, Problem, reference_to},
    service::{AddressSource, ServiceContext},
};
use crate::model::{DesiredState, Frontend, FrontendSpec};

/// What one Service translated to: its frontends (their specs live in
/// [`Claims`] or, for the holder, in the desired state).
struct Translated {
    order: Order,
    /// Where its Events go: with the key, all of the reference (an
    /// `ObjectReference` per Service would cost a few MiB at 10 000).
    uid: Option<String>,
    resource_version: Option<String>,
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
/// [`super::translate`] is the same machine fed every Service at once.
pub struct Translator {
    node_name: String,
    node_plan: Option<NodePlan>,
    /// Pool mode: each Service's assigned addresses.
    assigned: Option<BTreeMap<ServiceKey, Vec<IpAddr>>>,
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
    ) -> (Translator, Vec<Problem>) {
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
    ) -> (Translator, Vec<Problem>) {
        Self::build_assigned(
            services,
            endpoint_slices,
            nodes,
            node_name,
            mode,
            BTreeMap::new(),
        )
    }

    /// [`Translator::build_from`]; in pool mode with the allocator's
    /// `assigned` addresses (ignored in the other modes).
    pub fn build_assigned(
        services: &[&Service],
        endpoint_slices: &[&EndpointSlice],
        nodes: &[Node],
        node_name: &str,
        mode: AddressMode,
        assigned: BTreeMap<ServiceKey, Vec<IpAddr>>,
    ) -> (Translator, Vec<Problem>) {
        let mut slices_by_service: HashMap<ServiceKey, Vec<&EndpointSlice>> = HashMap::new();
        for &slice in endpoint_slices {
            if let Some(key) = slice_service(slice) {
                slices_by_service.entry(key).or_default().push(slice);
            }
        }
        Self::build_with(
            services,
            |key| slices_by_service.get(key).cloned().unwrap_or_default(),
            nodes,
            node_name,
            mode,
            assigned,
        )
    }

    /// [`Translator::build_assigned`] with each Service's EndpointSlices
    /// asked for when it is translated, so that a source whose cache must
    /// decode them holds one Service's slices at a time, not all of them.
    pub fn build_with<S: std::borrow::Borrow<EndpointSlice>>(
        services: &[&Service],
        mut slices_of: impl FnMut(&ServiceKey) -> Vec<S>,
        nodes: &[Node],
        node_name: &str,
        mode: AddressMode,
        assigned: BTreeMap<ServiceKey, Vec<IpAddr>>,
    ) -> (Translator, Vec<Problem>) {
        let mut translator = Translator {
            node_name: node_name.to_owned(),
            node_plan: match mode {
                AddressMode::Status | AddressMode::Pool => None,
                AddressMode::Node => {
                    Some(NodePlan::new(nodes, node_name, services.iter().copied()))
                }
            },
            assigned: (mode == AddressMode::Pool).then_some(assigned),
            services: HashMap::new(),
            claims: HashMap::new(),
            desired: DesiredState {
                node_addr: node_address_of(nodes, node_name),
                node_addr_v6: node_address_v6_of(nodes, node_name),
                cluster_networks: cluster_networks(nodes),
                ..DesiredState::default()
            },
        };
        let mut problems = Vec::new();
        let mut changed = BTreeSet::new();
        // In claim order, so that conflicts are reported on the later
        // Service. Stable: of two definitions of one Service, the first read
        // comes first.
        for service in claim_order(services.iter().copied()) {
            if service.metadata.name.is_none() {
                problems.push(Problem::new(
                    reference_to(service),
                    EventReason::InvalidSpec,
                    "metadata.name missing; Service skipped".to_owned(),
                ));
                continue;
            }
            let key = ServiceKey::of(service);
            if translator.services.contains_key(&key) {
                problems.push(Problem::new(
                    reference_to(service),
                    EventReason::InvalidSpec,
                    "defined more than once; the first definition is used".to_owned(),
                ));
                continue;
            }
            let slices = slices_of(&key);
            let slices: Vec<&EndpointSlice> = slices.iter().map(|s| s.borrow()).collect();
            translator.update(&key, Some(service), &slices, &mut problems, &mut changed);
        }
        let frontends = std::mem::take(&mut translator.desired.frontends);
        translator.desired.frontends = crate::reconcile::compact(frontends);
        (translator, problems)
    }

    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    pub fn into_desired(self) -> DesiredState {
        self.desired
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

    /// Pool mode: takes the allocator's new answer and returns the Services
    /// whose addresses changed, which must then be [`Translator::update`]d.
    pub fn reassign(
        &mut self,
        assigned: BTreeMap<ServiceKey, Vec<IpAddr>>,
    ) -> BTreeSet<ServiceKey> {
        let Some(before) = self.assigned.as_mut() else {
            return BTreeSet::new();
        };
        let mut moved: BTreeSet<ServiceKey> = assigned
            .iter()
            .filter(|(key, addresses)| before.get(*key) != Some(*addresses))
            .map(|(key, _)| key.clone())
            .collect();
        moved.extend(
            before
                .keys()
                .filter(|key| !assigned.contains_key(*key))
                .cloned(),
        );
        *before = assigned;
        moved
    }

    /// Re-translates Service `key`: `service` is its current version (`None`
    /// when it is gone or not handled) and `slices` its EndpointSlices.
    /// Frontends whose spec changed (added, changed, removed) go into
    /// `changed`; problems of this Service into `problems`.
    pub fn update(
        &mut self,
        key: &ServiceKey,
        service: Option<&Service>,
        slices: &[&EndpointSlice],
        problems: &mut Vec<Problem>,
        changed: &mut BTreeSet<Frontend>,
    ) {
        let mut touched = BTreeSet::new();
        let mut frontends = Vec::new();
        if let Some(service) = service {
            let mut slices = slices.to_vec();
            slices.sort_by(|left, right| left.metadata.name.cmp(&right.metadata.name));
            let addresses = match (&self.node_plan, &self.assigned) {
                (Some(plan), _) => AddressSource::Node(plan),
                (None, Some(assigned)) => {
                    AddressSource::Pool(assigned.get(key).map(Vec::as_slice).unwrap_or_default())
                }
                (None, None) => AddressSource::Status,
            };
            let mut context =
                ServiceContext::new(service, key, &self.node_name, addresses, problems);
            for (frontend, spec) in context.frontends(service, &slices) {
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
        let order = service.map(|service| Order {
            created: service.metadata.creation_timestamp.clone(),
            key: key.clone(),
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
                    uid: service.and_then(|s| s.metadata.uid.clone()),
                    resource_version: service.and_then(|s| s.metadata.resource_version.clone()),
                    frontends: claimed,
                },
            );
        }

        for (frontend, (spec_before, holder_before)) in before {
            if self.desired.frontends.get(&frontend) != spec_before.as_ref() {
                changed.insert(frontend);
            }
            self.report_waiting(&frontend, key, holder_before.as_ref(), problems);
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
        problems: &mut Vec<Problem>,
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
            if waiting.key == *updated || holder_before == Some(waiting) {
                let mut object = waiting.key.object_reference();
                if let Some(translated) = self.services.get(&waiting.key) {
                    object.uid = translated.uid.clone();
                    object.resource_version = translated.resource_version.clone();
                }
                problems.push(Problem::new(
                    object,
                    EventReason::AddressConflict,
                    format!(
                        "frontend {frontend} is already used by Service {holder}, which was \
                         created first and keeps it; frontend skipped"
                    ),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{super::fixtures::*, *};
    use crate::translate::{objects::SERVICE_NAME_LABEL, translate};

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
        let ipv4 = format!("192.0.2.{}", 1 + rng.below(3));
        let ipv6 = format!("2001:db8::{}", 1 + rng.below(3));
        // Either family, both, and families of the ingress the Service does
        // not have.
        let ingress = match rng.below(3) {
            0 => json!([{"ip": ipv4}]),
            1 => json!([{"ip": ipv6}]),
            _ => json!([{"ip": ipv4}, {"ip": ipv6}]),
        };
        let (policy, families) = match rng.below(5) {
            0 => (json!(null), json!(null)),
            1 => (json!("SingleStack"), json!(["IPv6"])),
            2 => (json!("PreferDualStack"), json!(["IPv4", "IPv6"])),
            3 => (json!("RequireDualStack"), json!(["IPv6", "IPv4"])),
            _ => (json!("SingleStack"), json!(["IPv4"])),
        };
        let mut ports = vec![json!({"name": "a", "port": 80 + rng.below(2), "protocol": "TCP"})];
        if rng.below(2) == 0 {
            ports.push(json!({"name": "b", "port": 53, "protocol": "UDP"}));
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns",
                         "creationTimestamp": format!("2026-01-01T00:{:02}:00Z", created % 60)},
            "spec": {"type": "LoadBalancer", "ports": ports,
                     "ipFamilyPolicy": policy, "ipFamilies": families,
                     "externalTrafficPolicy": if rng.below(3) == 0 { "Local" } else { "Cluster" }},
            "status": {"loadBalancer": {"ingress": ingress}}
        }))
        .unwrap()
    }

    /// An IPv4 or an IPv6 slice (named apart, so a Service may have both).
    fn random_slice(rng: &mut Rng, service: &str) -> EndpointSlice {
        let ipv6 = rng.below(2) == 0;
        let endpoints: Vec<_> = (0..rng.below(4))
            .map(|i| {
                let address = if ipv6 {
                    format!("fd00:244:{}::{}", rng.below(3), i + 2)
                } else {
                    format!("10.244.{}.{}", rng.below(3), i + 2)
                };
                json!({"addresses": [address],
                       "nodeName": if rng.below(2) == 0 { "node-1" } else { "node-2" },
                       "conditions": {"ready": rng.below(4) != 0}})
            })
            .collect();
        let (suffix, address_type) = if ipv6 { ("y", "IPv6") } else { ("x", "IPv4") };
        serde_json::from_value(json!({
            "metadata": {"name": format!("{service}-{suffix}"), "namespace": "ns",
                         "labels": {SERVICE_NAME_LABEL: service}},
            "addressType": address_type,
            "ports": [{"name": "a", "port": 8080, "protocol": "TCP"},
                      {"name": "b", "port": 5353, "protocol": "UDP"}],
            "endpoints": endpoints
        }))
        .unwrap()
    }

    fn node() -> k8s_openapi::api::core::v1::Node {
        serde_json::from_value(json!({"metadata": {"name": "node-1"},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"},
                                     {"type": "InternalIP", "address": "fd00::1"}]}}))
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
        // Both families were exercised, not only generated.
        let mut seen_families = BTreeSet::new();
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
                        .retain(|s| slice_service(s) != Some(ServiceKey::new("ns", name)));
                }
                // Change its slice.
                (1, Some(_)) => {
                    objects
                        .endpoint_slices
                        .retain(|s| slice_service(s) != Some(ServiceKey::new("ns", name)));
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
                    // Often a slice of the other family too.
                    let other = random_slice(&mut rng, name);
                    if !objects
                        .endpoint_slices
                        .iter()
                        .any(|s| s.metadata.name == other.metadata.name)
                    {
                        objects.endpoint_slices.push(other);
                    }
                }
            }

            let before = translator.desired().clone();
            let key = ServiceKey::new("ns", name);
            let mut keys = translator.reallocate(&objects.services);
            keys.insert(key);
            let mut changed = BTreeSet::new();
            let mut errors = Vec::new();
            for key in &keys {
                let service = objects
                    .services
                    .iter()
                    .find(|s| s.metadata.name.as_deref() == Some(key.name.as_str()));
                let slices: Vec<&EndpointSlice> = objects
                    .endpoint_slices
                    .iter()
                    .filter(|s| slice_service(s).as_ref() == Some(key))
                    .collect();
                translator.update(key, service, &slices, &mut errors, &mut changed);
            }

            let (full, _) = translate(&objects, "node-1", mode);
            seen_families.extend(
                full.frontends
                    .iter()
                    .filter(|(_, spec)| !spec.backends.is_empty())
                    .map(|(frontend, _)| frontend.addr.is_ipv6()),
            );
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
        assert_eq!(seen_families.len(), 2, "({mode:?}, seed {seed})");
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
        let key = |name: &str| ServiceKey::new("ns", name);
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
        assert_eq!(errors[0].object.kind.as_deref(), Some("Service"));
        assert_eq!(errors[0].object.namespace.as_deref(), Some("ns"));
        assert_eq!(errors[0].object.name.as_deref(), Some("younger"));
        assert_eq!(errors[0].reason, EventReason::AddressConflict);
        assert_eq!(errors[0].reason.as_str(), "AddressConflict");
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
}
