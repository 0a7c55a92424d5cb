//! `novacron bench consolidate`: the consolidation planner on vector bin packing instances with
//! known optima (VPSolver `.vbp` files and a tab-separated `instance_name, LB, OPT, …` file).
//!
//! Every packing is checked here, from scratch, before it counts. The gap of an instance is
//! `(bins − OPT) / OPT`; the means cover the instances whose optimum is proven (`OPT ≥ 1`), the
//! others are reported against their lower bound. When the optima file has a `best_overall`
//! column (the best of ~100 classical heuristics), its mean gap over the same instances is
//! printed alongside, as is first fit decreasing's, computed in this run. Weights may be negative
//! (the Triplet/Caprara generator emits a few); capacities must be positive.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use novacron_scheduler::packing::{self, Limits, Problem};
use serde_json::{Value, json};

#[derive(Args, Debug, Clone)]
pub struct ConsolidateArgs {
    /// Folder searched recursively for `.vbp` instances.
    #[arg(long)]
    instances: PathBuf,
    /// Tab-separated file with a header naming `instance_name`, `LB` and `OPT` (-1: unknown),
    /// and optionally `best_overall`.
    #[arg(long)]
    optima: PathBuf,
    /// Time allowed per instance; the search stops earlier at the lower bound.
    #[arg(long, default_value_t = 1000)]
    time_limit_ms: u64,
    /// Take every K-th instance (sorted by path) for a quicker, still spread-out sample.
    #[arg(long, default_value_t = 1)]
    every: usize,
    /// Instances solved at once (one thread each).
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

/// One instance: a name, a problem.
struct Instance {
    name: String,
    dims: usize,
    problem: Problem,
}

/// Parses VPSolver's `.vbp`: `d`; `d` capacities; `m`; then `m` lines of `d` weights and a demand.
fn parse_vbp(path: &Path) -> anyhow::Result<Instance> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut tokens = text.split_whitespace().enumerate();
    let mut next = |what: &str| -> anyhow::Result<i64> {
        let (i, t) = tokens.next().with_context(|| format!("{}: ends before {what}", path.display()))?;
        t.parse().with_context(|| format!("{}: token {} ({t:?}) is not {what}", path.display(), i + 1))
    };
    let dims = next("the number of dimensions")?;
    if !(1..=64).contains(&dims) {
        bail!("{}: {dims} dimensions (1-64 supported)", path.display());
    }
    let dims = dims as usize;
    let capacity = (0..dims).map(|_| next("a capacity")).collect::<anyhow::Result<Vec<i64>>>()?;
    if capacity.iter().any(|&c| c <= 0) {
        bail!("{}: capacities must be positive, got {capacity:?}", path.display());
    }
    let kinds = next("the number of item types")?;
    if kinds < 0 {
        bail!("{}: {kinds} item types", path.display());
    }
    let mut items = Vec::new();
    for k in 0..kinds {
        let w = (0..dims).map(|_| next("an item weight")).collect::<anyhow::Result<Vec<i64>>>()?;
        let demand = next("an item demand")?;
        if w.iter().zip(&capacity).any(|(w, c)| w > c) {
            bail!("{}: item type {} is larger than a bin", path.display(), k + 1);
        }
        if !(0..=1_000_000 - items.len() as i64).contains(&demand) {
            bail!("{}: item type {} has demand {demand} (0 to 1,000,000 items in all)", path.display(), k + 1);
        }
        items.extend(std::iter::repeat_n(w, usize::try_from(demand)?));
    }
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(Instance { name, dims, problem: Problem::identical(capacity, items) })
}

#[derive(Clone, Copy, Debug)]
struct Known {
    lb: i64,
    opt: i64,
    best_overall: Option<i64>,
}

