//! One L2 segment for the announcement tests (issue 12): two nodes and two
//! clients on a bridge, with no route to the Service addresses anywhere:
//! they sit in the segment's own subnet, so a client's kernel finds the
//! node that serves them with ARP / neighbour discovery, as on a real LAN.
//!
//! ```text
//!  [client] eth0 ─┐                      ┌─ uplink [node-1] h1 ── eth0 [pod-1]
//!  [client2] eth0 ┼── br0 [lan] ─────────┤
//!                 │                      └─ uplink [node-2] h2 ── eth0 [pod-2]
//! ```
//!
//! Each node routes the other's pod network over the segment. Everything
//! is removed on drop, also when a test panics.

use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context, Result};

use crate::{
    agent::{Agent, node_agent, xlb_bin},
    netns::{Namespace, ns_sh},
    topology::Links,
    traffic::serve_tcp,
};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 5, 2);
pub const CLIENT2: Ipv4Addr = Ipv4Addr::new(10, 0, 5, 3);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 5, 0, 0, 0, 0, 0, 2);
pub const NODE_ADDRS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 0, 5, 11), Ipv4Addr::new(10, 0, 5, 12)];
pub const NODE_ADDRS_V6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0xfd00, 5, 0, 0, 0, 0, 0, 0x11),
    Ipv6Addr::new(0xfd00, 5, 0, 0, 0, 0, 0, 0x12),
];
pub const POD_ADDRS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 2, 2)];
pub const POD_ADDRS_V6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 2),
    Ipv6Addr::new(0xfd00, 0x244, 2, 0, 0, 0, 0, 2),
];
/// Service addresses in the segment's subnet.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 5, 100);
pub const VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 5, 0, 0, 0, 0, 0, 0x100);
/// In the subnet, assigned to nothing.
pub const UNASSIGNED: Ipv4Addr = Ipv4Addr::new(10, 0, 5, 200);
/// The bridge's own address (the fake API server listens there).
pub const API_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 5, 250);
/// The port the pods serve on.
pub const POD_PORT: u16 = 8080;

static SEGMENTS: AtomicU32 = AtomicU32::new(0);

pub struct Segment {
    pub prefix: String,
    pub lan: String,
    pub client: String,
    pub client2: String,
    /// The nodes' namespaces and Node names (unique, so pins never collide).
    pub nodes: [String; 2],
    pub node_names: [String; 2],
    pub pods: [String; 2],
    pub dir: PathBuf,
    pub links: Links,
    namespaces: Vec<Namespace>,
    /// Print nothing on drop (see [`Segment::quiet`]).
    quiet: bool,
}

