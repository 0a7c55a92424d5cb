//! What comes in from agents and other systems: reports, telemetry, heartbeats.
//!
//! Each message is parsed at the edge — subject, content type, schema, values, and whether its
//! host or VM is one we know — and anything that fails goes to `nc.deadletter.<source>` with the
//! reason and the original bytes, and a counter rises. Nothing here panics on input.
//!
//! Reports are acknowledged only after the engine has appended their events, so a crash in
//! between redelivers them; the engine's state check makes the second delivery a no-op.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use bytes::Bytes;
use futures::StreamExt;
use novacron_eventlog::{Bus, DeadLetters};
use novacron_protocol::{self as proto, Subject};
use novacron_types::telemetry::{Heartbeat, HostTelemetry, VmSample, VmTelemetry};
use novacron_types::{ContentType, HostId, Report, Validate, VmId};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::engine::{EngineError, EngineHandle, ReportVerdict, read};
use crate::metrics as m;

/// The latest liveness and load we have seen per host and VM. Not part of the log: telemetry
/// is high-volume and lossy by design; decisions that use it record what they read.
#[derive(Default)]
pub struct Observations {
    /// Per host: last heartbeat and last telemetry sample.
    pub hosts: BTreeMap<HostId, HostObservation>,
    /// The hosts heard from, by when (each host's `last_seen`), oldest first: the failure
    /// detector takes the quiet ones from the front instead of walking every host (at 10,000
    /// hosts that walk, under this lock, was 3-9 ms of every tick). Kept by [`Self::heard_from`].
    by_last_seen: std::collections::BTreeSet<(std::time::Instant, HostId)>,
    /// Per VM: last telemetry sample.
    pub vms: BTreeMap<VmId, VmTelemetry>,
    /// What the planners read, kept up to date as samples arrive (every planning pass takes
    /// a reference, not a copy: with 10,000 hosts, building it afresh per pass was a sixth of
    /// the orchestrator's time). Its `failure_risk` is what the leader scored in its last
    /// reconcile pass (`decide::failure_risk`); empty without a risk model or any failure.
    /// Read it through [`load_view`], which first folds in `pending_load`.
    pub load: std::sync::Arc<novacron_scheduler::LoadView>,
    /// Host samples that arrived while a planner held `load`, oldest first. Written into
    /// `load` in place then would copy it — at 10,000 hosts a copy per sample was a large
    /// share of the orchestrator's CPU under a stream of creates; they wait here instead
    /// until the next reader or the next sample that finds `load` free.
    pending_load: Vec<(HostId, f64, u64)>,
}

impl Observations {
    /// Records that `host` was heard from at `now` (a heartbeat, or a lease renewal seen in
    /// its place); the only writer of `last_seen`, which it keeps in step with the time index.
    pub(crate) fn heard_from(&mut self, host: HostId, now: std::time::Instant) -> &mut HostObservation {
        let entry = self.hosts.entry(host.clone()).or_default();
        if let Some(before) = entry.last_seen.replace(now) {
            self.by_last_seen.remove(&(before, host.clone()));
        }
        self.by_last_seen.insert((now, host));
        entry
    }

    /// The hosts last heard from at or before `cutoff`, oldest first, with when.
    pub(crate) fn heard_last_by(
        &self,
        cutoff: std::time::Instant,
    ) -> impl Iterator<Item = (&HostId, std::time::Instant)> {
        self.by_last_seen.iter().take_while(move |(at, _)| *at <= cutoff).map(|(at, h)| (h, *at))
    }

    /// Records a host's CPU utilisation sample (taken at `at_ms`) in the planners' view:
    /// in place when no planner holds the view, else queued for [`load_view`].
    pub(crate) fn record_host_load(&mut self, host: HostId, cpu_util: f64, at_ms: u64) {
        self.pending_load.push((host, cpu_util, at_ms));
        if std::sync::Arc::get_mut(&mut self.load).is_some() {
            self.fold_pending_load();
        }
    }

