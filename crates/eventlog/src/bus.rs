//! Connecting to NATS and provisioning the streams.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    stream::{Config as StreamConfig, DiscardPolicy, RetentionPolicy, Source, StorageType, SubjectTransform},
};
use novacron_protocol as proto;

/// How to reach the bus.
#[derive(Clone, Debug)]
pub struct BusConfig {
    /// One URL or a comma-separated seed list (`nats://a:4222,nats://b:4222`).
    pub urls: String,
    /// Client name, shown by the server's monitoring (`novacron-orchestrator`, `novacron-agent-h1`).
    pub name: String,
    /// Keep retrying the first connection (agents, services) instead of failing at once (CLI).
    pub retry_initial_connect: bool,
    /// Replicas for the streams (1 on a single server, 3 in a cluster).
    pub replicas: usize,
    /// Timeout of JetStream API calls and publish acks.
    pub request_timeout: Duration,
}

impl BusConfig {
    /// Defaults for a client called `name` at `urls`.
    #[must_use]
    pub fn new(urls: impl Into<String>, name: impl Into<String>) -> Self {
        BusConfig {
            urls: urls.into(),
            name: name.into(),
            retry_initial_connect: false,
            replicas: 1,
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// What can go wrong reaching or setting up the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// A URL in the list does not parse.
    #[error("invalid NATS URL {url:?}")]
    InvalidUrl {
        /// The offending URL.
        url: String,
        /// The parser's complaint.
        #[source]
        source: std::io::Error,
    },
    /// No connection.
    #[error("cannot connect to NATS at {urls}")]
    Connect {
        /// Where we tried.
        urls: String,
        /// Why it failed.
        #[source]
        source: async_nats::ConnectError,
    },
    /// The server predates what NovaCron relies on.
    #[error("nats-server {version} is too old: NovaCron needs 2.10 or newer (run `make tools` for the pinned 2.15.1)")]
    ServerTooOld {
        /// What the server said.
        version: String,
    },
    /// JetStream is off or not enabled for this account.
    #[error("JetStream is not available on the server (start nats-server with -js)")]
    JetStreamUnavailable(#[source] async_nats::jetstream::context::AccountError),
    /// A stream could not be created or updated.
    #[error("cannot provision stream {stream}")]
    Provision {
        /// The stream.
        stream: &'static str,
        /// The server's answer.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A connection plus its JetStream context.
#[derive(Clone, Debug)]
pub struct Bus {
    /// Core NATS client.
    pub client: async_nats::Client,
    /// JetStream context on it.
    pub js: jetstream::Context,
    /// Counts the connection's (re)connections: a change means the server may have restarted
    /// and lost what it kept in memory (in-memory consumers).
    pub connections: tokio::sync::watch::Receiver<u64>,
}

impl Bus {
    /// Connects with settings fit for an orchestrator: pings every 2 s (so a hung server is
    /// noticed in ~6 s, not minutes), explicit JetStream timeouts, bounded in-flight acks.
    ///
    /// # Errors
    /// Bad URL, no server, or an unsuitable server (see [`BusError`]).
    pub async fn connect(cfg: &BusConfig) -> Result<Bus, BusError> {
        let mut addrs = Vec::new();
        for url in cfg.urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let addr: async_nats::ServerAddr =
                url.parse().map_err(|source| BusError::InvalidUrl { url: url.to_owned(), source })?;
            addrs.push(addr);
        }
        let (connected, connections) = tokio::sync::watch::channel(0u64);
        let connected = std::sync::Arc::new(connected);
        let mut opts = async_nats::ConnectOptions::new()
            .event_callback(move |event| {
                let connected = connected.clone();
                async move {
                    if matches!(event, async_nats::Event::Connected) {
                        connected.send_modify(|n| *n += 1);
                    }
                }
            })
            .name(&cfg.name)
            .ping_interval(Duration::from_secs(2))
            .connection_timeout(Duration::from_secs(3))
            .subscription_capacity(256 * 1024);
        if cfg.retry_initial_connect {
            opts = opts.retry_on_initial_connect();
        }
        let client =
            opts.connect(addrs).await.map_err(|source| BusError::Connect { urls: cfg.urls.clone(), source })?;
        if cfg.retry_initial_connect {
            // The client connects in the background; wait for it, so that the server's INFO
            // (its version) is known before anyone asks.
            let mut waited = Duration::ZERO;
            while client.connection_state() != async_nats::connection::State::Connected {
                if waited.as_millis().is_multiple_of(5000) && !waited.is_zero() {
                    tracing::warn!(urls = %cfg.urls, waited_s = waited.as_secs(), "still waiting for NATS");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                waited += Duration::from_millis(50);
            }
        }
        let js = jetstream::ContextBuilder::new()
            .timeout(cfg.request_timeout)
            .max_ack_inflight(4096)
            .backpressure_on_inflight(true)
            .build(client.clone());
        Ok(Bus { client, js, connections })
    }

    /// Checks the server version and JetStream, then creates or updates the five streams.
    /// Safe to call from every process at every start.
    ///
    /// # Errors
    /// An old server, no JetStream, or a stream whose existing config cannot be changed.
    pub async fn provision(&self, replicas: usize) -> Result<(), BusError> {
        let info = self.client.server_info();
        if !version_at_least(&info.version, 2, 10) {
            return Err(BusError::ServerTooOld { version: info.version });
        }
        self.js.query_account().await.map_err(BusError::JetStreamUnavailable)?;
        for cfg in stream_configs(replicas) {
            let name = static_name(&cfg.name);
            self.ensure_stream(name, cfg).await?;
        }
        self.host_leases(replicas).await?;
        self.model_artifacts(replicas).await?;
        Ok(())
    }

    /// Opens the store of trained models' artifacts ([`proto::MODEL_OBJECTS_BUCKET`]), creating
    /// it if missing; artifacts in the KV bucket of earlier versions stay readable.
    ///
    /// # Errors
    /// When JetStream refuses to create it.
    pub async fn model_artifacts(&self, replicas: usize) -> Result<Artifacts, BusError> {
        let objects = match self.js.get_object_store(proto::MODEL_OBJECTS_BUCKET).await {
            Ok(store) => store,
            Err(_) => self
                .js
                .create_object_store(jetstream::object_store::Config {
                    bucket: proto::MODEL_OBJECTS_BUCKET.into(),
                    description: Some("NovaCron forecasting model artifacts, named sha256-<digest>".into()),
                    storage: StorageType::File,
                    num_replicas: replicas.max(1),
                    ..Default::default()
                })
                .await
                .map_err(|e| BusError::Provision { stream: "OBJ_nc-model-objects", source: Box::new(e) })?,
        };
        let legacy = self.js.get_key_value(proto::MODEL_ARTIFACTS_BUCKET).await.ok();
        Ok(Artifacts { objects, legacy })
    }

    /// Opens the agents' lease bucket ([`proto::HOST_LEASE_BUCKET`]), creating it if missing.
    ///
    /// # Errors
    /// When JetStream refuses to create it.
    pub async fn host_leases(&self, replicas: usize) -> Result<jetstream::kv::Store, BusError> {
        if let Ok(store) = self.js.get_key_value(proto::HOST_LEASE_BUCKET).await {
            return Ok(store);
        }
        self.js
            .create_key_value(jetstream::kv::Config {
                bucket: proto::HOST_LEASE_BUCKET.into(),
                description: "NovaCron agents' fencing leases, one key per host".into(),
                history: 1,
                // File storage: revisions keep rising across server restarts, so a revision
                // the orchestrator saw never names a later write.
                storage: StorageType::File,
                num_replicas: replicas.max(1),
                ..Default::default()
            })
            .await
            .map_err(|e| BusError::Provision { stream: "KV_nc-host-leases", source: Box::new(e) })
    }

    async fn ensure_stream(&self, name: &'static str, cfg: StreamConfig) -> Result<(), BusError> {
        let prov = |e: Box<dyn std::error::Error + Send + Sync>| BusError::Provision { stream: name, source: e };
        let mut stream = self.js.get_or_create_stream(cfg.clone()).await.map_err(|e| prov(Box::new(e)))?;
        let current = stream.info().await.map_err(|e| prov(Box::new(e)))?.config.clone();
        let differs = current.subjects != cfg.subjects
            || current.max_age != cfg.max_age
            || current.max_bytes != cfg.max_bytes
            || current.max_messages != cfg.max_messages
            || current.duplicate_window != cfg.duplicate_window
            || current.allow_direct != cfg.allow_direct
            || current.discard != cfg.discard
            // Raise a consumer cap below ours (a stream created by an older build on 2.15);
            // leave "unlimited" on older servers alone.
            || (current.max_consumers > 0 && current.max_consumers < cfg.max_consumers);
        if differs {
            tracing::info!(stream = name, "updating stream configuration");
            self.js.update_stream(cfg).await.map_err(|e| prov(Box::new(e)))?;
        }
        Ok(())
    }
}

fn static_name(name: &str) -> &'static str {
    match name {
        proto::EVENTS_STREAM => proto::EVENTS_STREAM,
        proto::REPORTS_STREAM => proto::REPORTS_STREAM,
        proto::TELEMETRY_STREAM => proto::TELEMETRY_STREAM,
        proto::COMMANDS_STREAM => proto::COMMANDS_STREAM,
        _ => proto::DEADLETTER_STREAM,
    }
}

/// `major.minor` of a `x.y.z[-suffix]` version string is at least the given one.
#[must_use]
pub fn version_at_least(version: &str, major: u64, minor: u64) -> bool {
    let mut parts = version.trim_start_matches('v').split(['.', '-']);
    let maj = parts.next().and_then(|p| p.parse::<u64>().ok());
    let min = parts.next().and_then(|p| p.parse::<u64>().ok());
    match (maj, min) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => false,
    }
}

/// Durable consumers EVENTS and COMMANDS allow: one per host agent, plus the replicas and tools.
/// nats-server 2.15 caps a stream at 1,000 consumers unless the stream sets its own limit
/// (and a limit of zero or below means "the server's default", not "unlimited"), which would
/// stop the 1,001st host from ever receiving a command.
pub const MAX_EVENTS_CONSUMERS: i32 = 1_000_000;

/// The streams of the bus contract (see `novacron_protocol`): the four of `DESIGN.md` and
/// COMMANDS, the server's per-host copy of the log's commands.
#[must_use]
pub fn stream_configs(replicas: usize) -> Vec<StreamConfig> {
    const DAY: Duration = Duration::from_secs(24 * 3600);
    let subjects = |s: &[&str]| s.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    let events = StreamConfig {
        name: proto::EVENTS_STREAM.into(),
        description: Some("NovaCron's log of record: events and commands".into()),
        subjects: subjects(&proto::EVENTS_SUBJECTS),
        storage: StorageType::File,
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::New,
        max_age: Duration::ZERO,
        duplicate_window: Duration::from_secs(120),
        max_message_size: 1024 * 1024,
        allow_direct: true,
        deny_delete: true,
        deny_purge: true,
        num_replicas: replicas,
        max_bytes: -1,
        max_messages: -1,
        max_consumers: MAX_EVENTS_CONSUMERS,
        ..Default::default()
    };
    // A copy of the log's commands, kept and protected as the log itself.
    let commands = StreamConfig {
        name: proto::COMMANDS_STREAM.into(),
        description: Some("Each host's commands, copied from EVENTS under nc.hostcmd.<host>".into()),
        // Nothing publishes here: the server copies every command from the log, in log order,
        // under one literal subject per host.
        subjects: Vec::new(),
        sources: Some(vec![Source {
            name: proto::EVENTS_STREAM.into(),
            subject_transforms: vec![SubjectTransform {
                source: proto::COMMANDS_SOURCE_FILTER.into(),
                destination: proto::COMMANDS_SOURCE_TRANSFORM.into(),
            }],
            ..Default::default()
        }]),
        ..events.clone()
    };
    vec![
        events,
        commands,
        StreamConfig {
            name: proto::REPORTS_STREAM.into(),
            description: Some("Agents' reports; consumed once each by the orchestrator".into()),
            subjects: subjects(&proto::REPORTS_SUBJECTS),
            storage: StorageType::File,
            retention: RetentionPolicy::WorkQueue,
            discard: DiscardPolicy::New,
            max_age: 7 * DAY,
            max_messages: 1_000_000,
            max_bytes: -1,
            max_message_size: 256 * 1024,
            duplicate_window: Duration::from_secs(120),
            num_replicas: replicas,
            ..Default::default()
        },
        StreamConfig {
            name: proto::TELEMETRY_STREAM.into(),
            description: Some("Host and VM telemetry samples".into()),
            subjects: subjects(&proto::TELEMETRY_SUBJECTS),
            storage: StorageType::File,
            retention: RetentionPolicy::Limits,
            discard: DiscardPolicy::Old,
            max_age: DAY,
            max_bytes: 1024 * 1024 * 1024,
            max_messages: -1,
            max_message_size: 64 * 1024,
            duplicate_window: Duration::from_secs(60),
            num_replicas: replicas,
            ..Default::default()
        },
        StreamConfig {
            name: proto::DEADLETTER_STREAM.into(),
            description: Some("Rejected messages with the reason".into()),
            subjects: subjects(&proto::DEADLETTER_SUBJECTS),
            storage: StorageType::File,
            retention: RetentionPolicy::Limits,
            discard: DiscardPolicy::Old,
            max_age: 7 * DAY,
            max_messages: 100_000,
            max_bytes: -1,
            max_message_size: 2 * 1024 * 1024,
            duplicate_window: Duration::from_secs(120),
            num_replicas: replicas,
            ..Default::default()
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::version_at_least;

    #[test]
    fn server_versions_are_compared_by_major_and_minor() {
        assert!(version_at_least("2.15.1", 2, 10));
        assert!(version_at_least("2.10.0-beta.1", 2, 10));
        assert!(version_at_least("3.0.0", 2, 10));
        assert!(!version_at_least("2.9.10", 2, 10));
        assert!(!version_at_least("garbage", 2, 10));
    }
}

/// Trained models' artifacts by name (`sha256-<digest>`), in a JetStream object store: chunked,
/// so an artifact may be any size (boosted trees run to megabytes, past the server's 1 MiB
/// message limit that bounded the KV bucket earlier versions used — still read here).
#[derive(Clone)]
pub struct Artifacts {
    objects: jetstream::object_store::ObjectStore,
    legacy: Option<jetstream::kv::Store>,
}

impl Artifacts {
    /// Stores `bytes` under `name` (a digest names one content: storing it again is harmless).
    ///
    /// # Errors
    /// When JetStream refuses the write.
    pub async fn put(&self, name: &str, bytes: &[u8]) -> Result<(), String> {
        let mut reader = bytes;
        self.objects.put(name, &mut reader).await.map(|_| ()).map_err(|e| e.to_string())
    }

    /// The artifact `name`, if stored.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, String> {
        use jetstream::object_store::GetErrorKind;
        use tokio::io::AsyncReadExt;
        match self.objects.get(name).await {
            Ok(mut object) => {
                let mut bytes = Vec::new();
                object.read_to_end(&mut bytes).await.map_err(|e| e.to_string())?;
                Ok(Some(bytes))
            }
            Err(e) if e.kind() == GetErrorKind::NotFound => match &self.legacy {
                Some(kv) => kv.get(name).await.map(|v| v.map(|b| b.to_vec())).map_err(|e| e.to_string()),
                None => Ok(None),
            },
            Err(e) => Err(e.to_string()),
        }
    }
}
