use std::collections::{BTreeMap, BTreeSet};

use novacron_state::{ClusterState, VmStatus};
use novacron_types::{
    Actor, Envelope, EventKind, Generation, HostId, IncarnationId, Report, ReportKind, Resources, VmId, VmSpec,
};
use uuid::Uuid;

use novacron_types::event::HostRegistered;
use novacron_types::report::HostRegistration;
use novacron_types::{ReportId, SCHEMA_VERSION};

use super::*;

/// A stamp at 7 ms past the epoch, its ids counting up from `n`.
#[allow(non_snake_case)]
fn Fixed(n: u128) -> At {
    At(n, 7)
}

fn origin() -> Origin {
    Origin { actor: Actor::User("t".into()), correlation: None }
}

fn spec(name: &str, vcpus: u32) -> VmSpec {
    VmSpec {
        name: name.into(),
        vcpus,
        memory_mib: 1024,
        disk_gib: 0,
        group: None,
        labels: Default::default(),
        restart: Default::default(),
        placement: Default::default(),
    }
}

fn apply_all(state: &mut ClusterState, events: &[Envelope]) {
    for e in events {
        let seq = state.seq + 1;
        state.apply(seq, e);
    }
}

/// Registers host `h1` with `vcpus` and 64 GiB.
fn register_h1(s: &mut ClusterState, vcpus: u32) {
    let e = Envelope::new(
        0,
        Actor::Agent(HostId::new("h1").unwrap()),
        EventKind::HostRegistered(HostRegistered {
            host: HostId::new("h1").unwrap(),
            capacity: Resources { vcpus, memory_mib: 65536, disk_gib: 0 },
            labels: Default::default(),
            driver: "sim".into(),
        }),
    );
    apply_all(s, &[e]);
}

fn with_host(vcpus: u32) -> ClusterState {
    let mut s = ClusterState::default();
    register_h1(&mut s, vcpus);
    s
}

#[test]
fn create_places_and_commands_the_start_in_one_decision() {
    let mut s = with_host(8);
    let (vm, events) = create_vm(&s, spec("a", 2), &mut Fixed(0), &origin()).unwrap();
    let kinds: Vec<_> = events.iter().map(|e| e.event.name()).collect();
    assert_eq!(kinds, ["VmRequested", "VmPlaced", "VmStartCommanded"]);
    apply_all(&mut s, &events);
    assert_eq!(s.vms[&vm].status, VmStatus::Starting);
    assert_eq!(s.vms[&vm].generation, Generation(1));
    assert_eq!(create_vm(&s, spec("a", 1), &mut Fixed(9), &origin()).unwrap_err(), Refusal::NameInUse("a".into()));
}

#[test]
fn a_pending_vm_is_placed_when_capacity_appears_and_failure_is_not_repeated() {
    let mut s = ClusterState::default();
    let (vm, events) = create_vm(&s, spec("big", 4), &mut Fixed(0), &origin()).unwrap();
    assert_eq!(events.last().unwrap().event.name(), "VmPlacementFailed");
    apply_all(&mut s, &events);
    assert!(reconcile(&s, &mut Fixed(10), &origin()).is_empty(), "same failure is not appended again");

    let reg = Report {
        schema: SCHEMA_VERSION,
        id: ReportId(Uuid::from_u128(99)),
        host: HostId::new("h1").unwrap(),
        at_ms: 1,
        report: ReportKind::HostRegistration(HostRegistration {
            capacity: Resources { vcpus: 8, memory_mib: 8192, disk_gib: 0 },
            labels: Default::default(),
            driver: "sim".into(),
        }),
    };
    let ReportOutcome::Events(reg_events) = report(&s, &reg, &mut Fixed(20)) else { panic!() };
    apply_all(&mut s, &reg_events);
    let ReportOutcome::Events(again) = report(&s, &reg, &mut Fixed(30)) else { panic!() };
    assert!(again.is_empty(), "a repeated registration changes nothing");

    let placed = reconcile(&s, &mut Fixed(40), &origin());
    apply_all(&mut s, &placed);
    assert_eq!(s.vms[&vm].status, VmStatus::Starting);
}

#[test]
fn reconcile_never_double_books_a_host_in_one_pass() {
    let mut s = ClusterState::default();
    for i in 0..5 {
        let (_, ev) = create_vm(&s, spec(&format!("v{i}"), 2), &mut Fixed(i * 100), &origin()).unwrap();
        apply_all(&mut s, &ev);
    }
    register_h1(&mut s, 4);
    let events = reconcile(&s, &mut Fixed(1000), &origin());
    apply_all(&mut s, &events);
    let h = s.hosts.values().next().unwrap();
    assert_eq!(h.vms.len(), 2, "4 vCPUs hold two 2-vCPU VMs, no more");
    assert!(h.allocated.fits_within(h.capacity));
}

#[test]
fn a_pass_skips_pending_vms_no_easier_than_one_that_found_no_host_and_places_smaller_ones() {
    let mut s = ClusterState::default();
    let mut vms = Vec::new();
    for (i, vcpus) in [2, 2, 2, 3, 1].into_iter().enumerate() {
        let (vm, ev) = create_vm(&s, spec(&format!("v{i}"), vcpus), &mut Fixed(i as u128 * 100), &origin()).unwrap();
        apply_all(&mut s, &ev);
        vms.push(vm);
    }
    assert!(vms.windows(2).all(|w| w[0] < w[1]), "the pass goes in id order");
    register_h1(&mut s, 5);
    let events = reconcile(&s, &mut Fixed(1000), &origin());
    let about = |name: &str| -> Vec<VmId> {
        events.iter().filter(|e| e.event.name() == name).filter_map(|e| e.event.vm()).collect()
    };
    // Two 2-vCPU VMs fill 4 of the 5 vCPUs; the third finds no host, and says so (its reason
    // changed); the 3-vCPU VM is no easier, so it is not planned at all; the 1-vCPU VM fits.
    assert_eq!(about("VmPlaced"), [vms[0], vms[1], vms[4]]);
    assert_eq!(about("VmPlacementFailed"), [vms[2]]);
    apply_all(&mut s, &events);
    assert_eq!(s.vms[&vms[3]].status, VmStatus::Pending);
    assert_eq!(s.vms[&vms[3]].pending_reason.as_deref(), Some("no hosts are registered"), "what it was last told");
}

#[test]
fn reports_from_unknown_hosts_or_about_unknown_vms_are_rejected() {
    let s = with_host(8);
    let r = |host: &str| Report {
        schema: SCHEMA_VERSION,
        id: ReportId(Uuid::from_u128(3)),
        host: HostId::new(host).unwrap(),
        at_ms: 1,
        report: ReportKind::VmRunning(novacron_types::event::VmIncarnationReport {
            vm: VmId(Uuid::from_u128(1)),
            host: HostId::new(host).unwrap(),
            incarnation: IncarnationId(Uuid::from_u128(2)),
            generation: Generation(1),
        }),
    };
    let ReportOutcome::Reject(why) = report(&s, &r("stranger"), &mut Fixed(0)) else {
        panic!("a report from an unknown host must be rejected")
    };
    assert!(why.contains("unknown host stranger"), "{why}");
    let ReportOutcome::Reject(why) = report(&s, &r("h1"), &mut Fixed(0)) else {
        panic!("a report about an unknown VM must be rejected")
    };
    assert!(why.contains("unknown VM"), "{why}");
}

#[test]
fn deleting_a_running_vm_stops_it_first() {
    let mut s = with_host(8);
    let (vm, events) = create_vm(&s, spec("a", 2), &mut Fixed(0), &origin()).unwrap();
    apply_all(&mut s, &events);
    let (_, del) = delete_vm(&s, "a", &mut Fixed(50), &origin()).unwrap();
    let kinds: Vec<_> = del.iter().map(|e| e.event.name()).collect();
    assert_eq!(kinds, ["VmDeleteRequested", "VmStopCommanded"]);
    apply_all(&mut s, &del);
    assert!(reconcile(&s, &mut Fixed(60), &origin()).is_empty(), "waits for the stop report");
    assert_eq!(delete_vm(&s, "nope", &mut Fixed(70), &origin()).unwrap_err(), Refusal::NotFound("nope".into()));
    let _ = vm;
}

fn hosts(n: u32) -> ClusterState {
    let mut s = ClusterState::default();
    for i in 1..=n {
        let e = Envelope::new(
            0,
            Actor::Agent(HostId::new(format!("h{i}")).unwrap()),
            EventKind::HostRegistered(HostRegistered {
                host: HostId::new(format!("h{i}")).unwrap(),
                capacity: Resources { vcpus: 8, memory_mib: 65536, disk_gib: 0 },
                labels: Default::default(),
                driver: "sim".into(),
            }),
        );
        apply_all(&mut s, &[e]);
    }
    s
}

