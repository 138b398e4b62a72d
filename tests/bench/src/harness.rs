//! `cargo xtask bench`: xlb against the iptables and nftables paths and a
//! bare XDP forwarder, on one topology, with one generator and one sink.
//!
//! ```text
//!  [gen] gen0 ─── dut0 [dut: system under test] dut1 ─── sink1 [sink]
//!  CPU 0: BPF_PROG_TEST_RUN live frames        CPU 1: dut0's (threaded) NAPI,
//!  (bench_gen redirects out of gen0)          everything the DUT does, and the
//!                                              sink's XDP counter (bench_sink)
//! ```

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMap, PerCpuArray, PerCpuValues, ProgramArray},
    programs::{Xdp, XdpMode},
};

use xlb_tests::{
    netns::{Namespace, VethEnd, ns_cmd, ns_sh, scoped_in_netns, veth},
    packet::{TestRunSpec, checksum, test_run},
    spawn_agent, xlb_bin,
};

pub const DUT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 8, 2);
pub const DUT_SINK_SIDE: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 1);
/// Service i listens on DUT_ADDR:(PORT_BASE + i), as K3s ServiceLB does
/// (every LoadBalancer port is a port on the node address).
pub const PORT_BASE: u16 = 10_000;
pub const CLIENT_BASE: Ipv4Addr = Ipv4Addr::new(10, 101, 0, 0);

pub use xlb_bench_common::{GenConfig, GenState};

pub fn bench_object() -> PathBuf {
    std::env::var_os("XLB_BENCH_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/ebpf/bpfel-unknown-none/release/xlb-bench-ebpf")
        })
}

// ------------------------------------------------------------------ frames

