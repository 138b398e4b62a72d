//! Liveness and readiness. Each long-running loop beats a heartbeat at least
//! once per period it names; the agent is alive while none is older than
//! its bound (a loop stuck in a map write or a deadlock stops beating, and
//! the kubelet restarts the pod). It is ready once the first complete sync
//! is programmed and every interface runs the datapath.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

#[derive(Debug, Default)]
pub struct Health {
    /// Loop name → (last beat, how stale it may get).
    beats: Mutex<BTreeMap<&'static str, (Instant, Duration)>>,
    synced: AtomicBool,
}

impl Health {
    /// Loop `name` is alive now; unhealthy if it does not beat again
    /// within `bound`.
    pub fn beat(&self, name: &'static str, bound: Duration) {
        self.beats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name, (Instant::now(), bound));
    }

    /// Loop `name` ended on purpose (shutdown, a source without it).
    pub fn retire(&self, name: &'static str) {
        self.beats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }

    /// The loops that missed their bound at `now`, with how long ago they
    /// last beat.
    pub fn stale(&self, now: Instant) -> Vec<(&'static str, Duration)> {
        self.beats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|(name, (at, bound))| {
                let age = now.saturating_duration_since(*at);
                (age > *bound).then_some((*name, age))
            })
            .collect()
    }

    /// The first complete sync is programmed.
    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::Relaxed);
    }

    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_is_stale_only_past_its_bound_and_not_after_it_retires() {
        let health = Health::default();
        health.beat("agent", Duration::from_secs(30));
        health.beat("lease", Duration::from_secs(5));
        let now = Instant::now();
        assert!(health.stale(now).is_empty());
        let later = now + Duration::from_secs(10);
        let stale: Vec<_> = health.stale(later).into_iter().map(|(n, _)| n).collect();
        assert_eq!(stale, vec!["lease"]);
        health.retire("lease");
        assert!(health.stale(later).is_empty());
        assert!(!health.stale(now + Duration::from_secs(31)).is_empty());
    }

    #[test]
    fn ready_only_after_the_first_sync() {
        let health = Health::default();
        assert!(!health.synced());
        health.set_synced();
        assert!(health.synced());
    }
}
