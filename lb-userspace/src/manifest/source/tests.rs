//! The manifest source's per-file path: what a change in one file reads and
//! re-translates, and that it always ends where a complete read ends.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use super::*;
use crate::{
    manifest::load_dir,
    model::Protocol,
    translate::{DEFAULT_LB_CLASS, translate},
};

/// xorshift: reproducible without a dependency.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "xlb-manifest-source-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("manifests")).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn scope(mode: AddressMode) -> Scope {
    Scope {
        node_name: "node-1".into(),
        lb_classes: vec![DEFAULT_LB_CLASS.into()],
        address_mode: mode,
    }
}

/// What one sync handed to the reconciler.
#[derive(Debug)]
enum Applied {
    Nothing,
    All(DesiredState),
    Changed(DesiredState, BTreeSet<Frontend>),
}

struct Harness {
    _temp: TempDir,
    dir: PathBuf,
    source: ManifestSource,
    scope: Scope,
}

impl Harness {
    fn new(mode: AddressMode) -> Self {
        let temp = TempDir::new();
        let dir = temp.0.join("manifests");
        let (tx, _rx) = mpsc::unbounded_channel();
        let source = ManifestSource::unwatched(&dir, scope(mode), tx).unwrap();
        Harness {
            _temp: temp,
            dir,
            source,
            scope: scope(mode),
        }
    }

    fn write(&self, name: &str, text: &str) {
        fs::write(self.dir.join(name), text).unwrap();
    }

    fn sync(&mut self, changes: Changes) -> Result<Applied> {
        let mut applied = Applied::Nothing;
        self.source.sync(changes, |desired, changed| {
            applied = match changed {
                None => Applied::All(desired.clone()),
                Some(changed) => Applied::Changed(desired.clone(), changed.clone()),
            };
            Ok(())
        })?;
        Ok(applied)
    }

    /// A sync of what inotify would name for `names`.
    fn sync_files(&mut self, names: &[&str]) -> Applied {
        let changes = Changes {
            files: names.iter().map(|name| self.dir.join(name)).collect(),
            ..Changes::default()
        };
        self.sync(changes).unwrap()
    }

    fn desired(&self) -> &DesiredState {
        self.source.translator.as_ref().unwrap().desired()
    }

    /// The directory read and translated from scratch.
    fn full(&self) -> DesiredState {
        full_translation(&self.dir, &self.scope)
    }
}

fn full_translation(dir: &Path, scope: &Scope) -> DesiredState {
    let (mut objects, _) = load_dir(dir).unwrap();
    objects.retain_classes(&scope.lb_classes);
    translate(&objects, &scope.node_name, scope.address_mode).0
}

fn service(name: &str, ip: u8, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: ns\n\
         spec:\n  type: LoadBalancer\n  ports:\n  - name: a\n    port: {port}\n    \
         targetPort: 8080\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 192.0.2.{ip}\n---\n"
    )
}

fn slice(service: &str, suffix: &str, addresses: &[&str]) -> String {
    let endpoints: String = if addresses.is_empty() {
        "endpoints: []\n".into()
    } else {
        let lines: String = addresses
            .iter()
            .map(|a| format!("- addresses: [\"{a}\"]\n  nodeName: node-2\n  conditions: {{}}\n"))
            .collect();
        format!("endpoints:\n{lines}")
    };
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
         name: {service}-{suffix}\n  namespace: ns\n  labels:\n    \
         kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n- name: a\n  \
         port: 8080\n  protocol: TCP\n{endpoints}---\n"
    )
}

const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-1\nstatus:\n  \
                    addresses:\n  - type: InternalIP\n    address: 10.0.0.1\n---\n";

fn tcp(ip: u8, port: u16) -> Frontend {
    Frontend {
        addr: std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, ip)),
        port,
        protocol: Protocol::Tcp,
    }
}