const T: FailureTimeouts = FailureTimeouts {
    suspect_after: std::time::Duration::from_secs(5),
    host_failure_timeout: std::time::Duration::from_secs(30),
    agent_lease: std::time::Duration::from_secs(10),
};

fn silences(quiet: &[(&str, u64)]) -> BTreeMap<HostId, std::time::Duration> {
    quiet.iter().map(|(h, s)| (HostId::new(*h).unwrap(), std::time::Duration::from_secs(*s))).collect()
}

fn names(events: &[Envelope]) -> Vec<&'static str> {
    events.iter().map(|e| e.event.name()).collect()
}

#[test]
fn a_silent_host_is_suspected_then_failed_and_recovers_when_it_speaks() {
    let mut s = hosts(3);
    let quiet = silences(&[("h1", 6), ("h2", 0), ("h3", 0)]);
    let e = detect(&s, &quiet, T, &mut Fixed(0), &origin());
    assert_eq!(names(&e), ["HostSuspected"]);
    apply_all(&mut s, &e);
    assert!(detect(&s, &silences(&[("h1", 29), ("h2", 0), ("h3", 0)]), T, &mut Fixed(0), &origin()).is_empty());
    let e = detect(&s, &silences(&[("h1", 31), ("h2", 0), ("h3", 0)]), T, &mut Fixed(0), &origin());
    assert_eq!(names(&e), ["HostFailed"]);
    let EventKind::HostFailed(f) = &e[0].event else { unreachable!() };
    assert_eq!((f.silent_ms, f.agent_lease_ms), (31_000, 10_000), "the event says the lease was waited out");
    apply_all(&mut s, &e);
    let e = detect(&s, &silences(&[("h1", 0), ("h2", 0), ("h3", 0)]), T, &mut Fixed(0), &origin());
    assert_eq!(names(&e), ["HostRecovered"]);
}

/// The engine passes only the hosts silent for at least the shorter timeout; the detector must
/// decide exactly as if it had every host's silence. Random walks over hosts going quiet,
/// suspected, failed, paused and back, comparing both at every step.
#[test]
fn listing_only_the_quiet_hosts_decides_as_listing_every_host() {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |n: u64| {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) % n
    };
    let threshold = T.suspect_after.min(T.host_failure_timeout);
    let mut compared = 0;
    for _ in 0..200 {
        let n = 1 + next(8) as u32;
        let mut s = hosts(n);
        for _ in 0..6 {
            // Mostly heard from, some around the two timeouts.
            let full: BTreeMap<HostId, std::time::Duration> = s
                .hosts
                .keys()
                .map(|h| (h.clone(), std::time::Duration::from_secs([0, 1, 4, 5, 6, 29, 30, 31, 90][next(9) as usize])))
                .collect();
            let sparse: BTreeMap<HostId, std::time::Duration> =
                full.iter().filter(|(_, d)| **d >= threshold).map(|(h, d)| (h.clone(), *d)).collect();
            let with_all = detect(&s, &full, T, &mut Fixed(0), &origin());
            let with_quiet = detect(&s, &sparse, T, &mut Fixed(0), &origin());
            let kinds = |e: &[Envelope]| e.iter().map(|e| e.event.clone()).collect::<Vec<_>>();
            assert_eq!(kinds(&with_all), kinds(&with_quiet), "silences {full:?}");
            compared += usize::from(!with_all.is_empty());
            apply_all(&mut s, &with_all);
        }
    }
    assert!(compared > 100, "the walks reached decisions ({compared})");
}

#[test]
fn when_most_hosts_go_silent_at_once_healing_pauses_instead_of_evacuating() {
    let mut s = hosts(3);
    let e = detect(&s, &silences(&[("h1", 40), ("h2", 40), ("h3", 0)]), T, &mut Fixed(0), &origin());
    assert_eq!(names(&e), ["HealingPaused"], "no host is suspected or failed");
    apply_all(&mut s, &e);
    assert!(s.healing_paused);
    assert!(detect(&s, &silences(&[("h1", 90), ("h2", 90), ("h3", 0)]), T, &mut Fixed(0), &origin()).is_empty());
    let e = detect(&s, &silences(&[("h1", 0), ("h2", 0), ("h3", 0)]), T, &mut Fixed(0), &origin());
    assert_eq!(names(&e), ["HealingResumed"]);
}

#[test]
fn vms_of_a_failed_host_are_placed_elsewhere_with_the_next_generation() {
    let mut s = hosts(2);
    let (vm, ev) = create_vm(&s, spec("a", 2), &mut Fixed(0), &origin()).unwrap();
    apply_all(&mut s, &ev);
    let h1 = HostId::new("h1").unwrap();
    assert_eq!(s.vms[&vm].host.as_ref(), Some(&h1));
    let down = detect(&s, &silences(&[("h1", 6), ("h2", 0)]), T, &mut Fixed(0), &origin());
    apply_all(&mut s, &down);
    assert!(reconcile(&s, &mut Fixed(10), &origin()).is_empty(), "a suspect host keeps its VMs");
    let failed = detect(&s, &silences(&[("h1", 31), ("h2", 0)]), T, &mut Fixed(0), &origin());
    apply_all(&mut s, &failed);
    let healing = reconcile(&s, &mut Fixed(20), &origin());
    assert_eq!(names(&healing), ["VmPlaced", "VmStartCommanded"]);
    let EventKind::VmPlaced(p) = &healing[0].event else { unreachable!() };
    assert_eq!(p.explanation.trigger.as_deref(), Some("host h1 failed"));
    apply_all(&mut s, &healing);
    let v = &s.vms[&vm];
    assert_eq!((v.host.clone(), v.generation), (Some(HostId::new("h2").unwrap()), Generation(2)));
    assert_eq!(s.hosts[&h1].allocated, Resources::ZERO);
}

/// The failure-risk model shipped in `deploy/models` (trained on LANL by `models risk --save`).
fn shipped_risk_model() -> novacron_predict::risk::RiskModel {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/models/failure-risk.json");
    let m: novacron_predict::risk::RiskModel = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    m.check().unwrap();
    m
}

#[test]
fn healing_and_placement_avoid_a_host_that_keeps_failing() {
    const DAY: u64 = 86_400_000;
    let model = shipped_risk_model();
    let mut s = hosts(3);
    let now = 400 * DAY;
    assert!(failure_risk(&s, &model, now).is_empty(), "no history: nothing to rank");
    // h2 failed twice this week (and came back each time).
    for at in [now - 5 * DAY, now - DAY] {
        let h2 = HostId::new("h2").unwrap();
        let failed = EventKind::HostFailed(novacron_types::event::HostFailed {
            host: h2.clone(),
            silent_ms: 31_000,
            agent_lease_ms: 10_000,
            host_failure_timeout_ms: 30_000,
        });
        let back = EventKind::HostRecovered(novacron_types::event::HostRecovered { host: h2 });
        apply_all(
            &mut s,
            &[Envelope::new(at, origin().actor, failed), Envelope::new(at + 60_000, origin().actor, back)],
        );
    }
    assert_eq!(s.hosts[&HostId::new("h2").unwrap()].failures_ms, [now - 5 * DAY, now - DAY]);
    let risk = failure_risk(&s, &model, now);
    let p = |h: &str| risk[&HostId::new(h).unwrap()];
    assert!(p("h2") > 2.0 * p("h1") && p("h1") == p("h3"), "{risk:?}");
    let planning = Planning {
        load: std::sync::Arc::new(novacron_scheduler::LoadView { failure_risk: risk, ..Default::default() }),
        ..Default::default()
    };

    // A new VM: bin-packing ties on empty hosts; of the quiet ones, h1 wins on its id.
    let (ids, ev) = create_vms_with(&s, vec![spec("a", 2)], &planning, &mut Fixed(0), &origin()).unwrap();
    apply_all(&mut s, &ev);
    let vm = ids[0];
    assert_eq!(s.vms[&vm].host.as_ref().map(HostId::as_str), Some("h1"));

    // h1 fails. Healing re-places its VM: h2 and h3 tie on fit, h2 would win on its id — but
    // it keeps failing, so h3 gets the VM, and the explanation says why.
    let failed = detect(&s, &silences(&[("h1", 6), ("h2", 0), ("h3", 0)]), T, &mut Fixed(0), &origin());
    apply_all(&mut s, &failed);
    let failed = detect(&s, &silences(&[("h1", 31), ("h2", 0), ("h3", 0)]), T, &mut Fixed(0), &origin());
    apply_all(&mut s, &failed);
    let blind = reconcile(&s, &mut Fixed(10), &origin());
    let EventKind::VmPlaced(p) = &blind[0].event else { panic!("{:?}", names(&blind)) };
    assert_eq!(p.host.as_str(), "h2", "without risk scores, the id decides");
    let settings = ReconcileSettings { planning, ..ReconcileSettings::default() };
    let healing = reconcile_with(&s, &mut Fixed(20), &origin(), settings);
    let EventKind::VmPlaced(p) = &healing[0].event else { panic!("{:?}", names(&healing)) };
    assert_eq!(p.host.as_str(), "h3");
    let components = &p.explanation.candidates[0].components;
    assert!(components["failure_risk"] > p.explanation.candidates[1].components["failure_risk"], "{components:?}");
}

