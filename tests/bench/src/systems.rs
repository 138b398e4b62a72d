//! The systems under test, set up at a number of services in one IP
//! family: xlb's manifests (typed objects), iptables / ip6tables and
//! nftables rule sets in kube-proxy's shapes, and the xlb agent with its
//! resource use.

use std::{
    fs,
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};
use xlb_tests::{netns::ns_cmd, objects, spawn_agent, xlb_bin};

use crate::{
    network::{
        BenchNet, DUT_SINK_SIDE, DUT_SINK_SIDE6, POD_ADDR, POD_CIDR, PORT_BASE, dut_addr,
        host_prefix, nth,
    },
    results::Family,
};

/// Backend j of service i (3 per service), behind the sink.
pub fn backend(family: Family, i: u32, j: u32) -> IpAddr {
    let base: IpAddr = match family {
        Family::V4 => Ipv4Addr::new(10, 128, 0, 0).into(),
        Family::V6 => Ipv6Addr::new(0xfd00, 0x128, 0, 0, 0, 0, 0, 0).into(),
    };
    nth(base, i * 3 + j)
}

/// Whether `addr` is one of the backends (in either family).
pub fn is_backend(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a.octets()[0] == 10 && a.octets()[1] >= 128,
        IpAddr::V6(a) => a.segments()[..4] == [0xfd00, 0x128, 0, 0],
    }
}

/// The ClusterIP K3s would give service i (klipper DNATs to it).
pub fn cluster_ip(family: Family, i: u32) -> IpAddr {
    let base: IpAddr = match family {
        Family::V4 => Ipv4Addr::new(10, 96, 0, 0).into(),
        Family::V6 => Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0).into(),
    };
    nth(base, i)
}

fn proto_name(proto: u8) -> &'static str {
    if proto == 6 { "tcp" } else { "udp" }
}

/// Namespace of the benchmark's Services.
const NAMESPACE: &str = "bench";

/// Manifests for `services` UDP+TCP services of `family`: each port p =
/// PORT_BASE + i on the node address, three remote endpoints. The node is
/// dual-stack (dut1's addresses), whatever the services' family.
pub fn manifests(services: u32, node_name: &str, family: Family) -> String {
    let mut s = objects::to_yaml(&objects::dual_stack_node(
        node_name,
        DUT_SINK_SIDE,
        DUT_SINK_SIDE6,
    ));
    for i in 0..services {
        s.push_str(&service_manifest(i, family));
    }
    s
}

/// Service `bench/s<i>` (single-stack, `family`) and its EndpointSlice of
/// that family, each document led by `---`.
pub fn service_manifest(i: u32, family: Family) -> String {
    let port = i32::from(PORT_BASE) + i as i32;
    let name = format!("s{i}");
    let ports = [("u", "UDP", 8080), ("t", "TCP", 8080)];
    let mut service = objects::service_in(
        NAMESPACE,
        &name,
        None,
        &[("u", "UDP", port, "8080"), ("t", "TCP", port, "8080")],
    );
    objects::spec_mut(&mut service).ip_families = Some(vec![family.name().into()]);
    service.status = Some(ServiceStatus {
        load_balancer: Some(LoadBalancerStatus {
            ingress: Some(vec![LoadBalancerIngress {
                ip: Some(dut_addr(family).to_string()),
                ..LoadBalancerIngress::default()
            }]),
        }),
        ..ServiceStatus::default()
    });
    let mut slice = match family {
        Family::V4 => {
            let endpoints: Vec<objects::EndpointOf> = (0..3)
                .map(|j| match backend(family, i, j) {
                    IpAddr::V4(a) => (a, "remote", true),
                    IpAddr::V6(_) => unreachable!("IPv4 backends"),
                })
                .collect();
            objects::endpoint_slice_in(NAMESPACE, &name, &name, &endpoints, &ports)
        }
        Family::V6 => {
            let endpoints: Vec<(Ipv6Addr, &str, bool)> = (0..3)
                .map(|j| match backend(family, i, j) {
                    IpAddr::V6(a) => (a, "remote", true),
                    IpAddr::V4(_) => unreachable!("IPv6 backends"),
                })
                .collect();
            objects::endpoint_slice_v6(&name, &endpoints, &ports)
        }
    };
    // One slice per Service, named after it whatever its family.
    slice.metadata.namespace = Some(NAMESPACE.into());
    slice.metadata.name = Some(format!("{name}-x"));
    format!(
        "---\n{}---\n{}",
        objects::to_yaml(&service),
        objects::to_yaml(&slice)
    )
}

/// The iptables-restore of `family` (`ip6tables-restore` for IPv6).
pub fn iptables_restore(family: Family) -> &'static str {
    match family {
        Family::V4 => "iptables-restore",
        Family::V6 => "ip6tables-restore",
    }
}

