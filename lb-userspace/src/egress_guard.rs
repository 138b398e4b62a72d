//! The agent's half of the reply-leak check at uplink egress
//! (`lb-ebpf/src/leak.rs`, audit A-10 part 3): which (address, port,
//! protocol) are node-local backends (`XLB_LOCAL_BACKS`), and which
//! networks are the cluster's own (`XLB_CLUSTER_NET`). A packet that
//! leaves an uplink from a local backend, matches no flow, and goes outside
//! the cluster's networks is a reply of a flow xlb no longer has; the
//! datapath drops it rather than let the pod's address out.
//!
//! A backend stays in the map for [`RETENTION`] after the last Service
//! that listed it lets it go: its flows end when their Service's removal
//! grace is over, but the pod keeps sending on them (TCP retransmits for
//! up to about 15 minutes, `tcp_retries2`), and those are exactly the
//! packets that would leak.
//!
//! Updated per changed frontend, like the reconciler: a contribution count
//! per key, so one EndpointSlice change costs the keys of its frontends.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lb_common::LocalBackendKey;

use crate::{
    encode::local_backend_key,
    model::{DesiredState, Frontend, Network},
};

/// How long a backend no Service lists any more is still guarded: TCP's
/// default retransmission limit (`net.ipv4.tcp_retries2` = 15, about 924 s)
/// with room to spare.
pub const RETENTION: Duration = Duration::from_secs(16 * 60);

/// The two maps the guard writes.
pub trait GuardMaps {
    fn put_local_backend(&mut self, key: &LocalBackendKey) -> Result<()>;
    fn delete_local_backend(&mut self, key: &LocalBackendKey) -> Result<()>;
    fn local_backends(&self) -> Result<Vec<LocalBackendKey>>;
    fn put_cluster_network(&mut self, network: &Network) -> Result<()>;
    fn delete_cluster_network(&mut self, network: &Network) -> Result<()>;
    fn cluster_networks(&self) -> Result<Vec<Network>>;
}

/// What the guard has written, and why.
#[derive(Debug, Default)]
pub struct EgressGuard {
    /// `--cluster-cidr`: networks the Node objects may not name (the
    /// manifest source has none, and a cluster CIDR covers nodes to come).
    configured: BTreeSet<Network>,
    /// The keys each frontend's local backends make.
    by_frontend: HashMap<Frontend, Vec<LocalBackendKey>>,
    /// How many frontends list each key.
    users: HashMap<LocalBackendKey, usize>,
    /// Keys no frontend lists any more, since when.
    leaving: HashMap<LocalBackendKey, Instant>,
    /// Keys in the map (listed or leaving).
    written: HashSet<LocalBackendKey>,
    networks: BTreeSet<Network>,
}

impl EgressGuard {
    pub fn new(configured: impl IntoIterator<Item = Network>) -> Self {
        Self {
            configured: configured.into_iter().collect(),
            ..Self::default()
        }
    }

    /// Takes over what a previous agent left in the maps: its backends
    /// count as leaving from `now` (the first apply keeps those still
    /// listed), its networks as written (the first apply removes stale
    /// ones).
    pub fn adopt(&mut self, maps: &dyn GuardMaps, now: Instant) -> Result<()> {
        for key in maps.local_backends()? {
            self.written.insert(key);
            self.leaving.insert(key, now);
        }
        self.networks.extend(maps.cluster_networks()?);
        Ok(())
    }

    /// Brings the maps in line with `desired`: only the frontends in
    /// `changed` are looked at (all when `None`).
    pub fn apply(
        &mut self,
        desired: &DesiredState,
        changed: Option<&BTreeSet<Frontend>>,
        maps: &mut dyn GuardMaps,
        now: Instant,
    ) -> Result<()> {
        let frontends: Vec<Frontend> = match changed {
            Some(changed) => changed.iter().copied().collect(),
            None => self
                .by_frontend
                .keys()
                .chain(desired.frontends.keys())
                .copied()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
        };
        for frontend in frontends {
            let keys: Vec<LocalBackendKey> = desired
                .frontends
                .get(&frontend)
                .into_iter()
                .flat_map(|spec| spec.backends.iter().filter(|b| b.local))
                // An address the datapath cannot hold is not programmed
                // by the reconciler either (it reports it).
                .filter_map(|b| local_backend_key(b, frontend.protocol).ok())
                .collect();
            // Written first, counted once all are: a failed write leaves
            // the counts as they were (and the keys written so far leaving,
            // so they expire unless a retry counts them).
            for key in &keys {
                self.write(*key, maps, now)?;
            }
            for key in &keys {
                *self.users.entry(*key).or_default() += 1;
                self.leaving.remove(key);
            }
            let old = match keys.is_empty() {
                true => self.by_frontend.remove(&frontend),
                false => self.by_frontend.insert(frontend, keys),
            };
            for key in old.unwrap_or_default() {
                self.release(key, now);
            }
        }
        let wanted: BTreeSet<Network> = desired
            .cluster_networks
            .iter()
            .chain(&self.configured)
            .copied()
            .collect();
        for network in wanted.difference(&self.networks) {
            maps.put_cluster_network(network)
                .with_context(|| format!("adding cluster network {network}"))?;
        }
        for network in self.networks.difference(&wanted) {
            maps.delete_cluster_network(network)
                .with_context(|| format!("removing cluster network {network}"))?;
        }
        self.networks = wanted;
        Ok(())
    }

    /// Removes the keys that left their last frontend more than
    /// `retention` before `now`. Returns how many.
    pub fn expire(
        &mut self,
        maps: &mut dyn GuardMaps,
        now: Instant,
        retention: Duration,
    ) -> Result<usize> {
        let due: Vec<LocalBackendKey> = self
            .leaving
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) >= retention)
            .map(|(key, _)| *key)
            .collect();
        for key in &due {
            maps.delete_local_backend(key)
                .context("removing a retired local backend")?;
            self.leaving.remove(key);
            self.written.remove(key);
        }
        Ok(due.len())
    }

    /// Keys in the map: listed and leaving.
    pub fn guarded(&self) -> usize {
        self.written.len()
    }

    fn write(
        &mut self,
        key: LocalBackendKey,
        maps: &mut dyn GuardMaps,
        now: Instant,
    ) -> Result<()> {
        if !self.written.contains(&key) {
            maps.put_local_backend(&key)
                .context("adding a local backend")?;
            self.written.insert(key);
            self.leaving.insert(key, now);
        }
        Ok(())
    }

    fn release(&mut self, key: LocalBackendKey, now: Instant) {
        let Some(count) = self.users.get_mut(&key) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            self.users.remove(&key);
            self.leaving.insert(key, now);
        }
    }
}

#[cfg(test)]
mod tests;
