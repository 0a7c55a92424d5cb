//! NovaCron's per-host agent.
//!
//! An agent registers its host, sends heartbeats and host telemetry, and consumes the commands
//! addressed to its host (logged as `nc.cmd.<host>.<vm>` in EVENTS, read from the server's copy
//! in COMMANDS under `nc.hostcmd.<host>`, through a durable pull consumer named
//! `agent-<host>`). Each command is applied **once**: its event id is recorded in the local
//! [`journal`] in the same transaction as the VM's new record, and the journal is
//! flushed before the command is acknowledged. A redelivered command is recognised and only
//! re-reported; a command whose generation is older than the newest the journal has seen for
//! that VM is refused (fencing off decisions made before a re-placement). A command that
//! starts a VM waits until the agent's fencing lease holds, and is refused if it was issued
//! before the orchestrator last declared the host failed (see the `fencing` module).
//!
//! The agent drives VMs through a [`driver::Driver`]: [`sim::SimDriver`] here (many hosts per
//! process), a QEMU driver in the agent issue. The code around the driver is the same for both.
//!
//! ```text
//!  command ─► decode ─► for this host? ─► applied before? ─► stale generation? ─► driver
//!     │ bad: dead letter + term            │ yes: re-report    │ yes: record, ignore
//!     ▼                                                         ▼
//!   ack ◄─ report (nc.report.<host>, acked by JetStream) ◄─ journal (flushed)
//! ```

pub mod driver;
mod fencing;
pub mod journal;
pub mod metrics;
pub mod qemu;
mod reconcile;
pub mod sim;

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::stream::ConsumerErrorKind;
use async_nats::jetstream::{AckKind, Message};
use bytes::Bytes;
use futures::StreamExt;
use novacron_eventlog::{Bus, DeadLetters, decode_event, now_ms};
use novacron_protocol as proto;
use novacron_types::event::{
    VmFailed, VmIncarnationReport, VmMigrationCompleted, VmMigrationFailed, VmMigrationIncomingReady,
};
use novacron_types::report::HostRegistration;
use novacron_types::telemetry::{HostTelemetry, VmSample};
use novacron_types::{
    AgentCommand, ContentType, EventId, HostId, Labels, Report, ReportId, ReportKind, Resources, SCHEMA_VERSION, VmId,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::driver::Driver;
use crate::journal::{Journal, JournalError, JournalVm};
use crate::metrics as m;

/// How an agent is set up.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The host it manages.
    pub host: HostId,
    /// What the host offers to VMs.
    pub capacity: Resources,
    /// The host's labels.
    pub labels: Labels,
    /// Heartbeat period (default 1 s; at most a third of the lease is used). Each heartbeat
    /// carries the revision of the last lease renewal; the lease is renewed on the last tick
    /// before a third of it has passed (every 3 s with the defaults), and a period after a
    /// renewal that failed. Heartbeats do not wait for a renewal under way.
    pub heartbeat_interval: Duration,
    /// Publish heartbeats (default). Off only to simulate heartbeats lost on the way (tests):
    /// the lease is still renewed.
    pub heartbeats: bool,
    /// Host telemetry period (default 10 s).
    pub telemetry_interval: Duration,
    /// Stream replicas to provision with (1 single server, 3 cluster).
    pub replicas: usize,
    /// Whether the agent provisions the streams and buckets itself at start (a fleet of
    /// simulated hosts in one process does it once for all of them).
    pub provision: bool,
    /// How long the agent may be cut off from the bus before it fences its VMs (default 10 s).
    pub lease: Duration,
    /// What fencing does to the VMs.
    pub fence_action: FenceAction,
    /// The orchestrator's host-failure timeout (default 30 s): the lease must end, and the VMs
    /// be fenced, strictly before it.
    pub host_failure_timeout: Duration,
}

/// What an agent does to its VMs when it fences itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceAction {
    /// Stop them (the default: nothing can run twice).
    Stop,
    /// Pause them; they stay paused until the orchestrator decides (resume by a start of the
    /// same incarnation, or stop).
    Pause,
}

impl FenceAction {
    /// What happened to a fenced VM, for its `VmFailed` reason.
    fn done(self) -> &'static str {
        match self {
            FenceAction::Stop => "killed",
            FenceAction::Pause => "paused",
        }
    }
}

/// How often a long-running command tells JetStream it is still being worked on (well inside
/// the consumer's 10 s ack wait).
const COMMAND_PROGRESS_EVERY: Duration = Duration::from_secs(3);

/// Commands a host's consumer asks for at a time (the client's default is 200). A host
/// applies them one by one, so a few are enough; a backlog waits in the server's stream, not
/// in this process: with 200 each, a 10,000-host fleet behind on its commands held up to
/// two million of them in memory (14 GiB in one overloaded run).
const COMMAND_BATCH: usize = 8;

