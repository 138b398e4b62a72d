//! Attaching the programs to the uplinks through pinned bpf_links. The
//! forward path (and replies of remote backends) runs in one of two hooks
//! per interface, the reply path of local backends in tcx egress:
//!
//! - native XDP, on physical NICs: the fast path. Their drivers hand XDP
//!   complete checksums, so an in-place rewrite with incremental checksums
//!   is exact.
//! - tcx ingress, on virtual devices (the veths that join kind/k3d nodes,
//!   bridges) and wherever native XDP is unavailable. Packets from a veth
//!   peer carry partial (offloaded) checksums that XDP cannot see, and
//!   generic XDP loses GRO'd and CHECKSUM_COMPLETE state the same way; the
//!   skb helpers in tc keep both right.
//!
//! A pinned link outlives the agent; a new agent swaps its freshly loaded
//! program into it atomically (`BPF_LINK_UPDATE`), so no packet ever misses
//! the datapath during a restart or an upgrade. A change of hook attaches
//! the new one before the old one is removed.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

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
pub const TC_INGRESS_PROGRAM: &str = "xlb_tc_ingress";
/// Every program the agent loads.
pub const PROGRAMS: [&str; 3] = [XDP_PROGRAM, TC_PROGRAM, TC_INGRESS_PROGRAM];

/// Which hook runs the forward path on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IngressHook {
    /// Native (driver) XDP.
    Xdp,
    /// tcx ingress.
    Tcx,
}

/// Which hook the operator asks for (`--xdp-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum XdpModeChoice {
    /// Native XDP on physical NICs; tcx ingress on virtual devices (veth,
    /// bridges) and where native XDP fails.
    #[default]
    Auto,
    /// Native XDP only: fail if the driver cannot. On a veth this is right
    /// only when its peer sends complete checksums (TX offload off).
    Native,
    /// tcx ingress on every uplink.
    Tc,
    /// Accepted for compatibility: generic (skb) XDP cannot keep offloaded
    /// checksums right, so this is tcx ingress, which runs on the same skbs.
    Generic,
}

/// bpffs refuses names with a dot (EPERM: reserved for the kernel), and
/// VLAN interfaces have one (`eth0.100`); interface names never contain ':',
/// so '.' is written as ':' and ':' separates the suffix.
fn pin_name(iface: &str, suffix: &str) -> String {
    format!("{}:{suffix}", iface.replace('.', ":"))
}

fn xdp_pin(pins: &PinDir, iface: &str) -> PathBuf {
    pins.links().join(pin_name(iface, "xdp"))
}

/// The link an older agent pinned for generic XDP: replaced by tcx ingress.
fn generic_xdp_pin(pins: &PinDir, iface: &str) -> PathBuf {
    pins.links().join(pin_name(iface, "xdp-generic"))
}

fn tc_pin(pins: &PinDir, iface: &str, direction: TcAttachType) -> PathBuf {
    let suffix = match direction {
        TcAttachType::Ingress => "tcx-ingress",
        _ => "tcx-egress",
    };
    pins.links().join(pin_name(iface, suffix))
}

/// A device without a bus device behind it (`/sys/class/net/IF/device`) is
/// virtual: veth, bridge, bond, VLAN, tunnel.
fn is_virtual(iface: &str) -> bool {
    !Path::new("/sys/class/net")
        .join(iface)
        .join("device")
        .exists()
}

/// What attaching changed: the links this start created (removed again if
/// the start fails), and the pinned links it still has to swap its program
/// into.
#[derive(Debug, Default)]
pub struct Attached {
    pub created: Vec<PathBuf>,
    /// Pinned links that already run the new programs.
    pub swapped: usize,
    /// (interface, pinned link, hook) to update once every new link is in.
    pending_updates: Vec<(String, PathBuf, Hook)>,
}

/// One of the three hooks, as pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    Xdp,
    TcxIngress,
    TcxEgress,
}

