//! The long-running commands: `up`, `orchestrator`, `agent`.

use std::time::Duration;

use anyhow::{Context, bail};
use novacron_agent::qemu::{QemuConfig, QemuDriver};
use novacron_agent::{Agent, AgentConfig, FenceAction, run_sim_fleet};
use novacron_eventlog::{Bus, BusConfig};
use novacron_orchestrator::{Orchestrator, OrchestratorConfig};
use novacron_types::{HostId, Labels, Resources};
use tokio_util::sync::CancellationToken;

use crate::nats_server::{self, LocalNats};
use crate::{AgentArgs, DriverKind, FenceArg, Format, OrchestratorArgs, UpArgs, output};

/// Resolves when the process gets SIGINT (Ctrl-C) or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// The simulated hosts of `up`: 16 vCPUs, 64 GiB, 500 GiB each, alternating between two zones.
fn sim_hosts(n: u32) -> anyhow::Result<Vec<AgentConfig>> {
    (1..=n)
        .map(|i| {
            let mut cfg = AgentConfig::new(
                HostId::new(format!("host-{i}"))?,
                Resources { vcpus: 16, memory_mib: 65536, disk_gib: 500 },
            );
            cfg.labels.insert("zone".into(), if i % 2 == 1 { "zone-a".into() } else { "zone-b".into() });
            Ok(cfg)
        })
        .collect()
}

pub async fn up(a: UpArgs, token: Option<String>, fmt: Format) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.data_dir).with_context(|| format!("creating --data-dir {}", a.data_dir.display()))?;
    let data = std::fs::canonicalize(&a.data_dir)?;
    let bin = nats_server::find(a.nats_server.as_deref())?;
    let nats = LocalNats::start(&bin, &data.join("nats"), a.nats_port).await?;
    let cancel = CancellationToken::new();

    let mut cfg = OrchestratorConfig::new(nats.url.clone(), data.join("orchestrator"));
    cfg.http = a.http;
    cfg.risk_model = a.risk_model.as_deref().map(read_risk_model).transpose()?;
    cfg.token = token.clone();
    let orchestrator = match Orchestrator::start(cfg, cancel.clone()).await {
        Ok(o) => o,
        Err(e) => {
            nats.stop().await;
            return Err(anyhow::Error::new(e).context("starting the orchestrator"));
        }
    };

    let mut bus_cfg = BusConfig::new(nats.url.clone(), "novacron-agents");
    bus_cfg.retry_initial_connect = true;
    let bus = Bus::connect(&bus_cfg).await?;
    let lane = novacron_agent::LeaseLane::start(&BusConfig { name: "novacron-agents-leases".into(), ..bus_cfg })
        .await
        .map_err(|e| anyhow::anyhow!("starting the agents' lease lane: {e}"))?;
    let db = sled::open(data.join("agents")).context("opening the agents' journal")?;
    let fleet = match a.driver {
        DriverKind::Sim => tokio::spawn(run_sim_fleet(bus, lane, db, sim_hosts(a.hosts)?, cancel.clone())),
        DriverKind::Qemu => {
            // Small "hosts" on this one machine, each with its own QEMU directory.
            novacron_agent::journal::migrate_per_host_trees(&db)
                .context("moving the agents' journals of an earlier version into their current layout")?;
            let mut agents = Vec::new();
            for mut cfg in sim_hosts(a.hosts)? {
                cfg.capacity = Resources { vcpus: 4, memory_mib: 4096, disk_gib: 50 };
                let mut qemu = QemuConfig::detect(data.join("qemu").join(cfg.host.as_str()))?;
                qemu.keeper = Some(keeper(cfg.fence_action)?);
                agents.push(Agent::new(cfg, bus.clone(), QemuDriver::new(qemu), &db)?);
            }
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let tracker = tokio_util::task::TaskTracker::new();
                for agent in agents {
                    let cancel = cancel.clone();
                    tracker.spawn(async move {
                        if let Err(e) = agent.run(cancel).await {
                            tracing::error!(error = %novacron_agent::ErrorChain(&e), "agent stopped");
                        }
                    });
                }
                tracker.close();
                tracker.wait().await;
            })
        }
    };

    let api = format!("http://{}", orchestrator.http_addr);
    // With a token, the dashboard takes it from the URL's fragment (never sent to the server).
    let dashboard = if token.is_some() { format!("{api}/#token=<your NOVACRON_TOKEN>") } else { format!("{api}/") };
    match fmt {
        Format::Json => output::json(&serde_json::json!({
            "api": api, "dashboard": format!("{api}/"), "nats": nats.url,
            "data_dir": data, "hosts": a.hosts, "token_required": token.is_some(),
        }))?,
        Format::Text => {
            println!("NovaCron is up.");
            println!("  dashboard  {dashboard}");
            println!("  API        {api}/api/v1   (novacron --server {api} vm list)");
            println!("  NATS       {}", nats.url);
            println!("  hosts      {} simulated (host-1 … host-{})", a.hosts, a.hosts);
            println!("  data       {}", data.display());
            println!("Try: novacron vm create web-1 --vcpus 2 --memory-mib 2048");
            println!("Ctrl-C stops everything; `up` again on the same --data-dir resumes.");
        }
    }

    tokio::select! {
        () = shutdown_signal() => tracing::info!("shutting down"),
        () = cancel.cancelled() => tracing::error!("a component stopped; shutting down"),
    }
    cancel.cancel();
    orchestrator.wait().await;
    let _ = fleet.await;
    nats.stop().await;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Reads a failure-risk model written by `models risk --save`; errors name the file and, for
