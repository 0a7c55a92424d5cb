//! The events of the log.
//!
//! ```text
//! Envelope { schema, id (UUID v7 = Nats-Msg-Id), at_ms (writer's clock), actor,
//!            causation_id?, correlation_id?, event: { kind, payload } }
//! ```
//! `event` is [`EventKind`], one closed enum with one struct per variant, adjacently tagged so
//! that it reads `{"kind": "VmPlaced", "payload": {...}}` and decodes without buffering (the tag
//! comes first). It is nested rather than flattened for the same reason: replay speed.
//! The stream sequence is not in the envelope: JetStream assigns it, and readers take it from the
//! message metadata.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::command::{AgentCommand, MigrateOut, PrepareIncoming, StartVm, StopVm};
use crate::{EventId, Generation, HostId, IncarnationId, Labels, Resources, SCHEMA_VERSION, VmId, VmSpec};

/// Who caused an event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", content = "name", rename_all = "snake_case")]
pub enum Actor {
    /// An operator, through the CLI or the API (name as given by the client, `anonymous` if none).
    User(String),
    /// An orchestrator replica acting on its own (a planner or reconciler).
    Orchestrator(String),
    /// An agent, through one of its reports.
    Agent(HostId),
}

/// One event of the log, with its header.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Major schema version, [`SCHEMA_VERSION`] when written by this build.
    pub schema: u32,
    /// Unique id, UUID v7; also the message's `Nats-Msg-Id`.
    pub id: EventId,
    /// When the writer recorded it, milliseconds since the Unix epoch (the writer's clock,
    /// recorded once; the fold never reads a clock).
    pub at_ms: u64,
    /// Who caused it.
    pub actor: Actor,
    /// The event (or report) that directly caused this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    /// Groups the events of one operation (e.g. one API request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    /// What happened: `{"kind": "...", "payload": {...}}`.
    pub event: EventKind,
}

impl Envelope {
    /// A new envelope with a fresh v7 id. `at_ms` comes from the caller, who owns the clock.
    #[must_use]
    pub fn new(at_ms: u64, actor: Actor, event: EventKind) -> Self {
        Envelope {
            schema: SCHEMA_VERSION,
            id: EventId::new_v7(),
            at_ms,
            actor,
            causation_id: None,
            correlation_id: None,
            event,
        }
    }

    /// Sets the causation id.
    #[must_use]
    pub fn caused_by(mut self, cause: Uuid) -> Self {
        self.causation_id = Some(cause);
        self
    }

    /// Sets the correlation id.
    #[must_use]
    pub fn correlated(mut self, correlation: Option<Uuid>) -> Self {
        self.correlation_id = correlation;
        self
    }

    /// The command this event carries to an agent, if it is one.
    #[must_use]
    pub fn as_command(&self) -> Option<AgentCommand> {
        match &self.event {
            EventKind::VmStartCommanded(c) => Some(AgentCommand::Start(c.clone())),
            EventKind::VmStopCommanded(c) => Some(AgentCommand::Stop(c.clone())),
            EventKind::VmIncomingCommanded(c) => Some(AgentCommand::PrepareIncoming(c.clone())),
            EventKind::VmMigrationStarted(c) => Some(AgentCommand::MigrateOut(c.clone())),
            _ => None,
        }
    }
}

