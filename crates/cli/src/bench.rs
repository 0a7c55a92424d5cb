//! `novacron bench`: the figures of `docs/benchmarks.md`.
//!
//! - `fold`: events folded per second by the pure `ClusterState::apply` (decoded in advance).
//! - `append`: pipelined, fenced appends per second through `EventLog::append`, and in the same
//!   run the raw JetStream publish rate with the same message size and window (a sliding
//!   window of plain `publish` calls with no headers), so the ratio survives a noisy machine.
//! - `replay`: events per second read back from JetStream, decoded and folded.
//!
//! Each run starts its own nats-server (file storage, temporary store) on a free port.

use std::collections::VecDeque;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use novacron_eventlog::{Bus, BusConfig, EventLog, fold_range};
use novacron_state::ClusterState;
use novacron_types::event::{HostRegistered, PlacementExplanation, VmIncarnationReport, VmPlaced, VmRequested};
use novacron_types::{Actor, Envelope, EventKind, Generation, HostId, IncarnationId, Resources, StartVm, VmId, VmSpec};
use serde_json::{Value, json};

use crate::nats_server::{self, LocalNats};
use crate::{Format, output};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    which: Which,
}

#[derive(Subcommand, Debug)]
enum Which {
    /// Fold rate of the pure state projection.
    Fold {
        /// Events to fold.
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
    },
    /// Log append rate vs raw JetStream publish rate, then replay rate.
    Append(AppendArgs),
    /// Everything, in one run.
    All(AppendArgs),
    /// The pure placement planner: decisions per second and their latency.
    Placement(PlacementArgs),
    /// QEMU start/stop times and live migration (KVM when usable, and TCG).
    Qemu(crate::bench_agent::QemuArgs),
    /// One agent process hosting many simulated hosts: command rate and memory per host.
    Fleet(crate::bench_agent::FleetArgs),
    /// Placements end to end (API → events → command on the host subject) with simulated hosts.
    E2e(crate::bench_e2e::E2eArgs),
    /// Leader failover: SIGKILL the leader of two replicas, time the takeover and first write.
    Failover(crate::bench_failover::FailoverArgs),
    /// Host failure: SIGKILL a host's agent, time until its VMs run on other hosts.
    Heal(crate::bench_heal::HealArgs),
    /// The reactive and the predictive group scaler replaying real load: SLO breaches, scaling
    /// actions, members.
    Scaling(crate::bench_scaling::ScalingArgs),
    /// The consolidation planner on vector bin packing instances with known optima.
    Consolidate(crate::bench_consolidate::ConsolidateArgs),
}

#[derive(Args, Debug, Clone)]
struct PlacementArgs {
    /// Hosts in the cluster (64 vCPUs, 256 GiB each, in 10 zones).
    #[arg(long, default_value_t = 10_000)]
    hosts: u32,
    /// VMs to place, one decision each (1–4 vCPUs, in groups of 10 with soft anti-affinity).
    #[arg(long, default_value_t = 100_000)]
    vms: u32,
    /// Score every host for every decision (no candidate limit), for comparison.
    #[arg(long)]
    full_scan: bool,
}

#[derive(Args, Debug, Clone)]
struct AppendArgs {
    /// Events to append (and replay).
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Appends in flight (raw: sliding window; log: batch size).
    #[arg(long, default_value_t = 512)]
    window: usize,
    /// Folded events for the fold benchmark (with `all`).
    #[arg(long, default_value_t = 1_000_000)]
    fold_events: usize,
    /// Headers on the "raw with headers" baseline: c Content-Type, k kind, i msg id,
    /// s expected sequence (f: first message only), l expected last msg id. `ciksl` mirrors
    /// the log's appends; other sets show what each header costs the server. With `b` the
    /// messages go as ADR-50 atomic batches of 1,000 (s on each batch's first), with `F` as
    /// one ADR-50 fast-ingest batch (acks every 100): what the server's batch modes save.
    #[arg(long, default_value = "ciksl")]
    fence_headers: String,
    /// nats-server binary (default: $NOVACRON_NATS_SERVER, .tools/nats/bin/nats-server, PATH).
    #[arg(long)]
    nats_server: Option<std::path::PathBuf>,
}

