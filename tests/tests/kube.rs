//! The agent on the Kubernetes API: the real `xlb agent --kubeconfig`
//! against the fake API server (list/watch with resourceVersions, bookmarks,
//! 410 Gone), real packets in the reference topology.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::Result;
use serde_json::{Value, json};
use xlb_tests::{Conn, Topology, fake_api::FakeApi, tcp_request, wait_until};

const WEB: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const SECOND: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 11);
const FOREIGN: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 12);

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "needs root: run `cargo xtask test`"
    );
}

fn node(name: &str, ip: Ipv4Addr) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
           "status": {"addresses": [{"type": "InternalIP", "address": ip.to_string()}]}})
}

fn service(name: &str, ip: Ipv4Addr, class: Option<&str>) -> Value {
    let mut spec = json!({"type": "LoadBalancer",
        "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]});
    if let Some(class) = class {
        spec["loadBalancerClass"] = json!(class);
    }
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "default"},
           "spec": spec,
           "status": {"loadBalancer": {"ingress": [{"ip": ip.to_string()}]}}})
}

fn slice(t: &Topology, service: &str, pods: &[&str]) -> Value {
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|p| {
            let pod = t.pod(p);
            json!({"addresses": [pod.addr.to_string()], "nodeName": t.node_of(pod),
                   "conditions": {"ready": true, "serving": true, "terminating": false}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{service}-abc"), "namespace": "default",
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "endpoints": endpoints,
           "ports": [{"name": "http", "protocol": "TCP", "port": 8080}]})
}

/// The reference topology with servers on 8080 and a fake API server in
/// the node's namespace that knows this node; returns its kubeconfig path.
fn api_topology() -> Result<(Topology, FakeApi, std::path::PathBuf)> {
    require_root();
    let t = Topology::new()?;
    t.start_servers(&[8080])?;
    let api = FakeApi::start_in_netns(&t.node, "127.0.0.1:0".parse()?)?;
    let kubeconfig = t.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    api.apply(node(&t.node_name, xlb_tests::NODE_ADDR));
    Ok((t, api, kubeconfig))
}

fn frontends(t: &Topology) -> BTreeSet<String> {
    t.inspect("services")
        .unwrap_or_default()
        .iter()
        .filter_map(|s| s["frontend"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn services_follow_the_api_through_watch_cuts_and_expired_versions() -> Result<()> {
    let (t, api, kubeconfig) = api_topology()?;
    api.apply(node(&t.node2_name, xlb_tests::NODE2_ADDR));
    let _agent = t.start_agent_kube(&kubeconfig, &[])?;
    let to = SocketAddrV4::new(WEB, 80);

    // A Service appears: traffic flows to all three backends.
    api.apply(service("web", WEB, None));
    api.apply(slice(&t, "web", &["pod-a", "pod-b", "pod-c"]));
    wait_until("web programmed", Duration::from_secs(5), || {
        t.inspect("backends").map(|b| b.len() == 3).unwrap_or(false)
    })?;
    let mut seen = BTreeSet::new();
    for _ in 0..60 {
        seen.insert(tcp_request(&t.client, to)?.backend);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");

    // Scale down: maps follow, an established flow to the removed backend
    // keeps working, new flows avoid it.
    let mut kept = None;
    for _ in 0..100 {
        let mut c = Conn::open(&t.client, to, None)?;
        if c.ask("hi")?.backend == "pod-c" {
            kept = Some(c);
            break;
        }
    }
    let mut kept = kept.expect("a connection to pod-c");
    api.apply(slice(&t, "web", &["pod-a", "pod-b"]));
    wait_until("scale-down applied", Duration::from_secs(5), || {
        t.inspect("backends").map(|b| b.len() == 2).unwrap_or(false)
    })?;
    assert_eq!(kept.ask("still")?.backend, "pod-c");
    for _ in 0..30 {
        assert_ne!(tcp_request(&t.client, to)?.backend, "pod-c");
    }

    // The watch is cut and history compacted: the agent re-lists (410 Gone)
    // without clearing the maps, and sees what changed meanwhile.
    api.cut_watches();
    api.compact();
    api.apply(service("second", SECOND, None));
    api.apply(slice(&t, "second", &["pod-b"]));
    for _ in 0..20 {
        assert!(
            tcp_request(&t.client, to).is_ok(),
            "traffic interrupted during the re-list"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_until(
        "second programmed after the re-list",
        Duration::from_secs(15),
        || frontends(&t).contains("10.200.0.11:80/TCP"),
    )?;
    assert_eq!(kept.ask("after relist")?.backend, "pod-c");
    // The re-list really happened: a second plain LIST of Services.
    let lists = api
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/services") && !r.contains("watch="))
        .count();
    assert!(lists >= 2, "no re-list after the cut: {:?}", api.requests());

    // A Service of another load-balancer class is never touched.
    api.apply(service("foreign", FOREIGN, Some("metallb.io/metallb")));
    api.apply(slice(&t, "foreign", &["pod-a"]));
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        !frontends(&t).contains("10.200.0.12:80/TCP"),
        "{:?}",
        frontends(&t)
    );

    // Deleted: the frontend stops answering.
    api.delete("v1", "Service", Some("default"), "web");
    wait_until("web removed", Duration::from_secs(5), || {
        !frontends(&t).contains("10.200.0.10:80/TCP")
    })?;
    assert!(
        tcp_request(&t.client, to).is_err(),
        "a deleted service still answered"
    );
    Ok(())
}

#[test]
fn unreachable_api_at_start_is_retried_and_reported() -> Result<()> {
    let (t, api, kubeconfig) = api_topology()?;
    api.apply(service("web", WEB, None));
    api.apply(slice(&t, "web", &["pod-a", "pod-b"]));
    api.set_unavailable(true);
    let log = t.dir.join("agent.log");
    let agent = std::thread::scope(|scope| -> Result<_> {
        let starting = scope.spawn(|| t.start_agent_kube(&kubeconfig, &[]));
        wait_until(
            "the agent reports the unreachable API",
            Duration::from_secs(15),
            || {
                std::fs::read_to_string(&log)
                    .map(|l| l.contains("retrying with backoff"))
                    .unwrap_or(false)
            },
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "{e}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })?;
        api.set_unavailable(false);
        starting
            .join()
            .map_err(|_| anyhow::anyhow!("agent start panicked"))?
    })?;
    wait_until("web programmed", Duration::from_secs(10), || {
        t.inspect("backends").map(|b| b.len() == 2).unwrap_or(false)
    })?;
    assert!(tcp_request(&t.client, SocketAddrV4::new(WEB, 80)).is_ok());
    assert!(
        agent.log_text().contains("Kubernetes API answered"),
        "{}",
        agent.log_text()
    );
    Ok(())
}

#[test]
fn an_invalid_service_gets_one_warning_event() -> Result<()> {
    let (t, api, kubeconfig) = api_topology()?;
    let _agent = t.start_agent_kube(&kubeconfig, &[])?;
    let mut bad = service("bad", SECOND, None);
    bad["spec"]["ports"][0]["protocol"] = json!("SCTP");
    api.apply(bad);
    api.apply(service("web", WEB, None));
    api.apply(slice(&t, "web", &["pod-a"]));
    let events_on_bad = || {
        api.list("events.k8s.io/v1", "Event")
            .into_iter()
            .filter(|e| e["regarding"]["name"] == "bad" && e["regarding"]["kind"] == "Service")
            .collect::<Vec<_>>()
    };
    wait_until(
        "a Warning Event on Service bad",
        Duration::from_secs(10),
        || !events_on_bad().is_empty(),
    )?;
    let event = &events_on_bad()[0];
    assert_eq!(event["type"], "Warning");
    assert!(
        event["note"].as_str().unwrap_or("").contains("SCTP"),
        "{event}"
    );
    // The valid service still works, and re-syncs do not repeat the Event.
    wait_until("web programmed", Duration::from_secs(5), || {
        frontends(&t).contains("10.200.0.10:80/TCP")
    })?;
    assert!(tcp_request(&t.client, SocketAddrV4::new(WEB, 80)).is_ok());
    api.apply(slice(&t, "web", &["pod-a", "pod-b"]));
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(events_on_bad().len(), 1, "{:?}", events_on_bad());
    Ok(())
}
