use novacron_types::event::{HostRegistered, PlacementExplanation, VmPlaced, VmRequested};
use novacron_types::{Actor, Envelope, EventKind, Generation, IncarnationId, Labels, VmAffinity};
use proptest::prelude::*;

use super::Strategy;
use super::*;

/// A test host: vCPUs, memory MiB, labels.
type HostSpec<'a> = (u32, u64, &'a [(&'a str, &'a str)]);

fn state_with(hosts: &[HostSpec<'_>]) -> ClusterState {
    let mut s = ClusterState::default();
    for (i, (vcpus, mem, labels)) in hosts.iter().enumerate() {
        let e = Envelope::new(
            0,
            Actor::Orchestrator("t".into()),
            EventKind::HostRegistered(HostRegistered {
                host: HostId::new(format!("h{i:02}")).unwrap(),
                capacity: Resources { vcpus: *vcpus, memory_mib: *mem, disk_gib: 0 },
                labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
                driver: "sim".into(),
            }),
        );
        s.apply(i as u64 + 1, &e);
    }
    s
}

/// A test host whose labels are owned by the test.
type OwnedHost<'a> = (u32, u64, Vec<(&'a str, &'a str)>);

fn req(vcpus: u32, mem: u64) -> PlacementRequest {
    PlacementRequest { need: Resources { vcpus, memory_mib: mem, disk_gib: 0 }, ..PlacementRequest::default() }
}

fn host_of(p: &Placement) -> &str {
    match p {
        Placement::Host { host, .. } => host.as_str(),
        Placement::Unplaceable { reason, .. } => panic!("unplaceable: {reason}"),
    }
}

#[test]
fn unplaceable_vm_explains_which_filter_eliminated_the_hosts() {
    let s = state_with(&[(2, 1024, &[]), (4, 2048, &[])]);
    let Placement::Unplaceable { reason, explanation } = place(&s, req(8, 512).need, &BTreeMap::new()) else {
        panic!("8 vCPUs must not fit");
    };
    assert_eq!(explanation.rejections.get(filters::CAPACITY), Some(&2));
    assert!(reason.contains("capacity eliminated 2 of 2"), "{reason}");
}

#[test]
fn bin_pack_fills_a_host_and_spread_uses_the_emptiest() {
    let s = state_with(&[(8, 8192, &[]), (8, 8192, &[])]);
    let load = LoadView::default();
    let pack = PlannerConfig::default();
    let mut p = Planner::new(&s, &pack, &load);
    let first = host_of(&p.place(&req(2, 1024))).to_owned();
    assert_eq!(host_of(&p.place(&req(2, 1024))), first, "bin-pack goes back to the fuller host");
    let spread = PlannerConfig { strategy: Strategy::Spread, ..PlannerConfig::default() };
    let mut p = Planner::new(&s, &spread, &load);
    let first = host_of(&p.place(&req(2, 1024))).to_owned();
    assert_ne!(host_of(&p.place(&req(2, 1024))), first, "spread goes to the emptier host");
}

#[test]
fn overcommit_ratios_come_from_the_cluster_and_the_host_label() {
    let s = state_with(&[(4, 8192, &[("overcommit.cpu", "4")]), (4, 8192, &[])]);
    let load = LoadView::default();
    let cfg = PlannerConfig::default();
    let mut p = Planner::new(&s, &cfg, &load);
    let mut per_host: BTreeMap<String, u32> = BTreeMap::new();
    while let Placement::Host { host, .. } = p.place(&req(2, 256)) {
        *per_host.entry(host.to_string()).or_default() += 1;
        assert!(per_host.values().sum::<u32>() <= 10, "more placed than capacity allows: {per_host:?}");
    }
    assert_eq!(per_host.get("h00"), Some(&8), "h00 sells 4 × 4 = 16 vCPUs: {per_host:?}");
    assert_eq!(per_host.get("h01"), Some(&2), "h01 sells its 4: {per_host:?}");
}

#[test]
fn required_labels_max_vms_and_hard_anti_affinity_are_filters() {
    let s = state_with(&[
        (16, 16384, &[("gpu", "yes"), ("zone", "a")]),
        (16, 16384, &[("zone", "b")]),
        (16, 16384, &[("zone", "a")]),
    ]);
    let load = LoadView::default();
    let cfg = PlannerConfig { max_vms_per_host: Some(1), ..PlannerConfig::default() };
    let mut p = Planner::new(&s, &cfg, &load);
    let mut gpu = req(1, 256);
    gpu.require_labels = Labels::from([("gpu".to_owned(), "yes".to_owned())]);
    assert_eq!(host_of(&p.place(&gpu)), "h00");
    let Placement::Unplaceable { explanation, .. } = p.place(&gpu) else { panic!("h00 is at its max") };
    assert_eq!(explanation.rejections.get(filters::REQUIRED_LABELS), Some(&2));
    assert_eq!(explanation.rejections.get(filters::MAX_VMS), Some(&1));

    let cfg = PlannerConfig::default();
    let mut p = Planner::new(&s, &cfg, &load);
    let mut web = req(1, 256);
    web.group = Some("web".into());
    web.anti_affinity = Strength::Hard;
    let placed: Vec<String> = (0..3).map(|_| host_of(&p.place(&web)).to_owned()).collect();
    let mut unique = placed.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 3, "one per host: {placed:?}");
    let Placement::Unplaceable { explanation, .. } = p.place(&web) else { panic!("a fourth has nowhere to go") };
    assert_eq!(explanation.rejections.get(filters::ANTI_AFFINITY), Some(&3));
}

