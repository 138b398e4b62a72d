//! The object store and its watch semantics: one global resourceVersion,
//! history for watches to replay, compaction (410 Expired), finalizers,
//! system fields (uid, creationTimestamp, generation), and watch plans.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Shutdown, TcpStream},
    sync::{
        Arc, mpsc,
        mpsc::{Receiver, Sender},
    },
    time::Duration,
};

use serde_json::{Map, Value, json};

use super::{
    FIRST_RESOURCE_VERSION, INITIAL_EVENTS_END, STALE_OBJECT,
    discovery::{RESOURCE_TYPES, ResourceType},
    patch::{PatchType, apply_json_patch, merge_patch},
    selectors::Filter,
    status::ApiError,
};

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ObjectKey {
    pub(crate) resource: usize,
    /// Empty for cluster-scoped resources.
    pub(crate) namespace: String,
    pub(crate) name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One write, kept for watches that start from an older resourceVersion.
pub(crate) struct Change {
    pub(crate) change_type: ChangeType,
    pub(crate) resource: usize,
    pub(crate) object: Value,
    /// The state before a modification: a selector watch needs it to tell
    /// an object entering or leaving the selection (ADDED/DELETED) from one
    /// changing inside it (MODIFIED).
    pub(crate) previous: Option<Value>,
    pub(crate) resource_version: u64,
}

pub(crate) enum WatchMessage {
    Change(Arc<Change>),
    Cut,
}

pub(crate) struct WatchHandle {
    pub(crate) sender: Sender<WatchMessage>,
    /// Shut down to cut the stream even while its thread is blocked writing.
    pub(crate) stream: TcpStream,
}

pub(crate) struct Store {
    pub(crate) resource_version: u64,
    /// History at or below this version is forgotten.
    pub(crate) compacted: u64,
    pub(crate) objects: BTreeMap<ObjectKey, Value>,
    pub(crate) history: Vec<Arc<Change>>,
    pub(crate) watches: HashMap<u64, WatchHandle>,
    pub(crate) next_watch_id: u64,
}

impl Store {
    pub(crate) fn new() -> Store {
        Store {
            resource_version: FIRST_RESOURCE_VERSION,
            compacted: 0,
            objects: BTreeMap::new(),
            history: Vec::new(),
            watches: HashMap::new(),
            next_watch_id: 0,
        }
    }

    pub(crate) fn bump(&mut self, object: &mut Value) -> u64 {
        self.resource_version += 1;
        metadata_mut(object).insert(
            "resourceVersion".into(),
            self.resource_version.to_string().into(),
        );
        self.resource_version
    }

    /// Records a write and hands it to every open watch while the store is
    /// still locked, so each watch sees writes in resourceVersion order.
    pub(crate) fn emit(&mut self, change: Change) {
        let change = Arc::new(change);
        self.history.push(change.clone());
        self.watches.retain(|_, watch| {
            watch
                .sender
                .send(WatchMessage::Change(change.clone()))
                .is_ok()
        });
    }

    pub(crate) fn insert_new(&mut self, key: ObjectKey, mut object: Value) -> Value {
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
    pub(crate) fn commit_update(&mut self, key: ObjectKey, old: Value, mut object: Value) -> Value {
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

    pub(crate) fn remove(&mut self, key: ObjectKey, mut object: Value) -> Value {
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

    pub(crate) fn create(
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

    pub(crate) fn replace(
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

    pub(crate) fn patch(
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
                apply_json_patch(&old, patch).map_err(|why| ApiError::invalid(kind, name, &why))?
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
    pub(crate) fn write_over(
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
    pub(crate) fn update(&mut self, key: ObjectKey, old: Value, mut new: Value) -> Value {
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

    pub(crate) fn delete_object(
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

    pub(crate) fn matching(&self, filter: &Filter) -> impl Iterator<Item = (&ObjectKey, &Value)> {
        self.objects
            .iter()
            .filter(move |(key, object)| key.resource == filter.resource && filter.matches(object))
    }

    pub(crate) fn list(&self, filter: &Filter) -> Value {
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

    pub(crate) fn open_watch(
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

    pub(crate) fn cut_watches(&mut self) {
        for (_, watch) in self.watches.drain() {
            let _ = watch.stream.shutdown(Shutdown::Both);
            let _ = watch.sender.send(WatchMessage::Cut);
        }
    }
}

pub(crate) fn object_key(resource: usize, namespace: Option<&str>, name: &str) -> ObjectKey {
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
pub(crate) fn check_type_meta(kind: &ResourceType, object: &mut Value) -> Result<(), ApiError> {
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

pub(crate) fn reconcile_namespace(
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

pub(crate) fn check_uid_precondition(
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
pub(crate) fn carry_system_fields(old: &Value, new: &mut Value, key: &ObjectKey) {
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

pub(crate) fn bump_generation(old: &Value, new: &mut Value) {
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
pub(crate) fn with_status_of(mut target: Value, source: &Value) -> Value {
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
pub(crate) fn order_top_level(object: Value) -> Value {
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

pub(crate) fn metadata_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object.get("metadata")?.get(field)?.as_str()
}

/// The metadata map, created if missing. `object` must be a JSON object.
pub(crate) fn metadata_mut(object: &mut Value) -> &mut Map<String, Value> {
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

pub(crate) enum WatchStart {
    /// ADDED for every current object first; with `end_bookmark`, the
    /// streaming-list BOOKMARK that marks the end of them.
    Snapshot { end_bookmark: bool },
    /// Every change after this resourceVersion.
    After(u64),
}

/// A watch stream ready to be written, decided while the store was locked.
pub(crate) struct WatchPlan {
    /// None when the watch ends right after `initial` (410 Expired).
    pub(crate) id: Option<u64>,
    pub(crate) filter: Filter,
    pub(crate) initial: Vec<Vec<u8>>,
    pub(crate) receiver: Option<Receiver<WatchMessage>>,
    pub(crate) bookmarks: bool,
    pub(crate) timeout: Option<Duration>,
    /// The store's version when the watch registered: every later write
    /// reaches it through `receiver`, so bookmarks never claim a version
    /// whose events this watch has not sent yet.
    pub(crate) start_version: u64,
}

pub(crate) fn event_line(event_type: &str, object: &Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(&json!({"type": event_type, "object": object}))
        .expect("JSON values always serialize");
    line.push(b'\n');
    line
}

pub(crate) fn bookmark_line(
    kind: &ResourceType,
    resource_version: u64,
    initial_events_end: bool,
) -> Vec<u8> {
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

/// A random version 4 UUID (RFC 9562), the form of real object uids.
pub(crate) fn new_uid() -> String {
    let (high, low) = (fastrand::u64(..), fastrand::u64(..));
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
pub(crate) fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char)
        .collect()
}

pub(crate) fn timestamp_now() -> String {
    format_timestamp(jiff::Timestamp::now().as_second())
}

/// RFC 3339 in UTC with whole seconds, as metav1.Time serializes.
pub(crate) fn format_timestamp(unix_seconds: i64) -> String {
    jiff::Timestamp::from_second(unix_seconds)
        .expect("a time between the years -9999 and 9999")
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}
