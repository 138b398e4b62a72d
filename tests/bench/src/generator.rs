//! The generator and the sink: `bench_gen` sends template frames with a
//! fresh flow tuple each through BPF_PROG_TEST_RUN live frames, at a paced
//! or unpaced rate; `bench_sink` counts what arrives. Also `xlb_xdp` alone,
//! timed by tail calls from `bench_gen`.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMap, PerCpuArray, PerCpuValues, ProgramArray},
    programs::{Xdp, XdpMode},
};
pub use xlb_bench_common::{GenConfig, GenState};
use xlb_tests::{
    netns::{ns_sh, scoped_in_netns},
    packet::{TestRunSpec, checksum, test_run},
};

use crate::network::{BenchNet, CLIENT_BASE, DUT_ADDR, PORT_BASE, ifindex_in, pin_thread_to_cpu};

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
