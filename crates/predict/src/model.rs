//! Forecasters. Each one sees a series one point at a time ([`Forecaster::observe`]) and
//! forecasts any horizon from what it has seen, so that a rolling-origin evaluation costs one
//! update per step, not one refit per origin.
//!
//! Baselines: [`LastValue`], [`MeanOfLast`], [`SeasonalNaive`]. Models: [`Ses`] (simple
//! exponential smoothing, ETS(A,N,N), its smoothing weight chosen by validation) and
//! [`GlobalLinear`] (one linear model per horizon over recent-history features, trained across
//! many series with an absolute-error loss — see [`crate::train`]). Exponential smoothing is a
//! few lines here rather than a dependency: the library implementations refit on every call,
//! and evaluation needs millions of forecasts from one running state.

use std::collections::VecDeque;

/// Steps in a day at 5-minute sampling.
pub const DAY: usize = 288;

/// A forecaster over one series.
pub trait Forecaster: Send {
    /// A name with its hyperparameters (`ses(α=0.3)`).
    fn name(&self) -> String;
    /// The next point (NaN: missing; the forecaster carries on without it).
    fn observe(&mut self, x: f64);
    /// The point forecast `h` ≥ 1 steps after the last point observed.
    fn forecast(&self, h: usize) -> f64;
    /// A fresh copy with the same hyperparameters and nothing observed.
    fn fresh(&self) -> Box<dyn Forecaster>;
}

/// Tomorrow is today: the last value seen.
#[derive(Clone, Debug, Default)]
pub struct LastValue {
    last: Option<f64>,
}

impl Forecaster for LastValue {
    fn name(&self) -> String {
        "last-value".into()
    }
    fn observe(&mut self, x: f64) {
        if !x.is_nan() {
            self.last = Some(x);
        }
    }
    fn forecast(&self, _h: usize) -> f64 {
        self.last.unwrap_or(f64::NAN)
    }
    fn fresh(&self) -> Box<dyn Forecaster> {
        Box::new(LastValue::default())
    }
}

/// The mean of the last `k` values seen.
#[derive(Clone, Debug)]
pub struct MeanOfLast {
    k: usize,
    window: VecDeque<f64>,
    sum: f64,
}

impl MeanOfLast {
    /// Over the last `k` (≥ 1) values.
    #[must_use]
    pub fn new(k: usize) -> MeanOfLast {
        MeanOfLast { k: k.max(1), window: VecDeque::new(), sum: 0.0 }
    }
}

impl Forecaster for MeanOfLast {
    fn name(&self) -> String {
        format!("mean-of-last-{}", self.k)
    }
    fn observe(&mut self, x: f64) {
        if x.is_nan() {
            return;
        }
        self.window.push_back(x);
        self.sum += x;
        if self.window.len() > self.k {
            self.sum -= self.window.pop_front().unwrap_or(0.0);
        }
    }
    fn forecast(&self, _h: usize) -> f64 {
        if self.window.is_empty() { f64::NAN } else { self.sum / self.window.len() as f64 }
    }
    fn fresh(&self) -> Box<dyn Forecaster> {
        Box::new(MeanOfLast::new(self.k))
    }
}

/// The value one season ago (yesterday at the same time), or the last value before a full
/// season has been seen.
#[derive(Clone, Debug)]
pub struct SeasonalNaive {
    period: usize,
    hist: VecDeque<f64>,
}

impl SeasonalNaive {
    /// With this season length in steps.
    #[must_use]
    pub fn new(period: usize) -> SeasonalNaive {
        SeasonalNaive { period: period.max(1), hist: VecDeque::new() }
    }
}

impl Forecaster for SeasonalNaive {
    fn name(&self) -> String {
        format!("seasonal-naive-{}", self.period)
    }
    fn observe(&mut self, x: f64) {
        let x = if x.is_nan() { self.hist.back().copied().unwrap_or(f64::NAN) } else { x };
        self.hist.push_back(x);
        if self.hist.len() > self.period {
            self.hist.pop_front();
        }
    }
    fn forecast(&self, h: usize) -> f64 {
        if self.hist.len() < self.period {
            return self.hist.back().copied().unwrap_or(f64::NAN);
        }
        self.hist[(h - 1) % self.period]
    }
    fn fresh(&self) -> Box<dyn Forecaster> {
        Box::new(SeasonalNaive::new(self.period))
    }
}

