//! Project tasks: `cargo xtask build-ebpf | build | lint | test | fuzz | demo | bench | image`.
//!
//! Every task prepares what it needs by itself, idempotently: the nightly
//! toolchain's `rust-src`, and `bpf-linker` built against that toolchain's own
//! LLVM, installed under `target/tools` so nothing global is touched.

mod image;
mod system_tools;
mod toolchain;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "xlb project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF objects (lb-ebpf, tests/bench/ebpf) for bpfel-unknown-none, preparing the
    /// toolchain first.
    BuildEbpf {
        /// Kept for symmetry: the eBPF object is always built optimised (the
        /// verifier needs it).
        #[arg(long)]
        release: bool,
    },
    /// Build the eBPF object and the xlb binary (release).
    Build,
    /// `cargo fmt --check` and clippy (-D warnings) for the workspace and for
    /// lb-ebpf on its own target.
    Lint,
    /// Build everything, run unit tests, then the privileged end-to-end tests.
    Test {
        /// Extra arguments for the end-to-end test binary (e.g. a test name).
        #[arg(trailing_var_arg = true)]
        filter: Vec<String>,
    },
    /// Fuzz the datapath: random and mutated frames through the real programs
    /// (BPF_PROG_TEST_RUN), every output checked against a reference model;
    /// counts per outcome class.
    Fuzz {
        #[arg(long, default_value_t = 1_000_000)]
        frames: u64,
        /// Generator seed (random when not given; printed either way).
        #[arg(long)]
        seed: Option<u64>,
        /// Leave out ICMP errors quoting flows.
        #[arg(long)]
        no_icmp: bool,
    },
    /// Build everything and run the demo: a small topology in network
    /// namespaces with real traffic through xlb.
    Demo,
    /// Benchmark xlb against the iptables and nftables paths.
    Bench {
        #[arg(long)]
        quick: bool,
    },
    /// Build the OCI image archive of the agent (static musl binary) into
    /// target/image, and say how to load it.
    Image,
    /// Show which system tools a task needs, which are missing and what
    /// the task would do about it (install with apt-get, or stop), without
    /// doing it.
    SystemTools {
        #[arg(value_enum, default_value_t = system_tools::Need::Test)]
        task: system_tools::Need,
    },
}

