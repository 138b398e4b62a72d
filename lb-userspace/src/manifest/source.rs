//! The manifest pipeline: inotify on the directory names the files that
//! changed; a sync reads only those, and re-translates only the Services
//! whose objects in them changed.
//!
//! Per file the source keeps what it needs to tell what changed, not the
//! parsed objects: a digest of the text, a digest of each Service's objects
//! in it (the Service and its EndpointSlices) and the file's Nodes. A file
//! read again is parsed only when its text changed; the Services whose
//! digests differ (or that appeared or went) are then translated again from
//! the files that hold their objects (usually just the file read), and the
//! reconciler compares only their frontends (`apply_changed`). A change to
//! the Nodes, and in node mode a change to a Service, translate everything
//! again, as the first sync does.
//!
//! An event that names no manifest file (the directory itself, a hidden
//! name such as a mounted ConfigMap's `..data`, an overflow) makes the sync
//! list the directory and read every file, parsing only those whose text
//! changed. So does the periodic resync.
//!
//! A directory that cannot be read (removed, replaced, EACCES, EIO) is not
//! an empty one: the sync fails, the Services read before stay programmed,
//! and the agent retries with backoff (audit A-15). A directory replaced by
//! a new one (a volume mounted again) is watched anew once it reads.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    ffi::OsStr,
    fs,
    hash::{DefaultHasher, Hash, Hasher},
    io::ErrorKind,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Service},
    discovery::v1::EndpointSlice,
};
use tokio::sync::mpsc;

use super::{DirectoryUnreadable, Format, ManifestError, list_dir, parse, parse::whole_file_error};
use crate::{
    change::{Change, Changes},
    model::{DesiredState, Frontend},
    pools::{AddressPool, Allocation, Pools, allocate_remembering, namespace_labels},
    telemetry::telemetry,
    translate::{
        AddressMode, Objects, Scope, ServiceKey, Translator, handles_class, slice_service,
    },
};

/// A watched directory of manifests.
pub struct ManifestSource {
    dir: PathBuf,
    scope: Scope,
    changes: mpsc::UnboundedSender<Change>,
    /// Sends what changed in the directory while held.
    watcher: Option<notify::RecommendedWatcher>,
    /// The directory the watcher watches (inotify follows the inode, not
    /// the path).
    watched: Identity,
    /// The last read failed.
    unreadable: bool,
    cache: Cache,
    /// The translation, updated per changed Service; `None` until the first
    /// complete read.
    translator: Option<Translator>,
    /// Files parsed so far.
    parses: u64,
    /// Pool mode: the pools and the last allocation, which the next one
    /// keeps (there is no status to keep it in).
    pools: Pools,
    allocation: Allocation,
    /// A file that may hold BGPPeers or their Secrets changed since
    /// [`ManifestSource::take_peers_stale`] last said so: the BGP speaker
    /// reads the directory's peers again only then, not at every sync
    /// (reading every file of 10 000 Services at each change cost 2.8 ms).
    peers_stale: bool,
}

/// Could this text hold a BGPPeer or a Secret (a peer's password)? A
/// substring test on the changed file only.
fn may_hold_peers(text: &str) -> bool {
    text.contains(crate::announce::bgp::peer::KIND) || text.contains("Secret")
}

/// A directory's device and inode.
type Identity = (u64, u64);

fn identity(dir: &Path) -> std::io::Result<Identity> {
    std::fs::metadata(dir).map(|m| (m.dev(), m.ino()))
}

/// What the source remembers of the files it read.
#[derive(Default)]
struct Cache {
    /// By file name, in the order files are read in.
    files: BTreeMap<Arc<OsStr>, FileState>,
    /// Which files hold objects of a Service (the Service or its slices), in
    /// file order.
    index: HashMap<ServiceKey, Vec<Arc<OsStr>>>,
}

