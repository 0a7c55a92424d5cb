//! Decisions: from the folded state and one input to the events to append. Pure.
//!
//! Ids and the time are drawn by the caller (the engine) through [`Stamp`] before anything is
//! appended and are recorded in the events, so a replay never decides again. Reconcilers look
//! only at the state — a crash between two appends is repaired by the next reconcile pass,
//! through the same code as the happy path.
//!
//! | module | decides |
//! |---|---|
//! | [`vms`] | create, delete, migrate one VM; the placement events they share |
//! | [`hosts`] | cordon, drain, uncordon; failure detection from heartbeat silences |
//! | [`reports`] | what an agent's report means for the log; reports and creates decided as one batch |
//! | [`rebalance`](mod@rebalance) | relieving hosts that stay hot, without ping-pong |
//! | [`reconcile`](mod@reconcile) | the periodic pass: place, heal, restart, drain, delete |
//! | [`risk`] | which hosts are likely to fail soon (scores the planner weighs) |

use novacron_types::{Actor, Envelope, EventKind, IncarnationId, VmId};
use uuid::Uuid;

pub mod groups;
pub mod hosts;
pub mod models;
pub mod policies;
pub mod rebalance;
pub mod reconcile;
pub mod reports;
pub mod risk;
pub mod vms;

pub use groups::*;
pub use hosts::*;
pub use models::*;
pub use policies::*;
pub use rebalance::*;
pub use reconcile::*;
pub use reports::*;
pub use risk::*;
pub use vms::*;

/// Where time and fresh ids come from. The engine's is the wall clock and UUID v7; tests can
/// pass a fixed one.
pub trait Stamp {
    /// Milliseconds since the epoch.
    fn now_ms(&mut self) -> u64;
    /// A fresh VM id.
    fn vm_id(&mut self) -> VmId;
    /// A fresh incarnation id.
    fn incarnation_id(&mut self) -> IncarnationId;
}

/// What the planner works with: the cluster's settings and the latest load per host.
#[derive(Clone, Debug, Default)]
pub struct Planning {
    /// Strategy, overcommit, limits, weights.
    pub config: novacron_scheduler::PlannerConfig,
    /// Observed CPU load per host and the telemetry watermark.
    pub load: std::sync::Arc<novacron_scheduler::LoadView>,
}

/// The wall clock and UUID v7.
pub struct WallClock;

impl Stamp for WallClock {
    fn now_ms(&mut self) -> u64 {
        novacron_eventlog::now_ms()
    }
    fn vm_id(&mut self) -> VmId {
        VmId::new_v7()
    }
    fn incarnation_id(&mut self) -> IncarnationId {
        IncarnationId::new_v7()
    }
}

/// Why a request was refused; mapped to HTTP statuses by the API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The request is invalid (400).
    #[error("field `{field}`: {reason}")]
    Invalid {
        /// Which field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// The name is taken by a live VM (409).
    #[error("a VM named {0:?} already exists")]
    NameInUse(String),
    /// No such VM (404).
    #[error("no VM {0}")]
    NotFound(String),
    /// The VM is already deleted (409).
    #[error("VM {0} is already deleted")]
    AlreadyDeleted(VmId),
    /// The request conflicts with the VM's or the cluster's current state (409).
    #[error("{0}")]
    Conflict(String),
}

/// Context of one decision: who asked, and which request the events belong to.
#[derive(Clone, Debug)]
pub struct Origin {
    /// Recorded as the events' actor.
    pub actor: Actor,
    /// Recorded as the events' correlation id.
    pub correlation: Option<Uuid>,
}

pub(crate) fn envelope(stamp: &mut impl Stamp, origin: &Origin, event: EventKind) -> Envelope {
    Envelope::new(stamp.now_ms(), origin.actor.clone(), event).correlated(origin.correlation)
}

#[cfg(test)]
mod tests;