fn parse_optima(path: &Path) -> anyhow::Result<HashMap<String, Known>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines.next().with_context(|| format!("{}: empty", path.display()))?;
    let cols: Vec<&str> = header.split('\t').map(str::trim).collect();
    let col = |name: &str| cols.iter().position(|c| c.eq_ignore_ascii_case(name));
    let (Some(name_col), Some(lb_col), Some(opt_col)) = (col("instance_name"), col("LB"), col("OPT")) else {
        bail!("{}: the header must name instance_name, LB and OPT (tab-separated); it is {header:?}", path.display());
    };
    let best_col = col("best_overall");
    let mut out = HashMap::new();
    for (i, line) in lines {
        let f: Vec<&str> = line.split('\t').map(str::trim).collect();
        let field = |c: usize| -> anyhow::Result<i64> {
            let v = f.get(c).with_context(|| format!("{}:{}: too few columns", path.display(), i + 1))?;
            v.parse().with_context(|| format!("{}:{}: {v:?} is not a number", path.display(), i + 1))
        };
        let name = f.get(name_col).with_context(|| format!("{}:{}: no name", path.display(), i + 1))?;
        let known = Known { lb: field(lb_col)?, opt: field(opt_col)?, best_overall: best_col.map(field).transpose()? };
        out.insert((*name).to_owned(), known);
    }
    Ok(out)
}

fn find_vbp(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            find_vbp(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "vbp") {
            out.push(path);
        }
    }
    Ok(())
}

