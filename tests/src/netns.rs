//! Network namespaces and the links between them: one [`Namespace`] guard
//! (created fresh, deleted on drop, also when a test panics), one veth
//! helper, and ways to run commands or code inside a namespace. Shared by
//! the test [`Topology`](crate::Topology) and the benchmark's network.

use std::{
    fs,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail};

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

/// The namespace file `ns` is reached through.
fn open_netns(ns: &str) -> Result<(fs::File, String)> {
    let path = format!("/var/run/netns/{ns}");
    let file = fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    Ok((file, path))
}

/// Moves the calling thread into the namespace behind `file`.
fn enter(file: &fs::File, path: &str) -> Result<()> {
    // SAFETY: a valid namespace fd; only the calling thread changes namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns into {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a thread that has entered network namespace `ns`; sockets it
/// creates belong to that namespace and may be used from any thread after.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let (file, path) = open_netns(ns)?;
    std::thread::spawn(move || {
        enter(&file, &path)?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in netns {ns} panicked"))?
}

/// Like [`in_netns`], but `f` may borrow from the caller (a scoped thread).
pub fn scoped_in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let (file, path) = open_netns(ns)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(&file, &path)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))?
    })
}

/// A named network namespace with its loopback up, deleted on drop.
#[derive(Debug)]
pub struct Namespace {
    name: String,
}

impl Namespace {
    /// Creates `name`, replacing a stale namespace a killed run left behind.
    pub fn new(name: &str) -> Result<Namespace> {
        let _ = sh(&["ip", "netns", "del", name]);
        sh(&["ip", "netns", "add", name])?;
        let namespace = Namespace {
            name: name.to_string(),
        };
        ns_sh(name, &["ip", "link", "set", "lo", "up"])?;
        Ok(namespace)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

/// One end of a veth pair: namespace, interface name, `address/prefix`.
#[derive(Clone, Copy, Debug)]
pub struct VethEnd<'a> {
    pub ns: &'a str,
    pub name: &'a str,
    pub addr: &'a str,
}

impl<'a> VethEnd<'a> {
    pub fn new(ns: &'a str, name: &'a str, addr: &'a str) -> VethEnd<'a> {
        VethEnd { ns, name, addr }
    }
}

/// A veth pair between two namespaces, both ends up, with addresses.
pub fn veth(a: VethEnd, b: VethEnd) -> Result<()> {
    veth_bare((a.ns, a.name), (b.ns, b.name))?;
    for end in [a, b] {
        ns_sh(end.ns, &["ip", "addr", "add", end.addr, "dev", end.name])?;
    }
    Ok(())
}

/// A veth pair between two namespaces (namespace, interface name), both
/// ends up, without addresses. The pair is made in the caller's namespace
/// under temporary names unique to this process (interface names are
/// global there, at most 15 bytes), then each end moves to its namespace
/// and takes its real name.
pub fn veth_bare((a_ns, a_dev): (&str, &str), (b_ns, b_dev): (&str, &str)) -> Result<()> {
    static PAIRS: AtomicU32 = AtomicU32::new(0);
    let pair = PAIRS.fetch_add(1, Ordering::SeqCst);
    let process = std::process::id() % 100_000;
    let (tmp_a, tmp_b) = (format!("xv{process}a{pair}"), format!("xv{process}b{pair}"));
    sh(&[
        "ip", "link", "add", &tmp_a, "type", "veth", "peer", "name", &tmp_b,
    ])?;
    for (ns, dev, tmp) in [(a_ns, a_dev, &tmp_a), (b_ns, b_dev, &tmp_b)] {
        sh(&["ip", "link", "set", tmp, "netns", ns])?;
        ns_sh(ns, &["ip", "link", "set", tmp, "name", dev])?;
        ns_sh(ns, &["ip", "link", "set", dev, "up"])?;
    }
    Ok(())
}
