//! `cargo xtask fuzz`: the datapath fuzzer (see `xlb_tests::fuzz`) for many
//! frames, with counts per outcome class. Exits non-zero on any mismatch.

use anyhow::Result;
use clap::Parser;
use xlb_tests::fuzz::{Settings, run};

#[derive(Parser)]
#[command(about = "Fuzz the xlb datapath against its reference model")]
struct Cli {
    /// Frames to run.
    #[arg(long, default_value_t = 1_000_000)]
    frames: u64,
    /// Seed of the frame generator (random when not given).
    #[arg(long)]
    seed: Option<u64>,
    /// Leave out ICMP errors quoting flows (for an object without ICMP
    /// translation).
    #[arg(long)]
    no_icmp: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let settings = Settings {
        frames: cli.frames,
        seed: cli.seed.unwrap_or_else(|| fastrand::u64(..)),
        icmp: !cli.no_icmp,
        reset_every: 2_000,
    };
    println!("fuzz seed {}", settings.seed);
    let report = run(&settings)?;
    report.print(&settings);
    anyhow::ensure!(
        report.failures.is_empty(),
        "{} mismatch classes (seed {})",
        report.failures.len(),
        settings.seed
    );
    Ok(())
}
