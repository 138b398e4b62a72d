//! The seam between the reconciler and the BPF maps: the agent writes
//! through `dataplane::Maps`, the unit tests through an in-memory fake.

use anyhow::Result;
use lb_common::FrontendKey;

/// The map operations the reconciler needs.
pub trait MapWriter {
    fn put_backend(&mut self, id: u32, backend: &lb_common::Backend) -> Result<()>;
    fn delete_backend(&mut self, id: u32) -> Result<()>;
    /// `(index, backend id)` pairs: slots of one frontend's table. The
    /// slots must be written (and visible to the datapath) when this
    /// returns, since the service entry that reaches them comes next.
    fn put_maglev_slots(&mut self, slots: &[(u32, u32)]) -> Result<()>;
    fn put_service(&mut self, key: &FrontendKey, service: &lb_common::Service) -> Result<()>;
    fn delete_service(&mut self, key: &FrontendKey) -> Result<()>;
    fn put_source_range(&mut self, key: &lb_common::SourceRange, prefix_len: u32) -> Result<()>;
    fn delete_source_range(&mut self, key: &lb_common::SourceRange, prefix_len: u32) -> Result<()>;
    fn reset_stats(&mut self, service_id: u32) -> Result<()>;
}

/// Counts writes for the summary (and the O(changed) tests).
pub(super) struct Counting<'a> {
    inner: &'a mut dyn MapWriter,
    pub(super) writes: usize,
}

impl<'a> Counting<'a> {
    pub(super) fn new(inner: &'a mut dyn MapWriter) -> Self {
        Self { inner, writes: 0 }
    }
}

impl MapWriter for Counting<'_> {
    fn put_backend(&mut self, id: u32, b: &lb_common::Backend) -> Result<()> {
        self.writes += 1;
        self.inner.put_backend(id, b)
    }
    fn delete_backend(&mut self, id: u32) -> Result<()> {
        self.writes += 1;
        self.inner.delete_backend(id)
    }
    fn put_maglev_slots(&mut self, slots: &[(u32, u32)]) -> Result<()> {
        // One write per slot, as the datapath sees them.
        self.writes += slots.len();
        self.inner.put_maglev_slots(slots)
    }
    fn put_service(&mut self, key: &FrontendKey, s: &lb_common::Service) -> Result<()> {
        self.writes += 1;
        self.inner.put_service(key, s)
    }
    fn delete_service(&mut self, key: &FrontendKey) -> Result<()> {
        self.writes += 1;
        self.inner.delete_service(key)
    }
    fn put_source_range(&mut self, k: &lb_common::SourceRange, len: u32) -> Result<()> {
        self.writes += 1;
        self.inner.put_source_range(k, len)
    }
    fn delete_source_range(&mut self, k: &lb_common::SourceRange, len: u32) -> Result<()> {
        self.writes += 1;
        self.inner.delete_source_range(k, len)
    }
    fn reset_stats(&mut self, id: u32) -> Result<()> {
        self.inner.reset_stats(id)
    }
}
