//! Service ids and backend ids: which are in use, and which comes next.
//!
//! A freed id is handed out again as late as possible: flows that still
//! carry it are swept in the meantime, so a new frontend or backend never
//! inherits a stale flow's counters, affinity or reverse NAT. The two kinds
//! get there in two ways, because they live in different maps.

use std::collections::{HashSet, VecDeque};

/// No id is free: all `capacity` are in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("all {capacity} ids are in use")]
pub struct Exhausted {
    pub capacity: u32,
}

/// Which id a freed one is handed out after.
#[derive(Clone, Debug)]
enum Reuse {
    /// Every id of the range once, in order; after that the id freed
    /// longest ago (FIFO).
    OldestFreed { freed: VecDeque<u32> },
    /// The cursor runs on through the range and wraps around, skipping ids
    /// in use: a freed id comes back only after the whole range went by.
    /// At most `capacity` ids are in use at once.
    Wraparound { capacity: u32 },
}

/// A set of ids in use and the rule for the next one.
#[derive(Clone, Debug)]
pub struct IdPool {
    first: u32,
    /// One past the last id of the range.
    end: u64,
    /// The next id to try; `end` once an [`Reuse::OldestFreed`] range has
    /// been handed out whole.
    next: u64,
    in_use: HashSet<u32>,
    reuse: Reuse,
}

impl IdPool {
    /// Service ids index the per-service arrays (`STATS`, the Maglev
    /// tables), so they are `0..max_services`.
    pub fn services(max_services: u32) -> Self {
        Self {
            first: 0,
            end: max_services as u64,
            next: 0,
            in_use: HashSet::new(),
            reuse: Reuse::OldestFreed {
                freed: VecDeque::new(),
            },
        }
    }

    /// Backend ids are `BACKENDS` hash keys, so they may be any u32 but 0
    /// (what an unwritten Maglev slot holds); at most `max_backends` of them
    /// are in use, the size of that map.
    pub fn backends(max_backends: u32) -> Self {
        Self {
            first: 1,
            end: u32::MAX as u64 + 1,
            next: 1,
            in_use: HashSet::new(),
            reuse: Reuse::Wraparound {
                capacity: max_backends,
            },
        }
    }

    /// Hands out a free id and marks it in use.
    pub fn allocate(&mut self) -> Result<u32, Exhausted> {
        match &mut self.reuse {
            Reuse::OldestFreed { freed } => {
                while self.next < self.end {
                    let id = self.next as u32;
                    self.next += 1;
                    if self.in_use.insert(id) {
                        return Ok(id);
                    }
                }
                let id = freed.pop_front().ok_or(Exhausted {
                    capacity: (self.end - self.first as u64) as u32,
                })?;
                self.in_use.insert(id);
                Ok(id)
            }
            Reuse::Wraparound { capacity } => {
                if self.in_use.len() as u64 >= *capacity as u64 {
                    return Err(Exhausted {
                        capacity: *capacity,
                    });
                }
                // Terminates: fewer than `capacity` ids are in use, and the
                // range is larger than any capacity.
                loop {
                    let id = self.next as u32;
                    self.next += 1;
                    if self.next >= self.end {
                        self.next = self.first as u64;
                    }
                    if self.in_use.insert(id) {
                        return Ok(id);
                    }
                }
            }
        }
    }

    /// Gives `id` back.
    pub fn release(&mut self, id: u32) {
        if self.in_use.remove(&id)
            && let Reuse::OldestFreed { freed } = &mut self.reuse
        {
            freed.push_back(id);
        }
    }

    /// Marks an id found in the pinned maps as in use, so it is never
    /// handed out twice.
    pub fn adopt(&mut self, id: u32) {
        self.in_use.insert(id);
        match &mut self.reuse {
            Reuse::OldestFreed { freed } => freed.retain(|free| *free != id),
            // The previous agent handed out the ids up to the highest one it
            // left: the next ones are the least recently used.
            Reuse::Wraparound { .. } => {
                if (id as u64) + 1 < self.end {
                    self.next = self.next.max(id as u64 + 1);
                }
            }
        }
    }

    pub fn in_use(&self) -> &HashSet<u32> {
        &self.in_use
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_ids_cover_the_range_then_reuse_the_oldest_freed() {
        let mut pool = IdPool::services(3);
        let ids: Vec<u32> = (0..3).map(|_| pool.allocate().unwrap()).collect();
        assert_eq!(ids, [0, 1, 2]);
        assert_eq!(pool.allocate(), Err(Exhausted { capacity: 3 }));
        pool.release(2);
        pool.release(0);
        assert_eq!(pool.allocate(), Ok(2));
        assert_eq!(pool.allocate(), Ok(0));
        assert_eq!(pool.allocate(), Err(Exhausted { capacity: 3 }));
    }

    #[test]
    fn a_freed_service_id_waits_behind_the_unused_ones() {
        let mut pool = IdPool::services(4);
        assert_eq!(pool.allocate(), Ok(0));
        pool.release(0);
        assert_eq!(pool.allocate(), Ok(1));
        assert_eq!(pool.allocate(), Ok(2));
        assert_eq!(pool.allocate(), Ok(3));
        assert_eq!(pool.allocate(), Ok(0));
    }

    #[test]
    fn adopted_service_ids_are_skipped() {
        let mut pool = IdPool::services(4);
        pool.adopt(1);
        pool.adopt(2);
        assert_eq!(pool.allocate(), Ok(0));
        assert_eq!(pool.allocate(), Ok(3));
        assert_eq!(pool.allocate(), Err(Exhausted { capacity: 4 }));
        pool.release(2);
        assert_eq!(pool.allocate(), Ok(2));
        assert_eq!(pool.in_use(), &HashSet::from([0, 1, 2, 3]));
    }

    #[test]
    fn backend_ids_start_at_one_and_stop_at_capacity() {
        let mut pool = IdPool::backends(2);
        assert_eq!(pool.allocate(), Ok(1));
        assert_eq!(pool.allocate(), Ok(2));
        assert_eq!(pool.allocate(), Err(Exhausted { capacity: 2 }));
        pool.release(1);
        // Not 1 again: the cursor runs on.
        assert_eq!(pool.allocate(), Ok(3));
        assert_eq!(pool.in_use(), &HashSet::from([2, 3]));
    }

    #[test]
    fn backend_ids_continue_after_the_highest_adopted() {
        let mut pool = IdPool::backends(16);
        pool.adopt(7);
        pool.adopt(3);
        assert_eq!(pool.allocate(), Ok(8));
        pool.adopt(u32::MAX);
        assert_eq!(pool.allocate(), Ok(9));
    }

    #[test]
    fn backend_ids_wrap_around_past_zero() {
        let mut pool = IdPool::backends(4);
        pool.adopt(u32::MAX - 1);
        assert_eq!(pool.allocate(), Ok(u32::MAX));
        assert_eq!(pool.allocate(), Ok(1));
        pool.release(u32::MAX);
        assert_eq!(pool.allocate(), Ok(2));
    }

    #[test]
    fn releasing_an_unknown_id_changes_nothing() {
        let mut pool = IdPool::services(1);
        pool.release(0);
        assert_eq!(pool.allocate(), Ok(0));
        assert_eq!(pool.allocate(), Err(Exhausted { capacity: 1 }));
    }
}
