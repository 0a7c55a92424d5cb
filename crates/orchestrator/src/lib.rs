//! NovaCron's orchestrator.
//!
//! A thin I/O shell around the pure core: it recovers the state from the log (snapshot + tail),
//! turns agents' reports and operators' requests into events through [`decide`], appends them
//! with the fenced writer of `novacron-eventlog`, and serves the HTTP API.
//!
//! ```text
//!   HTTP API ──► EngineHandle ──► engine task ──► EventLog.append ──► EVENTS stream
//!   REPORTS ───► ingest::reports ─┘    │ fold            (events and commands, nc.cmd.<host>.<vm>)
//!   TELEMETRY ─► ingest::telemetry ─► observations (latest per host/VM, not logged)
//!   nc.hb.* ───► ingest::heartbeats ─┘
//! ```
//! Several replicas may run: they elect a leader through a KV lease ([`leader`]). The leader acts
//! (appends, reconciles, consumes reports, answers writes); standbys fold the log as it grows and
//! serve reads, answering writes with the leader's address. The log's expected-sequence check is
//! the real fence: a deposed leader's appends are refused.

pub mod api;
pub mod decide;
pub mod engine;
pub mod ingest;
pub mod leader;
pub mod metrics;
pub mod openapi;
mod snapshotter;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use novacron_eventlog::{Bus, BusConfig, EventLog, SnapshotStore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use engine::{EngineHandle, SharedState};

/// How to run an orchestrator.
#[derive(Clone, Debug)]
pub struct OrchestratorConfig {
    /// NATS URL(s), comma-separated.
    pub nats: String,
    /// Where the HTTP API listens (`127.0.0.1:0` picks a free port).
    pub http: SocketAddr,
    /// Local data: snapshots (`<dir>/snapshots`) and the bound address (`<dir>/orchestrator.addr`).
    pub data_dir: PathBuf,
    /// This replica's name.
    pub replica_id: String,
    /// Stream replicas (1 single server, 3 cluster).
    pub replicas: usize,
    /// How often reconcilers run.
    pub reconcile_interval: Duration,
    /// Snapshot after this many events, or after as many as the state has hosts and VMs if
    /// that is more (a save costs in proportion to the state).
    pub snapshot_every: u64,
    /// Heartbeat silence after which a host is suspected.
    pub suspect_after: Duration,
    /// Heartbeat silence after which a host is failed and its VMs placed elsewhere.
    pub host_failure_timeout: Duration,
    /// The agents' lease; must end `FENCE_MARGIN` before `host_failure_timeout`.
    pub agent_lease: Duration,
    /// How failed VMs are restarted.
    pub restart: decide::RestartTimings,
    /// How many live migrations (drains) may run at once.
    pub migration_limits: decide::MigrationLimits,
    /// Placement strategy, overcommit, limits and score weights.
    pub planner: novacron_scheduler::PlannerConfig,
    /// The leader lease.
    pub lease: leader::LeaseConfig,
    /// The load-aware rebalancer.
    pub rebalance: decide::RebalanceSettings,
    /// How often a predictive group's load model samples its members' mean CPU (5 min).
    pub forecast_step: Duration,
    /// How many steps ahead predictive scaling provisions for (1: the next 5 minutes, which
    /// covers a VM's start).
    pub forecast_horizon_steps: u32,
    /// When live forecast errors call for retraining.
    pub retraining: ingest::RetrainingTriggers,
    /// The most members a group may be created with.
    pub max_group_members: u32,
    /// Scores hosts' failure histories for placement (`models risk --save`); `None` ignores
    /// failure risk.
    pub risk_model: Option<novacron_predict::risk::RiskModel>,
    /// When set, every `/api/v1` request must carry `Authorization: Bearer <token>`; health,
    /// readiness, metrics and the dashboard's page stay open.
    pub token: Option<String>,
}

impl OrchestratorConfig {
    /// Defaults: `127.0.0.1:8080`, replica `orchestrator-1`, reconcile every 500 ms, snapshot
    /// every 10,000 events.
    #[must_use]
    pub fn new(nats: impl Into<String>, data_dir: PathBuf) -> Self {
        OrchestratorConfig {
            nats: nats.into(),
            http: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir,
            replica_id: "orchestrator-1".into(),
            replicas: 1,
            reconcile_interval: Duration::from_millis(500),
            snapshot_every: 10_000,
            suspect_after: Duration::from_secs(5),
            host_failure_timeout: novacron_protocol::DEFAULT_HOST_FAILURE_TIMEOUT,
            agent_lease: novacron_protocol::DEFAULT_AGENT_LEASE,
            restart: decide::RestartTimings::default(),
            migration_limits: decide::MigrationLimits::default(),
            planner: novacron_scheduler::PlannerConfig::default(),
            lease: leader::LeaseConfig::default(),
            rebalance: decide::RebalanceSettings::default(),
            forecast_step: Duration::from_secs(300),
            forecast_horizon_steps: 1,
            retraining: ingest::RetrainingTriggers::default(),
            max_group_members: 10_000,
            risk_model: None,
            token: None,
        }
    }
}

/// What stops an orchestrator from starting.
#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    /// NATS trouble.
    #[error("bus")]
    Bus(#[from] novacron_eventlog::BusError),
    /// The log could not be opened or replayed.
    #[error("event log: {0}")]
    Log(String),
    /// Local data directory trouble.
    #[error("data directory {path}")]
    DataDir {
        /// Which.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Snapshot store trouble.
    #[error("snapshot store")]
    Snapshots(#[from] novacron_eventlog::SnapshotError),
    /// The HTTP listener could not bind.
    #[error("cannot listen on {addr}")]
    Listen {
        /// Where.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A background loop could not start.
    #[error("{0}")]
    Loop(String),
    /// The configuration breaks an invariant.
    #[error("configuration: {0}")]
    Config(String),
}

/// A running orchestrator.
pub struct Orchestrator {
    /// Where the HTTP API actually listens.
    pub http_addr: SocketAddr,
    /// The engine, for in-process callers.
    pub engine: EngineHandle,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Orchestrator {
    /// Connects, provisions, recovers the state and starts every loop and the API. Returns once
    /// the API listens and the state is caught up.
    ///
    /// # Errors
    /// See [`OrchestratorError`].
    pub async fn start(cfg: OrchestratorConfig, cancel: CancellationToken) -> Result<Orchestrator, OrchestratorError> {
        let _ = metrics::prometheus();
        novacron_protocol::check_fencing(cfg.agent_lease, cfg.host_failure_timeout)
            .map_err(OrchestratorError::Config)?;
        if cfg.suspect_after >= cfg.host_failure_timeout {
            return Err(OrchestratorError::Config(format!(
                "suspect_after {:?} must be shorter than the host-failure timeout {:?}",
                cfg.suspect_after, cfg.host_failure_timeout
            )));
        }
        let dir_err = |source| OrchestratorError::DataDir { path: cfg.data_dir.clone(), source };
        std::fs::create_dir_all(&cfg.data_dir).map_err(dir_err)?;
        let mut bus_cfg = BusConfig::new(cfg.nats.clone(), format!("novacron-{}", cfg.replica_id));
        bus_cfg.retry_initial_connect = true;
        let bus = Bus::connect(&bus_cfg).await?;
        bus.provision(cfg.replicas).await?;
        let host_leases = bus.host_leases(cfg.replicas).await?;
        let model_artifacts = bus.model_artifacts(cfg.replicas).await?;
        let ledger: ingest::SharedLedger = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
        let log = EventLog::open(bus.js.clone()).await.map_err(|e| OrchestratorError::Log(e.to_string()))?;
        let snapshots = SnapshotStore::open(&cfg.data_dir.join("snapshots"))?;
        let listener = tokio::net::TcpListener::bind(cfg.http)
            .await
            .map_err(|source| OrchestratorError::Listen { addr: cfg.http, source })?;
        let http_addr = listener.local_addr().map_err(|source| OrchestratorError::Listen { addr: cfg.http, source })?;
        let (role_tx, role) = tokio::sync::watch::channel(leader::Role::Starting);
        let observations = Arc::new(Mutex::new(ingest::Observations::default()));
        let engine_cfg = engine::EngineConfig {
            replica: cfg.replica_id.clone(),
            reconcile_interval: cfg.reconcile_interval,
            failure: decide::FailureTimeouts {
                suspect_after: cfg.suspect_after,
                host_failure_timeout: cfg.host_failure_timeout,
                agent_lease: cfg.agent_lease,
            },
            observations: observations.clone(),
            forecast_step: cfg.forecast_step,
            forecast_horizon_steps: cfg.forecast_horizon_steps.max(1),
            model_artifacts: model_artifacts.clone(),
            ledger: ledger.clone(),
            retraining: cfg.retraining,
            host_leases,
            reconcile: decide::ReconcileSettings {
                restart: cfg.restart,
                migrations: cfg.migration_limits,
                planning: decide::Planning { config: cfg.planner.clone(), load: Default::default() },
            },
            role: role.clone(),
            http: format!("http://{http_addr}"),
            rebalance: cfg.rebalance,
            risk_model: cfg.risk_model.clone(),
        };
        let engine::Recovered { engine, handle, rx, stream_created_ns, snapshot_seq } =
            engine::Engine::recover(engine_cfg, log, &snapshots).await?;
        let stream = bus
            .js
            .get_stream(novacron_protocol::EVENTS_STREAM)
            .await
            .map_err(|e| OrchestratorError::Log(e.to_string()))?;
        // The snapshot task's own copy starts as the recovered state (see `snapshotter`).
        let snapshots = snapshotter::Snapshotter {
            state: engine::read(&handle.state).clone(),
            stream: stream.clone(),
            store: Arc::new(snapshots),
            stream_created_ns,
            every: cfg.snapshot_every.max(1),
            saved_at: snapshot_seq,
        };

        let tracker = TaskTracker::new();
        let lease = leader::bucket(&bus.js, cfg.lease, cfg.replicas).await.map_err(OrchestratorError::Loop)?;
        let me = leader::LeaderInfo {
            replica: cfg.replica_id.clone(),
            http: format!("http://{http_addr}"),
            process: uuid::Uuid::now_v7().to_string(),
        };
        tracker.spawn(leader::run(lease, me, cfg.lease, role_tx, cancel.clone()));
        tracker.spawn(engine.run(rx, handle.ready.clone(), cancel.clone()));
        tracker.spawn(snapshots.run(cancel.clone()));
        spawn_loop(
            &tracker,
            &cancel,
            "reports",
            ingest::reports(bus.clone(), handle.clone(), role.clone(), cancel.clone()),
        );
        spawn_loop(
            &tracker,
            &cancel,
            "telemetry",
            ingest::telemetry(
                bus.clone(),
                handle.clone(),
                observations.clone(),
                cfg.replica_id.clone(),
                cancel.clone(),
            ),
        );
        spawn_loop(
            &tracker,
            &cancel,
            "heartbeats",
            ingest::heartbeats(bus.clone(), handle.clone(), observations.clone(), cancel.clone()),
        );

        std::fs::write(cfg.data_dir.join("orchestrator.addr"), http_addr.to_string()).map_err(dir_err)?;
        let passes = Arc::new((cfg.planner.clone(), cfg.migration_limits, cfg.rebalance.vm_cooldown));
        let app = api::router(api::Api {
            engine: handle.clone(),
            observations,
            client: bus.client.clone(),
            events: stream,
            role,
            passes,
            model_artifacts,
            ledger,
            max_group_members: cfg.max_group_members,
            shutdown: cancel.clone(),
        });
        let app = api::require_token(app, cfg.token.clone());
        let shutdown = cancel.clone();
        tracker.spawn(async move {
            let served = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
        tracker.close();
        tracing::info!(%http_addr, replica = %cfg.replica_id, "orchestrator ready");
        Ok(Orchestrator { http_addr, engine: handle, tracker, cancel })
    }

    /// Waits until every task has stopped (after the cancellation token fired).
    pub async fn wait(self) {
        self.tracker.wait().await;
    }

    /// Stops everything and waits.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.wait().await;
    }
}

fn spawn_loop(
    tracker: &TaskTracker,
    cancel: &CancellationToken,
    name: &'static str,
    fut: impl std::future::Future<Output = Result<(), String>> + Send + 'static,
) {
    let cancel = cancel.clone();
    tracker.spawn(async move {
        // Dropped at cancellation wherever it waits (a dead letter or an ack on a bus that is
        // gone waits out a timeout); an unacknowledged report comes back to the next leader.
        if let Some(Err(e)) = cancel.run_until_cancelled(fut).await {
            tracing::error!(loop_name = name, error = %e, "loop could not start; stopping the orchestrator");
            cancel.cancel();
        }
    });
}
