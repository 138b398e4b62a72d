//! Address pools (`--address-mode pool`): xlb's own IPAM, after MetalLB's
//! `IPAddressPool`. [`resource`] is the `AddressPool` custom resource,
//! [`ranges`] its address entries, [`allocate`] the allocator. Pure: no
//! kube client, no aya; the sources feed it objects and act on its answer
//! (write status and Events, program the addresses).

pub mod allocate;
pub mod ranges;
pub mod resource;
#[cfg(test)]
mod tests;

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::{
    api::core::v1::ObjectReference,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};
use kube::{
    Resource,
    core::{Selector, SelectorExt},
};

pub use allocate::{
    Allocation, NamespaceLabels, allocate, allocate_remembering, namespace_labels,
};
pub use resource::{AddressPool, AddressPoolSpec, AddressPoolStatus, L2Announcement, PoolScope};

use self::ranges::AddressRange;
use crate::translate::{EventReason, Problem, families::Family};

/// Names the pool a Service wants its addresses from.
pub const POOL_ANNOTATION: &str = "xlb.dev/address-pool";
/// The addresses a Service asks for, one per family, comma-separated
/// (`spec.loadBalancerIP` holds only one and is deprecated).
pub const IPS_ANNOTATION: &str = "xlb.dev/load-balancer-ips";
/// Services with the same value may share an address when their ports do
/// not clash.
pub const SHARING_ANNOTATION: &str = "xlb.dev/allow-shared-ip";

/// One usable pool, as the allocator and the announcers read it.
#[derive(Clone, Debug)]
pub struct Pool {
    pub name: String,
    pub auto_assign: bool,
    pub avoid_buggy_ips: bool,
    pub priority: Option<i32>,
    pub ranges: Vec<AddressRange>,
    namespaces: Vec<String>,
    namespace_selector: Option<Selector>,
    service_selector: Option<Selector>,
    /// `spec.l2`: how the pool's addresses are announced.
    pub l2: Option<L2Announcement>,
}

impl Pool {
    pub fn contains(&self, address: IpAddr) -> bool {
        self.ranges.iter().any(|range| range.contains(address))
    }

    /// Whether a Service in `namespace` with `labels` is in the pool's
    /// scope.
    pub fn serves(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        namespaces: &NamespaceLabels,
    ) -> bool {
        (self.namespaces.is_empty() || self.namespaces.iter().any(|n| n == namespace))
            && self.namespace_selector.as_ref().is_none_or(|selector| {
                namespaces
                    .get(namespace)
                    .is_some_and(|labels| selector.matches(labels))
            })
            && self
                .service_selector
                .as_ref()
                .is_none_or(|selector| selector.matches(labels))
    }

    fn addresses(&self, family: Family) -> u128 {
        self.ranges
            .iter()
            .filter(|r| r.family() == family)
            .map(|r| r.usable(self.avoid_buggy_ips))
            .fold(0u128, u128::saturating_add)
    }
}

/// Every `AddressPool`, checked: the usable ones in the order they are
/// tried, and why the others are not used.
#[derive(Clone, Debug, Default)]
pub struct Pools {
    /// Lowest priority first, pools without one last, then by name.
    pub usable: Vec<Pool>,
    /// Each pool's `Ready` condition: why it is used or not.
    pub readiness: BTreeMap<String, (bool, &'static str, String)>,
    /// Warnings on the pools that are not used.
    pub problems: Vec<Problem>,
}

impl Pools {
    /// Checks `pools`: one invalid entry or selector keeps its whole pool
    /// out of use, and of two overlapping pools the one created later (then
    /// the one whose name sorts later) is not used, so no address is ever
    /// in two pools and no pool is half-used.
    pub fn new(pools: &[AddressPool]) -> Pools {
        let mut checked = Pools::default();
        let mut ordered: Vec<&AddressPool> = pools.iter().collect();
        ordered.sort_by_key(|pool| {
            (
                pool.metadata.creation_timestamp.clone(),
                pool.metadata.name.clone(),
            )
        });
        for pool in ordered {
            let Some(name) = pool.metadata.name.clone() else {
                continue;
            };
            if checked.readiness.contains_key(&name) {
                continue;
            }
            match usable(&name, pool).and_then(|usable| {
                match checked.usable.iter().find(|other| {
                    other
                        .ranges
                        .iter()
                        .any(|a| usable.ranges.iter().any(|b| a.overlaps(b)))
                }) {
                    Some(other) => Err((
                        "Overlap",
                        format!(
                            "its addresses overlap AddressPool {}, which was there first; \
                             this pool is not used until they no longer overlap",
                            other.name
                        ),
                    )),
                    None => Ok(usable),
                }
            }) {
                Ok(usable) => {
                    checked.readiness.insert(
                        name,
                        (true, "Usable", "addresses are handed out from this pool".into()),
                    );
                    checked.usable.push(usable);
                }
                Err((reason, message)) => {
                    checked.problems.push(Problem::new(
                        reference(pool),
                        if reason == "Overlap" {
                            EventReason::AddressConflict
                        } else {
                            EventReason::InvalidSpec
                        },
                        message.clone(),
                    ));
                    checked.readiness.insert(name, (false, reason, message));
                }
            }
        }
        checked.usable.sort_by(|a, b| {
            (a.priority.is_none(), a.priority, &a.name).cmp(&(b.priority.is_none(), b.priority, &b.name))
        });
        checked
    }