/// A realistic mix: hosts register, then VMs are requested, placed, commanded and run.
fn workload(n: usize) -> Vec<Envelope> {
    let hosts: Vec<HostId> = (0..64).filter_map(|i| HostId::new(format!("host-{i}")).ok()).collect();
    let actor = Actor::Orchestrator("bench".into());
    let mut out = Vec::with_capacity(n);
    for h in &hosts {
        out.push(Envelope::new(
            0,
            actor.clone(),
            EventKind::HostRegistered(HostRegistered {
                host: h.clone(),
                capacity: Resources { vcpus: 1_000_000, memory_mib: 1 << 40, disk_gib: 0 },
                labels: [("zone".to_owned(), "a".to_owned())].into(),
                driver: "sim".into(),
            }),
        ));
    }
    let mut i = 0usize;
    while out.len() < n {
        let vm = VmId::new_v7();
        let incarnation = IncarnationId::new_v7();
        let host = hosts[i % hosts.len()].clone();
        let spec = VmSpec {
            name: format!("vm-{i}"),
            vcpus: 2,
            memory_mib: 2048,
            disk_gib: 0,
            group: None,
            labels: Default::default(),
            restart: Default::default(),
            placement: Default::default(),
        };
        let g = Generation::FIRST;
        let report = VmIncarnationReport { vm, host: host.clone(), incarnation, generation: g };
        for kind in [
            EventKind::VmRequested(VmRequested { vm, spec: spec.clone() }),
            EventKind::VmPlaced(VmPlaced {
                vm,
                host: host.clone(),
                incarnation,
                generation: g,
                explanation: PlacementExplanation {
                    planner: "filter-score/bin-pack".into(),
                    log_seq: out.len() as u64,
                    hosts_considered: 64,
                    ..Default::default()
                },
            }),
            EventKind::VmStartCommanded(StartVm { vm, host: host.clone(), incarnation, generation: g, spec }),
            EventKind::VmRunning(report),
        ] {
            out.push(Envelope::new(1_700_000_000_000 + out.len() as u64, actor.clone(), kind));
        }
        i += 1;
    }
    out.truncate(n);
    out
}

fn fold_bench(n: usize) -> Value {
    let events = workload(n);
    // Best of three passes: the figure is the fold, not the allocator warming up.
    let mut best = f64::MAX;
    let mut hash = String::new();
    for _ in 0..3 {
        let mut state = ClusterState::default();
        let t = Instant::now();
        for (i, e) in events.iter().enumerate() {
            state.apply(i as u64 + 1, e);
        }
        best = best.min(t.elapsed().as_secs_f64());
        hash = state.hash().0;
    }
    json!({ "events": n, "seconds": best, "events_per_sec": n as f64 / best, "goal_events_per_sec": 1_000_000, "hash": hash })
}

