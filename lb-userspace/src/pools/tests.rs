//! The allocator on objects as the API would hold them.

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::{api::core::v1::Service, apimachinery::pkg::apis::meta::v1::Time};
use serde_json::{Value, json};

use super::*;
use crate::translate::{EventReason, ServiceKey};

fn pool(name: &str, created: u32, spec: Value) -> AddressPool {
    serde_json::from_value(json!({
        "apiVersion": "xlb.dev/v1alpha1", "kind": "AddressPool",
        "metadata": {"name": name,
                     "creationTimestamp": format!("2026-01-01T00:00:{created:02}Z")},
        "spec": spec
    }))
    .unwrap()
}

/// A LoadBalancer Service in `namespace`, created at minute `created`;
/// `extra` is merged into it (spec fields, metadata, status).
fn service(namespace: &str, name: &str, created: u32, extra: Value) -> Service {
    let mut object = json!({
        "metadata": {"name": name, "namespace": namespace,
                     "creationTimestamp": format!("2026-01-01T00:{created:02}:00Z")},
        "spec": {"type": "LoadBalancer", "ports": [{"name": "http", "port": 80}]}
    });
    merge(&mut object, extra);
    serde_json::from_value(object).unwrap()
}

fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(into), Value::Object(from)) => {
            for (key, value) in from {
                merge(into.entry(key).or_insert(Value::Null), value);
            }
        }
        (into, from) => *into = from,
    }
}

fn status(ips: &[&str]) -> Value {
    let ingress: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
    json!({"status": {"loadBalancer": {"ingress": ingress}}})
}

fn run(pools: &[AddressPool], services: &[Service]) -> Allocation {
    run_in(pools, services, &NamespaceLabels::new())
}

fn run_in(pools: &[AddressPool], services: &[Service], namespaces: &NamespaceLabels) -> Allocation {
    let services: Vec<&Service> = services.iter().collect();
    allocate(&Pools::new(pools), &services, namespaces)
}

fn addresses(allocation: &Allocation, namespace: &str, name: &str) -> Vec<String> {
    allocation
        .assigned
        .get(&ServiceKey::new(namespace, name))
        .map(|a| a.iter().map(ToString::to_string).collect())
        .unwrap_or_default()
}

fn failures(allocation: &Allocation) -> Vec<String> {
    allocation
        .problems
        .iter()
        .filter(|p| p.reason == EventReason::AllocationFailed)
        .map(|p| format!("{}: {}", p.object.name.as_deref().unwrap_or(""), p.message))
        .collect()
}

/// The Services as a new leader reads them: status = what was assigned.
fn written_back(services: &[Service], allocation: &Allocation) -> Vec<Service> {
    services
        .iter()
        .map(|service| {
            let key = ServiceKey::of(service);
            let ips: Vec<&str> = allocation
                .assigned
                .get(&key)
                .map(|a| a.iter().map(|ip| &*ip.to_string().leak()).collect())
                .unwrap_or_default();
            let mut object = serde_json::to_value(service).unwrap();
            object["status"] = status(&ips)["status"].clone();
            serde_json::from_value(object).unwrap()
        })
        .collect()
}