    /// Writes the queued samples into `load`, in arrival order (a copy only if a reader still
    /// holds the view).
    fn fold_pending_load(&mut self) {
        if self.pending_load.is_empty() {
            return;
        }
        let load = std::sync::Arc::make_mut(&mut self.load);
        for (host, util, at_ms) in self.pending_load.drain(..) {
            load.cpu_util.insert(host, util);
            load.watermark_ms = Some(load.watermark_ms.map_or(at_ms, |w| w.max(at_ms)));
        }
    }
}

/// What we last saw of one host.
#[derive(Clone, Debug, Default)]
pub struct HostObservation {
    /// When its last heartbeat was sent (agent clock, ms).
    pub last_heartbeat_ms: Option<u64>,
    /// When its last heartbeat arrived, on this process's monotonic clock: what failure
    /// detection measures (never the agent's clock). Written through
    /// [`Observations::heard_from`] only.
    pub last_seen: Option<std::time::Instant>,
    /// The lease revision its last heartbeat carried: the failure detector declares the host
    /// failed only by overwriting that revision in KV `nc-host-leases`.
    pub lease_revision: Option<u64>,
    /// Its last telemetry sample.
    pub telemetry: Option<HostTelemetry>,
}

/// The planner's load view: the latest CPU utilisation per host from telemetry, and the
/// hosts' failure risk (shared, not copied).
pub(crate) fn load_view(obs: &SharedObservations) -> std::sync::Arc<novacron_scheduler::LoadView> {
    let mut obs = lock(obs);
    obs.fold_pending_load();
    std::sync::Arc::clone(&obs.load)
}

/// Live accuracy of one model's forecasts, scored as actuals arrive.
#[derive(Clone, Debug)]
pub struct LedgerEntry {
    /// Forecasts scored.
    pub forecasts: u64,
    /// Sum of absolute errors, CPU-% points.
    pub abs_error: f64,
    /// Drift detector over the errors.
    pub drift: novacron_predict::eval::PageHinkley,
    /// How often it raised the alarm.
    pub drift_alarms: u64,
    /// Whether the accuracy trigger has fired for it.
    pub accuracy_alarmed: bool,
}

/// When live forecast errors call for retraining.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetrainingTriggers {
    /// Page–Hinkley tolerance: a rise of the mean error smaller than this (points) is noise.
    pub drift_delta: f64,
    /// Page–Hinkley threshold: the cumulated excess (point-steps) that raises the alarm.
    pub drift_lambda: f64,
    /// Also request retraining once the live MAE exceeds this (points), if set.
    pub live_mae_above: Option<f64>,
    /// …after at least this many scored forecasts.
    pub min_forecasts: u64,
}

impl Default for RetrainingTriggers {
    fn default() -> Self {
        RetrainingTriggers { drift_delta: 2.0, drift_lambda: 100.0, live_mae_above: None, min_forecasts: 50 }
    }
}

impl LedgerEntry {
    pub(crate) fn new(t: RetrainingTriggers) -> LedgerEntry {
        LedgerEntry {
            forecasts: 0,
            abs_error: 0.0,
            drift: novacron_predict::eval::PageHinkley::new(t.drift_delta, t.drift_lambda),
            drift_alarms: 0,
            accuracy_alarmed: false,
        }
    }
}

/// The prediction ledger: per model (id, or the built-in smoothing), its live accuracy.
pub type SharedLedger = Arc<Mutex<BTreeMap<String, LedgerEntry>>>;

pub(crate) fn lock_ledger(l: &SharedLedger) -> std::sync::MutexGuard<'_, BTreeMap<String, LedgerEntry>> {
    l.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Shared observations.
pub type SharedObservations = Arc<Mutex<Observations>>;

pub(crate) fn lock(o: &SharedObservations) -> std::sync::MutexGuard<'_, Observations> {
    o.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How long a delivered report may stay unacknowledged before JetStream redelivers it.
pub const REPORT_ACK_WAIT: Duration = Duration::from_secs(3);

/// A message that did not make it past the edge: where it came from and why.
struct Rejection(String);

