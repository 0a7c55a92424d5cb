//! Policies against the cluster as it runs: which VMs break a rule where they are, whether a
//! maintenance window is open, and the settings the healing and migration planners take from
//! policies.

use std::collections::BTreeMap;
use std::time::Duration;

use novacron_state::{ClusterState, VmRecord, VmStatus};
use novacron_types::policy::{Enforcement, MaintenanceWindow, Policy, RestartPriority, Rule, Scope};
use novacron_types::{HostId, Labels, RestartPolicy, VmId, VmSpec};

use crate::enforce::applies_to;

/// A VM that breaks a policy where it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The policy.
    pub policy: String,
    /// Its enforcement.
    pub enforcement: Enforcement,
    /// The VM.
    pub vm: VmId,
    /// Where it runs.
    pub host: HostId,
    /// How it breaks the rule.
    pub reason: String,
    /// Whether moving the VM elsewhere mends it (a hard placement, exclusion or
    /// anti-affinity rule); other violations are reported only.
    pub correctable: bool,
}

/// The policies checked against the cluster, oldest first: every one (audit included) except
/// the losers of a resolution.
#[must_use]
pub fn observed(state: &ClusterState) -> Vec<&Policy> {
    let mut records: Vec<_> = state.policies.values().collect();
    records.sort_by_key(|r| r.version);
    let all: Vec<&Policy> = records.into_iter().map(|r| &r.policy).collect();
    let losers: std::collections::BTreeSet<String> = crate::resolve(&all).into_iter().map(|r| r.loser).collect();
    all.into_iter().filter(|p| !losers.contains(&p.name)).collect()
}

fn domain<'a>(state: &'a ClusterState, host: &'a HostId, topology: Option<&str>) -> String {
    match topology.and_then(|t| state.hosts.get(host).and_then(|h| h.labels.get(t))) {
        Some(v) => format!("label:{v}"),
        None => format!("host:{host}"),
    }
}

/// The other VMs an affinity rule is about, as a test on a spec.
fn selects(scope: &Scope, target_group: Option<&str>, target: Option<&Labels>, spec: &VmSpec) -> bool {
    match (target_group, target) {
        (_, Some(sel)) => sel.iter().all(|(k, v)| spec.labels.get(k) == Some(v)),
        (Some(g), None) => spec.group.as_deref() == Some(g),
        (None, None) => applies_to(scope, spec),
    }
}

