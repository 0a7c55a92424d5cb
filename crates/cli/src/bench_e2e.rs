//! `novacron bench e2e`: placements end to end — HTTP API → events appended → start command on
//! the host's subject — against an in-process orchestrator, with N simulated hosts in a separate
//! agent process (so the RSS figure is the orchestrator's plus the load generator's).
//!
//! The load is open-loop: request *i* is due at `i / rate` after the start, and its latency is
//! measured from when it was due (not from when a free connection sent it), so a system that
//! falls behind shows it in the percentiles instead of hiding it. A request is done when the API
//! answers 201, which it does only after `VmRequested`, `VmPlaced` and `VmStartCommanded` are in
//! the log; the start commands are then counted in the log, on the hosts' `nc.cmd.>` subjects. In the same
//! run, before the orchestrator starts, the raw JetStream publish rate of the same server is
//! measured for comparison.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use futures::StreamExt;
use novacron_eventlog::{Bus, BusConfig};
use novacron_orchestrator::{Orchestrator, OrchestratorConfig};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::bench::rss_mib_of;
use crate::nats_server::{self, LocalNats};

#[derive(Args, Debug, Clone)]
pub struct E2eArgs {
    /// Simulated hosts (64 vCPUs, 256 GiB each; room for 64 of the bench's 1-vCPU VMs), all in
    /// one agent process. Offer at most 64 × hosts VMs: the rest stay pending and count apart.
    #[arg(long, default_value_t = 10_000)]
    hosts: u32,
    /// Offered load, VM creations per second.
    #[arg(long, default_value_t = 1_000)]
    rate: u32,
    /// How long to offer it.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// HTTP connections (one thread each) carrying the load.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// VMs per request (the API's `count`: one request, one planning pass, N placements). The
    /// offered rate still counts VMs; latency is each VM's, from when its request was due.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    batch: u32,
    /// nats-server binary (default: $NOVACRON_NATS_SERVER, .tools/nats/bin/nats-server, PATH).
    #[arg(long)]
    nats_server: Option<PathBuf>,
    /// Run the orchestrator as a process of its own (`novacron orchestrator`), so that its
    /// memory (`rss_mib`) is measured without the load generator's. With
    /// NOVACRON_BENCH_WRAP="CMD ARGS" set, it runs under that command (a heap profiler).
    #[arg(long)]
    separate_orchestrator: bool,
}

/// The orchestrator under test: in this process, or a `novacron orchestrator` child.
enum UnderTest {
    InProcess(Orchestrator, CancellationToken),
    Child(tokio::process::Child),
}

