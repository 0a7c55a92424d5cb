//! Conflicts across a whole policy set: hard rules that can never both hold are refused with
//! both named; softer disagreements are resolved by the documented order.
//!
//! The order, first difference wins: **hard over soft**, then **higher priority**, then **more
//! specific scope** (a group over a selector — more labels over fewer — over the cluster),
//! then **newer** (later in the set, which lists policies oldest first).

use std::borrow::Borrow;
use std::collections::BTreeSet;

use novacron_state::{ClusterState, VmStatus};
use novacron_types::Labels;
use novacron_types::policy::{AffinityPolicy, Enforcement, MaintenanceWindow, Policy, Rule, Scope};

use crate::observe::week_ranges;

/// Hard rules that cannot both hold (or one that cannot hold in this cluster).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", names(first, second.as_deref()))]
pub struct Conflict {
    /// A policy involved.
    pub first: String,
    /// The other, when two are at odds.
    pub second: Option<String>,
    /// Why they cannot both hold.
    pub message: String,
}

fn names(a: &str, b: Option<&str>) -> String {
    match b {
        Some(b) => format!("policies {a} and {b}"),
        None => format!("policy {a}"),
    }
}

/// How a soft disagreement was settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution {
    /// The policy that prevails.
    pub winner: String,
    /// The policy that gives way.
    pub loser: String,
    /// What they disagree on, and which step of the order decided.
    pub reason: String,
}

/// How specific a scope is: a group over a selector (more labels over fewer) over the cluster.
#[must_use]
pub fn specificity(scope: &Scope) -> usize {
    match (&scope.group, &scope.selector) {
        (Some(_), _) => 1000,
        (None, Some(s)) => 100 + s.len(),
        (None, None) => 0,
    }
}

/// Which of two disagreeing policies (at positions `ai`, `bi` of a set listed oldest first)
/// prevails, and the step of the order that decided.
#[must_use]
pub fn prevails<'a>(a: &'a Policy, ai: usize, b: &'a Policy, bi: usize) -> (&'a Policy, &'a Policy, &'static str) {
    let pick = |a_wins: bool, why| if a_wins { (a, b, why) } else { (b, a, why) };
    if a.enforcement != b.enforcement {
        return pick(a.enforcement > b.enforcement, "hard over soft");
    }
    if a.priority != b.priority {
        return pick(a.priority > b.priority, "higher priority");
    }
    let (sa, sb) = (specificity(&a.scope), specificity(&b.scope));
    if sa != sb {
        return pick(sa > sb, "more specific scope");
    }
    pick(ai > bi, "newer")
}

/// Whether two scopes certainly share VMs (equal, or one is the whole cluster).
fn overlap(a: &Scope, b: &Scope) -> bool {
    a == b || a.is_cluster() || b.is_cluster()
}

/// The other VMs an affinity rule is about, made explicit.
fn target(scope: &Scope, r: &AffinityPolicy) -> (Option<String>, Option<Labels>) {
    match (&r.group, &r.selector) {
        (None, None) => (scope.group.clone(), scope.selector.clone()),
        (g, s) => (g.clone(), s.clone()),
    }
}

fn enforced(p: &Policy) -> bool {
    p.enforcement != Enforcement::Audit
}

fn hard(p: &Policy) -> bool {
    p.enforcement == Enforcement::Hard
}

fn windows_overlap(a: &MaintenanceWindow, b: &MaintenanceWindow) -> bool {
    let (ra, rb) = (week_ranges(a), week_ranges(b));
    ra.iter().any(|(a0, a1)| rb.iter().any(|(b0, b1)| a0 < b1 && b0 < a1))
}