impl Segment {
    /// Builds the segment with a TCP server in each pod on [`POD_PORT`]
    /// (it answers with `backend=pod-1` or `pod-2`). No agent runs yet.
    pub fn new() -> Result<Segment> {
        let n = SEGMENTS.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("l{}{}", std::process::id() % 100_000, n);
        let dir = std::env::temp_dir().join(format!("xlb-test-{prefix}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("manifests"))?;
        let mut s = Segment {
            lan: format!("{prefix}-lan"),
            client: format!("{prefix}-c"),
            client2: format!("{prefix}-c2"),
            nodes: [format!("{prefix}-n1"), format!("{prefix}-n2")],
            node_names: [format!("{prefix}-node-1"), format!("{prefix}-node-2")],
            pods: [format!("{prefix}-p1"), format!("{prefix}-p2")],
            prefix,
            dir,
            links: Links::from_env(),
            namespaces: Vec::new(),
            quiet: false,
        };
        s.build().context("building the L2 segment")?;
        Ok(s)
    }

    fn add_ns(&mut self, ns: &str) -> Result<()> {
        self.namespaces.push(Namespace::new(ns)?);
        ns_sh(ns, &["sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"])?;
        ns_sh(ns, &["sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0"])?;
        Ok(())
    }

    /// A veth pair `a_dev` in `a` ↔ `b_dev` in `b`, both up; on wires both
    /// ends send complete checksums and take XDP frames (GRO on).
    fn pair(&self, a: &str, a_dev: &str, b: &str, b_dev: &str) -> Result<()> {
        self.links.veth_pair((a, a_dev), (b, b_dev))
    }

    fn build(&mut self) -> Result<()> {
        for ns in [
            self.lan.clone(),
            self.client.clone(),
            self.client2.clone(),
            self.nodes[0].clone(),
            self.nodes[1].clone(),
            self.pods[0].clone(),
            self.pods[1].clone(),
        ] {
            self.add_ns(&ns)?;
        }
        let lan = self.lan.clone();
        ns_sh(&lan, &["ip", "link", "add", "br0", "type", "bridge"])?;
        ns_sh(&lan, &["ip", "link", "set", "br0", "up"])?;
        // Where the fake API server listens, reachable from both nodes.
        ns_sh(
            &lan,
            &["ip", "addr", "add", &format!("{API_ADDR}/24"), "dev", "br0"],
        )?;
        let hosts = [
            (self.client.clone(), "eth0", "p-c", CLIENT, CLIENT_V6),
            (
                self.client2.clone(),
                "eth0",
                "p-c2",
                CLIENT2,
                Ipv6Addr::new(0xfd00, 5, 0, 0, 0, 0, 0, 3),
            ),
            (
                self.nodes[0].clone(),
                "uplink",
                "p-n1",
                NODE_ADDRS[0],
                NODE_ADDRS_V6[0],
            ),
            (
                self.nodes[1].clone(),
                "uplink",
                "p-n2",
                NODE_ADDRS[1],
                NODE_ADDRS_V6[1],
            ),
        ];
        for (ns, dev, port, addr, addr6) in &hosts {
            self.pair(ns, dev, &lan, port)?;
            ns_sh(&lan, &["ip", "link", "set", port, "master", "br0"])?;
            // Router advertisements would keep the agent from turning IPv6
            // forwarding on; the segment has none.
            ns_sh(
                ns,
                &["sysctl", "-qw", &format!("net.ipv6.conf.{dev}.accept_ra=0")],
            )?;
            ns_sh(
                ns,
                &["ip", "addr", "add", &format!("{addr}/24"), "dev", dev],
            )?;
            ns_sh(
                ns,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("{addr6}/64"),
                    "dev",
                    dev,
                    "nodad",
                ],
            )?;
        }
        for i in 0..2 {
            let (node, pod) = (self.nodes[i].clone(), self.pods[i].clone());
            let host = format!("h{}", i + 1);
            self.pair(&node, &host, &pod, "eth0")?;
            // A node routes for its pods (kubelet and the CNI see to it on
            // a real one), whether or not xlb runs there.
            ns_sh(&node, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            ns_sh(&node, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
            let gw = Ipv4Addr::new(10, 244, i as u8 + 1, 1);
            let gw6 = Ipv6Addr::new(0xfd00, 0x244, i as u16 + 1, 0, 0, 0, 0, 1);
            ns_sh(
                &node,
                &["ip", "addr", "add", &format!("{gw}/24"), "dev", &host],
            )?;
            ns_sh(
                &node,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("{gw6}/64"),
                    "dev",
                    &host,
                    "nodad",
                ],
            )?;
            ns_sh(
                &pod,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("{}/24", POD_ADDRS[i]),
                    "dev",
                    "eth0",
                ],
            )?;
            ns_sh(
                &pod,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("{}/64", POD_ADDRS_V6[i]),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            )?;
            ns_sh(
                &pod,
                &["ip", "route", "add", "default", "via", &gw.to_string()],
            )?;
            ns_sh(
                &pod,
                &[
                    "ip",
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &gw6.to_string(),
                ],
            )?;
            // The other node's pods, over the segment.
            let other = 1 - i;
            ns_sh(
                &node,
                &[
                    "ip",
                    "route",
                    "add",
                    &format!("10.244.{}.0/24", other + 1),
                    "via",
                    &NODE_ADDRS[other].to_string(),
                ],
            )?;
            ns_sh(
                &node,
                &[
                    "ip",
                    "-6",
                    "route",
                    "add",
                    &format!("fd00:244:{}::/64", other + 1),
                    "via",
                    &NODE_ADDRS_V6[other].to_string(),
                ],
            )?;
            let name: &'static str = if i == 0 { "pod-1" } else { "pod-2" };
            serve_tcp(&pod, name, SocketAddr::from((POD_ADDRS[i], POD_PORT)))?;
            serve_tcp(&pod, name, SocketAddr::from((POD_ADDRS_V6[i], POD_PORT)))?;
        }
        Ok(())
    }

    pub fn manifests(&self) -> PathBuf {
        self.dir.join("manifests")
    }

    pub fn write_manifest(&self, file: &str, text: &str) -> Result<()> {
        crate::topology::write_manifest_in(&self.dir, file, text)
    }

    /// The MAC address of node `i`'s uplink, as `ip` prints it.
    pub fn node_mac(&self, i: usize) -> Result<String> {
        let link = ns_sh(
            &self.nodes[i],
            &["ip", "-o", "link", "show", "dev", "uplink"],
        )?;
        link.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .map(str::to_string)
            .with_context(|| format!("no MAC in {link:?}"))
    }

    /// Starts the agent of node `i` on its uplink with `source_and_extra`
    /// (`--manifests DIR` or `--kubeconfig FILE`, and further flags).
    pub fn start_agent(&self, i: usize, source_and_extra: &[&str]) -> Result<Agent> {
        node_agent(
            &self.nodes[i],
            "uplink",
            &self.node_names[i],
            &self.dir.join(format!("state{}", i + 1)),
            self.links,
            source_and_extra,
            self.dir.join(format!("agent{}.log", i + 1)),
        )
    }

    /// `xlb <args>` for node `i` (its pins and state).
    pub fn xlb(&self, i: usize, args: &[&str]) -> Result<String> {
        let mut full = vec![xlb_bin().to_string_lossy().into_owned()];
        full.extend(args.iter().map(|s| s.to_string()));
        full.extend([
            "--node-name".into(),
            self.node_names[i].clone(),
            "--state-dir".into(),
            self.dir
                .join(format!("state{}", i + 1))
                .to_string_lossy()
                .into_owned(),
        ]);
        let refs: Vec<&str> = full.iter().map(|s| s.as_str()).collect();
        ns_sh(&self.nodes[i], &refs)
    }

    /// The MAC `ns`'s kernel has for `addr` on eth0 (`None`: no usable
    /// entry: absent, incomplete or failed).
    pub fn neighbour(&self, ns: &str, addr: &str) -> Result<Option<String>> {
        let out = ns_sh(ns, &["ip", "neigh", "show", addr, "dev", "eth0"])?;
        Ok(out
            .split_whitespace()
            .skip_while(|w| *w != "lladdr")
            .nth(1)
            .map(str::to_string))
    }

    /// Forgets every neighbour entry of `ns`.
    pub fn flush_neighbours(&self, ns: &str) -> Result<()> {
        ns_sh(ns, &["ip", "neigh", "flush", "dev", "eth0"])?;
        Ok(())
    }

    /// `arping` from `ns` for `addr`: the MAC that answered, `None` when
    /// nobody did within `wait`.
    pub fn arping(&self, ns: &str, addr: Ipv4Addr, wait: Duration) -> Result<Option<String>> {
        let out = crate::netns::ns_cmd(
            ns,
            &[
                "arping",
                "-c",
                "1",
                "-w",
                &wait.as_secs().max(1).to_string(),
                "-I",
                "eth0",
                &addr.to_string(),
            ],
        )
        .output()
        .context("running arping")?;
        let text = String::from_utf8_lossy(&out.stdout);
        // "Unicast reply from 10.0.5.100 [02:AB:...]  0.6ms"
        Ok(text
            .lines()
            .find(|l| l.contains("reply from"))
            .and_then(|l| l.split('[').nth(1))
            .and_then(|rest| rest.split(']').next())
            .map(|mac| mac.to_lowercase()))
    }

    /// Leaves out the agents' logs on drop (a demo that went well).
    pub fn quiet(&mut self) {
        self.quiet = true;
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // What the agents said, for a failed test (the test harness shows
        // a test's output only when it fails; the directory goes).
        if !self.quiet {
            for i in 0..self.nodes.len() {
                let log = self.dir.join(format!("agent{}.log", i + 1));
                let text = fs::read_to_string(&log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("--- the last lines of {} ---", log.display());
                for line in &lines[lines.len().saturating_sub(120)..] {
                    eprintln!("{line}");
                }
            }
        }
        for (i, node_name) in self.node_names.iter().enumerate() {
            let _ = Command::new(xlb_bin())
                .args(["reset", "--node-name", node_name, "--state-dir"])
                .arg(self.dir.join(format!("state{}", i + 1)))
                .output();
        }
        while let Some(namespace) = self.namespaces.pop() {
            drop(namespace);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
