//! The agent on the Kubernetes API: the real `xlb agent --kubeconfig`
//! against the fake API server (list/watch with resourceVersions, bookmarks,
//! 410 Gone), real packets in the reference topology.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::Result;
use serde_json::{Value, json};
use xlb_tests::{
    Conn, NODE_ADDR, NODE_LINK_ADDR, NODE2_ADDR, Topology,
    fake_api::FakeApi,
    objects,
    rbac::{assert_all_granted_used, assert_deploy_rbac_allows},
    scrape::{http_get, sample},
    tcp_request, wait_until,
};

const WEB: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const SECOND: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 11);
const FOREIGN: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 12);
const EARLY: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 13);

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "needs root: run `cargo xtask test`"
    );
}

fn node(name: &str, ip: Ipv4Addr) -> Value {
    objects::to_json(&objects::node(name, ip))
}

/// A LoadBalancer Service `default/name` on TCP 80 → 8080, its frontend
/// `ip` already in its status, of load-balancer class `class`.
fn service(name: &str, ip: Ipv4Addr, class: Option<&str>) -> Value {
    let mut service = objects::service(name, ip, &[("http", "TCP", 80, "8080")]);
    objects::spec_mut(&mut service).load_balancer_class = class.map(str::to_string);
    objects::to_json(&service)
}

/// A LoadBalancer Service on port 80 with no address yet, as node mode
/// expects them.
fn pending_service(name: &str) -> Value {
    objects::to_json(&objects::service_in(
        objects::NAMESPACE,
        name,
        None,
        &[("http", "TCP", 80, "8080")],
    ))
}

/// The sorted `status.loadBalancer.ingress[].ip` of Service `default/name`.
fn ingress(api: &FakeApi, name: &str) -> Vec<String> {
    let Some(service) = api.get("v1", "Service", Some("default"), name) else {
        return Vec::new();
    };
    let mut ips: Vec<String> = service["status"]["loadBalancer"]["ingress"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["ip"].as_str().map(str::to_string))
        .collect();
    ips.sort();
    ips
}

fn lease_holder(api: &FakeApi) -> String {
    api.get(
        "coordination.k8s.io/v1",
        "Lease",
        Some("xlb-system"),
        "xlb-leader",
    )
    .and_then(|lease| lease["spec"]["holderIdentity"].as_str().map(str::to_string))
    .unwrap_or_default()
}

/// Status writes (PATCH of services/.../status) that came from `peer`.
fn status_writes_from(api: &FakeApi, peer: Ipv4Addr) -> usize {
    api.requests_by_peer()
        .iter()
        .filter(|(from, line)| {
            *from == Some(IpAddr::V4(peer))
                && line.starts_with("PATCH /api/v1/namespaces/")
                && line.contains("/status")
        })
        .count()
}

fn slice(t: &Topology, service: &str, pods: &[&str]) -> Value {
    let endpoints: Vec<objects::EndpointOf> = pods
        .iter()
        .map(|p| {
            let pod = t.pod(p);
            (pod.addr, t.node_of(pod), true)
        })
        .collect();
    objects::to_json(&objects::endpoint_slice(
        service,
        &endpoints,
        &[("http", "TCP", 8080)],
    ))
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
    let agent = t.start_agent_kube(&kubeconfig, &[])?;
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

    // An EndpointSlice event re-translates and re-programs its Service only.
    api.apply(service("early", EARLY, None));
    api.apply(slice(&t, "early", &["pod-a"]));
    wait_until("early programmed", Duration::from_secs(5), || {
        t.inspect("backends").map(|b| b.len() == 4).unwrap_or(false)
    })?;
    let log_before = agent.log_text().len();
    api.apply(slice(&t, "early", &["pod-a", "pod-b"]));
    wait_until("early scaled up", Duration::from_secs(5), || {
        t.inspect("backends").map(|b| b.len() == 5).unwrap_or(false)
    })?;
    let new_log = agent.log_text()[log_before..].to_string();
    assert!(
        new_log.contains("re-translated changed Services services=1 frontends=1")
            && new_log.contains("updated=1 removed=0 unchanged=0"),
        "{new_log}"
    );
    api.delete("v1", "Service", Some("default"), "early");
    api.delete(
        "discovery.k8s.io/v1",
        "EndpointSlice",
        Some("default"),
        "early-abc",
    );
    wait_until("early removed", Duration::from_secs(5), || {
        t.inspect("backends").map(|b| b.len() == 3).unwrap_or(false)
    })?;

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
    // In status mode the agent writes no Service status: deploy/rbac.yaml
    // alone, without rbac-node-mode.yaml, allows all it did.
    assert_deploy_rbac_allows(&api, STATUS_MODE_RBAC);
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

/// The metrics endpoint answers while the agent still waits for the API:
/// alive but not ready. It is ready once the first lists are programmed;
/// the leader gauge and the re-list counter follow the Lease and the
/// watches.
#[test]
fn readyz_waits_for_the_first_sync_while_healthz_answers() -> Result<()> {
    let (t, api, kubeconfig) = api_topology()?;
    api.apply(service("web", WEB, None));
    api.apply(slice(&t, "web", &["pod-a", "pod-b"]));
    api.set_unavailable(true);
    let metrics = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9479);
    let flag = metrics.to_string();
    let probe = |path: &str| http_get(&t.node, metrics, path);
    let _agent = std::thread::scope(|scope| -> Result<_> {
        let starting = scope.spawn(|| t.start_agent_kube(&kubeconfig, &["--metrics-addr", &flag]));
        wait_until("the endpoint answers", Duration::from_secs(15), || {
            probe("/healthz").is_ok_and(|(status, _)| status == 200)
        })?;
        let (status, body) = probe("/readyz")?;
        let scraped = probe("/metrics");
        api.set_unavailable(false);
        let agent = starting
            .join()
            .map_err(|_| anyhow::anyhow!("agent start panicked"))??;
        assert_eq!(status, 503, "ready before the first sync: {body}");
        assert!(body.contains("first sync"), "{body}");
        let (status, text) = scraped?;
        assert_eq!(status, 200, "{text}");
        assert_eq!(sample(&text, "xlb_leader", &[]), Some(0.0), "{text}");
        Ok(agent)
    })?;
    wait_until(
        "ready after the first sync",
        Duration::from_secs(10),
        || probe("/readyz").is_ok_and(|(status, _)| status == 200),
    )?;
    assert!(tcp_request(&t.client, SocketAddrV4::new(WEB, 80)).is_ok());
    wait_until("leader and lists counted", Duration::from_secs(10), || {
        probe("/metrics").is_ok_and(|(_, text)| {
            sample(&text, "xlb_leader", &[]) == Some(1.0)
                && ["services", "endpointslices", "nodes"].iter().all(|r| {
                    sample(&text, "xlb_watch_relists_total", &[("resource", r)])
                        .is_some_and(|n| n >= 1.0)
                })
        })
    })
    .map_err(|e| anyhow::anyhow!("{e}:\n{:?}", probe("/metrics")))?;
    Ok(())
}

