//! Semantic checks of one document: values that parse but make no sense.

use novacron_types::policy::{Enforcement, MaintenanceWindow, Policy, Rule};

/// A document that parses but cannot be applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("policy {policy}: {field}: {message}")]
pub struct Problem {
    /// The policy's name.
    pub policy: String,
    /// A dotted path into the document (`rule.scaling.min`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// Minutes since midnight of an `HH:MM` time.
pub(crate) fn minutes(hhmm: &str) -> Option<u32> {
    let (h, m) = hhmm.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

/// Every problem of one document (empty: it may be applied, as far as it alone goes).
#[must_use]
pub fn validate(p: &Policy) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut bad = |field: &str, message: String| {
        out.push(Problem { policy: p.name.clone(), field: field.to_owned(), message });
    };
    let name_ok = !p.name.is_empty()
        && p.name.len() <= 63
        && p.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !name_ok {
        bad("name", format!("{:?} must be 1 to 63 characters of a-z, 0-9 and '-'", p.name));
    }
    if p.scope.group.is_some() && p.scope.selector.is_some() {
        bad("scope", "name a group or a selector, not both".into());
    }
    if p.scope.group.as_ref().is_some_and(String::is_empty) {
        bad("scope.group", "must not be empty".into());
    }
    if p.scope.selector.as_ref().is_some_and(|s| s.is_empty()) {
        bad("scope.selector", "must name at least one label (leave scope out for the whole cluster)".into());
    }
    let duration = |field: &str, v: &Option<String>, bad: &mut dyn FnMut(&str, String)| {
        if let Some(d) = v
            && humantime::parse_duration(d).is_err()
        {
            bad(field, format!("{d:?} is not a duration (e.g. 30s, 5m, 1h)"));
        }
    };
    let kind = p.rule.kind();
    match &p.rule {
        Rule::Placement(r) => {
            if r.require_labels.is_empty() && r.exclude_hosts.is_empty() && r.spread_over.is_none() {
                bad(
                    &format!("rule.{kind}"),
                    "asks for nothing: give require_labels, exclude_hosts or spread_over".into(),
                );
            }
            if r.spread_over.as_ref().is_some_and(String::is_empty) {
                bad("rule.placement.spread_over", "must be a host label key such as zone".into());
            }
            if !r.exclude_hosts.is_empty() && p.enforcement == Enforcement::Soft {
                bad(
                    "rule.placement.exclude_hosts",
                    "a host is excluded or not: use enforcement hard (or audit to only report)".into(),
                );
            }
        }
        Rule::Affinity(r) | Rule::AntiAffinity(r) => {
            if r.group.is_some() && r.selector.is_some() {
                bad(&format!("rule.{kind}"), "name a group or a selector of the other VMs, not both".into());
            }
            if let Some(g) = &r.group
                && p.scope.group.as_ref() != Some(g)
            {
                bad(
                    &format!("rule.{kind}.group"),
                    format!(
                        "a group rule is about the scope's own group; to be near or away from the VMs of group {g} \
                         from elsewhere, select them by their labels"
                    ),
                );
            }
            if r.selector.as_ref().is_some_and(|s| s.is_empty()) {
                bad(&format!("rule.{kind}.selector"), "must name at least one label".into());
            }
            if r.topology.as_ref().is_some_and(String::is_empty) {
                bad(&format!("rule.{kind}.topology"), "must be a host label key such as zone".into());
            }
            if r.group.is_none() && r.selector.is_none() && p.scope.is_cluster() && matches!(p.rule, Rule::Affinity(_))
            {
                bad(
                    &format!("rule.{kind}"),
                    "affinity of every VM to every other VM would pack the cluster on one host".into(),
                );
            }
        }
        Rule::Capacity(r) => {
            if p.enforcement == Enforcement::Soft {
                bad("enforcement", "capacity limits are hard (or audit to only report)".into());
            }
            for (field, v) in [("cpu_overcommit", r.cpu_overcommit), ("memory_overcommit", r.memory_overcommit)] {
                if let Some(v) = v
                    && !(v.is_finite() && (1.0..=64.0).contains(&v))
                {
                    bad(&format!("rule.capacity.{field}"), format!("{v} must be a ratio from 1.0 to 64"));
                }
            }
            let host_level = r.cpu_overcommit.is_some()
                || r.memory_overcommit.is_some()
                || r.max_vms_per_host.is_some()
                || r.reserved.is_some();
            if host_level && !p.scope.is_cluster() {
                bad(
                    "scope",
                    "overcommit, max_vms_per_host and reserved are per host: they need the cluster scope".into(),
                );
            }
            if r.max_vms_per_host == Some(0) {
                bad("rule.capacity.max_vms_per_host", "must be at least 1".into());
            }
            if !host_level && r.quota.is_none() {
                bad("rule.capacity", "asks for nothing".into());
            }
        }
        Rule::Scaling(r) => {
            if p.scope.group.is_none() {
                bad("scope.group", "a scaling policy is about one group".into());
            }
            if r.min > r.max {
                bad("rule.scaling.min", format!("min {} is above max {}", r.min, r.max));
            }
            if let Some(t) = r.target_cpu
                && !(t.is_finite() && t > 0.0 && t <= 1.0)
            {
                bad("rule.scaling.target_cpu", format!("{t} must be in (0, 1]"));
            }
            for (i, s) in r.schedules.iter().enumerate() {
                let w = MaintenanceWindow { days: s.days.clone(), start: s.start.clone(), end: s.end.clone() };
                if crate::observe::week_ranges(&w).is_empty() {
                    bad(
                        &format!("rule.scaling.schedules[{i}]"),
                        format!("{:?}–{:?} must be HH:MM (UTC)", s.start, s.end),
                    );
                }
                if s.min > r.max {
                    bad(&format!("rule.scaling.schedules[{i}].min"), format!("{} is above max {}", s.min, r.max));
                }
            }
            duration("rule.scaling.scale_up_cooldown", &r.scale_up_cooldown, &mut bad);
            duration("rule.scaling.scale_down_cooldown", &r.scale_down_cooldown, &mut bad);
        }
        Rule::Healing(r) => {
            duration("rule.healing.window", &r.window, &mut bad);
            if r.max_restarts == Some(0) && r.restart.is_some_and(|x| x != novacron_types::RestartPolicy::Never) {
                bad("rule.healing.max_restarts", "0 restarts contradicts a restart policy other than never".into());
            }
        }
        Rule::MaintenanceWindow(w) => window_problems(w, &mut bad),
        Rule::MigrationLimits(r) => {
            duration("rule.migration-limits.vm_cooldown", &r.vm_cooldown, &mut bad);
            if r.per_host == Some(0) || r.cluster == Some(0) {
                bad(
                    "rule.migration-limits",
                    "a limit of 0 forbids migrations: use a maintenance window instead".into(),
                );
            }
        }
    }
    out
}

fn window_problems(w: &MaintenanceWindow, bad: &mut dyn FnMut(&str, String)) {
    let (s, e) = (minutes(&w.start), minutes(&w.end));
    if s.is_none() {
        bad("rule.maintenance-window.start", format!("{:?} must be HH:MM (UTC)", w.start));
    }
    if e.is_none() {
        bad("rule.maintenance-window.end", format!("{:?} must be HH:MM (UTC)", w.end));
    }
    if s.is_some() && s == e {
        bad("rule.maintenance-window.end", "a window that ends when it starts is empty".into());
    }
    let mut days = w.days.clone();
    days.sort();
    days.dedup();
    if days.len() != w.days.len() {
        bad("rule.maintenance-window.days", "a day is listed twice".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_policies;

    fn problems(yaml: &str) -> Vec<String> {
        let p = parse_policies("t.yaml", yaml).unwrap();
        p.iter().flat_map(validate).map(|p| p.to_string()).collect()
    }

    #[test]
    fn values_that_make_no_sense_are_named_precisely() {
        let got = problems("name: web\nscope: {group: web}\nrule:\n  scaling: {min: 5, max: 2}\n");
        assert_eq!(got, ["policy web: rule.scaling.min: min 5 is above max 2"]);
        let got = problems("name: Bad_Name\nrule:\n  healing: {window: soon}\n");
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].contains("name") && got[1].contains("\"soon\" is not a duration"), "{got:?}");
        let got = problems("name: mw\nrule:\n  maintenance-window: {start: '25:00', end: '02:00', days: [mon, mon]}\n");
        assert!(got.iter().any(|g| g.contains("start") && g.contains("HH:MM")), "{got:?}");
        assert!(got.iter().any(|g| g.contains("listed twice")), "{got:?}");
        let got = problems("name: oc\nscope: {group: web}\nrule:\n  capacity: {cpu_overcommit: 2.0}\n");
        assert!(got[0].contains("need the cluster scope"), "{got:?}");
        let got = problems("name: a\nscope: {group: web}\nrule:\n  anti-affinity: {group: db}\n");
        assert!(got[0].contains("select them by their labels"), "{got:?}");
        assert!(problems("name: ok\nscope: {group: web}\nrule:\n  anti-affinity: {topology: zone}\n").is_empty());
    }

    #[test]
    fn hhmm_parses_only_real_times() {
        assert_eq!(minutes("00:00"), Some(0));
        assert_eq!(minutes("23:59"), Some(23 * 60 + 59));
        assert_eq!(minutes("24:00"), None);
        assert_eq!(minutes("7:00"), None);
        assert_eq!(minutes("07:60"), None);
    }
}
