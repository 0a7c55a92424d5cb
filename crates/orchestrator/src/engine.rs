//! The engine: the one task that owns the folded state and the event log writer.
//!
//! Requests (API calls, agents' reports) arrive on a channel; for each, the engine reads the
//! state, decides ([`crate::decide`]), appends the events, folds them in, and only then
//! replies — so an acknowledged request is in the log. A periodic tick runs the reconcilers.
//! When an append is refused (someone else wrote), the engine catches up from the log and
//! decides again from the new state.
//!
//! Readers (the HTTP API) share the state behind an `RwLock` that the engine holds only while
//! folding, never across an await.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use novacron_eventlog::{AppendError, EventLog, FoldStats, SnapshotStore, fold_one, fold_range, replay};
use novacron_state::{ClusterState, VmView};
use novacron_types::{Actor, Envelope, Report, VmSpec};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::decide::{self, Origin, Refusal, WallClock};
use crate::metrics as m;

/// Shared, read-mostly view of the folded state.
pub type SharedState = Arc<RwLock<ClusterState>>;

/// Reads the shared state, tolerating a poisoned lock (the engine never leaves it half-written:
/// each fold step is complete before the next).
pub fn read(state: &SharedState) -> std::sync::RwLockReadGuard<'_, ClusterState> {
    state.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write(state: &SharedState) -> std::sync::RwLockWriteGuard<'_, ClusterState> {
    state.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Why the engine could not do what was asked.
#[derive(Clone, Debug, thiserror::Error)]
pub enum EngineError {
    /// The request was refused on its merits.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The log could not take the events; nothing was acknowledged.
    #[error("the event log is unavailable: {0}")]
    LogUnavailable(String),
    /// The engine is shutting down.
    #[error("the orchestrator is shutting down")]
    ShuttingDown,
    /// Another replica leads; writes go there.
    #[error("this orchestrator replica does not lead{}", .0.as_ref().map(|l| format!("; the leader is {} at {}", l.replica, l.http)).unwrap_or_default())]
    NotLeader(Option<crate::leader::LeaderInfo>),
}

/// What happened to a report.
#[derive(Debug, PartialEq, Eq)]
pub enum ReportVerdict {
    /// Folded in (or nothing new).
    Accepted,
    /// Dead-letter it with this reason.
    Rejected(String),
}

pub(crate) enum Request {
    CreateVms {
        specs: Vec<VmSpec>,
        origin: Origin,
        reply: oneshot::Sender<Result<Vec<VmView>, EngineError>>,
    },
    DeleteVm {
        key: String,
        origin: Origin,
        reply: oneshot::Sender<Result<VmView, EngineError>>,
    },
    MigrateVm {
        key: String,
        to: Option<String>,
        origin: Origin,
        reply: oneshot::Sender<Result<VmView, EngineError>>,
    },
    HostAction {
        host: String,
        action: decide::HostAction,
        origin: Origin,
        reply: oneshot::Sender<Result<novacron_state::HostView, EngineError>>,
    },
    Report {
        report: Box<Report>,
        reply: oneshot::Sender<Result<ReportVerdict, EngineError>>,
    },
    ApplyPolicies {
        docs: Vec<novacron_types::policy::Policy>,
        origin: Origin,
        reply: oneshot::Sender<Result<Vec<String>, EngineError>>,
    },
    RemovePolicy {
        name: String,
        origin: Origin,
        reply: oneshot::Sender<Result<String, EngineError>>,
    },
    CreateGroup {
        spec: Box<novacron_types::group::GroupSpec>,
        origin: Origin,
        reply: oneshot::Sender<Result<String, EngineError>>,
    },
    DeleteGroup {
        name: String,
        origin: Origin,
        reply: oneshot::Sender<Result<String, EngineError>>,
    },
    Model {
        action: decide::ModelAction,
        origin: Origin,
        reply: oneshot::Sender<Result<String, EngineError>>,
    },
}

/// A cheap handle to the engine.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Request>,
    /// The folded state, for readers.
    pub state: SharedState,
    /// True once the engine has caught up with the log and runs.
    pub ready: Arc<AtomicBool>,
}

