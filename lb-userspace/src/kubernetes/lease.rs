//! Where the Lease is held: leader election on a `coordination.k8s.io/v1` Lease, for the work one
//! agent does for the whole cluster: writing `status.loadBalancer.ingress`
//! in node mode, and posting Events about Services (one Event, not one per
//! node).
//!
//! The protocol is client-go's: every `retry` the candidate reads the Lease;
//! the holder renews `renewTime`; another candidate takes the Lease over when
//! its record has not changed for `leaseDurationSeconds` *as observed on the
//! candidate's own clock* (no trust in clock agreement between nodes), or at
//! once when the holder released it. Writes carry the `resourceVersion` they
//! read, so of two candidates racing for the Lease only one wins. A leader
//! that cannot renew for `renew_deadline` (shorter than the lease duration)
//! stops acting as leader before anyone else may start. On shutdown the
//! leader releases the Lease so a successor need not wait.

use std::time::{Duration, Instant};

use anyhow::Result;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tokio::sync::{oneshot, watch};

use crate::flags;

/// Where the leader Lease lives and how long it lasts.
#[derive(Clone, Debug, clap::Args)]
pub struct LeaseConfig {
    /// Namespace of the leader Lease (Kubernetes source).
    #[arg(
        long = "lease-namespace",
        value_name = "LEASE_NAMESPACE",
        env = "XLB_NAMESPACE",
        default_value = "xlb-system"
    )]
    pub namespace: String,
    /// Name of the leader Lease.
    #[arg(
        long = "lease-name",
        value_name = "LEASE_NAME",
        env = "XLB_LEASE_NAME",
        default_value = "xlb-leader"
    )]
    pub name: String,
    /// Seconds a silent leader keeps the Lease; another agent takes over
    /// within this (plus a fifth of it) after the leader dies.
    #[arg(long = "lease-duration", value_name = "LEASE_DURATION", env = "XLB_LEASE_DURATION", default_value = "10",
          value_parser = flags::seconds_at_least_one)]
    pub duration: Duration,
}

/// One candidate's campaign: the Lease, and who campaigns.
#[derive(Clone, Debug)]
struct Campaign {
    namespace: String,
    name: String,
    /// This candidate: the node name.
    identity: String,
    /// `leaseDurationSeconds`: how long a silent holder keeps the Lease.
    duration: Duration,
}

impl Campaign {
    /// A leader steps down when it could not renew for this long: well
    /// before the Lease expires for the others.
    fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// How often the Lease is read and renewed.
    fn retry(&self) -> Duration {
        (self.duration / 5).max(Duration::from_millis(200))
    }
}

/// A running candidate. `is_leader` flips as leadership is won and lost.
pub struct Candidate {
    leading: watch::Receiver<bool>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Candidate {
    /// Campaigns for the Lease of `config` as `identity`.
    pub fn spawn(client: Client, config: &LeaseConfig, identity: &str) -> Candidate {
        let config = Campaign {
            namespace: config.namespace.clone(),
            name: config.name.clone(),
            identity: identity.to_owned(),
            duration: config.duration,
        };
        let (leading_tx, leading) = watch::channel(false);
        let (stop, stop_rx) = oneshot::channel();
        let task = tokio::spawn(run(client, config, leading_tx, stop_rx));
        Candidate {
            leading,
            stop: Some(stop),
            task,
        }
    }

    pub fn is_leader(&self) -> bool {
        *self.leading.borrow()
    }

    /// Changes of leadership.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.leading.clone()
    }

    /// Stops campaigning; a leader releases the Lease (bounded wait).
    pub async fn resign(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(3), &mut self.task).await;
    }
}

async fn run(
    client: Client,
    config: Campaign,
    leading: watch::Sender<bool>,
    mut stop: oneshot::Receiver<()>,
) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut observed: Option<(String, Instant)> = None;
    let mut last_renewal: Option<Instant> = None;
    let mut failing = false;
    let mut tick = tokio::time::interval(config.retry());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => break,
        }
        match try_acquire_or_renew(&api, &config, &mut observed).await {
            Ok(held) => {
                if failing {
                    tracing::info!(lease = %config.name, "Lease reachable again");
                    failing = false;
                }
                if held {
                    last_renewal = Some(Instant::now());
                }
                set(&leading, held, &config);
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(lease = %config.name, error = %error,
                        "reading or renewing the leader Lease failed; retrying");
                    failing = true;
                }
                let expired = last_renewal.is_none_or(|at| at.elapsed() >= config.renew_deadline());
                if *leading.borrow() && expired {
                    set(&leading, false, &config);
                }
            }
        }
    }
    if *leading.borrow() {
        set(&leading, false, &config);
        match release(&api, &config).await {
            Ok(()) => tracing::info!(lease = %config.name, "released the leader Lease"),
            Err(error) => {
                tracing::warn!(lease = %config.name, error = %error, "releasing the Lease failed")
            }
        }
    }
}

fn set(leading: &watch::Sender<bool>, now: bool, config: &Campaign) {
    if *leading.borrow() != now {
        if now {
            tracing::info!(lease = %format!("{}/{}", config.namespace, config.name),
                identity = %config.identity, "became leader");
        } else {
            tracing::info!(lease = %format!("{}/{}", config.namespace, config.name),
                "no longer leader");
        }
        leading.send_replace(now);
        crate::telemetry::telemetry().leader.set(i64::from(now));
    }
}

/// One round: `Ok(true)` when this candidate holds the Lease afterwards.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    config: &Campaign,
    observed: &mut Option<(String, Instant)>,
) -> Result<bool> {
    let now = MicroTime(Timestamp::now());
    let duration_s = i32::try_from(config.duration.as_secs().max(1)).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(&config.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(config.name.clone()),
                namespace: Some(config.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                lease_duration_seconds: Some(duration_s),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return lost_race_is_false(api.create(&PostParams::default(), &lease).await);
    };

    // When did the record last change, by our clock?
    let version = lease.metadata.resource_version.clone().unwrap_or_default();
    if observed.as_ref().is_none_or(|(seen, _)| *seen != version) {
        *observed = Some((version, Instant::now()));
    }
    let since_change = observed
        .as_ref()
        .map_or(Duration::ZERO, |(_, at)| at.elapsed());

    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder != config.identity {
        let held_for = spec
            .lease_duration_seconds
            .map_or(config.duration, |s| Duration::from_secs(s.max(0) as u64));
        if !holder.is_empty() && since_change < held_for {
            return Ok(false);
        }
        if !holder.is_empty() {
            tracing::info!(previous = %holder, silent_s = since_change.as_secs(),
                "the leader stopped renewing its Lease; taking over");
        }
        spec.holder_identity = Some(config.identity.clone());
        spec.acquire_time = Some(now.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(now);
    spec.lease_duration_seconds = Some(duration_s);
    // The read resourceVersion makes this a compare-and-swap.
    lost_race_is_false(
        api.replace(&config.name, &PostParams::default(), &lease)
            .await,
    )
}

/// A 409 (someone else wrote the Lease since we read it) is a lost round,
/// not an error.
fn lost_race_is_false(result: kube::Result<Lease>) -> Result<bool> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.is_conflict() || status.is_already_exists() => {
            Ok(false)
        }
        Err(error) => Err(error.into()),
    }
}

async fn release(api: &Api<Lease>, config: &Campaign) -> Result<()> {
    let mut lease = api.get(&config.name).await?;
    let Some(spec) = lease.spec.as_mut() else {
        return Ok(());
    };
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    api.replace(&config.name, &PostParams::default(), &lease)
        .await?;
    Ok(())
}
