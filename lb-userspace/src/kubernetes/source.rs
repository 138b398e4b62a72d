//! The Kubernetes pipeline: watches feed the [`Translator`] one changed
//! Service at a time (everything after a re-list, or when a Node change
//! matters); the Lease holder posts the problems as Events and, in node
//! mode, writes the Services' status.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::Duration,
};

use anyhow::Result;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use tokio::sync::{Notify, mpsc, watch};

use super::{
    events::EventSink,
    lease::{Candidate, LeaseConfig},
    status,
    watch::{self as watches, Stores},
};
use crate::{
    change::{Change, Changes},
    model::{DesiredState, Frontend, Network, ServiceRef},
    pools::{self, Allocation, Pools},
    telemetry::telemetry,
    translate::{
        AddressMode, EventReason, Problem, Scope, ServiceKey, Translator, cluster_networks,
        handles_class, node_address_of, node_address_v6_of, node_mode, problem::reference_to,
    },
};

/// The agent's view of the cluster, and what it writes back.
pub struct ClusterSource {
    scope: Scope,
    stores: Stores,
    events: EventSink,
    candidate: Candidate,
    leading: watch::Receiver<bool>,
    /// Wakes node mode's status writer after each sync.
    status_changed: Option<Arc<Notify>>,
    /// The translation, updated per changed Service; `None` until the first
    /// full build.
    translator: Option<Translator>,
    /// What of the Nodes the translation depends on, to tell a Node change
    /// that matters (rebuild everything) from one that does not.
    node_context: Option<NodeContext>,
    /// Pool mode: the pools and the last allocation. Every agent computes
    /// the same one from the same objects (the status the leader wrote
    /// keeps it stable); only the leader writes it back.
    pools: Pools,
    allocation: Allocation,
}

/// This node's SNAT addresses, in node mode the addresses it serves, and
/// the cluster's networks.
type NodeContext = (
    Option<Ipv4Addr>,
    Option<Ipv6Addr>,
    Vec<IpAddr>,
    BTreeSet<Network>,
);

fn node_context(nodes: &[Node], scope: &Scope) -> NodeContext {
    let serves = match scope.address_mode {
        AddressMode::Status | AddressMode::Pool => Vec::new(),
        AddressMode::Node => node_mode::own_addresses(nodes, &scope.node_name),
    };
    (
        node_address_of(nodes, &scope.node_name),
        node_address_v6_of(nodes, &scope.node_name),
        serves,
        cluster_networks(nodes),
    )
}

impl ClusterSource {
    /// With `client` (made by [`super::client`] before the agent touches
    /// the kernel), starts the watches (each change is sent on `changes`)
    /// and waits for their first complete lists; then campaigns for the
    /// Lease.
    /// `None` when interrupted (SIGINT) while waiting.
    pub async fn start(
        client: kube::Client,
        scope: Scope,
        lease: &LeaseConfig,
        bgp: bool,
        changes: mpsc::UnboundedSender<Change>,
    ) -> Result<Option<Self>> {
        let writes_status = scope.address_mode != AddressMode::Status;
        let pool_mode = scope.address_mode == AddressMode::Pool;
        // Every Node in every mode: their pod CIDRs and addresses are the
        // cluster's networks, which the reply-leak check at egress spares.
        let stores = watches::watch(
            client.clone(),
            changes,
            pool_mode,
            bgp.then_some(lease.namespace.as_str()),
        );
        tracing::info!(
            address_mode = ?scope.address_mode,
            "listing Services, EndpointSlices and Nodes"
        );
        // Until the first complete list the maps keep what a previous
        // agent left; an unreachable API server is retried with backoff
        // (the watcher logs it) while traffic keeps flowing.
        let mut waited = 0u64;
        loop {
            tokio::select! {
                _ = stores.ready() => break,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {
                    waited += 5;
                    tracing::warn!(waited_s = waited,
                        "no complete list from the Kubernetes API yet (unreachable?); retrying with backoff, maps keep their last state");
                }
                _ = tokio::signal::ctrl_c() => return Ok(None),
            }
        }
        tracing::info!(
            waited_s = waited,
            "Kubernetes API answered: initial lists complete"
        );
        // One agent (the Lease holder) speaks for the cluster: Events on
        // Services, and in node mode their status.
        let candidate = Candidate::spawn(client.clone(), lease, &scope.node_name);
        let status_changed = writes_status.then(|| {
            let notify = Arc::new(Notify::new());
            status::spawn(
                client.clone(),
                stores.clone(),
                scope.lb_classes.clone(),
                scope.address_mode,
                candidate.watch(),
                notify.clone(),
                EventSink::new(client.clone(), &scope.node_name),
            );
            notify
        });
        Ok(Some(ClusterSource {
            events: EventSink::new(client, &scope.node_name),
            leading: candidate.watch(),
            scope,
            stores,
            candidate,
            status_changed,
            translator: None,
            node_context: None,
            pools: Pools::default(),
            allocation: Allocation::default(),
        }))
    }

