//! `novacron models evaluate` and `novacron data generate`: the forecasters measured on real
//! traces against the naive baselines, and synthetic telemetry.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use novacron_predict::eval::{Report, evaluate};
use novacron_predict::generate::{GenConfig, generate};
use novacron_predict::model::{Forecaster, GlobalGbdt, GlobalLinear};
use novacron_predict::series::{Series, read_trace, to_wide_csv};
use novacron_predict::train::{GbdtConfig, Split, TrainConfig, train_global_gbdt, train_global_linear};
use serde_json::{Value, json};

use crate::{Format, output};

#[derive(Args, Debug, Clone)]
pub struct EvaluateArgs {
    /// Trace files (gzip or plain CSV): wide `step,<series>…` (Azure, `data generate`) or rows
    /// `vm,t000,…` (PlanetLab).
    #[arg(long = "data", required = true)]
    data: Vec<PathBuf>,
    /// Horizons in 5-minute steps.
    #[arg(long, value_delimiter = ',', default_value = "1,12")]
    horizons: Vec<usize>,
    /// Horizons as durations, multiples of 5 minutes (`--horizon 1h`); replaces --horizons.
    #[arg(long = "horizon", value_delimiter = ',', value_parser = humantime::parse_duration)]
    horizon: Vec<std::time::Duration>,
    /// Share of each series (its end) used as test.
    #[arg(long, default_value_t = 0.2)]
    test_share: f64,
    /// Share before the test used for validation (model choice, intervals, early stopping).
    #[arg(long, default_value_t = 0.2)]
    val_share: f64,
    /// Use at most this many series (the first ones), for a quick look.
    #[arg(long)]
    max_series: Option<usize>,
    /// Training origins sampled per series and horizon for the global model.
    #[arg(long, default_value_t = 120)]
    train_origins: usize,
    /// Training samples per horizon for the boosted-trees model (`global-gbdt`), drawn evenly
    /// across series (at least 50 per series); 0 leaves that model out.
    #[arg(long, default_value_t = 200_000)]
    gbdt_samples: usize,
    /// Seed of the training.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Robustness: add Gaussian noise of this standard deviation (CPU-% points) to what the
    /// models see at evaluation (scored against the true values).
    #[arg(long, default_value_t = 0.0)]
    noise: f64,
    /// Robustness: drop this share of the points the models see at evaluation.
    #[arg(long, default_value_t = 0.0)]
    drop: f64,
}

/// The horizons asked for, in steps.
fn horizon_steps(a: &EvaluateArgs) -> anyhow::Result<Vec<usize>> {
    if a.horizon.is_empty() {
        return Ok(a.horizons.clone());
    }
    a.horizon
        .iter()
        .map(|d| {
            let s = d.as_secs();
            if s == 0 || s % 300 != 0 {
                bail!("--horizon {}: must be a multiple of 5 minutes", humantime::format_duration(*d));
            }
            Ok((s / 300) as usize)
        })
        .collect()
}

fn load(a: &EvaluateArgs) -> anyhow::Result<Vec<Series>> {
    let mut all = Vec::new();
    for p in &a.data {
        all.extend(read_trace(p)?);
    }
    if let Some(m) = a.max_series {
        all.truncate(m);
    }
    if all.is_empty() {
        bail!("no series in {:?}", a.data);
    }
    Ok(all)
}

