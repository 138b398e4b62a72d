//! The kernel side: the aya `Ebpf` object, its attachments and its maps.
//! Maps and links are pinned under `<bpffs>/xlb/<node-name>/`, so the
//! program keeps forwarding while the agent restarts, and a restarted (or
//! upgraded) agent adopts the maps, with every flow in them, and atomically
//! swaps its program into the existing links.

pub mod attach;
pub mod layout;
pub mod maps;
mod migrate;
pub mod mmap;
pub mod pinned;
mod start;

pub use start::{Uplinks, start};

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::{Ebpf, EbpfLoader, programs::ProgramError};
use lb_common::MAGLEV_TABLE_SIZE;
use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

pub use maps::Maps;
use maps::names;

/// The eBPF object built by `cargo xtask build-ebpf`, embedded at compile time.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));

/// Map sizes, chosen at load time. A pinned map of another size is
/// replaced by one of this size, its entries copied over.
#[derive(Clone, Copy, Debug, clap::Args)]
pub struct Limits {
    /// Frontends the maps can hold.
    #[arg(long, env = "XLB_MAX_SERVICES", default_value_t = Limits::default().max_services)]
    pub max_services: u32,
    /// Backends over all services.
    #[arg(long, env = "XLB_MAX_BACKENDS", default_value_t = Limits::default().max_backends)]
    pub max_backends: u32,
    /// Connection-tracking entries (two per flow).
    #[arg(long, env = "XLB_MAX_FLOWS", default_value_t = Limits::default().max_flows)]
    pub max_flows: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_services: 4096,
            max_backends: 65536,
            max_flows: 262_144,
        }
    }
}

/// The suffix of a map pinned aside during an upgrade.
pub const PENDING_SUFFIX: &str = ":pending";

/// Where one node's pins live.
#[derive(Clone, Debug)]
pub struct PinDir {
    pub root: PathBuf,
}

impl PinDir {
    pub fn new(bpffs: &Path, node_name: &str) -> Self {
        Self {
            root: bpffs.join("xlb").join(node_name),
        }
    }
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }
    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }
    /// Where map `name` is pinned.
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }
    /// Where the new map `name` of an upgrade waits until the new programs
    /// run (then it is renamed over the old pin).
    pub fn pending_map(&self, name: &str) -> PathBuf {
        self.maps().join(format!("{name}{PENDING_SUFFIX}"))
    }
}

/// Mounts a BPF filesystem at `bpffs` unless one is there already, or
/// xlb's own directory in it, `<bpffs>/xlb`, is one: the DaemonSet mounts
/// only the host's /sys/fs/bpf/xlb into the pod, not the whole filesystem
/// with every other component's pins.
pub fn ensure_bpffs(bpffs: &Path) -> Result<()> {
    fs::create_dir_all(bpffs).with_context(|| format!("creating {}", bpffs.display()))?;
    if is_bpffs(bpffs)? {
        return Ok(());
    }
    let own = bpffs.join("xlb");
    if own.is_dir() && is_bpffs(&own)? {
        return Ok(());
    }
    if let Err(err) = mount(
        Some("bpf"),
        bpffs,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    ) {
        bail!(
            "{} is not a BPF filesystem and mounting one there failed: {err} (run as root, or mount it: mount -t bpf bpf {})",
            bpffs.display(),
            bpffs.display()
        );
    }
    tracing::info!(path = %bpffs.display(), "mounted BPF filesystem");
    Ok(())
}

fn is_bpffs(path: &Path) -> Result<bool> {
    let st = statfs(path).with_context(|| format!("statfs {}", path.display()))?;
    Ok(st.filesystem_type() == BPF_FS_MAGIC)
}

/// Map sizes the flags set (the others keep the object's).
fn sizes(limits: Limits) -> Result<Vec<(&'static str, u32)>> {
    if limits.max_services == 0 || limits.max_backends == 0 || limits.max_flows == 0 {
        bail!(
            "--max-services, --max-backends and --max-flows must be at least 1 (got {}, {}, {})",
            limits.max_services,
            limits.max_backends,
            limits.max_flows
        );
    }
    let maglev_slots = limits
        .max_services
        .checked_mul(MAGLEV_TABLE_SIZE)
        .context("--max-services too large for the Maglev table")?;
    Ok(vec![
        (names::SERVICES, limits.max_services),
        (names::STATS, limits.max_services),
        (names::MAGLEV, maglev_slots),
        (names::SOURCE_RANGES, limits.max_services.saturating_mul(4)),
        (names::BACKENDS, limits.max_backends),
        // Every backend could be local, and some that left are kept a while.
        (names::LOCAL_BACKENDS, limits.max_backends),
        (names::AFFINITY, limits.max_flows / 4 + 1),
        (names::FLOWS, limits.max_flows),
        // One owner per SNAT'd flow, whose two entries take two flow slots.
        (names::SNAT_OWNERS, limits.max_flows / 2 + 1),
    ])
}

