//! The allocator: pools and Services in, addresses per Service, problems
//! and pool usage out. Pure and deterministic: every agent that runs it on
//! the same objects gets the same answer, and an answer that is already in
//! the Services' status is kept as it is.
//!
//! Two passes over the Services in [`Order`] (created first, then by
//! name):
//! 1. **keep**: each address a Service already has in
//!    `status.loadBalancer.ingress` stays if a pool the Service may use
//!    still holds it, the Service still asks for it (family, requested
//!    address, named pool) and no Service earlier in the order holds it
//!    in a way that cannot be shared;
//! 2. **assign**: the families still missing get the requested address,
//!    else an address shared under the Service's `allow-shared-ip` key,
//!    else the lowest free address of the first pool (by priority) that
//!    may serve the Service.
//!
//! So a new Service never takes an address from one that has it, a new
//! leader (which reads the status its predecessor wrote) changes nothing,
//! and only a Service whose address left its pools moves.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Service};

use super::{
    IPS_ANNOTATION, POOL_ANNOTATION, Pool, Pools, SHARING_ANNOTATION, ranges::is_buggy_address,
};
use crate::{
    model::Protocol,
    translate::{
        EventReason, Order, Problem, ServiceKey,
        families::{Family, service_families},
        objects::{namespace_of, port_number, port_protocol},
        problem::reference_to,
    },
};

/// Labels of each Namespace, by name (for scopes with a namespace
/// selector).
pub type NamespaceLabels = BTreeMap<String, BTreeMap<String, String>>;

/// The labels of `namespaces`, by name.
pub fn namespace_labels<'a>(
    namespaces: impl IntoIterator<Item = &'a Namespace>,
) -> NamespaceLabels {
    namespaces
        .into_iter()
        .filter_map(|namespace| {
            Some((
                namespace.metadata.name.clone()?,
                namespace.metadata.labels.clone().unwrap_or_default(),
            ))
        })
        .collect()
}

/// What the allocator decided.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Allocation {
    /// Each Service's addresses, in its `spec.ipFamilies` order: what its
    /// `status.loadBalancer.ingress` should be. Services that get nothing
    /// are absent.
    pub assigned: BTreeMap<ServiceKey, Vec<IpAddr>>,
    /// Warnings: `AllocationFailed` on Services, pool problems on pools.
    pub problems: Vec<Problem>,
    /// `IPAllocated` (a Normal Event): a Service whose addresses differ
    /// from those in its status.
    pub allocated: Vec<Problem>,
    /// Addresses in use per pool and family.
    pub in_use: BTreeMap<String, BTreeMap<Family, u128>>,
}

/// What a Service asks for.
struct Request {
    key: ServiceKey,
    order: Order,
    object: ObjectReference,
    namespace: String,
    labels: BTreeMap<String, String>,
    /// In the Service's order of preference.
    families: Vec<Family>,
    /// Every family required (RequireDualStack), or only the first.
    all_required: bool,
    pool: Option<String>,
    requested: Vec<IpAddr>,
    previous: Vec<IpAddr>,
    holder: Holder,
}

/// What decides whether two Services may share an address.
#[derive(Clone, Debug)]
struct Holder {
    key: ServiceKey,
    sharing: Option<String>,
    ports: BTreeSet<(Protocol, u16)>,
    local: bool,
    selector: Option<BTreeMap<String, String>>,
}

impl Holder {
    /// Why `self` may not join `other` on one address, if it may not.
    fn clash(&self, other: &Holder) -> Option<String> {
        let Some(key) = self
            .sharing
            .as_ref()
            .filter(|k| Some(*k) == other.sharing.as_ref())
        else {
            return Some(format!(
                "it is in use by Service {} (Services share an address only with the same \
                 {SHARING_ANNOTATION} annotation)",
                other.key
            ));
        };
        if let Some((protocol, port)) = self.ports.intersection(&other.ports).next() {
            return Some(format!(
                "Service {} shares it (key {key:?}) and uses port {port}/{protocol} too",
                other.key
            ));
        }
        if (self.local || other.local)
            && !(self.local && other.local && self.selector == other.selector)
        {
            return Some(format!(
                "Service {} shares it (key {key:?}), but with externalTrafficPolicy Local only \
                 Services with the same selector (the same endpoints) may share an address: \
                 the nodes that announce it must have endpoints of both",
                other.key
            ));
        }
        None
    }
}

/// The allocation state while the passes run.
struct Book<'p> {
    pools: &'p Pools,
    /// Address → the Services on it.
    used: BTreeMap<IpAddr, Vec<Holder>>,
    /// Service → its addresses so far.
    held: HashMap<ServiceKey, Vec<IpAddr>>,
    /// Per (pool, range): no free address below this number.
    cursors: HashMap<(usize, usize), u128>,
}

