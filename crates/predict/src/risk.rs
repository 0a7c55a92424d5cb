//! Failure risk: which nodes fail within the next window, scored from their failure history.
//!
//! Built on the LANL records (one row per node outage, 22 systems, 1996–2005). Every week is a
//! snapshot: for each node of each system in service, features of its history up to that week
//! and a label — did it fail within the next `window_days`? Snapshots before the cut-off train a
//! logistic regression (gradient descent, L2, early stopping on the last months before the
//! cut-off, which also calibrate it by Platt scaling); snapshots after the cut-off are the test.
//! It is scored against ranking baselines: most failures so far, most failures in the last 30
//! days. Logistic regression is a few lines here rather than a dependency (`linfa` would bring
//! `ndarray` and its tree into a 2-core CI build for one model).

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::series::ReadError;

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
#[must_use]
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses `m/d/yyyy H:MM` into days (fractional) since the epoch.
#[must_use]
pub fn parse_lanl_time(s: &str) -> Option<f64> {
    let (date, time) = s.trim().split_once(' ').unwrap_or((s.trim(), "0:00"));
    let mut p = date.split('/');
    let (m, d, y): (u32, u32, i64) = (p.next()?.parse().ok()?, p.next()?.parse().ok()?, p.next()?.parse().ok()?);
    let (hh, mm) = time.split_once(':')?;
    let (hh, mm): (f64, f64) = (hh.parse().ok()?, mm.parse().ok()?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    Some(days_from_civil(y, m, d) as f64 + (hh * 60.0 + mm) / 1440.0)
}

/// One failure of one node.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    /// Days since the epoch.
    pub at: f64,
    /// Minutes down.
    pub down_min: f64,
    /// Root cause was hardware.
    pub hardware: bool,
}

/// The failure history of every node slot, by (system, node), with each system's node count.
#[derive(Clone, Debug, Default)]
pub struct Fleet {
    /// Failures per node, in time order.
    pub failures: BTreeMap<(u32, u32), Vec<Failure>>,
    /// Nodes per system.
    pub nodes: BTreeMap<u32, u32>,
    /// Per system: its first and last record (days), taken as its time in service.
    pub span: BTreeMap<u32, (f64, f64)>,
    /// Records that name no node (left out).
    pub unattributed: usize,
}

/// Reads the LANL CSV (gzip or plain).
///
/// # Errors
/// The file and line of anything that does not parse.
pub fn read_lanl(path: &Path) -> Result<Fleet, ReadError> {
    let name = path.display().to_string();
    let mut lines = crate::series::open(path)?.lines();
    let fmt = |line: usize, reason: String| ReadError::Format { path: name.clone(), line, reason };
    let header =
        lines.next().transpose().map_err(|source| ReadError::Io { path: name.clone(), source })?.unwrap_or_default();
    let cols: Vec<&str> = header.split(',').map(str::trim).collect();
    let col = |c: &str| cols.iter().position(|x| *x == c).ok_or_else(|| fmt(1, format!("no column {c:?}")));
    let (sys_i, nodes_i, node_i, start_i, down_i, hw_i) =
        (col("System")?, col("nodes")?, col("nodenumz")?, col("Prob Started")?, col("Down Time")?, col("Hardware")?);
    let mut fleet = Fleet::default();
    for (i, line) in lines.enumerate() {
        let line = line.map_err(|source| ReadError::Io { path: name.clone(), source })?;
        if line.trim().is_empty() {
            continue;
        }
        let n = i + 2;
        let cells: Vec<&str> = line.split(',').collect();
        if cells.len() < cols.len() {
            return Err(fmt(n, format!("{} cells, the header has {}", cells.len(), cols.len())));
        }
        let system: u32 = cells[sys_i].trim().parse().map_err(|_| fmt(n, format!("System {:?}", cells[sys_i])))?;
        // A few records (system 17) name no node: they cannot be attributed, and are counted.
        if cells[node_i].trim().is_empty() {
            fleet.unattributed += 1;
            continue;
        }
        let node: u32 = cells[node_i].trim().parse().map_err(|_| fmt(n, format!("nodenumz {:?}", cells[node_i])))?;
        let at = parse_lanl_time(cells[start_i]).ok_or_else(|| fmt(n, format!("Prob Started {:?}", cells[start_i])))?;
        let down_min: f64 = cells[down_i].trim().parse().unwrap_or(0.0);
        if let Ok(total) = cells[nodes_i].trim().parse::<u32>() {
            let e = fleet.nodes.entry(system).or_insert(0);
            *e = (*e).max(total);
        }
        let e = fleet.nodes.entry(system).or_insert(0);
        *e = (*e).max(node + 1);
        let span = fleet.span.entry(system).or_insert((at, at));
        span.0 = span.0.min(at);
        span.1 = span.1.max(at);
        fleet.failures.entry((system, node)).or_default().push(Failure {
            at,
            down_min,
            hardware: !cells[hw_i].trim().is_empty(),
        });
    }
    for f in fleet.failures.values_mut() {
        f.sort_by(|a, b| a.at.total_cmp(&b.at));
    }
    Ok(fleet)
}