/// A 60-byte template frame (UDP, or TCP SYN) and the generator config
/// describing it.
pub fn template(
    proto: u8,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    dst: Ipv4Addr,
    services: u32,
    flows: u32,
) -> (Vec<u8>, GenConfig) {
    let src = CLIENT_BASE;
    let (sport, dport) = (1024u16, PORT_BASE);
    let l4_len = if proto == 6 { 20 } else { 8 + 18 };
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0];
    ip[2..4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let ip_check = checksum(&ip);
    ip[10..12].copy_from_slice(&ip_check.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    let mut l4_check = 0u16;
    if proto == 6 {
        l4.extend_from_slice(&1u32.to_be_bytes()); // seq
        l4.extend_from_slice(&0u32.to_be_bytes()); // ack
        l4.extend_from_slice(&[0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]); // SYN
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src.octets());
        pseudo.extend_from_slice(&dst.octets());
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        pseudo.extend_from_slice(&l4);
        l4_check = checksum(&pseudo);
        l4[16..18].copy_from_slice(&l4_check.to_be_bytes());
    } else {
        l4.extend_from_slice(&(l4_len as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
        l4.extend_from_slice(&[0x78; 18]);
    }
    f.extend_from_slice(&l4);
    // 64 bytes: the generator restores the first 64 from the TEMPLATE map.
    f.resize(64, 0);
    // Checksums as the program loads them: the raw bytes in native order.
    let raw16 = |v: u16| u16::from_ne_bytes(v.to_be_bytes());
    let raw32 = |a: Ipv4Addr| u32::from_ne_bytes(a.octets());
    let cfg = GenConfig {
        ifindex: 0,
        flows,
        services,
        dst_addr: raw32(dst),
        dst_port_base: PORT_BASE,
        proto,
        _pad: 0,
        src_addr_base: u32::from(CLIENT_BASE),
        ip_check_base: raw16(ip_check),
        l4_check_base: raw16(l4_check),
        src_addr_tmpl: raw32(src),
        dst_addr_tmpl: raw32(dst),
        src_port_tmpl: raw16(sport),
        dst_port_tmpl: raw16(dport),
        rate_pps: 0,
    };
    (f, cfg)
}

// ---------------------------------------------------------------- topology

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

fn ifindex_in(ns: &str, dev: &str) -> Result<u32> {
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
        ns_sh(&d, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        ns_sh(
            &d,
            &["ip", "route", "add", "10.128.0.0/9", "via", "10.0.9.2"],
        )?;
        ns_sh(
            &d,
            &["ip", "route", "add", "10.101.0.0/16", "via", "10.0.8.1"],
        )?;
        ns_sh(&s, &["ip", "route", "add", "default", "via", "10.0.9.1"])?;
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
        self.gen0_index = ifindex_in(&g, "gen0")?;
        // Resolve neighbours both ways before any measurement.
        ns_sh(&d, &["ping", "-c", "1", "-W", "1", "10.0.9.2"])?;
        ns_sh(&d, &["ping", "-c", "1", "-W", "1", "10.0.8.1"])?;
        Ok(())
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

// ------------------------------------------------------------- generator

pub struct Bench {
    pub net: BenchNet,
    pub ebpf: Ebpf,
}

/// CPU time (ns) CPU `cpu` spent not idle, from /proc/stat.
pub fn cpu_busy_ns(cpu: usize) -> Result<u64> {
    let stat = fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with(&format!("cpu{cpu} ")))
        .context("cpu line in /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v[4];
    // USER_HZ is 100 on every Linux ABI that matters here.
    Ok((total - idle) * 10_000_000)
}

#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct RunResult {
    pub offered_pps: f64,
    pub delivered_pps: f64,
    pub loss: f64,
    /// DUT CPU (CPU 1) time per delivered packet.
    pub dut_ns_per_packet: f64,
}

impl Bench {
    pub fn new() -> Result<Self> {
        let net = BenchNet::new()?;
        let object = bench_object();
        let mut ebpf = EbpfLoader::new().load_file(&object).with_context(|| {
            format!("loading {} (run cargo xtask build-ebpf)", object.display())
        })?;
        for name in [
            "bench_gen",
            "bench_sink",
            "bench_ceiling",
            "bench_noop",
            "bench_pass",
        ] {
            let p: &mut Xdp = ebpf
                .program_mut(name)
                .context("bench program")?
                .try_into()?;
            p.load().with_context(|| format!("loading {name}"))?;
        }
        let sink = net.sink.clone();
        {
            let p: &mut Xdp = ebpf.program_mut("bench_sink").unwrap().try_into()?;
            scoped_in_netns(&sink, || p.attach("sink1", XdpMode::Driver))??;
        }
        Ok(Bench { net, ebpf })
    }

    pub fn sink_packets(&self) -> Result<u64> {
        let m: PerCpuArray<_, u64> = PerCpuArray::try_from(self.ebpf.map("SINK_COUNT").unwrap())?;
        Ok(m.get(&0, 0)?.iter().sum())
    }

    fn set_template(&mut self, frame: &[u8]) -> Result<()> {
        let mut words = [0u64; 8];
        for (i, w) in words.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(&frame[i * 8..i * 8 + 8]);
            *w = u64::from_ne_bytes(b);
        }
        let mut m: Array<_, [u64; 8]> = Array::try_from(self.ebpf.map_mut("TEMPLATE").unwrap())?;
        m.set(0, words, 0)?;
        Ok(())
    }

    fn set_config(&mut self, cfg: GenConfig) -> Result<()> {
        let mut m: Array<_, GenConfig> = Array::try_from(self.ebpf.map_mut("GEN_CONFIG").unwrap())?;
        m.set(0, cfg, 0)?;
        let mut s: PerCpuArray<_, GenState> =
            PerCpuArray::try_from(self.ebpf.map_mut("GEN_STATE").unwrap())?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        s.set(
            0,
            PerCpuValues::try_from(vec![GenState::default(); cpus])?,
            0,
        )?;
        Ok(())
    }

    fn sent(&self) -> Result<u64> {
        let s: PerCpuArray<_, GenState> =
            PerCpuArray::try_from(self.ebpf.map("GEN_STATE").unwrap())?;
        Ok(s.get(&0, 0)?.iter().map(|g| g.sent).sum())
    }

    /// Sends `proto` traffic over `flows` flows to `services` services for
    /// about `seconds`, at `rate_pps` (0: as fast as the generator goes).
    pub fn run(
        &mut self,
        proto: u8,
        services: u32,
        flows: u32,
        rate_pps: u64,
        seconds: f64,
    ) -> Result<RunResult> {
        let (frame, mut cfg) = template(
            proto,
            self.net.gen_mac,
            self.net.dut0_mac,
            DUT_ADDR,
            services,
            flows,
        );
        cfg.ifindex = self.net.gen0_index;
        cfg.rate_pps = rate_pps;
        self.set_template(&frame)?;
        self.set_config(cfg)?;
        let generator: &Xdp = self.ebpf.program("bench_gen").unwrap().try_into()?;
        let spec = TestRunSpec {
            // One call repeats the frame `repeat` times; at a fixed ~25 ms
            // per call, long calls keep that overhead small. Repetitions
            // count paced-out runs too (a few ns each), so paced calls are
            // as long as unpaced ones.
            repeat: 1 << 21,
            live_batch: Some(64),
            ingress_ifindex: self.net.gen0_index,
        };
        let gen_ns = self.net.gen_ns.clone();
        let sink_before = self.sink_packets()?;
        let cpu_before = cpu_busy_ns(1)?;
        let started = Instant::now();
        scoped_in_netns(&gen_ns, || -> Result<()> {
            pin_thread_to_cpu(0, 0)?;
            while started.elapsed().as_secs_f64() < seconds {
                test_run(generator, &frame, spec)?;
            }
            Ok(())
        })??;
        let elapsed = started.elapsed().as_secs_f64();
        // Frames in flight drain within milliseconds.
        std::thread::sleep(Duration::from_millis(50));
        let delivered = self.sink_packets()? - sink_before;
        let cpu = cpu_busy_ns(1)? - cpu_before;
        let sent = self.sent()?;
        Ok(RunResult {
            offered_pps: sent as f64 / elapsed,
            delivered_pps: delivered as f64 / elapsed,
            loss: if sent == 0 {
                1.0
            } else {
                1.0 - delivered as f64 / sent as f64
            },
            dut_ns_per_packet: if delivered == 0 {
                f64::NAN
            } else {
                cpu as f64 / delivered as f64
            },
        })
    }

    /// Highest paced rate with < 0.1 % loss: a geometric bisection between
    /// 10 kpps and `ceiling` (what the generator offered unpaced). Not
    /// bounded by the system's overload figure: a stack that livelocks under
    /// overload can still carry much more when offered less.
    pub fn no_loss_rate(
        &mut self,
        proto: u8,
        services: u32,
        flows: u32,
        ceiling: f64,
        seconds: f64,
    ) -> Result<RunResult> {
        let mut best = RunResult::default();
        let (mut lo, mut hi) = (10_000f64, ceiling);
        for _ in 0..7 {
            let mid = (lo * hi).sqrt();
            let r = self.run(proto, services, flows, mid as u64, seconds)?;
            eprintln!(
                "      paced at {:.3} Mpps: offered {:.3} delivered {:.3} loss {:.4}",
                mid / 1e6,
                r.offered_pps / 1e6,
                r.delivered_pps / 1e6,
                r.loss
            );
            if r.loss < 0.001 {
                best = r;
                lo = mid;
            } else {
                hi = mid;
            }
            if hi / lo < 1.08 {
                break;
            }
        }
        Ok(best)
    }

    /// XDP program alone: mean ns per run of `bench_gen` tail-calling
    /// `target` (minus the same with `bench_noop`), over `repeat` runs.
    pub fn xdp_alone_ns(
        &mut self,
        target: &aya::programs::ProgramFd,
        cfg: GenConfig,
        frame: &[u8],
        repeat: u32,
    ) -> Result<f64> {
        let with = |ebpf: &mut Ebpf, fd: &aya::programs::ProgramFd| -> Result<f64> {
            let mut arr = ProgramArray::try_from(ebpf.map_mut("TARGET").unwrap())?;
            arr.set(0, fd, 0)?;
            let generator: &Xdp = ebpf.program("bench_gen").unwrap().try_into()?;
            let outcome = test_run(
                generator,
                frame,
                TestRunSpec {
                    repeat,
                    ..TestRunSpec::ONCE
                },
            )?;
            Ok(outcome.per_run.as_nanos() as f64)
        };
        let mut c = cfg;
        c.ifindex = 0;
        c.rate_pps = 0;
        self.set_template(frame)?;
        self.set_config(c)?;
        let total = with(&mut self.ebpf, target)?;
        self.set_config(c)?;
        let noop_fd = {
            let p: &Xdp = self.ebpf.program("bench_noop").unwrap().try_into()?;
            p.fd()?.try_clone()?
        };
        let base = with(&mut self.ebpf, &noop_fd)?;
        Ok((total - base).max(0.0))
    }

    /// XDP_PASS on dut0, so the stack-based systems get the generator's
    /// frames through the veth's XDP receive path.
    pub fn attach_pass(&mut self) -> Result<aya::programs::xdp::XdpLinkId> {
        let dut = self.net.dut.clone();
        let p: &mut Xdp = self.ebpf.program_mut("bench_pass").unwrap().try_into()?;
        let id = scoped_in_netns(&dut, || p.attach("dut0", XdpMode::Driver))??;
        ns_sh(&dut, &["ethtool", "-K", "dut0", "gro", "off"])?;
        Ok(id)
    }

    pub fn detach_pass(&mut self, id: aya::programs::xdp::XdpLinkId) -> Result<()> {
        let p: &mut Xdp = self.ebpf.program_mut("bench_pass").unwrap().try_into()?;
        p.detach(id)?;
        Ok(())
    }

    pub fn attach_ceiling(&mut self) -> Result<aya::programs::xdp::XdpLinkId> {
        let dut = self.net.dut.clone();
        let dut1 = ifindex_in(&dut, "dut1")?;
        // The kernel resolves a devmap's ifindex in the writer's namespace.
        let mut port: DevMap<_> = DevMap::try_from(self.ebpf.map_mut("CEILING_PORT").unwrap())?;
        scoped_in_netns(&dut, || port.set(0, dut1, None, 0))??;
        let p: &mut Xdp = self.ebpf.program_mut("bench_ceiling").unwrap().try_into()?;
        let id = scoped_in_netns(&dut, || p.attach("dut0", XdpMode::Driver))??;
        Ok(id)
    }

    pub fn detach_ceiling(&mut self, id: aya::programs::xdp::XdpLinkId) -> Result<()> {
        let p: &mut Xdp = self.ebpf.program_mut("bench_ceiling").unwrap().try_into()?;
        p.detach(id)?;
        Ok(())
    }
}

// ---------------------------------------------------------- the systems

/// Backend j of service i (3 per service), behind the sink.
pub fn backend(i: u32, j: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * 3 + j)
}

/// The ClusterIP K3s would give service i (klipper DNATs to it).
pub fn cluster_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i)
}

