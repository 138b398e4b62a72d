//! xlb agent library: a source → `DesiredState` → reconciler → BPF maps.
//!
//! Pure modules, tested without root or a cluster, use neither aya nor a
//! Kubernetes client: `model`, `maglev`, `translate` (Kubernetes objects →
//! `DesiredState`), `encode` (the map contract's encoding), `reconcile`,
//! `conntrack`, `change`, `flags`, `pools` (address pools: the
//! allocator). The edges with side effects: `manifest`
//! (reads a directory), `kubernetes` (watches, Lease, Events, Service
//! status), `dataplane` and `netdev` (the kernel), `state_file`, and
//! `agent`, which wires them together.

pub mod agent;
pub mod announce;
pub mod change;
pub mod conntrack;
pub mod dataplane;
pub mod egress_guard;
pub mod encode;
pub mod flags;
pub mod inspect;
pub mod kubernetes;
pub mod maglev;
pub mod manifest;
pub mod model;
pub mod netdev;
pub mod pools;
pub mod reconcile;
pub mod state_file;
pub mod telemetry;
pub mod translate;

/// The CustomResourceDefinitions of xlb's own resources (`xlb crd`,
/// `deploy/crds.yaml`): `AddressPool` (pool address mode) and `BGPPeer`.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    Ok(format!(
        "{}---\n{}",
        pools::crd_yaml()?,
        announce::bgp::peer::crd_yaml()?
    ))
}