/// Simple exponential smoothing (ETS(A,N,N)): `level ← α·x + (1−α)·level`; flat forecasts.
#[derive(Clone, Debug)]
pub struct Ses {
    alpha: f64,
    level: Option<f64>,
}

impl Ses {
    /// With smoothing weight `alpha` in (0, 1].
    #[must_use]
    pub fn new(alpha: f64) -> Ses {
        Ses { alpha: alpha.clamp(1e-3, 1.0), level: None }
    }
}

impl Forecaster for Ses {
    fn name(&self) -> String {
        format!("ses(α={:.2})", self.alpha)
    }
    fn observe(&mut self, x: f64) {
        if x.is_nan() {
            return;
        }
        self.level = Some(self.level.map_or(x, |l| self.alpha * x + (1.0 - self.alpha) * l));
    }
    fn forecast(&self, _h: usize) -> f64 {
        self.level.unwrap_or(f64::NAN)
    }
    fn fresh(&self) -> Box<dyn Forecaster> {
        Box::new(Ses::new(self.alpha))
    }
}

/// How many features [`features`] computes.
pub const FEATURES: usize = 11;

/// The features of the history `hist` (oldest first, gaps filled) for a forecast `h` steps
/// ahead, scaled to 0–1: bias, last value, means of the last 3, 12 and 48, the value a day
/// before the target (or the 48-mean), the 48-step range (volatility), the medians of the
/// last 12 and 48 and the quartiles of the last 48. (The medians and quartiles are what a
/// forecast judged by absolute error needs on skewed, noisy load: near zero with bursts.)
#[must_use]
pub fn features(hist: &VecDeque<f64>, h: usize) -> [f64; FEATURES] {
    let n = hist.len();
    let mean = |k: usize| {
        let k = k.min(n).max(1);
        hist.iter().rev().take(k).sum::<f64>() / k as f64
    };
    let last = hist.back().copied().unwrap_or(0.0);
    let m48 = mean(48);
    let seasonal = if n + h > DAY { hist[n + h - 1 - DAY] } else { m48 };
    // The last 48 points, newest first, on the stack (this runs for every forecast).
    let mut window = [0.0; 48];
    let k = n.min(window.len());
    for (slot, v) in window.iter_mut().zip(hist.iter().rev()) {
        *slot = *v;
    }
    let recent = &mut window[..k];
    let range = recent
        .iter()
        .fold(None, |acc: Option<(f64, f64)>, v| Some(acc.map_or((*v, *v), |(lo, hi)| (lo.min(*v), hi.max(*v)))));
    let range = range.map_or(0.0, |(lo, hi)| hi - lo);
    let med12 = quantile(&mut recent[..n.min(12)], 0.5);
    let med48 = quantile(recent, 0.5);
    let q25 = quantile(recent, 0.25);
    let q75 = quantile(recent, 0.75);
    [
        1.0,
        last / 100.0,
        mean(3) / 100.0,
        mean(12) / 100.0,
        m48 / 100.0,
        seasonal / 100.0,
        range / 100.0,
        med12 / 100.0,
        med48 / 100.0,
        q25 / 100.0,
        q75 / 100.0,
    ]
}

/// The `q` quantile of `xs` (nearest rank; 0 when empty). Reorders `xs`.
fn quantile(xs: &mut [f64], q: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let k = ((xs.len() - 1) as f64 * q).round() as usize;
    *xs.select_nth_unstable_by(k, f64::total_cmp).1
}

/// Steps of history the global models keep: a day, plus the 48 steps the features look back.
pub(crate) const HISTORY: usize = DAY + 48;

/// Appends `x` to a global model's history — a gap carries the last value forward (0 before
/// any) — keeping the last [`HISTORY`] steps.
pub(crate) fn remember(hist: &mut VecDeque<f64>, x: f64) {
    let x = if x.is_nan() { hist.back().copied().unwrap_or(0.0) } else { x };
    hist.push_back(x);
    if hist.len() > HISTORY {
        hist.pop_front();
    }
}

