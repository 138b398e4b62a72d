//! Privileged tests of the Maglev slot writes through the mmap of
//! `XLB_MAGLEV` (issue 11): the real object loaded (so its verifier pass
//! with `BPF_F_MMAPABLE`), the real maps, the reconciler.
//!
//! - the slots written through the mapping are what the per-slot syscall
//!   path writes, read back through the kernel's own lookups;
//! - at 10 000 Services (20 000 frontends) every frontend's table is the
//!   one the reconciler computes, and one more Service writes only its
//!   own entries.
//!
//! Timings belong to the benchmark (`program_all_ms`,
//! `reconcile_one_more_us`), not here.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr},
    path::Path,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail};
use lb_common::{FrontendKey, MAGLEV_MAP_FLAGS, MAGLEV_TABLE_SIZE};
use xlb::{
    dataplane::{self, Limits, Maps, PinDir},
    model::{Backend, DesiredState, Frontend, FrontendSpec, Protocol, ServiceRef},
    reconcile::{MapWriter, Reconciler, frontend_key},
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh pin directory with the object loaded; removed on drop.
struct Loaded {
    pins: PinDir,
    maps: Maps,
    _ebpf: aya::Ebpf,
}

impl Loaded {
    fn new(max_services: u32) -> Result<Self> {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "these tests need root");
        let bpffs = Path::new("/sys/fs/bpf");
        dataplane::ensure_bpffs(bpffs)?;
        let node = format!(
            "maglev{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let pins = PinDir::new(bpffs, &node);
        let limits = Limits {
            max_services,
            max_backends: 4 * max_services,
            max_flows: 1024,
        };
        let mut ebpf = dataplane::load(&pins, limits)?;
        let maps = Maps::take(&mut ebpf)?;
        Ok(Self {
            pins,
            maps,
            _ebpf: ebpf,
        })
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pins.root);
    }
}

/// The benchmark's shape: `n` Services with a TCP and a UDP frontend each,
/// 3 backends per Service.
fn many(n: u32) -> DesiredState {
    let mut d = DesiredState::default();
    for i in 0..n {
        let backends: Vec<Backend> = (0..3u32)
            .map(|j| Backend {
                addr: IpAddr::V4(Ipv4Addr::from(0x0a40_0000 + i * 4 + j)),
                port: 8080,
                local: true,
                terminating: false,
            })
            .collect();
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            d.frontends.insert(
                Frontend {
                    addr: IpAddr::V4(Ipv4Addr::from(0x0ac8_0000 + i / 1000)),
                    port: 1000 + (i % 1000) as u16,
                    protocol,
                },
                FrontendSpec {
                    service: ServiceRef {
                        namespace: "t".into(),
                        name: format!("s{i}"),
                        port_name: String::new(),
                    },
                    backends: backends.clone(),
                    local_only: false,
                    affinity_timeout: None,
                    source_ranges: vec![],
                },
            );
        }
    }
    d
}

/// Every write, in memory: the reference the maps are compared with, and
/// a record of what one apply touched.
#[derive(Default)]
struct Recorder {
    slots: BTreeMap<u32, u32>,
    services: HashMap<FrontendKey, lb_common::Service>,
    backends: BTreeMap<u32, lb_common::Backend>,
    other_writes: usize,
}

impl MapWriter for Recorder {
    fn put_backend(&mut self, id: u32, b: &lb_common::Backend) -> Result<()> {
        self.backends.insert(id, *b);
        Ok(())
    }
    fn delete_backend(&mut self, id: u32) -> Result<()> {
        self.backends.remove(&id);
        self.other_writes += 1;
        Ok(())
    }
    fn put_maglev_slots(&mut self, slots: &[(u32, u32)]) -> Result<()> {
        self.slots.extend(slots.iter().copied());
        Ok(())
    }
    fn put_service(&mut self, key: &FrontendKey, s: &lb_common::Service) -> Result<()> {
        self.services.insert(*key, *s);
        Ok(())
    }
    fn delete_service(&mut self, _: &FrontendKey) -> Result<()> {
        self.other_writes += 1;
        Ok(())
    }
    fn put_source_range(&mut self, _: &lb_common::SourceRange, _: u32) -> Result<()> {
        self.other_writes += 1;
        Ok(())
    }
    fn delete_source_range(&mut self, _: &lb_common::SourceRange, _: u32) -> Result<()> {
        self.other_writes += 1;
        Ok(())
    }
    fn reset_stats(&mut self, _: u32) -> Result<()> {
        Ok(())
    }
}

