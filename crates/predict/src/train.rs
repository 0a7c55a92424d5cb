//! Training with honest validation: every series is split in time — train, then validation,
//! then test — so nothing is ever fitted on what it is scored on, and hyperparameters are
//! chosen on validation only.
//!
//! [`train_global_linear`] fits one linear model per horizon over [`crate::model::features`]
//! across all series, minimising absolute error (the metric reported) by stochastic
//! sub-gradient descent with a fixed seed, a grid over learning rate and L2 penalty, and early
//! stopping on the validation error.

use std::collections::VecDeque;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::Serialize;

use crate::model::{FEATURES, HISTORY, features, remember};
use crate::series::Series;

/// Where a series is cut: `[0, val_start)` train, `[val_start, test_start)` validation,
/// `[test_start, len)` test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Split {
    /// First validation step.
    pub val_start: usize,
    /// First test step.
    pub test_start: usize,
    /// Length.
    pub len: usize,
}

impl Split {
    /// The last `test` share is test, the `val` share before it validation.
    #[must_use]
    pub fn fractions(len: usize, val: f64, test: f64) -> Split {
        let test_start = ((len as f64) * (1.0 - test)).round() as usize;
        let val_start = ((len as f64) * (1.0 - test - val)).round() as usize;
        Split { val_start: val_start.min(test_start), test_start: test_start.min(len), len }
    }
}

/// Hyperparameters and training settings.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TrainConfig {
    /// Learning rates tried.
    pub learning_rates: Vec<f64>,
    /// L2 penalties tried.
    pub l2: Vec<f64>,
    /// Most passes over the samples.
    pub max_epochs: usize,
    /// Passes without a better validation error before stopping.
    pub patience: usize,
    /// Most training origins drawn per series and horizon.
    pub origins_per_series: usize,
    /// Shuffling and sampling seed.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            learning_rates: vec![0.01, 0.003],
            l2: vec![0.0, 1e-4],
            max_epochs: 30,
            patience: 3,
            origins_per_series: 120,
            seed: 7,
        }
    }
}

/// What training one horizon found.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HorizonFit {
    /// The horizon (steps).
    pub horizon: usize,
    /// Chosen learning rate.
    pub learning_rate: f64,
    /// Chosen L2 penalty.
    pub l2: f64,
    /// The epoch whose weights were kept (the best on validation).
    pub epochs: usize,
    /// Epochs run before early stopping ended training.
    pub epochs_run: usize,
    /// Validation MAE of the kept weights (CPU-% points).
    pub validation_mae: f64,
    /// Training samples.
    pub samples: usize,
    /// The weights.
    pub weights: [f64; FEATURES],
}

type Sample = ([f64; FEATURES], f64);

/// The forecast origins whose `h`-step targets stay before `to`, from `from` (at least 48 steps
/// of history): the targets of training samples never reach into validation or test.
fn origins(from: usize, to: usize, h: usize) -> Option<std::ops::RangeInclusive<usize>> {
    let from = from.max(48);
    (to >= from + h).then(|| from..=to - h)
}

/// Feature/target pairs with origins in `[from, to)` of each series (targets before `to`).
fn samples(
    series: &[Series],
    splits: &[Split],
    h: usize,
    region: fn(&Split) -> (usize, usize),
    cap: usize,
    rng: &mut StdRng,
) -> Vec<Sample> {
    let mut out = Vec::new();
    for (s, sp) in series.iter().zip(splits) {
        let (from, to) = region(sp);
        let Some(range) = origins(from, to, h) else { continue };
        let mut origins: Vec<usize> = range.collect();
        origins.shuffle(rng);
        origins.truncate(cap);
        origins.sort_unstable();
        let mut hist: VecDeque<f64> = VecDeque::with_capacity(HISTORY + 1);
        let mut next = 0;
        for &o in &origins {
            while next < o {
                remember(&mut hist, s.values[next]);
                next += 1;
            }
            let y = s.values[o + h - 1];
            if !y.is_nan() {
                out.push((features(&hist, h), y / 100.0));
            }
        }
    }
    out
}

