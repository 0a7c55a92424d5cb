//! Forecast accuracy, accumulated one forecast at a time.

use serde::Serialize;

/// Running accuracy of one model at one horizon.
#[derive(Clone, Debug, Default)]
pub struct Accuracy {
    n: u64,
    abs: f64,
    sq: f64,
    scaled: f64,
    scaled_n: u64,
    ape: f64,
    ape_n: u64,
    covered: u64,
    with_interval: u64,
    within_10: u64,
}

/// The summary of an [`Accuracy`].
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Scores {
    /// Forecasts scored.
    pub forecasts: u64,
    /// Mean absolute error (CPU-% points).
    pub mae: f64,
    /// Root mean squared error.
    pub rmse: f64,
    /// Mean absolute scaled error (scale: the series' one-step naive MAE before the test part;
    /// series that were flat there have no scale and are left out).
    pub mase: f64,
    /// Mean absolute percentage error over actuals ≥ 1 %.
    pub mape: f64,
    /// Share of actuals inside the prediction interval.
    pub coverage: f64,
    /// Share of forecasts within ±10 percentage points.
    pub within_10pp: f64,
}

impl Accuracy {
    /// Adds one forecast: the point, its interval (if any), the actual, and the series' MASE
    /// scale (NaN or zero: not counted in MASE).
    pub fn add(&mut self, point: f64, interval: Option<(f64, f64)>, actual: f64, scale: f64) {
        if actual.is_nan() || point.is_nan() {
            return;
        }
        let e = (point - actual).abs();
        self.n += 1;
        self.abs += e;
        self.sq += e * e;
        if scale > 0.0 {
            self.scaled += e / scale;
            self.scaled_n += 1;
        }
        if actual >= 1.0 {
            self.ape += e / actual;
            self.ape_n += 1;
        }
        if let Some((lo, hi)) = interval {
            self.with_interval += 1;
            if (lo..=hi).contains(&actual) {
                self.covered += 1;
            }
        }
        if e <= 10.0 {
            self.within_10 += 1;
        }
    }

    /// Merges another accumulator into this one.
    pub fn merge(&mut self, o: &Accuracy) {
        self.n += o.n;
        self.abs += o.abs;
        self.sq += o.sq;
        self.scaled += o.scaled;
        self.scaled_n += o.scaled_n;
        self.ape += o.ape;
        self.ape_n += o.ape_n;
        self.covered += o.covered;
        self.with_interval += o.with_interval;
        self.within_10 += o.within_10;
    }

    /// Mean absolute error so far (NaN before any forecast).
    #[must_use]
    pub fn mae(&self) -> f64 {
        self.abs / self.n as f64
    }

    /// The summary.
    #[must_use]
    pub fn scores(&self) -> Scores {
        let n = self.n.max(1) as f64;
        Scores {
            forecasts: self.n,
            mae: self.abs / n,
            rmse: (self.sq / n).sqrt(),
            mase: if self.scaled_n == 0 { f64::NAN } else { self.scaled / self.scaled_n as f64 },
            mape: if self.ape_n == 0 { f64::NAN } else { self.ape / self.ape_n as f64 },
            coverage: if self.with_interval == 0 { f64::NAN } else { self.covered as f64 / self.with_interval as f64 },
            within_10pp: self.within_10 as f64 / n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scores_are_the_textbook_ones() {
        let mut a = Accuracy::default();
        a.add(10.0, Some((8.0, 12.0)), 12.0, 2.0); // e=2
        a.add(0.0, Some((0.0, 1.0)), 0.5, 2.0); // e=0.5, actual < 1: no APE
        a.add(30.0, None, 15.0, 2.0); // e=15
        let s = a.scores();
        assert_eq!(s.forecasts, 3);
        assert!((s.mae - 17.5 / 3.0).abs() < 1e-12);
        assert!((s.rmse - ((4.0 + 0.25 + 225.0) / 3.0f64).sqrt()).abs() < 1e-12);
        assert!((s.mase - 17.5 / 3.0 / 2.0).abs() < 1e-12);
        assert!((s.mape - (2.0 / 12.0 + 1.0) / 2.0).abs() < 1e-12);
        assert!((s.coverage - 1.0).abs() < 1e-12, "both intervals held their actual");
        assert!((s.within_10pp - 2.0 / 3.0).abs() < 1e-12);
    }
}
