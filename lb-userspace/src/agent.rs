//! The node agent: load and attach the datapath (adopting what a previous
//! agent pinned), then keep the maps equal to what the source says, and
//! sweep idle flows. On SIGINT/SIGTERM it exits and leaves programs, links
//! and maps pinned, so traffic keeps flowing until the next agent adopts
//! them.
//!
//! This file is wiring only: the sources live in [`crate::manifest`] and
//! [`crate::kubernetes`], the translation in [`crate::translate`], the
//! datapath in [`crate::dataplane`] and [`crate::reconcile`].

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::Ebpf;
use lb_common::{CONFIG_F_POD_SOURCE_GUARD, CONFIG_F_REDIRECT, CONFIG_F_REVERSE_PATH, Config};
use tokio::sync::mpsc;

use crate::{
    announce::{
        bgp, election,
        l2::{self, Responder},
    },
    change::{Change, Changes},
    conntrack::Timeouts,
    dataplane::{self, Limits, Maps, Uplinks, attach},
    egress_guard::{self, EgressGuard},
    flags::{self, PortRange},
    kubernetes::{self, ClusterSource, LeaseConfig, node_lease::NodeLeases},
    manifest::ManifestSource,
    model::{DesiredState, Frontend, Network, ServiceRef},
    netdev,
    reconcile::Reconciler,
    state_file,
    telemetry::{self, telemetry},
    translate::{AddressMode, DEFAULT_LB_CLASS, Scope},
};

/// Which node, and where its pins and state live: shared by every command.
#[derive(clap::Args, Clone, Debug)]
pub struct NodeArgs {
    /// This node's name (Kubernetes Node name); names the pin directory.
    #[arg(long, env = "XLB_NODE_NAME")]
    pub node_name: String,
    /// Where the BPF filesystem is (mounted there if it is not).
    #[arg(long, env = "XLB_BPFFS", default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
    /// Directory for the agent's state file (names for `inspect`).
    #[arg(long, env = "XLB_STATE_DIR", default_value = "/run/xlb")]
    pub state_dir: PathBuf,
}