fn mae(w: &[f64; FEATURES], data: &[Sample]) -> f64 {
    if data.is_empty() {
        return f64::INFINITY;
    }
    data.iter().map(|(x, y)| (dot(w, x).clamp(0.0, 1.0) - y).abs()).sum::<f64>() / data.len() as f64 * 100.0
}

fn dot(w: &[f64; FEATURES], x: &[f64; FEATURES]) -> f64 {
    w.iter().zip(x).map(|(a, b)| a * b).sum()
}

/// Trains the global linear model for each horizon. Deterministic for a given seed.
#[must_use]
pub fn train_global_linear(
    series: &[Series],
    splits: &[Split],
    horizons: &[usize],
    cfg: &TrainConfig,
) -> Vec<HorizonFit> {
    let mut fits = Vec::new();
    for &h in horizons {
        let mut rng = StdRng::seed_from_u64(cfg.seed ^ h as u64);
        let train = samples(series, splits, h, |s| (0, s.val_start), cfg.origins_per_series, &mut rng);
        let val = samples(series, splits, h, |s| (s.val_start, s.test_start), cfg.origins_per_series, &mut rng);
        let mut best: Option<HorizonFit> = None;
        for &lr in &cfg.learning_rates {
            for &l2 in &cfg.l2 {
                // Start from "the last value" (w₁ = 1): a sound model that training improves on.
                let mut w = [0.0; FEATURES];
                w[1] = 1.0;
                let mut kept = (w, mae(&w, &val), 0usize);
                let mut run = 0;
                let mut order: Vec<usize> = (0..train.len()).collect();
                let mut since_better = 0;
                for epoch in 1..=cfg.max_epochs {
                    run = epoch;
                    order.shuffle(&mut rng);
                    let step = lr / (1.0 + epoch as f64 * 0.1);
                    for &i in &order {
                        let (x, y) = &train[i];
                        let g = (dot(&w, x) - y).signum();
                        for (wj, xj) in w.iter_mut().zip(x) {
                            *wj -= step * (g * xj + l2 * *wj);
                        }
                    }
                    let v = mae(&w, &val);
                    if v < kept.1 {
                        kept = (w, v, epoch);
                        since_better = 0;
                    } else {
                        since_better += 1;
                        if since_better >= cfg.patience {
                            break;
                        }
                    }
                }
                if best.as_ref().is_none_or(|b| kept.1 < b.validation_mae) {
                    best = Some(HorizonFit {
                        horizon: h,
                        learning_rate: lr,
                        l2,
                        epochs: kept.2,
                        epochs_run: run,
                        validation_mae: kept.1,
                        samples: train.len(),
                        weights: kept.0,
                    });
                }
            }
        }
        if let Some(b) = best {
            fits.push(b);
        }
    }
    fits
}

/// Settings of the boosted-trees model ([`train_global_gbdt`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GbdtConfig {
    /// Training samples per horizon, drawn evenly across series but at least 50 per series
    /// (so many short series can give more); training time grows with them (~200,000 take a
    /// few seconds).
    pub max_samples: usize,
    /// Most boosting rounds; early stopping on the validation error usually ends sooner.
    pub max_rounds: usize,
    /// Rounds without a better validation error before stopping.
    pub patience: usize,
    /// Tree depth.
    pub max_depth: usize,
    /// Learning rate.
    pub eta: f64,
    /// Sampling seed (training is deterministic for a seed, on any thread count).
    pub seed: u64,
}

impl Default for GbdtConfig {
    fn default() -> Self {
        GbdtConfig { max_samples: 200_000, max_rounds: 400, patience: 20, max_depth: 6, eta: 0.1, seed: 7 }
    }
}

/// One trained horizon of the boosted-trees model.
#[derive(Clone, Debug)]
pub struct GbdtFit {
    /// The horizon (steps).
    pub horizon: usize,
    /// Validation MAE of the kept rounds (CPU-% points).
    pub validation_mae: f64,
    /// Boosting rounds kept (the best on validation).
    pub rounds: usize,
    /// Training samples.
    pub samples: usize,
    /// The trees.
    pub model: std::sync::Arc<hessboost::prelude::BoostedModel>,
}

