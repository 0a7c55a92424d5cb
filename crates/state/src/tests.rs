use novacron_types::event::{
    HostRegistered, PlacementExplanation, VmDeleteRequested, VmDeleted, VmFailed, VmIncarnationReport,
    VmMigrationCompleted, VmMigrationFailed, VmMigrationPlanned, VmPlaced, VmRequested,
};
use novacron_types::{
    Actor, Envelope, EventKind, Generation, HostId, IncarnationId, Resources, StartVm, StopVm, VmId, VmSpec,
};
use proptest::prelude::*;
use uuid::Uuid;

use super::*;

fn host(i: u8) -> HostId {
    HostId::new(format!("h{i}")).unwrap()
}
fn vm(i: u8) -> VmId {
    VmId(Uuid::from_u128(0x1000 + u128::from(i)))
}
fn inc(i: u8, g: u64) -> IncarnationId {
    IncarnationId(Uuid::from_u128((u128::from(i) << 64) | u128::from(g)))
}
fn spec(i: u8) -> VmSpec {
    VmSpec {
        name: format!("vm-{i}"),
        vcpus: 1 + u32::from(i % 4),
        memory_mib: 512 * (1 + u64::from(i % 3)),
        disk_gib: 0,
        group: None,
        labels: Default::default(),
        restart: Default::default(),
        // Every third VM keeps others away ([`ClusterState::hard_anti_affinity`]).
        placement: if i.is_multiple_of(3) {
            novacron_types::PlacementRules {
                vm_affinity: vec![novacron_types::VmAffinity {
                    selector: [("app".to_owned(), "db".to_owned())].into(),
                    relation: novacron_types::Relation::AntiAffinity,
                    strength: novacron_types::Strength::Hard,
                    topology: None,
                }],
                ..Default::default()
            }
        } else {
            Default::default()
        },
    }
}

/// A compact description of an event, over small pools of hosts and VMs so that sequences hit
/// both the applied and the ignored paths.
#[derive(Clone, Debug)]
enum Op {
    Register(u8, u32),
    Request(u8),
    Place(u8, u8, u64),
    StartCmd(u8, u8, u64),
    Running(u8, u8, u64),
    StopCmd(u8, u8, u64),
    Stopped(u8, u8, u64),
    Failed(u8, u8, u64),
    DeleteRequested(u8),
    Deleted(u8),
    MigPlan(u8, u8, u8, u64, u64),
    MigDone(u8, u8, u8, u64),
    MigFail(u8, u8, u64),
}

fn op() -> impl Strategy<Value = Op> {
    let h = 0u8..4;
    let v = 0u8..6;
    let g = 1u64..4;
    prop_oneof![
        (h.clone(), 1u32..64).prop_map(|(h, c)| Op::Register(h, c)),
        v.clone().prop_map(Op::Request),
        (v.clone(), h.clone(), g.clone()).prop_map(|(v, h, g)| Op::Place(v, h, g)),
        (v.clone(), h.clone(), g.clone()).prop_map(|(v, h, g)| Op::StartCmd(v, h, g)),
        (v.clone(), h.clone(), g.clone()).prop_map(|(v, h, g)| Op::Running(v, h, g)),
        (v.clone(), h.clone(), g.clone()).prop_map(|(v, h, g)| Op::StopCmd(v, h, g)),
        (v.clone(), h.clone(), g.clone()).prop_map(|(v, h, g)| Op::Stopped(v, h, g)),
        (v.clone(), h, g).prop_map(|(v, h, g)| Op::Failed(v, h, g)),
        v.clone().prop_map(Op::DeleteRequested),
        v.clone().prop_map(Op::Deleted),
        (v.clone(), 0u8..4, 0u8..4, 1u64..4, 1u64..5).prop_map(|(v, a, b, gs, gt)| Op::MigPlan(v, a, b, gs, gt)),
        (v.clone(), 0u8..4, 0u8..4, 1u64..5).prop_map(|(v, a, b, g)| Op::MigDone(v, a, b, g)),
        (v, 0u8..4, 1u64..5).prop_map(|(v, b, g)| Op::MigFail(v, b, g)),
    ]
}