/// Raw JetStream publishing with a sliding window. With `fence`, each message carries the
/// headers named by its letters — `c` Content-Type, `k` Nc-Event-Kind, `i` Nats-Msg-Id,
/// `s` Nats-Expected-Last-Sequence (on every message; `f`: on the first only), `l`
/// Nats-Expected-Last-Msg-Id (all but the first) — built the cheapest way: the server-side
/// cost of those headers without any of our client code. `ciksl` is what the log sends.
pub(crate) async fn raw_publish(
    bus: &Bus,
    stream: &str,
    payloads: &[Vec<u8>],
    window: usize,
    fence: Option<&str>,
) -> anyhow::Result<f64> {
    let fenced = fence.is_some();
    let mode = fence.unwrap_or_default();
    use async_nats::jetstream::message::PublishMessage;
    use async_nats::jetstream::stream::{Config, StorageType};
    let events_cfg = novacron_eventlog::bus::stream_configs(1).remove(0);
    let subject = format!("bench.{}.x", stream.to_lowercase());
    bus.js
        .create_stream(Config {
            name: stream.into(),
            subjects: vec![format!("bench.{}.>", stream.to_lowercase())],
            storage: StorageType::File,
            duplicate_window: events_cfg.duplicate_window,
            max_message_size: events_cfg.max_message_size,
            allow_atomic_publish: mode.contains('b'),
            allow_batch_publish: mode.contains('F'),
            ..Default::default()
        })
        .await
        .context("creating the raw benchmark stream")?;
    let ids: Vec<String> = (0..payloads.len()).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    if mode.contains('F') {
        use futures::StreamExt;
        // ADR-50 fast ingest: the server acks every `flow` messages on the batch's inbox; the
        // batch sequence, flow and operation travel in the reply subject.
        let flow: u64 = 100;
        let inbox = bus.client.new_inbox();
        let mut sub = bus.client.subscribe(format!("{inbox}.>")).await?;
        let mut last_ack = 0u64;
        let mut eff = flow;
        let t = Instant::now();
        let n = payloads.len() as u64;
        for (i, p) in payloads.iter().enumerate() {
            let seq = i as u64 + 1;
            while last_ack + eff * 2 <= seq {
                let m = tokio::time::timeout(std::time::Duration::from_secs(5), sub.next())
                    .await?
                    .context("inbox closed")?;
                let v: Value = serde_json::from_slice(&m.payload)?;
                if v["type"] == "ack" {
                    last_ack = v["seq"].as_u64().unwrap_or(0);
                    eff = v["msgs"].as_u64().unwrap_or(flow).max(1);
                } else {
                    anyhow::bail!("fast batch: {v}");
                }
            }
            let op = if seq == 1 {
                0
            } else if seq == n {
                2
            } else {
                1
            };
            let reply = format!("{inbox}.{eff}.fail.{seq}.{op}.$FI");
            let mut h = batch_headers(mode, &ids[i]);
            if mode.contains('s') {
                h.insert("Nats-Expected-Last-Sequence", (i as u64).to_string().as_str());
            }
            if i > 0 && mode.contains('l') {
                h.insert("Nats-Expected-Last-Msg-Id", ids[i - 1].as_str());
            }
            bus.client.publish_with_reply_and_headers(subject.clone(), reply, h, p.clone().into()).await?;
        }
        loop {
            let m =
                tokio::time::timeout(std::time::Duration::from_secs(5), sub.next()).await?.context("inbox closed")?;
            let v: Value = serde_json::from_slice(&m.payload)?;
            if v.get("type").is_none() {
                anyhow::ensure!(v.get("error").is_none(), "fast batch: {v}");
                break;
            }
            if v["type"] != "ack" {
                anyhow::bail!("fast batch: {v}");
            }
        }
        return Ok(payloads.len() as f64 / t.elapsed().as_secs_f64());
    }
    if mode.contains('b') {
        // ADR-50 atomic batches of the server's maximum size, two in flight: only the commit
        // (the last message) is acked.
        let bsize = 1000;
        let mut inflight = VecDeque::new();
        let t = Instant::now();
        for (b, chunk) in payloads.chunks(bsize).enumerate() {
            if inflight.len() >= (window / bsize).max(2)
                && let Some(f) = inflight.pop_front()
            {
                let _: async_nats::jetstream::publish::PublishAck =
                    (f as async_nats::jetstream::context::PublishAckFuture).await?;
            }
            let id = uuid::Uuid::now_v7().to_string();
            for (k, p) in chunk.iter().enumerate() {
                let mut h = batch_headers(mode, &ids[b * bsize + k]);
                h.insert("Nats-Batch-Id", id.as_str());
                h.insert("Nats-Batch-Sequence", (k + 1).to_string().as_str());
                if k == 0 && mode.contains('s') {
                    h.insert("Nats-Expected-Last-Sequence", (b * bsize).to_string().as_str());
                }
                if k + 1 == chunk.len() {
                    h.insert("Nats-Batch-Commit", "1");
                    let msg = PublishMessage::build().payload(p.clone().into()).headers(h);
                    inflight.push_back(bus.js.send_publish(subject.clone(), msg).await?);
                } else {
                    bus.client.publish_with_headers(subject.clone(), h, p.clone().into()).await?;
                }
            }
        }
        for f in inflight {
            f.await?;
        }
        return Ok(payloads.len() as f64 / t.elapsed().as_secs_f64());
    }
    let mut inflight = VecDeque::with_capacity(window);
    let t = Instant::now();
    for (i, p) in payloads.iter().enumerate() {
        if inflight.len() >= window
            && let Some(f) = inflight.pop_front()
        {
            let _: async_nats::jetstream::publish::PublishAck =
                (f as async_nats::jetstream::context::PublishAckFuture).await?;
        }
        let fut = if fenced {
            let mut msg = PublishMessage::build().payload(p.clone().into());
            if mode.contains('c') {
                msg = msg.header("Content-Type", "application/msgpack");
            }
            if mode.contains('k') {
                msg = msg.header("Nc-Event-Kind", "VmPlaced");
            }
            if mode.contains('i') {
                msg = msg.message_id(&ids[i]);
            }
            if mode.contains('s') || (mode.contains('f') && i == 0) {
                msg = msg.expected_last_sequence(i as u64);
            }
            if i > 0 && mode.contains('l') {
                msg = msg.expected_last_message_id(&ids[i - 1]);
            }
            bus.js.send_publish(subject.clone(), msg).await?
        } else {
            bus.js.publish(subject.clone(), p.clone().into()).await?
        };
        inflight.push_back(fut);
    }
    for f in inflight {
        f.await?;
    }
    Ok(payloads.len() as f64 / t.elapsed().as_secs_f64())
}