/// A linear model per horizon over [`features`], trained across series ([`crate::train`]).
#[derive(Clone, Debug)]
pub struct GlobalLinear {
    /// (horizon, weights), horizons ascending.
    pub weights: Vec<(usize, [f64; FEATURES])>,
    hist: VecDeque<f64>,
}

impl GlobalLinear {
    /// A model with these trained weights.
    #[must_use]
    pub fn new(weights: Vec<(usize, [f64; FEATURES])>) -> GlobalLinear {
        GlobalLinear { weights, hist: VecDeque::new() }
    }
}

impl Forecaster for GlobalLinear {
    fn name(&self) -> String {
        "global-linear".into()
    }
    fn observe(&mut self, x: f64) {
        remember(&mut self.hist, x);
    }
    fn forecast(&self, h: usize) -> f64 {
        if self.hist.is_empty() {
            return f64::NAN;
        }
        // The trained horizon nearest to h.
        let Some((_, w)) = self.weights.iter().min_by_key(|(k, _)| k.abs_diff(h)) else { return f64::NAN };
        let x = features(&self.hist, h);
        (w.iter().zip(x).map(|(w, x)| w * x).sum::<f64>() * 100.0).clamp(0.0, 100.0)
    }
    fn fresh(&self) -> Box<dyn Forecaster> {
        Box::new(GlobalLinear::new(self.weights.clone()))
    }
}

/// Gradient-boosted trees per horizon over [`features`], trained across series
/// ([`crate::train::train_global_gbdt`]) with an absolute-error loss.
#[derive(Clone)]
pub struct GlobalGbdt {
    /// (horizon, trees), horizons ascending.
    pub models: Vec<(usize, std::sync::Arc<hessboost::prelude::BoostedModel>)>,
    /// How many of [`features`] the trees read: the first [`FEATURES_V1`] for a model of
    /// feature version 1, all of them otherwise.
    width: usize,
    hist: VecDeque<f64>,
}

impl GlobalGbdt {
    /// A model with these trained trees (over all of [`features`]).
    #[must_use]
    pub fn new(models: Vec<(usize, std::sync::Arc<hessboost::prelude::BoostedModel>)>) -> GlobalGbdt {
        GlobalGbdt { models, width: FEATURES, hist: VecDeque::new() }
    }
}