#[test]
fn pools_are_tried_by_priority_then_name_and_addresses_lowest_first() {
    let pools = [
        pool("b-late", 1, json!({"addresses": ["192.0.2.10/31"]})),
        pool("a-late", 2, json!({"addresses": ["192.0.2.20-192.0.2.20"]})),
        pool(
            "first",
            3,
            json!({"addresses": ["192.0.2.30/32"], "priority": 1}),
        ),
        pool(
            "manual",
            4,
            json!({"addresses": ["192.0.2.40/32"], "priority": 0, "autoAssign": false}),
        ),
    ];
    let services: Vec<Service> = (0..5)
        .map(|i| service("shop", &format!("s{i}"), i, json!({})))
        .collect();
    let allocation = run(&pools, &services);
    let got: Vec<Vec<String>> = (0..5)
        .map(|i| addresses(&allocation, "shop", &format!("s{i}")))
        .collect();
    // priority 1 first; then pools without priority by name; the manual
    // pool never automatically.
    assert_eq!(
        got,
        [
            vec!["192.0.2.30"],
            vec!["192.0.2.20"],
            vec!["192.0.2.10"],
            vec!["192.0.2.11"],
            vec![]
        ]
    );
    let failed = failures(&allocation);
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        failed[0].starts_with("s4: no address assigned: no free IPv4 address in"),
        "{failed:?}"
    );
    assert_eq!(allocation.allocated.len(), 4);
    assert!(
        allocation.allocated[0]
            .message
            .contains("192.0.2.30 from AddressPool first")
    );
    assert!(
        allocation
            .allocated
            .iter()
            .all(|e| e.reason == EventReason::IpAllocated)
    );
}

#[test]
fn scopes_select_namespaces_by_name_and_label_and_services_by_label() {
    let pools = [
        pool(
            "by-name",
            1,
            json!({"addresses": ["192.0.2.1/32"], "priority": 1,
                                  "scope": {"namespaces": ["team-a"]}}),
        ),
        pool(
            "by-ns-label",
            2,
            json!({"addresses": ["192.0.2.2/32"], "priority": 2,
            "scope": {"namespaceSelector": {"matchLabels": {"tier": "prod"}}}}),
        ),
        pool(
            "by-svc-label",
            3,
            json!({"addresses": ["192.0.2.3/32"], "priority": 3,
            "scope": {"serviceSelector": {"matchExpressions": [
                {"key": "expose", "operator": "In", "values": ["public"]}]}}}),
        ),
        pool(
            "rest",
            4,
            json!({"addresses": ["192.0.2.9/32"], "priority": 9}),
        ),
    ];
    let namespaces: NamespaceLabels = [(
        "team-b".to_owned(),
        BTreeMap::from([("tier".to_owned(), "prod".to_owned())]),
    )]
    .into();
    let services = [
        service("team-a", "a", 1, json!({})),
        service("team-b", "b", 2, json!({})),
        service(
            "team-c",
            "c",
            3,
            json!({"metadata": {"labels": {"expose": "public"}}}),
        ),
        service("team-d", "d", 4, json!({})),
    ];
    let allocation = run_in(&pools, &services, &namespaces);
    assert_eq!(addresses(&allocation, "team-a", "a"), ["192.0.2.1"]);
    assert_eq!(addresses(&allocation, "team-b", "b"), ["192.0.2.2"]);
    assert_eq!(addresses(&allocation, "team-c", "c"), ["192.0.2.3"]);
    assert_eq!(addresses(&allocation, "team-d", "d"), ["192.0.2.9"]);
}

