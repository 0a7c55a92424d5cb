//! The consolidation planner: which hosts the running VMs could be packed off, and the moves
//! that would do it. It plans only; nothing here executes a move.
//!
//! The cluster becomes a [`packing::Problem`]: each schedulable host (ready and in service) is
//! a bin of its capacity × overcommit in vCPUs, memory and disk (and VM count, when
//! `max_vms_per_host` is set); each VM assigned to one is an item. Hard group anti-affinity
//! becomes an item group and required labels an allow-list. Only running VMs may move (live
//! migration); VMs starting, stopping or migrating, and the reservations of migrations in flight,
//! stay where they are. So do the VMs bound by hard affinity (to their group or to labelled
//! VMs) or by hard label anti-affinity, either way round: the packer moves VMs one at a time,
//! and those rules tie VMs together. The search starts from the placement as it is, so a VM moves only if
//! its host is emptied or the search displaces it to make room.
//!
//! Soft preferences (soft anti-affinity, spreading over failure domains, observed load) are not
//! weighed: the plan is the fewest hosts the hard constraints allow.

use std::collections::BTreeMap;

use novacron_state::{ClusterState, VmStatus};
use novacron_types::{HostId, Strength, VmId};

use crate::packing::{self, Infeasible, Limits, Problem};
use crate::{PlannerConfig, effective_capacity};

/// One planned live migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    /// The VM.
    pub vm: VmId,
    /// Its name.
    pub name: String,
    /// Where it runs.
    pub from: HostId,
    /// Where the plan puts it.
    pub to: HostId,
}

/// What the planner found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsolidationPlan {
    /// The log position of the state planned from.
    pub log_seq: u64,
    /// Schedulable hosts running VMs now.
    pub hosts_before: usize,
    /// Schedulable hosts running VMs once the moves are done.
    pub hosts_after: usize,
    /// The hosts the moves empty, by id.
    pub emptied: Vec<HostId>,
    /// The moves, by VM id.
    pub moves: Vec<Move>,
    /// VMs on schedulable hosts that may not move now (not running, or migrating).
    pub pinned: usize,
    /// Search steps taken.
    pub steps: u64,
}

/// Why no plan came out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConsolidationError {
    /// The cluster as it runs already breaks a hard constraint, so there is nothing sound to
    /// start from (e.g. the overcommit ratio was lowered below what hosts carry).
    #[error("the current placement is not feasible under this configuration: {0}")]
    CurrentInfeasible(String),
}