/// One manifest file as last read.
struct FileState {
    /// Of the whole text.
    digest: u64,
    /// Of each Service's objects in the file: its Service definitions, and
    /// its slices.
    groups: HashMap<ServiceKey, (u64, u64)>,
    nodes: Vec<Node>,
    /// Pool mode's inputs besides the Services.
    pools: Vec<AddressPool>,
    namespaces: Vec<Namespace>,
    /// The text mentions a BGPPeer or a Secret ([`may_hold_peers`]).
    peers: bool,
}

/// The objects of one file that belong to one Service, in the order read.
#[derive(Default)]
struct Group {
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
}

impl Group {
    fn digests(&self) -> (u64, u64) {
        (object_digest(&self.services), object_digest(&self.slices))
    }
}

/// Serialization is deterministic (maps are sorted): equal objects, equal
/// bytes.
fn object_digest(objects: &impl serde::Serialize) -> u64 {
    let mut hasher = DefaultHasher::new();
    serde_json::to_vec(objects)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
}

/// One file's objects, by Service.
#[derive(Default)]
struct Parsed {
    groups: HashMap<ServiceKey, Group>,
    nodes: Vec<Node>,
    pools: Vec<AddressPool>,
    namespaces: Vec<Namespace>,
}

/// What one sync found.
#[derive(Default)]
struct Work {
    /// Files parsed during this sync.
    parsed: BTreeMap<Arc<OsStr>, Parsed>,
    /// Services whose objects changed.
    touched: BTreeSet<ServiceKey>,
    /// A Service object (not only a slice) changed.
    services_touched: bool,
    nodes_changed: bool,
    /// An AddressPool or a Namespace changed.
    pools_changed: bool,
}

