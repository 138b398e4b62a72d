//! Diff the programmed state against a new `DesiredState` and write only
//! what changed, in an order that never lets a packet see a dangling
//! reference: backends first, then Maglev slots, then the service entry;
//! removals in reverse (service entry, then slots' old backends).
//!
//! Maglev tables are updated in place, slot by slot, rather than
//! double-buffered: a new flow reads exactly one slot, each slot write is an
//! atomic u32 store (through the agent's mmap of the array, all of a
//! frontend's changed slots in one [`MapWriter::put_maglev_slots`], before
//! its service entry), and a backend leaves `BACKENDS` only after no slot
//! points at it, so every read sees either the old or the new backend, both
//! valid. That keeps one table per service (`table_id == service_id`) and
//! writes only the ~M/N slots a change moves.
//!
//! A removed frontend leaves a tombstone for a grace period (audit A-15):
//! its map entries go at once, so no new flow reaches it, but its service
//! id and backend ids stay reserved and count as active for the flow
//! sweeper. A frontend that comes back within the grace (a bad edit fixed,
//! an IPAM or a manifest rewrite in flight, `kubectl replace --force`)
//! gets its old ids again, so its established flows live on; only when the
//! grace ends are the ids freed and the flows swept.
//!
//! Pure: map writes go through [`MapWriter`], so this is unit-tested without
//! root.

mod drift;
mod ids;
#[cfg(test)]
mod tests;
mod writer;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::IpAddr,
    time::Instant,
};

use anyhow::{Result, anyhow};
use lb_common::{FrontendKey, MAGLEV_TABLE_SIZE, SERVICE_F_SOURCE_RANGES};

use self::{ids::IdPool, writer::Counting};
// The encoding lived here first; callers outside the crate import it from here.
pub use crate::encode::{frontend_from_key, frontend_key};
use crate::{
    encode::{
        backend_from_value, backend_value, service_value, source_range_from_key, source_range_key,
    },
    maglev,
    model::{Backend, DesiredState, Frontend, FrontendSpec, SourceRange},
};
pub use drift::{Drift, MapReader};
pub use writer::MapWriter;

/// What is in the maps for one frontend.
#[derive(Clone, Debug)]
struct Programmed {
    /// `None` for an entry adopted from pinned maps: its spec is unknown, so
    /// the next apply rewrites it completely (same ids).
    spec: Option<FrontendSpec>,
    service_id: u32,
    /// Its backends' ids and what was written for them.
    backends: ProgrammedBackends,
    /// Whether the Maglev slots hold `spec`'s table. The table itself is not
    /// kept (4 KiB per frontend): it is recomputed from the spec when a
    /// change needs to know which slots move.
    table_written: bool,
    service_value: Option<lb_common::Service>,
    source_ranges: BTreeSet<SourceRange>,
}

/// More frontends than this added by one apply: its map is rebuilt
/// ([`compact`]).
const COMPACT_AFTER: usize = 1024;

/// A B-tree map built again from its sorted entries. Entries inserted one by
/// one in key order leave every node half full (a node splits in the middle
/// and the left half is never filled again); built from a sorted run, the
/// nodes are full: about a third less memory for the reconciler's and the
/// translator's maps at 20 000 frontends (issue 11).
pub fn compact<K: Ord, V>(map: BTreeMap<K, V>) -> BTreeMap<K, V> {
    map.into_iter().collect()
}

/// What one apply did, for logs and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplySummary {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub unchanged: usize,
    pub map_writes: usize,
    pub errors: Vec<String>,
    /// The Services of the frontends whose writes failed, with the error:
    /// what the node reports as Events.
    pub failed: Vec<(crate::model::ServiceRef, String)>,
}

/// An entry found in the pinned maps at start-up.
pub struct AdoptedService {
    pub key: FrontendKey,
    pub value: lb_common::Service,
}

/// What a previous agent left in the pinned maps.
#[derive(Default)]
pub struct Adoption {
    pub services: Vec<AdoptedService>,
    pub backends: Vec<(u32, lb_common::Backend)>,
    /// Trie keys with their prefix lengths.
    pub source_ranges: Vec<(lb_common::SourceRange, u32)>,
}