/// The agent's flags.
#[derive(clap::Args, Clone, Debug)]
pub struct AgentConfig {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Network-facing interface (uplink, link to other nodes); repeat or
    /// separate with commas.
    #[arg(
        long = "iface",
        env = "XLB_IFACES",
        value_delimiter = ',',
        required = true
    )]
    pub ifaces: Vec<String>,
    /// Directory of Service / EndpointSlice / Node manifests (YAML or
    /// JSON), watched for changes. Without it the agent watches the
    /// Kubernetes API.
    #[arg(long, env = "XLB_MANIFESTS")]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig for the Kubernetes API (default: KUBECONFIG,
    /// ~/.kube/config, or the in-cluster service account).
    #[arg(long, env = "KUBECONFIG", conflicts_with = "manifests")]
    pub kubeconfig: Option<PathBuf>,
    /// `spec.loadBalancerClass` handled besides none; repeat or separate
    /// with commas. Services of other classes are never touched.
    #[arg(long = "lb-class", env = "XLB_LB_CLASS", value_delimiter = ',',
          default_value = DEFAULT_LB_CLASS)]
    pub lb_classes: Vec<String>,
    /// Where Services' frontend addresses come from: `status` (the
    /// addresses in `status.loadBalancer.ingress`, assigned by an IPAM
    /// such as MetalLB; xlb writes nothing) or `node` (K3s ServiceLB
    /// style: the addresses of the nodes that run xlb, written into the
    /// Services' status by the elected leader).
    #[arg(long, env = "XLB_ADDRESS_MODE", value_enum, default_value_t = AddressMode::Status)]
    pub address_mode: AddressMode,
    /// The leader Lease (Kubernetes source only).
    #[command(flatten)]
    pub lease: LeaseConfig,
    #[command(flatten)]
    pub limits: Limits,
    /// Source ports for SNAT towards remote backends, `MIN-MAX`. Ports the
    /// node's own sockets use are skipped when a flow picks its port. Keep
    /// the range out of the node's `net.ipv4.ip_local_port_range` (the
    /// default is below it and below the NodePort range): the kernel hands
    /// ports from there to later node connections, which would collide with
    /// a live SNAT flow to the same backend. An overlap is logged.
    #[arg(long, env = "XLB_SNAT_PORTS", default_value = "1024-29999")]
    pub snat_ports: PortRange,
    /// Never redirect in XDP; hand every translated packet to the kernel.
    #[arg(long, env = "XLB_NO_REDIRECT")]
    pub no_redirect: bool,
    /// Translate a packet that matches a flow's reply tuple whatever
    /// interface it arrives on. By default such a packet is translated only
    /// when it comes in through the interface the route to its source (the
    /// backend) leaves by, so a spoofed backend address on the client side
    /// cannot inject into a flow; turn this on only for asymmetric routing.
    #[arg(long, env = "XLB_NO_REVERSE_PATH_CHECK")]
    pub no_reverse_path_check: bool,
    /// The cluster's networks besides those its Node objects name (pod
    /// CIDRs, node addresses): the cluster CIDR (K3s: 10.42.0.0/16) and
    /// any other network of the cluster's own; either family; repeat or
    /// separate with commas. A node-local backend's packet that matches no
    /// flow is dropped at the uplink when it goes outside these networks
    /// (a reply of a flow xlb no longer has, which would leak the pod's
    /// address); give them when the source has no Node objects (manifests).
    #[arg(
        long = "cluster-cidr",
        env = "XLB_CLUSTER_CIDRS",
        value_delimiter = ','
    )]
    pub cluster_cidrs: Vec<ipnet::IpNet>,
    /// Let a node-local backend's packets without a flow leave the node
    /// with the pod's address for any destination. Needed when pod
    /// addresses are routed outside the cluster without NAT (Calico with
    /// BGP and no outgoing NAT) and outside peers reach pods directly; by
    /// default such packets are dropped (counted as
    /// `xlb_reply_leaks_dropped_packets_total`), because with a CNI that
    /// masquerades pod traffic (flannel, K3s) they are replies of flows xlb
    /// no longer has.
    #[arg(long, env = "XLB_ALLOW_POD_SOURCE_EGRESS")]
    pub allow_pod_source_egress: bool,
    /// Which hook runs the forward path: `auto` (native XDP on physical
    /// NICs; tcx ingress on virtual devices such as veth, whose packets carry
    /// offloaded checksums XDP cannot see, and where native XDP fails),
    /// `native` (XDP only), `tc` (tcx ingress only), or `generic` (kept for
    /// compatibility; means `tc`).
    #[arg(long, env = "XLB_XDP_MODE", value_enum, default_value_t = attach::XdpModeChoice::Auto)]
    pub xdp_mode: attach::XdpModeChoice,
    /// Seconds between flow-table sweeps.
    #[arg(long, env = "XLB_SWEEP_INTERVAL", default_value = "10",
          value_parser = flags::seconds_at_least_one)]
    pub sweep_interval: Duration,
    /// Seconds a removed frontend keeps its ids: back within this time (a
    /// bad edit fixed, an address flip, a manifest rewritten), it keeps its
    /// established flows; after it, the sweeper ends them.
    #[arg(long, env = "XLB_REMOVAL_GRACE", default_value = "30",
          value_parser = flags::seconds_at_least_one)]
    pub removal_grace: Duration,
    #[command(flatten)]
    pub timeouts: Timeouts,
    /// Serve `/metrics` (Prometheus), `/healthz` and `/readyz` on this
    /// address, e.g. `0.0.0.0:9479`. Off when not given.
    #[arg(long, env = "XLB_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Seconds between resyncs: the maps are compared with what the agent
    /// wrote (entries changed or removed behind its back are rewritten) and
    /// the desired state is applied in full.
    #[arg(long, env = "XLB_RESYNC_INTERVAL", default_value = "300",
          value_parser = flags::seconds_at_least_one)]
    pub resync_interval: Duration,
    /// Seconds without a heartbeat from this agent after which the datapath
    /// stops starting new flows and leaves them to the kernel (established
    /// flows keep going): pinned maps nobody keeps up to date (xlb deleted,
    /// an agent crash-looping before its first sync) would send new clients
    /// to pod addresses Kubernetes may have given to other pods. 0: never.
    #[arg(long, env = "XLB_STALE_AFTER", default_value_t = 600)]
    pub stale_after: u32,
    /// Announce Service addresses on L2: answer ARP requests and IPv6
    /// neighbour solicitations for them in XDP, with gratuitous ARP /
    /// unsolicited NA on taking one over. With manifests this node
    /// announces every address it programs (there is no one to agree
    /// with: give it to one node of a segment only); with the Kubernetes
    /// API one elected node announces each address.
    #[arg(long, env = "XLB_L2_ANNOUNCE")]
    pub l2_announce: bool,
    /// Seconds a node's L2 Lease (`xlb-node-<node>`, renewed every quarter
    /// of it) lasts: when a node or its agent dies, its addresses move to
    /// another node after this. Shorter is faster failover and more API
    /// writes (nodes × 4 per duration).
    #[arg(long, env = "XLB_L2_LEASE_DURATION", default_value = "2",
          value_parser = flags::seconds_at_least_one)]
    pub l2_lease_duration: Duration,
    /// With the Kubernetes API: peer over BGP with the routers of the
    /// `BGPPeer` objects in the agent's namespace (`--lease-namespace`)
    /// that select this node by its Node's labels. Needs
    /// `deploy/rbac-bgp.yaml`. (With manifests, BGPPeers are always read
    /// from the directory.)
    #[arg(long, env = "XLB_BGP")]
    pub bgp: bool,
}

