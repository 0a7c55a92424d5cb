//! Decisions: from the folded state and one input to the events to append. Pure.
//!
//! Ids and the time are drawn by the caller (the engine) through [`Stamp`] before anything is
//! appended and are recorded in the events, so a replay never decides again. Reconcilers look
//! only at the state — a crash between two appends is repaired by the next reconcile pass,
//! through the same code as the happy path.

use std::collections::BTreeMap;

use novacron_scheduler::Placement;
use novacron_state::{ClusterState, VmRecord, VmStatus};
use novacron_types::event::{
    HostRegistered, VmDeleteRequested, VmDeleted, VmMigrationPlanned, VmPlaced, VmPlacementFailed, VmRequested,
};
use novacron_types::report::HostRegistration;
use novacron_types::{
    Actor, Envelope, EventKind, Generation, HostId, IncarnationId, MigrateOut, PrepareIncoming, Report, ReportKind,
    Resources, StartVm, StopVm, VmId, VmSpec,
};
use uuid::Uuid;

/// Where time and fresh ids come from. The engine's is the wall clock and UUID v7; tests can
/// pass a fixed one.
pub trait Stamp {
    /// Milliseconds since the epoch.
    fn now_ms(&mut self) -> u64;
    /// A fresh VM id.
    fn vm_id(&mut self) -> VmId;
    /// A fresh incarnation id.
    fn incarnation_id(&mut self) -> IncarnationId;
}

/// The wall clock and UUID v7.
pub struct WallClock;

impl Stamp for WallClock {
    fn now_ms(&mut self) -> u64 {
        novacron_eventlog::now_ms()
    }
    fn vm_id(&mut self) -> VmId {
        VmId::new_v7()
    }
    fn incarnation_id(&mut self) -> IncarnationId {
        IncarnationId::new_v7()
    }
}

/// Why a request was refused; mapped to HTTP statuses by the API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The request is invalid (400).
    #[error("field `{field}`: {reason}")]
    Invalid {
        /// Which field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// The name is taken by a live VM (409).
    #[error("a VM named {0:?} already exists")]
    NameInUse(String),
    /// No such VM (404).
    #[error("no VM {0}")]
    NotFound(String),
    /// The VM is already deleted (409).
    #[error("VM {0} is already deleted")]
    AlreadyDeleted(VmId),
    /// The request conflicts with the VM's or the cluster's current state (409).
    #[error("{0}")]
    Conflict(String),
}

/// Context of one decision: who asked, and which request the events belong to.
pub struct Origin {
    /// Recorded as the events' actor.
    pub actor: Actor,
    /// Recorded as the events' correlation id.
    pub correlation: Option<Uuid>,
}

fn envelope(stamp: &mut impl Stamp, origin: &Origin, event: EventKind) -> Envelope {
    Envelope::new(stamp.now_ms(), origin.actor.clone(), event).correlated(origin.correlation)
}

/// A new VM: `VmRequested`, then its placement (`VmPlaced` + `VmStartCommanded`, or
/// `VmPlacementFailed`). Returns the new VM's id with the events.
///
/// # Errors
/// A [`Refusal`] when the name is taken.
pub fn create_vm(
    state: &ClusterState,
    spec: VmSpec,
    stamp: &mut impl Stamp,
    origin: &Origin,
) -> Result<(VmId, Vec<Envelope>), Refusal> {
    if state.names.contains_key(&spec.name) {
        return Err(Refusal::NameInUse(spec.name));
    }
    let vm = stamp.vm_id();
    let need = spec.resources();
    let mut events = vec![envelope(stamp, origin, EventKind::VmRequested(VmRequested { vm, spec: spec.clone() }))];
    let decision = novacron_scheduler::place(state, need, &BTreeMap::new());
    events.extend(placement_events(state, vm, &spec, Generation(0), decision, None, stamp, origin));
    Ok((vm, events))
}

#[allow(clippy::too_many_arguments)]
fn placement_events(
    state: &ClusterState,
    vm: VmId,
    spec: &VmSpec,
    current: Generation,
    decision: Placement,
    previous_failure: Option<&str>,
    stamp: &mut impl Stamp,
    origin: &Origin,
) -> Vec<Envelope> {
    match decision {
        Placement::Host { host, mut explanation } => {
            explanation.log_seq = state.seq;
            let incarnation = stamp.incarnation_id();
            let generation = current.next().unwrap_or(current);
            let placed = envelope(
                stamp,
                origin,
                EventKind::VmPlaced(VmPlaced { vm, host: host.clone(), incarnation, generation, explanation }),
            );
            let cause = placed.id.0;
            let start = envelope(
                stamp,
                origin,
                EventKind::VmStartCommanded(StartVm { vm, host, incarnation, generation, spec: spec.clone() }),
            )
            .caused_by(cause);
            vec![placed, start]
        }
        Placement::Unplaceable { reason, explanation } => {
            if previous_failure == Some(reason.as_str()) {
                return Vec::new(); // nothing new to say; don't flood the log
            }
            vec![envelope(stamp, origin, EventKind::VmPlacementFailed(VmPlacementFailed { vm, reason, explanation }))]
        }
    }
}

/// Finds a VM by id or by (live) name.
#[must_use]
pub fn find_vm<'a>(state: &'a ClusterState, key: &str) -> Option<&'a VmRecord> {
    if let Ok(id) = key.parse::<VmId>() {
        return state.vms.get(&id);
    }
    state.names.get(key).and_then(|id| state.vms.get(id))
}

/// An operator's delete: `VmDeleteRequested`, then what it takes (stop command, or `VmDeleted`).
///
/// # Errors
/// A [`Refusal`] when there is no such VM or it is already deleted.
pub fn delete_vm(
    state: &ClusterState,
    key: &str,
    stamp: &mut impl Stamp,
    origin: &Origin,
) -> Result<(VmId, Vec<Envelope>), Refusal> {
    let vm = find_vm(state, key).ok_or_else(|| Refusal::NotFound(key.to_owned()))?;
    if vm.status == VmStatus::Deleted {
        return Err(Refusal::AlreadyDeleted(vm.id));
    }
    let mut events = Vec::new();
    if !vm.delete_requested {
        events.push(envelope(stamp, origin, EventKind::VmDeleteRequested(VmDeleteRequested { vm: vm.id })));
    }
    if let Some(e) = deletion_step(vm, stamp, origin) {
        events.push(e);
    }
    Ok((vm.id, events))
}