pub struct Reconciler {
    programmed: BTreeMap<Frontend, Programmed>,
    /// Frontends removed lately, with when: nothing of them is in the maps
    /// any more, but their ids are kept (see the module).
    removed: BTreeMap<Frontend, (Instant, Programmed)>,
    service_id_pool: IdPool,
    backend_id_pool: IdPool,
    /// Bumped whenever what [`Reconciler::programmed`] names changes (a
    /// frontend added or removed, or its Service, policy, affinity or
    /// source ranges); backend changes leave it alone.
    names_version: u64,
}

/// One backend of a programmed frontend: its id, and the value written for
/// it (`None` until written, or after drift was found).
#[derive(Clone, Debug)]
struct ProgrammedBackend {
    addr: IpAddr,
    port: u16,
    id: u32,
    value: Option<lb_common::Backend>,
}

/// A frontend's backends, sorted by address and port: a few entries each,
/// so one exactly sized vector (two B-tree maps cost ~600 bytes a frontend,
/// 12 MiB at 20 000 frontends; issue 11).
#[derive(Clone, Debug, Default)]
struct ProgrammedBackends(Vec<ProgrammedBackend>);

impl ProgrammedBackends {
    fn find(&self, addr: IpAddr, port: u16) -> Result<usize, usize> {
        self.0
            .binary_search_by(|b| (b.addr, b.port).cmp(&(addr, port)))
    }

    fn id_of(&self, addr: IpAddr, port: u16) -> Option<u32> {
        self.find(addr, port).ok().map(|i| self.0[i].id)
    }

    /// Records `id` (and what was written for it) for `addr:port`.
    fn insert(&mut self, addr: IpAddr, port: u16, id: u32, value: Option<lb_common::Backend>) {
        let entry = ProgrammedBackend {
            addr,
            port,
            id,
            value,
        };
        match self.find(addr, port) {
            Ok(i) => self.0[i] = entry,
            Err(i) => {
                self.0.insert(i, entry);
                self.0.shrink_to_fit();
            }
        }
    }

    fn value_of(&self, addr: IpAddr, port: u16) -> Option<&lb_common::Backend> {
        self.find(addr, port)
            .ok()
            .and_then(|i| self.0[i].value.as_ref())
    }

    fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().map(|b| b.id)
    }

    /// `(id, value)` of each backend written.
    fn written(&self) -> impl Iterator<Item = (u32, &lb_common::Backend)> + '_ {
        self.0
            .iter()
            .filter_map(|b| b.value.as_ref().map(|v| (b.id, v)))
    }

    fn forget_values(&mut self) {
        for b in &mut self.0 {
            b.value = None;
        }
    }

    fn remove_id(&mut self, id: u32) {
        self.0.retain(|b| b.id != id);
        self.0.shrink_to_fit();
    }
}

/// The Maglev table (slot → backend id) for `backends`, whose ids are in
/// `ids`. Empty when there is no backend.
fn maglev_table(backends: &[Backend], ids: &ProgrammedBackends) -> Vec<u32> {
    let identities: Vec<Vec<u8>> = backends.iter().map(maglev_identity).collect();
    let refs: Vec<&[u8]> = identities.iter().map(|v| v.as_slice()).collect();
    // The id of each backend once, not one lookup per slot.
    let id_of: Vec<u32> = backends
        .iter()
        .map(|b| ids.id_of(b.addr, b.port).expect("every backend has an id"))
        .collect();
    maglev::populate(&refs, MAGLEV_TABLE_SIZE)
        .into_iter()
        .map(|i| id_of[i as usize])
        .collect()
}

/// Stable identity of a backend for Maglev: address octets and port.
fn maglev_identity(b: &Backend) -> Vec<u8> {
    let mut v = match b.addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    v.extend_from_slice(&b.port.to_be_bytes());
    v
}

impl Reconciler {
    pub fn new(max_services: u32, max_backends: u32) -> Self {
        Self {
            programmed: BTreeMap::new(),
            removed: BTreeMap::new(),
            service_id_pool: IdPool::services(max_services),
            backend_id_pool: IdPool::backends(max_backends),
            names_version: 0,
        }
    }

