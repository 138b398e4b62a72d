//! The datapath fuzzer: random and mutated frames through the real
//! `xlb_xdp`, `xlb_tc_ingress` and `xlb_tc_egress` (`BPF_PROG_TEST_RUN`),
//! each output judged by a reference model that reads the maps. See
//! [`generator`] for the frames, [`model`] for the property, [`fixture`] for
//! the services and the network the FIB lookups see.

pub mod checksum;
pub mod fixture;
pub mod generator;
pub mod headers;
pub mod model;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::{
    netns::{Namespace, scoped_in_netns},
    packet::{TestRunSpec, test_run, test_run_tc},
};
use generator::{Generator, KnownFlow};
use model::{Expect, Hook, Model};

/// The program a frame is run through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Program {
    Xdp,
    TcIngress,
    TcEgress,
}

impl Program {
    pub fn name(self) -> &'static str {
        match self {
            Program::Xdp => "xlb_xdp",
            Program::TcIngress => "xlb_tc_ingress",
            Program::TcEgress => "xlb_tc_egress",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub frames: u64,
    pub seed: u64,
    /// Generate ICMP errors quoting flows and judge them by the ICMP
    /// translation spec.
    pub icmp: bool,
    /// `FLOWS` is emptied after this many frames, so new flows keep being
    /// made.
    pub reset_every: u64,
}

impl Settings {
    /// From `XLB_FUZZ_FRAMES`, `XLB_FUZZ_SEED` (random when unset) and
    /// `XLB_FUZZ_ICMP` (`0`: leave ICMP errors of flows out).
    pub fn from_env(default_frames: u64) -> Result<Settings> {
        let number = |name: &str| -> Result<Option<u64>> {
            std::env::var(name)
                .ok()
                .map(|v| {
                    v.parse()
                        .with_context(|| format!("{name}={v} is not a number"))
                })
                .transpose()
        };
        Ok(Settings {
            frames: number("XLB_FUZZ_FRAMES")?.unwrap_or(default_frames),
            seed: number("XLB_FUZZ_SEED")?.unwrap_or_else(|| fastrand::u64(..)),
            icmp: std::env::var("XLB_FUZZ_ICMP").map_or(true, |v| v != "0"),
            reset_every: 2_000,
        })
    }
}

/// One kind of mismatch: how often, and the shortest frame that showed it.
pub struct Failure {
    pub count: u64,
    pub example: String,
    example_len: usize,
}

#[derive(Default)]
pub struct Report {
    pub frames: u64,
    pub elapsed: Duration,
    /// Outcome class → frames.
    pub outcomes: BTreeMap<&'static str, u64>,
    /// (program, verdict) → frames.
    pub verdicts: BTreeMap<(&'static str, &'static str), u64>,
    pub failures: BTreeMap<&'static str, Failure>,
}

impl Report {
    pub fn print(&self, settings: &Settings) {
        println!(
            "fuzz: {} frames in {:.1}s ({:.0} frames/s), seed {}, ICMP errors {}",
            self.frames,
            self.elapsed.as_secs_f64(),
            self.frames as f64 / self.elapsed.as_secs_f64().max(1e-9),
            settings.seed,
            if settings.icmp { "on" } else { "off" }
        );
        for (class, n) in &self.outcomes {
            println!("  {n:>9}  {class}");
        }
        for ((program, verdict), n) in &self.verdicts {
            println!("  {n:>9}  {program} {verdict}");
        }
        for (class, f) in &self.failures {
            println!("  {:>9}  FAILED: {class}\n{}", f.count, f.example);
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Runs `settings.frames` frames in a fresh network namespace and returns
/// what happened; mismatches are in [`Report::failures`].
pub fn run(settings: &Settings) -> Result<Report> {
    // SAFETY: geteuid has no preconditions.
    anyhow::ensure!(unsafe { libc::geteuid() } == 0, "the fuzzer needs root");
    let ns = Namespace::new(&format!("xlbfz{}", std::process::id()))?;
    let routes = fixture::build_network(ns.name())?;
    scoped_in_netns(ns.name(), || run_inside(settings, &routes))?
}

/// `BPF_PROG_TEST_RUN` builds no skb (EINVAL) from a frame of 14 bytes or
/// less, nor from an untagged IPv4 or IPv6 frame shorter than its network
/// header (seen on 6.18); such frames never reach a tc program that way.
fn tc_refuses(frame: &[u8]) -> bool {
    let ether_type = headers::be16(frame, 12);
    frame.len() <= 14
        || (ether_type == headers::ETH_P_IP && frame.len() < 14 + 20)
        || (ether_type == 0x86dd && frame.len() < 14 + 40)
}

fn run_inside(settings: &Settings, routes: &fixture::Routes) -> Result<Report> {
    let mut fixture = fixture::Fixture::new(routes)?;
    let mut model = Model::read(&fixture.maps, routes.clone(), settings.icmp)?;
    let mut generator = Generator::new(
        settings.seed,
        fixture.targets(),
        settings.icmp,
        fixture.ifindexes.len(),
    );
    let mut flows: Vec<KnownFlow> = Vec::new();
    let mut report = Report::default();
    let started = Instant::now();
    for index in 0..settings.frames {
        if index % settings.reset_every == 0 {
            fixture.clear_flows()?;
            flows.clear();
        }
        if index % settings.reset_every == settings.reset_every / 2 {
            fixture.churn()?;
            model = Model::read(&fixture.maps, routes.clone(), settings.icmp)?;
        }
        let case = generator.next(&flows);
        let hook = Hook {
            // BPF_PROG_TEST_RUN runs tc programs on a loopback skb (device
            // 1) with no ingress device (0).
            ifindex: match case.program {
                Program::Xdp => fixture.ifindexes[case.ingress],
                Program::TcEgress => 1,
                _ => 0,
            },
            fragments: &fixture.fragments,
            maps: &fixture.maps,
        };
        let expect = model.expect(case.program, &case.frame, &hook);
        let (verdict, out) = match case.program {
            Program::Xdp => {
                let spec = TestRunSpec {
                    ingress_ifindex: fixture.ifindexes[case.ingress],
                    ..TestRunSpec::ONCE
                };
                let outcome = test_run(fixture.xdp()?, &case.frame, spec);
                let outcome = outcome.with_context(|| refused(index, &case))?;
                (outcome.verdict, outcome.frame)
            }
            p => match test_run_tc(fixture.tc(p.name())?, &case.frame) {
                Ok((verdict, frame)) => (verdict as u32, frame),
                Err(_) if tc_refuses(&case.frame) => {
                    *report
                        .outcomes
                        .entry("not run: tc test run refuses a frame shorter than its L3 header")
                        .or_default() += 1;
                    continue;
                }
                Err(e) => return Err(e).with_context(|| refused(index, &case)),
            },
        };
        *report
            .verdicts
            .entry((
                case.program.name(),
                model::verdict_name(case.program, verdict),
            ))
            .or_default() += 1;
        match model.judge(case.program, &case.frame, &expect, verdict, &out, &hook) {
            Ok(judged) => {
                *report.outcomes.entry(judged.class).or_default() += 1;
                if let Some(flow) = judged.new_flow {
                    if flows.len() >= 64 {
                        flows.remove(0);
                    }
                    flows.push(flow);
                }
            }
            Err(m) => {
                let failure = report.failures.entry(m.class).or_insert(Failure {
                    count: 0,
                    example: String::new(),
                    example_len: usize::MAX,
                });
                failure.count += 1;
                if case.frame.len() < failure.example_len {
                    failure.example_len = case.frame.len();
                    failure.example = describe(index, &case, &expect, verdict, &out, &m);
                }
            }
        }
    }
    report.frames = settings.frames;
    report.elapsed = started.elapsed();
    Ok(report)
}

fn refused(index: u64, case: &generator::Case) -> String {
    format!(
        "frame {index} ({:?}) through {} (ingress #{}) refused by the test run: {}",
        case.aim,
        case.program.name(),
        case.ingress,
        hex(&case.frame)
    )
}

fn describe(
    index: u64,
    case: &generator::Case,
    expect: &Expect,
    verdict: u32,
    out: &[u8],
    m: &model::Mismatch,
) -> String {
    format!(
        "    frame {index} ({:?}) through {} (ingress #{}):\n      in:  {}\n      \
         got: {} {}\n      model: {expect:?}\n      expected: {}",
        case.aim,
        case.program.name(),
        case.ingress,
        hex(&case.frame),
        model::verdict_name(case.program, verdict),
        hex(out),
        m.expected
    )
}
