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
    collections::HashMap,
    io,
    io::{BufReader, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::RecvTimeoutError,
    },
    thread,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use self::{
    discovery::{
        RESOURCE_TYPES, api_group, api_group_list, api_resource_list, expect_kind, find_resource,
        version_info,
    },
    http::{Request, peer_closed, percent_decode, read_request, write_chunk, write_json},
    patch::patch_type,
    selectors::Filter,
    status::ApiError,
    store::{
        ObjectKey, Store, WatchMessage, WatchPlan, WatchStart, bookmark_line, bump_generation,
        carry_system_fields, event_line, metadata_mut, metadata_str, new_uid, object_key,
        timestamp_now,
    },
};
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

mod discovery;
mod http;
mod patch;
mod selectors;
mod status;
mod store;
#[cfg(test)]
mod tests;

/// Recovers the data of a mutex whose holder panicked: one failed test
/// thread must not take the whole fake down with it.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// State shared by the handle and every serving thread.
pub(crate) struct Shared {
    pub(crate) store: Mutex<Store>,
    pub(crate) address: SocketAddr,
    pub(crate) unavailable: AtomicBool,
    pub(crate) stopping: AtomicBool,
    /// Request lines with the client address they came from.
    pub(crate) requests: Mutex<Vec<(Option<IpAddr>, String)>>,
    /// Every open connection, to close them all when the fake is dropped.
    pub(crate) connections: Mutex<HashMap<u64, TcpStream>>,
    pub(crate) next_connection_id: AtomicU64,
    /// By Service name: the ingress addresses a rival controller writes
    /// into its status right after every status write of a client.
    pub(crate) status_rival: Mutex<HashMap<String, Vec<String>>>,
}

pub(crate) enum Reply {
    Json(u16, Value),
    Watch(Box<WatchPlan>),
}

/// Whether the connection can carry another request.
pub(crate) enum Outcome {
    KeepOpen,
    Close,
}

impl Shared {
    pub(crate) fn accept_loop(self: Arc<Shared>, listener: TcpListener) {
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

    pub(crate) fn serve_connection(&self, stream: TcpStream) {
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

    pub(crate) fn route(
        &self,
        request: &Request,
        connection: &TcpStream,
    ) -> Result<Reply, ApiError> {
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

    pub(crate) fn serve_resource(
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
                if status_only {
                    self.answer_status_write(resource, namespace, name);
                }
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

    pub(crate) fn open_watch(
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

    pub(crate) fn serve_watch(&self, writer: &mut TcpStream, plan: WatchPlan) -> Outcome {
        let outcome = stream_watch(writer, &plan).unwrap_or(Outcome::Close);
        if let Some(id) = plan.id {
            lock(&self.store).watches.remove(&id);
        }
        outcome
    }
}

impl Shared {
    /// The rival controller's answer to a client's status write, if one is
    /// set: its own ingress, as a new write (MODIFIED for watches).
    fn answer_status_write(&self, resource: usize, namespace: Option<&str>, name: &str) {
        let Some(ips) = lock(&self.status_rival).get(name).cloned() else {
            return;
        };
        if RESOURCE_TYPES[resource].kind != "Service" {
            return;
        }
        let mut store = lock(&self.store);
        let key = object_key(resource, namespace, name);
        let Some(old) = store.objects.get(&key).cloned() else {
            return;
        };
        let mut object = old.clone();
        let ingress: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
        object["status"] = json!({"loadBalancer": {"ingress": ingress}});
        if object != old {
            store.commit_update(key, old, object);
        }
    }
}

pub(crate) fn stream_watch(writer: &mut TcpStream, plan: &WatchPlan) -> io::Result<Outcome> {
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

pub(crate) fn delete_options(request: &Request) -> Result<Option<Value>, ApiError> {
    if request.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    request.json_body().map(Some)
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
            status_rival: Mutex::new(HashMap::new()),
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

    /// While `ips` is set, a rival controller (K3s ServiceLB left enabled,
    /// MetalLB) answers every status write of Service `name` (any
    /// namespace) by writing these ingress addresses over it at once.
    pub fn fight_service_status(&self, name: &str, ips: Option<&[&str]>) {
        let mut rivals = lock(&self.shared.status_rival);
        match ips {
            Some(ips) => {
                rivals.insert(name.into(), ips.iter().map(|ip| ip.to_string()).collect());
            }
            None => {
                rivals.remove(name);
            }
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
