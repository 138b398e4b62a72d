//! Attaching the programs to the uplinks through pinned bpf_links: XDP for
//! the forward path and remote replies, tcx egress for replies of local
//! backends. A pinned link outlives the agent; a new agent swaps its freshly
//! loaded program into it atomically (`BPF_LINK_UPDATE`), so no packet ever
//! misses the datapath during a restart or an upgrade.

use std::{collections::BTreeSet, fs, path::Path};

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};

use super::PinDir;

pub const XDP_PROGRAM: &str = "xlb_xdp";
pub const TC_PROGRAM: &str = "xlb_tc_egress";

/// How the XDP program ended up attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttachMode {
    Native,
    /// Generic (skb) XDP: works everywhere, slower; redirects are not used.
    Generic,
}

/// Which XDP mode the operator asks for (`--xdp-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum XdpModeChoice {
    /// Native, falling back to generic with a warning.
    #[default]
    Auto,
    /// Native only: fail if the driver cannot.
    Native,
    /// Generic (skb) only: for drivers whose native XDP misbehaves.
    Generic,
}

/// bpffs refuses names with a dot (EPERM: reserved for the kernel), and
/// VLAN interfaces have one (`eth0.100`); interface names never contain ':',
/// so '.' is written as ':' and ':' separates the suffix.
fn pin_name(iface: &str, suffix: &str) -> String {
    format!("{}:{suffix}", iface.replace('.', ":"))
}

fn xdp_pin(pins: &PinDir, iface: &str) -> std::path::PathBuf {
    pins.links().join(pin_name(iface, "xdp"))
}

fn tc_pin(pins: &PinDir, iface: &str) -> std::path::PathBuf {
    pins.links().join(pin_name(iface, "tcx-egress"))
}

fn generic_marker(pins: &PinDir, iface: &str) -> std::path::PathBuf {
    // bpffs holds only BPF objects, so the mode is remembered in the link
    // pin's name.
    pins.links().join(pin_name(iface, "xdp-generic"))
}

/// Attaches (or re-attaches, adopting pinned links) both programs to
/// `iface`. Returns the XDP mode in effect.
pub fn attach_interface(
    ebpf: &mut Ebpf,
    pins: &PinDir,
    iface: &str,
    choice: XdpModeChoice,
) -> Result<XdpAttachMode> {
    let mode = attach_xdp(ebpf, pins, iface, choice)?;
    attach_tc(ebpf, pins, iface)?;
    Ok(mode)
}

fn attach_xdp(
    ebpf: &mut Ebpf,
    pins: &PinDir,
    iface: &str,
    choice: XdpModeChoice,
) -> Result<XdpAttachMode> {
    let program: &mut Xdp = ebpf
        .program_mut(XDP_PROGRAM)
        .context("XDP program missing")?
        .try_into()?;
    for (path, mode) in [
        (xdp_pin(pins, iface), XdpAttachMode::Native),
        (generic_marker(pins, iface), XdpAttachMode::Generic),
    ] {
        let wanted = match choice {
            XdpModeChoice::Auto => true,
            XdpModeChoice::Native => mode == XdpAttachMode::Native,
            XdpModeChoice::Generic => mode == XdpAttachMode::Generic,
        };
        if path.exists() && !wanted {
            // The operator changed the mode: drop the old link first (the
            // interface misses the datapath for that moment).
            remove_if_exists(&path)?;
            tracing::warn!(
                interface = iface,
                ?mode,
                "replacing XDP link of another mode"
            );
            continue;
        }
        if path.exists() {
            let pinned = PinnedLink::from_pin(&path)
                .with_context(|| format!("opening pinned link {}", path.display()))?;
            let link = XdpLink::try_from(FdLink::from(pinned))
                .with_context(|| format!("pinned link {} is not an XDP link", path.display()))?;
            program
                .attach_to_link(link)
                .with_context(|| format!("replacing the XDP program on {iface}"))?;
            tracing::info!(interface = iface, ?mode, "adopted pinned XDP link");
            return Ok(mode);
        }
    }
    let (link_id, mode) = match choice {
        XdpModeChoice::Generic => (
            program
                .attach(iface, XdpMode::Skb)
                .with_context(|| format!("attaching generic XDP to {iface}"))?,
            XdpAttachMode::Generic,
        ),
        XdpModeChoice::Native => (
            program
                .attach(iface, XdpMode::Driver)
                .with_context(|| format!("attaching native XDP to {iface} (--xdp-mode native)"))?,
            XdpAttachMode::Native,
        ),
        XdpModeChoice::Auto => match program.attach(iface, XdpMode::Driver) {
            Ok(id) => (id, XdpAttachMode::Native),
            Err(native_error) => {
                let id = program.attach(iface, XdpMode::Skb).with_context(|| {
                    format!("attaching XDP to {iface} (native mode failed too: {native_error})")
                })?;
                tracing::warn!(interface = iface, error = %native_error,
                    "native XDP unavailable, fell back to generic XDP (slower)");
                (id, XdpAttachMode::Generic)
            }
        },
    };
    let link = program.take_link(link_id)?;
    let fd_link = FdLink::try_from(link).with_context(|| {
        format!("XDP on {iface} was attached without a bpf_link (kernel < 5.9?)")
    })?;
    let path = match mode {
        XdpAttachMode::Native => xdp_pin(pins, iface),
        XdpAttachMode::Generic => generic_marker(pins, iface),
    };
    fd_link
        .pin(&path)
        .with_context(|| format!("pinning XDP link at {}", path.display()))?;
    tracing::info!(interface = iface, ?mode, "attached XDP program");
    Ok(mode)
}

