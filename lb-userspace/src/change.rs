//! What a source's watchers saw change, gathered between two syncs so that
//! a sync re-reads only that.

use std::{collections::BTreeSet, path::PathBuf};

use crate::translate::ServiceKey;

/// What one watch event changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// This Service.
    Service(ServiceKey),
    /// An EndpointSlice of this Service.
    Slices(ServiceKey),
    /// A Node.
    Nodes,
    /// An AddressPool or a Namespace (pool mode).
    Pools,
    /// A BGPPeer (Kubernetes source with `--bgp`): the translation is not
    /// touched, the speaker reads its peers again.
    Peers,
    /// A manifest file was written (closed after writing), created by a
    /// rename, renamed away, removed, or its attributes changed: read it
    /// again.
    File(PathBuf),
    /// A manifest file is being written (modified, not closed yet): read it
    /// once it is closed, or after the settle time at the latest.
    Writing(PathBuf),
    /// Anything (a complete re-list, a manifest directory event that names
    /// no manifest file): read everything.
    All,
}

/// The changes since the last sync.
#[derive(Debug, Default)]
pub struct Changes {
    pub all: bool,
    pub nodes: bool,
    /// An AddressPool or a Namespace changed: allocate again.
    pub pools: bool,
    /// A BGPPeer changed.
    pub peers: bool,
    /// Services whose object changed (node mode re-allocates ports then).
    pub services: BTreeSet<ServiceKey>,
    /// Services whose EndpointSlices changed.
    pub slices: BTreeSet<ServiceKey>,
    /// Manifest files to read again.
    pub files: BTreeSet<PathBuf>,
    /// Manifest files modified and not closed yet (a subset of `files`).
    pub writing: BTreeSet<PathBuf>,
}

impl Changes {
    pub fn everything() -> Self {
        Changes {
            all: true,
            ..Changes::default()
        }
    }

    pub fn add(&mut self, change: Change) {
        match change {
            Change::All => self.all = true,
            Change::Nodes => self.nodes = true,
            Change::Pools => self.pools = true,
            Change::Peers => self.peers = true,
            Change::Service(key) => {
                self.services.insert(key);
            }
            Change::Slices(key) => {
                self.slices.insert(key);
            }
            Change::File(path) => {
                self.writing.remove(&path);
                self.files.insert(path);
            }
            Change::Writing(path) => {
                self.writing.insert(path.clone());
                self.files.insert(path);
            }
        }
    }
}