/// Two files: `a.yaml` with s0 and s1, `b.yaml` with s2, read once.
fn two_files() -> Harness {
    let mut h = Harness::new(AddressMode::Status);
    h.write(
        "a.yaml",
        &(service("s0", 1, 80)
            + &slice("s0", "x", &["10.1.0.1"])
            + &service("s1", 1, 81)
            + &slice("s1", "x", &["10.1.1.1"])),
    );
    h.write(
        "b.yaml",
        &(service("s2", 1, 82) + &slice("s2", "x", &["10.1.2.1"])),
    );
    assert!(matches!(
        h.sync(Changes::everything()).unwrap(),
        Applied::All(_)
    ));
    assert_eq!(h.source.parses, 2);
    assert_eq!(h.desired().frontends.len(), 3);
    h
}

#[test]
fn a_change_in_one_file_reads_that_file_and_retranslates_only_its_services() {
    let mut h = two_files();
    h.write(
        "b.yaml",
        &(service("s2", 1, 82) + &slice("s2", "x", &["10.1.2.1", "10.1.2.2"])),
    );
    let Applied::Changed(state, changed) = h.sync_files(&["b.yaml"]) else {
        panic!("not applied as a change")
    };
    assert_eq!(h.source.parses, 3, "only b.yaml parsed");
    assert_eq!(changed, BTreeSet::from([tcp(1, 82)]));
    assert_eq!(state.frontends[&tcp(1, 82)].backends.len(), 2);
    assert_eq!(state, h.full());

    // The same text written again: read, not parsed, nothing applied.
    h.write(
        "b.yaml",
        &(service("s2", 1, 82) + &slice("s2", "x", &["10.1.2.1", "10.1.2.2"])),
    );
    assert!(matches!(h.sync_files(&["b.yaml"]), Applied::Nothing));
    assert_eq!(h.source.parses, 3);

    // One Service of a file of two changed: only its frontend.
    h.write(
        "a.yaml",
        &(service("s0", 1, 80)
            + &slice("s0", "x", &["10.1.0.1"])
            + &service("s1", 1, 81)
            + &slice("s1", "x", &[])),
    );
    let Applied::Changed(state, changed) = h.sync_files(&["a.yaml"]) else {
        panic!("not applied as a change")
    };
    assert_eq!(changed, BTreeSet::from([tcp(1, 81)]));
    assert_eq!(state, h.full());
}

/// The BGP speaker reads the directory's peers again only when a file that
/// may hold one (or its password's Secret) changed or went: not for a
/// Service's change among thousands.
#[test]
fn peers_are_read_again_only_when_a_file_that_may_hold_them_changes() {
    let mut h = two_files();
    assert!(h.source.take_peers_stale(), "the first read");
    assert!(!h.source.take_peers_stale(), "taken");
    h.write(
        "b.yaml",
        &(service("s2", 1, 82) + &slice("s2", "x", &["10.1.2.9"])),
    );
    h.sync_files(&["b.yaml"]);
    assert!(!h.source.take_peers_stale(), "a Service's change");

    let peer = "apiVersion: xlb.dev/v1alpha1\nkind: BGPPeer\nmetadata:\n  name: r\n";
    h.write("peers.yaml", peer);
    h.sync_files(&["peers.yaml"]);
    assert!(h.source.take_peers_stale(), "a BGPPeer written");
    h.write("peers.yaml", peer);
    h.sync_files(&["peers.yaml"]);
    assert!(!h.source.take_peers_stale(), "the same text again");
    let secret = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: k\n---\n";
    h.write("secret.yaml", secret);
    h.sync_files(&["secret.yaml"]);
    assert!(h.source.take_peers_stale(), "a Secret written");
    // A file that mentions one, read again (unchanged) for its Service's
    // slice in another file, does not count.
    h.write(
        "a.yaml",
        &(secret.to_string() + &service("s0", 1, 80) + &slice("s0", "x", &["10.1.0.1"])),
    );
    h.sync_files(&["a.yaml"]);
    assert!(h.source.take_peers_stale(), "a Secret added to a file");
    h.write("c.yaml", &slice("s0", "y", &["10.1.0.9"]));
    let parses = h.source.parses;
    h.sync_files(&["c.yaml"]);
    assert_eq!(h.source.parses, parses + 2, "a.yaml read again for s0");
    assert!(
        !h.source.take_peers_stale(),
        "nothing that may hold peers changed"
    );
    // Its peer taken out of a file: the file mentioned one before.
    h.write("peers.yaml", &service("s9", 9, 90));
    h.sync_files(&["peers.yaml"]);
    assert!(
        h.source.take_peers_stale(),
        "a BGPPeer removed from its file"
    );
    fs::remove_file(h.dir.join("secret.yaml")).unwrap();
    h.sync_files(&["secret.yaml"]);
    assert!(h.source.take_peers_stale(), "a Secret's file removed");
    h.sync(Changes::everything()).unwrap();
    assert!(h.source.take_peers_stale(), "a complete read");
}

