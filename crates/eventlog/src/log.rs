//! The event log writer.
//!
//! [`EventLog::append`] publishes a batch of events pipelined — all in flight at once — and
//! fences each one:
//!
//! - `Nats-Msg-Id` = the event id, so a retry after a lost ack is stored once;
//! - `Nats-Expected-Last-Sequence` = the sequence the writer believes precedes it, so a writer
//!   whose view of the log is stale is refused (error 10071);
//! - `Nats-Expected-Last-Msg-Id` = the previous event of the same batch (all but the first), so
//!   that if one append is refused, none after it can land: a batch is never torn around a
//!   foreign write. (The first carries only the sequence: the server keeps the last message id
//!   only within the dedup window across its own restarts.)
//!
//! A refusal surfaces as [`AppendError::Conflict`] after the writer has re-read the tail; the
//! caller must then catch up by replaying from its own state's sequence and re-plan. Transient
//! errors (timeouts, no responders during an election, broken connection) are retried with the
//! *same* headers, with backoff, for up to [`EventLog::retry_budget`], then reported.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, stream::Stream};
use bytes::Bytes;
use novacron_protocol as proto;
use novacron_types::{ContentType, Envelope, EventId};

use crate::metrics as m;

/// The writer's view of the end of the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tail {
    /// Sequence of the last message in the EVENTS stream (0 when empty).
    pub seq: u64,
}