#[test]
fn a_superseded_incarnation_reported_running_is_told_to_stop() {
    let mut s = hosts(2);
    let (vm, ev) = create_vm(&s, spec("a", 2), &mut Fixed(0), &origin()).unwrap();
    apply_all(&mut s, &ev);
    let old = s.vms[&vm].incarnation.unwrap();
    for quiet in [6, 31] {
        let e = detect(&s, &silences(&[("h1", quiet), ("h2", 0)]), T, &mut Fixed(0), &origin());
        apply_all(&mut s, &e);
    }
    let healed = reconcile(&s, &mut Fixed(20), &origin());
    apply_all(&mut s, &healed);
    let stale = Report {
        schema: SCHEMA_VERSION,
        id: ReportId(Uuid::from_u128(77)),
        host: HostId::new("h1").unwrap(),
        at_ms: 1,
        report: ReportKind::VmRunning(novacron_types::event::VmIncarnationReport {
            vm,
            host: HostId::new("h1").unwrap(),
            incarnation: old,
            generation: Generation(1),
        }),
    };
    let ReportOutcome::Events(e) = report(&s, &stale, &mut Fixed(30)) else { panic!("not a rejection") };
    assert_eq!(names(&e), ["VmStopCommanded"]);
    let EventKind::VmStopCommanded(c) = &e[0].event else { unreachable!() };
    assert_eq!((c.host.as_str(), c.incarnation), ("h1", old));
}

/// A stamp whose clock the test moves.
struct Clock {
    ids: u128,
    now: u64,
}
impl Stamp for Clock {
    fn now_ms(&mut self) -> u64 {
        self.now
    }
    fn vm_id(&mut self) -> VmId {
        self.ids += 1;
        VmId(Uuid::from_u128(self.ids))
    }
    fn incarnation_id(&mut self) -> IncarnationId {
        self.ids += 1;
        IncarnationId(Uuid::from_u128(self.ids))
    }
}

fn fail_now(s: &mut ClusterState, vm: VmId, at_ms: u64) {
    let r = &s.vms[&vm];
    let e = Envelope::new(
        at_ms,
        Actor::Agent(r.host.clone().unwrap()),
        EventKind::VmFailed(novacron_types::event::VmFailed {
            vm,
            host: r.host.clone().unwrap(),
            incarnation: r.incarnation.unwrap(),
            generation: r.generation,
            reason: "crashed".into(),
        }),
    );
    apply_all(s, &[e]);
}

#[test]
fn a_crashing_vm_is_restarted_with_backoff_then_moved_then_given_up() {
    let t = RestartTimings {
        backoff_base: std::time::Duration::from_secs(1),
        backoff_max: std::time::Duration::from_secs(60),
        max_restarts: 3,
        window: std::time::Duration::from_secs(600),
    };
    let mut s = hosts(2);
    let mut clock = Clock { ids: 1000, now: 0 };
    let (vm, ev) = create_vm(&s, spec("crashy", 2), &mut clock, &origin()).unwrap();
    apply_all(&mut s, &ev);
    let h1 = HostId::new("h1").unwrap();

    fail_now(&mut s, vm, 10_000);
    clock.now = 10_500;
    assert!(reconcile_with(&s, &mut clock, &origin(), t).is_empty(), "waits out the backoff");
    clock.now = 11_000;
    let e = reconcile_with(&s, &mut clock, &origin(), t);
    assert_eq!(names(&e), ["VmPlaced", "VmStartCommanded"]);
    let EventKind::VmPlaced(p) = &e[0].event else { unreachable!() };
    assert_eq!(p.host, h1, "first restart in place");
    assert_eq!(p.generation, Generation(2));
    assert!(p.explanation.trigger.as_deref().unwrap().contains("after failure 1"));
    apply_all(&mut s, &e);

    fail_now(&mut s, vm, 20_000);
    clock.now = 21_500;
    assert!(reconcile_with(&s, &mut clock, &origin(), t).is_empty(), "the backoff doubled to 2 s");
    clock.now = 22_000;
    let e = reconcile_with(&s, &mut clock, &origin(), t);
    let EventKind::VmPlaced(p) = &e[0].event else { panic!("{:?}", names(&e)) };
    assert_eq!(p.host.as_str(), "h2", "two failures on h1: tried elsewhere");
    assert!(p.explanation.trigger.as_deref().unwrap().contains("on another host"));
    apply_all(&mut s, &e);
    assert_eq!(s.hosts[&h1].allocated, Resources::ZERO);

    fail_now(&mut s, vm, 30_000);
    clock.now = 40_000;
    let e = reconcile_with(&s, &mut clock, &origin(), t);
    assert_eq!(names(&e), ["VmPlaced", "VmStartCommanded"], "third failure: restarted once more");
    let EventKind::VmPlaced(p) = &e[0].event else { unreachable!() };
    assert_eq!(p.host.as_str(), "h2", "one failure on h2: restarted in place there");
    apply_all(&mut s, &e);
    fail_now(&mut s, vm, 50_000);
    clock.now = 60_000;
    let e = reconcile_with(&s, &mut clock, &origin(), t);
    assert_eq!(names(&e), ["VmGaveUp"], "a fourth failure exceeds 3 restarts");
    apply_all(&mut s, &e);
    assert!(s.vms[&vm].gave_up);
    clock.now = 999_000;
    assert!(reconcile_with(&s, &mut clock, &origin(), t).is_empty(), "given up stays given up");
}

#[test]
fn a_vm_with_restart_never_stays_failed() {
    let mut s = hosts(1);
    let mut clock = Clock { ids: 0, now: 0 };
    let mut sp = spec("once", 1);
    sp.restart = novacron_types::RestartPolicy::Never;
    let (vm, ev) = create_vm(&s, sp, &mut clock, &origin()).unwrap();
    apply_all(&mut s, &ev);
    fail_now(&mut s, vm, 1_000);
    clock.now = 1_000_000;
    assert!(reconcile_with(&s, &mut clock, &origin(), RestartTimings::default()).is_empty());
}

#[test]
fn the_attention_index_leaves_out_only_vms_the_reconciler_has_nothing_for() {
    let mut s = hosts(2);
    let mut clock = Clock { ids: 0, now: 0 };
    let mut made = BTreeMap::new();
    for name in ["running", "crashed", "never", "deleting", "starting", "too-big"] {
        let mut sp = spec(name, if name == "too-big" { 64 } else { 1 });
        if name == "never" {
            sp.restart = novacron_types::RestartPolicy::Never;
        }
        let (vm, ev) = create_vm(&s, sp, &mut clock, &origin()).unwrap();
        apply_all(&mut s, &ev);
        made.insert(name, vm);
    }
    for name in ["running", "crashed", "never", "deleting"] {
        let host = s.vms[&made[name]].host.clone().unwrap();
        run_vm_on(&mut s, made[name], host.as_str());
    }
    fail_now(&mut s, made["crashed"], 1_000);
    fail_now(&mut s, made["never"], 1_000);
    let (_, del) = delete_vm(&s, "deleting", &mut clock, &origin()).unwrap();
    apply_all(&mut s, &del);
    let expected: BTreeSet<VmId> = ["crashed", "never", "deleting", "too-big"].iter().map(|n| made[n]).collect();
    assert_eq!(s.needs_attention, expected, "running and starting VMs wait for a report");

    // The same pass over every VM decides exactly the same.
    let mut everyone = s.clone();
    everyone.needs_attention = everyone.vms.keys().copied().collect();
    let pass = |state: &ClusterState| {
        let events =
            reconcile_with(state, &mut Clock { ids: 100, now: 1_000_000 }, &origin(), RestartTimings::default());
        events.into_iter().map(|e| e.event).collect::<Vec<_>>()
    };
    let indexed = pass(&s);
    assert!(indexed.iter().any(|e| matches!(e, EventKind::VmPlaced(p) if p.vm == made["crashed"])), "{indexed:?}");
    assert_eq!(indexed, pass(&everyone));
}

