//! Commands to agents.
//!
//! A command is not a separate message: it *is* an event of the log, appended on the subject of
//! the host that must act (`nc.cmd.<host>.<vm>`), so that deciding and commanding are one append.
//! The agent reads the envelope and turns it into an [`AgentCommand`] with
//! [`Envelope::as_command`](crate::Envelope::as_command).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Generation, HostId, IncarnationId, VmId, VmSpec};

/// Start an incarnation of a VM on a host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartVm {
    /// The VM.
    pub vm: VmId,
    /// The host that must start it.
    pub host: HostId,
    /// The run being started.
    pub incarnation: IncarnationId,
    /// The assignment's generation; the agent refuses anything older than it has seen.
    pub generation: Generation,
    /// What to run.
    pub spec: VmSpec,
}

/// Stop (and forget) an incarnation of a VM on a host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StopVm {
    /// The VM.
    pub vm: VmId,
    /// The host that must stop it.
    pub host: HostId,
    /// The run being stopped.
    pub incarnation: IncarnationId,
    /// The assignment's generation.
    pub generation: Generation,
    /// Why, for the agent's log and report.
    pub reason: String,
}

/// To the destination of a live migration: start an incarnation that waits for the VM's state
/// (QEMU `-incoming`), then report where to send it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PrepareIncoming {
    /// The VM.
    pub vm: VmId,
    /// The destination host.
    pub host: HostId,
    /// The incarnation the VM will become there.
    pub incarnation: IncarnationId,
    /// Its generation (one above the source's).
    pub generation: Generation,
    /// What to run (must match the source).
    pub spec: VmSpec,
}

/// To the source of a live migration: send the running incarnation's state to the destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateOut {
    /// The VM.
    pub vm: VmId,
    /// The source host.
    pub host: HostId,
    /// The running incarnation.
    pub incarnation: IncarnationId,
    /// Its generation.
    pub generation: Generation,
    /// The destination host.
    pub target_host: HostId,
    /// The destination's waiting incarnation.
    pub target_incarnation: IncarnationId,
    /// Where the destination listens (e.g. `tcp:10.0.0.7:49152`).
    pub uri: String,
}

/// A command as an agent sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentCommand {
    /// See [`StartVm`].
    Start(StartVm),
    /// See [`StopVm`].
    Stop(StopVm),
    /// See [`PrepareIncoming`].
    PrepareIncoming(PrepareIncoming),
    /// See [`MigrateOut`].
    MigrateOut(MigrateOut),
}

impl AgentCommand {
    /// The VM the command is about.
    #[must_use]
    pub fn vm(&self) -> VmId {
        match self {
            AgentCommand::Start(c) => c.vm,
            AgentCommand::Stop(c) => c.vm,
            AgentCommand::PrepareIncoming(c) => c.vm,
            AgentCommand::MigrateOut(c) => c.vm,
        }
    }
    /// The generation the command was issued under.
    #[must_use]
    pub fn generation(&self) -> Generation {
        match self {
            AgentCommand::Start(c) => c.generation,
            AgentCommand::Stop(c) => c.generation,
            AgentCommand::PrepareIncoming(c) => c.generation,
            AgentCommand::MigrateOut(c) => c.generation,
        }
    }
    /// The host that must act.
    #[must_use]
    pub fn host(&self) -> &HostId {
        match self {
            AgentCommand::Start(c) => &c.host,
            AgentCommand::Stop(c) => &c.host,
            AgentCommand::PrepareIncoming(c) => &c.host,
            AgentCommand::MigrateOut(c) => &c.host,
        }
    }
}
