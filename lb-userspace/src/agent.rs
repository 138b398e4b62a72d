//! The node agent: load and attach the datapath (adopting what a previous
//! agent pinned), then keep the maps equal to what the manifests say, and
//! sweep idle flows. On SIGINT/SIGTERM it exits and leaves programs, links
//! and maps pinned, so traffic keeps flowing until the next agent adopts
//! them.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_common::{CONFIG_F_REDIRECT, Config};
use tokio::sync::{Notify, mpsc};

use crate::{
    conntrack::Timeouts,
    dataplane::{self, Limits, Maps, PinDir, attach},
    model::DesiredState,
    model::Frontend,
    netdev,
    reconcile::Reconciler,
    source::{
        AddressMode,
        kube::{self as kube_source, Change},
        leader::{self, LeaseConfig},
        manifest, node_mode, status,
        translate::{self, ServiceKey, Translator},
    },
    state_file,
};

/// Where Services, EndpointSlices and Nodes come from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A directory of manifests, watched with inotify.
    Manifests(PathBuf),
    /// The Kubernetes API (kubeconfig file, or KUBECONFIG / in-cluster).
    Kubernetes { kubeconfig: Option<PathBuf> },
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub ifaces: Vec<String>,
    pub node_name: String,
    pub source: SourceConfig,
    /// `spec.loadBalancerClass` values handled besides none.
    pub lb_classes: Vec<String>,
    /// Where frontend addresses come from.
    pub address_mode: AddressMode,
    /// The leader Lease (Kubernetes source only): namespace, name, duration.
    pub lease: LeaseSettings,
    pub bpffs: PathBuf,
    pub state_dir: PathBuf,
    pub limits: Limits,
    pub snat_ports: (u16, u16),
    pub redirect: bool,
    pub sweep_interval: Duration,
    pub timeouts: Timeouts,
    pub xdp_mode: attach::XdpModeChoice,
}

/// Where the leader Lease lives and how long it lasts.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    pub duration: Duration,
}

/// What the agent holds while it runs on the Kubernetes API.
struct KubeParts {
    stores: kube_source::Stores,
    events: kube_source::EventSink,
    candidate: leader::Candidate,
    /// Wakes node mode's status writer after each sync.
    status_changed: Option<Arc<Notify>>,
    /// The translation, updated per changed Service; `None` until the first
    /// full build.
    translator: Option<Translator>,
    /// What of the Nodes the translation depends on, to tell a Node change
    /// that matters (rebuild everything) from one that does not.
    node_context: Option<NodeContext>,
}

/// This node's SNAT address and, in node mode, the addresses it serves.
type NodeContext = (Option<Ipv4Addr>, Vec<Ipv4Addr>);

fn node_context(nodes: &[k8s_openapi::api::core::v1::Node], cfg: &AgentConfig) -> NodeContext {
    let serves = match cfg.address_mode {
        AddressMode::Status => Vec::new(),
        AddressMode::Node => node_mode::own_addresses(nodes, &cfg.node_name),
    };
    (translate::node_address_of(nodes, &cfg.node_name), serves)
}

/// What the agent last wrote outside the maps' entries: the node config map
/// value, and the version of the names in the state file.
#[derive(Debug, Default)]
struct Published {
    node_config: Option<Config>,
    names_version: Option<u64>,
}

/// What changed since the last sync.
#[derive(Debug, Default)]
struct Dirty {
    all: bool,
    nodes: bool,
    /// Services whose object changed (node mode re-allocates ports then).
    services: BTreeSet<ServiceKey>,
    /// Services whose EndpointSlices changed.
    slices: BTreeSet<ServiceKey>,
}

impl Dirty {
    fn everything() -> Self {
        Dirty {
            all: true,
            ..Dirty::default()
        }
    }

    fn add(&mut self, change: Change) {
        match change {
            Change::All => self.all = true,
            Change::Nodes => self.nodes = true,
            Change::Service(key) => {
                self.services.insert(key);
            }
            Change::Slices(key) => {
                self.slices.insert(key);
            }
        }
    }
}

