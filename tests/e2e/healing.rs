//! Host failure detection and healing end to end: the real orchestrator and agents, with
//! simulated hypervisors so that a host's "VMs" can be inspected and crashed.

use std::collections::BTreeMap;
use std::time::Duration;

use novacron_agent::driver::Driver;
use novacron_agent::sim::SimDriver;
use novacron_agent::{Agent, AgentConfig};
use novacron_eventlog::{Bus, BusConfig};
use novacron_orchestrator::decide::Origin;
use novacron_orchestrator::{Orchestrator, OrchestratorConfig};
use novacron_state::{ClusterState, HostState, VmStatus};
use novacron_testkit::NatsServer;
use novacron_types::{Actor, HostId, Resources, VmId, VmSpec};
use tokio_util::sync::CancellationToken;

const SUSPECT_AFTER: Duration = Duration::from_millis(300);
const LEASE: Duration = Duration::from_millis(500);
const FAILURE: Duration = Duration::from_secs(6);

struct Host {
    driver: SimDriver,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

struct Cluster {
    _nats: NatsServer,
    orchestrator: Orchestrator,
    bus: Bus,
    db: sled::Db,
    hosts: BTreeMap<String, Host>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start(names: &[&str]) -> Cluster {
        Cluster::start_with(names, None).await
    }

    async fn start_with(names: &[&str], risk_model: Option<novacron_predict::risk::RiskModel>) -> Cluster {
        let nats = NatsServer::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = OrchestratorConfig::new(nats.url(), dir.path().join("orch"));
        cfg.http = "127.0.0.1:0".parse().unwrap();
        cfg.reconcile_interval = Duration::from_millis(100);
        cfg.suspect_after = SUSPECT_AFTER;
        cfg.agent_lease = LEASE;
        cfg.host_failure_timeout = FAILURE;
        cfg.risk_model = risk_model;
        let orchestrator = Orchestrator::start(cfg, CancellationToken::new()).await.unwrap();
        let bus = Bus::connect(&BusConfig::new(nats.url(), "agents")).await.unwrap();
        let db = sled::open(dir.path().join("agents")).unwrap();
        let mut c = Cluster { _nats: nats, orchestrator, bus, db, hosts: BTreeMap::new(), _dir: dir };
        for n in names {
            c.start_agent(n, SimDriver::default());
        }
        let count = names.len();
        c.wait("hosts registered", |s| s.hosts.len() == count).await;
        c
    }

    fn start_agent(&mut self, name: &str, driver: SimDriver) {
        let mut cfg =
            AgentConfig::new(HostId::new(name).unwrap(), Resources { vcpus: 8, memory_mib: 8192, disk_gib: 0 });
        cfg.heartbeat_interval = Duration::from_millis(100);
        cfg.lease = LEASE;
        cfg.host_failure_timeout = FAILURE;
        let agent = Agent::new(cfg, self.bus.clone(), driver.clone(), &self.db).unwrap();
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        let task = tokio::spawn(async move {
            let _ = agent.run(c).await;
        });
        self.hosts.insert(name.to_owned(), Host { driver, cancel, task });
    }

    /// The agent stops (its heartbeats with it); returns its hypervisor, whose VMs live on.
    async fn stop_agent(&mut self, name: &str) -> SimDriver {
        let h = self.hosts.remove(name).unwrap();
        h.cancel.cancel();
        let _ = h.task.await;
        h.driver
    }

    fn state(&self) -> ClusterState {
        self.orchestrator.engine.state.read().unwrap().clone()
    }

