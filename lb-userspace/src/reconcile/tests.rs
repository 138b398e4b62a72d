//! The reconciler against an in-memory fake of the maps.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    time::Instant,
};

use lb_common::SERVICE_F_SOURCE_RANGES;

use super::*;
use crate::model::{Protocol, ServiceRef};

/// An in-memory stand-in for the BPF maps.
#[derive(Default)]
struct FakeMaps {
    services: HashMap<FrontendKey, lb_common::Service>,
    backends: HashMap<u32, lb_common::Backend>,
    maglev: HashMap<u32, u32>,
    /// (service id, family, address, prefix length).
    ranges: BTreeSet<(u32, u8, [u8; 16], u32)>,
    /// Every write checks that no slot points at a missing backend.
    dangling_seen: bool,
    /// The next this many `put_service` calls fail.
    failing_service_writes: usize,
    /// `put_source_range` succeeds this many more times, then fails (a full
    /// trie); `None`: always succeeds.
    range_writes_left: Option<usize>,
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
    fn put_maglev_slots(&mut self, slots: &[(u32, u32)]) -> Result<()> {
        self.maglev.extend(slots.iter().copied());
        Ok(())
    }
    fn put_service(&mut self, key: &FrontendKey, s: &lb_common::Service) -> Result<()> {
        if self.failing_service_writes > 0 {
            self.failing_service_writes -= 1;
            anyhow::bail!("EBUSY (injected)");
        }
        self.services.insert(*key, *s);
        self.check();
        Ok(())
    }
    fn delete_service(&mut self, key: &FrontendKey) -> Result<()> {
        self.services.remove(key);
        Ok(())
    }
    fn put_source_range(&mut self, k: &lb_common::SourceRange, len: u32) -> Result<()> {
        match &mut self.range_writes_left {
            Some(0) => anyhow::bail!("ENOSPC (injected: the trie is full)"),
            Some(left) => *left -= 1,
            None => {}
        }
        self.ranges
            .insert((k.service_id.host(), k.family, k.addr, len));
        Ok(())
    }
    fn delete_source_range(&mut self, k: &lb_common::SourceRange, len: u32) -> Result<()> {
        self.ranges
            .remove(&(k.service_id.host(), k.family, k.addr, len));
        Ok(())
    }
    fn reset_stats(&mut self, _id: u32) -> Result<()> {
        Ok(())
    }
}