fn dmatrix(data: &[Sample]) -> Result<hessboost::prelude::DMatrix, String> {
    let x: Vec<f32> = data.iter().flat_map(|(x, _)| x.iter().map(|v| *v as f32)).collect();
    let y: Vec<f32> = data.iter().map(|(_, y)| *y as f32).collect();
    hessboost::prelude::DMatrix::from_dense_vec(x, data.len(), FEATURES)
        .and_then(|m| m.with_labels(&y))
        .map_err(|e| e.to_string())
}

/// Trains gradient-boosted trees per horizon over the same features and samples as the linear
/// model, minimising absolute error (the median, like the metric), with early stopping on the
/// validation error. Deterministic for a given seed.
///
/// # Errors
/// When there is nothing to train on, or the library refuses the data.
pub fn train_global_gbdt(
    series: &[Series],
    splits: &[Split],
    horizons: &[usize],
    cfg: &GbdtConfig,
) -> Result<Vec<GbdtFit>, String> {
    use hessboost::prelude::{Iterations, Objective, Trainer, TrainingParams, TreeMethod};
    let per_series = (cfg.max_samples / series.len().max(1)).max(50);
    let mut fits = Vec::new();
    for &h in horizons {
        let mut rng = StdRng::seed_from_u64(cfg.seed ^ h as u64);
        let train = samples(series, splits, h, |s| (0, s.val_start), per_series, &mut rng);
        let val = samples(series, splits, h, |s| (s.val_start, s.test_start), per_series, &mut rng);
        if train.is_empty() || val.is_empty() {
            return Err(format!("horizon {h}: no training or validation samples (series too short?)"));
        }
        let params = TrainingParams::builder()
            .objective(Objective::AbsoluteError)
            .tree_method(TreeMethod::Hist)
            .max_depth(cfg.max_depth)
            .eta(cfg.eta)
            .seed(cfg.seed)
            .build()
            .map_err(|e| e.to_string())?;
        let (dtrain, dval) = (dmatrix(&train)?, dmatrix(&val)?);
        let patience = std::num::NonZeroUsize::new(cfg.patience.max(1)).unwrap_or(std::num::NonZeroUsize::MIN);
        let result = Trainer::new(&params, &dtrain, cfg.max_rounds)
            .eval(&dval, "validation")
            .early_stopping_rounds(patience)
            .train()
            .map_err(|e| e.to_string())?;
        let model = result.model;
        let mut err = 0.0;
        for (x, y) in &val {
            let row: Vec<f32> = x.iter().map(|v| *v as f32).collect();
            let p = f64::from(model.predict_row(&row, Iterations::Best).map_err(|e| e.to_string())?);
            err += (p.clamp(0.0, 1.0) - y).abs();
        }
        fits.push(GbdtFit {
            horizon: h,
            validation_mae: err / val.len() as f64 * 100.0,
            rounds: model.num_trees(),
            samples: train.len(),
            model: std::sync::Arc::new(model),
        });
    }
    Ok(fits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_is_deterministic_and_beats_its_starting_point_on_a_learnable_series() {
        // A series whose next value is the mean of the last 12 plus noise-free structure: the
        // last value alone is a poor guess, the mean a perfect one.
        let values: Vec<f64> = (0..2000).map(|t| 50.0 + 30.0 * if (t / 6) % 2 == 0 { 1.0 } else { -1.0 }).collect();
        let series = vec![Series { name: "s".into(), values }];
        let splits = vec![Split::fractions(2000, 0.2, 0.2)];
        let cfg = TrainConfig::default();
        let a = train_global_linear(&series, &splits, &[1], &cfg);
        let b = train_global_linear(&series, &splits, &[1], &cfg);
        assert_eq!(a, b, "same seed, same model");
        let mut start = [0.0; FEATURES];
        start[1] = 1.0;
        // The validation origins training drew (same seed, same order of draws).
        let mut rng = StdRng::seed_from_u64(cfg.seed ^ 1);
        let _train = samples(&series, &splits, 1, |s| (0, s.val_start), cfg.origins_per_series, &mut rng);
        let val = samples(&series, &splits, 1, |s| (s.val_start, s.test_start), cfg.origins_per_series, &mut rng);
        assert!(a[0].validation_mae < mae(&start, &val) - 1.0, "{} vs {}", a[0].validation_mae, mae(&start, &val));
        assert!(a[0].epochs >= 1);
    }

    #[test]
    fn the_grid_picks_the_learning_rate_that_learns_and_early_stopping_stops() {
        // 50 ± 10 or 0, at random: the last value is a poor guess (MAE 8.9), the mean a good one
        // (6.7) — something to learn.
        let mut rng = StdRng::seed_from_u64(11);
        let values: Vec<f64> =
            (0..2000).map(|_| 50.0 + 10.0 * f64::from(rand::Rng::random_range(&mut rng, -1i32..=1))).collect();
        let series = vec![Series { name: "s".into(), values }];
        let splits = vec![Split::fractions(2000, 0.2, 0.2)];
        // A learning rate too small to move the weights, and one that learns.
        let cfg = TrainConfig {
            learning_rates: vec![1e-9, 0.01],
            l2: vec![0.0],
            max_epochs: 200,
            patience: 3,
            origins_per_series: 2000,
            ..TrainConfig::default()
        };
        let fit = &train_global_linear(&series, &splits, &[1], &cfg)[0];
        assert_eq!(fit.learning_rate, 0.01, "{fit:?}");
        assert!(fit.epochs_run < 200, "stopped early after {} epochs", fit.epochs_run);
        assert!(fit.epochs_run == fit.epochs + 3, "ran `patience` epochs past the best: {fit:?}");
    }

    proptest::proptest! {
        #[test]
        fn training_targets_never_reach_past_their_region(from in 0usize..500, len in 0usize..500, h in 1usize..300) {
            let to = from + len;
            if let Some(r) = origins(from, to, h) {
                for o in r {
                    proptest::prop_assert!(o + h - 1 < to, "origin {o}, horizon {h}: target {} reaches {to}", o + h - 1);
                    proptest::prop_assert!(o >= from);
                }
            }
        }
    }

    #[test]
    fn boosted_trees_are_deterministic_and_learn_what_the_last_value_misses() {
        // A square wave of period 12: six steps ahead is always the other level, so the last
        // value is off by 60 points every time; the history's shape tells the answer.
        let values: Vec<f64> = (0..3000).map(|t| if (t / 6) % 2 == 0 { 80.0 } else { 20.0 }).collect();
        let series = vec![Series { name: "s".into(), values }];
        let splits = vec![Split::fractions(3000, 0.2, 0.2)];
        let cfg = GbdtConfig { max_samples: 2_000, max_rounds: 60, ..GbdtConfig::default() };
        let a = train_global_gbdt(&series, &splits, &[6], &cfg).unwrap();
        let b = train_global_gbdt(&series, &splits, &[6], &cfg).unwrap();
        assert!(a[0].validation_mae < 2.0, "learned: validation MAE {}", a[0].validation_mae);
        assert!(a[0].rounds >= 1 && a[0].samples > 100, "{} rounds, {} samples", a[0].rounds, a[0].samples);
        let mut rng = StdRng::seed_from_u64(3);
        for (x, _) in samples(&series, &splits, 6, |s| (s.val_start, s.test_start), 50, &mut rng) {
            let row: Vec<f32> = x.iter().map(|v| *v as f32).collect();
            let best = hessboost::prelude::Iterations::Best;
            assert_eq!(a[0].model.predict_row(&row, best).unwrap(), b[0].model.predict_row(&row, best).unwrap());
        }
    }

    #[test]
    fn a_boosted_trees_artifact_round_trips_to_the_same_forecasts() {
        use crate::model::{Artifact, Forecaster, GlobalGbdt};
        let values: Vec<f64> = (0..2000).map(|t| 50.0 + 30.0 * (t as f64 / 40.0).sin()).collect();
        let series = vec![Series { name: "s".into(), values: values.clone() }];
        let splits = vec![Split::fractions(2000, 0.2, 0.2)];
        let cfg = GbdtConfig { max_samples: 1_000, max_rounds: 30, ..GbdtConfig::default() };
        let fits = train_global_gbdt(&series, &splits, &[1, 12], &cfg).unwrap();
        let models: Vec<_> = fits.iter().map(|f| (f.horizon, f.model.clone())).collect();
        let stored = serde_json::to_vec(&Artifact::global_gbdt(&models).unwrap()).unwrap();
        let back: Artifact = serde_json::from_slice(&stored).unwrap();
        assert_eq!(back.kind, "global-gbdt");
        let mut original: Box<dyn Forecaster> = Box::new(GlobalGbdt::new(models));
        let mut loaded = back.model().unwrap();
        for x in &values[..500] {
            original.observe(*x);
            loaded.observe(*x);
        }
        for h in [1, 6, 12] {
            assert_eq!(original.forecast(h), loaded.forecast(h), "horizon {h}");
            assert!(original.forecast(h).is_finite());
        }
        let unknown = Artifact { kind: "oracle".into(), ..back };
        assert!(unknown.model().is_err(), "an unknown family is refused");
    }

    #[test]
    fn version_1_boosted_trees_read_the_first_seven_features() {
        use crate::model::{Artifact, FEATURES_V1, features};
        use hessboost::prelude::{DMatrix, Iterations, Objective, Trainer, TrainingParams, TreeMethod};
        let values: Vec<f64> = (0..1500).map(|t| 50.0 + 30.0 * (t as f64 / 40.0).sin()).collect();
        let series = vec![Series { name: "s".into(), values: values.clone() }];
        let splits = vec![Split::fractions(1500, 0.2, 0.2)];
        let mut rng = StdRng::seed_from_u64(5);
        let train = samples(&series, &splits, 3, |s| (0, s.val_start), 500, &mut rng);
        let x: Vec<f32> = train.iter().flat_map(|(x, _)| x[..FEATURES_V1].iter().map(|v| *v as f32)).collect();
        let y: Vec<f32> = train.iter().map(|(_, y)| *y as f32).collect();
        let d = DMatrix::from_dense_vec(x, train.len(), FEATURES_V1).unwrap().with_labels(&y).unwrap();
        let params = TrainingParams::builder()
            .objective(Objective::AbsoluteError)
            .tree_method(TreeMethod::Hist)
            .max_depth(3)
            .build()
            .unwrap();
        let model = std::sync::Arc::new(Trainer::new(&params, &d, 20).train().unwrap().model);
        let mut v1 = Artifact::global_gbdt(&[(3, model.clone())]).unwrap();
        v1.features_version = 1;
        let mut loaded = v1.model().unwrap();
        let mut hist = std::collections::VecDeque::new();
        for x in &values[..400] {
            loaded.observe(*x);
            hist.push_back(*x);
        }
        let row: Vec<f32> = features(&hist, 3)[..FEATURES_V1].iter().map(|v| *v as f32).collect();
        let want = f64::from(model.predict_row(&row, Iterations::Best).unwrap()) * 100.0;
        assert!(loaded.forecast(3).is_finite());
        assert!((loaded.forecast(3) - want.clamp(0.0, 100.0)).abs() < 1e-9, "{} vs {want}", loaded.forecast(3));
    }

    #[test]
    fn boosted_trees_refuse_series_too_short_to_validate() {
        let series = vec![Series { name: "s".into(), values: vec![50.0; 60] }];
        let splits = vec![Split::fractions(60, 0.2, 0.2)];
        let err = train_global_gbdt(&series, &splits, &[12], &GbdtConfig::default()).unwrap_err();
        assert!(err.contains("no training or validation samples"), "{err}");
    }

    #[test]
    fn splits_are_in_time_order() {
        let s = Split::fractions(100, 0.2, 0.2);
        assert_eq!((s.val_start, s.test_start, s.len), (60, 80, 100));
    }
}