pub use novacron_protocol::FENCE_MARGIN;

impl AgentConfig {
    /// Defaults for a host with this capacity.
    #[must_use]
    pub fn new(host: HostId, capacity: Resources) -> Self {
        AgentConfig {
            host,
            capacity,
            labels: Labels::new(),
            heartbeat_interval: Duration::from_secs(1),
            heartbeats: true,
            telemetry_interval: Duration::from_secs(10),
            replicas: 1,
            provision: true,
            lease: proto::DEFAULT_AGENT_LEASE,
            fence_action: FenceAction::Stop,
            host_failure_timeout: proto::DEFAULT_HOST_FAILURE_TIMEOUT,
        }
    }

    /// Checks the timing invariant: `lease + FENCE_MARGIN < host_failure_timeout`.
    ///
    /// # Errors
    /// A message naming both values and the margin.
    pub fn check(&self) -> Result<(), String> {
        proto::check_fencing(self.lease, self.host_failure_timeout)
    }
}

/// What stops an agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration breaks an invariant.
    #[error("agent for host {host}: {reason}")]
    Config {
        /// The host.
        host: HostId,
        /// What is wrong.
        reason: String,
    },
    /// The bus could not be set up.
    #[error("agent for host {host}: bus")]
    Bus {
        /// The host.
        host: HostId,
        /// Why.
        #[source]
        source: novacron_eventlog::BusError,
    },
    /// The command consumer could not be created.
    #[error("agent for host {host}: cannot create the command consumer")]
    Consumer {
        /// The host.
        host: HostId,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The journal failed.
    #[error("agent for host {host}: journal")]
    Journal {
        /// The host.
        host: HostId,
        /// Why.
        #[source]
        source: JournalError,
    },
}

/// One host's agent.
pub struct Agent<D: Driver> {
    cfg: AgentConfig,
    bus: Bus,
    driver: D,
    journal: Journal,
    dead_letters: DeadLetters,
    /// Commands handed over but not yet handled (negatively acknowledged, to be retried): the
    /// journal's cursor stays below the lowest.
    unfinished: std::sync::Mutex<std::collections::BTreeSet<u64>>,
    /// The lease as the fence loop last saw it, for the commands that start VMs.
    lease_view: tokio::sync::watch::Sender<fencing::LeaseView>,
    /// The connection for heartbeats and the lease ([`Agent::with_lease_bus`]).
    lease_bus: Bus,
    /// The runtime the fence loop runs on ([`Agent::with_lease_lane`]); `None`: the caller's.
    lease_runtime: Option<tokio::runtime::Handle>,
}

impl<D: Driver> Agent<D> {
    /// An agent for `cfg.host`, journaling into `db`.
    ///
    /// # Errors
    /// When the journal's trees cannot be opened.
    pub fn new(cfg: AgentConfig, bus: Bus, driver: D, db: &sled::Db) -> Result<Self, AgentError> {
        cfg.check().map_err(|reason| AgentError::Config { host: cfg.host.clone(), reason })?;
        let journal =
            Journal::open(db, &cfg.host).map_err(|source| AgentError::Journal { host: cfg.host.clone(), source })?;
        let dead_letters = DeadLetters::new(bus.js.clone());
        let fenced_through =
            journal.fenced_through().map_err(|source| AgentError::Journal { host: cfg.host.clone(), source })?;
        // Not held until the fence loop's first renewal: a restarted agent learns that way
        // whether it was declared failed meanwhile, before any queued start runs.
        let lease_view = tokio::sync::watch::Sender::new(fencing::LeaseView { until: None, fenced_through });
        let lease_bus = bus.clone();
        Ok(Agent {
            cfg,
            bus,
            driver,
            journal,
            dead_letters,
            unfinished: Default::default(),
            lease_view,
            lease_bus,
            lease_runtime: None,
        })
    }

    /// Sends heartbeats and renews the lease on `bus` (by default the agent's one connection).
    /// A connection of their own keeps them from queueing behind the commands, acks and
    /// reports of a busy host — or of thousands of simulated ones — in the client's and the
    /// server's buffers.
    #[must_use]
    pub fn with_lease_bus(mut self, bus: Bus) -> Self {
        self.lease_bus = bus;
        self
    }

    /// Heartbeats and the lease on a [`LeaseLane`]: its connection, and its thread.
    #[must_use]
    pub fn with_lease_lane(mut self, lane: &LeaseLane) -> Self {
        self.lease_bus = lane.bus.clone();
        self.lease_runtime = Some(lane.runtime.clone());
        self
    }

    /// Runs until `cancel` fires: registers, then heartbeats, telemetry and commands.
    ///
    /// # Errors
    /// When the bus or the consumer cannot be set up. Per-command trouble never stops it.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), AgentError> {
        let host = self.cfg.host.clone();
        if self.cfg.provision {
            self.bus
                .provision(self.cfg.replicas)
                .await
                .map_err(|source| AgentError::Bus { host: host.clone(), source })?;
        }
        let Some(consumer) = self.first_consumer(&cancel).await? else { return Ok(()) };