fn attach_tc(ebpf: &mut Ebpf, pins: &PinDir, iface: &str) -> Result<()> {
    let program: &mut SchedClassifier = ebpf
        .program_mut(TC_PROGRAM)
        .context("TC program missing")?
        .try_into()?;
    let path = tc_pin(pins, iface);
    if path.exists() {
        let pinned = PinnedLink::from_pin(&path)
            .with_context(|| format!("opening pinned link {}", path.display()))?;
        let link = SchedClassifierLink::try_from(FdLink::from(pinned))
            .with_context(|| format!("pinned link {} is not a tcx link", path.display()))?;
        program
            .attach_to_link(link)
            .with_context(|| format!("replacing the tcx egress program on {iface}"))?;
        tracing::info!(interface = iface, "adopted pinned tcx egress link");
        return Ok(());
    }
    let link_id = program
        .attach_with_options(
            iface,
            TcAttachType::Egress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .with_context(|| format!("attaching tcx egress to {iface} (needs Linux >= 6.6)"))?;
    let link = program.take_link(link_id)?;
    let fd_link = FdLink::try_from(link).context("tcx link is not a bpf_link")?;
    fd_link
        .pin(&path)
        .with_context(|| format!("pinning tcx link at {}", path.display()))?;
    tracing::info!(interface = iface, "attached tcx egress program");
    Ok(())
}

/// Interfaces that have pinned links under `pins`.
pub fn pinned_interfaces(pins: &PinDir) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Ok(entries) = fs::read_dir(pins.links()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some((iface, _)) = name.rsplit_once(':') {
                out.insert(iface.replace(':', "."));
            }
        }
    }
    out
}

/// Detaches both programs from `iface` by removing its link pins (the link
/// goes away with its last reference).
pub fn detach_interface(pins: &PinDir, iface: &str) -> Result<()> {
    for path in [
        xdp_pin(pins, iface),
        generic_marker(pins, iface),
        tc_pin(pins, iface),
    ] {
        remove_if_exists(&path)?;
    }
    tracing::info!(interface = iface, "detached");
    Ok(())
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// Removes everything pinned for a node: links first (detaching the
/// programs), then maps.
pub fn reset(pins: &PinDir) -> Result<()> {
    for iface in pinned_interfaces(pins) {
        detach_interface(pins, &iface)?;
    }
    if pins.root.exists() {
        fs::remove_dir_all(&pins.root)
            .with_context(|| format!("removing {}", pins.root.display()))?;
    }
    Ok(())
}
