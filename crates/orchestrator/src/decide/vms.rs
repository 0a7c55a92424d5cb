//! Decisions about one VM: create, delete, migrate; and the placement events they share.

use novacron_state::{ClusterState, VmRecord, VmStatus};
use novacron_types::event::{
    VmDeleteRequested, VmDeleted, VmMigrationPlanned, VmPlaced, VmPlacementFailed, VmRequested,
};
use novacron_types::{Envelope, EventKind, Generation, HostId, PrepareIncoming, StartVm, StopVm, VmId, VmSpec};

use novacron_scheduler::{Placement, Planner};

use super::*;

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
    create_vm_with(state, spec, &Planning::default(), stamp, origin)
}

/// [`create_vm`] with the cluster's planner settings and load view.
///
/// # Errors
/// As [`create_vm`].
pub fn create_vm_with(
    state: &ClusterState,
    spec: VmSpec,
    planning: &Planning,
    stamp: &mut impl Stamp,
    origin: &Origin,
) -> Result<(VmId, Vec<Envelope>), Refusal> {
    let (ids, events) = create_vms_with(state, vec![spec], planning, stamp, origin)?;
    Ok((ids[0], events))
}

/// Several new VMs placed in one planning pass: each sees the hosts the earlier ones took.
///
/// # Errors
/// A [`Refusal`] when a name is taken (or repeated in the batch); nothing is created then.
pub fn create_vms_with(
    state: &ClusterState,
    specs: Vec<VmSpec>,
    planning: &Planning,
    stamp: &mut impl Stamp,
    origin: &Origin,
) -> Result<(Vec<VmId>, Vec<Envelope>), Refusal> {
    let (mut results, events) = create_vm_groups(state, &[(specs, origin.clone())], planning, stamp);
    let ids = results.pop().unwrap_or_else(|| Ok(Vec::new()))?;
    Ok((ids, events))
}

/// Several independent create requests decided in one planning pass (the engine's group
/// commit): each request is checked on its own — a refused one (a name taken, here or by an
/// earlier request of the group) creates nothing and does not affect the others — and the
/// accepted ones are placed by one planner, so later requests see the reservations of earlier
/// ones. Returns, per request, its VM ids or its refusal, and all the events in request order.
pub fn create_vm_groups(
    state: &ClusterState,
    requests: &[(Vec<VmSpec>, Origin)],
    planning: &Planning,
    stamp: &mut impl Stamp,
) -> (Vec<Result<Vec<VmId>, Refusal>>, Vec<Envelope>) {
    let mut taken = std::collections::BTreeSet::new();
    let mut accepted: Vec<&VmSpec> = Vec::new();
    let config = planner_config(state, &planning.config);
    let mut planner = Planner::new(state, &config, &planning.load);
    let mut results = Vec::with_capacity(requests.len());
    let mut events = Vec::new();
    for (specs, origin) in requests {
        let mut names = std::collections::BTreeSet::new();
        if let Some(spec) = specs
            .iter()
            .find(|s| state.names.contains_key(&s.name) || taken.contains(&s.name) || !names.insert(s.name.clone()))
        {
            results.push(Err(Refusal::NameInUse(spec.name.clone())));
            continue;
        }
        // Quotas and the policies' own label rules, counting the batch's earlier VMs.
        let mut admitted: Vec<&VmSpec> = accepted.clone();
        let mut refused = None;
        for spec in specs {
            if let Err(why) = novacron_policy::enforce::admit(state, spec, &admitted) {
                refused = Some(why);
                break;
            }
            admitted.push(spec);
        }
        if let Some(why) = refused {
            results.push(Err(Refusal::Conflict(why)));
            continue;
        }
        accepted = admitted;
        taken.extend(names);
        let mut ids = Vec::with_capacity(specs.len());
        for spec in specs {
            let vm = stamp.vm_id();
            events.push(envelope(stamp, origin, EventKind::VmRequested(VmRequested { vm, spec: spec.clone() })));
            let decision = planner.place(&request_for_spec(state, spec));
            events.extend(placement_events(state, vm, spec, Generation(0), decision, None, stamp, origin));
            ids.push(vm);
        }
        results.push(Ok(ids));
    }
    (results, events)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn placement_events(
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
            explanation.policy_version = (state.policy_version > 0).then_some(state.policy_version);
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
        Placement::Unplaceable { reason, mut explanation } => {
            explanation.policy_version = (state.policy_version > 0).then_some(state.policy_version);
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
pub(crate) fn deletion_step(vm: &VmRecord, stamp: &mut impl Stamp, origin: &Origin) -> Option<Envelope> {
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

/// Like [`deletion_step`], but only where a step is still missing: a VM already `Stopping`
/// waits for its report; one `Running` after a stop command is waiting too.
pub(crate) fn deletion_step_if_needed(vm: &VmRecord, stamp: &mut impl Stamp, origin: &Origin) -> Option<Envelope> {
    match vm.status {
        VmStatus::Deleted | VmStatus::Stopping | VmStatus::Migrating => None,
        _ => deletion_step(vm, stamp, origin),
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
    migrate_vm_with(state, key, to, reason, &Planning::default(), stamp, origin)
}

/// [`migrate_vm`] with the cluster's planner settings and load view.
///
/// # Errors
/// As [`migrate_vm`].
pub fn migrate_vm_with(
    state: &ClusterState,
    key: &str,
    to: Option<&str>,
    reason: &str,
    planning: &Planning,
    stamp: &mut impl Stamp,
    origin: &Origin,
) -> Result<(VmId, Vec<Envelope>), Refusal> {
    let vm = find_vm(state, key).ok_or_else(|| Refusal::NotFound(key.to_owned()))?;
    let config = planner_config(state, &planning.config);
    let mut planner = Planner::new(state, &config, &planning.load);
    plan_migration(state, vm, to, reason, &mut planner, stamp, origin)
}

/// Plans one live migration of `vm` (see [`migrate_vm`]); the planner holds what earlier
/// decisions of the same pass took, and chooses (or checks) the destination with every filter.
pub(crate) fn plan_migration(
    state: &ClusterState,
    vm: &VmRecord,
    to: Option<&str>,
    reason: &str,
    planner: &mut Planner<'_>,
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
    let mut req = request_for_vm(state, vm);
    req.avoid.push(from.clone());
    if let Some(t) = to {
        let host = HostId::new(t).map_err(|e| Refusal::Invalid { field: "to".into(), reason: e.to_string() })?;
        if !state.hosts.contains_key(&host) {
            return Err(Refusal::Invalid { field: "to".into(), reason: format!("unknown host {host}") });
        }
        if host == from {
            return Err(Refusal::Invalid {
                field: "to".into(),
                reason: format!("{} already runs on {host}", vm.spec.name),
            });
        }
        // Only that host may be chosen; every filter still applies.
        req.avoid = state.hosts.keys().filter(|h| **h != host).cloned().collect();
    }
    let to = match planner.place(&req) {
        Placement::Host { host, .. } => host,
        Placement::Unplaceable { explanation, .. } => {
            let why: Vec<String> = explanation
                .rejections
                .iter()
                .filter(|(f, _)| *f != novacron_scheduler::filters::AVOIDED)
                .map(|(f, n)| format!("{f} eliminated {n}"))
                .collect();
            let target = to.map_or_else(|| "no other host".to_owned(), |t| format!("host {t}"));
            return Err(Refusal::Conflict(format!("{target} can take {} ({})", vm.spec.name, why.join(", "))));
        }
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
            policy_version: (state.policy_version > 0).then_some(state.policy_version),
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
