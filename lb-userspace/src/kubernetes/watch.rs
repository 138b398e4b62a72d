//! The Kubernetes watches (list + watch) on Services (all
//! namespaces), `discovery.k8s.io/v1` EndpointSlices and Nodes (this agent's,
//! or all in node mode). Every change wakes the agent with what changed: a
//! Service or one of its EndpointSlices names that Service, which alone is
//! translated again ([`crate::translate::Translator`]); a completed (re-)list
//! asks for a full rebuild from the stores.
//!
//! Watch disconnects, API server restarts and `410 Gone` end in a re-list
//! (kube-runtime's watcher, with backoff). A cache swaps a re-listed
//! set in only when the list is complete, so the agent keeps programming
//! from the last known state meanwhile: maps are never cleared by a relist.

use std::{
    collections::{BTreeSet, HashMap},
    marker::PhantomData,
    path::Path,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Secret, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::{mpsc, watch};

use crate::{
    announce::bgp::BGPPeer,
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

/// The three caches the agent reads.
#[derive(Clone)]
pub struct Stores {
    services: Cache<Service>,
    endpoint_slices: Cache<EndpointSlice>,
    nodes: Cache<Node>,
    /// Pool mode only: the AddressPools and the Namespaces (their labels,
    /// for pool scopes).
    pools: Option<(Cache<AddressPool>, Cache<Namespace>)>,
    /// `--bgp` only: the BGPPeers of the agent's namespace, and its
    /// Secrets (the peers' TCP MD5 keys).
    bgp_peers: Option<(String, Cache<BGPPeer>, Cache<Secret>)>,
    slice_index: Arc<Mutex<SliceIndex>>,
}

/// A watch cache: every object of one kind, keyed by `namespace/name`
/// (`name` for cluster-scoped kinds), each kept as the compact JSON of its
/// slimmed form ([`Slim`]) and decoded when read.
///
/// Why not kube's reflector store of `Arc<K>`: a k8s-openapi object costs
/// its struct sizes whatever it holds (an `EndpointSlice` endpoint is
/// ~400 bytes of mostly `None`, a label map one B-tree node of ~550), and
/// the store's key four more strings. At 10 000 Services and as many
/// slices that was ~40 MiB; as bytes it is ~10 (docs/design-notes.md,
/// issue 11). The translation still reads the k8s-openapi types, decoded
/// only for the Services it translates; a full rebuild decodes every
/// object once.
struct Cache<K> {
    state: Arc<RwLock<CacheState>>,
    ready: watch::Receiver<bool>,
    kind: PhantomData<fn() -> K>,
}

impl<K> Clone for Cache<K> {
    fn clone(&self) -> Self {
        Cache {
            state: self.state.clone(),
            ready: self.ready.clone(),
            kind: PhantomData,
        }
    }
}

#[derive(Default)]
struct CacheState {
    objects: HashMap<Box<str>, Box<[u8]>>,
    /// A (re-)list in progress: swapped in whole when complete, so the
    /// agent keeps the last known state meanwhile.
    relisting: Option<HashMap<Box<str>, Box<[u8]>>>,
}

/// The writing side of a [`Cache`], owned by its watch task.
struct CacheWriter<K> {
    state: Arc<RwLock<CacheState>>,
    ready: watch::Sender<bool>,
    /// Where an object is encoded before it is copied into an allocation
    /// of its exact size: a grown-then-shrunk vector would leave a hole
    /// beside every cached object.
    scratch: Vec<u8>,
    kind: PhantomData<fn() -> K>,
}

fn cache<K>() -> (Cache<K>, CacheWriter<K>) {
    let state = Arc::new(RwLock::new(CacheState::default()));
    let (ready_tx, ready) = watch::channel(false);
    (
        Cache {
            state: state.clone(),
            ready,
            kind: PhantomData,
        },
        CacheWriter {
            state,
            ready: ready_tx,
            scratch: Vec::new(),
            kind: PhantomData,
        },
    )
}

/// `namespace/name`, or `name` without a namespace.
fn cache_key(metadata: &kube::api::ObjectMeta) -> Box<str> {
    let name = metadata.name.as_deref().unwrap_or_default();
    match metadata.namespace.as_deref() {
        Some(namespace) => format!("{namespace}/{name}").into(),
        None => name.into(),
    }
}

impl<K> Cache<K>
where
    K: kube::Resource + serde::de::DeserializeOwned,
{
    fn read(&self) -> std::sync::RwLockReadGuard<'_, CacheState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn decode(key: &str, json: &[u8]) -> Option<Arc<K>> {
        match serde_json::from_slice(json) {
            Ok(object) => Some(Arc::new(object)),
            // It was encoded from the same type: this would be a bug.
            Err(error) => {
                tracing::error!(object = key, %error, "watch cache entry does not decode; ignored");
                None
            }
        }
    }

    fn get(&self, key: &str) -> Option<Arc<K>> {
        let state = self.read();
        let json = state.objects.get(key)?;
        Self::decode(key, json)
    }

    fn all(&self) -> Vec<Arc<K>> {
        let state = self.read();
        state
            .objects
            .iter()
            .filter_map(|(key, json)| Self::decode(key, json))
            .collect()
    }

    async fn ready(&self) {
        let mut ready = self.ready.clone();
        let _ = ready.wait_for(|ready| *ready).await;
    }
}

impl<K> CacheWriter<K>
where
    K: kube::Resource + serde::Serialize,
{
    fn apply(&mut self, event: &watcher::Event<K>) {
        let scratch = &mut self.scratch;
        let mut encode = |object: &K| {
            scratch.clear();
            match serde_json::to_writer(&mut *scratch, object) {
                Ok(()) => Some(Box::<[u8]>::from(scratch.as_slice())),
                Err(error) => {
                    tracing::error!(object = %cache_key(object.meta()), %error,
                        "cannot encode a watched object; not cached");
                    None
                }
            }
        };
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        match event {
            watcher::Event::Apply(object) => {
                if let Some(json) = encode(object) {
                    state.objects.insert(cache_key(object.meta()), json);
                }
            }
            watcher::Event::Delete(object) => {
                state.objects.remove(&cache_key(object.meta()));
            }
            watcher::Event::Init => state.relisting = Some(HashMap::new()),
            watcher::Event::InitApply(object) => {
                if let Some(json) = encode(object) {
                    state
                        .relisting
                        .get_or_insert_default()
                        .insert(cache_key(object.meta()), json);
                }
            }
            watcher::Event::InitDone => {
                let mut objects = state.relisting.take().unwrap_or_default();
                objects.shrink_to_fit();
                state.objects = objects;
                drop(state);
                self.ready.send_replace(true);
            }
        }
    }
}

/// Which EndpointSlices belong to which Service (by the
/// `kubernetes.io/service-name` label), kept by the slice watch.
#[derive(Default)]
struct SliceIndex {
    /// Slice `namespace/name` → the name of its Service (same namespace).
    owner: HashMap<Box<str>, Box<str>>,
    /// Service `namespace/name` → the names of its slices.
    slices: HashMap<Box<str>, Vec<Box<str>>>,
}

/// Which EndpointSlice: `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SliceKey {
    namespace: String,
    name: String,
}