impl EngineHandle {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, EngineError>>) -> Request,
    ) -> Result<T, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| EngineError::ShuttingDown)?;
        rx.await.map_err(|_| EngineError::ShuttingDown)?
    }

    /// Creates a VM; returns once its events are in the log.
    ///
    /// # Errors
    /// Refusals, or the log being unavailable.
    pub async fn create_vm(&self, spec: VmSpec, origin: Origin) -> Result<VmView, EngineError> {
        let mut views = self.create_vms(vec![spec], origin).await?;
        views.pop().ok_or_else(|| EngineError::LogUnavailable("no VM created".into()))
    }

    /// Creates several VMs in one planning pass; returns once their events are in the log.
    ///
    /// # Errors
    /// Refusals (a name taken or repeated: then none is created), or the log being unavailable.
    pub async fn create_vms(&self, specs: Vec<VmSpec>, origin: Origin) -> Result<Vec<VmView>, EngineError> {
        self.ask(|reply| Request::CreateVms { specs, origin, reply }).await
    }

    /// Deletes a VM (by id or name); returns once the request is in the log.
    ///
    /// # Errors
    /// Refusals, or the log being unavailable.
    pub async fn delete_vm(&self, key: String, origin: Origin) -> Result<VmView, EngineError> {
        self.ask(|reply| Request::DeleteVm { key, origin, reply }).await
    }

    /// Starts a live migration of a VM (by id or name), to `to` or a host the planner picks;
    /// returns once it is planned in the log. The agents' reports drive the rest.
    ///
    /// # Errors
    /// Refusals, or the log being unavailable.
    pub async fn migrate_vm(&self, key: String, to: Option<String>, origin: Origin) -> Result<VmView, EngineError> {
        self.ask(|reply| Request::MigrateVm { key, to, origin, reply }).await
    }

    /// Cordons, drains or uncordons a host; returns once the request is in the log.
    ///
    /// # Errors
    /// Refusals (unknown host, a state that does not allow it), or the log being unavailable.
    pub async fn host_action(
        &self,
        host: String,
        action: decide::HostAction,
        origin: Origin,
    ) -> Result<novacron_state::HostView, EngineError> {
        self.ask(|reply| Request::HostAction { host, action, origin, reply }).await
    }

    /// Applies policy documents (new ones and new versions); returns the names that changed,
    /// once they are in the log.
    ///
    /// # Errors
    /// Invalid or conflicting documents, or the log being unavailable.
    pub async fn apply_policies(
        &self,
        docs: Vec<novacron_types::policy::Policy>,
        origin: Origin,
    ) -> Result<Vec<String>, EngineError> {
        self.ask(|reply| Request::ApplyPolicies { docs, origin, reply }).await
    }

    /// Withdraws a policy.
    ///
    /// # Errors
    /// No such policy, or the log being unavailable.
    pub async fn remove_policy(&self, name: String, origin: Origin) -> Result<String, EngineError> {
        self.ask(|reply| Request::RemovePolicy { name, origin, reply }).await
    }

    /// Creates a VM group; the scaler brings it to its minimum.
    ///
    /// # Errors
    /// An invalid spec or a taken name, or the log being unavailable.
    pub async fn create_group(
        &self,
        spec: novacron_types::group::GroupSpec,
        origin: Origin,
    ) -> Result<String, EngineError> {
        self.ask(|reply| Request::CreateGroup { spec: Box::new(spec), origin, reply }).await
    }

    /// Deletes a group and its members.
    ///
    /// # Errors
    /// No such group, or the log being unavailable.
    pub async fn delete_group(&self, name: String, origin: Origin) -> Result<String, EngineError> {
        self.ask(|reply| Request::DeleteGroup { name, origin, reply }).await
    }

    /// Registers, promotes or rolls back a forecasting model; returns the model concerned.
    ///
    /// # Errors
    /// Refusals, or the log being unavailable.
    pub async fn model(&self, action: decide::ModelAction, origin: Origin) -> Result<String, EngineError> {
        self.ask(|reply| Request::Model { action, origin, reply }).await
    }

    /// Queues an agent's report behind those handed over before it, and returns the verdict
    /// to come (once its events are in the log). Reports queued back to back are decided and
    /// appended together.
    ///
    /// # Errors
    /// The engine has stopped.
    pub(crate) async fn submit_report(
        &self,
        report: Report,
    ) -> Result<impl Future<Output = Result<ReportVerdict, EngineError>> + use<>, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request::Report { report: Box::new(report), reply: tx })
            .await
            .map_err(|_| EngineError::ShuttingDown)?;
        Ok(async move { rx.await.map_err(|_| EngineError::ShuttingDown)? })
    }
}

/// The engine's settings.
pub struct EngineConfig {
    /// This replica's name, recorded as the actor of its own decisions.
    pub replica: String,
    /// How often the reconcilers run.
    pub reconcile_interval: Duration,
    /// The failure detector's timeouts.
    pub failure: decide::FailureTimeouts,
    /// Restart timings and migration limits of the reconcilers.
    pub reconcile: decide::ReconcileSettings,
    /// The load-aware rebalancer.
    pub rebalance: decide::RebalanceSettings,
    /// Heartbeats as they arrive (written by the ingest loop).
    pub observations: crate::ingest::SharedObservations,
    /// How often a predictive group's load model takes a sample (5 minutes, as the traces it
    /// is measured on).
    pub forecast_step: Duration,
    /// How many steps ahead predictive scaling looks (covering a VM's start time).
    pub forecast_horizon_steps: u32,
    /// Trained models' artifacts.
    pub model_artifacts: novacron_eventlog::Artifacts,
    /// Live forecast accuracy per model (the prediction ledger), shared with the API.
    pub ledger: crate::ingest::SharedLedger,
    /// When live errors call for retraining.
    pub retraining: crate::ingest::RetrainingTriggers,
    /// The agents' leases (KV `nc-host-leases`): a host is failed only by overwriting its lease.
    pub host_leases: async_nats::jetstream::kv::Store,
    /// This replica's role, from the election.
    pub role: tokio::sync::watch::Receiver<crate::leader::Role>,
    /// Where this replica's API listens (recorded in `LeaderElected`).
    pub http: String,
    /// Scores hosts' failure histories for the planner (`None`: placement ignores failure risk).
    pub risk_model: Option<novacron_predict::risk::RiskModel>,
}

pub(crate) struct Engine {
    cfg: EngineConfig,
    state: SharedState,
    log: EventLog,
    /// When this engine started: hosts not heard from since count their silence from here.
    started: std::time::Instant,
    /// When this engine first saw each host in the state (a host that registers late gets
    /// its grace period from then, not from the engine's start).
    known_since: std::collections::BTreeMap<novacron_types::HostId, std::time::Instant>,
    /// Hosts in the state never heard from, as of the last pass, and how many hosts the state
    /// had when they were listed (hosts are never removed: the same count, the same hosts).
    unheard: (std::collections::BTreeSet<novacron_types::HostId>, usize),
    /// When the last reconcile pass began.
    last_reconcile: std::time::Instant,
    /// Since when each host has been at or above the rebalancer's hot threshold.
    hot_since: std::collections::BTreeMap<novacron_types::HostId, std::time::Instant>,
    /// Per group: sizes recommended recently (for the stabilization window).
    recommendations: BTreeMap<String, std::collections::VecDeque<(std::time::Instant, u32)>>,
    /// Per group in predictive or forecast-only mode: its load model.
    group_load: BTreeMap<String, GroupLoad>,
    /// The promoted forecasting model, loaded from its artifact.
    promoted_model: Option<(String, Box<dyn novacron_predict::model::Forecaster>)>,
}

/// A group's load forecaster and its recent one-step errors.
struct GroupLoad {
    /// When the last sample was taken.
    last: Option<std::time::Instant>,
    /// The promoted model it runs (`None`: exponential smoothing).
    model_id: Option<String>,
    model: Box<dyn novacron_predict::model::Forecaster>,
    /// Recent samples (CPU %), to warm up a newly promoted model.
    history: std::collections::VecDeque<f64>,
    /// Recent one-step errors (CPU-% points), for the interval.
    residuals: std::collections::VecDeque<f64>,
    /// One-step forecasts waiting for their actual.
    pending: std::collections::VecDeque<f64>,
}

impl GroupLoad {
    fn new() -> GroupLoad {
        GroupLoad {
            last: None,
            model_id: None,
            model: Box::new(novacron_predict::model::Ses::new(0.3)),
            history: std::collections::VecDeque::new(),
            residuals: std::collections::VecDeque::new(),
            pending: std::collections::VecDeque::new(),
        }
    }
}

