//! `novacron bench scaling`: the reactive and the predictive scaler on the same real load.
//!
//! Each series of a trace (5-minute CPU %) becomes a group's demand: `value / 100 ×
//! --demand` member-equivalents of work. The group's members share it (a member's utilisation
//! is demand / running members, at most 100 %); a member created at one step serves from the
//! next (its start). The very scaler the orchestrator runs (`decide::scale_groups`) decides
//! every step from the members' utilisation — the predictive one also from the forecast of
//! exponential smoothing, as the orchestrator makes it when no model is promoted — on a
//! simulated clock. Reported per mode: steps in breach of the SLO (utilisation above
//! `--slo`), scaling actions, mean members (cost) and mean utilisation — and, since a scaler
//! that runs more members breaches less, the reactive scaler once more at the predictive
//! one's cost (`reactive_at_equal_cost`: its target lowered until it runs as many members).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use novacron_orchestrator::decide::{self, Origin, Planning, ScalingInputs, Stamp};
use novacron_predict::model::{Forecaster, Ses};
use novacron_state::{ClusterState, VmStatus};
use novacron_types::event::{HostRegistered, VmIncarnationReport};
use novacron_types::group::ScalingMode;
use novacron_types::{Actor, Envelope, EventKind, HostId, IncarnationId, Resources, VmId};
use serde_json::{Value, json};

#[derive(Args, Debug, Clone)]
pub struct ScalingArgs {
    /// The trace (any layout `models evaluate` reads).
    #[arg(long)]
    trace: PathBuf,
    /// Series of the trace to replay (the first ones).
    #[arg(long, default_value_t = 20)]
    series: usize,
    /// Demand at 100 % of the trace, in members' worth of work.
    #[arg(long, default_value_t = 8.0)]
    demand: f64,
    /// The group's target CPU.
    #[arg(long, default_value_t = 0.6)]
    target: f64,
    /// A step with members above this utilisation breaches the SLO.
    #[arg(long, default_value_t = 0.9)]
    slo: f64,
    /// Most members.
    #[arg(long, default_value_t = 20)]
    max: u32,
    /// Steps replayed per series (from its start).
    #[arg(long, default_value_t = 2016)]
    steps: usize,
    /// Smoothing weight of the predictive scaler's load model (the orchestrator uses 0.3).
    #[arg(long, default_value_t = 0.3)]
    alpha: f64,
}

/// A stamp on the simulated clock.
struct SimClock {
    now_ms: u64,
    next: u128,
}

impl Stamp for SimClock {
    fn now_ms(&mut self) -> u64 {
        self.now_ms
    }
    fn vm_id(&mut self) -> VmId {
        self.next += 1;
        VmId(uuid::Uuid::from_u128(self.next))
    }
    fn incarnation_id(&mut self) -> IncarnationId {
        self.next += 1;
        IncarnationId(uuid::Uuid::from_u128(self.next))
    }
}

fn apply(state: &mut ClusterState, events: &[Envelope]) {
    for e in events {
        let seq = state.seq + 1;
        state.apply(seq, e);
    }
}

#[derive(Default)]
struct Outcome {
    steps: u64,
    breaches: u64,
    actions: u64,
    ups: u64,
    member_steps: f64,
    util_sum: f64,
}