    async fn wait(&self, what: &str, mut cond: impl FnMut(&ClusterState) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if cond(&self.orchestrator.engine.state.read().unwrap()) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn running_vms(&self, n: usize) -> Vec<VmId> {
        let mut ids = Vec::new();
        for i in 0..n {
            let spec = VmSpec {
                name: format!("vm-{i}"),
                vcpus: 2,
                memory_mib: 512,
                disk_gib: 0,
                group: None,
                labels: Default::default(),
                restart: Default::default(),
                placement: Default::default(),
            };
            let origin = Origin { actor: Actor::User("test".into()), correlation: None };
            let view = self.orchestrator.engine.create_vm(spec, origin).await.unwrap();
            ids.push(view.id.parse().unwrap());
        }
        let want = ids.clone();
        self.wait("the VMs running", move |s| want.iter().all(|v| s.vms[v].status == VmStatus::Running)).await;
        ids
    }

    /// How many hypervisors (including stopped agents' ones passed in) run each VM.
    fn copies(&self, extra: &[&SimDriver], vm: VmId) -> usize {
        self.hosts
            .values()
            .map(|h| &h.driver)
            .chain(extra.iter().copied())
            .filter(|d| d.running().iter().any(|r| r.vm == vm))
            .count()
    }
}

fn host(s: &str) -> HostId {
    HostId::new(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_hosts_vms_run_elsewhere_with_a_new_generation_and_nothing_runs_twice() {
    let mut c = Cluster::start(&["h1", "h2", "h3"]).await;
    let vms = c.running_vms(3).await;
    assert!(vms.iter().all(|v| c.state().vms[v].host == Some(host("h1"))), "first fit fills h1");

    // h1 dies: the machine and its VMs with it.
    let dead = c.stop_agent("h1").await;
    dead.crash_all();
    c.wait("h1 suspected", |s| s.hosts[&host("h1")].state == HostState::Suspect).await;
    c.wait("h1's VMs running elsewhere", |s| {
        s.hosts[&host("h1")].state == HostState::Failed
            && vms.iter().all(|v| {
                let r = &s.vms[v];
                r.status == VmStatus::Running && r.host != Some(host("h1")) && r.generation.0 == 2
            })
    })
    .await;
    for v in &vms {
        assert_eq!(c.copies(&[&dead], *v), 1, "VM {v} runs exactly once");
    }
    let s = c.state();
    assert_eq!(s.hosts[&host("h1")].allocated, Resources::ZERO);
    assert!(s.hosts[&host("h1")].vms.is_empty());
    // The failure was declared by overwriting h1's lease, which its agent can no longer renew.
    let leases = c.bus.js.get_key_value(novacron_protocol::HOST_LEASE_BUCKET).await.unwrap();
    let entry = leases.entry("h1").await.unwrap().expect("h1's lease");
    assert_eq!(entry.value.as_ref(), novacron_protocol::LEASE_FAILED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_risk_model_new_vms_keep_off_a_host_that_just_failed() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/models/failure-risk.json");
    let model = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut c = Cluster::start_with(&["h1", "h2", "h3"], Some(model)).await;
    // h1 fails and comes back.
    let driver = c.stop_agent("h1").await;
    c.wait("h1 failed", |s| s.hosts[&host("h1")].state == HostState::Failed).await;
    c.start_agent("h1", driver);
    c.wait("h1 ready again", |s| s.hosts[&host("h1")].state == HostState::Ready).await;
    assert_eq!(c.state().hosts[&host("h1")].failures_ms.len(), 1, "the log remembers the failure");
    // Bin-packing on empty hosts would take h1 (the lowest id, as in the test above); its
    // failure history sends the VM to h2 (the explanation's `failure_risk` component is
    // checked in the planner's and the reconciler's tests).
    let vm = c.running_vms(1).await[0];
    assert_eq!(c.state().vms[&vm].host, Some(host("h2")));
    // Operators see it in the hosts API (and `host list`, the dashboard).
    let api = format!("http://{}", c.orchestrator.http_addr);
    let (status, hosts) =
        tokio::task::spawn_blocking(move || crate::harness::get(&api, "/api/v1/hosts")).await.unwrap();
    assert_eq!(status, 200);
    let risk =
        |h: &str| hosts.as_array().unwrap().iter().find(|v| v["id"] == h).unwrap()["failure_risk"].as_f64().unwrap();
    assert!(risk("h1") > risk("h2"), "{hosts}");
    assert_eq!(hosts[0]["failures"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_stored_telemetry_consumer_of_an_earlier_version_is_made_again_in_memory() {
    use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
    let nats = NatsServer::start().unwrap();
    let bus = Bus::connect(&BusConfig::new(nats.url(), "old")).await.unwrap();
    bus.provision(1).await.unwrap();
    let name = format!("{}-orchestrator-1", novacron_protocol::ORCHESTRATOR_TELEMETRY_CONSUMER);
    let stream = bus.js.get_stream(novacron_protocol::TELEMETRY_STREAM).await.unwrap();
    stream
        .create_consumer(pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: "nc.telemetry.>".into(),
            ack_policy: AckPolicy::None,
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = OrchestratorConfig::new(nats.url(), dir.path().join("orch"));
    cfg.http = "127.0.0.1:0".parse().unwrap();
    let _o = Orchestrator::start(cfg, CancellationToken::new()).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !stream.consumer_info(&name).await.is_ok_and(|i| i.config.memory_storage) {
        assert!(tokio::time::Instant::now() < deadline, "the telemetry consumer is still file-stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_renews_its_lease_is_not_failed_though_its_heartbeats_are_lost() {
    let c = Cluster::start(&["h1", "h2"]).await;
    // h3's heartbeats never arrive (as if dropped on the way), but its agent is alive and
    // renews its lease.
    let mut cfg = AgentConfig::new(host("h3"), Resources { vcpus: 8, memory_mib: 8192, disk_gib: 0 });
    cfg.heartbeats = false;
    cfg.lease = LEASE;
    cfg.host_failure_timeout = FAILURE;
    let agent = Agent::new(cfg, c.bus.clone(), SimDriver::default(), &c.db).unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let cancel = cancel.clone();
        async move {
            let _ = agent.run(cancel).await;
        }
    });
    c.wait("h3 suspected", |s| s.hosts.get(&host("h3")).is_some_and(|h| h.state == HostState::Suspect)).await;
    // At the failure timeout the detector tries to overwrite the lease, finds it renewed, and
    // counts the host as heard from: it comes back to ready instead of failing.
    c.wait("h3 ready again", |s| s.hosts[&host("h3")].state == HostState::Ready).await;
    let leases = c.bus.js.get_key_value(novacron_protocol::HOST_LEASE_BUCKET).await.unwrap();
    let entry = leases.entry("h3").await.unwrap().expect("h3's lease");
    assert_eq!(entry.value.as_ref(), novacron_protocol::LEASE_HELD, "never marked failed");
    cancel.cancel();
    let _ = task.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_returns_during_suspicion_keeps_its_vms() {
    let mut c = Cluster::start(&["h1", "h2"]).await;
    let vms = c.running_vms(2).await;
    let driver = c.stop_agent("h1").await;
    c.wait("h1 suspected", |s| s.hosts[&host("h1")].state == HostState::Suspect).await;
    c.start_agent("h1", driver);
    c.wait("h1 ready again", |s| s.hosts[&host("h1")].state == HostState::Ready).await;
    let s = c.state();
    for v in &vms {
        assert_eq!((s.vms[v].host.clone(), s.vms[v].generation.0), (Some(host("h1")), 1), "not moved");
        assert_eq!(c.copies(&[], *v), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healing_pauses_when_most_hosts_go_silent_at_once() {
    let mut c = Cluster::start(&["h1", "h2", "h3"]).await;
    let vms = c.running_vms(2).await;
    let d1 = c.stop_agent("h1").await;
    let d2 = c.stop_agent("h2").await;
    c.wait("healing paused", |s| s.healing_paused).await;
    // Throughout a whole failure timeout and more, nobody is failed and nothing moves.
    let until = tokio::time::Instant::now() + FAILURE + Duration::from_secs(1);
    while tokio::time::Instant::now() < until {
        let s = c.state();
        assert!(s.hosts.values().all(|h| h.state != HostState::Failed), "a host was failed while healing was paused");
        assert!(vms.iter().all(|v| s.vms[v].generation.0 == 1));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.start_agent("h1", d1);
    c.start_agent("h2", d2);
    c.wait("healing resumed, hosts ready", |s| {
        !s.healing_paused && s.hosts.values().all(|h| h.state == HostState::Ready)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_host_that_did_not_fence_has_its_superseded_vms_stopped() {
    let mut c = Cluster::start(&["h1", "h2", "h3"]).await;
    let vms = c.running_vms(2).await;
    // h1's agent dies but its VMs live on (no fencing happened): the second line of defence.
    let survivor = c.stop_agent("h1").await;
    c.wait("healed onto other hosts", |s| {
        vms.iter().all(|v| s.vms[v].status == VmStatus::Running && s.vms[v].host != Some(host("h1")))
    })
    .await;
    assert_eq!(survivor.running().len(), 2, "the old copies still run on h1");
    c.start_agent("h1", survivor.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !survivor.running().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "h1 kept its superseded copies");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.wait("h1 ready", |s| s.hosts[&host("h1")].state == HostState::Ready).await;
    for v in &vms {
        assert_eq!(c.copies(&[], *v), 1, "VM {v} runs exactly once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_vm_is_restarted_with_backoff_moved_and_finally_given_up() {
    let nats = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = OrchestratorConfig::new(nats.url(), dir.path().join("orch"));
    cfg.http = "127.0.0.1:0".parse().unwrap();
    cfg.reconcile_interval = Duration::from_millis(50);
    cfg.restart = novacron_orchestrator::decide::RestartTimings {
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_secs(1),
        max_restarts: 3,
        window: Duration::from_secs(600),
    };
    let orchestrator = Orchestrator::start(cfg, CancellationToken::new()).await.unwrap();
    let bus = Bus::connect(&BusConfig::new(nats.url(), "agents")).await.unwrap();
    let db = sled::open(dir.path().join("agents")).unwrap();
    let mut drivers = BTreeMap::new();
    for name in ["h1", "h2"] {
        let driver = SimDriver::default();
        let cfg = AgentConfig::new(HostId::new(name).unwrap(), Resources { vcpus: 8, memory_mib: 8192, disk_gib: 0 });
        tokio::spawn(Agent::new(cfg, bus.clone(), driver.clone(), &db).unwrap().run(CancellationToken::new()));
        drivers.insert(name, driver);
    }
    wait_state(&orchestrator, "two hosts", |s| s.hosts.len() == 2).await;
    let spec = VmSpec {
        name: "crashy".into(),
        vcpus: 1,
        memory_mib: 256,
        disk_gib: 0,
        group: None,
        labels: Default::default(),
        restart: Default::default(),
        placement: Default::default(),
    };
    let origin = Origin { actor: Actor::User("test".into()), correlation: None };
    let vm: VmId = orchestrator.engine.create_vm(spec, origin).await.unwrap().id.parse().unwrap();

    // Crash it every time it runs: generation 1 and 2 on h1, then it is moved to h2.
    let mut hosts_seen = Vec::new();
    for generation in 1..=4u64 {
        wait_state(&orchestrator, "the VM running", |s| {
            s.vms[&vm].status == VmStatus::Running && s.vms[&vm].generation.0 == generation
        })
        .await;
        let h = orchestrator.engine.state.read().unwrap().vms[&vm].host.clone().unwrap();
        hosts_seen.push(h.to_string());
        assert!(drivers[h.as_str()].crash(vm), "the VM runs where the log says");
    }
    assert_eq!(hosts_seen, ["h1", "h1", "h2", "h2"], "moved after two failures on h1");
    wait_state(&orchestrator, "given up", |s| s.vms[&vm].gave_up).await;
    let s = orchestrator.engine.state.read().unwrap().clone();
    assert_eq!(s.vms[&vm].status, VmStatus::Failed);
    assert_eq!(s.vms[&vm].failures.len(), 4);
    assert!(drivers.values().all(|d| d.running().is_empty()), "nothing runs after giving up");
}

async fn wait_state(o: &Orchestrator, what: &str, cond: impl Fn(&ClusterState) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !cond(&o.engine.state.read().unwrap()) {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
