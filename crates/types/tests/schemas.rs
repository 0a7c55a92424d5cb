//! The checked-in schemas and golden fixtures under `schemas/` must match today's code.
//!
//! - `schemas/*.schema.json` equal what the Rust types generate;
//! - `schemas/fixtures/<name>.json` and `.msgpack` equal today's encoding of a fixed sample, and
//!   both decode back to that sample.
//!
//! After an intended change: `make schemas` (sets NOVACRON_UPDATE_SCHEMAS=1) rewrites them;
//! review the diff — a changed fixture means old readers may misread new messages (bump the
//! schema version if so).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::PathBuf;

use novacron_types::event::*;
use novacron_types::report::HostRegistration;
use novacron_types::telemetry::{Heartbeat, HostTelemetry, VmSample, VmTelemetry};
use novacron_types::*;
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../schemas")
}

fn updating() -> bool {
    std::env::var_os("NOVACRON_UPDATE_SCHEMAS").is_some()
}

/// Compares (or, when updating, writes) one file; returns a drift message.
fn check_file(path: PathBuf, want: &[u8]) -> Option<String> {
    if updating() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, want).unwrap();
        return None;
    }
    match std::fs::read(&path) {
        Ok(have) if have == want => None,
        Ok(_) => Some(format!("{} differs from what the code produces", path.display())),
        Err(e) => Some(format!("{}: {e}", path.display())),
    }
}

#[test]
fn checked_in_schemas_match_the_types() {
    let drift: Vec<String> = novacron_types::schema::all()
        .into_iter()
        .filter_map(|(name, text)| check_file(dir().join(name), text.as_bytes()))
        .collect();
    assert!(drift.is_empty(), "schemas drifted (run `make schemas` and review):\n{}", drift.join("\n"));
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | n)
}

fn host() -> HostId {
    HostId::new("rack1-h07").unwrap()
}

fn other_host() -> HostId {
    HostId::new("rack2-h03").unwrap()
}

fn spec() -> VmSpec {
    VmSpec {
        name: "web-1".into(),
        vcpus: 2,
        memory_mib: 2048,
        disk_gib: 20,
        group: Some("web".into()),
        labels: [("tier".to_owned(), "frontend".to_owned())].into(),
        restart: Default::default(),
        placement: Default::default(),
    }
}

fn envelope(n: u128, event: EventKind) -> Envelope {
    Envelope {
        schema: SCHEMA_VERSION,
        id: EventId(id(n)),
        at_ms: 1_780_000_000_000 + n as u64,
        actor: Actor::User("alice".into()),
        causation_id: Some(id(100)),
        correlation_id: Some(id(101)),
        event,
    }
}

fn report(n: u128, report: ReportKind) -> Report {
    Report { schema: SCHEMA_VERSION, id: ReportId(id(n)), host: host(), at_ms: 1_780_000_000_000, report }
}

struct Fixtures {
    drift: Vec<String>,
    count: usize,
}

impl Fixtures {
    fn check<T: Serialize + DeserializeOwned + PartialEq + Debug>(&mut self, name: &str, value: &T) {
        let mut json = serde_json::to_string_pretty(value).unwrap();
        json.push('\n');
        let msgpack = novacron_types::encode(value);
        // Both encodings decode back to the same value with today's code.
        let from_json: T = decode(json.as_bytes(), ContentType::Json).unwrap();
        let from_msgpack: T = decode(&msgpack, ContentType::MsgPack).unwrap();
        assert_eq!(&from_json, value, "{name}.json round trip");
        assert_eq!(&from_msgpack, value, "{name}.msgpack round trip");
        let base = dir().join("fixtures");
        self.drift.extend(check_file(base.join(format!("{name}.json")), json.as_bytes()));
        self.drift.extend(check_file(base.join(format!("{name}.msgpack")), &msgpack));
        // And what is checked in decodes too (an old fixture must stay readable).
        if !updating()
            && let Ok(bytes) = std::fs::read(base.join(format!("{name}.msgpack")))
        {
            let old: Result<T, _> = decode(&bytes, ContentType::MsgPack);
            assert!(old.is_ok(), "checked-in {name}.msgpack no longer decodes: {:?}", old.err());
        }
        self.count += 1;
    }
}