/// Every hard conflict in `set` (listed oldest first), and with `state` every rule the cluster
/// as it is cannot satisfy.
#[must_use]
pub fn conflicts(set: &[Policy], state: Option<&ClusterState>) -> Vec<Conflict> {
    let mut out = Vec::new();
    let mut two = |a: &Policy, b: &Policy, message: String| {
        out.push(Conflict { first: a.name.clone(), second: Some(b.name.clone()), message });
    };
    for (i, a) in set.iter().enumerate() {
        for b in &set[i + 1..] {
            if a.name == b.name {
                two(a, b, "two policies with one name".into());
                continue;
            }
            match (&a.rule, &b.rule) {
                (Rule::Affinity(x), Rule::AntiAffinity(y)) | (Rule::AntiAffinity(y), Rule::Affinity(x))
                    if hard(a)
                        && hard(b)
                        && a.scope == b.scope
                        && target(&a.scope, x) == target(&b.scope, y)
                        && x.topology == y.topology =>
                {
                    two(a, b, "hard affinity and hard anti-affinity between the same VMs in the same domain".into());
                }
                (Rule::Placement(x), Rule::Placement(y)) if hard(a) && hard(b) && overlap(&a.scope, &b.scope) => {
                    for (k, v) in &x.require_labels {
                        if let Some(w) = y.require_labels.get(k)
                            && w != v
                        {
                            two(a, b, format!("host label {k} required to be both {v:?} and {w:?}"));
                        }
                    }
                }
                (Rule::Capacity(x), Rule::Capacity(y)) if hard(a) && hard(b) => {
                    let differs = |f: &str, p: Option<f64>, q: Option<f64>, out: &mut dyn FnMut(String)| {
                        if let (Some(p), Some(q)) = (p, q)
                            && p != q
                        {
                            out(format!("{f} set to both {p} and {q}"));
                        }
                    };
                    let mut say = |m: String| two(a, b, m);
                    differs("cpu_overcommit", x.cpu_overcommit, y.cpu_overcommit, &mut say);
                    differs("memory_overcommit", x.memory_overcommit, y.memory_overcommit, &mut say);
                    differs(
                        "max_vms_per_host",
                        x.max_vms_per_host.map(f64::from),
                        y.max_vms_per_host.map(f64::from),
                        &mut say,
                    );
                }
                (Rule::Capacity(c), Rule::Scaling(s)) | (Rule::Scaling(s), Rule::Capacity(c))
                    if hard(a) && hard(b) && a.scope.group.is_some() && a.scope == b.scope =>
                {
                    let group = a.scope.group.as_deref().unwrap_or_default();
                    if let Some(q) = &c.quota {
                        let min = u64::from(s.min);
                        let mut say = |what: &str, quota: u64, need: u64| {
                            two(
                                a,
                                b,
                                format!("group {group}'s quota of {quota} {what} is below its minimum size ({need})"),
                            );
                        };
                        if let Some(v) = q.vms
                            && v < min
                        {
                            say("VMs", v, min);
                        }
                        if let (Some(v), Some(m)) = (q.vcpus, s.member_vcpus)
                            && v < min * u64::from(m)
                        {
                            say("vCPUs", v, min * u64::from(m));
                        }
                        if let (Some(v), Some(m)) = (q.memory_mib, s.member_memory_mib)
                            && v < min * m
                        {
                            say("MiB", v, min * m);
                        }
                    }
                }
                (Rule::Scaling(x), Rule::Scaling(y))
                    if hard(a) && hard(b) && a.scope == b.scope && (x.max < y.min || y.max < x.min) =>
                {
                    two(a, b, format!("sizes {}–{} and {}–{} have nothing in common", x.min, x.max, y.min, y.max));
                }
                (Rule::MaintenanceWindow(x), Rule::MaintenanceWindow(y))
                    if enforced(a) && enforced(b) && a.scope == b.scope && windows_overlap(x, y) =>
                {
                    two(a, b, "maintenance windows overlap: merge them into one".into());
                }
                _ => {}
            }
        }
    }
    if let Some(state) = state {
        out.extend(against_cluster(set, state));
    }
    out
}

/// Policies about a group the cluster does not know: not a declared group (`group create`),
/// no VM in it, and no scaling policy of the set defining it — a typo, most likely.
#[must_use]
pub fn unknown_groups(set: &[Policy], state: &ClusterState) -> Vec<Conflict> {
    let mut groups: BTreeSet<&str> =
        state.vms.values().filter(|v| v.status != VmStatus::Deleted).filter_map(|v| v.spec.group.as_deref()).collect();
    groups.extend(state.groups.keys().map(String::as_str));
    let scaled: BTreeSet<&str> =
        set.iter().filter(|p| matches!(p.rule, Rule::Scaling(_))).filter_map(|p| p.scope.group.as_deref()).collect();
    set.iter()
        .filter_map(|p| {
            let g = p.scope.group.as_deref()?;
            (!groups.contains(g) && !scaled.contains(g)).then(|| Conflict {
                first: p.name.clone(),
                second: None,
                message: format!("group {g} is unknown: no VM is in it and no scaling policy defines it"),
            })
        })
        .collect()
}

