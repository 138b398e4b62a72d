//! Where Service status is written. The status writer of node and pool
//! mode: while this agent holds the leader Lease, keep
//! `status.loadBalancer.ingress` of every Service xlb handles equal to
//! [`node_mode::desired_ingress`] (node mode) or to what the pool
//! allocator assigns ([`pools::desired_ingress`]), re-checking whenever the
//! watched objects change (Services, EndpointSlices, Nodes, AddressPools)
//! and when leadership is won. In pool mode it also keeps each
//! AddressPool's status (counts per family, `Ready` condition) current.
//!
//! Only the addresses are compared, so fields the API server defaults
//! (`ipMode`) do not cause rewrites; a write is a merge patch of
//! `/status`, which replaces the list as a whole.
//!
//! Another controller that writes the same field (K3s ServiceLB left
//! enabled, MetalLB handling the same Services) would turn every write into
//! a watch event, the event into the other's write, and so on at API speed
//! (audit A-16). A write found overwritten counts against its Service; from
//! the second overwrite on the Service waits before the next write, twice
//! as long each time up to [`HOLD_MAX`], and a Warning Event says the
//! status is fought over. Other Services are written as usual.

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::json;
use tokio::{
    sync::{Notify, watch},
    time::Instant,
};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};

use super::{events::EventSink, watch::Stores};
use crate::{
    pools::{self, AddressPool, Pools},
    translate::{
        AddressMode, EventReason, Problem, ServiceKey, handles_class, node_mode,
        problem::reference_to,
    },
};

/// Status patches in flight at once.
const CONCURRENT_WRITES: usize = 8;
/// After a failed write, try again this much later.
const RETRY: Duration = Duration::from_secs(5);
/// The wait after a Service's second overwrite; it doubles with each
/// further one, up to [`HOLD_MAX`].
const HOLD_MIN: Duration = Duration::from_secs(2);
const HOLD_MAX: Duration = Duration::from_secs(300);
/// A fight whose last overwrite is this old is over: the next one counts
/// from the start.
const FIGHT_FORGOTTEN: Duration = Duration::from_secs(600);

/// What we wrote, and the Service's resourceVersion we wrote over: until
/// the watch delivers the new version, the store still shows the old
/// status, and that must not cause the same write again.
type Written = HashMap<ServiceKey, (Vec<IpAddr>, Option<String>)>;

/// A Service whose status another controller overwrites.
#[derive(Debug)]
struct Fight {
    overwrites: u32,
    last: Instant,
    /// No write before this.
    hold_until: Instant,
    reported: bool,
}

impl Fight {
    fn new(now: Instant) -> Self {
        Fight {
            overwrites: 0,
            last: now,
            hold_until: now,
            reported: false,
        }
    }

    /// Counts one overwrite found at `now`; returns the wait before the
    /// next write.
    fn overwritten(&mut self, now: Instant) -> Duration {
        if now.duration_since(self.last) > FIGHT_FORGOTTEN {
            *self = Fight::new(now);
        }
        self.overwrites += 1;
        self.last = now;
        let hold = match self.overwrites {
            // Once may be a race with a controller that then gives up.
            0 | 1 => Duration::ZERO,
            n => HOLD_MIN.saturating_mul(1 << (n - 2).min(16)).min(HOLD_MAX),
        };
        self.hold_until = now + hold;
        hold
    }
}

/// The writer's memory between passes.
#[derive(Default)]
struct Writer {
    written: Written,
    fights: HashMap<ServiceKey, Fight>,
}