#[test]
fn host_actions_are_idempotent_and_refused_in_the_wrong_state() {
    let mut s = hosts(2);
    let (_, e) = host_action(&s, "h1", HostAction::Cordon, &mut Fixed(0), &origin()).unwrap();
    assert_eq!(names(&e), ["HostCordoned"]);
    apply_all(&mut s, &e);
    let (_, again) = host_action(&s, "h1", HostAction::Cordon, &mut Fixed(0), &origin()).unwrap();
    assert!(again.is_empty(), "cordoning twice is a no-op");
    assert!(
        create_vm(&s, spec("a", 1), &mut Fixed(10), &origin())
            .unwrap()
            .1
            .iter()
            .all(|e| { !matches!(&e.event, EventKind::VmPlaced(p) if p.host.as_str() == "h1") })
    );
    let (_, e) = host_action(&s, "h1", HostAction::Uncordon, &mut Fixed(0), &origin()).unwrap();
    assert_eq!(names(&e), ["HostUncordoned"]);
    let cordoned = s.clone();
    apply_all(&mut s, &e);
    assert_eq!(s.hosts[&HostId::new("h1").unwrap()].status(), "ready");
    // Health is tracked apart from the cordon: a cordoned host that goes silent still fails.
    let mut c = cordoned;
    for quiet in [6, 31] {
        let e = detect(&c, &silences(&[("h1", quiet), ("h2", 0)]), T, &mut Fixed(0), &origin());
        apply_all(&mut c, &e);
    }
    assert_eq!(c.hosts[&HostId::new("h1").unwrap()].status(), "failed");
    assert!(matches!(host_action(&s, "nope", HostAction::Drain, &mut Fixed(0), &origin()), Err(Refusal::NotFound(_))));
    // A failed host cannot be drained.
    for quiet in [6, 31] {
        let e = detect(&s, &silences(&[("h1", quiet), ("h2", 0)]), T, &mut Fixed(0), &origin());
        apply_all(&mut s, &e);
    }
    assert!(matches!(host_action(&s, "h1", HostAction::Drain, &mut Fixed(0), &origin()), Err(Refusal::Conflict(_))));
}

fn run_vm_on(s: &mut ClusterState, vm: VmId, host: &str) {
    let r = &s.vms[&vm];
    let e = Envelope::new(
        0,
        Actor::Agent(HostId::new(host).unwrap()),
        EventKind::VmRunning(novacron_types::event::VmIncarnationReport {
            vm,
            host: HostId::new(host).unwrap(),
            incarnation: r.incarnation.unwrap(),
            generation: r.generation,
        }),
    );
    apply_all(s, &[e]);
}

#[test]
fn a_drain_migrates_within_its_limits_and_moves_cold_what_cannot_migrate() {
    let mut s = hosts(3);
    let mut vms = Vec::new();
    for i in 0..3 {
        let (vm, ev) = create_vm(&s, spec(&format!("v{i}"), 1), &mut Fixed(100 * (i + 1)), &origin()).unwrap();
        apply_all(&mut s, &ev);
        run_vm_on(&mut s, vm, "h1");
        vms.push(vm);
    }
    let (_, e) = host_action(&s, "h1", HostAction::Drain, &mut Fixed(0), &origin()).unwrap();
    apply_all(&mut s, &e);
    let limits = ReconcileSettings { migrations: MigrationLimits { per_host: 2, cluster: 8 }, ..Default::default() };
    let e = reconcile_with(&s, &mut Fixed(1000), &origin(), limits.clone());
    let planned = e.iter().filter(|e| matches!(e.event, EventKind::VmMigrationPlanned(_))).count();
    assert_eq!(planned, 2, "at most two migrations out of one host at once");
    apply_all(&mut s, &e);
    assert!(
        reconcile_with(&s, &mut Fixed(2000), &origin(), limits.clone())
            .iter()
            .all(|e| !matches!(e.event, EventKind::VmMigrationPlanned(_)))
    );

    // One migration fails: that VM is moved cold — stopped first.
    let failing = vms.iter().copied().find(|v| s.vms[v].migration.is_some()).unwrap();
    let target = s.vms[&failing].migration.as_ref().unwrap().target_incarnation;
    let failed = Envelope::new(
        0,
        Actor::Agent(HostId::new("h1").unwrap()),
        EventKind::VmMigrationFailed(novacron_types::event::VmMigrationFailed {
            vm: failing,
            reported_by: HostId::new("h1").unwrap(),
            target_incarnation: target,
            reason: "test".into(),
        }),
    );
    apply_all(&mut s, &[failed]);
    let e = reconcile_with(&s, &mut Fixed(3000), &origin(), limits.clone());
    assert!(e.iter().any(|e| matches!(&e.event, EventKind::VmStopCommanded(c) if c.vm == failing)), "{:?}", names(&e));
    apply_all(&mut s, &e);
    let stopped = Envelope::new(
        0,
        Actor::Agent(HostId::new("h1").unwrap()),
        EventKind::VmStopped(novacron_types::event::VmIncarnationReport {
            vm: failing,
            host: HostId::new("h1").unwrap(),
            incarnation: s.vms[&failing].incarnation.unwrap(),
            generation: s.vms[&failing].generation,
        }),
    );
    apply_all(&mut s, &[stopped]);
    let e = reconcile_with(&s, &mut Fixed(4000), &origin(), limits.clone());
    let placed = e.iter().find_map(|e| match &e.event {
        EventKind::VmPlaced(p) if p.vm == failing => Some(p.host.clone()),
        _ => None,
    });
    assert!(placed.is_some_and(|h| h.as_str() != "h1"), "then placed elsewhere: {:?}", names(&e));
}

/// Completes every migration planned in `events` at `at_ms`, as the agents would.
fn complete_migrations(s: &mut ClusterState, events: &[Envelope], at_ms: u64) {
    for e in events {
        if let EventKind::VmMigrationPlanned(p) = &e.event {
            let done = Envelope::new(
                at_ms,
                Actor::Agent(p.from.clone()),
                EventKind::VmMigrationCompleted(novacron_types::event::VmMigrationCompleted {
                    vm: p.vm,
                    from: p.from.clone(),
                    to: p.to.clone(),
                    source_incarnation: p.source_incarnation,
                    target_incarnation: p.target_incarnation,
                    downtime_ms: 1,
                    duration_ms: 10,
                }),
            );
            apply_all(s, &[done]);
        }
    }
}

fn snapshot(hot: &[(&str, u64)], util: &[(&str, f64)], now_ms: u64) -> LoadSnapshot {
    LoadSnapshot {
        hot_for: hot.iter().map(|(h, s)| (HostId::new(*h).unwrap(), std::time::Duration::from_secs(*s))).collect(),
        host_util: util.iter().map(|(h, u)| (HostId::new(*h).unwrap(), *u)).collect(),
        vm_util: BTreeMap::new(),
        now_ms,
        failure_risk: BTreeMap::new(),
    }
}

fn running_on_h1(s: &mut ClusterState, n: usize) -> Vec<VmId> {
    let mut vms = Vec::new();
    for i in 0..n {
        let (vm, ev) = create_vm(s, spec(&format!("r{i}"), 2), &mut Fixed(500 + i as u128 * 10), &origin()).unwrap();
        apply_all(s, &ev);
        run_vm_on(s, vm, "h1");
        vms.push(vm);
    }
    vms
}

#[test]
fn a_host_that_stays_hot_sheds_a_vm_to_the_coolest_host_and_says_why() {
    let mut s = hosts(3);
    let vms = running_on_h1(&mut s, 3);
    let cfg = novacron_scheduler::PlannerConfig::default();
    let settings = RebalanceSettings::default();
    let limits = MigrationLimits::default();
    let not_yet = snapshot(&[("h1", 30)], &[("h1", 0.95), ("h2", 0.50), ("h3", 0.10)], 1_000_000);
    assert!(
        rebalance(&s, &not_yet, settings, &cfg, 0, limits, &mut Fixed(900), &origin()).is_empty(),
        "not hot long enough"
    );
    let hot = snapshot(&[("h1", 120)], &[("h1", 0.95), ("h2", 0.50), ("h3", 0.10)], 1_000_000);
    let e = rebalance(&s, &hot, settings, &cfg, 0, limits, &mut Fixed(900), &origin());
    assert_eq!(names(&e), ["VmMigrationPlanned", "VmIncomingCommanded"], "one VM per hot host per pass");
    let EventKind::VmMigrationPlanned(p) = &e[0].event else { unreachable!() };
    assert_eq!(p.to.as_str(), "h3", "to the coolest host");
    assert!(vms.contains(&p.vm));
    assert!(p.reason.contains("h1 at 95% for 120 s") && p.reason.contains("expected"), "{}", p.reason);
    let cool = snapshot(&[], &[("h1", 0.5), ("h2", 0.5), ("h3", 0.5)], 1_000_000);
    assert!(
        rebalance(&s, &cool, settings, &cfg, 0, limits, &mut Fixed(900), &origin()).is_empty(),
        "balanced: nothing moves"
    );
}

