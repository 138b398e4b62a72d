//! The generator and the sink: `bench_gen` sends template frames with a
//! fresh flow tuple each through BPF_PROG_TEST_RUN live frames, at a paced
//! or unpaced rate; `bench_sink` counts what arrives. Also `xlb_xdp` alone,
//! timed by tail calls from `bench_gen`.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMap, PerCpuArray, PerCpuValues, ProgramArray},
    programs::{Xdp, XdpMode},
};
pub use xlb_bench_common::{ForwardConfig, GenConfig, GenState};
use xlb_tests::{
    netns::{ns_sh, scoped_in_netns},
    packet::{
        FrameSpec6, TCP_SYN, TestRunSpec, checksum, frame6, pseudo_checksum, pseudo_checksum6,
        test_run,
    },
};

use crate::{
    network::{
        BenchNet, CLIENT_BASE, CLIENT_BASE6, PORT_BASE, dut_addr, ifindex_in, pin_thread_to_cpu,
    },
    results::Family,
};

/// The benchmark's eBPF object (`XLB_BENCH_OBJECT`, set by `cargo xtask
/// bench`), built by `cargo xtask build-ebpf` from tests/bench/ebpf.
pub fn bench_object() -> PathBuf {
    std::env::var_os("XLB_BENCH_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/ebpf/bpfel-unknown-none/release/xlb-bench-ebpf")
        })
}