    /// See the field: a caller that publishes names (the state file) needs
    /// to do so only when this moved.
    pub fn names_version(&self) -> u64 {
        self.names_version
    }

    /// Takes over what a previous agent left in the pinned maps: service ids
    /// and backend ids are kept (so affinity pins and counters survive); every
    /// adopted frontend is rewritten on the next apply.
    pub fn adopt(&mut self, found: Adoption) {
        let Adoption {
            services,
            backends,
            source_ranges,
        } = found;
        let mut by_service: BTreeMap<u32, Programmed> = BTreeMap::new();
        let mut frontends: BTreeMap<u32, Frontend> = BTreeMap::new();
        for s in services {
            let Some(frontend) = frontend_from_key(&s.key) else {
                continue;
            };
            self.service_id_pool.adopt(s.value.service_id);
            frontends.insert(s.value.service_id, frontend);
            let mut p = Programmed::empty(s.value.service_id);
            p.service_value = Some(s.value);
            by_service.insert(s.value.service_id, p);
        }
        for (id, value) in backends {
            self.backend_id_pool.adopt(id);
            if let Some(p) = by_service.get_mut(&value.service_id) {
                let backend = backend_from_value(&value);
                p.backends
                    .insert(backend.addr, backend.port, id, Some(value));
            }
        }
        for (key, prefix_len) in source_ranges {
            let (service_id, range) = source_range_from_key(&key, prefix_len);
            if let Some(p) = by_service.get_mut(&service_id) {
                p.source_ranges.insert(range);
            }
        }
        for (id, p) in by_service {
            if let Some(f) = frontends.remove(&id) {
                self.programmed.insert(f, p);
            }
        }
    }

    /// Service ids in use (for the flow sweeper), tombstones' included.
    pub fn active_service_ids(&self) -> HashSet<u32> {
        self.programmed
            .values()
            .chain(self.removed.values().map(|(_, p)| p))
            .map(|p| p.service_id)
            .collect()
    }

    /// The service id a frontend has, programmed or tombstoned.
    pub fn service_id(&self, frontend: &Frontend) -> Option<u32> {
        self.programmed
            .get(frontend)
            .or_else(|| self.removed.get(frontend).map(|(_, p)| p))
            .map(|p| p.service_id)
    }

    /// Ends the tombstones of frontends removed before `removed_before`:
    /// their ids are freed, and the next sweep deletes their flows. Returns
    /// how many ended.
    pub fn forget_removed(&mut self, removed_before: Instant) -> usize {
        let ended: Vec<Frontend> = self
            .removed
            .iter()
            .filter(|(_, (at, _))| *at < removed_before)
            .map(|(f, _)| *f)
            .collect();
        for frontend in &ended {
            self.forget(frontend);
        }
        ended.len()
    }

    /// Frees the ids of one tombstone.
    fn forget(&mut self, frontend: &Frontend) {
        if let Some((_, p)) = self.removed.remove(frontend) {
            for id in p.backends.ids() {
                self.backend_id_pool.release(id);
            }
            self.service_id_pool.release(p.service_id);
        }
    }