/// First step of attaching `iface`: chooses the forward hook and attaches
/// every hook that has no pinned link yet (recorded in `attached.created`).
/// Hooks with a pinned link are only noted: [`update_pinned`] swaps the
/// program into them once every interface's new links are in place, so a
/// start that fails here leaves the previous agent's links untouched.
pub fn attach_new(
    ebpf: &mut Ebpf,
    pins: &PinDir,
    iface: &str,
    choice: XdpModeChoice,
    attached: &mut Attached,
) -> Result<IngressHook> {
    let hook = match choice {
        XdpModeChoice::Native => {
            need(ebpf, pins, iface, Hook::Xdp, attached)
                .with_context(|| format!("attaching native XDP to {iface} (--xdp-mode native)"))?;
            IngressHook::Xdp
        }
        XdpModeChoice::Tc => {
            need(ebpf, pins, iface, Hook::TcxIngress, attached)?;
            IngressHook::Tcx
        }
        XdpModeChoice::Generic => {
            tracing::warn!(
                interface = iface,
                "--xdp-mode generic: generic XDP cannot keep offloaded checksums right; \
                 using tcx ingress, which runs on the same packets"
            );
            need(ebpf, pins, iface, Hook::TcxIngress, attached)?;
            IngressHook::Tcx
        }
        XdpModeChoice::Auto if is_virtual(iface) => {
            need(ebpf, pins, iface, Hook::TcxIngress, attached)?;
            IngressHook::Tcx
        }
        XdpModeChoice::Auto => match need(ebpf, pins, iface, Hook::Xdp, attached) {
            Ok(()) => IngressHook::Xdp,
            Err(native_error) => {
                tracing::warn!(interface = iface, error = %format!("{native_error:#}"),
                    "native XDP unavailable, using tcx ingress (slower)");
                need(ebpf, pins, iface, Hook::TcxIngress, attached)?;
                IngressHook::Tcx
            }
        },
    };
    need(ebpf, pins, iface, Hook::TcxEgress, attached)?;
    Ok(hook)
}

/// Attaches `hook` to `iface` unless a pinned link exists (then noted for
/// [`update_pinned`]).
fn need(
    ebpf: &mut Ebpf,
    pins: &PinDir,
    iface: &str,
    hook: Hook,
    attached: &mut Attached,
) -> Result<()> {
    let path = hook_pin(pins, iface, hook);
    if path.exists() {
        attached
            .pending_updates
            .push((iface.to_owned(), path, hook));
        return Ok(());
    }
    match hook {
        Hook::Xdp => attach_xdp(ebpf, &path, iface)?,
        Hook::TcxIngress => attach_tc(ebpf, &path, iface, TcAttachType::Ingress)?,
        Hook::TcxEgress => attach_tc(ebpf, &path, iface, TcAttachType::Egress)?,
    }
    attached.created.push(path);
    Ok(())
}

fn hook_pin(pins: &PinDir, iface: &str, hook: Hook) -> PathBuf {
    match hook {
        Hook::Xdp => xdp_pin(pins, iface),
        Hook::TcxIngress => tc_pin(pins, iface, TcAttachType::Ingress),
        Hook::TcxEgress => tc_pin(pins, iface, TcAttachType::Egress),
    }
}

/// Second step: swaps the new programs into the previous agent's pinned
/// links (`BPF_LINK_UPDATE`, atomic per link). The pinned link's kind is
/// checked before its program is replaced.
pub fn update_pinned(ebpf: &mut Ebpf, attached: &mut Attached) -> Result<()> {
    for (iface, path, hook) in std::mem::take(&mut attached.pending_updates) {
        let pinned = PinnedLink::from_pin(&path)
            .with_context(|| format!("opening pinned link {}", path.display()))?;
        match hook {
            Hook::Xdp => {
                let link = XdpLink::try_from(FdLink::from(pinned)).with_context(|| {
                    format!("pinned link {} is not an XDP link", path.display())
                })?;
                let program: &mut Xdp = ebpf
                    .program_mut(XDP_PROGRAM)
                    .context("XDP program missing")?
                    .try_into()?;
                program
                    .attach_to_link(link)
                    .with_context(|| format!("replacing the XDP program on {iface}"))?;
                attached.swapped += 1;
                tracing::info!(interface = iface, "adopted pinned XDP link");
            }
            Hook::TcxIngress | Hook::TcxEgress => {
                let (name, what) = if hook == Hook::TcxIngress {
                    (TC_INGRESS_PROGRAM, "tcx ingress")
                } else {
                    (TC_PROGRAM, "tcx egress")
                };
                let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                    .with_context(|| format!("pinned link {} is not a tcx link", path.display()))?;
                let program: &mut SchedClassifier = ebpf
                    .program_mut(name)
                    .with_context(|| format!("{what} program {name} missing"))?
                    .try_into()?;
                program
                    .attach_to_link(link)
                    .with_context(|| format!("replacing the {what} program on {iface}"))?;
                attached.swapped += 1;
                tracing::info!(interface = iface, "adopted pinned {what} link");
            }
        }
    }
    Ok(())
}

