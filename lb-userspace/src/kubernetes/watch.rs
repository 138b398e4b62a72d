//! The Kubernetes watches: reflectors (list + watch) on Services (all
//! namespaces), `discovery.k8s.io/v1` EndpointSlices and Nodes (this agent's,
//! or all in node mode). Every change wakes the agent with what changed: a
//! Service or one of its EndpointSlices names that Service, which alone is
//! translated again ([`crate::translate::Translator`]); a completed (re-)list
//! asks for a full rebuild from the stores.
//!
//! Watch disconnects, API server restarts and `410 Gone` end in a re-list
//! (kube-runtime's watcher, with backoff). The reflector swaps a re-listed
//! store in only when the list is complete, so the agent keeps programming
//! from the last known state meanwhile: maps are never cleared by a relist.

use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use tokio::sync::mpsc;

use crate::{
    change::Change,
    pools::{
        AddressPool, IPS_ANNOTATION, NamespaceLabels, POOL_ANNOTATION, SHARING_ANNOTATION,
        namespace_labels,
    },
    translate::{
        ServiceKey,
        objects::{SOURCE_RANGES_ANNOTATION, namespace_of},
        slice_service,
    },
};

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
    /// Pool mode only: the AddressPools and the Namespaces (their labels,
    /// for pool scopes).
    pools: Option<(Store<AddressPool>, Store<Namespace>)>,
    slice_index: Arc<Mutex<SliceIndex>>,
}

/// Which EndpointSlices belong to which Service (by the
/// `kubernetes.io/service-name` label), kept by the slice reflector.
#[derive(Default)]
struct SliceIndex {
    /// Slice → its Service.
    owner: HashMap<SliceKey, ServiceKey>,
    /// Service → the names of its slices (same namespace).
    slices: HashMap<ServiceKey, BTreeSet<String>>,
}

/// Which EndpointSlice: `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SliceKey {
    namespace: String,
    name: String,
}

impl SliceIndex {
    /// Records that slice `id` belongs to `owner` (or to none); returns the
    /// Service it belonged to before.
    fn set(&mut self, id: SliceKey, owner: Option<ServiceKey>) -> Option<ServiceKey> {
        let before = match &owner {
            Some(key) => self.owner.insert(id.clone(), key.clone()),
            None => self.owner.remove(&id),
        };
        if let Some(old) = &before
            && let Some(names) = self.slices.get_mut(old)
        {
            names.remove(&id.name);
            if names.is_empty() {
                self.slices.remove(old);
            }
        }
        if let Some(key) = owner {
            self.slices.entry(key).or_default().insert(id.name);
        }
        before
    }
}

impl Stores {
    /// The Service `namespace/name`, if the store has it.
    pub fn service(&self, key: &ServiceKey) -> Option<Arc<Service>> {
        self.services.get(&key.object_ref())
    }

    /// Every Service, shared with the store.
    pub fn services(&self) -> Vec<Arc<Service>> {
        self.services.state()
    }

    /// The EndpointSlices of the Services in `keys`: O(their slices), not
    /// O(all slices).
    pub fn slices_of(
        &self,
        keys: &BTreeSet<ServiceKey>,
    ) -> HashMap<ServiceKey, Vec<Arc<EndpointSlice>>> {
        let index = self.slice_index.lock().unwrap_or_else(|e| e.into_inner());
        let mut found: HashMap<_, Vec<_>> = HashMap::new();
        for key in keys {
            for name in index.slices.get(key).into_iter().flatten() {
                if let Some(slice) = self
                    .endpoint_slices
                    .get(&reflector::ObjectRef::new(name).within(&key.namespace))
                {
                    found.entry(key.clone()).or_default().push(slice);
                }
            }
        }
        found
    }

    /// Every EndpointSlice, shared with the store.
    pub fn endpoint_slices(&self) -> Vec<Arc<EndpointSlice>> {
        self.endpoint_slices.state()
    }

    pub fn nodes(&self) -> Vec<Node> {
        self.nodes.state().iter().map(|n| (**n).clone()).collect()
    }

    /// Resolves once every store has been listed completely.
    /// Pool mode: every AddressPool (none in the other modes).
    pub fn address_pools(&self) -> Vec<AddressPool> {
        self.pools
            .iter()
            .flat_map(|(pools, _)| pools.state())
            .map(|pool| (*pool).clone())
            .collect()
    }

    /// Pool mode: the labels of every Namespace.
    pub fn namespace_labels(&self) -> NamespaceLabels {
        let namespaces: Vec<Arc<Namespace>> = self
            .pools
            .iter()
            .flat_map(|(_, namespaces)| namespaces.state())
            .collect();
        namespace_labels(namespaces.iter().map(|n| &**n))
    }