    /// A service id for a new frontend; when every id is taken, the oldest
    /// tombstone gives its own up first.
    fn allocate_service_id(&mut self) -> Result<u32> {
        loop {
            if let Ok(id) = self.service_id_pool.allocate() {
                return Ok(id);
            }
            let oldest = self
                .removed
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(f, _)| *f)
                .ok_or_else(|| anyhow!("service table full (see --max-services)"))?;
            self.forget(&oldest);
        }
    }

    /// Backend ids in use (for the flow sweeper).
    pub fn active_backend_ids(&self) -> HashSet<u32> {
        self.backend_id_pool.in_use().clone()
    }

    /// `(service id, frontend, spec)` of every programmed frontend.
    /// Is `frontend` in the maps, whole, as last asked? Not while its
    /// writes fail (a full map, a kernel error) until a retry succeeds:
    /// the node must not attract its traffic meanwhile (BGP, L2).
    pub fn is_programmed(&self, frontend: &Frontend) -> bool {
        self.programmed
            .get(frontend)
            .is_some_and(|p| p.spec.is_some())
    }

    pub fn programmed(&self) -> impl Iterator<Item = (u32, &Frontend, Option<&FrontendSpec>)> {
        self.programmed
            .iter()
            .map(|(f, p)| (p.service_id, f, p.spec.as_ref()))
    }

    pub fn apply(&mut self, desired: &DesiredState, w: &mut dyn MapWriter) -> ApplySummary {
        let mut summary = ApplySummary::default();
        let mut counting = Counting::new(w);
        let removed: Vec<Frontend> = self
            .programmed
            .keys()
            .filter(|f| !desired.frontends.contains_key(f))
            .copied()
            .collect();
        for frontend in removed {
            self.remove_one(&frontend, &mut counting, &mut summary);
        }
        for (frontend, spec) in &desired.frontends {
            self.apply_one(frontend, spec, &mut counting, &mut summary);
        }
        if summary.added > COMPACT_AFTER {
            self.programmed = compact(std::mem::take(&mut self.programmed));
        }
        summary.map_writes = counting.writes;
        summary
    }

    /// Like [`Reconciler::apply`], but looks only at `changed`: each listed
    /// frontend is programmed as `desired` has it, or removed if `desired`
    /// lacks it. For sources that know what changed (a watch event), so a
    /// change costs O(changed), not a diff over every frontend.
    pub fn apply_changed(
        &mut self,
        desired: &DesiredState,
        changed: &BTreeSet<Frontend>,
        w: &mut dyn MapWriter,
    ) -> ApplySummary {
        let mut summary = ApplySummary::default();
        let mut counting = Counting::new(w);
        for frontend in changed {
            match desired.frontends.get(frontend) {
                Some(spec) => self.apply_one(frontend, spec, &mut counting, &mut summary),
                None if self.programmed.contains_key(frontend) => {
                    self.remove_one(frontend, &mut counting, &mut summary)
                }
                None => {}
            }
        }
        summary.map_writes = counting.writes;
        summary
    }

    fn apply_one(
        &mut self,
        frontend: &Frontend,
        spec: &FrontendSpec,
        w: &mut dyn MapWriter,
        summary: &mut ApplySummary,
    ) {
        let existing = self.programmed.get(frontend);
        if existing.is_some_and(|p| p.spec.as_ref() == Some(spec) && p.table_written) {
            summary.unchanged += 1;
            return;
        }
        let is_new = existing.is_none();
        match self.program_frontend(frontend, spec, w) {
            Ok(()) if is_new => summary.added += 1,
            Ok(()) => summary.updated += 1,
            Err(e) => {
                summary
                    .errors
                    .push(format!("programming {frontend} ({}): {e:#}", spec.service));
                summary.failed.push((
                    spec.service.clone(),
                    format!("programming frontend {frontend} failed: {e:#}"),
                ));
            }
        }
    }

    fn remove_one(
        &mut self,
        frontend: &Frontend,
        w: &mut dyn MapWriter,
        summary: &mut ApplySummary,
    ) {
        match self.remove_frontend(frontend, w) {
            Ok(()) => summary.removed += 1,
            Err(e) => summary.errors.push(format!("removing {frontend}: {e:#}")),
        }
    }

    fn program_frontend(
        &mut self,
        frontend: &Frontend,
        spec: &FrontendSpec,
        w: &mut dyn MapWriter,
    ) -> Result<()> {
        let key = frontend_key(frontend)?;
        let existing = self
            .programmed
            .remove(frontend)
            .or_else(|| self.removed.remove(frontend).map(|(_, p)| p));
        let mut p = match existing {
            Some(p) => p,
            None => {
                let service_id = self.allocate_service_id()?;
                w.reset_stats(service_id)?;
                Programmed::empty(service_id)
            }
        };
        if p.names_change(spec) {
            self.names_version += 1;
        }
        let result = self.write_frontend(&key, spec, &mut p, w);
        if result.is_err() {
            // Retry everything next time.
            p.spec = None;
            p.table_written = false;
        }
        self.programmed.insert(*frontend, p);
        result
    }

    /// Backends first, then Maglev slots, then the service entry, then the
    /// backends no slot points at any more: a packet never meets an id
    /// that is not (yet, or any more) in `BACKENDS`.
    fn write_frontend(
        &mut self,
        key: &FrontendKey,
        spec: &FrontendSpec,
        p: &mut Programmed,
        w: &mut dyn MapWriter,
    ) -> Result<()> {
        let old_table = p.written_table();
        let wanted = p.write_backends(spec, &mut self.backend_id_pool, w)?;
        p.write_maglev_slots(&old_table, spec, w)?;
        p.write_service_entry(key, spec, w)?;
        p.drop_stale_backends(&wanted, &mut self.backend_id_pool, w)?;
        p.spec = Some(spec.clone());
        Ok(())
    }

    /// The write order reversed: the service entry first, so no new flow
    /// reaches the ranges and backends going away. The ids stay with a
    /// tombstone (see the module).
    fn remove_frontend(&mut self, frontend: &Frontend, w: &mut dyn MapWriter) -> Result<()> {
        let Some(p) = self.programmed.get(frontend) else {
            return Ok(());
        };
        let key = frontend_key(frontend)?;
        w.delete_service(&key)?;
        for r in &p.source_ranges {
            let (k, len) = source_range_key(p.service_id, r)?;
            w.delete_source_range(&k, len)?;
        }
        for id in p.backends.ids() {
            w.delete_backend(id)?;
        }
        let Some(p) = self.programmed.remove(frontend) else {
            return Ok(());
        };
        self.names_version += 1;
        // Nothing of it is in the maps now; a comeback rewrites it all with
        // the same ids.
        let mut backends = p.backends;
        backends.forget_values();
        let tombstone = Programmed {
            backends,
            ..Programmed::empty(p.service_id)
        };
        self.removed.insert(*frontend, (Instant::now(), tombstone));
        Ok(())
    }
}