/// Writes to the maps and records them.
struct Both<'a> {
    maps: &'a mut Maps,
    record: Recorder,
}

impl MapWriter for Both<'_> {
    fn put_backend(&mut self, id: u32, b: &lb_common::Backend) -> Result<()> {
        self.record.put_backend(id, b)?;
        self.maps.put_backend(id, b)
    }
    fn delete_backend(&mut self, id: u32) -> Result<()> {
        self.record.delete_backend(id)?;
        self.maps.delete_backend(id)
    }
    fn put_maglev_slots(&mut self, slots: &[(u32, u32)]) -> Result<()> {
        self.record.put_maglev_slots(slots)?;
        self.maps.put_maglev_slots(slots)
    }
    fn put_service(&mut self, key: &FrontendKey, s: &lb_common::Service) -> Result<()> {
        self.record.put_service(key, s)?;
        self.maps.put_service(key, s)
    }
    fn delete_service(&mut self, key: &FrontendKey) -> Result<()> {
        self.record.delete_service(key)?;
        self.maps.delete_service(key)
    }
    fn put_source_range(&mut self, k: &lb_common::SourceRange, len: u32) -> Result<()> {
        self.record.put_source_range(k, len)?;
        self.maps.put_source_range(k, len)
    }
    fn delete_source_range(&mut self, k: &lb_common::SourceRange, len: u32) -> Result<()> {
        self.record.delete_source_range(k, len)?;
        self.maps.delete_source_range(k, len)
    }
    fn reset_stats(&mut self, id: u32) -> Result<()> {
        self.maps.reset_stats(id)
    }
}

/// A row of the array through `BPF_MAP_LOOKUP_ELEM`, not the mapping.
fn row_by_syscall(maps: &Maps, row: u32) -> Result<Vec<u32>> {
    (0..MAGLEV_TABLE_SIZE)
        .map(|slot| {
            let index = row * MAGLEV_TABLE_SIZE + slot;
            maps.maglev
                .get(&index, 0)
                .with_context(|| format!("reading slot {index}"))
        })
        .collect()
}

fn services_in_maps(maps: &Maps) -> Result<HashMap<FrontendKey, lb_common::Service>> {
    maps.services
        .iter()
        .map(|e| e.map_err(Into::into))
        .collect()
}

/// The array pinned by this build has `BPF_F_MMAPABLE`, and the agent's
/// handle maps it: else every slot would go through a syscall again.
#[test]
fn the_maglev_array_is_mapped() -> Result<()> {
    let l = Loaded::new(16)?;
    let flags = aya::maps::MapData::from_pin(l.pins.map("XLB_MAGLEV"))?
        .info()?
        .map_flags();
    assert_eq!(flags & MAGLEV_MAP_FLAGS, MAGLEV_MAP_FLAGS);
    assert!(l.maps.maglev_slots.is_some(), "the array is not mapped");
    // Reopened from the pin (as `inspect` and a restarted agent do).
    let pinned = Maps::open_pinned(&l.pins.maps())?;
    assert!(pinned.maglev_slots.is_some());
    Ok(())
}

/// The same 1 000 Services programmed twice, once through the mapping and
/// once slot by slot with `BPF_MAP_UPDATE_ELEM` (the path before the
/// mapping): both arrays hold the same slots, read back by the kernel's
/// lookup, and so do the service and backend maps.
#[test]
fn mapped_writes_equal_the_per_slot_syscalls() -> Result<()> {
    let d = many(1000);
    let mut mapped = Loaded::new(2048)?;
    let mut by_syscall = Loaded::new(2048)?;
    by_syscall.maps.maglev_slots = None;
    let a = Reconciler::new(2048, 8192).apply(&d, &mut mapped.maps);
    let b = Reconciler::new(2048, 8192).apply(&d, &mut by_syscall.maps);
    assert!(a.errors.is_empty() && b.errors.is_empty(), "{a:?} {b:?}");
    assert_eq!(a, b);
    let services = services_in_maps(&mapped.maps)?;
    assert_eq!(services, services_in_maps(&by_syscall.maps)?);
    assert_eq!(services.len(), 2000);
    for s in services.values() {
        let row = row_by_syscall(&mapped.maps, s.table_id)?;
        assert_eq!(row, row_by_syscall(&by_syscall.maps, s.table_id)?);
        let owners: BTreeSet<u32> = row.iter().copied().collect();
        assert_eq!(
            owners.len(),
            3,
            "table {} has owners {owners:?}",
            s.table_id
        );
        for id in owners {
            let backend = mapped.maps.backends.get(&id, 0)?;
            assert_eq!(backend.service_id, s.service_id);
        }
    }
    Ok(())
}

