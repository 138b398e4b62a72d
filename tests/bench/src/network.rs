//! The benchmark's network: three namespaces in a line, every frame from
//! the generator through the device under test to the sink.
//!
//! ```text
//!  [gen] gen0 ─── dut0 [dut: system under test] dut1 ─── sink1 [sink]
//!  CPU 0: BPF_PROG_TEST_RUN live frames        CPU 1: dut0's (threaded) NAPI,
//!  (bench_gen redirects out of gen0)          everything the DUT does, and the
//!                                              sink's XDP counter (bench_sink)
//! ```
//!
//! Both links carry both families: 10.0.8.0/24 and fd00:8::/64 on the
//! generator's side, 10.0.9.0/24 and fd00:9::/64 on the sink's. The DUT
//! routes the clients (10.101.0.0/16, fd00:101::/64) back to the generator
//! and the backends (10.128.0.0/9, fd00:128::/64) to the sink.
//!
//! For klipper-lb's two-hop path (`System::KlipperTwoHop`), a fourth
//! namespace stands for K3s's svclb pod, hanging off the DUT by its own
//! veth pair (the pod network, 10.42.0.0/24): frames go dut0 → svc0 → the
//! pod → svc0 → dut1. The pod's veth is processed in the same softirq on
//! CPU 1 as dut0's NAPI (a veth transmit queues to the backlog of the CPU
//! that sends), so its work is on the DUT CPU too.
//!
//! ```text
//!                         [svclb pod] eth0 10.42.0.2
//!                                       │
//!  [gen] gen0 ─── dut0 [dut]  svc0 10.42.0.1  dut1 ─── sink1 [sink]
//! ```

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::Command,
};

use anyhow::{Context, Result, bail};
use xlb_tests::netns::{Namespace, VethEnd, ns_sh, veth};

use crate::results::Family;

pub const DUT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 8, 2);
pub const DUT_SINK_SIDE: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 1);
/// Service i listens on DUT_ADDR:(PORT_BASE + i), as K3s ServiceLB does
/// (every LoadBalancer port is a port on the node address).
pub const PORT_BASE: u16 = 10_000;
pub const CLIENT_BASE: Ipv4Addr = Ipv4Addr::new(10, 101, 0, 0);
pub const DUT_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 8, 0, 0, 0, 0, 0, 2);
pub const DUT_SINK_SIDE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 0, 0, 0, 0, 0, 1);
pub const CLIENT_BASE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x101, 0, 0, 0, 0, 0, 0);
/// The svclb pod's address (klipper-lb's two-hop path), its node-side
/// gateway and the pod network.
pub const POD_ADDR: Ipv4Addr = Ipv4Addr::new(10, 42, 0, 2);
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 42, 0, 1);
pub const POD_CIDR: &str = "10.42.0.0/24";

/// The node address the Services listen on (dut0's), in `family`.
pub fn dut_addr(family: Family) -> IpAddr {
    match family {
        Family::V4 => DUT_ADDR.into(),
        Family::V6 => DUT_ADDR6.into(),
    }
}

/// dut1's address: the node's InternalIP, and the source of SNAT and
/// masquerade towards the backends, in `family`.
pub fn dut_sink_side(family: Family) -> IpAddr {
    match family {
        Family::V4 => DUT_SINK_SIDE.into(),
        Family::V6 => DUT_SINK_SIDE6.into(),
    }
}

/// `base` + `k`, in its family.
pub fn nth(base: IpAddr, k: u32) -> IpAddr {
    match base {
        IpAddr::V4(a) => Ipv4Addr::from(u32::from(a) + k).into(),
        IpAddr::V6(a) => Ipv6Addr::from(u128::from(a) + u128::from(k)).into(),
    }
}

/// The host prefix of `addr` (`/32` or `/128`).
pub fn host_prefix(addr: IpAddr) -> String {
    format!("{addr}/{}", if addr.is_ipv4() { 32 } else { 128 })
}

