//! The real agent code with the simulated driver, against a real nats-server.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use novacron_agent::driver::Driver;
use novacron_agent::sim::SimDriver;
use novacron_agent::{Agent, AgentConfig};
use novacron_eventlog::{Bus, BusConfig, EventLog};
use novacron_testkit::NatsServer;
use novacron_types::{
    Actor, Envelope, EventKind, Generation, HostId, IncarnationId, Report, ReportKind, Resources, StartVm, VmId, VmSpec,
};
use tokio_util::sync::CancellationToken;

/// The journal database at `path` (if an earlier agent of this test had it open, once it has
/// let go of it).
fn journal_db(path: &std::path::Path) -> sled::Db {
    novacron_agent::journal::open_when_released(path, Duration::from_secs(10)).unwrap()
}

async fn wait_for<F: Future<Output = bool>>(what: &str, mut cond: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs an agent until the returned token is cancelled.
fn run<D: Driver>(agent: Agent<D>) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    (cancel, tokio::spawn(async move { agent.run(c).await.unwrap() }))
}

struct Harness {
    server: NatsServer,
    bus: Bus,
    host: HostId,
    log: EventLog,
}

impl Harness {
    async fn new() -> Harness {
        let server = NatsServer::start().unwrap();
        let mut cfg = BusConfig::new(server.url(), "test");
        cfg.retry_initial_connect = true;
        let bus = Bus::connect(&cfg).await.unwrap();
        bus.provision(1).await.unwrap();
        let log = EventLog::open(bus.js.clone()).await.unwrap();
        Harness { server, bus, host: HostId::new("h1").unwrap(), log }
    }

    fn spawn_agent(&self, driver: SimDriver, db: &sled::Db) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        self.spawn_with(driver, db, |_| {})
    }

    fn spawn_with<D: Driver>(
        &self,
        driver: D,
        db: &sled::Db,
        tune: impl FnOnce(&mut AgentConfig),
    ) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        self.spawn_on(self.bus.clone(), driver, db, tune)
    }

    /// An agent on its own connection.
    fn spawn_on<D: Driver>(
        &self,
        bus: Bus,
        driver: D,
        db: &sled::Db,
        tune: impl FnOnce(&mut AgentConfig),
    ) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let mut cfg = self.config();
        tune(&mut cfg);
        run(Agent::new(cfg, bus, driver, db).unwrap())
    }

    /// The test host's configuration.
    fn config(&self) -> AgentConfig {
        AgentConfig::new(self.host.clone(), Resources { vcpus: 16, memory_mib: 32768, disk_gib: 0 })
    }

    /// A connection through a proxy that delays everything by `delay` each way.
    async fn slow_bus(&self, delay: Duration) -> (novacron_testkit::DelayProxy, Bus) {
        let upstream = std::net::SocketAddr::from(([127, 0, 0, 1], self.server.port()));
        let proxy = novacron_testkit::DelayProxy::start(upstream, delay).unwrap();
        let mut cfg = BusConfig::new(proxy.url(), "slow");
        cfg.request_timeout = Duration::from_secs(10);
        let bus = Bus::connect(&cfg).await.unwrap();
        (proxy, bus)
    }

    /// Starts a new VM on the host and waits until it runs.
    async fn start_running(&mut self, driver: &SimDriver) -> VmId {
        let vm = VmId::new_v7();
        self.log.append(&[self.start_cmd(vm, IncarnationId::new_v7(), 1)]).await.unwrap();
        wait_for("the VM running", || async { driver.running().iter().any(|r| r.vm == vm) }).await;
        vm
    }

    /// Waits for `n` renewals of the lease after revision `from`; returns the last revision.
    async fn renewals(&self, from: u64, n: usize) -> u64 {
        let mut revision = from;
        for _ in 0..n {
            revision = self.lease_held(revision).await;
        }
        revision
    }

    fn stop_cmd(&self, vm: VmId, incarnation: IncarnationId, generation: u64) -> Envelope {
        Envelope::new(
            2,
            Actor::Orchestrator("test".into()),
            EventKind::VmStopCommanded(novacron_types::StopVm {
                vm,
                host: self.host.clone(),
                incarnation,
                generation: Generation(generation),
                reason: "test".into(),
            }),
        )
    }

    fn start_cmd(&self, vm: VmId, incarnation: IncarnationId, generation: u64) -> Envelope {
        Envelope::new(
            1,
            Actor::Orchestrator("test".into()),
            EventKind::VmStartCommanded(StartVm {
                vm,
                host: self.host.clone(),
                incarnation,
                generation: Generation(generation),
                spec: VmSpec {
                    name: "web-1".into(),
                    vcpus: 2,
                    memory_mib: 2048,
                    disk_gib: 0,
                    group: None,
                    labels: Default::default(),
                    restart: Default::default(),
                    placement: Default::default(),
                },
            }),
        )
    }

    /// Appends this host's `HostRegistered`, as the orchestrator does when it folds the
    /// registration in (the agent sends telemetry only after that).
    async fn record_registration(&mut self) {
        let registered = Envelope::new(
            1,
            Actor::Orchestrator("test".into()),
            EventKind::HostRegistered(novacron_types::event::HostRegistered {
                host: self.host.clone(),
                capacity: Resources { vcpus: 16, memory_mib: 32768, disk_gib: 0 },
                labels: Default::default(),
                driver: "sim".into(),
            }),
        );
        self.log.append(&[registered]).await.unwrap();
    }

    /// How many commands the agent's consumer has finished with (acked or terminated).
    async fn commands_done(&self) -> u64 {
        let stream = self.bus.js.get_stream("COMMANDS").await.unwrap();
        match stream.consumer_info("agent-h1").await {
            Ok(info) => info.ack_floor.stream_sequence,
            Err(_) => 0,
        }
    }

    /// Makes every write to `stream` fail, or work again: what an overloaded server does to
    /// one stream while others still answer. Its largest message is set to one byte.
    async fn refuse_writes(&self, stream: &str, refuse: bool) {
        let mut config = self.bus.js.get_stream(stream).await.unwrap().info().await.unwrap().config.clone();
        config.max_message_size = if refuse { 1 } else { -1 };
        self.bus.js.update_stream(config).await.unwrap();
    }

    /// Waits until the agent holds a lease, and returns its revision.
    async fn lease_held(&self, newer_than: u64) -> u64 {
        let leases = self.bus.js.get_key_value(novacron_protocol::HOST_LEASE_BUCKET).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(e)) = leases.entry(self.host.as_str()).await
                && e.revision > newer_than
                && e.value.as_ref() == novacron_protocol::LEASE_HELD
            {
                return e.revision;
            }
            assert!(tokio::time::Instant::now() < deadline, "the agent never held a lease newer than {newer_than}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// How many commands the agent has been handed and not finished with.
    async fn commands_in_hand(&self) -> usize {
        let stream = self.bus.js.get_stream("COMMANDS").await.unwrap();
        stream.consumer_info("agent-h1").await.map_or(0, |i| i.num_ack_pending)
    }

    async fn reports(&self) -> Vec<Report> {
        let stream = self.bus.js.get_stream("REPORTS").await.unwrap();
        let mut out = Vec::new();
        let last = stream.clone().info().await.unwrap().state.last_sequence;
        for seq in 1..=last {
            if let Ok(m) = stream.get_raw_message(seq).await {
                out.push(rmp_serde::from_slice(&m.payload).unwrap());
            }
        }
        out
    }
}

