//! Bringing the datapath up when the agent starts, as one transaction:
//!
//! 1. judge every pinned map against what this build wants (`pinned`);
//! 2. load the object: maps that are fine are adopted, maps of another
//!    size or layout get a new map pinned aside (`<name>:pending`), and the
//!    entries of a resized one are copied into it (`migrate`);
//! 3. attach the hooks that have no pinned link yet;
//! 4. swap the new programs into the previous agent's pinned links;
//! 5. commit: copy what the old datapath wrote meanwhile, rename the new
//!    maps over the old pins, write the layout stamps, remove the links of
//!    replaced hooks and of interfaces no longer configured.
//!
//! Until step 4 the previous agent's programs and maps are untouched and
//! keep forwarding; a failure before it removes what this start pinned,
//! leaving the node as it was. A failure in step 4 (the kernel refusing
//! `BPF_LINK_UPDATE` on a link of the right kind) cannot be undone, since
//! the old program is not ours to re-attach: the new maps are committed so
//! the links that run the new programs keep their state, and the error is
//! reported.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::Ebpf;

use super::{
    Limits, Maps, PENDING_SUFFIX, PinDir, attach, ensure_bpffs, layout, load_with,
    maps::names,
    migrate::{self, Pass},
    pinned::{self, Shape, Verdict},
    wanted_shapes,
};
use crate::netdev;

/// Which interfaces the datapath runs on, and how.
#[derive(Clone, Copy, Debug)]
pub struct Uplinks<'a> {
    pub ifaces: &'a [String],
    pub xdp_mode: attach::XdpModeChoice,
    /// Redirect in XDP where the driver supports native XDP.
    pub redirect: bool,
}

/// Loads and attaches the datapath of `node_name`; the returned object
/// holds the programs, and dropping it leaves them pinned and running.
pub fn start(
    bpffs: &Path,
    node_name: &str,
    limits: Limits,
    uplinks: Uplinks,
) -> Result<(Ebpf, Maps)> {
    // Everything that can be checked without the kernel, first.
    if uplinks.ifaces.is_empty() {
        bail!("no --iface given: name the node's uplink interface(s)");
    }
    for iface in uplinks.ifaces {
        netdev::ifindex(iface).with_context(|| format!("--iface {iface}"))?;
    }
    let wanted = wanted_shapes(limits)?;
    ensure_bpffs(bpffs)?;
    let pins = PinDir::new(bpffs, node_name);
    let mut undo = Undo::record(&pins);
    match bring_up(&pins, limits, &wanted, uplinks, &mut undo) {
        Ok(up) => Ok(up),
        Err(e) => {
            undo.roll_back();
            Err(e)
        }
    }
}

/// A map that this start pins aside and renames over the old pin at commit.
struct Aside {
    name: String,
    verdict: Verdict,
}

fn bring_up(
    pins: &PinDir,
    limits: Limits,
    wanted: &[(String, Shape)],
    uplinks: Uplinks,
    undo: &mut Undo,
) -> Result<(Ebpf, Maps)> {
    remove_leftover_pending(pins);
    let asides = judge_pins(pins, wanted)?;
    undo.asides = asides.iter().map(|a| a.name.clone()).collect();
    let elsewhere: Vec<(String, PathBuf)> = asides
        .iter()
        .map(|a| (a.name.clone(), pins.pending_map(&a.name)))
        .collect();
    let mut ebpf = load_with(pins, limits, &elsewhere)?;
    copy_resized(pins, &asides, Pass::Bulk);
    let mut maps = Maps::take(&mut ebpf)?;

    let mut hooks = Vec::new();
    for iface in uplinks.ifaces {
        let hook =
            attach::attach_new(&mut ebpf, pins, iface, uplinks.xdp_mode, &mut undo.attached)?;
        hooks.push((iface, hook));
    }
    // Once a previous agent's link runs the new programs, which use the new
    // maps, those must stay whatever happens next (`attached.swapped`).
    attach::update_pinned(&mut ebpf, &mut undo.attached)?;

    // The old programs are off every link now: copy what they wrote while
    // the new ones were being attached, then make the new maps the pins.
    copy_resized(pins, &asides, Pass::Catchup);
    commit_asides(pins, &undo.asides)?;
    undo.asides.clear();
    if let Err(e) = layout::write(&pins.map(layout::STAMPS)) {
        tracing::warn!(error = %format!("{e:#}"), "writing the layout stamps failed; the next start judges the maps by their sizes only");
    }
    for stale in attach::pinned_interfaces(pins) {
        if !uplinks.ifaces.contains(&stale) {
            attach::detach_interface(pins, &stale)?;
        }
    }
    netdev::prepare_forwarding(uplinks.ifaces);
    for (iface, hook) in hooks {
        attach::remove_replaced_hooks(pins, iface, hook)?;
        let index = netdev::ifindex(iface)?;
        if uplinks.redirect && hook == attach::IngressHook::Xdp {
            maps.tx_ports
                .insert(index, index, None, 0)
                .with_context(|| format!("adding {iface} to XLB_TX_PORTS"))?;
        } else {
            let _ = maps.tx_ports.remove(index);
        }
    }
    undo.disarm();
    Ok((ebpf, maps))
}

