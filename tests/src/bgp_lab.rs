//! Two xlb nodes peering with real routers: BIRD and FRR on one LAN with
//! the nodes, a client behind BIRD, which installs what it learns into its
//! kernel (ECMP over both nodes).
//!
//! ```text
//!  [client] c0 ── r0 [bird 10.0.10.1]──┐
//!                    [frr  10.0.10.2]──┤ lan (bridge)
//!                                      ├── uplink [node-a 10.0.10.11] h0 ── eth0 [pod-a 10.244.1.2]
//!                                      └── uplink [node-b 10.0.10.12] h0 ── eth0 [pod-b 10.244.2.2]
//! ```
//!
//! Each router runs as a child process in its own namespace with its own
//! configuration, sockets and log in the lab's directory; everything is
//! removed on `Drop`.

use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Stdio},
    str::FromStr,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{
    agent::{Agent, node_agent, xlb_bin},
    netns::{Namespace, ns_cmd, ns_sh, sh},
    objects,
    topology::Links,
    traffic::serve_tcp,
};

pub const ROUTER_ASN: u32 = 64500;
pub const NODE_ASN: u32 = 64501;
pub const BIRD_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 10, 1);
pub const FRR_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 10, 2);
/// A peer that is not a router: the tests' own listener.
pub const LIAR_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 10, 3);
pub const NODE_A: Ipv4Addr = Ipv4Addr::new(10, 0, 10, 11);
pub const NODE_B: Ipv4Addr = Ipv4Addr::new(10, 0, 10, 12);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 2);
/// The bridge's own address: where a fake API server can listen.
pub const LAN_API_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 10, 250);
pub const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
pub const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
pub const SERVICE_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;

/// `10.0.10.N` → `fd00:10::N` (N in hex digits as written: ::11 for .11).
pub fn lan_v6(v4: Ipv4Addr) -> Ipv6Addr {
    let host = v4.octets()[3];
    let digits: u16 = u16::from_str_radix(&host.to_string(), 16).expect("decimal digits");
    Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, digits)
}

static LABS: AtomicU32 = AtomicU32::new(0);

pub struct BgpLab {
    pub prefix: String,
    pub dir: PathBuf,
    /// The segment's namespace (its bridge has [`LAN_API_ADDR`]).
    pub lan: String,
    pub client: String,
    pub bird_ns: String,
    pub frr_ns: String,
    pub liar_ns: String,
    /// node-a, node-b.
    pub nodes: [String; 2],
    pub node_names: [String; 2],
    pub pods: [String; 2],
    pub links: Links,
    /// BIRD's TCP MD5 key for both sessions (set before `start_bird`).
    pub bird_password: Option<String>,
    bird: Option<Child>,
    frr: Option<Child>,
    namespaces: Vec<Namespace>,
}

