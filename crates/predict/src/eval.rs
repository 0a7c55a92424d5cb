//! Rolling-origin evaluation: every model walks each series once, forecasting each horizon
//! from every origin of the validation and test parts. Validation errors choose the smoothing
//! weight of [`Ses`], each series' model ([`SELECTED`]) and each model's prediction interval
//! (the 90 % quantile of its validation errors, per series and horizon); test errors are
//! reported, and only test errors.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::metrics::{Accuracy, Scores};
use crate::model::{DAY, Ensemble, Forecaster, LastValue, MeanOfLast, SeasonalNaive, Ses};
use crate::series::Series;
use crate::train::Split;

/// The name of the per-series choice among the models, by validation error.
pub const SELECTED: &str = "selected-per-series";

/// The name of each extra model averaged with exponential smoothing (weight by validation).
pub const ENSEMBLE: &str = "ensemble(model+ses, α by validation)";

/// The smoothing weights tried for [`Ses`].
pub const SES_ALPHAS: [f64; 6] = [0.05, 0.1, 0.2, 0.3, 0.5, 0.8];

/// Validation and test errors of one model on one series.
struct Run {
    /// Per horizon: validation absolute errors.
    val: BTreeMap<usize, Vec<f64>>,
    /// Per horizon: test (point, actual) pairs.
    test: BTreeMap<usize, Vec<(f64, f64)>>,
}

fn walk(model: &mut dyn Forecaster, s: &Series, sp: &Split, horizons: &[usize]) -> Run {
    walk_observed(model, &s.values, s, sp, horizons)
}

/// Walks a series feeding the model `observed` (perhaps degraded) and scoring against the
/// series' own values.
fn walk_observed(model: &mut dyn Forecaster, observed: &[f64], s: &Series, sp: &Split, horizons: &[usize]) -> Run {
    let mut run = Run { val: BTreeMap::new(), test: BTreeMap::new() };
    for (t, x) in observed.iter().enumerate().take(sp.len) {
        if t >= sp.val_start {
            for &h in horizons {
                let target = t + h - 1;
                if target >= sp.len {
                    continue;
                }
                let actual = s.values[target];
                let point = model.forecast(h);
                if actual.is_nan() || point.is_nan() {
                    continue;
                }
                if target < sp.test_start {
                    run.val.entry(h).or_default().push((point - actual).abs());
                } else if t >= sp.test_start {
                    run.test.entry(h).or_default().push((point, actual));
                }
            }
        }
        model.observe(*x);
    }
    run
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() { f64::INFINITY } else { v.iter().sum::<f64>() / v.len() as f64 }
}

fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * q).round() as usize]
}

/// One model's results at one horizon.
#[derive(Clone, Debug, Serialize)]
pub struct ModelReport {
    /// The model.
    pub model: String,
    /// Test accuracy over every series.
    #[serde(flatten)]
    pub scores: Scores,
    /// Share of series where its test MAE is below the last-value baseline's.
    pub win_rate_vs_last_value: f64,
    /// Share of series where its test MAE is below the mean-of-last-12 baseline's.
    pub win_rate_vs_mean_of_last_12: f64,
    /// Share of series where its test MAE is below the best naive baseline's (the naive model
    /// with the lowest MAE over all series at this horizon).
    pub win_rate_vs_best_naive: f64,
}

/// The naive baselines.
pub const NAIVE: [&str; 3] = ["last-value", "mean-of-last-12", "seasonal-naive-288"];

/// A paired comparison of two models over the same series.
#[derive(Clone, Debug, Serialize)]
pub struct AbTest {
    /// The candidate.
    pub a: String,
    /// The incumbent.
    pub b: String,
    /// Series compared.
    pub series: usize,
    /// Mean of (MAE of a − MAE of b) per series; negative favours a.
    pub mean_difference: f64,
    /// The mean difference over its standard deviation (Cohen's d for paired samples).
    pub effect_size: f64,
    /// Two-sided p-value of the paired t-test.
    pub p_value: f64,
    /// `promote` (a is better, p < 0.05) or `keep`.
    pub recommendation: String,
}

