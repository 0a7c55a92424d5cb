//! NovaCron's forecasting (pure): load forecasters and baselines ([`model`]), training with
//! time-ordered validation ([`train`]), honest evaluation on real traces ([`eval`]: MAE, RMSE,
//! MASE, MAPE over actuals ≥ 1 %, interval coverage, share within ±10 points, per-series win
//! rates, paired A/B tests, Page–Hinkley drift detection), trace reading ([`series`]) and a
//! seeded synthetic telemetry generator ([`generate`]). `docs/models.md` has the figures.

pub mod eval;
pub mod generate;
pub mod metrics;
pub mod model;
pub mod risk;
pub mod series;
pub mod train;