impl AgentConfig {
    fn scope(&self) -> Scope {
        Scope {
            node_name: self.node.node_name.clone(),
            lb_classes: self.lb_classes.clone(),
            address_mode: self.address_mode,
        }
    }
}

/// Where Services, EndpointSlices and Nodes come from.
// One for the agent's life; boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Source {
    /// A directory of manifests, watched with inotify.
    Manifests(ManifestSource),
    /// The Kubernetes API (kubeconfig file, or KUBECONFIG / in-cluster).
    Cluster(ClusterSource),
}

impl Source {
    /// The address pools (pool mode; empty otherwise).
    fn pools(&self) -> &crate::pools::Pools {
        match self {
            Source::Manifests(m) => m.pools(),
            Source::Cluster(c) => c.pools(),
        }
    }

    /// Starts the source's watchers, which send what changed on `changes`.
    /// `None` when interrupted before the source was ready.
    async fn start(
        cfg: &AgentConfig,
        checked: CheckedSource,
        changes: mpsc::UnboundedSender<Change>,
    ) -> Result<Option<Self>> {
        Ok(match checked {
            CheckedSource::Manifests(dir) => Some(Source::Manifests(ManifestSource::start(
                &dir,
                cfg.scope(),
                changes,
            )?)),
            CheckedSource::Cluster(client) => {
                ClusterSource::start(client, cfg.scope(), &cfg.lease, cfg.bgp, changes)
                    .await?
                    .map(Source::Cluster)
            }
        })
    }

    /// Translates what changed and hands the desired state to `apply`.
    fn sync(
        &mut self,
        changes: Changes,
        apply: impl FnOnce(&DesiredState, Option<&BTreeSet<Frontend>>) -> Result<()>,
    ) -> Result<()> {
        match self {
            Source::Manifests(manifests) => manifests.sync(changes, apply),
            Source::Cluster(cluster) => cluster.sync(changes, apply),
        }
    }

    /// Resolves when this agent wins or loses leadership (never for
    /// manifests, where there is none).
    async fn leadership_changed(&mut self) {
        match self {
            Source::Manifests(_) => std::future::pending().await,
            Source::Cluster(cluster) => cluster.leadership_changed().await,
        }
    }

    /// Reports frontends this node failed to program (as Events on their
    /// Services, from the Kubernetes source; manifests have only the log).
    fn report_programming_failures(&mut self, failed: &[(ServiceRef, String)]) {
        if let Source::Cluster(cluster) = self {
            cluster.report_programming_failures(failed);
        }
    }

    async fn stop(self) {
        if let Source::Cluster(cluster) = self {
            cluster.stop().await;
        }
    }
}

/// The source's configuration, checked without touching the kernel.
enum CheckedSource {
    /// A manifest directory that exists and can be read.
    Manifests(PathBuf),
    /// A client made from a kubeconfig that was read and understood, or
    /// from the in-cluster service account. It has not connected yet: an
    /// unreachable API server is waited for while the datapath forwards.
    Cluster(kube::Client),
}

impl CheckedSource {
    async fn check(cfg: &AgentConfig) -> Result<Self> {
        match &cfg.manifests {
            Some(dir) => {
                std::fs::read_dir(dir)
                    .with_context(|| format!("reading the manifest directory {}", dir.display()))?;
                Ok(CheckedSource::Manifests(dir.clone()))
            }
            None => Ok(CheckedSource::Cluster(
                kubernetes::client(cfg.kubeconfig.as_deref()).await?,
            )),
        }
    }
}

/// The running datapath and what the agent last programmed into it.
struct Datapath {
    /// Held so that the programs stay loaded; dropping it leaves them pinned.
    _ebpf: Ebpf,
    maps: Maps,
    reconciler: Reconciler,
    /// The local backends and cluster networks of the reply-leak check.
    guard: EgressGuard,
    published: Published,
    /// Frontends whose writes failed since the last look, with their
    /// Services: reported, and retried with backoff.
    failed: Vec<(ServiceRef, String)>,
    /// Some write (a frontend's or a removal's) failed since the last look.
    incomplete: bool,
    /// The L2 responder's state (`--l2-announce`).
    l2: Option<Responder>,
    /// The addresses of the last sync, for the L2 election.
    l2_claims: Vec<L2Claim>,
    /// The nodes the last L2 election saw alive, and when it ran.
    l2_alive: std::collections::BTreeSet<String>,
    l2_elected: Option<Instant>,
    /// A previous agent's datapath was found running and adopted.
    adopted: bool,
    /// The host routes the last sync says this node should announce.
    announcing: bgp::Announcing,
}