#[test]
fn golden_fixtures_decode_and_match_the_encoding() {
    let mut f = Fixtures { drift: Vec::new(), count: 0 };
    let vm = VmId(id(1));
    let inc = IncarnationId(id(2));
    let observed = VmIncarnationReport { vm, host: host(), incarnation: inc, generation: Generation(1) };
    let explanation = PlacementExplanation {
        planner: "first-fit".into(),
        log_seq: 41,
        hosts_considered: 3,
        rejections: BTreeMap::from([("capacity".to_owned(), 2)]),
        candidates: vec![Candidate {
            host: host(),
            score: 1.0,
            components: BTreeMap::from([("free_vcpus_after".to_owned(), 14.0)]),
        }],
        trigger: None,
        telemetry_watermark_ms: None,
        policy_version: None,
    };
    let healing = PlacementExplanation { trigger: Some("host rack2-h03 failed".into()), ..explanation.clone() };
    let target = IncarnationId(id(3));
    let prepare =
        PrepareIncoming { vm, host: other_host(), incarnation: target, generation: Generation(2), spec: spec() };
    let ready =
        VmMigrationIncomingReady { vm, host: other_host(), incarnation: target, uri: "tcp:10.0.0.8:49152".into() };
    let migrate = MigrateOut {
        vm,
        host: host(),
        incarnation: inc,
        generation: Generation(1),
        target_host: other_host(),
        target_incarnation: target,
        uri: "tcp:10.0.0.8:49152".into(),
    };
    let completed = VmMigrationCompleted {
        vm,
        from: host(),
        to: other_host(),
        source_incarnation: inc,
        target_incarnation: target,
        downtime_ms: 12,
        duration_ms: 840,
    };
    let failed =
        VmMigrationFailed { vm, reported_by: host(), target_incarnation: target, reason: "connection refused".into() };
    // New fixtures go at the end: each one's id comes from its position.
    let events = [
        (
            "event-host-registered",
            EventKind::HostRegistered(HostRegistered {
                host: host(),
                capacity: Resources { vcpus: 16, memory_mib: 65536, disk_gib: 500 },
                labels: [("zone".to_owned(), "zone-a".to_owned())].into(),
                driver: "sim".into(),
            }),
        ),
        ("event-vm-requested", EventKind::VmRequested(VmRequested { vm, spec: spec() })),
        (
            "event-vm-placed",
            EventKind::VmPlaced(VmPlaced {
                vm,
                host: host(),
                incarnation: inc,
                generation: Generation(1),
                explanation: explanation.clone(),
            }),
        ),
        (
            "event-vm-placement-failed",
            EventKind::VmPlacementFailed(VmPlacementFailed {
                vm,
                reason: "no host can take 64 vCPUs".into(),
                explanation,
            }),
        ),
        (
            "event-vm-start-commanded",
            EventKind::VmStartCommanded(StartVm {
                vm,
                host: host(),
                incarnation: inc,
                generation: Generation(1),
                spec: spec(),
            }),
        ),
        ("event-vm-running", EventKind::VmRunning(observed.clone())),
        (
            "event-vm-stop-commanded",
            EventKind::VmStopCommanded(StopVm {
                vm,
                host: host(),
                incarnation: inc,
                generation: Generation(1),
                reason: "deleted by operator".into(),
            }),
        ),
        ("event-vm-stopped", EventKind::VmStopped(observed.clone())),
        (
            "event-vm-failed",
            EventKind::VmFailed(VmFailed {
                vm,
                host: host(),
                incarnation: inc,
                generation: Generation(1),
                reason: "exit 1".into(),
            }),
        ),
        ("event-vm-delete-requested", EventKind::VmDeleteRequested(VmDeleteRequested { vm })),
        ("event-vm-deleted", EventKind::VmDeleted(VmDeleted { vm })),
        (
            "event-vm-migration-planned",
            EventKind::VmMigrationPlanned(VmMigrationPlanned {
                vm,
                from: host(),
                to: other_host(),
                source_incarnation: inc,
                target_incarnation: target,
                target_generation: Generation(2),
                reason: "requested by an operator".into(),
                policy_version: None,
            }),
        ),
        ("event-vm-incoming-commanded", EventKind::VmIncomingCommanded(prepare.clone())),
        ("event-vm-migration-incoming-ready", EventKind::VmMigrationIncomingReady(ready.clone())),
        ("event-vm-migration-started", EventKind::VmMigrationStarted(migrate)),
        ("event-vm-migration-completed", EventKind::VmMigrationCompleted(completed.clone())),
        ("event-vm-migration-failed", EventKind::VmMigrationFailed(failed.clone())),
        (
            "event-vm-placed-by-healing",
            EventKind::VmPlaced(VmPlaced {
                vm,
                host: host(),
                incarnation: IncarnationId(id(4)),
                generation: Generation(3),
                explanation: healing,
            }),
        ),
        ("event-host-suspected", EventKind::HostSuspected(HostSuspected { host: host(), silent_ms: 5_200 })),
        (
            "event-host-failed",
            EventKind::HostFailed(HostFailed {
                host: host(),
                silent_ms: 30_400,
                agent_lease_ms: 10_000,
                host_failure_timeout_ms: 30_000,
            }),
        ),
        ("event-host-recovered", EventKind::HostRecovered(HostRecovered { host: host() })),
        (
            "event-healing-paused",
            EventKind::HealingPaused(HealingPaused {
                silent_hosts: 7,
                hosts: 8,
                reason: "7 of 8 hosts went silent".into(),
            }),
        ),
        ("event-healing-resumed", EventKind::HealingResumed(HealingResumed { silent_hosts: 0 })),
        (
            "event-vm-gave-up",
            EventKind::VmGaveUp(VmGaveUp {
                vm,
                failures: 6,
                window_ms: 600_000,
                reason: "failed 6 times within 600 s (at most 5 restarts); not restarted again".into(),
            }),
        ),
        ("event-host-cordoned", EventKind::HostCordoned(HostCordoned { host: host() })),
        ("event-host-drain-requested", EventKind::HostDrainRequested(HostDrainRequested { host: host(), vms: 12 })),
        ("event-host-drained", EventKind::HostDrained(HostDrained { host: host() })),
        ("event-host-uncordoned", EventKind::HostUncordoned(HostUncordoned { host: host() })),
        (
            "event-vm-requested-with-rules",
            EventKind::VmRequested(VmRequested {
                vm,
                spec: VmSpec {
                    restart: RestartPolicy::Always,
                    placement: PlacementRules {
                        require_labels: [("gpu".to_owned(), "a100".to_owned())].into(),
                        group_anti_affinity: Strength::Hard,
                        ..PlacementRules::default()
                    },
                    ..spec()
                },
            }),
        ),
        (
            "event-leader-elected",
            EventKind::LeaderElected(LeaderElected {
                replica: "orchestrator-2".into(),
                term: 7,
                http: "http://10.0.0.2:8080".into(),
            }),
        ),
        (
            "event-vm-requested-with-affinity",
            EventKind::VmRequested(VmRequested {
                vm,
                spec: VmSpec {
                    group: Some("cache".into()),
                    labels: [("app".to_owned(), "cache".to_owned())].into(),
                    placement: PlacementRules {
                        group_affinity: Strength::Soft,
                        vm_affinity: vec![
                            VmAffinity {
                                selector: [("app".to_owned(), "web".to_owned())].into(),
                                relation: Relation::Affinity,
                                strength: Strength::Hard,
                                topology: Some("zone".into()),
                            },
                            VmAffinity {
                                selector: [("app".to_owned(), "cache".to_owned())].into(),
                                relation: Relation::AntiAffinity,
                                strength: Strength::Soft,
                                topology: None,
                            },
                        ],
                        strategy: Some(Strategy::Spread),
                        ..PlacementRules::default()
                    },
                    ..spec()
                },
            }),
        ),
        (
            "event-policy-applied",
            EventKind::PolicyApplied(PolicyApplied {
                version: 3,
                policy: novacron_types::policy::Policy {
                    name: "db-one-per-zone".into(),
                    description: "never two databases in one zone".into(),
                    scope: novacron_types::policy::Scope { group: Some("db".into()), selector: None },
                    priority: 10,
                    enforcement: novacron_types::policy::Enforcement::Hard,
                    rule: novacron_types::policy::Rule::AntiAffinity(novacron_types::policy::AffinityPolicy {
                        selector: None,
                        group: None,
                        topology: Some("zone".into()),
                    }),
                },
            }),
        ),
        (
            "event-policy-conflict-resolved",
            EventKind::PolicyConflictResolved(PolicyConflictResolved {
                version: 4,
                winner: "db-narrow".into(),
                loser: "zone-wide".into(),
                reason: "different values of host label zone: more specific scope".into(),
            }),
        ),
        (
            "event-policy-violation-observed",
            EventKind::PolicyViolationObserved(PolicyViolationObserved {
                version: 4,
                policy: "web-apart".into(),
                vm,
                host: host(),
                reason: "shares the host h-7 with web-1".into(),
                action: "wait for a maintenance window".into(),
            }),
        ),
        (
            "event-group-created",
            EventKind::GroupCreated(GroupCreated {
                spec: serde_json::from_value(serde_json::json!({
                    "name": "web", "min": 2, "max": 12, "vcpus": 2, "memory_mib": 2048, "target_cpu": 0.6,
                    "mode": "predictive",
                    "schedules": [{"days": ["mon", "fri"], "start": "08:00", "end": "18:00", "min": 6}],
                }))
                .expect("a valid group"),
            }),
        ),
        (
            "event-group-scaled",
            EventKind::GroupScaled(GroupScaled {
                group: "web".into(),
                from: 3,
                to: 5,
                recommendation_only: false,
                reason: "forecast mean CPU up to 88 % (upper 90 % bound) against target 60 %".into(),
                observed_cpu: Some(0.55),
                target_cpu: 0.6,
                forecast: Some(novacron_types::group::ForecastNote {
                    model: "ses(α=0.30)".into(),
                    horizon_steps: 1,
                    step_s: 300,
                    point: 0.7,
                    lower: 0.52,
                    upper: 0.88,
                }),
                min: 2,
                max: 12,
                since_last_up_s: Some(900),
                since_last_down_s: None,
                policy_version: Some(3),
                created: vec![vm],
                removed: vec![],
            }),
        ),
        (
            "event-group-scale-refused",
            EventKind::GroupScaleRefused(GroupScaleRefused {
                group: "web".into(),
                from: 4,
                wanted: 6,
                reason: "mean CPU 91 % above target 60 %".into(),
                refusal: "quota web-quota allows at most 8 vCPUs for group web".into(),
                policy_version: Some(2),
            }),
        ),
    ];
    for (i, (name, kind)) in events.into_iter().enumerate() {
        f.check(name, &envelope(i as u128 + 10, kind));
    }
    f.check(
        "report-host-registration",
        &report(
            30,
            ReportKind::HostRegistration(HostRegistration {
                capacity: Resources { vcpus: 16, memory_mib: 65536, disk_gib: 500 },
                labels: Default::default(),
                driver: "sim".into(),
            }),
        ),
    );
    f.check("report-vm-running", &report(31, ReportKind::VmRunning(observed.clone())));
    f.check("report-vm-stopped", &report(32, ReportKind::VmStopped(observed)));
    f.check(
        "report-vm-failed",
        &report(
            33,
            ReportKind::VmFailed(VmFailed {
                vm,
                host: host(),
                incarnation: inc,
                generation: Generation(1),
                reason: "exit 1".into(),
            }),
        ),
    );
    f.check("report-incoming-ready", &report(34, ReportKind::IncomingReady(ready)));
    f.check("report-migration-completed", &report(35, ReportKind::MigrationCompleted(completed)));
    f.check("report-migration-failed", &report(36, ReportKind::MigrationFailed(failed)));
    let host_sample = HostTelemetry {
        schema: SCHEMA_VERSION,
        host: host(),
        at_ms: 1_780_000_000_000,
        cpu_util: 0.42,
        memory_used_mib: 12288,
        load1: Some(1.5),
        vms: Vec::new(),
    };
    f.check("host-telemetry", &host_sample);
    f.check(
        "host-telemetry-with-vms",
        &HostTelemetry {
            load1: None,
            vms: vec![VmSample { vm, cpu_util: 0.8, memory_used_mib: 1536, status: Some("running".into()) }],
            ..host_sample
        },
    );
    f.check(
        "vm-telemetry",
        &VmTelemetry {
            schema: SCHEMA_VERSION,
            vm,
            at_ms: 1_780_000_000_000,
            cpu_util: 0.8,
            memory_used_mib: 1536,
            status: None,
        },
    );
    f.check(
        "vm-telemetry-with-status",
        &VmTelemetry {
            schema: SCHEMA_VERSION,
            vm,
            at_ms: 1_780_000_000_000,
            cpu_util: 0.8,
            memory_used_mib: 1536,
            status: Some("running".into()),
        },
    );
    f.check(
        "heartbeat",
        &Heartbeat { schema: SCHEMA_VERSION, host: host(), at_ms: 1_780_000_000_000, seq: 7, lease_revision: None },
    );
    f.check(
        "heartbeat-with-lease",
        &Heartbeat { schema: SCHEMA_VERSION, host: host(), at_ms: 1_780_000_000_000, seq: 8, lease_revision: Some(42) },
    );
    assert!(f.count >= 41);
    assert!(f.drift.is_empty(), "fixtures drifted (run `make schemas` and review):\n{}", f.drift.join("\n"));
}

#[test]
fn every_schema_is_valid_json_with_a_title() {
    for (name, text) in novacron_types::schema::all() {
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(v.get("title").is_some(), "{name} has no title");
    }
}
