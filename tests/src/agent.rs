//! The real `xlb agent` under test: started in a network namespace, ready
//! when it says so in its log, stopped with SIGTERM on drop.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::netns::ns_cmd;

/// The xlb binary under test (`XLB_BIN`, set by `cargo xtask test`).
pub fn xlb_bin() -> PathBuf {
    std::env::var_os("XLB_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/xlb"))
}

/// Starts `xlb agent <args>` in network namespace `ns` (behind `wrapper`,
/// e.g. `taskset -c 0`), appending its output to `log`, and waits until it
/// says it is ready. Several agents may share one log: only what this one
/// wrote is looked at.
pub fn spawn_agent(
    ns: &str,
    wrapper: &[&str],
    args: &[&str],
    log: &Path,
    log_filter: &str,
    timeout: Duration,
) -> Result<Child> {
    let offset = fs::metadata(log).map(|m| m.len() as usize).unwrap_or(0);
    let log_file = fs::OpenOptions::new().create(true).append(true).open(log)?;
    let bin = xlb_bin().to_string_lossy().into_owned();
    let mut command: Vec<&str> = wrapper.to_vec();
    command.extend([bin.as_str(), "agent"]);
    command.extend_from_slice(args);
    let mut child = ns_cmd(ns, &command)
        .env("XLB_LOG", log_filter)
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .stdin(Stdio::null())
        .spawn()
        .context("starting xlb agent")?;
    let started = Instant::now();
    loop {
        let text = fs::read_to_string(log).unwrap_or_default();
        if text
            .get(offset..)
            .is_some_and(|l| l.contains("agent ready"))
        {
            return Ok(child);
        }
        if let Some(status) = child.try_wait()? {
            bail!("xlb agent exited with {status}:\n{text}");
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            bail!("xlb agent not ready after {timeout:?}:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts the agent of a test node in namespace `ns` on `ifaces`:
/// `node_name`, `state_dir`, a one-second sweep, native XDP on wires (tcx by
/// `auto` on container nodes) unless `extra` names a mode, then `extra` (the
/// source and further flags); logs to `log`.
pub fn node_agent(
    ns: &str,
    ifaces: &str,
    node_name: &str,
    state_dir: &Path,
    links: crate::topology::Links,
    extra: &[&str],
    log: PathBuf,
) -> Result<Agent> {
    let state_dir = state_dir.to_string_lossy();
    let mut args = vec![
        "--iface",
        ifaces,
        "--node-name",
        node_name,
        "--state-dir",
        &state_dir,
        "--sweep-interval",
        "1",
    ];
    if links == crate::topology::Links::Wires && !extra.contains(&"--xdp-mode") {
        args.extend(["--xdp-mode", "native"]);
    }
    args.extend_from_slice(extra);
    let child = spawn_agent(
        ns,
        &[],
        &args,
        &log,
        "info,xlb=debug",
        Duration::from_secs(30),
    )?;
    Ok(Agent {
        child: Some(child),
        log,
    })
}

/// The real agent, running in the node namespace; SIGTERM on drop.
pub struct Agent {
    pub(crate) child: Option<Child>,
    pub log: PathBuf,
}

impl Agent {
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL and wait: a crash, or a node that vanished.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGSTOP (`paused`) or SIGCONT: an agent stalled (CPU starvation, a
    /// frozen cgroup) and back, its process and datapath intact.
    pub fn pause(&self, paused: bool) -> Result<()> {
        let child = self.child.as_ref().context("the agent is not running")?;
        let signal = if paused { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: signalling our own child.
        if unsafe { libc::kill(child.id() as i32, signal) } != 0 {
            bail!("signalling the agent: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// SIGTERM and wait: what an orchestrator does on restart or upgrade.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let start = Instant::now();
            while child.try_wait()?.is_none() {
                if start.elapsed() > Duration::from_secs(10) {
                    child.kill()?;
                    bail!("agent ignored SIGTERM for 10s");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
