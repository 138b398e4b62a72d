//! Interface facts and the few sysctls the datapath relies on.

use std::{ffi::CString, fs, net::Ipv4Addr};

use anyhow::{Context, Result, bail};

pub fn ifindex(name: &str) -> Result<u32> {
    let c = CString::new(name).with_context(|| format!("bad interface name {name:?}"))?;
    // SAFETY: valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        bail!("interface {name} not found");
    }
    Ok(index)
}

/// First IPv4 address of an interface (getifaddrs order).
pub fn first_ipv4(name: &str) -> Result<Option<Ipv4Addr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getifaddrs");
    }
    let mut found = None;
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list returned by getifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a valid C string for the list's lifetime.
        let ifname = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if ifname.to_bytes() != name.as_bytes() {
            continue;
        }
        // SAFETY: ifa_addr is non-null; the family says how to read it.
        if unsafe { (*ifa.ifa_addr).sa_family } as i32 == libc::AF_INET {
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            found = Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            break;
        }
    }
    // SAFETY: `head` came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
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
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