/// Judges every pinned map and says what will happen to it. Returns the
/// maps to load aside.
fn judge_pins(pins: &PinDir, wanted: &[(String, Shape)]) -> Result<Vec<Aside>> {
    let stamps_path = pins.map(layout::STAMPS);
    let stamps = match layout::read(&stamps_path) {
        Ok(stamps) => stamps,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "unreadable layout stamps: judging the pinned maps by their sizes only");
            None
        }
    };
    let wanted_stamps = layout::wanted();
    let mut asides = Vec::new();
    let mut pinned_any = false;
    for (name, shape) in wanted {
        let path = pins.map(name);
        let pinned_stamp = stamps.as_ref().and_then(|s| s.get(name).copied());
        let verdict = pinned::judge(
            &path,
            *shape,
            pinned_stamp,
            wanted_stamps.get(name.as_str()).copied(),
        )?;
        pinned_any |= verdict != Verdict::Absent;
        match &verdict {
            Verdict::Absent | Verdict::Adopt => continue,
            Verdict::Resize { pinned }
                if migrate::copyable(name) && pinned.max_entries == shape.max_entries =>
            {
                tracing::warn!(
                    map = %name,
                    pinned_flags = pinned.flags,
                    wanted_flags = shape.flags,
                    "pinned map {name} has flags {:#x}, this agent wants {:#x}: its entries are copied into a new map with them",
                    pinned.flags,
                    shape.flags,
                )
            }
            Verdict::Resize { pinned } if migrate::copyable(name) => tracing::warn!(
                map = %name,
                pinned_entries = pinned.max_entries,
                wanted_entries = shape.max_entries,
                "pinned map {name} has {} entries, this agent wants {}: its entries are copied into a new map of the wanted size",
                pinned.max_entries,
                shape.max_entries,
            ),
            Verdict::Resize { pinned } => tracing::warn!(
                map = %name,
                pinned_entries = pinned.max_entries,
                wanted_entries = shape.max_entries,
                "pinned map {name} has {} entries, this agent wants {}: replaced by a new map ({})",
                pinned.max_entries,
                shape.max_entries,
                what_is_lost(name),
            ),
            Verdict::Replace { pinned, why } => tracing::warn!(
                map = %name,
                pinned = %pinned,
                wanted = %shape,
                "incompatible pinned map {name} ({why}): replaced by a new empty map once the new programs run ({})",
                what_is_lost(name),
            ),
        }
        asides.push(Aside {
            name: name.clone(),
            verdict,
        });
    }
    if pinned_any && stamps.is_none() {
        tracing::info!(
            "the pinned maps carry no layout stamps (an agent older than them, or a failed start): judged by their kernel sizes only"
        );
    }
    Ok(asides)
}

/// What replacing `name` by an empty map costs.
fn what_is_lost(name: &str) -> &'static str {
    match name {
        names::FLOWS => "established flows through xlb are lost",
        names::AFFINITY => "session affinity pins are lost",
        names::SNAT_OWNERS => {
            "SNAT ports of flows that lost one entry to the flow table's LRU may be taken again"
        }
        names::STATS | names::GLOBAL => "its counters restart from zero",
        names::CONFIG | names::TX_PORTS | names::CLUSTER_NETWORKS => "the agent writes it again",
        names::L2_ADDRESSES | names::L2_LIVENESS => {
            "the agent writes it again; until then this node answers no ARP/NDP for its Service addresses"
        }
        names::L2_STATS => "the ARP/NDP responder's counters restart from zero",
        names::LOCAL_BACKENDS => {
            "the agent writes it again; backends that left their Services before this start are no longer kept from leaking replies"
        }
        _ => {
            "the agent programs it again from the source; flows of services whose ids change are swept"
        }
    }
}