#[test]
fn a_slice_in_another_file_joins_its_service() {
    let mut h = two_files();
    h.write("c.yaml", &slice("s0", "y", &["10.1.0.9"]));
    let Applied::Changed(state, changed) = h.sync_files(&["c.yaml"]) else {
        panic!("not applied as a change")
    };
    assert_eq!(changed, BTreeSet::from([tcp(1, 80)]));
    assert_eq!(state.frontends[&tcp(1, 80)].backends.len(), 2);
    assert_eq!(state, h.full());
    // a.yaml was parsed again for s0's Service; b.yaml was not.
    assert_eq!(h.source.parses, 4);
}

#[test]
fn a_removed_file_withdraws_its_objects_and_only_those() {
    let mut h = two_files();
    fs::remove_file(h.dir.join("b.yaml")).unwrap();
    let Applied::Changed(state, changed) = h.sync_files(&["b.yaml"]) else {
        panic!("not applied as a change")
    };
    assert_eq!(changed, BTreeSet::from([tcp(1, 82)]));
    assert_eq!(state.frontends.len(), 2);
    assert_eq!(state, h.full());
}

#[test]
fn renames_and_write_then_rename_keep_what_the_files_say() {
    let mut h = two_files();
    // A plain rename: same objects, nothing changes.
    fs::rename(h.dir.join("b.yaml"), h.dir.join("c.yaml")).unwrap();
    assert!(matches!(
        h.sync_files(&["b.yaml", "c.yaml"]),
        Applied::Nothing
    ));
    assert_eq!(h.desired(), &h.full());
    // An editor's save: a temporary name (ignored), renamed over the file.
    fs::write(
        h.dir.join(".c.yaml.tmp"),
        service("s2", 2, 82) + &slice("s2", "x", &["10.1.2.1"]),
    )
    .unwrap();
    fs::rename(h.dir.join(".c.yaml.tmp"), h.dir.join("c.yaml")).unwrap();
    let Applied::Changed(state, changed) = h.sync_files(&["c.yaml"]) else {
        panic!("not applied as a change")
    };
    assert_eq!(changed, BTreeSet::from([tcp(1, 82), tcp(2, 82)]));
    assert_eq!(state, h.full());
    // Renamed to a name the loader skips: withdrawn.
    fs::rename(h.dir.join("c.yaml"), h.dir.join("c.yaml.bak")).unwrap();
    let Applied::Changed(state, _) = h.sync_files(&["c.yaml"]) else {
        panic!("not applied as a change")
    };
    assert_eq!(state.frontends.len(), 2);
    assert_eq!(state, h.full());
}

#[test]
fn a_malformed_file_skips_its_bad_document_and_fixed_again_comes_back() {
    let mut h = two_files();
    let good_b = service("s2", 1, 82) + &slice("s2", "x", &["10.1.2.1"]);
    h.write("b.yaml", "kind: Service\nmetadata: [unclosed\n");
    let Applied::Changed(state, changed) = h.sync_files(&["b.yaml"]) else {
        panic!("not applied as a change")
    };
    assert_eq!(changed, BTreeSet::from([tcp(1, 82)]));
    assert_eq!(state.frontends.len(), 2, "a.yaml's Services stay");
    assert_eq!(state, h.full());
    h.write("b.yaml", &good_b);
    let Applied::Changed(state, changed) = h.sync_files(&["b.yaml"]) else {
        panic!("not applied as a change")
    };
    assert_eq!(changed, BTreeSet::from([tcp(1, 82)]));
    assert_eq!(state.frontends.len(), 3);
    assert_eq!(state, h.full());
}

