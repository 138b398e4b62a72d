//! The `BGPPeer` resource (`xlb.dev/v1alpha1`): one router a node opens a
//! session to, and how. Read from the manifest directory, or with `--bgp`
//! from the Kubernetes API (the agent's namespace); its CRD is
//! generated from this type (`xlb crd`, `deploy/crds.yaml`).

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::Duration,
};

use k8s_openapi::api::core::v1::Secret;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::manifest::parse::{Format, list_dir, split_yaml_documents, yaml_error};

pub const API_VERSION: &str = "xlb.dev/v1alpha1";
pub const KIND: &str = "BGPPeer";

/// RFC 4271 §4.2: a hold time is 0 (no keepalives) or at least 3 seconds.
const MIN_HOLD_TIME: u16 = 3;
const DEFAULT_HOLD_TIME: u16 = 90;
/// How long the router keeps this node's routes while its agent restarts
/// (RFC 4724 Restart Time, 12 bits).
const DEFAULT_RESTART_TIME: u16 = 120;
const MAX_RESTART_TIME: u16 = 4095;

/// A BGP router this node announces Service addresses to.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "xlb.dev",
    version = "v1alpha1",
    kind = "BGPPeer",
    plural = "bgppeers",
    shortname = "bgpp",
    namespaced
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BGPPeerSpec {
    /// The router's address.
    pub peer_address: IpAddr,
    /// The router's AS number (4-octet ASNs allowed).
    #[serde(rename = "peerASN", alias = "peerAsn")]
    pub peer_asn: u32,
    /// This node's AS number; equal to `peerASN` for iBGP.
    #[serde(rename = "localASN", alias = "localAsn")]
    pub local_asn: u32,
    /// The router's TCP port (179).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_port: Option<u16>,
    /// Address the session's TCP connection is opened from; by default the
    /// kernel's choice for the route to the peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_address: Option<IpAddr>,
    /// TCP source port; by default an ephemeral one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_port: Option<u16>,
    /// Hold time offered in OPEN, seconds (0, or at least 3; default 90).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_time: Option<u16>,
    /// Seconds between KEEPALIVEs; by default a third of the negotiated
    /// hold time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_time: Option<u16>,
    /// Graceful restart (RFC 4724) restart time, seconds (default 120): how
    /// long the router keeps this node's routes while its agent restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graceful_restart_time: Option<u16>,
    /// TTL of the session's packets for a peer more than one hop away; by
    /// default 1 for eBGP (directly connected) and 64 for iBGP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ebgp_multihop: Option<u8>,
    /// BGP identifier; by default the node's IPv4 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_id: Option<Ipv4Addr>,
    /// Labels the node must have (`matchLabels`); by default every node
    /// peers. With the manifest source a node's only label is
    /// `kubernetes.io/hostname`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// TCP MD5 signature (RFC 2385) key, from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret: Option<SecretKeyRef>,
}

/// A key of a Secret in the BGPPeer's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    pub name: String,
    pub key: String,
}

/// The BGPPeer CustomResourceDefinition (in deploy/crds.yaml).
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&BGPPeer::crd())
}

/// One peer as a session needs it: checked, defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    /// `namespace/name` of the BGPPeer, for logs, metrics and inspect.
    pub name: String,
    pub peer_address: IpAddr,
    pub peer_port: u16,
    pub peer_asn: u32,
    pub local_asn: u32,
    pub source_address: Option<IpAddr>,
    pub source_port: Option<u16>,
    pub hold_time: u16,
    /// `None`: a third of the negotiated hold time.
    pub keepalive_time: Option<u16>,
    pub restart_time: u16,
    pub ttl: u8,
    pub router_id: Option<Ipv4Addr>,
    /// The TCP MD5 signature key (RFC 2385), from `passwordSecret`.
    pub password: Option<Password>,
}

/// The longest TCP MD5 key Linux takes (`TCP_MD5SIG_MAXKEYLEN`).
pub const MAX_PASSWORD_LEN: usize = 80;

/// A TCP MD5 signature key: compared (a changed key restarts the session)
/// but never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(Vec<u8>);