fn text_digest(text: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

impl ManifestSource {
    /// Starts watching `dir`; every change is sent on `changes`.
    pub fn start(dir: &Path, scope: Scope, changes: mpsc::UnboundedSender<Change>) -> Result<Self> {
        let mut source = Self::unwatched(dir, scope, changes)?;
        source.watcher = Some(watch_dir(dir, source.changes.clone())?);
        Ok(source)
    }

    /// A source that does not watch: it reads what [`ManifestSource::sync`]
    /// is told changed (tests).
    fn unwatched(dir: &Path, scope: Scope, changes: mpsc::UnboundedSender<Change>) -> Result<Self> {
        let watched = identity(dir)
            .with_context(|| format!("reading the manifest directory {}", dir.display()))?;
        Ok(ManifestSource {
            dir: dir.to_owned(),
            scope,
            watcher: None,
            changes,
            watched,
            unreadable: false,
            cache: Cache::default(),
            translator: None,
            parses: 0,
            pools: Pools::default(),
            allocation: Allocation::default(),
            peers_stale: true,
        })
    }

    /// Reads what `changes` name (every file when they say so, or on the
    /// first sync) and hands the desired state to `apply`, with the
    /// frontends that changed (`None`: compare everything). Problems are
    /// logged: there is no object to post Events on. A directory that
    /// cannot be read is an error, and nothing is applied.
    pub fn sync(
        &mut self,
        changes: Changes,
        apply: impl FnOnce(&DesiredState, Option<&BTreeSet<Frontend>>) -> Result<()>,
    ) -> Result<()> {
        let complete = changes.all || self.translator.is_none();
        let rescan = complete || self.unreadable || identity(&self.dir).ok() != Some(self.watched);
        let mut work = Work::default();
        if rescan {
            self.peers_stale = true;
            let listed = match list_dir(&self.dir) {
                Ok(listed) => listed,
                Err(error) => return Err(self.unreadable_error(error)),
            };
            self.watch_again_if_replaced();
            let mut names: BTreeSet<Arc<OsStr>> = self.cache.files.keys().cloned().collect();
            names.extend(
                listed
                    .iter()
                    .filter_map(|(path, _)| path.file_name())
                    .map(Arc::from),
            );
            for name in names {
                self.refresh(&name, false, &mut work);
            }
        } else {
            // The directory first: files that cannot be read because the
            // directory cannot are not removed files.
            if let Err(source) = fs::read_dir(&self.dir) {
                return Err(self.unreadable_error(DirectoryUnreadable {
                    dir: self.dir.clone(),
                    source,
                }));
            }
            let names: BTreeSet<Arc<OsStr>> = changes
                .files
                .iter()
                .filter(|path| Format::of_file(path).is_some())
                .filter_map(|path| path.file_name())
                .map(Arc::from)
                .collect();
            for name in names {
                self.refresh(&name, false, &mut work);
            }
        }
        if std::mem::take(&mut self.unreadable) {
            tracing::info!(dir = %self.dir.display(), "the manifest directory reads again");
        }

        // Node mode's ports and pool mode's addresses are shared by every
        // Service: a Service change may move another one.
        let shared = self.scope.address_mode != AddressMode::Status;
        let rebuild = |work: &Work| {
            work.nodes_changed || work.pools_changed || (work.services_touched && shared)
        };
        if self.translator.is_none() || rebuild(&work) {
            self.rebuild(work, apply)
        } else {
            // Every file that holds objects of a touched Service, parsed;
            // a file found changed on the way touches more.
            loop {
                let missing: BTreeSet<Arc<OsStr>> = work
                    .touched
                    .iter()
                    .filter_map(|key| self.cache.index.get(key))
                    .flatten()
                    .filter(|name| !work.parsed.contains_key(*name))
                    .cloned()
                    .collect();
                if missing.is_empty() {
                    break;
                }
                for name in missing {
                    self.refresh(&name, true, &mut work);
                }
            }
            // A file read for a Service's other objects may have changed
            // too.
            if rebuild(&work) {
                self.rebuild(work, apply)
            } else {
                self.update(work, complete, apply)
            }
        }
    }

    /// Translates the touched Services again.
    fn update(
        &mut self,
        work: Work,
        complete: bool,
        apply: impl FnOnce(&DesiredState, Option<&BTreeSet<Frontend>>) -> Result<()>,
    ) -> Result<()> {
        let translator = self.translator.as_mut().expect("built before");
        let mut changed = BTreeSet::new();
        let mut problems = Vec::new();
        for key in &work.touched {
            let (service, slices) = gather(&self.cache.index, &work.parsed, key);
            translator.update(key, service, &slices, &mut problems, &mut changed);
        }
        for problem in &problems {
            tracing::warn!(error = %problem, "skipping invalid object");
        }
        if !work.touched.is_empty() {
            tracing::debug!(
                services = work.touched.len(),
                frontends = changed.len(),
                "re-translated changed Services"
            );
        }
        if complete {
            apply(translator.desired(), None)
        } else if changed.is_empty() {
            // Nothing to write (a file renamed, a Service moved to another
            // file).
            Ok(())
        } else {
            apply(translator.desired(), Some(&changed))
        }
    }

    /// Translates everything from the files (parsing those not parsed yet).
    fn rebuild(
        &mut self,
        mut work: Work,
        apply: impl FnOnce(&DesiredState, Option<&BTreeSet<Frontend>>) -> Result<()>,
    ) -> Result<()> {
        let names: Vec<Arc<OsStr>> = self
            .cache
            .files
            .keys()
            .filter(|name| !work.parsed.contains_key(*name))
            .cloned()
            .collect();
        for name in names {
            self.refresh(&name, true, &mut work);
        }
        let mut services: Vec<&Service> = Vec::new();
        let mut slices: Vec<&EndpointSlice> = Vec::new();
        let mut nodes: Vec<Node> = Vec::new();
        let mut pools: Vec<AddressPool> = Vec::new();
        let mut namespaces: Vec<&Namespace> = Vec::new();
        for (name, parsed) in &work.parsed {
            // A file that went (it was parsed and then removed) is not
            // in the cache any more.
            if !self.cache.files.contains_key(name) {
                continue;
            }
            for group in parsed.groups.values() {
                services.extend(group.services.iter());
                slices.extend(group.slices.iter());
            }
            nodes.extend(parsed.nodes.iter().cloned());
            pools.extend(parsed.pools.iter().cloned());
            namespaces.extend(parsed.namespaces.iter());
        }
        if self.scope.address_mode == AddressMode::Pool {
            self.allocate(&pools, &services, &namespaces);
        }
        let (translator, problems) = Translator::build_assigned(
            &services,
            &slices,
            &nodes,
            &self.scope.node_name,
            self.scope.address_mode,
            self.allocation.assigned.clone(),
        );
        drop((services, slices, nodes, namespaces));
        drop(work);
        for problem in &problems {
            tracing::warn!(error = %problem, "skipping invalid object");
        }
        let translator = self.translator.insert(translator);
        // The burst of parsing a large directory is given back as it is
        // freed (the agent's allocator, `main.rs`).
        apply(translator.desired(), None)
    }

    /// Pool mode: assigns addresses to `services` from `pools`, keeping
    /// what the last allocation gave (the agent is alone: no leader, no
    /// status to write). Problems and new assignments are logged.
    fn allocate(
        &mut self,
        pools: &[AddressPool],
        services: &[&Service],
        namespaces: &[&Namespace],
    ) {
        self.pools = Pools::new(pools);
        let handled: Vec<&Service> = services.to_vec();
        self.allocation = allocate_remembering(
            &self.pools,
            &handled,
            &namespace_labels(namespaces.iter().copied()),
            &self.allocation.assigned,
        );
        for problem in &self.allocation.problems {
            tracing::warn!(reason = %problem.reason, error = %problem, "address pools");
        }
        for allocated in &self.allocation.allocated {
            tracing::info!(service = %allocated.object.name.as_deref().unwrap_or_default(),
                namespace = %allocated.object.namespace.as_deref().unwrap_or_default(),
                "{}", allocated.message);
        }
    }

    /// Pool mode: the pools as last read, to learn which pool (and so
    /// which announcement) a Service address came from ([`Pools::pool_of`]).
    /// Has a file that may hold BGPPeers (or their Secrets) changed since
    /// the last call? True at first and after every full read.
    pub fn take_peers_stale(&mut self) -> bool {
        std::mem::take(&mut self.peers_stale)
    }

    pub fn pools(&self) -> &Pools {
        &self.pools
    }

    /// Pool mode: each Service's assigned addresses.
    pub fn allocation(&self) -> &Allocation {
        &self.allocation
    }

    /// Reads file `name` again. Unless `force`, a file whose text did not
    /// change is not parsed. What changed goes into `work`.
    fn refresh(&mut self, name: &Arc<OsStr>, force: bool, work: &mut Work) {
        let path = self.dir.join(&**name);
        let Some(format) = Format::of_file(&path) else {
            return;
        };
        let text = match read_manifest(&path) {
            Ok(text) => text,
            Err(error) => {
                if let Some(error) = error {
                    tracing::warn!(error = %error, "skipping malformed manifest");
                }
                None
            }
        };
        let new = match text {
            Some(text) => {
                let digest = text_digest(&text);
                let cached = self.cache.files.get(name).map(|file| file.digest);
                if !force && cached == Some(digest) {
                    return;
                }
                let (objects, errors) = parse(&path, format, &text);
                self.parses += 1;
                let peers = may_hold_peers(&text);
                drop(text);
                for e in &errors {
                    tracing::warn!(error = %e, "skipping malformed manifest");
                }
                Some((digest, peers, self.group(&path, objects)))
            }
            None => None,
        };
        let old = self.cache.files.remove(name);
        let old_digest = old.as_ref().map(|file| file.digest);
        let (old_groups, old_nodes, old_pools, old_namespaces, old_peers) = old
            .map(|file| {
                (
                    file.groups,
                    file.nodes,
                    file.pools,
                    file.namespaces,
                    file.peers,
                )
            })
            .unwrap_or_default();
        // A file that mentions peers now or did before, changed or gone (not
        // one only read again for another file's Service).
        if new.as_ref().map(|(digest, _, _)| *digest) != old_digest {
            self.peers_stale |= old_peers || new.as_ref().is_some_and(|(_, peers, _)| *peers);
        }
        let Some((digest, peers, parsed)) = new else {
            // Gone, or unreadable: its objects go.
            for key in old_groups.keys() {
                unindex(&mut self.cache.index, key, name);
                work.touched.insert(key.clone());
            }
            work.services_touched |= !old_groups.is_empty();
            work.nodes_changed |= !old_nodes.is_empty();
            work.pools_changed |= !old_pools.is_empty() || !old_namespaces.is_empty();
            work.parsed.remove(name);
            return;
        };
        let groups: HashMap<ServiceKey, (u64, u64)> = parsed
            .groups
            .iter()
            .map(|(key, group)| (key.clone(), group.digests()))
            .collect();
        for (key, digests) in &groups {
            match old_groups.get(key) {
                Some(before) if before == digests => {}
                before => {
                    if before.is_none() {
                        index(&mut self.cache.index, key, name);
                    }
                    work.touched.insert(key.clone());
                    work.services_touched |= before.map(|b| b.0) != Some(digests.0);
                }
            }
        }
        for key in old_groups.keys() {
            if !groups.contains_key(key) {
                unindex(&mut self.cache.index, key, name);
                work.touched.insert(key.clone());
                work.services_touched = true;
            }
        }
        if parsed.nodes != old_nodes {
            work.nodes_changed = true;
        }
        if parsed.pools != old_pools || parsed.namespaces != old_namespaces {
            work.pools_changed = true;
        }
        self.cache.files.insert(
            name.clone(),
            FileState {
                digest,
                groups,
                nodes: parsed.nodes.clone(),
                pools: parsed.pools.clone(),
                namespaces: parsed.namespaces.clone(),
                peers,
            },
        );
        work.parsed.insert(name.clone(), parsed);
    }

    /// A file's objects by Service: Services of classes xlb does not handle
    /// and slices that belong to no Service are left out, as a complete
    /// translation leaves them out.
    fn group(&self, path: &Path, objects: Objects) -> Parsed {
        let mut parsed = Parsed {
            nodes: objects.nodes,
            pools: objects.pools,
            namespaces: objects.namespaces,
            ..Parsed::default()
        };
        for service in objects.services {
            if !handles_class(&service, &self.scope.lb_classes) {
                continue;
            }
            if service.metadata.name.is_none() {
                tracing::warn!(file = %path.display(), "a Service without metadata.name; skipped");
                continue;
            }
            let key = ServiceKey::of(&service);
            parsed.groups.entry(key).or_default().services.push(service);
        }
        for slice in objects.endpoint_slices {
            if let Some(key) = slice_service(&slice) {
                parsed.groups.entry(key).or_default().slices.push(slice);
            }
        }
        parsed
    }

    fn unreadable_error(&mut self, error: DirectoryUnreadable) -> anyhow::Error {
        telemetry().source_read_errors.inc();
        self.unreadable = true;
        anyhow::Error::new(error)
            .context("the Services read before stay programmed until it reads again")
    }

    /// A directory put in place of the watched one (a volume mounted again,
    /// a restored copy) would otherwise never be watched.
    fn watch_again_if_replaced(&mut self) {
        let Ok(now) = identity(&self.dir) else {
            return;
        };
        if now == self.watched {
            return;
        }
        if self.watcher.is_none() {
            self.watched = now;
            return;
        }
        match watch_dir(&self.dir, self.changes.clone()) {
            Ok(watcher) => {
                tracing::info!(dir = %self.dir.display(), "the manifest directory was replaced; watching the new one");
                self.watcher = Some(watcher);
                self.watched = now;
            }
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "watching the replaced manifest directory failed")
            }
        }
    }
}