/// Every kind of event. Closed: a reader that meets an unknown kind dead-letters it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", content = "payload")]
pub enum EventKind {
    /// A host's agent registered (first time) or re-registered with new capacity or labels.
    HostRegistered(HostRegistered),
    /// A host's heartbeats stopped; it takes no new VMs but keeps its VMs.
    HostSuspected(HostSuspected),
    /// A host stayed silent past the host-failure timeout (longer than its agent's lease plus the
    /// fence margin, so its VMs are surely fenced); its VMs are placed elsewhere.
    HostFailed(HostFailed),
    /// A suspected or failed host's heartbeats are back; it takes VMs again.
    HostRecovered(HostRecovered),
    /// An operator cordoned a host: it takes no new VMs and keeps its own.
    HostCordoned(HostCordoned),
    /// An operator asked for a host to be emptied: its VMs are live-migrated away (or, when that
    /// fails, stopped and started elsewhere).
    HostDrainRequested(HostDrainRequested),
    /// A draining host has no VMs left; it stays cordoned.
    HostDrained(HostDrained),
    /// An operator returned a cordoned or drained host to service.
    HostUncordoned(HostUncordoned),
    /// An orchestrator replica acquired the leader lease and acts from now on.
    LeaderElected(LeaderElected),
    /// Too many hosts went silent at once for it to be their fault: the orchestrator may be the
    /// one cut off, so nobody is declared failed until this clears.
    HealingPaused(HealingPaused),
    /// Healing resumes.
    HealingResumed(HealingResumed),
    /// An operator asked for a VM. Emitted once per VM, before any placement.
    VmRequested(VmRequested),
    /// The placement planner chose a host for a VM; carries the explanation.
    VmPlaced(VmPlaced),
    /// No host could take a VM; it stays pending and is retried when capacity appears.
    VmPlacementFailed(VmPlacementFailed),
    /// Command to a host to start an incarnation (subject `nc.cmd.<host>.<vm>`).
    VmStartCommanded(StartVm),
    /// The agent reported the incarnation running.
    VmRunning(VmIncarnationReport),
    /// Command to a host to stop an incarnation (subject `nc.cmd.<host>.<vm>`).
    VmStopCommanded(StopVm),
    /// The agent reported the incarnation stopped.
    VmStopped(VmIncarnationReport),
    /// The agent reported the incarnation failed (crashed, or could not start).
    VmFailed(VmFailed),
    /// An operator asked for a VM to be deleted.
    VmDeleteRequested(VmDeleteRequested),
    /// The VM is gone: nothing runs, its resources are released.
    VmDeleted(VmDeleted),
    /// The VM failed too often; it is not restarted again until an operator acts.
    VmGaveUp(VmGaveUp),
    /// A live migration was decided: the target is reserved, the VM is `migrating`.
    VmMigrationPlanned(VmMigrationPlanned),
    /// Command to the destination to prepare an incoming incarnation (subject
    /// `nc.cmd.<destination>.<vm>`).
    VmIncomingCommanded(PrepareIncoming),
    /// The destination waits for the VM's state at this URI.
    VmMigrationIncomingReady(VmMigrationIncomingReady),
    /// Command to the source to send the VM to the destination (subject `nc.cmd.<source>.<vm>`).
    VmMigrationStarted(MigrateOut),
    /// The VM runs on the destination; the source's incarnation is gone. Carries the downtime.
    VmMigrationCompleted(VmMigrationCompleted),
    /// The migration failed; the VM keeps running on the source.
    VmMigrationFailed(VmMigrationFailed),
    /// A policy was applied (new, or a new version of one with the same name).
    PolicyApplied(PolicyApplied),
    /// A policy was withdrawn.
    PolicyRemoved(PolicyRemoved),
    /// Two policies pull apart and one gives way, by the documented order.
    PolicyConflictResolved(PolicyConflictResolved),
    /// A forecasting model was trained and its artifact stored.
    ModelTrained(crate::model::ModelTrained),
    /// A model was promoted: forecasts use it from now on.
    ModelPromoted(crate::model::ModelPromoted),
    /// A promotion was undone.
    ModelRolledBack(crate::model::ModelRolledBack),
    /// A model's live forecasts drifted: retraining is due (the trigger; training is
    /// `novacron models train`).
    ModelRetrainingRequested(crate::model::ModelRetrainingRequested),
    /// A VM group was created.
    GroupCreated(GroupCreated),
    /// A VM group was deleted (its members are deleted with it).
    GroupDeleted(GroupDeleted),
    /// A group's size changed (or, in forecast-only mode, a change was recommended), and why.
    GroupScaled(GroupScaled),
    /// A group should grow but may not (a quota, no room to place its members): recorded once
    /// per wanted size and reason, retried every pass.
    GroupScaleRefused(GroupScaleRefused),
    /// A VM breaks a policy where it runs (a policy applied after it was placed, a host's
    /// labels changed, an audit rule). Recorded once per policy version and placement.
    PolicyViolationObserved(PolicyViolationObserved),
}