/// An address this node programs, as the L2 election sees it.
#[derive(Clone, Debug)]
struct L2Claim {
    addr: std::net::IpAddr,
    service: ServiceRef,
    local_only: bool,
    /// A ready, non-terminating endpoint of it runs on this node.
    serving_here: bool,
}

/// What the agent last wrote outside the maps' entries: the node config map
/// value, and the version of the names in the state file.
#[derive(Debug, Default)]
struct Published {
    node_config: Option<Config>,
    names_version: Option<u64>,
}

/// The agent's loop beats this often, and is unhealthy when it has not
/// beaten for [`LOOP_STALE`] (a sync of thousands of Services takes
/// seconds, not a minute).
const HEARTBEAT: Duration = Duration::from_secs(5);
const LOOP_STALE: Duration = Duration::from_secs(60);

/// A failed sync is retried after this, doubling up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// When the next retry of a failed sync is due, and the backoff that led
/// there.
#[derive(Clone, Copy, Debug)]
struct Retry {
    at: tokio::time::Instant,
    backoff: Duration,
}

/// Schedules (or clears) the retry after a sync, and reports what failed.
/// Only a complete sync (`full`) that succeeded clears a pending retry: one
/// of other changes leaves the failed frontends as they were.
fn after_sync(
    result: Result<()>,
    full: bool,
    datapath: &mut Datapath,
    source: &mut Source,
    retry: Option<Retry>,
) -> Option<Retry> {
    let failed = std::mem::take(&mut datapath.failed);
    let incomplete = std::mem::take(&mut datapath.incomplete);
    if let Err(e) = &result {
        tracing::error!(error = %format!("{e:#}"), "applying the desired state failed");
    }
    source.report_programming_failures(&failed);
    if result.is_ok() && !incomplete {
        return if full { None } else { retry };
    }
    let backoff = retry.map_or(RETRY_MIN, |r| (r.backoff * 2).min(RETRY_MAX));
    tracing::warn!(
        failed_frontends = failed.len(),
        retry_in_s = backoff.as_secs(),
        "programming incomplete; retrying"
    );
    Some(Retry {
        at: tokio::time::Instant::now() + backoff,
        backoff,
    })
}

/// Changes come in bursts (editors, `kubectl apply`, rollouts, one file
/// written in several steps): a burst is gathered until the source has been
/// quiet for [`SETTLE_QUIET`], and while a manifest file is still being
/// written, until it is closed; never for longer than [`SETTLE_MAX`].
const SETTLE_QUIET: Duration = Duration::from_millis(2);
const SETTLE_MAX: Duration = Duration::from_millis(100);

/// The burst that starts with `first`.
async fn settle(first: Change, rx: &mut mpsc::UnboundedReceiver<Change>) -> Changes {
    let deadline = tokio::time::Instant::now() + SETTLE_MAX;
    let mut changes = Changes::default();
    changes.add(first);
    loop {
        while let Ok(change) = rx.try_recv() {
            changes.add(change);
        }
        let until = if changes.writing.is_empty() {
            (tokio::time::Instant::now() + SETTLE_QUIET).min(deadline)
        } else {
            deadline
        };
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some(change)) => changes.add(change),
            // Quiet (and nothing being written), or the deadline.
            Ok(None) | Err(_) => break,
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
    }
    while let Ok(change) = rx.try_recv() {
        changes.add(change);
    }
    changes
}

async fn retry_due(retry: Option<Retry>) {
    match retry {
        Some(r) => tokio::time::sleep_until(r.at).await,
        None => std::future::pending().await,
    }
}