/// 10 000 Services: every frontend's table in the array is the table the
/// reconciler wrote (the in-memory record of the same apply); then one more
/// Service writes its own backends, its own row and its own entry, and
/// nothing else of the array changes.
#[test]
fn ten_thousand_services_then_one_more() -> Result<()> {
    let d = many(10_000);
    let mut l = Loaded::new(20_480)?;
    let mut reconciler = Reconciler::new(20_480, 81_920);
    let mut both = Both {
        maps: &mut l.maps,
        record: Recorder::default(),
    };
    let s = reconciler.apply(&d, &mut both);
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert_eq!(s.added, 20_000);
    let record = std::mem::take(&mut both.record);
    assert_eq!(record.slots.len(), 20_000 * MAGLEV_TABLE_SIZE as usize);
    let services = services_in_maps(&l.maps)?;
    assert_eq!(services, record.services);
    // Every slot through the mapping; every 50th table through syscalls
    // too (the mapping's stride is the kernel's, not assumed).
    let slots = l.maps.maglev_slots.as_mut().context("not mapped")?;
    for (index, backend) in &record.slots {
        let found = slots.load(*index)?;
        if found != *backend {
            bail!("slot {index}: {found} in the array, {backend} written");
        }
    }
    for s in services.values().step_by(50) {
        let row = row_by_syscall(&l.maps, s.table_id)?;
        let start = s.table_id * MAGLEV_TABLE_SIZE;
        let written: Vec<u32> = (start..start + MAGLEV_TABLE_SIZE)
            .map(|i| record.slots[&i])
            .collect();
        assert_eq!(row, written, "table {}", s.table_id);
    }
    for (id, b) in &record.backends {
        assert_eq!(l.maps.backends.get(id, 0)?, *b);
    }

    // One more Service, as a watch event delivers it.
    let slots = l.maps.maglev_slots.as_mut().context("not mapped")?;
    let before: Vec<u32> = (0..slots.len())
        .map(|i| slots.load(i))
        .collect::<std::io::Result<_>>()?;
    let more = many(10_001);
    let extra: BTreeSet<Frontend> = more
        .frontends
        .keys()
        .filter(|f| !d.frontends.contains_key(*f))
        .copied()
        .collect();
    assert_eq!(extra.len(), 2);
    let mut both = Both {
        maps: &mut l.maps,
        record: Recorder::default(),
    };
    let s = reconciler.apply_changed(&more, &extra, &mut both);
    assert_eq!((s.added, s.errors.len()), (2, 0), "{s:?}");
    let record = std::mem::take(&mut both.record);
    let new_keys: HashSet<FrontendKey> = extra.iter().map(|f| frontend_key(f).unwrap()).collect();
    assert_eq!(
        record.services.keys().copied().collect::<HashSet<_>>(),
        new_keys
    );
    let rows: BTreeSet<u32> = record.services.values().map(|s| s.table_id).collect();
    assert_eq!(record.other_writes, 0);
    assert_eq!(record.backends.len(), 3 * 2);
    assert_eq!(
        record.slots.len(),
        2 * MAGLEV_TABLE_SIZE as usize,
        "only the two new rows"
    );
    let slots = l.maps.maglev_slots.as_mut().context("not mapped")?;
    for (i, old) in before.iter().enumerate() {
        let i = i as u32;
        let now = slots.load(i)?;
        if rows.contains(&(i / MAGLEV_TABLE_SIZE)) {
            assert_eq!(Some(&now), record.slots.get(&i), "slot {i}");
        } else {
            assert_eq!(now, *old, "slot {i} of another table changed");
        }
    }
    Ok(())
}