impl Programmed {
    /// Nothing written yet for `service_id`.
    fn empty(service_id: u32) -> Self {
        Self {
            spec: None,
            service_id,
            backends: ProgrammedBackends::default(),
            table_written: false,
            service_value: None,
            source_ranges: BTreeSet::new(),
        }
    }

    /// Whether `spec` changes what the state file names: the Service,
    /// policy, affinity or source ranges (not the backends).
    fn names_change(&self, spec: &FrontendSpec) -> bool {
        self.spec.as_ref().is_none_or(|old| {
            (
                &old.service,
                old.local_only,
                old.affinity_timeout,
                &old.source_ranges,
            ) != (
                &spec.service,
                spec.local_only,
                spec.affinity_timeout,
                &spec.source_ranges,
            )
        })
    }

    /// What the slots hold now (before any backend id is added or removed):
    /// unknown after adoption or a failed write, then every slot is written.
    fn written_table(&self) -> Vec<u32> {
        match (&self.spec, self.table_written) {
            (Some(old), true) => maglev_table(&old.backends, &self.backends),
            _ => Vec::new(),
        }
    }

    /// New backends and changed flags; returns the ids of `spec`'s backends.
    fn write_backends(
        &mut self,
        spec: &FrontendSpec,
        pool: &mut IdPool,
        w: &mut dyn MapWriter,
    ) -> Result<BTreeSet<u32>> {
        let mut wanted = BTreeSet::new();
        for b in &spec.backends {
            let id = match self.backends.id_of(b.addr, b.port) {
                Some(id) => id,
                None => {
                    let id = pool.allocate().map_err(|e| {
                        anyhow!(
                            "backend table full ({} backends, see --max-backends)",
                            e.capacity
                        )
                    })?;
                    self.backends.insert(b.addr, b.port, id, None);
                    id
                }
            };
            let value = backend_value(b, self.service_id)?;
            if self.backends.value_of(b.addr, b.port) != Some(&value) {
                w.put_backend(id, &value)?;
                self.backends.insert(b.addr, b.port, id, Some(value));
            }
            wanted.insert(id);
        }
        Ok(wanted)
    }