/// The headers a batch mode (`b`, `F`) puts on every message, as `mode` asks: `c`
/// Content-Type, `k` the event kind, `i` the message id `id`.
fn batch_headers(mode: &str, id: &str) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    if mode.contains('c') {
        h.insert(novacron_protocol::HEADER_CONTENT_TYPE, "application/msgpack");
    }
    if mode.contains('k') {
        h.insert(novacron_protocol::HEADER_EVENT_KIND, "VmPlaced");
    }
    if mode.contains('i') {
        h.insert("Nats-Msg-Id", id);
    }
    h
}

async fn append_and_replay(a: &AppendArgs) -> anyhow::Result<(Value, Value)> {
    let bin = nats_server::find(a.nats_server.as_deref())?;
    let dir = tempfile::tempdir()?;
    let nats = LocalNats::start(&bin, dir.path(), 0).await?;
    let result = async {
        let bus = Bus::connect(&BusConfig::new(nats.url.clone(), "novacron-bench")).await?;
        bus.provision(1).await?;
        let events = workload(a.events);
        let payloads: Vec<Vec<u8>> = events.iter().map(novacron_types::encode).collect();
        let avg = payloads.iter().map(Vec::len).sum::<usize>() as f64 / payloads.len().max(1) as f64;

        let raw = raw_publish(&bus, "RAW", &payloads, a.window, None).await?;
        let raw_fenced = raw_publish(&bus, "FENCED", &payloads, a.window, Some(&a.fence_headers)).await?;

        // The orchestrator appends in decisions of a few events; a bulk load (or a large
        // reconcile pass) hands over thousands. Measure the bulk path: one call per 16k events.
        let mut log = EventLog::open(bus.js.clone()).await?.window(a.window);
        let t = Instant::now();
        for chunk in events.chunks(16_384) {
            log.append(chunk).await?;
        }
        let appended = events.len() as f64 / t.elapsed().as_secs_f64();

        let mut state = ClusterState::default();
        let t = Instant::now();
        let stats = fold_range(log.stream(), &mut state, log.tail().seq).await?;
        let replay_secs = t.elapsed().as_secs_f64();
        anyhow::ensure!(
            stats.applied as usize == events.len(),
            "replay read {} of {} events",
            stats.applied,
            events.len()
        );

        let append = json!({
            "events": events.len(), "window": a.window, "avg_message_bytes": avg,
            "raw_publish_per_sec": raw, "raw_fenced_publish_per_sec": raw_fenced, "fence_headers": a.fence_headers,
            "log_append_per_sec": appended, "ratio": appended / raw, "ratio_to_fenced": appended / raw_fenced,
            "goal_ratio": 0.7,
        });
        let replay = json!({
            "events": stats.applied, "seconds": replay_secs, "events_per_sec": stats.applied as f64 / replay_secs,
            "goal_events_per_sec": 200_000, "hash": state.hash().0,
        });
        anyhow::Ok((append, replay))
    }
    .await;
    nats.stop().await;
    result
}