/// Audit A-14: a frontend the node cannot program (its service table is
/// full) is reported as a Warning Event on its Service, counted, and
/// retried with backoff: once the table has room (another Service is
/// deleted), a retry programs it although nothing about it changed.
#[test]
fn a_programming_failure_is_an_event_counted_and_retried() -> Result<()> {
    let (t, api, kubeconfig) = api_topology()?;
    let metrics = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9479);
    let flag = metrics.to_string();
    let _agent = t.start_agent_kube(
        &kubeconfig,
        &["--max-services", "1", "--metrics-addr", &flag],
    )?;
    api.apply(service("web", WEB, None));
    api.apply(slice(&t, "web", &["pod-a"]));
    wait_until("web programmed", Duration::from_secs(5), || {
        frontends(&t).contains("10.200.0.10:80/TCP")
    })?;
    api.apply(service("second", SECOND, None));
    api.apply(slice(&t, "second", &["pod-b"]));
    let events_on_second = || {
        api.list("events.k8s.io/v1", "Event")
            .into_iter()
            .filter(|e| e["regarding"]["name"] == "second" && e["reason"] == "ProgrammingFailed")
            .collect::<Vec<_>>()
    };
    wait_until(
        "a ProgrammingFailed Event on Service second",
        Duration::from_secs(10),
        || !events_on_second().is_empty(),
    )?;
    let event = &events_on_second()[0];
    assert_eq!(event["type"], "Warning");
    assert!(
        event["note"]
            .as_str()
            .unwrap_or("")
            .contains("service table full"),
        "{event}"
    );
    let errors = || {
        http_get(&t.node, metrics, "/metrics")
            .ok()
            .and_then(|(_, text)| sample(&text, "xlb_programming_errors_total", &[]))
            .unwrap_or(0.0)
    };
    wait_until("the failure retried", Duration::from_secs(10), || {
        errors() >= 2.0
    })?;
    assert_eq!(events_on_second().len(), 1, "the same failure posts once");

    assert!(api.delete("v1", "Service", Some("default"), "web"));
    wait_until("the retry programs second", Duration::from_secs(10), || {
        frontends(&t) == BTreeSet::from(["10.200.0.11:80/TCP".to_string()])
    })
    .map_err(|e| anyhow::anyhow!("{e}: {:?}", frontends(&t)))?;
    assert!(tcp_request(&t.client, SocketAddrV4::new(SECOND, 80)).is_ok());
    Ok(())
}