impl Password {
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// Reads a key of a Secret: (namespace, name, key) → its bytes, or why not.
pub type SecretLookup<'a> = dyn Fn(&str, &str, &str) -> Result<Vec<u8>, String> + 'a;

impl PeerConfig {
    pub fn is_ebgp(&self) -> bool {
        self.peer_asn != self.local_asn
    }

    /// Seconds between KEEPALIVEs for a negotiated hold time (RFC 4271
    /// §10: a third of it; none when it is 0).
    pub fn keepalive_interval(&self, hold_time: u16) -> Option<Duration> {
        if hold_time == 0 {
            return None;
        }
        let seconds = self
            .keepalive_time
            .unwrap_or(hold_time / 3)
            .clamp(1, hold_time);
        Some(Duration::from_secs(u64::from(seconds)))
    }
}

impl fmt::Display for PeerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.peer_address)
    }
}

/// Why a BGPPeer was skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerProblem {
    /// File and document, or `namespace/name`.
    pub object: String,
    pub reason: String,
}

impl fmt::Display for PeerProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}

/// Checks a BGPPeer and fills its defaults. `None` when it does not select
/// this node (`labels` are the node's). `secrets` reads its
/// `passwordSecret` (a Secret in the BGPPeer's namespace).
pub fn peer_config(
    peer: &BGPPeer,
    labels: &BTreeMap<String, String>,
    secrets: &SecretLookup,
) -> Result<Option<PeerConfig>, String> {
    let spec = &peer.spec;
    if let Some(selector) = &spec.node_selector
        && !selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    {
        return Ok(None);
    }
    if spec.peer_asn == 0 || spec.local_asn == 0 {
        return Err("peerASN and localASN must not be 0".into());
    }
    let hold_time = spec.hold_time.unwrap_or(DEFAULT_HOLD_TIME);
    if hold_time != 0 && hold_time < MIN_HOLD_TIME {
        return Err(format!(
            "holdTime {hold_time} is neither 0 nor at least {MIN_HOLD_TIME} s (RFC 4271)"
        ));
    }
    if let Some(keepalive) = spec.keepalive_time
        && hold_time != 0
        && (keepalive == 0 || keepalive >= hold_time)
    {
        return Err(format!(
            "keepaliveTime {keepalive} must be between 1 and holdTime {hold_time} (exclusive)"
        ));
    }
    let restart_time = spec.graceful_restart_time.unwrap_or(DEFAULT_RESTART_TIME);
    if restart_time > MAX_RESTART_TIME {
        return Err(format!(
            "gracefulRestartTime {restart_time} is over {MAX_RESTART_TIME} s (RFC 4724)"
        ));
    }
    if let Some(source) = spec.source_address
        && source.is_ipv4() != spec.peer_address.is_ipv4()
    {
        return Err(format!(
            "sourceAddress {source} and peerAddress {} are of different families",
            spec.peer_address
        ));
    }
    // A key that cannot be read is an error, not a session without one: a
    // router expecting signatures drops every unsigned segment, and the
    // session would fail with nothing said.
    let password = match &spec.password_secret {
        None => None,
        Some(secret) => {
            let namespace = peer.metadata.namespace.as_deref().unwrap_or("default");
            let key = secrets(namespace, &secret.name, &secret.key).map_err(|why| {
                format!(
                    "passwordSecret {namespace}/{} key {}: {why}",
                    secret.name, secret.key
                )
            })?;
            if key.is_empty() || key.len() > MAX_PASSWORD_LEN {
                return Err(format!(
                    "passwordSecret {namespace}/{} key {}: a TCP MD5 key is 1 to \
                     {MAX_PASSWORD_LEN} bytes, this one {}",
                    secret.name,
                    secret.key,
                    key.len()
                ));
            }
            Some(Password(key))
        }
    };
    let ebgp = spec.peer_asn != spec.local_asn;
    let ttl = match spec.ebgp_multihop {
        Some(0) => return Err("ebgpMultihop must be at least 1".into()),
        Some(ttl) => ttl,
        None if ebgp => 1,
        None => 64,
    };
    Ok(Some(PeerConfig {
        name: format!(
            "{}/{}",
            peer.metadata.namespace.as_deref().unwrap_or("default"),
            peer.metadata.name.as_deref().unwrap_or("")
        ),
        peer_address: spec.peer_address,
        peer_port: spec.peer_port.unwrap_or(179),
        peer_asn: spec.peer_asn,
        local_asn: spec.local_asn,
        source_address: spec.source_address,
        source_port: spec.source_port,
        hold_time,
        keepalive_time: spec.keepalive_time,
        restart_time,
        ttl,
        router_id: spec.router_id,
        password,
    }))
}

