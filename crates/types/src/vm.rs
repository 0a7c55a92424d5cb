//! What an operator asks for when creating a VM.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::Resources;

/// Key/value labels on hosts and VMs. Ordered, so that encodings (and state hashes) are stable.
pub type Labels = BTreeMap<String, String>;

/// The desired shape of a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Operator-facing name, 1–128 characters; unique among live VMs.
    pub name: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disk in GiB; 0 for a diskless VM.
    #[serde(default)]
    pub disk_gib: u64,
    /// The group this VM belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Free-form labels, used by placement constraints.
    #[serde(default)]
    pub labels: Labels,
    /// What to do when the VM fails (`on-failure` unless said otherwise).
    #[serde(default, skip_serializing_if = "RestartPolicy::is_default")]
    pub restart: RestartPolicy,
    /// Where it may and prefers to run.
    #[serde(default, skip_serializing_if = "PlacementRules::is_empty")]
    pub placement: PlacementRules,
}

/// A VM's placement constraints and preferences.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlacementRules {
    /// Labels a host must carry (all of them, with these values).
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub require_labels: Labels,
    /// Keep it off hosts that run other VMs of its group.
    #[serde(default, skip_serializing_if = "AntiAffinity::is_none")]
    pub group_anti_affinity: AntiAffinity,
}

impl PlacementRules {
    /// No constraints and no preferences.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.require_labels.is_empty() && self.group_anti_affinity.is_none()
    }
}

/// How strongly a VM avoids sharing a host with its group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AntiAffinity {
    /// No preference.
    #[default]
    None,
    /// A preference: the planner scores sharing down.
    Soft,
    /// A constraint: never on a host with another VM of its group.
    Hard,
}

impl AntiAffinity {
    /// Whether there is no preference.
    #[must_use]
    pub fn is_none(&self) -> bool {
        *self == AntiAffinity::None
    }
}

/// When the orchestrator restarts a VM by itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// After a failure, and after it stops without being told to.
    Always,
    /// After a failure (crash, failed start) — the default.
    #[default]
    OnFailure,
    /// Never: a failed VM stays failed.
    Never,
}

impl RestartPolicy {
    /// Whether this is the default (`on-failure`).
    #[must_use]
    pub fn is_default(&self) -> bool {
        *self == RestartPolicy::OnFailure
    }
}

impl VmSpec {
    /// What the VM reserves on its host.
    #[must_use]
    pub fn resources(&self) -> Resources {
        Resources { vcpus: self.vcpus, memory_mib: self.memory_mib, disk_gib: self.disk_gib }
    }
}