/// Plans the consolidation of `state` under the cluster's placement settings.
///
/// # Errors
/// [`ConsolidationError::CurrentInfeasible`] if the placement as it stands breaks a hard
/// constraint.
pub fn plan_consolidation(
    state: &ClusterState,
    cfg: &PlannerConfig,
    limits: &Limits,
) -> Result<ConsolidationPlan, ConsolidationError> {
    let hosts: Vec<_> = state.hosts.values().filter(|h| h.schedulable()).collect();
    let bin_of_host: BTreeMap<&HostId, usize> = hosts.iter().enumerate().map(|(i, h)| (&h.id, i)).collect();
    let with_count = cfg.max_vms_per_host.is_some();
    let mut p = Problem::default();
    for h in &hosts {
        let c = effective_capacity(h, cfg);
        let mut cap = vec![i64::from(c.vcpus), as_i64(c.memory_mib), as_i64(c.disk_gib)];
        if let Some(m) = cfg.max_vms_per_host {
            cap.push(i64::from(m));
        }
        p.capacities.push(cap);
    }
    // What a VM takes in each dimension of the bins.
    let demand = |s: &novacron_types::VmSpec| {
        let mut w = vec![i64::from(s.vcpus), as_i64(s.memory_mib), as_i64(s.disk_gib)];
        if with_count {
            w.push(1);
        }
        w
    };
    let mut group_ids: BTreeMap<&str, u32> = BTreeMap::new();
    let mut allowed: Vec<Vec<bool>> = Vec::new();
    let mut start = Vec::new();
    // Per item: the VM when it may move.
    let mut movable: Vec<Option<&novacron_state::VmRecord>> = Vec::new();
    let mut pinned = 0;
    // The selectors of hard label rules: a VM they select is tied to others and stays put.
    let live = || state.vms.values().filter(|v| v.status != VmStatus::Deleted && v.host.is_some());
    let hard_rules: Vec<&novacron_types::VmAffinity> =
        live().flat_map(|v| v.spec.placement.vm_affinity.iter()).filter(|r| r.strength == Strength::Hard).collect();
    let tied = |s: &novacron_types::VmSpec| {
        s.placement.group_affinity == Strength::Hard
            || s.placement.vm_affinity.iter().any(|r| r.strength == Strength::Hard)
            || hard_rules.iter().any(|r| r.selects(&s.labels))
    };
    for vm in state.vms.values() {
        let Some(&bin) = vm.host.as_ref().and_then(|h| bin_of_host.get(h)) else { continue };
        if vm.status == VmStatus::Deleted {
            continue;
        }
        let s = &vm.spec;
        let w = demand(s);
        let may_move = vm.status == VmStatus::Running && vm.migration.is_none() && !tied(s);
        p.items.push(w);
        p.groups.push(match (&s.group, s.placement.group_anti_affinity) {
            (Some(g), novacron_types::Strength::Hard) => {
                let next = u32::try_from(group_ids.len()).unwrap_or(u32::MAX);
                Some(*group_ids.entry(g.as_str()).or_insert(next))
            }
            _ => None,
        });
        allowed.push(if !may_move {
            pinned += 1;
            (0..hosts.len()).map(|b| b == bin).collect()
        } else if s.placement.require_labels.is_empty() {
            Vec::new()
        } else {
            hosts.iter().map(|h| s.placement.require_labels.iter().all(|(k, v)| h.labels.get(k) == Some(v))).collect()
        });
        movable.push(may_move.then_some(vm));
        start.push(bin);
    }
    // Reservations of migrations in flight hold room on their destination.
    for h in &hosts {
        for vm in h.incoming.iter().filter_map(|id| state.vms.get(id)) {
            let bin = bin_of_host[&h.id];
            p.items.push(demand(&vm.spec));
            p.groups.push(None);
            allowed.push((0..hosts.len()).map(|b| b == bin).collect());
            movable.push(None);
            start.push(bin);
        }
    }
    p.allowed = Some(allowed);
    p.check(&start).map_err(|e| ConsolidationError::CurrentInfeasible(describe(&e, &hosts)))?;
    let packing = packing::consolidate(&p, Some(&start), limits)
        .ok_or_else(|| ConsolidationError::CurrentInfeasible("the starting placement was rejected".into()))?;

    let used = |assignment: &[usize]| -> std::collections::BTreeSet<usize> { assignment.iter().copied().collect() };
    let before = used(&start);
    let after = used(&packing.bin_of);
    let mut moves: Vec<Move> = movable
        .iter()
        .zip(start.iter().zip(&packing.bin_of))
        .filter_map(|(vm, (&a, &b))| {
            let vm = (*vm)?;
            (a != b).then(|| Move {
                vm: vm.id,
                name: vm.spec.name.clone(),
                from: hosts[a].id.clone(),
                to: hosts[b].id.clone(),
            })
        })
        .collect();
    moves.sort_by_key(|m| m.vm);
    Ok(ConsolidationPlan {
        log_seq: state.seq,
        hosts_before: before.len(),
        hosts_after: after.len(),
        emptied: before.difference(&after).map(|&b| hosts[b].id.clone()).collect(),
        moves,
        pinned,
        steps: packing.steps,
    })
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn describe(e: &Infeasible, hosts: &[&novacron_state::HostRecord]) -> String {
    const DIMS: [&str; 4] = ["vCPUs", "memory MiB", "disk GiB", "VMs"];
    match e {
        Infeasible::Overfull { bin, dim, load, capacity } => format!(
            "host {} carries {load} {} against {capacity} allowed",
            hosts[*bin].id,
            DIMS.get(*dim).unwrap_or(&"units")
        ),
        Infeasible::AntiAffinity { bin, .. } => {
            format!("host {} runs two VMs of one hard anti-affinity group", hosts[*bin].id)
        }
        Infeasible::NotAllowed { bin, .. } => {
            format!("a VM on host {} lacks a label it requires", hosts.get(*bin).map_or("?", |h| h.id.as_str()))
        }
        Infeasible::Length { .. } | Infeasible::Dimensions { .. } => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use novacron_types::event::{HostRegistered, PlacementExplanation, VmIncarnationReport, VmPlaced, VmRequested};
    use novacron_types::{
        Actor, Envelope, EventKind, Generation, IncarnationId, Labels, PlacementRules, Resources, StartVm, VmSpec,
    };

    use super::*;

    struct Cluster {
        state: ClusterState,
        seq: u64,
    }

    impl Cluster {
        fn new() -> Cluster {
            Cluster { state: ClusterState::default(), seq: 0 }
        }

        fn apply(&mut self, kind: EventKind) {
            self.seq += 1;
            let env = Envelope::new(self.seq, Actor::Orchestrator("t".into()), kind);
            self.state.apply(self.seq, &env);
        }

        fn host(&mut self, name: &str, vcpus: u32, labels: Labels) -> HostId {
            let host = HostId::new(name).expect("host id");
            self.apply(EventKind::HostRegistered(HostRegistered {
                host: host.clone(),
                capacity: Resources { vcpus, memory_mib: u64::from(vcpus) * 1024, disk_gib: 0 },
                labels,
                driver: "sim".into(),
            }));
            host
        }

        fn running(&mut self, host: &HostId, vcpus: u32, group: Option<&str>, rules: PlacementRules) -> VmId {
            let vm = VmId::new_v7();
            let incarnation = IncarnationId::new_v7();
            let g = Generation::FIRST;
            let spec = VmSpec {
                name: format!("vm-{}", self.seq),
                vcpus,
                memory_mib: u64::from(vcpus) * 1024,
                disk_gib: 0,
                group: group.map(str::to_owned),
                labels: Labels::default(),
                restart: Default::default(),
                placement: rules,
            };
            self.apply(EventKind::VmRequested(VmRequested { vm, spec: spec.clone() }));
            self.apply(EventKind::VmPlaced(VmPlaced {
                vm,
                host: host.clone(),
                incarnation,
                generation: g,
                explanation: PlacementExplanation::default(),
            }));
            self.apply(EventKind::VmStartCommanded(StartVm {
                vm,
                host: host.clone(),
                incarnation,
                generation: g,
                spec,
            }));
            self.apply(EventKind::VmRunning(VmIncarnationReport {
                vm,
                host: host.clone(),
                incarnation,
                generation: g,
            }));
            vm
        }
    }

    fn plan(c: &Cluster) -> ConsolidationPlan {
        plan_consolidation(&c.state, &PlannerConfig::default(), &Limits::default()).expect("plans")
    }

    #[test]
    fn a_spread_cluster_packs_onto_fewer_hosts_and_the_plan_is_feasible() {
        let mut c = Cluster::new();
        let hosts: Vec<HostId> = (0..4).map(|i| c.host(&format!("h{i}"), 16, Labels::default())).collect();
        for h in &hosts {
            c.running(h, 4, None, PlacementRules::default());
            c.running(h, 2, None, PlacementRules::default());
        }
        // 24 vCPUs in all over 16-vCPU hosts: two hosts suffice.
        let p = plan(&c);
        assert_eq!((p.hosts_before, p.hosts_after), (4, 2), "{p:?}");
        assert_eq!(p.emptied.len(), 2);
        // Every VM on an emptied host moves, to a host that is kept, and no host overflows.
        let mut load: BTreeMap<HostId, u32> = BTreeMap::new();
        for vm in c.state.vms.values() {
            let m = p.moves.iter().find(|m| m.vm == vm.id);
            let at = m.map_or_else(|| vm.host.clone().expect("placed"), |m| m.to.clone());
            assert!(!p.emptied.contains(&at), "{} left on emptied host {at}", vm.spec.name);
            *load.entry(at).or_default() += vm.spec.vcpus;
        }
        assert!(load.values().all(|&v| v <= 16), "{load:?}");
        assert!(p.moves.len() <= 6, "at most the VMs of two hosts and a few displaced: {}", p.moves.len());
    }

    #[test]
    fn hard_constraints_and_pinned_vms_hold_in_the_plan() {
        let mut c = Cluster::new();
        let gpu: Labels = [("gpu".to_owned(), "yes".to_owned())].into();
        let h0 = c.host("h0", 16, gpu.clone());
        let h1 = c.host("h1", 16, Labels::default());
        let h2 = c.host("h2", 16, Labels::default());
        let hard = PlacementRules { group_anti_affinity: Strength::Hard, ..PlacementRules::default() };
        // Two VMs of a hard anti-affinity group must stay on two hosts.
        c.running(&h1, 1, Some("db"), hard.clone());
        c.running(&h2, 1, Some("db"), hard);
        // A VM requiring the gpu label may only be on h0.
        let needs_gpu = PlacementRules { require_labels: gpu, ..PlacementRules::default() };
        c.running(&h0, 1, None, needs_gpu);
        let p = plan(&c);
        assert_eq!(p.hosts_after, 2, "db pair on two hosts, the gpu VM with one of them: {p:?}");
        for m in &p.moves {
            let vm = &c.state.vms[&m.vm];
            assert!(vm.spec.placement.require_labels.is_empty() || m.to == h0, "{m:?}");
        }
        let db_hosts: std::collections::BTreeSet<HostId> = c
            .state
            .vms
            .values()
            .filter(|v| v.spec.group.as_deref() == Some("db"))
            .map(|v| {
                p.moves.iter().find(|m| m.vm == v.id).map_or_else(|| v.host.clone().expect("placed"), |m| m.to.clone())
            })
            .collect();
        assert_eq!(db_hosts.len(), 2, "anti-affinity kept: {p:?}");
    }

    #[test]
    fn a_cluster_already_over_its_limits_is_an_error_not_a_plan() {
        let mut c = Cluster::new();
        let h = c.host("h0", 4, Labels::default());
        c.running(&h, 4, None, PlacementRules::default());
        c.running(&c.state.hosts[&h].id.clone(), 1, None, PlacementRules::default());
        let err = plan_consolidation(&c.state, &PlannerConfig::default(), &Limits::default()).expect_err("overfull");
        assert!(err.to_string().contains("host h0 carries 5 vCPUs against 4"), "{err}");
    }
}