impl SliceKey {
    fn joined(&self) -> Box<str> {
        format!("{}/{}", self.namespace, self.name).into()
    }
}

fn service_cache_key(key: &ServiceKey) -> Box<str> {
    format!("{}/{}", key.namespace, key.name).into()
}

impl SliceIndex {
    /// Records that slice `id` belongs to `owner` (or to none); returns the
    /// Service it belonged to before.
    fn set(&mut self, id: SliceKey, owner: Option<ServiceKey>) -> Option<ServiceKey> {
        let joined = id.joined();
        let before = match &owner {
            Some(key) => self.owner.insert(joined, key.name.as_str().into()),
            None => self.owner.remove(&joined),
        }
        .map(|name| ServiceKey::new(id.namespace.as_str(), &*name));
        if let Some(old) = &before {
            let old = service_cache_key(old);
            if let Some(names) = self.slices.get_mut(&old) {
                names.retain(|name| **name != *id.name);
                if names.is_empty() {
                    self.slices.remove(&old);
                }
            }
        }
        if let Some(key) = owner {
            let names = self.slices.entry(service_cache_key(&key)).or_default();
            names.push(id.name.as_str().into());
            names.shrink_to_fit();
        }
        before
    }

    /// The names of the slices of Service `key`.
    fn slices_of(&self, key: &ServiceKey) -> &[Box<str>] {
        self.slices
            .get(&*service_cache_key(key))
            .map(Vec::as_slice)
            .unwrap_or_default()
    }
}

impl Stores {
    /// The Service `namespace/name`, if the cache has it.
    pub fn service(&self, key: &ServiceKey) -> Option<Arc<Service>> {
        self.services.get(&service_cache_key(key))
    }

