//! Decisions about policies: apply new documents (or new versions), remove one; and the
//! placement requests and planner settings the policies in force shape.

use std::collections::BTreeSet;

use novacron_policy::enforce;
use novacron_scheduler::{PlacementRequest, PlannerConfig};
use novacron_state::{ClusterState, VmRecord};
use novacron_types::event::{PolicyApplied, PolicyConflictResolved, PolicyRemoved};
use novacron_types::policy::Policy;
use novacron_types::{Envelope, EventKind, VmSpec};

use super::*;

/// The placement request for a new VM of `spec`, with the policies in force.
#[must_use]
pub fn request_for_spec(state: &ClusterState, spec: &VmSpec) -> PlacementRequest {
    let mut req = PlacementRequest::for_spec(spec);
    enforce::constrain(state, spec, &mut req);
    req
}

/// The placement request for an existing VM (restart, move), with the policies in force.
#[must_use]
pub fn request_for_vm(state: &ClusterState, vm: &VmRecord) -> PlacementRequest {
    let mut req = PlacementRequest::for_vm(vm);
    enforce::constrain(state, &vm.spec, &mut req);
    req
}

/// The planner settings with the cluster-wide capacity policies applied.
#[must_use]
pub fn planner_config(state: &ClusterState, base: &PlannerConfig) -> PlannerConfig {
    enforce::planner_config(state, base)
}

/// What applying some documents would do, without doing it.
#[derive(Debug, Default)]
pub struct PolicyPlan {
    /// The documents that are new or changed (identical ones are left out).
    pub changed: Vec<Policy>,
    /// Softer disagreements involving them, and who prevails.
    pub resolutions: Vec<novacron_policy::Resolution>,
    /// Worth a look, not a refusal.
    pub warnings: Vec<String>,
}

/// Checks documents against each other, the policies in force and the cluster: every problem
/// of a document, then every hard conflict that involves one of them.
///
/// # Errors
/// [`Refusal::Invalid`] listing the problems, or [`Refusal::Conflict`] listing the conflicts.
pub fn plan_policies(state: &ClusterState, docs: &[Policy]) -> Result<PolicyPlan, Refusal> {
    if docs.is_empty() {
        return Err(Refusal::Invalid { field: "policies".into(), reason: "no policy given".into() });
    }
    let problems: Vec<String> = docs.iter().flat_map(novacron_policy::validate).map(|p| p.to_string()).collect();
    if !problems.is_empty() {
        return Err(Refusal::Invalid { field: "policies".into(), reason: problems.join("; ") });
    }
    let mut seen = BTreeSet::new();
    if let Some(d) = docs.iter().find(|d| !seen.insert(d.name.as_str())) {
        return Err(Refusal::Invalid { field: "policies".into(), reason: format!("policy {} is given twice", d.name) });
    }
    let changed: Vec<Policy> =
        docs.iter().filter(|d| state.policies.get(&d.name).is_none_or(|r| r.policy != **d)).cloned().collect();
    let unknown: Vec<String> =
        novacron_policy::unknown_groups(docs, state).into_iter().map(|c| c.to_string()).collect();
    if !unknown.is_empty() {
        return Err(Refusal::Invalid { field: "policies".into(), reason: unknown.join("; ") });
    }
    // The set as it would be, oldest first: what stays, then the new versions in order.
    let names: BTreeSet<&str> = changed.iter().map(|d| d.name.as_str()).collect();
    let mut kept: Vec<_> = state.policies.values().filter(|r| !names.contains(r.policy.name.as_str())).collect();
    kept.sort_by_key(|r| r.version);
    let set: Vec<Policy> = kept.into_iter().map(|r| r.policy.clone()).chain(changed.iter().cloned()).collect();
    let involved = |a: &str, b: Option<&str>| names.contains(a) || b.is_some_and(|b| names.contains(b));
    let conflicts: Vec<String> = novacron_policy::conflicts(&set, Some(state))
        .into_iter()
        .filter(|c| involved(&c.first, c.second.as_deref()))
        .map(|c| c.to_string())
        .collect();
    if !conflicts.is_empty() {
        return Err(Refusal::Conflict(conflicts.join("; ")));
    }
    let resolutions =
        novacron_policy::resolve(&set).into_iter().filter(|r| involved(&r.winner, Some(&r.loser))).collect();
    Ok(PolicyPlan { changed, resolutions, warnings: Vec::new() })
}

