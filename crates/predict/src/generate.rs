//! Synthetic telemetry with known structure, for tests, demos and robustness checks: daily and
//! weekly seasonality, trend, bursts, noise, outliers, missing points and failures (the host or
//! VM down: zeros), at 5-minute steps, reproducible from a seed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::model::DAY;
use crate::series::Series;

/// What to generate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenConfig {
    /// Series.
    pub series: usize,
    /// Days (288 steps each).
    pub days: usize,
    /// Seed: the same seed gives the same data.
    pub seed: u64,
    /// Standard deviation of the noise, CPU-% points.
    pub noise: f64,
    /// Bursts per series per day (on average).
    pub bursts_per_day: f64,
    /// Share of points that are outliers (a spike to near 100 %).
    pub outliers: f64,
    /// Share of points missing.
    pub missing: f64,
    /// Failures per series per week (on average); each lasts 30 min to 3 h at zero.
    pub failures_per_week: f64,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            series: 10,
            days: 14,
            seed: 1,
            noise: 3.0,
            bursts_per_day: 1.0,
            outliers: 0.002,
            missing: 0.01,
            failures_per_week: 0.5,
        }
    }
}

/// Generates the series.
///
/// # Panics
/// Never for finite, non-negative settings; `noise` must be finite.
#[must_use]
pub fn generate(cfg: &GenConfig) -> Vec<Series> {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let noise = Normal::new(0.0, cfg.noise.max(0.0)).unwrap_or_else(|_| Normal::new(0.0, 0.0).expect("zero is valid"));
    let steps = cfg.days * DAY;
    (0..cfg.series)
        .map(|i| {
            let base = rng.random_range(5.0..40.0);
            let daily = rng.random_range(0.0..25.0);
            let peak = rng.random_range(0..DAY) as f64;
            let weekend = rng.random_range(0.5..1.0);
            let trend = rng.random_range(-0.5..1.0) / DAY as f64; // points per step
            let mut burst = 0.0f64;
            let mut down = 0usize;
            let values = (0..steps)
                .map(|t| {
                    let day = t / DAY;
                    let phase = 2.0 * std::f64::consts::PI * ((t % DAY) as f64 - peak) / DAY as f64;
                    let week = if day % 7 >= 5 { weekend } else { 1.0 };
                    if rng.random_bool((cfg.bursts_per_day / DAY as f64).clamp(0.0, 1.0)) {
                        burst += rng.random_range(10.0..50.0);
                    }
                    burst *= 0.9;
                    if down == 0 && rng.random_bool((cfg.failures_per_week / (7.0 * DAY as f64)).clamp(0.0, 1.0)) {
                        down = rng.random_range(6..36);
                    }
                    let mut v = (base + daily * phase.cos()) * week + trend * t as f64 + burst + noise.sample(&mut rng);
                    if rng.random_bool(cfg.outliers.clamp(0.0, 1.0)) {
                        v = rng.random_range(90.0..100.0);
                    }
                    if down > 0 {
                        down -= 1;
                        v = 0.0;
                    }
                    if rng.random_bool(cfg.missing.clamp(0.0, 1.0)) {
                        return f64::NAN;
                    }
                    v.clamp(0.0, 100.0)
                })
                .collect();
            Series { name: format!("synthetic-{i}"), values }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_data_and_the_structure_is_there() {
        let cfg = GenConfig {
            series: 3,
            days: 14,
            noise: 1.0,
            outliers: 0.0,
            missing: 0.02,
            failures_per_week: 0.0,
            ..GenConfig::default()
        };
        let a = generate(&cfg);
        let b = generate(&cfg);
        assert_eq!(a.len(), 3);
        assert!(a.iter().zip(&b).all(|(x, y)| x.values.len() == y.values.len()
            && x.values.iter().zip(&y.values).all(|(p, q)| p.to_bits() == q.to_bits())));
        let other = generate(&GenConfig { seed: 2, ..cfg.clone() });
        assert_ne!(a[0].values[10].to_bits(), other[0].values[10].to_bits());
        for s in &a {
            assert_eq!(s.values.len(), 14 * DAY);
            let missing = s.values.iter().filter(|v| v.is_nan()).count() as f64 / s.values.len() as f64;
            assert!((0.005..0.04).contains(&missing), "missing share {missing}");
            assert!(s.values.iter().filter(|v| !v.is_nan()).all(|v| (0.0..=100.0).contains(v)));
        }
        // Daily seasonality: yesterday at the same time predicts better than a random lag.
        let s = &a
            .iter()
            .max_by(|x, y| {
                let amp = |s: &Series| s.values.iter().filter(|v| !v.is_nan()).fold(0.0f64, |m, v| m.max(*v));
                amp(x).total_cmp(&amp(y))
            })
            .unwrap()
            .values;
        let err = |lag: usize| {
            let d: Vec<f64> = (lag..s.len())
                .filter(|&t| !s[t].is_nan() && !s[t - lag].is_nan())
                .map(|t| (s[t] - s[t - lag]).abs())
                .collect();
            d.iter().sum::<f64>() / d.len() as f64
        };
        assert!(err(DAY) < err(DAY / 2), "daily cycle: {} vs {}", err(DAY), err(DAY / 2));
    }
}
