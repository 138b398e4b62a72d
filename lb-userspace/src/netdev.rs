//! Interface facts and the few sysctls the datapath relies on.

use std::{fs, net::Ipv4Addr};

use anyhow::{Context, Result};
use nix::{
    ifaddrs::getifaddrs,
    net::if_::if_nametoindex,
    time::{ClockId, clock_gettime},
};

pub fn ifindex(name: &str) -> Result<u32> {
    if_nametoindex(name).with_context(|| format!("interface {name} not found"))
}

/// First IPv4 address of an interface (getifaddrs order).
pub fn first_ipv4(name: &str) -> Result<Option<Ipv4Addr>> {
    let found = getifaddrs()
        .context("getifaddrs")?
        .filter(|a| a.interface_name == name)
        .find_map(|a| a.address?.as_sockaddr_in().map(|sin| sin.ip()));
    Ok(found)
}

/// Sets a sysctl under /proc/sys if it does not have the value yet; returns
/// whether it changed.
pub fn ensure_sysctl(path: &str, value: &str) -> Result<bool> {
    let full = format!("/proc/sys/{path}");
    let current = fs::read_to_string(&full).with_context(|| format!("reading {full}"))?;
    if current.trim() == value {
        return Ok(false);
    }
    fs::write(&full, value).with_context(|| format!("writing {value} to {full}"))?;
    Ok(true)
}

/// The kernel must forward what XDP hands it, and must accept source-NATed
/// packets (source = this node's address) that XDP passes up instead of
/// redirecting (first packets of a flow, before the neighbour is known).
///
/// Redirected packets need neither, so a failure (a read-only /proc/sys in
/// a container) is a warning naming the setting to make on the node, not a
/// reason to stop.
pub fn prepare_forwarding(ifaces: &[String]) {
    let mut settings = vec![("net/ipv4/ip_forward".to_string(), "net.ipv4.ip_forward")];
    for iface in ifaces {
        settings.push((
            format!("net/ipv4/conf/{iface}/accept_local"),
            "accept_local",
        ));
    }
    for (path, what) in &settings {
        match ensure_sysctl(path, "1") {
            Ok(true) => tracing::info!(sysctl = %path, "enabled {what}"),
            Ok(false) => {}
            Err(e) => tracing::warn!(
                sysctl = %path,
                error = %format!("{e:#}"),
                "could not set {what}=1: packets xlb hands to the kernel may be dropped; set it on the node"
            ),
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    // Reading CLOCK_MONOTONIC cannot fail on Linux.
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|now| now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Every network namespace has `lo`; it holds 127.0.0.1 once up, as it is
    // where unit tests run.
    #[test]
    fn loopback_is_found_with_its_address() {
        assert!(ifindex("lo").unwrap() > 0);
        assert_eq!(first_ipv4("lo").unwrap(), Some(Ipv4Addr::LOCALHOST));
    }

    #[test]
    fn a_missing_interface_is_named_in_the_error() {
        let error = format!("{:#}", ifindex("xlb-no-such0").unwrap_err());
        assert!(
            error.starts_with("interface xlb-no-such0 not found"),
            "{error}"
        );
        assert_eq!(first_ipv4("xlb-no-such0").unwrap(), None);
    }

    #[test]
    fn the_monotonic_clock_moves_forward() {
        let before = monotonic_ns();
        assert!(before > 0);
        assert!(monotonic_ns() >= before);
    }
}