#[test]
fn an_unreadable_directory_withdraws_nothing() {
    let mut h = two_files();
    let before = h.desired().clone();
    let away = h.dir.with_file_name("away");
    fs::rename(&h.dir, &away).unwrap();
    fs::remove_file(away.join("b.yaml")).unwrap();
    let changes = Changes {
        files: BTreeSet::from([h.dir.join("b.yaml")]),
        ..Changes::default()
    };
    assert!(h.sync(changes).is_err(), "a directory gone is no empty one");
    assert_eq!(h.desired(), &before);
    // Back (a new directory): a complete read, the retry.
    fs::rename(&away, &h.dir).unwrap();
    let Applied::All(state) = h.sync(Changes::everything()).unwrap() else {
        panic!("not applied in full")
    };
    assert_eq!(state.frontends.len(), 2);
    assert_eq!(state, h.full());
}

/// Random file operations (rewrites with Services and slices spread over
/// files and defined twice, removals, renames, editors' temporary files,
/// malformed documents, Node changes), each synced as inotify would name
/// them: the state always equals a complete read and translation of the
/// directory, and the frontends reported changed are exactly those whose
/// spec changed.
fn per_file_equals_full(mode: AddressMode, seed: u64) {
    let mut rng = Rng(seed);
    let mut h = Harness::new(mode);
    h.write("node.yaml", NODE);
    h.sync(Changes::everything()).unwrap();
    let files = ["f0.yaml", "f1.yaml", "f2.yaml", "f3.json"];
    let random_docs = |rng: &mut Rng, json: bool| -> String {
        if json {
            // A JSON file holds one object: a List of them.
            return format!(
                "{{\"kind\": \"List\", \"apiVersion\": \"v1\", \"items\": [{{\"apiVersion\": \
                 \"discovery.k8s.io/v1\", \"kind\": \"EndpointSlice\", \"metadata\": \
                 {{\"name\": \"s{n}-j\", \"namespace\": \"ns\", \"labels\": \
                 {{\"kubernetes.io/service-name\": \"s{n}\"}}}}, \"addressType\": \"IPv4\", \
                 \"ports\": [{{\"name\": \"a\", \"port\": 8080, \"protocol\": \"TCP\"}}], \
                 \"endpoints\": [{{\"addresses\": [\"10.9.0.{e}\"], \"conditions\": {{}}}}]}}]}}",
                n = rng.below(6),
                e = 1 + rng.below(3)
            );
        }
        let mut text = String::new();
        for _ in 0..rng.below(4) {
            let name = format!("s{}", rng.below(6));
            match rng.below(5) {
                0 | 1 => {
                    let mut doc = service(&name, 1 + rng.below(2) as u8, 80 + rng.below(2) as u16);
                    if rng.below(3) == 0 {
                        doc = doc.replacen(
                            "namespace: ns\n",
                            &format!(
                                "namespace: ns\n  creationTimestamp: \"2026-01-01T00:0{}:00Z\"\n",
                                rng.below(3)
                            ),
                            1,
                        );
                    }
                    if rng.below(8) == 0 {
                        doc = doc.replacen(
                            "  type: LoadBalancer\n",
                            "  type: LoadBalancer\n  loadBalancerClass: other\n",
                            1,
                        );
                    }
                    text += &doc;
                }
                2 => text += "kind: Service\nmetadata: [unclosed\n---\n",
                _ => {
                    let addresses: Vec<String> = (0..rng.below(3))
                        .map(|i| format!("10.1.{}.{}", rng.below(3), i + 1))
                        .collect();
                    let addresses: Vec<&str> = addresses.iter().map(String::as_str).collect();
                    let suffix = if rng.below(2) == 0 { "x" } else { "y" };
                    text += &slice(&name, suffix, &addresses);
                }
            }
        }
        text
    };
    for step in 0..300 {
        let before = h.desired().clone();
        let file = files[rng.below(files.len() as u64) as usize];
        let mut named = vec![file.to_owned()];
        let mut all = false;
        match rng.below(10) {
            0 => {
                let _ = fs::remove_file(h.dir.join(file));
            }
            1 => {
                let to = files[rng.below(3) as usize];
                if fs::rename(h.dir.join(file), h.dir.join(to)).is_ok() {
                    named.push(to.to_owned());
                }
            }
            2 => {
                // Write to a temporary name, rename into place.
                let tmp = h.dir.join(format!(".{file}.tmp"));
                fs::write(&tmp, random_docs(&mut rng, file.ends_with(".json"))).unwrap();
                fs::rename(tmp, h.dir.join(file)).unwrap();
            }
            3 if rng.below(3) == 0 => {
                let address = 1 + rng.below(2);
                h.write(
                    "node.yaml",
                    &NODE.replace("10.0.0.1", &format!("10.0.0.{address}")),
                );
                named = vec!["node.yaml".into()];
            }
            4 if rng.below(2) == 0 => {
                // An event that names no file (a ConfigMap's `..data`):
                // everything is read.
                h.write(file, &random_docs(&mut rng, file.ends_with(".json")));
                all = true;
            }
            _ => h.write(file, &random_docs(&mut rng, file.ends_with(".json"))),
        }
        let changes = if all {
            Changes::everything()
        } else {
            Changes {
                files: named.iter().map(|name| h.dir.join(name)).collect(),
                ..Changes::default()
            }
        };
        let applied = h.sync(changes).unwrap();
        let full = h.full();
        assert_eq!(h.desired(), &full, "step {step} ({mode:?}, seed {seed})");
        match applied {
            Applied::Nothing => {
                assert_eq!(before, full, "step {step} ({mode:?}, seed {seed})")
            }
            Applied::All(state) => assert_eq!(state, full),
            Applied::Changed(state, changed) => {
                assert_eq!(state, full);
                let differing: BTreeSet<Frontend> = before
                    .frontends
                    .keys()
                    .chain(full.frontends.keys())
                    .filter(|f| before.frontends.get(f) != full.frontends.get(f))
                    .copied()
                    .collect();
                assert_eq!(changed, differing, "step {step} ({mode:?}, seed {seed})");
            }
        }
    }
}