#[test]
fn a_group_spreads_across_failure_domains_and_load_counts() {
    let s = state_with(&[(16, 16384, &[("zone", "a")]), (16, 16384, &[("zone", "a")]), (16, 16384, &[("zone", "b")])]);
    let load = LoadView::default();
    let cfg = PlannerConfig::default();
    let mut p = Planner::new(&s, &cfg, &load);
    let mut db = req(1, 256);
    db.group = Some("db".into());
    let first = host_of(&p.place(&db)).to_owned();
    let second = host_of(&p.place(&db)).to_owned();
    let zone = |h: &str| s.hosts[&HostId::new(h).unwrap()].labels["zone"].clone();
    assert_ne!(zone(&first), zone(&second), "the second replica goes to the other zone");

    let busy = LoadView {
        cpu_util: BTreeMap::from([(HostId::new("h00").unwrap(), 0.95), (HostId::new("h01").unwrap(), 0.05)]),
        watermark_ms: Some(42),
        ..LoadView::default()
    };
    let spread = PlannerConfig { strategy: Strategy::Spread, failure_domain_label: None, ..PlannerConfig::default() };
    let two = state_with(&[(16, 16384, &[]), (16, 16384, &[])]);
    let Placement::Host { host, explanation } = Planner::new(&two, &spread, &busy).place(&req(1, 256)) else {
        panic!()
    };
    assert_eq!(host.as_str(), "h01", "the idle host wins when the fit is equal");
    assert_eq!(explanation.telemetry_watermark_ms, Some(42), "the explanation says what it read");
    assert!(explanation.candidates[0].components.contains_key("load"));
}

