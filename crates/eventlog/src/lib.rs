//! NovaCron's JetStream plumbing: the log of record and everything else on the bus.
//!
//! - [`bus`]: connecting with sane client settings, checking the server (≥ 2.10, JetStream on)
//!   and provisioning the streams idempotently.
//! - [`log`]: [`EventLog`], the only way events get into the EVENTS stream: pipelined appends,
//!   each fenced by the stream's last sequence and its predecessor's message id, so a writer
//!   whose view is stale is refused rather than forking history.
//! - [`replay`]: reading the log back from any sequence, fast, and following its tail.
//! - [`snapshot`]: the folded state at sequence N, kept in local files, so that a restart
//!   replays only the tail.
//! - [`deadletter`]: where malformed messages go, with the reason, and the counter that rises.
//!
//! ```text
//!  EVENTS stream (file, limits, kept, deny delete/purge, dedup window 2 min)
//!  seq:   1          2            3                   4
//!         VmRequested VmPlaced     VmStartCommanded    VmRunning
//!  subj:  nc.events.vm.<id>        nc.cmd.<host>.<vm>  nc.events.vm.<id>
//!  hdrs:  Nats-Msg-Id = event id; Nats-Expected-Last-Sequence = seq - 1;
//!         Nats-Expected-Last-Msg-Id = previous event id (all but a batch's first)
//!         Content-Type: application/msgpack; Nc-Event-Kind: <kind>
//! ```

pub mod bus;
pub mod deadletter;
pub mod log;
pub mod metrics;
pub mod replay;
pub mod snapshot;

pub use bus::{Artifacts, Bus, BusConfig, BusError};
pub use deadletter::DeadLetters;
pub use log::{AppendError, EventLog, Tail};
pub use replay::{
    FoldStats, LoggedEvent, ReplayError, decode_event, fold_one, fold_range, follow, replay, replay_subject,
};
pub use snapshot::{SnapshotError, SnapshotStore, SnapshotTrailer};

/// Milliseconds since the Unix epoch, from the system clock. For writers only: the fold never
/// calls it.
#[must_use]
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
