//! VM groups: create, delete, and the scaler that keeps each group's size within its bounds and
//! at its CPU target — reactively, ahead of forecasts (predictive mode), and on schedules.
//!
//! Decisions are pure: the engine hands in the latest VM utilisation, the groups' forecasts
//! and, for each group, the highest size recommended within its stabilization window.

use std::collections::BTreeMap;

use novacron_state::{ClusterState, GroupRecord, VmRecord, VmStatus};
use novacron_types::event::{GroupCreated, GroupDeleted, GroupScaleRefused, GroupScaled};
use novacron_types::group::{ForecastNote, GroupSpec, ScalingMode};
use novacron_types::policy::{Enforcement, MaintenanceWindow, Rule};
use novacron_types::validate::Validate;
use novacron_types::{Envelope, EventKind, VmId, VmSpec};

use super::*;

/// What the scaler reads besides the state.
#[derive(Clone, Debug, Default)]
pub struct ScalingInputs {
    /// Latest CPU utilisation per VM, 0–1.
    pub vm_util: BTreeMap<VmId, f64>,
    /// Per group: the forecast of its members' mean CPU.
    pub forecasts: BTreeMap<String, ForecastNote>,
    /// Per group: the highest size recommended within its stabilization window.
    pub stable_desired: BTreeMap<String, u32>,
}

fn name_ok(n: &str) -> bool {
    !n.is_empty() && n.len() <= 63 && n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// A forecast of a group's load — the sum of its members' CPU utilisation as a share of its
/// maximum size (`point`, 0–1), which does not change when the group does — with its 90 % interval: the 90th percentile
/// of the model's past one-step errors (`residuals`, CPU-% points; 10 points until five are
/// known), widened with the square root of the horizon.
#[must_use]
pub fn forecast_note(
    model: String,
    point: f64,
    residuals: &[f64],
    horizon: usize,
    step: std::time::Duration,
) -> ForecastNote {
    let mut r = residuals.to_vec();
    r.sort_by(f64::total_cmp);
    let q = if r.len() < 5 { 10.0 } else { r[(r.len() - 1) * 9 / 10] } / 100.0 * (horizon as f64).sqrt();
    ForecastNote {
        model,
        horizon_steps: u32::try_from(horizon).unwrap_or(u32::MAX),
        step_s: step.as_secs(),
        point,
        lower: (point - q).max(0.0),
        upper: (point + q).min(1.0),
    }
}

/// Checks a group spec.
///
/// # Errors
/// [`Refusal::Invalid`] naming the field.
pub fn validate_group(spec: &GroupSpec) -> Result<(), Refusal> {
    let bad = |field: &str, reason: String| Err(Refusal::Invalid { field: field.into(), reason });
    if !name_ok(&spec.name) {
        return bad("name", format!("{:?} must be 1 to 63 characters of a-z, 0-9 and '-'", spec.name));
    }
    if spec.min > spec.max {
        return bad("min", format!("min {} is above max {}", spec.min, spec.max));
    }
    if spec.max > 10_000 {
        return bad("max", "at most 10000 members".into());
    }
    if !(spec.target_cpu.is_finite() && spec.target_cpu > 0.0 && spec.target_cpu <= 1.0) {
        return bad("target_cpu", format!("{} must be in (0, 1]", spec.target_cpu));
    }
    for (i, s) in spec.schedules.iter().enumerate() {
        let w = MaintenanceWindow { days: s.days.clone(), start: s.start.clone(), end: s.end.clone() };
        if novacron_policy::observe::week_ranges(&w).is_empty() {
            return bad(
                &format!("schedules[{i}]"),
                format!("start {:?} and end {:?} must be HH:MM (UTC)", s.start, s.end),
            );
        }
        if s.min > spec.max {
            return bad(&format!("schedules[{i}].min"), format!("{} is above max {}", s.min, spec.max));
        }
    }
    member_spec(spec, 1).validate().map_err(|e| Refusal::Invalid { field: e.field, reason: e.reason })?;
    Ok(())
}

fn member_spec(spec: &GroupSpec, n: u64) -> VmSpec {
    VmSpec {
        name: format!("{}-{n}", spec.name),
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        disk_gib: spec.disk_gib,
        group: Some(spec.name.clone()),
        labels: spec.labels.clone(),
        restart: spec.restart,
        placement: spec.placement.clone(),
    }
}

/// A new group (`GroupCreated`); the scaler's next pass brings it to its minimum.
///
/// # Errors
/// An invalid spec, or a group of that name already exists.
pub fn create_group(
    state: &ClusterState,
    spec: GroupSpec,
    stamp: &mut impl Stamp,
    origin: &Origin,
) -> Result<(String, Vec<Envelope>), Refusal> {
    validate_group(&spec)?;
    if state.groups.contains_key(&spec.name) {
        return Err(Refusal::Conflict(format!("group {} already exists", spec.name)));
    }
    let name = spec.name.clone();
    Ok((name, vec![envelope(stamp, origin, EventKind::GroupCreated(GroupCreated { spec }))]))
}

/// Deletes a group and every member.
///
/// # Errors
/// No such group.
pub fn delete_group(
    state: &ClusterState,
    name: &str,
    stamp: &mut impl Stamp,
    origin: &Origin,
) -> Result<(String, Vec<Envelope>), Refusal> {
    if !state.groups.contains_key(name) {
        return Err(Refusal::NotFound(format!("group {name}")));
    }
    let mut events = vec![envelope(stamp, origin, EventKind::GroupDeleted(GroupDeleted { group: name.to_owned() }))];
    for vm in members(state, name) {
        if let Ok((_, ev)) = delete_vm(state, &vm.id.to_string(), stamp, origin) {
            events.extend(ev);
        }
    }
    Ok((name.to_owned(), events))
}

/// A group's live members (not deleted, no deletion asked), oldest first.
#[must_use]
pub fn members<'a>(state: &'a ClusterState, group: &str) -> Vec<&'a VmRecord> {
    let mut m: Vec<&VmRecord> = state
        .vms
        .values()
        .filter(|v| v.spec.group.as_deref() == Some(group) && v.status != VmStatus::Deleted && !v.delete_requested)
        .collect();
    m.sort_by_key(|v| (v.requested_at_ms, v.id));
    m
}