impl Book<'_> {
    fn why_not(&self, request: &Request, address: IpAddr) -> Option<String> {
        self.used
            .get(&address)
            .into_iter()
            .flatten()
            .filter(|other| other.key != request.key)
            .find_map(|other| request.holder.clash(other))
    }

    fn take(&mut self, request: &Request, address: IpAddr) {
        self.used
            .entry(address)
            .or_default()
            .push(request.holder.clone());
        self.held
            .entry(request.key.clone())
            .or_default()
            .push(address);
    }

    fn release(&mut self, key: &ServiceKey) {
        // Addresses below a cursor may be free again.
        self.cursors.clear();
        for address in self.held.remove(key).unwrap_or_default() {
            if let Some(holders) = self.used.get_mut(&address) {
                holders.retain(|holder| holder.key != *key);
                if holders.is_empty() {
                    self.used.remove(&address);
                }
            }
        }
    }

    fn has_family(&self, key: &ServiceKey, family: Family) -> bool {
        self.held
            .get(key)
            .is_some_and(|held| held.iter().any(|a| Family::of(*a) == family))
    }

    /// A pool `request` may take `address` from, by name: the one holding
    /// it, if it serves the Service. `Err` says why not.
    fn pool_for(
        &self,
        request: &Request,
        address: IpAddr,
        namespaces: &NamespaceLabels,
    ) -> Result<&Pool, String> {
        let Some(pool) = self.pools.pool_of(address) else {
            return Err(format!("{address} is in no usable AddressPool"));
        };
        if let Some(name) = &request.pool
            && *name != pool.name
        {
            return Err(format!(
                "{address} is in AddressPool {}, not in {name} which the Service names",
                pool.name
            ));
        }
        if !pool.serves(&request.namespace, &request.labels, namespaces) {
            return Err(format!(
                "{address} is in AddressPool {}, whose scope does not include this Service",
                pool.name
            ));
        }
        if pool.avoid_buggy_ips && is_buggy_address(address) {
            return Err(format!(
                "{address} ends in .0 or .255, which AddressPool {} avoids (avoidBuggyIPs)",
                pool.name
            ));
        }
        Ok(pool)
    }

    /// An address of `family` for `request` that it may share, else the
    /// lowest free one, from the first pool in priority order that has one.
    fn find(
        &mut self,
        request: &Request,
        family: Family,
        namespaces: &NamespaceLabels,
    ) -> Result<IpAddr, String> {
        let candidates: Vec<usize> = self
            .pools
            .usable
            .iter()
            .enumerate()
            .filter(|(_, pool)| match &request.pool {
                Some(name) => pool.name == *name,
                None => pool.auto_assign,
            })
            .filter(|(_, pool)| pool.serves(&request.namespace, &request.labels, namespaces))
            .filter(|(_, pool)| pool.ranges.iter().any(|r| r.family() == family))
            .map(|(index, _)| index)
            .collect();
        if candidates.is_empty() {
            return Err(match &request.pool {
                Some(name) => format!(
                    "AddressPool {name} has no {family} addresses, or is not usable, or its \
                     scope does not include this Service"
                ),
                None => format!(
                    "no AddressPool with autoAssign and {family} addresses includes this \
                     Service in its scope"
                ),
            });
        }
        if request.holder.sharing.is_some() {
            let shared = self.used.iter().find(|(address, holders)| {
                Family::of(**address) == family
                    && candidates
                        .iter()
                        .any(|&i| self.pools.usable[i].contains(**address))
                    && holders
                        .iter()
                        .all(|other| request.holder.clash(other).is_none())
            });
            if let Some((address, _)) = shared {
                return Ok(*address);
            }
        }
        for &index in &candidates {
            let pool = &self.pools.usable[index];
            for (range_index, range) in pool.ranges.iter().enumerate() {
                if range.family() != family {
                    continue;
                }
                let cursor = self
                    .cursors
                    .entry((index, range_index))
                    .or_insert(range.start());
                let used = &self.used;
                let found = range.first_from(*cursor, |address| {
                    let taken = used.contains_key(&address);
                    let avoided = pool.avoid_buggy_ips && is_buggy_address(address);
                    !taken && !avoided
                });
                if let Some(address) = found {
                    *cursor = number_of(address);
                    return Ok(address);
                }
                *cursor = u128::MAX;
            }
        }
        Err(format!(
            "no free {family} address in {}",
            candidates
                .iter()
                .map(|&i| format!("AddressPool {}", self.pools.usable[i].name))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

fn number_of(address: IpAddr) -> u128 {
    match address {
        IpAddr::V4(v4) => u32::from(v4).into(),
        IpAddr::V6(v6) => v6.into(),
    }
}

/// Assigns addresses from `pools` to the LoadBalancer `services` (the ones
/// xlb handles: the caller filters by class); `namespaces` for scopes that
/// select namespaces by label.
pub fn allocate(pools: &Pools, services: &[&Service], namespaces: &NamespaceLabels) -> Allocation {
    allocate_remembering(pools, services, namespaces, &BTreeMap::new())
}

/// [`allocate`] where there is no status to keep allocations in (the
/// manifest source): a Service whose status names no address keeps what
/// `remembered` (the previous answer) gave it.
pub fn allocate_remembering(
    pools: &Pools,
    services: &[&Service],
    namespaces: &NamespaceLabels,
    remembered: &BTreeMap<ServiceKey, Vec<IpAddr>>,
) -> Allocation {
    let mut allocation = Allocation {
        problems: pools.problems.clone(),
        ..Allocation::default()
    };
    let mut requests = Vec::new();
    for service in services {
        match request_of(service, remembered) {
            Ok(Some(request)) => requests.push(request),
            Ok(None) => {}
            Err(message) => allocation.problems.push(Problem::new(
                reference_to(*service),
                EventReason::AllocationFailed,
                message,
            )),
        }
    }
    requests.sort_by(|a, b| a.order.cmp(&b.order));
    // A Service read twice: the first definition counts.
    requests.dedup_by(|later, first| later.key == first.key);

    let mut book = Book {
        pools,
        used: BTreeMap::new(),
        held: HashMap::new(),
        cursors: HashMap::new(),
    };
    // Why a Service's previous address was not kept, for its Event.
    let mut dropped: HashMap<ServiceKey, Vec<String>> = HashMap::new();

    // Pass 1: keep what the status says, where still valid.
    for request in &requests {
        for &address in &request.previous {
            let family = Family::of(address);
            let why = if !request.families.contains(&family) {
                Some(format!("the Service no longer has family {family}"))
            } else if book.has_family(&request.key, family) {
                Some(format!("the Service has another {family} address"))
            } else if let Some(wanted) = request
                .requested
                .iter()
                .find(|r| Family::of(**r) == family && **r != address)
            {
                Some(format!("the Service asks for {wanted}"))
            } else {
                match book.pool_for(request, address, namespaces) {
                    Err(why) => Some(why),
                    Ok(_) => book.why_not(request, address),
                }
            };
            match why {
                None => book.take(request, address),
                Some(why) => dropped
                    .entry(request.key.clone())
                    .or_default()
                    .push(format!("{address} given up: {why}")),
            }
        }
    }

    // Pass 2: the families still missing.
    for request in &requests {
        let mut failed = Vec::new();
        for (rank, &family) in request.families.iter().enumerate() {
            if book.has_family(&request.key, family) {
                continue;
            }
            let required = rank == 0 || request.all_required;
            let found = match request.requested.iter().find(|r| Family::of(**r) == family) {
                Some(&wanted) => book
                    .pool_for(request, wanted, namespaces)
                    .map(|_| ())
                    .and_then(|()| match book.why_not(request, wanted) {
                        Some(why) => Err(why),
                        None => Ok(wanted),
                    })
                    .map_err(|why| format!("requested address {wanted} cannot be assigned: {why}")),
                None => book.find(request, family, namespaces),
            };
            match found {
                Ok(address) => book.take(request, address),
                Err(why) if required => failed.push(why),
                Err(why) => tracing::debug!(service = %request.key, %family, reason = %why,
                    "optional family left without an address"),
            }
        }
        if !failed.is_empty() {
            book.release(&request.key);
            let mut message = format!("no address assigned: {}", failed.join("; "));
            if let Some(dropped) = dropped.get(&request.key) {
                message.push_str(&format!(" ({})", dropped.join("; ")));
            }
            allocation.problems.push(Problem::new(
                request.object.clone(),
                EventReason::AllocationFailed,
                message,
            ));
        }
    }

    for request in &requests {
        let Some(held) = book.held.get(&request.key) else {
            continue;
        };
        let mut addresses = held.clone();
        addresses.sort_by_key(|a| request.families.iter().position(|f| *f == Family::of(*a)));
        let before: BTreeSet<IpAddr> = request.previous.iter().copied().collect();
        let now: BTreeSet<IpAddr> = addresses.iter().copied().collect();
        if before != now {
            let assigned: Vec<String> = addresses
                .iter()
                .map(|a| {
                    let pool = pools.pool_of(*a).map_or("?", |p| p.name.as_str());
                    format!("{a} from AddressPool {pool}")
                })
                .collect();
            let mut message = format!("assigned {}", assigned.join(", "));
            if let Some(dropped) = dropped.get(&request.key) {
                message.push_str(&format!(" ({})", dropped.join("; ")));
            }
            allocation.allocated.push(Problem::new(
                request.object.clone(),
                EventReason::IpAllocated,
                message,
            ));
        }
        allocation.assigned.insert(request.key.clone(), addresses);
    }
    for address in book.used.keys() {
        if let Some(pool) = pools.pool_of(*address) {
            *allocation
                .in_use
                .entry(pool.name.clone())
                .or_default()
                .entry(Family::of(*address))
                .or_default() += 1;
        }
    }
    allocation
}

/// What `service` asks for; `None` when it asks for no address (not of
/// type LoadBalancer); `Err` when its request cannot be read.
fn request_of(
    service: &Service,
    remembered: &BTreeMap<ServiceKey, Vec<IpAddr>>,
) -> Result<Option<Request>, String> {
    let Some(spec) = service.spec.as_ref() else {
        return Ok(None);
    };
    if spec.type_.as_deref() != Some("LoadBalancer") || service.metadata.name.is_none() {
        return Ok(None);
    }
    let annotations = service.metadata.annotations.clone().unwrap_or_default();
    let families = service_families(spec);
    let mut requested: Vec<IpAddr> = Vec::new();
    let texts: Vec<(&str, String)> = match annotations.get(IPS_ANNOTATION) {
        Some(list) => list
            .split(',')
            .map(|t| (IPS_ANNOTATION, t.trim().to_owned()))
            .filter(|(_, t)| !t.is_empty())
            .collect(),
        None => spec
            .load_balancer_ip
            .iter()
            .filter(|t| !t.is_empty())
            .map(|t| ("spec.loadBalancerIP", t.trim().to_owned()))
            .collect(),
    };
    for (field, text) in texts {
        let address: IpAddr = text
            .parse()
            .map_err(|_| format!("{field}: {text:?} is not an IP address"))?;
        let family = Family::of(address);
        if !families.contains(family) {
            return Err(format!(
                "{field}: {address} is {family}, a family the Service does not have"
            ));
        }
        if requested.iter().any(|r| Family::of(*r) == family) {
            return Err(format!(
                "{field}: more than one {family} address (one per family)"
            ));
        }
        requested.push(address);
    }
    let key = ServiceKey::of(service);
    let mut previous: Vec<IpAddr> = status_addresses(service).collect();
    if previous.is_empty()
        && let Some(addresses) = remembered.get(&key)
    {
        previous = addresses.clone();
    }
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| Some((port_protocol(p)?, port_number(p.port)?)))
        .collect();
    Ok(Some(Request {
        order: Order::of(service),
        object: reference_to(service),
        namespace: namespace_of(&service.metadata).to_owned(),
        labels: service.metadata.labels.clone().unwrap_or_default(),
        all_required: spec.ip_family_policy.as_deref() == Some("RequireDualStack"),
        families: families.list,
        pool: annotations.get(POOL_ANNOTATION).cloned(),
        requested,
        previous,
        holder: Holder {
            key: key.clone(),
            sharing: annotations
                .get(SHARING_ANNOTATION)
                .cloned()
                .filter(|k| !k.is_empty()),
            ports,
            local: spec.external_traffic_policy.as_deref() == Some("Local"),
            selector: spec.selector.clone(),
        },
        key,
    }))
}

/// What `status.loadBalancer.ingress` of each Service in `services` should
/// be after `allocation`: a LoadBalancer Service's addresses, or none (a
/// Service that could not get one loses what its status named, so no node
/// keeps serving it); a Service that is no longer a LoadBalancer but whose
/// status still names an address of `pools` loses it too. Other Services
/// are left alone.
pub fn desired_ingress(
    pools: &Pools,
    allocation: &Allocation,
    services: &[&Service],
) -> BTreeMap<ServiceKey, Vec<IpAddr>> {
    let mut desired = BTreeMap::new();
    for service in services {
        let key = ServiceKey::of(service);
        let is_load_balancer =
            service.spec.as_ref().and_then(|spec| spec.type_.as_deref()) == Some("LoadBalancer");
        if is_load_balancer {
            let addresses = allocation.assigned.get(&key).cloned().unwrap_or_default();
            desired.insert(key, addresses);
        } else if status_addresses(service).any(|address| pools.pool_of(address).is_some()) {
            desired.insert(key, Vec::new());
        }
    }
    desired
}

fn status_addresses(service: &Service) -> impl Iterator<Item = IpAddr> + '_ {
    service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|ingress| ingress.ip.as_deref()?.parse().ok())
}