#[test]
fn a_host_likely_to_fail_loses_to_an_equal_one_and_the_explanation_says_why() {
    let two = state_with(&[(16, 16384, &[]), (16, 16384, &[])]);
    let cfg = PlannerConfig::default();
    let risky = LoadView {
        failure_risk: BTreeMap::from([(HostId::new("h00").unwrap(), 0.4), (HostId::new("h01").unwrap(), 0.01)]),
        ..LoadView::default()
    };
    let Placement::Host { host, explanation } = Planner::new(&two, &cfg, &risky).place(&req(1, 256)) else { panic!() };
    assert_eq!(host.as_str(), "h01", "bin-packing ties; the risk decides");
    assert_eq!(explanation.candidates[0].components.get("failure_risk"), Some(&-0.01));
    assert_eq!(explanation.candidates[1].components.get("failure_risk"), Some(&-0.4));
    // Without scores, the lower id wins the tie as always.
    let Placement::Host { host, explanation } = Planner::new(&two, &cfg, &LoadView::default()).place(&req(1, 256))
    else {
        panic!()
    };
    assert_eq!(host.as_str(), "h00");
    assert!(!explanation.candidates[0].components.contains_key("failure_risk"));
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn rule(relation: Relation, strength: Strength, selector: &[(&str, &str)], topology: Option<&str>) -> VmAffinity {
    VmAffinity { selector: labels(selector), relation, strength, topology: topology.map(str::to_owned) }
}

/// Records a VM of `spec` as placed on `host` in the state (as the log would).
fn add_vm(s: &mut ClusterState, host: &str, spec: VmSpec) -> VmId {
    let vm = VmId::new_v7();
    for kind in [
        EventKind::VmRequested(VmRequested { vm, spec }),
        EventKind::VmPlaced(VmPlaced {
            vm,
            host: HostId::new(host).unwrap(),
            incarnation: IncarnationId::new_v7(),
            generation: Generation::FIRST,
            explanation: PlacementExplanation::default(),
        }),
    ] {
        let seq = s.seq + 1;
        s.apply(seq, &Envelope::new(0, Actor::Orchestrator("t".into()), kind));
    }
    vm
}

fn spec(name: &str, group: Option<&str>, own: &[(&str, &str)], placement: PlacementRules) -> VmSpec {
    VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_mib: 256,
        disk_gib: 0,
        group: group.map(str::to_owned),
        labels: labels(own),
        restart: Default::default(),
        placement,
    }
}

#[test]
fn hard_group_affinity_follows_the_first_member_until_its_host_is_full() {
    let s = state_with(&[(2, 4096, &[]), (8, 16384, &[]), (8, 16384, &[])]);
    let load = LoadView::default();
    let cfg = PlannerConfig { strategy: Strategy::Spread, ..PlannerConfig::default() };
    let mut p = Planner::new(&s, &cfg, &load);
    let mut pair = req(1, 256);
    pair.group = Some("pair".into());
    pair.group_affinity = Strength::Hard;
    // Spread sends the first to an empty big host; the rest must follow it.
    let first = host_of(&p.place(&pair)).to_owned();
    assert_ne!(first, "h00");
    for _ in 0..7 {
        assert_eq!(host_of(&p.place(&pair)), first, "members stay together even though spread prefers empty hosts");
    }
    let Placement::Unplaceable { explanation, .. } = p.place(&pair) else { panic!("its host is full") };
    assert_eq!(explanation.rejections.get(filters::AFFINITY), Some(&2), "{explanation:?}");
    assert_eq!(explanation.rejections.get(filters::CAPACITY), Some(&1), "{explanation:?}");

    // Soft affinity prefers the group's host but is only a score.
    let mut p = Planner::new(&s, &cfg, &load);
    let mut soft = pair.clone();
    soft.group_affinity = Strength::Soft;
    let first = host_of(&p.place(&soft)).to_owned();
    let Placement::Host { host, explanation } = p.place(&soft) else { panic!() };
    assert_eq!(host.as_str(), first);
    assert!(explanation.candidates[0].components["affinity"] > 0.0, "{explanation:?}");
}

