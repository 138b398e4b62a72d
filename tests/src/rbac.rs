//! deploy/'s RBAC checked against what the agents asked the fake API
//! server for: every request allowed, and nothing granted unused.

use std::collections::BTreeSet;

use serde::Deserialize;

use crate::fake_api::FakeApi;

/// One rule of deploy/'s RBAC, with the namespace a Role limits it to.
pub struct Rule {
    pub groups: Vec<String>,
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
    pub namespace: Option<String>,
}

pub fn deploy_rbac_rules(files: &[&str]) -> Vec<Rule> {
    let mut rules = Vec::new();
    for file in files {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy")
            .join(file);
        let text = std::fs::read_to_string(&path).expect("deploy/ RBAC file");
        rules.extend(rules_in(&text));
    }
    rules
}

pub fn rules_in(text: &str) -> Vec<Rule> {
    let strings = |v: &serde_yaml::Value| -> Vec<String> {
        v.as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect()
    };
    let mut rules = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let doc = serde_yaml::Value::deserialize(document).expect("rbac.yaml parses");
        let namespace = match doc["kind"].as_str() {
            Some("ClusterRole") => None,
            Some("Role") => Some(doc["metadata"]["namespace"].as_str().unwrap().to_string()),
            _ => continue,
        };
        for rule in doc["rules"].as_sequence().into_iter().flatten() {
            rules.push(Rule {
                groups: strings(&rule["apiGroups"]),
                resources: strings(&rule["resources"]),
                verbs: strings(&rule["verbs"]),
                namespace: namespace.clone(),
            });
        }
    }
    rules
}

/// A request line as RBAC sees it: (verb, group, resource[/sub], namespace).
pub fn rbac_request(line: &str) -> Option<(String, String, String, Option<String>)> {
    let (method, target) = line.split_once(' ')?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None, // /version and other non-resource URLs
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        rest => (None, rest),
    };
    let (resource, named) = match rest {
        [resource] => (resource.to_string(), false),
        [resource, _name] => (resource.to_string(), true),
        [resource, _name, sub] => (format!("{resource}/{sub}"), true),
        _ => return None,
    };
    let verb = match (method, named) {
        ("GET", _)
            if query
                .split('&')
                .any(|p| p == "watch=true" || p == "watch=1") =>
        {
            "watch"
        }
        ("GET", false) => "list",
        ("GET", true) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", _) => "delete",
        _ => return None,
    };
    Some((verb.into(), group.into(), resource, namespace))
}

/// Every request the agents made is allowed by the RBAC `files` of
/// deploy/; returns the (verb, resource) pairs used, for checking that
/// nothing granted is unused.
pub fn assert_deploy_rbac_allows(api: &FakeApi, files: &[&str]) -> BTreeSet<(String, String)> {
    let rules = deploy_rbac_rules(files);
    let mut used = BTreeSet::new();
    for line in api.requests() {
        let Some((verb, group, resource, namespace)) = rbac_request(&line) else {
            continue;
        };
        let allowed = rules.iter().any(|rule| {
            rule.verbs.contains(&verb)
                && rule.groups.contains(&group)
                && rule.resources.contains(&resource)
                && rule.namespace.as_ref().is_none_or(|ns| {
                    // The agents run with the default Lease namespace, the
                    // one the DaemonSet lives in.
                    namespace.as_ref() == Some(ns)
                })
        });
        assert!(allowed, "deploy/{files:?} does not allow {line}");
        used.insert((verb, resource));
    }
    used
}

/// Every verb on every resource `files` grant was used (`used`, from
/// [`assert_deploy_rbac_allows`]), but the `(verb, resource)` pairs in
/// `unused_ok`.
pub fn assert_all_granted_used(
    files: &[&str],
    used: &BTreeSet<(String, String)>,
    unused_ok: &[(&str, &str)],
) {
    for rule in deploy_rbac_rules(files) {
        for resource in &rule.resources {
            for verb in &rule.verbs {
                let pair = (verb.clone(), resource.clone());
                if !unused_ok.contains(&(verb.as_str(), resource.as_str())) {
                    assert!(
                        used.contains(&pair),
                        "deploy/{files:?} grants {pair:?}, unused"
                    );
                }
            }
        }
    }
}