fn envelope(n: usize, op: &Op) -> Envelope {
    let report = |v: u8, h: u8, g: u64| VmIncarnationReport {
        vm: vm(v),
        host: host(h),
        incarnation: inc(v, g),
        generation: Generation(g),
    };
    let event = match *op {
        Op::Register(h, c) => EventKind::HostRegistered(HostRegistered {
            host: host(h),
            capacity: Resources { vcpus: c, memory_mib: u64::from(c) * 1024, disk_gib: 0 },
            // Some hosts set their own overcommit ratios, one of them invalid.
            labels: match c % 5 {
                0 => [("overcommit.cpu".to_owned(), "2".to_owned())].into(),
                1 => [("overcommit.memory".to_owned(), "0.5".to_owned())].into(),
                _ => Default::default(),
            },
            driver: "sim".into(),
        }),
        Op::Request(v) => EventKind::VmRequested(VmRequested { vm: vm(v), spec: spec(v) }),
        Op::Place(v, h, g) => EventKind::VmPlaced(VmPlaced {
            vm: vm(v),
            host: host(h),
            incarnation: inc(v, g),
            generation: Generation(g),
            explanation: PlacementExplanation::default(),
        }),
        Op::StartCmd(v, h, g) => EventKind::VmStartCommanded(StartVm {
            vm: vm(v),
            host: host(h),
            incarnation: inc(v, g),
            generation: Generation(g),
            spec: spec(v),
        }),
        Op::Running(v, h, g) => EventKind::VmRunning(report(v, h, g)),
        Op::StopCmd(v, h, g) => EventKind::VmStopCommanded(StopVm {
            vm: vm(v),
            host: host(h),
            incarnation: inc(v, g),
            generation: Generation(g),
            reason: "test".into(),
        }),
        Op::Stopped(v, h, g) => EventKind::VmStopped(report(v, h, g)),
        Op::Failed(v, h, g) => EventKind::VmFailed(VmFailed {
            vm: vm(v),
            host: host(h),
            incarnation: inc(v, g),
            generation: Generation(g),
            reason: "crashed".into(),
        }),
        Op::DeleteRequested(v) => EventKind::VmDeleteRequested(VmDeleteRequested { vm: vm(v) }),
        Op::Deleted(v) => EventKind::VmDeleted(VmDeleted { vm: vm(v) }),
        Op::MigPlan(v, a, b, gs, gt) => EventKind::VmMigrationPlanned(VmMigrationPlanned {
            vm: vm(v),
            from: host(a),
            to: host(b),
            source_incarnation: inc(v, gs),
            target_incarnation: inc(v, gt),
            target_generation: Generation(gt),
            reason: "test".into(),
            policy_version: None,
        }),
        Op::MigDone(v, a, b, g) => EventKind::VmMigrationCompleted(VmMigrationCompleted {
            vm: vm(v),
            from: host(a),
            to: host(b),
            source_incarnation: inc(v, g.saturating_sub(1).max(1)),
            target_incarnation: inc(v, g),
            downtime_ms: 5,
            duration_ms: 50,
        }),
        Op::MigFail(v, b, g) => EventKind::VmMigrationFailed(VmMigrationFailed {
            vm: vm(v),
            reported_by: host(b),
            target_incarnation: inc(v, g),
            reason: "test".into(),
        }),
    };
    let mut e = Envelope::new(1_700_000_000_000 + n as u64, Actor::Orchestrator("test".into()), event);
    e.id = novacron_types::EventId(Uuid::from_u128(n as u128 + 1));
    e
}

fn fold(events: &[Envelope]) -> ClusterState {
    let mut s = ClusterState::default();
    for (i, e) in events.iter().enumerate() {
        s.apply(i as u64 + 1, e);
    }
    s
}