pub fn pin_thread_to_cpu(pid: i32, cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "sched_setaffinity({pid}, {cpu}): {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

pub struct BenchNet {
    pub gen_ns: String,
    pub dut: String,
    pub sink: String,
    pub gen_mac: [u8; 6],
    pub dut0_mac: [u8; 6],
    /// The forwarder's rewrite: from dut1 to sink1.
    pub dut1_mac: [u8; 6],
    pub sink1_mac: [u8; 6],
    pub gen0_index: u32,
    pub dir: PathBuf,
    /// Deleted on drop.
    namespaces: Vec<Namespace>,
}

fn mac_of(ns: &str, dev: &str) -> Result<[u8; 6]> {
    let out = ns_sh(ns, &["cat", &format!("/sys/class/net/{dev}/address")]);
    // /sys of the host does not show other namespaces' devices: ask ip.
    let text = match out {
        Ok(t) if !t.trim().is_empty() => t,
        _ => ns_sh(ns, &["ip", "-o", "link", "show", "dev", dev])?,
    };
    let word = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or(text.trim());
    let mut mac = [0u8; 6];
    for (i, part) in word.split(':').enumerate().take(6) {
        mac[i] = u8::from_str_radix(part, 16).with_context(|| format!("MAC of {dev}: {word}"))?;
    }
    Ok(mac)
}

pub fn ifindex_in(ns: &str, dev: &str) -> Result<u32> {
    let text = ns_sh(ns, &["ip", "-o", "link", "show", "dev", dev])?;
    Ok(text.split(':').next().unwrap_or("").trim().parse()?)
}

impl BenchNet {
    pub fn new() -> Result<Self> {
        let p = format!("xb{}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("xlb-bench-{p}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("manifests"))?;
        let (gen_ns, dut, sink) = (format!("{p}-gen"), format!("{p}-dut"), format!("{p}-sink"));
        let namespaces = [&gen_ns, &dut, &sink]
            .into_iter()
            .map(|ns| Namespace::new(ns))
            .collect::<Result<Vec<_>>>()?;
        let mut net = BenchNet {
            gen_ns,
            dut,
            sink,
            gen_mac: [0; 6],
            dut0_mac: [0; 6],
            dut1_mac: [0; 6],
            sink1_mac: [0; 6],
            gen0_index: 0,
            dir,
            namespaces,
        };
        net.wire()?;
        Ok(net)
    }

    fn wire(&mut self) -> Result<()> {
        let (g, d, s) = (self.gen_ns.clone(), self.dut.clone(), self.sink.clone());
        veth(
            VethEnd::new(&g, "gen0", "10.0.8.1/24"),
            VethEnd::new(&d, "dut0", "10.0.8.2/24"),
        )?;
        veth(
            VethEnd::new(&d, "dut1", "10.0.9.1/24"),
            VethEnd::new(&s, "sink1", "10.0.9.2/24"),
        )?;
        // IPv6 on the same links; no duplicate address detection, so the
        // addresses are usable at once.
        for (ns, dev, addr) in [
            (&g, "gen0", "fd00:8::1/64"),
            (&d, "dut0", "fd00:8::2/64"),
            (&d, "dut1", "fd00:9::1/64"),
            (&s, "sink1", "fd00:9::2/64"),
        ] {
            ns_sh(ns, &["ip", "addr", "add", addr, "dev", dev, "nodad"])?;
        }
        ns_sh(&d, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        ns_sh(&d, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
        for (net, via) in [
            ("10.128.0.0/9", "10.0.9.2"),
            ("10.101.0.0/16", "10.0.8.1"),
            ("fd00:128::/64", "fd00:9::2"),
            ("fd00:101::/64", "fd00:8::1"),
        ] {
            ns_sh(&d, &["ip", "route", "add", net, "via", via])?;
        }
        ns_sh(&s, &["ip", "route", "add", "default", "via", "10.0.9.1"])?;
        ns_sh(
            &s,
            &["ip", "-6", "route", "add", "default", "via", "fd00:9::1"],
        )?;
        // dut0 must take redirected frames also when no XDP program is on it
        // (iptables, nftables): GRO gives the veth its NAPI.
        ns_sh(&d, &["ethtool", "-K", "dut0", "gro", "on"])?;
        // Conntrack sized for the flows the bench makes.
        let _ = ns_sh(
            &d,
            &["sysctl", "-qw", "net.netfilter.nf_conntrack_max=2097152"],
        );
        self.gen_mac = mac_of(&g, "gen0")?;
        self.dut0_mac = mac_of(&d, "dut0")?;
        self.dut1_mac = mac_of(&d, "dut1")?;
        self.sink1_mac = mac_of(&s, "sink1")?;
        self.gen0_index = ifindex_in(&g, "gen0")?;
        // Resolve neighbours both ways, in both families, before any
        // measurement.
        for peer in ["10.0.9.2", "10.0.8.1", "fd00:9::2", "fd00:8::1"] {
            ns_sh(&d, &["ping", "-c", "1", "-W", "1", peer])?;
        }
        Ok(())
    }

    /// The svclb pod of klipper-lb's two-hop path: a namespace joined to
    /// the DUT by a veth pair (svc0 on the node, eth0 in the pod), with
    /// forwarding on and its default route via the node, as a K3s pod has.
    /// Deleted (with its veth pair) when the returned value drops.
    pub fn add_pod(&self) -> Result<Namespace> {
        let name = format!("{}-svclb", self.dut.trim_end_matches("-dut"));
        let pod = Namespace::new(&name)?;
        let gateway = format!("{POD_GATEWAY}/24");
        let addr = format!("{POD_ADDR}/24");
        veth(
            VethEnd::new(&self.dut, "svc0", &gateway),
            VethEnd::new(&name, "eth0", &addr),
        )?;
        // klipper's entry script turns forwarding on in the pod.
        ns_sh(&name, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        ns_sh(
            &name,
            &[
                "ip",
                "route",
                "add",
                "default",
                "via",
                &POD_GATEWAY.to_string(),
            ],
        )?;
        ns_sh(
            &self.dut,
            &["ping", "-c", "1", "-W", "1", &POD_ADDR.to_string()],
        )?;
        Ok(pod)
    }

    /// Moves dut0's receive processing to its own kernel thread on CPU 1.
    pub fn pin_dut_napi(&self) -> Result<()> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.dut,
                "sh",
                "-c",
                "echo 1 > /sys/class/net/dut0/threaded",
            ])
            .output()?;
        if !out.status.success() {
            bail!(
                "enabling threaded NAPI on dut0: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut pinned = 0;
        for entry in fs::read_dir("/proc")?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let comm = fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            if comm.trim().starts_with("napi/dut0-") {
                // Several benches may run on a machine in sequence; only this
                // namespace's dut0 is threaded now, older threads are gone.
                pin_thread_to_cpu(pid, 1)?;
                pinned += 1;
            }
        }
        if pinned == 0 {
            bail!("no napi/dut0 kernel thread found after enabling threaded NAPI");
        }
        Ok(())
    }
}

impl Drop for BenchNet {
    fn drop(&mut self) {
        self.namespaces.clear();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
