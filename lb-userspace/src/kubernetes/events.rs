//! Where Events are posted: a Warning Event on each object the agent had to
//! skip, once per distinct problem (a re-sync does not repeat it), so that
//! `kubectl describe` shows why a Service has no effect; and Normal Events
//! for what the node did (`L2Announcing`).
//!
//! Posted by [`Publisher`], not by `kube::runtime::events::Recorder`: kube
//! 5's recorder folds every Event with the same object, reason and action
//! into one series whatever its note says (its cache key leaves the note
//! out), so a second problem on a Service, or a node announcing the
//! Service's second address, patched the first Event's count and its text
//! was never seen. client-go keys `events.k8s.io/v1` series on the note
//! too (kubernetes/kubernetes#112365); so does this.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        core::v1::ObjectReference,
        events::v1::{Event as K8sEvent, EventSeries},
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use tokio::sync::Mutex;

use crate::translate::{EventReason, Problem};

/// The same Event again within this long becomes a series (a count on the
/// first) instead of a new object; client-go and kube use 6 minutes.
const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);
/// The reporting controller every Event names.
const CONTROLLER: &str = "xlb";

/// What makes two Events the same (client-go's `events/v1` key).
#[derive(Clone, PartialEq, Eq, Hash)]
struct SeriesKey {
    type_: &'static str,
    reason: String,
    action: String,
    note: String,
    /// The object by kind, namespace, name and uid (not by
    /// `resourceVersion`, which every update of it changes).
    regarding: (
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
    ),
}

/// One Event to post.
pub struct Event {
    pub warning: bool,
    pub reason: String,
    pub action: String,
    pub note: String,
}

/// An Event posted: its namespace and name, its count, and when it was
/// last posted.
type Posted = (String, String, i32, Instant);

/// Posts `events.k8s.io/v1` Events as this node's agent, counting repeats
/// as a series on the first.
#[derive(Clone)]
pub struct Publisher {
    client: Client,
    instance: String,
    posted: Arc<Mutex<HashMap<SeriesKey, Posted>>>,
}

impl Publisher {
    pub fn new(client: Client, node_name: &str) -> Publisher {
        Publisher {
            client,
            instance: node_name.to_string(),
            posted: Arc::default(),
        }
    }

    /// Posts `event` on `regarding`: a new Event, or the next count of the
    /// same Event's series within [`SERIES_WINDOW`].
    pub async fn publish(&self, event: &Event, regarding: &ObjectReference) -> kube::Result<()> {
        let key = SeriesKey {
            type_: if event.warning { "Warning" } else { "Normal" },
            reason: event.reason.clone(),
            action: event.action.clone(),
            note: event.note.clone(),
            regarding: (
                regarding.kind.clone(),
                regarding.namespace.clone(),
                regarding.name.clone(),
                regarding.uid.clone(),
            ),
        };
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string());
        let now = Timestamp::now();
        // Held across the request, so that two posts of one key never both
        // create.
        let mut posted = self.posted.lock().await;
        posted.retain(|_, (_, _, _, at)| at.elapsed() < SERIES_WINDOW);
        if let Some((ns, name, count, at)) = posted.get_mut(&key) {
            let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), ns);
            let series = serde_json::json!({
                "series": EventSeries {
                    count: *count + 1,
                    last_observed_time: MicroTime(now),
                }
            });
            api.patch(name, &PatchParams::default(), &Patch::Merge(&series))
                .await?;
            *count += 1;
            *at = Instant::now();
            return Ok(());
        }
        let name = format!(
            "{}.{:x}",
            regarding.name.as_deref().unwrap_or(CONTROLLER),
            now.as_nanosecond()
        );
        let object = K8sEvent {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(key.type_.to_string()),
            reason: Some(event.reason.clone()),
            action: Some(event.action.clone()),
            note: Some(event.note.clone()),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(CONTROLLER.to_string()),
            reporting_instance: Some(self.instance.clone()),
            ..K8sEvent::default()
        };
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
        api.create(&PostParams::default(), &object).await?;
        posted.insert(key, (namespace, name, 1, Instant::now()));
        Ok(())
    }
}

/// One problem as the sink remembers it: the object by kind and name (not
/// by `resourceVersion`, which every update of it changes), reason and
/// message.
#[derive(PartialEq, Eq, Hash)]
struct Reported {
    kind: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    reason: EventReason,
    message: String,
}

pub struct EventSink {
    publisher: Publisher,
    reported: HashSet<Reported>,
}

impl EventSink {
    pub fn new(client: Client, node_name: &str) -> Self {
        Self {
            publisher: Publisher::new(client, node_name),
            reported: HashSet::new(),
        }
    }

    /// Posts `problem` on the object it names, unless it was posted before.
    pub fn report(&mut self, problem: &Problem) {
        let object = &problem.object;
        let seen = Reported {
            kind: object.kind.clone(),
            namespace: object.namespace.clone(),
            name: object.name.clone(),
            reason: problem.reason,
            message: problem.message.clone(),
        };
        if !self.reported.insert(seen) {
            return;
        }
        let event = Event {
            warning: problem.reason.is_warning(),
            reason: problem.reason.as_str().into(),
            note: problem.message.chars().take(1000).collect(),
            action: "Program".into(),
        };
        let publisher = self.publisher.clone();
        let reference = problem.object.clone();
        let object = problem.to_string();
        tokio::spawn(async move {
            if let Err(error) = publisher.publish(&event, &reference).await {
                tracing::debug!(problem = %object, error = %error, "posting an Event failed");
            }
        });
    }

    /// Posts a Normal Event `L2Announcing` on the Service: this node now
    /// answers ARP/NDP for `address` (the announcer, for `kubectl
    /// describe`), one Event per address. The same node taking the same
    /// address again within [`SERIES_WINDOW`] counts on that Event's
    /// series.
    pub fn announcing(
        &self,
        service: k8s_openapi::api::core::v1::ObjectReference,
        address: std::net::IpAddr,
        node: &str,
    ) {
        let event = Event {
            warning: false,
            reason: "L2Announcing".into(),
            note: format!("node {node} announces {address} (answers ARP/NDP for it)"),
            action: "Announce".into(),
        };
        let publisher = self.publisher.clone();
        tokio::spawn(async move {
            if let Err(error) = publisher.publish(&event, &service).await {
                tracing::debug!(%address, error = %error, "posting the L2Announcing Event failed");
            }
        });
    }
}