/// Every running VM that breaks a policy where it runs. Deterministic: VMs in id order. Of two
/// VMs that may not share a domain, the one with the higher id is the one in violation (so a
/// correction moves one of them, not both).
#[must_use]
pub fn violations(state: &ClusterState) -> Vec<Violation> {
    let mut out = Vec::new();
    if state.policies.is_empty() {
        return out;
    }
    let placed = |v: &&VmRecord| v.status == VmStatus::Running && v.migration.is_none() && !v.delete_requested;
    let running: Vec<(&VmRecord, &HostId)> =
        state.vms.values().filter(placed).filter_map(|v| v.host.as_ref().map(|h| (v, h))).collect();
    let mut by_host: BTreeMap<&HostId, Vec<&VmRecord>> = BTreeMap::new();
    for (v, h) in &running {
        by_host.entry(*h).or_default().push(*v);
    }
    for p in observed(state) {
        let hard = p.enforcement == Enforcement::Hard;
        let mut push = |vm: &VmRecord, host: &HostId, reason: String, correctable: bool| {
            out.push(Violation {
                policy: p.name.clone(),
                enforcement: p.enforcement,
                vm: vm.id,
                host: host.clone(),
                reason,
                correctable: correctable && hard,
            });
        };
        // The VMs an affinity rule is about, by domain (in id order), built once per policy so
        // each VM is checked against its own domain only.
        let near = |group: Option<&str>, selector: Option<&Labels>, topology: Option<&str>| {
            let mut by_domain: BTreeMap<String, Vec<(&VmRecord, &HostId)>> = BTreeMap::new();
            for (u, h) in running.iter().filter(|(u, _)| selects(&p.scope, group, selector, &u.spec)) {
                by_domain.entry(domain(state, h, topology)).or_default().push((u, h));
            }
            by_domain
        };
        let targets = match &p.rule {
            Rule::AntiAffinity(r) => Some(near(r.group.as_deref(), r.selector.as_ref(), r.topology.as_deref())),
            Rule::Affinity(r) if p.enforcement != Enforcement::Soft => {
                Some(near(r.group.as_deref(), r.selector.as_ref(), r.topology.as_deref()))
            }
            _ => None,
        };
        let selected = targets.as_ref().map_or(0, |t| t.values().map(Vec::len).sum::<usize>());
        for (vm, host) in running.iter().filter(|(v, _)| applies_to(&p.scope, &v.spec)) {
            match (&p.rule, &targets) {
                (Rule::Placement(r), _) if p.enforcement != Enforcement::Soft => {
                    let labels = state.hosts.get(*host).map(|h| &h.labels);
                    let missing: Vec<String> = r
                        .require_labels
                        .iter()
                        .filter(|(k, v)| labels.and_then(|l| l.get(*k)) != Some(*v))
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    if !missing.is_empty() {
                        push(vm, host, format!("host {host} lacks {}", missing.join(",")), true);
                    }
                    if r.exclude_hosts.iter().any(|h| h == host.as_str()) {
                        push(vm, host, format!("host {host} is excluded"), true);
                    }
                }
                (Rule::AntiAffinity(r), Some(targets)) => {
                    let topology = r.topology.as_deref();
                    let here = targets.get(&domain(state, host, topology)).map_or(&[][..], Vec::as_slice);
                    let clash =
                        here.iter().find(|(u, _)| u.id != vm.id && (!applies_to(&p.scope, &u.spec) || u.id < vm.id));
                    if let Some((u, h)) = clash {
                        let place = topology.map_or_else(|| format!("host {h}"), |t| format!("{t} of host {h}"));
                        push(vm, host, format!("shares the {place} with {}", u.spec.name), true);
                    }
                }
                (Rule::Affinity(r), Some(targets)) => {
                    let here = targets.get(&domain(state, host, r.topology.as_deref())).map_or(&[][..], Vec::as_slice);
                    let me = usize::from(selects(&p.scope, r.group.as_deref(), r.selector.as_ref(), &vm.spec));
                    let others_anywhere = selected > me;
                    let others_here = here.iter().any(|(u, _)| u.id != vm.id);
                    if others_anywhere && !others_here {
                        push(vm, host, "none of the VMs it must be near runs in its domain".into(), false);
                    }
                }
                _ => {}
            }
        }
        if let Rule::Capacity(c) = &p.rule
            && let Some(max) = c.max_vms_per_host
            && p.scope.is_cluster()
        {
            for h in state.hosts.values() {
                let here = by_host.get(&h.id).map_or(&[][..], Vec::as_slice);
                for vm in here.iter().skip(max as usize) {
                    push(vm, &h.id, format!("host {} runs {} VMs, more than {max}", h.id, here.len()), false);
                }
            }
        }
    }
    out
}

/// Minute ranges of the week (Monday 00:00 = 0) a window covers, half-open (empty when its
/// times do not parse).
#[must_use]
pub fn week_ranges(w: &MaintenanceWindow) -> Vec<(u32, u32)> {
    let (Some(s), Some(e)) = (crate::check::minutes(&w.start), crate::check::minutes(&w.end)) else {
        return Vec::new();
    };
    let days: Vec<u32> = if w.days.is_empty() { (0..7).collect() } else { w.days.iter().map(|d| *d as u32).collect() };
    let week = 7 * 24 * 60;
    let mut out = Vec::new();
    for d in days {
        let from = d * 24 * 60 + s;
        let len = if e > s { e - s } else { 24 * 60 - s + e };
        let to = from + len;
        if to <= week {
            out.push((from, to));
        } else {
            out.push((from, week));
            out.push((0, to - week));
        }
    }
    out
}

/// Whether a window is open at `now_ms` (ms since the epoch, UTC).
#[must_use]
pub fn window_open_at(w: &MaintenanceWindow, now_ms: u64) -> bool {
    let minutes = now_ms / 60_000;
    let days = minutes / (24 * 60);
    // 1970-01-01 was a Thursday: Monday-based weekday = (days + 3) % 7.
    let weekday = (days + 3) % 7;
    let minute = u32::try_from(weekday * 24 * 60 + minutes % (24 * 60)).unwrap_or(0);
    week_ranges(w).iter().any(|(a, b)| *a <= minute && minute < *b)
}