#[test]
fn specific_addresses_are_honoured_only_inside_a_pool_the_service_may_use() {
    let pools = [
        pool(
            "public",
            1,
            json!({"addresses": ["192.0.2.0/28", "2001:db8::/124"]}),
        ),
        pool(
            "team",
            2,
            json!({"addresses": ["198.51.100.0/28"], "autoAssign": false,
                               "scope": {"namespaces": ["team"]}}),
        ),
    ];
    let dual =
        json!({"spec": {"ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"]}});
    let mut annotated = dual.clone();
    merge(
        &mut annotated,
        json!({"metadata": {"annotations":
        {IPS_ANNOTATION: "2001:db8::7, 192.0.2.5"}}}),
    );
    let services = [
        service(
            "shop",
            "legacy",
            1,
            json!({"spec": {"loadBalancerIP": "192.0.2.9"}}),
        ),
        service("shop", "both", 2, annotated),
        service(
            "team",
            "manual",
            3,
            json!({"spec": {"loadBalancerIP": "198.51.100.4"}}),
        ),
        service(
            "shop",
            "outside-scope",
            4,
            json!({"spec": {"loadBalancerIP": "198.51.100.5"}}),
        ),
        service(
            "shop",
            "no-pool",
            5,
            json!({"spec": {"loadBalancerIP": "203.0.113.1"}}),
        ),
        service(
            "shop",
            "taken",
            6,
            json!({"spec": {"loadBalancerIP": "192.0.2.9"}}),
        ),
        service(
            "shop",
            "bad",
            7,
            json!({"metadata": {"annotations": {IPS_ANNOTATION: "192.0.2.1,192.0.2.2"}}}),
        ),
        service(
            "team",
            "named",
            8,
            json!({"metadata": {"annotations": {POOL_ANNOTATION: "team"}}}),
        ),
    ];
    let allocation = run(&pools, &services);
    assert_eq!(addresses(&allocation, "shop", "legacy"), ["192.0.2.9"]);
    assert_eq!(
        addresses(&allocation, "shop", "both"),
        ["192.0.2.5", "2001:db8::7"]
    );
    assert_eq!(addresses(&allocation, "team", "manual"), ["198.51.100.4"]);
    // The first free address of the named pool (autoAssign false).
    assert_eq!(addresses(&allocation, "team", "named"), ["198.51.100.0"]);
    for name in ["outside-scope", "no-pool", "taken", "bad"] {
        assert!(addresses(&allocation, "shop", name).is_empty(), "{name}");
    }
    let failed = failures(&allocation);
    assert_eq!(failed.len(), 4, "{failed:#?}");
    assert!(
        failed[0].contains("bad: spec") || failed[0].contains("more than one IPv4"),
        "{failed:#?}"
    );
    assert!(
        failed
            .iter()
            .any(|f| f.starts_with("outside-scope:") && f.contains("scope does not include"))
    );
    assert!(failed.iter().any(
        |f| f.starts_with("no-pool:") && f.contains("203.0.113.1 is in no usable AddressPool")
    ));
    assert!(
        failed
            .iter()
            .any(|f| f.starts_with("taken:") && f.contains("in use by Service shop/legacy"))
    );
}

#[test]
fn sharing_needs_the_same_key_distinct_ports_and_for_local_the_same_selector() {
    let pools = [pool("p", 1, json!({"addresses": ["192.0.2.0/30"]}))];
    let shared = |port: u16, extra: Value| {
        let mut object = json!({"metadata": {"annotations": {SHARING_ANNOTATION: "k"}},
                                "spec": {"ports": [{"name": "p", "port": port}]}});
        merge(&mut object, extra);
        object
    };
    let local =
        |app: &str| json!({"spec": {"externalTrafficPolicy": "Local", "selector": {"app": app}}});
    let services = [
        service("ns", "http", 1, shared(80, json!({}))),
        service("ns", "https", 2, shared(443, json!({}))),
        service("ns", "http-again", 3, shared(80, json!({}))),
        service(
            "ns",
            "other-key",
            4,
            json!({"metadata": {"annotations": {SHARING_ANNOTATION: "x"}},
                                             "spec": {"loadBalancerIP": "192.0.2.0"}}),
        ),
        service("ns", "local-a", 5, shared(53, local("a"))),
        service("ns", "local-a2", 6, shared(54, local("a"))),
        service("ns", "local-b", 7, shared(55, local("b"))),
    ];
    let allocation = run(&pools, &services);
    assert_eq!(addresses(&allocation, "ns", "http"), ["192.0.2.0"]);
    assert_eq!(addresses(&allocation, "ns", "https"), ["192.0.2.0"]);
    // Port 80 clashes: another address.
    assert_eq!(addresses(&allocation, "ns", "http-again"), ["192.0.2.1"]);
    // A Local Service does not join Cluster ones; two Local ones with the
    // same selector share, another selector does not.
    assert_eq!(addresses(&allocation, "ns", "local-a"), ["192.0.2.2"]);
    assert_eq!(addresses(&allocation, "ns", "local-a2"), ["192.0.2.2"]);
    assert_eq!(addresses(&allocation, "ns", "local-b"), ["192.0.2.3"]);
    let failed = failures(&allocation);
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert!(
        failed[0].starts_with("other-key:") && failed[0].contains("same xlb.dev/allow-shared-ip"),
        "{failed:#?}"
    );
    // A requested shared address whose ports clash is refused, not overlapped.
    let clash = service(
        "ns",
        "clash",
        9,
        shared(443, json!({"spec": {"loadBalancerIP": "192.0.2.0"}})),
    );
    let mut more = services.to_vec();
    more.push(clash);
    let allocation = run(&pools, &more);
    assert!(addresses(&allocation, "ns", "clash").is_empty());
    assert!(
        failures(&allocation)
            .iter()
            .any(|f| f.starts_with("clash:") && f.contains("port 443/TCP too"))
    );
}