/// The next step of deleting a VM whose deletion was requested: stop it if something may run,
/// or mark it deleted if nothing does. `None` while a stop is under way.
fn deletion_step(vm: &VmRecord, stamp: &mut impl Stamp, origin: &Origin) -> Option<Envelope> {
    match (vm.status, vm.host.as_ref(), vm.incarnation) {
        (VmStatus::Starting | VmStatus::Running, Some(host), Some(incarnation)) => Some(envelope(
            stamp,
            origin,
            EventKind::VmStopCommanded(StopVm {
                vm: vm.id,
                host: host.clone(),
                incarnation,
                generation: vm.generation,
                reason: "deleted by operator".into(),
            }),
        )),
        (VmStatus::Stopping | VmStatus::Migrating | VmStatus::Deleted, _, _) => None,
        _ => Some(envelope(stamp, origin, EventKind::VmDeleted(VmDeleted { vm: vm.id }))),
    }
}

/// An operator's (or a planner's) live migration: `VmMigrationPlanned` (reserving the
/// destination) and the command to the destination to prepare an incoming incarnation. The rest
/// of the saga is driven by the agents' reports (see [`report`]).
///
/// # Errors
/// A [`Refusal`] when the VM cannot move now or the destination cannot take it.
pub fn migrate_vm(
    state: &ClusterState,
    key: &str,
    to: Option<&str>,
    reason: &str,
    stamp: &mut impl Stamp,
    origin: &Origin,
) -> Result<(VmId, Vec<Envelope>), Refusal> {
    let vm = find_vm(state, key).ok_or_else(|| Refusal::NotFound(key.to_owned()))?;
    plan_migration(state, vm, to, reason, &BTreeMap::new(), stamp, origin)
}

/// Plans one live migration of `vm` (see [`migrate_vm`]); `reserved` holds what earlier
/// decisions of the same pass took on each host.
fn plan_migration(
    state: &ClusterState,
    vm: &VmRecord,
    to: Option<&str>,
    reason: &str,
    reserved: &BTreeMap<HostId, Resources>,
    stamp: &mut impl Stamp,
    origin: &Origin,
) -> Result<(VmId, Vec<Envelope>), Refusal> {
    let (Some(from), Some(source_incarnation)) = (vm.host.clone(), vm.incarnation) else {
        return Err(Refusal::Conflict(format!("VM {} is not placed", vm.id)));
    };
    if vm.status != VmStatus::Running || vm.migration.is_some() || vm.delete_requested {
        return Err(Refusal::Conflict(format!(
            "only a running VM can be migrated; {} is {}",
            vm.spec.name,
            vm.status.as_str()
        )));
    }
    let need = vm.spec.resources();
    let fits = |h: &novacron_state::HostRecord| {
        let taken = reserved.get(&h.id).copied().unwrap_or(Resources::ZERO);
        h.schedulable() && need.fits_within(h.free().saturating_sub(taken))
    };
    let to = match to {
        Some(t) => {
            let host = HostId::new(t).map_err(|e| Refusal::Invalid { field: "to".into(), reason: e.to_string() })?;
            let record = state
                .hosts
                .get(&host)
                .ok_or_else(|| Refusal::Invalid { field: "to".into(), reason: format!("unknown host {host}") })?;
            if host == from {
                return Err(Refusal::Invalid {
                    field: "to".into(),
                    reason: format!("{} already runs on {host}", vm.spec.name),
                });
            }
            if !fits(record) {
                return Err(Refusal::Conflict(format!(
                    "host {host} cannot take {} ({} state, {}/{} vCPUs and {}/{} MiB free)",
                    vm.spec.name,
                    record.state.as_str(),
                    record.free().vcpus,
                    record.capacity.vcpus,
                    record.free().memory_mib,
                    record.capacity.memory_mib
                )));
            }
            host
        }
        None => state
            .hosts
            .values()
            .find(|h| h.id != from && fits(h))
            .map(|h| h.id.clone())
            .ok_or_else(|| Refusal::Conflict(format!("no other host can take {}", vm.spec.name)))?,
    };
    let target_incarnation = stamp.incarnation_id();
    let target_generation = vm.generation.next().unwrap_or(vm.generation);
    let planned = envelope(
        stamp,
        origin,
        EventKind::VmMigrationPlanned(VmMigrationPlanned {
            vm: vm.id,
            from,
            to: to.clone(),
            source_incarnation,
            target_incarnation,
            target_generation,
            reason: reason.to_owned(),
        }),
    );
    let cause = planned.id.0;
    let prepare = envelope(
        stamp,
        origin,
        EventKind::VmIncomingCommanded(PrepareIncoming {
            vm: vm.id,
            host: to,
            incarnation: target_incarnation,
            generation: target_generation,
            spec: vm.spec.clone(),
        }),
    )
    .caused_by(cause);
    Ok((vm.id, vec![planned, prepare]))
}

/// What an operator can do to a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostAction {
    /// No new VMs.
    Cordon,
    /// Move every VM away, then stay cordoned.
    Drain,
    /// Back to service.
    Uncordon,
}

/// An operator's host action. Repeating one is a no-op (no events); one that does not fit the
/// host's state (e.g. draining a failed host) is refused.
///
/// # Errors
/// [`Refusal::NotFound`] for an unknown host, [`Refusal::Conflict`] for a state that does not allow it.
pub fn host_action(
    state: &ClusterState,
    host: &str,
    action: HostAction,
    stamp: &mut impl Stamp,
    origin: &Origin,
) -> Result<(HostId, Vec<Envelope>), Refusal> {
    use novacron_state::{HostAdmin as A, HostState as S};
    use novacron_types::event::{HostCordoned, HostDrainRequested, HostUncordoned};
    let id = HostId::new(host).map_err(|_| Refusal::NotFound(format!("host {host}")))?;
    let h = state.hosts.get(&id).ok_or_else(|| Refusal::NotFound(format!("host {host}")))?;
    let conflict = || Refusal::Conflict(format!("host {id} is {}; cannot {action:?} it now", h.status()));
    if h.state == S::Failed && action != HostAction::Uncordon {
        return Err(conflict());
    }
    let event = match (action, h.admin) {
        (HostAction::Cordon, A::Cordoned | A::Draining)
        | (HostAction::Drain, A::Draining)
        | (HostAction::Uncordon, A::InService) => None,
        (HostAction::Cordon, A::InService) => Some(EventKind::HostCordoned(HostCordoned { host: id.clone() })),
        (HostAction::Drain, A::InService | A::Cordoned) => Some(EventKind::HostDrainRequested(HostDrainRequested {
            host: id.clone(),
            vms: u32::try_from(h.vms.len()).unwrap_or(u32::MAX),
        })),
        (HostAction::Uncordon, A::Cordoned | A::Draining) => {
            Some(EventKind::HostUncordoned(HostUncordoned { host: id.clone() }))
        }
    };
    Ok((id, event.into_iter().map(|e| envelope(stamp, origin, e)).collect()))
}

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
#[derive(Clone, Copy, Debug, Default)]
pub struct ReconcileSettings {
    /// Restart policy timings.
    pub restart: RestartTimings,
    /// Live-migration concurrency.
    pub migrations: MigrationLimits,
}

