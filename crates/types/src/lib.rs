//! NovaCron's domain types: the vocabulary every other crate speaks.
//!
//! Pure data and codecs, no I/O. Everything that crosses a process boundary is defined here:
//! the events of the log ([`event`]), the commands agents obey ([`command`]), the reports agents
//! send back ([`report`]), telemetry from agents and other systems ([`telemetry`]), and the codec
//! that turns them into bytes ([`codec`]). JSON Schemas for the external messages are generated
//! from these types into `schemas/` (see [`schema`]).
//!
//! Wire rule: MessagePack with field names (`rmp_serde::to_vec_named`) by default, JSON accepted
//! from outside; every top-level message carries `schema` (the major version, [`SCHEMA_VERSION`]),
//! and a reader rejects a major version it does not know.

pub mod codec;
pub mod command;
pub mod event;
pub mod group;
pub mod ids;
pub mod model;
pub mod policy;
pub mod report;
pub mod resources;
pub mod schema;
pub mod telemetry;
pub mod validate;
pub mod vm;

pub use codec::{ContentType, DecodeError, decode, encode};
pub use command::{AgentCommand, MigrateOut, PrepareIncoming, StartVm, StopVm};
pub use event::{Actor, Envelope, EventKind};
pub use ids::{EventId, Generation, HostId, IncarnationId, ReportId, VmId};
pub use report::{Report, ReportKind};
pub use resources::Resources;
pub use telemetry::{Heartbeat, HostTelemetry, VmTelemetry};
pub use validate::{Validate, ValidationError};
pub use vm::{Labels, PlacementRules, Relation, RestartPolicy, Strategy, Strength, VmAffinity, VmSpec};

/// The major schema version of every message this build writes and the only one it reads.
///
/// Minor, backwards-compatible additions (a new optional field) keep the number; a change that
/// an old reader would misread bumps it, and old readers then dead-letter the new messages
/// instead of misinterpreting them.
pub const SCHEMA_VERSION: u32 = 1;