/// Why an append did not (entirely) happen.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Someone else appended since our last look. The first `stored` events of the batch were
    /// stored (at `stored_seqs`); the rest were not. The tail has been re-read.
    #[error("append refused: the log moved to sequence {} while this writer expected {expected}", tail.seq)]
    Conflict {
        /// What we expected the last sequence to be when the refused append was sent.
        expected: u64,
        /// The log's actual tail, re-read.
        tail: Tail,
        /// Sequences of the batch's events that were stored, in order.
        stored_seqs: Vec<u64>,
    },
    /// Transient errors outlasted the retry budget; `stored_seqs` as for a conflict.
    #[error("append of event {event} failed for {elapsed:?}: giving up")]
    Unavailable {
        /// The event that could not be stored.
        event: EventId,
        /// How long we tried.
        elapsed: Duration,
        /// Sequences of the batch's events that were stored.
        stored_seqs: Vec<u64>,
        /// The last error.
        #[source]
        source: async_nats::jetstream::context::PublishError,
    },
    /// The server refused the message for a reason retrying cannot fix (too large, no stream).
    #[error("append of event {event} refused")]
    Refused {
        /// The event.
        event: EventId,
        /// Sequences of the batch's events that were stored.
        stored_seqs: Vec<u64>,
        /// The server's answer.
        #[source]
        source: async_nats::jetstream::context::PublishError,
    },
    /// The server stored an event at a sequence we did not expect — a message id collision
    /// from outside, or a bug. Nothing after it was sent on.
    #[error("event {event} stored at sequence {got}, expected {expected}")]
    Unexpected {
        /// The event.
        event: EventId,
        /// Where we expected it.
        expected: u64,
        /// Where it went.
        got: u64,
    },
    /// Reading the stream's state failed.
    #[error("cannot read the EVENTS stream")]
    Info(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The only writer of the EVENTS stream in a process. Owned by one task (`&mut self`).
pub struct EventLog {
    js: jetstream::Context,
    stream: Stream,
    tail: Tail,
    retry_budget: Duration,
    window: usize,
}

/// Progress of one `append` call.
struct Run {
    stored: Vec<u64>,
    /// An earlier event needed a retry: later refusals may be artefacts of the reordering.
    degraded: bool,
}

/// One event ready to go: subject, encoded body, id.
struct Outgoing {
    subject: String,
    payload: Bytes,
    kind: &'static str,
    id: EventId,
    /// `id` formatted once: it goes out as this event's message id and as the next one's
    /// expected last message id.
    id_text: String,
}

impl EventLog {
    /// Opens the writer on the EVENTS stream and reads its tail.
    ///
    /// # Errors
    /// When the stream does not exist (provision first) or cannot be read.
    pub async fn open(js: jetstream::Context) -> Result<EventLog, AppendError> {
        let mut stream = js.get_stream(proto::EVENTS_STREAM).await.map_err(|e| AppendError::Info(Box::new(e)))?;
        let seq = stream.info().await.map_err(|e| AppendError::Info(Box::new(e)))?.state.last_sequence;
        Ok(EventLog { js, stream, tail: Tail { seq }, retry_budget: Duration::from_secs(30), window: 1024 })
    }

    /// Most appends in flight at once within one `append` call (default 1024; the client's
    /// in-flight ack limit is 4096).
    #[must_use]
    pub fn window(mut self, window: usize) -> Self {
        self.window = window.clamp(1, 4096);
        self
    }

    /// How long transient errors are retried before an append gives up (default 30 s).
    #[must_use]
    pub fn retry_budget(mut self, budget: Duration) -> Self {
        self.retry_budget = budget;
        self
    }

    /// The writer's view of the tail.
    #[must_use]
    pub fn tail(&self) -> &Tail {
        &self.tail
    }

    /// The EVENTS stream handle (for replays).
    #[must_use]
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// Re-reads the tail from the server (after a conflict, or to adopt a log someone else
    /// extended).
    ///
    /// # Errors
    /// When the stream cannot be read.
    pub async fn refresh_tail(&mut self) -> Result<&Tail, AppendError> {
        let seq = self.stream.info().await.map_err(|e| AppendError::Info(Box::new(e)))?.state.last_sequence;
        self.tail = Tail { seq };
        Ok(&self.tail)
    }

    /// Appends `events` in order, pipelined with at most [`window`](Self::window) in flight, each
    /// fenced on its predecessor. Returns their stream sequences. The subject of each comes from
    /// [`novacron_protocol::event_subject`].
    ///
    /// # Errors
    /// See [`AppendError`]; on any error, the stored prefix is in the error and the tail is
    /// current.
    pub async fn append(&mut self, events: &[Envelope]) -> Result<Vec<u64>, AppendError> {
        let outgoing: Vec<Outgoing> = events
            .iter()
            .map(|e| Outgoing {
                subject: proto::event_subject(&e.event),
                payload: Bytes::from(novacron_types::encode(e)),
                kind: e.event.name(),
                id: e.id,
                id_text: e.id.to_string(),
            })
            .collect();
        let base = self.tail.seq;
        let mut run = Run { stored: Vec::with_capacity(outgoing.len()), degraded: false };
        let mut inflight: VecDeque<(usize, Option<PublishAckFuture>)> = VecDeque::with_capacity(self.window);
        for i in 0..outgoing.len() {
            if inflight.len() >= self.window
                && let Some((j, fut)) = inflight.pop_front()
            {
                self.settle(&outgoing, j, base, fut, &mut run).await?;
            }
            // A failed send is retried in order when its turn to settle comes.
            inflight.push_back((i, self.send(&outgoing, i, base).await.ok()));
        }
        while let Some((j, fut)) = inflight.pop_front() {
            self.settle(&outgoing, j, base, fut, &mut run).await?;
        }
        metrics::counter!(m::EVENTS_APPENDED).increment(run.stored.len() as u64);
        Ok(run.stored)
    }

    /// Awaits the ack of event `i` (retrying it alone when needed) and records its sequence.
    async fn settle(
        &mut self,
        outgoing: &[Outgoing],
        i: usize,
        base: u64,
        fut: Option<PublishAckFuture>,
        run: &mut Run,
    ) -> Result<(), AppendError> {
        let expected_prev = base + i as u64;
        let first_try = match fut {
            Some(f) => f.await,
            None => Err(async_nats::jetstream::context::PublishError::new(PublishErrorKind::BrokenPipe)),
        };
        let outcome = match first_try {
            Ok(ack) => Ok(ack),
            Err(e) if is_conflict(&e) && !run.degraded => Err(e),
            Err(e) => {
                // A transient failure, or a refusal caused by one (an earlier message was
                // retried, so this one overtook it). Re-send alone; its answer is final.
                if !is_conflict(&e) {
                    run.degraded = true;
                }
                self.retry_one(outgoing, i, base, e).await
            }
        };
        match outcome {
            Ok(ack) => {
                let want = expected_prev + 1;
                if ack.sequence != want {
                    self.refresh_tail().await?;
                    return Err(AppendError::Unexpected { event: outgoing[i].id, expected: want, got: ack.sequence });
                }
                run.stored.push(ack.sequence);
                self.tail.seq = ack.sequence;
                Ok(())
            }
            Err(e) if is_conflict(&e) => {
                metrics::counter!(m::APPEND_CONFLICTS).increment(1);
                let tail = self.refresh_tail().await?.clone();
                Err(AppendError::Conflict {
                    expected: expected_prev,
                    tail,
                    stored_seqs: std::mem::take(&mut run.stored),
                })
            }
            Err(e) => {
                self.refresh_tail().await?;
                Err(classify_final(e, outgoing[i].id, std::mem::take(&mut run.stored), self.retry_budget))
            }
        }
    }

    async fn send(
        &self,
        outgoing: &[Outgoing],
        i: usize,
        base: u64,
    ) -> Result<PublishAckFuture, async_nats::jetstream::context::PublishError> {
        let o = &outgoing[i];
        let mut headers = HeaderMap::new();
        headers.insert(proto::HEADER_CONTENT_TYPE, ContentType::MsgPack.header_value());
        headers.insert(proto::HEADER_EVENT_KIND, o.kind);
        let mut msg = PublishMessage::build()
            .payload(o.payload.clone())
            .headers(headers)
            .message_id(&o.id_text)
            .expected_last_sequence(base + i as u64);
        if i > 0 {
            msg = msg.expected_last_message_id(&outgoing[i - 1].id_text);
        }
        self.js.send_publish(o.subject.clone(), msg).await
    }

    async fn retry_one(
        &self,
        outgoing: &[Outgoing],
        i: usize,
        base: u64,
        first: async_nats::jetstream::context::PublishError,
    ) -> Result<async_nats::jetstream::publish::PublishAck, async_nats::jetstream::context::PublishError> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(25);
        let mut last = first;
        loop {
            if !is_transient(&last) && !is_conflict(&last) {
                return Err(last);
            }
            if start.elapsed() > self.retry_budget {
                return Err(last);
            }
            metrics::counter!(m::APPEND_RETRIES).increment(1);
            tracing::debug!(event = %outgoing[i].id, error = %last, "retrying append with the same message id");
            match self.send(outgoing, i, base).await {
                Ok(f) => match f.await {
                    Ok(ack) => return Ok(ack),
                    Err(e) if is_conflict(&e) => return Err(e),
                    Err(e) => last = e,
                },
                Err(e) => last = e,
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }
}

fn is_conflict(e: &async_nats::jetstream::context::PublishError) -> bool {
    matches!(e.kind(), PublishErrorKind::WrongLastSequence | PublishErrorKind::WrongLastMessageId)
}

/// Errors worth retrying with the same message id: the message may or may not have been stored,
/// and the dedup window makes a retry safe either way.
fn is_transient(e: &async_nats::jetstream::context::PublishError) -> bool {
    match e.kind() {
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::StreamNotFound
        | PublishErrorKind::MaxAckPending => true,
        // 10158 "duplicate message id is in process" and "JetStream system temporarily
        // unavailable" (503) during elections arrive as Other; so do permanent refusals such as
        // an oversized message, which retrying cannot fix.
        PublishErrorKind::Other => server_error_code(e).is_none_or(|(status, code)| status == 503 || code == 10158),
        _ => false,
    }
}

/// The server's (status, JetStream error code) behind an `Other` publish error, if it sent one.
fn server_error_code(e: &async_nats::jetstream::context::PublishError) -> Option<(usize, u64)> {
    let source = std::error::Error::source(e)?;
    let js = source.downcast_ref::<async_nats::jetstream::Error>()?;
    Some((js.code(), js.error_code().0))
}

fn classify_final(
    e: async_nats::jetstream::context::PublishError,
    event: EventId,
    stored_seqs: Vec<u64>,
    budget: Duration,
) -> AppendError {
    if is_transient(&e) {
        AppendError::Unavailable { event, elapsed: budget, stored_seqs, source: e }
    } else {
        AppendError::Refused { event, stored_seqs, source: e }
    }
}