impl From<RestartTimings> for ReconcileSettings {
    fn from(restart: RestartTimings) -> Self {
        ReconcileSettings { restart, ..ReconcileSettings::default() }
    }
}

/// What a report means for the log.
#[derive(Debug, PartialEq)]
pub enum ReportOutcome {
    /// Append these events (possibly none: the report told us nothing new).
    Events(Vec<Envelope>),
    /// The report cannot be accepted; dead-letter it with this reason.
    Reject(String),
}

/// Turns an agent's report into events, checking it against the state: a report that repeats
/// what the log already says gives no events, so redelivered reports are harmless.
pub fn report(state: &ClusterState, report: &Report, stamp: &mut impl Stamp) -> ReportOutcome {
    let origin = Origin { actor: Actor::Agent(report.host.clone()), correlation: Some(report.id.0) };
    let known_host = state.hosts.get(&report.host);
    let ev = |stamp: &mut dyn FnMut() -> u64, kind: EventKind| {
        Envelope::new(stamp(), origin.actor.clone(), kind).correlated(origin.correlation).caused_by(report.id.0)
    };
    let mut now = || stamp.now_ms();
    match &report.report {
        ReportKind::HostRegistration(HostRegistration { capacity, labels, driver }) => {
            let unchanged =
                known_host.is_some_and(|h| h.capacity == *capacity && h.labels == *labels && h.driver == *driver);
            if unchanged {
                return ReportOutcome::Events(Vec::new());
            }
            ReportOutcome::Events(vec![ev(
                &mut now,
                EventKind::HostRegistered(HostRegistered {
                    host: report.host.clone(),
                    capacity: *capacity,
                    labels: labels.clone(),
                    driver: driver.clone(),
                }),
            )])
        }
        _ if known_host.is_none() => {
            ReportOutcome::Reject(format!("report from unknown host {}: register first", report.host))
        }
        ReportKind::VmRunning(r) | ReportKind::VmStopped(r) => {
            let running = matches!(report.report, ReportKind::VmRunning(_));
            let Some(vm) = state.vms.get(&r.vm) else {
                return ReportOutcome::Reject(format!("report about unknown VM {}", r.vm));
            };
            if vm.incarnation != Some(r.incarnation) || vm.status == VmStatus::Deleted {
                if !running {
                    return ReportOutcome::Events(Vec::new());
                }
                // A superseded incarnation still runs there (its host came back after its VMs
                // were placed elsewhere, without having fenced): it must stop.
                tracing::warn!(vm = %r.vm, host = %r.host, incarnation = %r.incarnation, "a superseded incarnation runs; stopping it");
                return ReportOutcome::Events(vec![ev(
                    &mut now,
                    EventKind::VmStopCommanded(StopVm {
                        vm: r.vm,
                        host: r.host.clone(),
                        incarnation: r.incarnation,
                        generation: r.generation,
                        reason: format!("superseded by generation {}", vm.generation),
                    }),
                )]);
            }
            let target = if running { VmStatus::Running } else { VmStatus::Stopped };
            if vm.status == target {
                return ReportOutcome::Events(Vec::new());
            }
            let kind = if running { EventKind::VmRunning(r.clone()) } else { EventKind::VmStopped(r.clone()) };
            ReportOutcome::Events(vec![ev(&mut now, kind)])
        }
        ReportKind::IncomingReady(r) => {
            let Some((vm, m)) = migrating(state, r.vm, r.incarnation) else {
                return ReportOutcome::Events(Vec::new()); // stale: the migration ended meanwhile
            };
            if m.to != r.host || m.uri.is_some() {
                return ReportOutcome::Events(Vec::new());
            }
            let (Some(host), Some(incarnation)) = (vm.host.clone(), vm.incarnation) else {
                return ReportOutcome::Events(Vec::new());
            };
            let ready = ev(&mut now, EventKind::VmMigrationIncomingReady(r.clone()));
            let start = ev(
                &mut now,
                EventKind::VmMigrationStarted(MigrateOut {
                    vm: r.vm,
                    host,
                    incarnation,
                    generation: vm.generation,
                    target_host: m.to.clone(),
                    target_incarnation: m.target_incarnation,
                    uri: r.uri.clone(),
                }),
            );
            ReportOutcome::Events(vec![ready, start])
        }
        ReportKind::MigrationCompleted(r) => {
            let Some((vm, m)) = migrating(state, r.vm, r.target_incarnation) else {
                return ReportOutcome::Events(Vec::new());
            };
            let done = ev(&mut now, EventKind::VmMigrationCompleted(r.clone()));
            // Confirms the new incarnation to its agent, which records it as running.
            let confirm = ev(
                &mut now,
                EventKind::VmStartCommanded(StartVm {
                    vm: r.vm,
                    host: m.to.clone(),
                    incarnation: m.target_incarnation,
                    generation: m.target_generation,
                    spec: vm.spec.clone(),
                }),
            );
            ReportOutcome::Events(vec![done, confirm])
        }
        ReportKind::MigrationFailed(r) => {
            let Some((_, m)) = migrating(state, r.vm, r.target_incarnation) else {
                return ReportOutcome::Events(Vec::new());
            };
            let failed = ev(&mut now, EventKind::VmMigrationFailed(r.clone()));
            // Whatever waits on the destination is stopped; the VM stays where it runs.
            let cleanup = ev(
                &mut now,
                EventKind::VmStopCommanded(StopVm {
                    vm: r.vm,
                    host: m.to.clone(),
                    incarnation: m.target_incarnation,
                    generation: m.target_generation,
                    reason: "migration failed".into(),
                }),
            );
            ReportOutcome::Events(vec![failed, cleanup])
        }
        ReportKind::VmFailed(f) => {
            let Some(vm) = state.vms.get(&f.vm) else {
                return ReportOutcome::Reject(format!("report about unknown VM {}", f.vm));
            };
            if vm.incarnation != Some(f.incarnation) || matches!(vm.status, VmStatus::Deleted | VmStatus::Failed) {
                return ReportOutcome::Events(Vec::new());
            }
            ReportOutcome::Events(vec![ev(&mut now, EventKind::VmFailed(f.clone()))])
        }
    }
}

/// The VM and its migration, if `target` is the incarnation it is migrating to.
fn migrating(state: &ClusterState, vm: VmId, target: IncarnationId) -> Option<(&VmRecord, &novacron_state::Migration)> {
    let rec = state.vms.get(&vm)?;
    let m = rec.migration.as_ref().filter(|m| m.target_incarnation == target)?;
    Some((rec, m))
}

