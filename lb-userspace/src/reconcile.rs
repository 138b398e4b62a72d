//! Diff the programmed state against a new `DesiredState` and write only
//! what changed, in an order that never lets a packet see a dangling
//! reference: backends first, then Maglev slots, then the service entry;
//! removals in reverse (service entry, then slots' old backends).
//!
//! Maglev tables are updated in place, slot by slot, rather than
//! double-buffered: a new flow reads exactly one slot, each slot write is an
//! atomic u32 store, and a backend leaves `BACKENDS` only after no slot
//! points at it, so every read sees either the old or the new backend, both
//! valid. That keeps one table per service (`table_id == service_id`) and
//! writes only the ~M/N slots a change moves.
//!
//! Pure: map writes go through [`MapWriter`], so this is unit-tested without
//! root.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet, VecDeque},
    net::IpAddr,
};

use anyhow::{Context, Result, bail};
use lb_common::{
    BACKEND_F_LOCAL, BACKEND_F_TERMINATING, Be16, Be32, FAMILY_V4, FrontendKey, MAGLEV_TABLE_SIZE,
    SERVICE_F_AFFINITY, SERVICE_F_LOCAL_ONLY, SERVICE_F_SOURCE_RANGES, SOURCE_RANGE_ID_BITS,
};

use crate::{
    maglev,
    model::{Backend, DesiredState, Frontend, FrontendSpec, Protocol, SourceRange},
};

/// The map operations the reconciler needs.
pub trait MapWriter {
    fn put_backend(&mut self, id: u32, backend: &lb_common::Backend) -> Result<()>;
    fn delete_backend(&mut self, id: u32) -> Result<()>;
    fn put_maglev_slot(&mut self, index: u32, backend_id: u32) -> Result<()>;
    fn put_service(&mut self, key: &FrontendKey, service: &lb_common::Service) -> Result<()>;
    fn delete_service(&mut self, key: &FrontendKey) -> Result<()>;
    fn put_source_range(&mut self, key: &lb_common::SourceRange, prefix_len: u32) -> Result<()>;
    fn delete_source_range(&mut self, key: &lb_common::SourceRange, prefix_len: u32) -> Result<()>;
    fn reset_stats(&mut self, service_id: u32) -> Result<()>;
}

/// What is in the maps for one frontend.
#[derive(Clone, Debug)]
struct Programmed {
    /// `None` for an entry adopted from pinned maps: its spec is unknown, so
    /// the next apply rewrites it completely (same ids).
    spec: Option<FrontendSpec>,
    service_id: u32,
    backend_ids: BTreeMap<(IpAddr, u16), u32>,
    backend_values: BTreeMap<u32, lb_common::Backend>,
    /// Whether the Maglev slots hold `spec`'s table. The table itself is not
    /// kept (4 KiB per frontend): it is recomputed from the spec when a
    /// change needs to know which slots move.
    table_written: bool,
    service_value: Option<lb_common::Service>,
    source_ranges: BTreeSet<SourceRange>,
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
    /// FIFO, so a freed id is reused as late as possible (its stale flows
    /// are swept in the meantime).
    free_service_ids: VecDeque<u32>,
    used_backend_ids: HashSet<u32>,
    next_backend_id: u32,
    max_backends: u32,
    /// Bumped whenever what [`Reconciler::programmed`] names changes (a
    /// frontend added or removed, or its Service, policy, affinity or
    /// source ranges); backend changes leave it alone.
    names_version: u64,
}

pub fn frontend_key(frontend: &Frontend) -> Result<FrontendKey> {
    let IpAddr::V4(addr) = frontend.addr else {
        bail!("frontend {frontend}: IPv6 is not supported yet");
    };
    Ok(FrontendKey {
        addr: lb_common::addr_v4(addr.octets()),
        port: Be16::from_host(frontend.port),
        proto: frontend.protocol.number(),
        family: FAMILY_V4,
    })
}

pub fn frontend_from_key(key: &FrontendKey) -> Option<Frontend> {
    if key.family != FAMILY_V4 {
        return None;
    }
    Some(Frontend {
        addr: IpAddr::from([key.addr[0], key.addr[1], key.addr[2], key.addr[3]]),
        port: key.port.host(),
        protocol: Protocol::from_number(key.proto)?,
    })
}

