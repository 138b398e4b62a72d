//! Each peer's session state and prefix count: kept for `xlb inspect bgp`
//! (a JSON file in the state directory, rewritten when a state or count
//! changes) and for the `xlb_bgp_*` metrics.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Serialize};

use crate::telemetry::{PeerLabel, telemetry};

/// RFC 4271 §8.2.2 states a session that connects out passes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionState {
    Idle,
    Connect,
    OpenSent,
    OpenConfirm,
    Established,
}

/// What `xlb inspect bgp` shows of one peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub peer: String,
    pub state: SessionState,
    pub announced_prefixes: usize,
    pub updates_sent: u64,
    pub updates_received: u64,
    /// Why the last session ended.
    pub last_error: Option<String>,
}

/// Shared by the peers' tasks.
#[derive(Clone, Debug, Default)]
pub struct Status {
    peers: Arc<Mutex<BTreeMap<String, PeerStatus>>>,
    /// The file `xlb inspect bgp` reads; none in unit tests.
    file: Option<PathBuf>,
}

/// The file under the state directory.
pub fn file(state_dir: &Path, node_name: &str) -> PathBuf {
    state_dir.join(node_name).join("bgp.json")
}

/// What the agent last wrote; empty when it never ran BGP.
pub fn read(state_dir: &Path, node_name: &str) -> anyhow::Result<Vec<PeerStatus>> {
    let path = file(state_dir, node_name);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(serde_json::from_slice(&bytes)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(anyhow::anyhow!("reading {}: {e}", path.display())),
    }
}

fn label(peer: &str) -> PeerLabel {
    [("peer", peer.to_string())]
}

impl Status {
    pub fn new(file: Option<PathBuf>) -> Self {
        let status = Status {
            peers: Arc::default(),
            file,
        };
        status.write_file(&BTreeMap::new());
        status
    }

    pub fn snapshot(&self) -> Vec<PeerStatus> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PeerStatus>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn change(&self, peer: &str, write: bool, f: impl FnOnce(&mut PeerStatus)) {
        let mut peers = self.lock();
        let status = peers.entry(peer.to_string()).or_insert_with(|| PeerStatus {
            peer: peer.to_string(),
            state: SessionState::Idle,
            announced_prefixes: 0,
            updates_sent: 0,
            updates_received: 0,
            last_error: None,
        });
        f(status);
        telemetry()
            .bgp_session_up
            .get_or_create(&label(peer))
            .set(i64::from(status.state == SessionState::Established));
        telemetry()
            .bgp_announced_prefixes
            .get_or_create(&label(peer))
            .set(status.announced_prefixes as i64);
        if write {
            self.write_file(&peers);
        }
    }

    pub fn set_state(&self, peer: &str, state: SessionState) {
        self.change(peer, true, |s| s.state = state);
    }

    pub fn session_down(&self, peer: &str, reason: &str) {
        self.change(peer, true, |s| {
            s.state = SessionState::Idle;
            s.announced_prefixes = 0;
            s.last_error = Some(reason.to_string());
        });
    }

    pub fn set_prefixes(&self, peer: &str, prefixes: usize) {
        self.change(peer, true, |s| s.announced_prefixes = prefixes);
    }

    pub fn update_sent(&self, peer: &str) {
        telemetry()
            .bgp_updates_sent
            .get_or_create(&label(peer))
            .inc();
        self.change(peer, false, |s| s.updates_sent += 1);
    }

    pub fn update_received(&self, peer: &str) {
        telemetry()
            .bgp_updates_received
            .get_or_create(&label(peer))
            .inc();
        self.change(peer, false, |s| s.updates_received += 1);
    }

    /// A peer that is no longer configured.
    pub fn remove(&self, peer: &str) {
        let mut peers = self.lock();
        peers.remove(peer);
        telemetry().bgp_session_up.remove(&label(peer));
        telemetry().bgp_announced_prefixes.remove(&label(peer));
        self.write_file(&peers);
    }

    fn write_file(&self, peers: &BTreeMap<String, PeerStatus>) {
        let Some(path) = &self.file else { return };
        let rows: Vec<&PeerStatus> = peers.values().collect();
        let result = serde_json::to_vec_pretty(&rows)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let temporary = path.with_extension("json.tmp");
                std::fs::write(&temporary, bytes)?;
                std::fs::rename(&temporary, path)
            });
        if let Err(error) = result {
            tracing::warn!(file = %path.display(), %error, "writing the BGP status failed");
        }
    }
}

/// `xlb inspect bgp`'s table.
pub fn table(peers: &[PeerStatus]) -> String {
    let mut out = format!(
        "{:<32} {:<12} {:>8} {:>8} {:>8}  {}\n",
        "PEER", "STATE", "PREFIXES", "SENT", "RECEIVED", "LAST ERROR"
    );
    for p in peers {
        out.push_str(&format!(
            "{:<32} {:<12} {:>8} {:>8} {:>8}  {}\n",
            p.peer,
            format!("{:?}", p.state),
            p.announced_prefixes,
            p.updates_sent,
            p.updates_received,
            p.last_error.as_deref().unwrap_or("-")
        ));
    }
    out
}
