//! The resources the fake serves and the discovery documents (`/version`,
//! `/api`, `/apis/...`) kube-rs reads to find them.

use serde_json::{Map, Value, json};

use super::{patch::merge_patch, status::ApiError};

/// A resource the fake serves, with the registry-strategy facts that change
/// what a client observes.
pub(crate) struct ResourceType {
    pub(crate) group: &'static str,
    pub(crate) version: &'static str,
    pub(crate) plural: &'static str,
    pub(crate) kind: &'static str,
    pub(crate) namespaced: bool,
    /// Has a `/status` subresource: writes to the main resource keep the
    /// stored `.status` and `/status` writes change nothing else.
    pub(crate) status_subresource: bool,
    /// PUT of a missing object creates it (`AllowCreateOnUpdate`).
    pub(crate) create_on_update: bool,
    /// `metadata.generation` starts at 1 and grows when anything outside
    /// metadata and status changes.
    pub(crate) tracks_generation: bool,
}

pub(crate) const RESOURCE_TYPES: &[ResourceType] = &[
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
        group: "",
        version: "v1",
        plural: "secrets",
        kind: "Secret",
        namespaced: true,
        status_subresource: false,
        create_on_update: false,
        tracks_generation: false,
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "namespaces",
        kind: "Namespace",
        namespaced: false,
        status_subresource: true,
        create_on_update: false,
        tracks_generation: false,
    },
    // xlb's own custom resources (deploy/crds.yaml): AddressPool is
    // cluster-scoped, with
    // the status subresource and generation tracking every CRD gets.
    ResourceType {
        group: "xlb.dev",
        version: "v1alpha1",
        plural: "addresspools",
        kind: "AddressPool",
        namespaced: false,
        status_subresource: true,
        create_on_update: false,
        tracks_generation: true,
    },
    // The namespaced one, without status.
    ResourceType {
        group: "xlb.dev",
        version: "v1alpha1",
        plural: "bgppeers",
        kind: "BGPPeer",
        namespaced: true,
        status_subresource: false,
        create_on_update: false,
        tracks_generation: true,
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
    pub(crate) fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The name kube-apiserver uses in messages: `services`,
    /// `leases.coordination.k8s.io`.
    pub(crate) fn qualified_name(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub(crate) fn status_details(&self, name: &str) -> Value {
        let mut details = Map::new();
        details.insert("name".into(), name.into());
        if !self.group.is_empty() {
            details.insert("group".into(), self.group.into());
        }
        details.insert("kind".into(), self.plural.into());
        Value::Object(details)
    }

    pub(crate) fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }
}

pub(crate) fn find_resource(group: &str, version: &str, plural: &str) -> Option<usize> {
    RESOURCE_TYPES
        .iter()
        .position(|t| t.group == group && t.version == version && t.plural == plural)
}

pub(crate) fn find_kind(api_version: &str, kind: &str) -> Option<usize> {
    RESOURCE_TYPES
        .iter()
        .position(|t| t.api_version() == api_version && t.kind == kind)
}

/// Test helpers fail loudly on a kind the fake does not serve: a typo there
/// would otherwise look like an empty cluster.
pub(crate) fn expect_kind(api_version: &str, kind: &str) -> usize {
    find_kind(api_version, kind)
        .unwrap_or_else(|| panic!("the fake API server does not serve {api_version} {kind}"))
}

pub(crate) fn version_info() -> Value {
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

pub(crate) fn group_version(group: &str, version: &str) -> Value {
    json!({"groupVersion": format!("{group}/{version}"), "version": version})
}

pub(crate) fn groups() -> Vec<&'static str> {
    let mut groups: Vec<&str> = Vec::new();
    for kind in RESOURCE_TYPES {
        if !kind.group.is_empty() && !groups.contains(&kind.group) {
            groups.push(kind.group);
        }
    }
    groups
}

pub(crate) fn api_group_body(group: &str) -> Value {
    // Each group serves one version here (v1, or v1alpha1 for xlb.dev).
    let version = RESOURCE_TYPES
        .iter()
        .find(|kind| kind.group == group)
        .map_or("v1", |kind| kind.version);
    json!({
        "name": group,
        "versions": [group_version(group, version)],
        "preferredVersion": group_version(group, version),
    })
}

pub(crate) fn api_group_list() -> Value {
    let groups: Vec<Value> = groups().into_iter().map(api_group_body).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub(crate) fn api_group(group: &str) -> Result<Value, ApiError> {
    if !groups().contains(&group) {
        return Err(ApiError::path_not_found());
    }
    let mut body = json!({"kind": "APIGroup", "apiVersion": "v1"});
    merge_patch(&mut body, &api_group_body(group));
    Ok(body)
}

pub(crate) fn api_resource_list(group: &str, version: &str) -> Result<Value, ApiError> {
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