#[test]
fn dual_stack_exhaustion_and_buggy_addresses() {
    let pools = [pool(
        "p",
        1,
        json!({"addresses": ["192.0.2.255-192.0.3.1", "2001:db8::1/128"],
                                     "avoidBuggyIPs": true}),
    )];
    let require =
        json!({"spec": {"ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv6", "IPv4"]}});
    let prefer =
        json!({"spec": {"ipFamilyPolicy": "PreferDualStack", "ipFamilies": ["IPv4", "IPv6"]}});
    let services = [
        service("ns", "dual", 1, require.clone()),
        service("ns", "prefer", 2, prefer),
        service("ns", "require", 3, require),
        service("ns", "v4", 4, json!({})),
    ];
    let allocation = run(&pools, &services);
    // IPv6 first, as the Service lists its families; .255 and .0 skipped.
    assert_eq!(
        addresses(&allocation, "ns", "dual"),
        ["2001:db8::1", "192.0.3.1"]
    );
    // IPv4 only: no IPv6 left, and the family is optional.
    assert!(
        addresses(&allocation, "ns", "prefer").is_empty(),
        "no IPv4 left either"
    );
    assert!(addresses(&allocation, "ns", "require").is_empty());
    let failed = failures(&allocation);
    assert_eq!(failed.len(), 3, "{failed:#?}");
    let status = Pools::new(&pools).status("p", &allocation, None, Time(Default::default()));
    assert_eq!((status.assigned_ipv4, status.available_ipv4), (1, 0));
    assert_eq!((status.assigned_ipv6, status.available_ipv6), (1, 0));
    assert_eq!(status.conditions[0].status, "True");
}

#[test]
fn a_new_leader_keeps_every_allocation_and_a_new_service_takes_nothing_away() {
    let pools = [pool("p", 1, json!({"addresses": ["192.0.2.0/29"]}))];
    let mut services: Vec<Service> = (0..4)
        .map(|i| service("ns", &format!("s{i}"), 10 + i, json!({})))
        .collect();
    let first = run(&pools, &services);
    let services_now = written_back(&services, &first);
    // A second run on the written status (another agent, a new leader).
    let again = run(&pools, &services_now);
    assert_eq!(again.assigned, first.assigned);
    assert!(
        again.allocated.is_empty(),
        "no Event for what did not change"
    );
    // An older Service created later (an earlier timestamp than all of
    // them) and one that leaves: nobody moves, the freed address is reused.
    services = services_now;
    services.remove(1);
    services.push(service("ns", "older", 1, json!({})));
    let after = run(&pools, &services);
    for i in [0, 2, 3] {
        let name = format!("s{i}");
        assert_eq!(
            addresses(&after, "ns", &name),
            addresses(&first, "ns", &name)
        );
    }
    assert_eq!(
        addresses(&after, "ns", "older"),
        addresses(&first, "ns", "s1")
    );
    // Status written by hand with an address another holds: the Service
    // created first keeps it.
    let dup = service("ns", "dup", 30, status(&["192.0.2.0"]));
    services.push(dup);
    let after = run(&pools, &services);
    assert_eq!(addresses(&after, "ns", "s0"), ["192.0.2.0"]);
    assert_ne!(addresses(&after, "ns", "dup"), ["192.0.2.0"]);
    let event = after
        .allocated
        .iter()
        .find(|e| e.object.name.as_deref() == Some("dup"))
        .unwrap();
    assert!(
        event
            .message
            .contains("192.0.2.0 given up: it is in use by Service ns/s0"),
        "{event:?}"
    );
}