#[test]
fn per_file_updates_equal_a_complete_read_in_status_mode() {
    for seed in [1, 7, 1234567] {
        per_file_equals_full(AddressMode::Status, seed);
    }
}

#[test]
fn per_file_updates_equal_a_complete_read_in_node_mode() {
    for seed in [3, 99, 7654321] {
        per_file_equals_full(AddressMode::Node, seed);
    }
}

#[test]
fn inotify_events_name_the_files_to_read() {
    use notify::event::{
        AccessKind, AccessMode, CreateKind, DataChange, EventKind, ModifyKind, RemoveKind,
        RenameMode,
    };
    let dir = Path::new("/m");
    let event = |kind, paths: &[&str]| notify::Event {
        kind,
        paths: paths.iter().map(PathBuf::from).collect(),
        attrs: Default::default(),
    };
    let file = |p: &str| Change::File(PathBuf::from(p));
    let writing = |p: &str| Change::Writing(PathBuf::from(p));
    assert_eq!(
        changes_of(
            dir,
            &event(
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                &["/m/a.yaml"]
            )
        ),
        [file("/m/a.yaml")]
    );
    assert_eq!(
        changes_of(
            dir,
            &event(
                EventKind::Modify(ModifyKind::Data(DataChange::Any)),
                &["/m/a.yaml"]
            )
        ),
        [writing("/m/a.yaml")]
    );
    assert_eq!(
        changes_of(
            dir,
            &event(EventKind::Create(CreateKind::File), &["/m/a.yaml"])
        ),
        [writing("/m/a.yaml")]
    );
    assert_eq!(
        changes_of(
            dir,
            &event(
                EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
                &["/m/a.yaml", "/m/b.json"]
            )
        ),
        [file("/m/a.yaml"), file("/m/b.json")]
    );
    assert_eq!(
        changes_of(
            dir,
            &event(EventKind::Remove(RemoveKind::File), &["/m/a.yaml"])
        ),
        [file("/m/a.yaml")]
    );
    // The agent's own reads.
    assert!(
        changes_of(
            dir,
            &event(
                EventKind::Access(AccessKind::Open(AccessMode::Any)),
                &["/m/a.yaml"]
            )
        )
        .is_empty()
    );
    // A ConfigMap's data swapped, the directory itself: everything.
    assert_eq!(
        changes_of(
            dir,
            &event(
                EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                &["/m/..data"]
            )
        ),
        [Change::All]
    );
    assert_eq!(
        changes_of(dir, &event(EventKind::Remove(RemoveKind::Folder), &["/m"])),
        [Change::All]
    );
}