/// Applies documents: `PolicyApplied` for each new or changed one (each a new version of the
/// set), then `PolicyConflictResolved` for each softer disagreement they bring. Returns the
/// names applied.
///
/// # Errors
/// As [`plan_policies`].
pub fn apply_policies(
    state: &ClusterState,
    docs: &[Policy],
    stamp: &mut impl Stamp,
    origin: &Origin,
) -> Result<(Vec<String>, Vec<Envelope>), Refusal> {
    let plan = plan_policies(state, docs)?;
    let mut version = state.policy_version;
    let mut events = Vec::new();
    for p in &plan.changed {
        version += 1;
        events.push(envelope(stamp, origin, EventKind::PolicyApplied(PolicyApplied { version, policy: p.clone() })));
    }
    for r in plan.resolutions {
        events.push(envelope(
            stamp,
            origin,
            EventKind::PolicyConflictResolved(PolicyConflictResolved {
                version,
                winner: r.winner,
                loser: r.loser,
                reason: r.reason,
            }),
        ));
    }
    Ok((plan.changed.into_iter().map(|p| p.name).collect(), events))
}

/// Withdraws a policy.
///
/// # Errors
/// [`Refusal::NotFound`] when no policy has that name.
pub fn remove_policy(
    state: &ClusterState,
    name: &str,
    stamp: &mut impl Stamp,
    origin: &Origin,
) -> Result<(String, Vec<Envelope>), Refusal> {
    if !state.policies.contains_key(name) {
        return Err(Refusal::NotFound(format!("policy {name}")));
    }
    let e = EventKind::PolicyRemoved(PolicyRemoved { version: state.policy_version + 1, name: name.to_owned() });
    Ok((name.to_owned(), vec![envelope(stamp, origin, e)]))
}

/// Migration limits with the cluster's migration-limits policies applied (the smaller wins).
#[must_use]
pub fn migration_limits(state: &ClusterState, base: MigrationLimits) -> MigrationLimits {
    let p = novacron_policy::observe::migration_policy(state);
    let cap = |b: usize, p: Option<u32>| p.map_or(b, |p| b.min(p as usize));
    MigrationLimits { per_host: cap(base.per_host, p.per_host), cluster: cap(base.cluster, p.cluster) }
}

/// What the policy pass found and would do, for `policy dry-run` as for the pass itself.
#[derive(Debug, Default)]
pub struct PolicyPass {
    /// Each violation with the action taken: `migrate to H`, `wait for a maintenance window`,
    /// `wait for migration capacity`, `no destination: …`, or `report`.
    pub findings: Vec<(novacron_policy::observe::Violation, String)>,
    /// The events: observations not recorded before, and the corrective migrations.
    pub events: Vec<Envelope>,
}