/// The text of the manifest file at `path`: `Ok(None)` when it is gone or
/// is not a file, `Err` (with what to report) when it cannot be read.
fn read_manifest(path: &Path) -> Result<Option<String>, Option<ManifestError>> {
    // fs::metadata follows symbolic links: the files of a mounted ConfigMap
    // are links into its `..data` directory.
    match fs::metadata(path) {
        Ok(metadata) if metadata.is_file() => {}
        Ok(_) => {
            tracing::debug!(file = %path.display(), "skipping manifest path that is not a file");
            return Ok(None);
        }
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(Some(whole_file_error(
                path,
                format!("cannot read file: {error}"),
            )));
        }
    }
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(None),
        Err(error) => Err(Some(whole_file_error(
            path,
            format!("cannot read file: {error}"),
        ))),
    }
}

fn index(index: &mut HashMap<ServiceKey, Vec<Arc<OsStr>>>, key: &ServiceKey, name: &Arc<OsStr>) {
    let files = index.entry(key.clone()).or_default();
    if let Err(at) = files.binary_search(name) {
        files.insert(at, name.clone());
    }
}

fn unindex(index: &mut HashMap<ServiceKey, Vec<Arc<OsStr>>>, key: &ServiceKey, name: &Arc<OsStr>) {
    if let Some(files) = index.get_mut(key) {
        files.retain(|file| file != name);
        if files.is_empty() {
            index.remove(key);
        }
    }
}

