//! NovaCron's projection of the log: [`ClusterState`], folded from events by a pure
//! [`ClusterState::apply`], and its [`StateHash`].
//!
//! `apply` reads no clock, draws no random number and does no I/O; its maps are ordered. So two
//! replays of the same log agree bit for bit, which [`ClusterState::hash`] proves: it is the
//! SHA-256 of the state's canonical MessagePack encoding, and it covers the log sequence the
//! state was folded to.
//!
//! An event that does not fit the state (a report about an unknown VM, a stale incarnation) is
//! not an error of the fold: the log is the truth, so the event is counted as
//! [`Applied::Ignored`] with a reason and the fold goes on. The writer is expected not to append
//! such events, and the orchestrator checks before it does.

mod view;

use std::collections::{BTreeMap, BTreeSet};

use novacron_types::event::{
    HostRegistered, VmFailed, VmIncarnationReport, VmMigrationCompleted, VmMigrationFailed, VmMigrationPlanned,
    VmPlaced, VmRequested,
};
use novacron_types::{
    Envelope, EventId, EventKind, Generation, HostId, IncarnationId, Labels, Resources, StartVm, StopVm, VmId, VmSpec,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use view::{HostView, StateSummary, VmView};

/// The state of the whole cluster at one log sequence.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    /// The stream sequence of the last event folded in (0 = nothing yet).
    pub seq: u64,
    /// Hosts by id.
    pub hosts: BTreeMap<HostId, HostRecord>,
    /// VMs by id, including deleted ones (kept so that history stays queryable).
    pub vms: BTreeMap<VmId, VmRecord>,
    /// Live (not deleted) VM names, for uniqueness checks.
    pub names: BTreeMap<String, VmId>,
    /// How many events were folded in without effect (see [`Applied::Ignored`]).
    pub ignored_events: u64,
    /// Healing is paused because too many hosts went silent at once.
    #[serde(default)]
    pub healing_paused: bool,
    /// The replica that leads, and its term, as last elected.
    #[serde(default)]
    pub leader: Option<(String, u64)>,
    /// Planner decisions (`VmPlaced`, `VmPlacementFailed`, `VmMigrationPlanned`) by event id →
    /// their log sequence, so a decision's explanation can be read back from the log.
    #[serde(default)]
    pub decisions: BTreeMap<EventId, u64>,
    /// The policies in force, by name.
    #[serde(default)]
    pub policies: BTreeMap<String, PolicyRecord>,
    /// The version of the policy set: 0 before any policy, +1 with each apply or removal.
    #[serde(default)]
    pub policy_version: u64,
    /// Violations already recorded, by [`violation_key`] (policy and VM) → where the VM was
    /// and what was decided then (a VM that moved since is checked afresh). Cleared for a
    /// policy when it changes.
    #[serde(default)]
    pub policy_violations: BTreeMap<String, RecordedViolation>,
    /// VM groups by name.
    #[serde(default)]
    pub groups: BTreeMap<String, GroupRecord>,
    /// Trained forecasting models by id.
    #[serde(default)]
    pub models: BTreeMap<String, ModelRecord>,
    /// The promotions in force, oldest first: the last is the model in use; a rollback pops it.
    #[serde(default)]
    pub promoted: Vec<String>,
    /// Retraining requests raised per model (its id, or the built-in smoothing's name).
    #[serde(default)]
    pub retraining_requests: BTreeMap<String, u64>,
    /// Derived, not encoded (so not in the hash): the VMs not deleted whose spec has a hard
    /// anti-affinity rule. A planner must see every one of them (their rules keep other VMs
    /// out of their domain), and finding them by walking all VMs cost the engine 2 ms per
    /// planning pass with 100,000 VMs. Kept by the fold, rebuilt when a state is decoded.
    #[serde(skip)]
    pub hard_anti_affinity: BTreeSet<VmId>,
    /// Derived, not encoded: the VMs that the healing reconciler may have to act on even on
    /// healthy, undrained hosts ([`VmRecord::may_need_attention`]). Walking all 30,000 VMs for
    /// the handful that do cost the engine 2.5–7 ms per pass, ten passes a second under load.
    /// Kept by the fold, rebuilt when a state is decoded.
    #[serde(skip)]
    pub needs_attention: BTreeSet<VmId>,
}

/// A trained model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// What was recorded when it was trained.
    pub trained: novacron_types::model::ModelTrained,
    /// When, ms since the epoch (the writer's clock).
    pub at_ms: u64,
}

/// A VM group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// What it is.
    pub spec: novacron_types::group::GroupSpec,
    /// When it last grew, ms since the epoch (the writer's clock).
    pub last_up_ms: Option<u64>,
    /// When it last shrank.
    pub last_down_ms: Option<u64>,
    /// The last recommendation recorded in forecast-only mode.
    pub last_recommendation: Option<u32>,
    /// The next member number (members are `<group>-<n>`).
    pub next_member: u64,
    /// The last refused growth: (wanted size, refusal), so it is recorded once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refusal: Option<(u32, String)>,
}

/// A recorded `PolicyViolationObserved`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedViolation {
    /// The policy.
    pub policy: String,
    /// The VM.
    pub vm: VmId,
    /// Where it ran.
    pub host: HostId,
    /// How it broke the rule.
    pub reason: String,
    /// What was decided then.
    pub action: String,
    /// When, ms since the epoch (the writer's clock).
    pub at_ms: u64,
}

