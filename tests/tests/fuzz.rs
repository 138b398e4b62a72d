//! The datapath fuzz property (see `xlb_tests::fuzz`): random and mutated
//! frames through the real programs, every output the input untouched or
//! exactly the model's translation. `XLB_FUZZ_FRAMES` (default 10 000),
//! `XLB_FUZZ_SEED` (printed; random when unset), `XLB_FUZZ_ICMP=0` leaves
//! out ICMP errors of flows. `cargo xtask fuzz` runs 10^6. Needs root.

use anyhow::Result;
use xlb_tests::fuzz::{Settings, run};

#[test]
fn every_output_is_the_input_or_the_models_translation() -> Result<()> {
    let settings = Settings::from_env(10_000)?;
    println!("fuzz seed {} (XLB_FUZZ_SEED to repeat)", settings.seed);
    let report = run(&settings)?;
    report.print(&settings);
    assert!(
        report.failures.is_empty(),
        "{} mismatch classes; seed {}",
        report.failures.len(),
        settings.seed
    );
    Ok(())
}