/// Places `vms` VMs one at a time into a cluster of `hosts`, as one long planning pass (every
/// decision sees the ones before it), and times each decision.
fn placement_bench(a: &PlacementArgs) -> Value {
    use novacron_scheduler::{LoadView, Placement, PlacementRequest, Planner, PlannerConfig};
    let mut state = ClusterState::default();
    for i in 0..a.hosts {
        let e = Envelope::new(
            0,
            Actor::Orchestrator("bench".into()),
            EventKind::HostRegistered(HostRegistered {
                host: HostId::new(format!("h{i:05}")).unwrap_or_else(|_| HostId::new("h").expect("valid")),
                capacity: Resources { vcpus: 64, memory_mib: 256 * 1024, disk_gib: 0 },
                labels: [("zone".to_owned(), format!("z{}", i % 10))].into(),
                driver: "sim".into(),
            }),
        );
        state.apply(u64::from(i) + 1, &e);
    }
    let cfg = PlannerConfig { max_candidates: if a.full_scan { None } else { Some(64) }, ..PlannerConfig::default() };
    let load = LoadView::default();
    let rss_before = rss_mib();
    let mut planner = Planner::new(&state, &cfg, &load);
    let mut latencies_us: Vec<f64> = Vec::with_capacity(a.vms as usize);
    let mut placed = 0u32;
    let mut decisions = Vec::with_capacity(a.vms as usize);
    let t = Instant::now();
    for i in 0..a.vms {
        let req = PlacementRequest {
            need: Resources { vcpus: 1 + i % 4, memory_mib: 2048, disk_gib: 0 },
            group: Some(format!("g{}", i / 10)),
            anti_affinity: novacron_types::Strength::Soft,
            ..PlacementRequest::default()
        };
        let d = Instant::now();
        if let Placement::Host { host, .. } = planner.place(&req) {
            placed += 1;
            decisions.push((req, host));
        }
        latencies_us.push(d.elapsed().as_secs_f64() * 1e6);
    }
    let secs = t.elapsed().as_secs_f64();
    drop(planner);
    let setup_ms = planner_setup_ms(&mut state, &cfg, decisions);
    latencies_us.sort_by(f64::total_cmp);
    let pct =
        |p: f64| latencies_us.get(((latencies_us.len() as f64 - 1.0) * p) as usize).copied().unwrap_or(0.0) / 1000.0;
    json!({
        "hosts": a.hosts, "vms": a.vms, "placed": placed, "seconds": secs, "max_candidates": cfg.max_candidates,
        "placements_per_sec": f64::from(a.vms) / secs,
        "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99),
        "rss_mib": rss_mib().max(rss_before),
        "goal_placements_per_sec": 50_000,
        // What the engine pays before each planning pass: a planner over the whole cluster.
        "planner_setup_ms": setup_ms,
    })
}