    /// The Maglev slots that differ from `old_table`.
    fn write_maglev_slots(
        &mut self,
        old_table: &[u32],
        spec: &FrontendSpec,
        w: &mut dyn MapWriter,
    ) -> Result<()> {
        let new_table = maglev_table(&spec.backends, &self.backends);
        let base = self.service_id * MAGLEV_TABLE_SIZE;
        let changed: Vec<(u32, u32)> = new_table
            .iter()
            .enumerate()
            .filter(|(slot, backend_id)| old_table.get(*slot) != Some(*backend_id))
            .map(|(slot, backend_id)| (base + slot as u32, *backend_id))
            .collect();
        // One call per table: the dataplane writes the slots through its
        // mmap of the array (see `dataplane::mmap`), not a syscall each.
        if !changed.is_empty() {
            w.put_maglev_slots(&changed)?;
        }
        // With no backend the service entry says so (count 0) and new flows
        // are dropped; the slots are left as they are.
        self.table_written = true;
        Ok(())
    }

    /// Source ranges to add, then the service entry, then ranges to remove:
    /// a range is never missing while the service relies on it. If a range
    /// cannot be written (the trie is shared by every Service and may be
    /// full), the frontend is closed instead (see [`Programmed::close`]).
    fn write_service_entry(
        &mut self,
        key: &FrontendKey,
        spec: &FrontendSpec,
        w: &mut dyn MapWriter,
    ) -> Result<()> {
        let new_ranges: BTreeSet<SourceRange> = spec.source_ranges.iter().copied().collect();
        let to_add: Vec<SourceRange> = new_ranges
            .difference(&self.source_ranges)
            .copied()
            .collect();
        for r in to_add {
            let written = source_range_key(self.service_id, &r)
                .and_then(|(k, len)| w.put_source_range(&k, len));
            if let Err(e) = written {
                self.close(key, spec, w);
                return Err(e.context(
                    "writing the source ranges failed; the frontend denies every source until they are written",
                ));
            }
            self.source_ranges.insert(r);
        }
        let value = service_value(self.service_id, spec);
        if self.service_value != Some(value) {
            w.put_service(key, &value)?;
            self.service_value = Some(value);
        }
        let to_remove: Vec<SourceRange> = self
            .source_ranges
            .difference(&new_ranges)
            .copied()
            .collect();
        for r in to_remove {
            let (k, len) = source_range_key(self.service_id, &r)?;
            w.delete_source_range(&k, len)?;
            self.source_ranges.remove(&r);
        }
        Ok(())
    }

    /// Fails closed (audit A-13): the service entry gets the source-range
    /// flag, then every range of the service leaves the trie, so no source
    /// matches and every new flow is dropped. Leaving it as it was would keep
    /// a frontend that had no ranges open to all, or one being narrowed open
    /// to a mix of old and new ranges. Established flows keep running, as
    /// after any narrowing. Best effort: if even the entry cannot be written
    /// it is deleted, which also stops new flows.
    fn close(&mut self, key: &FrontendKey, spec: &FrontendSpec, w: &mut dyn MapWriter) {
        let mut closed = service_value(self.service_id, spec);
        closed.flags |= SERVICE_F_SOURCE_RANGES;
        if self.service_value != Some(closed) {
            match w.put_service(key, &closed) {
                Ok(()) => self.service_value = Some(closed),
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), service_id = self.service_id,
                        "closing a frontend failed; deleting its service entry");
                    if w.delete_service(key).is_ok() {
                        self.service_value = None;
                    }
                }
            }
        }
        let written: Vec<SourceRange> = self.source_ranges.iter().copied().collect();
        for r in written {
            let deleted = source_range_key(self.service_id, &r)
                .and_then(|(k, len)| w.delete_source_range(&k, len));
            match deleted {
                Ok(()) => {
                    self.source_ranges.remove(&r);
                }
                Err(e) => tracing::error!(error = %format!("{e:#}"),
                    service_id = self.service_id, "removing a source range of a closed frontend failed"),
            }
        }
    }

    /// Backends not in `wanted`: no slot points at them any more.
    fn drop_stale_backends(
        &mut self,
        wanted: &BTreeSet<u32>,
        pool: &mut IdPool,
        w: &mut dyn MapWriter,
    ) -> Result<()> {
        let stale: Vec<u32> = self
            .backends
            .ids()
            .filter(|id| !wanted.contains(id))
            .collect();
        for id in stale {
            w.delete_backend(id)?;
            self.backends.remove_id(id);
            pool.release(id);
        }
        Ok(())
    }
}
