//! Telemetry and heartbeats: the samples agents and other systems publish.
//!
//! `nc.telemetry.host.<host>` carries [`HostTelemetry`] (with the samples of its VMs, from
//! agents), `nc.telemetry.vm.<vm>` carries [`VmTelemetry`] (stream TELEMETRY, kept ~24 h).
//! `nc.hb.<host>` carries [`Heartbeat`] on core NATS: losing one is harmless, the next one
//! follows. `schemas/README.md` shows how another system publishes these.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{HostId, VmId};

/// One sample of a host's load.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostTelemetry {
    /// Major schema version ([`crate::SCHEMA_VERSION`]).
    pub schema: u32,
    /// The host; must match the subject's host token.
    pub host: HostId,
    /// Sample time, ms since the Unix epoch.
    pub at_ms: u64,
    /// CPU utilisation of the whole host, 0.0–1.0.
    pub cpu_util: f64,
    /// Memory in use, MiB.
    pub memory_used_mib: u64,
    /// One-minute load average, if the publisher knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load1: Option<f64>,
    /// Samples of the VMs on the host, taken with this one (at `at_ms`). Agents send their
    /// VMs' samples here: one message per host and period instead of one per VM. Other
    /// systems may leave it out and publish [`VmTelemetry`] per VM instead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<VmSample>,
}

/// One VM's sample inside a [`HostTelemetry`] (the time and host are the message's).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSample {
    /// The VM.
    pub vm: VmId,
    /// CPU utilisation of the VM's vCPUs, 0.0–1.0.
    pub cpu_util: f64,
    /// Memory in use inside the VM, MiB.
    pub memory_used_mib: u64,
    /// The hypervisor's view of the VM (`running`, `paused`, …), if the publisher knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

impl VmSample {
    /// The sample as a stand-alone [`VmTelemetry`] taken at `at_ms`.
    #[must_use]
    pub fn at(&self, at_ms: u64) -> VmTelemetry {
        VmTelemetry {
            schema: crate::SCHEMA_VERSION,
            vm: self.vm,
            at_ms,
            cpu_util: self.cpu_util,
            memory_used_mib: self.memory_used_mib,
            status: self.status.clone(),
        }
    }
}

/// One sample of a VM's load.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmTelemetry {
    /// Major schema version ([`crate::SCHEMA_VERSION`]).
    pub schema: u32,
    /// The VM; must match the subject's VM token.
    pub vm: VmId,
    /// Sample time, ms since the Unix epoch.
    pub at_ms: u64,
    /// CPU utilisation of the VM's vCPUs, 0.0–1.0.
    pub cpu_util: f64,
    /// Memory in use inside the VM, MiB.
    pub memory_used_mib: u64,
    /// The hypervisor's view of the VM (`running`, `paused`, …), if the publisher knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// "I am alive", every second or so, from each agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// Major schema version ([`crate::SCHEMA_VERSION`]).
    pub schema: u32,
    /// The host.
    pub host: HostId,
    /// Sent at, ms since the Unix epoch (agent's clock).
    pub at_ms: u64,
    /// Counts up from 0 at each agent start.
    pub seq: u64,
    /// The revision of the host's lease (KV `nc-host-leases`) the agent last renewed, if it
    /// holds one: the orchestrator fails the host only by overwriting that very revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_revision: Option<u64>,
}