/// A Service that asks for an address (no status), for pool mode.
fn pool_service(name: &str, port: u16, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: ns\n{extra}\
         spec:\n  type: LoadBalancer\n  ports:\n  - name: a\n    port: {port}\n    \
         targetPort: 8080\n---\n"
    )
}

fn address_pool(name: &str, addresses: &str) -> String {
    format!(
        "apiVersion: xlb.dev/v1alpha1\nkind: AddressPool\nmetadata:\n  name: {name}\n\
         spec:\n  addresses: [{addresses}]\n---\n"
    )
}

fn frontends(state: &DesiredState) -> Vec<String> {
    state
        .frontends
        .iter()
        .map(|(frontend, spec)| format!("{frontend} {}", spec.service.name))
        .collect()
}

#[test]
fn pool_mode_assigns_from_the_directorys_pools_and_keeps_assignments_across_changes() {
    let mut h = Harness::new(AddressMode::Pool);
    h.write("pool.yaml", &address_pool("lab", "'192.0.2.1-192.0.2.3'"));
    h.write(
        "svc.yaml",
        &(pool_service("b", 80, "") + &pool_service("c", 81, "") + &slice("b", "x", &["10.1.0.1"])),
    );
    h.sync(Changes::everything()).unwrap();
    assert_eq!(
        frontends(h.desired()),
        ["192.0.2.1:80/TCP b", "192.0.2.2:81/TCP c"]
    );
    // A Service that sorts first arrives: it takes the free address, nobody
    // moves.
    h.write("a.yaml", &pool_service("a", 82, ""));
    h.sync_files(&["a.yaml"]);
    assert_eq!(
        frontends(h.desired()),
        [
            "192.0.2.1:80/TCP b",
            "192.0.2.2:81/TCP c",
            "192.0.2.3:82/TCP a"
        ]
    );
    // Exhausted: a fourth Service gets nothing, and only it.
    h.write("d.yaml", &pool_service("d", 83, ""));
    h.sync_files(&["d.yaml"]);
    assert_eq!(h.desired().frontends.len(), 3);
    assert_eq!(h.source.allocation().problems.len(), 1);
    // b leaves: d takes its address; an address-family shrink of the pool
    // moves c only.
    h.write("svc.yaml", &pool_service("c", 81, ""));
    h.sync_files(&["svc.yaml"]);
    assert_eq!(
        frontends(h.desired()),
        [
            "192.0.2.1:83/TCP d",
            "192.0.2.2:81/TCP c",
            "192.0.2.3:82/TCP a"
        ]
    );
    h.write(
        "pool.yaml",
        &(address_pool("lab", "'192.0.2.1/32', '192.0.2.3/32'")
            + &address_pool("more", "'192.0.2.9/32'")),
    );
    h.sync_files(&["pool.yaml"]);
    assert_eq!(
        frontends(h.desired()),
        [
            "192.0.2.1:83/TCP d",
            "192.0.2.3:82/TCP a",
            "192.0.2.9:81/TCP c"
        ]
    );
    assert_eq!(
        h.source
            .pools()
            .pool_of("192.0.2.9".parse().unwrap())
            .map(|p| p.name.as_str()),
        Some("more")
    );
    // A malformed pool is skipped with the rest of the directory intact.
    h.write("bad.yaml", "apiVersion: xlb.dev/v1alpha1\nkind: AddressPool\nmetadata:\n  name: bad\nspec:\n  addresses: 7\n");
    h.sync_files(&["bad.yaml"]);
    assert_eq!(h.desired().frontends.len(), 3);
}