impl EventKind {
    /// The VM whose record the event changes, for the events that change one.
    #[must_use]
    pub fn vm(&self) -> Option<VmId> {
        match self {
            EventKind::VmRequested(e) => Some(e.vm),
            EventKind::VmPlaced(e) => Some(e.vm),
            EventKind::VmPlacementFailed(e) => Some(e.vm),
            EventKind::VmStartCommanded(c) => Some(c.vm),
            EventKind::VmRunning(r) | EventKind::VmStopped(r) => Some(r.vm),
            EventKind::VmStopCommanded(c) => Some(c.vm),
            EventKind::VmFailed(e) => Some(e.vm),
            EventKind::VmDeleteRequested(e) => Some(e.vm),
            EventKind::VmDeleted(e) => Some(e.vm),
            EventKind::VmGaveUp(e) => Some(e.vm),
            EventKind::VmMigrationPlanned(e) => Some(e.vm),
            EventKind::VmIncomingCommanded(c) => Some(c.vm),
            EventKind::VmMigrationIncomingReady(e) => Some(e.vm),
            EventKind::VmMigrationStarted(c) => Some(c.vm),
            EventKind::VmMigrationCompleted(e) => Some(e.vm),
            EventKind::VmMigrationFailed(e) => Some(e.vm),
            EventKind::HostRegistered(_)
            | EventKind::HostSuspected(_)
            | EventKind::HostFailed(_)
            | EventKind::HostRecovered(_)
            | EventKind::HostCordoned(_)
            | EventKind::HostDrainRequested(_)
            | EventKind::HostDrained(_)
            | EventKind::HostUncordoned(_)
            | EventKind::LeaderElected(_)
            | EventKind::HealingPaused(_)
            | EventKind::HealingResumed(_)
            | EventKind::PolicyApplied(_)
            | EventKind::PolicyRemoved(_)
            | EventKind::PolicyConflictResolved(_)
            | EventKind::PolicyViolationObserved(_)
            | EventKind::GroupCreated(_)
            | EventKind::GroupDeleted(_)
            | EventKind::GroupScaled(_)
            | EventKind::GroupScaleRefused(_)
            | EventKind::ModelTrained(_)
            | EventKind::ModelPromoted(_)
            | EventKind::ModelRolledBack(_)
            | EventKind::ModelRetrainingRequested(_) => None,
        }
    }

    /// The variant's name, as it appears in `kind`.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::HostRegistered(_) => "HostRegistered",
            EventKind::HostSuspected(_) => "HostSuspected",
            EventKind::HostFailed(_) => "HostFailed",
            EventKind::HostRecovered(_) => "HostRecovered",
            EventKind::HostCordoned(_) => "HostCordoned",
            EventKind::HostDrainRequested(_) => "HostDrainRequested",
            EventKind::HostDrained(_) => "HostDrained",
            EventKind::HostUncordoned(_) => "HostUncordoned",
            EventKind::LeaderElected(_) => "LeaderElected",
            EventKind::HealingPaused(_) => "HealingPaused",
            EventKind::HealingResumed(_) => "HealingResumed",
            EventKind::VmRequested(_) => "VmRequested",
            EventKind::VmPlaced(_) => "VmPlaced",
            EventKind::VmPlacementFailed(_) => "VmPlacementFailed",
            EventKind::VmStartCommanded(_) => "VmStartCommanded",
            EventKind::VmRunning(_) => "VmRunning",
            EventKind::VmStopCommanded(_) => "VmStopCommanded",
            EventKind::VmStopped(_) => "VmStopped",
            EventKind::VmFailed(_) => "VmFailed",
            EventKind::VmDeleteRequested(_) => "VmDeleteRequested",
            EventKind::VmDeleted(_) => "VmDeleted",
            EventKind::VmGaveUp(_) => "VmGaveUp",
            EventKind::VmMigrationPlanned(_) => "VmMigrationPlanned",
            EventKind::VmIncomingCommanded(_) => "VmIncomingCommanded",
            EventKind::VmMigrationIncomingReady(_) => "VmMigrationIncomingReady",
            EventKind::VmMigrationStarted(_) => "VmMigrationStarted",
            EventKind::VmMigrationCompleted(_) => "VmMigrationCompleted",
            EventKind::VmMigrationFailed(_) => "VmMigrationFailed",
            EventKind::PolicyApplied(_) => "PolicyApplied",
            EventKind::PolicyRemoved(_) => "PolicyRemoved",
            EventKind::PolicyConflictResolved(_) => "PolicyConflictResolved",
            EventKind::PolicyViolationObserved(_) => "PolicyViolationObserved",
            EventKind::GroupCreated(_) => "GroupCreated",
            EventKind::ModelTrained(_) => "ModelTrained",
            EventKind::ModelPromoted(_) => "ModelPromoted",
            EventKind::ModelRolledBack(_) => "ModelRolledBack",
            EventKind::ModelRetrainingRequested(_) => "ModelRetrainingRequested",
            EventKind::GroupDeleted(_) => "GroupDeleted",
            EventKind::GroupScaled(_) => "GroupScaled",
            EventKind::GroupScaleRefused(_) => "GroupScaleRefused",
        }
    }
}