/// Service `key` as a complete translation would see it: its first
/// definition in claim order (created first, then read first) and all its
/// slices, in file order.
fn gather<'a>(
    index: &HashMap<ServiceKey, Vec<Arc<OsStr>>>,
    parsed: &'a BTreeMap<Arc<OsStr>, Parsed>,
    key: &ServiceKey,
) -> (Option<&'a Service>, Vec<&'a EndpointSlice>) {
    let mut service: Option<&Service> = None;
    let mut slices = Vec::new();
    for name in index.get(key).into_iter().flatten() {
        let Some(group) = parsed.get(name).and_then(|p| p.groups.get(key)) else {
            continue;
        };
        for candidate in &group.services {
            if service.is_none_or(|chosen| {
                candidate.metadata.creation_timestamp < chosen.metadata.creation_timestamp
            }) {
                service = Some(candidate);
            }
        }
        slices.extend(group.slices.iter());
    }
    (service, slices)
}

/// What one inotify event asks the source to do.
fn changes_of(dir: &Path, event: &notify::Event) -> Vec<Change> {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
    if event.need_rescan() {
        return vec![Change::All];
    }
    let writing = match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => false,
        // The agent's own reads: reacting to those would re-read forever.
        EventKind::Access(_) => return Vec::new(),
        EventKind::Create(_) | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) => true,
        EventKind::Modify(_) | EventKind::Remove(_) => false,
        EventKind::Any | EventKind::Other => return vec![Change::All],
    };
    let mut out = Vec::new();
    for path in &event.paths {
        let manifest = path != dir && Format::of_file(path).is_some();
        if !manifest {
            // The directory itself, a ConfigMap's `..data` swapped, a
            // temporary file: look at everything.
            out.push(Change::All);
        } else if writing {
            out.push(Change::Writing(path.clone()));
        } else {
            out.push(Change::File(path.clone()));
        }
    }
    if out.is_empty() {
        out.push(Change::All);
    }
    out
}

/// inotify on the manifest directory.
fn watch_dir(dir: &Path, tx: mpsc::UnboundedSender<Change>) -> Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    if !dir.is_dir() {
        bail!("manifest directory {} does not exist", dir.display());
    }
    let watched = dir.to_owned();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let changes = match event {
            Ok(event) => changes_of(&watched, &event),
            Err(_) => vec![Change::All],
        };
        for change in changes {
            let _ = tx.send(change);
        }
    })
    .context("creating the manifest watcher")?;
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    Ok(watcher)
}

#[cfg(test)]
mod tests;
