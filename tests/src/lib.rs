//! Test support for xlb's privileged end-to-end tests and the demo: network
//! namespaces wired as in shared/DESIGN.md section 4, real TCP/UDP servers in
//! the pod namespaces, clients in the client namespace, and the real `xlb`
//! agent running in the node namespace.
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
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

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

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Runs `command`, returning its standard output, or failing with all its
/// output; `what` names it in errors.
fn output_of(command: &mut Command, what: &str) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command, failing with its output when it fails.
pub fn sh(args: &[&str]) -> Result<String> {
    output_of(Command::new(args[0]).args(&args[1..]), &format!("{args:?}"))
}

/// `ip netns exec`-free command runner: enters only the network namespace
/// (so the BPF filesystem and /sys of the host stay visible).
pub fn ns_cmd(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/var/run/netns/{ns}")).args(args);
    c
}

pub fn ns_sh(ns: &str, args: &[&str]) -> Result<String> {
    output_of(&mut ns_cmd(ns, args), &format!("{args:?} in {ns}"))
}

/// Runs `f` on a thread that has entered network namespace `ns`; sockets it
/// creates belong to that namespace and may be used from any thread after.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = format!("/var/run/netns/{ns}");
    let file = fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::spawn(move || {
        // SAFETY: a valid namespace fd; only this thread changes namespace.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(anyhow::anyhow!(
                "setns into {path}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in netns {ns} panicked"))?
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// The xlb binary under test (`XLB_BIN`, set by `cargo xtask test`).
pub fn xlb_bin() -> PathBuf {
    std::env::var_os("XLB_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/xlb"))
}

/// One backend pod: a namespace with servers answering
/// `backend=<name> port=<port> peer=<ip:port>`.
pub struct Pod {
    pub name: &'static str,
    pub ns: String,
    pub addr: Ipv4Addr,
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
    namespaces: Vec<String>,
}