#[test]
fn an_oscillating_load_never_makes_a_vm_ping_pong() {
    let mut s = hosts(3);
    let vms = running_on_h1(&mut s, 4);
    let cfg = novacron_scheduler::PlannerConfig::default();
    let settings = RebalanceSettings::default();
    let minute = 60_000u64;
    // The hot spot moves every minute for two hours: the classic descheduler ping-pong, and a
    // hop from host to host.
    let names = ["h1", "h2", "h3"];
    for round in 0..120u64 {
        let now = 10_000_000 + round * minute;
        let hot = names[(round % 3) as usize];
        let util: Vec<(&str, f64)> = names.iter().map(|h| (*h, if *h == hot { 0.95 } else { 0.05 })).collect();
        let load = snapshot(&[(hot, 300)], &util, now);
        let e = rebalance(
            &s,
            &load,
            settings,
            &cfg,
            0,
            MigrationLimits::default(),
            &mut Fixed(u128::from(round) * 1000 + 10_000),
            &origin(),
        );
        apply_all(&mut s, &e);
        complete_migrations(&mut s, &e, now);
    }
    let cooldown = settings.vm_cooldown.as_millis() as u64;
    let back = settings.return_cooldown.as_millis() as u64;
    let mut total_moves = 0;
    for vm in &vms {
        let moves = &s.vms[vm].moves;
        total_moves += moves.len();
        for pair in moves.windows(2) {
            assert!(pair[1].at_ms - pair[0].at_ms >= cooldown, "{vm} moved twice within the cooldown: {moves:?}");
            if pair[1].to == pair[0].from {
                assert!(pair[1].at_ms - pair[0].at_ms >= back, "{vm} went back too soon: {moves:?}");
            }
        }
    }
    assert!(total_moves > 0, "the rebalancer did act");
    // The cooldown bounds every VM to one move per cooldown period, whatever the load does.
    let per_vm_bound = 1 + (120 * minute / cooldown) as usize;
    assert!(
        vms.iter().all(|vm| s.vms[vm].moves.len() <= per_vm_bound),
        "a VM moved more often than its cooldown allows"
    );
}

#[test]
fn a_vm_never_goes_back_to_a_host_it_left_recently() {
    let mut s = hosts(3);
    let vms = running_on_h1(&mut s, 4);
    let cfg = novacron_scheduler::PlannerConfig::default();
    let settings = RebalanceSettings::default();
    let minute = 60_000u64;
    // Load swings between h1 and h2; h3 is too warm to take anything. Going back is the only
    // relief on offer, and the return rule must refuse it for `return_cooldown`.
    for round in 0..180u64 {
        let now = 20_000_000 + round * minute;
        let (hot, cool) = if (round / 5) % 2 == 0 { ("h1", "h2") } else { ("h2", "h1") };
        let load = snapshot(&[(hot, 300)], &[(hot, 0.95), (cool, 0.05), ("h3", 0.80)], now);
        let e = rebalance(
            &s,
            &load,
            settings,
            &cfg,
            0,
            MigrationLimits::default(),
            &mut Fixed(u128::from(round) * 1000 + 50_000),
            &origin(),
        );
        apply_all(&mut s, &e);
        complete_migrations(&mut s, &e, now);
    }
    let back = settings.return_cooldown.as_millis() as u64;
    let mut returns = 0;
    for vm in &vms {
        let moves = &s.vms[vm].moves;
        for (i, m) in moves.iter().enumerate() {
            for earlier in &moves[..i] {
                if m.to == earlier.from {
                    returns += 1;
                    assert!(m.at_ms - earlier.at_ms >= back, "{vm} went back to {} too soon: {moves:?}", m.to);
                }
            }
        }
        assert!(moves.iter().all(|m| m.to.as_str() != "h3"), "h3 was too warm to take anything");
    }
    assert!(returns > 0, "returns do happen once the cooldown has passed");
}

#[test]
fn grouped_creates_refuse_one_request_without_failing_the_others_and_never_double_book() {
    // One host of 4 vCPUs; three requests decided together (the engine's group commit).
    let mut s = with_host(4);
    let requests = vec![
        (vec![spec("a", 3)], origin()),
        (vec![spec("a", 1)], origin()), // the name is taken by the first request
        (vec![spec("b", 3)], origin()), // does not fit next to "a": stays pending
    ];
    let (results, events) = create_vm_groups(&s, &requests, &Planning::default(), &mut Fixed(0));
    assert_eq!(results.len(), 3);
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    assert_eq!(results[1], Err(Refusal::NameInUse("a".into())));
    apply_all(&mut s, &events);
    let status = |name: &str| s.vms.values().find(|v| v.spec.name == name).map(|v| v.status);
    assert_eq!(status("a"), Some(VmStatus::Starting), "placed and its start commanded");
    assert_eq!(status("b"), Some(VmStatus::Pending), "the host's capacity was reserved by the first request");
    assert_eq!(s.vms.len(), 2);
}

/// A stamp at a chosen time.
struct At(u128, u64);
impl Stamp for At {
    fn now_ms(&mut self) -> u64 {
        self.1
    }
    fn vm_id(&mut self) -> VmId {
        self.0 += 1;
        VmId(Uuid::from_u128(self.0))
    }
    fn incarnation_id(&mut self) -> IncarnationId {
        self.0 += 1;
        IncarnationId(Uuid::from_u128(self.0))
    }
}

fn policies(yaml: &str) -> Vec<novacron_types::policy::Policy> {
    novacron_policy::parse_policies("t.yaml", yaml).unwrap()
}

/// Planned migrations as VM → destination.
fn planned_moves(events: &[Envelope]) -> BTreeMap<VmId, String> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            EventKind::VmMigrationPlanned(p) => Some((p.vm, p.to.to_string())),
            _ => None,
        })
        .collect()
}

// 2026-11-28T23:00:00Z, a Saturday.
const SAT_2300: u64 = 1_795_906_800_000;

#[test]
fn a_dry_run_predicts_what_the_policy_pass_then_does() {
    let mut s = hosts(3);
    let vms = running_on_h1(&mut s, 3);
    let apart = policies("name: apart\nrule: {anti-affinity: {}}\n");
    let planning = Planning::default();
    let cooldown = std::time::Duration::from_secs(600);
    let (plan, predicted) =
        dry_run(&s, &apart, &planning, MigrationLimits::default(), cooldown, &mut At(100, SAT_2300), &origin())
            .unwrap();
    assert_eq!(plan.changed.len(), 1);
    let actions: Vec<(VmId, &str)> = predicted.findings.iter().map(|(v, a)| (v.vm, a.as_str())).collect();
    assert_eq!(actions.len(), 2, "the lowest id stays, the two others break the rule: {actions:?}");
    assert!(actions.iter().all(|(vm, a)| *vm != vms[0] && a.starts_with("migrate to h")), "{actions:?}");

    // Apply for real; the next pass does what the dry run said, move for move.
    let (_, applied) = apply_policies(&s, &apart, &mut At(200, SAT_2300), &origin()).unwrap();
    apply_all(&mut s, &applied);
    let pass = policy_pass(&s, &planning, MigrationLimits::default(), cooldown, &mut At(300, SAT_2300), &origin());
    assert_eq!(planned_moves(&pass.events), planned_moves(&predicted.events));
    assert_eq!(planned_moves(&pass.events).len(), 2);
    let to: std::collections::BTreeSet<String> = planned_moves(&pass.events).into_values().collect();
    assert_eq!(to.len(), 2, "the two go to different hosts: the rule holds for them too");
    assert_eq!(names(&pass.events).iter().filter(|n| **n == "PolicyViolationObserved").count(), 2);
    apply_all(&mut s, &pass.events);
    let again = policy_pass(&s, &planning, MigrationLimits::default(), cooldown, &mut At(400, SAT_2300), &origin());
    assert!(again.events.is_empty(), "recorded once, and migrating VMs are left alone: {:?}", names(&again.events));
}

#[test]
fn corrections_wait_for_the_maintenance_window() {
    let mut s = hosts(3);
    running_on_h1(&mut s, 2);
    let docs = policies(
        "name: apart\nrule: {anti-affinity: {}}\n---\nname: nights\nrule: {maintenance-window: {days: [sat], start: '22:00', end: '02:00'}}\n",
    );
    let (_, applied) = apply_policies(&s, &docs, &mut At(100, SAT_2300), &origin()).unwrap();
    apply_all(&mut s, &applied);
    let planning = Planning::default();
    let cooldown = std::time::Duration::from_secs(600);
    let afternoon = SAT_2300 - 8 * 3_600_000;
    let closed = policy_pass(&s, &planning, MigrationLimits::default(), cooldown, &mut At(200, afternoon), &origin());
    assert_eq!(names(&closed.events), ["PolicyViolationObserved"]);
    let EventKind::PolicyViolationObserved(o) = &closed.events[0].event else { unreachable!() };
    assert_eq!((o.policy.as_str(), o.action.as_str()), ("apart", "wait for a maintenance window"));
    apply_all(&mut s, &closed.events);
    let later =
        policy_pass(&s, &planning, MigrationLimits::default(), cooldown, &mut At(300, afternoon + 60_000), &origin());
    assert!(later.events.is_empty(), "observed once; still closed");
    let open = policy_pass(&s, &planning, MigrationLimits::default(), cooldown, &mut At(400, SAT_2300), &origin());
    assert_eq!(planned_moves(&open.events).len(), 1, "{:?}", names(&open.events));
}