/// A paired t-test on per-series errors of two models (same series, same order).
#[must_use]
pub fn ab_test(a: &str, b: &str, errs_a: &[f64], errs_b: &[f64]) -> AbTest {
    use statrs::distribution::{ContinuousCDF, StudentsT};
    let d: Vec<f64> = errs_a.iter().zip(errs_b).map(|(x, y)| x - y).filter(|v| v.is_finite()).collect();
    let n = d.len();
    let m = d.iter().sum::<f64>() / n.max(1) as f64;
    let sd = (d.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n.max(2) - 1) as f64).sqrt();
    let (effect, p) = if n < 2 || sd == 0.0 {
        (0.0, 1.0)
    } else {
        let t = m / (sd / (n as f64).sqrt());
        let p = StudentsT::new(0.0, 1.0, (n - 1) as f64).map_or(1.0, |dist| 2.0 * (1.0 - dist.cdf(t.abs())));
        (m / sd, p)
    };
    AbTest {
        a: a.into(),
        b: b.into(),
        series: n,
        mean_difference: m,
        effect_size: effect,
        p_value: p,
        recommendation: if m < 0.0 && p < 0.05 { "promote".into() } else { "keep".into() },
    }
}

/// The evaluation of a set of models over many series.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Series evaluated.
    pub series: usize,
    /// Per horizon (steps): each model's test results, best MAE first.
    pub horizons: BTreeMap<usize, Vec<ModelReport>>,
    /// Per horizon: the per-series selection against the best baseline, paired.
    pub ab_tests: BTreeMap<usize, AbTest>,
    /// How often each candidate was selected, per horizon.
    pub selected: BTreeMap<usize, BTreeMap<String, usize>>,
    /// Per horizon: the naive baseline with the lowest MAE.
    pub best_naive: BTreeMap<usize, String>,
    /// Per horizon: what forecasts that knew the future level would score ([`Hindsight`]).
    pub hindsight: BTreeMap<usize, Hindsight>,
}

/// Errors of two oracles that read the test part itself — not forecasts, but a yardstick for
/// how much any forecast of the *level* could gain on a data set. Scored on every test
/// target of the horizon (the targets of the models' test forecasts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Hindsight {
    /// Test targets scored.
    pub targets: u64,
    /// MAE of each series' best constant in hindsight (the median of its test targets): the
    /// floor for any forecast that is one level per series over the test part.
    pub constant_mae: f64,
    /// MAE of the median of the [`HINDSIGHT_NEIGHBOURS`] actual values around each target
    /// (not the target itself): a forecast that knew the level of the surrounding hour.
    pub local_level_mae: f64,
}

/// Actual values on each side of a target that [`Hindsight::local_level_mae`] reads.
pub const HINDSIGHT_NEIGHBOURS: usize = 6;

/// Hindsight errors of one series at horizon `h`: (targets, sum of constant errors, sum of
/// local-level errors).
fn hindsight(s: &Series, sp: &Split, h: usize) -> (u64, f64, f64) {
    let targets: Vec<usize> = (sp.test_start..sp.len)
        .map(|t| t + h - 1)
        .filter(|&target| target < sp.len && !s.values[target].is_nan())
        .collect();
    let actual: Vec<f64> = targets.iter().map(|&t| s.values[t]).collect();
    let level = median(&actual);
    let (mut constant, mut local) = (0.0, 0.0);
    for (&t, y) in targets.iter().zip(&actual) {
        constant += (y - level).abs();
        let lo = t.saturating_sub(HINDSIGHT_NEIGHBOURS);
        let hi = (t + HINDSIGHT_NEIGHBOURS + 1).min(sp.len);
        let around: Vec<f64> = (lo..hi).filter(|&i| i != t).map(|i| s.values[i]).filter(|v| !v.is_nan()).collect();
        let m = median(&around);
        local += (y - if m.is_nan() { level } else { m }).abs();
    }
    (targets.len() as u64, constant, local)
}

