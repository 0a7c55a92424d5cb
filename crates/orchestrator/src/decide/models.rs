//! Decisions about forecasting models: register a trained one, promote, roll back.

use novacron_state::ClusterState;
use novacron_types::model::{ModelPromoted, ModelRolledBack, ModelTrained};
use novacron_types::{Envelope, EventKind};

use super::*;

/// What an operator asks of the model registry.
#[derive(Clone, Debug)]
pub enum ModelAction {
    /// Record a trained model (its artifact already stored).
    Register(Box<ModelTrained>),
    /// Use this model for forecasts.
    Promote {
        /// The model.
        model: String,
        /// Why.
        reason: String,
    },
    /// Go back to the model in use before the current one.
    Rollback {
        /// Why.
        reason: String,
    },
}

/// Checks a model's record: an id of its kind and digest, a SHA-256 digest, sane scores.
///
/// # Errors
/// [`Refusal::Invalid`] naming the field.
pub fn validate_model(m: &ModelTrained) -> Result<(), Refusal> {
    let bad = |field: &str, reason: String| Err(Refusal::Invalid { field: field.into(), reason });
    if m.digest.len() != 64 || !m.digest.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()) {
        return bad("digest", "must be a SHA-256 digest in lowercase hex".into());
    }
    if m.model != format!("{}-{}", m.kind, &m.digest[..12]) {
        return bad("model", format!("must be {}-{} (kind and digest)", m.kind, &m.digest[..12]));
    }
    if m.scores.is_empty() {
        return bad("scores", "a model without test scores cannot be judged".into());
    }
    for s in &m.scores {
        if !(s.validation_mae.is_finite() && s.test_mae.is_finite() && s.baseline_mae.is_finite()) {
            return bad("scores", format!("horizon {}: scores must be numbers", s.horizon));
        }
    }
    Ok(())
}

/// Decides a registry action.
///
/// # Errors
/// An invalid record, a model already known, an unknown model, or nothing to roll back.
pub fn model_action(
    state: &ClusterState,
    action: &ModelAction,
    stamp: &mut impl Stamp,
    origin: &Origin,
) -> Result<(String, Vec<Envelope>), Refusal> {
    match action {
        ModelAction::Register(m) => {
            validate_model(m)?;
            if state.models.contains_key(&m.model) {
                return Err(Refusal::Conflict(format!("model {} is already registered", m.model)));
            }
            Ok((m.model.clone(), vec![envelope(stamp, origin, EventKind::ModelTrained((**m).clone()))]))
        }
        ModelAction::Promote { model, reason } => {
            if !state.models.contains_key(model) {
                return Err(Refusal::NotFound(format!("model {model}")));
            }
            if state.promoted.last() == Some(model) {
                return Err(Refusal::Conflict(format!("model {model} is already in use")));
            }
            let e = ModelPromoted {
                model: model.clone(),
                previous: state.promoted.last().cloned(),
                reason: reason.clone(),
            };
            Ok((model.clone(), vec![envelope(stamp, origin, EventKind::ModelPromoted(e))]))
        }
        ModelAction::Rollback { reason } => {
            let Some(from) = state.promoted.last() else {
                return Err(Refusal::Conflict("no model is promoted: nothing to roll back".into()));
            };
            let to = state.promoted.iter().rev().nth(1).cloned();
            let e = ModelRolledBack { from: from.clone(), to: to.clone(), reason: reason.clone() };
            Ok((to.unwrap_or_else(|| "ses".into()), vec![envelope(stamp, origin, EventKind::ModelRolledBack(e))]))
        }
    }
}
