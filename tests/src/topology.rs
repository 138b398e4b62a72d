//! The reference topology of shared/DESIGN.md section 4: network
//! namespaces for a client, two nodes and three pods, wired with veth pairs,
//! with servers in the pods and the real agent in the node.
//!
//! ```text
//!  [client] c0 ── uplink [node: xlb on `uplink`, `n2`] hA ── eth0 [pod-a]
//!                                     │             hB ── eth0 [pod-b]
//!                                     n2 ── n1 [node2] hC ── eth0 [pod-c]
//! ```
//!
//! Everything is named with a per-process, per-topology prefix and removed
//! on `Drop`, also when a test panics.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result};
use aya::programs::{SchedClassifier, TcAttachType, loaded_programs};

use crate::{
    agent::{Agent, node_agent, xlb_bin},
    netns::{Namespace, VethEnd, in_netns, ns_sh, veth, veth_bare},
    objects,
    traffic::{serve_tcp, serve_udp},
};

pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
/// A second client address, outside the source ranges the tests allow.
pub const CLIENT_ADDR_2: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 3);
pub const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
pub const NODE_LINK_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
pub const NODE2_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
pub const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
pub const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
pub const POD_C: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 2);
/// Frontend addresses live here; the client routes them to the node.
pub const FRONTEND_NET: &str = "10.200.0.0/24";

// Every link also carries a ULA IPv6 address, mirroring the IPv4 plan.
pub const CLIENT_ADDR_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2);
/// A second IPv6 client address, outside the source ranges the tests allow.
pub const CLIENT_ADDR_V6_2: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 3);
pub const NODE_ADDR_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1);
pub const NODE_LINK_ADDR_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 1);
pub const NODE2_ADDR_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 2);
pub const POD_A_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 2);
pub const POD_B_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 2, 0, 0, 0, 0, 2);
pub const POD_C_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 3, 0, 0, 0, 0, 2);
/// IPv6 frontend addresses live here; the client routes them to the node.
pub const FRONTEND_NET_V6: &str = "fd00:200::/64";

/// Topologies made by this process, for unique prefixes.
static TOPOLOGIES: AtomicU32 = AtomicU32::new(0);

/// How the test's hosts are joined. Both kinds of cluster exist, so the
/// end-to-end suites run on both (`cargo xtask test` runs them once per
/// kind, choosing with `XLB_TEST_LINKS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Links {
    /// Like physical NICs: every host-like link end sends complete
    /// checksums (TX offload off, so every receiver verifies them and a
    /// translation error cannot hide behind offload), GRO on; the agent runs
    /// native XDP, as `--xdp-mode auto` does on a physical NIC.
    Wires,
    /// Like kind/k3d nodes: every veth at its defaults, TX checksum offload
    /// on, so packets between namespaces carry partial checksums; the agent
    /// chooses its hook itself (`--xdp-mode auto`).
    ContainerNodes,
}

impl Links {
    /// With [`Links::Wires`], makes a namespace's end of a link behave like a
    /// real host NIC: full checksums computed in software, and GRO on, which
    /// lets a veth accept XDP-redirected frames. With
    /// [`Links::ContainerNodes`] the link keeps the veth defaults.
    pub fn host_like(self, ns: &str, dev: &str) -> Result<()> {
        if self == Links::Wires {
            ns_sh(ns, &["ethtool", "-K", dev, "tx", "off"])?;
            ns_sh(ns, &["ethtool", "-K", dev, "gro", "on"])?;
        }
        Ok(())
    }

    /// A veth pair, `a_dev` in namespace `a` and `b_dev` in `b`, both up
    /// and both host-like ([`Links::host_like`]), without addresses.
    pub fn veth_pair(self, a: (&str, &str), b: (&str, &str)) -> Result<()> {
        veth_bare(a, b)?;
        self.host_like(a.0, a.1)?;
        self.host_like(b.0, b.1)
    }