/// What every map the object pins by name must look like with these
/// limits: the object's definition, with the sizes the flags set.
pub fn wanted_shapes(limits: Limits) -> Result<Vec<(String, pinned::Shape)>> {
    if OBJECT.is_empty() {
        bail!(
            "this xlb binary was built without its eBPF object: run `cargo xtask build-ebpf` and rebuild"
        );
    }
    let sizes = sizes(limits)?;
    let object = aya_obj::Object::parse(OBJECT).context("parsing the embedded eBPF object")?;
    let mut out: Vec<(String, pinned::Shape)> = object
        .maps
        .iter()
        .filter(|(_, map)| map.pinning() == aya_obj::maps::PinningType::ByName)
        .map(|(name, map)| {
            let max_entries = sizes
                .iter()
                .find(|(n, _)| n == name)
                .map_or(map.max_entries(), |(_, size)| *size);
            let shape = pinned::Shape {
                map_type: map.map_type(),
                key_size: map.key_size(),
                value_size: map.value_size(),
                max_entries,
                flags: map.map_flags(),
            };
            (name.clone(), shape)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Loads the embedded object, creating or adopting the pinned maps, and
/// loads (verifies) its programs. For the tests and tools that start on a
/// fresh pin directory; the agent goes through [`start`], which checks
/// what is pinned first.
pub fn load(pins: &PinDir, limits: Limits) -> Result<Ebpf> {
    load_with(pins, limits, &[])
}

/// [`load`], with the maps named in `elsewhere` pinned at the given paths
/// instead of their usual pins (the new maps of an upgrade, pinned aside
/// until the new programs run).
fn load_with(pins: &PinDir, limits: Limits, elsewhere: &[(String, PathBuf)]) -> Result<Ebpf> {
    if OBJECT.is_empty() {
        bail!(
            "this xlb binary was built without its eBPF object: run `cargo xtask build-ebpf` and rebuild"
        );
    }
    check_privileges()?;
    let sizes = sizes(limits)?;
    fs::create_dir_all(pins.maps())
        .with_context(|| format!("creating pin directory {}", pins.maps().display()))?;
    fs::create_dir_all(pins.links())
        .with_context(|| format!("creating pin directory {}", pins.links().display()))?;
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pins.maps());
    for (name, size) in sizes {
        loader.map_max_entries(name, size);
    }
    for (name, path) in elsewhere {
        loader.map_pin_path(name.as_str(), path.as_path());
    }
    let mut ebpf = loader
        .load(OBJECT)
        .context("loading the xlb eBPF object (creating or opening its maps)")?;
    for name in attach::PROGRAMS {
        load_program(&mut ebpf, name)?;
    }
    Ok(ebpf)
}

fn load_program(ebpf: &mut Ebpf, name: &str) -> Result<()> {
    let program = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))?;
    let result = match program {
        aya::programs::Program::Xdp(p) => p.load(),
        aya::programs::Program::SchedClassifier(p) => p.load(),
        _ => bail!("program {name} has an unexpected type"),
    };
    match result {
        Ok(()) => Ok(()),
        Err(ProgramError::LoadError {
            io_error,
            verifier_log,
        }) => {
            bail!("the kernel rejected program {name}: {io_error}\nverifier log:\n{verifier_log}")
        }
        Err(e) => Err(e).with_context(|| format!("loading program {name}")),
    }
}

/// Fails early, with a message an operator understands, when the process
/// lacks the capabilities to load BPF programs.
fn check_privileges() -> Result<()> {
    // CAP_BPF = 39, CAP_NET_ADMIN = 12, CAP_SYS_ADMIN = 21 (covers both on
    // older kernels).
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |bit: u32| effective & (1u64 << bit) != 0;
    if !(has(21) || (has(39) && has(12))) {
        bail!(
            "xlb needs root or CAP_BPF + CAP_NET_ADMIN (+ CAP_PERFMON) to load its programs; effective capabilities are {effective:#x}"
        );
    }
    Ok(())
}