/// The BGPPeers of this node in a manifest directory, and the problems of
/// those that were skipped. Other kinds are left to the manifest source.
pub fn load_dir(
    dir: &Path,
    labels: &BTreeMap<String, String>,
) -> (Vec<PeerConfig>, Vec<PeerProblem>) {
    let mut peers = Vec::new();
    let mut problems = Vec::new();
    let files = match list_dir(dir) {
        Ok(files) => files,
        Err(error) => {
            problems.push(PeerProblem {
                object: dir.display().to_string(),
                reason: error.to_string(),
            });
            return (peers, problems);
        }
    };
    let mut parsed = Vec::new();
    let mut secret_files = Vec::new();
    for (path, format) in files {
        let Ok(text) = std::fs::read_to_string(&path) else {
            // The manifest source reports unreadable files.
            continue;
        };
        if text.contains("Secret") {
            secret_files.push((path.clone(), format, text.clone()));
        }
        for (document, value) in documents(&path, format, &text, &mut problems) {
            let object = format!("{} document {document}", path.display());
            if value.get("kind").and_then(|k| k.as_str()) != Some(KIND) {
                continue;
            }
            if value.get("apiVersion").and_then(|v| v.as_str()) != Some(API_VERSION) {
                problems.push(PeerProblem {
                    object,
                    reason: format!("a {KIND} must have apiVersion {API_VERSION}"),
                });
                continue;
            }
            let peer = match serde_yaml::from_value::<BGPPeer>(value) {
                Ok(peer) => peer,
                Err(error) => {
                    problems.push(PeerProblem {
                        object,
                        reason: error.to_string(),
                    });
                    continue;
                }
            };
            parsed.push((object, peer));
        }
    }
    // Secrets are read only when a peer names one, and only from files
    // that mention one.
    let secrets = if parsed
        .iter()
        .any(|(_, peer)| peer.spec.password_secret.is_some())
    {
        secrets_in(&secret_files)
    } else {
        BTreeMap::new()
    };
    let lookup = |namespace: &str, name: &str, key: &str| {
        secret_key(secrets.get(&(namespace.to_string(), name.to_string())), key)
    };
    for (object, peer) in parsed {
        match peer_config(&peer, labels, &lookup) {
            Ok(Some(config)) => add_unique(&mut peers, config, &mut problems),
            Ok(None) => {}
            Err(reason) => problems.push(PeerProblem { object, reason }),
        }
    }
    (peers, problems)
}

/// The value of `key` in `secret` (`data`, base64 in the object, or
/// `stringData`), or why there is none.
pub fn secret_key(secret: Option<&Secret>, key: &str) -> Result<Vec<u8>, String> {
    let secret = secret.ok_or("no such Secret")?;
    if let Some(value) = secret.data.as_ref().and_then(|data| data.get(key)) {
        return Ok(value.0.clone());
    }
    if let Some(value) = secret.string_data.as_ref().and_then(|data| data.get(key)) {
        return Ok(value.clone().into_bytes());
    }
    Err("the Secret has no such key".into())
}