/// The policy pass: every running VM that breaks a policy where it runs is recorded once
/// (`PolicyViolationObserved`); one that breaks a hard placement, exclusion or anti-affinity
/// rule is live-migrated to a host that keeps every rule — inside a maintenance window (if
/// one covers it), within the migration limits and the VM's cooldown.
pub fn policy_pass(
    state: &ClusterState,
    planning: &Planning,
    limits: MigrationLimits,
    vm_cooldown: std::time::Duration,
    stamp: &mut impl Stamp,
    origin: &Origin,
) -> PolicyPass {
    let mut pass = PolicyPass::default();
    if state.policies.is_empty() || state.healing_paused {
        return pass;
    }
    let found = novacron_policy::observe::violations(state);
    if found.is_empty() {
        return pass;
    }
    let now = stamp.now_ms();
    let limits = migration_limits(state, limits);
    let cooldown =
        novacron_policy::observe::migration_policy(state).vm_cooldown.map_or(vm_cooldown, |c| c.max(vm_cooldown));
    let config = planner_config(state, &planning.config);
    let mut planner = novacron_scheduler::Planner::new(state, &config, &planning.load);
    let mut migrating_from: std::collections::BTreeMap<novacron_types::HostId, usize> = Default::default();
    for vm in state.vms.values().filter(|v| v.migration.is_some()) {
        if let Some(h) = &vm.host {
            *migrating_from.entry(h.clone()).or_default() += 1;
        }
    }
    let mut total: usize = migrating_from.values().sum();
    let mut moved = BTreeSet::new();
    for v in found {
        let vm = &state.vms[&v.vm];
        let action = if !v.correctable {
            "report".to_owned()
        } else if moved.contains(&v.vm) {
            "migrate (already planned)".to_owned()
        } else if !novacron_policy::observe::may_disrupt(state, &vm.spec, now) {
            "wait for a maintenance window".to_owned()
        } else if vm.moves.last().is_some_and(|m| now.saturating_sub(m.at_ms) < cooldown.as_millis() as u64) {
            "wait for the VM's migration cooldown".to_owned()
        } else if total >= limits.cluster || migrating_from.get(&v.host).copied().unwrap_or(0) >= limits.per_host {
            "wait for migration capacity".to_owned()
        } else {
            let reason = format!("policy {}: {}", v.policy, v.reason);
            match plan_migration(state, vm, None, &reason, &mut planner, stamp, origin) {
                Ok((_, events)) => {
                    let to = events.iter().find_map(|e| match &e.event {
                        EventKind::VmMigrationPlanned(p) => Some(p.to.to_string()),
                        _ => None,
                    });
                    pass.events.extend(events);
                    moved.insert(v.vm);
                    *migrating_from.entry(v.host.clone()).or_default() += 1;
                    total += 1;
                    format!("migrate to {}", to.unwrap_or_default())
                }
                Err(e) => format!("no destination keeps every rule: {e}"),
            }
        };
        let recorded = state.policy_violations.get(&novacron_state::violation_key(&v.policy, v.vm));
        if recorded.is_none_or(|r| r.host != v.host) {
            pass.events.push(envelope(
                stamp,
                origin,
                EventKind::PolicyViolationObserved(novacron_types::event::PolicyViolationObserved {
                    version: state.policy_version,
                    policy: v.policy.clone(),
                    vm: v.vm,
                    host: v.host.clone(),
                    reason: v.reason.clone(),
                    action: action.clone(),
                }),
            ));
        }
        pass.findings.push((v, action));
    }
    pass
}

/// What applying documents would do now: the violations the new set finds in the cluster as it
/// is and what the policy pass would do about each — computed by the very pass that runs after
/// an apply, on the state as the apply would leave it. Nothing is written.
///
/// # Errors
/// As [`plan_policies`].
pub fn dry_run(
    state: &ClusterState,
    docs: &[Policy],
    planning: &Planning,
    limits: MigrationLimits,
    vm_cooldown: std::time::Duration,
    stamp: &mut impl Stamp,
    origin: &Origin,
) -> Result<(PolicyPlan, PolicyPass), Refusal> {
    let plan = plan_policies(state, docs)?;
    let (_, events) = apply_policies(state, docs, stamp, origin)?;
    let mut after = state.clone();
    for e in &events {
        let seq = after.seq + 1;
        after.apply(seq, e);
    }
    let pass = policy_pass(&after, planning, limits, vm_cooldown, stamp, origin);
    Ok((plan, pass))
}
