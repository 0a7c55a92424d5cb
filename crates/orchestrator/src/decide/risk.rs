//! Failure risk of hosts: each host's failure history in the log (`HostFailed` times), scored
//! by a trained risk model (`novacron models risk --save`). The placement planner weighs the
//! scores (`failure_risk`), so new VMs, restarted ones and those re-placed by healing or moved
//! by the rebalancer go to the hosts least likely to fail soon.

use std::collections::BTreeMap;

use novacron_predict::risk::{Failure, RiskModel};
use novacron_state::ClusterState;
use novacron_types::HostId;

const MS_PER_DAY: f64 = 86_400_000.0;

/// The probability that each host fails within the model's window, at `now_ms`. Empty when no
/// host has ever failed: every host would score the same, which ranks nothing.
#[must_use]
pub fn failure_risk(state: &ClusterState, model: &RiskModel, now_ms: u64) -> BTreeMap<HostId, f64> {
    if state.hosts.values().all(|h| h.failures_ms.is_empty()) {
        return BTreeMap::new();
    }
    let t = now_ms as f64 / MS_PER_DAY;
    let month_ago = now_ms.saturating_sub(30 * 86_400_000);
    // The cluster is the "system" of the model's features: its failures per host in the last
    // 30 days.
    let recent: usize = state
        .hosts
        .values()
        .map(|h| h.failures_ms.iter().filter(|at| **at >= month_ago && **at <= now_ms).count())
        .sum();
    let rate = recent as f64 / state.hosts.len().max(1) as f64;
    state
        .hosts
        .values()
        .map(|h| {
            // The cause is not known live: counted as not hardware.
            let past: Vec<Failure> = h
                .failures_ms
                .iter()
                .filter(|at| **at <= now_ms)
                .map(|at| Failure { at: *at as f64 / MS_PER_DAY, down_min: 0.0, hardware: false })
                .collect();
            (h.id.clone(), model.probability(&past, t, rate))
        })
        .collect()
}