pub async fn run(cfg: AgentConfig) -> Result<()> {
    // A configuration error stops the agent here, before anything is
    // attached or pinned: an agent that fails to start leaves the node as
    // it found it.
    let checked = CheckedSource::check(&cfg).await?;
    let metrics = cfg.metrics_addr.map(telemetry::server::bind).transpose()?;
    let mut datapath = Datapath::start(&cfg)?;
    if let Some(listener) = metrics {
        telemetry::server::start(listener, &cfg.node.bpffs, &cfg.node.node_name, &cfg.ifaces)?;
    }
    telemetry()
        .snat_ports_capacity
        .set(i64::from(cfg.snat_ports.max - cfg.snat_ports.min) + 1);
    let (tx, mut rx) = mpsc::unbounded_channel::<Change>();
    // The node Lease that says this agent is alive to the others' L2
    // elections (Kubernetes source only).
    let node_leases = match &checked {
        CheckedSource::Cluster(client) if cfg.l2_announce => Some(NodeLeases::spawn(
            client.clone(),
            &cfg.lease.namespace,
            &cfg.node.node_name,
            cfg.l2_lease_duration,
        )),
        _ => None,
    };
    let Some(mut source) = Source::start(&cfg, checked, tx).await? else {
        return Ok(());
    };
    datapath.sync(&cfg, &mut source, Changes::everything())?;
    datapath.elect_l2(&cfg, &source, node_leases.as_ref());
    let mut retry = after_sync(Ok(()), true, &mut datapath, &mut source, None);
    // Sessions start after the first complete sync: their End-of-RIB must
    // follow the whole table.
    let mut speaker = bgp::Speaker::new(
        bgp::Status::new(Some(bgp::status::file(
            &cfg.node.state_dir,
            &cfg.node.node_name,
        ))),
        datapath.adopted,
    );
    announce(&cfg, &mut speaker, &mut source, &datapath);
    telemetry().health.set_synced();
    tracing::info!(node = %cfg.node.node_name, interfaces = ?cfg.ifaces, "agent ready");

    let mut sweep = tokio::time::interval(cfg.sweep_interval);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // The datapath's heartbeat is written on this tick too: a few beats fit
    // in --stale-after.
    let mut heartbeat = tokio::time::interval(if cfg.stale_after == 0 {
        HEARTBEAT
    } else {
        HEARTBEAT.min(Duration::from_secs(u64::from(cfg.stale_after)) / 3)
    });
    let mut resync = tokio::time::interval_at(
        tokio::time::Instant::now() + cfg.resync_interval,
        cfg.resync_interval,
    );
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut l2_refresh = tokio::time::interval(l2::REFRESH);
    datapath.refresh_l2();
    loop {
        telemetry().health.beat("agent", LOOP_STALE);
        let changes = tokio::select! {
            Some(change) = rx.recv() => settle(change, &mut rx).await,
            // A new leader posts the Events of problems that already exist:
            // rebuilding reports every current problem again, and only the
            // leader posts them.
            () = source.leadership_changed() => Changes::everything(),
            _ = sweep.tick() => {
                datapath.sweep(&cfg.timeouts, cfg.removal_grace);
                continue;
            }
            _ = heartbeat.tick() => {
                datapath.beat();
                continue;
            }
            _ = l2_refresh.tick() => {
                datapath.refresh_l2();
                // Lease expiries are seen here: no watch event says a
                // node went silent.
                datapath.elect_l2(&cfg, &source, node_leases.as_ref());
                continue;
            }
            // Repairs what changed in the maps behind the agent's back, and
            // applies everything, which also retries what failed.
            _ = resync.tick() => {
                telemetry().resyncs.inc();
                datapath.repair_drift();
                Changes::everything()
            }
            () = retry_due(retry) => Changes::everything(),
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        };
        let full = changes.all;
        let result = datapath.sync(&cfg, &mut source, changes);
        retry = after_sync(result, full, &mut datapath, &mut source, retry);
        datapath.elect_l2(&cfg, &source, node_leases.as_ref());
        announce(&cfg, &mut speaker, &mut source, &datapath);
    }
    datapath.silence_l2();
    if let Some(leases) = node_leases {
        leases.stop().await;
    }
    telemetry().health.retire("agent");
    speaker.detach().await;
    tracing::info!("stopping; programs, links and maps stay pinned and keep forwarding");
    source.stop().await;
    Ok(())
}

/// Hands the BGP speaker its peers (from the manifest directory; the
/// Kubernetes source has none yet) and the routes of the last sync.
fn announce(
    cfg: &AgentConfig,
    speaker: &mut bgp::Speaker,
    source: &mut Source,
    datapath: &Datapath,
) {
    match source {
        Source::Cluster(cluster) => {
            if let Some((peers, problems)) = cluster.bgp_peers() {
                speaker.use_peers(peers, problems);
            }
        }
        Source::Manifests(manifests) => {
            // Read again only when a file that may hold them changed.
            if let Some(dir) = &cfg.manifests
                && manifests.take_peers_stale()
            {
                speaker.load_peers(dir, &cfg.node.node_name);
            }
        }
    }
    // Each address's routes carry its pool's attributes (pool mode). Built
    // only when they may have moved: pools change only in complete syncs,
    // which move the generation.
    let pools = source.pools();
    speaker.set_routes_of(datapath.announcing.generation(), || {
        let mut routes = datapath.announcing.routes();
        routes.attributes = routes
            .addresses
            .iter()
            .filter_map(|&address| {
                let pool = pools.pool_of(address)?;
                (pool.bgp != Default::default()).then(|| (address, pool.bgp.clone()))
            })
            .collect();
        routes
    });
}