/// The key of a recorded violation: `policy/vm`.
#[must_use]
pub fn violation_key(policy: &str, vm: VmId) -> String {
    format!("{policy}/{vm}")
}

/// A policy in force.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyRecord {
    /// The document.
    pub policy: novacron_types::policy::Policy,
    /// The policy set version that brought it in.
    pub version: u64,
    /// The log sequence of its `PolicyApplied`.
    pub seq: u64,
    /// When it was applied, ms since the epoch (the writer's clock).
    pub at_ms: u64,
}

/// Host label overriding the cluster's CPU overcommit ratio for one host.
pub const LABEL_CPU_OVERCOMMIT: &str = "overcommit.cpu";
/// Host label overriding the cluster's memory overcommit ratio for one host.
pub const LABEL_MEMORY_OVERCOMMIT: &str = "overcommit.memory";

/// A host's own overcommit ratios, read from its labels (a number ≥ 1; anything else is no
/// override).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Overcommit {
    /// `overcommit.cpu`.
    pub cpu: Option<f64>,
    /// `overcommit.memory`.
    pub memory: Option<f64>,
}

impl Overcommit {
    /// The ratios `labels` set.
    #[must_use]
    pub fn of(labels: &Labels) -> Overcommit {
        let ratio =
            |key: &str| labels.get(key).and_then(|v| v.parse::<f64>().ok()).filter(|r| r.is_finite() && *r >= 1.0);
        Overcommit { cpu: ratio(LABEL_CPU_OVERCOMMIT), memory: ratio(LABEL_MEMORY_OVERCOMMIT) }
    }
}

/// What the log knows of one host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    /// The host.
    pub id: HostId,
    /// What it offers.
    pub capacity: Resources,
    /// Its labels.
    pub labels: Labels,
    /// Derived, not encoded: the overcommit ratios its labels set ([`Overcommit::of`]). A
    /// planner reads them for every host before every pass; looking the labels up each time
    /// was a fifth of the orchestrator's time with 10,000 hosts. Kept with the labels, rebuilt
    /// when a state is decoded.
    #[serde(skip)]
    pub overcommit: Overcommit,
    /// Its agent's driver.
    pub driver: String,
    /// Its health.
    pub state: HostState,
    /// What the operator said (cordoned, draining).
    #[serde(default)]
    pub admin: HostAdmin,
    /// Resources reserved by the VMs assigned to it.
    pub allocated: Resources,
    /// The VMs assigned to it.
    pub vms: BTreeSet<VmId>,
    /// VMs migrating here: their resources are reserved until the migration ends.
    #[serde(default)]
    pub incoming: BTreeSet<VmId>,
    /// When it first registered (writer's clock, from the event).
    pub registered_at_ms: u64,
    /// When it was declared failed (writer's clock), oldest first, the last
    /// [`HOST_FAILURES_KEPT`]: the history its failure risk is scored from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures_ms: Vec<u64>,
}

/// How many failures a host's record keeps.
pub const HOST_FAILURES_KEPT: usize = 64;

impl HostRecord {
    /// Capacity not yet reserved.
    #[must_use]
    pub fn free(&self) -> Resources {
        self.capacity.saturating_sub(self.allocated)
    }
}

/// A host's health, as the failure detector sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Heartbeats arrive.
    Ready,
    /// Missed heartbeats; not yet declared failed. Takes no new VMs, keeps its own.
    Suspect,
    /// Declared failed; its VMs are placed elsewhere.
    Failed,
}

impl HostState {
    /// The name used in the API and CLI.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Ready => "ready",
            HostState::Suspect => "suspect",
            HostState::Failed => "failed",
        }
    }
}

/// What an operator said about a host, independent of its health.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostAdmin {
    /// Takes VMs.
    #[default]
    InService,
    /// Takes no new VMs; keeps its own.
    Cordoned,
    /// Its VMs are being moved away; then it is cordoned.
    Draining,
}

impl HostRecord {
    /// Whether the planners may put VMs here: healthy and in service.
    #[must_use]
    pub fn schedulable(&self) -> bool {
        self.state == HostState::Ready && self.admin == HostAdmin::InService
    }

    /// The one word the API shows: health problems first, then the operator's status.
    #[must_use]
    pub fn status(&self) -> &'static str {
        match (self.state, self.admin) {
            (HostState::Ready, HostAdmin::Cordoned) => "cordoned",
            (HostState::Ready, HostAdmin::Draining) => "draining",
            (health, _) => health.as_str(),
        }
    }
}

/// A VM's lifecycle as the API shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmStatus {
    /// Requested, no host yet (or none could take it).
    Pending,
    /// A host was chosen; the start command is not yet appended.
    Placed,
    /// The start command is in the log; the agent has not reported yet.
    Starting,
    /// The agent reported it running.
    Running,
    /// Being moved to another host.
    Migrating,
    /// The stop command is in the log.
    Stopping,
    /// The agent reported it stopped.
    Stopped,
    /// The agent reported it failed.
    Failed,
    /// Gone for good.
    Deleted,
}