/// Last step, once the new datapath runs everywhere: removes the link of
/// the forward hook `hook` replaced on `iface` (a new `--xdp-mode`, an
/// older agent's generic XDP), so no packet missed the datapath meanwhile.
pub fn remove_replaced_hooks(pins: &PinDir, iface: &str, hook: IngressHook) -> Result<()> {
    let stale = match hook {
        IngressHook::Xdp => vec![
            tc_pin(pins, iface, TcAttachType::Ingress),
            generic_xdp_pin(pins, iface),
        ],
        IngressHook::Tcx => vec![xdp_pin(pins, iface), generic_xdp_pin(pins, iface)],
    };
    for path in stale {
        if path.exists() {
            remove_if_exists(&path)?;
            tracing::info!(interface = iface, ?hook, pin = %path.display(), "removed the link of the hook replaced");
        }
    }
    Ok(())
}

/// Native XDP, pinned at `path`.
fn attach_xdp(ebpf: &mut Ebpf, path: &Path, iface: &str) -> Result<()> {
    let program: &mut Xdp = ebpf
        .program_mut(XDP_PROGRAM)
        .context("XDP program missing")?
        .try_into()?;
    let link_id = program
        .attach(iface, XdpMode::Driver)
        .with_context(|| format!("attaching native XDP to {iface}"))?;
    let link = program.take_link(link_id)?;
    let fd_link = FdLink::try_from(link).with_context(|| {
        format!("XDP on {iface} was attached without a bpf_link (kernel < 5.9?)")
    })?;
    fd_link
        .pin(path)
        .with_context(|| format!("pinning XDP link at {}", path.display()))?;
    tracing::info!(interface = iface, "attached native XDP program");
    Ok(())
}

/// A tcx program (ingress or egress), pinned at `path`.
fn attach_tc(ebpf: &mut Ebpf, path: &Path, iface: &str, direction: TcAttachType) -> Result<()> {
    let (name, what) = match direction {
        TcAttachType::Ingress => (TC_INGRESS_PROGRAM, "tcx ingress"),
        _ => (TC_PROGRAM, "tcx egress"),
    };
    let program: &mut SchedClassifier = ebpf
        .program_mut(name)
        .with_context(|| format!("{what} program {name} missing"))?
        .try_into()?;
    let link_id = program
        .attach_with_options(
            iface,
            direction,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .with_context(|| format!("attaching {what} to {iface} (needs Linux >= 6.6)"))?;
    let link = program.take_link(link_id)?;
    let fd_link = FdLink::try_from(link).context("tcx link is not a bpf_link")?;
    fd_link
        .pin(path)
        .with_context(|| format!("pinning {what} link at {}", path.display()))?;
    tracing::info!(interface = iface, "attached {what} program");
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

/// The hooks `iface` has pinned links for: `xdp`, `tcx-ingress`,
/// `tcx-egress` (for the metrics and the readiness check).
pub fn attached_hooks(pins: &PinDir, iface: &str) -> Vec<&'static str> {
    [
        (xdp_pin(pins, iface), "xdp"),
        (tc_pin(pins, iface, TcAttachType::Ingress), "tcx-ingress"),
        (tc_pin(pins, iface, TcAttachType::Egress), "tcx-egress"),
    ]
    .into_iter()
    .filter(|(path, _)| path.exists())
    .map(|(_, hook)| hook)
    .collect()
}

/// Whether `iface` runs the whole datapath: a forward hook and tcx egress.
pub fn fully_attached(pins: &PinDir, iface: &str) -> bool {
    let hooks = attached_hooks(pins, iface);
    hooks.contains(&"tcx-egress") && (hooks.contains(&"xdp") || hooks.contains(&"tcx-ingress"))
}

/// Detaches every program from `iface` by removing its link pins (the link
/// goes away with its last reference).
pub fn detach_interface(pins: &PinDir, iface: &str) -> Result<()> {
    for path in [
        xdp_pin(pins, iface),
        generic_xdp_pin(pins, iface),
        tc_pin(pins, iface, TcAttachType::Ingress),
        tc_pin(pins, iface, TcAttachType::Egress),
    ] {
        remove_if_exists(&path)?;
    }
    tracing::info!(interface = iface, "detached");
    Ok(())
}

pub fn remove_if_exists(path: &Path) -> Result<()> {
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