/// Starts the writer; it acts only while `leading` is true, and looks again
/// when `changed` is notified.
pub fn spawn(
    client: Client,
    stores: Stores,
    classes: Vec<String>,
    mode: AddressMode,
    mut leading: watch::Receiver<bool>,
    changed: Arc<Notify>,
    mut events: EventSink,
) {
    tokio::spawn(async move {
        let mut state = Writer::default();
        let mut retry_at: Option<Instant> = None;
        loop {
            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = changed.notified() => {}
                result = leading.changed() => if result.is_err() { return },
                _ = retry => {}
            }
            retry_at = None;
            if !*leading.borrow() {
                state = Writer::default();
                continue;
            }
            let pass = write_pass(
                &client,
                &stores,
                &classes,
                mode,
                &leading,
                &mut state,
                &mut events,
            )
            .await;
            if pass.failed > 0 {
                tracing::warn!(
                    failed = pass.failed,
                    retry_s = RETRY.as_secs(),
                    "some Service status writes failed; retrying"
                );
                retry_at = Some(Instant::now() + RETRY);
            }
            if let Some(held) = pass.held_until {
                retry_at = Some(retry_at.map_or(held, |at| at.min(held)));
            }
        }
    });
}

/// What a pass left to do.
struct Pass {
    /// Writes that failed.
    failed: usize,
    /// The end of the earliest hold of a fought-over Service.
    held_until: Option<Instant>,
}

/// One pass over every handled Service.
async fn write_pass(
    client: &Client,
    stores: &Stores,
    classes: &[String],
    mode: AddressMode,
    leading: &watch::Receiver<bool>,
    state: &mut Writer,
    events: &mut EventSink,
) -> Pass {
    let services = stores.services();
    let services: Vec<&Service> = services
        .iter()
        .map(|s| &**s)
        .filter(|s| handles_class(s, classes))
        .collect();
    let slices = stores.endpoint_slices();
    let slices: Vec<&EndpointSlice> = slices.iter().map(|s| &**s).collect();
    let mut pool_failures = 0;
    let desired = match mode {
        AddressMode::Pool => {
            // The same deterministic allocation every agent computes.
            let address_pools = stores.address_pools();
            let checked = Pools::new(&address_pools);
            let allocation = pools::allocate(&checked, &services, &stores.namespace_labels());
            pool_failures = write_pool_status(client, &address_pools, &checked, &allocation).await;
            pools::desired_ingress(&checked, &allocation, &services)
        }
        _ => node_mode::desired_ingress(&services, &slices, &stores.nodes()),
    };
    let Writer { written, fights } = state;
    let now = Instant::now();
    let mut held_until: Option<Instant> = None;
    let mut todo = Vec::new();
    for service in services {
        let key = ServiceKey::of(service);
        let Some(want) = desired.get(&key) else {
            continue;
        };
        let version = service.metadata.resource_version.clone();
        let current = node_mode::current_ingress(service);
        if let Some((wrote, over)) = written.get(&key)
            && wrote == want
        {
            if *over == version {
                continue;
            }
            // What we wrote was replaced by something else: counted once
            // per write (forgetting the write).
            if current.as_ref() != Some(want) {
                written.remove(&key);
                let fight = fights.entry(key.clone()).or_insert_with(|| Fight::new(now));
                let hold = fight.overwritten(now);
                if !hold.is_zero() {
                    tracing::warn!(service = %key, ours = ?want, theirs = ?current,
                        overwrites = fight.overwrites, hold_s = hold.as_secs(),
                        "another controller overwrites this Service's status; backing off");
                    if !fight.reported {
                        fight.reported = true;
                        events.report(&fought_over(service, want, current.as_deref()));
                    }
                }
            }
        }
        // In place. What we wrote is remembered while it stays, so that an
        // overwrite arriving after the echo of our own write still counts.
        if current.as_ref() == Some(want) {
            continue;
        }
        if let Some(fight) = fights.get(&key)
            && fight.hold_until > now
        {
            held_until = Some(held_until.map_or(fight.hold_until, |at| at.min(fight.hold_until)));
            continue;
        }
        todo.push((key, want.clone(), version));
    }
    written.retain(|key, _| desired.contains_key(key));
    fights.retain(|key, fight| {
        desired.contains_key(key) && now.duration_since(fight.last) <= FIGHT_FORGOTTEN
    });
    if todo.is_empty() {
        return Pass {
            failed: pool_failures,
            held_until,
        };
    }

    let results: Vec<_> = futures::stream::iter(todo)
        .map(|(key, want, version)| async move {
            // Leadership can end during a long pass: stop writing then.
            if !*leading.borrow() {
                return (key, want, version, Ok(false));
            }
            let result = patch(client, &key, &want).await.map(|()| true);
            (key, want, version, result)
        })
        .buffer_unordered(CONCURRENT_WRITES)
        .collect()
        .await;
    let mut failed = pool_failures;
    for (key, want, version, result) in results {
        match result {
            Ok(true) => {
                tracing::info!(service = %key, ingress = ?want,
                    "wrote status.loadBalancer.ingress");
                written.insert(key, (want, version));
            }
            Ok(false) => {}
            Err(error) => {
                // Deleted meanwhile: nothing to write any more.
                if let kube::Error::Api(status) = &error
                    && status.is_not_found()
                {
                    continue;
                }
                tracing::warn!(service = %key, error = %error,
                    "writing status.loadBalancer.ingress failed");
                failed += 1;
            }
        }
    }
    Pass { failed, held_until }
}