/// The median (mean of the middle two for an even count; NaN when empty).
fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// Degraded inputs for a robustness check: the models see the series with Gaussian noise added
/// and points dropped, and are scored against the true values.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Perturbation {
    /// Standard deviation of the added noise, CPU-% points.
    pub noise_sd: f64,
    /// Share of points dropped (seen as missing).
    pub missing: f64,
    /// Seed.
    pub seed: u64,
}

fn perturbed(values: &[f64], p: &Perturbation, salt: u64) -> Vec<f64> {
    use rand::{Rng, SeedableRng};
    use rand_distr::Distribution;
    let mut rng = rand::rngs::StdRng::seed_from_u64(p.seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let noise = rand_distr::Normal::new(0.0, p.noise_sd.max(0.0))
        .unwrap_or_else(|_| rand_distr::Normal::new(0.0, 0.0).expect("valid"));
    values
        .iter()
        .map(|v| {
            if rng.random_bool(p.missing.clamp(0.0, 1.0)) {
                f64::NAN
            } else {
                (v + noise.sample(&mut rng)).clamp(0.0, 100.0)
            }
        })
        .collect()
}

/// Evaluates the baselines, exponential smoothing (weight chosen per series on validation),
/// the given extra models (e.g. a trained [`crate::model::GlobalLinear`]) and the per-series
/// selection, on every series.
#[must_use]
pub fn evaluate(series: &[Series], splits: &[Split], horizons: &[usize], extra: &[Box<dyn Forecaster>]) -> Report {
    evaluate_with(series, splits, horizons, extra, None)
}

/// [`evaluate`], the models seeing inputs degraded by `perturbation` when given.
#[must_use]
pub fn evaluate_with(
    series: &[Series],
    splits: &[Split],
    horizons: &[usize],
    extra: &[Box<dyn Forecaster>],
    perturbation: Option<Perturbation>,
) -> Report {
    // name → horizon → accumulated test accuracy; name → horizon → per-series test MAE.
    let mut acc: BTreeMap<String, BTreeMap<usize, Accuracy>> = BTreeMap::new();
    let mut per_series: BTreeMap<String, BTreeMap<usize, Vec<f64>>> = BTreeMap::new();
    let mut chosen: BTreeMap<usize, BTreeMap<String, usize>> = BTreeMap::new();
    let mut oracle: BTreeMap<usize, (u64, f64, f64)> = BTreeMap::new();
    for (k, (s, sp)) in series.iter().zip(splits).enumerate() {
        for &h in horizons {
            let (n, constant, local) = hindsight(s, sp, h);
            let o = oracle.entry(h).or_default();
            *o = (o.0 + n, o.1 + constant, o.2 + local);
        }
        let observed = perturbation.map(|p| perturbed(&s.values, &p, k as u64));
        let observed = observed.as_deref().unwrap_or(&s.values);
        // MASE scale: the one-step naive MAE before the test part (none if it was flat).
        let seen: Vec<f64> = s.values[..sp.test_start].iter().copied().filter(|v| !v.is_nan()).collect();
        let scale = mean(&seen.windows(2).map(|w| (w[1] - w[0]).abs()).collect::<Vec<_>>());
        let scale = if scale.is_finite() && scale > 1e-3 { scale } else { f64::NAN };
        let mut candidates: Vec<Box<dyn Forecaster>> =
            vec![Box::new(LastValue::default()), Box::new(MeanOfLast::new(12)), Box::new(SeasonalNaive::new(DAY))];
        candidates.extend(SES_ALPHAS.iter().map(|a| Box::new(Ses::new(*a)) as Box<dyn Forecaster>));
        candidates.extend(extra.iter().map(|m| m.fresh()));
        // Each extra model averaged with exponential smoothing, its weight chosen like SES's.
        for m in extra {
            for a in SES_ALPHAS {
                candidates.push(Box::new(Ensemble { members: vec![m.fresh(), Box::new(Ses::new(a))] }));
            }
        }
        let runs: Vec<(String, Run)> =
            candidates.iter_mut().map(|m| (m.name(), walk_observed(m.as_mut(), observed, s, sp, horizons))).collect();
        for &h in horizons {
            let val_mae = |r: &Run| mean(r.val.get(&h).map_or(&[][..], Vec::as_slice));
            // Exponential smoothing: the weight with the best validation error on this series.
            let ses_best = runs
                .iter()
                .filter(|(n, _)| n.starts_with("ses("))
                .min_by(|a, b| val_mae(&a.1).total_cmp(&val_mae(&b.1)))
                .map(|(n, _)| n.clone());
            let ensemble_best = runs
                .iter()
                .filter(|(n, _)| n.starts_with("ensemble("))
                .min_by(|a, b| val_mae(&a.1).total_cmp(&val_mae(&b.1)))
                .map(|(n, _)| n.clone());
            let best = runs.iter().min_by(|a, b| val_mae(&a.1).total_cmp(&val_mae(&b.1))).map(|(n, _)| n.clone());
            let mut score = |label: &str, run: &Run| {
                let q = quantile(run.val.get(&h).map_or(&[][..], Vec::as_slice), 0.9);
                let mut a = Accuracy::default();
                for (p, y) in run.test.get(&h).into_iter().flatten() {
                    a.add(*p, (!q.is_nan()).then(|| ((p - q).max(0.0), (p + q).min(100.0))), *y, scale);
                }
                per_series.entry(label.into()).or_default().entry(h).or_default().push(a.mae());
                acc.entry(label.into()).or_default().entry(h).or_default().merge(&a);
            };
            for (name, run) in &runs {
                if name.starts_with("ses(") {
                    if Some(name) == ses_best.as_ref() {
                        score("ses(α by validation)", run);
                    }
                    continue;
                }
                if name.starts_with("ensemble(") {
                    if Some(name) == ensemble_best.as_ref() {
                        score(ENSEMBLE, run);
                    }
                    continue;
                }
                score(name, run);
            }
            if let Some((name, run)) = runs.iter().find(|(n, _)| Some(n) == best.as_ref()) {
                let label = if name.starts_with("ses(") {
                    "ses(α by validation)"
                } else if name.starts_with("ensemble(") {
                    ENSEMBLE
                } else {
                    name.as_str()
                };
                *chosen.entry(h).or_default().entry(label.to_owned()).or_default() += 1;
                score(SELECTED, run);
            }
        }
    }
    let mut horizons_out = BTreeMap::new();
    let mut ab_tests = BTreeMap::new();
    let mut best_naives = BTreeMap::new();
    for &h in horizons {
        let base = |n: &str| per_series.get(n).and_then(|m| m.get(&h)).cloned().unwrap_or_default();
        let (last, mean12) = (base("last-value"), base("mean-of-last-12"));
        let wins = |mine: &[f64], other: &[f64]| {
            let pairs: Vec<(f64, f64)> =
                mine.iter().zip(other).map(|(a, b)| (*a, *b)).filter(|(a, b)| a.is_finite() && b.is_finite()).collect();
            pairs.iter().filter(|(a, b)| a < b).count() as f64 / pairs.len().max(1) as f64
        };
        let mut rows: Vec<ModelReport> = acc
            .iter()
            .filter_map(|(name, by_h)| {
                let a = by_h.get(&h)?;
                let mine = base(name);
                Some(ModelReport {
                    model: name.clone(),
                    scores: a.scores(),
                    win_rate_vs_last_value: wins(&mine, &last),
                    win_rate_vs_mean_of_last_12: wins(&mine, &mean12),
                    win_rate_vs_best_naive: 0.0,
                })
            })
            .collect();
        rows.sort_by(|a, b| a.scores.mae.total_cmp(&b.scores.mae));
        let best_naive = rows.iter().find(|r| NAIVE.contains(&r.model.as_str())).map(|r| r.model.clone());
        if let Some(b) = &best_naive {
            let theirs = base(b);
            for r in &mut rows {
                r.win_rate_vs_best_naive = wins(&base(&r.model), &theirs);
            }
        }
        best_naives.insert(h, best_naive.unwrap_or_default());
        // The selection against whichever baseline did better overall at this horizon.
        let baseline = rows
            .iter()
            .filter(|r| r.model == "last-value" || r.model == "mean-of-last-12")
            .min_by(|a, b| a.scores.mae.total_cmp(&b.scores.mae))
            .map(|r| r.model.clone())
            .unwrap_or_else(|| "last-value".into());
        ab_tests.insert(h, ab_test(SELECTED, &baseline, &base(SELECTED), &base(&baseline)));
        horizons_out.insert(h, rows);
    }
    let hindsight = oracle
        .into_iter()
        .map(|(h, (n, constant, local))| {
            let per = |sum: f64| if n == 0 { f64::NAN } else { sum / n as f64 };
            (h, Hindsight { targets: n, constant_mae: per(constant), local_level_mae: per(local) })
        })
        .collect();
    Report {
        series: series.len(),
        horizons: horizons_out,
        ab_tests,
        selected: chosen,
        best_naive: best_naives,
        hindsight,
    }
}

/// Page–Hinkley drift detection on a stream of errors: alarms when their mean rises by more
/// than `delta` for long enough that the cumulated excess passes `lambda`.
#[derive(Clone, Debug)]
pub struct PageHinkley {
    delta: f64,
    lambda: f64,
    n: u64,
    mean: f64,
    cum: f64,
    min: f64,
}

impl PageHinkley {
    /// With tolerance `delta` and threshold `lambda` (in the errors' unit).
    #[must_use]
    pub fn new(delta: f64, lambda: f64) -> PageHinkley {
        PageHinkley { delta, lambda, n: 0, mean: 0.0, cum: 0.0, min: 0.0 }
    }

    /// Adds an error; true when drift is detected (the detector then starts over).
    pub fn add(&mut self, x: f64) -> bool {
        self.n += 1;
        self.mean += (x - self.mean) / self.n as f64;
        self.cum += x - self.mean - self.delta;
        self.min = self.min.min(self.cum);
        if self.cum - self.min > self.lambda {
            *self = PageHinkley::new(self.delta, self.lambda);
            return true;
        }
        false
    }
}

/// Each series' test MAE for one model at one horizon (NaN where it made no forecast), for
/// paired comparisons.
#[must_use]
pub fn per_series_mae(series: &[Series], splits: &[Split], h: usize, model: &dyn Forecaster) -> Vec<f64> {
    series
        .iter()
        .zip(splits)
        .map(|(s, sp)| {
            let mut m = model.fresh();
            let run = walk(m.as_mut(), s, sp, &[h]);
            let pairs = run.test.get(&h).map_or(&[][..], Vec::as_slice);
            if pairs.is_empty() {
                f64::NAN
            } else {
                pairs.iter().map(|(p, y)| (p - y).abs()).sum::<f64>() / pairs.len() as f64
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_is_found_after_a_shift_and_not_before() {
        let mut ph = PageHinkley::new(0.5, 20.0);
        let calm: Vec<f64> = (0..500).map(|i| 2.0 + ((i * 7919) % 13) as f64 / 13.0).collect();
        assert!(calm.iter().all(|x| !ph.add(*x)), "no alarm on stationary errors");
        let first = (0..200).position(|_| ph.add(8.0)).expect("an alarm after the errors jump");
        assert!(first < 10, "found within {first} steps");
    }

    #[test]
    fn the_paired_test_tells_a_real_difference_from_noise() {
        let b: Vec<f64> = (0..50).map(|i| 5.0 + (i % 7) as f64).collect();
        let a: Vec<f64> = b.iter().enumerate().map(|(i, x)| x - 1.0 + ((i % 3) as f64 - 1.0) * 0.1).collect();
        let t = ab_test("a", "b", &a, &b);
        assert!(t.p_value < 1e-6 && t.recommendation == "promote", "{t:?}");
        let noise: Vec<f64> = b.iter().enumerate().map(|(i, x)| x + if i % 2 == 0 { 0.5 } else { -0.5 }).collect();
        let t = ab_test("a", "b", &noise, &b);
        assert!(t.p_value > 0.5 && t.recommendation == "keep", "{t:?}");
    }

    #[test]
    fn degraded_inputs_cost_accuracy_reproducibly() {
        let series =
            crate::generate::generate(&crate::generate::GenConfig { series: 4, days: 6, ..Default::default() });
        let splits: Vec<Split> = series.iter().map(|s| Split::fractions(s.values.len(), 0.2, 0.2)).collect();
        let mae = |r: &Report| r.horizons[&1].iter().find(|m| m.model == "mean-of-last-12").unwrap().scores.mae;
        let clean = evaluate(&series, &splits, &[1], &[]);
        let p = Perturbation { noise_sd: 8.0, missing: 0.2, seed: 3 };
        let noisy = evaluate_with(&series, &splits, &[1], &[], Some(p));
        let again = evaluate_with(&series, &splits, &[1], &[], Some(p));
        assert!(mae(&noisy) > mae(&clean), "{} vs {}", mae(&noisy), mae(&clean));
        assert_eq!(mae(&noisy).to_bits(), mae(&again).to_bits(), "same seed, same result");
    }

    #[test]
    fn evaluation_scores_only_test_targets_and_picks_by_validation() {
        // A flat series with a step in the test part: no model can see it coming.
        let values: Vec<f64> = (0..1000).map(|t| if t < 900 { 10.0 } else { 20.0 }).collect();
        let series = vec![Series { name: "s".into(), values }];
        let splits = vec![Split::fractions(1000, 0.2, 0.2)];
        let r = evaluate(&series, &splits, &[1], &[]);
        let last = r.horizons[&1].iter().find(|m| m.model == "last-value").unwrap();
        assert_eq!(last.scores.forecasts, 200, "one forecast per test origin");
        assert!((last.scores.mae - 10.0 / 200.0).abs() < 1e-9, "one miss of 10 points: {}", last.scores.mae);
        assert_eq!(r.selected[&1].values().sum::<usize>(), 1);
    }

    #[test]
    fn hindsight_oracles_read_the_test_targets() {
        let values = vec![1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 10.0, 0.0, 10.0];
        let series = vec![Series { name: "s".into(), values }];
        let splits = vec![Split { val_start: 3, test_start: 6, len: 10 }];
        let r = evaluate(&series, &splits, &[1, 2], &[]);
        // h = 1: targets 0, 10, 0, 10 — best constant 5, all four 5 away.
        // Their neighbours' medians (the target left out): 1, 1, 1, 1 → errors 1, 9, 1, 9.
        assert_eq!(r.hindsight[&1], Hindsight { targets: 4, constant_mae: 5.0, local_level_mae: 5.0 });
        // h = 2: targets 10, 0, 10 — best constant 10 → errors 0, 10, 0; neighbours → 9, 1, 9.
        let h2 = r.hindsight[&2];
        assert_eq!(h2.targets, 3);
        assert!(
            (h2.constant_mae - 10.0 / 3.0).abs() < 1e-12 && (h2.local_level_mae - 19.0 / 3.0).abs() < 1e-12,
            "{h2:?}"
        );
    }
}
