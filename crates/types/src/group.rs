//! VM groups: a set of like VMs whose size the orchestrator keeps within bounds and scales to a
//! CPU target — reactively from telemetry, ahead of forecast load, and on schedules.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::Weekday;
use crate::{Labels, PlacementRules, RestartPolicy};

/// A group, as created by `novacron group create` or `POST /api/v1/groups`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    /// Name: 1–63 characters of `a-z`, `0-9` and `-`; members are named `<name>-<n>`.
    pub name: String,
    /// Fewest members.
    pub min: u32,
    /// Most members.
    pub max: u32,
    /// vCPUs of each member.
    pub vcpus: u32,
    /// Memory of each member, MiB.
    pub memory_mib: u64,
    /// Disk of each member, GiB.
    #[serde(default)]
    pub disk_gib: u64,
    /// Labels of each member.
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    /// Placement rules of each member.
    #[serde(default, skip_serializing_if = "PlacementRules::is_empty")]
    pub placement: PlacementRules,
    /// Restart policy of each member.
    #[serde(default, skip_serializing_if = "RestartPolicy::is_default")]
    pub restart: RestartPolicy,
    /// Target mean CPU utilisation of the members, 0–1 (e.g. 0.6).
    pub target_cpu: f64,
    /// Least time between two scale-ups, seconds.
    #[serde(default = "default_up_cooldown")]
    pub scale_up_cooldown_s: u64,
    /// Least time between two scale-downs, seconds (also counted from the last scale-up).
    #[serde(default = "default_down_cooldown")]
    pub scale_down_cooldown_s: u64,
    /// A scale-down goes only as low as the highest size recommended within this window,
    /// seconds (so a dip does not shed members a peak needs back).
    #[serde(default = "default_stabilization")]
    pub stabilization_s: u64,
    /// Reactive only, predictive too, or forecasts recorded without acting.
    #[serde(default)]
    pub mode: ScalingMode,
    /// Minimum sizes during time windows (UTC).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<ScheduledSize>,
}

fn default_up_cooldown() -> u64 {
    120
}
fn default_down_cooldown() -> u64 {
    600
}
fn default_stabilization() -> u64 {
    300
}

/// How a group scales.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ScalingMode {
    /// Target tracking on observed utilisation.
    #[default]
    Reactive,
    /// Also scale up ahead of the forecast (upper bound of its interval); never scale in on a
    /// forecast alone.
    Predictive,
    /// Reactive, and record what the forecast recommends without acting on it.
    ForecastOnly,
}

/// A minimum size while a window is open.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduledSize {
    /// Days it opens on (every day when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub days: Vec<Weekday>,
    /// Opens at `HH:MM` (UTC).
    pub start: String,
    /// Closes at `HH:MM` (UTC); before `start` means past midnight.
    pub end: String,
    /// At least this many members meanwhile.
    pub min: u32,
}

/// The forecast behind a predictive decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForecastNote {
    /// The model and its version.
    pub model: String,
    /// How far ahead, in steps of `step_s`.
    pub horizon_steps: u32,
    /// Seconds per step.
    pub step_s: u64,
    /// Forecast load of the group: the sum of its members' CPU utilisation as a share of its
    /// maximum size, 0–1 (unlike the mean utilisation, it does not move when the group is
    /// resized).
    pub point: f64,
    /// Lower bound of its 90 % interval.
    pub lower: f64,
    /// Upper bound of its 90 % interval (what a scale-up provisions for).
    pub upper: f64,
}