/// malformed JSON, the line and column.
pub fn read_risk_model(path: &std::path::Path) -> anyhow::Result<novacron_predict::risk::RiskModel> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the risk model {}", path.display()))?;
    let model: novacron_predict::risk::RiskModel =
        serde_json::from_str(&text).with_context(|| format!("{}: not a risk model", path.display()))?;
    model.check().with_context(|| format!("{}: unusable risk model", path.display()))?;
    Ok(model)
}

/// This binary's `qemu-fence-keeper`, fencing as the agent does.
fn keeper(action: novacron_agent::FenceAction) -> anyhow::Result<novacron_agent::qemu::KeeperConfig> {
    let exe = std::env::current_exe().context("finding this binary to start the lease keeper")?;
    Ok(novacron_agent::qemu::KeeperConfig { command: vec![exe.into_os_string(), "qemu-fence-keeper".into()], action })
}

pub async fn orchestrator(nats: &str, a: OrchestratorArgs, token: Option<String>) -> anyhow::Result<()> {
    let mut cfg = OrchestratorConfig::new(nats, a.data_dir);
    cfg.http = a.http;
    cfg.replica_id = a.replica_id;
    cfg.replicas = a.replicas;
    cfg.suspect_after = a.suspect_after;
    cfg.host_failure_timeout = a.host_failure_timeout;
    cfg.agent_lease = a.agent_lease;
    cfg.lease = novacron_orchestrator::leader::LeaseConfig { ttl: a.leader_lease };
    cfg.planner = a.placement.config();
    cfg.risk_model = a.risk_model.as_deref().map(read_risk_model).transpose()?;
    cfg.token = token.clone();
    if let (Some(file), Some(name)) = (&a.config, &a.profile) {
        let p = crate::profile::load(file, name)?;
        crate::profile::apply(&p, &mut cfg);
        tracing::info!(profile = %name, file = %file.display(), "orchestrator profile applied");
    }
    let cancel = CancellationToken::new();
    let o = Orchestrator::start(cfg, cancel.clone()).await.context("starting the orchestrator")?;
    println!("novacron orchestrator: API on http://{}", o.http_addr);
    tokio::select! {
        () = shutdown_signal() => {}
        () = cancel.cancelled() => {}
    }
    cancel.cancel();
    o.wait().await;
    Ok(())
}