fn decode<T: DeserializeOwned + Validate>(
    headers: Option<&async_nats::HeaderMap>,
    payload: &[u8],
) -> Result<T, Rejection> {
    let ct = headers.and_then(|h| h.get(proto::HEADER_CONTENT_TYPE)).map(|v| v.as_str().to_owned());
    let ct = ContentType::from_header(ct.as_deref()).map_err(|e| Rejection(e.to_string()))?;
    let msg: T = novacron_types::decode(payload, ct).map_err(|e| Rejection(e.to_string()))?;
    msg.validate().map_err(|e| Rejection(e.to_string()))?;
    Ok(msg)
}

fn content_type(headers: Option<&async_nats::HeaderMap>) -> Option<String> {
    headers.and_then(|h| h.get(proto::HEADER_CONTENT_TYPE)).map(|v| v.as_str().to_owned())
}

async fn durable(
    bus: &Bus,
    stream: &str,
    name: &str,
    filter: &str,
    ack: AckPolicy,
    deliver: DeliverPolicy,
) -> Result<PullConsumer, String> {
    let s = bus.js.get_stream(stream).await.map_err(|e| e.to_string())?;
    let config = pull::Config {
        durable_name: Some(name.to_owned()),
        filter_subject: filter.to_owned(),
        ack_policy: ack,
        // Reports in flight to a crashed orchestrator come back after ack_wait: keep it short
        // so a restarted (or standby) orchestrator resumes within seconds. Handling one takes
        // milliseconds; a bounded number in flight keeps slow periods from expiring them.
        ack_wait: REPORT_ACK_WAIT,
        deliver_policy: deliver,
        max_ack_pending: 512,
        // A consumer that acknowledges nothing has no position worth keeping on disk
        // (telemetry: each replica starts from new samples): its state stays in memory,
        // which spares the server a file rewrite (a new inode) per state flush.
        memory_storage: ack == AckPolicy::None,
        ..Default::default()
    };
    let consumer: PullConsumer = s.get_or_create_consumer(name, config.clone()).await.map_err(|e| e.to_string())?;
    if consumer.cached_info().config.memory_storage == config.memory_storage || ack != AckPolicy::None {
        return Ok(consumer);
    }
    // An earlier version made it file-stored, which cannot be changed in place; a consumer
    // that acknowledges nothing loses nothing by being made again.
    s.delete_consumer(name).await.map_err(|e| e.to_string())?;
    tracing::info!(consumer = name, "consumer of an earlier version replaced by an in-memory one");
    s.create_consumer(config).await.map_err(|e| e.to_string())
}

/// Runs `each` on every message of a durable consumer until cancelled, recreating the message
/// stream after errors with backoff.
async fn consume<F, Fut>(consumer: PullConsumer, what: &'static str, cancel: CancellationToken, mut each: F)
where
    F: FnMut(async_nats::jetstream::Message) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut backoff = Duration::from_millis(100);
    while let Some(mut messages) = messages_of(&consumer, what, &mut backoff, &cancel).await {
        loop {
            let next = tokio::select! { () = cancel.cancelled() => return, n = messages.next() => n };
            match next {
                Some(Ok(msg)) => each(msg).await,
                Some(Err(e)) => tracing::debug!(consumer = what, error = %e, "consumer hiccup"),
                None => break,
            }
        }
    }
}

