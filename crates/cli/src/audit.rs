//! Audit commands that read the log straight from JetStream — no orchestrator needed.

use anyhow::{Context, anyhow, bail};
use clap::Args;
use futures::StreamExt;
use novacron_eventlog::{Bus, BusConfig, LoggedEvent, fold_range, replay};
use novacron_protocol as proto;
use novacron_scheduler::PlannerConfig;
use novacron_scheduler::consolidation::plan_consolidation;
use novacron_scheduler::packing::Limits;
use novacron_state::ClusterState;
use serde_json::{Value, json};

use crate::Format;
use crate::output;

/// A point in the log: a stream sequence, or a time (RFC 3339).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    /// Stream sequence.
    Seq(u64),
    /// Milliseconds since the epoch.
    Time(u64),
}

fn parse_point(s: &str) -> Result<Point, String> {
    if let Ok(seq) = s.parse::<u64>() {
        return Ok(Point::Seq(seq));
    }
    let t = humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("{s:?} is neither a sequence number nor an RFC 3339 time ({e})"))?;
    let ms = t.duration_since(std::time::UNIX_EPOCH).map_err(|_| format!("{s:?} is before 1970"))?.as_millis();
    Ok(Point::Time(u64::try_from(ms).unwrap_or(u64::MAX)))
}

#[derive(Args, Debug)]
pub struct EventsArgs {
    /// First event: a sequence number or an RFC 3339 time (default: the beginning).
    #[arg(long, value_parser = parse_point)]
    since: Option<Point>,
    /// Last event: a sequence number or an RFC 3339 time (default: the end).
    #[arg(long, value_parser = parse_point)]
    until: Option<Point>,
    /// Only subjects matching this NATS filter, e.g. 'nc.events.vm.>' or 'nc.cmd.host-1.>'.
    #[arg(long)]
    subject: Option<String>,
    /// Keep printing new events as they are appended (with -o json: one JSON document per line).
    #[arg(long)]
    follow: bool,
}

#[derive(Args, Debug)]
pub struct StateArgs {
    /// Replay up to this sequence number or RFC 3339 time (default: the end of the log).
    #[arg(long, value_parser = parse_point)]
    at: Option<Point>,
}

#[derive(Args, Debug)]
pub struct ConsolidateArgs {
    /// vCPUs sold per physical vCPU (as the orchestrator's planner; `overcommit.cpu` host
    /// labels override it).
    #[arg(long, default_value_t = 1.0)]
    cpu_overcommit: f64,
    /// Memory sold per MiB (`overcommit.memory` host labels override it).
    #[arg(long, default_value_t = 1.0)]
    memory_overcommit: f64,
    /// Most VMs on one host, if limited.
    #[arg(long)]
    max_vms_per_host: Option<u32>,
    /// Search steps; the same log, settings and budget always give the same plan.
    #[arg(long, default_value_t = 200_000)]
    max_steps: u64,
}

/// `novacron plan consolidate`: replay the log, plan, print; nothing is executed.
pub async fn plan_consolidate(nats: &str, a: ConsolidateArgs, fmt: Format) -> anyhow::Result<()> {
    if !(a.cpu_overcommit >= 1.0 && a.memory_overcommit >= 1.0) {
        bail!("--cpu-overcommit and --memory-overcommit must be at least 1.0");
    }
    let mut stream = events_stream(nats).await?;
    let last = tail(&mut stream).await?;
    let mut st = ClusterState::default();
    fold_range(&stream, &mut st, last).await?;
    let cfg = PlannerConfig {
        cpu_overcommit: a.cpu_overcommit,
        memory_overcommit: a.memory_overcommit,
        max_vms_per_host: a.max_vms_per_host,
        ..PlannerConfig::default()
    };
    let limits = Limits { max_steps: a.max_steps, ..Limits::default() };
    let plan = tokio::task::spawn_blocking(move || plan_consolidation(&st, &cfg, &limits)).await??;
    let moves: Vec<Value> = plan
        .moves
        .iter()
        .map(|m| json!({ "vm": m.vm.to_string(), "name": m.name, "from": m.from.as_str(), "to": m.to.as_str() }))
        .collect();
    match fmt {
        Format::Json => output::json(&json!({
            "log_seq": plan.log_seq,
            "hosts_before": plan.hosts_before,
            "hosts_after": plan.hosts_after,
            "emptied": plan.emptied.iter().map(|h| h.as_str()).collect::<Vec<_>>(),
            "moves": moves,
            "pinned": plan.pinned,
            "steps": plan.steps,
        })),
        Format::Text => {
            println!(
                "hosts in use {} → {} ({} emptied), {} live migrations; planned at log sequence {}; nothing executed",
                plan.hosts_before,
                plan.hosts_after,
                plan.emptied.len(),
                plan.moves.len(),
                plan.log_seq
            );
            if plan.pinned > 0 {
                println!("{} VMs not running or migrating were left where they are", plan.pinned);
            }
            let rows: Vec<Vec<String>> = plan
                .moves
                .iter()
                .map(|m| vec![m.vm.to_string(), m.name.clone(), m.from.to_string(), m.to.to_string()])
                .collect();
            if !rows.is_empty() {
                output::table(&["vm", "name", "from", "to"], &rows);
            }
            Ok(())
        }
    }
}

