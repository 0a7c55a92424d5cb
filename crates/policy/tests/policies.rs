//! The policy engine against example documents and a real folded state.

use std::path::PathBuf;

use novacron_policy::enforce::{admit, constrain, in_force, planner_config};
use novacron_policy::{conflicts, parse_policies, resolve, unknown_groups, validate};
use novacron_scheduler::{LoadView, Placement, PlacementRequest, Planner, PlannerConfig};
use novacron_state::ClusterState;
use novacron_types::event::{HostRegistered, PlacementExplanation, PolicyApplied, VmPlaced, VmRequested};
use novacron_types::policy::Policy;
use novacron_types::{Actor, Envelope, EventKind, Generation, HostId, IncarnationId, Labels, Resources, VmId, VmSpec};

fn examples() -> Vec<(String, Vec<Policy>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/examples/policies");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let docs = parse_policies(&name, &text).unwrap_or_else(|e| panic!("{e}"));
        out.push((name, docs));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn every_example_parses_validates_and_the_set_has_no_conflict() {
    let all: Vec<Policy> = examples().into_iter().flat_map(|(_, d)| d).collect();
    assert!(all.len() >= 9, "{} documents", all.len());
    for p in &all {
        assert!(validate(p).is_empty(), "{}: {:?}", p.name, validate(p));
    }
    assert!(conflicts(&all, None).is_empty(), "{:?}", conflicts(&all, None));
    assert!(resolve(&all).is_empty());
}

struct Cluster {
    state: ClusterState,
}

impl Cluster {
    fn new(hosts: &[(&str, &[(&str, &str)])]) -> Cluster {
        let mut c = Cluster { state: ClusterState::default() };
        for (id, labels) in hosts {
            c.apply(EventKind::HostRegistered(HostRegistered {
                host: HostId::new(*id).unwrap(),
                capacity: Resources { vcpus: 8, memory_mib: 16384, disk_gib: 0 },
                labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
                driver: "sim".into(),
            }));
        }
        c
    }

    fn apply(&mut self, kind: EventKind) {
        let seq = self.state.seq + 1;
        self.state.apply(seq, &Envelope::new(0, Actor::Orchestrator("t".into()), kind));
    }

    fn policies(&mut self, yaml: &str) {
        for policy in parse_policies("t.yaml", yaml).unwrap() {
            let version = self.state.policy_version + 1;
            self.apply(EventKind::PolicyApplied(PolicyApplied { version, policy }));
        }
    }

    fn place(&mut self, spec: &VmSpec) -> Option<String> {
        let cfg = planner_config(&self.state, &PlannerConfig::default());
        let load = LoadView::default();
        let mut req = PlacementRequest::for_spec(spec);
        constrain(&self.state, spec, &mut req);
        let decision = Planner::new(&self.state, &cfg, &load).place(&req);
        let Placement::Host { host, .. } = decision else { return None };
        let vm = VmId::new_v7();
        self.apply(EventKind::VmRequested(VmRequested { vm, spec: spec.clone() }));
        self.apply(EventKind::VmPlaced(VmPlaced {
            vm,
            host: host.clone(),
            incarnation: IncarnationId::new_v7(),
            generation: Generation::FIRST,
            explanation: PlacementExplanation::default(),
        }));
        Some(host.to_string())
    }
}

fn spec(name: &str, group: Option<&str>, labels: &[(&str, &str)]) -> VmSpec {
    VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_mib: 256,
        disk_gib: 0,
        group: group.map(str::to_owned),
        labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<Labels>(),
        restart: Default::default(),
        placement: Default::default(),
    }
}

#[test]
fn a_hard_group_anti_affinity_policy_per_zone_is_never_broken() {
    let mut c = Cluster::new(&[("h1", &[("zone", "a")]), ("h2", &[("zone", "a")]), ("h3", &[("zone", "b")])]);
    c.policies("name: db-apart\nscope: {group: db}\nrule: {anti-affinity: {topology: zone}}\n");
    let a = c.place(&spec("db-1", Some("db"), &[])).unwrap();
    let b = c.place(&spec("db-2", Some("db"), &[])).unwrap();
    let zone = |h: &str| c.state.hosts[&HostId::new(h).unwrap()].labels["zone"].clone();
    assert_ne!(zone(&a), zone(&b));
    assert_eq!(c.place(&spec("db-3", Some("db"), &[])), None, "two zones hold two databases");
    // Other VMs are not bound by it.
    assert!(c.place(&spec("web-1", Some("web"), &[])).is_some());
}

