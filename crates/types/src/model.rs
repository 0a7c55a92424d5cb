//! The forecasting model lifecycle, as the log records it: a model is trained (its
//! hyperparameters, validation and test scores, data window and artifact digest), promoted,
//! and rolled back. Artifacts live in the object store `nc-model-objects`, named by digest.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The chosen hyperparameters of one horizon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HorizonHyperparameters {
    /// Steps ahead.
    pub horizon: u32,
    /// Learning rate (the boosted trees' shrinkage, `eta`).
    pub learning_rate: f64,
    /// L2 penalty (on the trees' leaf weights, `lambda`).
    pub l2: f64,
    /// Epochs (linear) or boosting rounds (trees) kept by early stopping.
    pub epochs: u32,
}

/// How a model scored on one horizon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HorizonScore {
    /// Steps ahead.
    pub horizon: u32,
    /// Validation MAE (CPU-% points), what training optimised.
    pub validation_mae: f64,
    /// Test MAE, on data it never saw.
    pub test_mae: f64,
    /// Test MAE of the best naive baseline on the same forecasts.
    pub baseline_mae: f64,
    /// Which baseline that was.
    pub baseline: String,
    /// Share of series where the model beats that baseline.
    pub win_rate: f64,
}

/// What a model was trained on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DataWindow {
    /// Trace files (or their names).
    pub sources: Vec<String>,
    /// Series used.
    pub series: u32,
    /// Share of each series used for validation.
    pub val_share: f64,
    /// Share of each series held out as test.
    pub test_share: f64,
    /// Training seed.
    pub seed: u64,
}

/// Payload of `ModelTrained`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelTrained {
    /// The model's id (`<kind>-<first 12 hex digits of the digest>`).
    pub model: String,
    /// The model family (`global-linear` or `global-gbdt`).
    pub kind: String,
    /// SHA-256 of the artifact, hex.
    pub digest: String,
    /// Per horizon, the hyperparameters chosen on validation.
    pub hyperparameters: Vec<HorizonHyperparameters>,
    /// Per horizon, validation and test scores.
    pub scores: Vec<HorizonScore>,
    /// The data.
    pub data: DataWindow,
}

/// Payload of `ModelPromoted`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelPromoted {
    /// The model now used for forecasts.
    pub model: String,
    /// The one it replaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// Why (an operator, an A/B test's result).
    pub reason: String,
}

/// Payload of `ModelRetrainingRequested`: the live errors of a model drifted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelRetrainingRequested {
    /// The model (an id, or `ses(α=…)` for the built-in smoothing).
    pub model: String,
    /// The group whose forecasts drifted.
    pub group: String,
    /// Why.
    pub reason: String,
    /// Live MAE so far, CPU-% points.
    pub live_mae: f64,
    /// Forecasts scored so far.
    pub forecasts: u64,
}

/// Payload of `ModelRolledBack`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelRolledBack {
    /// The model withdrawn.
    pub from: String,
    /// The model in use again (none: the built-in exponential smoothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Why.
    pub reason: String,
}