/// The address family of the bench's nftables table (`ip` or `ip6`).
pub fn nft_family(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

/// iptables-restore (or ip6tables-restore) input for one service of
/// `family`: klipper-lb's rule shapes (`PREROUTING ! -s CLUSTER_IP/32 -p
/// PROTO --dport PORT`, `POSTROUTING -d CLUSTER_IP/32 -p PROTO -j
/// MASQUERADE`; /128 for IPv6) leading into kube-proxy's iptables-mode
/// chains (KUBE-SVC with `statistic --mode random` → KUBE-SEP DNAT). K3s
/// runs the klipper rules in a svclb pod's namespace and DNATs to the
/// ClusterIP first; in one namespace the klipper match jumps straight into
/// the service chain instead, so the rule scan per new connection is the
/// same and the packet is NATed once.
pub fn iptables_service(family: Family, i: u32, chains_only: bool) -> (String, String) {
    let mut decl = String::new();
    let mut rules = String::new();
    for proto in [6u8, 17] {
        let p = proto_name(proto);
        let svc = format!("KUBE-SVC-{i}{}", p.to_uppercase());
        decl.push_str(&format!(":{svc} - [0:0]\n"));
        let port = PORT_BASE as u32 + i;
        let cluster = host_prefix(cluster_ip(family, i));
        if !chains_only {
            rules.push_str(&format!(
                "-A PREROUTING ! -s {cluster} -p {p} --dport {port} -j {svc}\n"
            ));
            rules.push_str(&format!(
                "-A POSTROUTING -d {cluster} -p {p} -j MASQUERADE\n"
            ));
        }
        rules.push_str(&format!("-A {svc} -j KUBE-MARK-MASQ\n"));
        for j in 0..3u32 {
            let sep = format!("KUBE-SEP-{i}{}{j}", p.to_uppercase());
            decl.push_str(&format!(":{sep} - [0:0]\n"));
            let jump = match j {
                0 => format!(
                    "-A {svc} -m statistic --mode random --probability 0.33333333349 -j {sep}\n"
                ),
                1 => format!(
                    "-A {svc} -m statistic --mode random --probability 0.50000000000 -j {sep}\n"
                ),
                _ => format!("-A {svc} -j {sep}\n"),
            };
            rules.push_str(&jump);
            let endpoint = backend(family, i, j);
            rules.push_str(&format!(
                "-A {sep} -s {} -j KUBE-MARK-MASQ\n",
                host_prefix(endpoint)
            ));
            rules.push_str(&format!(
                "-A {sep} -p {p} -j DNAT --to-destination {}\n",
                SocketAddr::new(endpoint, 8080)
            ));
        }
    }
    (decl, rules)
}

pub fn iptables_ruleset(family: Family, services: u32) -> String {
    let mut decl = String::from("*nat\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n");
    let mut rules = String::from(
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n-A POSTROUTING -j KUBE-POSTROUTING\n-A KUBE-POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE\n",
    );
    for i in 0..services {
        let (d, r) = iptables_service(family, i, false);
        decl.push_str(&d);
        rules.push_str(&r);
    }
    format!("{decl}{rules}COMMIT\n")
}

/// klipper-lb as K3s runs it, on the node (the DUT namespace), for service
/// `i` (IPv4): the CNI portmap plugin's hostPort DNAT of node:PORT into
/// the svclb pod (`CNI-HOSTPORT-DNAT` → `CNI-DN-*`, K3s's svclb pods
/// declare every port as a hostPort) and kube-proxy's `KUBE-SERVICES`
/// match of the ClusterIP leading into the same `KUBE-SVC-*` / `KUBE-SEP-*`
/// chains as `iptables_service`. One svclb pod per Service in K3s; here
/// one pod namespace carries every Service (see `klipper_pod_service`).
pub fn klipper_node_service(i: u32) -> (String, String) {
    let family = Family::V4;
    let port = PORT_BASE as u32 + i;
    let cluster = cluster_ip(family, i);
    let dn = format!("CNI-DN-{i}");
    let mut decl = format!(":{dn} - [0:0]\n");
    let mut rules = String::new();
    for proto in [6u8, 17] {
        let p = proto_name(proto);
        let svc = format!("KUBE-SVC-{i}{}", p.to_uppercase());
        rules.push_str(&format!(
            "-A KUBE-SERVICES -d {cluster}/32 -p {p} -m {p} --dport {port} -j {svc}\n"
        ));
        rules.push_str(&format!(
            "-A CNI-HOSTPORT-DNAT -p {p} -m multiport --dports {port} -j {dn}\n"
        ));
        for src in [POD_CIDR, "127.0.0.1/32"] {
            rules.push_str(&format!(
                "-A {dn} -s {src} -p {p} -m {p} --dport {port} -j CNI-HOSTPORT-SETMARK\n"
            ));
        }
        rules.push_str(&format!(
            "-A {dn} -p {p} -m {p} --dport {port} -j DNAT --to-destination {POD_ADDR}:{port}\n"
        ));
    }
    let (d, r) = iptables_service(family, i, true);
    decl.push_str(&d);
    rules.push_str(&r);
    (decl, rules)
}

/// The node's iptables-restore input for klipper-lb's two-hop path: the
/// portmap plugin's and kube-proxy's entry chains, then every service's
/// `klipper_node_service`. kube-proxy puts its `KUBE-SERVICES` jump first
/// in PREROUTING.
pub fn klipper_node_ruleset(services: u32) -> String {
    let mut decl = String::from(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:CNI-HOSTPORT-DNAT - [0:0]\n:CNI-HOSTPORT-SETMARK - [0:0]\n:CNI-HOSTPORT-MASQ - [0:0]\n",
    );
    let mut rules = String::from(
        "-A PREROUTING -j KUBE-SERVICES\n\
         -A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT\n\
         -A POSTROUTING -j CNI-HOSTPORT-MASQ\n\
         -A POSTROUTING -j KUBE-POSTROUTING\n\
         -A CNI-HOSTPORT-SETMARK -j MARK --set-xmark 0x2000/0x2000\n\
         -A CNI-HOSTPORT-MASQ -m mark --mark 0x2000/0x2000 -j MASQUERADE\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE\n",
    );
    for i in 0..services {
        let (d, r) = klipper_node_service(i);
        decl.push_str(&d);
        rules.push_str(&r);
    }
    format!("{decl}{rules}COMMIT\n")
}

/// klipper-lb's own rules for service `i`, in the svclb pod's namespace
/// (its entry script, per port): `PREROUTING ! -s DEST/32 -p PROTO --dport
/// PORT -j DNAT --to DEST:PORT` and `POSTROUTING -d DEST/32 -p PROTO -j
/// MASQUERADE`, DEST being the Service's ClusterIP. K3s runs one pod per
/// Service, each with its own two rules; one pod namespace for all N
/// Services makes its rule walk linear in N, which overstates the path's
/// cost for new connections at large N (exact at 1 service).
pub fn klipper_pod_service(i: u32) -> String {
    let port = PORT_BASE as u32 + i;
    let cluster = cluster_ip(Family::V4, i);
    let mut rules = String::new();
    for proto in [6u8, 17] {
        let p = proto_name(proto);
        rules.push_str(&format!(
            "-A PREROUTING ! -s {cluster}/32 -p {p} -m {p} --dport {port} -j DNAT --to-destination {cluster}:{port}\n"
        ));
        rules.push_str(&format!(
            "-A POSTROUTING -d {cluster}/32 -p {p} -j MASQUERADE\n"
        ));
    }
    rules
}

pub fn klipper_pod_ruleset(services: u32) -> String {
    let mut s = String::from("*nat\n");
    for i in 0..services {
        s.push_str(&klipper_pod_service(i));
    }
    s.push_str("COMMIT\n");
    s
}

/// nftables in kube-proxy's nftables-mode style, in an `ip` or `ip6` table:
/// one verdict map from address . protocol . port to a per-service chain
/// that picks an endpoint with `numgen random`.
pub fn nft_service(family: Family, i: u32) -> (String, String) {
    // The table's family is also the keyword of its address matches.
    let t = nft_family(family);
    let mut chains = String::new();
    let mut elements = String::new();
    for proto in [6u8, 17] {
        let p = proto_name(proto);
        let port = PORT_BASE as u32 + i;
        let svc = format!("svc-{i}-{p}");
        elements.push_str(&format!(
            "{} . {p} . {port} : goto {svc}, ",
            dut_addr(family)
        ));
        let mut seps = String::new();
        for j in 0..3 {
            let sep = format!("sep-{i}-{p}-{j}");
            let endpoint = backend(family, i, j);
            chains.push_str(&format!(
                "add chain {t} xlb-bench {sep}\nadd rule {t} xlb-bench {sep} {t} saddr {endpoint} meta mark set meta mark | 0x4000\nadd rule {t} xlb-bench {sep} meta l4proto {p} dnat to {}\n",
                SocketAddr::new(endpoint, 8080)
            ));
            seps.push_str(&format!("{j} : goto {sep}, "));
        }
        chains.push_str(&format!(
            "add chain {t} xlb-bench {svc}\nadd rule {t} xlb-bench {svc} meta mark set meta mark | 0x4000\nadd rule {t} xlb-bench {svc} numgen random mod 3 vmap {{ {} }}\n",
            seps.trim_end_matches(", ")
        ));
    }
    (chains, elements.trim_end_matches(", ").to_string())
}

pub fn nft_ruleset(family: Family, services: u32) -> String {
    let t = nft_family(family);
    let addr_type = match family {
        Family::V4 => "ipv4_addr",
        Family::V6 => "ipv6_addr",
    };
    let mut s = format!(
        "add table {t} xlb-bench\nadd map {t} xlb-bench service-ips {{ type {addr_type} . inet_proto . inet_service : verdict ; }}\nadd chain {t} xlb-bench prerouting {{ type nat hook prerouting priority dstnat ; }}\nadd chain {t} xlb-bench postrouting {{ type nat hook postrouting priority srcnat ; }}\nadd rule {t} xlb-bench prerouting {t} daddr . meta l4proto . th dport vmap @service-ips\nadd rule {t} xlb-bench postrouting meta mark & 0x4000 == 0x4000 masquerade\n",
    );
    for i in 0..services {
        let (chains, elements) = nft_service(family, i);
        s.push_str(&chains);
        s.push_str(&format!(
            "add element {t} xlb-bench service-ips {{ {elements} }}\n"
        ));
    }
    s
}

/// Feeds `input` to a command in the DUT namespace; returns its wall time.
pub fn feed(dut: &str, args: &[&str], input: &str) -> Result<Duration> {
    let started = Instant::now();
    let mut child = ns_cmd(dut, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {args:?}"))?;
    child.stdin.take().unwrap().write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(started.elapsed())
}

/// The xlb agent in the DUT namespace.
pub struct AgentRun {
    pub child: Child,
    pub node_name: String,
    pub log: PathBuf,
    state_dir: PathBuf,
}

impl AgentRun {
    /// The agent on a manifest directory holding `services` services of
    /// `family`.
    pub fn start(net: &BenchNet, services: u32, family: Family) -> Result<AgentRun> {
        let node_name = format!("{}-node", net.dut);
        let manifests = net.dir.join("manifests");
        let _ = fs::remove_dir_all(&manifests);
        fs::create_dir_all(&manifests)?;
        fs::write(
            manifests.join("services.yaml"),
            self::manifests(services, &node_name, family),
        )?;
        let manifests = manifests.to_string_lossy().into_owned();
        Self::spawn(net, node_name, &["--manifests", &manifests], "agent.log")
    }

    /// The agent as node `node_name` with `source` (`--manifests DIR` or
    /// `--kubeconfig FILE`), logging to `log` in the bench directory.
    pub fn spawn(
        net: &BenchNet,
        node_name: String,
        source: &[&str],
        log: &str,
    ) -> Result<AgentRun> {
        let log = net.dir.join(log);
        let state_dir = net.dir.join("state");
        let state = state_dir.to_string_lossy().into_owned();
        // Native XDP, as on physical NICs: the generator's frames carry
        // complete checksums, as a wire's do (`auto` would pick tcx ingress
        // on these veths, the container-node path).
        let mut args = vec![
            "--sweep-interval",
            "3600",
            "--xdp-mode",
            "native",
            "--iface",
            "dut0,dut1",
            "--node-name",
            &node_name,
            "--state-dir",
            &state,
            "--max-services",
            "32768",
            "--max-backends",
            "131072",
            "--max-flows",
            "1048576",
        ];
        args.extend_from_slice(source);
        // The agent's own work (manifest parsing, the flow sweeper) is the
        // control plane: it runs on the generator's CPU so that CPU 1
        // measures the datapath only; its cost is reported separately.
        let child = spawn_agent(
            &net.dut,
            &["taskset", "-c", "0"],
            &args,
            &log,
            "info",
            Duration::from_secs(300),
        )?;
        Ok(AgentRun {
            child,
            node_name,
            log,
            state_dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(mut self) -> Result<()> {
        // SAFETY: signalling our child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait()?;
        Command::new(xlb_bin())
            .args(["reset", "--node-name", &self.node_name, "--state-dir"])
            .arg(&self.state_dir)
            .output()?;
        Ok(())
    }
}

/// Resident set size of a process, bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")?;
    Ok(kb * 1024)
}

/// Where a process's resident memory is (`RssAnon`, `RssFile`,
/// `RssShmem` of /proc/PID/status, MiB), for the log.
pub fn rss_split(pid: u32) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let mut parts = Vec::new();
    for field in ["RssAnon:", "RssFile:", "RssShmem:"] {
        if let Some(kb) = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        {
            parts.push(format!(
                "{} {:.1}",
                field.trim_end_matches(':'),
                kb / 1024.0
            ));
        }
    }
    parts.join(", ") + " MiB"
}

/// CPU time (user + system) of a process, ns.
pub fn process_cpu_ns(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    Ok(ticks * 10_000_000)
}