#[test]
fn label_anti_affinity_per_zone_binds_both_ways() {
    let mut s = state_with(&[
        (8, 16384, &[("zone", "a")]),
        (8, 16384, &[("zone", "a")]),
        (8, 16384, &[("zone", "b")]),
        (8, 16384, &[("zone", "c")]),
    ]);
    // A database already in zone c that wants no other database in its zone.
    let db_rules = PlacementRules {
        vm_affinity: vec![rule(Relation::AntiAffinity, Strength::Hard, &[("app", "db")], Some("zone"))],
        ..PlacementRules::default()
    };
    add_vm(&mut s, "h03", spec("db-0", None, &[("app", "db")], PlacementRules::default()));
    let load = LoadView::default();
    let cfg = PlannerConfig::default();
    let mut p = Planner::new(&s, &cfg, &load);
    let db = PlacementRequest::for_spec(&spec("db", None, &[("app", "db")], db_rules.clone()));
    let a = host_of(&p.place(&db)).to_owned();
    let b = host_of(&p.place(&db)).to_owned();
    let zone = |h: &str| s.hosts[&HostId::new(h).unwrap()].labels["zone"].clone();
    let mut zones = vec![zone(&a), zone(&b)];
    zones.sort();
    assert_eq!(zones, ["a", "b"], "one database per zone; zone c already has one");
    let Placement::Unplaceable { explanation, .. } = p.place(&db) else { panic!("every zone has a database") };
    assert_eq!(explanation.rejections.get(filters::ANTI_AFFINITY), Some(&4), "{explanation:?}");

    // The other way round: a cache that must stay out of any database's host, placed in a state
    // where the rule belongs to the database already running.
    let mut s = state_with(&[(8, 16384, &[]), (8, 16384, &[])]);
    let keeps_caches_out = PlacementRules {
        vm_affinity: vec![rule(Relation::AntiAffinity, Strength::Hard, &[("app", "cache")], None)],
        ..PlacementRules::default()
    };
    add_vm(&mut s, "h01", spec("db-1", None, &[("app", "db")], keeps_caches_out));
    let mut p = Planner::new(&s, &cfg, &load);
    let cache = PlacementRequest::for_spec(&spec("cache", None, &[("app", "cache")], PlacementRules::default()));
    // Bin-pack would pick the busier h01; the database's rule forbids it.
    assert_eq!(host_of(&p.place(&cache)), "h00");
}

#[test]
fn label_affinity_needs_a_selected_vm_in_the_domain_once_one_exists() {
    let mut s =
        state_with(&[(8, 16384, &[("rack", "r1")]), (8, 16384, &[("rack", "r1")]), (8, 16384, &[("rack", "r2")])]);
    let load = LoadView::default();
    let cfg = PlannerConfig { strategy: Strategy::Spread, ..PlannerConfig::default() };
    let near_web = PlacementRules {
        vm_affinity: vec![rule(Relation::Affinity, Strength::Hard, &[("app", "web")], Some("rack"))],
        ..PlacementRules::default()
    };
    let cache = PlacementRequest::for_spec(&spec("cache", None, &[("app", "cache")], near_web));
    // No web VM anywhere: the first cache goes where it fits.
    assert!(matches!(Planner::new(&s, &cfg, &load).place(&cache), Placement::Host { .. }));
    add_vm(&mut s, "h00", spec("web-1", None, &[("app", "web")], PlacementRules::default()));
    let mut p = Planner::new(&s, &cfg, &load);
    for _ in 0..4 {
        let Placement::Host { host, explanation } = p.place(&cache) else { panic!() };
        assert_ne!(host.as_str(), "h02", "rack r2 has no web VM");
        assert_eq!(explanation.rejections.get(filters::AFFINITY), Some(&1), "{explanation:?}");
    }
}

#[test]
fn a_vm_being_moved_never_counts_against_itself() {
    let mut s = state_with(&[(8, 16384, &[]), (8, 16384, &[])]);
    // The only member of a hard-affinity group, and a VM that keeps its own kind away: both may
    // move to another host (their own presence on the source does not bind them).
    let together = PlacementRules { group_affinity: Strength::Hard, ..PlacementRules::default() };
    let alone = PlacementRules {
        vm_affinity: vec![rule(Relation::AntiAffinity, Strength::Hard, &[("app", "lb")], None)],
        ..PlacementRules::default()
    };
    let a = add_vm(&mut s, "h00", spec("a", Some("g"), &[], together));
    let b = add_vm(&mut s, "h00", spec("b", None, &[("app", "lb")], alone));
    let load = LoadView::default();
    let cfg = PlannerConfig::default();
    for vm in [a, b] {
        let mut p = Planner::new(&s, &cfg, &load);
        let mut r = PlacementRequest::for_vm(&s.vms[&vm]);
        r.avoid.push(HostId::new("h00").unwrap());
        assert_eq!(host_of(&p.place(&r)), "h01", "{}", s.vms[&vm].spec.name);
    }
    // A second load balancer, though, stays off h00.
    let lb = PlacementRequest::for_spec(&spec("lb-2", None, &[("app", "lb")], PlacementRules::default()));
    assert_eq!(host_of(&Planner::new(&s, &cfg, &load).place(&lb)), "h01");
}

