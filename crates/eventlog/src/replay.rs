//! Reading the log back.
//!
//! A bounded replay reads through one ephemeral, unacknowledged pull consumer in large batches;
//! following the tail uses an ordered consumer, which also recovers from gaps. Both are among
//! the fastest ways JetStream offers to read a stream in order (measured ≈ 0.3 M events/s on this kind of
//! machine, see `docs/benchmarks.md`). State is rebuilt by one pass over the whole stream —
//! never aggregate by aggregate, which costs ~30 ms per aggregate whatever its length.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::stream::Stream;
use futures::{StreamExt, TryStreamExt};
use novacron_protocol as proto;
use novacron_state::ClusterState;
use novacron_types::{ContentType, DecodeError, Envelope};

use crate::metrics as m;

/// Messages asked for per pull request during a replay.
const REPLAY_BATCH: usize = 2048;

/// One message of the EVENTS stream, decoded (or not).
#[derive(Debug)]
pub struct LoggedEvent {
    /// Its stream sequence.
    pub seq: u64,
    /// Its subject.
    pub subject: String,
    /// The envelope, or why it did not decode. The writer only appends valid envelopes; a
    /// failure here means something else published on `nc.events.>` or `nc.cmd.>`.
    pub envelope: Result<Envelope, DecodeError>,
}

impl LoggedEvent {
    /// The JSON operators see (`novacron events -o json`, the API's live stream): the envelope's
    /// header flattened next to `seq` and `subject`, the event's fields under `payload`; an
    /// undecodable message as `kind: null` with the `error`.
    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        match &self.envelope {
            Ok(env) => {
                let event = serde_json::to_value(&env.event).unwrap_or(serde_json::Value::Null);
                let at = humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(env.at_ms));
                serde_json::json!({
                    "seq": self.seq,
                    "id": env.id,
                    "at": at.to_string(),
                    "at_ms": env.at_ms,
                    "kind": env.event.name(),
                    "subject": self.subject,
                    "actor": env.actor,
                    "causation_id": env.causation_id,
                    "correlation_id": env.correlation_id,
                    "schema": env.schema,
                    "payload": event.get("payload").cloned().unwrap_or(serde_json::Value::Null),
                })
            }
            Err(e) => {
                serde_json::json!({ "seq": self.seq, "subject": self.subject, "kind": null, "error": e.to_string() })
            }
        }
    }
}

/// Why a replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The stream could not be read or the consumer not created.
    #[error("cannot read the EVENTS stream: {0}")]
    Stream(#[source] Box<dyn std::error::Error + Send + Sync>),
}

fn boxed<E: std::error::Error + Send + Sync + 'static>(e: E) -> ReplayError {
    ReplayError::Stream(Box::new(e))
}

/// Decodes one JetStream message of the EVENTS stream.
#[must_use]
pub fn decode_event(seq: u64, subject: &str, headers: Option<&async_nats::HeaderMap>, payload: &[u8]) -> LoggedEvent {
    let ct = headers.and_then(|h| h.get(proto::HEADER_CONTENT_TYPE)).map(|v| v.as_str().to_owned());
    let envelope = ContentType::from_header(ct.as_deref()).and_then(|ct| novacron_types::decode(payload, ct));
    LoggedEvent { seq, subject: subject.to_owned(), envelope }
}

/// How long `replay` keeps retrying errors that a cluster gets over (a stream or consumer
/// leader being elected answers "no responders" for a moment), resuming after the last event
/// it delivered.
pub const REPLAY_RETRY_BUDGET: Duration = Duration::from_secs(15);