/// The failure detector's settings.
#[derive(Clone, Copy, Debug)]
pub struct FailureTimeouts {
    /// Silence after which a host is suspected (takes no new VMs).
    pub suspect_after: std::time::Duration,
    /// Silence after which it is failed and its VMs are placed elsewhere.
    pub host_failure_timeout: std::time::Duration,
    /// The agents' lease, recorded in `HostFailed`.
    pub agent_lease: std::time::Duration,
}

/// Host failure detection from heartbeat silences (measured by the caller on its own
/// monotonic clock; a host never heard from since the orchestrator started counts from the
/// start, which gives every host a full grace period after a restart).
///
/// Ready → suspected after `suspect_after`; suspected → failed after `host_failure_timeout`;
/// back to ready as soon as heartbeats return. When more than half of the hosts that are not
/// already failed — and at least two — are silent at once, nobody is suspected or failed: the
/// orchestrator itself is probably cut off, and evacuating everything would be the worst
/// response. Healing is paused, and said so with `HealingPaused`, until that clears.
pub fn detect(
    state: &ClusterState,
    silences: &BTreeMap<HostId, std::time::Duration>,
    t: FailureTimeouts,
    stamp: &mut impl Stamp,
    origin: &Origin,
) -> Vec<Envelope> {
    use novacron_state::HostState;
    use novacron_types::event::{HealingPaused, HealingResumed, HostFailed, HostRecovered, HostSuspected};
    let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let silence = |h: &HostId| silences.get(h).copied().unwrap_or_default();
    let mut events = Vec::new();
    let live: Vec<&novacron_state::HostRecord> =
        state.hosts.values().filter(|h| h.state != HostState::Failed).collect();
    let silent = live.iter().filter(|h| silence(&h.id) >= t.suspect_after).count();
    let mass = silent >= 2 && silent * 2 > live.len();
    if mass && !state.healing_paused {
        events.push(envelope(
            stamp,
            origin,
            EventKind::HealingPaused(HealingPaused {
                silent_hosts: u32::try_from(silent).unwrap_or(u32::MAX),
                hosts: u32::try_from(live.len()).unwrap_or(u32::MAX),
                reason: format!(
                    "{silent} of {} hosts went silent at once: the orchestrator may be the one cut off, so no host is \
                     declared failed until this clears",
                    live.len()
                ),
            }),
        ));
    } else if !mass && state.healing_paused {
        events.push(envelope(
            stamp,
            origin,
            EventKind::HealingResumed(HealingResumed { silent_hosts: u32::try_from(silent).unwrap_or(u32::MAX) }),
        ));
    }
    for h in state.hosts.values() {
        let quiet = silence(&h.id);
        let host = h.id.clone();
        match h.state {
            HostState::Suspect | HostState::Failed if quiet < t.suspect_after => {
                events.push(envelope(stamp, origin, EventKind::HostRecovered(HostRecovered { host })));
            }
            _ if mass => {}
            HostState::Ready if quiet >= t.suspect_after => {
                events.push(envelope(
                    stamp,
                    origin,
                    EventKind::HostSuspected(HostSuspected { host, silent_ms: ms(quiet) }),
                ));
            }
            HostState::Suspect if quiet >= t.host_failure_timeout => {
                events.push(envelope(
                    stamp,
                    origin,
                    EventKind::HostFailed(HostFailed {
                        host,
                        silent_ms: ms(quiet),
                        agent_lease_ms: ms(t.agent_lease),
                        host_failure_timeout_ms: ms(t.host_failure_timeout),
                    }),
                ));
            }
            _ => {}
        }
    }
    events
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
fn restart_step(
    state: &ClusterState,
    vm: &VmRecord,
    now: u64,
    t: RestartTimings,
    reserved: &BTreeMap<HostId, Resources>,
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
    let avoid: Vec<HostId> = if fails_here >= 2 { vm.host.iter().cloned().collect() } else { Vec::new() };
    let credit = if avoid.is_empty() { vm.host.clone().map(|h| (h, vm.spec.resources())) } else { None };
    // In place when it may stay (its disk and warm caches are there); else wherever fits.
    let mut decision = match (&credit, &vm.host) {
        (Some(_), Some(current)) => {
            let others: Vec<HostId> = state.hosts.keys().filter(|h| *h != current).cloned().collect();
            let here = novacron_scheduler::PlacementRequest {
                need: vm.spec.resources(),
                avoid: others,
                credit: credit.clone(),
            };
            novacron_scheduler::place_request(state, &here, reserved)
        }
        _ => Placement::Unplaceable { reason: String::new(), explanation: Default::default() },
    };
    if matches!(decision, Placement::Unplaceable { .. }) {
        let req = novacron_scheduler::PlacementRequest { need: vm.spec.resources(), avoid, credit };
        decision = novacron_scheduler::place_request(state, &req, reserved);
    }
    if let Placement::Host { explanation, host } = &mut decision {
        let moved = if Some(&*host) == vm.host.as_ref() { String::new() } else { " on another host".to_owned() };
        explanation.trigger = Some(format!("restart{moved} after failure {n} (backoff {} ms)", backoff));
    }
    Some(Ok(decision))
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
    // Migrations in flight, per source host and in all, for the drain's concurrency limits.
    let mut migrating_from: BTreeMap<HostId, usize> = BTreeMap::new();
    for vm in state.vms.values().filter(|v| v.migration.is_some()) {
        if let Some(h) = &vm.host {
            *migrating_from.entry(h.clone()).or_default() += 1;
        }
    }
    let mut migrating_total: usize = migrating_from.values().sum();
    let mut events = Vec::new();
    let mut reserved: BTreeMap<HostId, Resources> = BTreeMap::new();
    for vm in state.vms.values() {
        let on_failed_host = vm
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
            let mut decision = novacron_scheduler::place(state, vm.spec.resources(), &reserved);
            if let Placement::Host { host, explanation } = &mut decision {
                let r = reserved.entry(host.clone()).or_default();
                *r = r.checked_add(vm.spec.resources()).unwrap_or(*r);
                explanation.trigger = vm.host.as_ref().map(|h| format!("host {h} failed"));
            }
            events.extend(placement_events(
                state,
                vm.id,
                &vm.spec,
                vm.generation,
                decision,
                vm.pending_reason.as_deref(),
                stamp,
                origin,
            ));
            continue;
        }
        let restartable = match vm.spec.restart {
            novacron_types::RestartPolicy::Never => false,
            novacron_types::RestartPolicy::OnFailure => vm.status == VmStatus::Failed,
            novacron_types::RestartPolicy::Always => matches!(vm.status, VmStatus::Failed | VmStatus::Stopped),
        };
        if restartable && !vm.gave_up && !vm.delete_requested {
            let now = stamp.now_ms();
            match restart_step(state, vm, now, restart, &reserved) {
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
                    if let Placement::Host { host, .. } = &decision {
                        let r = reserved.entry(host.clone()).or_default();
                        *r = r.checked_add(vm.spec.resources()).unwrap_or(*r);
                    }
                    events.extend(placement_events(
                        state,
                        vm.id,
                        &vm.spec,
                        vm.generation,
                        decision,
                        vm.pending_reason.as_deref(),
                        stamp,
                        origin,
                    ));
                }
            }
            continue;
        }
        let draining = vm
            .host
            .as_ref()
            .filter(|h| state.hosts.get(*h).is_some_and(|r| r.admin == novacron_state::HostAdmin::Draining));
        if let Some(source) = draining
            && !vm.delete_requested
        {
            let reason = format!("draining host {source}");
            match vm.status {
                VmStatus::Running if vm.migration_failed_from.as_ref() != Some(source) => {
                    let here = migrating_from.get(source).copied().unwrap_or(0);
                    if here < settings.migrations.per_host && migrating_total < settings.migrations.cluster {
                        match plan_migration(state, vm, None, &reason, &reserved, stamp, origin) {
                            Ok((_, planned)) => {
                                if let Some(EventKind::VmMigrationPlanned(p)) = planned.first().map(|e| &e.event) {
                                    let r = reserved.entry(p.to.clone()).or_default();
                                    *r = r.checked_add(vm.spec.resources()).unwrap_or(*r);
                                }
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
                    let req = novacron_scheduler::PlacementRequest {
                        need: vm.spec.resources(),
                        avoid: vec![source.clone()],
                        credit: None,
                    };
                    let mut decision = novacron_scheduler::place_request(state, &req, &reserved);
                    if let Placement::Host { host, explanation } = &mut decision {
                        let r = reserved.entry(host.clone()).or_default();
                        *r = r.checked_add(vm.spec.resources()).unwrap_or(*r);
                        explanation.trigger = Some(reason.clone());
                    }
                    events.extend(placement_events(
                        state,
                        vm.id,
                        &vm.spec,
                        vm.generation,
                        decision,
                        vm.pending_reason.as_deref(),
                        stamp,
                        origin,
                    ));
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
                let decision = novacron_scheduler::place(state, vm.spec.resources(), &reserved);
                if let Placement::Host { host, .. } = &decision {
                    let r = reserved.entry(host.clone()).or_default();
                    *r = r.checked_add(vm.spec.resources()).unwrap_or(*r);
                }
                events.extend(placement_events(
                    state,
                    vm.id,
                    &vm.spec,
                    vm.generation,
                    decision,
                    vm.pending_reason.as_deref(),
                    stamp,
                    origin,
                ));
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

/// Like [`deletion_step`], but only where a step is still missing: a VM already `Stopping`
/// waits for its report; one `Running` after a stop command is waiting too.
fn deletion_step_if_needed(vm: &VmRecord, stamp: &mut impl Stamp, origin: &Origin) -> Option<Envelope> {
    match vm.status {
        VmStatus::Deleted | VmStatus::Stopping | VmStatus::Migrating => None,
        _ => deletion_step(vm, stamp, origin),
    }
}

#[cfg(test)]
mod tests {
    use novacron_types::event::HostRegistered;
    use novacron_types::report::HostRegistration;
    use novacron_types::{ReportId, SCHEMA_VERSION};

    use super::*;

    struct Fixed(u128);
    impl Stamp for Fixed {
        fn now_ms(&mut self) -> u64 {
            7
        }
        fn vm_id(&mut self) -> VmId {
            self.0 += 1;
            VmId(Uuid::from_u128(self.0))
        }
        fn incarnation_id(&mut self) -> IncarnationId {
            self.0 += 1;
            IncarnationId(Uuid::from_u128(self.0))
        }
    }

    fn origin() -> Origin {
        Origin { actor: Actor::User("t".into()), correlation: None }
    }

    fn spec(name: &str, vcpus: u32) -> VmSpec {
        VmSpec {
            name: name.into(),
            vcpus,
            memory_mib: 1024,
            disk_gib: 0,
            group: None,
            labels: Default::default(),
            restart: Default::default(),
        }
    }

    fn apply_all(state: &mut ClusterState, events: &[Envelope]) {
        for e in events {
            let seq = state.seq + 1;
            state.apply(seq, e);
        }
    }

    fn with_host(vcpus: u32) -> ClusterState {
        let mut s = ClusterState::default();
        let e = Envelope::new(
            0,
            Actor::Agent(HostId::new("h1").unwrap()),
            EventKind::HostRegistered(HostRegistered {
                host: HostId::new("h1").unwrap(),
                capacity: Resources { vcpus, memory_mib: 65536, disk_gib: 0 },
                labels: Default::default(),
                driver: "sim".into(),
            }),
        );
        apply_all(&mut s, &[e]);
        s
    }

    #[test]
    fn create_places_and_commands_the_start_in_one_decision() {
        let mut s = with_host(8);
        let (vm, events) = create_vm(&s, spec("a", 2), &mut Fixed(0), &origin()).unwrap();
        let kinds: Vec<_> = events.iter().map(|e| e.event.name()).collect();
        assert_eq!(kinds, ["VmRequested", "VmPlaced", "VmStartCommanded"]);
        apply_all(&mut s, &events);
        assert_eq!(s.vms[&vm].status, VmStatus::Starting);
        assert_eq!(s.vms[&vm].generation, Generation(1));
        assert_eq!(create_vm(&s, spec("a", 1), &mut Fixed(9), &origin()).unwrap_err(), Refusal::NameInUse("a".into()));
    }

    #[test]
    fn a_pending_vm_is_placed_when_capacity_appears_and_failure_is_not_repeated() {
        let mut s = ClusterState::default();
        let (vm, events) = create_vm(&s, spec("big", 4), &mut Fixed(0), &origin()).unwrap();
        assert_eq!(events.last().unwrap().event.name(), "VmPlacementFailed");
        apply_all(&mut s, &events);
        assert!(reconcile(&s, &mut Fixed(10), &origin()).is_empty(), "same failure is not appended again");

        let reg = Report {
            schema: SCHEMA_VERSION,
            id: ReportId(Uuid::from_u128(99)),
            host: HostId::new("h1").unwrap(),
            at_ms: 1,
            report: ReportKind::HostRegistration(HostRegistration {
                capacity: Resources { vcpus: 8, memory_mib: 8192, disk_gib: 0 },
                labels: Default::default(),
                driver: "sim".into(),
            }),
        };
        let ReportOutcome::Events(reg_events) = report(&s, &reg, &mut Fixed(20)) else { panic!() };
        apply_all(&mut s, &reg_events);
        let ReportOutcome::Events(again) = report(&s, &reg, &mut Fixed(30)) else { panic!() };
        assert!(again.is_empty(), "a repeated registration changes nothing");

        let placed = reconcile(&s, &mut Fixed(40), &origin());
        apply_all(&mut s, &placed);
        assert_eq!(s.vms[&vm].status, VmStatus::Starting);
    }

    #[test]
    fn reconcile_never_double_books_a_host_in_one_pass() {
        let mut s = ClusterState::default();
        for i in 0..5 {
            let (_, ev) = create_vm(&s, spec(&format!("v{i}"), 2), &mut Fixed(i * 100), &origin()).unwrap();
            apply_all(&mut s, &ev);
        }
        let host = with_host(4);
        apply_all(
            &mut s,
            &[Envelope::new(
                0,
                Actor::Agent(HostId::new("h1").unwrap()),
                EventKind::HostRegistered(HostRegistered {
                    host: HostId::new("h1").unwrap(),
                    capacity: host.hosts.values().next().unwrap().capacity,
                    labels: Default::default(),
                    driver: "sim".into(),
                }),
            )],
        );
        let events = reconcile(&s, &mut Fixed(1000), &origin());
        apply_all(&mut s, &events);
        let h = s.hosts.values().next().unwrap();
        assert_eq!(h.vms.len(), 2, "4 vCPUs hold two 2-vCPU VMs, no more");
        assert!(h.allocated.fits_within(h.capacity));
    }

    #[test]
    fn reports_from_unknown_hosts_or_about_unknown_vms_are_rejected() {
        let s = with_host(8);
        let r = |host: &str| Report {
            schema: SCHEMA_VERSION,
            id: ReportId(Uuid::from_u128(3)),
            host: HostId::new(host).unwrap(),
            at_ms: 1,
            report: ReportKind::VmRunning(novacron_types::event::VmIncarnationReport {
                vm: VmId(Uuid::from_u128(1)),
                host: HostId::new(host).unwrap(),
                incarnation: IncarnationId(Uuid::from_u128(2)),
                generation: Generation(1),
            }),
        };
        let ReportOutcome::Reject(why) = report(&s, &r("stranger"), &mut Fixed(0)) else {
            panic!("a report from an unknown host must be rejected")
        };
        assert!(why.contains("unknown host stranger"), "{why}");
        let ReportOutcome::Reject(why) = report(&s, &r("h1"), &mut Fixed(0)) else {
            panic!("a report about an unknown VM must be rejected")
        };
        assert!(why.contains("unknown VM"), "{why}");
    }

    #[test]
    fn deleting_a_running_vm_stops_it_first() {
        let mut s = with_host(8);
        let (vm, events) = create_vm(&s, spec("a", 2), &mut Fixed(0), &origin()).unwrap();
        apply_all(&mut s, &events);
        let (_, del) = delete_vm(&s, "a", &mut Fixed(50), &origin()).unwrap();
        let kinds: Vec<_> = del.iter().map(|e| e.event.name()).collect();
        assert_eq!(kinds, ["VmDeleteRequested", "VmStopCommanded"]);
        apply_all(&mut s, &del);
        assert!(reconcile(&s, &mut Fixed(60), &origin()).is_empty(), "waits for the stop report");
        assert_eq!(delete_vm(&s, "nope", &mut Fixed(70), &origin()).unwrap_err(), Refusal::NotFound("nope".into()));
        let _ = vm;
    }

    fn hosts(n: u32) -> ClusterState {
        let mut s = ClusterState::default();
        for i in 1..=n {
            let e = Envelope::new(
                0,
                Actor::Agent(HostId::new(format!("h{i}")).unwrap()),
                EventKind::HostRegistered(HostRegistered {
                    host: HostId::new(format!("h{i}")).unwrap(),
                    capacity: Resources { vcpus: 8, memory_mib: 65536, disk_gib: 0 },
                    labels: Default::default(),
                    driver: "sim".into(),
                }),
            );
            apply_all(&mut s, &[e]);
        }
        s
    }

    const T: FailureTimeouts = FailureTimeouts {
        suspect_after: std::time::Duration::from_secs(5),
        host_failure_timeout: std::time::Duration::from_secs(30),
        agent_lease: std::time::Duration::from_secs(10),
    };

    fn silences(quiet: &[(&str, u64)]) -> BTreeMap<HostId, std::time::Duration> {
        quiet.iter().map(|(h, s)| (HostId::new(*h).unwrap(), std::time::Duration::from_secs(*s))).collect()
    }

    fn names(events: &[Envelope]) -> Vec<&'static str> {
        events.iter().map(|e| e.event.name()).collect()
    }

    #[test]
    fn a_silent_host_is_suspected_then_failed_and_recovers_when_it_speaks() {
        let mut s = hosts(3);
        let quiet = silences(&[("h1", 6), ("h2", 0), ("h3", 0)]);
        let e = detect(&s, &quiet, T, &mut Fixed(0), &origin());
        assert_eq!(names(&e), ["HostSuspected"]);
        apply_all(&mut s, &e);
        assert!(detect(&s, &silences(&[("h1", 29), ("h2", 0), ("h3", 0)]), T, &mut Fixed(0), &origin()).is_empty());
        let e = detect(&s, &silences(&[("h1", 31), ("h2", 0), ("h3", 0)]), T, &mut Fixed(0), &origin());
        assert_eq!(names(&e), ["HostFailed"]);
        let EventKind::HostFailed(f) = &e[0].event else { unreachable!() };
        assert_eq!((f.silent_ms, f.agent_lease_ms), (31_000, 10_000), "the event says the lease was waited out");
        apply_all(&mut s, &e);
        let e = detect(&s, &silences(&[("h1", 0), ("h2", 0), ("h3", 0)]), T, &mut Fixed(0), &origin());
        assert_eq!(names(&e), ["HostRecovered"]);
    }

    #[test]
    fn when_most_hosts_go_silent_at_once_healing_pauses_instead_of_evacuating() {
        let mut s = hosts(3);
        let e = detect(&s, &silences(&[("h1", 40), ("h2", 40), ("h3", 0)]), T, &mut Fixed(0), &origin());
        assert_eq!(names(&e), ["HealingPaused"], "no host is suspected or failed");
        apply_all(&mut s, &e);
        assert!(s.healing_paused);
        assert!(detect(&s, &silences(&[("h1", 90), ("h2", 90), ("h3", 0)]), T, &mut Fixed(0), &origin()).is_empty());
        let e = detect(&s, &silences(&[("h1", 0), ("h2", 0), ("h3", 0)]), T, &mut Fixed(0), &origin());
        assert_eq!(names(&e), ["HealingResumed"]);
    }

    #[test]
    fn vms_of_a_failed_host_are_placed_elsewhere_with_the_next_generation() {
        let mut s = hosts(2);
        let (vm, ev) = create_vm(&s, spec("a", 2), &mut Fixed(0), &origin()).unwrap();
        apply_all(&mut s, &ev);
        let h1 = HostId::new("h1").unwrap();
        assert_eq!(s.vms[&vm].host.as_ref(), Some(&h1));
        let down = detect(&s, &silences(&[("h1", 6), ("h2", 0)]), T, &mut Fixed(0), &origin());
        apply_all(&mut s, &down);
        assert!(reconcile(&s, &mut Fixed(10), &origin()).is_empty(), "a suspect host keeps its VMs");
        let failed = detect(&s, &silences(&[("h1", 31), ("h2", 0)]), T, &mut Fixed(0), &origin());
        apply_all(&mut s, &failed);
        let healing = reconcile(&s, &mut Fixed(20), &origin());
        assert_eq!(names(&healing), ["VmPlaced", "VmStartCommanded"]);
        let EventKind::VmPlaced(p) = &healing[0].event else { unreachable!() };
        assert_eq!(p.explanation.trigger.as_deref(), Some("host h1 failed"));
        apply_all(&mut s, &healing);
        let v = &s.vms[&vm];
        assert_eq!((v.host.clone(), v.generation), (Some(HostId::new("h2").unwrap()), Generation(2)));
        assert_eq!(s.hosts[&h1].allocated, Resources::ZERO);
    }

    #[test]
    fn a_superseded_incarnation_reported_running_is_told_to_stop() {
        let mut s = hosts(2);
        let (vm, ev) = create_vm(&s, spec("a", 2), &mut Fixed(0), &origin()).unwrap();
        apply_all(&mut s, &ev);
        let old = s.vms[&vm].incarnation.unwrap();
        for quiet in [6, 31] {
            let e = detect(&s, &silences(&[("h1", quiet), ("h2", 0)]), T, &mut Fixed(0), &origin());
            apply_all(&mut s, &e);
        }
        let healed = reconcile(&s, &mut Fixed(20), &origin());
        apply_all(&mut s, &healed);
        let stale = Report {
            schema: SCHEMA_VERSION,
            id: ReportId(Uuid::from_u128(77)),
            host: HostId::new("h1").unwrap(),
            at_ms: 1,
            report: ReportKind::VmRunning(novacron_types::event::VmIncarnationReport {
                vm,
                host: HostId::new("h1").unwrap(),
                incarnation: old,
                generation: Generation(1),
            }),
        };
        let ReportOutcome::Events(e) = report(&s, &stale, &mut Fixed(30)) else { panic!("not a rejection") };
        assert_eq!(names(&e), ["VmStopCommanded"]);
        let EventKind::VmStopCommanded(c) = &e[0].event else { unreachable!() };
        assert_eq!((c.host.as_str(), c.incarnation), ("h1", old));
    }

    /// A stamp whose clock the test moves.
    struct Clock {
        ids: u128,
        now: u64,
    }
    impl Stamp for Clock {
        fn now_ms(&mut self) -> u64 {
            self.now
        }
        fn vm_id(&mut self) -> VmId {
            self.ids += 1;
            VmId(Uuid::from_u128(self.ids))
        }
        fn incarnation_id(&mut self) -> IncarnationId {
            self.ids += 1;
            IncarnationId(Uuid::from_u128(self.ids))
        }
    }

    fn fail_now(s: &mut ClusterState, vm: VmId, at_ms: u64) {
        let r = &s.vms[&vm];
        let e = Envelope::new(
            at_ms,
            Actor::Agent(r.host.clone().unwrap()),
            EventKind::VmFailed(novacron_types::event::VmFailed {
                vm,
                host: r.host.clone().unwrap(),
                incarnation: r.incarnation.unwrap(),
                generation: r.generation,
                reason: "crashed".into(),
            }),
        );
        apply_all(s, &[e]);
    }

    #[test]
    fn a_crashing_vm_is_restarted_with_backoff_then_moved_then_given_up() {
        let t = RestartTimings {
            backoff_base: std::time::Duration::from_secs(1),
            backoff_max: std::time::Duration::from_secs(60),
            max_restarts: 3,
            window: std::time::Duration::from_secs(600),
        };
        let mut s = hosts(2);
        let mut clock = Clock { ids: 1000, now: 0 };
        let (vm, ev) = create_vm(&s, spec("crashy", 2), &mut clock, &origin()).unwrap();
        apply_all(&mut s, &ev);
        let h1 = HostId::new("h1").unwrap();

        fail_now(&mut s, vm, 10_000);
        clock.now = 10_500;
        assert!(reconcile_with(&s, &mut clock, &origin(), t).is_empty(), "waits out the backoff");
        clock.now = 11_000;
        let e = reconcile_with(&s, &mut clock, &origin(), t);
        assert_eq!(names(&e), ["VmPlaced", "VmStartCommanded"]);
        let EventKind::VmPlaced(p) = &e[0].event else { unreachable!() };
        assert_eq!(p.host, h1, "first restart in place");
        assert_eq!(p.generation, Generation(2));
        assert!(p.explanation.trigger.as_deref().unwrap().contains("after failure 1"));
        apply_all(&mut s, &e);

        fail_now(&mut s, vm, 20_000);
        clock.now = 21_500;
        assert!(reconcile_with(&s, &mut clock, &origin(), t).is_empty(), "the backoff doubled to 2 s");
        clock.now = 22_000;
        let e = reconcile_with(&s, &mut clock, &origin(), t);
        let EventKind::VmPlaced(p) = &e[0].event else { panic!("{:?}", names(&e)) };
        assert_eq!(p.host.as_str(), "h2", "two failures on h1: tried elsewhere");
        assert!(p.explanation.trigger.as_deref().unwrap().contains("on another host"));
        apply_all(&mut s, &e);
        assert_eq!(s.hosts[&h1].allocated, Resources::ZERO);

        fail_now(&mut s, vm, 30_000);
        clock.now = 40_000;
        let e = reconcile_with(&s, &mut clock, &origin(), t);
        assert_eq!(names(&e), ["VmPlaced", "VmStartCommanded"], "third failure: restarted once more");
        let EventKind::VmPlaced(p) = &e[0].event else { unreachable!() };
        assert_eq!(p.host.as_str(), "h2", "one failure on h2: restarted in place there");
        apply_all(&mut s, &e);
        fail_now(&mut s, vm, 50_000);
        clock.now = 60_000;
        let e = reconcile_with(&s, &mut clock, &origin(), t);
        assert_eq!(names(&e), ["VmGaveUp"], "a fourth failure exceeds 3 restarts");
        apply_all(&mut s, &e);
        assert!(s.vms[&vm].gave_up);
        clock.now = 999_000;
        assert!(reconcile_with(&s, &mut clock, &origin(), t).is_empty(), "given up stays given up");
    }

    #[test]
    fn a_vm_with_restart_never_stays_failed() {
        let mut s = hosts(1);
        let mut clock = Clock { ids: 0, now: 0 };
        let mut sp = spec("once", 1);
        sp.restart = novacron_types::RestartPolicy::Never;
        let (vm, ev) = create_vm(&s, sp, &mut clock, &origin()).unwrap();
        apply_all(&mut s, &ev);
        fail_now(&mut s, vm, 1_000);
        clock.now = 1_000_000;
        assert!(reconcile_with(&s, &mut clock, &origin(), RestartTimings::default()).is_empty());
    }

    #[test]
    fn host_actions_are_idempotent_and_refused_in_the_wrong_state() {
        let mut s = hosts(2);
        let (_, e) = host_action(&s, "h1", HostAction::Cordon, &mut Fixed(0), &origin()).unwrap();
        assert_eq!(names(&e), ["HostCordoned"]);
        apply_all(&mut s, &e);
        let (_, again) = host_action(&s, "h1", HostAction::Cordon, &mut Fixed(0), &origin()).unwrap();
        assert!(again.is_empty(), "cordoning twice is a no-op");
        assert!(
            create_vm(&s, spec("a", 1), &mut Fixed(10), &origin())
                .unwrap()
                .1
                .iter()
                .all(|e| { !matches!(&e.event, EventKind::VmPlaced(p) if p.host.as_str() == "h1") })
        );
        let (_, e) = host_action(&s, "h1", HostAction::Uncordon, &mut Fixed(0), &origin()).unwrap();
        assert_eq!(names(&e), ["HostUncordoned"]);
        let cordoned = s.clone();
        apply_all(&mut s, &e);
        assert_eq!(s.hosts[&HostId::new("h1").unwrap()].status(), "ready");
        // Health is tracked apart from the cordon: a cordoned host that goes silent still fails.
        let mut c = cordoned;
        for quiet in [6, 31] {
            let e = detect(&c, &silences(&[("h1", quiet), ("h2", 0)]), T, &mut Fixed(0), &origin());
            apply_all(&mut c, &e);
        }
        assert_eq!(c.hosts[&HostId::new("h1").unwrap()].status(), "failed");
        assert!(matches!(
            host_action(&s, "nope", HostAction::Drain, &mut Fixed(0), &origin()),
            Err(Refusal::NotFound(_))
        ));
        // A failed host cannot be drained.
        for quiet in [6, 31] {
            let e = detect(&s, &silences(&[("h1", quiet), ("h2", 0)]), T, &mut Fixed(0), &origin());
            apply_all(&mut s, &e);
        }
        assert!(matches!(
            host_action(&s, "h1", HostAction::Drain, &mut Fixed(0), &origin()),
            Err(Refusal::Conflict(_))
        ));
    }

    fn run_vm_on(s: &mut ClusterState, vm: VmId, host: &str) {
        let r = &s.vms[&vm];
        let e = Envelope::new(
            0,
            Actor::Agent(HostId::new(host).unwrap()),
            EventKind::VmRunning(novacron_types::event::VmIncarnationReport {
                vm,
                host: HostId::new(host).unwrap(),
                incarnation: r.incarnation.unwrap(),
                generation: r.generation,
            }),
        );
        apply_all(s, &[e]);
    }

    #[test]
    fn a_drain_migrates_within_its_limits_and_moves_cold_what_cannot_migrate() {
        let mut s = hosts(3);
        let mut vms = Vec::new();
        for i in 0..3 {
            let (vm, ev) = create_vm(&s, spec(&format!("v{i}"), 1), &mut Fixed(100 * (i + 1)), &origin()).unwrap();
            apply_all(&mut s, &ev);
            run_vm_on(&mut s, vm, "h1");
            vms.push(vm);
        }
        let (_, e) = host_action(&s, "h1", HostAction::Drain, &mut Fixed(0), &origin()).unwrap();
        apply_all(&mut s, &e);
        let limits =
            ReconcileSettings { migrations: MigrationLimits { per_host: 2, cluster: 8 }, ..Default::default() };
        let e = reconcile_with(&s, &mut Fixed(1000), &origin(), limits);
        let planned = e.iter().filter(|e| matches!(e.event, EventKind::VmMigrationPlanned(_))).count();
        assert_eq!(planned, 2, "at most two migrations out of one host at once");
        apply_all(&mut s, &e);
        assert!(
            reconcile_with(&s, &mut Fixed(2000), &origin(), limits)
                .iter()
                .all(|e| !matches!(e.event, EventKind::VmMigrationPlanned(_)))
        );

        // One migration fails: that VM is moved cold — stopped first.
        let failing = vms.iter().copied().find(|v| s.vms[v].migration.is_some()).unwrap();
        let target = s.vms[&failing].migration.as_ref().unwrap().target_incarnation;
        let failed = Envelope::new(
            0,
            Actor::Agent(HostId::new("h1").unwrap()),
            EventKind::VmMigrationFailed(novacron_types::event::VmMigrationFailed {
                vm: failing,
                reported_by: HostId::new("h1").unwrap(),
                target_incarnation: target,
                reason: "test".into(),
            }),
        );
        apply_all(&mut s, &[failed]);
        let e = reconcile_with(&s, &mut Fixed(3000), &origin(), limits);
        assert!(
            e.iter().any(|e| matches!(&e.event, EventKind::VmStopCommanded(c) if c.vm == failing)),
            "{:?}",
            names(&e)
        );
        apply_all(&mut s, &e);
        let stopped = Envelope::new(
            0,
            Actor::Agent(HostId::new("h1").unwrap()),
            EventKind::VmStopped(novacron_types::event::VmIncarnationReport {
                vm: failing,
                host: HostId::new("h1").unwrap(),
                incarnation: s.vms[&failing].incarnation.unwrap(),
                generation: s.vms[&failing].generation,
            }),
        );
        apply_all(&mut s, &[stopped]);
        let e = reconcile_with(&s, &mut Fixed(4000), &origin(), limits);
        let placed = e.iter().find_map(|e| match &e.event {
            EventKind::VmPlaced(p) if p.vm == failing => Some(p.host.clone()),
            _ => None,
        });
        assert!(placed.is_some_and(|h| h.as_str() != "h1"), "then placed elsewhere: {:?}", names(&e));
    }
}