#[test]
fn strategy_is_the_vms_then_the_groups_then_the_clusters() {
    let mut s = state_with(&[(8, 16384, &[]), (8, 16384, &[])]);
    add_vm(&mut s, "h01", spec("busy", None, &[], PlacementRules::default()));
    let load = LoadView::default();
    let mut cfg = PlannerConfig { failure_domain_label: None, ..PlannerConfig::default() };
    cfg.group_strategy.insert("batch".into(), Strategy::Spread);
    let chosen = |r: &PlacementRequest| match Planner::new(&s, &cfg, &load).place(r) {
        Placement::Host { host, explanation } => (host.to_string(), explanation.planner),
        Placement::Unplaceable { reason, .. } => panic!("{reason}"),
    };
    let plain = req(1, 256);
    assert_eq!(chosen(&plain), ("h01".into(), "filter-score/bin-pack".into()));
    let mut batch = req(1, 256);
    batch.group = Some("batch".into());
    assert_eq!(chosen(&batch), ("h00".into(), "filter-score/spread".into()));
    batch.strategy = Some(Strategy::BinPack);
    assert_eq!(chosen(&batch), ("h01".into(), "filter-score/bin-pack".into()));
}

/// Hosts of 4 vCPUs and 4 GiB in zones `a`, `b`, `c` (by index).
fn zoned(zones: &[u8]) -> ClusterState {
    let names = ["a", "b", "c"];
    let specs: Vec<OwnedHost<'_>> = zones.iter().map(|z| (4u32, 4096u64, vec![("zone", names[*z as usize])])).collect();
    let refs: Vec<HostSpec<'_>> = specs.iter().map(|(c, m, l)| (*c, *m, l.as_slice())).collect();
    state_with(&refs)
}

