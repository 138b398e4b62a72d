//! The eBPF toolchain, prepared idempotently: nightly with `rust-src`, and
//! `bpf-linker` built against the nightly toolchain's own LLVM (so the
//! bitcode rustc emits and the linker's LLVM always agree), installed in
//! `target/tools`. A second run with everything present only checks.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{run, workspace_root};

pub const NIGHTLY: &str = "nightly";

pub struct Tools {
    pub bin: PathBuf,
}

impl Tools {
    /// PATH with the project-local bpf-linker first.
    pub fn path_with_linker(&self) -> std::ffi::OsString {
        let mut paths = vec![self.bin.clone()];
        if let Some(p) = std::env::var_os("PATH") {
            paths.extend(std::env::split_paths(&p));
        }
        std::env::join_paths(paths).expect("PATH entries are valid")
    }
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn step<T>(what: &str, by_hand: &str, r: Result<T>) -> Result<T> {
    r.with_context(|| format!("toolchain step '{what}' failed; to do it by hand: {by_hand}"))
}

pub fn prepare() -> Result<Tools> {
    let root = workspace_root();
    let tools = root.join("target/tools");

    // 1. The nightly toolchain and its rust-src (for -Z build-std=core).
    let sysroot = match output(
        Command::new("rustc")
            .arg(format!("+{NIGHTLY}"))
            .args(["--print", "sysroot"]),
    ) {
        Ok(s) => PathBuf::from(s),
        Err(_) => {
            step(
                "install nightly toolchain",
                "rustup toolchain install nightly --profile minimal --component rust-src",
                run(Command::new("rustup").args([
                    "toolchain",
                    "install",
                    NIGHTLY,
                    "--profile",
                    "minimal",
                    "--component",
                    "rust-src",
                ])),
            )?;
            PathBuf::from(output(
                Command::new("rustc")
                    .arg(format!("+{NIGHTLY}"))
                    .args(["--print", "sysroot"]),
            )?)
        }
    };
    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        step(
            "add rust-src",
            "rustup component add rust-src --toolchain nightly",
            run(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                NIGHTLY,
            ])),
        )?;
    }

    // 2. bpf-linker against nightly's LLVM.
    let verbose = output(Command::new("rustc").arg(format!("+{NIGHTLY}")).arg("-vV"))?;
    let llvm_major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV does not say its LLVM version")?
        .to_string();
    let llvm_lib = find_llvm_dylib(&sysroot.join("lib"))?;
    let linker = tools.join("bin/bpf-linker");
    let stamp = tools.join(format!(
        "bpf-linker.llvm-{llvm_major}.{}",
        file_name(&llvm_lib)
    ));
    if linker.exists() && stamp.exists() && linker_runs(&linker) {
        return Ok(Tools {
            bin: tools.join("bin"),
        });
    }
    let prefix = tools.join("llvm");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm_lib, &link)
        .with_context(|| format!("linking {} to {}", link.display(), llvm_lib.display()))?;
    println!(
        "building bpf-linker against {} (one time)",
        llvm_lib.display()
    );
    let rpath = format!("-C link-arg=-Wl,-rpath,{}", sysroot.join("lib").display());
    step(
        "cargo install bpf-linker",
        &format!(
            "LLVM_PREFIX={} RUSTFLAGS='{rpath}' cargo +nightly install bpf-linker --no-default-features --features llvm-{llvm_major} --root {}",
            prefix.display(),
            tools.display()
        ),
        run(Command::new("cargo")
            .arg(format!("+{NIGHTLY}"))
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--force",
                "--no-default-features",
            ])
            .args(["--features", &format!("llvm-{llvm_major}")])
            .arg("--root")
            .arg(&tools)
            .env("LLVM_PREFIX", &prefix)
            .env("RUSTFLAGS", &rpath)
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTUP_TOOLCHAIN")),
    )?;
    if !linker_runs(&linker) {
        bail!("{} was built but does not run", linker.display());
    }
    std::fs::write(&stamp, b"")?;
    Ok(Tools {
        bin: tools.join("bin"),
    })
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

fn linker_runs(linker: &Path) -> bool {
    Command::new(linker)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The nightly sysroot ships the real `libLLVM.so.<ver>-rust-<rustc ver>`
/// and a `libLLVM-<major>-rust-....so` that is only a linker script pointing
/// at it; the linker needs the real one.
fn find_llvm_dylib(lib: &Path) -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| file_name(p).starts_with("libLLVM.so."))
        .collect();
    found.sort();
    found.into_iter().next().with_context(|| {
        format!(
            "no libLLVM in {}: is the nightly toolchain complete?",
            lib.display()
        )
    })
}