impl UnderTest {
    async fn start(a: &E2eArgs, url: &str, dir: &std::path::Path) -> anyhow::Result<(UnderTest, String)> {
        let data = dir.join("orchestrator");
        if !a.separate_orchestrator {
            let cancel = CancellationToken::new();
            let mut cfg = OrchestratorConfig::new(url.to_owned(), data);
            cfg.http = "127.0.0.1:0".parse()?;
            let o = Orchestrator::start(cfg, cancel.clone()).await.context("starting the orchestrator")?;
            let api = format!("http://{}", o.http_addr);
            return Ok((UnderTest::InProcess(o, cancel), api));
        }
        let log = std::fs::File::create(dir.join("orchestrator.log"))?;
        // NOVACRON_BENCH_WRAP="heaptrack -o FILE" (or any profiler that takes a command line)
        // runs the orchestrator under it; `rss_mib` is then the wrapper's.
        let wrap = std::env::var("NOVACRON_BENCH_WRAP").unwrap_or_default();
        let mut words: Vec<String> = wrap.split_whitespace().map(str::to_owned).collect();
        words.push(std::env::current_exe()?.to_string_lossy().into_owned());
        let child = tokio::process::Command::new(&words[0])
            .args(&words[1..])
            .args(["orchestrator", "--nats", url, "--http", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting the orchestrator process")?;
        // It writes its bound address once it listens.
        let addr_file = data.join("orchestrator.addr");
        wait_until("the orchestrator to listen", Duration::from_secs(60), || addr_file.exists()).await?;
        let addr = std::fs::read_to_string(&addr_file).context("reading the orchestrator's address")?;
        Ok((UnderTest::Child(child), format!("http://{}", addr.trim())))
    }

    /// Resident memory of the orchestrator's process, MiB (this process when in-process).
    fn rss_mib(&self) -> f64 {
        let pid = match self {
            UnderTest::InProcess(..) => "self".to_owned(),
            UnderTest::Child(c) => c.id().map(|p| p.to_string()).unwrap_or_default(),
        };
        rss_mib_of(&pid).unwrap_or(0.0)
    }

    async fn stop(self) {
        match self {
            UnderTest::InProcess(o, cancel) => {
                cancel.cancel();
                o.shutdown().await;
            }
            UnderTest::Child(mut c) => {
                // As an operator stops it (it saves a snapshot on the way out); SIGKILL after 60 s.
                if let Some(pid) = c.id() {
                    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
                    let _ = tokio::time::timeout(Duration::from_secs(60), c.wait()).await;
                }
                let _ = c.kill().await;
            }
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Offers `total` creations at `rate`/s over `connections` threads, `batch` per request;
/// returns each placement as (when its request was due, s from the start; its latency, ms
/// from then), how many were accepted but left pending (no room), the failures, and when
/// the last one finished.
fn offer_load(
    api: &str,
    rate: u32,
    total: usize,
    batch: usize,
    connections: usize,
) -> (Vec<(f64, f64)>, usize, Vec<String>, Duration) {
    let next = AtomicUsize::new(0);
    let pending = AtomicUsize::new(0);
    let latencies = Mutex::new(Vec::with_capacity(total));
    let failures = Mutex::new(Vec::new());
    let start = Instant::now() + Duration::from_millis(50);
    let last_done = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..connections.max(1) {
            s.spawn(|| {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(30)))
                    .build()
                    .into();
                let url = format!("{api}/api/v1/vms");
                loop {
                    let first = next.fetch_add(batch, Ordering::Relaxed);
                    if first >= total {
                        break;
                    }
                    let n = batch.min(total - first);
                    let due = start + Duration::from_secs_f64(first as f64 / f64::from(rate));
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let body = if batch == 1 {
                        json!({ "name": format!("e2e-{first}"), "vcpus": 1, "memory_mib": 512 })
                    } else {
                        json!({ "name": format!("e2e-{first}"), "vcpus": 1, "memory_mib": 512, "count": n })
                    };
                    let r = agent.post(&url).send_json(&body);
                    let done = Instant::now();
                    match r {
                        Ok(mut resp) if resp.status() == 201 => {
                            // Accepted; placed only if it got a host (a full cluster leaves it pending).
                            let views = match resp.body_mut().read_json::<Value>() {
                                Ok(Value::Array(views)) => views,
                                Ok(view) => vec![view],
                                Err(_) => Vec::new(),
                            };
                            let placed = views.iter().filter(|v| v["host"].is_string()).count();
                            pending.fetch_add(n.saturating_sub(placed), Ordering::Relaxed);
                            let ms = done.duration_since(due).as_secs_f64() * 1e3;
                            let at = due.duration_since(start).as_secs_f64();
                            latencies
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .extend(std::iter::repeat_n((at, ms), placed));
                        }
                        Ok(mut resp) => {
                            let text = resp.body_mut().read_to_string().unwrap_or_default();
                            failures
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .push(format!("{}: {text}", resp.status()));
                        }
                        Err(e) => {
                            failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(e.to_string())
                        }
                    }
                    let since = u64::try_from(done.saturating_duration_since(start).as_micros()).unwrap_or(u64::MAX);
                    last_done.fetch_max(since, Ordering::Relaxed);
                }
            });
        }
    });
    let lat = latencies.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    let fail = failures.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    (lat, pending.into_inner(), fail, Duration::from_micros(last_done.load(Ordering::Relaxed)))
}

/// The slowest placement of each second of the run (by when requests were due, ms, rounded to
/// 0.1): where the tail comes from — a few stalls, or a steady drift.
fn worst_by_second(placed: &[(f64, f64)]) -> Vec<f64> {
    let mut worst: Vec<f64> = Vec::new();
    for &(at, ms) in placed {
        let second = at.max(0.0) as usize;
        if worst.len() <= second {
            worst.resize(second + 1, 0.0);
        }
        worst[second] = worst[second].max(ms);
    }
    worst.iter().map(|ms| (ms * 10.0).round() / 10.0).collect()
}

/// Messages on `nc.cmd.>` in the EVENTS stream (a fresh stream: only this run's commands).
async fn commands_in_log(bus: &Bus) -> anyhow::Result<usize> {
    let events = bus.js.get_stream(novacron_protocol::EVENTS_STREAM).await?;
    let mut subjects = events.info_with_subjects("nc.cmd.>").await?;
    let mut total = 0;
    while let Some(entry) = subjects.next().await {
        total += entry?.1;
    }
    Ok(total)
}

async fn wait_until<F: FnMut() -> bool>(what: &str, limit: Duration, mut cond: F) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !cond() {
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

pub async fn run(a: &E2eArgs) -> anyhow::Result<Value> {
    if a.rate == 0 || a.hosts == 0 {
        bail!("--rate and --hosts must be positive");
    }
    let bin = nats_server::find(a.nats_server.as_deref())?;
    let dir = tempfile::tempdir()?;
    let nats = LocalNats::start(&bin, &dir.path().join("nats"), 0).await?;
    let result = measure(a, &nats.url, dir.path()).await;
    nats.stop().await;
    result
}

async fn measure(a: &E2eArgs, url: &str, dir: &std::path::Path) -> anyhow::Result<Value> {
    // The baseline: raw JetStream publishes on this server, ~ the size of one create's events.
    let bus = Bus::connect(&BusConfig::new(url, "novacron-bench-e2e")).await?;
    let payloads = vec![vec![0x5a_u8; 700]; 50_000];
    let raw = crate::bench::raw_publish(&bus, "RAWE2E", &payloads, 512, None).await?;
    bus.js.delete_stream("RAWE2E").await.context("deleting the baseline stream")?;

    let (orchestrator, api) = UnderTest::start(a, url, dir).await?;

    let agents_log = std::fs::File::create(dir.join("agents.log"))?;
    let mut agents = tokio::process::Command::new(std::env::current_exe()?)
        .args(["agent", "--nats", url, "--host", "bench", "--count", &a.hosts.to_string()])
        .args(["--vcpus", "64", "--memory-mib", "262144", "--data-dir"])
        .arg(dir.join("agents"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(agents_log)
        .kill_on_drop(true)
        .spawn()
        .context("starting the simulated hosts")?;
    let agents_pid = agents.id().map(|p| p.to_string()).unwrap_or_default();

    let result = async {
        let state_url = format!("{api}/api/v1/state");
        let hosts_up = || {
            ureq::get(&state_url)
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_json::<Value>().ok())
                .and_then(|v| v["hosts"].as_u64())
                .unwrap_or(0)
        };
        let registered = Instant::now();
        wait_until("every simulated host to register", Duration::from_secs(300), || hosts_up() >= u64::from(a.hosts))
            .await?;
        let registration_s = registered.elapsed().as_secs_f64();

        let total = usize::try_from((f64::from(a.rate) * a.duration.as_secs_f64()).round() as u64)?.max(1);
        let (rate, connections, api2, batch) = (a.rate, a.connections, api.clone(), a.batch as usize);
        let (placed, pending, failures, elapsed) =
            tokio::task::spawn_blocking(move || offer_load(&api2, rate, total, batch, connections)).await?;
        let ok = placed.len();
        let worst_by_second = worst_by_second(&placed);
        let mut lat: Vec<f64> = placed.iter().map(|&(_, ms)| ms).collect();
        // Every acknowledged create must have its start command in the log, on a host subject.
        let commands = commands_in_log(&bus).await?;
        lat.sort_by(f64::total_cmp);
        let orchestrator_rss = orchestrator.rss_mib();
        let agents_rss = rss_mib_of(&agents_pid).unwrap_or(0.0);
        let placements_per_sec = ok as f64 / elapsed.as_secs_f64().max(1e-9);
        Ok::<Value, anyhow::Error>(json!({
            "hosts": a.hosts,
            "offered_rate": a.rate,
            "duration_s": a.duration.as_secs_f64(),
            "connections": a.connections,
            "batch": a.batch,
            "requests": total.div_ceil(a.batch as usize),
            "placed": ok,
            "pending_no_room": pending,
            "failed": failures.len(),
            "first_failures": failures.iter().take(3).collect::<Vec<_>>(),
            "placements_per_sec": placements_per_sec,
            "p50_ms": percentile(&lat, 0.50),
            "p95_ms": percentile(&lat, 0.95),
            "p99_ms": percentile(&lat, 0.99),
            "max_ms": lat.last().copied().unwrap_or(0.0),
            "worst_ms_by_second": worst_by_second,
            "start_commands_in_log": commands,
            "start_commands_complete": commands >= ok,
            "rss_mib": orchestrator_rss,
            "rss_note": if a.separate_orchestrator {
                "the orchestrator's own process"
            } else {
                "this process: the orchestrator and the HTTP load generator"
            },
            "agents_rss_mib": agents_rss,
            "host_registration_s": registration_s,
            "raw_jetstream_publish_per_sec": raw,
            "goal": "≥ 10,000 placements/s sustained; p99 ≤ 20 ms at 1,000/s offered; RSS ≤ 512 MiB",
        }))
    }
    .await;
    let _ = agents.kill().await;
    orchestrator.stop().await;
    result
}
