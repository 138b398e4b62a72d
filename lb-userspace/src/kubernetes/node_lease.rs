//! One Lease per node for L2 announcement liveness (PureLB's design): each
//! agent renews `xlb-node-<node>` and watches the others'. API load grows
//! with the nodes (each renews every quarter of the duration and every
//! agent watches every renewal: N writes and N² watch events per period),
//! not with the Services. A node is alive while its Lease record changed,
//! by the observer's own clock, less than the duration ago (client-go's
//! rule: no clock agreement between nodes needed).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::oneshot;

/// The label every node Lease carries (its value: the node name).
pub const LABEL: &str = "xlb.dev/node-lease";
/// Default Lease duration; renewed every quarter of it.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(2);

/// Last change seen per node: (the Lease's resourceVersion, when seen).
type Seen = BTreeMap<String, (String, Instant)>;

/// This node's Lease kept fresh, and the others' watched.
pub struct NodeLeases {
    seen: Arc<Mutex<Seen>>,
    /// The watch's first complete list arrived: before it, the agent
    /// knows of no other node and would claim every address.
    listed: Arc<std::sync::atomic::AtomicBool>,
    duration: Duration,
    stop: Option<oneshot::Sender<()>>,
    renewer: tokio::task::JoinHandle<()>,
    watcher: tokio::task::JoinHandle<()>,
}

fn lease_name(node: &str) -> String {
    format!("xlb-node-{node}")
}

impl NodeLeases {
    pub fn spawn(client: Client, namespace: &str, node: &str, duration: Duration) -> NodeLeases {
        let api: Api<Lease> = Api::namespaced(client, namespace);
        let seen = Arc::new(Mutex::new(Seen::new()));
        let (stop, stopped) = oneshot::channel();
        let renewer = tokio::spawn(renew(api.clone(), node.to_string(), duration, stopped));
        let listed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = tokio::spawn(watch(api, seen.clone(), listed.clone()));
        NodeLeases {
            seen,
            listed,
            duration,
            stop: Some(stop),
            renewer,
            watcher,
        }
    }

    /// The nodes whose Lease changed less than the duration ago; `None`
    /// until the Leases have been listed once and this node's own is
    /// among them (it is then known to the others too).
    pub fn alive(&self, node: &str) -> Option<BTreeSet<String>> {
        if !self.listed.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let alive = self.alive_now();
        alive.contains(node).then_some(alive)
    }

    fn alive_now(&self) -> BTreeSet<String> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.iter()
            .filter(|(_, (_, at))| at.elapsed() < self.duration)
            .map(|(node, _)| node.clone())
            .collect()
    }

    /// Stops renewing and deletes this node's Lease, so that the others
    /// take its addresses over at once instead of after the duration.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(3), &mut self.renewer).await;
        self.watcher.abort();
    }
}

async fn renew(api: Api<Lease>, node: String, duration: Duration, mut stop: oneshot::Receiver<()>) {
    let name = lease_name(&node);
    let mut tick = tokio::time::interval(duration / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => break,
        }
        match renew_once(&api, &name, &node, duration).await {
            Ok(()) if failing => {
                tracing::info!(lease = %name, "node Lease renewed again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) if !failing => {
                tracing::warn!(lease = %name, error = %e, "renewing the node Lease failed; retrying");
                failing = true;
            }
            Err(_) => {}
        }
    }
    match api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => tracing::info!(lease = %name, "node Lease deleted"),
        Err(e) => tracing::warn!(lease = %name, error = %e, "deleting the node Lease failed"),
    }
}

async fn renew_once(
    api: &Api<Lease>,
    name: &str,
    node: &str,
    duration: Duration,
) -> kube::Result<()> {
    let now = MicroTime(Timestamp::now());
    let spec = LeaseSpec {
        holder_identity: Some(node.to_string()),
        lease_duration_seconds: Some(duration.as_secs().max(1) as i32),
        renew_time: Some(now),
        ..LeaseSpec::default()
    };
    match api.get_opt(name).await? {
        Some(mut lease) => {
            lease.spec = Some(spec);
            api.replace(name, &PostParams::default(), &lease).await?;
        }
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    labels: Some([(LABEL.to_string(), node.to_string())].into()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec),
            };
            api.create(&PostParams::default(), &lease).await?;
        }
    }
    Ok(())
}

/// Records, per node, when its Lease last changed.
async fn watch(
    api: Api<Lease>,
    seen: Arc<Mutex<Seen>>,
    listed: Arc<std::sync::atomic::AtomicBool>,
) {
    let stream = watcher(api, watcher::Config::default().labels(LABEL)).default_backoff();
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        let Ok(event) = event else {
            continue;
        };
        let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            watcher::Event::Apply(lease) | watcher::Event::InitApply(lease) => {
                note(&mut seen, &lease);
            }
            watcher::Event::Delete(lease) => {
                if let Some(node) = node_of(&lease) {
                    seen.remove(&node);
                }
            }
            watcher::Event::InitDone => listed.store(true, std::sync::atomic::Ordering::Release),
            watcher::Event::Init => {}
        }
    }
}

fn node_of(lease: &Lease) -> Option<String> {
    lease.metadata.labels.as_ref()?.get(LABEL).cloned()
}

fn note(seen: &mut Seen, lease: &Lease) {
    let Some(node) = node_of(lease) else {
        return;
    };
    let version = lease.metadata.resource_version.clone().unwrap_or_default();
    if seen.get(&node).is_none_or(|(v, _)| *v != version) {
        seen.insert(node, (version, Instant::now()));
    }
}
