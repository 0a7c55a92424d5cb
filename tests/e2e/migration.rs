//! The live-migration saga end to end: orchestrator, agents and the log.

use std::time::Duration;

use novacron_agent::driver::Driver;
use novacron_agent::sim::SimDriver;
use novacron_agent::{Agent, AgentConfig};
use novacron_eventlog::{Bus, BusConfig};
use novacron_orchestrator::decide::Origin;
use novacron_orchestrator::{Orchestrator, OrchestratorConfig};

use crate::harness::Orchestrator as OrchestratorProcess;
use novacron_state::{ClusterState, VmStatus};
use novacron_testkit::NatsServer;
use novacron_types::{Actor, HostId, Resources, VmId, VmSpec};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::harness::{BIN, cli_json, get, post, qemu_agent, vm_status, wait_for};

struct SimCluster {
    nats: NatsServer,
    orchestrator: Orchestrator,
    drivers: Vec<SimDriver>,
    cancel: CancellationToken,
    _dir: tempfile::TempDir,
}

impl SimCluster {
    async fn start(hosts: &[&str]) -> SimCluster {
        Self::start_with(hosts, |_| {}).await
    }

    async fn start_with(hosts: &[&str], tune: impl FnOnce(&mut OrchestratorConfig)) -> SimCluster {
        let nats = NatsServer::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cancel = CancellationToken::new();
        let mut cfg = OrchestratorConfig::new(nats.url(), dir.path().join("orch"));
        cfg.http = "127.0.0.1:0".parse().unwrap();
        cfg.reconcile_interval = Duration::from_millis(100);
        tune(&mut cfg);
        let orchestrator = Orchestrator::start(cfg, cancel.clone()).await.unwrap();
        let bus = Bus::connect(&BusConfig::new(nats.url(), "agents")).await.unwrap();
        let db = sled::open(dir.path().join("agents")).unwrap();
        let mut drivers = Vec::new();
        for h in hosts {
            let driver = SimDriver::default();
            let cfg = AgentConfig::new(HostId::new(*h).unwrap(), Resources { vcpus: 8, memory_mib: 8192, disk_gib: 0 });
            let agent = Agent::new(cfg, bus.clone(), driver.clone(), &db).unwrap();
            tokio::spawn(agent.run(cancel.clone()));
            drivers.push(driver);
        }
        let c = SimCluster { nats, orchestrator, drivers, cancel, _dir: dir };
        c.wait("hosts registered", |s| s.hosts.len() == hosts.len()).await;
        c
    }

