//! A fake Kubernetes API server, so the agent's kube-rs watchers, reflectors
//! and writers run in tests without a cluster: plain HTTP/1.1 on a TCP
//! socket, the few resources xlb reads and writes, one global
//! resourceVersion, watches replayed from history, bookmarks, timeouts and
//! 410 Expired after compaction.
//!
//! It copies kube-apiserver's wire behaviour wherever a client could notice
//! the difference: list items carry no apiVersion/kind, an update that
//! changes nothing keeps the resourceVersion and emits no event, finalizers
//! hold back a deletion, a label change seen through a selector watch becomes
//! ADDED or DELETED, and errors are `Status` objects with the real reasons.
//! It leaves out what the tests do not need: validation, defaulting,
//! admission, managedFields and dry runs.

use std::{
    collections::{BTreeMap, HashMap, hash_map::RandomState},
    hash::{BuildHasher, Hasher},
    io::{self, BufRead, BufReader, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, Sender},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use serde_json::{Map, Value, json};

/// How often a watch with `allowWatchBookmarks=true` gets a BOOKMARK. The
/// real server sends them about once a minute; tests cannot wait that long.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// How often an idle watch checks whether its client went away, so streams
/// the client dropped do not pile up until their timeout.
const PEER_CHECK_INTERVAL: Duration = Duration::from_millis(200);

/// The counter starts well above zero because "0" means "any version" to a
/// watch: a list answered at "0" would turn the following watch into a
/// replay of ADDED events instead of a continuation.
const FIRST_RESOURCE_VERSION: u64 = 100;

/// The annotation that ends the initial events of a streaming list
/// (`sendInitialEvents=true`, KEP-3157), which kube-rs waits for.
const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

/// The optimistic-concurrency message of kube-apiserver, which clients match.
const STALE_OBJECT: &str =
    "the object has been modified; please apply your changes to the latest version and try again";

/// A resource the fake serves, with the registry-strategy facts that change
/// what a client observes.
struct ResourceType {
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    /// Has a `/status` subresource: writes to the main resource keep the
    /// stored `.status` and `/status` writes change nothing else.
    status_subresource: bool,
    /// PUT of a missing object creates it (`AllowCreateOnUpdate`).
    create_on_update: bool,
    /// `metadata.generation` starts at 1 and grows when anything outside
    /// metadata and status changes.
    tracks_generation: bool,
}

const RESOURCE_TYPES: &[ResourceType] = &[
    ResourceType {
        group: "",
        version: "v1",
        plural: "services",
        kind: "Service",
        namespaced: true,
        status_subresource: true,
        create_on_update: false,
        tracks_generation: false,
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "nodes",
        kind: "Node",
        namespaced: false,
        status_subresource: true,
        create_on_update: false,
        tracks_generation: false,
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        status_subresource: false,
        create_on_update: true,
        tracks_generation: false,
    },
    ResourceType {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        kind: "EndpointSlice",
        namespaced: true,
        status_subresource: false,
        create_on_update: false,
        tracks_generation: true,
    },
    ResourceType {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        kind: "Lease",
        namespaced: true,
        status_subresource: false,
        create_on_update: true,
        tracks_generation: false,
    },
    ResourceType {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        status_subresource: false,
        create_on_update: true,
        tracks_generation: false,
    },
];

impl ResourceType {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The name kube-apiserver uses in messages: `services`,
    /// `leases.coordination.k8s.io`.
    fn qualified_name(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    fn status_details(&self, name: &str) -> Value {
        let mut details = Map::new();
        details.insert("name".into(), name.into());
        if !self.group.is_empty() {
            details.insert("group".into(), self.group.into());
        }
        details.insert("kind".into(), self.plural.into());
        Value::Object(details)
    }

    fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }
}

fn find_resource(group: &str, version: &str, plural: &str) -> Option<usize> {
    RESOURCE_TYPES
        .iter()
        .position(|t| t.group == group && t.version == version && t.plural == plural)
}

fn find_kind(api_version: &str, kind: &str) -> Option<usize> {
    RESOURCE_TYPES
        .iter()
        .position(|t| t.api_version() == api_version && t.kind == kind)
}

/// Test helpers fail loudly on a kind the fake does not serve: a typo there
/// would otherwise look like an empty cluster.
fn expect_kind(api_version: &str, kind: &str) -> usize {
    find_kind(api_version, kind)
        .unwrap_or_else(|| panic!("the fake API server does not serve {api_version} {kind}"))
}

/// An error answered as a `Status` object, as kube-rs decodes it.
#[derive(Debug)]
struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, details: Value) -> ApiError {
        self.details = Some(details);
        self
    }

    fn not_found(resource: &ResourceType, name: &str) -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", resource.qualified_name()),
        )
        .with_details(resource.status_details(name))
    }

    fn path_not_found() -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    fn already_exists(resource: &ResourceType, name: &str) -> ApiError {
        ApiError::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", resource.qualified_name()),
        )
        .with_details(resource.status_details(name))
    }

    fn conflict(resource: &ResourceType, name: &str, why: &str) -> ApiError {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                resource.qualified_name()
            ),
        )
        .with_details(resource.status_details(name))
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    fn invalid(resource: &ResourceType, name: &str, why: &str) -> ApiError {
        ApiError::new(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {why}", resource.kind),
        )
        .with_details(resource.status_details(name))
    }

    fn method_not_allowed() -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
    }

    fn unavailable() -> ApiError {
        ApiError::new(
            503,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        )
    }

    fn expired(requested: u64, oldest: u64) -> ApiError {
        ApiError::new(
            410,
            "Expired",
            format!("too old resource version: {requested} ({oldest})"),
        )
    }

    fn status(&self) -> Value {
        let mut status = Map::new();
        status.insert("kind".into(), "Status".into());
        status.insert("apiVersion".into(), "v1".into());
        status.insert("metadata".into(), json!({}));
        status.insert("status".into(), "Failure".into());
        status.insert("message".into(), self.message.clone().into());
        status.insert("reason".into(), self.reason.into());
        if let Some(details) = &self.details {
            status.insert("details".into(), details.clone());
        }
        status.insert("code".into(), self.code.into());
        Value::Object(status)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ObjectKey {
    resource: usize,
    /// Empty for cluster-scoped resources.
    namespace: String,
    name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One write, kept for watches that start from an older resourceVersion.
struct Change {
    change_type: ChangeType,
    resource: usize,
    object: Value,
    /// The state before a modification: a selector watch needs it to tell
    /// an object entering or leaving the selection (ADDED/DELETED) from one
    /// changing inside it (MODIFIED).
    previous: Option<Value>,
    resource_version: u64,
}

enum WatchMessage {
    Change(Arc<Change>),
    Cut,
}

struct WatchHandle {
    sender: Sender<WatchMessage>,
    /// Shut down to cut the stream even while its thread is blocked writing.
    stream: TcpStream,
}

struct Store {
    resource_version: u64,
    /// History at or below this version is forgotten.
    compacted: u64,
    objects: BTreeMap<ObjectKey, Value>,
    history: Vec<Arc<Change>>,
    watches: HashMap<u64, WatchHandle>,
    next_watch_id: u64,
}

impl Store {
    fn new() -> Store {
        Store {
            resource_version: FIRST_RESOURCE_VERSION,
            compacted: 0,
            objects: BTreeMap::new(),
            history: Vec::new(),
            watches: HashMap::new(),
            next_watch_id: 0,
        }
    }

    fn bump(&mut self, object: &mut Value) -> u64 {
        self.resource_version += 1;
        metadata_mut(object).insert(
            "resourceVersion".into(),
            self.resource_version.to_string().into(),
        );
        self.resource_version
    }

    /// Records a write and hands it to every open watch while the store is
    /// still locked, so each watch sees writes in resourceVersion order.
    fn emit(&mut self, change: Change) {
        let change = Arc::new(change);
        self.history.push(change.clone());
        self.watches.retain(|_, watch| {
            watch
                .sender
                .send(WatchMessage::Change(change.clone()))
                .is_ok()
        });
    }

    fn insert_new(&mut self, key: ObjectKey, mut object: Value) -> Value {
        let resource_version = self.bump(&mut object);
        let object = order_top_level(object);
        self.objects.insert(key.clone(), object.clone());
        self.emit(Change {
            change_type: ChangeType::Added,
            resource: key.resource,
            object: object.clone(),
            previous: None,
            resource_version,
        });
        object
    }

    /// Stores a modification; an object whose deletion only waited for its
    /// finalizers goes away once they are all removed.
    fn commit_update(&mut self, key: ObjectKey, old: Value, mut object: Value) -> Value {
        let deleting = metadata_str(&object, "deletionTimestamp").is_some();
        let finalizers_left = object
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|list| !list.is_empty());
        if deleting && !finalizers_left {
            return self.remove(key, object);
        }
        let resource_version = self.bump(&mut object);
        let object = order_top_level(object);
        self.objects.insert(key.clone(), object.clone());
        self.emit(Change {
            change_type: ChangeType::Modified,
            resource: key.resource,
            object: object.clone(),
            previous: Some(old),
            resource_version,
        });
        object
    }

    fn remove(&mut self, key: ObjectKey, mut object: Value) -> Value {
        let resource_version = self.bump(&mut object);
        self.objects.remove(&key);
        self.emit(Change {
            change_type: ChangeType::Deleted,
            resource: key.resource,
            object: object.clone(),
            previous: None,
            resource_version,
        });
        object
    }

    fn create(
        &mut self,
        resource: usize,
        namespace: Option<&str>,
        mut object: Value,
    ) -> Result<Value, ApiError> {
        let kind = &RESOURCE_TYPES[resource];
        check_type_meta(kind, &mut object)?;
        let metadata = metadata_mut(&mut object);
        if kind.namespaced {
            reconcile_namespace(metadata, namespace)?;
        } else {
            metadata.shift_remove("namespace");
        }
        let name = match metadata.get("name").and_then(Value::as_str) {
            Some(name) if !name.is_empty() => name.to_string(),
            _ => match metadata.get("generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => {
                    let name = format!("{prefix}{}", random_suffix());
                    metadata.insert("name".into(), name.clone().into());
                    name
                }
                _ => {
                    return Err(ApiError::invalid(
                        kind,
                        "",
                        "metadata.name: Required value: name or generateName is required",
                    ));
                }
            },
        };
        if metadata
            .get("resourceVersion")
            .and_then(Value::as_str)
            .is_some_and(|version| !version.is_empty())
        {
            // What etcd3's store answers; a client resubmitting a fetched
            // object must clear its resourceVersion against a real server too.
            return Err(ApiError::new(
                500,
                "InternalError",
                "resourceVersion should not be set on objects to be created",
            ));
        }
        metadata.insert("uid".into(), new_uid().into());
        metadata.insert("creationTimestamp".into(), timestamp_now().into());
        metadata.shift_remove("deletionTimestamp");
        metadata.shift_remove("deletionGracePeriodSeconds");
        if kind.tracks_generation {
            metadata.insert("generation".into(), 1.into());
        }
        if kind.kind == "Service" && kind.group.is_empty() {
            // The Service strategy clears status on create; only /status
            // writes (the load balancer controller's) may fill it.
            object["status"] = json!({"loadBalancer": {}});
        }
        let key = ObjectKey {
            resource,
            namespace: metadata_str(&object, "namespace")
                .unwrap_or_default()
                .to_string(),
            name: name.clone(),
        };
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(kind, &name));
        }
        Ok(self.insert_new(key, object))
    }

    fn replace(
        &mut self,
        resource: usize,
        namespace: Option<&str>,
        name: &str,
        mut object: Value,
        status_only: bool,
    ) -> Result<(u16, Value), ApiError> {
        let kind = &RESOURCE_TYPES[resource];
        check_type_meta(kind, &mut object)?;
        let metadata = metadata_mut(&mut object);
        match metadata.get("name").and_then(Value::as_str) {
            None | Some("") => {
                metadata.insert("name".into(), name.into());
            }
            Some(body_name) if body_name != name => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({body_name}) does not match the name on the URL ({name})"
                )));
            }
            Some(_) => {}
        }
        if kind.namespaced {
            reconcile_namespace(metadata, namespace)?;
        }
        let key = object_key(resource, namespace, name);
        let requested_version = metadata_str(&object, "resourceVersion")
            .filter(|version| !version.is_empty())
            .map(str::to_string);
        let Some(old) = self.objects.get(&key).cloned() else {
            if status_only || !kind.create_on_update {
                return Err(ApiError::not_found(kind, name));
            }
            if requested_version.is_some() {
                return Err(ApiError::conflict(kind, name, STALE_OBJECT));
            }
            return Ok((201, self.create(resource, namespace, object)?));
        };
        if let Some(version) = requested_version
            && Some(version.as_str()) != metadata_str(&old, "resourceVersion")
        {
            return Err(ApiError::conflict(kind, name, STALE_OBJECT));
        }
        self.write_over(key, kind, name, old, object, status_only)
    }

    fn patch(
        &mut self,
        resource: usize,
        namespace: Option<&str>,
        name: &str,
        patch_type: PatchType,
        patch: &Value,
        status_only: bool,
    ) -> Result<(u16, Value), ApiError> {
        let kind = &RESOURCE_TYPES[resource];
        let key = object_key(resource, namespace, name);
        let Some(old) = self.objects.get(&key).cloned() else {
            // Server-side apply creates what does not exist yet.
            if patch_type == PatchType::Apply && !status_only {
                let mut object = patch.clone();
                if !object.is_object() {
                    return Err(ApiError::bad_request("an apply patch must be an object"));
                }
                let metadata = metadata_mut(&mut object);
                match metadata.get("name").and_then(Value::as_str) {
                    Some(body_name) if body_name != name => {
                        return Err(ApiError::bad_request(format!(
                            "the name of the object ({body_name}) does not match the name on the URL ({name})"
                        )));
                    }
                    _ => {
                        metadata.insert("name".into(), name.into());
                    }
                }
                return Ok((201, self.create(resource, namespace, object)?));
            }
            return Err(ApiError::not_found(kind, name));
        };
        let patched = match patch_type {
            PatchType::Merge | PatchType::Apply => {
                if !patch.is_object() {
                    return Err(ApiError::bad_request("a merge patch must be a JSON object"));
                }
                let mut patched = old.clone();
                merge_patch(&mut patched, patch);
                patched
            }
            PatchType::Json => {
                json_patch(&old, patch).map_err(|why| ApiError::invalid(kind, name, &why))?
            }
        };
        if !patched.is_object() {
            return Err(ApiError::bad_request("the patched object is not an object"));
        }
        // A patch carrying metadata.resourceVersion is a precondition, as
        // with kube-apiserver.
        if let Some(version) = metadata_str(&patched, "resourceVersion")
            && Some(version) != metadata_str(&old, "resourceVersion")
        {
            return Err(ApiError::conflict(kind, name, STALE_OBJECT));
        }
        self.write_over(key, kind, name, old, patched, status_only)
    }

    /// The end of a replace or a patch: the uid precondition, then only the
    /// status (for `/status`) or everything but the status (for objects with
    /// a status subresource) is taken from `incoming`.
    fn write_over(
        &mut self,
        key: ObjectKey,
        kind: &ResourceType,
        name: &str,
        old: Value,
        incoming: Value,
        status_only: bool,
    ) -> Result<(u16, Value), ApiError> {
        check_uid_precondition(kind, name, &old, &incoming)?;
        let new = if status_only {
            with_status_of(old.clone(), &incoming)
        } else if kind.status_subresource {
            with_status_of(incoming, &old)
        } else {
            incoming
        };
        Ok((200, self.update(key, old, new)))
    }

    /// The common end of PUT and PATCH: system fields stay the server's, and
    /// a write that changes nothing is not a write.
    fn update(&mut self, key: ObjectKey, old: Value, mut new: Value) -> Value {
        let kind = &RESOURCE_TYPES[key.resource];
        new["apiVersion"] = kind.api_version().into();
        new["kind"] = kind.kind.into();
        carry_system_fields(&old, &mut new, &key);
        if new == old {
            return old;
        }
        if kind.tracks_generation {
            bump_generation(&old, &mut new);
        }
        self.commit_update(key, old, new)
    }

    fn delete_object(
        &mut self,
        key: ObjectKey,
        preconditions: Option<&Value>,
    ) -> Result<Value, ApiError> {
        let kind = &RESOURCE_TYPES[key.resource];
        let Some(old) = self.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(kind, &key.name));
        };
        if let Some(preconditions) = preconditions {
            for field in ["resourceVersion", "uid"] {
                if let Some(expected) = preconditions.get(field).and_then(Value::as_str)
                    && Some(expected) != metadata_str(&old, field)
                {
                    return Err(ApiError::conflict(
                        kind,
                        &key.name,
                        &format!(
                            "Precondition failed: {field} in precondition: {expected}, {field} in object meta: {}",
                            metadata_str(&old, field).unwrap_or_default()
                        ),
                    ));
                }
            }
        }
        let has_finalizers = old
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|list| !list.is_empty());
        if has_finalizers {
            if metadata_str(&old, "deletionTimestamp").is_some() {
                return Ok(old);
            }
            let mut marked = old.clone();
            let metadata = metadata_mut(&mut marked);
            metadata.insert("deletionTimestamp".into(), timestamp_now().into());
            metadata.insert("deletionGracePeriodSeconds".into(), 0.into());
            return Ok(self.commit_update(key, old, marked));
        }
        Ok(self.remove(key, old))
    }

    fn matching(&self, filter: &Filter) -> impl Iterator<Item = (&ObjectKey, &Value)> {
        self.objects
            .iter()
            .filter(move |(key, object)| key.resource == filter.resource && filter.matches(object))
    }

    fn list(&self, filter: &Filter) -> Value {
        let kind = &RESOURCE_TYPES[filter.resource];
        // Like kube-apiserver, items of a list carry no apiVersion/kind.
        let items: Vec<Value> = self
            .matching(filter)
            .map(|(_, object)| {
                let mut item = object.clone();
                if let Some(fields) = item.as_object_mut() {
                    fields.shift_remove("apiVersion");
                    fields.shift_remove("kind");
                }
                item
            })
            .collect();
        json!({
            "kind": kind.list_kind(),
            "apiVersion": kind.api_version(),
            "metadata": {"resourceVersion": self.resource_version.to_string()},
            "items": items,
        })
    }

    fn open_watch(
        &mut self,
        filter: Filter,
        start: WatchStart,
        bookmarks: bool,
        stream: TcpStream,
    ) -> WatchPlan {
        let kind = &RESOURCE_TYPES[filter.resource];
        let mut initial = Vec::new();
        match start {
            WatchStart::Snapshot { end_bookmark } => {
                for (_, object) in self.matching(&filter) {
                    initial.push(event_line("ADDED", object));
                }
                if end_bookmark && bookmarks {
                    initial.push(bookmark_line(kind, self.resource_version, true));
                }
            }
            WatchStart::After(version) => {
                if version < self.compacted {
                    initial.push(event_line(
                        "ERROR",
                        &ApiError::expired(version, self.compacted).status(),
                    ));
                    return WatchPlan {
                        id: None,
                        filter,
                        initial,
                        receiver: None,
                        bookmarks,
                        timeout: None,
                        start_version: self.resource_version,
                    };
                }
                let first = self
                    .history
                    .partition_point(|change| change.resource_version <= version);
                for change in &self.history[first..] {
                    if let Some((event_type, object)) = filter.translate(change) {
                        initial.push(event_line(event_type, &object));
                    }
                }
            }
        }
        let (sender, receiver) = mpsc::channel();
        let id = self.next_watch_id;
        self.next_watch_id += 1;
        self.watches.insert(id, WatchHandle { sender, stream });
        WatchPlan {
            id: Some(id),
            filter,
            initial,
            receiver: Some(receiver),
            bookmarks,
            timeout: None,
            start_version: self.resource_version,
        }
    }

    fn cut_watches(&mut self) {
        for (_, watch) in self.watches.drain() {
            let _ = watch.stream.shutdown(Shutdown::Both);
            let _ = watch.sender.send(WatchMessage::Cut);
        }
    }
}

