//! xlb agent library: sources → `DesiredState` → reconciler → BPF maps.
//!
//! Pure modules (`model`, `maglev`, `source`, `reconcile`, `conntrack`) use
//! neither aya nor the network; `dataplane`, `netdev` and `agent` are the
//! edges with side effects.

pub mod agent;
pub mod conntrack;
pub mod dataplane;
pub mod encode;
pub mod inspect;
pub mod maglev;
pub mod model;
pub mod netdev;
pub mod reconcile;
pub mod source;
pub mod state_file;