#[test]
fn a_shrunk_pool_reassigns_only_the_services_it_no_longer_covers() {
    let wide = [pool("p", 1, json!({"addresses": ["192.0.2.0/29"]}))];
    let services: Vec<Service> = (0..4)
        .map(|i| service("ns", &format!("s{i}"), i, json!({})))
        .collect();
    let first = run(&wide, &services);
    let services = written_back(&services, &first);
    let narrow = [pool("p", 1, json!({"addresses": ["192.0.2.2-192.0.2.7"]}))];
    let after = run(&narrow, &services);
    assert_eq!(addresses(&after, "ns", "s2"), ["192.0.2.2"]);
    assert_eq!(addresses(&after, "ns", "s3"), ["192.0.2.3"]);
    assert_eq!(addresses(&after, "ns", "s0"), ["192.0.2.4"]);
    assert_eq!(addresses(&after, "ns", "s1"), ["192.0.2.5"]);
    let moved: Vec<String> = after.allocated.iter().map(|e| e.message.clone()).collect();
    assert_eq!(moved.len(), 2, "{moved:#?}");
    assert!(
        moved[0].contains("192.0.2.0 given up: 192.0.2.0 is in no usable AddressPool"),
        "{moved:#?}"
    );
    // A pool removed entirely: its Services fail, with the reason.
    let gone = run(&[], &services);
    assert!(gone.assigned.is_empty());
    assert_eq!(failures(&gone).len(), 4);
}

#[test]
fn invalid_and_overlapping_pools_are_reported_and_not_used_at_all() {
    let pools = [
        pool("first", 1, json!({"addresses": ["192.0.2.0/30"]})),
        pool(
            "overlaps",
            2,
            json!({"addresses": ["198.51.100.0/30", "192.0.2.3-192.0.2.9"], "priority": 0}),
        ),
        pool(
            "typo",
            3,
            json!({"addresses": ["203.0.113.0/33"], "priority": 0}),
        ),
        pool(
            "bad-selector",
            4,
            json!({"addresses": ["203.0.113.8/30"], "priority": 0,
            "scope": {"serviceSelector": {"matchExpressions": [{"key": "a", "operator": "Bogus"}]}}}),
        ),
    ];
    let checked = Pools::new(&pools);
    assert_eq!(
        checked
            .usable
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>(),
        ["first"]
    );
    let problems: Vec<String> = checked
        .problems
        .iter()
        .map(|p| {
            format!(
                "{} {} {}",
                p.object.name.as_deref().unwrap(),
                p.reason,
                p.message
            )
        })
        .collect();
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(
        problems[0].starts_with("overlaps AddressConflict its addresses overlap AddressPool first")
    );
    assert!(problems[1].starts_with("typo InvalidSpec spec.addresses:"));
    assert!(problems[2].starts_with("bad-selector InvalidSpec spec.scope.serviceSelector"));
    assert!(
        checked
            .problems
            .iter()
            .all(|p| p.object.namespace.is_none()),
        "cluster-scoped"
    );
    // No address of the overlapping pool is handed out, not even its own
    // 198.51.100.0/30.
    let services = [service(
        "ns",
        "a",
        1,
        json!({"spec": {"loadBalancerIP": "198.51.100.1"}}),
    )];
    let allocation = run(&pools, &services);
    assert!(allocation.assigned.is_empty());
    let status = checked.status("overlaps", &allocation, None, Time(Default::default()));
    assert_eq!(status.conditions[0].status, "False");
    assert_eq!(status.conditions[0].reason, "Overlap");
    assert_eq!(status.available_ipv4, 0);
    // The address → pool lookup the announcers use.
    let address: IpAddr = "192.0.2.2".parse().unwrap();
    assert_eq!(
        checked.pool_of(address).map(|p| p.name.as_str()),
        Some("first")
    );
    assert!(checked.pool_of("198.51.100.1".parse().unwrap()).is_none());
}