/// Payload of [`EventKind::HostRegistered`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostRegistered {
    /// The host.
    pub host: HostId,
    /// What it offers to VMs.
    pub capacity: Resources,
    /// Its labels (rack, zone, hardware…).
    #[serde(default)]
    pub labels: Labels,
    /// The hypervisor driver its agent runs (`sim`, `qemu`).
    pub driver: String,
}

/// Payload of [`EventKind::VmRequested`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmRequested {
    /// The new VM's id, chosen by the orchestrator.
    pub vm: VmId,
    /// What was asked for.
    pub spec: VmSpec,
}

/// Why a planner chose what it chose: inputs, counts, and the best candidates.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlacementExplanation {
    /// The planner and its strategy, e.g. `filter-score/bin-pack`.
    pub planner: String,
    /// The log sequence of the state the planner read.
    pub log_seq: u64,
    /// How many hosts were considered.
    pub hosts_considered: u32,
    /// For each filter, how many hosts it eliminated.
    pub rejections: BTreeMap<String, u32>,
    /// The best candidates, best first, with their scores.
    pub candidates: Vec<Candidate>,
    /// What made the planner run, when it was not a new request (e.g. `host h7 failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// The newest telemetry sample the load-aware score read, ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry_watermark_ms: Option<u64>,
    /// The policy set version the decision was made under (none before any policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<u64>,
}

/// One host the planner weighed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Candidate {
    /// The host.
    pub host: HostId,
    /// Its total score (higher is better).
    pub score: f64,
    /// The parts the score is made of.
    pub components: BTreeMap<String, f64>,
}

/// Payload of [`EventKind::VmPlaced`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmPlaced {
    /// The VM.
    pub vm: VmId,
    /// The chosen host.
    pub host: HostId,
    /// The incarnation that will run there.
    pub incarnation: IncarnationId,
    /// The assignment's generation.
    pub generation: Generation,
    /// Why this host.
    pub explanation: PlacementExplanation,
}

/// Payload of [`EventKind::VmPlacementFailed`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmPlacementFailed {
    /// The VM, which stays pending.
    pub vm: VmId,
    /// One line for humans, e.g. `no host has 64 vCPUs free (capacity eliminated 4 of 4)`.
    pub reason: String,
    /// Which filters eliminated which hosts.
    pub explanation: PlacementExplanation,
}

/// Payload of [`EventKind::VmRunning`] and [`EventKind::VmStopped`]: an agent's observation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmIncarnationReport {
    /// The VM.
    pub vm: VmId,
    /// The host that observed it.
    pub host: HostId,
    /// The incarnation observed.
    pub incarnation: IncarnationId,
    /// Its generation.
    pub generation: Generation,
}