proptest! {
    #[test]
    fn replaying_the_same_log_twice_gives_the_same_hash(ops in prop::collection::vec(op(), 0..200)) {
        let events: Vec<_> = ops.iter().enumerate().map(|(i, o)| envelope(i, o)).collect();
        prop_assert_eq!(fold(&events).hash(), fold(&events).hash());
    }

    #[test]
    fn snapshot_plus_tail_equals_full_replay(ops in prop::collection::vec(op(), 1..200), cut in any::<prop::sample::Index>()) {
        let events: Vec<_> = ops.iter().enumerate().map(|(i, o)| envelope(i, o)).collect();
        let k = cut.index(events.len() + 1);
        let full = fold(&events);
        let snap = fold(&events[..k]);
        let mut restored = ClusterState::from_canonical_bytes(&snap.to_canonical_bytes()).unwrap();
        for (i, e) in events.iter().enumerate().skip(k) {
            restored.apply(i as u64 + 1, e);
        }
        prop_assert_eq!(restored.hash(), full.hash());
        prop_assert_eq!(restored, full);
    }

    #[test]
    fn the_streamed_encoding_and_hash_equal_the_buffered_ones(ops in prop::collection::vec(op(), 0..200)) {
        use sha2::Digest;
        let events: Vec<_> = ops.iter().enumerate().map(|(i, o)| envelope(i, o)).collect();
        let s = fold(&events);
        let mut streamed = Vec::new();
        let hash = s.write_canonical(&mut streamed).unwrap();
        prop_assert_eq!(&streamed, &s.to_canonical_bytes());
        let digest: String = sha2::Sha256::digest(&streamed).iter().map(|b| format!("{b:02x}")).collect();
        prop_assert_eq!(&hash.0, &digest);
        prop_assert_eq!(&hash, &s.hash());
        prop_assert_eq!(ClusterState::from_canonical_reader(streamed.as_slice()).unwrap(), s);
    }

    #[test]
    fn derived_fields_equal_what_they_are_derived_from_folded_and_decoded(ops in prop::collection::vec(op(), 0..200)) {
        let events: Vec<_> = ops.iter().enumerate().map(|(i, o)| envelope(i, o)).collect();
        let s = fold(&events);
        let scanned: std::collections::BTreeSet<VmId> = s
            .vms
            .values()
            .filter(|v| v.status != VmStatus::Deleted && v.spec.placement.vm_affinity.iter().any(|r| r.is_hard_anti()))
            .map(|v| v.id)
            .collect();
        prop_assert_eq!(&s.hard_anti_affinity, &scanned);
        let decoded = ClusterState::from_canonical_bytes(&s.to_canonical_bytes()).unwrap();
        prop_assert_eq!(&decoded.hard_anti_affinity, &scanned, "rebuilt when decoded");
        let attention: std::collections::BTreeSet<VmId> =
            s.vms.values().filter(|v| v.may_need_attention()).map(|v| v.id).collect();
        prop_assert_eq!(&s.needs_attention, &attention);
        prop_assert_eq!(&decoded.needs_attention, &attention, "rebuilt when decoded");
        for h in s.hosts.values().chain(decoded.hosts.values()) {
            prop_assert_eq!(h.overcommit, Overcommit::of(&h.labels));
        }
    }

    #[test]
    fn overcommit_labels_are_read_once_and_strictly(c in 0u32..10) {
        let labels: Labels = [("overcommit.cpu".to_owned(), format!("{c}")), ("overcommit.memory".to_owned(), "x".to_owned())].into();
        let o = Overcommit::of(&labels);
        prop_assert_eq!(o.cpu, (c >= 1).then_some(f64::from(c)), "a ratio is a number of at least 1");
        prop_assert_eq!(o.memory, None);
    }

    #[test]
    fn a_deleted_vm_stays_deleted_whatever_follows(ops in prop::collection::vec(op(), 0..200)) {
        let mut s = ClusterState::default();
        let mut deleted = std::collections::BTreeSet::new();
        for (i, o) in ops.iter().enumerate() {
            s.apply(i as u64 + 1, &envelope(i, o));
            deleted.extend(s.vms.values().filter(|v| v.status == VmStatus::Deleted).map(|v| v.id));
            for id in &deleted {
                prop_assert_eq!(s.vms[id].status, VmStatus::Deleted, "after {:?}", o);
            }
        }
    }

    #[test]
    fn allocations_always_equal_the_sum_of_assigned_vms(ops in prop::collection::vec(op(), 0..300)) {
        let events: Vec<_> = ops.iter().enumerate().map(|(i, o)| envelope(i, o)).collect();
        let s = fold(&events);
        for h in s.hosts.values() {
            let mut sum = Resources::ZERO;
            for v in &h.vms {
                let rec = &s.vms[v];
                prop_assert_eq!(rec.host.as_ref(), Some(&h.id));
                sum = sum.checked_add(rec.spec.resources()).unwrap();
            }
            for v in &h.incoming {
                let rec = &s.vms[v];
                prop_assert_eq!(rec.migration.as_ref().map(|m| &m.to), Some(&h.id));
                sum = sum.checked_add(rec.spec.resources()).unwrap();
            }
            prop_assert_eq!(sum, h.allocated);
        }
        // A VM is assigned to at most one host, and migrates to at most one other.
        for (id, v) in &s.vms {
            let assigned = s.hosts.values().filter(|h| h.vms.contains(id)).count();
            prop_assert!(assigned <= 1);
            prop_assert_eq!(assigned == 1, v.host.is_some() && v.status != VmStatus::Deleted);
            if let Some(m) = &v.migration {
                prop_assert_ne!(Some(&m.to), v.host.as_ref());
            }
        }
    }
}

