//! Interface facts and the few sysctls the datapath relies on.

use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context, Result};
use nix::{
    ifaddrs::getifaddrs,
    net::if_::if_nametoindex,
    time::{ClockId, clock_gettime},
};

pub fn ifindex(name: &str) -> Result<u32> {
    if_nametoindex(name).with_context(|| format!("interface {name} not found"))
}

/// The link-layer (Ethernet) address of an interface, from its
/// `AF_PACKET` entry in getifaddrs: netlink's view of this network
/// namespace (a `/sys/class/net` mounted for another namespace would not
/// have it). `None` for a device without a 6-byte address.
pub fn mac(name: &str) -> Result<Option<[u8; 6]>> {
    let addrs = getifaddrs().context("getifaddrs")?;
    Ok(addrs.filter(|a| a.interface_name == name).find_map(|a| {
        a.address
            .and_then(|s| s.as_link_addr().and_then(|l| l.addr()))
    }))
}

/// First IPv4 address of an interface (getifaddrs order).
pub fn first_ipv4(name: &str) -> Result<Option<Ipv4Addr>> {
    let found = getifaddrs()
        .context("getifaddrs")?
        .filter(|a| a.interface_name == name)
        .find_map(|a| a.address?.as_sockaddr_in().map(|sin| sin.ip()));
    Ok(found)
}

/// First IPv6 address of an interface (getifaddrs order) that can be a
/// SNAT source towards backends on other nodes: not link-local (fe80::/10,
/// meaningless off the link), loopback, multicast or unspecified. Unique
/// local addresses (fc00::/7) count: many clusters number nodes and pods
/// from them.
pub fn first_global_ipv6(name: &str) -> Result<Option<Ipv6Addr>> {
    let found = getifaddrs()
        .context("getifaddrs")?
        .filter(|a| a.interface_name == name)
        .filter_map(|a| a.address?.as_sockaddr_in6().map(|sin6| sin6.ip()))
        .find(|ip| is_snat_source_v6(*ip));
    Ok(found)
}