#[test]
fn healing_priority_decides_who_gets_scarce_capacity() {
    let run = |with_policy: bool| {
        let mut s = hosts(2);
        if with_policy {
            let (_, ev) = apply_policies(
                &s,
                &policies("name: gold-first\nscope: {selector: {tier: gold}}\nrule: {healing: {priority: high}}\n"),
                &mut Fixed(1),
                &origin(),
            )
            .unwrap();
            apply_all(&mut s, &ev);
        }
        let mut gold = spec("gold", 4);
        gold.labels.insert("tier".into(), "gold".into());
        // Bin-pack puts both on h1 (created first: the plain one has the lower id).
        let (plain, ev) = create_vm(&s, spec("plain", 4), &mut Fixed(10), &origin()).unwrap();
        apply_all(&mut s, &ev);
        let (gold, ev) = create_vm(&s, gold, &mut Fixed(20), &origin()).unwrap();
        apply_all(&mut s, &ev);
        let (_, ev) = create_vm(&s, spec("filler", 4), &mut Fixed(30), &origin()).unwrap();
        apply_all(&mut s, &ev);
        assert_eq!(s.vms[&gold].host, s.vms[&plain].host);
        let on = s.vms[&gold].host.clone().unwrap();
        let other = if on.as_str() == "h1" { "h2" } else { "h1" };
        let down = detect(&s, &silences(&[(on.as_str(), 6), (other, 0)]), T, &mut Fixed(40), &origin());
        apply_all(&mut s, &down);
        let failed = detect(&s, &silences(&[(on.as_str(), 31), (other, 0)]), T, &mut Fixed(50), &origin());
        apply_all(&mut s, &failed);
        let healing = reconcile(&s, &mut Fixed(60), &origin());
        let placed: Vec<VmId> = healing
            .iter()
            .filter_map(|e| match &e.event {
                EventKind::VmPlaced(p) => Some(p.vm),
                _ => None,
            })
            .collect();
        (placed, plain, gold)
    };
    let (placed, plain, _) = run(false);
    assert_eq!(placed, [plain], "without a policy, id order: the plain VM takes the last room");
    let (placed, _, gold) = run(true);
    assert_eq!(placed, [gold], "a high restart priority comes first");
}

#[test]
fn the_rebalancer_moves_nothing_outside_a_maintenance_window_and_keeps_policy_limits() {
    let mut s = hosts(3);
    running_on_h1(&mut s, 3);
    let cfg = novacron_scheduler::PlannerConfig::default();
    let settings = RebalanceSettings::default();
    let hot_at = |now| snapshot(&[("h1", 120)], &[("h1", 0.95), ("h2", 0.50), ("h3", 0.10)], now);
    let docs = policies(
        "name: nights\nrule: {maintenance-window: {days: [sat], start: '22:00', end: '02:00'}}\n---\n\
         name: one-at-a-time\nrule: {migration-limits: {cluster: 1}}\n",
    );
    let (_, ev) = apply_policies(&s, &docs, &mut Fixed(1), &origin()).unwrap();
    apply_all(&mut s, &ev);
    let afternoon = SAT_2300 - 8 * 3_600_000;
    let limits = MigrationLimits::default();
    assert!(rebalance(&s, &hot_at(afternoon), settings, &cfg, 0, limits, &mut Fixed(900), &origin()).is_empty());
    let inside = rebalance(&s, &hot_at(SAT_2300), settings, &cfg, 0, limits, &mut Fixed(900), &origin());
    assert_eq!(names(&inside), ["VmMigrationPlanned", "VmIncomingCommanded"]);
    assert!(
        rebalance(&s, &hot_at(SAT_2300), settings, &cfg, 1, limits, &mut Fixed(900), &origin()).is_empty(),
        "the policy allows one migration at a time in the cluster"
    );
}

#[test]
fn a_healing_policy_preferring_restart_makes_a_drain_move_vms_cold() {
    let mut s = hosts(2);
    let mut cold = spec("cold", 1);
    cold.group = Some("db".into());
    let (cold, ev) = create_vm(&s, cold, &mut Fixed(100), &origin()).unwrap();
    apply_all(&mut s, &ev);
    run_vm_on(&mut s, cold, "h1");
    let (warm, ev) = create_vm(&s, spec("warm", 1), &mut Fixed(200), &origin()).unwrap();
    apply_all(&mut s, &ev);
    run_vm_on(&mut s, warm, "h1");
    let (_, ev) = apply_policies(
        &s,
        &policies("name: db-restart\nscope: {group: db}\nrule: {healing: {prefer: restart}}\n"),
        &mut Fixed(1),
        &origin(),
    )
    .unwrap();
    apply_all(&mut s, &ev);
    let (_, e) = host_action(&s, "h1", HostAction::Drain, &mut Fixed(0), &origin()).unwrap();
    apply_all(&mut s, &e);
    let e = reconcile_with(&s, &mut Fixed(1000), &origin(), ReconcileSettings::default());
    assert!(e.iter().any(|e| matches!(&e.event, EventKind::VmStopCommanded(c) if c.vm == cold)), "{:?}", names(&e));
    assert!(e.iter().any(|e| matches!(&e.event, EventKind::VmMigrationPlanned(p) if p.vm == warm)), "{:?}", names(&e));
    let planned = e.iter().find_map(|e| match &e.event {
        EventKind::VmMigrationPlanned(p) => Some(p.policy_version),
        _ => None,
    });
    assert_eq!(planned, Some(Some(1)), "migrations record the policy version");
}

fn group_spec(name: &str, min: u32, max: u32, target: f64) -> novacron_types::group::GroupSpec {
    serde_json::from_value(serde_json::json!({
        "name": name, "min": min, "max": max, "vcpus": 1, "memory_mib": 256, "target_cpu": target,
        "scale_up_cooldown_s": 60, "scale_down_cooldown_s": 300, "stabilization_s": 300,
    }))
    .unwrap()
}

fn group_members(s: &ClusterState, g: &str) -> Vec<VmId> {
    members(s, g).iter().map(|v| v.id).collect()
}

/// Runs every member of a group (as its agent would report).
fn run_members(s: &mut ClusterState, g: &str) {
    for id in group_members(s, g) {
        if s.vms[&id].status == VmStatus::Starting {
            let host = s.vms[&id].host.clone().unwrap();
            run_vm_on(s, id, host.as_str());
        }
    }
}

fn util(s: &ClusterState, g: &str, u: f64) -> BTreeMap<VmId, f64> {
    group_members(s, g).into_iter().map(|v| (v, u)).collect()
}

fn scaled(events: &[Envelope]) -> Vec<&novacron_types::event::GroupScaled> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            EventKind::GroupScaled(g) => Some(g),
            _ => None,
        })
        .collect()
}

#[test]
fn a_group_is_brought_to_its_minimum_then_tracks_its_cpu_target_within_cooldowns() {
    let mut s = hosts(4);
    let (_, ev) = create_group(&s, group_spec("web", 2, 6, 0.6), &mut Fixed(1), &origin()).unwrap();
    apply_all(&mut s, &ev);
    let planning = Planning::default();
    let t0 = 1_000_000;
    let e = scale_groups(&s, &ScalingInputs::default(), &planning, &mut At(100, t0), &origin());
    assert_eq!((scaled(&e)[0].from, scaled(&e)[0].to), (0, 2));
    assert!(scaled(&e)[0].reason.contains("below the minimum 2"), "{}", scaled(&e)[0].reason);
    apply_all(&mut s, &e);
    run_members(&mut s, "web");
    let names: Vec<String> = members(&s, "web").iter().map(|v| v.spec.name.clone()).collect();
    assert_eq!(names, ["web-1", "web-2"]);

    // Hot: 2 × 0.9 / 0.6 = 3 members.
    let hot = ScalingInputs { vm_util: util(&s, "web", 0.9), ..Default::default() };
    // Within the scale-up cooldown of filling the group to its minimum: nothing yet.
    assert!(scale_groups(&s, &hot, &planning, &mut At(150, t0 + 1000), &origin()).is_empty());
    let e = scale_groups(&s, &hot, &planning, &mut At(200, t0 + 61_000), &origin());
    let g = scaled(&e)[0];
    assert_eq!((g.from, g.to, g.created.len()), (2, 3, 1));
    assert_eq!(g.observed_cpu, Some(0.9));
    assert!(g.since_last_up_s.is_some(), "the cooldown state is recorded");
    apply_all(&mut s, &e);
    run_members(&mut s, "web");
    // Still hot, inside the scale-up cooldown: nothing.
    let hot = ScalingInputs { vm_util: util(&s, "web", 0.9), ..Default::default() };
    assert!(scale_groups(&s, &hot, &planning, &mut At(300, t0 + 90_000), &origin()).is_empty());
    let e = scale_groups(&s, &hot, &planning, &mut At(400, t0 + 122_000), &origin());
    assert_eq!((scaled(&e)[0].from, scaled(&e)[0].to), (3, 5));
    apply_all(&mut s, &e);
    run_members(&mut s, "web");

    // Cold: target tracking asks for 2, but the window still recommends 4, and the scale-down
    // cooldown counts from the last scale-up too.
    let cold = |s: &ClusterState, stable: u32| ScalingInputs {
        vm_util: util(s, "web", 0.2),
        stable_desired: BTreeMap::from([("web".to_owned(), stable)]),
        ..Default::default()
    };
    assert!(scale_groups(&s, &cold(&s, 4), &planning, &mut At(500, t0 + 200_000), &origin()).is_empty());
    let e = scale_groups(&s, &cold(&s, 4), &planning, &mut At(600, t0 + 430_000), &origin());
    let g = scaled(&e)[0];
    assert_eq!((g.from, g.to, g.removed.len()), (5, 4, 1));
    let newest = *members(&s, "web").last().map(|v| &v.id).unwrap();
    assert_eq!(g.removed, [newest], "the newest member goes first");
    assert!(e.iter().any(|e| matches!(&e.event, EventKind::VmDeleteRequested(d) if d.vm == newest)));
}