/// Rules this cluster cannot satisfy as it is.
fn against_cluster(set: &[Policy], state: &ClusterState) -> Vec<Conflict> {
    let mut out = Vec::new();
    let live = || state.vms.values().filter(|v| v.status != VmStatus::Deleted);
    for p in set {
        if !hard(p) {
            continue;
        }
        match &p.rule {
            Rule::Placement(r) if !r.require_labels.is_empty() && !state.hosts.is_empty() => {
                let carry = |labels: &Labels| r.require_labels.iter().all(|(k, v)| labels.get(k) == Some(v));
                if !state.hosts.values().any(|h| carry(&h.labels)) {
                    let want: Vec<String> = r.require_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    out.push(Conflict {
                        first: p.name.clone(),
                        second: None,
                        message: format!("no host of {} carries {}", state.hosts.len(), want.join(",")),
                    });
                }
            }
            Rule::AntiAffinity(r) if r.group.is_none() && r.selector.is_none() && p.scope.group.is_some() => {
                let g = p.scope.group.as_deref().unwrap_or_default();
                let domains: BTreeSet<String> = state
                    .hosts
                    .values()
                    .map(|h| match r.topology.as_ref().and_then(|t| h.labels.get(t)) {
                        Some(v) => format!("label:{v}"),
                        None => format!("host:{}", h.id),
                    })
                    .collect();
                let members = live().filter(|v| v.spec.group.as_deref() == Some(g)).count();
                if members > domains.len() {
                    out.push(Conflict {
                        first: p.name.clone(),
                        second: None,
                        message: format!("group {g} has {members} VMs but the cluster only {} domains", domains.len()),
                    });
                }
                for s in set.iter().filter(|s| hard(s) && s.scope.group.as_deref() == Some(g)) {
                    if let Rule::Scaling(sc) = &s.rule
                        && sc.min as usize > domains.len()
                    {
                        out.push(Conflict {
                            first: p.name.clone(),
                            second: Some(s.name.clone()),
                            message: format!(
                                "group {g} must keep at least {} VMs, one per domain, but the cluster has {} domains",
                                sc.min,
                                domains.len()
                            ),
                        });
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// The softer disagreements in `set` (listed oldest first) and who prevails in each.
#[must_use]
pub fn resolve<P: std::borrow::Borrow<Policy>>(set: &[P]) -> Vec<Resolution> {
    let mut out = Vec::new();
    for (i, a) in set.iter().map(Borrow::borrow).enumerate() {
        for (j, b) in set.iter().map(Borrow::borrow).enumerate().skip(i + 1) {
            if !enforced(a) || !enforced(b) || (hard(a) && hard(b)) {
                continue;
            }
            let what = match (&a.rule, &b.rule) {
                (Rule::Affinity(x), Rule::AntiAffinity(y)) | (Rule::AntiAffinity(y), Rule::Affinity(x))
                    if a.scope == b.scope && target(&a.scope, x) == target(&b.scope, y) && x.topology == y.topology =>
                {
                    Some("affinity and anti-affinity between the same VMs".to_owned())
                }
                (Rule::Placement(x), Rule::Placement(y)) if overlap(&a.scope, &b.scope) => x
                    .require_labels
                    .iter()
                    .find(|(k, v)| y.require_labels.get(*k).is_some_and(|w| w != *v))
                    .map(|(k, _)| format!("different values of host label {k}")),
                _ => None,
            };
            if let Some(what) = what {
                let (w, l, why) = prevails(a, i, b, j);
                out.push(Resolution {
                    winner: w.name.clone(),
                    loser: l.name.clone(),
                    reason: format!("{what}: {why}"),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_policies;

    fn set(yaml: &str) -> Vec<Policy> {
        parse_policies("t.yaml", yaml).unwrap()
    }

    fn one(yaml: &str) -> Conflict {
        let c = conflicts(&set(yaml), None);
        assert_eq!(c.len(), 1, "{c:?}");
        c.into_iter().next().unwrap()
    }

    #[test]
    fn each_class_of_hard_conflict_names_both_rules() {
        let c = one(
            "name: near\nscope: {group: web}\nrule: {affinity: {}}\n---\nname: apart\nscope: {group: web}\nrule: {anti-affinity: {}}\n",
        );
        assert_eq!((c.first.as_str(), c.second.as_deref()), ("near", Some("apart")));
        let c = one(
            "name: in-a\nrule: {placement: {require_labels: {zone: a}}}\n---\nname: in-b\nscope: {group: db}\nrule: {placement: {require_labels: {zone: b}}}\n",
        );
        assert!(c.to_string().starts_with("policies in-a and in-b: host label zone required"), "{c}");
        let c = one(
            "name: quota\nscope: {group: web}\nrule: {capacity: {quota: {vms: 3}}}\n---\nname: size\nscope: {group: web}\nrule: {scaling: {min: 5, max: 9}}\n",
        );
        assert!(c.message.contains("quota of 3 VMs is below its minimum size (5)"), "{c}");
        let c = one(
            "name: w1\nrule: {maintenance-window: {days: [sat], start: '22:00', end: '02:00'}}\n---\nname: w2\nrule: {maintenance-window: {days: [sun], start: '01:00', end: '03:00'}}\n",
        );
        assert_eq!(c.second.as_deref(), Some("w2"), "past midnight into Sunday overlaps: {c}");
        let c = one(
            "name: s1\nscope: {group: g}\nrule: {scaling: {min: 1, max: 2}}\n---\nname: s2\nscope: {group: g}\nrule: {scaling: {min: 4, max: 6}}\n",
        );
        assert!(c.message.contains("nothing in common"), "{c}");
        // Soft ones are not conflicts: they are resolved.
        assert!(conflicts(&set("name: near\nscope: {group: web}\nenforcement: soft\nrule: {affinity: {}}\n---\nname: apart\nscope: {group: web}\nrule: {anti-affinity: {}}\n"), None).is_empty());
    }

    #[test]
    fn the_resolution_order_is_hard_priority_specificity_then_newest() {
        let base = "name: a\nscope: {group: web}\n{A}rule: {affinity: {}}\n---\nname: b\nscope: {group: web}\n{B}rule: {anti-affinity: {}}\n";
        let r = |a: &str, b: &str| {
            let v = resolve(&set(&base.replace("{A}", a).replace("{B}", b)));
            assert_eq!(v.len(), 1, "{v:?}");
            (v[0].winner.clone(), v[0].reason.clone())
        };
        assert_eq!(
            r("enforcement: soft\n", ""),
            ("b".into(), "affinity and anti-affinity between the same VMs: hard over soft".into())
        );
        let (w, why) = r("enforcement: soft\npriority: 5\n", "enforcement: soft\npriority: 1\n");
        assert_eq!((w.as_str(), why.ends_with("higher priority")), ("a", true));
        let (w, why) = r("enforcement: soft\n", "enforcement: soft\n");
        assert_eq!((w.as_str(), why.ends_with("newer")), ("b", true));
        // Specificity: a group-scoped rule beats a cluster-wide one on the same label.
        let v = resolve(&set(
            "name: wide\nenforcement: soft\nrule: {placement: {require_labels: {zone: a}}}\n---\nname: narrow\nscope: {group: db}\nenforcement: soft\nrule: {placement: {require_labels: {zone: b}}}\n",
        ));
        assert_eq!((v[0].winner.as_str(), v[0].reason.ends_with("more specific scope")), ("narrow", true));
        let (ra, rb) = (
            &set("name: a\nscope: {selector: {x: y}}\nrule: {healing: {}}\n")[0],
            &set("name: b\nrule: {healing: {}}\n")[0],
        );
        assert!(specificity(&ra.scope) > specificity(&rb.scope));
    }
}