impl Datapath {
    /// Loads and attaches the datapath, and adopts what a previous agent
    /// programmed.
    fn start(cfg: &AgentConfig) -> Result<Self> {
        let uplinks = Uplinks {
            ifaces: &cfg.ifaces,
            xdp_mode: cfg.xdp_mode,
            redirect: !cfg.no_redirect,
        };
        let (ebpf, mut maps) =
            dataplane::start(&cfg.node.bpffs, &cfg.node.node_name, cfg.limits, uplinks)?;
        let mut reconciler = Reconciler::new(cfg.limits.max_services, cfg.limits.max_backends);
        let found = maps.snapshot_for_adoption();
        let adopted = !found.services.is_empty();
        if adopted {
            tracing::info!(
                services = found.services.len(),
                backends = found.backends.len(),
                "adopting pinned state from a previous agent"
            );
        }
        reconciler.adopt(found);
        let l2 = if cfg.l2_announce {
            Some(Responder::start(&cfg.ifaces, &mut maps)?)
        } else {
            None
        };
        let mut guard = EgressGuard::new(cfg.cluster_cidrs.iter().copied().map(Network::from));
        guard
            .adopt(&maps, Instant::now())
            .context("reading the local backends and cluster networks a previous agent left")?;
        Ok(Datapath {
            _ebpf: ebpf,
            maps,
            reconciler,
            guard,
            published: Published::default(),
            failed: Vec::new(),
            incomplete: false,
            l2,
            l2_claims: Vec::new(),
            l2_alive: Default::default(),
            l2_elected: None,
            adopted,
            announcing: bgp::Announcing::default(),
        })
    }

    /// Keeps the L2 responder answering (see `announce::l2`).
    fn refresh_l2(&mut self) {
        if let Some(l2) = &mut self.l2 {
            l2.refresh(&mut self.maps);
        }
    }

    /// Stops the L2 responder's answers (the agent is leaving).
    fn silence_l2(&mut self) {
        if let Some(l2) = &mut self.l2 {
            l2.silence(&mut self.maps);
        }
    }

    /// Notes the addresses of `desired` for the L2 election.
    fn collect_l2_claims(&mut self, desired: &DesiredState) {
        if self.l2.is_none() {
            return;
        }
        let mut claims: Vec<L2Claim> = Vec::new();
        for (frontend, spec) in &desired.frontends {
            let serving_here = spec.backends.iter().any(|b| b.local && !b.terminating);
            match claims.iter_mut().find(|c| c.addr == frontend.addr) {
                Some(c) => c.serving_here |= serving_here,
                None => claims.push(L2Claim {
                    addr: frontend.addr,
                    service: spec.service.clone(),
                    local_only: spec.local_only,
                    serving_here,
                }),
            }
        }
        self.l2_claims = claims;
    }