    /// The usable pool that holds `address`: where a Service address came
    /// from, and so how it is announced ([`Pool::l2`]).
    pub fn pool_of(&self, address: IpAddr) -> Option<&Pool> {
        self.usable.iter().find(|pool| pool.contains(address))
    }

    /// The status of pool `name` after `allocation`: counts per family
    /// (saturated into the API's int64) and the `Ready` condition.
    /// `previous` keeps the condition's transition time while it holds.
    pub fn status(
        &self,
        name: &str,
        allocation: &Allocation,
        previous: Option<&AddressPoolStatus>,
        now: Time,
    ) -> AddressPoolStatus {
        let pool = self.usable.iter().find(|pool| pool.name == name);
        let in_use = |family| {
            allocation
                .in_use
                .get(name)
                .and_then(|by_family| by_family.get(&family))
                .copied()
                .unwrap_or(0)
        };
        let total = |family| pool.map_or(0, |pool| pool.addresses(family));
        let api = |n: u128| i64::try_from(n).unwrap_or(i64::MAX);
        let (ready, reason, message) = self
            .readiness
            .get(name)
            .cloned()
            .unwrap_or((false, "Unknown", String::new()));
        let status = if ready { "True" } else { "False" };
        let last_transition_time = previous
            .and_then(|p| p.conditions.iter().find(|c| c.type_ == "Ready"))
            .filter(|c| c.status == status)
            .map_or(now, |c| c.last_transition_time.clone());
        AddressPoolStatus {
            assigned_ipv4: api(in_use(Family::V4)),
            available_ipv4: api(total(Family::V4).saturating_sub(in_use(Family::V4))),
            assigned_ipv6: api(in_use(Family::V6)),
            available_ipv6: api(total(Family::V6).saturating_sub(in_use(Family::V6))),
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: status.into(),
                reason: reason.into(),
                message,
                last_transition_time,
                observed_generation: None,
            }],
        }
    }
}

/// `pool` as a [`Pool`], or why it cannot be used.
fn usable(name: &str, pool: &AddressPool) -> Result<Pool, (&'static str, String)> {
    let spec = &pool.spec;
    let mut ranges = Vec::new();
    for entry in &spec.addresses {
        let range = AddressRange::parse(entry).map_err(|why| {
            (
                "InvalidAddresses",
                format!("spec.addresses: {why}; the pool is not used until it is fixed"),
            )
        })?;
        if let Some(other) = ranges.iter().find(|r: &&AddressRange| r.overlaps(&range)) {
            return Err((
                "InvalidAddresses",
                format!("spec.addresses: {entry} overlaps {other} of the same pool"),
            ));
        }
        ranges.push(range);
    }
    if ranges.is_empty() {
        return Err(("InvalidAddresses", "spec.addresses is empty".into()));
    }
    let scope = spec.scope.clone().unwrap_or_default();
    let selector = |field: &str, selector: Option<_>| -> Result<Option<Selector>, (&'static str, String)> {
        selector
            .map(Selector::try_from)
            .transpose()
            .map_err(|e| ("InvalidScope", format!("spec.scope.{field}: {e}; the pool is not used")))
    };
    Ok(Pool {
        name: name.to_owned(),
        auto_assign: spec.auto_assign,
        avoid_buggy_ips: spec.avoid_buggy_ips,
        priority: spec.priority,
        ranges,
        namespaces: scope.namespaces,
        namespace_selector: selector("namespaceSelector", scope.namespace_selector)?,
        service_selector: selector("serviceSelector", scope.service_selector)?,
        l2: spec.l2.clone(),
    })
}

/// A cluster-scoped object has no namespace.
fn reference(pool: &AddressPool) -> ObjectReference {
    pool.object_ref(&())
}
