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

/// A command as an agent sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentCommand {
    /// See [`StartVm`].
    Start(StartVm),
    /// See [`StopVm`].
    Stop(StopVm),
}

impl AgentCommand {
    /// The VM the command is about.
    #[must_use]
    pub fn vm(&self) -> VmId {
        match self {
            AgentCommand::Start(c) => c.vm,
            AgentCommand::Stop(c) => c.vm,
        }
    }
    /// The generation the command was issued under.
    #[must_use]
    pub fn generation(&self) -> Generation {
        match self {
            AgentCommand::Start(c) => c.generation,
            AgentCommand::Stop(c) => c.generation,
        }
    }
    /// The host that must act.
    #[must_use]
    pub fn host(&self) -> &HostId {
        match self {
            AgentCommand::Start(c) => &c.host,
            AgentCommand::Stop(c) => &c.host,
        }
    }
}