fn running_reports(reports: &[Report]) -> usize {
    reports.iter().filter(|r| matches!(r.report, ReportKind::VmRunning(_))).count()
}

#[tokio::test]
async fn a_command_delivered_twice_is_applied_once() {
    let mut h = Harness::new().await;
    let dir = tempfile::tempdir().unwrap();
    let db = journal_db(dir.path());
    let driver = SimDriver::default();
    let (cancel, handle) = h.spawn_agent(driver.clone(), &db);

    let (vm, inc) = (VmId::new_v7(), IncarnationId::new_v7());
    let cmd = h.start_cmd(vm, inc, 1);
    h.log.append(&[cmd.clone(), h.stop_cmd(vm, inc, 1)]).await.unwrap();
    // The start again, as a redelivery would bring it (no message id, so JetStream stores it a
    // second time). Applying it again would resurrect the stopped VM.
    h.bus
        .js
        .send_publish(format!("nc.cmd.h1.{vm}"), PublishMessage::build().payload(novacron_types::encode(&cmd).into()))
        .await
        .unwrap()
        .await
        .unwrap();

    wait_for("all deliveries handled", || async { h.commands_done().await >= 3 }).await;
    assert_eq!(driver.start_count(inc), 1, "started exactly once");
    assert!(driver.running().is_empty(), "the stopped VM stays stopped");
    wait_for("the reports", || async { h.reports().await.len() >= 4 }).await;
    let reports = h.reports().await;
    assert_eq!(running_reports(&reports), 1);
    assert!(
        matches!(reports.last().unwrap().report, ReportKind::VmStopped(_)),
        "the duplicate re-reports the current state"
    );
    cancel.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn a_command_with_a_stale_generation_is_ignored() {
    let mut h = Harness::new().await;
    let dir = tempfile::tempdir().unwrap();
    let db = journal_db(dir.path());
    let driver = SimDriver::default();
    let (cancel, handle) = h.spawn_agent(driver.clone(), &db);

    let vm = VmId::new_v7();
    let (newer, older) = (IncarnationId::new_v7(), IncarnationId::new_v7());
    h.log.append(&[h.start_cmd(vm, newer, 2), h.start_cmd(vm, older, 1)]).await.unwrap();
    wait_for("both commands handled", || async { h.commands_done().await >= 2 }).await;

    assert_eq!(driver.start_count(newer), 1);
    assert_eq!(driver.start_count(older), 0, "generation 1 after generation 2 must be refused");
    let running = driver.running();
    assert_eq!(running.len(), 1);
    assert_eq!(running[0].incarnation, newer);
    cancel.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn an_agent_restarted_on_the_same_journal_does_not_start_a_vm_twice() {
    let mut h = Harness::new().await;
    let dir = tempfile::tempdir().unwrap();
    // The hypervisor outlives the agent process, as a real one does.
    let driver = SimDriver::default();
    let (vm, inc) = (VmId::new_v7(), IncarnationId::new_v7());
    {
        let db = journal_db(dir.path());
        let (cancel, handle) = h.spawn_agent(driver.clone(), &db);
        h.log.append(&[h.start_cmd(vm, inc, 1), h.stop_cmd(vm, inc, 1)]).await.unwrap();
        wait_for("the commands applied", || async { h.commands_done().await >= 2 }).await;
        cancel.cancel();
        handle.await.unwrap();
    }
    // Lose the consumer's ack state, so the restarted agent is handed the command again — the
    // worst case of a crash between applying and acknowledging.
    let stream = h.bus.js.get_stream("COMMANDS").await.unwrap();
    stream.delete_consumer("agent-h1").await.unwrap();

    let db = journal_db(dir.path());
    let (cancel, handle) = h.spawn_agent(driver.clone(), &db);
    wait_for("the redelivered commands handled", || async { h.commands_done().await >= 2 }).await;
    assert_eq!(driver.start_count(inc), 1, "the journal recognised the start");
    assert_eq!(driver.total_starts(), 1);
    assert!(driver.running().is_empty());
    cancel.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn an_agent_that_cannot_make_its_consumer_yet_keeps_trying_instead_of_going_deaf() {
    // A server without the streams: the agent's first attempts to make its command consumer
    // fail, as they do when thousands of agents start at once and overflow the server's API
    // queue.
    let server = NatsServer::start().unwrap();
    let bus = Bus::connect(&BusConfig::new(server.url(), "test")).await.unwrap();
    let host = HostId::new("h1").unwrap();
    let mut cfg = AgentConfig::new(host.clone(), Resources { vcpus: 4, memory_mib: 4096, disk_gib: 0 });
    cfg.provision = false;
    let dir = tempfile::tempdir().unwrap();
    let db = journal_db(dir.path());
    let driver = SimDriver::default();
    let agent = Agent::new(cfg, bus.clone(), driver.clone(), &db).unwrap();
    let cancel = CancellationToken::new();
    let handle = tokio::spawn(agent.run(cancel.clone()));
    wait_for("a refused attempt", || async { bus.js.query_account().await.unwrap().requests.errors > 0 }).await;
    assert!(!handle.is_finished(), "the agent gave up: {:?}", handle.await);

    bus.provision(1).await.unwrap();
    let mut log = EventLog::open(bus.js.clone()).await.unwrap();
    let (vm, inc) = (VmId::new_v7(), IncarnationId::new_v7());
    let h = Harness { server, bus: bus.clone(), host, log: EventLog::open(bus.js.clone()).await.unwrap() };
    log.append(&[h.start_cmd(vm, inc, 1)]).await.unwrap();
    wait_for("the command applied", || async { driver.start_count(inc) == 1 }).await;
    cancel.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_malformed_command_is_dead_lettered_and_the_agent_keeps_working() {
    let mut h = Harness::new().await;
    let dir = tempfile::tempdir().unwrap();
    let db = journal_db(dir.path());
    let driver = SimDriver::default();
    let (cancel, handle) = h.spawn_agent(driver.clone(), &db);

    h.bus.js.publish("nc.cmd.h1.garbage", "\u{1}not msgpack".into()).await.unwrap().await.unwrap();
    let (vm, inc) = (VmId::new_v7(), IncarnationId::new_v7());
    h.log.refresh_tail().await.unwrap();
    h.log.append(&[h.start_cmd(vm, inc, 1)]).await.unwrap();

    wait_for("the good command applied", || async { driver.start_count(inc) == 1 }).await;
    let dead = h.bus.js.get_stream("DEADLETTER").await.unwrap();
    wait_for("a dead letter", || async { dead.clone().info().await.unwrap().state.messages == 1 }).await;
    let msg = dead.get_raw_message(1).await.unwrap();
    assert_eq!(msg.subject.as_str(), "nc.deadletter.commands");
    assert!(msg.headers.get("Nc-Deadletter-Reason").unwrap().as_str().contains("MessagePack"));
    assert_eq!(msg.headers.get("Nc-Deadletter-Subject").unwrap().as_str(), "nc.cmd.h1.garbage", "as logged");
    cancel.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn after_a_server_restart_commands_resume_from_the_journals_cursor() {
    use async_nats::jetstream::consumer::DeliverPolicy;
    let mut h = Harness::new().await;
    let dir = tempfile::tempdir().unwrap();
    let db = journal_db(dir.path());
    let driver = SimDriver::default();
    let (cancel, handle) = h.spawn_agent(driver.clone(), &db);
    let (vm, inc) = (VmId::new_v7(), IncarnationId::new_v7());
    h.log.append(&[h.start_cmd(vm, inc, 1), h.stop_cmd(vm, inc, 1)]).await.unwrap();
    wait_for("the commands applied", || async { h.commands_done().await >= 2 }).await;
    let stream = h.bus.js.get_stream("COMMANDS").await.unwrap();
    let info = stream.consumer_info("agent-h1").await.unwrap();
    assert!(info.config.memory_storage, "the consumer's state is not rewritten to a file per flush");
    assert_eq!(info.config.filter_subject, "nc.hostcmd.h1", "one literal subject per host");

    // The server restarts on its store: the stream survives, the in-memory consumer does not.
    h.server.restart().unwrap();
    let (vm2, inc2) = (VmId::new_v7(), IncarnationId::new_v7());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let _ = h.log.refresh_tail().await;
        if h.log.append(&[h.start_cmd(vm2, inc2, 1)]).await.is_ok() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the log never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The agent checks its consumer when the client reconnects (else it would notice when its
    // pull stream misses the server's idle heartbeats, 15 s): allow for both.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while driver.start_count(inc2) != 1 {
        assert!(tokio::time::Instant::now() < deadline, "the command after the restart was never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The agent made its consumer again from where its journal says it was, not from the start.
    let stream = h.bus.js.get_stream("COMMANDS").await.unwrap();
    let info = stream.consumer_info("agent-h1").await.unwrap();
    assert_eq!(info.config.deliver_policy, DeliverPolicy::ByStartSequence { start_sequence: 3 });
    assert_eq!(driver.start_count(inc), 1, "nothing before the cursor ran again");
    assert_eq!(driver.running().len(), 1);
    cancel.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn an_agent_of_an_earlier_version_moves_from_events_to_commands_without_running_anything_twice() {
    use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
    use futures::StreamExt;
    let mut h = Harness::new().await;
    // What an earlier agent left: a file-stored consumer on EVENTS that has seen a start and a
    // stop through, and a journal that applied both and kept its cursor in EVENTS.
    let events = h.bus.js.get_stream("EVENTS").await.unwrap();
    let old = events
        .create_consumer(pull::Config {
            durable_name: Some("agent-h1".into()),
            filter_subject: "nc.cmd.h1.>".into(),
            ack_policy: AckPolicy::Explicit,
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap();
    let (vm, inc) = (VmId::new_v7(), IncarnationId::new_v7());
    let (start, stop) = (h.start_cmd(vm, inc, 1), h.stop_cmd(vm, inc, 1));
    let seqs = h.log.append(&[start.clone(), stop.clone()]).await.unwrap();
    let mut msgs = old.fetch().max_messages(2).messages().await.unwrap();
    for _ in 0..2 {
        msgs.next().await.unwrap().unwrap().double_ack().await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let db = journal_db(dir.path());
    {
        let journal = novacron_agent::journal::Journal::open(&db, &h.host).unwrap();
        let rec = novacron_agent::journal::JournalVm { incarnation: inc, generation: Generation(1), running: false };
        journal.record(start.id, seqs[0], vm, Some(&rec)).unwrap();
        journal.record(stop.id, seqs[1], vm, Some(&rec)).unwrap();
        let applied = db.open_tree(novacron_agent::journal::APPLIED_TREE).unwrap();
        applied.insert(b"h1/done", &seqs[1].to_be_bytes()).unwrap();
        assert!(journal.read_commands_from_events().unwrap());
    }

    let driver = SimDriver::default();
    let (cancel, handle) = h.spawn_agent(driver.clone(), &db);
    let (vm2, inc2) = (VmId::new_v7(), IncarnationId::new_v7());
    h.log.append(&[h.start_cmd(vm2, inc2, 1)]).await.unwrap();
    wait_for("the new command applied", || async { driver.start_count(inc2) == 1 }).await;
    wait_for("all three handled", || async { h.commands_done().await >= 3 }).await;
    assert_eq!(driver.start_count(inc), 0, "the journal recognised what the old consumer had handed");
    assert!(events.consumer_info("agent-h1").await.is_err(), "the consumer on EVENTS is removed");
    let journal = novacron_agent::journal::Journal::open(&db, &h.host).unwrap();
    assert!(!journal.read_commands_from_events().unwrap(), "the cursor in EVENTS is forgotten");
    let info = h.bus.js.get_stream("COMMANDS").await.unwrap().consumer_info("agent-h1").await.unwrap();
    assert!(info.config.memory_storage);
    assert_eq!(info.config.deliver_policy, DeliverPolicy::All, "the host's commands from the start");
    cancel.cancel();
    handle.await.unwrap();
}

fn failures(reports: &[Report]) -> Vec<String> {
    reports
        .iter()
        .filter_map(|r| match &r.report {
            ReportKind::VmFailed(f) => Some(f.reason.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn simulated_crashes_and_failed_starts_are_reported_as_failures() {
    let mut h = Harness::new().await;
    let dir = tempfile::tempdir().unwrap();
    let db = journal_db(dir.path());
    let driver = SimDriver::default();
    let (cancel, handle) = h.spawn_agent(driver.clone(), &db);

    let (vm, inc) = (VmId::new_v7(), IncarnationId::new_v7());
    h.log.append(&[h.start_cmd(vm, inc, 1)]).await.unwrap();
    wait_for("the VM running", || async { driver.start_count(inc) == 1 }).await;
    assert!(driver.crash(vm));
    wait_for("the crash reported", || async { failures(&h.reports().await).iter().any(|r| r == "simulated crash") })
        .await;

    driver.fail_next_starts(1);
    let (vm2, inc2) = (VmId::new_v7(), IncarnationId::new_v7());
    h.log.append(&[h.start_cmd(vm2, inc2, 1)]).await.unwrap();
    wait_for("the failed start reported", || async {
        failures(&h.reports().await).iter().any(|r| r.contains("simulated start failure"))
    })
    .await;
    assert_eq!(driver.start_count(inc2), 0);
    cancel.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn a_restarted_agent_adopts_survivors_and_reports_vms_that_died_meanwhile() {
    let mut h = Harness::new().await;
    let dir = tempfile::tempdir().unwrap();
    let (alive, alive_inc) = (VmId::new_v7(), IncarnationId::new_v7());
    let (dead, dead_inc) = (VmId::new_v7(), IncarnationId::new_v7());
    {
        let db = journal_db(dir.path());
        let driver = SimDriver::persistent(db.open_tree("sim-vms").unwrap(), b"h1/".to_vec());
        let (cancel, handle) = h.spawn_agent(driver.clone(), &db);
        h.log.append(&[h.start_cmd(alive, alive_inc, 1), h.start_cmd(dead, dead_inc, 1)]).await.unwrap();
        wait_for("both VMs running", || async { driver.running().len() == 2 }).await;
        cancel.cancel();
        handle.await.unwrap();
        // While no agent runs, one VM dies on the (simulated) hypervisor.
        assert!(driver.crash(dead));
    }
    let reports_before = h.reports().await.len();
    let db = journal_db(dir.path());
    let driver = SimDriver::persistent(db.open_tree("sim-vms").unwrap(), b"h1/".to_vec());
    let (cancel, handle) = h.spawn_agent(driver.clone(), &db);
    wait_for("the restart's reports", || async { h.reports().await.len() >= reports_before + 3 }).await;
    let reports = h.reports().await;
    let after = &reports[reports_before..];
    assert!(
        after.iter().any(|r| matches!(&r.report, ReportKind::VmRunning(v) if v.vm == alive)),
        "the survivor is adopted and reported running: {after:?}"
    );
    assert!(
        after
            .iter()
            .any(|r| matches!(&r.report, ReportKind::VmFailed(f) if f.vm == dead && f.reason.contains("not running"))),
        "the dead one is reported failed: {after:?}"
    );
    assert_eq!(driver.start_count(alive_inc), 0, "adopted, not started again");
    assert_eq!(driver.running().len(), 1);
    cancel.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn an_agent_declared_failed_fences_at_once_and_takes_a_fresh_lease() {
    let mut h = Harness::new().await;
    let dir = tempfile::tempdir().unwrap();
    let db = journal_db(dir.path());
    let driver = SimDriver::default();
    let mut heartbeats = h.bus.client.subscribe("nc.hb.h1").await.unwrap();
    let (cancel, handle) = h.spawn_with(driver.clone(), &db, |c| c.heartbeat_interval = Duration::from_millis(100));
    let (vm, inc) = (VmId::new_v7(), IncarnationId::new_v7());
    h.log.append(&[h.start_cmd(vm, inc, 1)]).await.unwrap();
    wait_for("the VM running", || async { driver.running().iter().any(|r| r.vm == vm) }).await;

    // Heartbeats carry the lease revision the agent holds.
    let leases = h.bus.js.get_key_value(novacron_protocol::HOST_LEASE_BUCKET).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        assert!(tokio::time::Instant::now() < deadline, "no heartbeat with a lease revision");
        let msg = tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut heartbeats))
            .await
            .unwrap()
            .unwrap();
        let hb: novacron_types::Heartbeat = rmp_serde::from_slice(&msg.payload).unwrap();
        if hb.lease_revision.is_some() {
            break;
        }
    }

    // The orchestrator's move, as it makes it: overwrite the revision the agent last wrote.
    let marked = loop {
        let entry = leases.entry("h1").await.unwrap().expect("the agent's lease");
        assert_eq!(entry.value.as_ref(), novacron_protocol::LEASE_HELD);
        if let Ok(rev) = leases.update("h1", novacron_protocol::LEASE_FAILED.into(), entry.revision).await {
            break rev;
        }
    };
    wait_for("the VM fenced and reported", || async {
        driver.running().is_empty()
            && failures(&h.reports().await).iter().any(|r| r.contains("the orchestrator declared this host failed"))
    })
    .await;
    wait_for("a fresh lease over the marker", || async {
        leases
            .entry("h1")
            .await
            .ok()
            .flatten()
            .is_some_and(|e| e.revision > marked && e.value.as_ref() == novacron_protocol::LEASE_HELD)
    })
    .await;
    cancel.cancel();
    handle.await.unwrap();
}

/// The lease's stream (writes to it are lease renewals and failure markers).
fn lease_stream() -> String {
    format!("KV_{}", novacron_protocol::HOST_LEASE_BUCKET)
}

/// Heartbeats with a 1-s lease.
fn short_lease(c: &mut AgentConfig) {
    c.heartbeat_interval = Duration::from_millis(100);
    c.lease = Duration::from_secs(1);
}

fn ran(reports: &[Report], vm: VmId) -> bool {
    reports.iter().any(|r| matches!(&r.report, ReportKind::VmRunning(v) if v.vm == vm))
}

#[tokio::test]
async fn a_vm_start_waits_while_the_lease_is_not_renewed() {
    let mut h = Harness::new().await;
    let dir = tempfile::tempdir().unwrap();
    let db = journal_db(dir.path());
    let driver = SimDriver::default();
    let (cancel, handle) = h.spawn_with(driver.clone(), &db, short_lease);
    let (vm1, vm2) = (VmId::new_v7(), VmId::new_v7());
    h.log.append(&[h.start_cmd(vm1, IncarnationId::new_v7(), 1)]).await.unwrap();
    wait_for("VM 1 running", || async { driver.running().iter().any(|r| r.vm == vm1) }).await;

    // Renewals fail while commands still arrive; the lease runs out and VM 1 is fenced.
    h.refuse_writes(&lease_stream(), true).await;
    wait_for("VM 1 fenced", || async { driver.running().is_empty() }).await;
    h.log.append(&[h.start_cmd(vm2, IncarnationId::new_v7(), 1)]).await.unwrap();
    wait_for("the start in the agent's hands", || async {
        h.commands_in_hand().await == 1 || !driver.running().is_empty()
    })
    .await;
    // A second's worth of heartbeats (the whole lease) later, VM 2 has not started.
    let mut heartbeats = h.bus.client.subscribe("nc.hb.h1").await.unwrap();
    for _ in 0..10 {
        tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut heartbeats)).await.unwrap();
    }
    assert!(driver.running().is_empty(), "a VM started without a lease");

    // Renewed: VM 2 starts, and VM 1 is reported as fenced.
    h.refuse_writes(&lease_stream(), false).await;
    wait_for("VM 2 running", || async { driver.running().iter().any(|r| r.vm == vm2) }).await;
    wait_for("VM 1 reported fenced", || async {
        failures(&h.reports().await).iter().any(|r| r.starts_with("self-fenced (killed): no lease renewal"))
    })
    .await;
    cancel.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn a_start_issued_before_the_host_was_declared_failed_never_runs() {
    let mut h = Harness::new().await;
    let dir = tempfile::tempdir().unwrap();
    let db = journal_db(dir.path());
    let driver = SimDriver::default();
    let (cancel, handle) = h.spawn_with(driver.clone(), &db, short_lease);
    let held = h.lease_held(0).await;
    cancel.cancel();
    handle.await.unwrap();

    // While the agent is away, the orchestrator starts a VM here, then declares the host
    // failed: it overwrites the lease revision the agent last held, and places the VM elsewhere.
    let stale = VmId::new_v7();
    let stale_incarnation = IncarnationId::new_v7();
    let stale_seq = h.log.append(&[h.start_cmd(stale, stale_incarnation, 1)]).await.unwrap()[0];
    let leases = h.bus.js.get_key_value(novacron_protocol::HOST_LEASE_BUCKET).await.unwrap();
    let current = leases.entry("h1").await.unwrap().unwrap().revision;
    assert!(current >= held);
    let marked = leases.update("h1", novacron_protocol::LEASE_FAILED.into(), current).await.unwrap();

    // The agent comes back, finds the marker, and takes a fresh lease; a VM started after
    // that runs, the stale one (handed over first) never did.
    let (cancel, handle) = h.spawn_with(driver.clone(), &db, short_lease);
    h.lease_held(marked).await;
    let fresh = VmId::new_v7();
    h.log.append(&[h.start_cmd(fresh, IncarnationId::new_v7(), 1)]).await.unwrap();
    wait_for("the VM started after the fresh lease running", || async {
        driver.running().iter().any(|r| r.vm == fresh)
    })
    .await;
    let reports = h.reports().await;
    assert!(ran(&reports, fresh));
    assert!(!ran(&reports, stale), "a start issued before the host was declared failed ran");
    assert_eq!(driver.start_count(stale_incarnation), 0, "started and fenced is still twice");
    // The refusal is reported (the orchestrator ignores it for a superseded incarnation).
    assert!(
        reports.iter().any(|r| matches!(&r.report, ReportKind::VmFailed(f)
            if f.vm == stale && f.reason.starts_with("start refused: issued before the orchestrator declared"))),
        "{:?}",
        failures(&reports)
    );
    cancel.cancel();
    handle.await.unwrap();

    // The journal keeps where the log ended when the host was declared failed, for a restart.
    let journal = novacron_agent::journal::Journal::open(&db, &h.host).unwrap();
    assert!(journal.fenced_through().unwrap() >= stale_seq);
}

#[tokio::test]
async fn a_vm_whose_lease_runs_out_while_it_starts_is_fenced_at_once() {
    let mut h = Harness::new().await;
    let dir = tempfile::tempdir().unwrap();
    let db = journal_db(dir.path());
    let driver = SimDriver::with_start_delay(Duration::from_secs(2));
    let (cancel, handle) = h.spawn_with(driver.clone(), &db, short_lease);
    h.lease_held(0).await;
    let vm = VmId::new_v7();
    h.log.append(&[h.start_cmd(vm, IncarnationId::new_v7(), 1)]).await.unwrap();
    wait_for("the start under way", || async { h.commands_in_hand().await == 1 }).await;
    // The lease runs out during the two-second start.
    h.refuse_writes(&lease_stream(), true).await;
    wait_for("the start answered", || async { h.commands_in_hand().await == 0 }).await;
    assert!(driver.running().is_empty());
    let reports = h.reports().await;
    assert!(!ran(&reports, vm), "reported running without a lease");
    assert!(
        failures(&reports).iter().any(|r| r == "self-fenced (killed): the lease ran out while the VM started"),
        "{:?}",
        failures(&reports)
    );
    cancel.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn the_lease_is_renewed_when_every_answer_takes_longer_than_a_heartbeat_period() {
    let mut h = Harness::new().await;
    // 150 ms each way: every request of the agent's waits 300 ms for its answer, three
    // heartbeat periods, and well inside the 3-s lease.
    let (_proxy, slow) = h.slow_bus(Duration::from_millis(150)).await;
    let dir = tempfile::tempdir().unwrap();
    let db = journal_db(dir.path());
    let driver = SimDriver::default();
    let (cancel, handle) = h.spawn_on(slow, driver.clone(), &db, |c| {
        c.heartbeat_interval = Duration::from_millis(100);
        c.lease = Duration::from_secs(3);
    });
    let vm = h.start_running(&driver).await;
    // Renewed about every second, four times over: more than a lease, and the VM runs on.
    h.renewals(0, 5).await;
    assert!(driver.running().iter().any(|r| r.vm == vm), "fenced although the lease was renewed");
    assert!(failures(&h.reports().await).is_empty());
    cancel.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn on_a_connection_of_its_own_the_lease_does_not_wait_for_a_slow_command_connection() {
    let mut h = Harness::new().await;
    // Commands and reports take 1.2 s a round trip, longer than the 1-s lease: a lease renewed
    // on that connection would never hold.
    let (_proxy, slow) = h.slow_bus(Duration::from_millis(600)).await;
    let dir = tempfile::tempdir().unwrap();
    let db = journal_db(dir.path());
    let driver = SimDriver::default();
    let mut cfg = h.config();
    short_lease(&mut cfg);
    cfg.provision = false; // the harness did; a dozen requests at 1.2 s each would only slow the start
    let (cancel, handle) = run(Agent::new(cfg, slow, driver.clone(), &db).unwrap().with_lease_bus(h.bus.clone()));
    let vm = h.start_running(&driver).await;
    // Renewed three times more (a lease's worth), and the VM runs on.
    h.renewals(0, 4).await;
    assert!(driver.running().iter().any(|r| r.vm == vm), "fenced although the lease was renewed");
    cancel.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn a_hosts_backlog_of_commands_waits_in_the_server_not_in_the_agent() {
    let mut h = Harness::new().await;
    let dir = tempfile::tempdir().unwrap();
    let db = journal_db(dir.path());
    let driver = SimDriver::with_start_delay(Duration::from_millis(100));
    let (cancel, handle) = h.spawn_with(driver.clone(), &db, |_| {});
    let starts: Vec<Envelope> = (0..40).map(|_| h.start_cmd(VmId::new_v7(), IncarnationId::new_v7(), 1)).collect();
    h.log.append(&starts).await.unwrap();
    let stream = h.bus.js.get_stream("COMMANDS").await.unwrap();
    let info = || async { stream.consumer_info("agent-h1").await.unwrap() };
    wait_for("the agent at work", || async { driver.running().len() >= 2 }).await;
    let now = info().await;
    assert!(now.num_ack_pending <= 8, "{} commands handed over at once", now.num_ack_pending);
    assert!(now.num_pending >= 20, "only {} left in the server", now.num_pending);
    wait_for("every VM running", || async { driver.running().len() == 40 }).await;
    cancel.cancel();
    handle.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_lease_lane_the_lease_is_renewed_while_the_agents_runtime_is_blocked() {
    let mut h = Harness::new().await;
    let lane = novacron_agent::LeaseLane::start(&BusConfig::new(h.server.url(), "lane")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = journal_db(dir.path());
    let driver = SimDriver::default();
    let mut cfg = h.config();
    short_lease(&mut cfg);
    let (cancel, handle) = run(Agent::new(cfg, h.bus.clone(), driver.clone(), &db).unwrap().with_lease_lane(&lane));
    let vm = h.start_running(&driver).await;
    let before = h.lease_held(0).await;

    // Both of the runtime's workers stuck for three leases, as in a journal flush on a slow disk.
    let both = std::sync::Arc::new(std::sync::Barrier::new(2));
    let stuck: Vec<_> = (0..2)
        .map(|_| {
            let both = both.clone();
            tokio::spawn(async move {
                both.wait();
                std::thread::sleep(Duration::from_secs(3));
            })
        })
        .collect();
    for s in stuck {
        s.await.unwrap();
    }
    let during = h.lease_held(0).await;
    assert!(during >= before + 4, "renewed {} times in three seconds", during - before);
    // And the VM was never fenced: the next renewals find it running.
    h.renewals(during, 2).await;
    assert!(driver.running().iter().any(|r| r.vm == vm), "fenced although the lease was renewed");
    cancel.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn fenced_vms_are_reported_without_holding_up_the_lease() {
    let mut h = Harness::new().await;
    let dir = tempfile::tempdir().unwrap();
    let db = journal_db(dir.path());
    let driver = SimDriver::default();
    let (cancel, handle) = h.spawn_with(driver.clone(), &db, short_lease);
    h.start_running(&driver).await;
    h.refuse_writes(&lease_stream(), true).await;
    wait_for("the VM fenced", || async { driver.running().is_empty() }).await;

    // The lease bucket answers again, the reports stream does not: the fence's report waits,
    // and the lease goes on being renewed meanwhile (heartbeats carry each new revision).
    h.refuse_writes("REPORTS", true).await;
    let mut heartbeats = h.bus.client.subscribe("nc.hb.h1").await.unwrap();
    h.refuse_writes(&lease_stream(), false).await;
    let mut revisions = std::collections::BTreeSet::new();
    while revisions.len() < 4 {
        let msg = tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut heartbeats))
            .await
            .expect("heartbeats stopped while a report waited")
            .unwrap();
        let hb: novacron_types::Heartbeat = rmp_serde::from_slice(&msg.payload).unwrap();
        revisions.extend(hb.lease_revision);
    }
    assert!(failures(&h.reports().await).is_empty(), "the reports stream took a report while refusing writes");
    h.refuse_writes("REPORTS", false).await;
    wait_for("the fenced VM reported", || async {
        failures(&h.reports().await).iter().any(|r| r.starts_with("self-fenced (killed): no lease renewal"))
    })
    .await;
    cancel.cancel();
    handle.await.unwrap();
}

#[test]
fn a_lease_that_does_not_end_before_the_host_failure_timeout_is_refused() {
    let mut cfg = AgentConfig::new(HostId::new("h1").unwrap(), Resources { vcpus: 1, memory_mib: 1, disk_gib: 0 });
    assert!(cfg.check().is_ok(), "the defaults keep the invariant");
    cfg.lease = Duration::from_millis(29_500);
    let err = cfg.check().unwrap_err();
    assert!(err.contains("host-failure timeout"), "{err}");
}

mod qemu {
    use novacron_agent::qemu::{QemuConfig, QemuDriver};

    use super::*;

    fn qemu_driver(dir: &std::path::Path) -> QemuDriver {
        let mut cfg = QemuConfig::detect(dir.join("q")).expect("QEMU must be installed (make tools)");
        cfg.powerdown_timeout = Duration::from_millis(300);
        QemuDriver::new(cfg)
    }

    fn tiny(h: &Harness, vm: VmId, inc: IncarnationId) -> Envelope {
        let mut e = h.start_cmd(vm, inc, 1);
        if let EventKind::VmStartCommanded(c) = &mut e.event {
            c.spec.vcpus = 1;
            c.spec.memory_mib = 64;
        }
        e
    }

    fn qemu_processes_of(vm: VmId) -> usize {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&format!("guest={vm}")))
            })
            .count()
    }

    #[tokio::test]
    async fn commands_start_and_stop_a_real_qemu_vm() {
        let mut h = Harness::new().await;
        let dir = tempfile::Builder::new().prefix("nca").tempdir_in("/tmp").unwrap();
        // QEMU runs daemonized: whatever this test leaves running is killed when it ends.
        let _reaper = novacron_testkit::ProcessReaper::new(dir.path());
        let db = journal_db(&dir.path().join("journal"));
        let driver = qemu_driver(dir.path());
        let (cancel, handle) = h.spawn_with(driver.clone(), &db, |c| c.telemetry_interval = Duration::from_millis(200));
        h.record_registration().await;
        let (vm, inc) = (VmId::new_v7(), IncarnationId::new_v7());
        h.log.append(&[tiny(&h, vm, inc)]).await.unwrap();
        wait_for("VmRunning from a real QEMU", || async {
            h.reports().await.iter().any(|r| matches!(&r.report, ReportKind::VmRunning(v) if v.vm == vm))
        })
        .await;
        assert_eq!(qemu_processes_of(vm), 1);
        assert_eq!(driver.qmp_status(vm).await.unwrap(), "running");
        let registration = h.reports().await.into_iter().find_map(|r| match r.report {
            ReportKind::HostRegistration(reg) => Some(reg),
            _ => None,
        });
        let accel = registration.unwrap().labels.get("accel").cloned().unwrap_or_default();
        assert!(accel == "kvm" || accel == "tcg", "acceleration reported at registration: {accel:?}");

        // Telemetry from the host side, in one message: the host's load, and the QEMU process's
        // RSS and QMP status.
        let telemetry = h.bus.js.get_stream("TELEMETRY").await.unwrap();
        let mut sample: Option<(novacron_types::HostTelemetry, novacron_types::telemetry::VmSample)> = None;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while sample.is_none() {
            assert!(tokio::time::Instant::now() < deadline, "no telemetry of the VM");
            if let Ok(m) = telemetry.get_last_raw_message_by_subject("nc.telemetry.host.h1").await {
                let host: novacron_types::HostTelemetry = rmp_serde::from_slice(&m.payload).unwrap();
                sample = host.vms.iter().find(|v| v.vm == vm).cloned().map(|v| (host, v));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (host_sample, vm_sample) = sample.unwrap();
        assert_eq!(vm_sample.status.as_deref(), Some("running"));
        assert!(vm_sample.memory_used_mib > 0, "{vm_sample:?}");
        assert!(host_sample.load1.is_some() && host_sample.memory_used_mib > 0, "{host_sample:?}");

        h.log.append(&[h.stop_cmd(vm, inc, 1)]).await.unwrap();
        wait_for("VmStopped", || async {
            h.reports().await.iter().any(|r| matches!(&r.report, ReportKind::VmStopped(v) if v.vm == vm))
        })
        .await;
        assert_eq!(qemu_processes_of(vm), 0);
        cancel.cancel();
        handle.await.unwrap();
    }

    #[tokio::test]
    async fn an_agent_cut_off_from_nats_longer_than_its_lease_stops_its_vms() {
        let mut h = Harness::new().await;
        let dir = tempfile::Builder::new().prefix("ncf").tempdir_in("/tmp").unwrap();
        // QEMU runs daemonized: whatever this test leaves running is killed when it ends.
        let _reaper = novacron_testkit::ProcessReaper::new(dir.path());
        let db = journal_db(&dir.path().join("journal"));
        let driver = qemu_driver(dir.path());
        let lease = Duration::from_millis(1500);
        let host_failure_timeout = Duration::from_secs(10);
        let (cancel, handle) = h.spawn_with(driver.clone(), &db, |c| {
            c.lease = lease;
            c.host_failure_timeout = host_failure_timeout;
        });
        let (vm, inc) = (VmId::new_v7(), IncarnationId::new_v7());
        h.log.append(&[tiny(&h, vm, inc)]).await.unwrap();
        wait_for("VmRunning reported", || async {
            h.reports().await.iter().any(|r| matches!(&r.report, ReportKind::VmRunning(v) if v.vm == vm))
        })
        .await;
        assert_eq!(qemu_processes_of(vm), 1);

        // The partition: the agent's NATS server goes away.
        h.server.kill();
        let cut = std::time::Instant::now();
        wait_for("the VM fenced", || async { qemu_processes_of(vm) == 0 }).await;
        let fenced_after = cut.elapsed();
        // The last renewal was at most one period before the cut; the VM must be dead within
        // the fence margin after the lease (what the orchestrator's timeout relies on).
        assert!(fenced_after >= lease - lease / 5, "fenced only once the lease ran out ({fenced_after:?})");
        assert!(
            fenced_after < lease + novacron_protocol::FENCE_MARGIN,
            "fenced {fenced_after:?} after the cut: later than lease {lease:?} + fence margin"
        );
        assert!(fenced_after < host_failure_timeout);

        // The bus comes back: the agent says what it did.
        h.server.restart().unwrap();
        wait_for("the fence reported", || async {
            failures(&h.reports().await).iter().any(|r| r.contains("self-fenced"))
        })
        .await;
        cancel.cancel();
        handle.await.unwrap();
    }
}

#[tokio::test]
async fn telemetry_waits_until_the_log_records_the_host() {
    use futures::StreamExt;
    let h = Harness::new().await;
    let telemetry = |bus: Bus| async move {
        let stream = bus.js.get_stream("TELEMETRY").await.unwrap();
        stream.clone().info().await.unwrap().state.messages
    };
    let mut beats = h.bus.client.subscribe("nc.hb.h1").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = journal_db(dir.path());
    let (cancel, _run) = h.spawn_with(SimDriver::default(), &db, |c| {
        c.telemetry_interval = Duration::from_millis(50);
        c.heartbeat_interval = Duration::from_millis(100);
    });
    // No orchestrator folds the registration: the agent renews its lease and heartbeats (three
    // beats: at least four telemetry periods), but sends no telemetry.
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(20), beats.next()).await.expect("a heartbeat").unwrap();
    }
    assert_eq!(telemetry(h.bus.clone()).await, 0, "telemetry before the host is in the log");

    // The registration is folded in (as the orchestrator would append it): telemetry starts.
    let mut h = h;
    h.record_registration().await;
    let bus = h.bus.clone();
    wait_for("telemetry once the host is in the log", || {
        let bus = bus.clone();
        async move { telemetry(bus).await > 0 }
    })
    .await;
    cancel.cancel();
}