#[test]
fn placement_capacity_and_quota_policies_shape_decisions_and_admission() {
    let mut c = Cluster::new(&[("h1", &[("gpu", "a100")]), ("h2", &[]), ("old", &[("gpu", "a100")])]);
    c.policies(
        "name: ml-gpu\nscope: {group: ml}\nrule: {placement: {require_labels: {gpu: a100}, exclude_hosts: [old]}}\n---\n\
         name: dense\nrule: {capacity: {cpu_overcommit: 2.0, max_vms_per_host: 3}}\n---\n\
         name: ml-quota\nscope: {group: ml}\nrule: {capacity: {quota: {vms: 2}}}\n",
    );
    assert_eq!(planner_config(&c.state, &PlannerConfig::default()).cpu_overcommit, 2.0);
    assert_eq!(planner_config(&c.state, &PlannerConfig::default()).max_vms_per_host, Some(3));
    assert_eq!(c.place(&spec("ml-1", Some("ml"), &[])).as_deref(), Some("h1"), "the GPU host not retired");
    assert!(admit(&c.state, &spec("ml-2", Some("ml"), &[]), &[]).is_ok());
    let second = spec("ml-2", Some("ml"), &[]);
    let err = admit(&c.state, &spec("ml-3", Some("ml"), &[]), &[&second]).unwrap_err();
    assert!(err.contains("policy ml-quota: quota of 2 VMs would be exceeded (3)"), "{err}");
    let mut wrong = spec("ml-x", Some("ml"), &[]);
    wrong.placement.require_labels.insert("gpu".into(), "h100".into());
    assert!(admit(&c.state, &wrong, &[]).unwrap_err().contains("requires host label gpu=a100"));
}

#[test]
fn a_soft_policy_that_loses_a_resolution_does_not_act() {
    let mut c = Cluster::new(&[("h1", &[("zone", "a")]), ("h2", &[("zone", "b")])]);
    c.policies(
        "name: wide\nenforcement: soft\nrule: {placement: {require_labels: {zone: a}}}\n---\n\
         name: narrow\nscope: {group: db}\nenforcement: soft\nrule: {placement: {require_labels: {zone: b}}}\n",
    );
    let names: Vec<&str> = in_force(&c.state).iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["narrow"], "the more specific one prevails");
    let mut req = PlacementRequest::for_spec(&spec("db-1", Some("db"), &[]));
    constrain(&c.state, &spec("db-1", Some("db"), &[]), &mut req);
    assert_eq!(req.prefer_labels.get("zone").map(String::as_str), Some("b"));
    assert!(req.require_labels.is_empty(), "soft rules are preferences, not filters");
    assert_eq!(c.place(&spec("db-1", Some("db"), &[])).as_deref(), Some("h2"));
}

#[test]
fn rules_the_cluster_cannot_satisfy_are_conflicts_naming_the_policy() {
    let c = Cluster::new(&[("h1", &[]), ("h2", &[])]);
    let set = parse_policies(
        "t.yaml",
        "name: on-gpu\nrule: {placement: {require_labels: {gpu: a100}}}\n---\n\
         name: web-apart\nscope: {group: web}\nrule: {anti-affinity: {}}\n---\n\
         name: web-size\nscope: {group: web}\nrule: {scaling: {min: 3, max: 5}}\n---\n\
         name: ghost\nscope: {group: nobody}\nrule: {healing: {restart: always}}\n",
    )
    .unwrap();
    let found: Vec<String> = conflicts(&set, Some(&c.state)).iter().map(ToString::to_string).collect();
    assert!(found.iter().any(|c| c == "policy on-gpu: no host of 2 carries gpu=a100"), "{found:?}");
    assert!(
        found.iter().any(|c| c.starts_with("policies web-apart and web-size: group web must keep at least 3 VMs")),
        "{found:?}"
    );
    assert!(!found.iter().any(|c| c.contains("ghost")), "an unknown group is its own check: {found:?}");
    let warned: Vec<String> = unknown_groups(&set, &c.state).iter().map(ToString::to_string).collect();
    assert_eq!(warned, ["policy ghost: group nobody is unknown: no VM is in it and no scaling policy defines it"]);
}

#[test]
fn spread_over_and_reserved_headroom_act_on_placement() {
    let mut c = Cluster::new(&[("h1", &[("zone", "a")]), ("h2", &[("zone", "a")]), ("h3", &[("zone", "b")])]);
    c.policies(
        "name: web-zones\nscope: {group: web}\nrule: {placement: {spread_over: zone}}\n---\n\
         name: headroom\nrule: {capacity: {reserved: {vcpus: 6}}}\n",
    );
    assert_eq!(planner_config(&c.state, &PlannerConfig::default()).reserved.vcpus, 6);
    let a = c.place(&spec("web-1", Some("web"), &[])).unwrap();
    let b = c.place(&spec("web-2", Some("web"), &[])).unwrap();
    let zone = |h: &str| c.state.hosts[&HostId::new(h).unwrap()].labels["zone"].clone();
    assert_ne!(zone(&a), zone(&b), "hard spread: one per zone");
    assert_eq!(c.place(&spec("web-3", Some("web"), &[])), None);
    // 8 vCPUs less 6 reserved leave 2 per host: three hosts take six 1-vCPU VMs, not more.
    let mut placed = 2;
    while c.place(&spec(&format!("other-{placed}"), None, &[])).is_some() {
        placed += 1;
        assert!(placed <= 6, "the headroom is never given away");
    }
    assert_eq!(placed, 6);
}
