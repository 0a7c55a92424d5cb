//! Group scaling end to end: the real orchestrator and agents (simulated hypervisors, whose VMs
//! report 60 % CPU), the scaler reading their telemetry.

use std::time::Duration;

use novacron_agent::sim::SimDriver;
use novacron_agent::{Agent, AgentConfig};
use novacron_eventlog::{Bus, BusConfig};
use novacron_orchestrator::decide::Origin;
use novacron_orchestrator::{Orchestrator, OrchestratorConfig};
use novacron_state::{ClusterState, VmStatus};
use novacron_testkit::NatsServer;
use novacron_types::{Actor, HostId, Resources};
use tokio_util::sync::CancellationToken;

async fn wait(o: &Orchestrator, what: &str, mut cond: impl FnMut(&ClusterState) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if cond(&o.engine.state.read().unwrap()) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn running_members(s: &ClusterState, g: &str) -> usize {
    s.vms.values().filter(|v| v.spec.group.as_deref() == Some(g) && v.status == VmStatus::Running).count()
}

/// The group's `GroupScaled` events, in log order: (from, to).
async fn scaled_steps(bus: &Bus, group: &str) -> Vec<(u32, u32)> {
    let stream = bus.js.get_stream(novacron_protocol::EVENTS_STREAM).await.unwrap();
    let last = stream.clone().info().await.unwrap().state.last_sequence;
    let mut steps = Vec::new();
    novacron_eventlog::replay(&stream, 1, last, |ev| {
        if let Ok(env) = ev.envelope
            && let novacron_types::EventKind::GroupScaled(g) = env.event
            && g.group == group
            && !g.recommendation_only
        {
            steps.push((g.from, g.to));
        }
    })
    .await
    .unwrap();
    steps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_scales_out_on_rising_load_and_back_in_after_the_cooldown_every_step_an_event() {
    let nats = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = OrchestratorConfig::new(nats.url(), dir.path().join("orch"));
    cfg.http = "127.0.0.1:0".parse().unwrap();
    cfg.reconcile_interval = Duration::from_millis(100);
    let o = Orchestrator::start(cfg, CancellationToken::new()).await.unwrap();
    let bus = Bus::connect(&BusConfig::new(nats.url(), "agents")).await.unwrap();
    let db = sled::open(dir.path().join("agents")).unwrap();
    let cancel = CancellationToken::new();
    let mut drivers = Vec::new();
    for i in 1..=3 {
        let mut a = AgentConfig::new(
            HostId::new(format!("h{i}")).unwrap(),
            Resources { vcpus: 8, memory_mib: 8192, disk_gib: 0 },
        );
        a.telemetry_interval = Duration::from_millis(200);
        let driver = SimDriver::default();
        driver.set_vm_cpu(0.9);
        drivers.push(driver.clone());
        let agent = Agent::new(a, bus.clone(), driver, &db).unwrap();
        let c = cancel.clone();
        tokio::spawn(async move {
            let _ = agent.run(c).await;
        });
    }
    wait(&o, "three hosts", |s| s.hosts.len() == 3).await;

    // 90 % against a 50 % target: 1 → 2 → 4 (the maximum), one cooldown apart.
    let spec = serde_json::from_value(serde_json::json!({
        "name": "web", "min": 1, "max": 4, "vcpus": 1, "memory_mib": 256, "target_cpu": 0.5,
        "scale_up_cooldown_s": 1, "scale_down_cooldown_s": 3, "stabilization_s": 1,
    }))
    .unwrap();
    let origin = Origin { actor: Actor::User("test".into()), correlation: None };
    o.engine.create_group(spec, origin.clone()).await.unwrap();
    wait(&o, "four running members", |s| running_members(s, "web") == 4).await;
    let s = o.engine.state.read().unwrap().clone();
    assert_eq!(s.vms.values().filter(|v| v.spec.group.as_deref() == Some("web")).count(), 4, "never past the maximum");
    let grown_at = s.groups["web"].last_up_ms.unwrap();

    // The load falls to 10 %: back to 1, not before the scale-down cooldown.
    for d in &drivers {
        d.set_vm_cpu(0.1);
    }
    wait(&o, "one member left", |s| {
        s.vms.values().filter(|v| v.spec.group.as_deref() == Some("web") && v.status != VmStatus::Deleted).count() == 1
    })
    .await;
    let shrunk_at = o.engine.state.read().unwrap().groups["web"].last_down_ms.unwrap();
    assert!(shrunk_at >= grown_at + 3_000, "the scale-down waited out the cooldown: {shrunk_at} vs {grown_at}");

    // Every change of size is a GroupScaled event, and they chain.
    let steps = scaled_steps(&bus, "web").await;
    assert_eq!(steps.first().map(|s| s.0), Some(0), "{steps:?}");
    assert!(steps.windows(2).all(|w| w[0].1 == w[1].0), "each step starts where the last ended: {steps:?}");
    assert_eq!(steps.iter().map(|s| s.1).max(), Some(4), "{steps:?}");
    assert_eq!(steps.last().map(|s| s.1), Some(1), "{steps:?}");

    o.engine.delete_group("web".into(), origin).await.unwrap();
    wait(&o, "members deleted", |s| {
        !s.groups.contains_key("web")
            && s.vms.values().filter(|v| v.spec.group.as_deref() == Some("web")).all(|v| v.status == VmStatus::Deleted)
    })
    .await;
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_model_forecasts_for_the_groups_and_its_live_errors_are_scored() {
    // A model that says "nine tenths of the last value": against members at 60 % it is 6
    // points off.
    let mut w = [0.0; novacron_predict::model::FEATURES];
    w[1] = 0.9;
    promoted_model_is_scored(novacron_predict::model::Artifact::global_linear(&[(1, w)]), 5.9..6.1).await;
}

#[tokio::test]
async fn a_promoted_boosted_trees_model_is_loaded_from_the_object_store_and_scored() {
    // Trees trained on a load that never leaves 30 %: they say 30 whatever they see, so
    // against members at 60 % they are 30 points off. (Megabytes of trees for real traces:
    // the artifact store is an object store for that.)
    use novacron_predict::train::{GbdtConfig, Split, train_global_gbdt};
    let series = vec![novacron_predict::series::Series { name: "flat".into(), values: vec![30.0; 600] }];
    let cfg = GbdtConfig { max_samples: 600, max_rounds: 10, ..GbdtConfig::default() };
    let fits = train_global_gbdt(&series, &[Split::fractions(600, 0.2, 0.2)], &[1], &cfg).unwrap();
    let models: Vec<_> = fits.iter().map(|f| (f.horizon, f.model.clone())).collect();
    promoted_model_is_scored(novacron_predict::model::Artifact::global_gbdt(&models).unwrap(), 29.9..30.1).await;
}

/// Stores and registers `artifact` as `models train` would, promotes it, runs a forecast-only
/// group at 60 % and waits until the model's live MAE, scored as samples arrive, is in
/// `expected_mae`; then the accuracy trigger asks for retraining.
async fn promoted_model_is_scored(artifact: novacron_predict::model::Artifact, expected_mae: std::ops::Range<f64>) {
    use sha2::Digest;
    let nats = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = OrchestratorConfig::new(nats.url(), dir.path().join("orch"));
    cfg.http = "127.0.0.1:0".parse().unwrap();
    cfg.reconcile_interval = Duration::from_millis(100);
    cfg.forecast_step = Duration::from_millis(100);
    // An accuracy trigger that model fails: once 3 forecasts are scored, it fires.
    cfg.retraining.live_mae_above = Some(1.0);
    cfg.retraining.min_forecasts = 3;
    let o = Orchestrator::start(cfg, CancellationToken::new()).await.unwrap();
    let bus = Bus::connect(&BusConfig::new(nats.url(), "agents")).await.unwrap();
    let db = sled::open(dir.path().join("agents")).unwrap();
    let cancel = CancellationToken::new();
    let mut a = AgentConfig::new(HostId::new("h1").unwrap(), Resources { vcpus: 8, memory_mib: 8192, disk_gib: 0 });
    a.telemetry_interval = Duration::from_millis(100);
    let agent = Agent::new(a, bus.clone(), SimDriver::default(), &db).unwrap();
    let c = cancel.clone();
    tokio::spawn(async move {
        let _ = agent.run(c).await;
    });
    wait(&o, "the host", |s| s.hosts.len() == 1).await;

    let kind = artifact.kind.clone();
    let artifact = serde_json::to_vec(&artifact).unwrap();
    let digest: String = sha2::Sha256::digest(&artifact).iter().map(|b| format!("{b:02x}")).collect();
    bus.model_artifacts(1).await.unwrap().put(&format!("sha256-{digest}"), &artifact).await.unwrap();
    let id = format!("{kind}-{}", &digest[..12]);
    let record: novacron_types::model::ModelTrained = serde_json::from_value(serde_json::json!({
        "model": id, "kind": kind, "digest": digest,
        "hyperparameters": [{"horizon": 1, "learning_rate": 0.01, "l2": 0.0, "epochs": 1}],
        "scores": [{"horizon": 1, "validation_mae": 1.0, "test_mae": 1.0, "baseline_mae": 1.0, "baseline": "last-value", "win_rate": 0.5}],
        "data": {"sources": ["test"], "series": 1, "val_share": 0.2, "test_share": 0.2, "seed": 1},
    }))
    .unwrap();
    let origin = Origin { actor: Actor::User("test".into()), correlation: None };
    use novacron_orchestrator::decide::ModelAction;
    o.engine.model(ModelAction::Register(Box::new(record)), origin.clone()).await.unwrap();
    o.engine.model(ModelAction::Promote { model: id.clone(), reason: "test".into() }, origin.clone()).await.unwrap();

    let spec = serde_json::from_value(serde_json::json!({
        "name": "api", "min": 1, "max": 1, "vcpus": 1, "memory_mib": 256, "target_cpu": 0.6, "mode": "forecast-only",
    }))
    .unwrap();
    o.engine.create_group(spec, origin).await.unwrap();
    wait(&o, "the member running", |s| running_members(s, "api") == 1).await;
    // The members run at 60 %; the promoted model's one-step forecasts are scored as samples
    // arrive, under its own id.
    let api = format!("http://{}", o.http_addr);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let api = api.clone();
        let (_, models) =
            tokio::task::spawn_blocking(move || crate::harness::get(&api, "/api/v1/models")).await.unwrap();
        let live = &models["live"][&id];
        if live["forecasts"].as_u64().is_some_and(|n| n >= 3) {
            assert!(live["live_mae"].as_f64().is_some_and(|m| expected_mae.contains(&m)), "{expected_mae:?}: {models}");
            assert_eq!(models["in_use"], id.as_str());
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no live forecasts scored: {models}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait(&o, "a retraining request from the accuracy trigger", |s| {
        s.retraining_requests.get(&id).is_some_and(|n| *n == 1)
    })
    .await;
    cancel.cancel();
}