#[test]
fn hash_covers_the_sequence_and_the_content() {
    let e = envelope(0, &Op::Register(1, 8));
    let mut a = ClusterState::default();
    a.apply(1, &e);
    let mut b = ClusterState::default();
    b.apply(2, &e);
    assert_ne!(a.hash(), b.hash(), "same content at another sequence must hash differently");
    let mut c = ClusterState::default();
    c.apply(1, &envelope(0, &Op::Register(1, 9)));
    assert_ne!(a.hash(), c.hash());
    assert_eq!(a.hash().0.len(), 64);
}

#[test]
fn vm_lifecycle_reserves_and_releases_host_capacity() {
    let ops = [Op::Register(0, 8), Op::Request(1), Op::Place(1, 0, 1), Op::StartCmd(1, 0, 1), Op::Running(1, 0, 1)];
    let events: Vec<_> = ops.iter().enumerate().map(|(i, o)| envelope(i, o)).collect();
    let mut s = fold(&events);
    assert_eq!(s.vms[&vm(1)].status, VmStatus::Running);
    assert_eq!(s.hosts[&host(0)].allocated, spec(1).resources());

    // a report about an old incarnation is ignored, not applied
    let stale = envelope(10, &Op::Stopped(1, 0, 2));
    assert!(matches!(s.apply(6, &stale), Applied::Ignored(_)));
    assert_eq!(s.vms[&vm(1)].status, VmStatus::Running);
    assert_eq!(s.ignored_events, 1);

    s.apply(7, &envelope(11, &Op::Deleted(1)));
    assert_eq!(s.vms[&vm(1)].status, VmStatus::Deleted);
    assert_eq!(s.hosts[&host(0)].allocated, Resources::ZERO);
    assert!(s.names.is_empty(), "a deleted VM's name is free again");
}

#[test]
fn a_migration_reserves_the_target_then_moves_the_vm_or_releases_it() {
    let run = |ops: &[Op]| fold(&ops.iter().enumerate().map(|(i, o)| envelope(i, o)).collect::<Vec<_>>());
    let running = [
        Op::Register(0, 8),
        Op::Register(1, 8),
        Op::Request(1),
        Op::Place(1, 0, 1),
        Op::StartCmd(1, 0, 1),
        Op::Running(1, 0, 1),
    ];
    let need = spec(1).resources();

    let mut ops = running.to_vec();
    ops.push(Op::MigPlan(1, 0, 1, 1, 2));
    let s = run(&ops);
    assert_eq!(s.vms[&vm(1)].status, VmStatus::Migrating);
    assert_eq!(s.hosts[&host(1)].allocated, need, "the target is reserved");
    assert_eq!(s.hosts[&host(0)].allocated, need, "the source still holds it");

    let mut done = ops.clone();
    done.push(Op::MigDone(1, 0, 1, 2));
    let s = run(&done);
    let v = &s.vms[&vm(1)];
    assert_eq!(
        (v.status, v.host.clone(), v.incarnation, v.generation),
        (VmStatus::Running, Some(host(1)), Some(inc(1, 2)), Generation(2))
    );
    assert_eq!(s.hosts[&host(0)].allocated, Resources::ZERO);
    assert!(s.hosts[&host(1)].vms.contains(&vm(1)) && s.hosts[&host(1)].incoming.is_empty());

    // Placed anew while migrating (healing): the migration is over, its reservation released,
    // and the VM counted once — also when it lands on the migration's own target (found by
    // the property test below).
    for to in [0, 1] {
        let mut replaced = ops.clone();
        replaced.push(Op::Place(1, to, 2));
        let s = run(&replaced);
        let v = &s.vms[&vm(1)];
        assert!(v.migration.is_none(), "placed on host {to}: {v:?}");
        assert_eq!(v.host, Some(host(to)));
        assert!(s.hosts[&host(1)].incoming.is_empty());
        assert_eq!(s.hosts[&host(to)].allocated, need, "counted once on host {to}");
        assert_eq!(s.hosts[&host(1 - to)].allocated, Resources::ZERO);
    }

    let mut failed = ops;
    failed.push(Op::MigFail(1, 1, 2));
    let s = run(&failed);
    let v = &s.vms[&vm(1)];
    assert_eq!((v.status, v.host.clone(), v.generation), (VmStatus::Running, Some(host(0)), Generation(1)));
    assert_eq!(s.hosts[&host(1)].allocated, Resources::ZERO, "the reservation is released");
    assert!(v.migration.is_none());
}