    /// Announces the addresses this node should: with manifests every
    /// address it programs (for `Local`, those it has an endpoint for);
    /// with the Kubernetes API those it wins the election for among the
    /// nodes whose Lease is fresh.
    fn elect_l2(&mut self, cfg: &AgentConfig, source: &Source, leases: Option<&NodeLeases>) {
        let Some(l2) = &mut self.l2 else {
            return;
        };
        // Each address on the interfaces its pool names (every uplink for
        // addresses from elsewhere).
        let interfaces = |addr: std::net::IpAddr| -> Vec<String> {
            source
                .pools()
                .pool_of(addr)
                .map(|pool| pool.l2_settings())
                .unwrap_or_default()
                .interfaces_among(&cfg.ifaces)
                .into_iter()
                .map(str::to_string)
                .collect()
        };
        let mut reannounce = false;
        let mine: Vec<std::net::IpAddr> = match (source, leases) {
            (Source::Cluster(cluster), Some(leases)) => {
                // Until this node knows the others (and they it), it keeps
                // what it announces.
                let Some(alive) = leases.alive(&cfg.node.node_name) else {
                    return;
                };
                // Another node may have announced this node's addresses
                // while it thought this one dead, and clients would stay
                // on its MAC: when a node comes back (its Lease fresh again
                // after a lapse, or new), or this agent was stalled longer
                // than its responder stays live, it says again what it
                // holds.
                let came_back = !self.l2_alive.is_empty()
                    && alive
                        .difference(&self.l2_alive)
                        .any(|node| *node != cfg.node.node_name);
                let stalled = self
                    .l2_elected
                    .is_some_and(|at| at.elapsed() > l2::LIVENESS_WINDOW);
                reannounce = came_back || stalled;
                self.l2_alive.clone_from(&alive);
                self.l2_elected = Some(Instant::now());
                let claims: Vec<_> = self
                    .l2_claims
                    .iter()
                    .map(|c| (c.addr, c.service.clone(), c.local_only))
                    .collect();
                let (claims, nodes) = cluster.l2_inputs(&alive, &claims);
                election::elect(&claims, &nodes)
                    .into_iter()
                    .filter(|(_, node)| *node == cfg.node.node_name)
                    .map(|(addr, _)| addr)
                    .collect()
            }
            _ => self
                .l2_claims
                .iter()
                .filter(|c| !c.local_only || c.serving_here)
                .map(|c| c.addr)
                .collect(),
        };
        let wanted = mine.into_iter().map(|a| (a, interfaces(a))).collect();
        match l2.apply(&mut self.maps, &wanted) {
            Ok(new) => {
                if reannounce {
                    l2.reannounce(&new);
                }
                if let Source::Cluster(cluster) = source {
                    for addr in new {
                        if let Some(claim) = self.l2_claims.iter().find(|c| c.addr == addr) {
                            cluster.report_announcing(&claim.service, addr);
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "programming the L2 responder failed");
                self.incomplete = true;
            }
        }
    }

    /// Has `source` translate `changes`, and programs the result.
    fn sync(&mut self, cfg: &AgentConfig, source: &mut Source, changes: Changes) -> Result<()> {
        source.sync(changes, |desired, changed| {
            self.apply(cfg, desired, changed)
        })
    }

    fn repair_drift(&mut self) {
        match self.reconciler.repair_drift(&mut self.maps) {
            Ok(drift) if drift == Default::default() => {}
            Ok(drift) => tracing::warn!(
                rewrite = drift.rewrite,
                strays_removed = drift.strays_removed,
                "the maps differ from what the agent wrote; repairing"
            ),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "comparing the maps with what was written failed")
            }
        }
    }

    /// Tells the datapath the agent is alive (`Config::heartbeat_ns`), once
    /// the node configuration has been written.
    fn beat(&mut self) {
        let Some(config) = self.published.node_config else {
            return;
        };
        let beat = Config {
            heartbeat_ns: netdev::monotonic_ns(),
            ..config
        };
        if let Err(e) = self.maps.write_config(&beat) {
            tracing::warn!(error = %e, "writing the datapath heartbeat");
        }
    }