const MAX_ATTEMPTS: usize = 3;

/// The most requests (creates and VM reports) decided and appended together.
const MAX_GROUP: usize = 256;

/// The least time between two reconcile passes triggered by requests (ticks always run one).
const RECONCILE_MIN_GAP: Duration = Duration::from_millis(100);

/// An engine ready to run, as [`Engine::recover`] left it.
pub(crate) struct Recovered {
    pub(crate) engine: Engine,
    pub(crate) handle: EngineHandle,
    pub(crate) rx: mpsc::Receiver<Request>,
    /// Creation time of the EVENTS stream (what snapshots are tied to), ns since the epoch.
    pub(crate) stream_created_ns: i128,
    /// The sequence of the snapshot it started from (0: none).
    pub(crate) snapshot_seq: u64,
}

impl Request {
    /// Whether the reconcilers may find new work once this request is handled. A create
    /// appends its own placement and start command (or stays pending, which only new capacity
    /// changes), and a VM reported running asks nothing of them: under a stream of creates
    /// these two are nearly every request, and a pass after each walked every VM for nothing.
    /// Everything else may: deletions, host actions, registrations, VMs stopped or failed,
    /// migrations, policies, groups.
    fn may_unblock(&self) -> bool {
        match self {
            Request::CreateVms { .. } => false,
            Request::Report { report, .. } => !matches!(report.report, novacron_types::ReportKind::VmRunning(_)),
            _ => true,
        }
    }
}

/// What the engine's loop carries from one step to the next.
struct Follow {
    rx: mpsc::Receiver<Request>,
    role: tokio::sync::watch::Receiver<crate::leader::Role>,
    /// The term this replica leads, if it does.
    leading: Option<u64>,
    tick: tokio::time::Interval,
    min_gap: Duration,
    /// A request handled since the last pass may have left the reconcilers work.
    pass_wanted: bool,
}

/// Events fetched per step of a catch-up.
const CATCH_UP_WINDOW: u64 = 10_000;

/// Since when a host counts as silent: its last heartbeat; or, never heard from, since this
/// engine first saw it registered — and never before this engine (or its term) started, so a
/// restart or a new leader gives every host a full grace period.
fn silent_since(
    last_seen: Option<std::time::Instant>,
    known_since: std::time::Instant,
    started: std::time::Instant,
) -> std::time::Instant {
    last_seen.unwrap_or(known_since).max(started)
}

impl Engine {
    /// Loads the newest usable snapshot and replays the tail. Returns the engine and its handle
    /// (not yet running).
    pub(crate) async fn recover(
        cfg: EngineConfig,
        log: EventLog,
        snapshots: &SnapshotStore,
    ) -> Result<Recovered, crate::OrchestratorError> {
        let mut stream = log.stream().clone();
        let info = stream.info().await.map_err(|e| crate::OrchestratorError::Log(e.to_string()))?;
        let stream_created_ns = info.created.unix_timestamp_nanos();
        let tail = info.state.last_sequence;
        let mut state = match snapshots.latest(stream_created_ns, tail) {
            Ok(Some(s)) => {
                tracing::info!(seq = s.seq, "loaded snapshot");
                s
            }
            Ok(None) => ClusterState::default(),
            Err(e) => {
                tracing::warn!(error = %e, "ignoring unusable snapshot; replaying from the start");
                ClusterState::default()
            }
        };
        let snapshot_seq = state.seq;
        let started = std::time::Instant::now();
        let stats = fold_range(log.stream(), &mut state, tail)
            .await
            .map_err(|e| crate::OrchestratorError::Log(e.to_string()))?;
        tracing::info!(
            seq = state.seq, replayed = stats.applied, undecodable = stats.undecodable,
            elapsed_ms = started.elapsed().as_millis() as u64, hash = %state.hash(),
            "state recovered from the log"
        );
        let shared: SharedState = Arc::new(RwLock::new(state));
        let (tx, rx) = mpsc::channel(1024);
        let handle = EngineHandle { tx, state: shared.clone(), ready: Arc::new(AtomicBool::new(false)) };
        let engine = Engine {
            cfg,
            state: shared,
            log,
            started: std::time::Instant::now(),
            known_since: std::collections::BTreeMap::new(),
            unheard: (std::collections::BTreeSet::new(), 0),
            last_reconcile: std::time::Instant::now(),
            hot_since: std::collections::BTreeMap::new(),
            recommendations: BTreeMap::new(),
            group_load: BTreeMap::new(),
            promoted_model: None,
        };
        Ok(Recovered { engine, handle, rx, stream_created_ns, snapshot_seq })
    }

    pub(crate) async fn run(mut self, rx: mpsc::Receiver<Request>, ready: Arc<AtomicBool>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.cfg.reconcile_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ready.store(true, Ordering::SeqCst);
        // Between ticks, a request may trigger a pass (new capacity, a deletion to move along),
        // but not more often than this: a full pass costs O(hosts), and under a stream of
        // requests one pass per request would be most of the work.
        let min_gap = RECONCILE_MIN_GAP.min(self.cfg.reconcile_interval);
        // Every step is dropped at cancellation, wherever it waits: with the bus gone an append
        // or a catch-up waits out request timeouts, several in a row in one reconcile pass, and
        // a shutdown must not wait for them. What a dropped step had not appended is as after a
        // crash: not acknowledged, and the log remains the record.
        let mut follow = Follow { rx, role: self.cfg.role.clone(), leading: None, tick, min_gap, pass_wanted: false };
        while let Some(true) = cancel.run_until_cancelled(self.step(&mut follow)).await {}
        ready.store(false, Ordering::SeqCst);
        tracing::info!(seq = read(&self.state).seq, "engine stopped");
    }

