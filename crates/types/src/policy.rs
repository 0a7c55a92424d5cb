//! Policy documents: rules an operator writes once and every planner keeps to.
//!
//! A document names one rule, the VMs it is about (its scope), how much it binds (its
//! enforcement) and its priority. Parsing (YAML or JSON, with file/line/column errors),
//! validation, conflict detection and resolution live in the `novacron-policy` crate; this is
//! the data, as the log records it in `PolicyApplied`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Labels, RestartPolicy};

/// One policy document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Unique name: 1–63 characters of `a-z`, `0-9` and `-`.
    pub name: String,
    /// What it is for, for humans.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// The VMs it is about (all of them when empty).
    #[serde(default, skip_serializing_if = "Scope::is_cluster")]
    pub scope: Scope,
    /// Higher wins when two soft rules pull apart (default 0).
    #[serde(default)]
    pub priority: i32,
    /// `hard` (never violated; the default), `soft` (a preference) or `audit` (only reported).
    #[serde(default)]
    pub enforcement: Enforcement,
    /// What it asks for.
    pub rule: Rule,
}

/// The VMs a policy is about: a group, or the VMs carrying some labels, or (neither) all.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Scope {
    /// The VMs of this group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The VMs carrying all these labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Labels>,
}

impl Scope {
    /// Whether it covers the whole cluster.
    #[must_use]
    pub fn is_cluster(&self) -> bool {
        self.group.is_none() && self.selector.is_none()
    }
}

/// How much a policy binds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Enforcement {
    /// Only reported.
    Audit,
    /// A preference, weighed against others.
    Soft,
    /// Never violated by a decision.
    #[default]
    Hard,
}

/// What a policy asks for. One kind per document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    /// Where the VMs may and should run.
    Placement(PlacementPolicy),
    /// Near other VMs.
    Affinity(AffinityPolicy),
    /// Away from other VMs.
    AntiAffinity(AffinityPolicy),
    /// Overcommit, headroom, VM count per host, quotas.
    Capacity(CapacityPolicy),
    /// Group size bounds and targets (for the scalers).
    Scaling(ScalingPolicy),
    /// How failed VMs are restarted.
    Healing(HealingPolicy),
    /// When disruptive actions (rebalancing migrations, drains) may run.
    MaintenanceWindow(MaintenanceWindow),
    /// How many migrations may run at once, and how often one VM may move.
    MigrationLimits(MigrationLimits),
}

impl Rule {
    /// The kind's name, as written in documents.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Rule::Placement(_) => "placement",
            Rule::Affinity(_) => "affinity",
            Rule::AntiAffinity(_) => "anti-affinity",
            Rule::Capacity(_) => "capacity",
            Rule::Scaling(_) => "scaling",
            Rule::Healing(_) => "healing",
            Rule::MaintenanceWindow(_) => "maintenance-window",
            Rule::MigrationLimits(_) => "migration-limits",
        }
    }
}

/// Host constraints and preferences.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlacementPolicy {
    /// Labels a host must carry (with `hard`) or should carry (otherwise).
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub require_labels: Labels,
    /// Hosts not to use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_hosts: Vec<String>,
    /// Spread the scope's VMs over the values of this host label (`zone`): one per domain with
    /// `hard`, as evenly as possible otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread_over: Option<String>,
}

/// The other VMs an affinity rule is about, and the domain.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AffinityPolicy {
    /// The VMs carrying all these labels (with neither this nor `group`: the scope's own VMs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Labels>,
    /// The VMs of this group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The host label whose values are the domains (`zone`, `rack`); absent: the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<String>,
}

/// Capacity rules.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CapacityPolicy {
    /// vCPUs sold per physical vCPU (cluster scope only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_overcommit: Option<f64>,
    /// Memory sold per MiB (cluster scope only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_overcommit: Option<f64>,
    /// Most VMs on one host (cluster scope only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vms_per_host: Option<u32>,
    /// Headroom kept free on every host, never given to VMs (cluster scope only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved: Option<Headroom>,
    /// At most this much, summed over the scope's live VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<Quota>,
}

/// Resources held back on each host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Headroom {
    /// vCPUs.
    #[serde(default)]
    pub vcpus: u32,
    /// Memory, MiB.
    #[serde(default)]
    pub memory_mib: u64,
}

/// Limits summed over a scope's live VMs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// vCPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u64>,
    /// Memory, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<u64>,
}

/// A group's size and target (consumed by the scalers).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScalingPolicy {
    /// Fewest members.
    pub min: u32,
    /// Most members.
    pub max: u32,
    /// Target mean CPU utilisation, 0–1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_cpu: Option<f64>,
    /// Least time between two scale-ups (`5m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_up_cooldown: Option<String>,
    /// Least time between two scale-downs (`15m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down_cooldown: Option<String>,
    /// Minimum sizes during time windows (UTC), as a group's own schedules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<crate::group::ScheduledSize>,
    /// vCPUs of one member (for quota checks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_vcpus: Option<u32>,
    /// Memory of one member, MiB (for quota checks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_memory_mib: Option<u64>,
}

/// Which VMs come back first when capacity is short.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RestartPriority {
    /// Last.
    Low,
    /// In between.
    Medium,
    /// First.
    High,
}

/// Whether a VM on a failing path is moved live or restarted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Prefer {
    /// Live-migrate where possible.
    Migrate,
    /// Stop and start elsewhere.
    Restart,
}

/// Healing rules.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealingPolicy {
    /// When a VM is restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartPolicy>,
    /// Restart order when capacity is short.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<RestartPriority>,
    /// Most restarts within `window` before giving up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_restarts: Option<u32>,
    /// The window of `max_restarts` (`10m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// Migrate or restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefer: Option<Prefer>,
}

/// A day of the week.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

/// When disruptive actions may run, in UTC. A window whose end is before its start runs past
/// midnight into the next day.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceWindow {
    /// The days it opens on (every day when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub days: Vec<Weekday>,
    /// Opens at `HH:MM` (UTC).
    pub start: String,
    /// Closes at `HH:MM` (UTC).
    pub end: String,
}

/// Migration limits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrationLimits {
    /// Concurrent migrations in or out of one host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_host: Option<u32>,
    /// Concurrent migrations in the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<u32>,
    /// Least time between two moves of one VM (`30m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_cooldown: Option<String>,
}