    fn sweep(&mut self, timeouts: &Timeouts, removal_grace: Duration) {
        if let Some(before) = Instant::now().checked_sub(removal_grace) {
            let ended = self.reconciler.forget_removed(before);
            if ended > 0 {
                tracing::debug!(
                    frontends = ended,
                    "removed frontends' ids freed; their flows go"
                );
            }
        }
        match self
            .guard
            .expire(&mut self.maps, Instant::now(), egress_guard::RETENTION)
        {
            Ok(0) => {}
            Ok(retired) => tracing::debug!(
                retired,
                guarded = self.guard.guarded(),
                "local backends gone from their Services for the retention no longer guarded"
            ),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "retiring local backends"),
        }
        let s = self.maps.sweep_flows(
            timeouts,
            &self.reconciler.active_service_ids(),
            &self.reconciler.active_backend_ids(),
        );
        telemetry().flow_entries.set(s.remaining as i64);
        telemetry().snat_ports_in_use.set(s.snat_held as i64);
        if s.expired + s.service_gone + s.udp_backend_gone > 0 {
            tracing::debug!(?s, "swept flows");
        }
    }

    fn apply(
        &mut self,
        cfg: &AgentConfig,
        desired: &DesiredState,
        changed: Option<&BTreeSet<Frontend>>,
    ) -> Result<()> {
        let Datapath {
            maps,
            reconciler,
            guard,
            published,
            ..
        } = self;
        let node_addr = match desired.node_addr {
            Some(a) => Some(a),
            None => netdev::first_ipv4(&cfg.ifaces[0])?,
        };
        let node_addr_v6 = match desired.node_addr_v6 {
            Some(a) => Some(a),
            None => netdev::first_global_ipv6(&cfg.ifaces[0])?,
        };
        let config = node_config_value(node_addr, node_addr_v6, cfg);
        if published.node_config.as_ref() != Some(&config) {
            netdev::warn_if_ephemeral(cfg.snat_ports.min, cfg.snat_ports.max);
            maps.write_config(&Config {
                heartbeat_ns: netdev::monotonic_ns(),
                ..config
            })?;
            match node_addr {
                Some(a) => tracing::info!(node_addr = %a, "SNAT address for remote backends"),
                None => tracing::warn!(
                    "no node address (no Node InternalIP, no IPv4 on the uplink): flows to remote backends will be dropped"
                ),
            }
            match node_addr_v6 {
                Some(a) => {
                    tracing::info!(node_addr_v6 = %a, "IPv6 SNAT address for remote backends")
                }
                None => tracing::info!(
                    "no IPv6 node address (no Node IPv6 InternalIP, no global IPv6 on the uplink): IPv6 flows to remote backends will be dropped"
                ),
            }
            published.node_config = Some(config);
        }
        let started = Instant::now();
        let summary = match changed {
            None => reconciler.apply(desired, maps),
            Some(changed) => reconciler.apply_changed(desired, changed, maps),
        };
        telemetry()
            .programming_duration
            .observe(started.elapsed().as_secs_f64());
        telemetry()
            .programming_errors
            .inc_by(summary.errors.len() as u64);
        for e in &summary.errors {
            tracing::error!(error = %e, "programming failed");
        }
        self.incomplete |= !summary.errors.is_empty();
        self.announcing
            .update(desired, changed, (node_addr, node_addr_v6), |frontend| {
                reconciler.is_programmed(frontend)
            });
        if let Err(e) = guard.apply(desired, changed, maps, Instant::now()) {
            // Retried with the next complete sync, like a failed frontend.
            tracing::error!(error = %format!("{e:#}"), "programming the reply-leak check failed");
            self.incomplete = true;
        }
        self.failed.extend(summary.failed);
        if summary.added + summary.updated + summary.removed > 0 {
            tracing::info!(
                added = summary.added,
                updated = summary.updated,
                removed = summary.removed,
                unchanged = summary.unchanged,
                map_writes = summary.map_writes,
                "services programmed"
            );
        }
        // Rewriting the names of every frontend is O(services): only when they
        // changed, not for each backend change.
        if published.names_version != Some(reconciler.names_version()) {
            telemetry().publish_services(reconciler);
            match state_file::write(&cfg.node.state_dir, &cfg.node.node_name, reconciler) {
                Ok(()) => published.names_version = Some(reconciler.names_version()),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "writing the inspect state file failed")
                }
            }
        }
        self.collect_l2_claims(desired);
        Ok(())
    }
}

fn node_config_value(
    node_addr: Option<Ipv4Addr>,
    node_addr_v6: Option<Ipv6Addr>,
    cfg: &AgentConfig,
) -> Config {
    Config {
        node_addr: node_addr
            .map(|a| lb_common::addr_v4(a.octets()))
            .unwrap_or_default(),
        snat_port_min: cfg.snat_ports.min,
        snat_port_max: cfg.snat_ports.max,
        flags: if cfg.no_redirect {
            0
        } else {
            CONFIG_F_REDIRECT
        } | if cfg.no_reverse_path_check {
            0
        } else {
            CONFIG_F_REVERSE_PATH
        } | if cfg.allow_pod_source_egress {
            0
        } else {
            CONFIG_F_POD_SOURCE_GUARD
        },
        stale_after_s: cfg.stale_after,
        // Written fresh with every write (`Datapath::beat`); kept 0 here so
        // the value compares equal across beats.
        heartbeat_ns: 0,
        _pad: 0,
        node_addr_v6: node_addr_v6.map(|a| a.octets()).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(future)
    }

    #[test]
    fn a_burst_waits_for_a_file_being_written_to_be_closed_and_no_longer_than_the_cap() {
        block_on(async {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let changes = settle(Change::File("/m/a.yaml".into()), &mut rx).await;
            assert_eq!(changes.files.len(), 1);
            assert!(changes.writing.is_empty());

            // Written: waits for the close, and takes it in.
            let sender = tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                sender.send(Change::File("/m/b.yaml".into())).unwrap();
            });
            let started = Instant::now();
            let changes = settle(Change::Writing("/m/b.yaml".into()), &mut rx).await;
            assert!(started.elapsed() >= Duration::from_millis(20));
            assert!(changes.writing.is_empty(), "{changes:?}");
            assert_eq!(changes.files.len(), 1);

            // Never closed: read after the cap all the same.
            let started = Instant::now();
            let changes = settle(Change::Writing("/m/c.yaml".into()), &mut rx).await;
            assert!(started.elapsed() >= SETTLE_MAX);
            assert_eq!(changes.files.len(), 1);
            drop(tx);
        });
    }
}