    async fn wait(&self, what: &str, mut cond: impl FnMut(&ClusterState) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if cond(&self.orchestrator.engine.state.read().unwrap()) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn origin() -> Origin {
        Origin { actor: Actor::User("test".into()), correlation: None }
    }

    async fn running_vm(&self, name: &str) -> VmId {
        let spec = VmSpec {
            name: name.into(),
            vcpus: 2,
            memory_mib: 1024,
            disk_gib: 0,
            group: None,
            labels: Default::default(),
            restart: Default::default(),
            placement: Default::default(),
        };
        let view = self.orchestrator.engine.create_vm(spec, Self::origin()).await.unwrap();
        let vm: VmId = view.id.parse().unwrap();
        self.wait("the VM running", |s| s.vms[&vm].status == VmStatus::Running).await;
        vm
    }

    fn kinds(&self) -> Vec<String> {
        let url = self.nats.url();
        let out = std::process::Command::new(BIN).args(["--nats", &url, "events", "-o", "json"]).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array().unwrap().iter().filter_map(|e| e["kind"].as_str().map(str::to_owned)).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_migrates_between_simulated_hosts_through_the_saga() {
    let c = SimCluster::start(&["s1", "s2"]).await;
    let vm = c.running_vm("mover").await;
    let s1 = HostId::new("s1").unwrap();
    assert_eq!(c.orchestrator.engine.state.read().unwrap().vms[&vm].host, Some(s1));

    let view = c.orchestrator.engine.migrate_vm("mover".into(), Some("s2".into()), SimCluster::origin()).await.unwrap();
    assert_eq!(view.status, "migrating");
    let s2 = HostId::new("s2").unwrap();
    c.wait("the VM running on s2", |s| {
        let v = &s.vms[&vm];
        v.host.as_ref() == Some(&s2) && v.status == VmStatus::Running && v.migration.is_none()
    })
    .await;
    {
        let state = c.orchestrator.engine.state.read().unwrap();
        assert_eq!(state.vms[&vm].generation.0, 2, "the new incarnation has the next generation");
        assert!(state.hosts.values().all(|h| h.incoming.is_empty()));
        assert_eq!(state.hosts[&HostId::new("s1").unwrap()].allocated, Resources::ZERO);
    }
    assert!(c.drivers[0].running().is_empty(), "gone from the source");
    assert_eq!(c.drivers[1].running().len(), 1, "running on the destination");
    let kinds = c.kinds();
    for k in [
        "VmMigrationPlanned",
        "VmIncomingCommanded",
        "VmMigrationIncomingReady",
        "VmMigrationStarted",
        "VmMigrationCompleted",
    ] {
        assert!(kinds.iter().any(|x| x == k), "{k} missing from {kinds:?}");
    }
    c.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_migration_leaves_exactly_one_running_incarnation_on_the_source() {
    let c = SimCluster::start(&["s1", "s2"]).await;
    let vm = c.running_vm("stayer").await;
    c.drivers[0].fail_next_migrations(1);
    c.orchestrator.engine.migrate_vm(vm.to_string(), None, SimCluster::origin()).await.unwrap();
    let s1 = HostId::new("s1").unwrap();
    c.wait("the failure folded in", |s| {
        let v = &s.vms[&vm];
        v.migration.is_none() && v.status == VmStatus::Running && v.host.as_ref() == Some(&s1)
    })
    .await;
    assert!(c.kinds().iter().any(|k| k == "VmMigrationFailed"));
    // The destination's waiting copy is cleaned up: one incarnation, on the source.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !c.drivers[1].running().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the destination kept its incoming copy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(c.drivers[0].running().len(), 1);
    let state = c.orchestrator.engine.state.read().unwrap();
    assert_eq!(state.vms[&vm].generation.0, 1);
    assert_eq!(state.hosts[&HostId::new("s2").unwrap()].allocated, Resources::ZERO, "the reservation is released");
    drop(state);
    c.cancel.cancel();
}

#[test]
fn vm_migrate_moves_a_real_qemu_vm_to_another_agent() {
    let nats = NatsServer::start().unwrap();
    let dir = tempfile::Builder::new().prefix("ncm").tempdir_in("/tmp").unwrap();
    // QEMU runs daemonized: whatever this test leaves running is killed when it ends.
    let _reaper = novacron_testkit::ProcessReaper::new(dir.path());
    let o = OrchestratorProcess::start_process(&nats.url(), &dir.path().join("orch"));
    let _q1 = qemu_agent(&nats.url(), "q1", &dir.path().join("1"));
    let _q2 = qemu_agent(&nats.url(), "q2", &dir.path().join("2"));
    wait_for("two QEMU hosts", || get(&o.api, "/api/v1/hosts").1.as_array().is_some_and(|h| h.len() == 2));

    let (status, vm) = post(&o.api, "/api/v1/vms", &json!({"name": "live-1", "vcpus": 1, "memory_mib": 64}));
    assert_eq!(status, 201, "{vm}");
    let id = vm["id"].as_str().unwrap().to_owned();
    wait_for("live-1 running", || vm_status(&o.api, &id) == "running");
    let before = crate::qemu_pids_of(&id);
    assert_eq!(before.len(), 1);
    assert_eq!(get(&o.api, &format!("/api/v1/vms/{id}")).1["host"], "q1");

    let moving = cli_json(&["--server", &o.api, "vm", "migrate", "live-1", "--to", "q2"]);
    assert_eq!(moving["status"], "migrating");
    wait_for("live-1 running on q2", || {
        let v = get(&o.api, &format!("/api/v1/vms/{id}")).1;
        v["host"] == "q2" && v["status"] == "running"
    });
    wait_for("one QEMU process again", || crate::qemu_pids_of(&id).len() == 1);
    assert_ne!(crate::qemu_pids_of(&id), before, "it runs in the destination's process now");
    let events = cli_json(&["--nats", &nats.url(), "events"]);
    let done =
        events.as_array().unwrap().iter().find(|e| e["kind"] == "VmMigrationCompleted").expect("VmMigrationCompleted");
    assert!(done["payload"]["downtime_ms"].is_u64(), "downtime recorded: {done}");
    assert!(done["payload"]["duration_ms"].is_u64());
    assert_eq!(cli_json(&["--nats", &nats.url(), "state"]), get(&o.api, "/api/v1/state").1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_empties_the_host_by_live_migration_and_moves_cold_what_cannot_migrate() {
    let c = SimCluster::start(&["s1", "s2", "s3"]).await;
    let mut vms = Vec::new();
    for i in 0..4 {
        vms.push(c.running_vm(&format!("d{i}")).await);
    }
    let s1 = HostId::new("s1").unwrap();
    assert!(vms.iter().all(|v| c.orchestrator.engine.state.read().unwrap().vms[v].host.as_ref() == Some(&s1)));
    c.drivers[0].fail_next_migrations(1);

    let view = c
        .orchestrator
        .engine
        .host_action("s1".into(), novacron_orchestrator::decide::HostAction::Drain, SimCluster::origin())
        .await
        .unwrap();
    assert_eq!(view.state, "draining");
    c.wait("s1 drained", |s| {
        s.hosts[&s1].admin == novacron_state::HostAdmin::Cordoned
            && vms.iter().all(|v| s.vms[v].status == VmStatus::Running && s.vms[v].host.as_ref() != Some(&s1))
    })
    .await;
    assert!(c.drivers[0].running().is_empty(), "nothing left on s1");
    for v in &vms {
        let copies = c.drivers.iter().filter(|d| d.running().iter().any(|r| r.vm == *v)).count();
        assert_eq!(copies, 1, "VM {v} runs exactly once");
    }
    let kinds = c.kinds();
    let count = |k: &str| kinds.iter().filter(|x| *x == k).count();
    assert_eq!(count("HostDrainRequested"), 1);
    assert_eq!(count("VmMigrationCompleted"), 3, "{kinds:?}");
    assert_eq!(count("VmMigrationFailed"), 1, "one live migration failed");
    assert!(count("VmStopCommanded") >= 1, "that VM was moved cold: stopped, then placed elsewhere");
    assert_eq!(count("HostDrained"), 1);

    // A drained host takes no VMs until it is uncordoned.
    let spec = VmSpec {
        name: "after".into(),
        vcpus: 1,
        memory_mib: 256,
        disk_gib: 0,
        group: None,
        labels: Default::default(),
        restart: Default::default(),
        placement: Default::default(),
    };
    let v = c.orchestrator.engine.create_vm(spec, SimCluster::origin()).await.unwrap();
    assert_ne!(v.host.as_deref(), Some("s1"));
    c.orchestrator
        .engine
        .host_action("s1".into(), novacron_orchestrator::decide::HostAction::Uncordon, SimCluster::origin())
        .await
        .unwrap();
    c.wait("s1 back in service", |s| s.hosts[&s1].status() == "ready").await;
    c.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_reported_hot_long_enough_is_relieved_by_a_live_migration() {
    let c = SimCluster::start_with(&["s1", "s2"], |cfg| {
        cfg.rebalance.hold = Duration::from_secs(1);
    })
    .await;
    let vms = [c.running_vm("busy-1").await, c.running_vm("busy-2").await];
    let s1 = HostId::new("s1").unwrap();
    // Another system reports s1 at 95 % CPU, again and again (telemetry is lossy by design).
    let client = async_nats::connect(c.nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let sample = |util: f64| {
        let t = novacron_types::HostTelemetry {
            schema: novacron_types::SCHEMA_VERSION,
            host: s1.clone(),
            at_ms: novacron_eventlog::now_ms(),
            cpu_util: util,
            memory_used_mib: 1024,
            load1: None,
            vms: Vec::new(),
        };
        bytes::Bytes::from(novacron_types::encode(&t))
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        js.publish("nc.telemetry.host.s1", sample(0.95)).await.unwrap().await.unwrap();
        let moved = {
            let s = c.orchestrator.engine.state.read().unwrap();
            vms.iter().any(|v| s.vms[v].host.as_ref() != Some(&s1) && s.vms[v].status == VmStatus::Running)
        };
        if moved {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the hot host was never relieved");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = {
        let url = c.nats.url();
        let out = std::process::Command::new(BIN).args(["--nats", &url, "events", "-o", "json"]).output().unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let planned: Vec<&serde_json::Value> =
        events.as_array().unwrap().iter().filter(|e| e["kind"] == "VmMigrationPlanned").collect();
    assert_eq!(planned.len(), 1, "one VM moved, not both");
    let reason = planned[0]["payload"]["reason"].as_str().unwrap();
    assert!(reason.starts_with("rebalance: s1 at 95%") && reason.contains("expected"), "{reason}");
    c.cancel.cancel();
}