/// Trains the global model on the training parts and evaluates everything on the test parts.
pub fn evaluate_cmd(a: &EvaluateArgs, fmt: Format) -> anyhow::Result<()> {
    let mut a = EvaluateArgs { horizons: horizon_steps(a)?, horizon: Vec::new(), data: a.data.clone(), ..*a };
    a.horizons.sort_unstable();
    a.horizons.dedup();
    let a = &a;
    if !(0.0..1.0).contains(&a.test_share) || !(0.0..1.0).contains(&a.val_share) || a.test_share + a.val_share >= 0.9 {
        bail!("--test-share and --val-share must be in [0, 1) and leave at least 10 % for training");
    }
    if a.horizons.is_empty() || a.horizons.contains(&0) {
        bail!("--horizons must be steps of at least 1");
    }
    let series = load(a)?;
    let splits: Vec<Split> =
        series.iter().map(|s| Split::fractions(s.values.len(), a.val_share, a.test_share)).collect();
    let started = std::time::Instant::now();
    let cfg = TrainConfig { origins_per_series: a.train_origins, seed: a.seed, ..TrainConfig::default() };
    let fits = train_global_linear(&series, &splits, &a.horizons, &cfg);
    let trained = started.elapsed();
    let linear: Box<dyn Forecaster> =
        Box::new(GlobalLinear::new(fits.iter().map(|f| (f.horizon, f.weights)).collect()));
    let started_gbdt = std::time::Instant::now();
    let gbdt_cfg = GbdtConfig { max_samples: a.gbdt_samples, seed: a.seed, ..GbdtConfig::default() };
    let gbdt = if a.gbdt_samples == 0 {
        Vec::new()
    } else {
        train_global_gbdt(&series, &splits, &a.horizons, &gbdt_cfg)
            .map_err(|e| anyhow::anyhow!("training the boosted-trees model: {e}"))?
    };
    let trained_gbdt = started_gbdt.elapsed();
    let mut extra = vec![linear.fresh()];
    if !gbdt.is_empty() {
        extra.push(Box::new(GlobalGbdt::new(gbdt.iter().map(|f| (f.horizon, f.model.clone())).collect())));
    }
    let started = std::time::Instant::now();
    if !(a.noise.is_finite() && a.noise >= 0.0 && (0.0..1.0).contains(&a.drop)) {
        bail!("--noise must be a non-negative number and --drop a share in [0, 1)");
    }
    let perturbation = (a.noise > 0.0 || a.drop > 0.0).then_some(novacron_predict::eval::Perturbation {
        noise_sd: a.noise,
        missing: a.drop,
        seed: a.seed,
    });
    // Inference cost of the trained model alone: one update and one forecast per step, over
    // every series (measured apart from the evaluation, which walks every candidate).
    let inference_ns = |model: &dyn Forecaster| {
        let clock = std::time::Instant::now();
        let mut steps = 0u64;
        let mut sink = 0.0;
        for s in &series {
            let mut m = model.fresh();
            for x in &s.values {
                m.observe(*x);
                sink += m.forecast(a.horizons[0]);
                steps += 1;
            }
        }
        std::hint::black_box(sink);
        clock.elapsed().as_nanos() as f64 / steps.max(1) as f64
    };
    let linear_ns = inference_ns(linear.as_ref());
    let gbdt_ns = extra.get(1).map(|m| inference_ns(m.as_ref()));
    let report = novacron_predict::eval::evaluate_with(&series, &splits, &a.horizons, &extra, perturbation);
    let evaluated = started.elapsed();
    let forecasts: u64 = report.horizons.values().flatten().map(|m| m.scores.forecasts).sum();
    // Per horizon, the summary `{horizon_steps, series, best_naive, models: […]}`; the first
    // (or only) horizon's is also at the top level.
    let summaries: Vec<Value> = report
        .horizons
        .iter()
        .map(|(h, rows)| {
            json!({
                "horizon_steps": h,
                "series": report.series,
                "best_naive": report.best_naive.get(h),
                // Oracles that read the test part: how much a forecast of the level could gain.
                "hindsight": report.hindsight.get(h),
                "models": rows.iter().map(|m| json!({
                    "name": m.model, "mae": m.scores.mae, "rmse": m.scores.rmse, "mase": m.scores.mase,
                    "mape": m.scores.mape, "coverage": m.scores.coverage, "within_10pp": m.scores.within_10pp,
                    "win_rate_vs_best_naive": m.win_rate_vs_best_naive, "forecasts": m.scores.forecasts,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let first = summaries.first().cloned().unwrap_or(Value::Null);
    let out = json!({
        "horizon_steps": first["horizon_steps"],
        "best_naive": first["best_naive"],
        "models": first["models"],
        "per_horizon": summaries,
        "data": a.data,
        "series": series.len(),
        "split": { "test_share": a.test_share, "val_share": a.val_share },
        "perturbation": perturbation,
        "training": { "config": cfg, "horizons": fits, "seconds": trained.as_secs_f64() },
        "training_gbdt": {
            "config": gbdt_cfg,
            "horizons": gbdt.iter().map(|f| json!({
                "horizon": f.horizon, "validation_mae": f.validation_mae, "rounds": f.rounds, "samples": f.samples,
            })).collect::<Vec<_>>(),
            "seconds": trained_gbdt.as_secs_f64(),
        },
        "evaluation_seconds": evaluated.as_secs_f64(),
        "forecasts_per_sec": forecasts as f64 / evaluated.as_secs_f64().max(1e-9),
        // The trained model alone: one update and one forecast, in nanoseconds.
        "global_linear_inference_ns": linear_ns,
        "global_gbdt_inference_ns": gbdt_ns,
        "report": report,
    });
    match fmt {
        Format::Json => output::json(&out),
        Format::Text => {
            print_report(&report);
            println!(
                "{forecasts} forecasts in {:.1} s; training {:.1} s",
                evaluated.as_secs_f64(),
                trained.as_secs_f64()
            );
            Ok(())
        }
    }
}

fn print_report(r: &Report) {
    for (h, rows) in &r.horizons {
        println!("horizon {h} ({} min), {} series:", h * 5, r.series);
        let table: Vec<Vec<String>> = rows
            .iter()
            .map(|m| {
                vec![
                    m.model.clone(),
                    format!("{:.3}", m.scores.mae),
                    format!("{:.3}", m.scores.rmse),
                    format!("{:.3}", m.scores.mase),
                    format!("{:.1} %", m.scores.mape * 100.0),
                    format!("{:.1} %", m.scores.coverage * 100.0),
                    format!("{:.1} %", m.scores.within_10pp * 100.0),
                    format!("{:.1} %", m.win_rate_vs_last_value * 100.0),
                    format!("{:.1} %", m.win_rate_vs_mean_of_last_12 * 100.0),
                ]
            })
            .collect();
        output::table(
            &["model", "MAE", "RMSE", "MASE", "MAPE≥1", "cover90", "±10pp", "wins/last", "wins/mean12"],
            &table,
        );
        if let Some(t) = r.ab_tests.get(h) {
            println!(
                "A/B {} vs {}: Δ MAE {:+.3}, effect {:.2}, p = {:.2e} → {}",
                t.a, t.b, t.mean_difference, t.effect_size, t.p_value, t.recommendation
            );
        }
        if let Some(o) = r.hindsight.get(h) {
            println!(
                "hindsight, not forecasts: each series' best constant MAE {:.3}; the level of the {} steps around each target MAE {:.3}",
                o.constant_mae,
                2 * novacron_predict::eval::HINDSIGHT_NEIGHBOURS,
                o.local_level_mae
            );
        }
        println!();
    }
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Series.
    #[arg(long, default_value_t = 10)]
    series: usize,
    /// Days of 5-minute samples.
    #[arg(long, default_value_t = 14)]
    days: usize,
    /// Seed (the same seed, the same data).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Noise standard deviation, CPU-% points.
    #[arg(long, default_value_t = 3.0)]
    noise: f64,
    /// Share of points missing.
    #[arg(long, default_value_t = 0.01)]
    missing: f64,
    /// Failures per series per week.
    #[arg(long, default_value_t = 0.5)]
    failures_per_week: f64,
    /// `csv` (wide, readable by `models evaluate`) or `json`.
    #[arg(long, default_value = "csv")]
    format: String,
    /// Write here instead of standard output.
    #[arg(long = "out")]
    out: Option<PathBuf>,
}

/// Generates synthetic telemetry.
pub fn generate_cmd(a: &GenerateArgs) -> anyhow::Result<()> {
    if a.series == 0 || a.days == 0 {
        bail!("--series and --days must be at least 1");
    }
    if !(0.0..=1.0).contains(&a.missing) || !a.noise.is_finite() || a.noise < 0.0 || a.failures_per_week < 0.0 {
        bail!("--missing must be in [0, 1]; --noise and --failures-per-week must be non-negative");
    }
    let cfg = GenConfig {
        series: a.series,
        days: a.days,
        seed: a.seed,
        noise: a.noise,
        missing: a.missing,
        failures_per_week: a.failures_per_week,
        ..GenConfig::default()
    };
    let series = generate(&cfg);
    let text = match a.format.as_str() {
        "csv" => to_wide_csv(&series),
        "json" => {
            let v: Vec<Value> = series
                .iter()
                .map(|s| json!({ "name": s.name, "step_seconds": 300, "values": s.values.iter().map(|v| if v.is_nan() { Value::Null } else { json!(v) }).collect::<Vec<_>>() }))
                .collect();
            serde_json::to_string(&json!({ "config": cfg, "series": v }))? + "\n"
        }
        other => bail!("--format {other:?}: use csv or json"),
    };
    match &a.out {
        Some(p) => std::fs::write(p, text).with_context(|| format!("writing {}", p.display())),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

/// hessboost's (XGBoost's) default L2 penalty on leaf weights, which the trees train with.
const GBDT_L2: f64 = 1.0;

/// The model `models train` registers.
struct Trained {
    kind: &'static str,
    artifact: novacron_predict::model::Artifact,
    forecaster: Box<dyn Forecaster>,
    hyperparameters: Vec<Value>,
    /// (horizon, validation MAE).
    validation: Vec<(usize, f64)>,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    eval: EvaluateArgs,
}

/// The model registry's commands that need a trained artifact.
fn artifact_key(digest: &str) -> String {
    format!("sha256-{digest}")
}

async fn artifacts(nats: &str) -> anyhow::Result<novacron_eventlog::Artifacts> {
    let bus = novacron_eventlog::Bus::connect(&novacron_eventlog::BusConfig::new(nats, "novacron-cli")).await?;
    Ok(bus.model_artifacts(1).await?)
}

/// Trains the global model, scores it on held-out test data against the best baseline, stores
/// its artifact by digest and registers it (`ModelTrained`). It is not promoted.
pub async fn train_cmd(server: &str, nats: &str, a: TrainArgs, fmt: Format) -> anyhow::Result<()> {
    use sha2::Digest;
    let mut a = a.eval;
    a.horizons = horizon_steps(&a)?;
    let (sources, val_share, test_share, seed) = (a.data.clone(), a.val_share, a.test_share, a.seed);
    // Both global models are trained; the one with the lower validation error (mean over the
    // horizons) is registered. Test data only scores it.
    let (count, trained, report) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let series = load(&a)?;
        let splits: Vec<Split> =
            series.iter().map(|s| Split::fractions(s.values.len(), a.val_share, a.test_share)).collect();
        let cfg = TrainConfig { origins_per_series: a.train_origins, seed: a.seed, ..TrainConfig::default() };
        let fits = train_global_linear(&series, &splits, &a.horizons, &cfg);
        let linear_val = fits.iter().map(|f| f.validation_mae).sum::<f64>() / fits.len().max(1) as f64;
        let gcfg = GbdtConfig { max_samples: a.gbdt_samples, seed: a.seed, ..GbdtConfig::default() };
        let gbdt = if a.gbdt_samples == 0 {
            Vec::new()
        } else {
            train_global_gbdt(&series, &splits, &a.horizons, &gcfg).map_err(anyhow::Error::msg)?
        };
        let gbdt_val = gbdt.iter().map(|f| f.validation_mae).sum::<f64>() / gbdt.len().max(1) as f64;
        let trained = if !gbdt.is_empty() && gbdt_val < linear_val {
            let models: Vec<_> = gbdt.iter().map(|f| (f.horizon, f.model.clone())).collect();
            Trained {
                kind: "global-gbdt",
                artifact: novacron_predict::model::Artifact::global_gbdt(&models).map_err(anyhow::Error::msg)?,
                forecaster: Box::new(GlobalGbdt::new(models)),
                hyperparameters: gbdt
                    .iter()
                    .map(|f| json!({ "horizon": f.horizon, "learning_rate": gcfg.eta, "l2": GBDT_L2, "epochs": f.rounds }))
                    .collect(),
                validation: gbdt.iter().map(|f| (f.horizon, f.validation_mae)).collect(),
            }
        } else {
            let weights: Vec<(usize, [f64; novacron_predict::model::FEATURES])> =
                fits.iter().map(|f| (f.horizon, f.weights)).collect();
            Trained {
                kind: "global-linear",
                artifact: novacron_predict::model::Artifact::global_linear(&weights),
                forecaster: Box::new(GlobalLinear::new(weights)),
                hyperparameters: fits
                    .iter()
                    .map(|f| json!({ "horizon": f.horizon, "learning_rate": f.learning_rate, "l2": f.l2, "epochs": f.epochs }))
                    .collect(),
                validation: fits.iter().map(|f| (f.horizon, f.validation_mae)).collect(),
            }
        };
        let report = evaluate(&series, &splits, &a.horizons, &[trained.forecaster.fresh()]);
        Ok((series.len(), trained, report))
    })
    .await??;
    let kind = trained.kind;
    let artifact = serde_json::to_vec(&trained.artifact)?;
    let digest: String = sha2::Sha256::digest(&artifact).iter().map(|b| format!("{b:02x}")).collect();
    let store = artifacts(nats).await?;
    store.put(&artifact_key(&digest), &artifact).await.map_err(|e| anyhow::anyhow!("storing the artifact: {e}"))?;
    let scores: Vec<Value> = trained
        .validation
        .iter()
        .map(|&(horizon, validation_mae)| {
            let rows = &report.horizons[&horizon];
            let mae = |m: &str| rows.iter().find(|r| r.model == m).map(|r| r.scores.mae);
            let mine = rows.iter().find(|r| r.model == kind);
            let (base, base_mae) = [("last-value", mae("last-value")), ("mean-of-last-12", mae("mean-of-last-12"))]
                .into_iter()
                .filter_map(|(n, m)| m.map(|m| (n, m)))
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap_or(("last-value", f64::NAN));
            let win = mine.map_or(0.0, |m| if base == "last-value" { m.win_rate_vs_last_value } else { m.win_rate_vs_mean_of_last_12 });
            json!({
                "horizon": horizon, "validation_mae": validation_mae, "test_mae": mine.map_or(f64::NAN, |m| m.scores.mae),
                "baseline_mae": base_mae, "baseline": base, "win_rate": win,
            })
        })
        .collect();
    let record = json!({
        "model": format!("{kind}-{}", &digest[..12]),
        "kind": kind,
        "digest": digest,
        "hyperparameters": trained.hyperparameters,
        "scores": scores,
        "data": { "sources": sources, "series": count, "val_share": val_share, "test_share": test_share, "seed": seed },
    });
    let registered = crate::client::api_call(server, "POST", "/api/v1/models".into(), Some(record.clone())).await?;
    match fmt {
        Format::Json => output::json(&json!({ "registered": registered["model"], "record": record })),
        Format::Text => {
            println!("registered {} (not promoted)", registered["model"].as_str().unwrap_or_default());
            for s in record["scores"].as_array().into_iter().flatten() {
                println!(
                    "  h={}: test MAE {:.3} vs {} {:.3}, wins on {:.0} % of series",
                    s["horizon"],
                    s["test_mae"].as_f64().unwrap_or(f64::NAN),
                    s["baseline"].as_str().unwrap_or_default(),
                    s["baseline_mae"].as_f64().unwrap_or(f64::NAN),
                    s["win_rate"].as_f64().unwrap_or(0.0) * 100.0
                );
            }
            Ok(())
        }
    }
}

#[derive(Args, Debug)]
pub struct AbTestArgs {
    /// The candidate model id.
    a: String,
    /// The incumbent model id.
    b: String,
    #[command(flatten)]
    eval: EvaluateArgs,
}

/// Compares two registered models on the same series: a paired t-test of per-series test MAE.
pub async fn abtest_cmd(server: &str, nats: &str, a: AbTestArgs, fmt: Format) -> anyhow::Result<()> {
    let listed = crate::client::api_call(server, "GET", "/api/v1/models".into(), None).await?;
    let store = artifacts(nats).await?;
    let mut models = Vec::new();
    for id in [&a.a, &a.b] {
        let digest = listed["models"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["model"].as_str() == Some(id.as_str()))
            .and_then(|m| m["digest"].as_str().map(str::to_owned))
            .with_context(|| format!("no model {id} is registered"))?;
        let bytes = store
            .get(&artifact_key(&digest))
            .await
            .map_err(anyhow::Error::msg)?
            .with_context(|| format!("the artifact of {id} is missing"))?;
        let artifact: novacron_predict::model::Artifact = serde_json::from_slice(&bytes)?;
        models.push(novacron_predict::model::Named {
            name: id.clone(),
            inner: artifact.model().map_err(anyhow::Error::msg)?,
        });
    }
    let (ida, idb) = (a.a.clone(), a.b.clone());
    let mut eval = a.eval;
    eval.horizons = horizon_steps(&eval)?;
    let tests = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Value>> {
        let series = load(&eval)?;
        let splits: Vec<Split> =
            series.iter().map(|s| Split::fractions(s.values.len(), eval.val_share, eval.test_share)).collect();
        let mut out = Vec::new();
        for &h in &eval.horizons {
            let ea = novacron_predict::eval::per_series_mae(&series, &splits, h, &models[0]);
            let eb = novacron_predict::eval::per_series_mae(&series, &splits, h, &models[1]);
            let t = novacron_predict::eval::ab_test(&ida, &idb, &ea, &eb);
            out.push(json!({ "horizon": h, "test": t }));
        }
        Ok(out)
    })
    .await??;
    match fmt {
        Format::Json => output::json(&tests),
        Format::Text => {
            for t in &tests {
                let x = &t["test"];
                println!(
                    "h={}: {} vs {} over {} series: Δ MAE {:+.3}, effect {:.2}, p = {:.2e} → {}",
                    t["horizon"],
                    a.a,
                    a.b,
                    x["series"],
                    x["mean_difference"].as_f64().unwrap_or(0.0),
                    x["effect_size"].as_f64().unwrap_or(0.0),
                    x["p_value"].as_f64().unwrap_or(1.0),
                    x["recommendation"].as_str().unwrap_or_default()
                );
            }
            Ok(())
        }
    }
}

/// Prints the registry.
pub fn print_models(v: &Value, fmt: Format) -> anyhow::Result<()> {
    match fmt {
        Format::Json => output::json(v),
        Format::Text => {
            let rows: Vec<Vec<String>> = v["models"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| {
                    let scores: Vec<String> = m["scores"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|s| {
                            format!(
                                "h{}: {:.2} vs {:.2}",
                                s["horizon"],
                                s["test_mae"].as_f64().unwrap_or(f64::NAN),
                                s["baseline_mae"].as_f64().unwrap_or(f64::NAN)
                            )
                        })
                        .collect();
                    vec![
                        m["model"].as_str().unwrap_or_default().to_owned(),
                        if m["in_use"].as_bool() == Some(true) { "yes".into() } else { String::new() },
                        m["trained_at"].as_str().unwrap_or_default().to_owned(),
                        scores.join(", "),
                    ]
                })
                .collect();
            output::table(&["model", "in use", "trained", "test MAE vs baseline"], &rows);
            for (m, l) in v["live"].as_object().into_iter().flatten() {
                println!(
                    "live {m}: {} forecasts, MAE {}, drift alarms {}",
                    l["forecasts"], l["live_mae"], l["drift_alarms"]
                );
            }
            Ok(())
        }
    }
}

#[derive(Args, Debug)]
pub struct RiskArgs {
    /// The LANL failure records (CSV, gzip or plain).
    #[arg(long)]
    data: PathBuf,
    /// Train before this date (YYYY-MM-DD), test from it on.
    #[arg(long, default_value = "2003-01-01")]
    cutoff: String,
    /// The last days before the cut-off used for early stopping and calibration.
    #[arg(long, default_value_t = 180.0)]
    val_days: f64,
    /// A node is "at risk" if it fails within this many days.
    #[arg(long, default_value_t = 7.0)]
    window_days: f64,
    /// Write the trained model here (JSON) for the orchestrator's `--risk-model`.
    #[arg(long, value_name = "FILE")]
    save: Option<PathBuf>,
}

/// Trains and scores the failure-risk classifier against the ranking baselines.
pub fn risk_cmd(a: &RiskArgs, fmt: Format) -> anyhow::Result<()> {
    use novacron_predict::risk::{days_from_civil, evaluate_risk, read_lanl};
    let mut p = a.cutoff.split('-');
    let (y, m, d) = match (
        p.next().and_then(|x| x.parse().ok()),
        p.next().and_then(|x| x.parse().ok()),
        p.next().and_then(|x| x.parse().ok()),
    ) {
        (Some(y), Some(m), Some(d)) if (1..=12).contains(&m) && (1..=31).contains(&d) => (y, m, d),
        _ => bail!("--cutoff {:?} must be YYYY-MM-DD", a.cutoff),
    };
    if !(a.window_days > 0.0 && a.val_days > a.window_days) {
        bail!("--window-days must be positive and --val-days longer than it");
    }
    let fleet = read_lanl(&a.data)?;
    let started = std::time::Instant::now();
    let report = evaluate_risk(&fleet, days_from_civil(y, m, d) as f64, a.val_days, a.window_days);
    if let Some(path) = &a.save {
        let text = serde_json::to_string_pretty(&report.model)? + "\n";
        std::fs::write(path, text).with_context(|| format!("cannot write the model to {}", path.display()))?;
        eprintln!("model written to {} (use it with `novacron orchestrator --risk-model`)", path.display());
    }
    let out =
        json!({ "data": a.data, "cutoff": a.cutoff, "seconds": started.elapsed().as_secs_f64(), "report": report });
    match fmt {
        Format::Json => output::json(&out),
        Format::Text => {
            println!(
                "failure within {} days; {} / {} / {} train / validation / test node-weeks; base rate {:.2} %",
                report.window_days,
                report.rows.0,
                report.rows.1,
                report.rows.2,
                report.base_rate * 100.0
            );
            let rows: Vec<Vec<String>> = report
                .scores
                .iter()
                .map(|s| {
                    let opt = |v: Option<f64>| v.map_or_else(|| "—".to_owned(), |v| format!("{v:.3}"));
                    vec![
                        s.model.clone(),
                        format!("{:.3}", s.roc_auc),
                        format!("{:.3}", s.pr_auc),
                        opt(s.precision),
                        opt(s.recall),
                        opt(s.f1),
                        opt(s.brier),
                    ]
                })
                .collect();
            output::table(&["scorer", "ROC AUC", "PR AUC", "precision", "recall", "F1", "Brier"], &rows);
            println!(
                "lead time of the failures flagged in time: mean {:.1} days, median {:.1} days",
                report.lead_time_days.0, report.lead_time_days.1
            );
            println!(
                "calibration (predicted → observed): {}",
                report.calibration.iter().map(|(p, o, _)| format!("{:.3}→{:.3}", p, o)).collect::<Vec<_>>().join("  ")
            );
            Ok(())
        }
    }
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// A trace in any layout `models evaluate` reads (gzip or plain).
    #[arg(long = "in")]
    input: PathBuf,
    /// Where to write the long layout `series_id,timestamp,value`.
    #[arg(long)]
    out: PathBuf,
    /// Epoch seconds of each series' first step (the shared traces keep no absolute time).
    #[arg(long, default_value_t = 0)]
    start: i64,
}

/// Converts a trace to the long layout.
pub fn convert_cmd(a: &ConvertArgs) -> anyhow::Result<()> {
    let series = read_trace(&a.input)?;
    let text = novacron_predict::series::to_long_csv(&series, a.start);
    std::fs::write(&a.out, text).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!("{} series written to {}", series.len(), a.out.display());
    Ok(())
}