/// Pool mode: brings each AddressPool's status up to date (counts and the
/// `Ready` condition, whose transition time stays while it holds). Returns
/// the writes that failed.
async fn write_pool_status(
    client: &Client,
    address_pools: &[AddressPool],
    checked: &Pools,
    allocation: &pools::Allocation,
) -> usize {
    let api: Api<AddressPool> = Api::all(client.clone());
    let now = Time(Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_default());
    let mut failed = 0;
    for pool in address_pools {
        let Some(name) = pool.metadata.name.as_deref() else {
            continue;
        };
        let status = checked.status(name, allocation, pool.status.as_ref(), now.clone());
        if pool.status.as_ref() == Some(&status) {
            continue;
        }
        let body = json!({"status": status});
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            Ok(_) => tracing::debug!(pool = name, "wrote AddressPool status"),
            Err(kube::Error::Api(status)) if status.is_not_found() => {}
            Err(error) => {
                tracing::warn!(pool = name, error = %error, "writing AddressPool status failed");
                failed += 1;
            }
        }
    }
    failed
}

/// The Warning Event on a fought-over Service, naming the usual culprits.
fn fought_over(service: &Service, ours: &[IpAddr], theirs: Option<&[IpAddr]>) -> Problem {
    let theirs = match theirs {
        Some(ips) => format!("{ips:?}"),
        None => "other addresses".into(),
    };
    Problem::new(
        reference_to(service),
        EventReason::StatusFoughtOver,
        format!(
            "status.loadBalancer.ingress is fought over by another controller: xlb writes \
             {ours:?}, something writes {theirs} back. Likely K3s ServiceLB not disabled \
             (start K3s with --disable=servicelb) or MetalLB handling the same Services \
             (give them a loadBalancerClass). xlb backs off, writing again less and less often."
        ),
    )
}

async fn patch(client: &Client, key: &ServiceKey, ingress: &[IpAddr]) -> kube::Result<()> {
    let api: Api<Service> = Api::namespaced(client.clone(), &key.namespace);
    let ingress: Vec<_> = ingress
        .iter()
        .map(|ip| json!({"ip": ip.to_string()}))
        .collect();
    let body = json!({"status": {"loadBalancer": {"ingress": ingress}}});
    api.patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&body))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hold_doubles_from_the_second_overwrite_and_a_quiet_fight_is_forgotten() {
        let start = Instant::now();
        let mut fight = Fight::new(start);
        let holds: Vec<u64> = (0..5).map(|_| fight.overwritten(start).as_secs()).collect();
        assert_eq!(holds, [0, 2, 4, 8, 16]);
        for _ in 0..20 {
            fight.overwritten(start);
        }
        assert_eq!(fight.overwritten(start), HOLD_MAX);
        let later = start + FIGHT_FORGOTTEN + Duration::from_secs(1);
        assert_eq!(fight.overwritten(later), Duration::ZERO);
    }
}