/// Folds the placed VMs into `state`, gives every host a utilisation and a failure risk (as
/// telemetry and a risk model would), and times building a planner over it: the median of 21.
fn planner_setup_ms(
    state: &mut ClusterState,
    cfg: &novacron_scheduler::PlannerConfig,
    decisions: Vec<(novacron_scheduler::PlacementRequest, HostId)>,
) -> f64 {
    use novacron_scheduler::{LoadView, Planner};
    let actor = Actor::Orchestrator("bench".into());
    let mut seq = state.seq;
    for (i, (req, host)) in decisions.into_iter().enumerate() {
        let vm = VmId::new_v7();
        let spec = VmSpec {
            name: format!("vm-{i}"),
            vcpus: req.need.vcpus,
            memory_mib: req.need.memory_mib,
            disk_gib: 0,
            group: req.group,
            labels: Default::default(),
            restart: Default::default(),
            placement: Default::default(),
        };
        let placed = VmPlaced {
            vm,
            host,
            incarnation: IncarnationId::new_v7(),
            generation: Generation::FIRST,
            explanation: PlacementExplanation::default(),
        };
        for kind in [EventKind::VmRequested(VmRequested { vm, spec }), EventKind::VmPlaced(placed)] {
            seq += 1;
            state.apply(seq, &Envelope::new(0, actor.clone(), kind));
        }
    }
    let load = LoadView {
        cpu_util: state.hosts.keys().enumerate().map(|(i, h)| (h.clone(), (i % 100) as f64 / 100.0)).collect(),
        watermark_ms: Some(1),
        failure_risk: state.hosts.keys().map(|h| (h.clone(), 0.01)).collect(),
    };
    let mut times: Vec<f64> = (0..21)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(Planner::new(state, cfg, &load));
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Resident memory of process `pid` (or `self`), MiB, from `/proc`.
pub(crate) fn rss_mib_of(pid: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Resident memory of this process, MiB (0 where `/proc` is not there).
pub(crate) fn rss_mib() -> f64 {
    rss_mib_of("self").unwrap_or(0.0)
}

fn machine() -> Value {
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| {
        c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
    });
    json!({ "cores": cores, "cpu": cpu, "profile": if cfg!(debug_assertions) { "debug" } else { "release" } })
}

fn print(fmt: Format, report: &Value) -> anyhow::Result<()> {
    if fmt == Format::Json {
        return output::json(report);
    }
    println!("machine: {}", report["machine"]);
    if cfg!(debug_assertions) {
        println!(
            "(debug build: run `make bench` or `cargo run --release -p novacron-cli -- bench ...` for real figures)"
        );
    }
    if let Some(f) = report.get("fold") {
        println!(
            "fold:    {:>12.0} events/s  (goal ≥ 1,000,000; {} events)",
            f["events_per_sec"].as_f64().unwrap_or(0.0),
            f["events"]
        );
    }
    if let Some(a) = report.get("append") {
        println!(
            "append:  {:>12.0} events/s  vs raw JetStream publish {:.0}/s  → ratio {:.2} (goal ≥ 0.70; {} events, window {}, ~{:.0} B each)\n         raw publish with the same fencing headers {:.0}/s → log/fenced ratio {:.2}",
            a["log_append_per_sec"].as_f64().unwrap_or(0.0),
            a["raw_publish_per_sec"].as_f64().unwrap_or(0.0),
            a["ratio"].as_f64().unwrap_or(0.0),
            a["events"],
            a["window"],
            a["avg_message_bytes"].as_f64().unwrap_or(0.0),
            a["raw_fenced_publish_per_sec"].as_f64().unwrap_or(0.0),
            a["ratio_to_fenced"].as_f64().unwrap_or(0.0),
        );
    }
    if let Some(c) = report.get("consolidate") {
        let mut summary = c.clone();
        if let Some(o) = summary.as_object_mut() {
            o.remove("per_instance");
        }
        println!("consolidate (per instance with -o json): {}", serde_json::to_string_pretty(&summary)?);
    }
    for key in ["placement", "qemu", "fleet", "e2e", "failover", "heal", "scaling"] {
        if let Some(v) = report.get(key) {
            println!("{key}: {}", serde_json::to_string_pretty(v)?);
        }
    }
    if let Some(r) = report.get("replay") {
        println!(
            "replay:  {:>12.0} events/s  (goal ≥ 200,000; {} events read, decoded and folded)",
            r["events_per_sec"].as_f64().unwrap_or(0.0),
            r["events"]
        );
    }
    Ok(())
}

pub async fn run(args: BenchArgs, fmt: Format) -> anyhow::Result<()> {
    let mut report = json!({ "machine": machine() });
    match args.which {
        Which::Fold { events } => report["fold"] = fold_bench(events),
        Which::Append(a) => {
            let (append, replay) = append_and_replay(&a).await?;
            report["append"] = append;
            report["replay"] = replay;
        }
        Which::Placement(a) => report["placement"] = placement_bench(&a),
        Which::Qemu(a) => report["qemu"] = crate::bench_agent::qemu(&a).await?,
        Which::Fleet(a) => report["fleet"] = crate::bench_agent::fleet(&a).await?,
        Which::E2e(a) => report["e2e"] = crate::bench_e2e::run(&a).await?,
        Which::Failover(a) => report["failover"] = crate::bench_failover::run(a).await?,
        Which::Heal(a) => report["heal"] = crate::bench_heal::run(a).await?,
        Which::Scaling(a) => {
            report["scaling"] = tokio::task::spawn_blocking(move || crate::bench_scaling::run(&a)).await??;
        }
        Which::Consolidate(a) => {
            report["consolidate"] = tokio::task::spawn_blocking(move || crate::bench_consolidate::run(&a)).await??;
        }
        Which::All(a) => {
            report["fold"] = fold_bench(a.fold_events);
            let (append, replay) = append_and_replay(&a).await?;
            report["append"] = append;
            report["replay"] = replay;
        }
    }
    print(fmt, &report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workload_folds_to_running_vms_without_ignored_events() {
        let events = workload(64 + 4 * 10);
        let mut state = ClusterState::default();
        for (i, e) in events.iter().enumerate() {
            state.apply(i as u64 + 1, e);
        }
        assert_eq!(state.ignored_events, 0, "the benchmark exercises real transitions");
        assert_eq!(state.vms.len(), 10);
        assert!(state.vms.values().all(|v| v.status == novacron_state::VmStatus::Running));
    }
}