fn backend_value(b: &Backend, service_id: u32) -> Result<lb_common::Backend> {
    let IpAddr::V4(addr) = b.addr else {
        bail!("backend {}: IPv6 is not supported yet", b.addr);
    };
    let mut flags = 0;
    if b.local {
        flags |= BACKEND_F_LOCAL;
    }
    if b.terminating {
        flags |= BACKEND_F_TERMINATING;
    }
    Ok(lb_common::Backend {
        addr: lb_common::addr_v4(addr.octets()),
        port: Be16::from_host(b.port),
        family: FAMILY_V4,
        flags,
        service_id,
    })
}

fn source_range_key(service_id: u32, range: &SourceRange) -> Result<(lb_common::SourceRange, u32)> {
    let IpAddr::V4(addr) = range.addr else {
        bail!("source range {range}: IPv6 is not supported yet");
    };
    Ok((
        lb_common::SourceRange {
            service_id: Be32::from_host(service_id),
            addr: lb_common::addr_v4(addr.octets()),
        },
        SOURCE_RANGE_ID_BITS + range.prefix_len as u32,
    ))
}

/// The Maglev table (slot → backend id) for `backends`, whose ids are in
/// `ids`. Empty when there is no backend.
fn maglev_table(backends: &[Backend], ids: &BTreeMap<(IpAddr, u16), u32>) -> Vec<u32> {
    let identities: Vec<Vec<u8>> = backends.iter().map(maglev_identity).collect();
    let refs: Vec<&[u8]> = identities.iter().map(|v| v.as_slice()).collect();
    maglev::populate(&refs, MAGLEV_TABLE_SIZE)
        .iter()
        .map(|i| ids[&(backends[*i as usize].addr, backends[*i as usize].port)])
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
            free_service_ids: (0..max_services).collect(),
            used_backend_ids: HashSet::new(),
            next_backend_id: 1,
            max_backends,
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
            self.free_service_ids.retain(|id| *id != s.value.service_id);
            frontends.insert(s.value.service_id, frontend);
            by_service.insert(
                s.value.service_id,
                Programmed {
                    spec: None,
                    service_id: s.value.service_id,
                    backend_ids: BTreeMap::new(),
                    backend_values: BTreeMap::new(),
                    table_written: false,
                    service_value: Some(s.value),
                    source_ranges: BTreeSet::new(),
                },
            );
        }
        for (id, b) in backends {
            self.used_backend_ids.insert(id);
            self.next_backend_id = self.next_backend_id.max(id.wrapping_add(1)).max(1);
            if let Some(p) = by_service.get_mut(&b.service_id) {
                let addr = IpAddr::from([b.addr[0], b.addr[1], b.addr[2], b.addr[3]]);
                p.backend_ids.insert((addr, b.port.host()), id);
                p.backend_values.insert(id, b);
            }
        }
        for (key, prefix_len) in source_ranges {
            if let Some(p) = by_service.get_mut(&key.service_id.host()) {
                p.source_ranges.insert(SourceRange {
                    addr: IpAddr::from([key.addr[0], key.addr[1], key.addr[2], key.addr[3]]),
                    prefix_len: prefix_len.saturating_sub(SOURCE_RANGE_ID_BITS) as u8,
                });
            }
        }
        for (id, p) in by_service {
            if let Some(f) = frontends.remove(&id) {
                self.programmed.insert(f, p);
            }
        }
    }

    /// Service ids in use (for the flow sweeper).
    pub fn active_service_ids(&self) -> HashSet<u32> {
        self.programmed.values().map(|p| p.service_id).collect()
    }

    /// Backend ids in use (for the flow sweeper).
    pub fn active_backend_ids(&self) -> HashSet<u32> {
        self.used_backend_ids.clone()
    }

    /// `(service id, frontend, spec)` of every programmed frontend.
    pub fn programmed(&self) -> impl Iterator<Item = (u32, &Frontend, Option<&FrontendSpec>)> {
        self.programmed
            .iter()
            .map(|(f, p)| (p.service_id, f, p.spec.as_ref()))
    }

    pub fn apply(&mut self, desired: &DesiredState, w: &mut dyn MapWriter) -> ApplySummary {
        let mut summary = ApplySummary::default();
        let mut counting = Counting {
            inner: w,
            writes: 0,
        };
        let removed: Vec<Frontend> = self
            .programmed
            .keys()
            .filter(|f| !desired.frontends.contains_key(f))
            .copied()
            .collect();
        for frontend in removed {
            match self.remove_frontend(&frontend, &mut counting) {
                Ok(()) => summary.removed += 1,
                Err(e) => summary.errors.push(format!("removing {frontend}: {e:#}")),
            }
        }
        for (frontend, spec) in &desired.frontends {
            self.apply_one(frontend, spec, &mut counting, &mut summary);
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
        let mut counting = Counting {
            inner: w,
            writes: 0,
        };
        for frontend in changed {
            match desired.frontends.get(frontend) {
                Some(spec) => self.apply_one(frontend, spec, &mut counting, &mut summary),
                None if self.programmed.contains_key(frontend) => {
                    match self.remove_frontend(frontend, &mut counting) {
                        Ok(()) => summary.removed += 1,
                        Err(e) => summary.errors.push(format!("removing {frontend}: {e:#}")),
                    }
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
            Err(e) => summary
                .errors
                .push(format!("programming {frontend} ({}): {e:#}", spec.service)),
        }
    }

    fn allocate_backend_id(&mut self) -> Result<u32> {
        if self.used_backend_ids.len() as u64 >= self.max_backends as u64 {
            bail!(
                "backend table full ({} backends, see --max-backends)",
                self.max_backends
            );
        }
        loop {
            let id = self.next_backend_id;
            self.next_backend_id = self.next_backend_id.wrapping_add(1).max(1);
            if self.used_backend_ids.insert(id) {
                return Ok(id);
            }
        }
    }

    fn program_frontend(
        &mut self,
        frontend: &Frontend,
        spec: &FrontendSpec,
        w: &mut dyn MapWriter,
    ) -> Result<()> {
        let key = frontend_key(frontend)?;
        let mut p = match self.programmed.remove(frontend) {
            Some(p) => p,
            None => {
                let service_id = self
                    .free_service_ids
                    .pop_front()
                    .context("service table full (see --max-services)")?;
                w.reset_stats(service_id)?;
                Programmed {
                    spec: None,
                    service_id,
                    backend_ids: BTreeMap::new(),
                    backend_values: BTreeMap::new(),
                    table_written: false,
                    service_value: None,
                    source_ranges: BTreeSet::new(),
                }
            }
        };
        let renamed = p.spec.as_ref().is_none_or(|old| {
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
        });
        if renamed {
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

    fn write_frontend(
        &mut self,
        key: &FrontendKey,
        spec: &FrontendSpec,
        p: &mut Programmed,
        w: &mut dyn MapWriter,
    ) -> Result<()> {
        let service_id = p.service_id;
        // What the slots hold now (before any backend id is added or
        // removed): unknown after adoption or a failed write, then every
        // slot is written.
        let old_table = match (&p.spec, p.table_written) {
            (Some(old), true) => maglev_table(&old.backends, &p.backend_ids),
            _ => Vec::new(),
        };
        // 1. Backends: new ones and changed flags.
        let mut wanted: BTreeSet<u32> = BTreeSet::new();
        for b in &spec.backends {
            let id = match p.backend_ids.get(&(b.addr, b.port)) {
                Some(id) => *id,
                None => {
                    let id = self.allocate_backend_id()?;
                    p.backend_ids.insert((b.addr, b.port), id);
                    id
                }
            };
            let value = backend_value(b, service_id)?;
            if p.backend_values.get(&id) != Some(&value) {
                w.put_backend(id, &value)?;
                p.backend_values.insert(id, value);
            }
            wanted.insert(id);
        }
        // 2. Maglev slots that differ from what the previous spec wrote.
        let new_table = maglev_table(&spec.backends, &p.backend_ids);
        if !new_table.is_empty() {
            let base = service_id * MAGLEV_TABLE_SIZE;
            for (slot, backend_id) in new_table.iter().enumerate() {
                if old_table.get(slot) != Some(backend_id) {
                    w.put_maglev_slot(base + slot as u32, *backend_id)?;
                }
            }
        }
        // With no backend the service entry says so (count 0) and new flows
        // are dropped; the slots are left as they are.
        p.table_written = true;
        // 3. Source ranges to add, then the service entry, then ranges to
        // remove: a range is never missing while the service relies on it.
        let new_ranges: BTreeSet<SourceRange> = spec.source_ranges.iter().copied().collect();
        // IPv6 ranges cannot match the IPv4 datapath: they are not written,
        // but still count, so a list of only IPv6 ranges blocks IPv4 clients.
        for r in new_ranges
            .difference(&p.source_ranges)
            .filter(|r| r.addr.is_ipv4())
        {
            let (k, len) = source_range_key(service_id, r)?;
            w.put_source_range(&k, len)?;
        }
        let mut flags = 0;
        if spec.local_only {
            flags |= SERVICE_F_LOCAL_ONLY;
        }
        if !new_ranges.is_empty() {
            flags |= SERVICE_F_SOURCE_RANGES;
        }
        if spec.affinity_timeout.is_some() {
            flags |= SERVICE_F_AFFINITY;
        }
        let value = lb_common::Service {
            service_id,
            table_id: service_id,
            backend_count: spec.backends.len() as u32,
            flags,
            affinity_timeout: spec.affinity_timeout.unwrap_or(0),
        };
        if p.service_value != Some(value) {
            w.put_service(key, &value)?;
            p.service_value = Some(value);
        }
        for r in p
            .source_ranges
            .difference(&new_ranges)
            .filter(|r| r.addr.is_ipv4())
        {
            let (k, len) = source_range_key(service_id, r)?;
            w.delete_source_range(&k, len)?;
        }
        p.source_ranges = new_ranges;
        // 4. Backends no slot points at any more.
        let stale: Vec<((IpAddr, u16), u32)> = p
            .backend_ids
            .iter()
            .filter(|(_, id)| !wanted.contains(id))
            .map(|(k, id)| (*k, *id))
            .collect();
        for (k, id) in stale {
            w.delete_backend(id)?;
            p.backend_ids.remove(&k);
            p.backend_values.remove(&id);
            self.used_backend_ids.remove(&id);
        }
        p.spec = Some(spec.clone());
        Ok(())
    }

    fn remove_frontend(&mut self, frontend: &Frontend, w: &mut dyn MapWriter) -> Result<()> {
        let Some(p) = self.programmed.get(frontend).cloned() else {
            return Ok(());
        };
        let key = frontend_key(frontend)?;
        w.delete_service(&key)?;
        for r in p.source_ranges.iter().filter(|r| r.addr.is_ipv4()) {
            let (k, len) = source_range_key(p.service_id, r)?;
            w.delete_source_range(&k, len)?;
        }
        for id in p.backend_ids.values() {
            w.delete_backend(*id)?;
            self.used_backend_ids.remove(id);
        }
        self.programmed.remove(frontend);
        self.names_version += 1;
        self.free_service_ids.push_back(p.service_id);
        Ok(())
    }
}

/// Counts writes for the summary (and the O(changed) tests).
struct Counting<'a> {
    inner: &'a mut dyn MapWriter,
    writes: usize,
}

impl MapWriter for Counting<'_> {
    fn put_backend(&mut self, id: u32, b: &lb_common::Backend) -> Result<()> {
        self.writes += 1;
        self.inner.put_backend(id, b)
    }
    fn delete_backend(&mut self, id: u32) -> Result<()> {
        self.writes += 1;
        self.inner.delete_backend(id)
    }
    fn put_maglev_slot(&mut self, index: u32, backend_id: u32) -> Result<()> {
        self.writes += 1;
        self.inner.put_maglev_slot(index, backend_id)
    }
    fn put_service(&mut self, key: &FrontendKey, s: &lb_common::Service) -> Result<()> {
        self.writes += 1;
        self.inner.put_service(key, s)
    }
    fn delete_service(&mut self, key: &FrontendKey) -> Result<()> {
        self.writes += 1;
        self.inner.delete_service(key)
    }
    fn put_source_range(&mut self, k: &lb_common::SourceRange, len: u32) -> Result<()> {
        self.writes += 1;
        self.inner.put_source_range(k, len)
    }
    fn delete_source_range(&mut self, k: &lb_common::SourceRange, len: u32) -> Result<()> {
        self.writes += 1;
        self.inner.delete_source_range(k, len)
    }
    fn reset_stats(&mut self, id: u32) -> Result<()> {
        self.inner.reset_stats(id)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        net::{IpAddr, Ipv4Addr},
    };

    use super::*;
    use crate::model::ServiceRef;

    /// An in-memory stand-in for the BPF maps.
    #[derive(Default)]
    struct FakeMaps {
        services: HashMap<FrontendKey, lb_common::Service>,
        backends: HashMap<u32, lb_common::Backend>,
        maglev: HashMap<u32, u32>,
        ranges: BTreeSet<(u32, [u8; 16], u32)>,
        /// Every write checks that no slot points at a missing backend.
        dangling_seen: bool,
    }

    impl FakeMaps {
        fn check(&mut self) {
            for s in self.services.values() {
                if s.backend_count == 0 {
                    continue;
                }
                for slot in 0..MAGLEV_TABLE_SIZE {
                    let i = s.table_id * MAGLEV_TABLE_SIZE + slot;
                    if self
                        .maglev
                        .get(&i)
                        .is_some_and(|b| !self.backends.contains_key(b))
                    {
                        self.dangling_seen = true;
                    }
                }
            }
        }
        /// What a new flow with slot hash `h` would reach.
        fn lookup(&self, f: &Frontend, h: u32) -> Option<lb_common::Backend> {
            let s = self.services.get(&frontend_key(f).unwrap())?;
            let id = self
                .maglev
                .get(&(s.table_id * MAGLEV_TABLE_SIZE + h % MAGLEV_TABLE_SIZE))?;
            self.backends.get(id).copied()
        }
    }

    impl MapWriter for FakeMaps {
        fn put_backend(&mut self, id: u32, b: &lb_common::Backend) -> Result<()> {
            self.backends.insert(id, *b);
            Ok(())
        }
        fn delete_backend(&mut self, id: u32) -> Result<()> {
            self.backends.remove(&id);
            self.check();
            Ok(())
        }
        fn put_maglev_slot(&mut self, index: u32, backend_id: u32) -> Result<()> {
            self.maglev.insert(index, backend_id);
            Ok(())
        }
        fn put_service(&mut self, key: &FrontendKey, s: &lb_common::Service) -> Result<()> {
            self.services.insert(*key, *s);
            self.check();
            Ok(())
        }
        fn delete_service(&mut self, key: &FrontendKey) -> Result<()> {
            self.services.remove(key);
            Ok(())
        }
        fn put_source_range(&mut self, k: &lb_common::SourceRange, len: u32) -> Result<()> {
            self.ranges.insert((k.service_id.host(), k.addr, len));
            Ok(())
        }
        fn delete_source_range(&mut self, k: &lb_common::SourceRange, len: u32) -> Result<()> {
            self.ranges.remove(&(k.service_id.host(), k.addr, len));
            Ok(())
        }
        fn reset_stats(&mut self, _id: u32) -> Result<()> {
            Ok(())
        }
    }

    fn frontend(last: u8, port: u16) -> Frontend {
        Frontend {
            addr: IpAddr::V4(Ipv4Addr::new(10, 200, 0, last)),
            port,
            protocol: Protocol::Tcp,
        }
    }

    fn spec(name: &str, backends: &[u8]) -> FrontendSpec {
        FrontendSpec {
            service: ServiceRef {
                namespace: "default".into(),
                name: name.into(),
                port_name: String::new(),
            },
            backends: backends
                .iter()
                .map(|b| Backend {
                    addr: IpAddr::V4(Ipv4Addr::new(10, 1, 0, *b)),
                    port: 8080,
                    local: true,
                    terminating: false,
                })
                .collect(),
            local_only: false,
            affinity_timeout: None,
            source_ranges: vec![],
        }
    }

    fn state(entries: &[(Frontend, FrontendSpec)]) -> DesiredState {
        DesiredState {
            frontends: entries.iter().cloned().collect(),
            node_addr: None,
        }
    }

    #[test]
    fn programs_then_leaves_unchanged_services_alone() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::new(16, 1024);
        let d = state(&[
            (frontend(1, 80), spec("a", &[1, 2, 3])),
            (frontend(2, 80), spec("b", &[4])),
        ]);
        let s = r.apply(&d, &mut maps);
        assert_eq!((s.added, s.errors.len()), (2, 0));
        assert_eq!(maps.services.len(), 2);
        assert_eq!(maps.backends.len(), 4);
        let again = r.apply(&d, &mut maps);
        assert_eq!((again.unchanged, again.map_writes), (2, 0));
    }

    #[test]
    fn one_backend_change_touches_only_its_service_and_few_slots() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::new(16, 1024);
        let before = state(&[
            (frontend(1, 80), spec("a", &[1, 2, 3, 4])),
            (frontend(2, 80), spec("b", &[5, 6])),
        ]);
        r.apply(&before, &mut maps);
        let after = state(&[
            (frontend(1, 80), spec("a", &[1, 2, 3])),
            (frontend(2, 80), spec("b", &[5, 6])),
        ]);
        let s = r.apply(&after, &mut maps);
        assert_eq!((s.updated, s.unchanged), (1, 1));
        // About M/4 slots move, plus the service entry and one backend delete.
        assert!(
            s.map_writes < MAGLEV_TABLE_SIZE as usize / 4 + 20,
            "{} writes",
            s.map_writes
        );
        assert!(!maps.dangling_seen, "a slot pointed at a deleted backend");
        assert_eq!(maps.backends.len(), 5);
        for h in 0..2000 {
            let b = maps.lookup(&frontend(1, 80), h).unwrap();
            assert_ne!(b.addr[3], 4, "removed backend still reachable");
        }
    }

    #[test]
    fn removal_frees_everything_and_ids_are_reused_last() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::new(4, 1024);
        let mut s = spec("a", &[1]);
        s.source_ranges = vec![SourceRange {
            addr: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 0)),
            prefix_len: 24,
        }];
        r.apply(&state(&[(frontend(1, 80), s)]), &mut maps);
        assert_eq!(maps.ranges.len(), 1);
        assert_ne!(
            maps.services.values().next().unwrap().flags & SERVICE_F_SOURCE_RANGES,
            0
        );
        let sum = r.apply(&state(&[]), &mut maps);
        assert_eq!(sum.removed, 1);
        assert!(maps.services.is_empty() && maps.backends.is_empty() && maps.ranges.is_empty());
        r.apply(&state(&[(frontend(2, 80), spec("b", &[1]))]), &mut maps);
        // id 0 went to the back of the queue.
        assert_eq!(maps.services.values().next().unwrap().service_id, 1);
    }

    #[test]
    fn full_service_table_is_reported_not_fatal() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::new(1, 1024);
        let s = r.apply(
            &state(&[
                (frontend(1, 80), spec("a", &[1])),
                (frontend(2, 80), spec("b", &[2])),
            ]),
            &mut maps,
        );
        assert_eq!(s.added, 1);
        assert_eq!(s.errors.len(), 1);
        assert!(s.errors[0].contains("service table full"), "{:?}", s.errors);
    }

    #[test]
    fn adopted_state_keeps_ids_and_is_rewritten() {
        let mut maps = FakeMaps::default();
        let mut first = Reconciler::new(16, 1024);
        let d = state(&[(frontend(1, 80), spec("a", &[1, 2]))]);
        first.apply(&d, &mut maps);
        let services: Vec<AdoptedService> = maps
            .services
            .iter()
            .map(|(k, v)| AdoptedService { key: *k, value: *v })
            .collect();
        let backends: Vec<(u32, lb_common::Backend)> =
            maps.backends.iter().map(|(k, v)| (*k, *v)).collect();
        let ids_before: BTreeSet<u32> = maps.backends.keys().copied().collect();
        let mut second = Reconciler::new(16, 1024);
        second.adopt(Adoption {
            services,
            backends,
            source_ranges: vec![],
        });
        let s = second.apply(&d, &mut maps);
        assert_eq!((s.updated, s.added), (1, 0));
        let ids_after: BTreeSet<u32> = maps.backends.keys().copied().collect();
        assert_eq!(ids_before, ids_after);
        assert_eq!(second.apply(&d, &mut maps).map_writes, 0);
    }

    #[test]
    fn apply_changed_touches_only_the_listed_frontends() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::new(16, 1024);
        let before = state(&[
            (frontend(1, 80), spec("a", &[1])),
            (frontend(2, 80), spec("b", &[2])),
        ]);
        r.apply(&before, &mut maps);
        // b changes and c appears, but only c is listed: b stays as it was.
        let after = state(&[
            (frontend(1, 80), spec("a", &[1])),
            (frontend(2, 80), spec("b", &[3])),
            (frontend(3, 80), spec("c", &[4])),
        ]);
        let s = r.apply_changed(&after, &[frontend(3, 80)].into(), &mut maps);
        assert_eq!((s.added, s.updated, s.removed), (1, 0, 0));
        assert_eq!(maps.lookup(&frontend(2, 80), 0).unwrap().addr[3], 2);
        // Listing a frontend the desired state lacks removes it.
        let s = r.apply_changed(&before, &[frontend(3, 80)].into(), &mut maps);
        assert_eq!(s.removed, 1);
        assert!(maps.lookup(&frontend(3, 80), 0).is_none());
    }

    #[test]
    fn no_backends_means_count_zero() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::new(4, 1024);
        let s = r.apply(&state(&[(frontend(1, 80), spec("a", &[]))]), &mut maps);
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        assert_eq!(maps.services.values().next().unwrap().backend_count, 0);
    }
}