/// The `v1` Secrets of manifest files, by (namespace, name); documents
/// that do not parse are left out (a peer naming one is then refused).
fn secrets_in(
    files: &[(std::path::PathBuf, Format, String)],
) -> BTreeMap<(String, String), Secret> {
    let mut secrets = BTreeMap::new();
    for (path, format, text) in files {
        let values: Vec<serde_yaml::Value> = match format {
            Format::Yaml => split_yaml_documents(text.strip_prefix('\u{feff}').unwrap_or(text))
                .into_iter()
                .filter(|document| document.text.contains("Secret"))
                .filter_map(|document| serde_yaml::from_str(&document.text).ok())
                .collect(),
            Format::Json => serde_json::from_str::<serde_yaml::Value>(text)
                .ok()
                .into_iter()
                .collect(),
        };
        for value in values {
            if value.get("kind").and_then(|k| k.as_str()) != Some("Secret")
                || value.get("apiVersion").and_then(|v| v.as_str()) != Some("v1")
            {
                continue;
            }
            match serde_yaml::from_value::<Secret>(value) {
                Ok(secret) => {
                    let namespace = secret
                        .metadata
                        .namespace
                        .clone()
                        .unwrap_or_else(|| "default".into());
                    let name = secret.metadata.name.clone().unwrap_or_default();
                    secrets.insert((namespace, name), secret);
                }
                Err(error) => {
                    tracing::warn!(file = %path.display(), error = %error, "a Secret that does not parse");
                }
            }
        }
    }
    secrets
}

/// Adds `config` to `peers`, unless an earlier BGPPeer already peers with
/// the same router (address and port): then it is a problem.
pub fn add_unique(
    peers: &mut Vec<PeerConfig>,
    config: PeerConfig,
    problems: &mut Vec<PeerProblem>,
) {
    if peers
        .iter()
        .any(|p| p.peer_address == config.peer_address && p.peer_port == config.peer_port)
    {
        problems.push(PeerProblem {
            object: config.name.clone(),
            reason: format!("another BGPPeer already peers with {}", config.peer_address),
        });
    } else {
        peers.push(config);
    }
}