/// A consumer's message stream, asked for again with backoff (100 ms doubling to 5 s, reset
/// once one is given) while the server does not give one. `None` once cancelled.
async fn messages_of(
    consumer: &PullConsumer,
    what: &'static str,
    backoff: &mut Duration,
    cancel: &CancellationToken,
) -> Option<async_nats::jetstream::consumer::pull::Stream> {
    while !cancel.is_cancelled() {
        match consumer.messages().await {
            Ok(m) => {
                *backoff = Duration::from_millis(100);
                return Some(m);
            }
            Err(e) => {
                tracing::warn!(consumer = what, error = %e, "consumer unavailable; retrying");
                tokio::select! { () = cancel.cancelled() => return None, () = tokio::time::sleep(*backoff) => {} }
                *backoff = (*backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    None
}

/// Consumes REPORTS while this replica leads: validate, hand to the engine, ack after the
/// append. Standbys leave them in the work queue for the leader.
pub(crate) async fn reports(
    bus: Bus,
    engine: EngineHandle,
    mut role: tokio::sync::watch::Receiver<crate::leader::Role>,
    cancel: CancellationToken,
) -> Result<(), String> {
    let consumer = durable(
        &bus,
        proto::REPORTS_STREAM,
        proto::ORCHESTRATOR_REPORTS_CONSUMER,
        "nc.report.>",
        AckPolicy::Explicit,
        DeliverPolicy::All,
    )
    .await?;
    let dead = DeadLetters::new(bus.js.clone());
    loop {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            r = role.wait_for(crate::leader::Role::is_leader) => if r.is_err() { return Ok(()) },
        }
        // Consume until leadership is lost; what is in flight then comes back to the next leader.
        let term = cancel.child_token();
        let mut watch_role = role.clone();
        let lost = term.clone();
        let watcher = tokio::spawn(async move {
            let _ = watch_role.wait_for(|r| !r.is_leader()).await;
            lost.cancel();
        });
        consume_reports(consumer.clone(), &engine, &dead, term.clone()).await;
        term.cancel();
        watcher.abort();
    }
}

/// Reports handed to the engine and not yet answered, at most. The engine decides and appends
/// those queued together as one batch; waiting for each verdict before taking the next report
/// made every report an append of its own.
const REPORTS_IN_FLIGHT: usize = 256;

/// Hands each report to the engine in the order JetStream delivers them (so two reports
/// about one VM are decided in the order sent), and acknowledges each once its verdict is in,
/// with up to [`REPORTS_IN_FLIGHT`] waiting at once. Until cancelled; the message stream is
/// made again after errors, with backoff.
async fn consume_reports(consumer: PullConsumer, engine: &EngineHandle, dead: &DeadLetters, cancel: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    let mut in_flight = futures::stream::FuturesUnordered::new();
    while let Some(mut messages) = messages_of(&consumer, "reports", &mut backoff, &cancel).await {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                next = messages.next(), if in_flight.len() < REPORTS_IN_FLIGHT => match next {
                    Some(Ok(msg)) => {
                        if let Some(verdict) = submit_report(engine, dead, msg).await {
                            in_flight.push(verdict);
                        }
                    }
                    Some(Err(e)) => tracing::debug!(consumer = "reports", error = %e, "consumer hiccup"),
                    None => break,
                },
            }
        }
    }
}

/// Checks a report at the edge and queues it in the engine; returns what acknowledges it once
/// the engine has answered. A malformed report is dead-lettered here (`None`).
async fn submit_report(
    engine: &EngineHandle,
    dead: &DeadLetters,
    msg: async_nats::jetstream::Message,
) -> Option<impl Future<Output = ()> + use<>> {
    let subject = msg.subject.to_string();
    let parsed = match Subject::parse(&subject) {
        Ok(Subject::Report(host)) => decode::<Report>(msg.headers.as_ref(), &msg.payload).and_then(|r| {
            if r.host == host {
                Ok(r)
            } else {
                Err(Rejection(format!("report for host {} on the subject of host {host}", r.host)))
            }
        }),
        Ok(_) => Err(Rejection("not a report subject".into())),
        Err(e) => Err(Rejection(e.to_string())),
    };
    let report = match parsed {
        Ok(r) => r,
        Err(Rejection(reason)) => {
            ::metrics::counter!(m::REPORTS, "outcome" => "malformed").increment(1);
            dead.send("reports", &subject, content_type(msg.headers.as_ref()).as_deref(), &reason, msg.payload.clone())
                .await;
            let _ = msg.ack_with(AckKind::Term).await;
            return None;
        }
    };
    let verdict = engine.submit_report(report).await;
    let dead = dead.clone();
    Some(async move {
        let verdict = match verdict {
            Ok(pending) => pending.await,
            Err(e) => Err(e),
        };
        match verdict {
            Ok(ReportVerdict::Accepted) => {
                ::metrics::counter!(m::REPORTS, "outcome" => "accepted").increment(1);
                let _ = msg.ack().await;
            }
            Ok(ReportVerdict::Rejected(reason)) => {
                ::metrics::counter!(m::REPORTS, "outcome" => "rejected").increment(1);
                let ct = content_type(msg.headers.as_ref());
                dead.send("reports", &subject, ct.as_deref(), &reason, msg.payload.clone()).await;
                let _ = msg.ack_with(AckKind::Term).await;
            }
            Err(EngineError::ShuttingDown) => {} // not acked: redelivered to the next run
            Err(e) => {
                tracing::warn!(error = %e, "report not processed; it will be redelivered");
                let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
            }
        }
    })
}

/// Consumes TELEMETRY into the observations.
pub(crate) async fn telemetry(
    bus: Bus,
    engine: EngineHandle,
    obs: SharedObservations,
    replica: String,
    cancel: CancellationToken,
) -> Result<(), String> {
    // Every replica sees every sample (a standby's view must be warm when it takes over), so
    // each has its own consumer.
    let token: String =
        replica.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    let name = format!("{}-{token}", proto::ORCHESTRATOR_TELEMETRY_CONSUMER);
    let consumer =
        durable(&bus, proto::TELEMETRY_STREAM, &name, "nc.telemetry.>", AckPolicy::None, DeliverPolicy::New).await?;
    let dead = DeadLetters::new(bus.js.clone());
    consume(consumer, "telemetry", cancel, |msg| {
        let dead = dead.clone();
        let engine = engine.clone();
        let obs = obs.clone();
        async move {
            let subject = msg.subject.to_string();
            match accept_telemetry(&subject, msg.headers.as_ref(), &msg.payload, &engine, &obs) {
                Ok(Accepted { samples, unknown_vms }) => {
                    ::metrics::counter!(m::TELEMETRY, "outcome" => "accepted").increment(samples);
                    if unknown_vms > 0 {
                        ::metrics::counter!(m::TELEMETRY, "outcome" => "unknown_vm").increment(unknown_vms);
                    }
                }
                Err(Rejection(reason)) => {
                    ::metrics::counter!(m::TELEMETRY, "outcome" => "rejected").increment(1);
                    dead.send(
                        "telemetry",
                        &subject,
                        content_type(msg.headers.as_ref()).as_deref(),
                        &reason,
                        msg.payload.clone(),
                    )
                    .await;
                }
            }
        }
    })
    .await;
    Ok(())
}

/// What one telemetry message brought: samples taken in, and VM samples left out because the
/// log does not know the VM (deleted meanwhile, say: not malformed, so not dead-lettered).
struct Accepted {
    samples: u64,
    unknown_vms: u64,
}

fn accept_telemetry(
    subject: &str,
    headers: Option<&async_nats::HeaderMap>,
    payload: &[u8],
    engine: &EngineHandle,
    obs: &SharedObservations,
) -> Result<Accepted, Rejection> {
    match Subject::parse(subject).map_err(|e| Rejection(e.to_string()))? {
        Subject::HostTelemetry(host) => {
            let mut t: HostTelemetry = decode(headers, payload)?;
            if t.host != host {
                return Err(Rejection(format!("sample for host {} on the subject of host {host}", t.host)));
            }
            let (known, unknown): (Vec<VmSample>, Vec<VmSample>) = {
                let state = read(&engine.state);
                if !state.hosts.contains_key(&host) {
                    return Err(Rejection(format!("unknown host {host}")));
                }
                std::mem::take(&mut t.vms).into_iter().partition(|v| state.vms.contains_key(&v.vm))
            };
            let accepted = Accepted { samples: 1 + known.len() as u64, unknown_vms: unknown.len() as u64 };
            let mut obs = lock(obs);
            for v in &known {
                obs.vms.insert(v.vm, v.at(t.at_ms));
            }
            obs.record_host_load(host.clone(), t.cpu_util, t.at_ms);
            obs.hosts.entry(host).or_default().telemetry = Some(t);
            Ok(accepted)
        }
        Subject::VmTelemetry(vm) => {
            let t: VmTelemetry = decode(headers, payload)?;
            if t.vm != vm {
                return Err(Rejection(format!("sample for VM {} on the subject of VM {vm}", t.vm)));
            }
            if !read(&engine.state).vms.contains_key(&vm) {
                return Err(Rejection(format!("unknown VM {vm}")));
            }
            lock(obs).vms.insert(vm, t);
            Ok(Accepted { samples: 1, unknown_vms: 0 })
        }
        _ => Err(Rejection("not a telemetry subject".into())),
    }
}

/// Subscribes to heartbeats (core NATS; a lost one is harmless).
pub(crate) async fn heartbeats(
    bus: Bus,
    engine: EngineHandle,
    obs: SharedObservations,
    cancel: CancellationToken,
) -> Result<(), String> {
    let mut sub = bus.client.subscribe(proto::HEARTBEAT_WILDCARD).await.map_err(|e| e.to_string())?;
    let dead = DeadLetters::new(bus.js.clone());
    loop {
        let msg = tokio::select! { () = cancel.cancelled() => return Ok(()), m = sub.next() => m };
        let Some(msg) = msg else { return Ok(()) };
        let subject = msg.subject.to_string();
        let parsed = match Subject::parse(&subject) {
            Ok(Subject::Heartbeat(host)) => decode::<Heartbeat>(msg.headers.as_ref(), &msg.payload).and_then(|hb| {
                if hb.host == host {
                    Ok(hb)
                } else {
                    Err(Rejection(format!("heartbeat for host {} on the subject of host {host}", hb.host)))
                }
            }),
            Ok(_) => Err(Rejection("not a heartbeat subject".into())),
            Err(e) => Err(Rejection(e.to_string())),
        };
        match parsed {
            Ok(hb) => {
                if read(&engine.state).hosts.contains_key(&hb.host) {
                    ::metrics::counter!(m::HEARTBEATS, "outcome" => "accepted").increment(1);
                    let mut o = lock(&obs);
                    let entry = o.heard_from(hb.host, std::time::Instant::now());
                    entry.last_heartbeat_ms = Some(hb.at_ms);
                    entry.lease_revision = hb.lease_revision;
                } else {
                    // An agent heartbeats before its registration is folded in; not an error.
                    ::metrics::counter!(m::HEARTBEATS, "outcome" => "unknown_host").increment(1);
                }
            }
            Err(Rejection(reason)) => {
                ::metrics::counter!(m::HEARTBEATS, "outcome" => "malformed").increment(1);
                let payload = Bytes::copy_from_slice(&msg.payload);
                dead.send("heartbeats", &subject, content_type(msg.headers.as_ref()).as_deref(), &reason, payload)
                    .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// However hosts are heard from, the time index lists each host once, at its `last_seen`,
    /// and the quiet end of it is exactly the hosts last heard from by the cutoff.
    #[test]
    fn the_time_index_follows_every_hosts_last_heartbeat() {
        let start = Instant::now();
        let mut obs = Observations::default();
        let hosts: Vec<HostId> = (0..7).map(|i| HostId::new(format!("h{i}")).unwrap()).collect();
        // A fixed pseudo-random order of heartbeats, some hosts often, one never.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for step in 0..500u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let h = &hosts[(x % 6) as usize];
            obs.heard_from(h.clone(), start + Duration::from_millis(step));
        }
        assert_eq!(obs.by_last_seen.len(), obs.hosts.len(), "one entry per host heard from");
        for (h, o) in &obs.hosts {
            assert!(obs.by_last_seen.contains(&(o.last_seen.unwrap(), h.clone())), "{h}");
        }
        assert!(!obs.hosts.contains_key(&hosts[6]), "h6 was never heard from");
        for cut in [0u64, 100, 480, 495, 499] {
            let cutoff = start + Duration::from_millis(cut);
            let mut expected: Vec<&HostId> =
                obs.hosts.iter().filter(|(_, o)| o.last_seen.unwrap() <= cutoff).map(|(h, _)| h).collect();
            let mut got: Vec<&HostId> = obs.heard_last_by(cutoff).map(|(h, _)| h).collect();
            expected.sort();
            got.sort();
            assert_eq!(got, expected, "cutoff {cut} ms");
        }
    }
}