fn object_key(resource: usize, namespace: Option<&str>, name: &str) -> ObjectKey {
    let namespace = if RESOURCE_TYPES[resource].namespaced {
        namespace.unwrap_or("default").to_string()
    } else {
        String::new()
    };
    ObjectKey {
        resource,
        namespace,
        name: name.to_string(),
    }
}

/// Fills apiVersion/kind when the body omits them and refuses a body of
/// another type, like the decoder behind each kube-apiserver endpoint.
fn check_type_meta(kind: &ResourceType, object: &mut Value) -> Result<(), ApiError> {
    let Some(fields) = object.as_object_mut() else {
        return Err(ApiError::bad_request(
            "the request body is not a JSON object",
        ));
    };
    let api_version = kind.api_version();
    for (field, expected) in [("apiVersion", api_version.as_str()), ("kind", kind.kind)] {
        match fields.get(field).and_then(Value::as_str) {
            None | Some("") => {
                fields.insert(field.into(), expected.into());
            }
            Some(found) if found != expected => {
                return Err(ApiError::bad_request(format!(
                    "the body names {field} {found}, this endpoint serves {expected}"
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

fn reconcile_namespace(
    metadata: &mut Map<String, Value>,
    namespace: Option<&str>,
) -> Result<(), ApiError> {
    let Some(namespace) = namespace else {
        return Err(ApiError::method_not_allowed());
    };
    match metadata.get("namespace").and_then(Value::as_str) {
        None | Some("") => {
            metadata.insert("namespace".into(), namespace.into());
            Ok(())
        }
        Some(found) if found != namespace => Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
        Some(_) => Ok(()),
    }
}

fn check_uid_precondition(
    kind: &ResourceType,
    name: &str,
    old: &Value,
    new: &Value,
) -> Result<(), ApiError> {
    match metadata_str(new, "uid") {
        Some(uid) if !uid.is_empty() && Some(uid) != metadata_str(old, "uid") => {
            Err(ApiError::conflict(
                kind,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    metadata_str(old, "uid").unwrap_or_default()
                ),
            ))
        }
        _ => Ok(()),
    }
}

/// Clients cannot set these; the stored values win over the request's.
fn carry_system_fields(old: &Value, new: &mut Value, key: &ObjectKey) {
    let old_metadata = old
        .get("metadata")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let metadata = metadata_mut(new);
    metadata.insert("name".into(), key.name.clone().into());
    if !key.namespace.is_empty() {
        metadata.insert("namespace".into(), key.namespace.clone().into());
    }
    for field in [
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
    ] {
        match old_metadata.get(field) {
            Some(value) => {
                metadata.insert(field.into(), value.clone());
            }
            None => {
                metadata.shift_remove(field);
            }
        }
    }
}

fn bump_generation(old: &Value, new: &mut Value) {
    let without_metadata_and_status = |object: &Value| {
        let mut object = object.clone();
        if let Some(fields) = object.as_object_mut() {
            fields.shift_remove("metadata");
            fields.shift_remove("status");
        }
        object
    };
    if without_metadata_and_status(old) != without_metadata_and_status(new) {
        let generation = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        metadata_mut(new).insert("generation".into(), (generation + 1).into());
    }
}

/// `target` with the `.status` of `source` (or none, if `source` has none).
fn with_status_of(mut target: Value, source: &Value) -> Value {
    if let Some(fields) = target.as_object_mut() {
        match source.get("status") {
            Some(status) => {
                fields.insert("status".into(), status.clone());
            }
            None => {
                fields.shift_remove("status");
            }
        }
    }
    target
}

/// kube-apiserver writes kind, apiVersion and metadata first; keeping that
/// order makes dumps of the fake read like real ones.
fn order_top_level(object: Value) -> Value {
    let Value::Object(mut fields) = object else {
        return object;
    };
    let mut ordered = Map::new();
    for field in ["kind", "apiVersion", "metadata"] {
        if let Some(value) = fields.shift_remove(field) {
            ordered.insert(field.into(), value);
        }
    }
    ordered.extend(fields);
    Value::Object(ordered)
}

fn metadata_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object.get("metadata")?.get(field)?.as_str()
}

/// The metadata map, created if missing. `object` must be a JSON object.
fn metadata_mut(object: &mut Value) -> &mut Map<String, Value> {
    let fields = object
        .as_object_mut()
        .expect("objects handed to the store are JSON objects");
    let metadata = fields
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !metadata.is_object() {
        *metadata = Value::Object(Map::new());
    }
    metadata
        .as_object_mut()
        .expect("metadata was just made an object")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PatchType {
    /// RFC 7386; strategic merge is served the same way (lists are replaced
    /// rather than merged by key).
    Merge,
    /// Server-side apply, served as a merge patch (no field ownership).
    Apply,
    /// RFC 6902.
    Json,
}

fn patch_type(content_type: Option<&str>) -> Result<PatchType, ApiError> {
    let media_type = content_type
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match media_type.as_str() {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            Ok(PatchType::Merge)
        }
        "application/apply-patch+yaml" => Ok(PatchType::Apply),
        "application/json-patch+json" => Ok(PatchType::Json),
        _ => Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: \
                 application/json-patch+json, application/merge-patch+json, \
                 application/apply-patch+yaml (got {media_type:?})"
            ),
        )),
    }
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` deletes, and
/// anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch_fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let target_fields = target.as_object_mut().expect("made an object above");
    for (field, value) in patch_fields {
        if value.is_null() {
            target_fields.shift_remove(field);
        } else {
            merge_patch(
                target_fields.entry(field.as_str()).or_insert(Value::Null),
                value,
            );
        }
    }
}

/// RFC 6902 JSON patch; all operations apply or none do.
fn json_patch(target: &Value, operations: &Value) -> Result<Value, String> {
    let operations = operations
        .as_array()
        .ok_or("a JSON patch must be an array of operations")?;
    let mut document = target.clone();
    for operation in operations {
        let field = |name: &str| {
            operation
                .get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("JSON patch operation {operation} has no {name:?}"))
        };
        let value = || {
            operation
                .get("value")
                .cloned()
                .ok_or_else(|| format!("JSON patch operation {operation} has no \"value\""))
        };
        let path = field("path")?;
        match field("op")? {
            "add" => pointer_add(&mut document, path, value()?)?,
            "remove" => {
                pointer_remove(&mut document, path)?;
            }
            "replace" => {
                pointer_remove(&mut document, path)?;
                pointer_add(&mut document, path, value()?)?;
            }
            "move" => {
                let moved = pointer_remove(&mut document, field("from")?)?;
                pointer_add(&mut document, path, moved)?;
            }
            "copy" => {
                let from = field("from")?;
                let copied = document
                    .pointer(from)
                    .cloned()
                    .ok_or_else(|| format!("JSON patch copy: nothing at {from:?}"))?;
                pointer_add(&mut document, path, copied)?;
            }
            "test" => {
                if document.pointer(path) != Some(&value()?) {
                    return Err(format!("JSON patch test failed at {path:?}"));
                }
            }
            other => return Err(format!("JSON patch operation {other:?} is not supported")),
        }
    }
    Ok(document)
}

/// Splits an RFC 6901 pointer into its (still escaped) parent and its
/// unescaped last token.
fn split_pointer(path: &str) -> Result<(&str, String), String> {
    let (parent, last) = path
        .rsplit_once('/')
        .ok_or_else(|| format!("{path:?} is not a JSON pointer"))?;
    Ok((parent, last.replace("~1", "/").replace("~0", "~")))
}

fn pointer_add(document: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *document = value;
        return Ok(());
    }
    let (parent, token) = split_pointer(path)?;
    match document.pointer_mut(parent) {
        Some(Value::Object(fields)) => {
            fields.insert(token, value);
            Ok(())
        }
        Some(Value::Array(items)) => {
            let index = if token == "-" {
                items.len()
            } else {
                token
                    .parse::<usize>()
                    .ok()
                    .filter(|index| *index <= items.len())
                    .ok_or_else(|| format!("JSON patch: bad array index in {path:?}"))?
            };
            items.insert(index, value);
            Ok(())
        }
        _ => Err(format!("JSON patch: no container at {parent:?}")),
    }
}

fn pointer_remove(document: &mut Value, path: &str) -> Result<Value, String> {
    if path.is_empty() {
        return Ok(std::mem::take(document));
    }
    let (parent, token) = split_pointer(path)?;
    let removed = match document.pointer_mut(parent) {
        Some(Value::Object(fields)) => fields.shift_remove(&token),
        Some(Value::Array(items)) => token
            .parse::<usize>()
            .ok()
            .filter(|index| *index < items.len())
            .map(|index| items.remove(index)),
        _ => None,
    };
    removed.ok_or_else(|| format!("JSON patch: nothing at {path:?}"))
}

#[derive(Debug, PartialEq)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl LabelRequirement {
    fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        let label = |key: &str| labels.and_then(|labels| labels.get(key)?.as_str());
        match self {
            LabelRequirement::Equals(key, value) => label(key) == Some(value.as_str()),
            LabelRequirement::NotEquals(key, value) => label(key) != Some(value.as_str()),
            LabelRequirement::Exists(key) => label(key).is_some(),
            LabelRequirement::NotExists(key) => label(key).is_none(),
            LabelRequirement::In(key, values) => {
                label(key).is_some_and(|found| values.iter().any(|value| value == found))
            }
            LabelRequirement::NotIn(key, values) => {
                !label(key).is_some_and(|found| values.iter().any(|value| value == found))
            }
        }
    }
}

/// Parses the label selector grammar of kube-apiserver: `k=v`, `k==v`,
/// `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`, joined by commas.
fn parse_label_selector(selector: &str) -> Result<Vec<LabelRequirement>, ApiError> {
    let invalid = |term: &str| {
        ApiError::bad_request(format!(
            "unable to parse requirement: {term:?} in label selector {selector:?}"
        ))
    };
    let mut terms = Vec::new();
    let mut depth = 0_i32;
    let mut start = 0;
    for (index, character) in selector.char_indices() {
        match character {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&selector[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    if selector.trim().is_empty() {
        return Ok(Vec::new());
    }
    let valid_key = |key: &str| !key.is_empty() && !key.contains(char::is_whitespace);
    let mut requirements = Vec::new();
    for term in terms {
        let term = term.trim();
        let requirement = if let Some(open) = term.find('(') {
            let inner = term[open + 1..]
                .strip_suffix(')')
                .ok_or_else(|| invalid(term))?;
            let values = inner
                .split(',')
                .map(str::trim)
                .filter(|value| !value.is_empty())
                .map(str::to_string)
                .collect();
            let mut words = term[..open].split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some(key), Some("in"), None) => LabelRequirement::In(key.into(), values),
                (Some(key), Some("notin"), None) => LabelRequirement::NotIn(key.into(), values),
                _ => return Err(invalid(term)),
            }
        } else if let Some((key, value)) = term.split_once("!=") {
            LabelRequirement::NotEquals(key.trim().into(), value.trim().into())
        } else if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
            LabelRequirement::Equals(key.trim().into(), value.trim().into())
        } else if let Some(key) = term.strip_prefix('!') {
            LabelRequirement::NotExists(key.trim().into())
        } else {
            LabelRequirement::Exists(term.into())
        };
        let key = match &requirement {
            LabelRequirement::Equals(key, _)
            | LabelRequirement::NotEquals(key, _)
            | LabelRequirement::Exists(key)
            | LabelRequirement::NotExists(key)
            | LabelRequirement::In(key, _)
            | LabelRequirement::NotIn(key, _) => key,
        };
        if !valid_key(key) {
            return Err(invalid(term));
        }
        requirements.push(requirement);
    }
    Ok(requirements)
}

#[derive(Debug, PartialEq)]
struct FieldRequirement {
    path: String,
    value: String,
    equal: bool,
}

impl FieldRequirement {
    fn matches(&self, object: &Value) -> bool {
        let found = match self
            .path
            .split('.')
            .try_fold(object, |current, part| current.get(part))
        {
            Some(Value::String(text)) => text.clone(),
            None | Some(Value::Null) => String::new(),
            Some(other) => other.to_string(),
        };
        (found == self.value) == self.equal
    }
}

/// `path=value`, `path==value` and `path!=value` terms joined by commas.
/// Any dotted path is accepted, where kube-apiserver knows a fixed set per
/// resource (always `metadata.name` and `metadata.namespace`).
fn parse_field_selector(selector: &str) -> Result<Vec<FieldRequirement>, ApiError> {
    if selector.trim().is_empty() {
        return Ok(Vec::new());
    }
    selector
        .split(',')
        .map(|term| {
            let (path, value, equal) = if let Some((path, value)) = term.split_once("!=") {
                (path, value, false)
            } else if let Some((path, value)) =
                term.split_once("==").or_else(|| term.split_once('='))
            {
                (path, value, true)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector: {term:?} has no operator"
                )));
            };
            Ok(FieldRequirement {
                path: path.trim().into(),
                value: value.trim().into(),
                equal,
            })
        })
        .collect()
}

/// What a list or watch selects: one resource, maybe one namespace, and the
/// request's selectors.
struct Filter {
    resource: usize,
    namespace: Option<String>,
    labels: Vec<LabelRequirement>,
    fields: Vec<FieldRequirement>,
}

impl Filter {
    fn from_request(
        request: &Request,
        resource: usize,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> Result<Filter, ApiError> {
        let mut fields = parse_field_selector(request.param("fieldSelector").unwrap_or_default())?;
        if let Some(name) = name {
            fields.push(FieldRequirement {
                path: "metadata.name".into(),
                value: name.into(),
                equal: true,
            });
        }
        Ok(Filter {
            resource,
            namespace: namespace.map(str::to_string),
            labels: parse_label_selector(request.param("labelSelector").unwrap_or_default())?,
            fields,
        })
    }

    fn matches(&self, object: &Value) -> bool {
        if let Some(namespace) = &self.namespace
            && metadata_str(object, "namespace") != Some(namespace.as_str())
        {
            return false;
        }
        let labels = object
            .pointer("/metadata/labels")
            .and_then(Value::as_object);
        self.labels.iter().all(|label| label.matches(labels))
            && self.fields.iter().all(|field| field.matches(object))
    }

    /// The event this watch reports for `change`, if any. Like the watch
    /// cache, an object entering the selection is ADDED and one leaving it
    /// is DELETED (in its last matching state, at the change's version).
    fn translate(&self, change: &Change) -> Option<(&'static str, Value)> {
        if change.resource != self.resource {
            return None;
        }
        let now = self.matches(&change.object);
        match change.change_type {
            ChangeType::Added => now.then(|| ("ADDED", change.object.clone())),
            ChangeType::Deleted => now.then(|| ("DELETED", change.object.clone())),
            ChangeType::Modified => {
                let before = change
                    .previous
                    .as_ref()
                    .is_some_and(|previous| self.matches(previous));
                match (before, now) {
                    (true, true) => Some(("MODIFIED", change.object.clone())),
                    (false, true) => Some(("ADDED", change.object.clone())),
                    (true, false) => {
                        let mut gone = change.previous.clone()?;
                        metadata_mut(&mut gone).insert(
                            "resourceVersion".into(),
                            change.resource_version.to_string().into(),
                        );
                        Some(("DELETED", gone))
                    }
                    (false, false) => None,
                }
            }
        }
    }
}

enum WatchStart {
    /// ADDED for every current object first; with `end_bookmark`, the
    /// streaming-list BOOKMARK that marks the end of them.
    Snapshot { end_bookmark: bool },
    /// Every change after this resourceVersion.
    After(u64),
}

/// A watch stream ready to be written, decided while the store was locked.
struct WatchPlan {
    /// None when the watch ends right after `initial` (410 Expired).
    id: Option<u64>,
    filter: Filter,
    initial: Vec<Vec<u8>>,
    receiver: Option<Receiver<WatchMessage>>,
    bookmarks: bool,
    timeout: Option<Duration>,
    /// The store's version when the watch registered: every later write
    /// reaches it through `receiver`, so bookmarks never claim a version
    /// whose events this watch has not sent yet.
    start_version: u64,
}

fn event_line(event_type: &str, object: &Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(&json!({"type": event_type, "object": object}))
        .expect("JSON values always serialize");
    line.push(b'\n');
    line
}

fn bookmark_line(kind: &ResourceType, resource_version: u64, initial_events_end: bool) -> Vec<u8> {
    let mut metadata = Map::new();
    metadata.insert(
        "resourceVersion".into(),
        resource_version.to_string().into(),
    );
    if initial_events_end {
        metadata.insert("annotations".into(), json!({ INITIAL_EVENTS_END: "true" }));
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": kind.kind, "apiVersion": kind.api_version(), "metadata": metadata}),
    )
}

struct Request {
    method: String,
    /// As received, for `FakeApi::requests`.
    target: String,
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    keep_alive: bool,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(header, _)| header.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(param, _)| param == name)
            .map(|(_, value)| value.as_str())
    }

    /// A boolean parameter, spelled as Go's `strconv.ParseBool` accepts.
    fn flag(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.param(name) {
            None => Ok(None),
            Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(Some(true)),
            Some("" | "0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(Some(false)),
            Some(other) => Err(ApiError::bad_request(format!(
                "invalid value {other:?} for boolean parameter {name}"
            ))),
        }
    }

    fn json_body(&self) -> Result<Value, ApiError> {
        let body: Value = serde_json::from_slice(&self.body).map_err(|error| {
            ApiError::bad_request(format!("the request body is not JSON: {error}"))
        })?;
        if !body.is_object() {
            return Err(ApiError::bad_request(
                "the request body is not a JSON object",
            ));
        }
        Ok(body)
    }
}

fn invalid_data(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// Reads one request; `None` when the client closed the connection between
/// requests.
fn read_request(
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
) -> io::Result<Option<Request>> {
    let mut line = String::new();
    // RFC 9112 section 2.2: a server should ignore empty lines before a
    // request line.
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if !line.trim().is_empty() {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid_data(format!("bad request line {line:?}")));
    };
    let (method, target, version) = (method.to_string(), target.to_string(), version.to_string());
    let mut headers = Vec::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let header = header.trim_end_matches(['\r', '\n']);
        if header.is_empty() {
            break;
        }
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| invalid_data(format!("bad header {header:?}")))?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(header, _)| header.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.to_ascii_lowercase())
    };
    let connection = header("connection").unwrap_or_default();
    let keep_alive = if version == "HTTP/1.0" {
        connection.contains("keep-alive")
    } else {
        !connection.contains("close")
    };
    if header("expect").is_some_and(|expect| expect == "100-continue") {
        writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    let body = if header("transfer-encoding").is_some_and(|coding| coding.contains("chunked")) {
        read_chunked_body(reader)?
    } else if let Some(length) = header("content-length") {
        let length: usize = length
            .parse()
            .map_err(|_| invalid_data(format!("bad Content-Length {length:?}")))?;
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        body
    } else {
        Vec::new()
    };
    // Clients may send the absolute form (RFC 9112 section 3.2.2).
    let origin_form = match target.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |start| &rest[start..]),
        None => &target,
    };
    let (path, query) = origin_form.split_once('?').unwrap_or((origin_form, ""));
    let query = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(name, true), percent_decode(value, true))
        })
        .collect();
    Ok(Some(Request {
        method,
        path: path.to_string(),
        target,
        query,
        headers,
        body,
        keep_alive,
    }))
}

fn read_chunked_body(reader: &mut BufReader<TcpStream>) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size_line = String::new();
        if reader.read_line(&mut size_line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let size = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16)
            .map_err(|_| invalid_data(format!("bad chunk size {size:?}")))?;
        if size == 0 {
            // Skip trailers up to the empty line that ends the message.
            loop {
                let mut trailer = String::new();
                if reader.read_line(&mut trailer)? == 0 || trailer.trim().is_empty() {
                    return Ok(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        let mut line_end = [0; 2];
        reader.read_exact(&mut line_end)?;
    }
}

/// Decodes `%XX` escapes (and `+` as a space in query strings, as kube's
/// form encoder writes spaces); malformed escapes stay as they are.
fn percent_decode(text: &str, plus_is_space: bool) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escaped = (bytes[index] == b'%')
            .then(|| bytes.get(index + 1..index + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match (escaped, bytes[index]) {
            (Some(byte), _) => {
                decoded.push(byte);
                index += 3;
            }
            (None, b'+') if plus_is_space => {
                decoded.push(b' ');
                index += 1;
            }
            (None, byte) => {
                decoded.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

fn reason_phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        410 => "Gone",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

fn write_json(writer: &mut TcpStream, code: u16, body: &Value, keep_alive: bool) -> io::Result<()> {
    let body = serde_json::to_vec(body)?;
    let mut response = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nCache-Control: no-cache, private\r\nContent-Length: {}\r\n{}\r\n",
        reason_phrase(code),
        body.len(),
        if keep_alive { "" } else { "Connection: close\r\n" },
    )
    .into_bytes();
    response.extend_from_slice(&body);
    writer.write_all(&response)
}

fn write_chunk(writer: &mut TcpStream, data: &[u8]) -> io::Result<()> {
    let mut chunk = format!("{:x}\r\n", data.len()).into_bytes();
    chunk.extend_from_slice(data);
    chunk.extend_from_slice(b"\r\n");
    writer.write_all(&chunk)
}

/// Whether the client closed its side; polled rather than read so the
/// socket's blocking mode, shared with the writer, stays untouched.
fn peer_closed(stream: &TcpStream) -> bool {
    let mut poll = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd for a socket we own, and a zero timeout.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready > 0 && poll.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// Recovers the data of a mutex whose holder panicked: one failed test
/// thread must not take the whole fake down with it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// State shared by the handle and every serving thread.
struct Shared {
    store: Mutex<Store>,
    address: SocketAddr,
    unavailable: AtomicBool,
    stopping: AtomicBool,
    /// Request lines with the client address they came from.
    requests: Mutex<Vec<(Option<IpAddr>, String)>>,
    /// Every open connection, to close them all when the fake is dropped.
    connections: Mutex<HashMap<u64, TcpStream>>,
    next_connection_id: AtomicU64,
}

enum Reply {
    Json(u16, Value),
    Watch(Box<WatchPlan>),
}

/// Whether the connection can carry another request.
enum Outcome {
    KeepOpen,
    Close,
}

impl Shared {
    fn accept_loop(self: Arc<Shared>, listener: TcpListener) {
        for stream in listener.incoming() {
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            let Ok(stream) = stream else {
                // Transient accept failures (ECONNABORTED, EMFILE) must not
                // end the server.
                thread::sleep(Duration::from_millis(10));
                continue;
            };
            let id = self.next_connection_id.fetch_add(1, Ordering::SeqCst);
            if let Ok(clone) = stream.try_clone() {
                lock(&self.connections).insert(id, clone);
            }
            let shared = self.clone();
            let spawned = thread::Builder::new()
                .name("fake-api-conn".into())
                .spawn(move || {
                    shared.serve_connection(stream);
                    lock(&shared.connections).remove(&id);
                });
            if spawned.is_err() {
                lock(&self.connections).remove(&id);
            }
        }
    }

    fn serve_connection(&self, stream: TcpStream) {
        // Watch events are small writes that must reach the client at once.
        let _ = stream.set_nodelay(true);
        let Ok(read_half) = stream.try_clone() else {
            return;
        };
        let peer = stream.peer_addr().ok().map(|peer| peer.ip());
        let mut reader = BufReader::new(read_half);
        let mut writer = stream;
        loop {
            let request = match read_request(&mut reader, &mut writer) {
                Ok(Some(request)) => request,
                Ok(None) => break,
                Err(error) => {
                    if error.kind() == io::ErrorKind::InvalidData {
                        let status = ApiError::bad_request(error.to_string()).status();
                        let _ = write_json(&mut writer, 400, &status, false);
                    }
                    break;
                }
            };
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            lock(&self.requests).push((peer, format!("{} {}", request.method, request.target)));
            let keep_alive = request.keep_alive;
            let reply = if self.unavailable.load(Ordering::SeqCst) {
                Err(ApiError::unavailable())
            } else {
                self.route(&request, &writer)
            };
            let outcome = match reply {
                Ok(Reply::Json(code, body)) => write_json(&mut writer, code, &body, keep_alive)
                    .map_or(Outcome::Close, |()| Outcome::KeepOpen),
                Err(error) => write_json(&mut writer, error.code, &error.status(), keep_alive)
                    .map_or(Outcome::Close, |()| Outcome::KeepOpen),
                Ok(Reply::Watch(plan)) => self.serve_watch(&mut writer, *plan),
            };
            if !keep_alive || matches!(outcome, Outcome::Close) {
                break;
            }
        }
        let _ = writer.shutdown(Shutdown::Both);
    }

    fn route(&self, request: &Request, connection: &TcpStream) -> Result<Reply, ApiError> {
        let segments: Vec<String> = request
            .path
            .split('/')
            .filter(|segment| !segment.is_empty())
            .map(|segment| percent_decode(segment, false))
            .collect();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        let discovery = |body: Value| {
            if request.method == "GET" {
                Ok(Reply::Json(200, body))
            } else {
                Err(ApiError::method_not_allowed())
            }
        };
        match segments.as_slice() {
            [] => discovery(json!({"paths": ["/api", "/api/v1", "/apis", "/version"]})),
            ["version"] => discovery(version_info()),
            ["api"] => discovery(json!({
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": self.address.to_string()}
                ],
            })),
            ["apis"] => discovery(api_group_list()),
            ["api", "v1"] => discovery(api_resource_list("", "v1")?),
            ["apis", group] => discovery(api_group(group)?),
            ["apis", group, version] => discovery(api_resource_list(group, version)?),
            ["api", "v1", rest @ ..] => self.serve_resource(request, connection, "", "v1", rest),
            ["apis", group, version, rest @ ..] => {
                self.serve_resource(request, connection, group, version, rest)
            }
            _ => Err(ApiError::path_not_found()),
        }
    }

    fn serve_resource(
        &self,
        request: &Request,
        connection: &TcpStream,
        group: &str,
        version: &str,
        rest: &[&str],
    ) -> Result<Reply, ApiError> {
        // The deprecated `/watch/` path prefix still works on real servers.
        let (legacy_watch, rest) = match rest {
            ["watch", tail @ ..] => (true, tail),
            _ => (false, rest),
        };
        let (namespace, plural, tail) = match rest {
            ["namespaces", namespace, plural, tail @ ..] => (Some(*namespace), *plural, tail),
            [plural, tail @ ..] => (None, *plural, tail),
            [] => return Err(ApiError::path_not_found()),
        };
        let resource =
            find_resource(group, version, plural).ok_or_else(ApiError::path_not_found)?;
        let kind = &RESOURCE_TYPES[resource];
        if namespace.is_some() && !kind.namespaced {
            return Err(ApiError::path_not_found());
        }
        let (name, status_only) = match tail {
            [] => (None, false),
            [name] => (Some(*name), false),
            [name, "status"] if kind.status_subresource => (Some(*name), true),
            _ => return Err(ApiError::path_not_found()),
        };
        if name.is_some() && kind.namespaced && namespace.is_none() {
            return Err(ApiError::path_not_found());
        }
        let watch = legacy_watch || request.flag("watch")?.unwrap_or(false);
        match (request.method.as_str(), name) {
            ("GET", _) if watch => self.open_watch(request, connection, resource, namespace, name),
            ("GET", None) => {
                let filter = Filter::from_request(request, resource, namespace, None)?;
                Ok(Reply::Json(200, lock(&self.store).list(&filter)))
            }
            ("GET", Some(name)) => lock(&self.store)
                .objects
                .get(&object_key(resource, namespace, name))
                .cloned()
                .map(|object| Reply::Json(200, object))
                .ok_or_else(|| ApiError::not_found(kind, name)),
            ("POST", None) => {
                let body = request.json_body()?;
                let created = lock(&self.store).create(resource, namespace, body)?;
                Ok(Reply::Json(201, created))
            }
            ("PUT", Some(name)) => {
                let body = request.json_body()?;
                let (code, object) =
                    lock(&self.store).replace(resource, namespace, name, body, status_only)?;
                Ok(Reply::Json(code, object))
            }
            ("PATCH", Some(name)) => {
                let patch_type = patch_type(request.header("content-type"))?;
                // The body of an apply patch is YAML; kube-rs sends JSON,
                // which is YAML too, and only that is understood here.
                let patch: Value = serde_json::from_slice(&request.body).map_err(|error| {
                    ApiError::bad_request(format!("the patch is not JSON: {error}"))
                })?;
                let (code, object) = lock(&self.store).patch(
                    resource,
                    namespace,
                    name,
                    patch_type,
                    &patch,
                    status_only,
                )?;
                Ok(Reply::Json(code, object))
            }
            ("DELETE", Some(name)) if !status_only => {
                let options = delete_options(request)?;
                let deleted = lock(&self.store).delete_object(
                    object_key(resource, namespace, name),
                    options
                        .as_ref()
                        .and_then(|options| options.get("preconditions")),
                )?;
                Ok(Reply::Json(200, deleted))
            }
            ("DELETE", None) => {
                let filter = Filter::from_request(request, resource, namespace, None)?;
                let mut store = lock(&self.store);
                let keys: Vec<ObjectKey> = store
                    .matching(&filter)
                    .map(|(key, _)| key.clone())
                    .collect();
                let items: Vec<Value> = keys
                    .into_iter()
                    .filter_map(|key| store.delete_object(key, None).ok())
                    .collect();
                Ok(Reply::Json(
                    200,
                    json!({
                        "kind": kind.list_kind(),
                        "apiVersion": kind.api_version(),
                        "metadata": {"resourceVersion": store.resource_version.to_string()},
                        "items": items,
                    }),
                ))
            }
            _ => Err(ApiError::method_not_allowed()),
        }
    }

    fn open_watch(
        &self,
        request: &Request,
        connection: &TcpStream,
        resource: usize,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> Result<Reply, ApiError> {
        let filter = Filter::from_request(request, resource, namespace, name)?;
        let bookmarks = request.flag("allowWatchBookmarks")?.unwrap_or(false);
        let timeout = match request.param("timeoutSeconds") {
            None | Some("") => None,
            Some(seconds) => Some(Duration::from_secs(seconds.parse().map_err(|_| {
                ApiError::bad_request(format!("invalid timeoutSeconds {seconds:?}"))
            })?)),
        };
        let requested = request.param("resourceVersion").unwrap_or_default();
        let send_initial_events = request.flag("sendInitialEvents")?;
        let stream = connection
            .try_clone()
            .map_err(|error| ApiError::new(500, "InternalError", error.to_string()))?;
        let mut store = lock(&self.store);
        let start = match (send_initial_events, requested) {
            (Some(true), _) => WatchStart::Snapshot { end_bookmark: true },
            (Some(false), "") => WatchStart::After(store.resource_version),
            (_, "" | "0") => WatchStart::Snapshot {
                end_bookmark: false,
            },
            (_, version) => WatchStart::After(version.parse().map_err(|_| {
                ApiError::bad_request(format!("invalid resourceVersion {version:?}"))
            })?),
        };
        let mut plan = store.open_watch(filter, start, bookmarks, stream);
        plan.timeout = timeout;
        Ok(Reply::Watch(Box::new(plan)))
    }

    fn serve_watch(&self, writer: &mut TcpStream, plan: WatchPlan) -> Outcome {
        let outcome = stream_watch(writer, &plan).unwrap_or(Outcome::Close);
        if let Some(id) = plan.id {
            lock(&self.store).watches.remove(&id);
        }
        outcome
    }
}

fn stream_watch(writer: &mut TcpStream, plan: &WatchPlan) -> io::Result<Outcome> {
    writer.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nCache-Control: no-cache, private\r\nTransfer-Encoding: chunked\r\n\r\n",
    )?;
    for line in &plan.initial {
        write_chunk(writer, line)?;
    }
    let Some(receiver) = &plan.receiver else {
        writer.write_all(b"0\r\n\r\n")?;
        return Ok(Outcome::KeepOpen);
    };
    let kind = &RESOURCE_TYPES[plan.filter.resource];
    let started = Instant::now();
    let deadline = plan.timeout.map(|timeout| started + timeout);
    let mut next_bookmark = plan.bookmarks.then(|| started + BOOKMARK_INTERVAL);
    let mut seen_version = plan.start_version;
    loop {
        let now = Instant::now();
        if deadline.is_some_and(|deadline| now >= deadline) {
            writer.write_all(b"0\r\n\r\n")?;
            return Ok(Outcome::KeepOpen);
        }
        if let Some(at) = next_bookmark
            && now >= at
        {
            write_chunk(writer, &bookmark_line(kind, seen_version, false))?;
            next_bookmark = Some(now + BOOKMARK_INTERVAL);
        }
        let wake = [deadline, next_bookmark]
            .into_iter()
            .flatten()
            .fold(now + PEER_CHECK_INTERVAL, Instant::min);
        match receiver.recv_timeout(wake.saturating_duration_since(now)) {
            Ok(WatchMessage::Change(change)) => {
                seen_version = change.resource_version;
                if let Some((event_type, object)) = plan.filter.translate(&change) {
                    write_chunk(writer, &event_line(event_type, &object))?;
                }
            }
            Ok(WatchMessage::Cut) | Err(RecvTimeoutError::Disconnected) => {
                return Ok(Outcome::Close);
            }
            Err(RecvTimeoutError::Timeout) => {
                if peer_closed(writer) {
                    return Ok(Outcome::Close);
                }
            }
        }
    }
}

fn delete_options(request: &Request) -> Result<Option<Value>, ApiError> {
    if request.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    request.json_body().map(Some)
}

fn version_info() -> Value {
    // Every field of k8s-openapi's `version::Info` is required, so all of
    // them are here, not only major/minor/gitVersion.
    json!({
        "major": "1",
        "minor": "34",
        "gitVersion": "v1.34.0",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-08-27T00:00:00Z",
        "goVersion": "go1.24.6",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn group_version(group: &str, version: &str) -> Value {
    json!({"groupVersion": format!("{group}/{version}"), "version": version})
}

fn groups() -> Vec<&'static str> {
    let mut groups: Vec<&str> = RESOURCE_TYPES
        .iter()
        .map(|kind| kind.group)
        .filter(|group| !group.is_empty())
        .collect();
    groups.dedup();
    groups
}

fn api_group_body(group: &str) -> Value {
    json!({
        "name": group,
        "versions": [group_version(group, "v1")],
        "preferredVersion": group_version(group, "v1"),
    })
}

fn api_group_list() -> Value {
    let groups: Vec<Value> = groups().into_iter().map(api_group_body).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn api_group(group: &str) -> Result<Value, ApiError> {
    if !groups().contains(&group) {
        return Err(ApiError::path_not_found());
    }
    let mut body = json!({"kind": "APIGroup", "apiVersion": "v1"});
    merge_patch(&mut body, &api_group_body(group));
    Ok(body)
}

fn api_resource_list(group: &str, version: &str) -> Result<Value, ApiError> {
    let mut resources = Vec::new();
    for kind in RESOURCE_TYPES
        .iter()
        .filter(|kind| kind.group == group && kind.version == version)
    {
        resources.push(json!({
            "name": kind.plural,
            "singularName": kind.kind.to_ascii_lowercase(),
            "namespaced": kind.namespaced,
            "kind": kind.kind,
            "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
        }));
        if kind.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", kind.plural),
                "singularName": "",
                "namespaced": kind.namespaced,
                "kind": kind.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    if resources.is_empty() {
        return Err(ApiError::path_not_found());
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Ok(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // Each RandomState has fresh random keys, so hashing a counter with it
    // gives unpredictable values without a random-number crate.
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}

/// A random version 4 UUID (RFC 9562), the form of real object uids.
fn new_uid() -> String {
    let high = random_u64();
    let low = random_u64();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        high >> 32,
        (high >> 16) & 0xffff,
        high & 0x0fff,
        ((low >> 48) & 0x3fff) | 0x8000,
        low & 0xffff_ffff_ffff,
    )
}

/// Five characters from the alphabet kube-apiserver uses for
/// `generateName`, which avoids vowels and look-alike digits.
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut bits = random_u64();
    (0..5)
        .map(|_| {
            let character = ALPHABET[(bits % ALPHABET.len() as u64) as usize] as char;
            bits /= ALPHABET.len() as u64;
            character
        })
        .collect()
}

fn timestamp_now() -> String {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    format_timestamp(seconds)
}

/// RFC 3339 in UTC with whole seconds, as metav1.Time serializes.
fn format_timestamp(unix_seconds: u64) -> String {
    let days = (unix_seconds / 86_400) as i64;
    let seconds_of_day = unix_seconds % 86_400;
    // Days since 1970-01-01 to a proleptic Gregorian date, counting in
    // 400-year eras that start on March 1st so leap days fall at the end of
    // each year.
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        seconds_of_day / 3_600,
        seconds_of_day / 60 % 60,
        seconds_of_day % 60
    )
}

/// A fake kube-apiserver on a local TCP port. Dropping it stops the server
/// and closes every connection.
pub struct FakeApi {
    shared: Arc<Shared>,
    /// A second handle on the listening socket, shut down on drop to wake
    /// the accept loop wherever its network namespace is.
    listener: TcpListener,
    accept_thread: Option<JoinHandle<()>>,
}

impl FakeApi {
    /// Listens on 127.0.0.1:0 in the calling thread's network namespace.
    pub fn start() -> Result<FakeApi> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the fake API server")?;
        FakeApi::serve(listener)
    }

    /// Listens on `addr` in network namespace `ns`. Only the listening
    /// socket is created there; sockets keep their namespace, so the
    /// serving threads can run anywhere.
    pub fn start_in_netns(ns: &str, addr: SocketAddr) -> Result<FakeApi> {
        let listener = crate::in_netns(ns, move || TcpListener::bind(addr))?
            .with_context(|| format!("binding the fake API server to {addr} in {ns}"))?;
        FakeApi::serve(listener)
    }

    fn serve(listener: TcpListener) -> Result<FakeApi> {
        let address = listener.local_addr().context("fake API server address")?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new()),
            address,
            unavailable: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            requests: Mutex::new(Vec::new()),
            connections: Mutex::new(HashMap::new()),
            next_connection_id: AtomicU64::new(0),
        });
        let accepting = listener
            .try_clone()
            .context("cloning the fake API server's listener")?;
        let accept_shared = shared.clone();
        let accept_thread = thread::Builder::new()
            .name("fake-api-accept".into())
            .spawn(move || accept_shared.accept_loop(accepting))
            .context("starting the fake API server")?;
        Ok(FakeApi {
            shared,
            listener,
            accept_thread: Some(accept_thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.address
    }

    /// Writes a kubeconfig whose current context points at this server, as
    /// user `fake` with a dummy token, in namespace `default`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let kubeconfig = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: fake\n  cluster:\n    server: http://{}\n\
             contexts:\n\
             - name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\n\
             users:\n\
             - name: fake\n  user:\n    token: fake-token\n\
             preferences: {{}}\n",
            self.addr()
        );
        std::fs::write(path, kubeconfig)
            .with_context(|| format!("writing kubeconfig {}", path.display()))
    }

    /// Creates or replaces an object (found by apiVersion, kind, namespace
    /// and name; namespace defaults to `default`), always as a new write:
    /// the resourceVersion grows and watches see ADDED or MODIFIED. An
    /// object being deleted whose finalizers this removes goes away
    /// (DELETED). Returns the new resourceVersion.
    pub fn apply(&self, mut object: Value) -> String {
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let kind_name = object["kind"].as_str().unwrap_or_default().to_string();
        let resource = expect_kind(api_version, &kind_name);
        let kind = &RESOURCE_TYPES[resource];
        let name = metadata_str(&object, "name")
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| panic!("FakeApi::apply: {kind_name} without metadata.name"))
            .to_string();
        let metadata = metadata_mut(&mut object);
        if kind.namespaced {
            if metadata.get("namespace").and_then(Value::as_str).is_none() {
                metadata.insert("namespace".into(), "default".into());
            }
        } else {
            metadata.shift_remove("namespace");
        }
        let key = object_key(resource, metadata_str(&object, "namespace"), &name);
        let mut store = lock(&self.shared.store);
        let stored = match store.objects.get(&key).cloned() {
            None => {
                let metadata = metadata_mut(&mut object);
                metadata.entry("uid").or_insert_with(|| new_uid().into());
                metadata
                    .entry("creationTimestamp")
                    .or_insert_with(|| timestamp_now().into());
                if kind.tracks_generation {
                    metadata.entry("generation").or_insert(1.into());
                }
                store.insert_new(key, object)
            }
            Some(old) => {
                carry_system_fields(&old, &mut object, &key);
                if kind.tracks_generation {
                    bump_generation(&old, &mut object);
                }
                store.commit_update(key, old, object)
            }
        };
        metadata_str(&stored, "resourceVersion")
            .unwrap_or_default()
            .to_string()
    }

    /// Deletes an object as `kubectl delete` would: DELETED for watches, or
    /// with finalizers only a deletionTimestamp (MODIFIED) until they are
    /// removed. Returns whether the object existed.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> bool {
        let key = object_key(expect_kind(api_version, kind), namespace, name);
        lock(&self.shared.store).delete_object(key, None).is_ok()
    }

    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let key = object_key(expect_kind(api_version, kind), namespace, name);
        lock(&self.shared.store).objects.get(&key).cloned()
    }

    /// Every object of a kind, in all namespaces (e.g. to read the Events
    /// the agent posted).
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let resource = expect_kind(api_version, kind);
        lock(&self.shared.store)
            .objects
            .iter()
            .filter(|(key, _)| key.resource == resource)
            .map(|(_, object)| object.clone())
            .collect()
    }

    /// The current resourceVersion, the one a list would report now.
    pub fn resource_version(&self) -> String {
        lock(&self.shared.store).resource_version.to_string()
    }

    /// Closes every open watch stream abruptly, mid-chunk for the client,
    /// like an API server restart or a network cut.
    pub fn cut_watches(&self) {
        lock(&self.shared.store).cut_watches();
    }

    /// Forgets history up to now: a later watch from an older
    /// resourceVersion gets 410 Expired, and clients must list again.
    pub fn compact(&self) {
        let mut store = lock(&self.shared.store);
        store.compacted = store.resource_version;
        store.history.clear();
    }

    /// While `down`, every request is answered 503 (API server down); going
    /// down also cuts open watches.
    pub fn set_unavailable(&self, down: bool) {
        self.shared.unavailable.store(down, Ordering::SeqCst);
        if down {
            self.cut_watches();
        }
    }

    /// Request lines seen so far, as `GET /api/v1/services?watch=true&...`.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.shared.requests)
            .iter()
            .map(|(_, line)| line.clone())
            .collect()
    }

    /// Request lines with the address of the client that sent each.
    pub fn requests_by_peer(&self) -> Vec<(Option<IpAddr>, String)> {
        lock(&self.shared.requests).clone()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // SAFETY: shutting down a listening socket we own. On Linux this
        // makes a blocked accept() return, which closing the fd does not.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(accept_thread) = self.accept_thread.take() {
            let _ = accept_thread.join();
        }
        self.cut_watches();
        for (_, connection) in lock(&self.shared.connections).drain() {
            let _ = connection.shutdown(Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READ_TIMEOUT: Duration = Duration::from_secs(10);

    /// A minimal HTTP/1.1 client, enough to see exactly what kube-rs would.
    struct Client {
        reader: BufReader<TcpStream>,
        writer: TcpStream,
    }

    impl Client {
        fn connect(api: &FakeApi) -> Client {
            let stream = TcpStream::connect(api.addr()).expect("connecting to the fake API");
            stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
            Client {
                reader: BufReader::new(stream.try_clone().unwrap()),
                writer: stream,
            }
        }

        fn send(&mut self, method: &str, target: &str, content_type: &str, body: Option<&Value>) {
            let body = body.map_or_else(Vec::new, |body| serde_json::to_vec(body).unwrap());
            let mut request = format!(
                "{method} {target} HTTP/1.1\r\nHost: fake\r\nAccept: application/json\r\n\
                 Authorization: Bearer fake-token\r\nContent-Type: {content_type}\r\n\
                 Content-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            request.extend_from_slice(&body);
            self.writer.write_all(&request).unwrap();
        }

        fn head(&mut self) -> (u16, Vec<(String, String)>) {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            let code = line
                .split_whitespace()
                .nth(1)
                .and_then(|code| code.parse().ok())
                .unwrap_or_else(|| panic!("bad status line {line:?}"));
            let mut headers = Vec::new();
            loop {
                let mut header = String::new();
                self.reader.read_line(&mut header).unwrap();
                let header = header.trim_end();
                if header.is_empty() {
                    return (code, headers);
                }
                let (name, value) = header.split_once(':').unwrap();
                headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
            }
        }

        fn response(&mut self) -> (u16, Value) {
            let (code, headers) = self.head();
            let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v);
            assert_eq!(
                header("content-type").map(String::as_str),
                Some("application/json")
            );
            let length: usize = header("content-length").unwrap().parse().unwrap();
            let mut body = vec![0; length];
            self.reader.read_exact(&mut body).unwrap();
            (code, serde_json::from_slice(&body).unwrap())
        }

        fn call(&mut self, method: &str, target: &str, body: Option<&Value>) -> (u16, Value) {
            self.call_as(method, target, "application/json", body)
        }

        fn call_as(
            &mut self,
            method: &str,
            target: &str,
            content_type: &str,
            body: Option<&Value>,
        ) -> (u16, Value) {
            self.send(method, target, content_type, body);
            self.response()
        }

        fn watch(&mut self, target: &str) {
            self.send("GET", target, "application/json", None);
            let (code, headers) = self.head();
            assert_eq!(code, 200);
            assert!(headers.contains(&("transfer-encoding".into(), "chunked".into())));
            assert!(headers.contains(&("content-type".into(), "application/json".into())));
        }

        /// The next watch event; `None` at the terminating zero-length chunk.
        fn next_event(&mut self) -> io::Result<Option<Value>> {
            let mut size = String::new();
            if self.reader.read_line(&mut size)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let size = usize::from_str_radix(size.trim(), 16).map_err(|_| invalid_data(size))?;
            let mut data = vec![0; size + 2];
            self.reader.read_exact(&mut data)?;
            if size == 0 {
                return Ok(None);
            }
            assert_eq!(data[size - 1], b'\n', "one JSON line per chunk");
            Ok(Some(serde_json::from_slice(&data[..size]).unwrap()))
        }

        fn event(&mut self) -> Value {
            self.next_event()
                .expect("reading a watch event")
                .expect("the watch ended early")
        }
    }

    fn service(name: &str, labels: Value) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "protocol": "TCP"}]},
        })
    }

    fn lease(name: &str, holder: &str) -> Value {
        json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15},
        })
    }

    fn version_of(object: &Value) -> &str {
        metadata_str(object, "resourceVersion").unwrap()
    }

    fn names(list: &Value) -> Vec<&str> {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| metadata_str(item, "name").unwrap())
            .collect()
    }

    #[test]
    fn list_reports_current_version_list_kind_and_applies_selectors() {
        let api = FakeApi::start().unwrap();
        api.apply(service("web", json!({"app": "web", "tier": "front"})));
        api.apply(service("db", json!({"app": "db"})));
        let last = api.apply(service("cache", json!({"app": "cache", "tier": "back"})));
        let mut client = Client::connect(&api);

        let (code, list) = client.call("GET", "/api/v1/namespaces/default/services", None);
        assert_eq!(code, 200);
        assert_eq!(list["kind"], "ServiceList");
        assert_eq!(list["apiVersion"], "v1");
        assert_eq!(list["metadata"]["resourceVersion"], last.as_str());
        assert_eq!(names(&list), ["cache", "db", "web"]);
        let item = &list["items"][0];
        assert!(item.get("kind").is_none() && item.get("apiVersion").is_none());
        assert!(
            item["metadata"]["uid"]
                .as_str()
                .is_some_and(|uid| uid.len() == 36)
        );
        assert!(item["metadata"]["creationTimestamp"].is_string());

        let selected = |client: &mut Client, query: &str| {
            let (code, list) = client.call("GET", &format!("/api/v1/services?{query}"), None);
            assert_eq!(code, 200, "{query}: {list}");
            names(&list)
                .into_iter()
                .map(String::from)
                .collect::<Vec<_>>()
        };
        assert_eq!(selected(&mut client, "labelSelector=app%3Dweb"), ["web"]);
        assert_eq!(
            selected(&mut client, "labelSelector=tier"),
            ["cache", "web"]
        );
        assert_eq!(
            selected(&mut client, "labelSelector=app=web,tier=front"),
            ["web"]
        );
        assert_eq!(selected(&mut client, "labelSelector=!tier"), ["db"]);
        assert_eq!(
            selected(&mut client, "labelSelector=app+in+(db,cache)"),
            ["cache", "db"]
        );
        assert_eq!(
            selected(&mut client, "fieldSelector=metadata.name%3Ddb"),
            ["db"]
        );
        assert_eq!(
            selected(&mut client, "fieldSelector=metadata.namespace=other"),
            Vec::<String>::new()
        );
        assert_eq!(selected(&mut client, "limit=1"), ["cache", "db", "web"]);

        let (code, nodes) = client.call("GET", "/api/v1/nodes", None);
        assert_eq!((code, nodes["kind"].as_str()), (200, Some("NodeList")));
        let (code, slices) = client.call("GET", "/apis/discovery.k8s.io/v1/endpointslices", None);
        assert_eq!(code, 200);
        assert_eq!(slices["apiVersion"], "discovery.k8s.io/v1");
        assert_eq!(slices["kind"], "EndpointSliceList");
    }

    #[test]
    fn watch_from_list_version_receives_later_changes() {
        let api = FakeApi::start().unwrap();
        api.apply(service("web", json!({"app": "web"})));
        let mut client = Client::connect(&api);
        let (_, list) = client.call("GET", "/api/v1/namespaces/default/services", None);
        let listed = list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string();

        let mut watcher = Client::connect(&api);
        watcher.watch(&format!(
            "/api/v1/namespaces/default/services?watch=true&resourceVersion={listed}&timeoutSeconds=290"
        ));
        let mut changed = service("web", json!({"app": "web"}));
        changed["spec"]["ports"][0]["port"] = 8080.into();
        let modified_version = api.apply(changed);
        assert!(api.delete("v1", "Service", Some("default"), "web"));

        let modified = watcher.event();
        assert_eq!(modified["type"], "MODIFIED");
        assert_eq!(modified["object"]["kind"], "Service");
        assert_eq!(modified["object"]["apiVersion"], "v1");
        assert_eq!(modified["object"]["spec"]["ports"][0]["port"], 8080);
        assert_eq!(version_of(&modified["object"]), modified_version);
        let deleted = watcher.event();
        assert_eq!(deleted["type"], "DELETED");
        assert_eq!(deleted["object"]["metadata"]["name"], "web");
        let deleted_version: u64 = version_of(&deleted["object"]).parse().unwrap();
        assert!(deleted_version > modified_version.parse::<u64>().unwrap());
        assert_eq!(api.resource_version(), deleted_version.to_string());
        assert!(!api.delete("v1", "Service", Some("default"), "web"));

        // A watch from an old version replays history first.
        let mut replay = Client::connect(&api);
        replay.watch(&format!(
            "/api/v1/services?watch=1&resourceVersion={listed}"
        ));
        assert_eq!(replay.event()["type"], "MODIFIED");
        assert_eq!(replay.event()["type"], "DELETED");
    }

    #[test]
    fn watch_from_zero_sends_added_for_existing_objects_then_live_events() {
        let api = FakeApi::start().unwrap();
        api.apply(service("a", json!({})));
        api.apply(service("b", json!({})));
        let mut watcher = Client::connect(&api);
        watcher.watch("/api/v1/services?watch=true&resourceVersion=0");
        let first = watcher.event();
        let second = watcher.event();
        assert_eq!(
            (first["type"].as_str(), second["type"].as_str()),
            (Some("ADDED"), Some("ADDED"))
        );
        assert_eq!(first["object"]["metadata"]["name"], "a");
        assert_eq!(second["object"]["metadata"]["name"], "b");
        api.apply(service("c", json!({})));
        let live = watcher.event();
        assert_eq!(live["type"], "ADDED");
        assert_eq!(live["object"]["metadata"]["name"], "c");

        // Without a resourceVersion the same: current state first.
        let mut unversioned = Client::connect(&api);
        unversioned.watch("/api/v1/namespaces/default/services?watch=true");
        let replayed: Vec<Value> = (0..3)
            .map(|_| unversioned.event()["type"].clone())
            .collect();
        assert_eq!(replayed, ["ADDED", "ADDED", "ADDED"]);
    }

    #[test]
    fn watch_from_compacted_version_gets_410_expired() {
        let api = FakeApi::start().unwrap();
        let old = api.apply(service("web", json!({})));
        api.apply(service("web", json!({"app": "web"})));
        api.compact();
        let mut watcher = Client::connect(&api);
        watcher.watch(&format!(
            "/api/v1/services?watch=true&resourceVersion={old}"
        ));
        let error = watcher.event();
        assert_eq!(error["type"], "ERROR");
        assert_eq!(error["object"]["kind"], "Status");
        assert_eq!(error["object"]["status"], "Failure");
        assert_eq!(error["object"]["reason"], "Expired");
        assert_eq!(error["object"]["code"], 410);
        assert!(
            error["object"]["message"]
                .as_str()
                .unwrap()
                .starts_with(&format!("too old resource version: {old} ("))
        );
        assert!(watcher.next_event().unwrap().is_none(), "stream ends");

        // From the compaction point on, watching works again.
        let mut current = Client::connect(&api);
        current.watch(&format!(
            "/api/v1/services?watch=true&resourceVersion={}",
            api.resource_version()
        ));
        api.delete("v1", "Service", Some("default"), "web");
        assert_eq!(current.event()["type"], "DELETED");
    }

    #[test]
    fn bookmarks_arrive_when_allowed() {
        let api = FakeApi::start().unwrap();
        api.apply(service("web", json!({})));
        let mut watcher = Client::connect(&api);
        watcher.watch(&format!(
            "/api/v1/services?watch=true&allowWatchBookmarks=true&resourceVersion={}",
            api.resource_version()
        ));
        // A write to another resource still moves bookmarks forward.
        let lease_version = api.apply(lease("leader", "node-a"));
        let bookmark = watcher.event();
        assert_eq!(bookmark["type"], "BOOKMARK");
        assert_eq!(bookmark["object"]["kind"], "Service");
        assert_eq!(bookmark["object"]["apiVersion"], "v1");
        assert_eq!(version_of(&bookmark["object"]), lease_version);
    }

    #[test]
    fn streaming_list_ends_initial_events_with_annotated_bookmark() {
        let api = FakeApi::start().unwrap();
        api.apply(service("web", json!({})));
        let mut watcher = Client::connect(&api);
        watcher.watch(
            "/api/v1/services?watch=true&sendInitialEvents=true&allowWatchBookmarks=true\
             &resourceVersionMatch=NotOlderThan",
        );
        assert_eq!(watcher.event()["type"], "ADDED");
        let end = watcher.event();
        assert_eq!(end["type"], "BOOKMARK");
        assert_eq!(
            end["object"]["metadata"]["annotations"][INITIAL_EVENTS_END],
            "true"
        );
    }

    #[test]
    fn timeout_ends_stream_with_last_chunk_and_keeps_connection() {
        let api = FakeApi::start().unwrap();
        let mut client = Client::connect(&api);
        let started = Instant::now();
        client.watch("/api/v1/nodes?watch=true&timeoutSeconds=1");
        assert!(client.next_event().unwrap().is_none());
        assert!(started.elapsed() >= Duration::from_secs(1));
        let (code, _) = client.call("GET", "/api/v1/nodes", None);
        assert_eq!(code, 200);
    }

    #[test]
    fn status_merge_patch_changes_only_status_and_bumps_version() {
        let api = FakeApi::start().unwrap();
        let before_version = api.apply(service("web", json!({"app": "web"})));
        let mut watcher = Client::connect(&api);
        watcher.watch(&format!(
            "/api/v1/services?watch=true&resourceVersion={before_version}"
        ));
        let mut client = Client::connect(&api);
        let patch = json!({
            "metadata": {"labels": {"app": "changed"}},
            "spec": {"type": "ClusterIP"},
            "status": {"loadBalancer": {"ingress": [{"ip": "10.200.0.1"}]}},
        });
        let (code, patched) = client.call_as(
            "PATCH",
            "/api/v1/namespaces/default/services/web/status",
            "application/merge-patch+json",
            Some(&patch),
        );
        assert_eq!(code, 200, "{patched}");
        assert_eq!(
            patched["status"]["loadBalancer"]["ingress"][0]["ip"],
            "10.200.0.1"
        );
        assert_eq!(patched["spec"]["type"], "LoadBalancer");
        assert_eq!(patched["metadata"]["labels"]["app"], "web");
        assert!(version_of(&patched).parse::<u64>().unwrap() > before_version.parse().unwrap());
        let event = watcher.event();
        assert_eq!(event["type"], "MODIFIED");
        assert_eq!(event["object"], patched);

        // And the main resource ignores status, like the real strategy.
        let (code, main) = client.call_as(
            "PATCH",
            "/api/v1/namespaces/default/services/web",
            "application/strategic-merge-patch+json",
            Some(&json!({"spec": {"type": "NodePort"}, "status": {"loadBalancer": {}}})),
        );
        assert_eq!(code, 200);
        assert_eq!(main["spec"]["type"], "NodePort");
        assert_eq!(
            main["status"]["loadBalancer"]["ingress"][0]["ip"],
            "10.200.0.1"
        );
    }

    #[test]
    fn post_of_existing_name_is_409_already_exists() {
        let api = FakeApi::start().unwrap();
        let mut client = Client::connect(&api);
        let body = service("web", json!({}));
        let (code, created) =
            client.call("POST", "/api/v1/namespaces/default/services", Some(&body));
        assert_eq!(code, 201);
        assert_eq!(created["status"], json!({"loadBalancer": {}}));
        assert_eq!(
            api.get("v1", "Service", Some("default"), "web"),
            Some(created)
        );
        let (code, status) =
            client.call("POST", "/api/v1/namespaces/default/services", Some(&body));
        assert_eq!(code, 409);
        assert_eq!(status["kind"], "Status");
        assert_eq!(status["reason"], "AlreadyExists");
        assert_eq!(status["message"], "services \"web\" already exists");
        assert_eq!(
            status["details"],
            json!({"name": "web", "kind": "services"})
        );

        let (code, missing) = client.call("GET", "/api/v1/namespaces/default/services/nope", None);
        assert_eq!((code, missing["reason"].as_str()), (404, Some("NotFound")));
        let (code, _) = client.call("POST", "/api/v1/namespaces/default/services/web", None);
        assert_eq!(code, 405);
    }

    #[test]
    fn lease_put_with_stale_version_is_409_conflict() {
        let api = FakeApi::start().unwrap();
        let mut client = Client::connect(&api);
        let path = "/apis/coordination.k8s.io/v1/namespaces/default/leases/leader";
        // Leases are created by PUT, as leader election does.
        let (code, first) = client.call("PUT", path, Some(&lease("leader", "node-a")));
        assert_eq!(code, 201, "{first}");
        let (code, fetched) = client.call("GET", path, None);
        assert_eq!((code, &fetched), (200, &first));

        let mut renewed = first.clone();
        renewed["spec"]["holderIdentity"] = "node-b".into();
        let (code, second) = client.call("PUT", path, Some(&renewed));
        assert_eq!(code, 200);
        assert_eq!(second["spec"]["holderIdentity"], "node-b");
        assert_eq!(second["metadata"]["uid"], first["metadata"]["uid"]);

        let (code, status) = client.call("PUT", path, Some(&renewed));
        assert_eq!(code, 409);
        assert_eq!(status["reason"], "Conflict");
        assert_eq!(
            status["message"],
            format!(
                "Operation cannot be fulfilled on leases.coordination.k8s.io \"leader\": {STALE_OBJECT}"
            )
        );
        assert_eq!(status["details"]["group"], "coordination.k8s.io");

        // An update that changes nothing is no write at all.
        let (code, same) = client.call("PUT", path, Some(&second));
        assert_eq!((code, version_of(&same)), (200, version_of(&second)));
    }

    #[test]
    fn cut_watches_breaks_open_streams() {
        let api = FakeApi::start().unwrap();
        api.apply(service("web", json!({})));
        let mut watcher = Client::connect(&api);
        watcher.watch("/api/v1/services?watch=true");
        assert_eq!(watcher.event()["type"], "ADDED");
        api.cut_watches();
        assert!(watcher.next_event().is_err(), "no clean end after a cut");
    }

    #[test]
    fn keep_alive_serves_two_requests_on_one_connection() {
        let api = FakeApi::start().unwrap();
        let mut client = Client::connect(&api);
        let (code, created) = client.call(
            "POST",
            "/apis/coordination.k8s.io/v1/namespaces/default/leases",
            Some(&lease("leader", "node-a")),
        );
        assert_eq!(code, 201);
        let (code, fetched) = client.call(
            "GET",
            "/apis/coordination.k8s.io/v1/namespaces/default/leases/leader",
            None,
        );
        assert_eq!((code, fetched), (200, created));
        assert_eq!(
            api.requests(),
            [
                "POST /apis/coordination.k8s.io/v1/namespaces/default/leases",
                "GET /apis/coordination.k8s.io/v1/namespaces/default/leases/leader",
            ]
        );
    }

    #[test]
    fn chunked_request_bodies_are_read() {
        let api = FakeApi::start().unwrap();
        let mut client = Client::connect(&api);
        let body = serde_json::to_vec(&lease("leader", "node-a")).unwrap();
        let (head, tail) = body.split_at(10);
        let mut request =
            b"POST /apis/coordination.k8s.io/v1/namespaces/default/leases HTTP/1.1\r\n\
            Host: fake\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                .to_vec();
        for part in [head, tail] {
            request.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            request.extend_from_slice(part);
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"0\r\n\r\n");
        client.writer.write_all(&request).unwrap();
        assert_eq!(client.response().0, 201);
        assert!(
            api.get("coordination.k8s.io/v1", "Lease", None, "leader")
                .is_some()
        );
    }

    #[test]
    fn label_change_turns_into_added_and_deleted_for_selector_watches() {
        let api = FakeApi::start().unwrap();
        let start = api.apply(service("web", json!({"app": "web"})));
        let mut watcher = Client::connect(&api);
        watcher.watch(&format!(
            "/api/v1/services?watch=true&labelSelector=app%3Dweb&resourceVersion={start}"
        ));
        let left = api.apply(service("web", json!({"app": "other"})));
        api.apply(service("web", json!({"app": "web"})));
        let deleted = watcher.event();
        assert_eq!(deleted["type"], "DELETED");
        assert_eq!(deleted["object"]["metadata"]["labels"]["app"], "web");
        assert_eq!(version_of(&deleted["object"]), left);
        assert_eq!(watcher.event()["type"], "ADDED");
    }

    #[test]
    fn finalizers_delay_deletion_until_removed() {
        let api = FakeApi::start().unwrap();
        let mut object = service("web", json!({}));
        object["metadata"]["finalizers"] = json!(["xlb.io/cleanup"]);
        let start = api.apply(object);
        let mut watcher = Client::connect(&api);
        watcher.watch(&format!(
            "/api/v1/services?watch=true&resourceVersion={start}"
        ));
        let mut client = Client::connect(&api);
        let path = "/api/v1/namespaces/default/services/web";
        let (code, marked) = client.call("DELETE", path, None);
        assert_eq!(code, 200);
        assert!(marked["metadata"]["deletionTimestamp"].is_string());
        assert_eq!(watcher.event()["type"], "MODIFIED");
        let (code, _) = client.call_as(
            "PATCH",
            path,
            "application/json-patch+json",
            Some(&json!([{"op": "remove", "path": "/metadata/finalizers"}])),
        );
        assert_eq!(code, 200);
        assert_eq!(watcher.event()["type"], "DELETED");
        assert_eq!(api.get("v1", "Service", Some("default"), "web"), None);
    }

    #[test]
    fn server_side_apply_creates_then_merges() {
        let api = FakeApi::start().unwrap();
        let mut client = Client::connect(&api);
        let path = "/apis/coordination.k8s.io/v1/namespaces/default/leases/leader?fieldManager=xlb&force=true";
        let (code, created) = client.call_as(
            "PATCH",
            path,
            "application/apply-patch+yaml",
            Some(&lease("leader", "node-a")),
        );
        assert_eq!(code, 201, "{created}");
        let (code, applied) = client.call_as(
            "PATCH",
            path,
            "application/apply-patch+yaml",
            Some(&json!({"spec": {"holderIdentity": "node-b"}})),
        );
        assert_eq!(code, 200);
        assert_eq!(applied["spec"]["holderIdentity"], "node-b");
        assert_eq!(applied["spec"]["leaseDurationSeconds"], 15);
        let (code, status) = client.call_as("PATCH", path, "text/plain", Some(&json!({})));
        assert_eq!(
            (code, status["reason"].as_str()),
            (415, Some("UnsupportedMediaType"))
        );
    }

    #[test]
    fn unavailable_answers_503_and_cuts_watches() {
        let api = FakeApi::start().unwrap();
        let mut watcher = Client::connect(&api);
        watcher.watch("/api/v1/services?watch=true");
        api.set_unavailable(true);
        assert!(watcher.next_event().is_err());
        let mut client = Client::connect(&api);
        let (code, status) = client.call("GET", "/api/v1/services", None);
        assert_eq!(
            (code, status["reason"].as_str()),
            (503, Some("ServiceUnavailable"))
        );
        api.set_unavailable(false);
        assert_eq!(client.call("GET", "/api/v1/services", None).0, 200);
    }

    #[test]
    fn events_are_posted_and_listed() {
        let api = FakeApi::start().unwrap();
        let mut client = Client::connect(&api);
        let event = json!({
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"generateName": "web."},
            "reason": "Programmed",
            "note": "frontend 10.200.0.1:80",
        });
        let (code, created) = client.call(
            "POST",
            "/apis/events.k8s.io/v1/namespaces/default/events",
            Some(&event),
        );
        assert_eq!(code, 201, "{created}");
        assert!(
            created["metadata"]["name"]
                .as_str()
                .unwrap()
                .starts_with("web.")
        );
        assert_eq!(api.list("events.k8s.io/v1", "Event").len(), 1);
        assert!(api.list("v1", "Event").is_empty());
    }

    #[test]
    fn discovery_and_version_answer() {
        let api = FakeApi::start().unwrap();
        let mut client = Client::connect(&api);
        let (code, version) = client.call("GET", "/version", None);
        assert_eq!(
            (code, version["gitVersion"].as_str()),
            (200, Some("v1.34.0"))
        );
        let (_, core) = client.call("GET", "/api", None);
        assert_eq!(core["versions"], json!(["v1"]));
        let (_, groups) = client.call("GET", "/apis", None);
        let names: Vec<&str> = groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|group| group["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["discovery.k8s.io", "coordination.k8s.io", "events.k8s.io"]
        );
        let (code, resources) = client.call("GET", "/apis/discovery.k8s.io/v1", None);
        assert_eq!(
            (code, resources["resources"][0]["kind"].as_str()),
            (200, Some("EndpointSlice"))
        );
    }

    #[test]
    fn kubeconfig_points_at_the_server() {
        let api = FakeApi::start().unwrap();
        let path = std::env::temp_dir().join(format!("fake-api-{}.kubeconfig", std::process::id()));
        api.write_kubeconfig(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(text.contains(&format!("server: http://{}\n", api.addr())));
        assert!(text.contains("current-context: fake"));
    }

    #[test]
    fn drop_stops_listening() {
        let api = FakeApi::start().unwrap();
        let address = api.addr();
        let mut idle = Client::connect(&api);
        // Once answered, the connection is surely accepted and tracked.
        assert_eq!(idle.call("GET", "/version", None).0, 200);
        drop(api);
        assert!(TcpStream::connect(address).is_err());
        let mut rest = Vec::new();
        assert_eq!(idle.reader.read_to_end(&mut rest).unwrap(), 0);
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(format_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_timestamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_timestamp(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