    /// Every Service, decoded.
    pub fn services(&self) -> Vec<Arc<Service>> {
        self.services.all()
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
            for name in index.slices_of(key) {
                if let Some(slice) = self
                    .endpoint_slices
                    .get(&format!("{}/{name}", key.namespace))
                {
                    found.entry(key.clone()).or_default().push(slice);
                }
            }
        }
        found
    }

    /// The EndpointSlices of Service `key`.
    pub fn slices_of_service(&self, key: &ServiceKey) -> Vec<Arc<EndpointSlice>> {
        let index = self.slice_index.lock().unwrap_or_else(|e| e.into_inner());
        index
            .slices_of(key)
            .iter()
            .filter_map(|name| {
                self.endpoint_slices
                    .get(&format!("{}/{name}", key.namespace))
            })
            .collect()
    }

    /// Every EndpointSlice, decoded.
    pub fn endpoint_slices(&self) -> Vec<Arc<EndpointSlice>> {
        self.endpoint_slices.all()
    }

    pub fn nodes(&self) -> Vec<Node> {
        self.nodes
            .all()
            .into_iter()
            .map(Arc::unwrap_or_clone)
            .collect()
    }

    /// Resolves once every cache has been listed completely.
    /// `--bgp`: the BGPPeers of the agent's namespace (`None` without).
    /// (By name: of two BGPPeers for one router, the first by name wins.)
    pub fn bgp_peers(&self) -> Option<Vec<Arc<BGPPeer>>> {
        let (_, peers, _) = self.bgp_peers.as_ref()?;
        let mut all = peers.all();
        all.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        Some(all)
    }

    /// `--bgp`: Secret `name` of namespace `namespace`, if that is the
    /// agent's (the only one watched).
    pub fn bgp_secret(&self, namespace: &str, name: &str) -> Option<Arc<Secret>> {
        let (watched, _, secrets) = self.bgp_peers.as_ref()?;
        if watched != namespace {
            return None;
        }
        secrets.get(&format!("{namespace}/{name}"))
    }

    /// The labels of Node `name`, if it is known.
    pub fn node_labels(&self, name: &str) -> Option<std::collections::BTreeMap<String, String>> {
        self.nodes
            .get(name)
            .map(|node| node.metadata.labels.clone().unwrap_or_default())
    }

    /// Pool mode: every AddressPool (none in the other modes).
    pub fn address_pools(&self) -> Vec<AddressPool> {
        self.pools
            .iter()
            .flat_map(|(pools, _)| pools.all())
            .map(|pool| (*pool).clone())
            .collect()
    }

    /// Pool mode: the labels of every Namespace.
    pub fn namespace_labels(&self) -> NamespaceLabels {
        let namespaces: Vec<Arc<Namespace>> = self
            .pools
            .iter()
            .flat_map(|(_, namespaces)| namespaces.all())
            .collect();
        namespace_labels(namespaces.iter().map(|n| &**n))
    }

    pub async fn ready(&self) {
        self.services.ready().await;
        self.endpoint_slices.ready().await;
        self.nodes.ready().await;
        if let Some((pools, namespaces)) = &self.pools {
            pools.ready().await;
            namespaces.ready().await;
        }
    }
}

