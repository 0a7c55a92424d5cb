//! The reconcile pass: placement of pending VMs, healing, restarts, drains, deletions.

use std::collections::BTreeMap;

use novacron_state::{ClusterState, VmRecord, VmStatus};
use novacron_types::event::VmDeleted;
use novacron_types::{Envelope, EventKind, HostId, StartVm, StopVm};

use novacron_scheduler::{Placement, PlacementRequest, Planner};

use super::*;

/// How many distinct failed requests a pass remembers (each pending VM is compared with them).
const MAX_UNPLACEABLE_SHAPES: usize = 32;

/// How many live migrations may run at once.
#[derive(Clone, Copy, Debug)]
pub struct MigrationLimits {
    /// Out of one host.
    pub per_host: usize,
    /// In the whole cluster.
    pub cluster: usize,
}

impl Default for MigrationLimits {
    fn default() -> Self {
        MigrationLimits { per_host: 2, cluster: 8 }
    }
}

/// Everything a reconcile pass is configured by.
#[derive(Clone, Debug, Default)]
pub struct ReconcileSettings {
    /// Restart policy timings.
    pub restart: RestartTimings,
    /// Live-migration concurrency.
    pub migrations: MigrationLimits,
    /// The planner's settings and load view.
    pub planning: Planning,
}

impl From<RestartTimings> for ReconcileSettings {
    fn from(restart: RestartTimings) -> Self {
        ReconcileSettings { restart, ..ReconcileSettings::default() }
    }
}

/// How failed VMs are restarted.
#[derive(Clone, Copy, Debug)]
pub struct RestartTimings {
    /// Wait after the first failure; doubled after each further failure in the window.
    pub backoff_base: std::time::Duration,
    /// The longest wait.
    pub backoff_max: std::time::Duration,
    /// More failures than this within `window` and the VM is given up (`VmGaveUp`).
    pub max_restarts: u32,
    /// The window failures are counted in.
    pub window: std::time::Duration,
}

impl Default for RestartTimings {
    fn default() -> Self {
        RestartTimings {
            backoff_base: std::time::Duration::from_secs(1),
            backoff_max: std::time::Duration::from_secs(60),
            max_restarts: 5,
            window: std::time::Duration::from_secs(600),
        }
    }
}

/// [`reconcile_with`] the default restart timings.
pub fn reconcile(state: &ClusterState, stamp: &mut impl Stamp, origin: &Origin) -> Vec<Envelope> {
    reconcile_with(state, stamp, origin, RestartTimings::default())
}

/// What to do about a failed VM now: nothing yet (backoff), restart it (where), or give up.
pub(crate) fn restart_step(
    state: &ClusterState,
    vm: &VmRecord,
    now: u64,
    t: RestartTimings,
    planner: &mut LazyPlanner<'_>,
) -> Option<Result<Placement, (u32, String)>> {
    let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let recent: Vec<&novacron_state::FailureRecord> =
        vm.failures.iter().filter(|f| now.saturating_sub(f.at_ms) <= ms(t.window)).collect();
    let n = u32::try_from(recent.len()).unwrap_or(u32::MAX).max(1);
    if n > t.max_restarts {
        let why = format!(
            "failed {n} times within {} s (at most {} restarts); not restarted again",
            t.window.as_secs(),
            t.max_restarts
        );
        return Some(Err((n, why)));
    }
    let backoff = ms(t.backoff_base).saturating_mul(1u64 << (n - 1).min(20)).min(ms(t.backoff_max));
    let last = vm.failures.last().map_or(0, |f| f.at_ms);
    if now < last.saturating_add(backoff) {
        return None;
    }
    // A VM that keeps failing on one host is tried on another.
    let fails_here = recent.iter().filter(|f| Some(&f.host) == vm.host.as_ref()).count();
    let mut req = request_for_vm(state, vm);
    let mut decision = None;
    if fails_here < 2
        && let Some(current) = &vm.host
    {
        // In place when it may stay (its disk and warm caches are there); its own reservation
        // there counts as free.
        req.credit = Some((current.clone(), vm.spec.resources()));
        let mut here = req.clone();
        here.avoid = state.hosts.keys().filter(|h| *h != current).cloned().collect();
        decision = Some(planner.get().place(&here)).filter(|d| matches!(d, Placement::Host { .. }));
    } else {
        req.avoid.extend(vm.host.iter().cloned());
    }
    let mut decision = decision.unwrap_or_else(|| planner.get().place(&req));
    if let Placement::Host { explanation, host } = &mut decision {
        let moved = if Some(&*host) == vm.host.as_ref() { String::new() } else { " on another host".to_owned() };
        explanation.trigger = Some(format!("restart{moved} after failure {n} (backoff {backoff} ms)"));
    }
    Some(Ok(decision))
}