        // What outlived the previous agent, settled against the journal before anything else.
        let running = self.driver.adopt().await;
        let settled = self
            .reconcile_at_start(&running)
            .await
            .map_err(|source| AgentError::Journal { host: host.clone(), source })?;

        let mut labels = self.driver.host_labels();
        labels.extend(self.cfg.labels.clone());
        let registration = ReportKind::HostRegistration(HostRegistration {
            capacity: self.cfg.capacity,
            labels,
            driver: self.driver.name().to_owned(),
        });
        if !self.report(registration, &cancel).await {
            return Ok(());
        }
        tracing::info!(%host, driver = self.driver.name(), adopted = running.len(), "agent registered");
        for report in settled {
            if !self.report(report, &cancel).await {
                return Ok(());
            }
        }

        let tracker = TaskTracker::new();
        let agent = std::sync::Arc::new(self);
        tracker.spawn(agent.clone().telemetry_loop(cancel.clone()));
        tracker.spawn(agent.clone().exit_watcher(cancel.clone()));
        match &agent.lease_runtime {
            Some(lane) => tracker.spawn_on(agent.clone().fence_loop(cancel.clone()), lane),
            None => tracker.spawn(agent.clone().fence_loop(cancel.clone())),
        };
        agent.command_loop(consumer, cancel.clone()).await;
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
        // The VMs keep running; the next agent adopts them.
        agent.driver.detach();
        tracing::info!(%host, "agent stopped");
        Ok(())
    }

    /// The command consumer at start, retried with backoff while the server does not answer:
    /// a fleet of thousands starting at once can outrun the server's API queue, and an agent
    /// that gave up here would leave its host registered but deaf. `None` when cancelled.
    async fn first_consumer(&self, cancel: &CancellationToken) -> Result<Option<PullConsumer>, AgentError> {
        let host = &self.cfg.host;
        let mut delay = Duration::from_millis(200);
        // Spread the retries of many hosts over time instead of having them return together.
        let spread = 0.5 + f64::from(host.as_str().bytes().fold(0u8, u8::wrapping_add)) / 255.0;
        let mut attempt = 0u64;
        loop {
            attempt += 1;
            match self.command_consumer().await {
                Ok(c) => return Ok(Some(c)),
                Err(AgentError::Consumer { source, .. }) => {
                    if attempt == 1 || attempt.is_multiple_of(10) {
                        tracing::warn!(%host, attempt, error = %source, "cannot create the command consumer yet; retrying");
                    }
                }
                Err(e) => return Err(e),
            }
            tokio::select! {
                () = cancel.cancelled() => return Ok(None),
                () = tokio::time::sleep(delay.mul_f64(spread)) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// The host's command consumer on [`proto::COMMANDS_STREAM`]: the server's if it has one,
    /// else a new one from the journal's cursor. Its state is kept in memory — a file per
    /// consumer, rewritten on every state flush, costs a busy server more than all the
    /// commands — so a server restart loses it, and the journal's cursor says where to resume.
    async fn command_consumer(&self) -> Result<PullConsumer, AgentError> {
        let host = &self.cfg.host;
        let err = |e: Box<dyn std::error::Error + Send + Sync>| AgentError::Consumer { host: host.clone(), source: e };
        let journal = |source| AgentError::Journal { host: host.clone(), source };
        // No stream info: thousands of agents asking for it at once would fill the server's
        // API queue, and the consumer calls below say what they need.
        let stream = self.bus.js.get_stream_no_info(proto::COMMANDS_STREAM).await.map_err(|e| err(Box::new(e)))?;
        let name = proto::agent_consumer_name(host);
        if let Ok(consumer) = stream.get_consumer::<pull::Config>(&name).await {
            return Ok(consumer);
        }
        if self.journal.read_commands_from_events().map_err(journal)? {
            self.leave_events().await?;
        }
        let cursor = self.journal.cursor().map_err(journal)?;
        stream
            .create_consumer(pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: proto::host_delivery_subject(host),
                ack_policy: AckPolicy::Explicit,
                // A command in flight to a crashed agent comes back after this; the journal
                // makes the redelivery harmless.
                ack_wait: Duration::from_secs(10),
                deliver_policy: if cursor == 0 {
                    DeliverPolicy::All
                } else {
                    DeliverPolicy::ByStartSequence { start_sequence: cursor + 1 }
                },
                max_ack_pending: 1024,
                memory_storage: true,
                ..Default::default()
            })
            .await
            .map_err(|e| err(Box::new(e)))
    }

    /// An earlier version read this host's commands from EVENTS: removes its consumer there and
    /// its cursor (a sequence of EVENTS, meaningless in COMMANDS). The new consumer then reads
    /// the host's commands in COMMANDS from the start, and the journal recognises every one
    /// already applied.
    async fn leave_events(&self) -> Result<(), AgentError> {
        let host = &self.cfg.host;
        let events = self
            .bus
            .js
            .get_stream_no_info(proto::EVENTS_STREAM)
            .await
            .map_err(|e| AgentError::Consumer { host: host.clone(), source: Box::new(e) })?;
        match events.delete_consumer(&proto::agent_consumer_name(host)).await {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ConsumerErrorKind::JetStream(j) if j.error_code() == ErrorCode::CONSUMER_NOT_FOUND) =>
                {}
            Err(e) => return Err(AgentError::Consumer { host: host.clone(), source: Box::new(e) }),
        }
        self.journal.forget_events_cursor().map_err(|source| AgentError::Journal { host: host.clone(), source })?;
        tracing::info!(%host, "commands now come from COMMANDS; the consumer on EVENTS of an earlier version is removed");
        Ok(())
    }

    async fn command_loop(&self, mut consumer: PullConsumer, cancel: CancellationToken) {
        let host = &self.cfg.host;
        let mut backoff = Duration::from_millis(100);
        while !cancel.is_cancelled() {
            let pull = consumer.stream().max_messages_per_batch(COMMAND_BATCH).heartbeat(Duration::from_secs(15));
            let mut messages = match pull.messages().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(%host, error = %e, "command consumer unavailable; retrying");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    // The server may have lost it (a restart): make it again from the cursor.
                    if let Ok(c) = self.command_consumer().await {
                        consumer = c;
                    }
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            let mut connections = self.bus.connections.clone();
            connections.mark_unchanged();
            loop {
                let next = tokio::select! {
                    () = cancel.cancelled() => return,
                    next = messages.next() => next,
                    Ok(()) = connections.changed() => {
                        // Reconnected: a restarted server has lost the in-memory consumer. Make
                        // it again now rather than when the pull stream misses its heartbeats.
                        if self.replace_if_lost(&mut consumer, "a reconnect").await {
                            break;
                        }
                        continue;
                    }
                };
                match next {
                    Some(Ok(msg)) => self.handle(msg, &cancel).await,
                    Some(Err(e)) => {
                        tracing::debug!(%host, error = %e, "command stream hiccup");
                        if self.replace_if_lost(&mut consumer, "a stream error").await {
                            break;
                        }
                    }
                    None => break,
                }
            }
        }
    }

    /// If the server no longer has the command consumer, makes it again from the journal's
    /// cursor. Returns whether it was lost (the message stream must then be opened again).
    async fn replace_if_lost(&self, consumer: &mut PullConsumer, after: &str) -> bool {
        if consumer.get_info().await.is_ok() {
            return false;
        }
        if let Ok(c) = self.command_consumer().await {
            tracing::info!(host = %self.cfg.host, after, "command consumer recreated from the journal's cursor");
            *consumer = c;
        }
        true
    }

    /// A command is done with (applied, refused or dead-lettered): the cursor moves up to it,
    /// or to just below the oldest command still to be retried.
    fn handled(&self, seq: u64) {
        if seq == 0 {
            return;
        }
        let upto = {
            let mut unfinished = self.unfinished.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            unfinished.remove(&seq);
            unfinished.first().map_or(seq, |oldest| seq.min(oldest - 1))
        };
        if let Err(e) = self.journal.advance_cursor(upto) {
            tracing::warn!(host = %self.cfg.host, seq, error = %e, "journal cursor not saved; a lost consumer would hand commands again");
        }
    }

    async fn handle(&self, msg: Message, cancel: &CancellationToken) {
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let logged = decode_event(seq, msg.subject.as_str(), msg.headers.as_ref(), &msg.payload);
        let envelope = match logged.envelope {
            Ok(e) => e,
            Err(e) => return self.reject(&msg, &e.to_string()).await,
        };
        let Some(command) = envelope.as_command() else {
            return self.reject(&msg, &format!("{} is not a command", envelope.event.name())).await;
        };
        if command.host() != &self.cfg.host {
            let reason = format!("command for host {} on the subject of host {}", command.host(), self.cfg.host);
            return self.reject(&msg, &reason).await;
        }
        match self.apply(envelope.id, seq, &command) {
            Ok(plan) => {
                // Long operations (a migration, a slow start, a wait for the lease) keep the
                // command from being redelivered by telling JetStream we are still working on it.
                let exec = self.execute_under_lease(plan, &command, logged_at(&msg), cancel);
                tokio::pin!(exec);
                let mut progress = tokio::time::interval_at(
                    tokio::time::Instant::now() + COMMAND_PROGRESS_EVERY,
                    COMMAND_PROGRESS_EVERY,
                );
                let report = loop {
                    tokio::select! {
                        r = &mut exec => break r,
                        _ = progress.tick() => { let _ = msg.ack_with(AckKind::Progress).await; }
                    }
                };
                let Some(report) = report else {
                    return; // shutting down while waiting for the lease: redelivered to the next run
                };
                if let Some(report) = report
                    && !self.report(report, cancel).await
                {
                    return; // shutting down: not acked, redelivered to the next run
                }
                if let Err(e) = msg.ack().await {
                    tracing::warn!(host = %self.cfg.host, seq, error = %e, "ack lost; the command will be redelivered and recognised");
                }
                self.handled(seq);
            }
            Err(e) => {
                tracing::error!(host = %self.cfg.host, seq, error = %e, "journal failure; command will be retried");
                self.unfinished.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(seq);
                let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
            }
        }
    }

    /// Dead-letters a message that is not a valid command for this host and never redelivers it.
    async fn reject(&self, msg: &Message, reason: &str) {
        let ct = msg.headers.as_ref().and_then(|h| h.get(proto::HEADER_CONTENT_TYPE)).map(|v| v.as_str().to_owned());
        // The subject it was logged under in EVENTS (the server notes it on the copy), else the
        // copy's own.
        let logged = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(proto::HEADER_STREAM_SOURCE))
            .and_then(|v| v.as_str().split_whitespace().nth(4).map(str::to_owned));
        let subject = logged.as_deref().unwrap_or(msg.subject.as_str());
        self.dead_letters.send("commands", subject, ct.as_deref(), reason, msg.payload.clone()).await;
        let _ = msg.ack_with(AckKind::Term).await;
        self.handled(msg.info().map(|i| i.stream_sequence).unwrap_or(0));
    }

    /// Runs a journal write that flushes on the blocking pool: a flush waits for the disk, and
    /// on one of the runtime's workers it held up every other host of the process meanwhile —
    /// their heartbeats and lease renewals too.
    pub(crate) async fn journaled<T: Send + 'static>(
        &self,
        write: impl FnOnce(&Journal) -> Result<T, JournalError> + Send + 'static,
    ) -> Result<T, JournalError> {
        let journal = self.journal.clone();
        match tokio::task::spawn_blocking(move || write(&journal)).await {
            Ok(done) => done,
            Err(e) => match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(_) => Err(JournalError::Interrupted),
            },
        }
    }

    /// Decides what to do with a command, from the journal alone.
    fn apply(&self, id: EventId, seq: u64, command: &AgentCommand) -> Result<Plan, JournalError> {
        let vm = command.vm();
        if self.journal.is_applied(id)? {
            ::metrics::counter!(m::COMMANDS_DUPLICATE).increment(1);
            tracing::debug!(host = %self.cfg.host, %vm, event = %id, "command already applied; re-reporting");
            return Ok(Plan::Rereport);
        }
        if let Some(known) = self.journal.vm(vm)?
            && command.generation() < known.generation
        {
            ::metrics::counter!(m::COMMANDS_STALE).increment(1);
            tracing::info!(
                host = %self.cfg.host, %vm, generation = %command.generation(), current = %known.generation,
                "refusing a command with a stale generation"
            );
            self.journal.record(id, seq, vm, None)?;
            return Ok(Plan::Ignore);
        }
        Ok(Plan::Execute { id, seq })
    }

    /// [`Agent::execute`], for a command that starts a VM once the lease allows it: it waits
    /// while the lease does not hold, is refused if it was issued before this host was last
    /// declared failed, and the VM is fenced at once if the lease ran out while it started.
    /// `None` when cancelled while waiting.
    async fn execute_under_lease(
        &self,
        plan: Plan,
        command: &AgentCommand,
        logged_at: Option<u64>,
        cancel: &CancellationToken,
    ) -> Option<Option<ReportKind>> {
        let Plan::Execute { id, seq } = plan else { return Some(self.execute(plan, command).await) };
        if !matches!(command, AgentCommand::Start(_) | AgentCommand::PrepareIncoming(_)) {
            return Some(self.execute(plan, command).await);
        }
        match self.start_gate(logged_at, cancel).await {
            fencing::StartGate::Open => {}
            fencing::StartGate::Cancelled => return None,
            fencing::StartGate::Refused(why) => {
                ::metrics::counter!(m::STARTS_REFUSED_FENCED).increment(1);
                tracing::warn!(host = %self.cfg.host, vm = %command.vm(), seq, why, "VM start refused");
                // Recorded as applied, so a redelivery is recognised; the VM's record is untouched.
                let vm = command.vm();
                if let Err(e) = self.journaled(move |j| j.record(id, seq, vm, None)).await {
                    tracing::error!(host = %self.cfg.host, seq, error = %e, "journal write failed for a refused start");
                }
                // Reported: the orchestrator ignores it for an incarnation it has superseded, and
                // places the VM again if it is still the current one (a start issued in the
                // moment between the host's recovery and the agent noticing the declaration).
                let host = self.cfg.host.clone();
                return Some(match command {
                    AgentCommand::Start(c) => Some(ReportKind::VmFailed(VmFailed {
                        vm,
                        host,
                        incarnation: c.incarnation,
                        generation: c.generation,
                        reason: format!("start refused: {why}"),
                    })),
                    AgentCommand::PrepareIncoming(c) => Some(ReportKind::MigrationFailed(VmMigrationFailed {
                        vm,
                        reported_by: host,
                        target_incarnation: c.incarnation,
                        reason: format!("destination refused: {why}"),
                    })),
                    _ => None,
                });
            }
        }
        match self.execute(plan, command).await {
            // The lease ran out while the VM started: the fence may have come before the
            // journal said the VM runs, and missed it.
            Some(running @ ReportKind::VmRunning(_)) if !self.lease_holds() => {
                Some(Some(self.fence_one(running, "the lease ran out while the VM started").await))
            }
            report => Some(report),
        }
    }

    async fn execute(&self, plan: Plan, command: &AgentCommand) -> Option<ReportKind> {
        let vm = command.vm();
        let (id, seq) = match plan {
            Plan::Ignore => return None,
            Plan::Rereport => return self.current_report(vm),
            Plan::Execute { id, seq } => (id, seq),
        };
        let (record, report) = match command {
            AgentCommand::Start(c) => {
                let observed = VmIncarnationReport {
                    vm,
                    host: self.cfg.host.clone(),
                    incarnation: c.incarnation,
                    generation: c.generation,
                };
                let was_fenced =
                    self.journal.vm(vm).ok().flatten().is_some_and(|j| j.incarnation == c.incarnation && !j.running);
                let started = match self.driver.start(c).await {
                    // A start of an incarnation that was paused by a fence resumes it.
                    Ok(()) if was_fenced && self.cfg.fence_action == FenceAction::Pause => {
                        self.driver.resume(vm, c.incarnation).await.or(Ok(()))
                    }
                    other => other,
                };
                match started {
                    Ok(()) => (
                        JournalVm { incarnation: c.incarnation, generation: c.generation, running: true },
                        ReportKind::VmRunning(observed),
                    ),
                    Err(e) => (
                        JournalVm { incarnation: c.incarnation, generation: c.generation, running: false },
                        ReportKind::VmFailed(VmFailed {
                            vm,
                            host: observed.host,
                            incarnation: c.incarnation,
                            generation: c.generation,
                            reason: e.to_string(),
                        }),
                    ),
                }
            }
            AgentCommand::Stop(c) => {
                if let Err(e) = self.driver.stop(vm, c.incarnation).await {
                    tracing::error!(host = %self.cfg.host, %vm, error = %e, "stop failed; reporting failure");
                    let report = ReportKind::VmFailed(VmFailed {
                        vm,
                        host: self.cfg.host.clone(),
                        incarnation: c.incarnation,
                        generation: c.generation,
                        reason: e.to_string(),
                    });
                    return Some(report);
                }
                (
                    JournalVm { incarnation: c.incarnation, generation: c.generation, running: false },
                    ReportKind::VmStopped(VmIncarnationReport {
                        vm,
                        host: self.cfg.host.clone(),
                        incarnation: c.incarnation,
                        generation: c.generation,
                    }),
                )
            }
            AgentCommand::PrepareIncoming(c) => {
                let record = JournalVm { incarnation: c.incarnation, generation: c.generation, running: false };
                match self.driver.prepare_incoming(c).await {
                    Ok(uri) => (
                        record,
                        ReportKind::IncomingReady(VmMigrationIncomingReady {
                            vm,
                            host: self.cfg.host.clone(),
                            incarnation: c.incarnation,
                            uri,
                        }),
                    ),
                    Err(e) => (
                        record,
                        ReportKind::MigrationFailed(VmMigrationFailed {
                            vm,
                            reported_by: self.cfg.host.clone(),
                            target_incarnation: c.incarnation,
                            reason: format!("destination could not prepare: {e}"),
                        }),
                    ),
                }
            }
            AgentCommand::MigrateOut(c) => match self.driver.migrate_out(vm, c.incarnation, &c.uri).await {
                Ok(stats) => (
                    JournalVm { incarnation: c.incarnation, generation: c.generation, running: false },
                    ReportKind::MigrationCompleted(VmMigrationCompleted {
                        vm,
                        from: self.cfg.host.clone(),
                        to: c.target_host.clone(),
                        source_incarnation: c.incarnation,
                        target_incarnation: c.target_incarnation,
                        downtime_ms: stats.downtime_ms,
                        duration_ms: stats.duration_ms,
                    }),
                ),
                Err(e) => (
                    JournalVm { incarnation: c.incarnation, generation: c.generation, running: true },
                    ReportKind::MigrationFailed(VmMigrationFailed {
                        vm,
                        reported_by: self.cfg.host.clone(),
                        target_incarnation: c.target_incarnation,
                        reason: e.to_string(),
                    }),
                ),
            },
        };
        if let Err(e) = self.journaled(move |j| j.record(id, seq, vm, Some(&record))).await {
            // The driver acted but the journal did not record it. The command is not acked, so
            // it comes back; the driver's idempotence makes the second attempt harmless.
            tracing::error!(host = %self.cfg.host, %vm, error = %e, "journal write failed after driving the VM");
            return None;
        }
        ::metrics::counter!(m::COMMANDS_APPLIED).increment(1);
        tracing::info!(host = %self.cfg.host, %vm, seq, kind = report_name(&report), "command applied");
        Some(report)
    }

    fn current_report(&self, vm: VmId) -> Option<ReportKind> {
        let rec = self.journal.vm(vm).ok().flatten()?;
        let observed = VmIncarnationReport {
            vm,
            host: self.cfg.host.clone(),
            incarnation: rec.incarnation,
            generation: rec.generation,
        };
        Some(if rec.running { ReportKind::VmRunning(observed) } else { ReportKind::VmStopped(observed) })
    }

    /// Publishes a report through JetStream, retrying until it is stored or we shut down.
    /// Returns false when cancelled first.
    async fn report(&self, kind: ReportKind, cancel: &CancellationToken) -> bool {
        let report = Report {
            schema: SCHEMA_VERSION,
            id: ReportId::new_v7(),
            host: self.cfg.host.clone(),
            at_ms: now_ms(),
            report: kind,
        };
        let payload = Bytes::from(novacron_types::encode(&report));
        let subject = proto::report_subject(&self.cfg.host);
        let mut delay = Duration::from_millis(50);
        loop {
            let mut headers = HeaderMap::new();
            headers.insert(proto::HEADER_CONTENT_TYPE, ContentType::MsgPack.header_value());
            headers.insert("Nats-Msg-Id", report.id.to_string().as_str());
            let sent = match self.bus.js.publish_with_headers(subject.clone(), headers, payload.clone()).await {
                Ok(ack) => ack.await.map(|_| ()),
                Err(e) => Err(e),
            };
            match sent {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(host = %self.cfg.host, error = %e, "report not stored yet; retrying")
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return false,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// Waits until the log records this host (its registration folded in: any event on its
    /// subject), asking once per telemetry period. Telemetry sent before that would be
    /// dead-lettered as from an unknown host — thousands of dead letters while a large fleet
    /// registers. False when cancelled first.
    async fn registered(&self, cancel: &CancellationToken) -> bool {
        let subject = proto::host_events(&self.cfg.host);
        loop {
            let found = match self.bus.js.get_stream(proto::EVENTS_STREAM).await {
                Ok(events) => events.get_last_raw_message_by_subject(&subject).await.is_ok(),
                Err(_) => false,
            };
            if found {
                return true;
            }
            tracing::debug!(host = %self.cfg.host, "not in the log yet; telemetry waits");
            tokio::select! {
                () = cancel.cancelled() => return false,
                () = tokio::time::sleep(self.cfg.telemetry_interval) => {}
            }
        }
    }

    /// Periodic host and VM telemetry (heartbeats go with lease renewals, in `fence_loop`),
    /// once the log records this host.
    async fn telemetry_loop(self: std::sync::Arc<Self>, cancel: CancellationToken) {
        if !self.registered(&cancel).await {
            return;
        }
        let mut tele = tokio::time::interval_at(
            tokio::time::Instant::now() + self.cfg.telemetry_interval,
            self.cfg.telemetry_interval,
        );
        tele.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tele.tick() => {
                    // One message for the host and its VMs: at 10,000 hosts with three VMs
                    // each, a message per VM was three quarters of all telemetry traffic.
                    let vms = self
                        .driver
                        .vm_usage()
                        .into_iter()
                        .map(|u| VmSample {
                            vm: u.vm,
                            cpu_util: u.cpu_util,
                            memory_used_mib: u.memory_used_mib,
                            status: Some(u.status.to_owned()),
                        })
                        .collect();
                    let usage = self.driver.host_usage(self.cfg.capacity);
                    let sample = HostTelemetry {
                        schema: SCHEMA_VERSION,
                        host: self.cfg.host.clone(),
                        at_ms: now_ms(),
                        cpu_util: usage.cpu_util,
                        memory_used_mib: usage.memory_used_mib,
                        load1: usage.load1,
                        vms,
                    };
                    let _ = self.bus.js.publish(proto::host_telemetry_subject(&self.cfg.host), novacron_types::encode(&sample).into()).await;
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Plan {
    Execute { id: EventId, seq: u64 },
    Rereport,
    Ignore,
}

fn report_name(r: &ReportKind) -> &'static str {
    match r {
        ReportKind::HostRegistration(_) => "HostRegistration",
        ReportKind::VmRunning(_) => "VmRunning",
        ReportKind::VmStopped(_) => "VmStopped",
        ReportKind::VmFailed(_) => "VmFailed",
        ReportKind::IncomingReady(_) => "IncomingReady",
        ReportKind::MigrationCompleted(_) => "MigrationCompleted",
        ReportKind::MigrationFailed(_) => "MigrationFailed",
    }
}

/// The EVENTS sequence a command was logged at: from its copy's source header (COMMANDS), or
/// the message's own when it was read from EVENTS (an earlier version's consumer).
fn logged_at(msg: &Message) -> Option<u64> {
    if let Some(source) = msg.headers.as_ref().and_then(|h| h.get(proto::HEADER_STREAM_SOURCE)) {
        let mut fields = source.as_str().split_whitespace();
        return match (fields.next(), fields.next()) {
            (Some(proto::EVENTS_STREAM), Some(seq)) => seq.parse().ok(),
            _ => None,
        };
    }
    msg.info().ok().filter(|i| i.stream == proto::EVENTS_STREAM).map(|i| i.stream_sequence)
}

/// Heartbeats and lease renewals apart from everything else an agent does: a connection of
/// their own, on a runtime of their own (one thread). A busy connection queued them behind a
/// fleet's commands, acks and reports; and when the journal's disk is slow, the main
/// runtime's workers wait in `sled` — the fence loops with them, until leases lapsed and a
/// simulated fleet under overload fenced its VMs over and over.
#[derive(Clone)]
pub struct LeaseLane {
    bus: Bus,
    runtime: tokio::runtime::Handle,
}

impl LeaseLane {
    /// Starts the lane's thread (it lives as long as the process) and connects on it.
    ///
    /// # Errors
    /// When the thread cannot start or the connection fails.
    pub async fn start(
        cfg: &novacron_eventlog::BusConfig,
    ) -> Result<LeaseLane, Box<dyn std::error::Error + Send + Sync>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new().name("lease-lane".into()).spawn(move || {
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => {
                    let _ = tx.send(Ok(rt.handle().clone()));
                    rt.block_on(std::future::pending::<()>());
                }
                Err(e) => drop(tx.send(Err(e))),
            }
        })?;
        let runtime = rx.await??;
        let cfg = cfg.clone();
        let bus = runtime.spawn(async move { Bus::connect(&cfg).await }).await??;
        Ok(LeaseLane { bus, runtime })
    }
}

/// Runs many simulated hosts in this process, sharing one bus connection, one [`LeaseLane`]
/// for heartbeats and leases, and one sled db. Returns when `cancel` fires and every agent has
/// stopped.
pub async fn run_sim_fleet(
    bus: Bus,
    lane: LeaseLane,
    db: sled::Db,
    hosts: Vec<AgentConfig>,
    cancel: CancellationToken,
) {
    let tracker = TaskTracker::new();
    match journal::migrate_per_host_trees(&db) {
        Ok(0) => {}
        Ok(n) => tracing::info!(trees = n, "moved per-host journal trees of an earlier version into the shared ones"),
        Err(e) => {
            // Starting without them could apply a command twice.
            tracing::error!(error = %ErrorChain(&e), "cannot move the journals of an earlier version; the simulated fleet does not start");
            return;
        }
    }
    let sim_tree = match db.open_tree(journal::SIM_TREE) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::error!(error = %e, "simulated hosts' state not persistent");
            None
        }
    };
    // Provisioning is idempotent but costs several requests: once for the whole fleet.
    let replicas = hosts.first().map_or(1, |c| c.replicas);
    let mut backoff = Duration::from_millis(100);
    while let Err(e) = bus.provision(replicas).await {
        tracing::warn!(error = %ErrorChain(&e), "cannot provision the streams for the simulated fleet; retrying");
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    for mut cfg in hosts {
        cfg.provision = false;
        let host = cfg.host.clone();
        let driver = match &sim_tree {
            Some(tree) => sim::SimDriver::persistent(tree.clone(), journal::host_prefix(&host)),
            None => sim::SimDriver::default(),
        };
        match Agent::new(cfg, bus.clone(), driver, &db).map(|a| a.with_lease_lane(&lane)) {
            Ok(agent) => {
                let cancel = cancel.clone();
                tracker.spawn(async move {
                    if let Err(e) = agent.run(cancel).await {
                        tracing::error!(%host, error = %ErrorChain(&e), "agent stopped with an error");
                    }
                });
            }
            Err(e) => tracing::error!(%host, error = %ErrorChain(&e), "agent could not start"),
        }
    }
    tracker.close();
    tracker.wait().await;
}

/// Prints an error with its whole `source()` chain: `a: b: c`.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            write!(f, ": {e}")?;
            cur = e.source();
        }
        Ok(())
    }
}