/// Calls `f` for every event with `from <= seq <= to`, in order, each once. Returns how many it
/// saw.
///
/// # Errors
/// When the stream cannot be read for longer than [`REPLAY_RETRY_BUDGET`].
pub async fn replay(stream: &Stream, from: u64, to: u64, mut f: impl FnMut(LoggedEvent)) -> Result<u64, ReplayError> {
    let mut next = from.max(1);
    let mut seen = 0u64;
    let started = std::time::Instant::now();
    let mut delay = Duration::from_millis(50);
    while next <= to {
        match replay_once(stream, next, to, &mut f, &mut seen).await {
            Ok(Some(last)) => next = last + 1,
            Ok(None) => break,
            Err(e) if started.elapsed() < REPLAY_RETRY_BUDGET => {
                tracing::debug!(error = %e, next, "replay interrupted; resuming");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Err(e) => return Err(e),
        }
    }
    metrics::counter!(m::EVENTS_REPLAYED).increment(seen);
    Ok(seen)
}

/// Every event on one subject (a VM's `nc.events.vm.<id>`, say), oldest first. The server finds
/// them through its index of subjects instead of the reader scanning the whole log.
///
/// # Errors
/// When the stream cannot be read.
pub async fn replay_subject(
    stream: &Stream,
    subject: &str,
    mut f: impl FnMut(LoggedEvent),
) -> Result<u64, ReplayError> {
    let mut consumer = stream
        .create_consumer(pull::Config {
            filter_subject: subject.to_owned(),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .map_err(boxed)?;
    if consumer.info().await.map_err(boxed)?.num_pending == 0 {
        return Ok(0);
    }
    let mut messages = consumer.stream().max_messages_per_batch(REPLAY_BATCH).messages().await.map_err(boxed)?;
    let mut seen = 0;
    while let Some(msg) = messages.try_next().await.map_err(boxed)? {
        let info = msg.info().map_err(ReplayError::Stream)?;
        let (seq, pending) = (info.stream_sequence, info.pending);
        f(decode_event(seq, msg.subject.as_str(), msg.headers.as_ref(), &msg.payload));
        seen += 1;
        if pending == 0 {
            break;
        }
    }
    Ok(seen)
}

/// One pass: reads from `from` until `to` or the end; returns the last sequence delivered and
/// `None` once there is nothing more to read.
async fn replay_once(
    stream: &Stream,
    from: u64,
    to: u64,
    f: &mut impl FnMut(LoggedEvent),
    seen: &mut u64,
) -> Result<Option<u64>, ReplayError> {
    // An ephemeral, unacknowledged pull consumer fetching in large batches: the fastest way to
    // read a known range.
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: from },
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .map_err(boxed)?;
    let mut messages = consumer.stream().max_messages_per_batch(REPLAY_BATCH).messages().await.map_err(boxed)?;
    let mut last = None;
    while let Some(msg) = messages.try_next().await.map_err(boxed)? {
        let info = msg.info().map_err(ReplayError::Stream)?;
        let seq = info.stream_sequence;
        let pending = info.pending;
        if seq > to {
            return Ok(None);
        }
        f(decode_event(seq, msg.subject.as_str(), msg.headers.as_ref(), &msg.payload));
        *seen += 1;
        last = Some(seq);
        if seq >= to || pending == 0 {
            return Ok(None);
        }
    }
    Ok(last)
}

/// Folds the events after `state.seq` up to `to` into `state`. Messages that do not decode are
/// skipped (every replayer skips the same ones, so replays still agree) and counted in the
/// returned `undecodable`.
///
/// # Errors
/// When the stream cannot be read.
pub async fn fold_range(stream: &Stream, state: &mut ClusterState, to: u64) -> Result<FoldStats, ReplayError> {
    let mut stats = FoldStats::default();
    let from = state.seq + 1;
    replay(stream, from, to, |ev| fold_one(state, &ev, &mut stats)).await?;
    Ok(stats)
}

/// Folds one logged event into `state` as [`fold_range`] does: an undecodable message is
/// skipped (counted, logged) but still moves the state's sequence.
pub fn fold_one(state: &mut ClusterState, ev: &LoggedEvent, stats: &mut FoldStats) {
    match &ev.envelope {
        Ok(env) => {
            state.apply(ev.seq, env);
            stats.applied += 1;
        }
        Err(e) => {
            tracing::warn!(seq = ev.seq, subject = %ev.subject, error = %e, "skipping undecodable message in the log");
            state.seq = ev.seq;
            stats.undecodable += 1;
        }
    }
}

/// What a [`fold_range`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FoldStats {
    /// Events folded in.
    pub applied: u64,
    /// Messages skipped because they did not decode.
    pub undecodable: u64,
}

/// Follows the log from `from` onwards, forever: past events first, then new ones as they come.
///
/// # Errors
/// When the consumer cannot be created.
pub async fn follow(
    stream: &Stream,
    from: u64,
) -> Result<impl futures::Stream<Item = Result<LoggedEvent, ReplayError>> + use<>, ReplayError> {
    let deliver_policy =
        if from <= 1 { DeliverPolicy::All } else { DeliverPolicy::ByStartSequence { start_sequence: from } };
    let consumer =
        stream.create_consumer(pull::OrderedConfig { deliver_policy, ..Default::default() }).await.map_err(boxed)?;
    let messages = consumer.messages().await.map_err(boxed)?;
    Ok(messages.map(|m| {
        let msg = m.map_err(boxed)?;
        let seq = msg.info().map_err(ReplayError::Stream)?.stream_sequence;
        Ok(decode_event(seq, msg.subject.as_str(), msg.headers.as_ref(), &msg.payload))
    }))
}