impl VmStatus {
    /// The name used in the API and CLI.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            VmStatus::Pending => "pending",
            VmStatus::Placed => "placed",
            VmStatus::Starting => "starting",
            VmStatus::Running => "running",
            VmStatus::Migrating => "migrating",
            VmStatus::Stopping => "stopping",
            VmStatus::Stopped => "stopped",
            VmStatus::Failed => "failed",
            VmStatus::Deleted => "deleted",
        }
    }
}

/// What the log knows of one VM: the intent and its current incarnation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The VM.
    pub id: VmId,
    /// What was asked for.
    pub spec: VmSpec,
    /// Where it is in its lifecycle.
    pub status: VmStatus,
    /// The host it is assigned to, if any.
    pub host: Option<HostId>,
    /// The current incarnation, if placed.
    pub incarnation: Option<IncarnationId>,
    /// The generation of the current assignment (0 before the first placement).
    pub generation: Generation,
    /// The operator asked for deletion; it is deleted once stopped.
    pub delete_requested: bool,
    /// When it was requested (writer's clock, from the event).
    pub requested_at_ms: u64,
    /// The event that last changed it.
    pub last_event: EventId,
    /// The sequence of that event.
    pub last_seq: u64,
    /// The last placement failure's reason, while pending.
    pub pending_reason: Option<String>,
    /// The live migration under way, if any.
    #[serde(default)]
    pub migration: Option<Migration>,
    /// Its most recent failures (at most [`FAILURE_HISTORY`]), oldest first.
    #[serde(default)]
    pub failures: Vec<FailureRecord>,
    /// It failed too often and is not restarted any more.
    #[serde(default)]
    pub gave_up: bool,
    /// Its most recent completed live migrations (at most [`MOVE_HISTORY`]), oldest first.
    #[serde(default)]
    pub moves: Vec<MoveRecord>,
    /// The host a live migration of it last failed from (cleared when it moves): a drain then
    /// moves it cold instead of trying again.
    #[serde(default)]
    pub migration_failed_from: Option<HostId>,
}

impl VmRecord {
    /// Whether the healing reconciler may have something to do for this VM on a healthy,
    /// undrained host: place it, start it, restart it, finish deleting it, or watch its live
    /// migration. A running, starting or stopping VM, a VM that gave up and a deleted one
    /// wait for a report or for its host to fail or drain. Conservative: a stopped VM whose
    /// restart policy (or a healing policy) says never is included too.
    #[must_use]
    pub fn may_need_attention(&self) -> bool {
        let status = match self.status {
            VmStatus::Deleted => return false,
            VmStatus::Pending | VmStatus::Placed => true,
            VmStatus::Failed | VmStatus::Stopped => !self.gave_up,
            VmStatus::Starting | VmStatus::Running | VmStatus::Migrating | VmStatus::Stopping => false,
        };
        status || self.delete_requested || self.migration.is_some()
    }
}

/// How many moves a VM remembers.
pub const MOVE_HISTORY: usize = 8;

/// One completed live migration of a VM, as the log recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRecord {
    /// When the completion was written (writer's clock).
    pub at_ms: u64,
    /// Where it left.
    pub from: HostId,
    /// Where it went.
    pub to: HostId,
}

/// How many failures a VM remembers.
pub const FAILURE_HISTORY: usize = 16;

/// One failure of a VM, as the log recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureRecord {
    /// When the failure event was written (writer's clock).
    pub at_ms: u64,
    /// Where it failed.
    pub host: HostId,
}

/// A live migration in flight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    /// The destination.
    pub to: HostId,
    /// The incarnation the VM becomes there.
    pub target_incarnation: IncarnationId,
    /// Its generation.
    pub target_generation: Generation,
    /// Where the destination listens, once it said so.
    pub uri: Option<String>,
    /// Why the migration was planned.
    pub reason: String,
}

/// The outcome of folding one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The event changed the state.
    Changed,
    /// The event did not fit the state and was skipped; the reason says why.
    Ignored(String),
}

/// A stable digest of a state: hex SHA-256 of its canonical encoding.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StateHash(pub String);

impl StateHash {
    fn of_digest(digest: &[u8]) -> StateHash {
        let mut hex = String::with_capacity(2 * digest.len());
        for b in digest {
            use std::fmt::Write;
            let _ = write!(hex, "{b:02x}");
        }
        StateHash(hex)
    }
}

