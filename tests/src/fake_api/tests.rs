//! Self-tests of the fake API server over real HTTP, as kube-rs sees it.

use std::{
    io,
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::{
    FakeApi, INITIAL_EVENTS_END, STALE_OBJECT,
    http::invalid_data,
    store::{format_timestamp, metadata_str},
};

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
    let (code, created) = client.call("POST", "/api/v1/namespaces/default/services", Some(&body));
    assert_eq!(code, 201);
    assert_eq!(created["status"], json!({"loadBalancer": {}}));
    assert_eq!(
        api.get("v1", "Service", Some("default"), "web"),
        Some(created)
    );
    let (code, status) = client.call("POST", "/api/v1/namespaces/default/services", Some(&body));
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
    let mut request = b"POST /apis/coordination.k8s.io/v1/namespaces/default/leases HTTP/1.1\r\n\
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
    let path =
        "/apis/coordination.k8s.io/v1/namespaces/default/leases/leader?fieldManager=xlb&force=true";
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
        [
            "discovery.k8s.io",
            "coordination.k8s.io",
            "xlb.dev",
            "events.k8s.io"
        ]
    );
    // A custom resource's group serves its own version.
    let (_, xlb) = client.call("GET", "/apis/xlb.dev", None);
    assert_eq!(xlb["preferredVersion"]["version"], "v1alpha1");
    let (code, resources) = client.call("GET", "/apis/xlb.dev/v1alpha1", None);
    let names: Vec<&str> = resources["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        (code, names),
        (200, vec!["addresspools", "addresspools/status", "bgppeers"])
    );
    assert_eq!(resources["resources"][0]["namespaced"], false);
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
