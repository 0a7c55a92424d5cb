//! Per-environment orchestrator profiles (`--config FILE --profile NAME`): forecasting cadence,
//! retraining triggers and resource limits for dev, staging and production, in one strictly
//! parsed YAML file (`deploy/profiles.yaml` is an example).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;

/// The file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    profiles: BTreeMap<String, Profile>,
}

/// One environment.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// How often predictive groups sample their load (`5m`).
    #[serde(default)]
    pub forecast_step: Option<String>,
    /// How many steps ahead predictive scaling provisions for.
    #[serde(default)]
    pub forecast_horizon_steps: Option<u32>,
    /// When live forecast errors call for retraining.
    #[serde(default)]
    pub retraining: Option<Retraining>,
    /// Resource limits.
    #[serde(default)]
    pub limits: Option<Limits>,
}

/// Retraining triggers.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Retraining {
    /// Page–Hinkley tolerance, points.
    pub drift_delta: Option<f64>,
    /// Page–Hinkley threshold, point-steps.
    pub drift_lambda: Option<f64>,
    /// Request retraining once the live MAE is above this, points.
    pub live_mae_above: Option<f64>,
    /// …after at least this many scored forecasts.
    pub min_forecasts: Option<u64>,
}

/// Resource limits.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// The most members a group may be created with.
    pub max_group_members: Option<u32>,
    /// Concurrent live migrations out of one host.
    pub migrations_per_host: Option<usize>,
    /// Concurrent live migrations in the cluster.
    pub migrations_in_cluster: Option<usize>,
}

/// Reads profile `name` from `path`; errors say file, line and column, or which value is wrong.
///
/// # Errors
/// An unreadable or malformed file, an unknown profile, or a value out of range.
pub fn load(path: &Path, name: &str) -> anyhow::Result<Profile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: ProfileFile = serde_yaml::from_str(&text).map_err(|e| {
        let (l, c) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
        let msg = e.to_string();
        anyhow::anyhow!("{}:{l}:{c}: {}", path.display(), msg.split(" at line ").next().unwrap_or(&msg))
    })?;
    let Some(p) = file.profiles.get(name) else {
        let known: Vec<&String> = file.profiles.keys().collect();
        bail!("{}: no profile {name:?} (it has {known:?})", path.display());
    };
    let at = |field: &str| format!("{}: profile {name}: {field}", path.display());
    if let Some(s) = &p.forecast_step {
        let d = humantime::parse_duration(s).map_err(|e| anyhow::anyhow!("{}: {s:?}: {e}", at("forecast_step")))?;
        if d.is_zero() {
            bail!("{}: must be longer than zero", at("forecast_step"));
        }
    }
    if p.forecast_horizon_steps == Some(0) {
        bail!("{}: must be at least 1", at("forecast_horizon_steps"));
    }
    if let Some(r) = &p.retraining {
        for (f, v) in
            [("drift_delta", r.drift_delta), ("drift_lambda", r.drift_lambda), ("live_mae_above", r.live_mae_above)]
        {
            if let Some(v) = v
                && !(v.is_finite() && v > 0.0)
            {
                bail!("{}: {v} must be a positive number", at(&format!("retraining.{f}")));
            }
        }
    }
    if let Some(l) = &p.limits
        && (l.max_group_members == Some(0) || l.migrations_per_host == Some(0) || l.migrations_in_cluster == Some(0))
    {
        bail!("{}: limits must be at least 1", at("limits"));
    }
    Ok(p.clone())
}

/// Applies a profile to an orchestrator's configuration.
pub fn apply(p: &Profile, cfg: &mut novacron_orchestrator::OrchestratorConfig) {
    if let Some(d) = p.forecast_step.as_deref().and_then(|s| humantime::parse_duration(s).ok()) {
        cfg.forecast_step = d;
    }
    if let Some(h) = p.forecast_horizon_steps {
        cfg.forecast_horizon_steps = h;
    }
    if let Some(r) = &p.retraining {
        let t = &mut cfg.retraining;
        t.drift_delta = r.drift_delta.unwrap_or(t.drift_delta);
        t.drift_lambda = r.drift_lambda.unwrap_or(t.drift_lambda);
        t.live_mae_above = r.live_mae_above.or(t.live_mae_above);
        t.min_forecasts = r.min_forecasts.unwrap_or(t.min_forecasts);
    }
    if let Some(l) = &p.limits {
        cfg.max_group_members = l.max_group_members.unwrap_or(cfg.max_group_members);
        cfg.migration_limits.per_host = l.migrations_per_host.unwrap_or(cfg.migration_limits.per_host);
        cfg.migration_limits.cluster = l.migrations_in_cluster.unwrap_or(cfg.migration_limits.cluster);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_profiles_load_and_mistakes_say_where() {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/profiles.yaml");
        for name in ["dev", "staging", "prod"] {
            let p = load(&shipped, name).unwrap_or_else(|e| panic!("{e}"));
            let mut cfg = novacron_orchestrator::OrchestratorConfig::new("nats://x", "d".into());
            apply(&p, &mut cfg);
            assert!(cfg.forecast_horizon_steps >= 1);
        }
        let prod = load(&shipped, "prod").unwrap();
        assert!(prod.retraining.as_ref().and_then(|r| r.live_mae_above).is_some());
        assert!(load(&shipped, "qa").unwrap_err().to_string().contains("no profile \"qa\""));
        let dir = std::env::temp_dir().join(format!("nc-profile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("p.yaml");
        std::fs::write(&bad, "profiles:\n  dev:\n    forecast_step: 5m\n    colour: red\n").unwrap();
        let e = load(&bad, "dev").unwrap_err().to_string();
        assert!(e.contains("p.yaml:4:5: ") && e.contains("unknown field `colour`"), "{e}");
        std::fs::write(&bad, "profiles:\n  dev:\n    forecast_step: soon\n").unwrap();
        assert!(load(&bad, "dev").unwrap_err().to_string().contains("profile dev: forecast_step"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