/// Payload of [`EventKind::VmFailed`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmFailed {
    /// The VM.
    pub vm: VmId,
    /// The host it failed on.
    pub host: HostId,
    /// The incarnation that failed.
    pub incarnation: IncarnationId,
    /// Its generation.
    pub generation: Generation,
    /// What the agent saw (exit status, driver error…).
    pub reason: String,
}

/// Payload of [`EventKind::VmDeleteRequested`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmDeleteRequested {
    /// The VM.
    pub vm: VmId,
}

/// Payload of [`EventKind::VmDeleted`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmDeleted {
    /// The VM.
    pub vm: VmId,
}

/// Payload of [`EventKind::VmMigrationPlanned`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmMigrationPlanned {
    /// The VM.
    pub vm: VmId,
    /// Where it runs.
    pub from: HostId,
    /// Where it goes.
    pub to: HostId,
    /// The running incarnation.
    pub source_incarnation: IncarnationId,
    /// The incarnation it becomes on the destination.
    pub target_incarnation: IncarnationId,
    /// The destination incarnation's generation.
    pub target_generation: Generation,
    /// Why (operator request, drain, rebalance…).
    pub reason: String,
    /// The policy set version the destination was chosen under (none before any policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<u64>,
}

/// Payload of [`EventKind::VmMigrationIncomingReady`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmMigrationIncomingReady {
    /// The VM.
    pub vm: VmId,
    /// The destination.
    pub host: HostId,
    /// The waiting incarnation.
    pub incarnation: IncarnationId,
    /// Where it listens.
    pub uri: String,
}

/// Payload of [`EventKind::VmMigrationCompleted`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmMigrationCompleted {
    /// The VM.
    pub vm: VmId,
    /// The source.
    pub from: HostId,
    /// The destination.
    pub to: HostId,
    /// The incarnation that ran on the source.
    pub source_incarnation: IncarnationId,
    /// The incarnation that runs on the destination now.
    pub target_incarnation: IncarnationId,
    /// How long the VM was paused for the switch-over, as the hypervisor measured it.
    pub downtime_ms: u64,
    /// How long the transfer took.
    pub duration_ms: u64,
}

/// Payload of [`EventKind::VmMigrationFailed`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmMigrationFailed {
    /// The VM.
    pub vm: VmId,
    /// The host that reported the failure (source or destination).
    pub reported_by: HostId,
    /// The destination incarnation that will not be used.
    pub target_incarnation: IncarnationId,
    /// What went wrong.
    pub reason: String,
}

/// Payload of [`EventKind::HostSuspected`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostSuspected {
    /// The host.
    pub host: HostId,
    /// How long the orchestrator had heard nothing, ms (its own clock).
    pub silent_ms: u64,
}

/// Payload of [`EventKind::HostFailed`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostFailed {
    /// The host.
    pub host: HostId,
    /// How long the orchestrator had heard nothing, ms.
    pub silent_ms: u64,
    /// The agents' lease in force, ms: the host's VMs were fenced by then.
    pub agent_lease_ms: u64,
    /// The host-failure timeout in force, ms.
    pub host_failure_timeout_ms: u64,
}

/// Payload of [`EventKind::HostRecovered`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostRecovered {
    /// The host.
    pub host: HostId,
}

/// Payload of [`EventKind::HealingPaused`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealingPaused {
    /// Hosts silent at once.
    pub silent_hosts: u32,
    /// Hosts that were not already failed.
    pub hosts: u32,
    /// For humans.
    pub reason: String,
}

/// Payload of [`EventKind::HealingResumed`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealingResumed {
    /// Hosts still silent.
    pub silent_hosts: u32,
}

/// Payload of [`EventKind::VmGaveUp`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmGaveUp {
    /// The VM.
    pub vm: VmId,
    /// Failures within the window.
    pub failures: u32,
    /// The window, ms.
    pub window_ms: u64,
    /// For humans.
    pub reason: String,
}

/// Payload of [`EventKind::HostCordoned`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostCordoned {
    /// The host.
    pub host: HostId,
}