async fn events_stream(nats: &str) -> anyhow::Result<async_nats::jetstream::stream::Stream> {
    let bus = Bus::connect(&BusConfig::new(nats, "novacron-cli")).await?;
    bus.js.get_stream(proto::EVENTS_STREAM).await.map_err(|e| {
        anyhow!("no {} stream at {nats} ({e}): has an orchestrator ever run against this server?", proto::EVENTS_STREAM)
    })
}

/// The sequence of the last message in the EVENTS stream.
async fn tail(stream: &mut async_nats::jetstream::stream::Stream) -> anyhow::Result<u64> {
    Ok(stream.info().await.context("reading the EVENTS stream")?.state.last_sequence)
}

/// Whether `subject` matches the NATS filter (`*` one token, `>` the rest).
fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn event_line(v: &Value) -> String {
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("-").to_owned();
    let payload = v.get("payload").map(Value::to_string).unwrap_or_default();
    let short: String = payload.chars().take(120).collect();
    format!("{:>7}  {}  {:<18}  {}  {}", v["seq"], s("at"), s("kind"), s("subject"), short)
}

fn in_range(ev: &LoggedEvent, since: Option<Point>, until: Option<Point>) -> bool {
    let at = ev.envelope.as_ref().map(|e| e.at_ms).unwrap_or(0);
    let after = match since {
        None => true,
        Some(Point::Seq(s)) => ev.seq >= s,
        Some(Point::Time(t)) => at >= t,
    };
    let before = match until {
        None => true,
        Some(Point::Seq(u)) => ev.seq <= u,
        Some(Point::Time(t)) => at <= t,
    };
    after && before
}

pub async fn events(nats: &str, a: EventsArgs, fmt: Format) -> anyhow::Result<()> {
    let mut stream = events_stream(nats).await?;
    let from = match a.since {
        Some(Point::Seq(s)) => s.max(1),
        _ => 1,
    };
    let keep = |ev: &LoggedEvent| {
        in_range(ev, a.since, a.until) && a.subject.as_deref().is_none_or(|f| subject_matches(f, &ev.subject))
    };
    if a.follow {
        let mut follow = novacron_eventlog::follow(&stream, from).await?;
        while let Some(ev) = follow.next().await {
            let ev = ev?;
            if let Some(Point::Seq(u)) = a.until
                && ev.seq > u
            {
                break;
            }
            if keep(&ev) {
                let v = ev.to_json();
                match fmt {
                    Format::Json => println!("{}", serde_json::to_string(&v)?),
                    Format::Text => println!("{}", event_line(&v)),
                }
            }
        }
        return Ok(());
    }
    let last = tail(&mut stream).await?;
    let to = match a.until {
        Some(Point::Seq(u)) => u.min(last),
        _ => last,
    };
    let mut out = Vec::new();
    replay(&stream, from, to, |ev| {
        if keep(&ev) {
            out.push(ev.to_json());
        }
    })
    .await?;
    match fmt {
        Format::Json => output::json(&out),
        Format::Text => {
            for v in &out {
                println!("{}", event_line(v));
            }
            Ok(())
        }
    }
}

pub async fn state(nats: &str, a: StateArgs, fmt: Format) -> anyhow::Result<()> {
    let mut stream = events_stream(nats).await?;
    let last = tail(&mut stream).await?;
    let mut st = ClusterState::default();
    match a.at {
        None => {
            fold_range(&stream, &mut st, last).await?;
        }
        Some(Point::Seq(n)) => {
            if n > last {
                bail!("--at {n} is past the end of the log (last sequence {last})");
            }
            fold_range(&stream, &mut st, n).await?;
        }
        Some(Point::Time(t)) => {
            let mut done = false;
            replay(&stream, 1, last, |ev| {
                if done {
                    return;
                }
                match &ev.envelope {
                    Ok(env) if env.at_ms > t => done = true,
                    Ok(env) => {
                        st.apply(ev.seq, env);
                    }
                    Err(_) => st.seq = ev.seq,
                }
            })
            .await?;
        }
    }
    let summary = st.summary();
    match fmt {
        Format::Json => output::json(&summary),
        Format::Text => {
            println!("seq    {}", summary.seq);
            println!("hash   {}", summary.hash);
            println!("hosts  {}", summary.hosts);
            println!("vms    {}", summary.vms);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_filters_follow_nats_wildcards() {
        assert!(subject_matches("nc.events.vm.>", "nc.events.vm.abc"));
        assert!(subject_matches("nc.cmd.*.x", "nc.cmd.h1.x"));
        assert!(!subject_matches("nc.cmd.*.x", "nc.cmd.h1.y"));
        assert!(!subject_matches("nc.events.vm.>", "nc.events.vm"));
        assert!(subject_matches("nc.events.host.h1", "nc.events.host.h1"));
    }

    #[test]
    fn points_are_sequences_or_times() {
        assert_eq!(parse_point("42"), Ok(Point::Seq(42)));
        assert_eq!(parse_point("1970-01-01T00:00:01Z"), Ok(Point::Time(1000)));
        assert!(parse_point("yesterday").unwrap_err().contains("RFC 3339"));
    }
}