impl Forecaster for GlobalGbdt {
    fn name(&self) -> String {
        "global-gbdt".into()
    }
    fn observe(&mut self, x: f64) {
        remember(&mut self.hist, x);
    }
    fn forecast(&self, h: usize) -> f64 {
        if self.hist.is_empty() {
            return f64::NAN;
        }
        // The trained horizon nearest to h.
        let Some((_, m)) = self.models.iter().min_by_key(|(k, _)| k.abs_diff(h)) else { return f64::NAN };
        let x = features(&self.hist, h).map(|v| v as f32);
        match m.predict_row(&x[..self.width], hessboost::prelude::Iterations::Best) {
            Ok(p) => (f64::from(p) * 100.0).clamp(0.0, 100.0),
            Err(_) => f64::NAN,
        }
    }
    fn fresh(&self) -> Box<dyn Forecaster> {
        Box::new(GlobalGbdt { models: self.models.clone(), width: self.width, hist: VecDeque::new() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fed(mut f: Box<dyn Forecaster>, xs: &[f64]) -> Box<dyn Forecaster> {
        for x in xs {
            f.observe(*x);
        }
        f
    }

    #[test]
    fn baselines_do_what_their_names_say() {
        let xs = [1.0, 2.0, f64::NAN, 4.0];
        assert_eq!(fed(Box::new(LastValue::default()), &xs).forecast(5), 4.0);
        assert!((fed(Box::new(MeanOfLast::new(2)), &xs).forecast(1) - 3.0).abs() < 1e-12, "the gap is skipped");
        let s = fed(Box::new(SeasonalNaive::new(3)), &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!((s.forecast(1), s.forecast(2), s.forecast(4)), (4.0, 5.0, 4.0));
        let e = fed(Box::new(Ses::new(0.5)), &[10.0, 20.0]);
        assert_eq!(e.forecast(1), 15.0);
        assert!(LastValue::default().forecast(1).is_nan(), "nothing seen, nothing said");
    }

    #[test]
    fn the_linear_model_reads_its_features() {
        // Weights that copy the last value.
        let mut w = [0.0; FEATURES];
        w[1] = 1.0;
        let m = fed(Box::new(GlobalLinear::new(vec![(1, w)])), &[10.0, 30.0]);
        assert!((m.forecast(1) - 30.0).abs() < 1e-9);
        assert!((m.forecast(12) - 30.0).abs() < 1e-9, "the nearest trained horizon serves");
        let hist: VecDeque<f64> = (0..300).map(f64::from).collect();
        let f = features(&hist, 1);
        assert!((f[5] - (300.0 + 1.0 - 1.0 - 288.0) / 100.0).abs() < 1e-12, "a day before the target");
    }

    #[test]
    fn medians_and_quartiles_read_the_recent_history() {
        // 100 old points of 90 (beyond the 48-step window), then 1..=48 shuffled: the order of
        // the window must not matter, and nothing older than it may count.
        let mut recent: Vec<f64> = (1..=48).map(f64::from).collect();
        recent.reverse();
        recent.swap(3, 40);
        let hist: VecDeque<f64> = std::iter::repeat_n(90.0, 100).chain(recent.iter().copied()).collect();
        let f = features(&hist, 1);
        let last12: Vec<f64> = recent[36..].to_vec();
        let mut sorted12 = last12.clone();
        sorted12.sort_by(f64::total_cmp);
        // Nearest rank: index round((n - 1) q) of the sorted values.
        assert_eq!(f[7], sorted12[6] / 100.0, "median of the last 12 {last12:?}");
        assert_eq!((f[8], f[9], f[10]), (0.25, 0.13, 0.36), "median and quartiles of 1..=48");
        assert_eq!(f[6], 0.47, "the range of the window");
        let empty = features(&VecDeque::new(), 1);
        assert!(empty.iter().skip(1).all(|v| *v == 0.0), "no history, no level: {empty:?}");
    }

    #[test]
    fn a_version_1_linear_model_still_loads_and_reads_its_seven_features() {
        let w1 = vec![0.5, 0.25, 0.0, 0.25, 0.0, 0.0, 0.0];
        let v1 = Artifact { kind: "global-linear".into(), features_version: 1, horizons: vec![(1, w1)], trees: vec![] };
        let m = fed(v1.model().unwrap(), &[10.0, 20.0, 40.0]);
        // 0.5 (bias) + 0.25 · last + 0.25 · mean of 12, in 0–1 units.
        let want = (0.5 + 0.25 * 0.40 + 0.25 * (70.0 / 3.0) / 100.0) * 100.0;
        assert!((m.forecast(1) - want).abs() < 1e-9, "{} vs {want}", m.forecast(1));
        let wrong = Artifact { features_version: 2, ..v1.clone() };
        assert!(wrong.model().err().is_some_and(|e| e.contains("7 weights, expected 11")));
        let future = Artifact { features_version: 3, ..v1 };
        assert!(future.model().err().is_some_and(|e| e.contains("feature version 3")), "an unknown version is refused");
    }
}

/// A trained model as stored: what is needed to forecast with it again.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// The model family.
    pub kind: String,
    /// The version of [`features`] it was trained on.
    pub features_version: u32,
    /// Per horizon, the weights (`global-linear`).
    pub horizons: Vec<(usize, Vec<f64>)>,
    /// Per horizon, the trees in hessboost's native JSON (`global-gbdt`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trees: Vec<(usize, serde_json::Value)>,
}

/// The version of [`features`] (bumped when they change: an artifact of an unknown version is
/// refused, not misread). Version 2 added the medians and quartiles after the seven features
/// of version 1, so a version-1 model reads the first [`FEATURES_V1`] and still loads.
pub const FEATURES_VERSION: u32 = 2;

/// How many features version 1 had (the first ones of [`features`]).
pub const FEATURES_V1: usize = 7;

/// How many of [`features`] a model of feature version `version` reads.
fn feature_width(version: u32) -> Option<usize> {
    match version {
        1 => Some(FEATURES_V1),
        FEATURES_VERSION => Some(FEATURES),
        _ => None,
    }
}

impl Artifact {
    /// The artifact of a trained global linear model.
    #[must_use]
    pub fn global_linear(weights: &[(usize, [f64; FEATURES])]) -> Artifact {
        Artifact {
            kind: "global-linear".into(),
            features_version: FEATURES_VERSION,
            horizons: weights.iter().map(|(h, w)| (*h, w.to_vec())).collect(),
            trees: Vec::new(),
        }
    }

    /// The artifact of a trained boosted-trees model.
    ///
    /// # Errors
    /// When a model does not encode.
    pub fn global_gbdt(
        models: &[(usize, std::sync::Arc<hessboost::prelude::BoostedModel>)],
    ) -> Result<Artifact, String> {
        let trees = models
            .iter()
            .map(|(h, m)| {
                let json = m.encode(hessboost::prelude::ModelFormat::Json).map_err(|e| e.to_string())?;
                let value: serde_json::Value = serde_json::from_slice(&json).map_err(|e| e.to_string())?;
                Ok((*h, value))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Artifact { kind: "global-gbdt".into(), features_version: FEATURES_VERSION, horizons: Vec::new(), trees })
    }

    /// The model it holds.
    ///
    /// # Errors
    /// An unknown family, another feature version, weights of the wrong length, or trees that
    /// do not decode.
    pub fn model(&self) -> Result<Box<dyn Forecaster>, String> {
        let Some(width) = feature_width(self.features_version) else {
            return Err(format!("cannot use a {} model of feature version {}", self.kind, self.features_version));
        };
        match self.kind.as_str() {
            "global-linear" => Ok(Box::new(self.linear(width)?)),
            "global-gbdt" => {
                let models = self
                    .trees
                    .iter()
                    .map(|(h, v)| {
                        let bytes = serde_json::to_vec(v).map_err(|e| e.to_string())?;
                        hessboost::prelude::BoostedModel::decode(bytes, hessboost::prelude::ModelFormat::Json)
                            .map(|m| (*h, std::sync::Arc::new(m)))
                            .map_err(|e| format!("horizon {h}: {e}"))
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                if models.is_empty() {
                    return Err("a global-gbdt artifact without trees".into());
                }
                Ok(Box::new(GlobalGbdt { models, width, hist: VecDeque::new() }))
            }
            other => Err(format!("cannot use a {other} model")),
        }
    }

    /// The linear model; weights of an older, narrower feature version weigh the features it
    /// lacked by zero.
    fn linear(&self, width: usize) -> Result<GlobalLinear, String> {
        let weights = self
            .horizons
            .iter()
            .map(|(h, w)| {
                if w.len() != width {
                    return Err(format!("horizon {h}: {} weights, expected {width}", w.len()));
                }
                let mut all = [0.0; FEATURES];
                all[..width].copy_from_slice(w);
                Ok((*h, all))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(GlobalLinear::new(weights))
    }
}

/// A model under its own name (e.g. a model id), for comparing versions side by side.
pub struct Named {
    /// The name.
    pub name: String,
    /// The model.
    pub inner: Box<dyn Forecaster>,
}

impl Forecaster for Named {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn observe(&mut self, x: f64) {
        self.inner.observe(x);
    }
    fn forecast(&self, h: usize) -> f64 {
        self.inner.forecast(h)
    }
    fn fresh(&self) -> Box<dyn Forecaster> {
        Box::new(Named { name: self.name.clone(), inner: self.inner.fresh() })
    }
}

/// The mean of several forecasters' forecasts (those that have one).
pub struct Ensemble {
    /// The members.
    pub members: Vec<Box<dyn Forecaster>>,
}

impl Forecaster for Ensemble {
    fn name(&self) -> String {
        format!("ensemble({})", self.members.iter().map(|m| m.name()).collect::<Vec<_>>().join("+"))
    }
    fn observe(&mut self, x: f64) {
        for m in &mut self.members {
            m.observe(x);
        }
    }
    fn forecast(&self, h: usize) -> f64 {
        let f: Vec<f64> = self.members.iter().map(|m| m.forecast(h)).filter(|v| !v.is_nan()).collect();
        if f.is_empty() { f64::NAN } else { f.iter().sum::<f64>() / f.len() as f64 }
    }
    fn fresh(&self) -> Box<dyn Forecaster> {
        Box::new(Ensemble { members: self.members.iter().map(|m| m.fresh()).collect() })
    }
}