    pub async fn ready(&self) {
        let _ = self.services.wait_until_ready().await;
        let _ = self.endpoint_slices.wait_until_ready().await;
        let _ = self.nodes.wait_until_ready().await;
        if let Some((pools, namespaces)) = &self.pools {
            let _ = pools.wait_until_ready().await;
            let _ = namespaces.wait_until_ready().await;
        }
    }
}

/// Starts the reflectors; each change is sent on `changed`. Nodes: all of
/// them (node mode needs every node's addresses and labels, and every mode
/// the cluster's networks: pod CIDRs and node addresses).
pub fn watch(client: Client, changed: mpsc::UnboundedSender<Change>, pool_mode: bool) -> Stores {
    let pools = pool_mode.then(|| {
        let (pools, pools_writer) = reflector::store::<AddressPool>();
        let (namespaces, namespaces_writer) = reflector::store::<Namespace>();
        // Any change re-allocates: pools are few, and a Namespace's labels
        // may move it into or out of a pool's scope.
        fn pool_change<K>(event: &watcher::Event<K>) -> Vec<Change> {
            match event {
                watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone => {
                    vec![Change::Pools]
                }
                watcher::Event::Init | watcher::Event::InitApply(_) => Vec::new(),
            }
        }
        spawn_reflector(
            "addresspools",
            pools_writer,
            Api::<AddressPool>::all(client.clone()),
            watcher::Config::default(),
            changed.clone(),
            pool_change::<AddressPool>,
        );
        spawn_reflector(
            "namespaces",
            namespaces_writer,
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
            changed.clone(),
            pool_change::<Namespace>,
        );
        (pools, namespaces)
    });
    let (services, services_writer) = reflector::store::<Service>();
    let (endpoint_slices, slices_writer) = reflector::store::<EndpointSlice>();
    let (nodes, nodes_writer) = reflector::store::<Node>();
    spawn_reflector(
        "services",
        services_writer,
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        changed.clone(),
        |event: &watcher::Event<Service>| match event {
            watcher::Event::Apply(service) | watcher::Event::Delete(service) => {
                vec![Change::Service(ServiceKey::of(service))]
            }
            watcher::Event::InitDone => vec![Change::All],
            watcher::Event::Init | watcher::Event::InitApply(_) => Vec::new(),
        },
    );
    // Which Service each slice belongs to, so that a slice whose label
    // changed (or that is deleted) also dirties its old Service, and so that
    // a Service's slices are found without a scan of all of them.
    let index = Arc::new(Mutex::new(SliceIndex::default()));
    let mut relisted = SliceIndex::default();
    let writer_index = index.clone();
    spawn_reflector(
        "endpointslices",
        slices_writer,
        Api::<EndpointSlice>::all(client.clone()),
        // Only slices that belong to a Service.
        watcher::Config::default().labels("kubernetes.io/service-name"),
        changed.clone(),
        move |event: &watcher::Event<EndpointSlice>| {
            let id = |slice: &EndpointSlice| SliceKey {
                namespace: namespace_of(&slice.metadata).to_owned(),
                name: slice.metadata.name.clone().unwrap_or_default(),
            };
            let mut index = writer_index.lock().unwrap_or_else(|e| e.into_inner());
            let mut dirty = Vec::new();
            match event {
                watcher::Event::Apply(slice) => {
                    let owner = slice_service(slice);
                    let before = index.set(id(slice), owner.clone());
                    dirty.extend(owner.clone().map(Change::Slices));
                    if before != owner {
                        dirty.extend(before.map(Change::Slices));
                    }
                }
                watcher::Event::Delete(slice) => {
                    dirty.extend(index.set(id(slice), None).map(Change::Slices));
                    dirty.extend(slice_service(slice).map(Change::Slices));
                }
                watcher::Event::Init => relisted = SliceIndex::default(),
                watcher::Event::InitApply(slice) => {
                    relisted.set(id(slice), slice_service(slice));
                }
                watcher::Event::InitDone => {
                    *index = std::mem::take(&mut relisted);
                    dirty.push(Change::All);
                }
            }
            dirty.dedup();
            dirty
        },
    );
    spawn_reflector(
        "nodes",
        nodes_writer,
        Api::<Node>::all(client),
        watcher::Config::default(),
        changed,
        |event: &watcher::Event<Node>| match event {
            watcher::Event::Apply(_) | watcher::Event::Delete(_) => vec![Change::Nodes],
            watcher::Event::InitDone => vec![Change::All],
            watcher::Event::Init | watcher::Event::InitApply(_) => Vec::new(),
        },
    );
    Stores {
        services,
        endpoint_slices,
        nodes,
        pools,
        slice_index: index,
    }
}