/// A planner built on first use.
pub(crate) struct LazyPlanner<'a> {
    state: &'a ClusterState,
    config: &'a novacron_scheduler::PlannerConfig,
    load: &'a novacron_scheduler::LoadView,
    planner: Option<Planner<'a>>,
}

impl<'a> LazyPlanner<'a> {
    fn get(&mut self) -> &mut Planner<'a> {
        let (state, config, load) = (self.state, self.config, self.load);
        self.planner.get_or_insert_with(|| Planner::new(state, config, load))
    }
}

/// One reconcile pass over the whole state: place pending VMs (one planning pass, so a batch
/// never double-books a host), command the start of placed VMs, heal the VMs of failed hosts,
/// restart failed VMs (backoff, another host after repeated failures, give up after too many),
/// and move deletions along.
pub fn reconcile_with(
    state: &ClusterState,
    stamp: &mut impl Stamp,
    origin: &Origin,
    settings: impl Into<ReconcileSettings>,
) -> Vec<Envelope> {
    let settings = settings.into();
    let restart = settings.restart;
    let limits = migration_limits(state, settings.migrations);
    // One planner for the whole pass: every decision sees what earlier ones took. Built only
    // if the pass places something: most passes do not, and building one walks every host.
    let config = planner_config(state, &settings.planning.config);
    let mut planner = LazyPlanner { state, config: &config, load: &settings.planning.load, planner: None };
    // Most passes find no failed and no draining host: then no VM needs its host looked up.
    let any_failed = state.hosts.values().any(|h| h.state == novacron_state::HostState::Failed);
    let any_draining = state.hosts.values().any(|h| h.admin == novacron_state::HostAdmin::Draining);
    // Migrations in flight, per source host and in all, for the drain's concurrency limits.
    let mut migrating_from: BTreeMap<HostId, usize> = BTreeMap::new();
    // (Every VM with a migration under way is in `needs_attention`.)
    for vm in state.needs_attention.iter().filter_map(|id| state.vms.get(id)).filter(|v| v.migration.is_some()) {
        if let Some(h) = &vm.host {
            *migrating_from.entry(h.clone()).or_default() += 1;
        }
    }
    let mut migrating_total: usize = migrating_from.values().sum();
    let mut events = Vec::new();
    // Requests of pending VMs that found no host in this pass.
    let mut unplaceable: Vec<PlacementRequest> = Vec::new();
    // Which VMs to look at: on healthy, undrained hosts only those the fold marks as possibly
    // needing attention (the same id order as a walk of all of them).
    let mut order: Vec<&VmRecord> = if any_failed || any_draining {
        state.vms.values().collect()
    } else {
        state.needs_attention.iter().filter_map(|id| state.vms.get(id)).collect()
    };
    // Healing policies: restart priority orders the pass (high first, so that they get the
    // capacity when it is short; id order within a priority), and may override a VM's restart
    // policy and limits.
    let healing: BTreeMap<novacron_types::VmId, novacron_policy::observe::HealingView> = if state.policies.is_empty() {
        BTreeMap::new()
    } else {
        let in_force = novacron_policy::enforce::in_force(state);
        order.iter().map(|v| (v.id, novacron_policy::observe::healing_in(&in_force, &v.spec))).collect()
    };
    if !healing.is_empty() {
        use novacron_types::policy::RestartPriority;
        order.sort_by_key(|v| std::cmp::Reverse(healing[&v.id].priority.unwrap_or(RestartPriority::Medium)));
    }
    for vm in order {
        let policy = healing.get(&vm.id).copied().unwrap_or_default();
        let on_failed_host = any_failed
            && vm
                .host
                .as_ref()
                .and_then(|h| state.hosts.get(h))
                .is_some_and(|h| h.state == novacron_state::HostState::Failed);
        if let Some(m) = &vm.migration {
            // A migration cannot finish if either end died: give it up; healing takes over.
            let target_failed = state.hosts.get(&m.to).is_some_and(|h| h.state == novacron_state::HostState::Failed);
            if (target_failed || on_failed_host) && !state.healing_paused {
                let reported_by =
                    if target_failed { m.to.clone() } else { vm.host.clone().unwrap_or_else(|| m.to.clone()) };
                events.push(envelope(
                    stamp,
                    origin,
                    EventKind::VmMigrationFailed(novacron_types::event::VmMigrationFailed {
                        vm: vm.id,
                        reported_by,
                        target_incarnation: m.target_incarnation,
                        reason: "a host of the migration failed".into(),
                    }),
                ));
            }
            continue;
        }
        if on_failed_host && vm.status != VmStatus::Deleted && !state.healing_paused {
            if vm.delete_requested {
                // Its host is dead and fenced: nothing runs; the deletion completes here.
                events.push(envelope(stamp, origin, EventKind::VmDeleted(VmDeleted { vm: vm.id })));
                continue;
            }
            let mut decision = planner.get().place(&request_for_vm(state, vm));
            if let Placement::Host { explanation, .. } = &mut decision {
                explanation.trigger = vm.host.as_ref().map(|h| format!("host {h} failed"));
            }
            events.extend(replacement_events(state, vm, decision, stamp, origin));
            continue;
        }
        let restartable = match policy.restart.unwrap_or(vm.spec.restart) {
            novacron_types::RestartPolicy::Never => false,
            novacron_types::RestartPolicy::OnFailure => vm.status == VmStatus::Failed,
            novacron_types::RestartPolicy::Always => matches!(vm.status, VmStatus::Failed | VmStatus::Stopped),
        };
        if restartable && !vm.gave_up && !vm.delete_requested {
            let now = stamp.now_ms();
            let restart = RestartTimings {
                max_restarts: policy.max_restarts.unwrap_or(restart.max_restarts),
                window: policy.window.unwrap_or(restart.window),
                ..restart
            };
            match restart_step(state, vm, now, restart, &mut planner) {
                None => {}
                Some(Err((failures, reason))) => events.push(envelope(
                    stamp,
                    origin,
                    EventKind::VmGaveUp(novacron_types::event::VmGaveUp {
                        vm: vm.id,
                        failures,
                        window_ms: u64::try_from(restart.window.as_millis()).unwrap_or(u64::MAX),
                        reason,
                    }),
                )),
                Some(Ok(decision)) => {
                    events.extend(replacement_events(state, vm, decision, stamp, origin));
                }
            }
            continue;
        }
        let draining = vm
            .host
            .as_ref()
            .filter(|_| any_draining)
            .filter(|h| state.hosts.get(*h).is_some_and(|r| r.admin == novacron_state::HostAdmin::Draining));
        if let Some(source) = draining
            && !vm.delete_requested
        {
            let reason = format!("draining host {source}");
            match vm.status {
                VmStatus::Running
                    if vm.migration_failed_from.as_ref() != Some(source)
                        && policy.prefer != Some(novacron_types::policy::Prefer::Restart) =>
                {
                    let here = migrating_from.get(source).copied().unwrap_or(0);
                    if here < limits.per_host && migrating_total < limits.cluster {
                        match plan_migration(state, vm, None, &reason, planner.get(), stamp, origin) {
                            Ok((_, planned)) => {
                                *migrating_from.entry(source.clone()).or_default() += 1;
                                migrating_total += 1;
                                events.extend(planned);
                            }
                            Err(e) => tracing::debug!(vm = %vm.id, error = %e, "drain: no live migration possible now"),
                        }
                    }
                }
                // Live migration failed from here: move it cold — stop it first, then (once it
                // reports stopped) place it elsewhere. Never two copies.
                VmStatus::Running => {
                    if let (Some(host), Some(incarnation)) = (vm.host.clone(), vm.incarnation) {
                        events.push(envelope(
                            stamp,
                            origin,
                            EventKind::VmStopCommanded(StopVm {
                                vm: vm.id,
                                host,
                                incarnation,
                                generation: vm.generation,
                                reason: format!("{reason}: live migration failed, moving it stopped"),
                            }),
                        ));
                    }
                }
                VmStatus::Stopped | VmStatus::Failed | VmStatus::Placed | VmStatus::Pending => {
                    let mut req = request_for_vm(state, vm);
                    req.avoid.push(source.clone());
                    let mut decision = planner.get().place(&req);
                    if let Placement::Host { explanation, .. } = &mut decision {
                        explanation.trigger = Some(reason.clone());
                    }
                    events.extend(replacement_events(state, vm, decision, stamp, origin));
                }
                _ => {} // starting, stopping, migrating: wait for it to settle
            }
            continue;
        }
        if vm.delete_requested {
            if let Some(e) = deletion_step_if_needed(vm, stamp, origin) {
                events.push(e);
            }
            continue;
        }
        match vm.status {
            VmStatus::Pending => {
                let req = request_for_vm(state, vm);
                // Already told why it waits, and no easier to place than a VM that found no
                // host earlier in this pass: it finds none either (nothing new to say). With
                // the cluster full, planning each of 20,000 pending VMs over 10,000 hosts took
                // a pass a minute, and the engine answered nothing else meanwhile.
                if vm.pending_reason.is_some() && unplaceable.iter().any(|failed| req.no_easier_than(failed)) {
                    continue;
                }
                let decision = planner.get().place(&req);
                if matches!(decision, Placement::Unplaceable { .. }) && unplaceable.len() < MAX_UNPLACEABLE_SHAPES {
                    unplaceable.push(req);
                }
                events.extend(replacement_events(state, vm, decision, stamp, origin));
            }
            VmStatus::Placed => {
                if let (Some(host), Some(incarnation)) = (vm.host.clone(), vm.incarnation) {
                    events.push(envelope(
                        stamp,
                        origin,
                        EventKind::VmStartCommanded(StartVm {
                            vm: vm.id,
                            host,
                            incarnation,
                            generation: vm.generation,
                            spec: vm.spec.clone(),
                        }),
                    ));
                }
            }
            _ => {}
        }
    }
    for h in state.hosts.values() {
        if h.admin == novacron_state::HostAdmin::Draining && h.vms.is_empty() && h.incoming.is_empty() {
            events.push(envelope(
                stamp,
                origin,
                EventKind::HostDrained(novacron_types::event::HostDrained { host: h.id.clone() }),
            ));
        }
    }
    events
}

/// The events that carry out a placement decision for a VM the log already has (its next
/// generation, its last failure as context when it stays pending).
fn replacement_events(
    state: &ClusterState,
    vm: &VmRecord,
    decision: Placement,
    stamp: &mut impl Stamp,
    origin: &Origin,
) -> Vec<Envelope> {
    placement_events(state, vm.id, &vm.spec, vm.generation, decision, vm.pending_reason.as_deref(), stamp, origin)
}