/// How many features [`node_features`] computes.
pub const RISK_FEATURES: usize = 8;

/// Features of a node at time `t` from its failures before `t` (and its system's): bias,
/// failures in the last 7, 30 and 365 days, all failures so far (log), days since the last
/// one (log, capped), the share of hardware causes, and the system's failures per node in the
/// last 30 days.
#[must_use]
pub fn node_features(past: &[Failure], t: f64, system_rate_30d: f64) -> [f64; RISK_FEATURES] {
    let within = |d: f64| past.iter().rev().take_while(|f| f.at >= t - d).count() as f64;
    let since = past.last().map_or(3650.0, |f| (t - f.at).min(3650.0));
    let hw = if past.is_empty() { 0.0 } else { past.iter().filter(|f| f.hardware).count() as f64 / past.len() as f64 };
    [
        1.0,
        within(7.0).ln_1p(),
        within(30.0).ln_1p(),
        within(365.0).ln_1p(),
        (past.len() as f64).ln_1p(),
        since.ln_1p() / 8.2,
        hw,
        system_rate_30d.ln_1p(),
    ]
}

/// The version of [`node_features`] a [`RiskModel`] was trained on.
pub const RISK_FEATURE_VERSION: u32 = 1;

/// A trained failure-risk model: the logistic regression's weights over [`node_features`], its
/// Platt calibration and the threshold chosen on validation — what `models risk --save` writes
/// and the orchestrator reads (`--risk-model`) to score hosts from their failure history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RiskModel {
    /// The features' version ([`RISK_FEATURE_VERSION`]); a model of another version is refused.
    pub feature_version: u32,
    /// The label: fails within this many days.
    pub window_days: f64,
    /// Weights of the features, in [`node_features`]' order.
    pub weights: [f64; RISK_FEATURES],
    /// Platt scaling: probability = σ(a · (weights · features) + b).
    pub platt_a: f64,
    /// See `platt_a`.
    pub platt_b: f64,
    /// The F1-best threshold on validation: at or above it a node is flagged.
    pub threshold: f64,
}

/// Why a [`RiskModel`] cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RiskModelError {
    /// Trained on other features.
    #[error(
        "feature version {found}, this build computes version {RISK_FEATURE_VERSION}: retrain with `novacron models risk --save`"
    )]
    Version {
        /// The model's.
        found: u32,
    },
    /// A weight, the calibration or the threshold is not a finite number in range.
    #[error("{0} is not a finite number in range")]
    Value(&'static str),
}

impl RiskModel {
    /// Checks what deserialisation cannot.
    ///
    /// # Errors
    /// Another feature version, or values out of range.
    pub fn check(&self) -> Result<(), RiskModelError> {
        if self.feature_version != RISK_FEATURE_VERSION {
            return Err(RiskModelError::Version { found: self.feature_version });
        }
        if !self.weights.iter().all(|w| w.is_finite()) {
            return Err(RiskModelError::Value("weights"));
        }
        if !(self.platt_a.is_finite() && self.platt_b.is_finite()) {
            return Err(RiskModelError::Value("platt_a/platt_b"));
        }
        if !(self.threshold.is_finite() && (0.0..=1.0).contains(&self.threshold)) {
            return Err(RiskModelError::Value("threshold"));
        }
        if !(self.window_days.is_finite() && self.window_days > 0.0) {
            return Err(RiskModelError::Value("window_days"));
        }
        Ok(())
    }