#[test]
fn an_invalid_service_gets_one_warning_event() -> Result<()> {
    let (t, api, kubeconfig) = api_topology()?;
    let _agent = t.start_agent_kube(&kubeconfig, &[])?;
    let mut bad = service("bad", SECOND, None);
    bad["spec"]["ports"][0]["protocol"] = json!("SCTP");
    api.apply(bad.clone());
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
    // A different problem on the same Service, with the same reason, is an
    // Event of its own that says what is wrong now (not a count on the
    // first Event, whose note names SCTP).
    bad["spec"]["ports"][0]["protocol"] = json!("TCP");
    bad["spec"]["loadBalancerSourceRanges"] = json!(["10.0.0.0/8", "not-a-cidr"]);
    api.apply(bad);
    wait_until(
        "a second Warning Event on Service bad, about its source range",
        Duration::from_secs(10),
        || {
            events_on_bad()
                .iter()
                .any(|e| e["note"].as_str().unwrap_or("").contains("not-a-cidr"))
        },
    )?;
    let events = events_on_bad();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(
        events.iter().all(|e| e["reason"] == "InvalidSpec"),
        "{events:?}"
    );
    Ok(())
}

#[test]
fn node_mode_writes_node_addresses_and_a_port_conflict_leaves_the_later_service_pending()
-> Result<()> {
    let (t, api, kubeconfig) = api_topology()?;
    api.apply(node(&t.node2_name, NODE2_ADDR));
    let agent = t.start_agent_kube(&kubeconfig, &["--address-mode", "node"])?;
    let both = [NODE_ADDR.to_string(), NODE2_ADDR.to_string()];
    let to = SocketAddrV4::new(NODE_ADDR, 80);

    // The leader writes every xlb node's address; this node serves its own.
    api.apply(pending_service("web"));
    api.apply(slice(&t, "web", &["pod-a", "pod-b"]));
    wait_until(
        "web's status lists both nodes",
        Duration::from_secs(10),
        || ingress(&api, "web") == both,
    )?;
    wait_until(
        "web programmed on the node address",
        Duration::from_secs(5),
        || frontends(&t).contains("10.0.1.1:80/TCP"),
    )?;
    assert_eq!(
        frontends(&t),
        BTreeSet::from(["10.0.1.1:80/TCP".to_string()]),
        "only this node's address is a frontend here"
    );
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        seen.insert(tcp_request(&t.client, to)?.backend);
    }
    assert_eq!(seen, BTreeSet::from(["pod-a".into(), "pod-b".into()]));

    // A later Service on the same port, whose name sorts first: creation
    // time decides, it stays pending, and an Event says why.
    std::thread::sleep(Duration::from_millis(1100));
    api.apply(pending_service("a-later"));
    api.apply(slice(&t, "a-later", &["pod-c"]));
    let conflict_events = || {
        api.list("events.k8s.io/v1", "Event")
            .into_iter()
            .filter(|e| e["regarding"]["name"] == "a-later" && e["reason"] == "PortConflict")
            .collect::<Vec<_>>()
    };
    wait_until(
        "a PortConflict Event on a-later",
        Duration::from_secs(10),
        || !conflict_events().is_empty(),
    )?;
    let event = &conflict_events()[0];
    assert_eq!(event["type"], "Warning");
    let note = event["note"].as_str().unwrap_or("");
    assert!(
        note.contains("80/TCP") && note.contains("default/web"),
        "{event}"
    );
    assert!(ingress(&api, "a-later").is_empty());
    assert_eq!(ingress(&api, "web"), both);
    for _ in 0..20 {
        assert_ne!(tcp_request(&t.client, to)?.backend, "pod-c");
    }

    // Nodes come and go. Opt-in label on this node only: node2 leaves.
    let mut labelled = node(&t.node_name, NODE_ADDR);
    labelled["metadata"]["labels"] = json!({"xlb.dev/enabled": "true"});
    api.apply(labelled);
    wait_until(
        "status narrowed to the labelled node",
        Duration::from_secs(10),
        || ingress(&api, "web") == [NODE_ADDR.to_string()],
    )?;
    // Label gone, node2 back; then node2 NotReady: withdrawn again.
    api.apply(node(&t.node_name, NODE_ADDR));
    wait_until("status back to both nodes", Duration::from_secs(10), || {
        ingress(&api, "web") == both
    })?;
    let mut not_ready = node(&t.node2_name, NODE2_ADDR);
    not_ready["status"]["conditions"] = json!([{"type": "Ready", "status": "Unknown"}]);
    api.apply(not_ready);
    wait_until("NotReady node2 withdrawn", Duration::from_secs(10), || {
        ingress(&api, "web") == [NODE_ADDR.to_string()]
    })?;

    // The holder goes: the pending Service gets the port and its traffic.
    api.delete("v1", "Service", Some("default"), "web");
    wait_until("a-later gets an address", Duration::from_secs(10), || {
        ingress(&api, "a-later") == [NODE_ADDR.to_string()]
    })?;
    wait_until("a-later answers on port 80", Duration::from_secs(5), || {
        tcp_request(&t.client, to).is_ok_and(|r| r.backend == "pod-c")
    })?;
    assert!(
        agent.log_text().contains("became leader"),
        "{}",
        agent.log_text()
    );

    wait_until(
        "the leader renews its Lease",
        Duration::from_secs(5),
        || {
            api.requests()
                .iter()
                .any(|r| r.starts_with("PUT /apis/coordination.k8s.io/"))
        },
    )?;
    // deploy/rbac.yaml and rbac-node-mode.yaml allow every request the
    // agent made, and grant nothing it did not use (but Event patches,
    // which the recorder sends for repeated Events).
    let used = assert_deploy_rbac_allows(&api, NODE_MODE_RBAC);
    assert_all_granted_used(NODE_MODE_RBAC, &used, &[("patch", "events")]);
    Ok(())
}