    /// `XLB_TEST_LINKS`: `wires` (the default) or `container-nodes`.
    pub fn from_env() -> Links {
        match std::env::var("XLB_TEST_LINKS").as_deref() {
            Err(_) | Ok("wires") => Links::Wires,
            Ok("container-nodes") => Links::ContainerNodes,
            Ok(other) => panic!("XLB_TEST_LINKS={other}: expected wires or container-nodes"),
        }
    }
}

/// One backend pod: a namespace with servers answering
/// `backend=<name> port=<port> peer=<ip:port>`.
pub struct Pod {
    pub name: &'static str,
    pub ns: String,
    pub addr: Ipv4Addr,
    pub addr_v6: Ipv6Addr,
    pub node: &'static str,
}

pub struct Topology {
    pub prefix: String,
    pub client: String,
    pub node: String,
    pub node2: String,
    pub pods: Vec<Pod>,
    /// Node name the agent runs as (unique, so pin dirs never collide).
    pub node_name: String,
    pub node2_name: String,
    pub dir: PathBuf,
    pub links: Links,
    /// Deleted last to first on drop.
    namespaces: Vec<Namespace>,
}

impl Topology {
    /// Builds the reference topology. Does not start servers or the agent.
    pub fn new() -> Result<Self> {
        let n = TOPOLOGIES.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("x{}{}", std::process::id() % 100_000, n);
        let dir = std::env::temp_dir().join(format!("xlb-test-{prefix}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("manifests"))?;
        let mut t = Topology {
            client: format!("{prefix}-client"),
            node: format!("{prefix}-node"),
            node2: format!("{prefix}-node2"),
            pods: vec![
                Pod {
                    name: "pod-a",
                    ns: format!("{prefix}-pa"),
                    addr: POD_A,
                    addr_v6: POD_A_V6,
                    node: "a",
                },
                Pod {
                    name: "pod-b",
                    ns: format!("{prefix}-pb"),
                    addr: POD_B,
                    addr_v6: POD_B_V6,
                    node: "a",
                },
                Pod {
                    name: "pod-c",
                    ns: format!("{prefix}-pc"),
                    addr: POD_C,
                    addr_v6: POD_C_V6,
                    node: "b",
                },
            ],
            node_name: format!("{prefix}-node-a"),
            node2_name: format!("{prefix}-node-b"),
            prefix,
            dir,
            links: Links::from_env(),
            namespaces: Vec::new(),
        };
        t.build()
            .with_context(|| format!("building the test topology ({:?})", t.links))?;
        Ok(t)
    }

    fn add_ns(&mut self, ns: &str) -> Result<()> {
        self.namespaces.push(Namespace::new(ns)?);
        // Links moved in later take this namespace's defaults: no duplicate
        // address detection, which would keep even the link-local
        // addresses tentative (unusable for neighbour discovery) for ~2 s.
        ns_sh(ns, &["sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"])?;
        Ok(())
    }

    fn host_like(&self, ns: &str, dev: &str) -> Result<()> {
        self.links.host_like(ns, dev)
    }

    /// The hook the agent runs the forward path in on the node's uplinks,
    /// as its log names it: native XDP on wires, tcx ingress on container
    /// nodes (a veth's packets carry partial checksums).
    pub fn forward_hook(&self) -> &'static str {
        match self.links {
            Links::Wires => "XDP",
            Links::ContainerNodes => "tcx ingress",
        }
    }

    /// What the kernel has attached to `dev` in `ns`, one `hook program`
    /// line each (`xdp xlb_xdp`, `tcx_ingress xlb_tc_ingress`, ...), asked
    /// of the kernel itself: `ip link` for XDP, a tcx query for tcx.
    pub fn attached(&self, ns: &str, dev: &str) -> Result<String> {
        let link = ns_sh(ns, &["ip", "-d", "link", "show", "dev", dev])?;
        let xdp_id = link
            .split("prog/xdp id ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|id| id.parse::<u32>().ok());
        let dev_owned = dev.to_string();
        let tcx = in_netns(ns, move || -> Result<Vec<String>> {
            let mut lines = Vec::new();
            for (hook, direction) in [
                ("tcx_ingress", TcAttachType::Ingress),
                ("tcx_egress", TcAttachType::Egress),
            ] {
                let (_, programs) = SchedClassifier::query_tcx(&dev_owned, direction)
                    .with_context(|| format!("querying {hook} of {dev_owned}"))?;
                for p in programs {
                    lines.push(format!("{hook} {}", p.name_as_str().unwrap_or("?")));
                }
            }
            Ok(lines)
        })??;
        let mut lines = Vec::new();
        if let Some(id) = xdp_id {
            let name = loaded_programs()
                .flatten()
                .find(|p| p.id() == id)
                .and_then(|p| p.name_as_str().map(str::to_string))
                .unwrap_or_else(|| format!("id {id}"));
            lines.push(format!("xdp {name}"));
        }
        lines.extend(tcx);
        Ok(lines.join("\n"))
    }

    fn build(&mut self) -> Result<()> {
        let (client, node, node2) = (self.client.clone(), self.node.clone(), self.node2.clone());
        for ns in [&client, &node, &node2] {
            self.add_ns(ns)?;
        }
        let pods: Vec<(String, Ipv4Addr, Ipv6Addr, &'static str)> = self
            .pods
            .iter()
            .map(|p| (p.ns.clone(), p.addr, p.addr_v6, p.node))
            .collect();
        for (ns, _, _, _) in &pods {
            self.add_ns(ns)?;
        }
        // client <-> node uplink
        veth(
            VethEnd::new(&client, "c0", "10.0.1.2/24"),
            VethEnd::new(&node, "uplink", "10.0.1.1/24"),
        )?;
        ns_sh(&client, &["ip", "addr", "add", "10.0.1.3/24", "dev", "c0"])?;
        add_v6(&client, "c0", "fd00:1::2/64")?;
        // Deprecated (preferred_lft 0): never the default source, still
        // usable by a socket bound to it, like 10.0.1.3 beside 10.0.1.2.
        ns_sh(
            &client,
            &[
                "ip",
                "addr",
                "add",
                "fd00:1::3/64",
                "dev",
                "c0",
                "nodad",
                "preferred_lft",
                "0",
            ],
        )?;
        add_v6(&node, "uplink", "fd00:1::1/64")?;
        for net in [FRONTEND_NET_V6, "fd00:244::/32"] {
            ns_sh(&client, &["ip", "route", "add", net, "via", "fd00:1::1"])?;
        }
        ns_sh(
            &client,
            &["ip", "route", "add", FRONTEND_NET, "via", "10.0.1.1"],
        )?;
        ns_sh(
            &client,
            &["ip", "route", "add", "10.244.0.0/16", "via", "10.0.1.1"],
        )?;
        self.host_like(&client, "c0")?;
        // node <-> node2
        veth(
            VethEnd::new(&node, "n2", "10.0.2.1/24"),
            VethEnd::new(&node2, "n1", "10.0.2.2/24"),
        )?;
        self.host_like(&node2, "n1")?;
        add_v6(&node, "n2", "fd00:2::1/64")?;
        add_v6(&node2, "n1", "fd00:2::2/64")?;
        ns_sh(
            &node,
            &["ip", "route", "add", "fd00:244:3::/64", "via", "fd00:2::2"],
        )?;
        ns_sh(
            &node2,
            &["ip", "route", "add", "default", "via", "fd00:2::1"],
        )?;
        ns_sh(
            &node,
            &["ip", "route", "add", "10.244.3.0/24", "via", "10.0.2.2"],
        )?;
        ns_sh(
            &node2,
            &["ip", "route", "add", "default", "via", "10.0.2.1"],
        )?;
        for ns in [&node, &node2] {
            ns_sh(
                ns,
                &[
                    "sysctl",
                    "-qw",
                    "net.ipv4.ip_forward=1",
                    "net.ipv6.conf.all.forwarding=1",
                ],
            )?;
        }
        // pods
        for (i, (ns, addr, addr_v6, on)) in pods.iter().enumerate() {
            let host_ns = if *on == "a" { &node } else { &node2 };
            let octets = addr.octets();
            let host_addr = format!("{}.{}.{}.1/24", octets[0], octets[1], octets[2]);
            let pod_addr = format!("{addr}/24");
            let host_dev = format!("h{i}");
            veth(
                VethEnd::new(host_ns, &host_dev, &host_addr),
                VethEnd::new(ns, "eth0", &pod_addr),
            )?;
            ns_sh(
                ns,
                &[
                    "ip",
                    "route",
                    "add",
                    "default",
                    "via",
                    &host_addr[..host_addr.len() - 3],
                ],
            )?;
            // fd00:244:N::2 in the pod, fd00:244:N::1 on the host side.
            let segments = addr_v6.segments();
            let host_v6 = Ipv6Addr::new(segments[0], segments[1], segments[2], 0, 0, 0, 0, 1);
            add_v6(host_ns, &host_dev, &format!("{host_v6}/64"))?;
            add_v6(ns, "eth0", &format!("{addr_v6}/64"))?;
            ns_sh(
                ns,
                &["ip", "route", "add", "default", "via", &host_v6.to_string()],
            )?;
            self.host_like(ns, "eth0")?;
        }
        Ok(())
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .expect("known pod")
    }

    pub fn manifests(&self) -> PathBuf {
        self.dir.join("manifests")
    }

    /// Writes (atomically: temp file + rename) a manifest file.
    pub fn write_manifest(&self, file: &str, text: &str) -> Result<()> {
        write_manifest_in(&self.dir, file, text)
    }

    pub fn remove_manifest(&self, file: &str) -> Result<()> {
        remove_manifest_in(&self.dir, file)
    }

    /// Starts TCP and UDP servers on `ports` in every pod, on its IPv4 and
    /// its IPv6 address.
    pub fn start_servers(&self, ports: &[u16]) -> Result<()> {
        for pod in &self.pods {
            for &port in ports {
                for addr in [IpAddr::V4(pod.addr), IpAddr::V6(pod.addr_v6)] {
                    serve_tcp(&pod.ns, pod.name, SocketAddr::new(addr, port))?;
                    serve_udp(&pod.ns, pod.name, SocketAddr::new(addr, port))?;
                }
            }
        }
        Ok(())
    }

    /// A Node object for the agent's node (InternalIPs = uplink addresses,
    /// IPv4 then IPv6) and the second node.
    pub fn nodes_manifest(&self) -> String {
        objects::to_yaml_documents(&[
            objects::dual_stack_node(&self.node_name, NODE_ADDR, NODE_ADDR_V6),
            objects::dual_stack_node(&self.node2_name, NODE2_ADDR, NODE2_ADDR_V6),
        ])
    }

    /// The Kubernetes node name a pod runs on.
    pub fn node_of(&self, pod: &Pod) -> &str {
        if pod.node == "a" {
            &self.node_name
        } else {
            &self.node2_name
        }
    }

    /// Starts the agent in the node namespace.
    pub fn start_agent(&self) -> Result<Agent> {
        self.start_agent_with(&[])
    }

    /// Starts the agent with extra command-line arguments.
    pub fn start_agent_with(&self, extra: &[&str]) -> Result<Agent> {
        let manifests = self.manifests().to_string_lossy().into_owned();
        let mut args = vec!["--manifests", manifests.as_str()];
        args.extend_from_slice(extra);
        self.agent_in(&self.node, "uplink,n2", &self.node_name, "agent.log", &args)
    }

    /// Starts the agent on the Kubernetes API (no manifest directory).
    pub fn start_agent_kube(&self, kubeconfig: &Path, extra: &[&str]) -> Result<Agent> {
        self.kube_agent(
            &self.node,
            "uplink,n2",
            &self.node_name,
            "agent.log",
            kubeconfig,
            extra,
        )
    }

    /// Starts a second agent on the Kubernetes API, in node2 on its link to
    /// the node (`n1`), logging to `agent2.log`.
    pub fn start_agent2_kube(&self, kubeconfig: &Path, extra: &[&str]) -> Result<Agent> {
        self.kube_agent(
            &self.node2,
            "n1",
            &self.node2_name,
            "agent2.log",
            kubeconfig,
            extra,
        )
    }

    fn kube_agent(
        &self,
        ns: &str,
        ifaces: &str,
        node_name: &str,
        log: &str,
        kubeconfig: &Path,
        extra: &[&str],
    ) -> Result<Agent> {
        let kubeconfig = kubeconfig.to_string_lossy().into_owned();
        let mut args = vec!["--kubeconfig", kubeconfig.as_str()];
        args.extend_from_slice(extra);
        self.agent_in(ns, ifaces, node_name, log, &args)
    }

    /// `xlb agent` in namespace `ns` as node `node_name` on `ifaces`, logging
    /// to `log` in the test directory; `source_and_extra` names the source
    /// and any further flags.
    fn agent_in(
        &self,
        ns: &str,
        ifaces: &str,
        node_name: &str,
        log: &str,
        source_and_extra: &[&str],
    ) -> Result<Agent> {
        node_agent(
            ns,
            ifaces,
            node_name,
            &self.dir.join("state"),
            self.links,
            source_and_extra,
            self.dir.join(log),
        )
    }

    pub fn xlb(&self, args: &[&str]) -> Result<String> {
        let mut full = vec![xlb_bin().to_string_lossy().into_owned()];
        full.extend(args.iter().map(|s| s.to_string()));
        full.extend([
            "--node-name".into(),
            self.node_name.clone(),
            "--state-dir".into(),
            self.dir.join("state").to_string_lossy().into_owned(),
        ]);
        let refs: Vec<&str> = full.iter().map(|s| s.as_str()).collect();
        ns_sh(&self.node, &refs)
    }

    /// `xlb inspect <what> --json` as parsed rows.
    pub fn inspect(&self, what: &str) -> Result<Vec<serde_json::Value>> {
        let out = self.xlb(&["inspect", what, "--json"])?;
        Ok(serde_json::from_str(&out)?)
    }

    /// Sum of a per-service counter over all services.
    pub fn stat(&self, field: &str) -> Result<u64> {
        Ok(self
            .inspect("stats")?
            .iter()
            .filter_map(|r| r.get(field).and_then(|v| v.as_u64()))
            .sum())
    }
}

/// Adds an IPv6 address without duplicate address detection, which would
/// keep it unusable for about two seconds.
fn add_v6(ns: &str, dev: &str, addr: &str) -> Result<()> {
    ns_sh(ns, &["ip", "addr", "add", addr, "dev", dev, "nodad"])?;
    Ok(())
}

impl Drop for Topology {
    fn drop(&mut self) {
        for node_name in [&self.node_name, &self.node2_name] {
            let _ = Command::new(xlb_bin())
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

/// Writes manifest `file` into `dir/manifests` atomically (a temp file in
/// `dir`, then a rename), so the agent never reads half a file.
pub fn write_manifest_in(dir: &Path, file: &str, text: &str) -> Result<()> {
    let tmp = dir.join(format!(".{file}.tmp"));
    fs::write(&tmp, text)?;
    fs::rename(&tmp, dir.join("manifests").join(file))?;
    Ok(())
}

/// Removes manifest `file` from `dir/manifests`.
pub fn remove_manifest_in(dir: &Path, file: &str) -> Result<()> {
    fs::remove_file(dir.join("manifests").join(file))?;
    Ok(())
}