/// The documents of a manifest file as YAML values, with their numbers.
fn documents(
    path: &Path,
    format: Format,
    text: &str,
    problems: &mut Vec<PeerProblem>,
) -> Vec<(usize, serde_yaml::Value)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    // Read when a file that may hold peers changed (the manifest source
    // tells): only documents that can be a BGPPeer are parsed (a file of
    // thousands of Services costs a substring search).
    if !text.contains(KIND) {
        return Vec::new();
    }
    match format {
        Format::Yaml => split_yaml_documents(text)
            .into_iter()
            .filter(|document| document.text.contains(KIND))
            .filter_map(|document| {
                // Only documents that parse; the manifest source reports
                // the others.
                match serde_yaml::from_str::<serde_yaml::Value>(&document.text) {
                    Ok(value) => Some((document.number, value)),
                    Err(error) => {
                        if document.text.contains(KIND) {
                            problems.push(PeerProblem {
                                object: format!("{} document {}", path.display(), document.number),
                                reason: format!(
                                    "invalid YAML: {}",
                                    yaml_error(&error, document.lines_before)
                                ),
                            });
                        }
                        None
                    }
                }
            })
            .collect(),
        Format::Json => match serde_json::from_str::<serde_yaml::Value>(text) {
            Ok(value) => vec![(1, value)],
            Err(error) => {
                if text.contains(KIND) {
                    problems.push(PeerProblem {
                        object: path.display().to_string(),
                        reason: format!("invalid JSON: {error}"),
                    });
                }
                Vec::new()
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    fn node(name: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("kubernetes.io/hostname".to_string(), name.to_string())])
    }

    #[test]
    fn peers_are_read_with_defaults_and_bad_ones_reported() {
        let dir = tempdir();
        write(
            &dir,
            "peers.yaml",
            "apiVersion: xlb.dev/v1alpha1\nkind: BGPPeer\nmetadata:\n  name: tor\n  namespace: xlb\n\
             spec:\n  peerAddress: 10.0.0.1\n  peerASN: 64500\n  localASN: 64501\n  holdTime: 9\n\
             ---\napiVersion: xlb.dev/v1alpha1\nkind: BGPPeer\nmetadata:\n  name: bad\n\
             spec:\n  peerAddress: 10.0.0.2\n  peerASN: 64500\n  localASN: 64501\n  holdTime: 2\n\
             ---\napiVersion: xlb.dev/v1alpha1\nkind: BGPPeer\nmetadata:\n  name: typo\n\
             spec:\n  peerAddress: 10.0.0.3\n  peerASN: 64500\n  localASN: 64501\n  holTime: 9\n\
             ---\napiVersion: v1\nkind: Service\nmetadata:\n  name: web\n",
        );
        let (peers, problems) = load_dir(&dir, &node("n1"));
        assert_eq!(peers.len(), 1, "{problems:?}");
        let tor = &peers[0];
        assert_eq!(tor.name, "xlb/tor");
        assert_eq!(tor.peer_port, 179);
        assert_eq!(tor.hold_time, 9);
        assert_eq!(tor.ttl, 1, "eBGP defaults to a directly connected peer");
        assert_eq!(tor.restart_time, DEFAULT_RESTART_TIME);
        assert_eq!(tor.keepalive_interval(9), Some(Duration::from_secs(3)));
        assert_eq!(problems.len(), 2, "{problems:?}");
        for expected in ["holdTime 2", "holTime"] {
            assert!(
                problems.iter().any(|p| p.reason.contains(expected)),
                "{problems:?}"
            );
        }
    }

    #[test]
    fn node_selector_picks_the_nodes_that_peer() {
        let dir = tempdir();
        write(
            &dir,
            "peer.yaml",
            "apiVersion: xlb.dev/v1alpha1\nkind: BGPPeer\nmetadata:\n  name: tor\n\
             spec:\n  peerAddress: fd00::1\n  peerASN: 64500\n  localASN: 64500\n\
             \x20 nodeSelector:\n    kubernetes.io/hostname: n2\n",
        );
        assert!(load_dir(&dir, &node("n1")).0.is_empty());
        let (peers, problems) = load_dir(&dir, &node("n2"));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(peers[0].ttl, 64, "iBGP is not limited to one hop");
        assert!(!peers[0].is_ebgp());
    }

    #[test]
    fn md5_keys_come_from_secrets_and_a_missing_one_is_refused_not_ignored() {
        let dir = tempdir();
        let peer = |name: &str, address: &str, secret: &str| {
            format!(
                "apiVersion: xlb.dev/v1alpha1\nkind: BGPPeer\nmetadata:\n  name: {name}\n  \
                 namespace: xlb\nspec:\n  peerAddress: {address}\n  peerASN: 1\n  localASN: 2\n\
                 \x20 passwordSecret: {{name: {secret}, key: password}}\n"
            )
        };
        write(
            &dir,
            "peers.yaml",
            &[
                peer("plain", "10.0.0.1", "from-string"),
                peer("encoded", "10.0.0.2", "from-data"),
                peer("missing", "10.0.0.3", "nowhere"),
                peer("long", "10.0.0.4", "too-long"),
            ]
            .join("---\n"),
        );
        write(
            &dir,
            "secrets.yaml",
            &format!(
                "apiVersion: v1\nkind: Secret\nmetadata: {{name: from-string, namespace: xlb}}\n\
                 stringData: {{password: s3cret}}\n---\n\
                 apiVersion: v1\nkind: Secret\nmetadata: {{name: from-data, namespace: xlb}}\n\
                 data: {{password: czNjcmV0}}\n---\n\
                 apiVersion: v1\nkind: Secret\nmetadata: {{name: too-long, namespace: xlb}}\n\
                 stringData: {{password: {}}}\n",
                "x".repeat(MAX_PASSWORD_LEN + 1)
            ),
        );
        let (peers, problems) = load_dir(&dir, &node("n1"));
        let names: Vec<&str> = peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["xlb/plain", "xlb/encoded"], "{problems:?}");
        for peer in &peers {
            assert_eq!(
                peer.password.as_ref().map(Password::bytes),
                Some(&b"s3cret"[..])
            );
            assert!(
                !format!("{peer:?}").contains("s3cret"),
                "the key is never printed"
            );
        }
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].reason.contains("no such Secret"),
            "{problems:?}"
        );
        assert!(problems[1].reason.contains("1 to 80 bytes"), "{problems:?}");
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "xlb-bgp-peer-{}-{}",
            std::process::id(),
            fastrand_name()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn fastrand_name() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed)
    }
}