#[test]
fn predictive_scaling_goes_up_ahead_of_the_forecast_never_down_on_it_and_forecast_only_just_records() {
    let mut s = hosts(4);
    let mut spec = group_spec("api", 2, 8, 0.5);
    spec.mode = novacron_types::group::ScalingMode::Predictive;
    let (_, ev) = create_group(&s, spec, &mut Fixed(1), &origin()).unwrap();
    apply_all(&mut s, &ev);
    let planning = Planning::default();
    let e = scale_groups(&s, &ScalingInputs::default(), &planning, &mut At(100, 1_000), &origin());
    apply_all(&mut s, &e);
    run_members(&mut s, "api");
    let note = |point: f64, upper: f64| novacron_types::group::ForecastNote {
        model: "ses(α=0.30)".into(),
        horizon_steps: 1,
        step_s: 300,
        point,
        lower: point / 2.0,
        upper,
    };
    // At target now (0.5), but the forecast load is a fifth of the group at its maximum (8):
    // 0.2 × 8 / 0.5 → 4 members (its upper bound, 0.25 × 8 → 2, stays below full).
    let inputs = ScalingInputs {
        vm_util: util(&s, "api", 0.5),
        forecasts: BTreeMap::from([("api".to_owned(), note(0.2, 0.25))]),
        ..Default::default()
    };
    let e = scale_groups(&s, &inputs, &planning, &mut At(200, 1_000_000), &origin());
    let g = scaled(&e)[0];
    assert_eq!((g.from, g.to), (2, 4));
    assert_eq!(g.forecast.as_ref().map(|f| f.upper), Some(0.25), "the forecast it acted on is recorded");
    assert!(g.reason.contains("forecast"), "{}", g.reason);
    // A low forecast alone never shrinks it.
    let inputs = ScalingInputs {
        vm_util: util(&s, "api", 0.5),
        forecasts: BTreeMap::from([("api".to_owned(), note(0.05, 0.1))]),
        ..Default::default()
    };
    assert!(scale_groups(&s, &inputs, &planning, &mut At(300, 9_000_000), &origin()).is_empty());
    apply_all(&mut s, &e);
    run_members(&mut s, "api");
    // Idle members, but the forecast still needs four: the group holds (no staircase down).
    let idle = |point, upper| ScalingInputs {
        vm_util: util(&s, "api", 0.1),
        forecasts: BTreeMap::from([("api".to_owned(), note(point, upper))]),
        stable_desired: BTreeMap::from([("api".to_owned(), 1)]),
    };
    assert!(scale_groups(&s, &idle(0.2, 0.25), &planning, &mut At(400, 9_000_000), &origin()).is_empty());
    assert!(scale_groups(&s, &idle(0.15, 0.2), &planning, &mut At(500, 9_000_000), &origin()).is_empty(), "3 needed");
    // Forecast and observation agree: down to the minimum in one step.
    let e = scale_groups(&s, &idle(0.05, 0.1), &planning, &mut At(600, 9_000_000), &origin());
    assert_eq!((scaled(&e)[0].from, scaled(&e)[0].to), (4, 2));

    // Forecast-only: the recommendation is recorded once, and nothing is created.
    let mut s = hosts(4);
    let mut spec = group_spec("batch", 2, 8, 0.5);
    spec.mode = novacron_types::group::ScalingMode::ForecastOnly;
    let (_, ev) = create_group(&s, spec, &mut Fixed(1), &origin()).unwrap();
    apply_all(&mut s, &ev);
    let e = scale_groups(&s, &ScalingInputs::default(), &planning, &mut At(100, 1_000), &origin());
    apply_all(&mut s, &e);
    run_members(&mut s, "batch");
    let inputs = ScalingInputs {
        vm_util: util(&s, "batch", 0.5),
        forecasts: BTreeMap::from([("batch".to_owned(), note(0.2, 0.25))]),
        ..Default::default()
    };
    let e = scale_groups(&s, &inputs, &planning, &mut At(200, 1_000_000), &origin());
    assert_eq!(names(&e), ["GroupScaled"], "a recommendation, no VM");
    assert!(scaled(&e)[0].recommendation_only && scaled(&e)[0].to == 4);
    apply_all(&mut s, &e);
    assert!(scale_groups(&s, &inputs, &planning, &mut At(300, 2_000_000), &origin()).is_empty(), "not repeated");
}

#[test]
fn a_scale_up_a_quota_refuses_is_recorded_once_and_retried() {
    let mut s = hosts(4);
    let (_, ev) = create_group(&s, group_spec("web", 2, 6, 0.6), &mut Fixed(1), &origin()).unwrap();
    apply_all(&mut s, &ev);
    let (_, ev) = apply_policies(
        &s,
        &policies("name: web-quota\nscope: {group: web}\nrule: {capacity: {quota: {vms: 2}}}\n"),
        &mut Fixed(2),
        &origin(),
    )
    .unwrap();
    apply_all(&mut s, &ev);
    let planning = Planning::default();
    let e = scale_groups(&s, &ScalingInputs::default(), &planning, &mut At(100, 1_000_000), &origin());
    apply_all(&mut s, &e);
    run_members(&mut s, "web");
    // Hot: it should grow to 3, and the quota says no.
    let hot = ScalingInputs { vm_util: util(&s, "web", 0.9), ..Default::default() };
    let e = scale_groups(&s, &hot, &planning, &mut At(200, 2_000_000), &origin());
    assert_eq!(names(&e), ["GroupScaleRefused"], "nothing created, and the log says why");
    let EventKind::GroupScaleRefused(r) = &e[0].event else { unreachable!() };
    assert_eq!((r.from, r.wanted, r.policy_version), (2, 3, Some(1)));
    assert!(r.reason.contains("above target") && r.refusal.contains("web-quota"), "{r:?}");
    apply_all(&mut s, &e);
    // The next passes retry without repeating the event.
    assert!(scale_groups(&s, &hot, &planning, &mut At(300, 3_000_000), &origin()).is_empty());
    // Hotter: another size wanted, another record.
    let hotter = ScalingInputs { vm_util: util(&s, "web", 1.0), ..Default::default() };
    let e = scale_groups(&s, &hotter, &planning, &mut At(400, 4_000_000), &origin());
    assert_eq!(names(&e), ["GroupScaleRefused"]);
}

#[test]
fn schedules_raise_the_minimum_and_scaling_policies_narrow_the_bounds() {
    let mut s = hosts(4);
    let mut spec = group_spec("shop", 1, 10, 0.6);
    spec.schedules = vec![novacron_types::group::ScheduledSize {
        days: vec![novacron_types::policy::Weekday::Sat],
        start: "22:00".into(),
        end: "02:00".into(),
        min: 5,
    }];
    let (_, ev) = create_group(&s, spec, &mut Fixed(1), &origin()).unwrap();
    apply_all(&mut s, &ev);
    let (_, ev) = apply_policies(
        &s,
        &policies("name: shop-size\nscope: {group: shop}\nrule: {scaling: {min: 2, max: 4}}\n"),
        &mut Fixed(2),
        &origin(),
    )
    .unwrap();
    apply_all(&mut s, &ev);
    let planning = Planning::default();
    let afternoon = SAT_2300 - 8 * 3_600_000;
    let e = scale_groups(&s, &ScalingInputs::default(), &planning, &mut At(100, afternoon), &origin());
    assert_eq!(scaled(&e)[0].to, 2, "the policy's minimum");
    assert_eq!(scaled(&e)[0].policy_version, Some(1));
    apply_all(&mut s, &e);
    let e = scale_groups(&s, &ScalingInputs::default(), &planning, &mut At(200, SAT_2300), &origin());
    let g = scaled(&e)[0];
    assert_eq!((g.to, g.min, g.max), (4, 4, 4), "the schedule asks for 5; the policy caps at 4");
    assert!(matches!(
        create_group(&s, group_spec("bad", 3, 2, 0.5), &mut Fixed(3), &origin()),
        Err(Refusal::Invalid { field, .. }) if field == "min"
    ));
}