    /// The calibrated probability that a node with this failure history (`past`, oldest first,
    /// all before `t`, in days) fails within the window, its system having had
    /// `system_rate_30d` failures per node in the last 30 days.
    #[must_use]
    pub fn probability(&self, past: &[Failure], t: f64, system_rate_30d: f64) -> f64 {
        sigmoid(self.platt_a * dot(&self.weights, &node_features(past, t, system_rate_30d)) + self.platt_b)
    }
}

/// A baseline's score of a snapshot.
type Scorer = Box<dyn Fn(&Row) -> f64>;

/// One snapshot row.
#[derive(Clone, Debug)]
struct Row {
    at: f64,
    x: [f64; RISK_FEATURES],
    /// Failures so far and in the last 30 days (the baselines' scores).
    total: f64,
    recent: f64,
    y: bool,
    /// Days from the snapshot to the failure, when it fails within the window.
    lead: Option<f64>,
}

fn snapshots(fleet: &Fleet, window_days: f64, step_days: f64) -> Vec<Row> {
    let mut rows = Vec::new();
    for (&system, &(first, last)) in &fleet.span {
        let nodes = fleet.nodes.get(&system).copied().unwrap_or(1).max(1);
        let sys_failures: Vec<f64> = {
            let mut v: Vec<f64> = fleet
                .failures
                .range((system, 0)..=(system, u32::MAX))
                .flat_map(|(_, f)| f.iter().map(|x| x.at))
                .collect();
            v.sort_by(f64::total_cmp);
            v
        };
        let empty = Vec::new();
        // From a month after the system's first record (some history to read) to a window
        // before its last.
        let mut t = first + 30.0;
        while t + window_days <= last {
            let lo = sys_failures.partition_point(|a| *a < t - 30.0);
            let hi = sys_failures.partition_point(|a| *a < t);
            let rate = (hi - lo) as f64 / f64::from(nodes);
            for node in 0..nodes {
                let all = fleet.failures.get(&(system, node)).unwrap_or(&empty);
                let k = all.partition_point(|f| f.at < t);
                let past = &all[..k];
                let next = all[k..].first().map(|f| f.at - t).filter(|d| *d < window_days);
                let y = next.is_some();
                rows.push(Row {
                    at: t,
                    x: node_features(past, t, rate),
                    total: past.len() as f64,
                    recent: past.iter().rev().take_while(|f| f.at >= t - 30.0).count() as f64,
                    y,
                    lead: next,
                });
            }
            t += step_days;
        }
    }
    rows
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

fn dot(w: &[f64; RISK_FEATURES], x: &[f64; RISK_FEATURES]) -> f64 {
    w.iter().zip(x).map(|(a, b)| a * b).sum()
}

fn log_loss(w: &[f64; RISK_FEATURES], rows: &[&Row]) -> f64 {
    rows.iter()
        .map(|r| {
            let p = sigmoid(dot(w, &r.x)).clamp(1e-9, 1.0 - 1e-9);
            if r.y { -p.ln() } else { -(1.0 - p).ln() }
        })
        .sum::<f64>()
        / rows.len().max(1) as f64
}

/// ROC AUC of scores against labels (the probability a random positive outranks a random
/// negative; ties count half).
#[must_use]
pub fn roc_auc(scored: &[(f64, bool)]) -> f64 {
    let mut v = scored.to_vec();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut rank_sum, mut i, n) = (0.0, 0usize, v.len());
    let pos = v.iter().filter(|x| x.1).count() as f64;
    let neg = n as f64 - pos;
    while i < n {
        let mut j = i;
        while j + 1 < n && v[j + 1].0 == v[i].0 {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += v[i..=j].iter().filter(|x| x.1).count() as f64 * avg_rank;
        i = j + 1;
    }
    if pos == 0.0 || neg == 0.0 { f64::NAN } else { (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg) }
}

/// Average precision (the area under the precision–recall curve, step-wise): each distinct
/// score is one threshold, so tied scores count together (a constant score gets the base rate).
#[must_use]
pub fn average_precision(scored: &[(f64, bool)]) -> f64 {
    let mut v = scored.to_vec();
    v.sort_by(|a, b| b.0.total_cmp(&a.0));
    let pos = v.iter().filter(|x| x.1).count() as f64;
    if pos == 0.0 {
        return f64::NAN;
    }
    let (mut tp, mut seen, mut ap, mut i) = (0.0, 0.0, 0.0, 0);
    while i < v.len() {
        let mut j = i;
        while j < v.len() && v[j].0 == v[i].0 {
            j += 1;
        }
        let new_tp = v[i..j].iter().filter(|x| x.1).count() as f64;
        tp += new_tp;
        seen += (j - i) as f64;
        ap += (new_tp / pos) * (tp / seen);
        i = j;
    }
    ap
}

/// Scores of one ranking on the test snapshots.
#[derive(Clone, Debug, Serialize)]
pub struct RiskScores {
    /// The scorer.
    pub model: String,
    /// Area under the ROC curve.
    pub roc_auc: f64,
    /// Area under the precision–recall curve.
    pub pr_auc: f64,
    /// Precision at the threshold chosen on validation (models only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<f64>,
    /// Recall at that threshold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recall: Option<f64>,
    /// F1 at that threshold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub f1: Option<f64>,
    /// Mean squared error of the probabilities (models only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub brier: Option<f64>,
}

/// The evaluation.
#[derive(Clone, Debug, Serialize)]
pub struct RiskReport {
    /// Days ahead the label looks.
    pub window_days: f64,
    /// Training, validation and test snapshots.
    pub rows: (usize, usize, usize),
    /// Share of test snapshots with a failure (the base rate).
    pub base_rate: f64,
    /// The models and baselines, best ROC AUC first.
    pub scores: Vec<RiskScores>,
    /// Calibration of the model on test: (mean predicted, observed rate, rows) per decile.
    pub calibration: Vec<(f64, f64, usize)>,
    /// Epochs kept by early stopping.
    pub epochs: usize,
    /// The decision threshold (F1-best on validation).
    pub threshold: f64,
    /// Lead time of the failures flagged in time (probability at or above the threshold at the
    /// snapshot before them): mean and median days from the alarm to the failure.
    pub lead_time_days: (f64, f64),
    /// The trained model.
    pub model: RiskModel,
}

/// Trains on snapshots before `cutoff` (days), calibrates on the last `val_days` before it,
/// and scores everything on snapshots from the cut-off on.
#[must_use]
pub fn evaluate_risk(fleet: &Fleet, cutoff: f64, val_days: f64, window_days: f64) -> RiskReport {
    let rows = snapshots(fleet, window_days, 7.0);
    // Labels look `window_days` ahead: a training row must not see past the validation start.
    let train: Vec<&Row> = rows.iter().filter(|r| r.at + window_days <= cutoff - val_days).collect();
    let val: Vec<&Row> = rows.iter().filter(|r| r.at >= cutoff - val_days && r.at + window_days <= cutoff).collect();
    let test: Vec<&Row> = rows.iter().filter(|r| r.at >= cutoff).collect();
    // Gradient descent on the log loss, class-balanced, with early stopping on validation.
    let pos = train.iter().filter(|r| r.y).count().max(1) as f64;
    let neg = (train.len() as f64 - pos).max(1.0);
    let (wp, wn) = (train.len() as f64 / (2.0 * pos), train.len() as f64 / (2.0 * neg));
    let mut w = [0.0; RISK_FEATURES];
    let mut best = (w, log_loss(&w, &val), 0usize);
    let mut worse = 0;
    for epoch in 1..=300 {
        let mut g = [0.0; RISK_FEATURES];
        for r in &train {
            let p = sigmoid(dot(&w, &r.x));
            let (target, weight) = if r.y { (1.0, wp) } else { (0.0, wn) };
            for (gj, xj) in g.iter_mut().zip(&r.x) {
                *gj += weight * (p - target) * xj;
            }
        }
        for (wj, gj) in w.iter_mut().zip(g) {
            *wj -= 0.5 * (gj / train.len().max(1) as f64 + 1e-4 * *wj);
        }
        // Early stopping reads the ranking quality on validation (balanced training shifts the
        // probabilities; calibration below puts them back).
        let v = -roc_auc(&val.iter().map(|r| (dot(&w, &r.x), r.y)).collect::<Vec<_>>());
        if v < best.1 || epoch == 1 {
            best = (w, v, epoch);
            worse = 0;
        } else {
            worse += 1;
            if worse >= 20 {
                break;
            }
        }
    }
    let w = best.0;
    // Platt scaling on validation: p = σ(a·z + b).
    let (mut a, mut b) = (1.0, 0.0);
    for _ in 0..500 {
        let (mut ga, mut gb) = (0.0, 0.0);
        for r in &val {
            let z = dot(&w, &r.x);
            let p = sigmoid(a * z + b);
            let t = if r.y { 1.0 } else { 0.0 };
            ga += (p - t) * z;
            gb += p - t;
        }
        let n = val.len().max(1) as f64;
        a -= 0.5 * ga / n;
        b -= 0.5 * gb / n;
    }
    let model = RiskModel {
        feature_version: RISK_FEATURE_VERSION,
        window_days,
        weights: w,
        platt_a: a,
        platt_b: b,
        threshold: 0.5,
    };
    let prob = |r: &Row| sigmoid(a * dot(&w, &r.x) + b);
    // The F1-best threshold on validation.
    let mut threshold = 0.5;
    let mut best_f1 = -1.0;
    for k in 1..100 {
        let th = f64::from(k) / 100.0;
        let (tp, fp, fneg) = val.iter().fold((0.0, 0.0, 0.0), |(tp, fp, fneg), r| match (prob(r) >= th, r.y) {
            (true, true) => (tp + 1.0, fp, fneg),
            (true, false) => (tp, fp + 1.0, fneg),
            (false, true) => (tp, fp, fneg + 1.0),
            _ => (tp, fp, fneg),
        });
        let f1 = if tp == 0.0 { 0.0 } else { 2.0 * tp / (2.0 * tp + fp + fneg) };
        if f1 > best_f1 {
            best_f1 = f1;
            threshold = th;
        }
    }
    let scored: Vec<(f64, bool)> = test.iter().map(|r| (prob(r), r.y)).collect();
    let (tp, fp, fneg) = scored.iter().fold((0.0, 0.0, 0.0), |(tp, fp, fneg), (p, y)| match (*p >= threshold, *y) {
        (true, true) => (tp + 1.0, fp, fneg),
        (true, false) => (tp, fp + 1.0, fneg),
        (false, true) => (tp, fp, fneg + 1.0),
        _ => (tp, fp, fneg),
    });
    let precision = if tp + fp == 0.0 { 0.0 } else { tp / (tp + fp) };
    let recall = if tp + fneg == 0.0 { 0.0 } else { tp / (tp + fneg) };
    let f1 = if precision + recall == 0.0 { 0.0 } else { 2.0 * precision * recall / (precision + recall) };
    let brier =
        scored.iter().map(|(p, y)| (p - if *y { 1.0 } else { 0.0 }).powi(2)).sum::<f64>() / scored.len().max(1) as f64;
    let mut scores = vec![RiskScores {
        model: "logistic-regression (calibrated)".into(),
        roc_auc: roc_auc(&scored),
        pr_auc: average_precision(&scored),
        precision: Some(precision),
        recall: Some(recall),
        f1: Some(f1),
        brier: Some(brier),
    }];
    let base_rate_train = train.iter().filter(|r| r.y).count() as f64 / train.len().max(1) as f64;
    let mut leads: Vec<f64> = test.iter().filter(|r| prob(r) >= threshold).filter_map(|r| r.lead).collect();
    leads.sort_by(f64::total_cmp);
    let lead_time_days = if leads.is_empty() {
        (f64::NAN, f64::NAN)
    } else {
        (leads.iter().sum::<f64>() / leads.len() as f64, leads[leads.len() / 2])
    };
    let baselines: [(&str, Scorer); 3] = [
        ("base rate (one probability for every node)", Box::new(move |_: &Row| base_rate_train)),
        ("most failures so far", Box::new(|r: &Row| r.total)),
        ("most failures in the last 30 days", Box::new(|r: &Row| r.recent)),
    ];
    for (name, f) in baselines {
        let s: Vec<(f64, bool)> = test.iter().map(|r| (f(r), r.y)).collect();
        scores.push(RiskScores {
            model: name.into(),
            roc_auc: roc_auc(&s),
            pr_auc: average_precision(&s),
            precision: None,
            recall: None,
            f1: None,
            brier: None,
        });
    }
    scores.sort_by(|a, b| b.roc_auc.total_cmp(&a.roc_auc));
    // Calibration by deciles of predicted probability.
    let mut sorted = scored.clone();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let calibration = sorted
        .chunks(sorted.len().div_ceil(10).max(1))
        .map(|c| {
            let n = c.len();
            (c.iter().map(|x| x.0).sum::<f64>() / n as f64, c.iter().filter(|x| x.1).count() as f64 / n as f64, n)
        })
        .collect();
    RiskReport {
        window_days,
        rows: (train.len(), val.len(), test.len()),
        base_rate: test.iter().filter(|r| r.y).count() as f64 / test.len().max(1) as f64,
        scores,
        calibration,
        epochs: best.2,
        threshold,
        lead_time_days,
        model: RiskModel { threshold, ..model },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_ranking_metrics_are_right() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert!(
            (parse_lanl_time("6/21/2005 10:54").unwrap() - (f64::from(12_955) + (10.0 * 60.0 + 54.0) / 1440.0)).abs()
                < 1e-9
        );
        assert!(parse_lanl_time("13/1/2005 0:00").is_none());
        let perfect = [(0.9, true), (0.8, true), (0.2, false), (0.1, false)];
        assert_eq!(roc_auc(&perfect), 1.0);
        assert_eq!(average_precision(&perfect), 1.0);
        let inverted = [(0.9, false), (0.8, false), (0.2, true), (0.1, true)];
        assert_eq!(roc_auc(&inverted), 0.0);
        let ties = [(0.5, true), (0.5, false)];
        assert_eq!(roc_auc(&ties), 0.5);
        assert_eq!(average_precision(&[(0.9, false), (0.8, true)]), 0.5);
        let constant = [(0.1, true), (0.1, false), (0.1, false), (0.1, false)];
        assert_eq!(average_precision(&constant), 0.25, "a constant score earns the base rate");
        assert_eq!(roc_auc(&constant), 0.5);
    }

    #[test]
    fn a_node_that_keeps_failing_is_ranked_above_a_quiet_one() {
        // System 1, two nodes: node 0 fails every 5 days, node 1 once a year.
        let mut fleet = Fleet::default();
        fleet.nodes.insert(1, 2);
        let day0 = 10_000.0;
        let busy: Vec<Failure> =
            (0..400).map(|i| Failure { at: day0 + f64::from(i) * 5.0, down_min: 60.0, hardware: true }).collect();
        let quiet: Vec<Failure> =
            (0..6).map(|i| Failure { at: day0 + f64::from(i) * 365.0, down_min: 60.0, hardware: false }).collect();
        fleet.span.insert(1, (day0, day0 + 2000.0));
        fleet.failures.insert((1, 0), busy);
        fleet.failures.insert((1, 1), quiet);
        let r = evaluate_risk(&fleet, day0 + 1500.0, 180.0, 7.0);
        let model = r.scores.iter().find(|s| s.model.starts_with("logistic")).unwrap();
        assert!(model.roc_auc > 0.9, "{r:?}");
        assert!(r.rows.0 > 0 && r.rows.1 > 0 && r.rows.2 > 0);
        // The saved model scores live histories the same way: a node that failed twice this
        // week is riskier than one quiet for a year.
        let m = &r.model;
        m.check().unwrap();
        let t = day0 + 3000.0;
        let hot = [
            Failure { at: t - 6.0, down_min: 1.0, hardware: false },
            Failure { at: t - 1.0, down_min: 1.0, hardware: false },
        ];
        let cold = [Failure { at: t - 400.0, down_min: 1.0, hardware: false }];
        let (p_hot, p_cold) = (m.probability(&hot, t, 0.1), m.probability(&cold, t, 0.1));
        assert!(p_hot > p_cold && (0.0..=1.0).contains(&p_hot) && p_cold > 0.0, "{p_hot} vs {p_cold}");
    }

    #[test]
    fn a_risk_model_of_other_features_or_bad_numbers_is_refused() {
        let good = RiskModel {
            feature_version: RISK_FEATURE_VERSION,
            window_days: 7.0,
            weights: [0.1; RISK_FEATURES],
            platt_a: 1.0,
            platt_b: -2.0,
            threshold: 0.2,
        };
        assert!(good.check().is_ok());
        let old = RiskModel { feature_version: 0, ..good.clone() };
        assert!(old.check().unwrap_err().to_string().contains("feature version 0"));
        let mut nan = good.clone();
        nan.weights[3] = f64::NAN;
        assert!(nan.check().unwrap_err().to_string().contains("weights"));
        assert!(RiskModel { threshold: 1.5, ..good }.check().is_err());
    }
}