/// Whether disruptive actions (rebalancing and corrective migrations) may touch a VM of `spec`
/// now: `true` when no maintenance-window policy covers it, else whether one of those is open.
#[must_use]
pub fn may_disrupt(state: &ClusterState, spec: &VmSpec, now_ms: u64) -> bool {
    let mut covered = false;
    for p in crate::enforce::in_force(state).into_iter().filter(|p| applies_to(&p.scope, spec)) {
        if let Rule::MaintenanceWindow(w) = &p.rule {
            if window_open_at(w, now_ms) {
                return true;
            }
            covered = true;
        }
    }
    !covered
}

/// Migration limits from the cluster-wide policies in force: the smallest of each limit, and
/// the longest VM cooldown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MigrationPolicy {
    /// Concurrent migrations per host.
    pub per_host: Option<u32>,
    /// Concurrent migrations in the cluster.
    pub cluster: Option<u32>,
    /// Least time between two moves of one VM.
    pub vm_cooldown: Option<Duration>,
}

/// See [`MigrationPolicy`].
#[must_use]
pub fn migration_policy(state: &ClusterState) -> MigrationPolicy {
    let mut m = MigrationPolicy::default();
    for p in crate::enforce::in_force(state).into_iter().filter(|p| p.scope.is_cluster()) {
        if let Rule::MigrationLimits(l) = &p.rule {
            let min = |a: Option<u32>, b: Option<u32>| match (a, b) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            m.per_host = min(m.per_host, l.per_host);
            m.cluster = min(m.cluster, l.cluster);
            if let Some(d) = l.vm_cooldown.as_deref().and_then(|d| humantime::parse_duration(d).ok()) {
                m.vm_cooldown = Some(m.vm_cooldown.map_or(d, |c| c.max(d)));
            }
        }
    }
    m
}

/// What healing policies say about one VM; each field from the prevailing policy that sets it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HealingView {
    /// Restart policy, overriding the VM's own.
    pub restart: Option<RestartPolicy>,
    /// Restart order when capacity is short (`medium` when unset).
    pub priority: Option<RestartPriority>,
    /// Most restarts within `window`.
    pub max_restarts: Option<u32>,
    /// The restart window.
    pub window: Option<Duration>,
    /// Migrate or restart when a VM must leave a host (drains).
    pub prefer: Option<novacron_types::policy::Prefer>,
}

/// See [`HealingView`].
#[must_use]
pub fn healing(state: &ClusterState, spec: &VmSpec) -> HealingView {
    healing_in(&crate::enforce::in_force(state), spec)
}

/// [`healing`] over the policies in force computed once (a pass over many VMs).
#[must_use]
pub fn healing_in(in_force: &[&Policy], spec: &VmSpec) -> HealingView {
    let mut covering: Vec<(usize, &Policy)> = in_force
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, p)| matches!(p.rule, Rule::Healing(_)) && applies_to(&p.scope, spec))
        .collect();
    // The prevailing policy first.
    covering.sort_by(|(ai, a), (bi, b)| {
        let (w, _, _) = crate::prevails(a, *ai, b, *bi);
        if std::ptr::eq(w, *a) { std::cmp::Ordering::Less } else { std::cmp::Ordering::Greater }
    });
    let mut v = HealingView::default();
    for (_, p) in covering {
        if let Rule::Healing(h) = &p.rule {
            v.restart = v.restart.or(h.restart);
            v.priority = v.priority.or(h.priority);
            v.max_restarts = v.max_restarts.or(h.max_restarts);
            v.prefer = v.prefer.or(h.prefer);
            v.window = v.window.or_else(|| h.window.as_deref().and_then(|d| humantime::parse_duration(d).ok()));
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_open_on_their_days_and_run_past_midnight() {
        // 2026-11-28 is a Saturday.
        let sat_2300 = 1_795_906_800_000u64; // 2026-11-28T23:00:00Z
        let w = MaintenanceWindow {
            days: vec![novacron_types::policy::Weekday::Sat],
            start: "22:00".into(),
            end: "02:00".into(),
        };
        assert!(window_open_at(&w, sat_2300));
        assert!(window_open_at(&w, sat_2300 + 2 * 3_600_000), "Sunday 01:00, still Saturday's window");
        assert!(!window_open_at(&w, sat_2300 + 3 * 3_600_000), "Sunday 02:00, closed");
        assert!(!window_open_at(&w, sat_2300 - 2 * 3_600_000), "Saturday 21:00, not yet");
        let daily = MaintenanceWindow { days: vec![], start: "00:00".into(), end: "23:59".into() };
        assert!(window_open_at(&daily, sat_2300));
    }
}