fn proto_name(proto: u8) -> &'static str {
    if proto == 6 { "tcp" } else { "udp" }
}

/// Manifests for `services` UDP+TCP services: each port p = PORT_BASE + i on
/// the node address, three remote endpoints.
pub fn manifests(services: u32, node_name: &str) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {node_name}\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {DUT_SINK_SIDE}\n"
    );
    for i in 0..services {
        s.push_str(&service_manifest(i));
    }
    s
}

pub fn service_manifest(i: u32) -> String {
    let port = PORT_BASE as u32 + i;
    let mut eps = String::new();
    for j in 0..3 {
        eps.push_str(&format!(
            "- addresses: [\"{}\"]\n  nodeName: remote\n  conditions: {{ready: true}}\n",
            backend(i, j)
        ));
    }
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: bench}}\nspec:\n  type: LoadBalancer\n  ports:\n  - {{name: u, protocol: UDP, port: {port}, targetPort: 8080}}\n  - {{name: t, protocol: TCP, port: {port}, targetPort: 8080}}\nstatus: {{loadBalancer: {{ingress: [{{ip: {DUT_ADDR}}}]}}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s{i}-x\n  namespace: bench\n  labels: {{kubernetes.io/service-name: s{i}}}\naddressType: IPv4\nendpoints:\n{eps}ports:\n- {{name: u, protocol: UDP, port: 8080}}\n- {{name: t, protocol: TCP, port: 8080}}\n"
    )
}

