//! What the policies in force add to a decision: filters and scores for the placement planner,
//! cluster-wide capacity settings, and admission (quotas) for new VMs.
//!
//! Only `hard` and `soft` policies act (`audit` ones are reported, not enforced). A policy that
//! gives way in a resolution (see [`crate::resolve`]) does not act at all while the winner is in
//! force.

use novacron_scheduler::{GroupRule, PlacementRequest, PlannerConfig};
use novacron_state::{ClusterState, VmStatus};
use novacron_types::policy::{Enforcement, Policy, Rule, Scope};
use novacron_types::{Relation, Strength, VmAffinity, VmSpec};

/// Whether a policy's scope covers a VM of this spec.
#[must_use]
pub fn applies_to(scope: &Scope, spec: &VmSpec) -> bool {
    match (&scope.group, &scope.selector) {
        (Some(g), _) => spec.group.as_ref() == Some(g),
        (None, Some(sel)) => sel.iter().all(|(k, v)| spec.labels.get(k) == Some(v)),
        (None, None) => true,
    }
}

/// The policies that act, oldest first: enforced (not audit), and not the loser of a
/// resolution.
#[must_use]
pub fn in_force(state: &ClusterState) -> Vec<&Policy> {
    crate::observe::observed(state).into_iter().filter(|p| p.enforcement != Enforcement::Audit).collect()
}

fn strength(e: Enforcement) -> Strength {
    match e {
        Enforcement::Hard => Strength::Hard,
        Enforcement::Soft => Strength::Soft,
        Enforcement::Audit => Strength::None,
    }
}

/// Adds the placement rules of the policies that cover `spec` to `req`.
pub fn constrain(state: &ClusterState, spec: &VmSpec, req: &mut PlacementRequest) {
    if state.policies.is_empty() {
        return;
    }
    for p in in_force(state).into_iter().filter(|p| applies_to(&p.scope, spec)) {
        let hard = p.enforcement == Enforcement::Hard;
        match &p.rule {
            Rule::Placement(r) => {
                let into = if hard { &mut req.require_labels } else { &mut req.prefer_labels };
                for (k, v) in &r.require_labels {
                    into.entry(k.clone()).or_insert_with(|| v.clone());
                }
                if hard {
                    req.avoid.extend(r.exclude_hosts.iter().filter_map(|h| novacron_types::HostId::new(h).ok()));
                }
                if let Some(label) = &r.spread_over {
                    // Spreading the scope's VMs over a label is anti-affinity among them per
                    // domain: one per domain when hard, fewer per domain scoring higher when soft.
                    spread(p, label, req);
                }
            }
            Rule::Affinity(r) | Rule::AntiAffinity(r) => {
                let relation =
                    if matches!(p.rule, Rule::Affinity(_)) { Relation::Affinity } else { Relation::AntiAffinity };
                let selector =
                    r.selector.clone().or_else(|| if r.group.is_none() { p.scope.selector.clone() } else { None });
                match selector {
                    Some(selector) => req.vm_affinity.push(VmAffinity {
                        selector,
                        relation,
                        strength: strength(p.enforcement),
                        topology: r.topology.clone(),
                    }),
                    // The scope's own group (validation allows no other), or the whole cluster.
                    None if p.scope.group.is_some() => req.group_rules.push(GroupRule {
                        relation,
                        strength: strength(p.enforcement),
                        topology: r.topology.clone(),
                    }),
                    None => req.vm_affinity.push(VmAffinity {
                        selector: novacron_types::Labels::new(),
                        relation,
                        strength: strength(p.enforcement),
                        topology: r.topology.clone(),
                    }),
                }
            }
            _ => {}
        }
    }
}

fn spread(p: &Policy, label: &str, req: &mut PlacementRequest) {
    let strength = strength(p.enforcement);
    let topology = Some(label.to_owned());
    match (&p.scope.group, &p.scope.selector) {
        (Some(_), _) => req.group_rules.push(GroupRule { relation: Relation::AntiAffinity, strength, topology }),
        (None, sel) => req.vm_affinity.push(VmAffinity {
            selector: sel.clone().unwrap_or_default(),
            relation: Relation::AntiAffinity,
            strength,
            topology,
        }),
    }
}

/// The cluster's placement settings with the cluster-wide capacity policies applied.
#[must_use]
pub fn planner_config(state: &ClusterState, base: &PlannerConfig) -> PlannerConfig {
    let mut cfg = base.clone();
    for p in in_force(state).into_iter().filter(|p| p.scope.is_cluster() && p.enforcement == Enforcement::Hard) {
        if let Rule::Capacity(c) = &p.rule {
            if let Some(r) = c.cpu_overcommit {
                cfg.cpu_overcommit = r;
            }
            if let Some(r) = c.memory_overcommit {
                cfg.memory_overcommit = r;
            }
            if let Some(m) = c.max_vms_per_host {
                cfg.max_vms_per_host = Some(cfg.max_vms_per_host.map_or(m, |b| b.min(m)));
            }
            if let Some(r) = &c.reserved {
                cfg.reserved.vcpus = cfg.reserved.vcpus.max(r.vcpus);
                cfg.reserved.memory_mib = cfg.reserved.memory_mib.max(r.memory_mib);
            }
        }
    }
    cfg
}

/// Whether a new VM of `spec` (with `already` more being created alongside it) may be created:
/// no hard quota of a policy covering it would be exceeded, and its own required labels do not
/// contradict a hard placement policy. The error names the policy.
///
/// # Errors
/// Why not, naming the policy.
pub fn admit(state: &ClusterState, spec: &VmSpec, already: &[&VmSpec]) -> Result<(), String> {
    if state.policies.is_empty() {
        return Ok(());
    }
    for p in in_force(state).into_iter().filter(|p| p.enforcement == Enforcement::Hard && applies_to(&p.scope, spec)) {
        match &p.rule {
            Rule::Capacity(c) => {
                let Some(q) = &c.quota else { continue };
                let mut vms = 1u64;
                let mut vcpus = u64::from(spec.vcpus);
                let mut mem = spec.memory_mib;
                let live = state.vms.values().filter(|v| v.status != VmStatus::Deleted).map(|v| &v.spec);
                for s in live.chain(already.iter().copied()).filter(|s| applies_to(&p.scope, s)) {
                    vms += 1;
                    vcpus += u64::from(s.vcpus);
                    mem += s.memory_mib;
                }
                for (what, used, limit) in
                    [("VMs", vms, q.vms), ("vCPUs", vcpus, q.vcpus), ("MiB of memory", mem, q.memory_mib)]
                {
                    if let Some(limit) = limit
                        && used > limit
                    {
                        return Err(format!("policy {}: quota of {limit} {what} would be exceeded ({used})", p.name));
                    }
                }
            }
            Rule::Placement(r) => {
                for (k, v) in &r.require_labels {
                    if let Some(own) = spec.placement.require_labels.get(k)
                        && own != v
                    {
                        return Err(format!(
                            "policy {} requires host label {k}={v}, the VM asks for {k}={own}",
                            p.name
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}
