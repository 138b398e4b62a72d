//! Counters: the node-wide `GLOBAL_STATS` (packets xlb looked at and did not
//! translate) and the per-service `STATS`. Both are per-CPU, so a counter is
//! a plain increment; the agent sums the CPUs when it reads them.

use lb_common::{GLOBAL_STATS_KEY, GlobalStats, ServiceStats};

use crate::maps::{GLOBAL_STATS, STATS};

/// This CPU's node-wide counters.
#[inline(always)]
pub fn global() -> Option<&'static mut GlobalStats> {
    GLOBAL_STATS
        .get_ptr_mut(GLOBAL_STATS_KEY)
        .map(|p| unsafe { &mut *p })
}

/// This CPU's counters of one service.
#[inline(always)]
pub fn service(service_id: u32) -> Option<&'static mut ServiceStats> {
    STATS.get_ptr_mut(service_id).map(|p| unsafe { &mut *p })
}