fn is_snat_source_v6(ip: Ipv6Addr) -> bool {
    !(ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_unicast_link_local())
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

/// The kernel must forward what XDP hands it (IPv4 and IPv6), and must
/// accept source-NATed IPv4 packets (source = this node's address) that XDP
/// passes up instead of redirecting (first packets of a flow, before the
/// neighbour is known). IPv6 has no `accept_local`: the kernel takes a
/// packet from one of its own addresses as it is.
///
/// Redirected packets need neither, so a failure (a read-only /proc/sys in
/// a container) is a warning naming the setting to make on the node, not a
/// reason to stop.
pub fn prepare_forwarding(ifaces: &[String]) {
    let mut settings = vec![("net/ipv4/ip_forward".to_string(), "net.ipv4.ip_forward")];
    if ipv6_forwarding_is_safe(ifaces) {
        settings.push((IPV6_FORWARDING.to_string(), "net.ipv6.conf.all.forwarding"));
    }
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

const IPV6_FORWARDING: &str = "net/ipv6/conf/all/forwarding";

/// Whether the agent may turn IPv6 forwarding on. Not on a kernel without
/// IPv6 (nothing to forward, no warning wanted). Not when it is off and an
/// interface takes router advertisements only while not forwarding
/// (`accept_ra=1`, the default): forwarding would drop the node's
/// RA-learned IPv6 routes, cutting the node off. There a warning names the
/// settings for the operator to make (`accept_ra=2` keeps RAs while
/// forwarding); a dual-stack Kubernetes node has forwarding on already.
fn ipv6_forwarding_is_safe(ifaces: &[String]) -> bool {
    let Ok(current) = fs::read_to_string(format!("/proc/sys/{IPV6_FORWARDING}")) else {
        tracing::debug!("no IPv6 in this kernel: IPv6 forwarding left alone");
        return false;
    };
    if current.trim() == "1" {
        return true;
    }
    let taking_ras: Vec<&String> = ifaces
        .iter()
        .filter(|iface| {
            fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{iface}/accept_ra"))
                .is_ok_and(|value| accepts_ras_only_without_forwarding(&value))
        })
        .collect();
    if taking_ras.is_empty() {
        return true;
    }
    tracing::warn!(
        ifaces = ?taking_ras,
        "net.ipv6.conf.all.forwarding is 0 and left so: these interfaces take router advertisements (accept_ra=1), which forwarding would stop; IPv6 packets xlb hands to the kernel may be dropped. Set accept_ra=2 on them and forwarding=1 on the node"
    );
    false
}

/// `accept_ra` 1: router advertisements are taken unless forwarding is on
/// (0: never, 2: even when forwarding).
fn accepts_ras_only_without_forwarding(accept_ra: &str) -> bool {
    accept_ra.trim() == "1"
}

/// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range`).
pub fn ephemeral_ports() -> Result<(u16, u16)> {
    let path = "/proc/sys/net/ipv4/ip_local_port_range";
    let text = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    parse_port_range(&text).with_context(|| format!("{path}: {text:?}"))
}

/// `ip_local_port_range`'s text: two numbers separated by white space.
fn parse_port_range(text: &str) -> Result<(u16, u16)> {
    let mut numbers = text.split_whitespace().map(str::parse::<u16>);
    match (numbers.next(), numbers.next()) {
        (Some(Ok(min)), Some(Ok(max))) => Ok((min, max)),
        _ => anyhow::bail!("expected two port numbers"),
    }
}

/// Warns when the SNAT range shares ports with the kernel's ephemeral range:
/// a node connection that later gets one of them towards a backend would
/// collide with a live SNAT flow (audit A-11).
pub fn warn_if_ephemeral(snat_min: u16, snat_max: u16) {
    match ephemeral_ports() {
        Ok((min, max)) if snat_min <= max && min <= snat_max => tracing::warn!(
            snat_ports = %format!("{snat_min}-{snat_max}"),
            ephemeral_ports = %format!("{min}-{max}"),
            "the SNAT port range overlaps net.ipv4.ip_local_port_range: node connections may take a port a SNAT flow uses; choose --snat-ports outside it"
        ),
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %format!("{e:#}"), "no ephemeral port range to compare"),
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock the datapath reads (its coarse
/// variant, `bpf_ktime_get_coarse_ns`, at most a tick behind).
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
    fn the_ephemeral_range_is_read_as_the_kernel_writes_it() {
        assert_eq!(parse_port_range("32768\t60999\n").unwrap(), (32768, 60999));
        assert!(parse_port_range("32768").is_err());
        let (min, max) = ephemeral_ports().unwrap();
        assert!(min <= max);
    }

    #[test]
    fn loopback_is_found_with_its_address() {
        assert!(ifindex("lo").unwrap() > 0);
        assert_eq!(first_ipv4("lo").unwrap(), Some(Ipv4Addr::LOCALHOST));
    }

    #[test]
    fn link_local_and_loopback_are_no_ipv6_snat_source_but_ula_and_global_are() {
        for (text, usable) in [
            ("fe80::1", false),
            ("febf::1", false),
            ("::1", false),
            ("::", false),
            ("ff02::1", false),
            ("fd00:10::1", true),
            ("2001:db8::1", true),
        ] {
            let ip: Ipv6Addr = text.parse().unwrap();
            assert_eq!(is_snat_source_v6(ip), usable, "{text}");
        }
        // `lo` holds only ::1 (if IPv6 is on at all): no SNAT source.
        assert_eq!(first_global_ipv6("lo").unwrap(), None);
    }

    #[test]
    fn only_accept_ra_1_loses_router_advertisements_to_forwarding() {
        assert!(accepts_ras_only_without_forwarding("1\n"));
        assert!(!accepts_ras_only_without_forwarding("0\n"));
        assert!(!accepts_ras_only_without_forwarding("2\n"));
    }

    #[test]
    fn a_missing_interface_is_named_in_the_error() {
        let error = format!("{:#}", ifindex("xlb-no-such0").unwrap_err());
        assert!(
            error.starts_with("interface xlb-no-such0 not found"),
            "{error}"
        );
        assert_eq!(first_ipv4("xlb-no-such0").unwrap(), None);
        assert_eq!(first_global_ipv6("xlb-no-such0").unwrap(), None);
    }

    #[test]
    fn the_monotonic_clock_moves_forward() {
        let before = monotonic_ns();
        assert!(before > 0);
        assert!(monotonic_ns() >= before);
    }
}
