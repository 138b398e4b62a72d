//! Bringing the datapath up when the agent starts: load the eBPF object
//! (adopting the maps a previous agent pinned), detach interfaces that are
//! no longer configured, attach the configured ones, and list in
//! `XLB_TX_PORTS` those XDP may redirect to.

use std::path::Path;

use anyhow::{Context, Result, bail};
use aya::Ebpf;

use super::{Limits, Maps, PinDir, attach, ensure_bpffs, load};
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
    if uplinks.ifaces.is_empty() {
        bail!("no --iface given: name the node's uplink interface(s)");
    }
    for iface in uplinks.ifaces {
        netdev::ifindex(iface).with_context(|| format!("--iface {iface}"))?;
    }
    ensure_bpffs(bpffs)?;
    let pins = PinDir::new(bpffs, node_name);
    let mut ebpf = load(&pins, limits)?;
    let mut maps = Maps::take(&mut ebpf)?;

    // Interfaces a previous agent attached to but that are no longer
    // configured.
    for stale in attach::pinned_interfaces(&pins) {
        if !uplinks.ifaces.contains(&stale) {
            attach::detach_interface(&pins, &stale)?;
        }
    }
    netdev::prepare_forwarding(uplinks.ifaces);
    for iface in uplinks.ifaces {
        let hook = attach::attach_interface(&mut ebpf, &pins, iface, uplinks.xdp_mode)?;
        let index = netdev::ifindex(iface)?;
        if uplinks.redirect && hook == attach::IngressHook::Xdp {
            maps.tx_ports
                .insert(index, index, None, 0)
                .with_context(|| format!("adding {iface} to XLB_TX_PORTS"))?;
        } else {
            let _ = maps.tx_ports.remove(index);
        }
    }
    Ok((ebpf, maps))
}
