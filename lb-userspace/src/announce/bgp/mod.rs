//! The BGP speaker: one session per `BGPPeer` selected for this node, each
//! announcing a host route for every Service address the node can serve,
//! with the node as next hop. Messages are NetGauze's
//! (`netgauze-bgp-pkt`); the session state machine is xlb's own
//! (docs/design-notes.md says why).
//!
//! The speaker takes the desired state after every sync ([`Speaker::set_routes`])
//! and the peers whenever the manifest directory changes
//! ([`Speaker::set_peers`]). An agent that stops drops its sessions without
//! a NOTIFICATION: with graceful restart (RFC 4724) the routers keep its
//! routes while the datapath, pinned, keeps forwarding, and the next agent
//! sends them again followed by End-of-RIB.

pub mod message;
pub mod peer;
pub mod routes;
pub mod session;
pub mod status;

use std::{collections::BTreeMap, path::Path, sync::Arc};

use tokio::{sync::watch, task::JoinHandle};

pub use peer::{BGPPeer, PeerConfig, PeerProblem};
pub use routes::{Announcing, RouteAttributes, Routes};
pub use status::Status;

/// The running sessions.
pub struct Speaker {
    /// The problems of the BGPPeers last read, logged when they change.
    problems: Vec<PeerProblem>,
    routes: watch::Sender<Arc<Routes>>,
    sessions: BTreeMap<String, Running>,
    status: Status,
    /// The agent adopted a datapath that was already forwarding: the first
    /// OPEN to each peer says so (Restart State bit).
    restarted: bool,
    /// The [`Announcing::generation`] of the routes last handed over.
    routes_generation: Option<u64>,
}

struct Running {
    config: PeerConfig,
    stop: watch::Sender<session::Stop>,
    task: JoinHandle<()>,
}

impl Speaker {
    pub fn new(status: Status, restarted: bool) -> Self {
        Speaker {
            problems: Vec::new(),
            routes: watch::Sender::new(Arc::new(Routes::default())),
            sessions: BTreeMap::new(),
            status,
            restarted,
            routes_generation: None,
        }
    }

    /// Hands over the routes `build` makes, unless `generation` says they
    /// are the ones last handed over (most syncs move no route, and
    /// building them walks every address).
    pub fn set_routes_of(&mut self, generation: u64, build: impl FnOnce() -> Routes) {
        if self.routes_generation != Some(generation) {
            self.routes_generation = Some(generation);
            self.set_routes(build());
        }
    }

    pub fn status(&self) -> &Status {
        &self.status
    }

    /// Starts sessions to new peers, stops those of peers that went away
    /// (with a Cease NOTIFICATION, so their routers withdraw at once), and
    /// restarts those whose configuration changed.
    pub fn set_peers(&mut self, peers: Vec<PeerConfig>) {
        let wanted: BTreeMap<String, PeerConfig> =
            peers.into_iter().map(|p| (p.name.clone(), p)).collect();
        let gone: Vec<String> = self
            .sessions
            .iter()
            .filter(|(name, running)| wanted.get(*name) != Some(&running.config))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some(running) = self.sessions.remove(&name) {
                tracing::info!(peer = %running.config, "BGP peer removed or changed; closing its session");
                let _ = running.stop.send(session::Stop::Deconfigured);
                // The task sends Cease and ends; it is not awaited, so a
                // peer that does not read cannot hold up the agent.
                drop(running.task);
            }
        }
        for (name, config) in wanted {
            if self.sessions.contains_key(&name) {
                continue;
            }
            tracing::info!(peer = %config, asn = config.peer_asn, "BGP peer configured");
            let (stop, stopped) = watch::channel(session::Stop::Running);
            let task = tokio::spawn(session::run(
                config.clone(),
                self.routes.subscribe(),
                self.status.clone(),
                self.restarted,
                stopped,
            ));
            self.sessions.insert(name, Running { config, stop, task });
        }
    }

    /// Reads the BGPPeers of the manifest directory `dir` that select the
    /// node `node_name`, reports those that are wrong (each is skipped; the
    /// others are not touched), and runs sessions to the rest.
    pub fn load_peers(&mut self, dir: &Path, node_name: &str) {
        let labels =
            BTreeMap::from([("kubernetes.io/hostname".to_string(), node_name.to_string())]);
        let (peers, problems) = peer::load_dir(dir, &labels);
        self.use_peers(peers, problems);
    }

    /// Runs sessions to `peers`, and logs `problems` (the BGPPeers skipped)
    /// when they change.
    pub fn use_peers(&mut self, peers: Vec<PeerConfig>, problems: Vec<PeerProblem>) {
        if problems != self.problems {
            for problem in &problems {
                tracing::error!(object = %problem.object, reason = %problem.reason,
                    "BGPPeer skipped");
            }
            self.problems = problems;
        }
        self.set_peers(peers);
    }

    /// Closes every session without a NOTIFICATION, as an agent that stops
    /// must: the routers keep its routes for the restart time (RFC 4724)
    /// while the datapath keeps forwarding.
    pub async fn detach(self) {
        for running in self.sessions.values() {
            let _ = running.stop.send(session::Stop::Detached);
        }
        let tasks = self.sessions.into_values().map(|running| running.task);
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            futures::future::join_all(tasks),
        )
        .await;
    }

    /// Hands every session the routes to announce; each sends only what
    /// changed for it.
    pub fn set_routes(&self, routes: Routes) {
        self.routes.send_if_modified(|current| {
            if **current == routes {
                return false;
            }
            *current = Arc::new(routes);
            true
        });
    }
}
