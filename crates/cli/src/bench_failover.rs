//! `novacron bench failover`: how long the cluster is without a leader when the leader dies.
//!
//! Two `novacron orchestrator` processes (replicas) share one nats-server. Each run kills the
//! current leader with SIGKILL — no resignation, its lease must expire — and measures, from the
//! kill, when the standby says it leads (`GET /api/v1/leader`, polled every 10 ms) and when it
//! first acknowledges a write (`POST /api/v1/vms` answered 201). The killed replica is then
//! restarted on its data directory and rejoins as the standby for the next run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};

use crate::nats_server::{self, LocalNats};

#[derive(Args, Debug, Clone)]
pub struct FailoverArgs {
    /// Leader kills to measure.
    #[arg(long, default_value_t = 5)]
    runs: u32,
    /// The replicas' leader lease (TTL of the KV entry).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    leader_lease: Duration,
    /// nats-server binary (default: $NOVACRON_NATS_SERVER, .tools/nats/bin/nats-server, PATH).
    #[arg(long)]
    nats_server: Option<PathBuf>,
}

pub(crate) struct Replica {
    pub(crate) child: Child,
    pub(crate) api: String,
    dir: PathBuf,
    id: String,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .into()
}

fn role(agent: &ureq::Agent, api: &str) -> Option<String> {
    let mut r = agent.get(&format!("{api}/api/v1/leader")).call().ok()?;
    let v: Value = r.body_mut().read_json().ok()?;
    v["role"].as_str().map(str::to_owned)
}

pub(crate) fn wait(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> anyhow::Result<Duration> {
    let t = Instant::now();
    while !cond() {
        if t.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(t.elapsed())
}

fn start_replica(nats: &str, dir: &Path, id: &str, lease: Duration) -> anyhow::Result<Replica> {
    let lease = humantime::format_duration(lease).to_string();
    start_orchestrator(nats, dir, id, &["--leader-lease", &lease])
}

/// Starts `novacron orchestrator` (this binary) as a child process with `extra` flags, logging
/// to `dir/orchestrator.log`, and waits until its API is ready.
pub(crate) fn start_orchestrator(nats: &str, dir: &Path, id: &str, extra: &[&str]) -> anyhow::Result<Replica> {
    let addr_file = dir.join("orchestrator.addr");
    let _ = std::fs::remove_file(&addr_file);
    std::fs::create_dir_all(dir)?;
    let log = std::fs::File::create(dir.join("orchestrator.log"))?;
    let child = Command::new(std::env::current_exe()?)
        .args(["orchestrator", "--nats", nats, "--http", "127.0.0.1:0", "--replica-id", id])
        .args(extra)
        .arg("--data-dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting an orchestrator replica")?;
    let mut r = Replica { child, api: String::new(), dir: dir.to_path_buf(), id: id.to_owned() };
    wait("the replica's API address", Duration::from_secs(30), || {
        std::fs::read_to_string(&addr_file).is_ok_and(|a| !a.trim().is_empty())
    })?;
    r.api = format!("http://{}", std::fs::read_to_string(&addr_file)?.trim());
    let agent = http();
    wait("the replica to be ready", Duration::from_secs(30), || {
        agent.get(&format!("{}/readyz", r.api)).call().is_ok_and(|resp| resp.status() == 200)
    })?;
    Ok(r)
}

fn create(agent: &ureq::Agent, api: &str, name: &str) -> bool {
    agent
        .post(&format!("{api}/api/v1/vms"))
        .send_json(json!({ "name": name, "vcpus": 1, "memory_mib": 128 }))
        .is_ok_and(|r| r.status() == 201)
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn measure(a: &FailoverArgs, nats: &str, dir: &Path) -> anyhow::Result<Value> {
    let agent = http();
    let mut leader = start_replica(nats, &dir.join("replica-1"), "replica-1", a.leader_lease)?;
    wait("replica-1 to lead", Duration::from_secs(30), || role(&agent, &leader.api).as_deref() == Some("leader"))?;
    let mut standby = start_replica(nats, &dir.join("replica-2"), "replica-2", a.leader_lease)?;
    let mut runs = Vec::new();
    for run in 0..a.runs {
        wait("the standby to follow", Duration::from_secs(30), || {
            role(&agent, &standby.api).as_deref() == Some("follower")
        })?;
        if !create(&agent, &leader.api, &format!("before-{run}")) {
            bail!("the leader refused a write before run {run}");
        }
        leader.child.kill().context("killing the leader")?;
        let killed = Instant::now();
        let _ = leader.child.wait();
        wait("the standby to lead", Duration::from_secs(30), || {
            role(&agent, &standby.api).as_deref() == Some("leader")
        })?;
        let elected = killed.elapsed();
        wait("the new leader to acknowledge a write", Duration::from_secs(30), || {
            create(&agent, &standby.api, &format!("after-{run}"))
        })?;
        let written = killed.elapsed();
        runs.push((elected.as_secs_f64(), written.as_secs_f64()));
        // The dead replica comes back on its data directory as the new standby.
        let (dir, id) = (leader.dir.clone(), leader.id.clone());
        drop(leader);
        let back = start_replica(nats, &dir, &id, a.leader_lease)?;
        leader = std::mem::replace(&mut standby, back);
    }
    let mut elected: Vec<f64> = runs.iter().map(|r| r.0).collect();
    let mut written: Vec<f64> = runs.iter().map(|r| r.1).collect();
    Ok(json!({
        "runs": runs.iter().map(|(e, w)| json!({ "leader_elected_s": e, "first_write_s": w })).collect::<Vec<_>>(),
        "leader_lease_s": a.leader_lease.as_secs_f64(),
        "median_leader_elected_s": median(&mut elected),
        "max_leader_elected_s": elected.last().copied().unwrap_or(0.0),
        "median_first_write_s": median(&mut written),
        "max_first_write_s": written.last().copied().unwrap_or(0.0),
        "goal": "leader failover ≤ 3 s",
    }))
}

pub async fn run(a: FailoverArgs) -> anyhow::Result<Value> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let bin = a.nats_server.clone();
    on_local_nats(bin.as_deref(), move |url, dir| measure(&a, url, dir)).await
}

/// Runs a blocking measurement against a fresh nats-server in a temporary directory (the
/// measurement's own processes go there too), and stops the server afterwards.
pub(crate) async fn on_local_nats<T: Send + 'static>(
    nats_server: Option<&Path>,
    measure: impl FnOnce(&str, &Path) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let bin = nats_server::find(nats_server)?;
    let dir = tempfile::tempdir()?;
    let nats = LocalNats::start(&bin, &dir.path().join("nats"), 0).await?;
    let url = nats.url.clone();
    let path = dir.path().to_path_buf();
    let result = tokio::task::spawn_blocking(move || measure(&url, &path)).await?;
    nats.stop().await;
    result
}