/// IPv6 addresses of the dual-stack tests (ULA). The topology's links are
/// IPv4, so these tests look at what the agent programs and writes for the
/// IPv6 half, and send real traffic through the IPv4 half.
const WEB_V6: &str = "fd00:200::10";
const NODE_V6: &str = "fd00:1::1";
const NODE2_V6: &str = "fd00:1::2";

/// `service` with `spec.ipFamilyPolicy` and `spec.ipFamilies` set.
fn with_families(mut service: Value, policy: &str, families: &[&str]) -> Value {
    service["spec"]["ipFamilyPolicy"] = json!(policy);
    service["spec"]["ipFamilies"] = json!(families);
    service
}

/// A Node with an IPv4 and an IPv6 InternalIP.
fn dual_stack_node(name: &str, ipv4: Ipv4Addr, ipv6: &str) -> Value {
    let mut node = node(name, ipv4);
    node["status"]["addresses"]
        .as_array_mut()
        .expect("addresses")
        .push(json!({"type": "InternalIP", "address": ipv6}));
    node
}

/// An `addressType: IPv6` EndpointSlice `<service>-v6` of `default/service`
/// on port http 8080, with ready endpoints (address, node).
fn ipv6_slice(service: &str, endpoints: &[(&str, &str)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(address, node)| {
            json!({"addresses": [address], "nodeName": node, "conditions": {"ready": true}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-v6"),
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": service}
        },
        "addressType": "IPv6",
        "endpoints": endpoints,
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}]
    })
}

