//! Drift: map entries that no longer hold what the reconciler wrote (a lost
//! write, `bpftool` or another tool editing the pinned maps). The periodic
//! resync compares the service entries and backends with what was written;
//! a frontend that differs is marked so that the next apply rewrites it
//! completely (backends, every Maglev slot, the service entry), and a
//! service entry no frontend owns is removed.
//!
//! Not compared: the Maglev slots (a table per frontend; rewritten with the
//! frontend when anything else of it drifts) and the source-range trie (a
//! missing range denies its sources: the service fails closed).

use std::collections::HashSet;

use anyhow::Result;
use lb_common::FrontendKey;

use super::{MapWriter, Reconciler, frontend_key};

/// The reads a drift check needs, beside the writes that repair it.
pub trait MapReader: MapWriter {
    fn service(&self, key: &FrontendKey) -> Result<Option<lb_common::Service>>;
    fn service_keys(&self) -> Result<Vec<FrontendKey>>;
    fn backend(&self, id: u32) -> Result<Option<lb_common::Backend>>;
}

/// What a drift check found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drift {
    /// Frontends due a complete rewrite by the next apply.
    pub rewrite: usize,
    /// Service entries no frontend owns, removed.
    pub strays_removed: usize,
}

impl Reconciler {
    /// Compares the maps with what was written; see the module.
    pub fn repair_drift(&mut self, maps: &mut dyn MapReader) -> Result<Drift> {
        let mut drift = Drift::default();
        let mut known = HashSet::new();
        for (frontend, p) in self.programmed.iter_mut() {
            let key = frontend_key(frontend)?;
            known.insert(key);
            // Already due a rewrite (adopted, or its last write failed).
            if p.spec.is_none() {
                continue;
            }
            let mut intact = maps.service(&key)? == p.service_value;
            for (id, value) in p.backends.written() {
                intact = intact && maps.backend(id)?.as_ref() == Some(value);
            }
            if !intact {
                p.spec = None;
                p.table_written = false;
                p.service_value = None;
                p.backends.forget_values();
                drift.rewrite += 1;
            }
        }
        for key in maps.service_keys()? {
            if !known.contains(&key) {
                maps.delete_service(&key)?;
                drift.strays_removed += 1;
            }
        }
        if drift.rewrite > 0 {
            self.names_version += 1;
        }
        Ok(drift)
    }
}