impl MapReader for FakeMaps {
    fn service(&self, key: &FrontendKey) -> Result<Option<lb_common::Service>> {
        Ok(self.services.get(key).copied())
    }
    fn service_keys(&self) -> Result<Vec<FrontendKey>> {
        Ok(self.services.keys().copied().collect())
    }
    fn backend(&self, id: u32) -> Result<Option<lb_common::Backend>> {
        Ok(self.backends.get(&id).copied())
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
        node_addr_v6: None,
        cluster_networks: Default::default(),
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
fn a_dual_stack_service_is_programmed_and_adopted_in_both_families() {
    let ip = |text: &str| -> IpAddr { text.parse().unwrap() };
    let ipv6 = Frontend {
        addr: ip("2001:db8::10"),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let mut v6_spec = spec("web", &[]);
    v6_spec.backends = vec![Backend {
        addr: ip("fd00:10:1::4"),
        port: 8080,
        local: false,
        terminating: false,
    }];
    // 32.1.13.184/32 and 2001:db8::/32 share their leading bytes and
    // length: only the family keeps them apart.
    v6_spec.source_ranges = vec![
        SourceRange {
            addr: ip("32.1.13.184"),
            prefix_len: 32,
        },
        SourceRange {
            addr: ip("2001:db8::"),
            prefix_len: 32,
        },
    ];
    let mut v4_spec = spec("web", &[4]);
    v4_spec.source_ranges = v6_spec.source_ranges.clone();
    let d = state(&[(frontend(10, 80), v4_spec), (ipv6, v6_spec)]);
    let mut maps = FakeMaps::default();
    let mut first = Reconciler::new(16, 1024);
    let s = first.apply(&d, &mut maps);
    assert_eq!((s.added, s.errors.len()), (2, 0), "{:?}", s.errors);
    assert_eq!(maps.ranges.len(), 4, "{:?}", maps.ranges);
    let backend = maps.lookup(&ipv6, 7).unwrap();
    assert_eq!(backend.family, lb_common::FAMILY_V6);
    assert_eq!(
        crate::encode::backend_from_value(&backend).addr,
        ip("fd00:10:1::4")
    );

    // A restarted agent reads everything back and has nothing to write.
    let mut second = Reconciler::new(16, 1024);
    second.adopt(Adoption {
        services: maps
            .services
            .iter()
            .map(|(k, v)| AdoptedService { key: *k, value: *v })
            .collect(),
        backends: maps.backends.iter().map(|(k, v)| (*k, *v)).collect(),
        source_ranges: maps
            .ranges
            .iter()
            .map(|(id, family, addr, len)| {
                let key = lb_common::SourceRange {
                    service_id: lb_common::Be32::from_host(*id),
                    family: *family,
                    addr: *addr,
                    _pad: [0; 3],
                };
                (key, *len)
            })
            .collect(),
    });
    let programmed: Vec<String> = second
        .programmed()
        .map(|(_, frontend, _)| frontend.to_string())
        .collect();
    assert_eq!(programmed, ["10.200.0.10:80/TCP", "[2001:db8::10]:80/TCP"]);
    // Adopted entries are rewritten once (as for IPv4), then left alone.
    let ranges_before = maps.ranges.clone();
    let s = second.apply(&d, &mut maps);
    assert_eq!((s.updated, s.added, s.errors.len()), (2, 0, 0), "{s:?}");
    assert_eq!(maps.ranges, ranges_before);
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

/// Audit A-14: a frontend whose write failed is not touched by an apply of
/// other changes, but the next full apply (the agent's retry) programs it;
/// the failure names its Service.
#[test]
fn a_failed_frontend_is_programmed_by_the_retry() {
    let mut maps = FakeMaps {
        failing_service_writes: 1,
        ..FakeMaps::default()
    };
    let mut r = Reconciler::new(16, 1024);
    let (x, y) = (frontend(1, 80), frontend(2, 80));
    let d = state(&[(x, spec("x", &[1, 2]))]);
    let s = r.apply(&d, &mut maps);
    assert_eq!(s.errors.len(), 1, "{s:?}");
    assert_eq!(s.failed.len(), 1);
    assert_eq!(s.failed[0].0.name, "x");
    assert!(maps.lookup(&x, 0).is_none());

    // Another Service changes: X stays unprogrammed (the gap A-14 names).
    let d = state(&[(x, spec("x", &[1, 2])), (y, spec("y", &[3]))]);
    let s = r.apply_changed(&d, &BTreeSet::from([y]), &mut maps);
    assert!(s.errors.is_empty(), "{s:?}");
    assert!(maps.lookup(&x, 0).is_none());

    // The retry: a full apply.
    let s = r.apply(&d, &mut maps);
    assert!(s.errors.is_empty(), "{s:?}");
    assert_eq!(s.updated, 1, "{s:?}");
    assert!(maps.lookup(&x, 0).is_some());
    assert!(maps.lookup(&y, 0).is_some());
    assert!(!maps.dangling_seen);
}

/// Audit A-14: entries removed or changed behind the reconciler's back are
/// invisible to an apply (it compares with what it wrote), found by the
/// drift check, and rewritten by the next apply; an entry nobody owns is
/// removed.
#[test]
fn drift_in_the_maps_is_found_and_repaired() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::new(16, 1024);
    let (x, y, stray) = (frontend(1, 80), frontend(2, 80), frontend(9, 99));
    let d = state(&[(x, spec("x", &[1, 2])), (y, spec("y", &[3]))]);
    assert!(r.apply(&d, &mut maps).errors.is_empty());
    let x_entry = maps.services[&frontend_key(&x).unwrap()];
    let y_backend = *maps.backends.keys().max().unwrap();

    maps.services.remove(&frontend_key(&x).unwrap());
    maps.backends.remove(&y_backend);
    maps.services.insert(frontend_key(&stray).unwrap(), x_entry);
    let s = r.apply(&d, &mut maps);
    assert_eq!(s.map_writes, 0, "an apply alone cannot see drift: {s:?}");
    assert!(maps.lookup(&x, 0).is_none());

    let drift = r.repair_drift(&mut maps).unwrap();
    assert_eq!(
        drift,
        Drift {
            rewrite: 2,
            strays_removed: 1
        }
    );
    assert!(!maps.services.contains_key(&frontend_key(&stray).unwrap()));
    let s = r.apply(&d, &mut maps);
    assert!(s.errors.is_empty(), "{s:?}");
    assert_eq!(s.updated, 2, "{s:?}");
    assert_eq!(maps.services[&frontend_key(&x).unwrap()], x_entry);
    assert!(maps.lookup(&y, 0).is_some());
    // The injected drift left a dangling slot until the repair; after it,
    // none.
    maps.dangling_seen = false;
    maps.check();
    assert!(!maps.dangling_seen);
    assert_eq!(r.repair_drift(&mut maps).unwrap(), Drift::default());
}

fn ranges(n: u8) -> Vec<SourceRange> {
    (0..n)
        .map(|i| SourceRange {
            addr: IpAddr::V4(Ipv4Addr::new(192, 0, i, 0)),
            prefix_len: 24,
        })
        .collect()
}

impl FakeMaps {
    /// The trie entries of service `id`.
    fn ranges_of(&self, id: u32) -> usize {
        self.ranges.iter().filter(|(s, _, _, _)| *s == id).count()
    }
}

/// Audit A-13: a range update that fails partway (the shared trie is full)
/// leaves the frontend closed: its entry says "source ranges apply" and no
/// range of it is in the trie, so every source is denied; not open (the old
/// entry without the flag) and not half-updated. The failure names the
/// Service, and the retry writes everything once the trie has room.
#[test]
fn a_failed_range_write_closes_the_frontend_until_the_retry() {
    for before in [ranges(0), ranges(1)] {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::new(16, 1024);
        let x = frontend(1, 80);
        let mut open = spec("x", &[1, 2]);
        open.source_ranges = before.clone();
        assert!(r.apply(&state(&[(x, open)]), &mut maps).errors.is_empty());
        let id = maps.services[&frontend_key(&x).unwrap()].service_id;

        maps.range_writes_left = Some(4);
        let mut narrowed = spec("x", &[1, 2]);
        narrowed.source_ranges = ranges(10);
        let d = state(&[(x, narrowed)]);
        let s = r.apply(&d, &mut maps);
        assert_eq!(s.failed.len(), 1, "{s:?}");
        assert_eq!(s.failed[0].0.name, "x");
        assert!(s.failed[0].1.contains("denies every source"), "{s:?}");
        let entry = maps.services[&frontend_key(&x).unwrap()];
        assert_ne!(
            entry.flags & SERVICE_F_SOURCE_RANGES,
            0,
            "left open (ranges before: {})",
            before.len()
        );
        assert_eq!(maps.ranges_of(id), 0, "half-updated ranges stayed");

        // Still no room: still closed.
        let s = r.apply(&d, &mut maps);
        assert_eq!(s.failed.len(), 1, "{s:?}");
        assert_eq!(maps.ranges_of(id), 0);

        // Room again: the retry programs all ten.
        maps.range_writes_left = None;
        let s = r.apply(&d, &mut maps);
        assert!(s.errors.is_empty(), "{s:?}");
        assert_eq!(maps.ranges_of(id), 10);
        let entry = maps.services[&frontend_key(&x).unwrap()];
        assert_ne!(entry.flags & SERVICE_F_SOURCE_RANGES, 0);
        assert_eq!(entry.backend_count, 2);
        assert_eq!(r.apply(&d, &mut maps).map_writes, 0);
    }
}

/// Audit A-15: a frontend removed and added again within the grace keeps
/// its service id and backend ids, and its id stays active for the sweeper
/// meanwhile, so its established flows are not swept; its map entries leave
/// at once. After the grace the ids are freed and a comeback is new.
#[test]
fn a_frontend_back_within_the_grace_keeps_its_ids() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::new(16, 1024);
    let (x, y) = (frontend(1, 80), frontend(2, 80));
    let with_x = state(&[(x, spec("x", &[1, 2])), (y, spec("y", &[3]))]);
    let without_x = state(&[(y, spec("y", &[3]))]);
    assert!(r.apply(&with_x, &mut maps).errors.is_empty());
    let id = r.service_id(&x).unwrap();
    let backends: BTreeSet<u32> = maps.backends.keys().copied().collect();

    let s = r.apply(&without_x, &mut maps);
    assert_eq!(s.removed, 1, "{s:?}");
    assert!(
        maps.lookup(&x, 0).is_none(),
        "a removed frontend still takes new flows"
    );
    assert_eq!(maps.backends.len(), 1);
    assert!(
        r.active_service_ids().contains(&id),
        "its flows would be swept"
    );
    assert!(r.programmed().all(|(_, f, _)| *f != x));

    let s = r.apply(&with_x, &mut maps);
    assert!(s.errors.is_empty(), "{s:?}");
    assert_eq!(
        r.service_id(&x),
        Some(id),
        "a new service id: its flows are swept"
    );
    assert_eq!(
        maps.backends.keys().copied().collect::<BTreeSet<_>>(),
        backends
    );
    assert!(maps.lookup(&x, 0).is_some());
    assert!(!maps.dangling_seen);
    assert_eq!(r.apply(&with_x, &mut maps).map_writes, 0);

    // Removed for longer than the grace: the ids go.
    r.apply(&without_x, &mut maps);
    assert_eq!(
        r.forget_removed(Instant::now() + std::time::Duration::from_secs(1)),
        1
    );
    assert!(!r.active_service_ids().contains(&id));
    r.apply(&with_x, &mut maps);
    assert_ne!(r.service_id(&x), Some(id));
}

/// Tombstones never make the service table full: the oldest gives its id up.
#[test]
fn a_tombstone_yields_its_id_when_the_table_is_full() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::new(1, 1024);
    r.apply(&state(&[(frontend(1, 80), spec("a", &[1]))]), &mut maps);
    r.apply(&state(&[]), &mut maps);
    let s = r.apply(&state(&[(frontend(2, 80), spec("b", &[2]))]), &mut maps);
    assert!(s.errors.is_empty(), "{s:?}");
    assert_eq!(r.service_id(&frontend(2, 80)), Some(0));
    assert_eq!(r.service_id(&frontend(1, 80)), None);
}

/// The inspect state file, streamed from the reconciler's frontends, reads
/// back the same names by service id, also after a change.
#[test]
fn the_state_file_names_every_frontend_by_its_service_id() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::new(256, 1024);
    let frontends: Vec<(Frontend, FrontendSpec)> = (0..60u8)
        .map(|i| (frontend(i, 80), spec(&format!("s{i}"), &[1])))
        .collect();
    let mut d = state(&frontends);
    let s = r.apply(&d, &mut maps);
    assert_eq!((s.added, s.errors.len()), (60, 0));
    let (f, _) = frontends[40];
    d.frontends.get_mut(&f).unwrap().backends = spec("s40", &[2, 3]).backends;
    let s = r.apply_changed(&d, &BTreeSet::from([f]), &mut maps);
    assert_eq!((s.updated, s.errors.len()), (1, 0));

    let dir = std::env::temp_dir().join(format!("xlb-state-file-{}", std::process::id()));
    crate::state_file::write(&dir, "node-1", &r).unwrap();
    let read = crate::state_file::read(&dir, "node-1");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(read.len(), 60);
    for (id, frontend, spec) in r.programmed() {
        let info = &read[&id];
        assert_eq!(info.frontend, frontend.to_string());
        assert_eq!(info.service, spec.unwrap().service.to_string());
    }
}

#[test]
fn compact_keeps_every_entry() {
    let map: BTreeMap<u32, String> = (0..5000).rev().map(|i| (i * 7, i.to_string())).collect();
    let mut grown = BTreeMap::new();
    for (k, v) in &map {
        grown.insert(*k, v.clone());
    }
    assert_eq!(compact(grown), map);
}