/// `status.loadBalancer.ingress[].ip` of Service `default/name` in the
/// order written.
fn ingress_in_order(api: &FakeApi, name: &str) -> Vec<String> {
    api.get("v1", "Service", Some("default"), name)
        .map(|service| {
            service["status"]["loadBalancer"]["ingress"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i["ip"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `xlb inspect` rows: frontend → (flags, sorted backend addresses).
fn programmed(t: &Topology) -> Result<std::collections::BTreeMap<String, (String, Vec<String>)>> {
    let services = t.inspect("services")?;
    let backends = t.inspect("backends")?;
    let mut out = std::collections::BTreeMap::new();
    for service in services {
        let id = service["service_id"].as_u64();
        let mut addresses: Vec<String> = backends
            .iter()
            .filter(|b| b["service_id"].as_u64() == id)
            .filter_map(|b| b["address"].as_str().map(str::to_string))
            .collect();
        addresses.sort();
        out.insert(
            service["frontend"].as_str().unwrap_or_default().to_string(),
            (
                service["flags"].as_str().unwrap_or_default().to_string(),
                addresses,
            ),
        );
    }
    Ok(out)
}

#[test]
fn a_dual_stack_service_is_a_frontend_per_family_with_that_familys_endpoints() -> Result<()> {
    let (t, api, kubeconfig) = api_topology()?;
    api.apply(node(&t.node2_name, NODE2_ADDR));
    let _agent = t.start_agent_kube(&kubeconfig, &[])?;
    let mut web = with_families(
        service("web", WEB, None),
        "RequireDualStack",
        &["IPv4", "IPv6"],
    );
    web["status"]["loadBalancer"]["ingress"] = json!([{"ip": WEB.to_string()}, {"ip": WEB_V6}]);
    // Ranges of both families; the client (10.0.1.2) is inside the IPv4 one.
    web["spec"]["loadBalancerSourceRanges"] = json!(["10.0.1.0/24", "fd00:100::/64"]);
    api.apply(web.clone());
    api.apply(slice(&t, "web", &["pod-a", "pod-b"]));
    api.apply(ipv6_slice(
        "web",
        &[
            ("fd00:244:1::2", &t.node_name),
            ("fd00:244:2::2", &t.node2_name),
        ],
    ));
    let v4 = format!("{WEB}:80/TCP");
    let v6 = format!("[{WEB_V6}]:80/TCP");
    wait_until("both families programmed", Duration::from_secs(10), || {
        programmed(&t).is_ok_and(|p| p.get(&v6).is_some_and(|(_, b)| b.len() == 2))
    })?;
    let now = programmed(&t)?;
    assert_eq!(now.len(), 2, "{now:?}");
    assert_eq!(
        now[&v4],
        (
            "source-ranges".to_string(),
            vec!["10.244.1.2:8080".to_string(), "10.244.2.2:8080".to_string()]
        )
    );
    assert_eq!(
        now[&v6],
        (
            "source-ranges".to_string(),
            vec![
                "[fd00:244:1::2]:8080".to_string(),
                "[fd00:244:2::2]:8080".to_string()
            ]
        )
    );
    let local: Vec<String> = t
        .inspect("backends")?
        .iter()
        .filter(|b| b["flags"] == "local")
        .filter_map(|b| b["address"].as_str().map(str::to_string))
        .collect();
    assert!(
        local.contains(&"[fd00:244:1::2]:8080".to_string()),
        "{local:?}"
    );
    // The IPv4 half carries traffic as before.
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        seen.insert(tcp_request(&t.client, SocketAddrV4::new(WEB, 80))?.backend);
    }
    assert_eq!(seen, BTreeSet::from(["pod-a".into(), "pod-b".into()]));

    // The IPv6 slice goes: only the IPv6 frontend loses its backends.
    api.delete(
        "discovery.k8s.io/v1",
        "EndpointSlice",
        Some("default"),
        "web-v6",
    );
    wait_until("IPv6 backends removed", Duration::from_secs(10), || {
        programmed(&t).is_ok_and(|p| p.get(&v6).is_some_and(|(_, b)| b.is_empty()))
    })?;
    assert_eq!(programmed(&t)?[&v4].1.len(), 2);

    // Back to IPv4 only: the IPv6 frontend goes, and the IPv6 address
    // still in the status is reported on the Service.
    api.apply(with_families(web, "SingleStack", &["IPv4"]));
    wait_until("IPv6 frontend withdrawn", Duration::from_secs(10), || {
        frontends(&t) == BTreeSet::from([v4.clone()])
    })?;
    let family_events = || {
        api.list("events.k8s.io/v1", "Event")
            .into_iter()
            .filter(|e| {
                e["regarding"]["name"] == "web"
                    && e["note"]
                        .as_str()
                        .is_some_and(|n| n.contains(WEB_V6) && n.contains("family"))
            })
            .count()
    };
    wait_until(
        "an Event about the IPv6 ingress address",
        Duration::from_secs(10),
        || family_events() > 0,
    )?;
    assert!(tcp_request(&t.client, SocketAddrV4::new(WEB, 80)).is_ok());
    Ok(())
}

#[test]
fn node_mode_serves_and_writes_both_families_in_ip_families_order() -> Result<()> {
    let (t, api, kubeconfig) = api_topology()?;
    api.apply(dual_stack_node(&t.node_name, NODE_ADDR, NODE_V6));
    api.apply(dual_stack_node(&t.node2_name, NODE2_ADDR, NODE2_V6));
    let _agent = t.start_agent_kube(&kubeconfig, &["--address-mode", "node"])?;

    api.apply(with_families(
        pending_service("web"),
        "PreferDualStack",
        &["IPv6", "IPv4"],
    ));
    api.apply(slice(&t, "web", &["pod-a", "pod-b"]));
    api.apply(ipv6_slice("web", &[("fd00:244:1::2", &t.node_name)]));
    let want = [
        NODE_V6.to_string(),
        NODE2_V6.to_string(),
        NODE_ADDR.to_string(),
        NODE2_ADDR.to_string(),
    ];
    wait_until(
        "web's status lists both families, IPv6 first",
        Duration::from_secs(10),
        || ingress_in_order(&api, "web") == want,
    )?;
    let v4 = format!("{NODE_ADDR}:80/TCP");
    let v6 = format!("[{NODE_V6}]:80/TCP");
    wait_until(
        "web programmed on both own addresses",
        Duration::from_secs(5),
        || frontends(&t) == BTreeSet::from([v4.clone(), v6.clone()]),
    )?;
    let now = programmed(&t)?;
    assert_eq!(now[&v6].1, ["[fd00:244:1::2]:8080"]);
    assert_eq!(now[&v4].1, ["10.244.1.2:8080", "10.244.2.2:8080"]);
    assert!(tcp_request(&t.client, SocketAddrV4::new(NODE_ADDR, 80)).is_ok());

    // Port 80 is taken per family: an IPv6-only Service on it is pending
    // (its IPv6 port is web's), an IPv4-only one on port 81 is not.
    std::thread::sleep(Duration::from_millis(1100));
    api.apply(with_families(
        pending_service("six"),
        "SingleStack",
        &["IPv6"],
    ));
    let mut four = with_families(pending_service("four"), "SingleStack", &["IPv4"]);
    four["spec"]["ports"][0]["port"] = json!(81);
    api.apply(four);
    wait_until(
        "four gets its IPv4 addresses",
        Duration::from_secs(10),
        || ingress_in_order(&api, "four") == [NODE_ADDR.to_string(), NODE2_ADDR.to_string()],
    )?;
    let conflicts = || {
        api.list("events.k8s.io/v1", "Event")
            .into_iter()
            .filter(|e| e["regarding"]["name"] == "six" && e["reason"] == "PortConflict")
            .collect::<Vec<_>>()
    };
    wait_until(
        "a PortConflict Event on six",
        Duration::from_secs(10),
        || !conflicts().is_empty(),
    )?;
    let note = conflicts()[0]["note"].as_str().unwrap_or("").to_string();
    assert!(
        note.contains("IPv6") && note.contains("default/web"),
        "{note}"
    );
    assert!(ingress_in_order(&api, "six").is_empty());
    wait_until("four programmed", Duration::from_secs(5), || {
        frontends(&t).contains(&format!("{NODE_ADDR}:81/TCP"))
    })?;
    assert!(
        !frontends(&t).iter().any(|f| f.ends_with("]:81/TCP")),
        "{:?}",
        frontends(&t)
    );
    Ok(())
}

#[test]
fn one_of_two_agents_holds_the_lease_and_the_other_takes_over() -> Result<()> {
    require_root();
    let t = Topology::new()?;
    t.start_servers(&[8080])?;
    // On the node's link address, so that node2's agent reaches it too.
    let api = FakeApi::start_in_netns(&t.node, SocketAddrV4::new(NODE_LINK_ADDR, 0).into())?;
    let kubeconfig = t.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    api.apply(node(&t.node_name, NODE_ADDR));
    api.apply(node(&t.node2_name, NODE2_ADDR));
    let node_mode = ["--address-mode", "node"];

    let mut first = t.start_agent_kube(&kubeconfig, &node_mode)?;
    wait_until("the first agent leads", Duration::from_secs(10), || {
        lease_holder(&api) == t.node_name
    })?;
    let mut second = t.start_agent2_kube(&kubeconfig, &node_mode)?;
    api.apply(pending_service("web"));
    api.apply(slice(&t, "web", &["pod-a"]));
    wait_until(
        "web's status lists both nodes",
        Duration::from_secs(10),
        || ingress(&api, "web") == [NODE_ADDR.to_string(), NODE2_ADDR.to_string()],
    )?;
    // Both agents run through several renewals; the Lease stays put and
    // only its holder writes status.
    std::thread::sleep(Duration::from_secs(3));
    let mut third = node("node-c", Ipv4Addr::new(10, 0, 9, 9));
    third["metadata"]["name"] = json!(format!("{}-node-c", t.prefix));
    api.apply(third.clone());
    wait_until(
        "the third node in web's status",
        Duration::from_secs(10),
        || ingress(&api, "web").contains(&"10.0.9.9".to_string()),
    )?;
    assert_eq!(lease_holder(&api), t.node_name);
    assert!(status_writes_from(&api, NODE_LINK_ADDR) >= 2);
    assert_eq!(
        status_writes_from(&api, NODE2_ADDR),
        0,
        "the agent without the Lease wrote status"
    );
    assert!(tcp_request(&t.client, SocketAddrV4::new(NODE_ADDR, 80)).is_ok());

    // The leader dies without a word: the other takes over within 15 s and
    // does the leader's work.
    first.kill()?;
    let killed = Instant::now();
    wait_until(
        "the second agent takes over",
        Duration::from_secs(15),
        || lease_holder(&api) == t.node2_name,
    )?;
    eprintln!(
        "takeover {:?} after the leader was killed",
        killed.elapsed()
    );
    api.delete(
        "v1",
        "Node",
        None,
        third["metadata"]["name"].as_str().unwrap(),
    );
    wait_until(
        "the new leader updates web's status",
        Duration::from_secs(10),
        || ingress(&api, "web") == [NODE_ADDR.to_string(), NODE2_ADDR.to_string()],
    )?;
    assert!(status_writes_from(&api, NODE2_ADDR) >= 1);
    assert!(
        second.log_text().contains("taking over"),
        "{}",
        second.log_text()
    );

    // The first comes back and waits; the second stops cleanly and hands the
    // Lease over at once instead of letting it expire.
    let _first = t.start_agent_kube(&kubeconfig, &node_mode)?;
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(lease_holder(&api), t.node2_name);
    second.stop()?;
    let stopped = Instant::now();
    wait_until("the first leads again", Duration::from_secs(5), || {
        lease_holder(&api) == t.node_name
    })?;
    eprintln!("handover {:?} after a clean stop", stopped.elapsed());
    assert_deploy_rbac_allows(&api, NODE_MODE_RBAC);
    Ok(())
}

/// The RBAC files of deploy/ an agent in status address mode runs with.
const STATUS_MODE_RBAC: &[&str] = &["rbac.yaml"];
/// Node address mode adds the right to write Service status.
const NODE_MODE_RBAC: &[&str] = &["rbac.yaml", "rbac-node-mode.yaml"];

/// Audit A-16: another controller (K3s ServiceLB left enabled, MetalLB)
/// writes its own `status.loadBalancer.ingress` over every write of node
/// mode's leader. The leader backs off per Service instead of answering each
/// overwrite at API speed, and a Warning Event says the status is fought
/// over and by whom, likely; a Service nobody fights over is written as
/// usual meanwhile.
#[test]
fn a_status_write_war_backs_off_and_says_so() -> Result<()> {
    let (t, api, kubeconfig) = api_topology()?;
    let agent = t.start_agent_kube(&kubeconfig, &["--address-mode", "node"])?;
    api.fight_service_status("web", Some(&["192.0.2.99"]));
    api.apply(pending_service("web"));
    api.apply(slice(&t, "web", &["pod-a"]));
    let writes = || status_writes_from(&api, Ipv4Addr::LOCALHOST);
    wait_until("the first status write", Duration::from_secs(10), || {
        writes() > 0
    })?;
    let first = writes();
    std::thread::sleep(Duration::from_secs(10));
    let during = writes() - first;
    assert!(
        during <= 6,
        "{during} status writes in 10 s against a rival controller\n{}",
        agent.log_text()
    );
    let fought = api
        .list("events.k8s.io/v1", "Event")
        .into_iter()
        .filter(|e| e["regarding"]["name"] == "web" && e["reason"] == "StatusFoughtOver")
        .collect::<Vec<_>>();
    assert_eq!(fought.len(), 1, "{fought:?}");
    assert_eq!(fought[0]["type"], "Warning");
    let note = fought[0]["note"].as_str().unwrap_or("");
    assert!(
        note.contains("192.0.2.99") && note.contains("ServiceLB") && note.contains("MetalLB"),
        "{note}"
    );

    // Another Service is not held back by web's war.
    api.apply(objects::to_json(&objects::service_in(
        objects::NAMESPACE,
        "other",
        None,
        &[("http", "TCP", 81, "8080")],
    )));
    wait_until("other gets its address", Duration::from_secs(5), || {
        ingress(&api, "other") == [NODE_ADDR.to_string()]
    })?;
    // The rival stops: the next write sticks.
    api.fight_service_status("web", None);
    wait_until("web gets its address back", Duration::from_secs(40), || {
        ingress(&api, "web") == [NODE_ADDR.to_string()]
    })?;
    Ok(())
}

/// Pool address mode adds the pools, the Namespaces and status writes.
const POOL_MODE_RBAC: &[&str] = &["rbac.yaml", "rbac-pool-mode.yaml"];

fn address_pool(name: &str, addresses: &[&str]) -> Value {
    json!({
        "apiVersion": "xlb.dev/v1alpha1", "kind": "AddressPool",
        "metadata": {"name": name},
        "spec": {"addresses": addresses}
    })
}

/// Events with `reason` on Service (or pool) `name`.
fn events_on(api: &FakeApi, name: &str, reason: &str) -> Vec<Value> {
    api.list("events.k8s.io/v1", "Event")
        .into_iter()
        .filter(|e| e["regarding"]["name"] == name && e["reason"] == reason)
        .collect()
}

fn pool_status(api: &FakeApi, name: &str) -> Value {
    api.get("xlb.dev/v1alpha1", "AddressPool", None, name)
        .map(|pool| pool["status"].clone())
        .unwrap_or(Value::Null)
}

/// Issue 12: `--address-mode pool` on the API. The leader assigns
/// addresses from AddressPool resources, writes them into the Services'
/// status with Events, and keeps each pool's status; every agent programs
/// the assigned addresses (real traffic through the non-leading node's
/// datapath); a new leader keeps every allocation; a Service that leaves
/// frees its address for one that waits; a shrunk pool moves only the
/// Service it no longer covers.
#[test]
fn pool_mode_assigns_from_pools_and_a_new_leader_keeps_every_allocation() -> Result<()> {
    require_root();
    let t = Topology::new()?;
    t.start_servers(&[8080])?;
    let api = FakeApi::start_in_netns(&t.node, SocketAddrV4::new(NODE_LINK_ADDR, 0).into())?;
    let kubeconfig = t.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    api.apply(node(&t.node_name, NODE_ADDR));
    api.apply(node(&t.node2_name, NODE2_ADDR));
    let pool_mode = ["--address-mode", "pool"];
    api.apply(address_pool("lab", &["10.200.0.10-10.200.0.11"]));

    // node2's agent leads; the node's agent (where the client's traffic
    // arrives) only follows the allocation.
    let mut leader = t.start_agent2_kube(&kubeconfig, &pool_mode)?;
    wait_until("node2's agent leads", Duration::from_secs(10), || {
        lease_holder(&api) == t.node2_name
    })?;
    let _follower = t.start_agent_kube(&kubeconfig, &pool_mode)?;
    for name in ["s1", "s2", "s3"] {
        api.apply(pending_service(name));
    }
    api.apply(slice(&t, "s1", &["pod-a"]));
    api.apply(slice(&t, "s2", &["pod-b"]));
    api.apply(slice(&t, "s3", &["pod-c"]));
    wait_until("s1 and s2 get addresses", Duration::from_secs(10), || {
        ingress(&api, "s1") == ["10.200.0.10"] && ingress(&api, "s2") == ["10.200.0.11"]
    })?;
    wait_until("the follower programs both", Duration::from_secs(5), || {
        frontends(&t) == BTreeSet::from(["10.200.0.10:80/TCP".into(), "10.200.0.11:80/TCP".into()])
    })?;
    assert_eq!(
        tcp_request(&t.client, SocketAddrV4::new(WEB, 80))?.backend,
        "pod-a"
    );
    assert_eq!(
        tcp_request(&t.client, SocketAddrV4::new(SECOND, 80))?.backend,
        "pod-b"
    );
    // Events: IPAllocated (Normal) on the assigned, AllocationFailed
    // (Warning) on the one the pool cannot serve, which stays pending.
    wait_until("the allocation Events", Duration::from_secs(10), || {
        !events_on(&api, "s1", "IPAllocated").is_empty()
            && !events_on(&api, "s3", "AllocationFailed").is_empty()
    })?;
    let allocated = &events_on(&api, "s1", "IPAllocated")[0];
    assert_eq!(allocated["type"], "Normal");
    assert!(
        allocated["note"]
            .as_str()
            .is_some_and(|n| n.contains("10.200.0.10 from AddressPool lab")),
        "{allocated}"
    );
    let failed = &events_on(&api, "s3", "AllocationFailed")[0];
    assert_eq!(failed["type"], "Warning");
    assert!(
        failed["note"]
            .as_str()
            .is_some_and(|n| n.contains("no free IPv4 address")),
        "{failed}"
    );
    assert!(ingress(&api, "s3").is_empty());
    // The pool's status: counts and the Ready condition.
    wait_until("the pool's status", Duration::from_secs(10), || {
        let status = pool_status(&api, "lab");
        status["assignedIPv4"] == 2 && status["availableIPv4"] == 0
    })?;
    assert_eq!(pool_status(&api, "lab")["conditions"][0]["status"], "True");
    // An overlapping pool is reported and not used at all.
    api.apply(address_pool("late", &["10.200.0.11-10.200.0.12"]));
    wait_until(
        "the overlap in late's status",
        Duration::from_secs(10),
        || pool_status(&api, "late")["conditions"][0]["reason"] == "Overlap",
    )?;
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        ingress(&api, "s3").is_empty(),
        "an overlapping pool was used"
    );
    api.delete("xlb.dev/v1alpha1", "AddressPool", None, "late");

    // The leader dies: the node's agent takes over, and keeps everything.
    let writes_before = status_writes_from(&api, NODE_LINK_ADDR);
    leader.kill()?;
    wait_until(
        "the node's agent takes over",
        Duration::from_secs(15),
        || lease_holder(&api) == t.node_name,
    )?;
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(ingress(&api, "s1"), ["10.200.0.10"]);
    assert_eq!(ingress(&api, "s2"), ["10.200.0.11"]);
    assert_eq!(
        status_writes_from(&api, NODE_LINK_ADDR),
        writes_before,
        "the new leader rewrote a status"
    );
    // s2 goes: s3, which waited, gets its address from the new leader.
    api.delete("v1", "Service", Some("default"), "s2");
    wait_until("s3 gets the freed address", Duration::from_secs(10), || {
        ingress(&api, "s3") == ["10.200.0.11"]
    })?;
    wait_until("s3 answers there", Duration::from_secs(5), || {
        tcp_request(&t.client, SocketAddrV4::new(SECOND, 80)).is_ok_and(|r| r.backend == "pod-c")
    })?;
    // The pool shrinks: s1 moves (with an Event saying why), s3 stays.
    api.apply(address_pool("lab", &["10.200.0.11/32", "10.200.0.12/32"]));
    wait_until("s1 moves into the pool", Duration::from_secs(10), || {
        ingress(&api, "s1") == ["10.200.0.12"]
    })?;
    assert_eq!(ingress(&api, "s3"), ["10.200.0.11"]);
    wait_until("s1's move is an Event", Duration::from_secs(5), || {
        events_on(&api, "s1", "IPAllocated").iter().any(|e| {
            e["note"]
                .as_str()
                .is_some_and(|n| n.contains("10.200.0.10 given up"))
        })
    })?;
    wait_until(
        "s1 answers at its new address",
        Duration::from_secs(5),
        || {
            tcp_request(&t.client, SocketAddrV4::new(FOREIGN, 80))
                .is_ok_and(|r| r.backend == "pod-a")
        },
    )?;
    assert!(
        tcp_request(&t.client, SocketAddrV4::new(WEB, 80)).is_err(),
        "the old address still answers"
    );
    // deploy/rbac.yaml and rbac-pool-mode.yaml allow every request, and
    // grant nothing unused (but Event patches).
    let used = assert_deploy_rbac_allows(&api, POOL_MODE_RBAC);
    assert_all_granted_used(POOL_MODE_RBAC, &used, &[("patch", "events")]);
    Ok(())
}
