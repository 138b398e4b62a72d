//! The `AddressPool` custom resource (`xlb.dev/v1alpha1`, cluster-scoped):
//! the addresses xlb may hand to LoadBalancer Services in `--address-mode
//! pool`, who may have them, and how they are announced. `deploy/crds.yaml`
//! is generated from these types (`xlb crd`), so the schema the API server
//! validates and the type the agent reads cannot drift apart.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Addresses for LoadBalancer Services, of either family.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "xlb.dev",
    version = "v1alpha1",
    kind = "AddressPool",
    plural = "addresspools",
    shortname = "xpool",
    status = "AddressPoolStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Auto","type":"boolean","jsonPath":".spec.autoAssign"}"#,
    printcolumn = r#"{"name":"Priority","type":"integer","jsonPath":".spec.priority"}"#,
    printcolumn = r#"{"name":"IPv4 used","type":"integer","jsonPath":".status.assignedIPv4"}"#,
    printcolumn = r#"{"name":"IPv4 free","type":"integer","jsonPath":".status.availableIPv4"}"#,
    printcolumn = r#"{"name":"IPv6 used","type":"integer","jsonPath":".status.assignedIPv6"}"#,
    printcolumn = r#"{"name":"IPv6 free","type":"integer","jsonPath":".status.availableIPv6"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AddressPoolSpec {
    /// CIDRs (`192.0.2.0/28`, `2001:db8::/120`) and inclusive ranges
    /// (`192.0.2.10-192.0.2.20`) of either family. One invalid entry, or
    /// one address also in another pool, keeps the whole pool out of use.
    pub addresses: Vec<String>,
    /// Hand addresses of this pool to Services that name no address and no
    /// pool. False: only Services that ask for this pool (annotation
    /// `xlb.dev/address-pool`) or for one of its addresses get them.
    #[serde(default = "default_true")]
    pub auto_assign: bool,
    /// Never hand out IPv4 addresses ending in `.0` or `.255`, which some
    /// old clients and routers treat as broadcast addresses.
    #[serde(default, rename = "avoidBuggyIPs")]
    pub avoid_buggy_ips: bool,
    /// Pools are tried lowest priority first; pools without one come after
    /// every pool with one, then by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Which Services may get addresses of this pool; none: every Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<PoolScope>,
    /// Layer 2 announcement (ARP/NDP) of this pool's addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l2: Option<L2Announcement>,
    /// What the BGP routes of this pool's addresses carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<BgpAdvertisement>,
}

/// Path attributes of the routes of a pool's addresses.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BgpAdvertisement {
    /// BGP communities (RFC 1997) on every route: `ASN:value` (each 0 to
    /// 65535) or `no-export`, `no-advertise`, `no-export-subconfed`,
    /// `no-peer`. One invalid entry keeps the pool out of use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<String>,
    /// LOCAL_PREF sent to iBGP peers (default 100); eBGP peers never get
    /// one (RFC 4271).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_preference: Option<u32>,
    /// Announce the IPv4 prefix of this length that holds each address
    /// (e.g. 24: one /24 for all the pool's addresses in it) instead of
    /// host routes (32). With `externalTrafficPolicy: Local` a node then
    /// attracts the whole prefix as soon as it serves one address of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregation_length: Option<u8>,
    /// The same for IPv6 (default 128).
    #[serde(
        default,
        rename = "aggregationLengthV6",
        skip_serializing_if = "Option::is_none"
    )]
    pub aggregation_length_v6: Option<u8>,
}

fn default_true() -> bool {
    true
}

/// The Services a pool serves. Every part that is set must match.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolScope {
    /// Namespaces by name; empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Namespaces by label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Services by label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_selector: Option<LabelSelector>,
}

/// Which nodes answer ARP/NDP for the pool's addresses, and where.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct L2Announcement {
    /// Nodes that may announce; none: every node running xlb.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// Interfaces to announce on; empty: every uplink (`--iface`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<String>,
}

/// What the elected agent found: addresses in use and free per family
/// (saturated at 2^63 - 1 for large IPv6 pools), and whether the pool is
/// used at all (condition `Ready`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AddressPoolStatus {
    #[serde(default, rename = "assignedIPv4")]
    pub assigned_ipv4: i64,
    #[serde(default, rename = "availableIPv4")]
    pub available_ipv4: i64,
    #[serde(default, rename = "assignedIPv6")]
    pub assigned_ipv6: i64,
    #[serde(default, rename = "availableIPv6")]
    pub available_ipv6: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