    /// The election's inputs (`announce::election`) for `claims` (address,
    /// Service, `externalTrafficPolicy: Local`): every Node with its labels
    /// and readiness, alive when in `alive` (fresh node Lease), and for
    /// `Local` Services the nodes with a ready endpoint.
    pub fn l2_inputs(
        &self,
        alive: &BTreeSet<String>,
        claims: &[(IpAddr, ServiceRef, bool)],
    ) -> (
        Vec<crate::announce::election::AddressClaim>,
        std::collections::BTreeMap<String, crate::announce::election::NodeState>,
    ) {
        use crate::announce::election::{AddressClaim, NodeState};
        let nodes = self
            .stores
            .nodes()
            .into_iter()
            .filter_map(|node| {
                let name = node.metadata.name.clone()?;
                let ready = node
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                let state = NodeState {
                    labels: node.metadata.labels.clone().unwrap_or_default(),
                    ready,
                    alive: alive.contains(&name),
                };
                Some((name, state))
            })
            .collect();
        let out = claims
            .iter()
            .map(|(addr, service, local_only)| {
                // Only a Local Service's own slices are decoded from the
                // watch cache (this runs every election tick).
                let local_nodes = local_only.then(|| {
                    let key = ServiceKey::new(&service.namespace, &service.name);
                    self.stores
                        .slices_of_service(&key)
                        .iter()
                        .flat_map(|slice| slice.endpoints.iter().flatten())
                        .filter(|e| crate::translate::objects::endpoint_ready(e))
                        .filter_map(|e| e.node_name.clone())
                        .collect()
                });
                AddressClaim {
                    addr: *addr,
                    // Status-mode addresses: the defaults. Pool addresses
                    // take their pool's `spec.l2` here.
                    settings: self
                        .pools
                        .pool_of(*addr)
                        .map(|pool| pool.l2_settings())
                        .unwrap_or_default(),
                    local_nodes,
                }
            })
            .collect();
        (out, nodes)
    }

    /// Tells `service`'s watchers (an Event on it) that this node now
    /// announces `address` on L2.
    pub fn report_announcing(&self, service: &ServiceRef, address: IpAddr) {
        let key = ServiceKey::new(&service.namespace, &service.name);
        if let Some(object) = self.stores.service(&key) {
            self.events
                .announcing(reference_to(&*object), address, &self.scope.node_name);
        }
    }

    /// Resolves when this agent wins or loses the Lease.
    pub async fn leadership_changed(&mut self) {
        if self.leading.changed().await.is_err() {
            // The candidate is gone: leadership never changes again.
            std::future::pending::<()>().await;
        }
    }

    /// Re-translates what `changes` name (everything on a re-list or a Node
    /// change that matters) and hands the desired state to `apply`, with
    /// the frontends that changed (`None`: compare everything). Problems
    /// are logged, and posted as Events by the leader.
    pub fn sync(
        &mut self,
        changes: Changes,
        apply: impl FnOnce(&DesiredState, Option<&BTreeSet<Frontend>>) -> Result<()>,
    ) -> Result<()> {
        let pool_mode = self.scope.address_mode == AddressMode::Pool;
        let mut full = changes.all || changes.pools || self.translator.is_none();
        // Pool mode: allocate again when a Service (or a pool) changed.
        let mut allocated = false;
        if changes.nodes && !full {
            // Most Node updates (conditions, images) change nothing here.
            full = self.node_context.as_ref()
                != Some(&node_context(&self.stores.nodes(), &self.scope));
        }
        let mut problems = Vec::new();
        let scope = &self.scope;
        let handled = |service: &Service| handles_class(service, &scope.lb_classes);
        let result = if full {
            let nodes = self.stores.nodes();
            // The old translation goes first: two at once were most of the
            // agent's peak. Every object is decoded from the watch caches
            // once, a Service's slices only while it is translated, and
            // dropped before the translation is built.
            self.translator = None;
            let stores = &self.stores;
            let (translator, found) = {
                let services = stores.services();
                let services: Vec<&Service> = services
                    .iter()
                    .map(|s| &**s)
                    .filter(|s| handled(s))
                    .collect();
                if pool_mode {
                    self.pools = Pools::new(&stores.address_pools());
                    self.allocation =
                        pools::allocate(&self.pools, &services, &stores.namespace_labels());
                    allocated = true;
                }
                Translator::build_with(
                    &services,
                    |key| stores.slices_of_service(key),
                    &nodes,
                    &scope.node_name,
                    scope.address_mode,
                    self.allocation.assigned.clone(),
                )
            };
            self.node_context = Some(node_context(&nodes, scope));
            problems = found;
            let translator = self.translator.insert(translator);
            apply(translator.desired(), None)
        } else if let Some(translator) = self.translator.as_mut()
            && !(changes.services.is_empty() && changes.slices.is_empty())
        {
            let mut keys = changes.slices;
            if !changes.services.is_empty() {
                // Node mode: a Service's ports can make another one pending, or
                // free it.
                let services = self.stores.services();
                keys.extend(
                    translator.reallocate(services.iter().map(|s| &**s).filter(|s| handled(s))),
                );
                if pool_mode {
                    // One Service's change can free or take an address
                    // another one waits for.
                    let services: Vec<&Service> = services
                        .iter()
                        .map(|s| &**s)
                        .filter(|s| handled(s))
                        .collect();
                    self.allocation =
                        pools::allocate(&self.pools, &services, &self.stores.namespace_labels());
                    allocated = true;
                    keys.extend(translator.reassign(self.allocation.assigned.clone()));
                }
                keys.extend(changes.services);
            }
            let slices = self.stores.slices_of(&keys);
            let mut changed = BTreeSet::new();
            for key in &keys {
                let service = self.stores.service(key).filter(|s| handled(s));
                let slices: Vec<&EndpointSlice> = slices
                    .get(key)
                    .map(|found| found.iter().map(|s| &**s).collect())
                    .unwrap_or_default();
                translator.update(
                    key,
                    service.as_deref(),
                    &slices,
                    &mut problems,
                    &mut changed,
                );
            }
            tracing::debug!(
                services = keys.len(),
                frontends = changed.len(),
                "re-translated changed Services"
            );
            apply(translator.desired(), Some(&changed))
        } else {
            Ok(())
        };

        let leader = self.candidate.is_leader();
        if allocated {
            telemetry().publish_pools(&self.pools, &self.allocation);
            for problem in &self.allocation.problems {
                tracing::warn!(reason = %problem.reason, error = %problem, "address pools");
                if leader {
                    self.events.report(problem);
                }
            }
            for event in &self.allocation.allocated {
                tracing::info!(assigned = %event, "address pools");
                if leader {
                    self.events.report(event);
                }
            }
        }
        for problem in &problems {
            tracing::warn!(error = %problem, "skipping invalid object");
            if leader {
                self.events.report(problem);
            }
        }
        if let Some(notify) = &self.status_changed {
            notify.notify_one();
        }
        result
    }