impl BgpLab {
    pub fn new() -> Result<Self> {
        let n = LABS.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("g{}{}", std::process::id() % 100_000, n);
        let dir = std::env::temp_dir().join(format!("xlb-bgp-{prefix}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("manifests"))?;
        // bgpd drops to no user with -S but still writes its vty socket here.
        fs::create_dir_all(dir.join("frr"))?;
        let mut lab = BgpLab {
            lan: format!("{prefix}-lan"),
            client: format!("{prefix}-cl"),
            bird_ns: format!("{prefix}-bird"),
            frr_ns: format!("{prefix}-frr"),
            liar_ns: format!("{prefix}-liar"),
            nodes: [format!("{prefix}-na"), format!("{prefix}-nb")],
            node_names: [format!("{prefix}-node-a"), format!("{prefix}-node-b")],
            pods: [format!("{prefix}-pa"), format!("{prefix}-pb")],
            links: Links::from_env(),
            prefix,
            dir,
            bird_password: None,
            bird: None,
            frr: None,
            namespaces: Vec::new(),
        };
        lab.build().context("building the BGP lab")?;
        Ok(lab)
    }

    fn build(&mut self) -> Result<()> {
        let lan = self.lan.clone();
        let all = [
            lan.clone(),
            self.client.clone(),
            self.bird_ns.clone(),
            self.frr_ns.clone(),
            self.liar_ns.clone(),
            self.nodes[0].clone(),
            self.nodes[1].clone(),
            self.pods[0].clone(),
            self.pods[1].clone(),
        ];
        for ns in &all {
            self.namespaces.push(Namespace::new(ns)?);
        }
        ns_sh(&lan, &["ip", "link", "add", "br0", "type", "bridge"])?;
        ns_sh(&lan, &["ip", "link", "set", "br0", "up"])?;
        ns_sh(
            &lan,
            &[
                "ip",
                "addr",
                "add",
                &format!("{LAN_API_ADDR}/24"),
                "dev",
                "br0",
            ],
        )?;
        let members = [
            (self.bird_ns.clone(), BIRD_ADDR),
            (self.frr_ns.clone(), FRR_ADDR),
            (self.liar_ns.clone(), LIAR_ADDR),
            (self.nodes[0].clone(), NODE_A),
            (self.nodes[1].clone(), NODE_B),
        ];
        for (i, (ns, addr)) in members.iter().enumerate() {
            let port = format!("p{i}");
            self.pair(ns, "uplink", &format!("{addr}/24"), &lan, &port, None)?;
            ns_sh(&lan, &["ip", "link", "set", &port, "master", "br0"])?;
            // The same host number in the IPv6 LAN, without duplicate address
            // detection (which would keep it unusable for seconds).
            let v6 = format!("{}/64", lan_v6(*addr));
            ns_sh(
                ns,
                &["ip", "-6", "addr", "add", &v6, "dev", "uplink", "nodad"],
            )?;
        }
        // The client behind BIRD.
        self.pair(
            &self.bird_ns.clone(),
            "r0",
            "10.0.9.1/24",
            &self.client.clone(),
            "c0",
            Some("10.0.9.2/24"),
        )?;
        ns_sh(
            &self.client,
            &["ip", "route", "add", "default", "via", "10.0.9.1"],
        )?;
        // Spread flows over the ECMP next hops by ports, not only addresses:
        // one client would otherwise always take the same node.
        ns_sh(
            &self.bird_ns,
            &[
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv4.fib_multipath_hash_policy=1",
            ],
        )?;
        // Pods and the nodes' routes to each other's pods and to the client.
        for (i, (node, pod, pod_addr)) in [
            (&self.nodes[0].clone(), &self.pods[0].clone(), POD_A),
            (&self.nodes[1].clone(), &self.pods[1].clone(), POD_B),
        ]
        .into_iter()
        .enumerate()
        {
            let octets = pod_addr.octets();
            let gateway = format!("{}.{}.{}.1", octets[0], octets[1], octets[2]);
            self.pair(
                node,
                "h0",
                &format!("{gateway}/24"),
                pod,
                "eth0",
                Some(&format!("{pod_addr}/24")),
            )?;
            ns_sh(pod, &["ip", "route", "add", "default", "via", &gateway])?;
            let other = if i == 0 { NODE_B } else { NODE_A };
            let other_pods = if i == 0 {
                "10.244.2.0/24"
            } else {
                "10.244.1.0/24"
            };
            ns_sh(
                node,
                &["ip", "route", "add", other_pods, "via", &other.to_string()],
            )?;
            ns_sh(
                node,
                &[
                    "ip",
                    "route",
                    "add",
                    "10.0.9.0/24",
                    "via",
                    &BIRD_ADDR.to_string(),
                ],
            )?;
            ns_sh(node, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            serve_tcp(
                pod,
                if i == 0 { "pod-a" } else { "pod-b" },
                SocketAddr::new(pod_addr.into(), TARGET_PORT),
            )?;
        }
        Ok(())
    }

    /// A veth pair `a_ns:a_dev` (address `a_addr`) ↔ `b_ns:b_dev`; with
    /// [`Links::Wires`] both ends compute full checksums and take XDP
    /// redirects (GRO on), like physical NICs.
    fn pair(
        &self,
        a_ns: &str,
        a_dev: &str,
        a_addr: &str,
        b_ns: &str,
        b_dev: &str,
        b_addr: Option<&str>,
    ) -> Result<()> {
        self.links.veth_pair((a_ns, a_dev), (b_ns, b_dev))?;
        ns_sh(a_ns, &["ip", "addr", "add", a_addr, "dev", a_dev])?;
        if let Some(addr) = b_addr {
            ns_sh(b_ns, &["ip", "addr", "add", addr, "dev", b_dev])?;
        }
        Ok(())
    }

    pub fn manifests(&self) -> PathBuf {
        self.dir.join("manifests")
    }

    /// Writes a manifest file atomically (temp file + rename).
    pub fn write_manifest(&self, file: &str, text: &str) -> Result<()> {
        crate::topology::write_manifest_in(&self.dir, file, text)
    }

    pub fn remove_manifest(&self, file: &str) -> Result<()> {
        crate::topology::remove_manifest_in(&self.dir, file)
    }

    /// The Node objects of both nodes.
    pub fn nodes_manifest(&self) -> String {
        objects::to_yaml_documents(&[
            objects::dual_stack_node(&self.node_names[0], NODE_A, lan_v6(NODE_A)),
            objects::dual_stack_node(&self.node_names[1], NODE_B, lan_v6(NODE_B)),
        ])
    }

    /// A BGPPeer for a router at `address` (eBGP, hold time 3 s).
    pub fn peer_manifest(name: &str, address: Ipv4Addr, restart_time: u16) -> String {
        format!(
            "apiVersion: xlb.dev/v1alpha1\nkind: BGPPeer\nmetadata:\n  name: {name}\n  namespace: xlb\n\
             spec:\n  peerAddress: {address}\n  peerASN: {ROUTER_ASN}\n  localASN: {NODE_ASN}\n\
             \x20 holdTime: 3\n  gracefulRestartTime: {restart_time}\n"
        )
    }

    /// Starts the agent of node `i` (0: node-a, 1: node-b) on the manifest
    /// directory.
    pub fn start_agent(&self, i: usize) -> Result<Agent> {
        let manifests = self.manifests().to_string_lossy().into_owned();
        self.start_agent_with(i, &["--manifests", &manifests])
    }

    /// Starts the agent of node `i` with `source` (`--manifests DIR`, or
    /// `--kubeconfig FILE` and more).
    pub fn start_agent_with(&self, i: usize, source: &[&str]) -> Result<Agent> {
        // Each node namespace has a loopback of its own.
        let mut extra = vec!["--metrics-addr", "127.0.0.1:9479"];
        extra.extend_from_slice(source);
        node_agent(
            &self.nodes[i],
            "uplink",
            &self.node_names[i],
            &self.dir.join("state"),
            self.links,
            &extra,
            self.dir.join(format!("agent-{i}.log")),
        )
    }

    /// The `/metrics` text of node `i`'s agent.
    pub fn metrics(&self, i: usize) -> Result<String> {
        let (status, body) = crate::scrape::http_get(
            &self.nodes[i],
            std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9479),
            "/metrics",
        )?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Ok(body)
    }

    /// `xlb inspect bgp --json` of node `i`.
    pub fn inspect_bgp(&self, i: usize) -> Result<Vec<serde_json::Value>> {
        let bin = xlb_bin().to_string_lossy().into_owned();
        let state_dir = self.dir.join("state").to_string_lossy().into_owned();
        let out = sh(&[
            &bin,
            "inspect",
            "bgp",
            "--json",
            "--node-name",
            &self.node_names[i],
            "--state-dir",
            &state_dir,
        ])?;
        Ok(serde_json::from_str(&out)?)
    }

    /// Starts BIRD with a session to each node.
    pub fn start_bird(&mut self) -> Result<()> {
        let conf = self.dir.join("bird.conf");
        let mut text = format!(
            "router id {BIRD_ADDR};\nlog \"{}\" all;\n\
             protocol device {{ scan time 1; }}\n\
             protocol kernel {{ ipv4 {{ import none; export all; }}; merge paths on; }}\n\
             template bgp node {{\n  local {BIRD_ADDR} as {ROUTER_ASN};\n  hold time 3;\n\
             \x20 connect retry time 1;\n  error wait time 1, 2;\n\
             \x20 ipv4 {{ import all; export none; }};\n  ipv6 {{ import all; export none; }};\n{}}}\n",
            self.dir.join("bird.log").display(),
            self.bird_password
                .as_ref()
                .map(|p| format!("  password \"{p}\";\n"))
                .unwrap_or_default()
        );
        for (i, addr) in [NODE_A, NODE_B].iter().enumerate() {
            text.push_str(&format!(
                "protocol bgp node{i} from node {{ neighbor {addr} as {NODE_ASN}; }}\n"
            ));
        }
        fs::write(&conf, text)?;
        let log = fs::File::create(self.dir.join("bird.out"))?;
        let child = ns_cmd(
            &self.bird_ns,
            &[
                "bird",
                "-f",
                "-c",
                &conf.to_string_lossy(),
                "-s",
                &self.bird_socket(),
                "-P",
                &self.dir.join("bird.pid").to_string_lossy(),
            ],
        )
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .context("starting bird")?;
        self.bird = Some(child);
        crate::wait_until("BIRD's control socket", Duration::from_secs(10), || {
            self.birdc(&["show", "status"]).is_ok()
        })
    }

    fn bird_socket(&self) -> String {
        self.dir.join("bird.ctl").to_string_lossy().into_owned()
    }

    pub fn birdc(&self, args: &[&str]) -> Result<String> {
        let socket = self.bird_socket();
        let mut full = vec!["birdc", "-s", socket.as_str()];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// The next hops BIRD has for `prefix`, over all its routes (one per
    /// node that announces it).
    pub fn bird_next_hops(&self, prefix: &str) -> Result<Vec<Ipv4Addr>> {
        self.bird_hops(prefix)
    }

    pub fn bird_next_hops_v6(&self, prefix: &str) -> Result<Vec<Ipv6Addr>> {
        self.bird_hops(prefix)
    }

    fn bird_hops<T: FromStr + Ord>(&self, prefix: &str) -> Result<Vec<T>> {
        let out = match self.birdc(&["show", "route", prefix]) {
            Ok(out) => out,
            // birdc fails when no route matches.
            Err(error) if format!("{error:#}").contains("Network not found") => {
                return Ok(Vec::new());
            }
            Err(error) => return Err(error),
        };
        let mut hops: Vec<T> = out
            .split("via ")
            .skip(1)
            .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
            .collect();
        hops.sort();
        hops.dedup();
        Ok(hops)
    }

    /// Whether BIRD's session `node<i>` is Established.
    pub fn bird_established(&self, i: usize) -> Result<bool> {
        let out = self.birdc(&["show", "protocols", &format!("node{i}")])?;
        Ok(out.contains("Established"))
    }

    /// Starts FRR's bgpd (no zebra: only its RIB is looked at) with a
    /// session to each node.
    pub fn start_frr(&mut self) -> Result<()> {
        let conf = self.dir.join("frr/bgpd.conf");
        let mut text = format!(
            "hostname frr\nlog file {}\nrouter bgp {ROUTER_ASN}\n bgp router-id {FRR_ADDR}\n\
             \x20no bgp ebgp-requires-policy\n no bgp network import-check\n\
             \x20bgp graceful-restart\n",
            self.dir.join("frr/bgpd.log").display()
        );
        for addr in [NODE_A, NODE_B] {
            text.push_str(&format!(
                " neighbor {addr} remote-as {NODE_ASN}\n neighbor {addr} timers 1 3\n\
                 \x20neighbor {addr} timers connect 1\n"
            ));
        }
        text.push_str(" address-family ipv4 unicast\n  maximum-paths 4\n");
        for addr in [NODE_A, NODE_B] {
            text.push_str(&format!("  neighbor {addr} activate\n"));
        }
        text.push_str(" exit-address-family\n address-family ipv6 unicast\n  maximum-paths 4\n");
        for addr in [NODE_A, NODE_B] {
            text.push_str(&format!("  neighbor {addr} activate\n"));
        }
        text.push_str(" exit-address-family\n");
        fs::write(&conf, text)?;
        let log = fs::File::create(self.dir.join("frr/bgpd.out"))?;
        let vty = self.dir.join("frr").to_string_lossy().into_owned();
        let child = ns_cmd(
            &self.frr_ns,
            &[
                "/usr/lib/frr/bgpd",
                "-Z",
                "-S",
                "-u",
                "root",
                "-g",
                "root",
                "-f",
                &conf.to_string_lossy(),
                "-i",
                &self.dir.join("frr/bgpd.pid").to_string_lossy(),
                "--vty_socket",
                &vty,
                "-P",
                "0",
            ],
        )
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .context("starting FRR bgpd")?;
        self.frr = Some(child);
        crate::wait_until("FRR's vty socket", Duration::from_secs(10), || {
            self.vtysh("show bgp summary json").is_ok()
        })
    }

    pub fn vtysh(&self, command: &str) -> Result<String> {
        let vty = self.dir.join("frr").to_string_lossy().into_owned();
        let out = ns_sh(
            &self.frr_ns,
            &["vtysh", "--vty_socket", &vty, "-d", "bgpd", "-c", command],
        )?;
        Ok(out)
    }

    /// The next hops of FRR's paths for `prefix` (`show ip bgp json`).
    pub fn frr_next_hops(&self, prefix: &str) -> Result<Vec<Ipv4Addr>> {
        self.frr_hops("show ip bgp json", prefix)
    }

    /// The same for IPv6 unicast (`show bgp ipv6 unicast json`).
    pub fn frr_next_hops_v6(&self, prefix: &str) -> Result<Vec<Ipv6Addr>> {
        self.frr_hops("show bgp ipv6 unicast json", prefix)
    }

    fn frr_hops<T: FromStr + Ord>(&self, command: &str, prefix: &str) -> Result<Vec<T>> {
        let json: serde_json::Value = serde_json::from_str(&self.vtysh(command)?)
            .with_context(|| format!("parsing FRR's {command}"))?;
        let mut hops: Vec<T> = json["routes"][prefix]
            .as_array()
            .map(|paths| {
                paths
                    .iter()
                    .flat_map(|path| path["nexthops"].as_array().cloned().unwrap_or_default())
                    .filter_map(|hop| hop["ip"].as_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        hops.sort();
        hops.dedup();
        Ok(hops)
    }

    /// The state FRR gives the session with `node`.
    pub fn frr_state(&self, node: Ipv4Addr) -> Result<String> {
        let json: serde_json::Value =
            serde_json::from_str(&self.vtysh(&format!("show bgp neighbors {node} json"))?)?;
        Ok(json[node.to_string()]["bgpState"]
            .as_str()
            .unwrap_or("")
            .to_string())
    }

    /// Both routers' next hops for `prefix`, once both say `want`.
    pub fn wait_next_hops(&self, prefix: &str, want: &[Ipv4Addr], timeout: Duration) -> Result<()> {
        let mut last = (Vec::new(), Vec::new());
        let done = crate::wait_until(
            &format!("{prefix} via {want:?} on BIRD and FRR"),
            timeout,
            || {
                last = (
                    self.bird_next_hops(prefix).unwrap_or_default(),
                    self.frr_next_hops(prefix).unwrap_or_default(),
                );
                last.0 == want && last.1 == want
            },
        );
        if done.is_err() {
            bail!(
                "{prefix}: BIRD has {:?}, FRR has {:?}, want {want:?}\n{}",
                last.0,
                last.1,
                self.logs()
            );
        }
        Ok(())
    }

    /// The agents' and routers' logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for file in ["agent-0.log", "agent-1.log", "bird.log", "frr/bgpd.log"] {
            let text = fs::read_to_string(self.dir.join(file)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("--- {file} (last lines)\n"));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for BgpLab {
    fn drop(&mut self) {
        for child in [self.bird.take(), self.frr.take()].into_iter().flatten() {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        for node_name in &self.node_names {
            let _ = std::process::Command::new(xlb_bin())
                .args(["reset", "--node-name", node_name, "--state-dir"])
                .arg(self.dir.join("state"))
                .output();
        }
        while let Some(namespace) = self.namespaces.pop() {
            drop(namespace);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