#[test]
fn the_custom_resource_reads_its_defaults_and_keeps_l2() {
    let pool = pool(
        "p",
        1,
        json!({"addresses": ["192.0.2.0/24"],
        "l2": {"interfaces": ["eth0"], "nodeSelector": {"matchLabels": {"edge": "true"}}}}),
    );
    assert!(pool.spec.auto_assign);
    assert!(!pool.spec.avoid_buggy_ips);
    let checked = Pools::new(&[pool]);
    let l2 = checked.usable[0].l2.as_ref().unwrap();
    assert_eq!(l2.interfaces, ["eth0"]);
    assert!(l2.node_selector.is_some());
    // What the L2 announcer makes of it.
    let settings = checked.usable[0].l2_settings();
    assert_eq!(settings.interfaces, ["eth0"]);
    let labels = |edge: &str| [("edge".to_string(), edge.to_string())].into();
    assert!(settings.selects(&labels("true")));
    assert!(!settings.selects(&labels("false")));
    assert!(!settings.selects(&Default::default()));
    // A pool whose announcement selector is invalid is not used at all.
    let bad = self::pool(
        "bad-l2",
        2,
        json!({"addresses": ["198.51.100.0/24"],
        "l2": {"nodeSelector": {"matchExpressions": [{"key": "a", "operator": "Bogus"}]}}}),
    );
    let checked = Pools::new(&[bad]);
    assert!(checked.usable.is_empty());
    assert_eq!(checked.problems.len(), 1, "{:?}", checked.problems);
    assert!(
        checked.problems[0].message.contains("spec.l2.nodeSelector"),
        "{:?}",
        checked.problems[0].message
    );
    let crd = serde_json::to_value(<AddressPool as kube::CustomResourceExt>::crd()).unwrap();
    assert_eq!(crd["spec"]["scope"], "Cluster");
    assert_eq!(
        crd["spec"]["versions"][0]["subresources"]["status"],
        json!({})
    );
}

#[test]
fn the_status_to_write_clears_services_that_stopped_asking_for_a_pool_address() {
    let pools = [pool("p", 1, json!({"addresses": ["192.0.2.0/30"]}))];
    let checked = Pools::new(&pools);
    let services = [
        service("ns", "lb", 1, json!({})),
        service(
            "ns",
            "failed",
            2,
            json!({"spec": {"loadBalancerIP": "203.0.113.1"}}),
        ),
        // Was a LoadBalancer with a pool address, is a ClusterIP now.
        service("ns", "now-cluster-ip", 3, {
            let mut extra = status(&["192.0.2.3"]);
            merge(&mut extra, json!({"spec": {"type": "ClusterIP"}}));
            extra
        }),
        // Not ours: an address of no pool on a ClusterIP Service.
        service("ns", "other", 4, {
            let mut extra = status(&["198.51.100.1"]);
            merge(&mut extra, json!({"spec": {"type": "ClusterIP"}}));
            extra
        }),
    ];
    let refs: Vec<&Service> = services.iter().collect();
    let allocation = allocate(&checked, &refs, &NamespaceLabels::new());
    let desired = desired_ingress(&checked, &allocation, &refs);
    let shown: Vec<(String, Vec<String>)> = desired
        .iter()
        .map(|(key, ips)| {
            (
                key.name.clone(),
                ips.iter().map(ToString::to_string).collect(),
            )
        })
        .collect();
    assert_eq!(
        shown,
        [
            ("failed".to_owned(), vec![]),
            ("lb".to_owned(), vec!["192.0.2.0".to_owned()]),
            ("now-cluster-ip".to_owned(), vec![]),
        ]
    );
}
