//! `novacron bench heal`: how long a failed host's VMs take to run elsewhere.
//!
//! One orchestrator and a process of simulated spare hosts run as children, all on one
//! nats-server. Each run starts a victim host in a process of its own, cordons the spares so
//! that `--vms` VMs land on the victim, waits until they run, uncordons the spares and kills the
//! victim's process with SIGKILL — no goodbye, no fencing report. From the kill it measures when
//! the orchestrator declares the host failed (`GET /api/v1/hosts`) and when every one of its
//! VMs runs on another host (`GET /api/v1/vms`, polled every 20 ms).
//!
//! The orchestrator may only act once the victim's agent has surely fenced: the host-failure
//! timeout is at least the agent lease plus `FENCE_MARGIN` (docs/fencing.md). The figures are
//! reported against both, and the time after the timeout is the orchestrator's own work
//! (detector tick, planning, append, command, start report).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};

use crate::bench_failover::{http, median, on_local_nats, start_orchestrator, wait};

#[derive(Args, Debug, Clone)]
pub struct HealArgs {
    /// Host failures to measure.
    #[arg(long, default_value_t = 5)]
    runs: u32,
    /// VMs on each victim host.
    #[arg(long, default_value_t = 8)]
    vms: u32,
    /// Spare hosts the VMs may move to.
    #[arg(long, default_value_t = 4)]
    spares: u32,
    /// The agents' fencing lease.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    agent_lease: Duration,
    /// Heartbeat silence before a host is suspected.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    suspect_after: Duration,
    /// Heartbeat silence before a host is failed (more than the lease + the 1 s fence margin).
    #[arg(long, default_value = "3100ms", value_parser = humantime::parse_duration)]
    host_failure_timeout: Duration,
    /// nats-server binary (default: $NOVACRON_NATS_SERVER, .tools/nats/bin/nats-server, PATH).
    #[arg(long)]
    nats_server: Option<std::path::PathBuf>,
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn agent(nats: &str, dir: &Path, host: &str, count: u32, a: &HealArgs) -> anyhow::Result<Proc> {
    std::fs::create_dir_all(dir)?;
    let log = std::fs::File::create(dir.join("agent.log"))?;
    let child = Command::new(std::env::current_exe()?)
        .args(["agent", "--nats", nats, "--host", host, "--count", &count.to_string()])
        .args(["--vcpus", "64", "--memory-mib", "262144"])
        .args(["--lease", &humantime::format_duration(a.agent_lease).to_string()])
        .args(["--host-failure-timeout", &humantime::format_duration(a.host_failure_timeout).to_string()])
        .arg("--data-dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting an agent")?;
    Ok(Proc(child))
}

fn get(agent: &ureq::Agent, url: &str) -> Option<Value> {
    let mut r = agent.get(url).call().ok()?;
    if r.status() != 200 {
        return None;
    }
    r.body_mut().read_json().ok()
}

fn post(agent: &ureq::Agent, url: &str, body: &Value) -> anyhow::Result<Value> {
    let mut r = agent.post(url).send_json(body).with_context(|| format!("POST {url}"))?;
    let status = r.status();
    let v: Value = r.body_mut().read_json().unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("POST {url}: {status}: {v}");
    }
    Ok(v)
}

fn host_state(agent: &ureq::Agent, api: &str, host: &str) -> Option<String> {
    let v = get(agent, &format!("{api}/api/v1/hosts/{host}"))?;
    v["state"].as_str().map(str::to_owned)
}

/// Whether every VM in `ids` runs on a host other than `victim`.
fn all_moved(agent: &ureq::Agent, api: &str, ids: &[String], victim: &str) -> bool {
    let Some(vms) = get(agent, &format!("{api}/api/v1/vms")) else { return false };
    let Some(vms) = vms.as_array() else { return false };
    ids.iter().all(|id| {
        vms.iter().any(|v| {
            v["id"].as_str() == Some(id) && v["status"] == "running" && v["host"].as_str().is_some_and(|h| h != victim)
        })
    })
}