/// Starts the watches; each change is sent on `changed`. Nodes: all of
/// them (node mode needs every node's addresses and labels, and every mode
/// the cluster's networks: pod CIDRs and node addresses).
/// With `bgp_namespace`, the BGPPeers there too (not waited for by
/// [`Stores::ready`]: the Services are served whatever the peers).
pub fn watch(
    client: Client,
    changed: mpsc::UnboundedSender<Change>,
    pool_mode: bool,
    bgp_namespace: Option<&str>,
) -> Stores {
    let bgp_peers = bgp_namespace.map(|namespace| {
        fn peers_change<K>(event: &watcher::Event<K>) -> Vec<Change> {
            match event {
                watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone => {
                    vec![Change::Peers]
                }
                watcher::Event::Init | watcher::Event::InitApply(_) => Vec::new(),
            }
        }
        let (peers, peers_writer) = cache::<BGPPeer>();
        spawn_watch(
            "bgppeers",
            peers_writer,
            Api::<BGPPeer>::namespaced(client.clone(), namespace),
            watcher::Config::default(),
            changed.clone(),
            peers_change::<BGPPeer>,
        );
        // The peers' TCP MD5 keys: Secrets of the same namespace.
        let (secrets, secrets_writer) = cache::<Secret>();
        spawn_watch(
            "secrets",
            secrets_writer,
            Api::<Secret>::namespaced(client.clone(), namespace),
            watcher::Config::default(),
            changed.clone(),
            peers_change::<Secret>,
        );
        (namespace.to_string(), peers, secrets)
    });
    let pools = pool_mode.then(|| {
        let (pools, pools_writer) = cache::<AddressPool>();
        let (namespaces, namespaces_writer) = cache::<Namespace>();
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
        spawn_watch(
            "addresspools",
            pools_writer,
            Api::<AddressPool>::all(client.clone()),
            watcher::Config::default(),
            changed.clone(),
            pool_change::<AddressPool>,
        );
        spawn_watch(
            "namespaces",
            namespaces_writer,
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
            changed.clone(),
            pool_change::<Namespace>,
        );
        (pools, namespaces)
    });
    let (services, services_writer) = cache::<Service>();
    let (endpoint_slices, slices_writer) = cache::<EndpointSlice>();
    let (nodes, nodes_writer) = cache::<Node>();
    spawn_watch(
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
    spawn_watch(
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
    spawn_watch(
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
        bgp_peers,
        slice_index: index,
    }
}

fn spawn_watch<K>(
    what: &'static str,
    mut writer: CacheWriter<K>,
    api: Api<K>,
    config: watcher::Config,
    changed: mpsc::UnboundedSender<Change>,
    mut what_changed: impl FnMut(&watcher::Event<K>) -> Vec<Change> + Send + 'static,
) where
    K: kube::Resource<DynamicType = ()>
        + Slim
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    tokio::spawn(async move {
        // The caches hold every object of the cluster: keep only what the
        // translation reads (managedFields and last-applied annotations are
        // often most of an object).
        let stream = watcher(api, config).default_backoff().modify(K::slim);
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
                    // The cache first, so that the agent, woken by the
                    // change, reads the object as it is now. Init and
                    // InitApply change nothing visible until InitDone swaps
                    // the new list in.
                    writer.apply(&event);
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

impl Slim for Secret {
    fn slim(&mut self) {
        slim_metadata(&mut self.metadata);
    }
}

impl Slim for BGPPeer {
    fn slim(&mut self) {
        slim_metadata(&mut self.metadata);
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

    fn service(name: &str, port: i32) -> Service {
        let mut service = Service::default();
        service.metadata.namespace = Some("shop".into());
        service.metadata.name = Some(name.into());
        service.spec = Some(k8s_openapi::api::core::v1::ServiceSpec {
            ports: Some(vec![k8s_openapi::api::core::v1::ServicePort {
                port,
                ..Default::default()
            }]),
            ..Default::default()
        });
        service
    }

    #[test]
    fn a_cache_serves_what_was_stored_and_swaps_a_relist_in_only_when_complete() {
        let (cache, mut writer) = cache::<Service>();
        let key = ServiceKey::new("shop", "web");
        assert!(!*cache.ready.borrow());
        writer.apply(&watcher::Event::Init);
        writer.apply(&watcher::Event::InitApply(service("web", 80)));
        // Not listed completely yet: nothing to serve.
        assert!(cache.get(&service_cache_key(&key)).is_none());
        writer.apply(&watcher::Event::InitDone);
        assert!(*cache.ready.borrow());
        assert_eq!(
            cache.get(&service_cache_key(&key)).as_deref(),
            Some(&service("web", 80))
        );
        writer.apply(&watcher::Event::Apply(service("web", 8080)));
        writer.apply(&watcher::Event::Apply(service("api", 81)));
        assert_eq!(cache.all().len(), 2);
        assert_eq!(
            cache.get(&service_cache_key(&key)).as_deref(),
            Some(&service("web", 8080))
        );
        // A relist keeps the last state until its list is complete, then
        // replaces it whole (what the new list lacks is gone).
        writer.apply(&watcher::Event::Init);
        writer.apply(&watcher::Event::InitApply(service("web", 9090)));
        assert_eq!(cache.all().len(), 2);
        writer.apply(&watcher::Event::InitDone);
        assert_eq!(
            cache
                .all()
                .iter()
                .map(|s| (**s).clone())
                .collect::<Vec<_>>(),
            vec![service("web", 9090)]
        );
        writer.apply(&watcher::Event::Delete(service("web", 9090)));
        assert!(cache.all().is_empty());
    }

    #[test]
    fn the_slice_index_follows_a_slice_that_changes_service() {
        let mut index = SliceIndex::default();
        let slice = SliceKey {
            namespace: "shop".into(),
            name: "web-abc".into(),
        };
        let web = ServiceKey::new("shop", "web");
        let api = ServiceKey::new("shop", "api");
        assert_eq!(index.set(slice.clone(), Some(web.clone())), None);
        assert_eq!(&*index.slices_of(&web)[0], "web-abc");
        assert_eq!(
            index.set(slice.clone(), Some(api.clone())),
            Some(web.clone())
        );
        assert!(index.slices_of(&web).is_empty());
        assert_eq!(index.slices_of(&api).len(), 1);
        assert_eq!(index.set(slice, None), Some(api.clone()));
        assert!(index.slices_of(&api).is_empty());
    }

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
