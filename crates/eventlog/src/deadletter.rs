//! The dead-letter stream: where malformed messages go, with the reason and the original bytes.
//!
//! ```text
//! subject  nc.deadletter.<source>          (source: reports, telemetry, heartbeats, commands, …)
//! headers  Nc-Deadletter-Reason: <why>      Nc-Deadletter-Subject: <original subject>
//!          Nc-Deadletter-Content-Type: <original Content-Type, if any>
//! payload  the original bytes, untouched
//! ```

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use novacron_protocol as proto;

use crate::metrics as m;

/// Sends rejected messages to `nc.deadletter.<source>`.
#[derive(Clone, Debug)]
pub struct DeadLetters {
    js: jetstream::Context,
}

impl DeadLetters {
    /// A sender over this JetStream context.
    #[must_use]
    pub fn new(js: jetstream::Context) -> Self {
        DeadLetters { js }
    }

    /// Dead-letters one message and counts it. Never fails the caller: if even the dead-letter
    /// stream is unreachable, the loss is logged with the reason and the original subject.
    pub async fn send(
        &self,
        source: &'static str,
        subject: &str,
        content_type: Option<&str>,
        reason: &str,
        payload: Bytes,
    ) {
        metrics::counter!(m::DEADLETTERS, "source" => source).increment(1);
        tracing::warn!(source, subject, reason, bytes = payload.len(), "dead-lettering a malformed message");
        let mut headers = HeaderMap::new();
        // Header values must be one line; keep the reason readable but bounded.
        let reason_line: String = reason.replace(['\r', '\n'], " ").chars().take(1000).collect();
        headers.insert(proto::HEADER_DEADLETTER_REASON, reason_line.as_str());
        headers.insert(proto::HEADER_DEADLETTER_SUBJECT, subject);
        if let Some(ct) = content_type {
            headers.insert(proto::HEADER_DEADLETTER_CONTENT_TYPE, ct);
        }
        let result = match self.js.publish_with_headers(proto::deadletter_subject(source), headers, payload).await {
            Ok(ack) => ack.await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::error!(source, subject, reason, error = %e, "could not store a dead letter; the message is lost");
        }
    }
}