pub async fn run(cfg: AgentConfig) -> Result<()> {
    if cfg.ifaces.is_empty() {
        bail!("no --iface given: name the node's uplink interface(s)");
    }
    for iface in &cfg.ifaces {
        netdev::ifindex(iface).with_context(|| format!("--iface {iface}"))?;
    }
    dataplane::ensure_bpffs(&cfg.bpffs)?;
    let pins = PinDir::new(&cfg.bpffs, &cfg.node_name);
    let mut ebpf = dataplane::load(&pins, cfg.limits)?;
    let mut maps = Maps::take(&mut ebpf)?;

    // Interfaces a previous agent attached to but that are no longer
    // configured.
    for stale in attach::pinned_interfaces(&pins) {
        if !cfg.ifaces.contains(&stale) {
            attach::detach_interface(&pins, &stale)?;
        }
    }
    netdev::prepare_forwarding(&cfg.ifaces);
    for iface in &cfg.ifaces {
        let mode = attach::attach_interface(&mut ebpf, &pins, iface, cfg.xdp_mode)?;
        let index = netdev::ifindex(iface)?;
        if cfg.redirect && mode == attach::XdpAttachMode::Native {
            maps.tx_ports
                .insert(index, index, None, 0)
                .with_context(|| format!("adding {iface} to XLB_TX_PORTS"))?;
        } else {
            let _ = maps.tx_ports.remove(index);
        }
    }

    let mut reconciler = Reconciler::new(cfg.limits.max_services, cfg.limits.max_backends);
    let found = maps.snapshot_for_adoption();
    if !found.services.is_empty() {
        tracing::info!(
            services = found.services.len(),
            backends = found.backends.len(),
            "adopting pinned state from a previous agent"
        );
    }
    reconciler.adopt(found);

    let (tx, mut rx) = mpsc::unbounded_channel::<Change>();
    let mut _dir_watcher = None;
    let mut kube = None;
    match &cfg.source {
        SourceConfig::Manifests(dir) => _dir_watcher = Some(watch_dir(dir, tx)?),
        SourceConfig::Kubernetes { kubeconfig } => {
            let client = kube_source::client(kubeconfig.as_deref()).await?;
            let node_mode = cfg.address_mode == AddressMode::Node;
            let watched = kube_source::watch(client.clone(), &cfg.node_name, node_mode, tx);
            tracing::info!(
                address_mode = ?cfg.address_mode,
                "listing Services, EndpointSlices and {}",
                if node_mode { "Nodes" } else { "this Node" }
            );
            // Until the first complete list the maps keep what a previous
            // agent left; an unreachable API server is retried with backoff
            // (the watcher logs it) while traffic keeps flowing.
            let mut waited = 0u64;
            loop {
                tokio::select! {
                    _ = watched.ready() => break,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {
                        waited += 5;
                        tracing::warn!(waited_s = waited,
                            "no complete list from the Kubernetes API yet (unreachable?); retrying with backoff, maps keep their last state");
                    }
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
            }
            tracing::info!(
                waited_s = waited,
                "Kubernetes API answered: initial lists complete"
            );
            // One agent (the Lease holder) speaks for the cluster: Events on
            // Services, and in node mode their status.
            let candidate = leader::Candidate::spawn(
                client.clone(),
                LeaseConfig {
                    namespace: cfg.lease.namespace.clone(),
                    name: cfg.lease.name.clone(),
                    identity: cfg.node_name.clone(),
                    duration: cfg.lease.duration,
                },
            );
            let status_changed = node_mode.then(|| {
                let notify = Arc::new(Notify::new());
                status::spawn(
                    client.clone(),
                    watched.clone(),
                    cfg.lb_classes.clone(),
                    candidate.watch(),
                    notify.clone(),
                );
                notify
            });
            kube = Some(KubeParts {
                stores: watched,
                events: kube_source::EventSink::new(client, &cfg.node_name),
                candidate,
                status_changed,
                translator: None,
                node_context: None,
            });
        }
    }
    let mut leading = kube.as_ref().map(|k| k.candidate.watch());
    let mut published = Published::default();
    sync(
        &cfg,
        kube.as_mut(),
        Dirty::everything(),
        &mut maps,
        &mut reconciler,
        &mut published,
    )?;
    tracing::info!(node = %cfg.node_name, interfaces = ?cfg.ifaces, "agent ready");

    let mut sweep = tokio::time::interval(cfg.sweep_interval);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            Some(change) = rx.recv() => {
                // Editors, `kubectl apply` and rollouts change in bursts:
                // settle, then apply the whole burst at once.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let mut dirty = Dirty::default();
                dirty.add(change);
                while let Ok(change) = rx.try_recv() {
                    dirty.add(change);
                }
                if let Err(e) = sync(&cfg, kube.as_mut(), dirty, &mut maps, &mut reconciler, &mut published) {
                    tracing::error!(error = %format!("{e:#}"), "applying the desired state failed");
                }
            }
            // A new leader posts the Events of problems that already exist.
            Ok(()) = async {
                match leading.as_mut() {
                    Some(leading) => leading.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                // Rebuilding reports every current problem again, and only
                // the leader posts them as Events.
                if let Err(e) = sync(&cfg, kube.as_mut(), Dirty::everything(), &mut maps, &mut reconciler, &mut published) {
                    tracing::error!(error = %format!("{e:#}"), "applying the desired state failed");
                }
            }
            _ = sweep.tick() => {
                let s = maps.sweep_flows(
                    &cfg.timeouts,
                    &reconciler.active_service_ids(),
                    &reconciler.active_backend_ids(),
                );
                if s.expired + s.service_gone + s.udp_backend_gone > 0 {
                    tracing::debug!(?s, "swept flows");
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    tracing::info!("stopping; programs, links and maps stay pinned and keep forwarding");
    if let Some(kube) = kube {
        // Hand the Lease over at once rather than after it expires.
        kube.candidate.resign().await;
    }
    drop(ebpf);
    Ok(())
}

/// Reads what changed, translates it and applies the difference.
fn sync(
    cfg: &AgentConfig,
    kube: Option<&mut KubeParts>,
    dirty: Dirty,
    maps: &mut Maps,
    reconciler: &mut Reconciler,
    published: &mut Published,
) -> Result<()> {
    let Some(kube) = kube else {
        let SourceConfig::Manifests(dir) = &cfg.source else {
            bail!("Kubernetes source not started");
        };
        let (mut objects, errors) = manifest::load_dir(dir);
        for e in &errors {
            tracing::warn!(error = %e, "skipping malformed manifest");
        }
        kube_source::retain_classes(&mut objects, &cfg.lb_classes);
        let (desired, errors) = translate::translate(&objects, &cfg.node_name, cfg.address_mode);
        drop(objects);
        for e in &errors {
            tracing::warn!(error = %e, "skipping invalid object");
        }
        let result = apply(cfg, maps, reconciler, published, &desired, None);
        drop(desired);
        // Parsing a large directory allocates in a burst that glibc would
        // keep; give it back so the agent's resident size reflects its state.
        // SAFETY: malloc_trim has no preconditions.
        unsafe { libc::malloc_trim(0) };
        return result;
    };

    let mut full = dirty.all || kube.translator.is_none();
    if dirty.nodes && !full {
        // Most Node updates (conditions, images) change nothing here.
        full = kube.node_context.as_ref() != Some(&node_context(&kube.stores.nodes(), cfg));
    }
    let mut errors = Vec::new();
    let result = if full {
        // From the watch caches as they are: no copy of every object.
        let services = kube.stores.services();
        let services: Vec<&Service> = services
            .iter()
            .map(|s| &**s)
            .filter(|s| kube_source::handles_class(s, &cfg.lb_classes))
            .collect();
        let slices = kube.stores.endpoint_slices();
        let slices: Vec<&EndpointSlice> = slices.iter().map(|s| &**s).collect();
        let nodes = kube.stores.nodes();
        let (translator, found) =
            Translator::build_from(&services, &slices, &nodes, &cfg.node_name, cfg.address_mode);
        kube.node_context = Some(node_context(&nodes, cfg));
        errors = found;
        let translator = kube.translator.insert(translator);
        let result = apply(cfg, maps, reconciler, published, translator.desired(), None);
        // SAFETY: malloc_trim has no preconditions.
        unsafe { libc::malloc_trim(0) };
        result
    } else if let Some(translator) = kube.translator.as_mut()
        && !(dirty.services.is_empty() && dirty.slices.is_empty())
    {
        let handled = |service: &Service| kube_source::handles_class(service, &cfg.lb_classes);
        let mut keys = dirty.slices;
        if !dirty.services.is_empty() {
            // Node mode: a Service's ports can make another one pending, or
            // free it.
            let services = kube.stores.services();
            keys.extend(
                translator.reallocate(services.iter().map(|s| &**s).filter(|s| handled(s))),
            );
            keys.extend(dirty.services);
        }
        let slices = kube.stores.slices_of(&keys);
        let mut changed = BTreeSet::new();
        for key in &keys {
            let service = kube.stores.service(key).filter(|s| handled(s));
            let slices: Vec<&EndpointSlice> = slices
                .get(key)
                .map(|found| found.iter().map(|s| &**s).collect())
                .unwrap_or_default();
            translator.update(key, service.as_deref(), &slices, &mut errors, &mut changed);
        }
        tracing::debug!(
            services = keys.len(),
            frontends = changed.len(),
            "re-translated changed Services"
        );
        apply(
            cfg,
            maps,
            reconciler,
            published,
            translator.desired(),
            Some(&changed),
        )
    } else {
        Ok(())
    };

    let leader = kube.candidate.is_leader();
    for e in &errors {
        tracing::warn!(error = %e, "skipping invalid object");
        if leader {
            kube.events.report(&e.object, e.event_reason, &e.reason);
        }
    }
    if let Some(notify) = &kube.status_changed {
        notify.notify_one();
    }
    result
}

fn apply(
    cfg: &AgentConfig,
    maps: &mut Maps,
    reconciler: &mut Reconciler,
    published: &mut Published,
    desired: &DesiredState,
    changed: Option<&BTreeSet<Frontend>>,
) -> Result<()> {
    let node_addr = match desired.node_addr {
        Some(a) => Some(a),
        None => netdev::first_ipv4(&cfg.ifaces[0])?,
    };
    let config = node_config_value(node_addr, cfg);
    if published.node_config.as_ref() != Some(&config) {
        maps.write_config(&config)?;
        match node_addr {
            Some(a) => tracing::info!(node_addr = %a, "SNAT address for remote backends"),
            None => tracing::warn!(
                "no node address (no Node InternalIP, no IPv4 on the uplink): flows to remote backends will be dropped"
            ),
        }
        published.node_config = Some(config);
    }
    let summary = match changed {
        None => reconciler.apply(desired, maps),
        Some(changed) => reconciler.apply_changed(desired, changed, maps),
    };
    for e in &summary.errors {
        tracing::error!(error = %e, "programming failed");
    }
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
        match state_file::write(&cfg.state_dir, &cfg.node_name, reconciler) {
            Ok(()) => published.names_version = Some(reconciler.names_version()),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "writing the inspect state file failed")
            }
        }
    }
    Ok(())
}

fn node_config_value(node_addr: Option<Ipv4Addr>, cfg: &AgentConfig) -> Config {
    Config {
        node_addr: node_addr
            .map(|a| lb_common::addr_v4(a.octets()))
            .unwrap_or_default(),
        snat_port_min: cfg.snat_ports.0,
        snat_port_max: cfg.snat_ports.1,
        flags: if cfg.redirect { CONFIG_F_REDIRECT } else { 0 },
    }
}

/// inotify on the manifest directory; every event just says "look again".
fn watch_dir(dir: &Path, tx: mpsc::UnboundedSender<Change>) -> Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    if !dir.is_dir() {
        bail!("manifest directory {} does not exist", dir.display());
    }
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Only changes count: the agent's own reads of the files raise
        // access events, and reacting to those would re-read forever.
        if let Ok(event) = event
            && !matches!(event.kind, notify::EventKind::Access(_))
        {
            let _ = tx.send(Change::All);
        }
    })
    .context("creating the manifest watcher")?;
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    Ok(watcher)
}