fn main() {
    let cli = Cli::parse();
    // System tools first, so a fresh machine gets them (or a list of them)
    // before minutes of building.
    let need = match &cli.task {
        Task::BuildEbpf { .. } | Task::Build | Task::Lint => Some(system_tools::Need::Build),
        Task::Test { .. } | Task::Fuzz { .. } => Some(system_tools::Need::Test),
        Task::Demo => Some(system_tools::Need::Demo),
        Task::Bench { .. } => Some(system_tools::Need::Bench),
        Task::Image => Some(system_tools::Need::Image),
        Task::SystemTools { .. } => None,
    };
    if let Some(Err(e)) = need.map(system_tools::ensure) {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
    let result = match cli.task {
        Task::BuildEbpf { release: _ } => build_ebpf(),
        Task::Build => build_all(),
        Task::Lint => lint(),
        Task::Test { filter } => test(&filter),
        Task::Fuzz {
            frames,
            seed,
            no_icmp,
        } => fuzz(frames, seed, no_icmp),
        Task::Demo => demo(),
        Task::Bench { quick } => bench(quick),
        Task::Image => image::build().map(drop),
        Task::SystemTools { task } => system_tools::show(task),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// The eBPF crates, each its own workspace built for bpfel-unknown-none:
/// the datapath, and the benchmark's own programs.
const EBPF_CRATES: [&str; 2] = ["lb-ebpf", "tests/bench/ebpf"];

/// Where `build-ebpf` leaves an object (`lb-ebpf`: lb-userspace's build
/// script embeds it from there; `xlb-bench-ebpf`: the benchmark loads it).
pub fn ebpf_object(name: &str) -> PathBuf {
    workspace_root()
        .join("target/ebpf/bpfel-unknown-none/release")
        .join(name)
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn build_ebpf() -> Result<()> {
    let tools = toolchain::prepare()?;
    let root = workspace_root();
    for crate_dir in EBPF_CRATES {
        let mut cmd = Command::new("cargo");
        cmd.current_dir(root.join(crate_dir))
            .arg(format!("+{}", toolchain::NIGHTLY))
            .args([
                "build",
                "-Z",
                "build-std=core",
                "--target",
                "bpfel-unknown-none",
                "--release",
                "--target-dir",
            ])
            .arg(root.join("target/ebpf"))
            .env("PATH", tools.path_with_linker())
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC")
            .env_remove("RUSTC_WRAPPER")
            .env_remove("CARGO_TARGET_DIR");
        run(&mut cmd).with_context(|| format!("building {crate_dir}"))?;
    }
    for name in ["lb-ebpf", "xlb-bench-ebpf"] {
        let object = ebpf_object(name);
        if !object.exists() {
            bail!("{name} built but {} is missing", object.display());
        }
        println!("eBPF object: {}", object.display());
    }
    Ok(())
}

fn lint() -> Result<()> {
    let root = workspace_root();
    let tools = toolchain::prepare()?;
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["fmt", "--all", "--check"]))
    .context("formatting differs: run `cargo fmt --all`")?;
    for crate_dir in EBPF_CRATES {
        run(Command::new("cargo")
            .current_dir(root.join(crate_dir))
            .arg(format!("+{}", toolchain::NIGHTLY))
            .args(["fmt", "--check"]))
        .with_context(|| {
            format!("{crate_dir} formatting differs: run `cargo +nightly fmt` in {crate_dir}")
        })?;
    }
    run(Command::new("cargo").current_dir(&root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--release",
        "--",
        "-D",
        "warnings",
    ]))?;
    for crate_dir in EBPF_CRATES {
        run(Command::new("cargo")
            .current_dir(root.join(crate_dir))
            .arg(format!("+{}", toolchain::NIGHTLY))
            .args([
                "clippy",
                "-Z",
                "build-std=core",
                "--target",
                "bpfel-unknown-none",
            ])
            .args(["--release", "--target-dir"])
            .arg(root.join("target/ebpf"))
            .args(["--", "-D", "warnings"])
            .env("PATH", tools.path_with_linker())
            .env_remove("RUSTUP_TOOLCHAIN"))
        .with_context(|| format!("clippy on {crate_dir}"))?;
    }
    Ok(())
}

fn build_all() -> Result<()> {
    build_ebpf()?;
    run(Command::new("cargo").current_dir(workspace_root()).args([
        "build",
        "--release",
        "-p",
        "lb-userspace",
    ]))
}

/// Path of the release `xlb` binary.
pub fn xlb_binary() -> PathBuf {
    workspace_root().join("target/release/xlb")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn test(filter: &[String]) -> Result<()> {
    let started = Instant::now();
    build_all()?;
    lint()?;
    let root = workspace_root();
    let mut totals = Totals::default();
    // deploy/ against the Kubernetes schemas (strict: unknown fields fail).
    match validate_manifests() {
        Ok(()) => totals.passed += 1,
        Err(e) => {
            totals.failed += 1;
            totals.print();
            return Err(e);
        }
    }
    // The image archive, built here so that the image test (in xlb-tests)
    // checks what `cargo xtask image` makes.
    let image_archive = match image::build() {
        Ok(archive) => archive,
        Err(e) => {
            totals.failed += 1;
            totals.print();
            return Err(e.context("cargo xtask image failed"));
        }
    };
    // Unit tests (no privileges needed).
    let unit = run_counted(
        Command::new("cargo").current_dir(&root).args([
            "test",
            "--release",
            "--workspace",
            "--exclude",
            "xlb-tests",
        ]),
        &mut totals,
    );
    if let Err(e) = unit {
        totals.print();
        return Err(e.context("unit tests failed"));
    }
    // Privileged end-to-end tests. As root (CI) they must run; without root
    // they cannot, and we say so loudly instead of pretending.
    if !is_root() {
        totals.failed += 1;
        totals.print();
        bail!(
            "the end-to-end tests need root (network namespaces, XDP); run `sudo cargo xtask test`"
        );
    }
    // Everything in xlb-tests on "wires" (host links like physical NICs),
    // then the suites that carry traffic between namespaces again on
    // "container nodes" (every veth at its defaults, as kind/k3d nodes are
    // joined): both kinds of cluster exist.
    let mut e2e_result = Ok(());
    for (links, targets) in [
        ("wires", &[][..]),
        (
            "container-nodes",
            &[
                "--test", "e2e", "--test", "e2e6", "--test", "kube", "--test", "upgrade", "--test",
                "l2", "--test", "bgp",
            ][..],
        ),
    ] {
        println!("end-to-end suites on {links}");
        let mut e2e = Command::new("cargo");
        e2e.current_dir(&root)
            .args(["test", "--release", "-p", "xlb-tests"])
            .args(targets)
            .arg("--")
            // The tests share one machine's CPUs and each builds its own
            // topology; serial runs keep timing-sensitive checks honest.
            .args(["--test-threads", "1"])
            .args(filter)
            .env("XLB_BIN", xlb_binary())
            .env("XLB_IMAGE_ARCHIVE", &image_archive)
            .env("XLB_TEST_LINKS", links)
            // tests/tests/fuzz.rs: 10^4 frames here, 10^6 in `cargo xtask fuzz`.
            .env(
                "XLB_FUZZ_FRAMES",
                std::env::var("XLB_FUZZ_FRAMES").unwrap_or_else(|_| "10000".into()),
            );
        e2e_result = run_counted(&mut e2e, &mut totals)
            .with_context(|| format!("end-to-end tests on {links}"));
        if e2e_result.is_err() {
            break;
        }
    }
    // The benchmark harness, --quick: checks that it works end to end (no
    // speed assertions: those live in `cargo xtask bench`).
    if e2e_result.is_ok() {
        println!("bench smoke: cargo xtask bench --quick");
        match bench(true) {
            Ok(()) => totals.passed += 1,
            Err(e) => {
                totals.failed += 1;
                e2e_result = Err(e.context("cargo xtask bench --quick failed"));
            }
        }
    }
    let e2e = e2e_result;
    eprintln!(
        "xtask test: unit and privileged end-to-end suites finished in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    totals.print();
    e2e.context("end-to-end tests failed")
}

/// Kubernetes version the manifests in deploy/ are validated against.
const KUBERNETES_VERSION: &str = "1.34.0";

/// Validates deploy/*.yaml with the `kubernetes-validate` tool (its schemas
/// ship in the package, so no network is needed once it is installed into a
/// venv under target/tools).
fn validate_manifests() -> Result<()> {
    let root = workspace_root();
    let venv = root.join("target/tools/kubernetes-validate");
    let tool = venv.join("bin/kubernetes-validate");
    if !tool.exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))
            .context("creating a venv for kubernetes-validate (needs python3 with venv)")?;
        run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", "kubernetes-validate"]))
            .context("installing kubernetes-validate from PyPI")?;
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("deploy"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    run(Command::new(&tool)
        .args(["--strict", "--quiet", "-k", KUBERNETES_VERSION])
        .args(&files))
    .context("deploy/ does not validate against the Kubernetes schemas")?;
    println!(
        "deploy: {} manifest files valid for Kubernetes {KUBERNETES_VERSION}",
        files.len()
    );
    Ok(())
}

/// Test counts over every `cargo test` run, from libtest's result lines.
#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
}

impl Totals {
    /// The one plain summary line, last thing printed.
    fn print(&self) {
        println!("summary: {} passed, {} failed", self.passed, self.failed);
    }
}

/// Runs a `cargo test` command, echoing its output and adding up its
/// `test result: ... N passed; M failed` lines.
fn run_counted(cmd: &mut Command, totals: &mut Totals) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let number = |word: &str| {
                rest.split(';')
                    .find_map(|part| part.trim().strip_suffix(word))
                    .and_then(|n| n.trim().rsplit(' ').next()?.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            totals.passed += number("passed");
            totals.failed += number("failed");
        }
    }
    let status = child.wait()?;
    if !status.success() {
        if totals.failed == 0 {
            // A build failure or a crash counts as a failure too.
            totals.failed += 1;
        }
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Builds everything and runs `bin` of `package` (the demo in xlb-tests,
/// the benchmark in xlb-bench) as root.
fn run_tool(package: &str, bin: &str, args: &[&str], what: &str) -> Result<()> {
    build_all()?;
    if !is_root() {
        bail!("{what} creates network namespaces and attaches XDP: run it as root");
    }
    run(Command::new("cargo")
        .current_dir(workspace_root())
        .args(["run", "--release", "-q", "-p", package, "--bin", bin, "--"])
        .args(args)
        .env("XLB_BIN", xlb_binary())
        .env("XLB_BENCH_OBJECT", ebpf_object("xlb-bench-ebpf")))
}

fn fuzz(frames: u64, seed: Option<u64>, no_icmp: bool) -> Result<()> {
    let frames = frames.to_string();
    let seed = seed.map(|s| s.to_string());
    let mut args = vec!["--frames", &frames];
    if let Some(seed) = &seed {
        args.extend(["--seed", seed]);
    }
    if no_icmp {
        args.push("--no-icmp");
    }
    run_tool("xlb-tests", "xlb-fuzz", &args, "the fuzzer")
}

fn demo() -> Result<()> {
    run_tool("xlb-tests", "xlb-demo", &[], "the demo")
}

fn bench(quick: bool) -> Result<()> {
    run_tool(
        "xlb-bench",
        "xlb-bench",
        if quick { &["--quick"] } else { &[] },
        "the benchmark",
    )
}
