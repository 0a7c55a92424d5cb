//! Reports: what agents tell the orchestrator they observed.
//!
//! Published to `nc.report.<host>` (stream REPORTS, a work queue). The orchestrator validates
//! each one, turns it into events when it changes the state, and acknowledges it only after
//! the events are appended — so a crash in between redelivers the report, and the state check
//! (already running? already stopped?) makes the second delivery a no-op.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::event::{VmFailed, VmIncarnationReport, VmMigrationCompleted, VmMigrationFailed, VmMigrationIncomingReady};
use crate::{HostId, Labels, ReportId, Resources};

/// A report from an agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// Major schema version ([`crate::SCHEMA_VERSION`]).
    pub schema: u32,
    /// Unique id of this report.
    pub id: ReportId,
    /// The reporting host; must match the subject's host token.
    pub host: HostId,
    /// When the agent observed it, ms since the Unix epoch (agent's clock).
    pub at_ms: u64,
    /// What it observed: `{"kind": "...", "payload": {...}}`.
    pub report: ReportKind,
}

/// Every kind of report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", content = "payload")]
pub enum ReportKind {
    /// The agent is up and offers this capacity. Sent at start and whenever it changes.
    HostRegistration(HostRegistration),
    /// An incarnation is running.
    VmRunning(VmIncarnationReport),
    /// An incarnation stopped (as commanded, or found stopped).
    VmStopped(VmIncarnationReport),
    /// An incarnation failed.
    VmFailed(VmFailed),
    /// The destination of a migration waits for the VM at this URI.
    IncomingReady(VmMigrationIncomingReady),
    /// The source sent the VM; it runs on the destination.
    MigrationCompleted(VmMigrationCompleted),
    /// A migration failed (on the source or the destination); the VM stays on the source.
    MigrationFailed(VmMigrationFailed),
}

/// Payload of [`ReportKind::HostRegistration`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostRegistration {
    /// What the host offers to VMs.
    pub capacity: Resources,
    /// Its labels.
    #[serde(default)]
    pub labels: Labels,
    /// The driver the agent runs (`sim`, `qemu`).
    pub driver: String,
}