    /// One turn of the engine: a request (or a batch of them), a tick or a change of role,
    /// then what the role asks for — a reconcile pass as leader, a catch-up as standby. False
    /// when the request channel has closed.
    async fn step(&mut self, f: &mut Follow) -> bool {
        let ticked = tokio::select! {
            _ = f.role.changed() => true,
            req = f.rx.recv() => match req {
                Some(req) if f.leading.is_some() => {
                    let mut next = Some(req);
                    while let Some(req) = next.take() {
                        next = self.handle_or_group(req, &mut f.rx, &mut f.pass_wanted).await;
                    }
                    false
                }
                Some(req) => { self.refuse(req); false }
                None => return false,
            },
            _ = f.tick.tick() => true,
        };
        // Follow the election: a new term starts by catching up and saying so in the log.
        let now = f.role.borrow().clone();
        match (&now, f.leading) {
            (crate::leader::Role::Leader { term }, prev) if prev != Some(*term) => {
                self.take_office(*term).await;
                f.leading = Some(*term);
            }
            (crate::leader::Role::Leader { .. }, _) => {}
            (_, Some(_)) => {
                tracing::warn!("no longer the leader; following the log");
                f.leading = None;
            }
            (_, None) => {}
        }
        if f.leading.is_some() {
            if ticked || (f.pass_wanted && self.last_reconcile.elapsed() >= f.min_gap) {
                f.pass_wanted = false;
                self.reconcile(ticked).await;
            }
        } else {
            // A standby keeps its state warm by folding what the leader appends.
            self.catch_up().await;
        }
        true
    }

    /// Begins a term: folds in everything appended so far, records `LeaderElected`, and gives
    /// every host a fresh grace period (heartbeats seen as a standby still count).
    async fn take_office(&mut self, term: u64) {
        self.catch_up().await;
        let origin = Origin { actor: Actor::Orchestrator(self.cfg.replica.clone()), correlation: None };
        let elected = novacron_types::Envelope::new(
            novacron_eventlog::now_ms(),
            origin.actor.clone(),
            novacron_types::EventKind::LeaderElected(novacron_types::event::LeaderElected {
                replica: self.cfg.replica.clone(),
                term,
                http: self.cfg.http.clone(),
            }),
        );
        match self.commit(std::slice::from_ref(&elected)).await {
            Ok(()) => tracing::info!(replica = %self.cfg.replica, term, seq = read(&self.state).seq, "leading"),
            Err(e) => tracing::warn!(error = %e, "LeaderElected not recorded; acting anyway"),
        }
        self.started = std::time::Instant::now();
    }

    /// Answers a request this replica may not serve.
    fn refuse(&self, req: Request) {
        let leader = match &*self.cfg.role.borrow() {
            crate::leader::Role::Follower { leader } => leader.clone(),
            _ => None,
        };
        let err = || EngineError::NotLeader(leader.clone());
        match req {
            Request::CreateVms { reply, .. } => drop(reply.send(Err(err()))),
            Request::DeleteVm { reply, .. } | Request::MigrateVm { reply, .. } => drop(reply.send(Err(err()))),
            Request::HostAction { reply, .. } => drop(reply.send(Err(err()))),
            Request::Report { reply, .. } => drop(reply.send(Err(err()))),
            Request::ApplyPolicies { reply, .. } => drop(reply.send(Err(err()))),
            Request::RemovePolicy { reply, .. } => drop(reply.send(Err(err()))),
            Request::CreateGroup { reply, .. } | Request::DeleteGroup { reply, .. } | Request::Model { reply, .. } => {
                drop(reply.send(Err(err())))
            }
        }
    }