proptest! {
    #[test]
    fn placement_never_exceeds_capacity_or_breaks_a_hard_constraint(
        hosts in prop::collection::vec((1u32..32, 512u64..65536, any::<bool>(), 0u8..3), 1..8),
        vms in prop::collection::vec((1u32..16, 128u64..16384, 0u8..3, any::<bool>(), any::<bool>()), 1..40),
        spread in any::<bool>(),
        max_vms in prop::option::of(1u32..6),
    ) {
        let zones = ["a", "b", "c"];
        let specs: Vec<OwnedHost<'_>> = hosts
            .iter()
            .map(|(c, m, gpu, z)| {
                let mut l = vec![("zone", zones[*z as usize])];
                if *gpu { l.push(("gpu", "yes")); }
                (*c, *m, l)
            })
            .collect();
        let refs: Vec<HostSpec<'_>> = specs.iter().map(|(c, m, l)| (*c, *m, l.as_slice())).collect();
        let s = state_with(&refs);
        let cfg = PlannerConfig {
            strategy: if spread { Strategy::Spread } else { Strategy::BinPack },
            max_vms_per_host: max_vms,
            ..PlannerConfig::default()
        };
        let load = LoadView::default();
        let mut p = Planner::new(&s, &cfg, &load);
        let mut used: BTreeMap<HostId, (Resources, u32)> = BTreeMap::new();
        let mut groups_on: BTreeMap<(HostId, u8), u32> = BTreeMap::new();
        // Requests that found no host: a later one no easier than one of them finds none.
        let mut failed: Vec<PlacementRequest> = Vec::new();
        for (vcpus, mem, group, hard, gpu) in vms {
            let mut r = req(vcpus, mem);
            r.group = Some(format!("g{group}"));
            if hard { r.anti_affinity = Strength::Hard; }
            if gpu { r.require_labels = Labels::from([("gpu".to_owned(), "yes".to_owned())]); }
            match p.place(&r) {
                Placement::Host { host, explanation } => {
                    prop_assert!(!failed.iter().any(|f| r.no_easier_than(f)), "placed after an easier request failed");
                    let h = &s.hosts[&host];
                    prop_assert!(!gpu || h.labels.get("gpu").map(String::as_str) == Some("yes"));
                    if hard { prop_assert_eq!(groups_on.get(&(host.clone(), group)).copied().unwrap_or(0), 0); }
                    let u = used.entry(host.clone()).or_default();
                    u.0 = u.0.checked_add(r.need).unwrap();
                    u.1 += 1;
                    prop_assert!(u.0.fits_within(h.capacity), "{host} overcommitted: {:?}", u.0);
                    if let Some(m) = max_vms { prop_assert!(u.1 <= m); }
                    *groups_on.entry((host, group)).or_default() += 1;
                    prop_assert!(explanation.hosts_considered as usize <= s.hosts.len());
                }
                Placement::Unplaceable { explanation, .. } => {
                    let eliminated: u32 = explanation.rejections.values().sum();
                    prop_assert_eq!(eliminated as usize, s.hosts.len(), "every host is accounted for");
                    failed.push(r);
                }
            }
        }
    }

    #[test]
    fn label_and_group_rules_are_never_broken(
        zones in prop::collection::vec(0u8..3, 1..8),
        vms in prop::collection::vec(
            (0u8..3, prop::option::of((0u8..3, any::<bool>(), any::<bool>())), any::<bool>()),
            1..30,
        ),
    ) {
        let names = ["a", "b", "c"];
        let s = zoned(&zones);
        let zone_of = |h: &HostId| s.hosts[h].labels["zone"].clone();
        let cfg = PlannerConfig::default();
        let load = LoadView::default();
        let mut p = Planner::new(&s, &cfg, &load);
        // What was placed: host, own app label, the rule, whether in the hard-affinity group.
        let mut placed: Vec<(HostId, String, Option<VmAffinity>, bool)> = Vec::new();
        for (app, r, together) in vms {
            let app = names[app as usize].to_owned();
            let rule = r.map(|(sel, anti, by_zone)| {
                let relation = if anti { Relation::AntiAffinity } else { Relation::Affinity };
                VmAffinity {
                    selector: labels(&[("app", names[sel as usize])]),
                    relation,
                    strength: Strength::Hard,
                    topology: by_zone.then(|| "zone".to_owned()),
                }
            });
            let mut req = req(1, 256);
            req.labels = labels(&[("app", &app)]);
            req.vm_affinity = rule.iter().cloned().collect();
            if together {
                req.group = Some("together".into());
                req.group_affinity = Strength::Hard;
            }
            let same = |h: &HostId, other: &HostId, r: &VmAffinity| match &r.topology {
                Some(_) => zone_of(h) == zone_of(other),
                None => h == other,
            };
            match p.place(&req) {
                Placement::Host { host, .. } => {
                    for (other, other_app, other_rule, other_together) in &placed {
                        let other_labels = labels(&[("app", other_app)]);
                        if let Some(r) = &rule && r.relation == Relation::AntiAffinity && r.selects(&other_labels) {
                            prop_assert!(!same(&host, other, r), "{app} on {host} next to {other_app} on {other}");
                        }
                        if let Some(r) = other_rule && r.relation == Relation::AntiAffinity && r.selects(&req.labels) {
                            prop_assert!(!same(&host, other, r), "{other_app}'s rule broken by {app} on {host}");
                        }
                        if together && *other_together {
                            prop_assert_eq!(&host, other, "hard group affinity");
                        }
                    }
                    if let Some(r) = &rule && r.relation == Relation::Affinity {
                        let selected: Vec<&HostId> = placed
                            .iter()
                            .filter(|(_, a, _, _)| r.selects(&labels(&[("app", a)])))
                            .map(|(h, ..)| h)
                            .collect();
                        prop_assert!(selected.is_empty() || selected.iter().any(|o| same(&host, o, r)));
                    }
                    placed.push((host, app, rule, together));
                }
                Placement::Unplaceable { explanation, .. } => {
                    let eliminated: u32 = explanation.rejections.values().sum();
                    prop_assert_eq!(eliminated as usize, s.hosts.len(), "every host is accounted for");
                }
            }
        }
    }

    #[test]
    fn group_rules_per_zone_are_never_broken(
        zones in prop::collection::vec(0u8..3, 1..8),
        vms in prop::collection::vec(0u8..3, 1..30),
    ) {
        let s = zoned(&zones);
        let zone_of = |h: &HostId| s.hosts[h].labels["zone"].clone();
        let cfg = PlannerConfig::default();
        let load = LoadView::default();
        let mut p = Planner::new(&s, &cfg, &load);
        let mut placed: Vec<(u8, HostId)> = Vec::new();
        for g in vms {
            let mut r = req(1, 256);
            r.group = Some(format!("g{g}"));
            // g0: one per zone; g1: all in one zone; g2: no rule.
            let relation = match g {
                0 => Some(Relation::AntiAffinity),
                1 => Some(Relation::Affinity),
                _ => None,
            };
            if let Some(relation) = relation {
                r.group_rules.push(GroupRule { relation, strength: Strength::Hard, topology: Some("zone".into()) });
            }
            match p.place(&r) {
                Placement::Host { host, .. } => {
                    for (_, oh) in placed.iter().filter(|(og, _)| *og == g) {
                        match g {
                            0 => prop_assert_ne!(zone_of(oh), zone_of(&host), "two g0 VMs in one zone"),
                            1 => prop_assert_eq!(zone_of(oh), zone_of(&host), "g1 split across zones"),
                            _ => {}
                        }
                    }
                    placed.push((g, host));
                }
                Placement::Unplaceable { explanation, .. } => {
                    let eliminated: u32 = explanation.rejections.values().sum();
                    prop_assert_eq!(eliminated as usize, s.hosts.len());
                }
            }
        }
    }

    #[test]
    fn the_same_state_and_requests_give_the_same_decisions(
        hosts in prop::collection::vec((1u32..32, 512u64..65536), 1..8),
        vms in prop::collection::vec((1u32..8, 128u64..4096), 1..20),
    ) {
        let refs: Vec<HostSpec<'_>> = hosts.iter().map(|(c, m)| (*c, *m, &[][..])).collect();
        let s = state_with(&refs);
        let cfg = PlannerConfig::default();
        let load = LoadView::default();
        let run = || {
            let mut p = Planner::new(&s, &cfg, &load);
            vms.iter().map(|(c, m)| p.place(&req(*c, *m))).collect::<Vec<_>>()
        };
        prop_assert_eq!(run(), run());
    }
}

#[test]
fn a_large_cluster_is_scanned_only_until_enough_candidates_and_never_overcommitted() {
    let hosts: Vec<HostSpec<'_>> = (0..500).map(|_| (8u32, 16384u64, &[][..])).collect();
    let s = state_with(&hosts);
    let cfg = PlannerConfig { max_candidates: Some(16), ..PlannerConfig::default() };
    let load = LoadView::default();
    let mut p = Planner::new(&s, &cfg, &load);
    let mut per_host: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..2000 {
        match p.place(&req(2, 1024)) {
            Placement::Host { host, explanation } => {
                assert!(explanation.hosts_considered <= 500);
                *per_host.entry(host.to_string()).or_default() += 1;
            }
            Placement::Unplaceable { explanation, .. } => {
                assert_eq!(explanation.hosts_considered, 500, "unplaceable only after every host");
                break;
            }
        }
    }
    assert!(per_host.values().all(|n| *n <= 4), "8 vCPUs hold four 2-vCPU VMs");
    assert_eq!(per_host.values().sum::<u32>(), 2000, "2,000 fit exactly into 500 × 4 slots");
}
