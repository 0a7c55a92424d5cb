//! The JSON shapes the API and the CLI print (names fixed by the operator contract).

use serde::{Deserialize, Serialize};

use crate::{ClusterState, HostRecord, VmRecord};

/// `GET /api/v1/state` and `novacron state -o json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StateSummary {
    /// Last folded log sequence.
    pub seq: u64,
    /// The state hash at that sequence.
    pub hash: String,
    /// Number of hosts.
    pub hosts: usize,
    /// Number of VMs not deleted.
    pub vms: usize,
}

/// One VM as the API and `vm show -o json` print it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct VmView {
    /// VM id.
    pub id: String,
    /// Operator's name.
    pub name: String,
    /// Lifecycle status (`pending`, `placed`, `starting`, `running`, …).
    pub status: String,
    /// Assigned host, null until placed.
    pub host: Option<String>,
    /// Assignment generation.
    pub generation: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Disk, GiB.
    pub disk_gib: u64,
    /// Current incarnation id.
    pub incarnation: Option<String>,
    /// Labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Why it is still pending, when it is.
    pub pending_reason: Option<String>,
    /// Sequence of the last event that changed it.
    pub last_seq: u64,
}

impl From<&VmRecord> for VmView {
    fn from(v: &VmRecord) -> Self {
        VmView {
            id: v.id.to_string(),
            name: v.spec.name.clone(),
            status: v.status.as_str().to_owned(),
            host: v.host.as_ref().map(ToString::to_string),
            generation: v.generation.0,
            vcpus: v.spec.vcpus,
            memory_mib: v.spec.memory_mib,
            disk_gib: v.spec.disk_gib,
            incarnation: v.incarnation.map(|i| i.to_string()),
            labels: v.spec.labels.clone(),
            pending_reason: v.pending_reason.clone(),
            last_seq: v.last_seq,
        }
    }
}

/// One host as the API and `host list -o json` print it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct HostView {
    /// Host id.
    pub id: String,
    /// `ready`, `suspect`, `failed`, `cordoned` or `draining`.
    pub state: String,
    /// vCPU capacity.
    pub vcpus: u32,
    /// Memory capacity, MiB.
    pub memory_mib: u64,
    /// Disk capacity, GiB.
    pub disk_gib: u64,
    /// Number of VMs assigned.
    pub vms: usize,
    /// vCPUs reserved.
    pub allocated_vcpus: u32,
    /// Memory reserved, MiB.
    pub allocated_memory_mib: u64,
    /// Labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Driver.
    pub driver: String,
    /// Failures on record (the last 64 are kept).
    #[serde(default)]
    pub failures: usize,
}

impl From<&HostRecord> for HostView {
    fn from(h: &HostRecord) -> Self {
        HostView {
            id: h.id.to_string(),
            state: h.status().to_owned(),
            vcpus: h.capacity.vcpus,
            memory_mib: h.capacity.memory_mib,
            disk_gib: h.capacity.disk_gib,
            vms: h.vms.len(),
            allocated_vcpus: h.allocated.vcpus,
            allocated_memory_mib: h.allocated.memory_mib,
            labels: h.labels.clone(),
            driver: h.driver.clone(),
            failures: h.failures_ms.len(),
        }
    }
}

impl ClusterState {
    /// All VMs (deleted ones included when `include_deleted`), in id order.
    #[must_use]
    pub fn vm_views(&self, include_deleted: bool) -> Vec<VmView> {
        self.vms
            .values()
            .filter(|v| include_deleted || v.status != crate::VmStatus::Deleted)
            .map(VmView::from)
            .collect()
    }

    /// All hosts, in id order.
    #[must_use]
    pub fn host_views(&self) -> Vec<HostView> {
        self.hosts.values().map(HostView::from).collect()
    }
}