/// The bounds and target in force for a group now: its own, raised by open schedules (its own
/// and its scaling policies'), and narrowed by the hard scaling policies about it.
#[must_use]
pub fn bounds(state: &ClusterState, g: &GroupRecord, now_ms: u64) -> (u32, u32, f64) {
    let spec = &g.spec;
    let (mut min, mut max, mut target) = (spec.min, spec.max, spec.target_cpu);
    let open = |s: &novacron_types::group::ScheduledSize| {
        let w = MaintenanceWindow { days: s.days.clone(), start: s.start.clone(), end: s.end.clone() };
        novacron_policy::observe::window_open_at(&w, now_ms)
    };
    for s in spec.schedules.iter().filter(|s| open(s)) {
        min = min.max(s.min);
    }
    for sc in scaling_policies(state, &spec.name) {
        min = min.max(sc.min);
        max = max.min(sc.max);
        if let Some(t) = sc.target_cpu {
            target = t;
        }
        for s in sc.schedules.iter().filter(|s| open(s)) {
            min = min.max(s.min);
        }
    }
    (min.min(max), max, target)
}

/// The hard scaling policies in force about a group.
fn scaling_policies<'a>(state: &'a ClusterState, group: &str) -> Vec<&'a novacron_types::policy::ScalingPolicy> {
    novacron_policy::enforce::in_force(state)
        .into_iter()
        .filter(|p| p.enforcement == Enforcement::Hard && p.scope.group.as_deref() == Some(group))
        .filter_map(|p| match &p.rule {
            Rule::Scaling(sc) => Some(sc),
            _ => None,
        })
        .collect()
}

/// A group's cooldowns (scale-up, scale-down, seconds): its own, lengthened by its scaling
/// policies'.
#[must_use]
pub fn cooldowns(state: &ClusterState, g: &GroupRecord) -> (u64, u64) {
    let (mut up, mut down) = (g.spec.scale_up_cooldown_s, g.spec.scale_down_cooldown_s);
    let secs = |d: &Option<String>| d.as_deref().and_then(|d| humantime::parse_duration(d).ok()).map(|d| d.as_secs());
    for sc in scaling_policies(state, &g.spec.name) {
        up = up.max(secs(&sc.scale_up_cooldown).unwrap_or(0));
        down = down.max(secs(&sc.scale_down_cooldown).unwrap_or(0));
    }
    (up, down)
}

