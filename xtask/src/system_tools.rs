//! The system tools the tasks drive, checked before anything is built.
//!
//! One table says which tool each task needs and which Debian package has
//! it. [`plan`] turns "what is present" into what to do: nothing, an
//! `apt-get install` (root on Debian or Ubuntu), or one line per missing
//! tool naming its package (anywhere else). [`ensure`] probes the machine,
//! applies the plan and checks again, so a fresh machine gets from the
//! README's commands to a green run without a separate set-up script.

use std::{
    ffi::OsStr,
    fmt,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Result, bail};

use crate::run;

/// The xtask commands that check system tools first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Need {
    /// `build`, `build-ebpf`, `lint`: the Rust builds alone.
    Build,
    Demo,
    /// `test`: also runs `image` and `bench --quick`.
    Test,
    Bench,
    Image,
}

impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Need::Build => "build",
            Need::Demo => "demo",
            Need::Test => "test",
            Need::Bench => "bench",
            Need::Image => "image",
        })
    }
}

/// How to tell that a requirement is met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// An executable of this name on PATH.
    Program(&'static str),
    /// `cc` links a C program: the C library's start files and headers.
    CLinks,
    /// `python3 -c 'import <module>'` succeeds.
    PythonModule(&'static str),
    /// This file exists.
    File(&'static str),
}

/// One row of the table.
#[derive(Debug)]
pub struct Requirement {
    /// What the user is told is missing.
    pub name: &'static str,
    pub probe: Probe,
    /// The Debian/Ubuntu packages that provide it.
    pub packages: &'static [&'static str],
    pub needed_by: &'static [Need],
}

use Need::{Bench, Build, Demo, Image, Test};

const EVERY_TASK: &[Need] = &[Build, Demo, Test, Bench, Image];
/// Tasks that build network namespaces (`test` runs `bench --quick`).
const NAMESPACES: &[Need] = &[Demo, Test, Bench];
const TESTS_AND_BENCH: &[Need] = &[Test, Bench];

pub const TABLE: &[Requirement] = &[
    // Rust links through `cc`; ring's build script compiles C.
    Requirement {
        name: "cc",
        probe: Probe::Program("cc"),
        packages: &["gcc"],
        needed_by: EVERY_TASK,
    },
    Requirement {
        name: "C library headers and start files",
        probe: Probe::CLinks,
        packages: &["libc6-dev"],
        needed_by: EVERY_TASK,
    },
    // cargo and rustup fetch crates and toolchains over TLS.
    Requirement {
        name: "CA certificates",
        probe: Probe::File("/etc/ssl/certs/ca-certificates.crt"),
        packages: &["ca-certificates"],
        needed_by: EVERY_TASK,
    },
    Requirement {
        name: "ip",
        probe: Probe::Program("ip"),
        packages: &["iproute2"],
        needed_by: NAMESPACES,
    },
    Requirement {
        name: "nsenter",
        probe: Probe::Program("nsenter"),
        packages: &["util-linux"],
        needed_by: NAMESPACES,
    },
    Requirement {
        name: "ethtool",
        probe: Probe::Program("ethtool"),
        packages: &["ethtool"],
        needed_by: NAMESPACES,
    },
    Requirement {
        name: "sysctl",
        probe: Probe::Program("sysctl"),
        packages: &["procps"],
        needed_by: NAMESPACES,
    },
    Requirement {
        name: "ping",
        probe: Probe::Program("ping"),
        packages: &["iputils-ping"],
        needed_by: TESTS_AND_BENCH,
    },
    // The L2 announcement tests' second client (tests/tests/l2.rs).
    Requirement {
        name: "arping",
        probe: Probe::Program("arping"),
        packages: &["iputils-arping"],
        needed_by: &[Test],
    },
    // The e2e tests' one-shot servers and clients, and the manifest
    // validator (a venv under target/tools).
    Requirement {
        name: "python3",
        probe: Probe::Program("python3"),
        packages: &["python3"],
        needed_by: &[Test],
    },
    Requirement {
        name: "python3 venv (ensurepip)",
        probe: Probe::PythonModule("ensurepip"),
        packages: &["python3-venv"],
        needed_by: &[Test],
    },
    // The benchmark's baselines.
    Requirement {
        name: "iptables-restore",
        probe: Probe::Program("iptables-restore"),
        packages: &["iptables"],
        needed_by: TESTS_AND_BENCH,
    },
    Requirement {
        name: "ip6tables-restore",
        probe: Probe::Program("ip6tables-restore"),
        packages: &["iptables"],
        needed_by: TESTS_AND_BENCH,
    },
    Requirement {
        name: "nft",
        probe: Probe::Program("nft"),
        packages: &["nftables"],
        needed_by: TESTS_AND_BENCH,
    },
    Requirement {
        name: "conntrack",
        probe: Probe::Program("conntrack"),
        packages: &["conntrack"],
        needed_by: TESTS_AND_BENCH,
    },
    Requirement {
        name: "taskset",
        probe: Probe::Program("taskset"),
        packages: &["util-linux"],
        needed_by: TESTS_AND_BENCH,
    },
    // The static binary's C code (ring) is compiled against musl.
    Requirement {
        name: "musl-gcc",
        probe: Probe::Program("musl-gcc"),
        packages: &["musl-tools"],
        needed_by: &[Image, Test],
    },
    // The image test runs the binary inside the unpacked root filesystem.
    Requirement {
        name: "chroot",
        probe: Probe::Program("chroot"),
        packages: &["coreutils"],
        needed_by: &[Test],
    },
    // The BGP tests peer the agents with real routers (tests/tests/bgp.rs).
    Requirement {
        name: "bird",
        probe: Probe::Program("bird"),
        packages: &["bird2"],
        needed_by: &[Test],
    },
    Requirement {
        name: "FRR bgpd",
        probe: Probe::File("/usr/lib/frr/bgpd"),
        packages: &["frr"],
        needed_by: &[Test],
    },
];

/// The machine, as far as the plan cares.
#[derive(Clone, Copy, Debug)]
pub struct System {
    pub root: bool,
    /// /etc/os-release says `debian` in ID or ID_LIKE.
    pub debian: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Everything is there.
    Ready,
    /// `apt-get install` these packages (deduplicated, in table order).
    Install(Vec<&'static str>),
    /// Cannot install here: one line per missing requirement.
    Report(Vec<String>),
}

/// What to do for `need`, given which probes succeed.
pub fn plan(need: Need, present: impl Fn(&Probe) -> bool, system: System) -> Plan {
    let missing: Vec<&Requirement> = TABLE
        .iter()
        .filter(|r| r.needed_by.contains(&need) && !present(&r.probe))
        .collect();
    if missing.is_empty() {
        return Plan::Ready;
    }
    if system.root && system.debian {
        let mut packages = Vec::new();
        for r in &missing {
            for p in r.packages {
                if !packages.contains(p) {
                    packages.push(*p);
                }
            }
        }
        return Plan::Install(packages);
    }
    Plan::Report(
        missing
            .iter()
            .map(|r| {
                format!(
                    "missing: {} (needed by `cargo xtask {need}`; Debian/Ubuntu package: {})",
                    r.name,
                    r.packages.join(" ")
                )
            })
            .collect(),
    )
}

/// The executable `name` in the directories of `path`, like a shell finds it.
pub fn find_program(name: &str, path: &OsStr) -> Option<PathBuf> {
    std::env::split_paths(path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Runs the probe on this machine, with this process's PATH.
fn probe_here(probe: &Probe) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let quietly = |cmd: &mut Command| {
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    match probe {
        Probe::Program(name) => find_program(name, &path).is_some(),
        Probe::File(file) => Path::new(file).exists(),
        Probe::PythonModule(module) => {
            find_program("python3", &path).is_some()
                && quietly(Command::new("python3").args(["-c", &format!("import {module}")]))
        }
        Probe::CLinks => {
            let Some(cc) = find_program("cc", &path) else {
                return false;
            };
            let out = std::env::temp_dir().join(format!("xtask-cc-probe-{}", std::process::id()));
            let mut cmd = Command::new(cc);
            cmd.args(["-x", "c", "-", "-o"])
                .arg(&out)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let linked = cmd.spawn().is_ok_and(|mut child| {
                use std::io::Write;
                let wrote = child.stdin.take().is_some_and(|mut stdin| {
                    stdin
                        .write_all(b"#include <stdio.h>\nint main(void) { return 0; }\n")
                        .is_ok()
                });
                child.wait().is_ok_and(|s| s.success()) && wrote
            });
            let _ = std::fs::remove_file(&out);
            linked
        }
    }
}

/// Whether /etc/os-release names Debian in `ID` or `ID_LIKE`.
pub fn os_release_is_debian(os_release: &str) -> bool {
    os_release.lines().any(|line| {
        let Some((key, value)) = line.split_once('=') else {
            return false;
        };
        (key == "ID" || key == "ID_LIKE")
            && value
                .trim_matches('"')
                .split_whitespace()
                .any(|id| id == "debian")
    })
}

fn this_system() -> System {
    System {
        root: crate::is_root(),
        debian: std::fs::read_to_string("/etc/os-release")
            .is_ok_and(|text| os_release_is_debian(&text)),
    }
}

/// Checks the tools `need` uses and installs the missing ones where it can;
/// fails naming each missing tool and its package where it cannot.
pub fn ensure(need: Need) -> Result<()> {
    let system = this_system();
    match plan(need, probe_here, system) {
        Plan::Ready => Ok(()),
        Plan::Report(lines) => {
            for line in &lines {
                eprintln!("{line}");
            }
            let how = if system.debian {
                "run it as root and they are installed with apt-get"
            } else {
                "install them with your package manager"
            };
            bail!(
                "`cargo xtask {need}` needs {} missing system tool(s): {how}",
                lines.len()
            )
        }
        Plan::Install(packages) => {
            println!(
                "cargo xtask {need}: installing missing system packages: {}",
                packages.join(" ")
            );
            run(Command::new("apt-get").arg("update"))?;
            run(Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&packages)
                .env("DEBIAN_FRONTEND", "noninteractive"))?;
            // The packages may install somewhere PATH does not reach.
            match plan(
                need,
                probe_here,
                System {
                    root: false,
                    ..system
                },
            ) {
                Plan::Ready => Ok(()),
                Plan::Install(_) => unreachable!("not root, so no install plan"),
                Plan::Report(lines) => {
                    for line in &lines {
                        eprintln!("{line}");
                    }
                    bail!("still missing after apt-get install (is PATH complete?)")
                }
            }
        }
    }
}

/// `cargo xtask system-tools <need>`: what is there, and what `ensure`
/// would do, without doing it.
pub fn show(need: Need) -> Result<()> {
    for r in TABLE.iter().filter(|r| r.needed_by.contains(&need)) {
        let state = if probe_here(&r.probe) {
            "ok"
        } else {
            "missing"
        };
        println!("{state:8} {} ({})", r.name, r.packages.join(" "));
    }
    match plan(need, probe_here, this_system()) {
        Plan::Ready => println!("plan: nothing to install"),
        Plan::Install(packages) => println!(
            "plan: apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {}",
            packages.join(" ")
        ),
        Plan::Report(lines) => {
            println!("plan: stop before building, saying:");
            for line in lines {
                println!("  {line}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN_ROOT: System = System {
        root: true,
        debian: true,
    };

    fn all_but(missing: &'static [&'static str]) -> impl Fn(&Probe) -> bool {
        move |probe| !matches!(probe, Probe::Program(name) if missing.contains(name))
    }

    #[test]
    fn everything_present_plans_nothing() {
        for need in [Build, Demo, Test, Bench, Image] {
            assert_eq!(plan(need, |_| true, DEBIAN_ROOT), Plan::Ready);
        }
    }

    #[test]
    fn root_on_debian_installs_the_packages_of_the_missing_tools_once() {
        assert_eq!(
            plan(Demo, all_but(&["ethtool"]), DEBIAN_ROOT),
            Plan::Install(vec!["ethtool"])
        );
        // nsenter and taskset share util-linux; ping comes from iputils-ping.
        assert_eq!(
            plan(
                Test,
                all_but(&["nsenter", "taskset", "ping", "ip"]),
                DEBIAN_ROOT
            ),
            Plan::Install(vec!["iproute2", "util-linux", "iputils-ping"])
        );
    }

    #[test]
    fn a_tool_only_another_task_needs_is_not_installed() {
        // The demo sends no ping and runs no baseline.
        assert_eq!(
            plan(Demo, all_but(&["ping", "nft", "musl-gcc"]), DEBIAN_ROOT),
            Plan::Ready
        );
        assert_eq!(
            plan(Image, all_but(&["musl-gcc", "ethtool"]), DEBIAN_ROOT),
            Plan::Install(vec!["musl-tools"])
        );
    }

    #[test]
    fn without_root_or_off_debian_each_missing_tool_gets_one_line() {
        for system in [
            System {
                root: false,
                debian: true,
            },
            System {
                root: true,
                debian: false,
            },
        ] {
            let Plan::Report(lines) = plan(Demo, all_but(&["ethtool", "ip"]), system) else {
                panic!("expected a report for {system:?}");
            };
            assert_eq!(
                lines,
                [
                    "missing: ip (needed by `cargo xtask demo`; Debian/Ubuntu package: iproute2)",
                    "missing: ethtool (needed by `cargo xtask demo`; Debian/Ubuntu package: ethtool)",
                ]
            );
        }
    }

    #[test]
    fn non_program_probes_are_planned_too() {
        let no_venv = |probe: &Probe| *probe != Probe::PythonModule("ensurepip");
        assert_eq!(
            plan(Test, no_venv, DEBIAN_ROOT),
            Plan::Install(vec!["python3-venv"])
        );
        assert_eq!(plan(Demo, no_venv, DEBIAN_ROOT), Plan::Ready);
    }

    #[test]
    fn every_tool_the_tests_run_is_in_the_table_for_test() {
        for tool in [
            "ip",
            "nsenter",
            "ethtool",
            "sysctl",
            "ping",
            "arping",
            "python3",
            "iptables-restore",
            "ip6tables-restore",
            "nft",
            "conntrack",
            "taskset",
            "chroot",
            "musl-gcc",
            "bird",
        ] {
            assert!(
                TABLE
                    .iter()
                    .any(|r| r.probe == Probe::Program(tool) && r.needed_by.contains(&Test)),
                "{tool} is not checked for `cargo xtask test`"
            );
        }
    }

    #[test]
    fn program_lookup_honours_path() {
        let dir = std::env::temp_dir().join(format!("xtask-path-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tool = dir.join("some-tool");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        let plain = dir.join("not-executable");
        std::fs::write(&plain, "").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = std::env::join_paths(["/nonexistent".as_ref(), dir.as_path()]).unwrap();
        assert_eq!(find_program("some-tool", &path), Some(tool));
        assert_eq!(find_program("not-executable", &path), None);
        assert_eq!(find_program("some-tool", OsStr::new("/nonexistent")), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn os_release_ids() {
        assert!(os_release_is_debian("NAME=x\nID=debian\n"));
        assert!(os_release_is_debian("ID=ubuntu\nID_LIKE=debian\n"));
        assert!(os_release_is_debian("ID=pop\nID_LIKE=\"ubuntu debian\"\n"));
        assert!(!os_release_is_debian(
            "ID=fedora\nID_LIKE=\"rhel centos\"\n"
        ));
        assert!(!os_release_is_debian("ID=debianish\n"));
    }
}