    /// `--bgp`: the sessions this node should run, from the BGPPeers of the
    /// agent's namespace that select it (by its Node's labels), and the
    /// problems of those that are wrong. The leader posts each problem as a
    /// Warning Event on its BGPPeer. `None` without `--bgp`.
    pub fn bgp_peers(
        &mut self,
    ) -> Option<(
        Vec<crate::announce::bgp::PeerConfig>,
        Vec<crate::announce::bgp::PeerProblem>,
    )> {
        let peers = self.stores.bgp_peers()?;
        let labels = self
            .stores
            .node_labels(&self.scope.node_name)
            .unwrap_or_else(|| {
                // Not listed (yet): the one label every node has.
                [(
                    "kubernetes.io/hostname".to_string(),
                    self.scope.node_name.clone(),
                )]
                .into()
            });
        let leader = self.candidate.is_leader();
        let mut configs = Vec::new();
        let mut problems = Vec::new();
        let stores = &self.stores;
        let secrets = |namespace: &str, name: &str, key: &str| {
            crate::announce::bgp::peer::secret_key(
                stores.bgp_secret(namespace, name).as_deref(),
                key,
            )
        };
        for peer in &peers {
            match crate::announce::bgp::peer::peer_config(peer, &labels, &secrets) {
                Ok(Some(config)) => {
                    crate::announce::bgp::peer::add_unique(&mut configs, config, &mut problems)
                }
                Ok(None) => {}
                Err(reason) => {
                    if leader {
                        self.events.report(&Problem::new(
                            reference_to(&**peer),
                            EventReason::InvalidSpec,
                            format!("BGPPeer skipped: {reason}"),
                        ));
                    }
                    problems.push(crate::announce::bgp::PeerProblem {
                        object: format!(
                            "{}/{}",
                            peer.metadata.namespace.as_deref().unwrap_or_default(),
                            peer.metadata.name.as_deref().unwrap_or_default()
                        ),
                        reason,
                    });
                }
            }
        }
        Some((configs, problems))
    }

    /// Pool mode: the pools, to learn which pool (and so which
    /// announcement) a Service address came from ([`Pools::pool_of`]).
    pub fn pools(&self) -> &Pools {
        &self.pools
    }

    /// Pool mode: each Service's assigned addresses.
    pub fn allocation(&self) -> &Allocation {
        &self.allocation
    }

    /// Posts a Warning Event on each Service whose frontend this node
    /// failed to program. Every node posts its own, leader or not: only the
    /// node knows, and the Event names it (`reportingInstance`).
    pub fn report_programming_failures(&mut self, failed: &[(ServiceRef, String)]) {
        for (service, message) in failed {
            let key = ServiceKey::new(&service.namespace, &service.name);
            let Some(object) = self.stores.service(&key) else {
                continue;
            };
            self.events.report(&Problem::new(
                reference_to(&*object),
                EventReason::ProgrammingFailed,
                message.clone(),
            ));
        }
    }

    /// Hands the Lease over at once rather than after it expires.
    pub async fn stop(self) {
        self.candidate.resign().await;
    }
}