fn measure(a: &HealArgs, nats: &str, dir: &Path) -> anyhow::Result<Value> {
    let http = http();
    let d = |x: Duration| humantime::format_duration(x).to_string();
    let (lease, suspect, timeout) = (d(a.agent_lease), d(a.suspect_after), d(a.host_failure_timeout));
    let o = start_orchestrator(
        nats,
        &dir.join("orchestrator"),
        "orchestrator-1",
        &["--agent-lease", &lease, "--suspect-after", &suspect, "--host-failure-timeout", &timeout],
    )?;
    let api = o.api.clone();
    let _spares = agent(nats, &dir.join("spares"), "spare", a.spares, a)?;
    let spare_ids: Vec<String> =
        (1..=a.spares).map(|i| if a.spares == 1 { "spare".to_owned() } else { format!("spare-{i}") }).collect();
    wait("the spare hosts to register", Duration::from_secs(60), || {
        spare_ids.iter().all(|h| host_state(&http, &api, h).is_some())
    })?;
    let mut runs = Vec::new();
    for run in 0..a.runs {
        let victim = format!("victim-{run}");
        for h in &spare_ids {
            post(&http, &format!("{api}/api/v1/hosts/{h}/cordon"), &json!({}))?;
        }
        let mut proc = agent(nats, &dir.join(&victim), &victim, 1, a)?;
        wait("the victim to register", Duration::from_secs(60), || host_state(&http, &api, &victim).is_some())?;
        let created = post(
            &http,
            &format!("{api}/api/v1/vms"),
            &json!({ "name": format!("heal-{run}"), "vcpus": 1, "memory_mib": 256, "count": a.vms }),
        )?;
        let ids: Vec<String> =
            created.as_array().into_iter().flatten().filter_map(|v| v["id"].as_str().map(str::to_owned)).collect();
        if ids.len() != a.vms as usize {
            bail!("created {} VMs, expected {}: {created}", ids.len(), a.vms);
        }
        wait("the VMs to run on the victim", Duration::from_secs(60), || {
            let Some(vms) = get(&http, &format!("{api}/api/v1/vms")) else { return false };
            ids.iter().all(|id| {
                vms.as_array().into_iter().flatten().any(|v| {
                    v["id"].as_str() == Some(id.as_str())
                        && v["status"] == "running"
                        && v["host"].as_str() == Some(victim.as_str())
                })
            })
        })?;
        for h in &spare_ids {
            post(&http, &format!("{api}/api/v1/hosts/{h}/uncordon"), &json!({}))?;
        }
        // A heartbeat or two after the uncordon, so the kill is not aligned with anything.
        std::thread::sleep(Duration::from_millis(1500));
        proc.0.kill().context("killing the victim")?;
        let killed = Instant::now();
        let _ = proc.0.wait();
        let limit = a.host_failure_timeout + Duration::from_secs(30);
        let mut failed_at = None;
        wait("the VMs to run elsewhere", limit, || {
            if failed_at.is_none() && host_state(&http, &api, &victim).as_deref() == Some("failed") {
                failed_at = Some(killed.elapsed());
            }
            all_moved(&http, &api, &ids, &victim)
        })?;
        let running = killed.elapsed();
        let failed = failed_at.unwrap_or(running);
        runs.push((failed.as_secs_f64(), running.as_secs_f64()));
    }
    let mut failed: Vec<f64> = runs.iter().map(|r| r.0).collect();
    let mut running: Vec<f64> = runs.iter().map(|r| r.1).collect();
    let timeout_s = a.host_failure_timeout.as_secs_f64();
    let lease_s = a.agent_lease.as_secs_f64();
    let med = median(&mut running);
    let max = running.last().copied().unwrap_or(0.0);
    Ok(json!({
        "runs": runs.iter().map(|(f, r)| json!({ "host_failed_s": f, "vms_running_elsewhere_s": r })).collect::<Vec<_>>(),
        "vms_per_host": a.vms,
        "agent_lease_s": lease_s,
        "host_failure_timeout_s": timeout_s,
        "median_host_failed_s": median(&mut failed),
        "median_vms_running_elsewhere_s": med,
        "max_vms_running_elsewhere_s": max,
        "max_after_host_failure_timeout_s": max - timeout_s,
        "max_after_agent_lease_s": max - lease_s,
        "goal": "host failure → VMs running elsewhere ≤ fencing lease + 2 s",
    }))
}

pub async fn run(a: HealArgs) -> anyhow::Result<Value> {
    if a.runs == 0 || a.vms == 0 || a.spares == 0 {
        bail!("--runs, --vms and --spares must be at least 1");
    }
    novacron_protocol::check_fencing(a.agent_lease, a.host_failure_timeout)
        .map_err(|e| anyhow::anyhow!("{e} (see --agent-lease and --host-failure-timeout)"))?;
    let bin = a.nats_server.clone();
    on_local_nats(bin.as_deref(), move |url, dir| measure(&a, url, dir)).await
}