#[test]
fn a_scaling_policy_lengthens_cooldowns_and_its_schedules_raise_the_minimum() {
    let mut s = hosts(4);
    let (_, ev) = create_group(&s, group_spec("api", 1, 6, 0.5), &mut Fixed(1), &origin()).unwrap();
    apply_all(&mut s, &ev);
    let planning = Planning::default();
    let e = scale_groups(&s, &ScalingInputs::default(), &planning, &mut At(100, 1_000), &origin());
    apply_all(&mut s, &e);
    run_members(&mut s, "api");
    let (_, ev) = apply_policies(
        &s,
        &policies(
            "name: api-slow\nscope: {group: api}\nrule: {scaling: {min: 1, max: 6, scale_up_cooldown: 10m, \
             schedules: [{days: [sat], start: '22:00', end: '02:00', min: 3}]}}\n",
        ),
        &mut Fixed(2),
        &origin(),
    )
    .unwrap();
    apply_all(&mut s, &ev);
    let hot = ScalingInputs { vm_util: util(&s, "api", 0.9), ..Default::default() };
    // The group's own cooldown (60 s) has passed, the policy's (10 min) has not.
    assert!(scale_groups(&s, &hot, &planning, &mut At(200, 1_000 + 120_000), &origin()).is_empty());
    let e = scale_groups(&s, &hot, &planning, &mut At(300, 1_000 + 601_000), &origin());
    assert_eq!(scaled(&e)[0].to, 2, "1 × 0.9 / 0.5 rounded up");
    apply_all(&mut s, &e);
    // Inside the policy's schedule, its minimum applies at once (no cooldown below a minimum).
    let e = scale_groups(&s, &ScalingInputs::default(), &planning, &mut At(400, SAT_2300), &origin());
    assert_eq!((scaled(&e)[0].to, scaled(&e)[0].min), (3, 3));
}

#[test]
fn violations_name_the_vm_in_the_way_and_count_per_domain() {
    let mut s = hosts(3);
    let vms = running_on_h1(&mut s, 3);
    let (loner, ev) = create_vm(&s, spec("r3", 2), &mut Fixed(900), &origin()).unwrap();
    apply_all(&mut s, &ev);
    run_vm_on(&mut s, loner, "h1");
    // Moved by hand: the check reads where the log says each VM runs.
    s.vms.get_mut(&loner).unwrap().host = Some(HostId::new("h2").unwrap());
    for v in s.vms.values_mut() {
        v.spec.labels.insert("app".into(), "web".into());
    }
    let observe = |yaml: &str| {
        let mut with = s.clone();
        let (_, applied) = apply_policies(&with, &policies(yaml), &mut At(100, SAT_2300), &origin()).unwrap();
        apply_all(&mut with, &applied);
        novacron_policy::observe::violations(&with)
            .into_iter()
            .map(|v| (v.vm, v.reason, v.correctable))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        observe("name: apart\nrule: {anti-affinity: {}}\n"),
        [
            (vms[1], "shares the host h1 with r0".to_owned(), true),
            (vms[2], "shares the host h1 with r0".to_owned(), true)
        ],
        "the lowest id stays; the others name the first VM in their way"
    );
    assert_eq!(
        observe("name: near\nrule: {affinity: {selector: {app: web}}}\n"),
        [(loner, "none of the VMs it must be near runs in its domain".to_owned(), false)],
        "three share h1; the one on h2 has none of them there"
    );
    assert_eq!(
        observe("name: few\nrule: {capacity: {max_vms_per_host: 2}}\n"),
        [(vms[2], "host h1 runs 3 VMs, more than 2".to_owned(), false)],
        "h1 is over by one: the last VM there in id order"
    );
}

/// Reports about distinct VMs and creates decided as one batch: each report gets the verdict
/// and events it gets alone, the creates the placements they get alone, and a registration or
/// a second report about a VM is kept out of the batch.
#[test]
fn a_batch_decides_each_report_and_create_as_alone() {
    let mut s = with_host(8);
    let h1 = HostId::new("h1").unwrap();
    let mut running = Vec::new();
    for (i, name) in ["a", "b"].into_iter().enumerate() {
        let (vm, ev) = create_vm(&s, spec(name, 2), &mut Fixed(100 * (i as u128 + 1)), &origin()).unwrap();
        apply_all(&mut s, &ev);
        running.push(vm);
    }
    let at = |vm: VmId| novacron_types::event::VmIncarnationReport {
        vm,
        host: h1.clone(),
        incarnation: s.vms[&vm].incarnation.unwrap(),
        generation: s.vms[&vm].generation,
    };
    let report_of = |n: u128, kind: ReportKind| Report {
        schema: SCHEMA_VERSION,
        id: ReportId(Uuid::from_u128(n)),
        host: h1.clone(),
        at_ms: 1,
        report: kind,
    };
    let up = report_of(1, ReportKind::VmRunning(at(running[0])));
    let failed = report_of(
        2,
        ReportKind::VmFailed(novacron_types::event::VmFailed {
            vm: running[1],
            host: h1.clone(),
            incarnation: s.vms[&running[1]].incarnation.unwrap(),
            generation: s.vms[&running[1]].generation,
            reason: "exit 1".into(),
        }),
    );
    let stranger = VmId(Uuid::from_u128(9_999));
    let unknown = report_of(
        3,
        ReportKind::VmRunning(novacron_types::event::VmIncarnationReport {
            vm: stranger,
            host: h1.clone(),
            incarnation: IncarnationId(Uuid::from_u128(9_998)),
            generation: Generation(1),
        }),
    );
    assert_eq!(batch_key(&up), Some(running[0]));
    assert_eq!(batch_key(&unknown), Some(stranger));
    let registration = report_of(
        4,
        ReportKind::HostRegistration(HostRegistration {
            capacity: Resources { vcpus: 64, memory_mib: 65536, disk_gib: 0 },
            labels: Default::default(),
            driver: "sim".into(),
        }),
    );
    assert_eq!(batch_key(&registration), None, "a registration is decided alone");

    let creates = vec![(vec![spec("c", 2)], origin()), (vec![spec("d", 4)], origin())];
    let planning = Planning { config: Default::default(), load: Default::default() };
    let batch = decide_batch(&s, &[&up, &failed, &unknown], &creates, &planning, &mut Fixed(1_000));

    // Reports: as alone, in order, their events first.
    assert_eq!(batch.reports.len(), 3);
    assert_eq!(batch.reports[..2], [Ok(()), Ok(())]);
    assert!(batch.reports[2].as_ref().unwrap_err().contains("unknown VM"), "{:?}", batch.reports[2]);
    let mut alone = Vec::new();
    for r in [&up, &failed] {
        let ReportOutcome::Events(ev) = report(&s, r, &mut Fixed(0)) else { panic!("accepted alone") };
        alone.extend(ev.into_iter().map(|e| e.event));
    }
    let batched: Vec<&EventKind> = batch.events.iter().map(|e| &e.event).collect();
    assert_eq!(batched[..2], alone.iter().collect::<Vec<_>>()[..]);

    // Creates: what they get alone on the same state (the failed VM's vCPUs are not reused
    // in the same batch: 4 of 8 are free, so c fits and d waits).
    let (results, alone) = create_vm_groups(&s, &creates, &planning, &mut Fixed(1_000));
    assert_eq!(batch.creates, results);
    let kinds = |ev: &[Envelope]| ev.iter().map(|e| e.event.name()).collect::<Vec<_>>();
    assert_eq!(kinds(&batch.events[2..]), kinds(&alone));

    apply_all(&mut s, &batch.events);
    assert_eq!(s.vms[&running[0]].status, VmStatus::Running);
    assert_eq!(s.vms[&running[1]].status, VmStatus::Failed);
    let host = &s.hosts[&h1];
    assert!(host.allocated.fits_within(host.capacity), "{:?} within {:?}", host.allocated, host.capacity);
    let c = batch.creates[0].as_ref().unwrap()[0];
    assert_eq!(s.vms[&c].host.as_ref(), Some(&h1));
}
