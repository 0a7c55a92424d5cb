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
    #[serde(default, skip_serializing_if = "Strength::is_none")]
    pub group_anti_affinity: Strength,
    /// Keep it on hosts that run other VMs of its group (co-location). The group's first VM
    /// goes anywhere; with `hard`, the others follow it while any member runs.
    #[serde(default, skip_serializing_if = "Strength::is_none")]
    pub group_affinity: Strength,
    /// Affinity and anti-affinity to other VMs chosen by their labels, per host or per failure
    /// domain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vm_affinity: Vec<VmAffinity>,
    /// Bin-pack or spread this VM, overriding its group's and the cluster's setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
}

impl PlacementRules {
    /// No constraints and no preferences.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.require_labels.is_empty()
            && self.group_anti_affinity.is_none()
            && self.group_affinity.is_none()
            && self.vm_affinity.is_empty()
            && self.strategy.is_none()
    }
}

/// How strongly a placement rule binds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Strength {
    /// No rule.
    #[default]
    None,
    /// A preference: the planner scores hosts by it.
    Soft,
    /// A constraint: a host breaking it is filtered out.
    Hard,
}

impl Strength {
    /// Whether there is no rule.
    #[must_use]
    pub fn is_none(&self) -> bool {
        *self == Strength::None
    }
}

/// Whether a rule draws a VM towards other VMs or keeps it away from them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Relation {
    /// In the same domain as the selected VMs.
    Affinity,
    /// Not in the same domain as the selected VMs.
    AntiAffinity,
}

/// An affinity or anti-affinity rule towards the VMs carrying some labels.
///
/// The domain is the host, or with `topology` the set of hosts sharing that host label's value
/// (e.g. `zone`); a host without the label is a domain of its own. A VM never counts against
/// itself. Hard affinity with no selected VM anywhere is met by any host (the first of its kind
/// goes where it fits). Hard anti-affinity binds both ways: a VM that matches an existing VM's
/// selector is kept out of that VM's domain too.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmAffinity {
    /// The VMs this rule is about: those carrying all these labels (at least one).
    pub selector: Labels,
    /// Towards them or away from them.
    pub relation: Relation,
    /// `hard` (a filter) or `soft` (a score).
    pub strength: Strength,
    /// The host label whose values are the domains (`zone`, `rack`); absent: the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<String>,
}

impl VmAffinity {
    /// A hard anti-affinity rule: it keeps other VMs out of its VM's domain too.
    #[must_use]
    pub fn is_hard_anti(&self) -> bool {
        self.strength == Strength::Hard && self.relation == Relation::AntiAffinity
    }

    /// Whether a VM with these labels is one of the rule's VMs.
    #[must_use]
    pub fn selects(&self, labels: &Labels) -> bool {
        self.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// Pack VMs tightly or spread them out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Fill hosts before using new ones (fewer hosts busy; room for big VMs).
    #[default]
    BinPack,
    /// Use the emptiest host (less contention; smaller blast radius).
    Spread,
}

impl Strategy {
    /// The name used in flags, documents and explanations.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::BinPack => "bin-pack",
            Strategy::Spread => "spread",
        }
    }
}

impl std::str::FromStr for Strategy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bin-pack" | "binpack" => Ok(Strategy::BinPack),
            "spread" => Ok(Strategy::Spread),
            other => Err(format!("unknown strategy {other:?}: expected bin-pack or spread")),
        }
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
