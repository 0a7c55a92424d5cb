//! `novacron bench qemu` and `novacron bench fleet`: the agent's figures.
//!
//! - `qemu`: start-to-running and stop time of a firmware-only VM, and a live migration on
//!   loopback between two drivers (total time and downtime as QEMU measures them), with KVM
//!   (when usable) and TCG.
//! - `fleet`: one process hosting N simulated hosts on one NATS server; the rate at which they
//!   apply start commands appended to the log, and the memory each host costs.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use novacron_agent::driver::Driver;
use novacron_agent::qemu::{Accel, QemuConfig, QemuDriver};
use novacron_agent::sim::SimDriver;
use novacron_agent::{Agent, AgentConfig};
use novacron_eventlog::{Bus, BusConfig, EventLog};
use novacron_types::{
    Actor, Envelope, EventKind, Generation, HostId, IncarnationId, PrepareIncoming, Resources, StartVm, VmId, VmSpec,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::bench::rss_mib;
use crate::nats_server::{self, LocalNats};

#[derive(Args, Debug)]
pub struct QemuArgs {
    /// Start/stop samples per acceleration mode.
    #[arg(long, default_value_t = 5)]
    runs: u32,
    /// Memory sizes (MiB) of the migrated VMs.
    #[arg(long, value_delimiter = ',', default_value = "256,1024")]
    migrate_mib: Vec<u64>,
}

#[derive(Args, Debug)]
pub struct FleetArgs {
    /// Simulated hosts in the one agent process.
    #[arg(long, default_value_t = 1000)]
    hosts: u32,
    /// Start commands to apply, spread over the hosts.
    #[arg(long, default_value_t = 10_000)]
    commands: u32,
    /// nats-server binary (default: $NOVACRON_NATS_SERVER, .tools/nats/bin/nats-server, PATH).
    #[arg(long)]
    nats_server: Option<std::path::PathBuf>,
}

fn spec(memory_mib: u64) -> VmSpec {
    VmSpec {
        name: "bench".into(),
        vcpus: 1,
        memory_mib,
        disk_gib: 0,
        group: None,
        labels: Default::default(),
        restart: Default::default(),
        placement: Default::default(),
    }
}

fn start_cmd(vm: VmId, incarnation: IncarnationId, memory_mib: u64) -> StartVm {
    StartVm { vm, host: host("bench"), incarnation, generation: Generation(1), spec: spec(memory_mib) }
}

fn host(s: &str) -> HostId {
    HostId::new(s).unwrap_or_else(|_| HostId::new("bench").expect("a valid host id"))
}

fn stats(samples: &mut [f64]) -> Value {
    samples.sort_by(f64::total_cmp);
    let n = samples.len().max(1);
    json!({ "runs": samples.len(), "min_ms": samples.first(), "median_ms": samples.get(n / 2), "max_ms": samples.last() })
}

fn driver(dir: &std::path::Path, accel: Accel) -> anyhow::Result<QemuDriver> {
    let mut cfg = QemuConfig::detect(dir.to_path_buf())?;
    cfg.accel = accel;
    // Firmware-only guests ignore ACPI power-down: measure the stop path that quits at once.
    cfg.powerdown_timeout = Duration::ZERO;
    Ok(QemuDriver::new(cfg))
}

pub async fn qemu(a: &QemuArgs) -> anyhow::Result<Value> {
    let mut modes = vec![Accel::Tcg];
    if Accel::detect() == Accel::Kvm {
        modes.insert(0, Accel::Kvm);
    }
    let mut out = serde_json::Map::new();
    for accel in modes {
        let dir = tempfile::Builder::new().prefix("ncb").tempdir_in("/tmp")?;
        let (da, db) = (dir.path().join("a"), dir.path().join("b"));
        let (source, dest) = (driver(&da, accel)?, driver(&db, accel)?);
        let (mut starts, mut stops) = (Vec::new(), Vec::new());
        for _ in 0..a.runs {
            let (vm, inc) = (VmId::new_v7(), IncarnationId::new_v7());
            let t = Instant::now();
            source.start(&start_cmd(vm, inc, 256)).await?;
            starts.push(t.elapsed().as_secs_f64() * 1000.0);
            let t = Instant::now();
            source.stop(vm, inc).await?;
            stops.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let mut migrations = Vec::new();
        for &mib in &a.migrate_mib {
            let (vm, src, dst) = (VmId::new_v7(), IncarnationId::new_v7(), IncarnationId::new_v7());
            source.start(&start_cmd(vm, src, mib)).await?;
            // Let the firmware run and touch its memory before measuring.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let uri = dest
                .prepare_incoming(&PrepareIncoming {
                    vm,
                    host: host("dest"),
                    incarnation: dst,
                    generation: Generation(2),
                    spec: spec(mib),
                })
                .await?;
            let t = Instant::now();
            let s = source.migrate_out(vm, src, &uri).await?;
            let wall = t.elapsed().as_secs_f64() * 1000.0;
            dest.stop(vm, dst).await?;
            migrations.push(
                json!({ "memory_mib": mib, "total_ms": s.duration_ms, "downtime_ms": s.downtime_ms, "wall_ms": wall }),
            );
        }
        out.insert(
            accel.as_str().to_owned(),
            json!({ "start_to_running": stats(&mut starts), "stop": stats(&mut stops), "migration": migrations, "vm_memory_mib": 256 }),
        );
    }
    Ok(Value::Object(out))
}

pub async fn fleet(a: &FleetArgs) -> anyhow::Result<Value> {
    let bin = nats_server::find(a.nats_server.as_deref())?;
    let dir = tempfile::tempdir()?;
    let nats = LocalNats::start(&bin, &dir.path().join("nats"), 0).await?;
    let result = async {
        let mut bc = BusConfig::new(nats.url.clone(), "novacron-bench-fleet");
        bc.retry_initial_connect = true;
        let bus = Bus::connect(&bc).await?;
        bus.provision(1).await?;
        let db = sled::open(dir.path().join("agents")).context("opening the fleet's journal")?;
        let rss_before = rss_mib();
        let cancel = CancellationToken::new();
        let t = Instant::now();
        let hosts: Vec<HostId> = (0..a.hosts).map(|i| host(&format!("sim-{i:05}"))).collect();
        let mut drivers = Vec::new();
        for h in &hosts {
            let driver = SimDriver::default();
            let mut cfg = AgentConfig::new(h.clone(), Resources { vcpus: 64, memory_mib: 1 << 20, disk_gib: 0 });
            cfg.telemetry_interval = Duration::from_secs(3600);
            let agent = Agent::new(cfg, bus.clone(), driver.clone(), &db)?;
            tokio::spawn(agent.run(cancel.clone()));
            drivers.push(driver);
        }
        // Every host has its consumer once its registration report is stored.
        let mut reports = bus.js.get_stream("REPORTS").await?;
        let deadline = Instant::now() + Duration::from_secs(600);
        while reports.info().await?.state.messages < u64::from(a.hosts) {
            anyhow::ensure!(Instant::now() < deadline, "the fleet did not register within 10 minutes");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let startup_s = t.elapsed().as_secs_f64();
        let rss_started = rss_mib();

        let actor = Actor::Orchestrator("bench".into());
        let events: Vec<Envelope> = (0..a.commands)
            .map(|i| {
                let h = &hosts[i as usize % hosts.len()];
                let mut c = start_cmd(VmId::new_v7(), IncarnationId::new_v7(), 128);
                c.host = h.clone();
                Envelope::new(0, actor.clone(), EventKind::VmStartCommanded(c))
            })
            .collect();
        let mut log = EventLog::open(bus.js.clone()).await?;
        let t = Instant::now();
        log.append(&events).await?;
        let append_s = t.elapsed().as_secs_f64();
        let total = u32::try_from(events.len()).unwrap_or(u32::MAX);
        loop {
            let applied: u32 = drivers.iter().map(SimDriver::total_starts).sum();
            if applied >= total {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "only {applied} of {total} commands applied");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let apply_s = t.elapsed().as_secs_f64();
        let rss_after = rss_mib();
        cancel.cancel();
        anyhow::Ok(json!({
            "hosts": a.hosts,
            "commands": total,
            "startup_seconds": startup_s,
            "append_seconds": append_s,
            "apply_seconds": apply_s,
            "commands_applied_per_sec": f64::from(total) / apply_s,
            "rss_mib_before": rss_before,
            "rss_mib_with_hosts": rss_started,
            "rss_mib_after_commands": rss_after,
            "memory_kib_per_host": (rss_started - rss_before) * 1024.0 / f64::from(a.hosts.max(1)),
        }))
    }
    .await;
    nats.stop().await;
    result
}