impl Topology {
    /// Builds the reference topology. Does not start servers or the agent.
    pub fn new() -> Result<Self> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
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
                    node: "a",
                },
                Pod {
                    name: "pod-b",
                    ns: format!("{prefix}-pb"),
                    addr: POD_B,
                    node: "a",
                },
                Pod {
                    name: "pod-c",
                    ns: format!("{prefix}-pc"),
                    addr: POD_C,
                    node: "b",
                },
            ],
            node_name: format!("{prefix}-node-a"),
            node2_name: format!("{prefix}-node-b"),
            prefix,
            dir,
            namespaces: Vec::new(),
        };
        t.build().context("building the test topology")?;
        Ok(t)
    }

    fn add_ns(&mut self, ns: &str) -> Result<()> {
        let _ = sh(&["ip", "netns", "del", ns]);
        sh(&["ip", "netns", "add", ns])?;
        self.namespaces.push(ns.to_string());
        ns_sh(ns, &["ip", "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// A veth pair between two namespaces, both ends up, with addresses.
    fn link(&self, a: (&str, &str, &str), b: (&str, &str, &str)) -> Result<()> {
        let tmp_a = format!("{}a{}", self.prefix, COUNTER.fetch_add(1, Ordering::SeqCst));
        let tmp_b = format!("{}b{}", self.prefix, COUNTER.fetch_add(1, Ordering::SeqCst));
        sh(&[
            "ip", "link", "add", &tmp_a, "type", "veth", "peer", "name", &tmp_b,
        ])?;
        for ((ns, name, addr), tmp) in [(a, &tmp_a), (b, &tmp_b)] {
            sh(&["ip", "link", "set", tmp, "netns", ns])?;
            ns_sh(ns, &["ip", "link", "set", tmp, "name", name])?;
            ns_sh(ns, &["ip", "addr", "add", addr, "dev", name])?;
            ns_sh(ns, &["ip", "link", "set", name, "up"])?;
        }
        Ok(())
    }

    /// Makes a namespace's end of a link behave like a real host NIC for
    /// the test: full checksums computed in software (so every receiver
    /// verifies them: a translation error cannot hide behind checksum
    /// offload), and GRO on, which lets a veth accept XDP-redirected frames.
    fn host_like(ns: &str, dev: &str) -> Result<()> {
        ns_sh(ns, &["ethtool", "-K", dev, "tx", "off"])?;
        ns_sh(ns, &["ethtool", "-K", dev, "gro", "on"])?;
        Ok(())
    }

    fn build(&mut self) -> Result<()> {
        let (client, node, node2) = (self.client.clone(), self.node.clone(), self.node2.clone());
        for ns in [&client, &node, &node2] {
            self.add_ns(ns)?;
        }
        let pods: Vec<(String, Ipv4Addr, &'static str)> = self
            .pods
            .iter()
            .map(|p| (p.ns.clone(), p.addr, p.node))
            .collect();
        for (ns, _, _) in &pods {
            self.add_ns(ns)?;
        }
        // client <-> node uplink
        self.link(
            (&client, "c0", "10.0.1.2/24"),
            (&node, "uplink", "10.0.1.1/24"),
        )?;
        ns_sh(&client, &["ip", "addr", "add", "10.0.1.3/24", "dev", "c0"])?;
        ns_sh(
            &client,
            &["ip", "route", "add", FRONTEND_NET, "via", "10.0.1.1"],
        )?;
        ns_sh(
            &client,
            &["ip", "route", "add", "10.244.0.0/16", "via", "10.0.1.1"],
        )?;
        Self::host_like(&client, "c0")?;
        // node <-> node2
        self.link((&node, "n2", "10.0.2.1/24"), (&node2, "n1", "10.0.2.2/24"))?;
        Self::host_like(&node2, "n1")?;
        ns_sh(
            &node,
            &["ip", "route", "add", "10.244.3.0/24", "via", "10.0.2.2"],
        )?;
        ns_sh(
            &node2,
            &["ip", "route", "add", "default", "via", "10.0.2.1"],
        )?;
        for ns in [&node, &node2] {
            ns_sh(ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        }
        // pods
        for (i, (ns, addr, on)) in pods.iter().enumerate() {
            let host_ns = if *on == "a" { &node } else { &node2 };
            let octets = addr.octets();
            let host_addr = format!("{}.{}.{}.1/24", octets[0], octets[1], octets[2]);
            let pod_addr = format!("{addr}/24");
            let host_dev = format!("h{i}");
            self.link((host_ns, &host_dev, &host_addr), (ns, "eth0", &pod_addr))?;
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
            Self::host_like(ns, "eth0")?;
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
        let tmp = self.dir.join(format!(".{file}.tmp"));
        fs::write(&tmp, text)?;
        fs::rename(&tmp, self.manifests().join(file))?;
        Ok(())
    }

    pub fn remove_manifest(&self, file: &str) -> Result<()> {
        fs::remove_file(self.manifests().join(file))?;
        Ok(())
    }

    /// Starts TCP and UDP servers on `ports` in every pod.
    pub fn start_servers(&self, ports: &[u16]) -> Result<()> {
        for pod in &self.pods {
            for &port in ports {
                serve_tcp(&pod.ns, pod.name, SocketAddrV4::new(pod.addr, port))?;
                serve_udp(&pod.ns, pod.name, SocketAddrV4::new(pod.addr, port))?;
            }
        }
        Ok(())
    }

    /// A Node object for the agent's node (InternalIP = uplink address) and
    /// the second node.
    pub fn nodes_manifest(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {}\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {NODE_ADDR}\n---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {}\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {NODE2_ADDR}\n",
            self.node_name, self.node2_name
        )
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
        let log = self.dir.join(log);
        let state_dir = self.dir.join("state").to_string_lossy().into_owned();
        let mut args = vec![
            "--iface",
            ifaces,
            "--node-name",
            node_name,
            "--state-dir",
            &state_dir,
            "--sweep-interval",
            "1",
        ];
        args.extend_from_slice(source_and_extra);
        let child = spawn_agent(
            ns,
            &[],
            &args,
            &log,
            "info,xlb=debug",
            Duration::from_secs(30),
        )?;
        Ok(Agent {
            child: Some(child),
            log,
        })
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

impl Drop for Topology {
    fn drop(&mut self) {
        for node_name in [&self.node_name, &self.node2_name] {
            let _ = Command::new(xlb_bin())
                .args(["reset", "--node-name", node_name, "--state-dir"])
                .arg(self.dir.join("state"))
                .output();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Starts `xlb agent <args>` in network namespace `ns` (behind `wrapper`,
/// e.g. `taskset -c 0`), appending its output to `log`, and waits until it
/// says it is ready. Several agents may share one log: only what this one
/// wrote is looked at.
pub fn spawn_agent(
    ns: &str,
    wrapper: &[&str],
    args: &[&str],
    log: &Path,
    log_filter: &str,
    timeout: Duration,
) -> Result<Child> {
    let offset = fs::metadata(log).map(|m| m.len() as usize).unwrap_or(0);
    let log_file = fs::OpenOptions::new().create(true).append(true).open(log)?;
    let bin = xlb_bin().to_string_lossy().into_owned();
    let mut command: Vec<&str> = wrapper.to_vec();
    command.extend([bin.as_str(), "agent"]);
    command.extend_from_slice(args);
    let mut child = ns_cmd(ns, &command)
        .env("XLB_LOG", log_filter)
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .stdin(Stdio::null())
        .spawn()
        .context("starting xlb agent")?;
    let started = Instant::now();
    loop {
        let text = fs::read_to_string(log).unwrap_or_default();
        if text
            .get(offset..)
            .is_some_and(|l| l.contains("agent ready"))
        {
            return Ok(child);
        }
        if let Some(status) = child.try_wait()? {
            bail!("xlb agent exited with {status}:\n{text}");
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            bail!("xlb agent not ready after {timeout:?}:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The real agent, running in the node namespace; SIGTERM on drop.
pub struct Agent {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Agent {
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL and wait: a crash, or a node that vanished.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM and wait: what an orchestrator does on restart or upgrade.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let start = Instant::now();
            while child.try_wait()?.is_none() {
                if start.elapsed() > Duration::from_secs(10) {
                    child.kill()?;
                    bail!("agent ignored SIGTERM for 10s");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn serve_tcp(ns: &str, name: &'static str, addr: SocketAddrV4) -> Result<()> {
    let listener = in_netns(ns, move || TcpListener::bind(addr))??;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let peer = stream
                    .peer_addr()
                    .map(|p| p.to_string())
                    .unwrap_or_default();
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut writer = stream;
                let mut line = String::new();
                while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                    let reply = format!(
                        "backend={name} port={} peer={peer} echo={}\n",
                        addr.port(),
                        line.trim()
                    );
                    if writer.write_all(reply.as_bytes()).is_err() {
                        break;
                    }
                    line.clear();
                }
            });
        }
    });
    Ok(())
}

fn serve_udp(ns: &str, name: &'static str, addr: SocketAddrV4) -> Result<()> {
    let socket = in_netns(ns, move || UdpSocket::bind(addr))??;
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            let reply = format!(
                "backend={name} port={} peer={peer} echo={}",
                addr.port(),
                String::from_utf8_lossy(&buf[..n]).trim()
            );
            let _ = socket.send_to(reply.as_bytes(), peer);
        }
    });
    Ok(())
}

/// A server's answer, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub backend: String,
    pub port: u16,
    pub peer: SocketAddr,
}

pub fn parse_reply(line: &str) -> Result<Reply> {
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .map(str::to_string)
            .with_context(|| format!("no {k}= in reply {line:?}"))
    };
    Ok(Reply {
        backend: field("backend")?,
        port: field("port")?.parse()?,
        peer: field("peer")?.parse()?,
    })
}

/// A TCP connection from the client namespace.
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    pub fn open(client_ns: &str, to: SocketAddrV4, from: Option<Ipv4Addr>) -> Result<Conn> {
        let stream = in_netns(client_ns, move || -> Result<TcpStream> {
            let socket = socket2_like_connect(to, from)?;
            Ok(socket)
        })??;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(Conn {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// Sends a line and reads the server's answer.
    pub fn ask(&mut self, text: &str) -> Result<Reply> {
        self.writer.write_all(format!("{text}\n").as_bytes())?;
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .context("reading the answer")?;
        if line.is_empty() {
            bail!("connection closed");
        }
        parse_reply(&line)
    }
}

/// connect() with a timeout and an optional source address.
fn socket2_like_connect(to: SocketAddrV4, from: Option<Ipv4Addr>) -> Result<TcpStream> {
    match from {
        None => Ok(TcpStream::connect_timeout(
            &to.into(),
            Duration::from_secs(1),
        )?),
        Some(src) => {
            // SAFETY: plain socket syscalls on a fresh fd we own.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                if fd < 0 {
                    bail!("socket: {}", std::io::Error::last_os_error());
                }
                let stream = <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd);
                let sa = sockaddr(SocketAddrV4::new(src, 0));
                if libc::bind(fd, &sa as *const _ as *const libc::sockaddr, 16) != 0 {
                    bail!("bind {src}: {}", std::io::Error::last_os_error());
                }
                let tv = libc::timeval {
                    tv_sec: 1,
                    tv_usec: 0,
                };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_SNDTIMEO,
                    &tv as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                let da = sockaddr(to);
                if libc::connect(fd, &da as *const _ as *const libc::sockaddr, 16) != 0 {
                    bail!(
                        "connect {to} from {src}: {}",
                        std::io::Error::last_os_error()
                    );
                }
                Ok(stream)
            }
        }
    }
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// One TCP request on a fresh connection.
pub fn tcp_request(client_ns: &str, to: SocketAddrV4) -> Result<Reply> {
    Conn::open(client_ns, to, None)?.ask("hello")
}

/// One UDP datagram from a fresh socket (fresh source port), one answer.
pub fn udp_request(client_ns: &str, to: SocketAddrV4) -> Result<Reply> {
    let socket = in_netns(client_ns, || UdpSocket::bind("0.0.0.0:0"))??;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    socket.send_to(b"hello", to)?;
    let mut buf = [0u8; 2048];
    let (n, _) = socket
        .recv_from(&mut buf)
        .context("waiting for the UDP answer")?;
    parse_reply(&String::from_utf8_lossy(&buf[..n]))
}

/// Counters from /proc/net/snmp of a namespace (e.g. `Tcp` `InCsumErrors`).
pub fn snmp_counter(ns: &str, proto: &str, field: &str) -> Result<u64> {
    let proto = proto.to_string();
    let field = field.to_string();
    let text = in_netns(ns, || {
        let mut s = String::new();
        fs::File::open("/proc/self/net/snmp").and_then(|mut f| f.read_to_string(&mut s))?;
        Ok::<String, std::io::Error>(s)
    })??;
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{proto}:")))
        .collect();
    if lines.len() < 2 {
        bail!("no {proto} lines in /proc/net/snmp");
    }
    let names: Vec<&str> = lines[0].split_whitespace().collect();
    let values: Vec<&str> = lines[1].split_whitespace().collect();
    let i = names
        .iter()
        .position(|n| *n == field)
        .with_context(|| format!("no {proto} {field} in /proc/net/snmp"))?;
    Ok(values[i].parse()?)
}

/// Manifest builders: plain YAML, as an operator would write them.
pub mod manifests {
    use super::*;

    pub struct ServiceSpec<'a> {
        pub name: &'a str,
        pub frontend: Ipv4Addr,
        /// (name, protocol, port, targetPort as YAML scalar)
        pub ports: &'a [(&'a str, &'a str, u32, &'a str)],
        pub extra_spec: &'a str,
    }

    pub fn service(s: &ServiceSpec) -> String {
        let mut ports = String::new();
        for (name, proto, port, target) in s.ports {
            ports.push_str(&format!(
                "  - name: {name}\n    protocol: {proto}\n    port: {port}\n    targetPort: {target}\n"
            ));
        }
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: default\nspec:\n  type: LoadBalancer\n{}  ports:\n{ports}status:\n  loadBalancer:\n    ingress:\n    - ip: {}\n",
            s.name, s.extra_spec, s.frontend
        )
    }

    /// An EndpointSlice for `service` with `(pod address, node name, ready)`
    /// endpoints and `(port name, protocol, port)` ports.
    pub fn endpoint_slice(
        service: &str,
        endpoints: &[(Ipv4Addr, &str, bool)],
        ports: &[(&str, &str, u16)],
    ) -> String {
        let mut eps = String::new();
        for (addr, node, ready) in endpoints {
            eps.push_str(&format!(
                "- addresses: [\"{addr}\"]\n  nodeName: {node}\n  conditions:\n    ready: {ready}\n    serving: {ready}\n    terminating: false\n"
            ));
        }
        let mut ps = String::new();
        for (name, proto, port) in ports {
            ps.push_str(&format!(
                "- name: {name}\n  protocol: {proto}\n  port: {port}\n"
            ));
        }
        let endpoints = if endpoints.is_empty() {
            "endpoints: []\n".to_string()
        } else {
            format!("endpoints:\n{eps}")
        };
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-abc\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\n{endpoints}ports:\n{ps}"
        )
    }
}
pub mod bench;
pub mod fake_api;