pub async fn agent(nats: &str, a: AgentArgs) -> anyhow::Result<()> {
    if a.count == 0 {
        bail!("--count must be at least 1");
    }
    if a.count > 1 && a.driver == DriverKind::Qemu {
        bail!("--count > 1 is for simulated hosts; run one agent per QEMU host");
    }
    let labels: Labels = a.labels.into_iter().collect();
    let capacity = Resources { vcpus: a.vcpus, memory_mib: a.memory_mib, disk_gib: a.disk_gib };
    let mut hosts = Vec::new();
    for i in 1..=a.count {
        let id = if a.count == 1 { a.host.clone() } else { format!("{}-{i}", a.host) };
        let host = HostId::new(id).context("--host")?;
        let mut cfg = AgentConfig::new(host, capacity);
        cfg.labels = labels.clone();
        cfg.lease = a.lease;
        cfg.host_failure_timeout = a.host_failure_timeout;
        cfg.fence_action = match a.fence_action {
            FenceArg::Stop => FenceAction::Stop,
            FenceArg::Pause => FenceAction::Pause,
        };
        cfg.check().map_err(|e| anyhow::anyhow!("{e} (see --lease and --host-failure-timeout)"))?;
        hosts.push(cfg);
    }
    std::fs::create_dir_all(&a.data_dir)?;
    let db = sled::open(&a.data_dir).with_context(|| format!("opening the journal in {}", a.data_dir.display()))?;
    let mut bus_cfg = BusConfig::new(nats, format!("novacron-agent-{}", a.host));
    bus_cfg.retry_initial_connect = true;
    let lease_cfg = BusConfig { name: format!("novacron-agent-{}-leases", a.host), ..bus_cfg.clone() };
    let lane = tokio::time::timeout(Duration::from_secs(60), novacron_agent::LeaseLane::start(&lease_cfg))
        .await
        .context("connecting to NATS timed out")?
        .map_err(|e| anyhow::anyhow!("starting the agent's lease lane: {e}"))?;
    let bus = tokio::time::timeout(Duration::from_secs(60), Bus::connect(&bus_cfg))
        .await
        .context("connecting to NATS timed out")??;
    let cancel = CancellationToken::new();
    match a.driver {
        DriverKind::Sim => {
            let fleet = tokio::spawn(run_sim_fleet(bus, lane, db, hosts, cancel.clone()));
            shutdown_signal().await;
            cancel.cancel();
            let _ = fleet.await;
        }
        DriverKind::Qemu => {
            let cfg = hosts.remove(0);
            let mut qemu = QemuConfig::detect(a.data_dir.join("qemu"))?;
            qemu.powerdown_timeout = a.powerdown_timeout;
            qemu.keeper = Some(keeper(cfg.fence_action)?);
            tracing::info!(accel = qemu.accel.as_str(), dir = %qemu.data_dir.display(), "QEMU driver");
            novacron_agent::journal::migrate_per_host_trees(&db)
                .context("moving the agent journal of an earlier version into its current layout")?;
            let agent = Agent::new(cfg, bus, QemuDriver::new(qemu), &db)?.with_lease_lane(&lane);
            let run = tokio::spawn(agent.run(cancel.clone()));
            tokio::select! {
                () = shutdown_signal() => {}
                r = run => return Ok(r??),
            }
            cancel.cancel();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::read_risk_model;

    #[test]
    fn a_risk_model_file_is_read_or_refused_with_its_path_and_what_is_wrong() {
        let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/models/failure-risk.json");
        assert_eq!(read_risk_model(&shipped).unwrap().feature_version, novacron_predict::risk::RISK_FEATURE_VERSION);
        let dir = tempfile::tempdir().unwrap();
        let err = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            format!("{:#}", read_risk_model(&p).unwrap_err())
        };
        let e = err("broken.json", "{\n  \"feature_version\": 1,\n  \"weights\": [1, 2\n}");
        assert!(e.contains("broken.json") && e.contains("line 4"), "{e}");
        let e = err("extra.json", &std::fs::read_to_string(&shipped).unwrap().replacen('{', "{\"bias\": 1,", 1));
        assert!(e.contains("extra.json") && e.contains("unknown field `bias`"), "{e}");
        let e = err(
            "old.json",
            &std::fs::read_to_string(&shipped).unwrap().replace("\"feature_version\": 1", "\"feature_version\": 9"),
        );
        assert!(e.contains("old.json") && e.contains("feature version 9"), "{e}");
        let missing = format!("{:#}", read_risk_model(&dir.path().join("nope.json")).unwrap_err());
        assert!(missing.contains("cannot read the risk model") && missing.contains("nope.json"), "{missing}");
    }
}