fn replay(values: &[f64], a: &ScalingArgs, mode: ScalingMode) -> Outcome {
    let origin = Origin { actor: Actor::Orchestrator("bench".into()), correlation: None };
    let mut state = ClusterState::default();
    let hosts: Vec<Envelope> = (0..8)
        .map(|i| {
            Envelope::new(
                0,
                origin.actor.clone(),
                EventKind::HostRegistered(HostRegistered {
                    host: HostId::new(format!("h{i}")).expect("valid"),
                    capacity: Resources { vcpus: 64, memory_mib: 65536, disk_gib: 0 },
                    labels: Default::default(),
                    driver: "sim".into(),
                }),
            )
        })
        .collect();
    apply(&mut state, &hosts);
    let spec = serde_json::from_value(json!({
        "name": "g", "min": 1, "max": a.max, "vcpus": 1, "memory_mib": 256, "target_cpu": a.target,
        "scale_up_cooldown_s": 300, "scale_down_cooldown_s": 900, "stabilization_s": 900,
        "mode": match mode { ScalingMode::Predictive => "predictive", _ => "reactive" },
    }))
    .expect("a valid group");
    let mut clock = SimClock { now_ms: 1_000_000, next: 1 };
    let (_, ev) = decide::create_group(&state, spec, &mut clock, &origin).expect("a new group");
    apply(&mut state, &ev);
    let planning = Planning::default();
    let step = Duration::from_secs(300);
    let mut model = Ses::new(a.alpha);
    let mut residuals: Vec<f64> = Vec::new();
    let mut recent: std::collections::VecDeque<u32> = std::collections::VecDeque::new();
    let mut out = Outcome::default();
    let mut last_u: Option<f64> = None;
    for (t, v) in values.iter().take(a.steps).enumerate() {
        clock.now_ms = 1_000_000 + t as u64 * 300_000;
        // Members that started last step run now.
        let starting: Vec<(VmId, HostId, IncarnationId, novacron_types::Generation)> = state
            .vms
            .values()
            .filter(|v| v.status == VmStatus::Starting)
            .filter_map(|v| Some((v.id, v.host.clone()?, v.incarnation?, v.generation)))
            .collect();
        let running_events: Vec<Envelope> = starting
            .into_iter()
            .map(|(vm, host, incarnation, generation)| {
                Envelope::new(
                    0,
                    origin.actor.clone(),
                    EventKind::VmRunning(VmIncarnationReport { vm, host, incarnation, generation }),
                )
            })
            .collect();
        apply(&mut state, &running_events);
        let members = decide::members(&state, "g");
        let running: Vec<VmId> = members.iter().filter(|v| v.status == VmStatus::Running).map(|v| v.id).collect();
        let demand = if v.is_nan() { last_u.unwrap_or(0.0) } else { v / 100.0 * a.demand };
        let u = if running.is_empty() { 1.0 } else { (demand / running.len() as f64).min(1.0) };
        last_u = Some(demand);
        out.steps += 1;
        out.member_steps += members.len() as f64;
        out.util_sum += u;
        if u > a.slo {
            out.breaches += 1;
        }
        let mut inputs = ScalingInputs { vm_util: running.iter().map(|id| (*id, u)).collect(), ..Default::default() };
        // The stabilization window (three steps) and the forecast, as the engine keeps them.
        let g = &state.groups["g"];
        let (min, max, target) = decide::bounds(&state, g, clock.now_ms);
        if let Some(r) = decide::reactive_size(u32::try_from(members.len()).unwrap_or(0), Some(u), target, min, max) {
            recent.push_back(r);
            if recent.len() > 3 {
                recent.pop_front();
            }
            inputs.stable_desired.insert("g".into(), recent.iter().copied().max().unwrap_or(r));
        }
        if mode == ScalingMode::Predictive {
            // The group's load as a share of its maximum size (as the engine samples it);
            // forecast one step ahead.
            let x = (u * running.len() as f64 / f64::from(a.max) * 100.0).min(100.0);
            let p = model.forecast(1);
            if !p.is_nan() {
                residuals.push((x - p).abs());
                if residuals.len() > 100 {
                    residuals.remove(0);
                }
            }
            model.observe(x);
            let note = decide::forecast_note(model.name(), model.forecast(1) / 100.0, &residuals, 1, step);
            inputs.forecasts.insert("g".into(), note);
        }
        let events = decide::scale_groups(&state, &inputs, &planning, &mut clock, &origin);
        for e in &events {
            if let EventKind::GroupScaled(g) = &e.event
                && !g.recommendation_only
            {
                out.actions += 1;
                if g.to > g.from {
                    out.ups += 1;
                }
            }
        }
        apply(&mut state, &events);
    }
    out
}

fn summary(o: &[Outcome]) -> Value {
    let steps: u64 = o.iter().map(|x| x.steps).sum();
    let n = steps.max(1) as f64;
    json!({
        "steps": steps,
        "slo_breach_share": o.iter().map(|x| x.breaches).sum::<u64>() as f64 / n,
        "scaling_actions": o.iter().map(|x| x.actions).sum::<u64>(),
        "scale_ups": o.iter().map(|x| x.ups).sum::<u64>(),
        "mean_members": o.iter().map(|x| x.member_steps).sum::<f64>() / n,
        "mean_utilisation": o.iter().map(|x| x.util_sum).sum::<f64>() / n,
    })
}

pub fn run(a: &ScalingArgs) -> anyhow::Result<Value> {
    if !(a.target > 0.0 && a.target < a.slo && a.slo <= 1.0 && a.demand > 0.0 && a.max >= 1) {
        bail!("need 0 < --target < --slo ≤ 1, --demand > 0 and --max ≥ 1");
    }
    let series = novacron_predict::series::read_trace(&a.trace)?;
    let series: Vec<_> = series.into_iter().take(a.series).collect();
    if series.is_empty() {
        bail!("no series in {}", a.trace.display());
    }
    let started = std::time::Instant::now();
    let run_all = |a: &ScalingArgs, mode| series.iter().map(|s| replay(&s.values, a, mode)).collect::<Vec<_>>();
    let mean_members = |o: &[Outcome]| {
        o.iter().map(|x| x.member_steps).sum::<f64>() / o.iter().map(|x| x.steps).sum::<u64>().max(1) as f64
    };
    let reactive = run_all(a, ScalingMode::Reactive);
    let predictive = run_all(a, ScalingMode::Predictive);
    // The reactive scaler at the predictive one's cost: a lower target buys it members (a
    // higher one saves some), so bisect for the target at which it runs as many on average.
    let cost = mean_members(&predictive);
    let (mut lo, mut hi) = (0.02, a.slo);
    let mut equal: Option<(f64, Vec<Outcome>)> = None;
    for _ in 0..12 {
        let t = f64::midpoint(lo, hi);
        let o = run_all(&ScalingArgs { target: t, ..a.clone() }, ScalingMode::Reactive);
        let m = mean_members(&o);
        if m > cost {
            lo = t;
        } else {
            hi = t;
        }
        // The cost is not quite monotonic in the target: keep the closest.
        if equal.as_ref().is_none_or(|(_, e)| (mean_members(e) - cost).abs() > (m - cost).abs()) {
            equal = Some((t, o));
        }
    }
    let equal = equal.map(|(t, o)| {
        let mut v = summary(&o);
        v["target"] = json!(t);
        v
    });
    Ok(json!({
        "trace": a.trace, "series": series.len(), "steps_per_series": a.steps,
        "target": a.target, "slo": a.slo, "demand": a.demand,
        "reactive": summary(&reactive),
        "predictive": summary(&predictive),
        "reactive_at_equal_cost": equal,
        "seconds": started.elapsed().as_secs_f64(),
    }))
}