/// Payload of [`EventKind::HostDrainRequested`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostDrainRequested {
    /// The host.
    pub host: HostId,
    /// VMs on it when the drain started.
    pub vms: u32,
}

/// Payload of [`EventKind::HostDrained`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostDrained {
    /// The host.
    pub host: HostId,
}

/// Payload of [`EventKind::HostUncordoned`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostUncordoned {
    /// The host.
    pub host: HostId,
}

/// Payload of [`EventKind::PolicyApplied`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyApplied {
    /// The version of the whole policy set once this is applied (1, 2, …): decisions record
    /// the version they were made under.
    pub version: u64,
    /// The document, in full.
    pub policy: crate::policy::Policy,
}

/// Payload of [`EventKind::PolicyRemoved`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyRemoved {
    /// The version of the policy set once it is removed.
    pub version: u64,
    /// The policy's name.
    pub name: String,
}

/// Payload of [`EventKind::PolicyConflictResolved`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyConflictResolved {
    /// The policy set version this holds for.
    pub version: u64,
    /// The policy that prevails.
    pub winner: String,
    /// The policy that gives way where the two disagree.
    pub loser: String,
    /// What they disagree on and which step of the order decided.
    pub reason: String,
}

/// Payload of [`EventKind::PolicyViolationObserved`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyViolationObserved {
    /// The policy set version it was checked against.
    pub version: u64,
    /// The policy broken.
    pub policy: String,
    /// The VM breaking it.
    pub vm: VmId,
    /// Where the VM runs.
    pub host: HostId,
    /// How it breaks it.
    pub reason: String,
    /// What the orchestrator does about it: `migrate` (a hard rule, inside a maintenance
    /// window), `wait for a maintenance window`, or `report` (audit and soft rules).
    pub action: String,
}

/// Payload of [`EventKind::GroupCreated`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupCreated {
    /// The group.
    pub spec: crate::group::GroupSpec,
}

/// Payload of [`EventKind::GroupDeleted`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupDeleted {
    /// The group's name.
    pub group: String,
}

/// Payload of [`EventKind::GroupScaleRefused`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupScaleRefused {
    /// The group.
    pub group: String,
    /// Members now.
    pub from: u32,
    /// The size the scaler wanted.
    pub wanted: u32,
    /// Why it wanted it (as a `GroupScaled` would say).
    pub reason: String,
    /// Why it may not (the refusal: a quota, a placement that failed).
    pub refusal: String,
    /// The policy set version it was decided under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<u64>,
}

/// Payload of [`EventKind::GroupScaled`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupScaled {
    /// The group.
    pub group: String,
    /// Members before.
    pub from: u32,
    /// Members after (or recommended).
    pub to: u32,
    /// Only a recommendation (forecast-only mode): nothing was created or deleted.
    #[serde(default)]
    pub recommendation_only: bool,
    /// Why, for humans (`mean CPU 0.82 above target 0.60`, `below the scheduled minimum 6`).
    pub reason: String,
    /// The observed mean CPU utilisation of the members, 0–1, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_cpu: Option<f64>,
    /// The target it tracks.
    pub target_cpu: f64,
    /// The forecast it acted on, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forecast: Option<crate::group::ForecastNote>,
    /// The bounds in force (after schedules and scaling policies).
    pub min: u32,
    /// The upper bound in force.
    pub max: u32,
    /// The cooldowns then: seconds since the last scale-up and scale-down, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_last_up_s: Option<u64>,
    /// Seconds since the last scale-down, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_last_down_s: Option<u64>,
    /// The policy set version the bounds were read under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<u64>,
    /// Members created (their `VmRequested` follow in the same append).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub created: Vec<VmId>,
    /// Members removed (their `VmDeleteRequested` follow).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<VmId>,
}

/// Payload of [`EventKind::LeaderElected`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaderElected {
    /// The replica.
    pub replica: String,
    /// The lease revision it holds: a term number that only grows.
    pub term: u64,
    /// Where its HTTP API listens.
    pub http: String,
}