impl std::fmt::Display for StateHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Passes bytes through to `inner` and into a SHA-256 digest.
struct HashingWriter<W> {
    inner: W,
    digest: Sha256,
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.digest.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Whether a VM spec has a hard anti-affinity rule ([`ClusterState::hard_anti_affinity`]).
fn has_hard_anti(spec: &novacron_types::VmSpec) -> bool {
    spec.placement.vm_affinity.iter().any(novacron_types::VmAffinity::is_hard_anti)
}

/// Why a snapshot could not be read back.
#[derive(Debug, thiserror::Error)]
#[error("snapshot does not decode as a ClusterState")]
pub struct SnapshotDecodeError(#[source] pub rmp_serde::decode::Error);

impl ClusterState {
    /// The canonical encoding: MessagePack with field names of ordered maps. Used for the hash
    /// and for snapshots.
    #[must_use]
    pub fn to_canonical_bytes(&self) -> Vec<u8> {
        novacron_types::encode(self)
    }

    /// Reads a state back from [`to_canonical_bytes`](Self::to_canonical_bytes).
    ///
    /// # Errors
    /// When the bytes are not such an encoding.
    pub fn from_canonical_bytes(bytes: &[u8]) -> Result<Self, SnapshotDecodeError> {
        rmp_serde::from_slice(bytes).map(Self::with_derived).map_err(SnapshotDecodeError)
    }

    /// Reads a state back from a canonical encoding streamed from `r` (a snapshot's chunks).
    ///
    /// # Errors
    /// When the bytes are not such an encoding, or `r` fails.
    pub fn from_canonical_reader<R: std::io::Read>(r: R) -> Result<Self, SnapshotDecodeError> {
        rmp_serde::from_read(r).map(Self::with_derived).map_err(SnapshotDecodeError)
    }

    /// A decoded state with its derived fields (not encoded) rebuilt.
    fn with_derived(mut self) -> Self {
        for h in self.hosts.values_mut() {
            h.overcommit = Overcommit::of(&h.labels);
        }
        self.hard_anti_affinity = self
            .vms
            .values()
            .filter(|v| v.status != VmStatus::Deleted && has_hard_anti(&v.spec))
            .map(|v| v.id)
            .collect();
        self.needs_attention = self.vms.values().filter(|v| v.may_need_attention()).map(|v| v.id).collect();
        self
    }

    /// Streams the canonical encoding into `w` and returns the state hash of what it wrote,
    /// without holding the encoding in memory (with 100,000 VMs it is some 140 MB).
    ///
    /// # Errors
    /// When `w` fails.
    pub fn write_canonical<W: std::io::Write>(&self, w: W) -> std::io::Result<StateHash> {
        let mut tee = HashingWriter { inner: w, digest: Sha256::new() };
        rmp_serde::encode::write_named(&mut tee, self).map_err(std::io::Error::other)?;
        Ok(StateHash::of_digest(&tee.digest.finalize()))
    }

    /// The state hash: SHA-256 of the canonical encoding, streamed (nothing is buffered). Two
    /// states hash equal exactly when their canonical encodings are equal.
    #[must_use]
    pub fn hash(&self) -> StateHash {
        // A sink cannot fail, and every field of the state encodes.
        self.write_canonical(std::io::sink()).unwrap_or_else(|_| StateHash(String::new()))
    }

    /// VMs not yet deleted.
    #[must_use]
    pub fn live_vms(&self) -> usize {
        self.vms.values().filter(|v| v.status != VmStatus::Deleted).count()
    }

    /// Counts of hosts and live VMs, with the sequence and hash.
    #[must_use]
    pub fn summary(&self) -> StateSummary {
        StateSummary { seq: self.seq, hash: self.hash().0, hosts: self.hosts.len(), vms: self.live_vms() }
    }

    /// Folds one event, read at stream sequence `seq`, into the state. Pure and total.
    pub fn apply(&mut self, seq: u64, envelope: &Envelope) -> Applied {
        self.seq = seq;
        let outcome = self.apply_kind(seq, envelope);
        if let Some(id) = envelope.event.vm() {
            match self.vms.get(&id) {
                Some(vm) if vm.may_need_attention() => self.needs_attention.insert(id),
                _ => self.needs_attention.remove(&id),
            };
        }
        if outcome == Applied::Changed
            && matches!(
                envelope.event,
                EventKind::VmPlaced(_) | EventKind::VmPlacementFailed(_) | EventKind::VmMigrationPlanned(_)
            )
        {
            self.decisions.insert(envelope.id, seq);
        }
        if matches!(outcome, Applied::Ignored(_)) {
            self.ignored_events += 1;
        }
        outcome
    }

    fn apply_kind(&mut self, seq: u64, env: &Envelope) -> Applied {
        match &env.event {
            EventKind::ModelTrained(e) => {
                if self.models.contains_key(&e.model) {
                    return Applied::Ignored(format!("ModelTrained for known model {}", e.model));
                }
                self.models.insert(e.model.clone(), ModelRecord { trained: e.clone(), at_ms: env.at_ms });
                Applied::Changed
            }
            EventKind::ModelPromoted(e) => {
                if !self.models.contains_key(&e.model) || self.promoted.last() == Some(&e.model) {
                    return Applied::Ignored(format!("ModelPromoted of unknown or current model {}", e.model));
                }
                self.promoted.push(e.model.clone());
                Applied::Changed
            }
            // A trigger for whoever retrains; the state counts them per model.
            EventKind::ModelRetrainingRequested(e) => {
                *self.retraining_requests.entry(e.model.clone()).or_default() += 1;
                Applied::Changed
            }
            EventKind::ModelRolledBack(e) => {
                if self.promoted.last() != Some(&e.from) {
                    return Applied::Ignored(format!("ModelRolledBack of {} which is not in use", e.from));
                }
                self.promoted.pop();
                Applied::Changed
            }
            EventKind::GroupCreated(e) => {
                if self.groups.contains_key(&e.spec.name) {
                    return Applied::Ignored(format!("GroupCreated for existing group {}", e.spec.name));
                }
                let record = GroupRecord {
                    spec: e.spec.clone(),
                    last_up_ms: None,
                    last_down_ms: None,
                    last_recommendation: None,
                    next_member: 1,
                    last_refusal: None,
                };
                self.groups.insert(e.spec.name.clone(), record);
                Applied::Changed
            }
            EventKind::GroupDeleted(e) => {
                if self.groups.remove(&e.group).is_none() {
                    return Applied::Ignored(format!("GroupDeleted for unknown group {}", e.group));
                }
                Applied::Changed
            }
            EventKind::GroupScaleRefused(e) => {
                let Some(g) = self.groups.get_mut(&e.group) else {
                    return Applied::Ignored(format!("GroupScaleRefused for unknown group {}", e.group));
                };
                g.last_refusal = Some((e.wanted, e.refusal.clone()));
                Applied::Changed
            }
            EventKind::GroupScaled(e) => {
                let Some(g) = self.groups.get_mut(&e.group) else {
                    return Applied::Ignored(format!("GroupScaled for unknown group {}", e.group));
                };
                if e.recommendation_only {
                    g.last_recommendation = Some(e.to);
                } else {
                    g.last_refusal = None;
                    if e.to > e.from {
                        g.last_up_ms = Some(env.at_ms);
                    } else if e.to < e.from {
                        g.last_down_ms = Some(env.at_ms);
                    }
                    g.next_member += e.created.len() as u64;
                }
                Applied::Changed
            }
            EventKind::PolicyApplied(e) => {
                if e.version != self.policy_version + 1 {
                    return Applied::Ignored(format!(
                        "PolicyApplied for version {} but the policy set is at {}",
                        e.version, self.policy_version
                    ));
                }
                self.policy_version = e.version;
                let prefix = format!("{}/", e.policy.name);
                self.policy_violations.retain(|k, _| !k.starts_with(&prefix));
                let record = PolicyRecord { policy: e.policy.clone(), version: e.version, seq, at_ms: env.at_ms };
                self.policies.insert(e.policy.name.clone(), record);
                Applied::Changed
            }
            EventKind::PolicyRemoved(e) => {
                if e.version != self.policy_version + 1 || !self.policies.contains_key(&e.name) {
                    return Applied::Ignored(format!("PolicyRemoved of {} does not follow the set", e.name));
                }
                self.policy_version = e.version;
                self.policies.remove(&e.name);
                let prefix = format!("{}/", e.name);
                self.policy_violations.retain(|k, _| !k.starts_with(&prefix));
                Applied::Changed
            }
            // A record for auditors; the resolution itself follows from the policies.
            EventKind::PolicyConflictResolved(_) => Applied::Changed,
            EventKind::PolicyViolationObserved(e) => {
                let record = RecordedViolation {
                    policy: e.policy.clone(),
                    vm: e.vm,
                    host: e.host.clone(),
                    reason: e.reason.clone(),
                    action: e.action.clone(),
                    at_ms: env.at_ms,
                };
                self.policy_violations.insert(violation_key(&e.policy, e.vm), record);
                Applied::Changed
            }
            EventKind::HostRegistered(e) => self.host_registered(env, e),
            EventKind::HostSuspected(e) => {
                self.host_transition(&e.host, &[HostState::Ready], HostState::Suspect, "HostSuspected")
            }
            EventKind::HostFailed(e) => {
                let applied = self.host_transition(
                    &e.host,
                    &[HostState::Ready, HostState::Suspect],
                    HostState::Failed,
                    "HostFailed",
                );
                if let (Applied::Changed, Some(h)) = (&applied, self.hosts.get_mut(&e.host)) {
                    h.failures_ms.push(env.at_ms);
                    if h.failures_ms.len() > HOST_FAILURES_KEPT {
                        h.failures_ms.remove(0);
                    }
                }
                applied
            }
            EventKind::HostRecovered(e) => self.host_transition(
                &e.host,
                &[HostState::Suspect, HostState::Failed],
                HostState::Ready,
                "HostRecovered",
            ),
            EventKind::HostCordoned(e) => {
                self.host_admin(&e.host, &[HostAdmin::InService], HostAdmin::Cordoned, "HostCordoned")
            }
            EventKind::HostDrainRequested(e) => self.host_admin(
                &e.host,
                &[HostAdmin::InService, HostAdmin::Cordoned],
                HostAdmin::Draining,
                "HostDrainRequested",
            ),
            EventKind::HostDrained(e) => {
                self.host_admin(&e.host, &[HostAdmin::Draining], HostAdmin::Cordoned, "HostDrained")
            }
            EventKind::HostUncordoned(e) => self.host_admin(
                &e.host,
                &[HostAdmin::Cordoned, HostAdmin::Draining],
                HostAdmin::InService,
                "HostUncordoned",
            ),
            EventKind::LeaderElected(e) => {
                if self.leader.as_ref().is_some_and(|(_, term)| *term >= e.term) {
                    Applied::Ignored(format!("LeaderElected with term {} not above the current one", e.term))
                } else {
                    self.leader = Some((e.replica.clone(), e.term));
                    Applied::Changed
                }
            }
            EventKind::HealingPaused(_) => {
                self.healing_paused = true;
                Applied::Changed
            }
            EventKind::HealingResumed(_) => {
                self.healing_paused = false;
                Applied::Changed
            }
            EventKind::VmRequested(e) => self.vm_requested(seq, env, e),
            EventKind::VmPlaced(e) => self.vm_placed(seq, env, e),
            EventKind::VmPlacementFailed(e) => self.with_vm(e.vm, seq, env.id, |vm| {
                // Pending VMs, and VMs stranded on a failed host that healing could not move yet.
                if vm.status == VmStatus::Deleted {
                    return Err("VmPlacementFailed for a deleted VM".into());
                }
                vm.pending_reason = Some(e.reason.clone());
                Ok(())
            }),
            EventKind::VmStartCommanded(c) => self.vm_start_commanded(seq, env.id, c),
            EventKind::VmRunning(r) => self.vm_observed(seq, env.id, r, VmStatus::Running),
            EventKind::VmStopCommanded(c) => self.vm_stop_commanded(seq, env.id, c),
            EventKind::VmStopped(r) => self.vm_observed(seq, env.id, r, VmStatus::Stopped),
            EventKind::VmFailed(f) => self.vm_failed(seq, env, f),
            EventKind::VmGaveUp(e) => self.with_vm(e.vm, seq, env.id, |vm| {
                vm.gave_up = true;
                Ok(())
            }),
            EventKind::VmDeleteRequested(e) => self.with_vm(e.vm, seq, env.id, |vm| {
                if vm.status == VmStatus::Deleted {
                    return Err("VmDeleteRequested for a deleted VM".into());
                }
                vm.delete_requested = true;
                Ok(())
            }),
            EventKind::VmDeleted(e) => self.vm_deleted(seq, env.id, e.vm),
            EventKind::VmMigrationPlanned(e) => self.migration_planned(seq, env.id, e),
            EventKind::VmIncomingCommanded(c) => self.with_migration(c.vm, c.incarnation, seq, env.id, |_| Ok(())),
            EventKind::VmMigrationIncomingReady(e) => self.with_migration(e.vm, e.incarnation, seq, env.id, |m| {
                m.uri = Some(e.uri.clone());
                Ok(())
            }),
            EventKind::VmMigrationStarted(c) => self.with_migration(c.vm, c.target_incarnation, seq, env.id, |m| {
                if m.to == c.target_host { Ok(()) } else { Err("VmMigrationStarted to another host".into()) }
            }),
            EventKind::VmMigrationCompleted(e) => self.migration_completed(seq, env, e),
            EventKind::VmMigrationFailed(e) => self.migration_failed(seq, env.id, e),
        }
    }

    fn migration_planned(&mut self, seq: u64, id: EventId, e: &VmMigrationPlanned) -> Applied {
        let Some(vm) = self.vms.get(&e.vm) else {
            return Applied::Ignored(format!("VmMigrationPlanned for unknown VM {}", e.vm));
        };
        if vm.status != VmStatus::Running
            || vm.migration.is_some()
            || vm.host.as_ref() != Some(&e.from)
            || vm.incarnation != Some(e.source_incarnation)
            || e.target_generation <= vm.generation
            || e.from == e.to
        {
            return Applied::Ignored(format!("VmMigrationPlanned does not fit VM {} as it is", e.vm));
        }
        let need = vm.spec.resources();
        let Some(target) = self.hosts.get_mut(&e.to) else {
            return Applied::Ignored(format!("VmMigrationPlanned to unknown host {}", e.to));
        };
        target.allocated = target.allocated.checked_add(need).unwrap_or(target.allocated);
        target.incoming.insert(e.vm);
        if let Some(vm) = self.vms.get_mut(&e.vm) {
            vm.status = VmStatus::Migrating;
            vm.migration = Some(Migration {
                to: e.to.clone(),
                target_incarnation: e.target_incarnation,
                target_generation: e.target_generation,
                uri: None,
                reason: e.reason.clone(),
            });
            vm.last_event = id;
            vm.last_seq = seq;
        }
        Applied::Changed
    }

    fn migration_completed(&mut self, seq: u64, env: &Envelope, e: &VmMigrationCompleted) -> Applied {
        let id = env.id;
        let Some(vm) = self.vms.get_mut(&e.vm) else {
            return Applied::Ignored(format!("VmMigrationCompleted for unknown VM {}", e.vm));
        };
        let Some(m) = vm.migration.clone().filter(|m| m.target_incarnation == e.target_incarnation && m.to == e.to)
        else {
            return Applied::Ignored("VmMigrationCompleted for a migration that is not under way".into());
        };
        let need = vm.spec.resources();
        if let Some(source) = vm.host.take().and_then(|h| self.hosts.get_mut(&h)) {
            source.allocated = source.allocated.saturating_sub(need);
            source.vms.remove(&e.vm);
        }
        if let Some(target) = self.hosts.get_mut(&m.to) {
            target.incoming.remove(&e.vm);
            target.vms.insert(e.vm);
        }
        vm.moves.push(MoveRecord { at_ms: env.at_ms, from: e.from.clone(), to: m.to.clone() });
        if vm.moves.len() > MOVE_HISTORY {
            vm.moves.remove(0);
        }
        vm.host = Some(m.to);
        vm.migration_failed_from = None;
        vm.incarnation = Some(m.target_incarnation);
        vm.generation = m.target_generation;
        vm.migration = None;
        vm.status = VmStatus::Running;
        vm.last_event = id;
        vm.last_seq = seq;
        Applied::Changed
    }

    fn migration_failed(&mut self, seq: u64, id: EventId, e: &VmMigrationFailed) -> Applied {
        let Some(vm) = self.vms.get_mut(&e.vm) else {
            return Applied::Ignored(format!("VmMigrationFailed for unknown VM {}", e.vm));
        };
        let Some(m) = vm.migration.take_if(|m| m.target_incarnation == e.target_incarnation) else {
            return Applied::Ignored("VmMigrationFailed for a migration that is not under way".into());
        };
        if let Some(target) = self.hosts.get_mut(&m.to) {
            target.incoming.remove(&e.vm);
            target.allocated = target.allocated.saturating_sub(vm.spec.resources());
        }
        if vm.status == VmStatus::Migrating {
            vm.status = VmStatus::Running;
        }
        vm.migration_failed_from = vm.host.clone();
        vm.last_event = id;
        vm.last_seq = seq;
        Applied::Changed
    }

    fn with_migration(
        &mut self,
        vm_id: VmId,
        target: IncarnationId,
        seq: u64,
        id: EventId,
        f: impl FnOnce(&mut Migration) -> Result<(), String>,
    ) -> Applied {
        self.with_vm(vm_id, seq, id, |vm| match vm.migration.as_mut() {
            Some(m) if m.target_incarnation == target => f(m),
            _ => Err("migration event for a migration that is not under way".into()),
        })
    }

    fn host_transition(&mut self, host: &HostId, from: &[HostState], to: HostState, what: &str) -> Applied {
        match self.hosts.get_mut(host) {
            Some(h) if from.contains(&h.state) => {
                h.state = to;
                Applied::Changed
            }
            Some(h) => Applied::Ignored(format!("{what} for host {host} that is {}", h.state.as_str())),
            None => Applied::Ignored(format!("{what} for unknown host {host}")),
        }
    }

    fn host_admin(&mut self, host: &HostId, from: &[HostAdmin], to: HostAdmin, what: &str) -> Applied {
        match self.hosts.get_mut(host) {
            Some(h) if from.contains(&h.admin) => {
                h.admin = to;
                Applied::Changed
            }
            Some(h) => Applied::Ignored(format!("{what} for host {host} that is {}", h.status())),
            None => Applied::Ignored(format!("{what} for unknown host {host}")),
        }
    }

    fn host_registered(&mut self, env: &Envelope, e: &HostRegistered) -> Applied {
        match self.hosts.get_mut(&e.host) {
            Some(h) => {
                h.capacity = e.capacity;
                h.labels = e.labels.clone();
                h.overcommit = Overcommit::of(&h.labels);
                h.driver = e.driver.clone();
            }
            None => {
                self.hosts.insert(
                    e.host.clone(),
                    HostRecord {
                        id: e.host.clone(),
                        capacity: e.capacity,
                        labels: e.labels.clone(),
                        overcommit: Overcommit::of(&e.labels),
                        driver: e.driver.clone(),
                        state: HostState::Ready,
                        admin: HostAdmin::InService,
                        allocated: Resources::ZERO,
                        vms: BTreeSet::new(),
                        incoming: BTreeSet::new(),
                        registered_at_ms: env.at_ms,
                        failures_ms: Vec::new(),
                    },
                );
            }
        }
        Applied::Changed
    }

    fn vm_requested(&mut self, seq: u64, env: &Envelope, e: &VmRequested) -> Applied {
        if self.vms.contains_key(&e.vm) {
            return Applied::Ignored(format!("VmRequested for existing VM {}", e.vm));
        }
        if self.names.contains_key(&e.spec.name) {
            return Applied::Ignored(format!("VmRequested with a name already in use: {}", e.spec.name));
        }
        self.names.insert(e.spec.name.clone(), e.vm);
        if has_hard_anti(&e.spec) {
            self.hard_anti_affinity.insert(e.vm);
        }
        self.vms.insert(
            e.vm,
            VmRecord {
                id: e.vm,
                spec: e.spec.clone(),
                status: VmStatus::Pending,
                host: None,
                incarnation: None,
                generation: Generation(0),
                delete_requested: false,
                requested_at_ms: env.at_ms,
                last_event: env.id,
                last_seq: seq,
                pending_reason: None,
                migration: None,
                failures: Vec::new(),
                gave_up: false,
                migration_failed_from: None,
                moves: Vec::new(),
            },
        );
        Applied::Changed
    }

    fn vm_placed(&mut self, seq: u64, env: &Envelope, e: &VmPlaced) -> Applied {
        let Some(vm) = self.vms.get(&e.vm) else {
            return Applied::Ignored(format!("VmPlaced for unknown VM {}", e.vm));
        };
        if vm.status == VmStatus::Deleted {
            return Applied::Ignored(format!("VmPlaced for deleted VM {}", e.vm));
        }
        if e.generation <= vm.generation {
            return Applied::Ignored(format!(
                "VmPlaced with generation {} not above current {}",
                e.generation, vm.generation
            ));
        }
        if !self.hosts.contains_key(&e.host) {
            return Applied::Ignored(format!("VmPlaced on unknown host {}", e.host));
        }
        let need = vm.spec.resources();
        let previous = vm.host.clone();
        if let Some(prev) = previous.and_then(|p| self.hosts.get_mut(&p)) {
            prev.allocated = prev.allocated.saturating_sub(need);
            prev.vms.remove(&e.vm);
        }
        // A new placement (healing, say) supersedes a migration under way: its target's
        // reservation is released, whichever host the VM lands on now.
        let superseded = self.vms.get_mut(&e.vm).and_then(|v| v.migration.take());
        if let Some(t) = superseded.and_then(|m| self.hosts.get_mut(&m.to)) {
            t.allocated = t.allocated.saturating_sub(need);
            t.incoming.remove(&e.vm);
        }
        if let Some(h) = self.hosts.get_mut(&e.host) {
            h.allocated = h.allocated.checked_add(need).unwrap_or(h.allocated);
            h.vms.insert(e.vm);
        }
        if let Some(vm) = self.vms.get_mut(&e.vm) {
            vm.status = VmStatus::Placed;
            vm.migration_failed_from = None;
            vm.host = Some(e.host.clone());
            vm.incarnation = Some(e.incarnation);
            vm.generation = e.generation;
            vm.pending_reason = None;
            vm.last_event = env.id;
            vm.last_seq = seq;
        }
        Applied::Changed
    }

    fn vm_start_commanded(&mut self, seq: u64, id: EventId, c: &StartVm) -> Applied {
        self.with_vm(c.vm, seq, id, |vm| {
            if vm.incarnation != Some(c.incarnation) || vm.host.as_ref() != Some(&c.host) {
                return Err("VmStartCommanded for an incarnation that is not current".into());
            }
            // After a migration the start only confirms the running incarnation to its agent.
            if vm.status != VmStatus::Running {
                vm.status = VmStatus::Starting;
            }
            Ok(())
        })
    }

    fn vm_stop_commanded(&mut self, seq: u64, id: EventId, c: &StopVm) -> Applied {
        self.with_vm(c.vm, seq, id, |vm| {
            if vm.incarnation != Some(c.incarnation) {
                return Err("VmStopCommanded for an incarnation that is not current".into());
            }
            // A deleted VM keeps its last incarnation for the record; nothing brings it back.
            if vm.status == VmStatus::Deleted {
                return Err("VmStopCommanded for a deleted VM".into());
            }
            vm.status = VmStatus::Stopping;
            Ok(())
        })
    }

    fn vm_observed(&mut self, seq: u64, id: EventId, r: &VmIncarnationReport, status: VmStatus) -> Applied {
        self.with_vm(r.vm, seq, id, |vm| {
            if vm.incarnation != Some(r.incarnation) {
                return Err(format!("{} for an incarnation that is not current", status.as_str()));
            }
            if vm.status == VmStatus::Deleted {
                return Err("report for a deleted VM".into());
            }
            vm.status = status;
            Ok(())
        })
    }

    fn vm_failed(&mut self, seq: u64, env: &Envelope, f: &VmFailed) -> Applied {
        self.with_vm(f.vm, seq, env.id, |vm| {
            if vm.incarnation != Some(f.incarnation) {
                return Err("VmFailed for an incarnation that is not current".into());
            }
            if vm.status == VmStatus::Deleted {
                return Err("VmFailed for a deleted VM".into());
            }
            vm.status = VmStatus::Failed;
            vm.failures.push(FailureRecord { at_ms: env.at_ms, host: f.host.clone() });
            if vm.failures.len() > FAILURE_HISTORY {
                vm.failures.remove(0);
            }
            Ok(())
        })
    }

    fn vm_deleted(&mut self, seq: u64, id: EventId, vm_id: VmId) -> Applied {
        let Some(vm) = self.vms.get_mut(&vm_id) else {
            return Applied::Ignored(format!("VmDeleted for unknown VM {vm_id}"));
        };
        if vm.status == VmStatus::Deleted {
            return Applied::Ignored(format!("VmDeleted for deleted VM {vm_id}"));
        }
        let need = vm.spec.resources();
        if let Some(h) = vm.host.take().and_then(|h| self.hosts.get_mut(&h)) {
            h.allocated = h.allocated.saturating_sub(need);
            h.vms.remove(&vm_id);
        }
        if let Some(t) = vm.migration.take().and_then(|m| self.hosts.get_mut(&m.to)) {
            t.allocated = t.allocated.saturating_sub(need);
            t.incoming.remove(&vm_id);
        }
        vm.status = VmStatus::Deleted;
        vm.last_event = id;
        vm.last_seq = seq;
        self.hard_anti_affinity.remove(&vm_id);
        if self.names.get(&vm.spec.name) == Some(&vm_id) {
            self.names.remove(&vm.spec.name);
        }
        Applied::Changed
    }

    fn with_vm(
        &mut self,
        vm_id: VmId,
        seq: u64,
        id: EventId,
        f: impl FnOnce(&mut VmRecord) -> Result<(), String>,
    ) -> Applied {
        let Some(vm) = self.vms.get_mut(&vm_id) else {
            return Applied::Ignored(format!("event for unknown VM {vm_id}"));
        };
        match f(vm) {
            Ok(()) => {
                vm.last_event = id;
                vm.last_seq = seq;
                Applied::Changed
            }
            Err(reason) => Applied::Ignored(reason),
        }
    }
}

#[cfg(test)]
mod tests;