/// iptables-restore input for one service: klipper-lb's rule shapes
/// (`PREROUTING ! -s CLUSTER_IP/32 -p PROTO --dport PORT`, `POSTROUTING -d
/// CLUSTER_IP/32 -p PROTO -j MASQUERADE`) leading into kube-proxy's
/// iptables-mode chains (KUBE-SVC with `statistic --mode random` →
/// KUBE-SEP DNAT). K3s runs the klipper rules in a svclb pod's namespace and
/// DNATs to the ClusterIP first; in one namespace the klipper match jumps
/// straight into the service chain instead, so the rule scan per new
/// connection is the same and the packet is NATed once.
pub fn iptables_service(i: u32, chains_only: bool) -> (String, String) {
    let mut decl = String::new();
    let mut rules = String::new();
    for proto in [6u8, 17] {
        let p = proto_name(proto);
        let svc = format!("KUBE-SVC-{i}{}", p.to_uppercase());
        decl.push_str(&format!(":{svc} - [0:0]\n"));
        let port = PORT_BASE as u32 + i;
        if !chains_only {
            rules.push_str(&format!(
                "-A PREROUTING ! -s {}/32 -p {p} --dport {port} -j {svc}\n",
                cluster_ip(i)
            ));
            rules.push_str(&format!(
                "-A POSTROUTING -d {}/32 -p {p} -j MASQUERADE\n",
                cluster_ip(i)
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
            rules.push_str(&format!(
                "-A {sep} -s {}/32 -j KUBE-MARK-MASQ\n",
                backend(i, j)
            ));
            rules.push_str(&format!(
                "-A {sep} -p {p} -j DNAT --to-destination {}:8080\n",
                backend(i, j)
            ));
        }
    }
    (decl, rules)
}

pub fn iptables_ruleset(services: u32) -> String {
    let mut decl = String::from("*nat\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n");
    let mut rules = String::from(
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n-A POSTROUTING -j KUBE-POSTROUTING\n-A KUBE-POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE\n",
    );
    for i in 0..services {
        let (d, r) = iptables_service(i, false);
        decl.push_str(&d);
        rules.push_str(&r);
    }
    format!("{decl}{rules}COMMIT\n")
}

/// nftables in kube-proxy's nftables-mode style: one verdict map from
/// address . protocol . port to a per-service chain that picks an endpoint
/// with `numgen random`.
pub fn nft_service(i: u32) -> (String, String) {
    let mut chains = String::new();
    let mut elements = String::new();
    for proto in [6u8, 17] {
        let p = proto_name(proto);
        let port = PORT_BASE as u32 + i;
        let svc = format!("svc-{i}-{p}");
        elements.push_str(&format!("{DUT_ADDR} . {p} . {port} : goto {svc}, "));
        let mut seps = String::new();
        for j in 0..3 {
            let sep = format!("sep-{i}-{p}-{j}");
            chains.push_str(&format!(
                "add chain ip xlb-bench {sep}\nadd rule ip xlb-bench {sep} ip saddr {} meta mark set meta mark | 0x4000\nadd rule ip xlb-bench {sep} meta l4proto {p} dnat to {}:8080\n",
                backend(i, j),
                backend(i, j)
            ));
            seps.push_str(&format!("{j} : goto {sep}, "));
        }
        chains.push_str(&format!(
            "add chain ip xlb-bench {svc}\nadd rule ip xlb-bench {svc} meta mark set meta mark | 0x4000\nadd rule ip xlb-bench {svc} numgen random mod 3 vmap {{ {} }}\n",
            seps.trim_end_matches(", ")
        ));
    }
    (chains, elements.trim_end_matches(", ").to_string())
}

pub fn nft_ruleset(services: u32) -> String {
    let mut s = String::from(
        "add table ip xlb-bench\nadd map ip xlb-bench service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }\nadd chain ip xlb-bench prerouting { type nat hook prerouting priority dstnat ; }\nadd chain ip xlb-bench postrouting { type nat hook postrouting priority srcnat ; }\nadd rule ip xlb-bench prerouting ip daddr . meta l4proto . th dport vmap @service-ips\nadd rule ip xlb-bench postrouting meta mark & 0x4000 == 0x4000 masquerade\n",
    );
    for i in 0..services {
        let (chains, elements) = nft_service(i);
        s.push_str(&chains);
        s.push_str(&format!(
            "add element ip xlb-bench service-ips {{ {elements} }}\n"
        ));
    }
    s
}

/// Feeds `input` to a command in the DUT namespace; returns its wall time.
pub fn feed(dut: &str, args: &[&str], input: &str) -> Result<Duration> {
    use std::io::Write;
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
    /// The agent on a manifest directory holding `services` services.
    pub fn start(net: &BenchNet, services: u32) -> Result<AgentRun> {
        let node_name = format!("{}-node", net.dut);
        let manifests = net.dir.join("manifests");
        let _ = fs::remove_dir_all(&manifests);
        fs::create_dir_all(&manifests)?;
        fs::write(
            manifests.join("services.yaml"),
            self::manifests(services, &node_name),
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
        let mut args = vec![
            "--sweep-interval",
            "3600",
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

/// CPU time (user + system) of a process, ns.
pub fn process_cpu_ns(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    Ok(ticks * 10_000_000)
}