/// Copies the entries of every resized map into its new map.
fn copy_resized(pins: &PinDir, asides: &[Aside], pass: Pass) {
    for aside in asides {
        if !matches!(aside.verdict, Verdict::Resize { .. }) || !migrate::copyable(&aside.name) {
            continue;
        }
        let result = migrate::copy(
            &aside.name,
            &pins.map(&aside.name),
            &pins.pending_map(&aside.name),
            &pins.map(names::SERVICES),
            pass,
        );
        match result {
            Ok(c) if pass == Pass::Bulk => tracing::info!(
                map = %aside.name,
                copied = c.copied,
                not_kept = c.skipped,
                "copied the entries of the pinned map into its resized successor"
            ),
            Ok(c) => tracing::debug!(
                map = %aside.name,
                copied = c.copied,
                "copied what the previous datapath wrote during the switch"
            ),
            Err(e) => tracing::warn!(
                map = %aside.name,
                error = %format!("{e:#}"),
                "copying the entries of the pinned map failed; its successor starts with what was copied"
            ),
        }
    }
}

/// Renames each new map over its old pin (atomic on bpffs: the name never
/// points at nothing).
fn commit_asides(pins: &PinDir, asides: &[String]) -> Result<()> {
    for name in asides {
        let pending = pins.pending_map(name);
        let path = pins.map(name);
        fs::rename(&pending, &path)
            .with_context(|| format!("renaming {} over {}", pending.display(), path.display()))?;
        tracing::info!(map = %name, "the new map replaced the pinned one");
    }
    Ok(())
}

/// Maps pinned aside by a start that died before it committed or rolled
/// back: nothing runs with them unless that start got as far as swapping
/// programs, and then its maps are the ones to keep.
fn remove_leftover_pending(pins: &PinDir) {
    let Ok(entries) = fs::read_dir(pins.maps()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(PENDING_SUFFIX) {
            tracing::warn!(pin = %entry.path().display(), "removing a map an interrupted start left pinned aside");
            let _ = attach::remove_if_exists(&entry.path());
        }
    }
}

/// What a failing start removes again.
struct Undo {
    pins: PinDir,
    root_existed: bool,
    maps_before: BTreeSet<String>,
    attached: attach::Attached,
    /// Maps pinned aside and not yet committed.
    asides: Vec<String>,
    armed: bool,
}

impl Undo {
    fn record(pins: &PinDir) -> Self {
        let maps_before = fs::read_dir(pins.maps())
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        Self {
            pins: pins.clone(),
            root_existed: pins.root.exists(),
            maps_before,
            attached: attach::Attached::default(),
            asides: Vec::new(),
            armed: true,
        }
    }

    fn disarm(&mut self) {
        self.armed = false;
    }

    fn roll_back(&mut self) {
        if !self.armed {
            return;
        }
        if self.attached.swapped > 0 {
            // The new programs run on some of the previous links: keep their
            // maps and links, so what runs keeps its state.
            if let Err(e) = commit_asides(&self.pins, &self.asides) {
                tracing::error!(error = %format!("{e:#}"), "keeping the new maps failed");
            }
            tracing::error!(
                "the start failed after the new programs replaced the previous ones on some links; they keep running with the new maps"
            );
            return;
        }
        for path in self.attached.created.drain(..).rev() {
            match attach::remove_if_exists(&path) {
                Ok(()) => {
                    tracing::info!(pin = %path.display(), "start failed: removed the link it attached")
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "removing a link this start attached failed")
                }
            }
        }
        for name in self.asides.drain(..) {
            let _ = attach::remove_if_exists(&self.pins.pending_map(&name));
        }
        if let Ok(entries) = fs::read_dir(self.pins.maps()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !self.maps_before.contains(&name) {
                    let _ = attach::remove_if_exists(&entry.path());
                }
            }
        }
        if !self.root_existed {
            let _ = fs::remove_dir_all(&self.pins.root);
        }
        if self.maps_before.is_empty() {
            tracing::info!("start failed: nothing of it is left pinned");
        } else {
            tracing::info!(
                "start failed: the previous agent's programs, links and maps are as they were and keep forwarding"
            );
        }
    }
}
