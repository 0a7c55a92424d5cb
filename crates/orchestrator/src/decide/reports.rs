//! Turning agents' reports into events, checked against the state.

use novacron_state::{ClusterState, VmRecord, VmStatus};
use novacron_types::event::HostRegistered;
use novacron_types::report::HostRegistration;
use novacron_types::{
    Actor, Envelope, EventKind, IncarnationId, MigrateOut, Report, ReportKind, StartVm, StopVm, VmId, VmSpec,
};

use super::*;

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

/// The VM a report concerns, if it may be decided in one batch with creates and other
/// reports against the same state (see [`decide_batch`]). A VM report reads only its host's
/// registration and its own VM record, and changes only that record; it never gives a create
/// resources that the state before it lacks (a VM reported stopped or failed frees them, a
/// finished migration frees its source) — so against the state before the batch, creates are
/// placed as they would be without it, or more cautiously. A registration (new capacity,
/// new labels) is decided alone: a create must see it.
#[must_use]
pub fn batch_key(report: &Report) -> Option<VmId> {
    match &report.report {
        ReportKind::HostRegistration(_) => None,
        ReportKind::VmRunning(r) | ReportKind::VmStopped(r) => Some(r.vm),
        ReportKind::VmFailed(f) => Some(f.vm),
        ReportKind::IncomingReady(r) => Some(r.vm),
        ReportKind::MigrationCompleted(r) => Some(r.vm),
        ReportKind::MigrationFailed(r) => Some(r.vm),
    }
}

/// What one batch decided: a verdict per report (its events, or why it is refused), a result
/// per create request, and every event to append, reports' first.
#[derive(Debug)]
pub struct BatchDecision {
    /// Per report, in order: `Ok(())` accepted (its events, if any, are in `events`), or the
    /// reason to dead-letter it.
    pub reports: Vec<Result<(), String>>,
    /// Per create request, in order: its VMs, or why none was created.
    pub creates: Vec<Result<Vec<VmId>, Refusal>>,
    /// What to append, as one pipelined batch.
    pub events: Vec<Envelope>,
}

/// Decides agents' reports and create requests together, all against `state` — one planning
/// pass and one append for the lot. The reports must concern distinct VMs, and a registration
/// must come alone ([`batch_key`]); then each is decided exactly as alone, and the creates as
/// alone or more cautiously.
pub fn decide_batch(
    state: &ClusterState,
    reports: &[&Report],
    creates: &[(Vec<VmSpec>, Origin)],
    planning: &Planning,
    stamp: &mut impl Stamp,
) -> BatchDecision {
    let mut events = Vec::new();
    let reports = reports
        .iter()
        .map(|r| match report(state, r, stamp) {
            ReportOutcome::Events(e) => {
                events.extend(e);
                Ok(())
            }
            ReportOutcome::Reject(reason) => Err(reason),
        })
        .collect();
    let creates = if creates.is_empty() {
        Vec::new()
    } else {
        let (results, e) = create_vm_groups(state, creates, planning, stamp);
        events.extend(e);
        results
    };
    BatchDecision { reports, creates, events }
}

/// The VM and its migration, if `target` is the incarnation it is migrating to.
pub(crate) fn migrating(
    state: &ClusterState,
    vm: VmId,
    target: IncarnationId,
) -> Option<(&VmRecord, &novacron_state::Migration)> {
    let rec = state.vms.get(&vm)?;
    let m = rec.migration.as_ref().filter(|m| m.target_incarnation == target)?;
    Some((rec, m))
}
