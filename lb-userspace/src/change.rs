//! What a source's watchers saw change, gathered between two syncs so that
//! a sync re-reads only that.

use std::collections::BTreeSet;

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
    /// Anything (a complete re-list, a manifest file): read everything.
    All,
}

/// The changes since the last sync.
#[derive(Debug, Default)]
pub struct Changes {
    pub all: bool,
    pub nodes: bool,
    /// Services whose object changed (node mode re-allocates ports then).
    pub services: BTreeSet<ServiceKey>,
    /// Services whose EndpointSlices changed.
    pub slices: BTreeSet<ServiceKey>,
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
            Change::Service(key) => {
                self.services.insert(key);
            }
            Change::Slices(key) => {
                self.slices.insert(key);
            }
        }
    }
}