fn solve(inst: &Instance, known: Known, time_limit: Duration) -> anyhow::Result<Value> {
    let p = &inst.problem;
    let ffd = packing::first_fit_decreasing(p).context("first fit decreasing found no packing")?;
    let ffd_bins = p.check(&ffd).map_err(|e| anyhow::anyhow!("{}: FFD packing infeasible: {e}", inst.name))?;
    let lb = p.lower_bound().max(usize::try_from(known.lb).unwrap_or(0));
    let started = Instant::now();
    let limits = Limits {
        max_steps: u64::MAX,
        steps_per_attempt: 20 * p.items.len() as u64 + 1_000,
        // Stop a little early so that the last step and the checks stay inside the limit.
        deadline: Some(started + time_limit.mul_f64(0.98)),
        target_bins: if known.opt > 0 { usize::try_from(known.opt)? } else { lb },
        seed: 1,
    };
    let packing = packing::consolidate(p, None, &limits).context("the planner found no packing")?;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let bins = p.check(&packing.bin_of).map_err(|e| anyhow::anyhow!("{}: packing infeasible: {e}", inst.name))?;
    Ok(json!({
        "name": inst.name,
        "items": p.items.len(),
        "dims": inst.dims,
        "lb": lb,
        "opt": (known.opt > 0).then_some(known.opt),
        "best_overall": known.best_overall,
        "bins": bins,
        "ffd_bins": ffd_bins,
        "ms": (ms * 1000.0).round() / 1000.0,
        "steps": packing.steps,
    }))
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

pub fn run(a: &ConsolidateArgs) -> anyhow::Result<Value> {
    let optima = parse_optima(&a.optima)?;
    let mut paths = Vec::new();
    find_vbp(&a.instances, &mut paths)?;
    paths.sort();
    let paths: Vec<PathBuf> = paths.into_iter().step_by(a.every.max(1)).collect();
    if paths.is_empty() {
        bail!("no .vbp files under {}", a.instances.display());
    }
    let mut jobs = Vec::new();
    let mut skipped = Vec::new();
    for path in &paths {
        let inst = parse_vbp(path)?;
        match optima.get(&inst.name) {
            Some(&k) => jobs.push((inst, k)),
            None => skipped.push(inst.name),
        }
    }
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, anyhow::Result<Value>)>> = Mutex::new(Vec::new());
    let limit = Duration::from_millis(a.time_limit_ms);
    std::thread::scope(|s| {
        for _ in 0..a.threads.max(1) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((inst, k)) = jobs.get(i) else { break };
                    let r = solve(inst, *k, limit);
                    results.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((i, r));
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    results.sort_by_key(|(i, _)| *i);
    let per_instance: Vec<Value> = results.into_iter().map(|(_, r)| r).collect::<anyhow::Result<_>>()?;

    let (mut gaps, mut ffd_gaps, mut best_gaps, mut lb_gaps, mut ms) = (vec![], vec![], vec![], vec![], vec![]);
    let mut at_opt = 0;
    let mut better_than_best = 0;
    let mut worse_than_best = 0;
    for r in &per_instance {
        let bins = r["bins"].as_f64().unwrap_or(0.0);
        ms.push(r["ms"].as_f64().unwrap_or(0.0));
        match r["opt"].as_f64() {
            Some(opt) => {
                gaps.push((bins - opt) / opt);
                ffd_gaps.push((r["ffd_bins"].as_f64().unwrap_or(0.0) - opt) / opt);
                if bins <= opt {
                    at_opt += 1;
                }
                if let Some(b) = r["best_overall"].as_f64() {
                    best_gaps.push((b - opt) / opt);
                }
            }
            None => {
                let lb = r["lb"].as_f64().unwrap_or(1.0);
                lb_gaps.push((bins - lb) / lb);
            }
        }
        if let Some(b) = r["best_overall"].as_f64() {
            if bins < b {
                better_than_best += 1;
            } else if bins > b {
                worse_than_best += 1;
            }
        }
    }
    let max_ms = ms.iter().copied().fold(0.0, f64::max);
    Ok(json!({
        "instances": per_instance.len(),
        "with_known_opt": gaps.len(),
        "at_opt": at_opt,
        "mean_gap_to_opt": mean(&gaps),
        "ffd_mean_gap_to_opt": mean(&ffd_gaps),
        "best_classical_mean_gap_to_opt": mean(&best_gaps),
        "fewer_bins_than_best_classical": better_than_best,
        "more_bins_than_best_classical": worse_than_best,
        "without_opt_mean_gap_to_lb": mean(&lb_gaps),
        "mean_ms_per_instance": mean(&ms),
        "max_ms_per_instance": max_ms,
        "time_limit_ms": a.time_limit_ms,
        "skipped_without_optimum": skipped,
        "per_instance": per_instance,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vbp_files_and_optima_parse_and_bad_ones_say_where() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = dir.path().join("t_6_2_0.vbp");
        std::fs::write(&good, "2\n100 100\n3\n60 10 2\n10 60 2\n30 30 1\n").expect("write");
        let inst = parse_vbp(&good).expect("parses");
        assert_eq!((inst.name.as_str(), inst.dims, inst.problem.items.len()), ("t_6_2_0", 2, 5));
        assert_eq!(inst.problem.items[1], vec![60, 10]);
        let bad = dir.path().join("bad.vbp");
        std::fs::write(&bad, "2\n100 x\n").expect("write");
        let err = format!("{:#}", parse_vbp(&bad).err().expect("fails"));
        assert!(err.contains("bad.vbp") && err.contains("token 3"), "{err}");
        std::fs::write(&bad, "-2\n").expect("write");
        assert!(format!("{:#}", parse_vbp(&bad).err().expect("fails")).contains("bad.vbp: -2 dimensions"));
        std::fs::write(&bad, "1\n10\n-1\n").expect("write");
        assert!(format!("{:#}", parse_vbp(&bad).err().expect("fails")).contains("-1 item types"));
        let big = dir.path().join("big.vbp");
        std::fs::write(&big, "1\n10\n1\n11 1\n").expect("write");
        assert!(format!("{:#}", parse_vbp(&big).err().expect("fails")).contains("larger than a bin"));

        let optima = dir.path().join("opt.csv");
        std::fs::write(&optima, "instance_name\tLB\tOPT\tbest_overall\nt_6_2_0\t3\t3\t3\nu\t2\t-1\t4\n")
            .expect("write");
        let o = parse_optima(&optima).expect("parses");
        assert_eq!((o["t_6_2_0"].opt, o["u"].opt, o["u"].best_overall), (3, -1, Some(4)));
        std::fs::write(&optima, "name\tLB\n").expect("write");
        assert!(format!("{:#}", parse_optima(&optima).expect_err("fails")).contains("instance_name"));
    }

    #[test]
    fn a_run_checks_and_scores_every_instance() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Pairs (60,10)+(10,60) fill a bin each: optimum 3 for three of each.
        std::fs::write(dir.path().join("pairs.vbp"), "2\n100 100\n2\n60 10 3\n10 60 3\n").expect("write");
        std::fs::write(dir.path().join("orphan.vbp"), "1\n10\n1\n5 2\n").expect("write");
        let optima = dir.path().join("opt.tsv");
        std::fs::write(&optima, "instance_name\tLB\tOPT\npairs\t3\t3\n").expect("write");
        let args = ConsolidateArgs { instances: dir.path().into(), optima, time_limit_ms: 500, every: 1, threads: 2 };
        let r = run(&args).expect("runs");
        assert_eq!(r["instances"], 1);
        assert_eq!(r["at_opt"], 1);
        assert_eq!(r["mean_gap_to_opt"], 0.0);
        assert_eq!(r["skipped_without_optimum"], json!(["orphan"]));
        assert_eq!(r["per_instance"][0]["bins"], 3);
    }
}