/// The size target tracking asks for: members × utilisation / target, rounded up, within the
/// bounds; `None` without telemetry from any member.
#[must_use]
pub fn reactive_size(n: u32, observed: Option<f64>, target: f64, min: u32, max: u32) -> Option<u32> {
    let u = observed?;
    // Within the tolerance of the target, the size is right (no flapping on noise).
    if n > 0 && (u / target - 1.0).abs() <= TOLERANCE {
        return Some(n.clamp(min, max));
    }
    let want = if n == 0 { min } else { (f64::from(n) * u / target - 1e-9).ceil().max(0.0) as u32 };
    Some(want.clamp(min, max))
}

/// How far from the target (as a share of it) utilisation may be before the size changes — the
/// same 10 % as Kubernetes' horizontal autoscaler.
pub const TOLERANCE: f64 = 0.1;

/// One scaling pass over every group.
pub fn scale_groups(
    state: &ClusterState,
    inputs: &ScalingInputs,
    planning: &Planning,
    stamp: &mut impl Stamp,
    origin: &Origin,
) -> Vec<Envelope> {
    let mut events = Vec::new();
    let now = stamp.now_ms();
    for g in state.groups.values() {
        let name = &g.spec.name;
        let members = members(state, name);
        let n = u32::try_from(members.len()).unwrap_or(u32::MAX);
        let (min, max, target) = bounds(state, g, now);
        let utils: Vec<f64> = members.iter().filter_map(|v| inputs.vm_util.get(&v.id).copied()).collect();
        let observed = (!utils.is_empty()).then(|| utils.iter().sum::<f64>() / utils.len() as f64);
        let reactive = reactive_size(n, observed, target, min, max);
        let forecast = inputs.forecasts.get(name);
        let predicted = forecast.map(|f| {
            // The forecast is the group's load as a share of its maximum size: enough members
            // to keep the expected load at the target and the likely worst (the interval's
            // upper bound) below full utilisation.
            let need = (f.point / target).max(f.upper) * f64::from(g.spec.max);
            // Within the tolerance of the current size, the forecast asks for no change.
            if n > 0 && (need / f64::from(n) - 1.0).abs() <= TOLERANCE {
                return n.clamp(min, max);
            }
            let want = (need - 1e-9).ceil().max(0.0) as u32;
            want.clamp(min, max)
        });
        let since = |t: Option<u64>| t.map(|t| now.saturating_sub(t) / 1000);
        let (up_cooldown, down_cooldown) = cooldowns(state, g);
        let up_ok = since(g.last_up_ms).is_none_or(|s| s >= up_cooldown);
        let down_ok = since(g.last_down_ms).is_none_or(|s| s >= down_cooldown)
            && since(g.last_up_ms).is_none_or(|s| s >= down_cooldown);
        let pct = |u: f64| format!("{:.0} %", u * 100.0);
        let mut decision: Option<(u32, String, Option<ForecastNote>)> = None;
        if n < min {
            decision = Some((min, format!("{n} members, below the minimum {min}"), None));
        } else if n > max {
            decision = Some((max, format!("{n} members, above the maximum {max}"), None));
        } else {
            let up_reactive = reactive.filter(|r| *r > n);
            let up_predicted = predicted.filter(|p| *p > n && g.spec.mode == ScalingMode::Predictive);
            if up_ok && (up_reactive.is_some() || up_predicted.is_some()) {
                let to = up_reactive.unwrap_or(n).max(up_predicted.unwrap_or(n));
                let why = if up_predicted.is_some_and(|p| p >= up_reactive.unwrap_or(0)) {
                    let (p, u) = forecast.map_or((0.0, 0.0), |f| (f.point, f.upper));
                    format!(
                        "forecast load {} of the group at its maximum (upper 90 % bound {}): {} members run it at target {}",
                        pct(p),
                        pct(u),
                        up_predicted.unwrap_or(n),
                        pct(target)
                    )
                } else {
                    format!("mean CPU {} above target {}", pct(observed.unwrap_or(0.0)), pct(target))
                };
                let note = if up_predicted.is_some() { forecast.cloned() } else { None };
                decision = Some((to, why, note));
            } else if let Some(r) = reactive.filter(|r| *r < n)
                && down_ok
            {
                // Never below what the stabilization window still recommends. In predictive
                // mode, not at all while the forecast still needs more than that: the group
                // holds until forecast and observation agree, then shrinks in one step (a
                // forecast never shrinks a group, and shrinking towards a decaying forecast
                // would be a staircase of small scale-downs).
                let needed = predicted.filter(|_| g.spec.mode == ScalingMode::Predictive).unwrap_or(0);
                let stable = inputs.stable_desired.get(name).copied().unwrap_or(r).max(r).max(min);
                if stable < n && needed <= stable {
                    let why = format!(
                        "mean CPU {} below target {} (the highest size recommended within {} s is {stable})",
                        pct(observed.unwrap_or(0.0)),
                        pct(target),
                        g.spec.stabilization_s
                    );
                    decision = Some((stable, why, None));
                }
            }
        }
        let base = |to: u32, reason: String, forecast: Option<ForecastNote>, only: bool| GroupScaled {
            group: name.clone(),
            from: n,
            to,
            recommendation_only: only,
            reason,
            observed_cpu: observed,
            target_cpu: target,
            forecast,
            min,
            max,
            since_last_up_s: since(g.last_up_ms),
            since_last_down_s: since(g.last_down_ms),
            policy_version: (state.policy_version > 0).then_some(state.policy_version),
            created: Vec::new(),
            removed: Vec::new(),
        };
        if decision.is_none()
            && g.spec.mode == ScalingMode::ForecastOnly
            && let (Some(p), Some(f)) = (predicted, forecast)
            && p != n
            && g.last_recommendation != Some(p)
        {
            let why = format!(
                "forecast load {} of the group at its maximum (upper 90 % bound {}): {p} members at target {}, not acted on",
                pct(f.point),
                pct(f.upper),
                pct(target)
            );
            events.push(envelope(stamp, origin, EventKind::GroupScaled(base(p, why, Some(f.clone()), true))));
            continue;
        }
        let Some((to, reason, note)) = decision else { continue };
        if to > n {
            let specs: Vec<VmSpec> = (0..u64::from(to - n)).map(|i| member_spec(&g.spec, g.next_member + i)).collect();
            let (results, created) = create_vm_groups(state, &[(specs, origin.clone())], planning, stamp);
            match results.into_iter().next() {
                Some(Ok(ids)) => {
                    let mut scaled = base(to, reason, note, false);
                    scaled.created = ids;
                    events.push(envelope(stamp, origin, EventKind::GroupScaled(scaled)));
                    events.extend(created);
                }
                Some(Err(refusal)) => {
                    // Recorded once per wanted size and reason (the next passes retry quietly).
                    let refusal = refusal.to_string();
                    if g.last_refusal.as_ref() != Some(&(to, refusal.clone())) {
                        tracing::warn!(group = %name, %refusal, wanted = to, "cannot grow the group");
                        let refused = GroupScaleRefused {
                            group: name.clone(),
                            from: n,
                            wanted: to,
                            reason,
                            refusal,
                            policy_version: (state.policy_version > 0).then_some(state.policy_version),
                        };
                        events.push(envelope(stamp, origin, EventKind::GroupScaleRefused(refused)));
                    }
                }
                None => {}
            }
        } else {
            // Shrink: members that do not run first, then the newest.
            let mut order: Vec<&VmRecord> = members.clone();
            order.sort_by_key(|v| (v.status == VmStatus::Running, std::cmp::Reverse((v.requested_at_ms, v.id))));
            let mut scaled = base(to, reason, note, false);
            let mut deletions = Vec::new();
            for vm in order.into_iter().take((n - to) as usize) {
                if let Ok((id, ev)) = delete_vm(state, &vm.id.to_string(), stamp, origin) {
                    scaled.removed.push(id);
                    deletions.extend(ev);
                }
            }
            events.push(envelope(stamp, origin, EventKind::GroupScaled(scaled)));
            events.extend(deletions);
        }
    }
    events
}