fn spawn_reflector<K>(
    what: &'static str,
    writer: reflector::store::Writer<K>,
    api: Api<K>,
    config: watcher::Config,
    changed: mpsc::UnboundedSender<Change>,
    mut what_changed: impl FnMut(&watcher::Event<K>) -> Vec<Change> + Send + 'static,
) where
    K: kube::Resource<DynamicType = ()>
        + Slim
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    tokio::spawn(async move {
        // The stores hold every object of the cluster: keep only what the
        // translation reads (managedFields and last-applied annotations are
        // often most of an object).
        let stream = watcher(api, config).default_backoff().modify(K::slim);
        let stream = reflector::reflector(writer, stream);
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    if failing {
                        tracing::info!(resource = what, "watch recovered");
                        failing = false;
                    }
                    if matches!(event, watcher::Event::InitDone) {
                        crate::telemetry::telemetry()
                            .watch_relists
                            .get_or_create(&[("resource", what)])
                            .inc();
                    }
                    // Init and InitApply change nothing visible until
                    // InitDone swaps the new list in.
                    for change in what_changed(&event) {
                        let _ = changed.send(change);
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

/// Drops the parts of an object the agent never reads, before it is stored.
pub trait Slim {
    fn slim(&mut self);
}

fn slim_metadata(metadata: &mut kube::api::ObjectMeta) {
    metadata.managed_fields = None;
    metadata.annotations = None;
    metadata.owner_references = None;
}

impl Slim for Service {
    fn slim(&mut self) {
        // The annotations the translation and the pool allocator read
        // survive.
        let kept: std::collections::BTreeMap<String, String> = self
            .metadata
            .annotations
            .take()
            .unwrap_or_default()
            .into_iter()
            .filter(|(key, _)| {
                [
                    SOURCE_RANGES_ANNOTATION,
                    IPS_ANNOTATION,
                    POOL_ANNOTATION,
                    SHARING_ANNOTATION,
                ]
                .contains(&key.as_str())
            })
            .collect();
        slim_metadata(&mut self.metadata);
        if !kept.is_empty() {
            self.metadata.annotations = Some(kept);
        }
    }
}

impl Slim for AddressPool {
    fn slim(&mut self) {
        self.metadata.managed_fields = None;
    }
}

impl Slim for Namespace {
    fn slim(&mut self) {
        // Only the name and the labels are read.
        slim_metadata(&mut self.metadata);
        self.spec = None;
        self.status = None;
    }
}

impl Slim for EndpointSlice {
    fn slim(&mut self) {
        slim_metadata(&mut self.metadata);
        for endpoint in self.endpoints.iter_mut().flatten() {
            endpoint.target_ref = None;
            endpoint.hints = None;
            endpoint.deprecated_topology = None;
            endpoint.hostname = None;
            endpoint.zone = None;
        }
    }
}

impl Slim for Node {
    fn slim(&mut self) {
        slim_metadata(&mut self.metadata);
        // Addresses, conditions and labels are read; images and the rest of
        // the status are large and not.
        if let Some(status) = self.status.as_mut() {
            status.images = None;
            status.volumes_attached = None;
            status.volumes_in_use = None;
            status.node_info = None;
            status.capacity = None;
            status.allocatable = None;
            status.daemon_endpoints = None;
            status.config = None;
            status.features = None;
            status.runtime_handlers = None;
        }
        // Only the pod CIDRs of the spec are read.
        if let Some(spec) = self.spec.as_mut() {
            *spec = k8s_openapi::api::core::v1::NodeSpec {
                pod_cidr: spec.pod_cidr.take(),
                pod_cidrs: spec.pod_cidrs.take(),
                ..Default::default()
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slim_service_keeps_only_the_annotation_the_translation_reads() {
        let mut service = Service::default();
        service.metadata.annotations = Some(
            [
                (
                    SOURCE_RANGES_ANNOTATION.to_string(),
                    "10.0.0.0/8".to_string(),
                ),
                (
                    "kubectl.kubernetes.io/last-applied-configuration".to_string(),
                    "{}".to_string(),
                ),
            ]
            .into(),
        );
        service.slim();
        assert_eq!(
            service.metadata.annotations,
            Some(
                [(
                    SOURCE_RANGES_ANNOTATION.to_string(),
                    "10.0.0.0/8".to_string()
                )]
                .into()
            )
        );
        let mut plain = Service::default();
        plain.metadata.annotations = Some([("a".to_string(), "b".to_string())].into());
        plain.slim();
        assert_eq!(plain.metadata.annotations, None);
    }
}
