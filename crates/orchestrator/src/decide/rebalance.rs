//! The load-aware rebalancer: relieve hosts that stay hot, and never ping-pong.
//!
//! A host is *hot* when its observed CPU utilisation has stayed at or above `hot_util` for at
//! least `hold` (measured by the caller on its own clock). For each hot host, at most one VM per
//! pass is live-migrated to the least-loaded host that can take it, if the move shrinks the
//! utilisation gap between the two by at least `min_improvement` and leaves the destination
//! below `hot_util`. Ping-pong is ruled out by the log itself, in the VM's recorded moves:
//!
//! - a VM that moved within `vm_cooldown` does not move again;
//! - a VM never goes back to a host it left within `return_cooldown`.
//!
//! Each `VmMigrationPlanned` says, in its reason, the imbalance before and the expected after.

use std::collections::BTreeMap;
use std::time::Duration;

use novacron_scheduler::{Planner, PlannerConfig, Strategy};
use novacron_state::{ClusterState, VmRecord, VmStatus};
use novacron_types::{Envelope, EventKind, HostId, VmId};

use super::*;

/// The rebalancer's settings.
#[derive(Clone, Copy, Debug)]
pub struct RebalanceSettings {
    /// Whether it runs at all.
    pub enabled: bool,
    /// Utilisation from which a host is hot.
    pub hot_util: f64,
    /// How long a host must stay hot before anything moves.
    pub hold: Duration,
    /// Smallest reduction of the source–destination utilisation gap worth a migration.
    pub min_improvement: f64,
    /// A VM that moved within this does not move again.
    pub vm_cooldown: Duration,
    /// A VM does not go back to a host it left within this.
    pub return_cooldown: Duration,
}

impl Default for RebalanceSettings {
    fn default() -> Self {
        RebalanceSettings {
            enabled: true,
            hot_util: 0.85,
            hold: Duration::from_secs(60),
            min_improvement: 0.10,
            vm_cooldown: Duration::from_secs(600),
            return_cooldown: Duration::from_secs(1800),
        }
    }
}

/// What the rebalancer reads besides the state: how long each host has been hot, the latest
/// CPU utilisation per host and per VM, and the time.
#[derive(Clone, Debug, Default)]
pub struct LoadSnapshot {
    /// Hosts hot right now, with how long they have been.
    pub hot_for: BTreeMap<HostId, Duration>,
    /// Host CPU utilisation, 0–1.
    pub host_util: BTreeMap<HostId, f64>,
    /// VM CPU utilisation of its own vCPUs, 0–1.
    pub vm_util: BTreeMap<VmId, f64>,
    /// Now, ms since the epoch (the caller's clock, recorded in the events).
    pub now_ms: u64,
    /// Per host, the probability that it fails soon (see [`super::failure_risk`]).
    pub failure_risk: BTreeMap<HostId, f64>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Plans at most one migration per host that stayed hot, within the migration limits.
#[allow(clippy::too_many_arguments)]
pub fn rebalance(
    state: &ClusterState,
    load: &LoadSnapshot,
    settings: RebalanceSettings,
    planner_config: &PlannerConfig,
    in_flight: usize,
    limits: MigrationLimits,
    stamp: &mut impl Stamp,
    origin: &Origin,
) -> Vec<Envelope> {
    let mut events = Vec::new();
    if !settings.enabled || state.healing_paused {
        return events;
    }
    // Destinations are chosen for low load: spread, with load weighing most.
    let limits = super::migration_limits(state, limits);
    let cooldown = novacron_policy::observe::migration_policy(state)
        .vm_cooldown
        .map_or(settings.vm_cooldown, |c| c.max(settings.vm_cooldown));
    let mut cfg = super::planner_config(state, planner_config);
    cfg.strategy = Strategy::Spread;
    cfg.weights.load = 2.0;
    let view = novacron_scheduler::LoadView {
        cpu_util: load.host_util.clone(),
        watermark_ms: Some(load.now_ms),
        failure_risk: load.failure_risk.clone(),
    };
    let mut planner = Planner::new(state, &cfg, &view);
    let mut hot: Vec<(&HostId, f64, Duration)> = load
        .hot_for
        .iter()
        .filter(|(_, d)| **d >= settings.hold)
        .filter_map(|(h, d)| load.host_util.get(h).map(|u| (h, *u, *d)))
        .filter(|(_, u, _)| *u >= settings.hot_util)
        .collect();
    hot.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    let mut started = 0usize;
    for (source, util, hot_for) in hot {
        if in_flight + started >= limits.cluster {
            break;
        }
        let Some(src) = state.hosts.get(source) else { continue };
        let src_vcpus = f64::from(src.capacity.vcpus.max(1));
        // The VMs that may move, biggest CPU contribution first.
        let mut movable: Vec<(&VmRecord, f64)> = src
            .vms
            .iter()
            .filter_map(|id| state.vms.get(id))
            .filter(|vm| vm.status == VmStatus::Running && vm.migration.is_none() && !vm.delete_requested)
            .filter(|vm| vm.moves.last().is_none_or(|m| load.now_ms.saturating_sub(m.at_ms) >= ms(cooldown)))
            // Inside the VM's maintenance window, if a policy gives it one.
            .filter(|vm| novacron_policy::observe::may_disrupt(state, &vm.spec, load.now_ms))
            .map(|vm| {
                let vm_util = load.vm_util.get(&vm.id).copied().unwrap_or(util);
                (vm, vm_util * f64::from(vm.spec.vcpus) / src_vcpus)
            })
            .collect();
        movable.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.id.cmp(&b.0.id)));
        for (vm, share) in movable {
            let mut req = super::request_for_vm(state, vm);
            // The destination is chosen for low load, whatever the VM's own strategy.
            req.strategy = Some(Strategy::Spread);
            req.avoid.push(source.clone());
            // Never back to a host it left recently.
            req.avoid.extend(
                vm.moves
                    .iter()
                    .filter(|m| load.now_ms.saturating_sub(m.at_ms) < ms(settings.return_cooldown))
                    .map(|m| m.from.clone()),
            );
            let novacron_scheduler::Placement::Host { host: dest, .. } = planner.place(&req) else { continue };
            let dest_util = load.host_util.get(&dest).copied().unwrap_or(0.0);
            let dest_vcpus = f64::from(state.hosts.get(&dest).map_or(1, |h| h.capacity.vcpus.max(1)));
            let src_after = (util - share).max(0.0);
            let dest_after = dest_util + share * src_vcpus / dest_vcpus;
            let improvement = (util - dest_util).abs() - (src_after - dest_after).abs();
            if improvement < settings.min_improvement || dest_after >= settings.hot_util {
                continue;
            }
            let reason = format!(
                "rebalance: {source} at {:.0}% for {} s; expected {source} {:.0}% → {:.0}%, {dest} {:.0}% → {:.0}%",
                util * 100.0,
                hot_for.as_secs(),
                util * 100.0,
                src_after * 100.0,
                dest_util * 100.0,
                dest_after * 100.0
            );
            if let Ok((_, planned)) =
                plan_migration(state, vm, Some(dest.as_str()), &reason, &mut planner, stamp, origin)
            {
                events.extend(planned);
                started += 1;
                break; // one per hot host per pass; the next pass sees the effect
            }
        }
    }
    events
}

/// Whether any `VmMigrationPlanned` in `events` is for `vm` (test helper for callers).
#[must_use]
pub fn plans_migration_of(events: &[Envelope], vm: VmId) -> bool {
    events.iter().any(|e| matches!(&e.event, EventKind::VmMigrationPlanned(p) if p.vm == vm))
}