    /// Handles a request. A create, or a report about a VM, is grouped with the creates and VM
    /// reports queued behind it (group commit: one planning pass, one pipelined append, one
    /// reply each; see [`decide::decide_batch`]). Without that, each report was an append of
    /// its own that every create queued behind waited for, and a stall on the bus left the
    /// queue to be worked off one round trip at a time. Returns a request it drained but did
    /// not group (the first behind the group that cannot join it), to be handled next, in
    /// order; `unblock` is raised if a request handled here may leave the reconcilers work.
    async fn handle_or_group(
        &mut self,
        req: Request,
        rx: &mut mpsc::Receiver<Request>,
        unblock: &mut bool,
    ) -> Option<Request> {
        *unblock |= req.may_unblock();
        let mut group = Group::default();
        if let Err(req) = group.admit(req) {
            self.handle(req).await;
            return None;
        }
        let mut leftover = None;
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(req) => {
                    let may_unblock = req.may_unblock();
                    match group.admit(req) {
                        Ok(()) => *unblock |= may_unblock,
                        Err(other) => {
                            leftover = Some(other);
                            break;
                        }
                    }
                }
                Err(_) => break,
            }
        }
        self.commit_group(group).await;
        leftover
    }

    /// Decides a group against the current state, appends its events, and answers each request.
    async fn commit_group(&mut self, group: Group) {
        let planning = self.planning();
        let creates: Vec<(Vec<VmSpec>, Origin)> =
            group.creates.iter().map(|(s, o, _)| (s.clone(), o.clone())).collect();
        let reports: Vec<&Report> = group.reports.iter().map(|(r, _)| &**r).collect();
        let decided = self
            .decide_and_commit(|s| {
                let d = decide::decide_batch(s, &reports, &creates, &planning.get(), &mut WallClock);
                Ok(((d.reports, d.creates), d.events))
            })
            .await;
        match decided {
            Ok((verdicts, results)) => {
                for ((_, reply), v) in group.reports.into_iter().zip(verdicts) {
                    let _ = reply.send(Ok(v.map_or_else(ReportVerdict::Rejected, |()| ReportVerdict::Accepted)));
                }
                let state = read(&self.state);
                for ((specs, _, reply), r) in group.creates.into_iter().zip(results) {
                    let r = r.map_err(EngineError::from).map(|ids| {
                        ::metrics::counter!(m::VMS_CREATED).increment(specs.len() as u64);
                        ids.iter().map(|vm| VmView::from(&state.vms[vm])).collect()
                    });
                    let _ = reply.send(r);
                }
            }
            Err(e) => {
                for (_, reply) in group.reports {
                    let _ = reply.send(Err(e.clone()));
                }
                for (_, _, reply) in group.creates {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    async fn handle(&mut self, req: Request) {
        match req {
            // A registration (decided alone: a create must see it), or a create or VM report
            // that came first in a step of its own.
            Request::CreateVms { specs, origin, reply } => {
                self.commit_group(Group { creates: vec![(specs, origin, reply)], ..Group::default() }).await;
            }
            Request::Report { report, reply } => {
                self.commit_group(Group { reports: vec![(report, reply)], ..Group::default() }).await;
            }
            Request::DeleteVm { key, origin, reply } => {
                let r = self
                    .decide_and_commit(|s| decide::delete_vm(s, &key, &mut WallClock, &origin))
                    .await
                    .map(|vm| VmView::from(&read(&self.state).vms[&vm]));
                let _ = reply.send(r);
            }
            Request::MigrateVm { key, to, origin, reply } => {
                let planning = self.planning();
                let r = self
                    .decide_and_commit(|s| {
                        let reason = "requested by an operator";
                        decide::migrate_vm_with(
                            s,
                            &key,
                            to.as_deref(),
                            reason,
                            &planning.get(),
                            &mut WallClock,
                            &origin,
                        )
                    })
                    .await
                    .map(|vm| VmView::from(&read(&self.state).vms[&vm]));
                let _ = reply.send(r);
            }
            Request::HostAction { host, action, origin, reply } => {
                let r = self
                    .decide_and_commit(|s| decide::host_action(s, &host, action, &mut WallClock, &origin))
                    .await
                    .map(|id| novacron_state::HostView::from(&read(&self.state).hosts[&id]));
                let _ = reply.send(r);
            }
            Request::ApplyPolicies { docs, origin, reply } => {
                let r = self.decide_and_commit(|s| decide::apply_policies(s, &docs, &mut WallClock, &origin)).await;
                let _ = reply.send(r);
            }
            Request::RemovePolicy { name, origin, reply } => {
                let r = self.decide_and_commit(|s| decide::remove_policy(s, &name, &mut WallClock, &origin)).await;
                let _ = reply.send(r);
            }
            Request::CreateGroup { spec, origin, reply } => {
                let r =
                    self.decide_and_commit(|s| decide::create_group(s, (*spec).clone(), &mut WallClock, &origin)).await;
                let _ = reply.send(r);
            }
            Request::Model { action, origin, reply } => {
                let r = self.decide_and_commit(|s| decide::model_action(s, &action, &mut WallClock, &origin)).await;
                let _ = reply.send(r);
            }
            Request::DeleteGroup { name, origin, reply } => {
                let r = self.decide_and_commit(|s| decide::delete_group(s, &name, &mut WallClock, &origin)).await;
                let _ = reply.send(r);
            }
        }
    }

    /// Decides from the current state and commits; on a conflict, catches up and decides again.
    async fn decide_and_commit<T>(
        &mut self,
        mut decide: impl FnMut(&ClusterState) -> Result<(T, Vec<Envelope>), Refusal>,
    ) -> Result<T, EngineError> {
        for attempt in 1..=MAX_ATTEMPTS {
            let (out, events) = decide(&read(&self.state))?;
            match self.commit(&events).await {
                Ok(()) => return Ok(out),
                Err(CommitError::Conflict) if attempt < MAX_ATTEMPTS && self.cfg.role.borrow().is_leader() => {}
                Err(e) => return Err(EngineError::LogUnavailable(e.to_string())),
            }
        }
        Err(EngineError::LogUnavailable("the log kept moving".into()))
    }

    /// A reconcile pass. `periodic` (a tick, or a new term): every reconciler, including those
    /// only time moves along — failure detection and risk, scaling, rebalancing, policies.
    /// After a request: only `reconcile_with` (pending placements, restarts, deletions, drains),
    /// what a request can unblock. Under a stream of requests such passes come ten times a
    /// second, and at 10,000 hosts the time-driven reconcilers were most of their cost.
    async fn reconcile(&mut self, periodic: bool) {
        self.last_reconcile = std::time::Instant::now();
        let origin = Origin { actor: Actor::Orchestrator(self.cfg.replica.clone()), correlation: None };
        if periodic && !self.detect_failures(&origin).await {
            return;
        }
        let mut settings = self.cfg.reconcile.clone();
        settings.planning.load = self.load_view();
        let migrations = settings.migrations;
        let settings_config = settings.planning.config.clone();
        let events = decide::reconcile_with(&read(&self.state), &mut WallClock, &origin, settings);
        let events = if events.is_empty() && periodic {
            self.refresh_promoted_model().await;
            let (inputs, mut requested) = self.scaling_inputs();
            let planning = decide::Planning { config: settings_config.clone(), load: self.load_view() };
            requested.extend(decide::scale_groups(&read(&self.state), &inputs, &planning, &mut WallClock, &origin));
            requested
        } else {
            events
        };
        let events = if events.is_empty() && periodic { self.rebalance_events(&origin, migrations) } else { events };
        let events = if events.is_empty() && periodic {
            let planning = decide::Planning { config: settings_config, load: self.load_view() };
            let state = read(&self.state);
            decide::policy_pass(&state, &planning, migrations, self.cfg.rebalance.vm_cooldown, &mut WallClock, &origin)
                .events
        } else {
            events
        };
        if events.is_empty() {
            return;
        }
        if let Err(e) = self.commit(&events).await {
            tracing::warn!(error = %e, "reconcile pass not committed; the next pass retries");
        }
    }

    /// Failure detection and the hosts' failure risk. False when the detector's events could
    /// not be committed (the pass stops there; the next one retries).
    async fn detect_failures(&mut self, origin: &Origin) -> bool {
        let silences = self.silences();
        let detected = decide::detect(&read(&self.state), &silences, self.cfg.failure, &mut WallClock, origin);
        let detected = self.confirm_failures(detected).await;
        if !detected.is_empty() {
            for e in &detected {
                tracing::warn!(event = e.event.name(), payload = ?e.event, "failure detector");
            }
            if let Err(e) = self.commit(&detected).await {
                tracing::warn!(error = %e, "failure detector's events not committed; the next pass retries");
                return false;
            }
        }
        if let Some(model) = &self.cfg.risk_model {
            let risk = decide::failure_risk(&read(&self.state), model, novacron_eventlog::now_ms());
            std::sync::Arc::make_mut(&mut crate::ingest::lock(&self.cfg.observations).load).failure_risk = risk;
        }
        true
    }

    /// The rebalancer's proposals, from how long hosts have been hot (this engine's clock) and
    /// the latest telemetry. Runs only when the reconcilers had nothing more urgent to do.
    fn rebalance_events(&mut self, origin: &Origin, limits: decide::MigrationLimits) -> Vec<novacron_types::Envelope> {
        let cfg = self.cfg.rebalance;
        if !cfg.enabled {
            return Vec::new();
        }
        let now = std::time::Instant::now();
        let mut snapshot = decide::LoadSnapshot { now_ms: novacron_eventlog::now_ms(), ..Default::default() };
        {
            // Which hosts are hot, and since when. Copying the load for the planner waits
            // until some host has been hot for the hold time: most passes stop here.
            let obs = crate::ingest::lock(&self.cfg.observations);
            let util =
                |h: &novacron_types::HostId| obs.hosts.get(h).and_then(|o| o.telemetry.as_ref()).map(|t| t.cpu_util);
            self.hot_since.retain(|h, _| util(h).is_some_and(|u| u >= cfg.hot_util));
            for (host, o) in &obs.hosts {
                if o.telemetry.as_ref().is_some_and(|t| t.cpu_util >= cfg.hot_util)
                    && !self.hot_since.contains_key(host)
                {
                    self.hot_since.insert(host.clone(), now);
                }
            }
            if self.hot_since.values().all(|t| now - *t < cfg.hold) {
                return Vec::new();
            }
            for (host, o) in &obs.hosts {
                if let Some(t) = &o.telemetry {
                    snapshot.host_util.insert(host.clone(), t.cpu_util);
                }
            }
            for (vm, t) in &obs.vms {
                snapshot.vm_util.insert(*vm, t.cpu_util);
            }
            snapshot.failure_risk.clone_from(&obs.load.failure_risk);
        }
        snapshot.hot_for = self.hot_since.iter().map(|(h, t)| (h.clone(), now - *t)).collect();
        let events = {
            let state = read(&self.state);
            let in_flight = state.vms.values().filter(|v| v.migration.is_some()).count();
            decide::rebalance(
                &state,
                &snapshot,
                cfg,
                &self.cfg.reconcile.planning.config,
                in_flight,
                limits,
                &mut WallClock,
                origin,
            )
        };
        // A host that just shed a VM must stay hot for another hold time before it sheds
        // another: the rebalancer sees the effect of a move before it moves more.
        for e in &events {
            if let novacron_types::EventKind::VmMigrationPlanned(p) = &e.event {
                self.hot_since.insert(p.from.clone(), now);
            }
        }
        events
    }

    /// Loads the promoted model's artifact when the promotion changed (kept otherwise).
    async fn refresh_promoted_model(&mut self) {
        let wanted = read(&self.state).promoted.last().cloned();
        if self.promoted_model.as_ref().map(|(id, _)| id) == wanted.as_ref() {
            return;
        }
        let Some(id) = wanted else {
            self.promoted_model = None;
            return;
        };
        let digest = read(&self.state).models.get(&id).map(|m| m.trained.digest.clone());
        let Some(digest) = digest else { return };
        let loaded = match self.cfg.model_artifacts.get(&format!("sha256-{digest}")).await {
            Ok(Some(bytes)) => serde_json::from_slice::<novacron_predict::model::Artifact>(&bytes)
                .map_err(|e| e.to_string())
                .and_then(|a| a.model()),
            Ok(None) => Err(format!("artifact sha256-{digest} is missing")),
            Err(e) => Err(e),
        };
        match loaded {
            Ok(model) => {
                tracing::info!(model = %id, "forecasts now use the promoted model");
                self.promoted_model = Some((id, model));
            }
            Err(e) => {
                tracing::warn!(model = %id, error = %e, "cannot load the promoted model; keeping the previous one")
            }
        }
    }

    /// What the scaler reads: VM utilisation, each group's forecast (updated every forecast
    /// step with the mean CPU of its members, by the promoted model or else exponential
    /// smoothing) and the highest size recommended within each group's stabilization window
    /// (kept here, on this replica's clock). Also returns the retraining requests raised by
    /// drift in the live forecast errors.
    fn scaling_inputs(&mut self) -> (decide::ScalingInputs, Vec<Envelope>) {
        let now = std::time::Instant::now();
        let now_ms = novacron_eventlog::now_ms();
        // The read guard is held over a clone of the handle, not of the state: the engine is
        // the only writer, and a full copy per tick grows with the fleet.
        let shared = Arc::clone(&self.state);
        let state = read(&shared);
        // Only group members' utilisation is read (here and by `decide::scale_groups`). Every
        // VM's was copied on each tick, under the lock the telemetry and heartbeat loops
        // take: 1-3 ms at 30,000 VMs, for none when no group exists.
        let vm_util: BTreeMap<novacron_types::VmId, f64> = if state.groups.is_empty() {
            BTreeMap::new()
        } else {
            let obs = crate::ingest::lock(&self.cfg.observations);
            state
                .vms
                .values()
                .filter(|v| v.spec.group.is_some())
                .filter_map(|v| obs.vms.get(&v.id).map(|t| (v.id, t.cpu_util)))
                .collect()
        };
        let mut inputs = decide::ScalingInputs { vm_util, ..Default::default() };
        let mut requests = Vec::new();
        self.recommendations.retain(|g, _| state.groups.contains_key(g));
        self.group_load.retain(|g, _| state.groups.contains_key(g));
        let promoted = self.promoted_model.as_ref();
        for g in state.groups.values() {
            let name = g.spec.name.clone();
            let members = decide::members(&state, &name);
            let utils: Vec<f64> = members.iter().filter_map(|v| inputs.vm_util.get(&v.id).copied()).collect();
            let observed = (!utils.is_empty()).then(|| utils.iter().sum::<f64>() / utils.len() as f64);
            let (min, max, target) = decide::bounds(&state, g, now_ms);
            let n = u32::try_from(members.len()).unwrap_or(u32::MAX);
            if let Some(r) = decide::reactive_size(n, observed, target, min, max) {
                let window = Duration::from_secs(g.spec.stabilization_s);
                let recs = self.recommendations.entry(name.clone()).or_default();
                recs.push_back((now, r));
                while recs.front().is_some_and(|(t, _)| now.duration_since(*t) > window) {
                    recs.pop_front();
                }
                inputs.stable_desired.insert(name.clone(), recs.iter().map(|(_, r)| *r).max().unwrap_or(r));
            }
            if g.spec.mode == novacron_types::group::ScalingMode::Reactive {
                continue;
            }
            let step = self.cfg.forecast_step;
            let h = self.cfg.forecast_horizon_steps as usize;
            let load = self.group_load.entry(name.clone()).or_insert_with(GroupLoad::new);
            // A new promotion: the new model replays the group's history.
            let wanted = promoted.as_ref().map(|(id, _)| id.clone());
            if load.model_id != wanted {
                load.model = match promoted {
                    Some((_, m)) => m.fresh(),
                    None => Box::new(novacron_predict::model::Ses::new(0.3)),
                };
                for x in &load.history {
                    load.model.observe(*x);
                }
                load.model_id = wanted;
                load.residuals.clear();
                load.pending.clear();
            }
            let label = load.model_id.clone().unwrap_or_else(|| load.model.name());
            if !utils.is_empty() && load.last.is_none_or(|t| now.duration_since(t) >= step) {
                // The group's load as a share of its maximum size, in percent.
                let x = (utils.iter().sum::<f64>() / f64::from(g.spec.max.max(1)) * 100.0).min(100.0);
                // Score the forecasts that were due now (the prediction ledger).
                if let Some(p) = load.pending.pop_front() {
                    let err = (x - p).abs();
                    load.residuals.push_back(err);
                    if load.residuals.len() > 100 {
                        load.residuals.pop_front();
                    }
                    let mut ledger = crate::ingest::lock_ledger(&self.cfg.ledger);
                    let triggers = self.cfg.retraining;
                    let entry =
                        ledger.entry(label.clone()).or_insert_with(|| crate::ingest::LedgerEntry::new(triggers));
                    entry.forecasts += 1;
                    entry.abs_error += err;
                    let live = entry.abs_error / entry.forecasts as f64;
                    if let Some(limit) = triggers.live_mae_above
                        && entry.forecasts >= triggers.min_forecasts
                        && live > limit
                        && !entry.accuracy_alarmed
                    {
                        entry.accuracy_alarmed = true;
                        requests.push(novacron_types::model::ModelRetrainingRequested {
                            model: label.clone(),
                            group: name.clone(),
                            reason: format!(
                                "live MAE {live:.2} points over {} forecasts is above the profile's limit {limit}",
                                entry.forecasts
                            ),
                            live_mae: live,
                            forecasts: entry.forecasts,
                        });
                    }
                    if entry.drift.add(err) {
                        entry.drift_alarms += 1;
                        let mae = entry.abs_error / entry.forecasts as f64;
                        requests.push(novacron_types::model::ModelRetrainingRequested {
                            model: label.clone(),
                            group: name.clone(),
                            reason: format!(
                                "live forecast errors drifted upwards (Page-Hinkley) for group {name}; live MAE {mae:.2} points over {} forecasts",
                                entry.forecasts
                            ),
                            live_mae: mae,
                            forecasts: entry.forecasts,
                        });
                    }
                }
                load.model.observe(x);
                load.history.push_back(x);
                if load.history.len() > 400 {
                    load.history.pop_front();
                }
                load.last = Some(now);
                let p = load.model.forecast(h);
                if !p.is_nan() {
                    // Scored h steps from now; one-step scoring keeps the queue short.
                    load.pending.push_back(load.model.forecast(1));
                }
            }
            let point = load.model.forecast(h) / 100.0;
            if point.is_nan() {
                continue;
            }
            let residuals: Vec<f64> = load.residuals.iter().copied().collect();
            inputs.forecasts.insert(name, decide::forecast_note(label, point, &residuals, h, step));
        }
        let origin = Origin { actor: Actor::Orchestrator(self.cfg.replica.clone()), correlation: None };
        let events = requests
            .into_iter()
            .map(|r| decide::envelope(&mut WallClock, &origin, novacron_types::EventKind::ModelRetrainingRequested(r)))
            .collect();
        (inputs, events)
    }

    /// Where a request's planner gets its inputs, once per attempt to decide.
    fn planning(&self) -> PlanningSource {
        PlanningSource {
            config: self.cfg.reconcile.planning.config.clone(),
            observations: self.cfg.observations.clone(),
        }
    }

    fn load_view(&self) -> std::sync::Arc<novacron_scheduler::LoadView> {
        crate::ingest::load_view(&self.cfg.observations)
    }

    /// Keeps a `HostFailed` only once the host's lease is overwritten with the failure marker, on
    /// the revision its last heartbeat carried: that succeeds only if the agent has not renewed
    /// since, so its lease — shorter than the silence by the fence margin — has run out and its
    /// VMs are fenced. A host that renewed without its heartbeats arriving is alive: it counts
    /// as heard from now. Anything else (the bucket unavailable) defers the decision.
    async fn confirm_failures(&mut self, events: Vec<Envelope>) -> Vec<Envelope> {
        use async_nats::jetstream::kv;
        let mut kept = Vec::with_capacity(events.len());
        for e in events {
            let novacron_types::EventKind::HostFailed(f) = &e.event else {
                kept.push(e);
                continue;
            };
            let key = f.host.as_str();
            let seen = crate::ingest::lock(&self.cfg.observations).hosts.get(&f.host).and_then(|o| o.lease_revision);
            let marker = bytes::Bytes::from_static(novacron_protocol::LEASE_FAILED);
            let store = &self.cfg.host_leases;
            let written = match seen {
                Some(rev) => match store.update(key, marker, rev).await {
                    Ok(_) => Ok(true),
                    Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
                    Err(err) => Err(err.to_string()),
                },
                None => match store.create(key, marker).await {
                    Ok(_) => Ok(true),
                    Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
                    Err(err) => Err(err.to_string()),
                },
            };
            match written {
                Ok(true) => kept.push(e),
                Ok(false) => match store.entry(key).await {
                    // Already marked (an earlier attempt whose append failed): still failed.
                    Ok(Some(entry))
                        if entry.operation == kv::Operation::Put
                            && entry.value.as_ref() == novacron_protocol::LEASE_FAILED =>
                    {
                        kept.push(e);
                    }
                    Ok(Some(entry)) => {
                        tracing::warn!(
                            host = %f.host, seen = ?seen, revision = entry.revision, silent_ms = f.silent_ms,
                            "host renewed its lease although its heartbeats did not arrive; not failing it"
                        );
                        let mut obs = crate::ingest::lock(&self.cfg.observations);
                        let o = obs.heard_from(f.host.clone(), std::time::Instant::now());
                        o.lease_revision = Some(entry.revision);
                    }
                    Ok(None) => tracing::warn!(host = %f.host, "lease vanished while failing the host; retrying"),
                    Err(err) => tracing::warn!(host = %f.host, error = %err, "cannot read the host's lease; retrying"),
                },
                Err(err) => {
                    tracing::warn!(host = %f.host, error = %err, "cannot mark the host's lease failed; not failing it yet");
                }
            }
        }
        kept
    }

    /// The hosts silent for at least the shorter failure timeout, and for how long, on this
    /// process's monotonic clock (what `decide::detect` needs; the others count as heard from).
    /// Reads the quiet end of the observations' time index and the hosts never heard from; it
    /// walks every host only when hosts have registered since the last pass.
    fn silences(&mut self) -> std::collections::BTreeMap<novacron_types::HostId, Duration> {
        let now = std::time::Instant::now();
        let threshold = self.cfg.failure.suspect_after.min(self.cfg.failure.host_failure_timeout);
        let obs = crate::ingest::lock(&self.cfg.observations);
        let state = read(&self.state);
        let mut quiet = std::collections::BTreeMap::new();
        // Heard from: quiet if the last heartbeat and this engine's start are both at least
        // `threshold` ago — the front of the time index, not every host.
        if let Some(cutoff) = now.checked_sub(threshold)
            && self.started <= cutoff
        {
            for (h, seen) in obs.heard_last_by(cutoff) {
                if state.hosts.contains_key(h) {
                    quiet.insert(h.clone(), now.saturating_duration_since(silent_since(Some(seen), now, self.started)));
                }
            }
        }
        // Never heard from: silent since this engine first saw them. The list changes only
        // when hosts register (looked for then) or are first heard from (dropped here).
        let never_heard = |h: &novacron_types::HostId| obs.hosts.get(h).is_none_or(|o| o.last_seen.is_none());
        let (unheard, listed_at) = &mut self.unheard;
        if *listed_at != state.hosts.len() {
            *unheard = state.hosts.keys().filter(|h| never_heard(h)).cloned().collect();
            *listed_at = state.hosts.len();
        }
        unheard.retain(|h| never_heard(h));
        for h in unheard.iter() {
            let known = *self.known_since.entry(h.clone()).or_insert(now);
            let silence = now.saturating_duration_since(silent_since(None, known, self.started));
            if silence >= threshold {
                quiet.insert(h.clone(), silence);
            }
        }
        quiet
    }

    /// Appends and folds in. On any failure, re-reads the log so that the state is the log's.
    async fn commit(&mut self, events: &[Envelope]) -> Result<(), CommitError> {
        if events.is_empty() {
            return Ok(());
        }
        match self.log.append(events).await {
            Ok(seqs) => {
                let mut state = write(&self.state);
                for (seq, e) in seqs.iter().zip(events) {
                    state.apply(*seq, e);
                }
                Ok(())
            }
            Err(e) => {
                let conflict = matches!(e, AppendError::Conflict { .. });
                tracing::warn!(error = %e, "append failed; catching up from the log");
                self.catch_up().await;
                if conflict { Err(CommitError::Conflict) } else { Err(CommitError::Failed(e.to_string())) }
            }
        }
    }

    async fn catch_up(&mut self) {
        let tail = match self.log.refresh_tail().await {
            Ok(t) => t.seq,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the log tail");
                return;
            }
        };
        // Fetched a window at a time and folded in under the write lock: no copy of the state
        // (a standby catches up every pass, and a copy of a large state doubled its memory).
        // Readers see the state at the end of some window: always a state of a log prefix.
        let mut next = read(&self.state).seq + 1;
        let mut stats = FoldStats::default();
        while next <= tail {
            let to = tail.min(next + CATCH_UP_WINDOW - 1);
            let mut batch = Vec::new();
            if let Err(e) = replay(self.log.stream(), next, to, |ev| batch.push(ev)).await {
                tracing::error!(error = %e, next, "catch-up failed");
                return;
            }
            let mut state = write(&self.state);
            for ev in &batch {
                fold_one(&mut state, ev, &mut stats);
            }
            next = to + 1;
        }
        if stats.applied + stats.undecodable > 0 {
            tracing::info!(seq = read(&self.state).seq, applied = stats.applied, "caught up with the log");
        }
    }
}

/// Where a request's answer goes.
type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

/// Requests decided and appended together: creates, and reports about distinct VMs.
#[derive(Default)]
struct Group {
    creates: Vec<(Vec<VmSpec>, Origin, Reply<Vec<VmView>>)>,
    reports: Vec<(Box<Report>, Reply<ReportVerdict>)>,
    /// The VMs the reports concern.
    vms: std::collections::HashSet<novacron_types::VmId>,
}

impl Group {
    fn len(&self) -> usize {
        self.creates.len() + self.reports.len()
    }

    /// Takes the request into the group, or hands it back: not a create or a VM report, or a
    /// second report about a VM (decided after the first is in the log).
    fn admit(&mut self, req: Request) -> Result<(), Request> {
        match req {
            Request::CreateVms { specs, origin, reply } => {
                self.creates.push((specs, origin, reply));
                Ok(())
            }
            Request::Report { report, reply } => match decide::batch_key(&report) {
                Some(vm) if self.vms.insert(vm) => {
                    self.reports.push((report, reply));
                    Ok(())
                }
                _ => Err(Request::Report { report, reply }),
            },
            other => Err(other),
        }
    }
}

/// A request's planner inputs: its settings, and the load view read afresh for each decision.
/// The view is let go of before the append: telemetry that arrives while a planner holds it
/// waits to be written in (see `Observations::record_host_load`), and an append is most of a
/// request's time.
struct PlanningSource {
    config: novacron_scheduler::PlannerConfig,
    observations: crate::ingest::SharedObservations,
}

impl PlanningSource {
    fn get(&self) -> decide::Planning {
        decide::Planning { config: self.config.clone(), load: crate::ingest::load_view(&self.observations) }
    }
}

#[derive(Debug, thiserror::Error)]
enum CommitError {
    #[error("the log moved")]
    Conflict,
    #[error("{0}")]
    Failed(String),
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::silent_since;

    #[test]
    fn a_host_registering_late_is_silent_only_since_it_registered() {
        let started = Instant::now();
        let registered = started + Duration::from_secs(100);
        // Never heard from: counted from registration, not from the engine's start (the bug
        // that failed every host registering more than 30 s after start at 10,000 hosts).
        assert_eq!(silent_since(None, registered, started), registered);
        // Heard from: counted from the last heartbeat.
        let hb = registered + Duration::from_secs(3);
        assert_eq!(silent_since(Some(hb), registered, started), hb);
        // Nothing counts from before this engine (or term) started.
        let later_start = hb + Duration::from_secs(60);
        assert_eq!(silent_since(Some(hb), registered, later_start), later_start);
        assert_eq!(silent_since(None, registered, later_start), later_start);
    }
}