/// A template frame (UDP, or TCP SYN; 64 bytes for IPv4, 80 for IPv6: the
/// same L4 payload behind a 20 bytes longer header) from the first client
/// to `dst`, and the generator config describing it.
pub fn template(
    proto: u8,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    dst: IpAddr,
    services: u32,
    flows: u32,
) -> (Vec<u8>, GenConfig) {
    let (sport, dport) = (1024u16, PORT_BASE);
    let ipv6 = dst.is_ipv6();
    let udp_payload = 18;
    let (mut f, ip_check, l4_check, src, dst) = match dst {
        IpAddr::V4(dst) => {
            let (f, ip_check, l4_check) = frame_v4(proto, dst, sport, dport, udp_payload);
            (
                f,
                ip_check,
                l4_check,
                u32::from(CLIENT_BASE),
                u32::from(dst),
            )
        }
        IpAddr::V6(dst) => {
            let src = CLIENT_BASE6;
            let mut f = frame6(&FrameSpec6 {
                proto,
                sport,
                dport,
                tcp_flags: TCP_SYN,
                udp_checksum: true,
                payload: if proto == 6 { 0 } else { udp_payload },
                ..FrameSpec6::new(src, dst)
            });
            f.resize(80, 0);
            let at = 14 + 40 + if proto == 6 { 16 } else { 6 };
            let l4_check = u16::from_be_bytes([f[at], f[at + 1]]);
            (f, 0, l4_check, low32(src), low32(dst))
        }
    };
    f[0..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&src_mac);
    // Checksums and template values as the program loads them: the raw
    // bytes in native order.
    let raw16 = |v: u16| u16::from_ne_bytes(v.to_be_bytes());
    let raw32 = |v: u32| u32::from_ne_bytes(v.to_be_bytes());
    let cfg = GenConfig {
        ifindex: 0,
        flows,
        services,
        dst_addr: raw32(dst),
        dst_port_base: PORT_BASE,
        proto,
        ipv6: u8::from(ipv6),
        src_addr_base: src,
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

/// The last 32 bits of an IPv6 address: the part the generator varies.
fn low32(a: Ipv6Addr) -> u32 {
    u128::from(a) as u32
}

/// The IPv4 template: 64 bytes, UDP without checksum or a TCP SYN; with its
/// IPv4 header checksum and TCP checksum.
fn frame_v4(
    proto: u8,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    udp_payload: usize,
) -> (Vec<u8>, u16, u16) {
    let src = CLIENT_BASE;
    let l4_len = if proto == 6 { 20 } else { 8 + udp_payload };
    let mut f = vec![0u8; 12];
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
        l4.extend_from_slice(&[0x50, TCP_SYN, 0xff, 0xff, 0, 0, 0, 0]);
        l4_check = pseudo_checksum(&src, &dst, 6, &l4);
        l4[16..18].copy_from_slice(&l4_check.to_be_bytes());
    } else {
        l4.extend_from_slice(&(l4_len as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
        l4.extend_from_slice(&[0x78; 18][..udp_payload]);
    }
    f.extend_from_slice(&l4);
    f.resize(64, 0);
    (f, ip_check, l4_check)
}

/// What the generator's frame `n` carries for `cfg`, as `bench_gen`
/// computes it: source address (32 bits of it), source and destination
/// port.
fn expected_tuple(cfg: &GenConfig, n: u64) -> (u32, u16, u16) {
    let f = n % u64::from(cfg.flows.max(1));
    let services = u64::from(cfg.services.max(1));
    let client = f / services;
    (
        cfg.src_addr_base.wrapping_add((client / 50_000) as u32),
        (1024 + client % 50_000) as u16,
        (u64::from(cfg.dst_port_base) + f % services) as u16,
    )
}

/// A frame that reached the sink: its addresses and destination port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Delivered {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub dst_port: u16,
}

impl Delivered {
    /// The addresses and destination port of an IPv4 or IPv6 frame.
    pub fn parse(frame: &[u8]) -> Option<Delivered> {
        let port = |at: usize| Some(u16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?));
        match frame.get(12..14)? {
            [0x08, 0x00] => {
                let l4 = 14 + usize::from(frame.get(14)? & 0x0f) * 4;
                let a: [u8; 4] = frame.get(26..30)?.try_into().ok()?;
                let b: [u8; 4] = frame.get(30..34)?.try_into().ok()?;
                Some(Delivered {
                    src: Ipv4Addr::from(a).into(),
                    dst: Ipv4Addr::from(b).into(),
                    dst_port: port(l4 + 2)?,
                })
            }
            [0x86, 0xdd] => {
                let a: [u8; 16] = frame.get(22..38)?.try_into().ok()?;
                let b: [u8; 16] = frame.get(38..54)?.try_into().ok()?;
                Some(Delivered {
                    src: Ipv6Addr::from(a).into(),
                    dst: Ipv6Addr::from(b).into(),
                    dst_port: port(56)?,
                })
            }
            _ => None,
        }
    }
}

/// Checks frame `n` of `cfg` as `bench_gen` left it (see
/// `Bench::check_generator`).
fn check_frame(f: &[u8], cfg: &GenConfig, n: u64) -> Result<()> {
    let (src, sport, dport) = expected_tuple(cfg, n);
    let got = Delivered::parse(f).context("not an IPv4 or IPv6 frame")?;
    let (low, l3, l4) = match got.src {
        IpAddr::V4(a) => (u32::from(a), 14, 34),
        IpAddr::V6(a) => (low32(a), 14, 54),
    };
    let sport_got = u16::from_be_bytes([f[l4], f[l4 + 1]]);
    anyhow::ensure!(
        (low, sport_got, got.dst_port) == (src, sport, dport),
        "tuple {:?}, expected {:?}",
        (low, sport_got, got.dst_port),
        (src, sport, dport)
    );
    match (got.src, got.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            anyhow::ensure!(checksum(&f[l3..l4]) == 0, "IPv4 header checksum");
            let len = usize::from(u16::from_be_bytes([f[l3 + 2], f[l3 + 3]])) - 20;
            if cfg.proto == 6 {
                anyhow::ensure!(
                    pseudo_checksum(&s, &d, 6, &f[l4..l4 + len]) == 0,
                    "TCP checksum"
                );
            } else {
                anyhow::ensure!(f[l4 + 6..l4 + 8] == [0, 0], "UDP over IPv4 goes without");
            }
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let len = usize::from(u16::from_be_bytes([f[l3 + 4], f[l3 + 5]]));
            anyhow::ensure!(
                pseudo_checksum6(&s, &d, cfg.proto, &f[l4..l4 + len]) == 0,
                "L4 checksum over the IPv6 pseudo-header"
            );
            anyhow::ensure!(
                cfg.proto == 6 || f[l4 + 6..l4 + 8] != [0, 0],
                "UDP over IPv6 needs a checksum"
            );
        }
        _ => anyhow::bail!("mixed families"),
    }
    Ok(())
}

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
    /// Frames counted at the sink.
    pub delivered: u64,
    /// One of them as it arrived (every 4096th is sampled), if any was.
    pub sample: Option<Delivered>,
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
            "bench_forward",
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
        let mut bench = Bench { net, ebpf };
        bench.check_generator()?;
        Ok(bench)
    }

    /// Runs `bench_gen` without sending (tail call into `bench_noop`) for
    /// each family and protocol and checks the last frame it wrote: the
    /// flow's tuple where the config puts it, and every checksum valid (the
    /// IPv4 header's, TCP's, and UDP's over IPv6, which is never 0).
    fn check_generator(&mut self) -> Result<()> {
        let noop_fd = {
            let p: &Xdp = self.ebpf.program("bench_noop").unwrap().try_into()?;
            p.fd()?.try_clone()?
        };
        let mut arr = ProgramArray::try_from(self.ebpf.map_mut("TARGET").unwrap())?;
        arr.set(0, &noop_fd, 0)?;
        for family in Family::ALL {
            for proto in [6u8, 17] {
                // Frame n = repeat - 1; past 50 000 clients the source
                // address moves too.
                for (repeat, services, flows) in
                    [(1u32, 1, 1), (7, 3, 60_000), (170_003, 7, u32::MAX)]
                {
                    let (frame, cfg) =
                        template(proto, [2; 6], [4; 6], dut_addr(family), services, flows);
                    self.set_template(&frame)?;
                    self.set_config(cfg)?;
                    let generator: &Xdp = self.ebpf.program("bench_gen").unwrap().try_into()?;
                    // On one CPU throughout: the frame count is per CPU.
                    let out = std::thread::scope(|scope| {
                        scope
                            .spawn(|| -> Result<Vec<u8>> {
                                pin_thread_to_cpu(0, 0)?;
                                let spec = TestRunSpec {
                                    repeat,
                                    ..TestRunSpec::ONCE
                                };
                                Ok(test_run(generator, &frame, spec)?.frame)
                            })
                            .join()
                            .map_err(|_| anyhow::anyhow!("the generator check panicked"))?
                    })?;
                    check_frame(&out, &cfg, u64::from(repeat - 1)).with_context(|| {
                        format!("bench_gen wrote a bad {family} frame (proto {proto}, frame {}): {out:02x?}", repeat - 1)
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Clears the sink's sample.
    fn clear_sample(&mut self) -> Result<()> {
        let mut m: PerCpuArray<_, [u64; 8]> =
            PerCpuArray::try_from(self.ebpf.map_mut("SINK_SAMPLE").unwrap())?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        m.set(0, PerCpuValues::try_from(vec![[0u64; 8]; cpus])?, 0)?;
        Ok(())
    }

    /// A frame the sink sampled since the last `clear_sample`, if any.
    fn sample(&self) -> Result<Option<Delivered>> {
        let m: PerCpuArray<_, [u64; 8]> =
            PerCpuArray::try_from(self.ebpf.map("SINK_SAMPLE").unwrap())?;
        Ok(m.get(&0, 0)?
            .iter()
            .filter(|words| words.iter().any(|w| *w != 0))
            .find_map(|words| {
                let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
                Delivered::parse(&bytes)
            }))
    }

    pub fn sink_packets(&self) -> Result<u64> {
        let m: PerCpuArray<_, u64> = PerCpuArray::try_from(self.ebpf.map("SINK_COUNT").unwrap())?;
        Ok(m.get(&0, 0)?.iter().sum())
    }

    fn set_template(&mut self, frame: &[u8]) -> Result<()> {
        let mut words = [0u64; 10];
        for (w, b) in words.iter_mut().zip(frame.chunks(8)) {
            let mut word = [0u8; 8];
            word[..b.len()].copy_from_slice(b);
            *w = u64::from_ne_bytes(word);
        }
        let mut m: Array<_, [u64; 10]> = Array::try_from(self.ebpf.map_mut("TEMPLATE").unwrap())?;
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

    /// Sends `proto` traffic of `family` over `flows` flows to `services`
    /// services for about `seconds`, at `rate_pps` (0: as fast as the
    /// generator goes).
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &mut self,
        family: Family,
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
            dut_addr(family),
            services,
            flows,
        );
        cfg.ifindex = self.net.gen0_index;
        cfg.rate_pps = rate_pps;
        self.set_template(&frame)?;
        self.set_config(cfg)?;
        self.clear_sample()?;
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
            delivered,
            sample: self.sample()?,
        })
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

    /// `bench_forward` on dut0, rewriting frames for sink1 behind dut1;
    /// checked first on one frame of each family and protocol.
    pub fn attach_forwarder(&mut self) -> Result<aya::programs::xdp::XdpLinkId> {
        let dut = self.net.dut.clone();
        let dut1 = ifindex_in(&dut, "dut1")?;
        let mut port: DevMap<_> = DevMap::try_from(self.ebpf.map_mut("FORWARD_PORT").unwrap())?;
        scoped_in_netns(&dut, || port.set(0, dut1, None, 0))??;
        let cfg = ForwardConfig {
            dst_mac: self.net.sink1_mac,
            src_mac: self.net.dut1_mac,
        };
        let mut m: Array<_, ForwardConfig> =
            Array::try_from(self.ebpf.map_mut("FORWARD_CONFIG").unwrap())?;
        m.set(0, cfg, 0)?;
        self.check_forwarder(cfg)?;
        let p: &mut Xdp = self.ebpf.program_mut("bench_forward").unwrap().try_into()?;
        let id = scoped_in_netns(&dut, || p.attach("dut0", XdpMode::Driver))??;
        Ok(id)
    }

    /// `bench_forward` on a template frame of each family and protocol:
    /// redirected, with the new MACs, the TTL / hop limit one lower, the
    /// IPv4 header checksum still valid, and nothing else changed.
    fn check_forwarder(&self, cfg: ForwardConfig) -> Result<()> {
        let p: &Xdp = self.ebpf.program("bench_forward").unwrap().try_into()?;
        for family in Family::ALL {
            for proto in [6u8, 17] {
                let (frame, _) = template(proto, [2; 6], [4; 6], dut_addr(family), 1, 1);
                let out = test_run(p, &frame, TestRunSpec::ONCE)?;
                let f = &out.frame;
                anyhow::ensure!(
                    out.verdict == 4,
                    "bench_forward ({family}, {proto}): verdict {}",
                    out.verdict
                );
                anyhow::ensure!(f.len() == frame.len(), "bench_forward changed the length");
                anyhow::ensure!(
                    f[0..6] == cfg.dst_mac && f[6..12] == cfg.src_mac,
                    "bench_forward's MACs: {:02x?}",
                    &f[0..12]
                );
                let hop = if family == Family::V4 { 14 + 8 } else { 14 + 7 };
                anyhow::ensure!(f[hop] == frame[hop] - 1, "TTL / hop limit not decremented");
                if family == Family::V4 {
                    anyhow::ensure!(checksum(&f[14..34]) == 0, "IPv4 header checksum");
                }
                let rest = |x: &[u8]| {
                    let mut v = x[12..].to_vec();
                    v[hop - 12] = 0;
                    if family == Family::V4 {
                        v[14 + 10 - 12] = 0;
                        v[14 + 11 - 12] = 0;
                    }
                    v
                };
                anyhow::ensure!(rest(f) == rest(&frame), "bench_forward changed more");
            }
        }
        Ok(())
    }

    pub fn detach_forwarder(&mut self, id: aya::programs::xdp::XdpLinkId) -> Result<()> {
        let p: &mut Xdp = self.ebpf.program_mut("bench_forward").unwrap().try_into()?;
        p.detach(id)?;
        Ok(())
    }

    pub fn detach_ceiling(&mut self, id: aya::programs::xdp::XdpLinkId) -> Result<()> {
        let p: &mut Xdp = self.ebpf.program_mut("bench_ceiling").unwrap().try_into()?;
        p.detach(id)?;
        Ok(())
    }
}
