//! The Kubernetes source: reflectors (list + watch) on Services (all
//! namespaces), `discovery.k8s.io/v1` EndpointSlices and this agent's Node.
//! Every change wakes the agent, which rebuilds [`Objects`] from the stores
//! and runs the same translation as the manifest source.
//!
//! Watch disconnects, API server restarts and `410 Gone` end in a re-list
//! (kube-runtime's watcher, with backoff). The reflector swaps a re-listed
//! store in only when the list is complete, so the agent keeps programming
//! from the last known state meanwhile: maps are never cleared by a relist.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Node, ObjectReference, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt, events,
        reflector::{self, Store},
        watcher,
    },
};
use tokio::sync::mpsc;

use super::manifest::Objects;

/// The class a Service may carry to be handled by xlb, besides none.
pub const DEFAULT_LB_CLASS: &str = "xlb.dev/xlb";

/// Builds a client from `kubeconfig`, else from `KUBECONFIG`/`~/.kube/config`
/// or the in-cluster service account.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => Config::infer()
            .await
            .context("no kubeconfig (--kubeconfig, KUBECONFIG) and not running in a cluster")?,
    };
    Client::try_from(config).context("creating the Kubernetes client")
}

/// The three stores the agent reads.
#[derive(Clone)]
pub struct Stores {
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    nodes: Store<Node>,
}

impl Stores {
    /// What the stores hold now, as the translation takes it.
    pub fn objects(&self) -> Objects {
        Objects {
            services: self
                .services
                .state()
                .iter()
                .map(|s| (**s).clone())
                .collect(),
            endpoint_slices: self
                .endpoint_slices
                .state()
                .iter()
                .map(|s| (**s).clone())
                .collect(),
            nodes: self.nodes.state().iter().map(|n| (**n).clone()).collect(),
        }
    }

    /// Resolves once every store has been listed completely.
    pub async fn ready(&self) {
        let _ = self.services.wait_until_ready().await;
        let _ = self.endpoint_slices.wait_until_ready().await;
        let _ = self.nodes.wait_until_ready().await;
    }
}

/// Starts the reflectors; each change sends `()` on `changed`. Nodes: all of
/// them with `all_nodes` (node mode needs every node's addresses and
/// labels), else only this one.
pub fn watch(
    client: Client,
    node_name: &str,
    all_nodes: bool,
    changed: mpsc::UnboundedSender<()>,
) -> Stores {
    let (services, services_writer) = reflector::store::<Service>();
    let (endpoint_slices, slices_writer) = reflector::store::<EndpointSlice>();
    let (nodes, nodes_writer) = reflector::store::<Node>();
    spawn_reflector(
        "services",
        services_writer,
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        changed.clone(),
    );
    spawn_reflector(
        "endpointslices",
        slices_writer,
        Api::<EndpointSlice>::all(client.clone()),
        // Only slices that belong to a Service.
        watcher::Config::default().labels("kubernetes.io/service-name"),
        changed.clone(),
    );
    spawn_reflector(
        "nodes",
        nodes_writer,
        Api::<Node>::all(client),
        if all_nodes {
            watcher::Config::default()
        } else {
            watcher::Config::default().fields(&format!("metadata.name={node_name}"))
        },
        changed,
    );
    Stores {
        services,
        endpoint_slices,
        nodes,
    }
}

fn spawn_reflector<K>(
    what: &'static str,
    writer: reflector::store::Writer<K>,
    api: Api<K>,
    config: watcher::Config,
    changed: mpsc::UnboundedSender<()>,
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    tokio::spawn(async move {
        let stream = reflector::reflector(writer, watcher(api, config).default_backoff());
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    if failing {
                        tracing::info!(resource = what, "watch recovered");
                        failing = false;
                    }
                    // Init and InitApply change nothing visible until
                    // InitDone swaps the new list in.
                    if !matches!(event, watcher::Event::Init | watcher::Event::InitApply(_)) {
                        let _ = changed.send(());
                    }
                }
                Err(error) => {
                    // The watcher retries with backoff; say so once per
                    // outage, not at every attempt.
                    if !failing {
                        tracing::warn!(resource = what, error = %error,
                            "watch failed; retrying with backoff, serving the last known state");
                        failing = true;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    });
}

/// Posts a Warning Event on each object the agent had to skip, once per
/// distinct problem (a re-sync does not repeat it), so `kubectl describe`
/// shows why a Service has no effect.
pub struct EventSink {
    recorder: events::Recorder,
    reported: std::collections::HashSet<(String, String)>,
}

impl EventSink {
    pub fn new(client: Client, node_name: &str) -> Self {
        let reporter = events::Reporter {
            controller: "xlb".into(),
            instance: Some(node_name.to_string()),
        };
        Self {
            recorder: events::Recorder::new(client, reporter),
            reported: Default::default(),
        }
    }

    /// `object` is `Kind namespace/name` as the translation names it;
    /// `event_reason` the Event's reason (`InvalidSpec`, `PortConflict`, ...)
    /// and `note` the explanation.
    pub fn report(&mut self, object: &str, event_reason: &str, note: &str) {
        if !self
            .reported
            .insert((object.to_string(), format!("{event_reason}: {note}")))
        {
            return;
        }
        let Some(reference) = object_reference(object) else {
            return;
        };
        let event = events::Event {
            type_: events::EventType::Warning,
            reason: event_reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: "Program".into(),
            secondary: None,
        };
        let recorder = self.recorder.clone();
        let object = object.to_string();
        tokio::spawn(async move {
            if let Err(error) = recorder.publish(&event, &reference).await {
                tracing::debug!(object = %object, error = %error, "posting an Event failed");
            }
        });
    }
}

/// `Service shop/web` → a reference Events can point at.
fn object_reference(object: &str) -> Option<ObjectReference> {
    let (kind, rest) = object.split_once(' ')?;
    let (namespace, name) = rest.split_once('/')?;
    let api_version = match kind {
        "EndpointSlice" => "discovery.k8s.io/v1",
        _ => "v1",
    };
    Some(ObjectReference {
        api_version: Some(api_version.into()),
        kind: Some(kind.into()),
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        ..ObjectReference::default()
    })
}

/// Keeps the Services xlb handles: no `spec.loadBalancerClass`, or one of
/// `classes`. Services of other classes are never touched.
pub fn retain_classes(objects: &mut Objects, classes: &[String]) {
    objects.services.retain(|service| {
        match service
            .spec
            .as_ref()
            .and_then(|s| s.load_balancer_class.as_deref())
        {
            None => true,
            Some(class) => classes.iter().any(|c| c == class),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, class: Option<&str>) -> Service {
        let mut s = Service::default();
        s.metadata.name = Some(name.into());
        s.spec = Some(k8s_openapi::api::core::v1::ServiceSpec {
            load_balancer_class: class.map(str::to_string),
            ..Default::default()
        });
        s
    }

    #[test]
    fn other_classes_are_left_alone() {
        let mut objects = Objects {
            services: vec![
                service("plain", None),
                service("ours", Some(DEFAULT_LB_CLASS)),
                service("metallb", Some("metallb.io/metallb")),
            ],
            ..Objects::default()
        };
        retain_classes(&mut objects, &[DEFAULT_LB_CLASS.to_string()]);
        let names: Vec<_> = objects
            .services
            .iter()
            .map(|s| s.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["plain", "ours"]);
    }
}
