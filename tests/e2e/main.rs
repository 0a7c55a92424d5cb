//! End-to-end: the real `novacron` binary against real nats-server processes.

mod harness;
mod healing;
mod migration;
mod scaling;

use std::time::Duration;

use harness::*;
use novacron_testkit::NatsServer;
use serde_json::{Value, json};

#[test]
fn a_vm_created_through_the_api_runs_and_the_replayed_state_matches() {
    let nats = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let o = Orchestrator::start(&nats.url(), &dir.path().join("orch"));
    let _agents = agents(&nats.url(), "host", 2, &dir.path().join("agents"));
    wait_for("two hosts", || get(&o.api, "/api/v1/hosts").1.as_array().is_some_and(|h| h.len() == 2));

    let (status, vm) = post(&o.api, "/api/v1/vms", &json!({"name": "web-1", "vcpus": 2, "memory_mib": 2048}));
    assert_eq!(status, 201, "{vm}");
    let id = vm["id"].as_str().unwrap().to_owned();
    assert!(vm["host"].is_string(), "placed at once: {vm}");
    assert_eq!(vm["generation"], 1);
    wait_for("web-1 running", || vm_status(&o.api, &id) == "running");

    // The CLI speaks the contract: vm show -o json has the fixed fields.
    let shown = cli_json(&["--server", &o.api, "vm", "show", "web-1"]);
    for field in ["id", "name", "status", "host", "generation", "vcpus", "memory_mib"] {
        assert!(shown.get(field).is_some(), "vm show lacks {field}: {shown}");
    }
    assert_eq!(shown["status"], "running");
    let hosts = cli_json(&["--server", &o.api, "host", "list"]);
    assert_eq!(hosts.as_array().unwrap().iter().map(|h| h["vms"].as_u64().unwrap()).sum::<u64>(), 1);

    // The log says why: VmPlaced with its explanation, then the command to the host.
    let events = cli_json(&["--nats", &nats.url(), "events"]);
    let kinds: Vec<&str> = events.as_array().unwrap().iter().filter_map(|e| e["kind"].as_str()).collect();
    for k in ["HostRegistered", "VmRequested", "VmPlaced", "VmStartCommanded", "VmRunning"] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    let placed = events.as_array().unwrap().iter().find(|e| e["kind"] == "VmPlaced").unwrap();
    assert_eq!(placed["payload"]["explanation"]["hosts_considered"], 2);

    // The decision explains itself, through the API and `novacron explain`.
    let decision_id = placed["id"].as_str().unwrap();
    let explained = cli_json(&["--server", &o.api, "explain", decision_id]);
    assert_eq!(explained["kind"], "VmPlaced");
    assert_eq!(explained["vm_name"], "web-1");
    assert_eq!(explained["host"], placed["payload"]["host"]);
    assert_eq!(explained["explanation"]["hosts_considered"], 2);
    assert!(!explained["explanation"]["candidates"].as_array().unwrap().is_empty());
    let (ok, text, _) = cli(&["--server", &o.api, "explain", decision_id]);
    assert!(ok && text.contains("candidates (best first)") && text.contains("FIT"), "{text}");
    let (status, list) = get(&o.api, "/api/v1/decisions?vm=web-1");
    assert_eq!(status, 200);
    assert_eq!(list.as_array().unwrap()[0]["id"], decision_id);
    // Filtered by VM: another VM's decision is not in web-1's list, and is in its own.
    let (status, _) = post(&o.api, "/api/v1/vms", &json!({"name": "web-2", "vcpus": 1, "memory_mib": 256}));
    assert_eq!(status, 201);
    for name in ["web-1", "web-2"] {
        let list = get(&o.api, &format!("/api/v1/decisions?vm={name}")).1;
        let list = list.as_array().unwrap();
        assert_eq!(list.len(), 1, "{name}: {list:?}");
        assert_eq!(list[0]["vm_name"], name);
    }
    assert_eq!(get(&o.api, "/api/v1/decisions").1.as_array().unwrap().len(), 2);
    assert_eq!(get(&o.api, "/api/v1/decisions?vm=nope").0, 404);
    let (ok, _, err) = cli(&["--server", &o.api, "explain", "01900000-0000-7000-8000-000000000000"]);
    assert!(!ok && err.contains("404"), "{err}");

    // Replayed straight from JetStream, without the orchestrator, the state hashes the same.
    let replayed = cli_json(&["--nats", &nats.url(), "state"]);
    let (_, live) = get(&o.api, "/api/v1/state");
    assert_eq!(replayed, live, "novacron state (replay) vs GET /api/v1/state");
    assert_eq!(live["vms"], 2);
    assert_eq!(live["hosts"], 2);
}

#[test]
fn a_killed_orchestrator_restarts_with_the_same_state_and_every_acknowledged_vm() {
    let nats = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let orch_dir = dir.path().join("orch");
    let mut o = Orchestrator::start(&nats.url(), &orch_dir);
    let _agents = agents(&nats.url(), "host", 3, &dir.path().join("agents"));
    wait_for("three hosts", || get(&o.api, "/api/v1/hosts").1.as_array().is_some_and(|h| h.len() == 3));

    // Create VMs from another thread while we kill the orchestrator under it.
    let api = o.api.clone();
    let creator = std::thread::spawn(move || {
        let mut acknowledged = Vec::new();
        for i in 0..200 {
            let (status, vm) =
                post(&api, "/api/v1/vms", &json!({"name": format!("vm-{i}"), "vcpus": 1, "memory_mib": 128}));
            match status {
                201 => acknowledged.push(vm["id"].as_str().unwrap().to_owned()),
                _ => break, // the orchestrator is gone
            }
        }
        acknowledged
    });
    wait_for("some VMs acknowledged", || get(&o.api, "/api/v1/state").1["vms"].as_u64().unwrap_or(0) >= 10);
    o.proc.kill9();
    let acknowledged = creator.join().unwrap();
    assert!(acknowledged.len() >= 10);

    let o = Orchestrator::start(&nats.url(), &orch_dir);
    for id in &acknowledged {
        let (status, vm) = get(&o.api, &format!("/api/v1/vms/{id}"));
        assert_eq!(status, 200, "acknowledged VM {id} lost after a crash");
        assert_ne!(vm["status"], "deleted");
    }
    wait_for("every acknowledged VM running", || acknowledged.iter().all(|id| vm_status(&o.api, id) == "running"));

    // Quiet now: a second crash and restart, this time from the snapshot. The new term adds a
    // LeaderElected; everything before it is untouched, and the live state equals a replay.
    let before = get(&o.api, "/api/v1/state").1;
    let mut o = o;
    o.proc.kill9();
    let o = Orchestrator::start(&nats.url(), &orch_dir);
    wait_for("the restarted replica leads", || get(&o.api, "/api/v1/leader").1["role"] == "leader");
    let at = before["seq"].as_u64().unwrap().to_string();
    assert_eq!(
        cli_json(&["--nats", &nats.url(), "state", "--at", &at]),
        before,
        "history up to the crash is unchanged"
    );
    wait_for("the live state equals a fresh replay", || {
        cli_json(&["--nats", &nats.url(), "state"]) == get(&o.api, "/api/v1/state").1
    });
    assert_eq!(get(&o.api, "/api/v1/state").1["vms"], before["vms"]);
}

#[test]
fn an_orchestrator_whose_bus_is_gone_still_stops_at_once_on_sigterm() {
    let mut nats = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut o = Orchestrator::start(&nats.url(), &dir.path().join("orch"));
    // Keep the engine appending (creates with nowhere to go: requested, then refused), so that
    // the bus dies under an append, which retries for up to 30 s.
    let api = o.api.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let creating = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut made = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let body = json!({"name": format!("v-{made}"), "vcpus": 1, "memory_mib": 64});
                if post(&api, "/api/v1/vms", &body).0 == 201 {
                    made += 1;
                }
            }
            made
        })
    };
    wait_for("creates under way", || get(&o.api, "/api/v1/state").1["vms"].as_u64().is_some_and(|n| n >= 5));
    nats.kill();
    // It notices (the lease cannot be renewed), then every bus request waits out a timeout of
    // seconds, and an append retries for 30; none of them may hold up a shutdown.
    wait_for("the orchestrator to step down", || get(&o.api, "/api/v1/leader").1["role"] == "follower");
    let asked = std::time::Instant::now();
    assert!(o.proc.terminate().success(), "exit status: {}", o.proc.stderr());
    let took = asked.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(creating.join().unwrap() >= 5);
    assert!(took < Duration::from_secs(4), "took {took:?} to stop without its bus");
}

#[test]
fn malformed_messages_are_dead_lettered_and_the_system_keeps_working() {
    let nats = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let o = Orchestrator::start(&nats.url(), &dir.path().join("orch"));
    let _agents = agents(&nats.url(), "host", 1, &dir.path().join("agents"));
    wait_for("a host", || get(&o.api, "/api/v1/hosts").1.as_array().is_some_and(|h| h.len() == 1));

    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = nats.url();
    let dead_letters: Vec<(String, String)> = rt.block_on(async move {
        let client = async_nats::connect(&url).await.unwrap();
        let js = async_nats::jetstream::new(client.clone());
        let json_headers = || {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Content-Type", "application/json");
            h
        };
        let bad: Vec<(&str, Option<async_nats::HeaderMap>, &[u8])> = vec![
            ("nc.report.host", None, b"\xc1\xc1garbage"),
            ("nc.report.host", Some(json_headers()), br#"{"schema":1}"#),
            (
                "nc.telemetry.host.host",
                Some(json_headers()),
                br#"{"schema":2,"host":"host","at_ms":1,"cpu_util":0.5,"memory_used_mib":1}"#,
            ),
            (
                "nc.telemetry.host.host",
                Some(json_headers()),
                br#"{"schema":1,"host":"host","at_ms":1,"cpu_util":-3.0,"memory_used_mib":1}"#,
            ),
            (
                "nc.telemetry.host.host",
                Some(json_headers()),
                br#"{"schema":1,"host":"host","at_ms":1,"cpu_util":0.5,"memory_used_mib":1,"vms":[{"vm":"0190f3c4-0000-7000-8000-000000000001","cpu_util":7.0,"memory_used_mib":1}]}"#,
            ),
            (
                "nc.telemetry.host.nobody",
                Some(json_headers()),
                br#"{"schema":1,"host":"nobody","at_ms":1,"cpu_util":0.5,"memory_used_mib":1}"#,
            ),
        ];
        for (subject, headers, payload) in bad {
            let ack = match headers {
                Some(h) => js.publish_with_headers(subject, h, payload.to_vec().into()).await,
                None => js.publish(subject, payload.to_vec().into()).await,
            };
            ack.unwrap().await.unwrap();
        }
        client.publish("nc.hb.host", "not a heartbeat".into()).await.unwrap();
        client.flush().await.unwrap();

        let stream = js.get_stream("DEADLETTER").await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let n = stream.clone().info().await.unwrap().state.messages;
            if n >= 7 || tokio::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut out = Vec::new();
        let last = stream.clone().info().await.unwrap().state.last_sequence;
        for seq in 1..=last {
            let m = stream.get_raw_message(seq).await.unwrap();
            let reason = m.headers.get("Nc-Deadletter-Reason").map(|v| v.as_str().to_owned()).unwrap_or_default();
            out.push((m.subject.to_string(), reason));
        }
        out
    });
    assert_eq!(dead_letters.len(), 7, "{dead_letters:#?}");
    let reasons = |subject: &str| -> Vec<String> {
        dead_letters.iter().filter(|(s, _)| s == subject).map(|(_, r)| r.clone()).collect()
    };
    let reports = reasons("nc.deadletter.reports").join(" | ");
    assert!(reports.contains("MessagePack") && reports.contains("JSON"), "{reports}");
    let telemetry = reasons("nc.deadletter.telemetry").join(" | ");
    for needle in ["schema version 2", "cpu_util", "vms[0].cpu_util", "unknown host nobody"] {
        assert!(telemetry.contains(needle), "telemetry dead letters lack {needle:?}: {telemetry}");
    }
    assert_eq!(reasons("nc.deadletter.heartbeats").len(), 1);

    let metrics = harness_metrics(&o.api);
    assert!(metrics.contains("novacron_deadletters_total"), "the counter is exported");

    // A sample of a VM the log does not know (deleted a moment ago, say) is not malformed:
    // it is counted and left out, and the rest of the message is taken.
    let url = nats.url();
    rt.block_on(async move {
        let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
        let mut h = async_nats::HeaderMap::new();
        h.insert("Content-Type", "application/json");
        let body = br#"{"schema":1,"host":"host","at_ms":1,"cpu_util":0.5,"memory_used_mib":1,"vms":[{"vm":"0190f3c4-0000-7000-8000-000000000002","cpu_util":0.5,"memory_used_mib":1}]}"#;
        js.publish_with_headers("nc.telemetry.host.host", h, body.to_vec().into()).await.unwrap().await.unwrap();
    });
    wait_for("the unknown VM's sample counted", || {
        harness_metrics(&o.api).contains(r#"novacron_telemetry_samples_total{outcome="unknown_vm"} 1"#)
    });
    let dead = rt.block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(&nats.url()).await.unwrap());
        js.get_stream("DEADLETTER").await.unwrap().info().await.unwrap().state.messages
    });
    assert_eq!(dead, 7, "nothing more dead-lettered");

    let (status, vm) = post(&o.api, "/api/v1/vms", &json!({"name": "after", "vcpus": 1, "memory_mib": 256}));
    assert_eq!(status, 201);
    let id = vm["id"].as_str().unwrap().to_owned();
    wait_for("the system still places and runs VMs", || vm_status(&o.api, &id) == "running");

    let (status, err) = post(&o.api, "/api/v1/vms", &json!({"name": "x", "vcpus": 1, "memory_mib": "lots"}));
    assert_eq!(status, 400);
    assert_eq!(err["field"], "memory_mib", "{err}");
}

fn harness_metrics(api: &str) -> String {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    agent.get(format!("{api}/metrics")).call().unwrap().body_mut().read_to_string().unwrap()
}

#[test]
fn up_runs_a_cluster_that_places_web_1_and_a_second_up_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    let start_up = || {
        let mut p = Proc::spawn(
            "up",
            &["up", "--hosts", "3", "--data-dir", d, "--http", "127.0.0.1:0", "--nats-port", "0", "-o", "json"],
        );
        let mut out = std::io::BufReader::new(p.child.stdout.take().unwrap());
        let mut text = String::new();
        let banner: Value = loop {
            let mut line = String::new();
            let n = std::io::BufRead::read_line(&mut out, &mut line).unwrap();
            assert!(n > 0, "up exited before printing its banner: {}", p.stderr());
            text.push_str(&line);
            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                break v;
            }
        };
        (p, banner)
    };

    let (mut up, banner) = start_up();
    let api = banner["api"].as_str().unwrap().to_owned();
    wait_for("three hosts", || get(&api, "/api/v1/hosts").1.as_array().is_some_and(|h| h.len() == 3));
    let vm = cli_json(&["--server", &api, "vm", "create", "web-1", "--vcpus", "2", "--memory-mib", "2048"]);
    assert_eq!(vm["name"], "web-1");
    wait_for("web-1 running", || cli_json(&["--server", &api, "vm", "show", "web-1"])["status"] == "running");
    let (status, page) = get_text(&api, "/");
    assert_eq!(status, 200);
    assert!(page.contains("NovaCron"), "the dashboard is served");
    // Every API the dashboard reads answers (it shows hosts, VMs, groups, policies, models).
    let reads: Vec<&str> =
        page.split("get(\"").skip(1).filter_map(|r| r.split('"').next()).filter(|p| p.starts_with('/')).collect();
    assert!(reads.len() >= 6, "{reads:?}");
    for path in reads {
        assert_eq!(get(&api, path).0, 200, "the dashboard reads {path}");
    }
    let cordoned = cli_json(&["--server", &api, "host", "cordon", "host-2"]);
    assert_eq!(cordoned["state"], "cordoned");
    assert_eq!(cli_json(&["--server", &api, "host", "uncordon", "host-2"])["state"], "ready");
    let (ok, _, err) = cli(&["--server", &api, "host", "drain", "no-such-host"]);
    assert!(!ok && err.contains("404"), "{err}");
    let before = get(&api, "/api/v1/state").1;
    let nats_url = banner["nats"].as_str().unwrap().to_owned();

    assert!(up.terminate().success(), "up exits 0 on SIGTERM: {}", up.stderr());
    let (mut up, banner) = start_up();
    let api = banner["api"].as_str().unwrap().to_owned();
    let nats_url_2 = banner["nats"].as_str().unwrap().to_owned();
    let _ = nats_url;
    // The same history (a new term only adds its LeaderElected), web-1 still there.
    wait_for("leading again", || get(&api, "/api/v1/leader").1["role"] == "leader");
    let at = before["seq"].as_u64().unwrap().to_string();
    assert_eq!(cli_json(&["--nats", &nats_url_2, "state", "--at", &at]), before);
    assert_eq!(cli_json(&["--server", &api, "vm", "show", "web-1"])["status"], "running");
    assert!(up.terminate().success());
}

fn get_text(api: &str, path: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut r = agent.get(format!("{api}{path}")).call().unwrap();
    (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
}

#[test]
fn with_a_token_the_api_refuses_requests_without_it_and_the_cli_sends_it() {
    let nats = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let o = Orchestrator::start_with(&nats.url(), &dir.path().join("orch"), &["--token", "s3cret-t0ken"]);
    let _agents = agents(&nats.url(), "host", 1, &dir.path().join("agents"));

    let (status, body) = get(&o.api, "/api/v1/state");
    assert_eq!(status, 401, "{body}");
    assert!(body["error"].as_str().unwrap().contains("NOVACRON_TOKEN"), "says how: {body}");
    assert_eq!(get_authorized(&o.api, "/api/v1/vms", "Bearer s3cret-t0kem").0, 401, "a wrong token");
    assert_eq!(get_authorized(&o.api, "/api/v1/vms", "s3cret-t0ken").0, 401, "not a bearer token");
    let (status, state) = get_authorized(&o.api, "/api/v1/state", "Bearer s3cret-t0ken");
    assert_eq!(status, 200, "{state}");
    let (status, doc) = get_authorized(&o.api, "/api/v1/openapi.json", "Bearer s3cret-t0ken");
    assert_eq!((status, doc["openapi"].as_str()), (200, Some("3.1.0")), "the OpenAPI document is served");
    assert!(doc["components"]["securitySchemes"]["token"].is_object());
    // Probes, Prometheus and the dashboard's page stay open.
    for open in ["/healthz", "/readyz", "/metrics", "/"] {
        assert_eq!(get_text(&o.api, open).0, 200, "{open}");
    }

    // The CLI sends --token, or $NOVACRON_TOKEN.
    let created = cli_json(&[
        "--server",
        &o.api,
        "--token",
        "s3cret-t0ken",
        "vm",
        "create",
        "t-1",
        "--vcpus",
        "1",
        "--memory-mib",
        "256",
    ]);
    assert_eq!(created["name"], "t-1");
    let out = std::process::Command::new(BIN)
        .args(["--server", &o.api, "vm", "list", "-o", "json"])
        .env("NOVACRON_TOKEN", "s3cret-t0ken")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("t-1"));
    let (ok, _, err) = cli(&["--server", &o.api, "vm", "list"]);
    assert!(!ok, "refused without a token");
    assert!(err.contains("401") && err.contains("token"), "{err}");
}

/// The next JSON text message of a WebSocket (pings and the like skipped); None once closed.
fn next_json(ws: &mut tungstenite::WebSocket<std::net::TcpStream>) -> Option<Value> {
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => return Some(serde_json::from_str(&t).expect("JSON")),
            Ok(tungstenite::Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

#[test]
fn the_live_stream_sends_the_log_from_a_sequence_then_new_events_and_closes_at_shutdown() {
    let nats = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut o = Orchestrator::start(&nats.url(), &dir.path().join("orch"));
    let _agents = agents(&nats.url(), "host", 1, &dir.path().join("agents"));
    wait_for("the host", || get(&o.api, "/api/v1/hosts").1.as_array().is_some_and(|h| h.len() == 1));

    let addr = o.api.trim_start_matches("http://").to_owned();
    let tcp = std::net::TcpStream::connect(&addr).unwrap();
    tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
    let (mut ws, resp) = tungstenite::client(format!("ws://{addr}/api/v1/stream?from=1"), tcp).expect("upgrade");
    assert_eq!(resp.status().as_u16(), 101);
    // From sequence 1: the log as `events -o json` prints it, in order.
    let first = next_json(&mut ws).expect("the first event");
    assert_eq!(first["seq"], 1);
    let logged = cli_json(&["--nats", &nats.url(), "events"]);
    assert_eq!(first, logged[0], "the same shape as `novacron events -o json`");

    // Then what happens next.
    let (status, vm) = post(&o.api, "/api/v1/vms", &json!({"name": "streamed", "vcpus": 1, "memory_mib": 64}));
    assert_eq!(status, 201, "{vm}");
    let id = vm["id"].as_str().unwrap();
    let mut seen = Vec::new();
    let mut last_seq = 0;
    while !seen.iter().any(|k| k == "VmRunning") {
        let ev = next_json(&mut ws).expect("events until the VM runs");
        let seq = ev["seq"].as_u64().unwrap();
        assert!(seq > last_seq, "in order, no repeats");
        last_seq = seq;
        if ev["payload"]["vm"] == id {
            seen.push(ev["kind"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(&seen[..2], ["VmRequested", "VmPlaced"], "{seen:?}");

    // A stopping orchestrator closes its streams instead of waiting for the clients.
    assert!(o.proc.terminate().success());
    assert!(next_json(&mut ws).is_none(), "closed at shutdown");
}

#[test]
fn cli_errors_go_to_stderr_with_a_non_zero_exit() {
    let (ok, out, err) = cli(&["--server", "http://127.0.0.1:9", "vm", "list"]);
    assert!(!ok);
    assert!(out.is_empty());
    assert!(err.contains("cannot reach the NovaCron API"), "{err}");
    let (ok, _, err) =
        cli(&["agent", "--host", "bad.host", "--vcpus", "1", "--memory-mib", "1", "--nats", "nats://127.0.0.1:9"]);
    assert!(!ok);
    assert!(err.contains("invalid host id"), "{err}");
}

/// Every process whose command line names this VM's guest (QEMU is started with
/// `-name guest=<vm-id>`).
fn qemu_pids_of(vm: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmd).contains(&format!("guest={vm}")).then_some(pid)
        })
        .collect()
}

#[test]
fn a_qemu_agent_killed_while_its_vm_runs_re_adopts_it_on_restart() {
    let nats = NatsServer::start().unwrap();
    let dir = tempfile::Builder::new().prefix("nce").tempdir_in("/tmp").unwrap();
    // QEMU runs daemonized: whatever this test leaves running is killed when it ends.
    let _reaper = novacron_testkit::ProcessReaper::new(dir.path());
    let o = Orchestrator::start(&nats.url(), &dir.path().join("orch"));
    let agent_dir = dir.path().join("a");
    let mut agent = qemu_agent(&nats.url(), "q1", &agent_dir);
    wait_for("the QEMU host", || get(&o.api, "/api/v1/hosts").1.as_array().is_some_and(|h| h.len() == 1));

    let (status, vm) = post(&o.api, "/api/v1/vms", &json!({"name": "real-1", "vcpus": 1, "memory_mib": 64}));
    assert_eq!(status, 201, "{vm}");
    let id = vm["id"].as_str().unwrap().to_owned();
    wait_for("real-1 running", || vm_status(&o.api, &id) == "running");
    let pids = qemu_pids_of(&id);
    assert_eq!(pids.len(), 1, "one QEMU process for the VM");

    agent.kill9();
    assert_eq!(qemu_pids_of(&id), pids, "the VM outlives its agent");

    let _agent = qemu_agent(&nats.url(), "q1", &agent_dir);
    // The restarted agent re-registers and reports what it adopted; nothing is started twice.
    wait_for("the restarted agent's heartbeat", || {
        get(&o.api, "/api/v1/hosts").1[0]["last_heartbeat_ms"].as_u64().is_some()
    });
    let events_with = |kind: &str| {
        cli_json(&["--nats", &nats.url(), "events"]).as_array().unwrap().iter().filter(|e| e["kind"] == kind).count()
    };
    wait_for("the adoption reported (no failure, no second start)", || {
        cli_json(&["--server", &o.api, "vm", "show", &id])["status"] == "running"
    });
    assert_eq!(qemu_pids_of(&id), pids, "adopted: same process, no duplicate");
    assert_eq!(events_with("VmStartCommanded"), 1);
    assert_eq!(events_with("VmFailed"), 0);
    assert_eq!(cli_json(&["--nats", &nats.url(), "state"]), get(&o.api, "/api/v1/state").1);

    // The adopted VM is under control: deleting it stops the QEMU process.
    let del = cli_json(&["--server", &o.api, "vm", "delete", &id]);
    assert_eq!(del["id"], id.as_str());
    wait_for("real-1 deleted", || vm_status(&o.api, &id) == "deleted");
    wait_for("its QEMU process gone", || qemu_pids_of(&id).is_empty());
}

#[test]
fn a_qemu_agent_that_dies_for_good_has_its_vm_killed_by_its_lease_keeper_before_the_host_is_failed() {
    let nats = NatsServer::start().unwrap();
    let dir = tempfile::Builder::new().prefix("nce").tempdir_in("/tmp").unwrap();
    let _reaper = novacron_testkit::ProcessReaper::new(dir.path());
    let timing = ["--host-failure-timeout", "5s"];
    let o = Orchestrator::start_with(
        &nats.url(),
        &dir.path().join("orch"),
        &[&timing[..], &["--agent-lease", "2s", "--suspect-after", "2s"]].concat(),
    );
    let mut agent =
        qemu_agent_with(&nats.url(), "q1", &dir.path().join("a"), &[&timing[..], &["--lease", "2s"]].concat());
    wait_for("the QEMU host", || get(&o.api, "/api/v1/hosts").1.as_array().is_some_and(|h| h.len() == 1));
    let (status, vm) = post(&o.api, "/api/v1/vms", &json!({"name": "orphan", "vcpus": 1, "memory_mib": 64}));
    assert_eq!(status, 201, "{vm}");
    let id = vm["id"].as_str().unwrap().to_owned();
    wait_for("orphan running", || vm_status(&o.api, &id) == "running");
    assert_eq!(qemu_pids_of(&id).len(), 1);

    // The agent dies and nobody restarts it. Its VM must not outlive its lease: the
    // orchestrator will fail the host and restart the VM elsewhere after 5 s.
    let killed = std::time::Instant::now();
    agent.kill9();
    wait_for("the lease keeper to kill the orphaned VM", || qemu_pids_of(&id).is_empty());
    let after = killed.elapsed();
    // The lease was renewed at most a heartbeat period (1 s) before the kill.
    assert!(after >= Duration::from_millis(900), "killed {after:?} after the agent: before its lease ended");
    assert!(after < Duration::from_secs(2) + Duration::from_millis(1200), "killed {after:?} after the agent");
    wait_for("the host failed, after its VM was gone", || get(&o.api, "/api/v1/hosts").1[0]["state"] == "failed");
    assert!(qemu_pids_of(&id).is_empty());
}

#[test]
fn a_batch_with_hard_anti_affinity_spreads_over_hosts_and_says_why_the_rest_wait() {
    let cluster = ThreeHosts::start(&[]);
    let o = &cluster.o;

    let created = cli_json(&[
        "--server",
        &o.api,
        "vm",
        "create",
        "web",
        "--vcpus",
        "1",
        "--memory-mib",
        "256",
        "--group",
        "web",
        "--anti-affinity",
        "hard",
        "--count",
        "6",
    ]);
    let vms = created.as_array().unwrap();
    assert_eq!(vms.len(), 6);
    let placed: Vec<&str> = vms.iter().filter_map(|v| v["host"].as_str()).collect();
    let mut distinct = placed.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!((placed.len(), distinct.len()), (3, 3), "one per host: {created}");
    for v in vms.iter().filter(|v| v["host"].is_null()) {
        assert_eq!(v["status"], "pending");
        let why = v["pending_reason"].as_str().unwrap();
        assert!(why.contains("anti_affinity eliminated 3 of 3"), "{why}");
    }
    let (ok, _, err) = cli(&["--server", &o.api, "vm", "create", "web-1", "--vcpus", "1", "--memory-mib", "256"]);
    assert!(!ok && err.contains("409"), "names from a batch are taken: {err}");
}

#[test]
fn label_anti_affinity_group_affinity_and_the_cluster_strategy_reach_the_planner() {
    let cluster = ThreeHosts::start(&["--strategy", "spread"]);
    let o = &cluster.o;
    let create = |extra: &[&str]| {
        let mut args = vec!["--server", &o.api, "vm", "create"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--vcpus", "1", "--memory-mib", "256"]);
        cli_json(&args)
    };
    // One database per host, by label: the fourth waits and says why.
    let dbs = create(&["db", "--label", "app=db", "--vm-anti-affinity", "app=db", "--count", "4"]);
    let dbs = dbs.as_array().unwrap();
    let mut hosts: Vec<&str> = dbs.iter().filter_map(|v| v["host"].as_str()).collect();
    hosts.sort_unstable();
    hosts.dedup();
    assert_eq!(hosts.len(), 3, "one database per host: {dbs:?}");
    let waiting: Vec<&Value> = dbs.iter().filter(|v| v["host"].is_null()).collect();
    assert_eq!(waiting.len(), 1);
    let why = waiting[0]["pending_reason"].as_str().unwrap();
    assert!(why.contains("anti_affinity eliminated 3 of 3"), "{why}");

    // A hard-affinity group stays on one host although the cluster spreads.
    let side = create(&["side", "--group", "side", "--group-affinity", "hard", "--count", "3"]);
    let on: Vec<&str> = side.as_array().unwrap().iter().map(|v| v["host"].as_str().expect("placed")).collect();
    assert!(on.iter().all(|h| *h == on[0]), "together: {on:?}");
    let decisions = get(&o.api, "/api/v1/decisions").1;
    let planners: Vec<&str> =
        decisions.as_array().unwrap().iter().filter_map(|d| d["explanation"]["planner"].as_str()).collect();
    assert!(!planners.is_empty() && planners.iter().all(|p| *p == "filter-score/spread"), "{planners:?}");

    // A rule that cannot hold is refused before anything is written.
    let (ok, _, err) = cli(&[
        "--server",
        &o.api,
        "vm",
        "create",
        "bad",
        "--vcpus",
        "1",
        "--memory-mib",
        "256",
        "--group-affinity",
        "hard",
    ]);
    assert!(!ok && err.contains("needs the VM to have a group"), "{err}");
}

#[test]
fn policies_are_validated_applied_enforced_and_removed() {
    let cluster = ThreeHosts::start(&[]);
    let (dir, o) = (&cluster.dir, &cluster.o);
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };

    // A schema error names file, line and column, and the exit code says it failed.
    let bad = file("bad.yaml", "name: db-apart\nscope: {group: db}\nrule:\n  anti-affinity:\n    topolgy: zone\n");
    let (ok, _, err) = cli(&["policy", "validate", &bad]);
    assert!(!ok && err.contains("bad.yaml:5:5: ") && err.contains("unknown field `topolgy`"), "{err}");

    let apart = file("apart.yaml", "name: db-apart\nscope: {group: db}\nrule:\n  anti-affinity: {}\n");
    let (ok, out, err) = cli(&["policy", "validate", &apart]);
    assert!(ok, "{out}{err}");
    // A policy about a group the cluster does not know is refused (a typo, most likely).
    let (ok, _, err) = cli(&["--server", &o.api, "policy", "apply", &apart]);
    assert!(!ok && err.contains("group db is unknown"), "{err}");
    let seed =
        cli_json(&["--server", &o.api, "vm", "create", "db-0", "--group", "db", "--vcpus", "1", "--memory-mib", "256"]);
    assert!(seed["host"].is_string(), "{seed}");
    let applied = cli_json(&["--server", &o.api, "policy", "apply", &apart]);
    assert_eq!(applied["version"], 1, "{applied}");
    // Applying the same document again changes nothing.
    assert_eq!(cli_json(&["--server", &o.api, "policy", "apply", &apart])["applied"], serde_json::json!([]));

    // A hard rule that can never hold beside it is refused, both named.
    let near = file("near.yaml", "name: db-together\nscope: {group: db}\nrule:\n  affinity: {}\n");
    let (ok, _, err) = cli(&["--server", &o.api, "policy", "apply", &near]);
    assert!(!ok && err.contains("db-apart") && err.contains("db-together") && err.contains("409"), "{err}");

    // Enforced: one database per host — with db-0 on one, two more are placed on the other
    // two and the third waits; decisions record the policy version.
    let dbs = cli_json(&[
        "--server",
        &o.api,
        "vm",
        "create",
        "db",
        "--group",
        "db",
        "--vcpus",
        "1",
        "--memory-mib",
        "256",
        "--count",
        "3",
    ]);
    let mut placed: Vec<&str> = dbs.as_array().unwrap().iter().filter_map(|v| v["host"].as_str()).collect();
    placed.push(seed["host"].as_str().unwrap());
    let mut distinct = placed.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!((placed.len(), distinct.len()), (3, 3), "{dbs}");
    let decisions = get(&o.api, "/api/v1/decisions?limit=3").1;
    assert!(decisions.as_array().unwrap().iter().all(|d| d["explanation"]["policy_version"] == 1), "{decisions}");

    let listed = cli_json(&["--server", &o.api, "policy", "list"]);
    assert_eq!(listed["policies"][0]["name"], "db-apart");
    assert_eq!(listed["policies"][0]["kind"], "anti-affinity");
    let removed = cli_json(&["--server", &o.api, "policy", "remove", "db-apart"]);
    assert_eq!(removed["version"], 2);
    // Without the rule, the waiting database finds room.
    wait_for("the fourth database placed", || {
        get(&o.api, "/api/v1/vms")
            .1
            .as_array()
            .is_some_and(|vms| vms.iter().filter(|v| v["status"] == "running").count() == 4)
    });
}

#[test]
fn generated_telemetry_is_evaluated_against_the_baselines() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("synthetic.csv");
    let (ok, _, err) =
        cli(&["data", "generate", "--series", "6", "--days", "10", "--seed", "3", "--out", csv.to_str().unwrap()]);
    assert!(ok, "{err}");
    let report = cli_json(&["models", "evaluate", "--data", csv.to_str().unwrap(), "--horizons", "1,12"]);
    assert_eq!(report["series"], 6);
    for h in ["1", "12"] {
        let rows = report["report"]["horizons"][h].as_array().unwrap();
        let names: Vec<&str> = rows.iter().filter_map(|r| r["model"].as_str()).collect();
        for m in ["last-value", "mean-of-last-12", "seasonal-naive-288", "global-linear", "selected-per-series"] {
            assert!(names.contains(&m), "{m} missing at h={h}: {names:?}");
        }
        // Ten days with a daily cycle: a model that knows yesterday beats "the last value" at
        // one hour ahead.
        let mae = |m: &str| rows.iter().find(|r| r["model"] == m).unwrap()["mae"].as_f64().unwrap();
        if h == "12" {
            assert!(mae("selected-per-series") < mae("last-value"), "{rows:?}");
        }
        assert!(rows.iter().all(|r| r["forecasts"].as_u64().unwrap() > 0));
        // The hindsight oracles score the same targets as the models' test forecasts.
        let oracle = &report["report"]["hindsight"][h];
        let last = rows.iter().find(|r| r["model"] == "last-value").unwrap();
        assert_eq!(oracle["targets"], last["forecasts"], "{oracle}");
        assert!(oracle["constant_mae"].as_f64().unwrap() > 0.0 && oracle["local_level_mae"].as_f64().unwrap() > 0.0);
    }
    let text = cli(&["models", "evaluate", "--data", csv.to_str().unwrap(), "--horizons", "12"]);
    assert!(text.0 && text.1.contains("hindsight, not forecasts"), "{}", text.1);
    let json = cli_json(&["data", "generate", "--series", "1", "--days", "1", "--format", "json"]);
    assert_eq!(json["series"][0]["values"].as_array().unwrap().len(), 288);
    // A bad file is named with its line.
    std::fs::write(&csv, "step,a\n0,1\n1,oops\n").unwrap();
    let (ok, _, err) = cli(&["models", "evaluate", "--data", csv.to_str().unwrap()]);
    assert!(!ok && err.contains("synthetic.csv:3: \"oops\""), "{err}");
}

#[test]
fn models_are_trained_registered_compared_promoted_and_rolled_back() {
    let nats = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let o = Orchestrator::start(&nats.url(), &dir.path().join("orch"));
    let csv = dir.path().join("load.csv");
    let (ok, _, err) =
        cli(&["data", "generate", "--series", "8", "--days", "6", "--seed", "5", "--out", csv.to_str().unwrap()]);
    assert!(ok, "{err}");
    let url = nats.url();
    let csv = csv.to_str().unwrap();
    let train = |seed: &str, gbdt_samples: &str| {
        let out = cli_json(&[
            "--nats",
            &url,
            "--server",
            &o.api,
            "models",
            "train",
            "--data",
            csv,
            "--horizons",
            "1,12",
            "--seed",
            seed,
            "--gbdt-samples",
            gbdt_samples,
        ]);
        let scores = out["record"]["scores"].as_array().unwrap().clone();
        assert_eq!(scores.len(), 2, "{out}");
        assert!(scores.iter().all(|s| s["test_mae"].as_f64().is_some_and(f64::is_finite)), "{out}");
        out["registered"].as_str().unwrap().to_owned()
    };
    // The better of the two families on validation, then the linear one alone.
    let a = train("1", "20000");
    let b = train("2", "0");
    assert!(a.starts_with("global-") && b.starts_with("global-linear-") && a != b, "{a} {b}");
    let listed = cli_json(&["--server", &o.api, "models", "list"]);
    assert_eq!(listed["models"].as_array().unwrap().len(), 2);
    assert!(listed["in_use"].is_null(), "trained is not promoted: {listed}");

    let ab =
        cli_json(&["--nats", &url, "--server", &o.api, "models", "abtest", &a, &b, "--data", csv, "--horizons", "12"]);
    let t = &ab[0]["test"];
    assert_eq!(t["series"], 8, "{ab}");
    assert!(t["p_value"].as_f64().is_some_and(|p| (0.0..=1.0).contains(&p)), "{ab}");

    assert_eq!(cli_json(&["--server", &o.api, "models", "promote", &a])["in_use"], a.as_str());
    assert_eq!(cli_json(&["--server", &o.api, "models", "promote", &b])["in_use"], b.as_str());
    assert_eq!(cli_json(&["--server", &o.api, "models", "rollback"])["in_use"], a.as_str());
    let listed = cli_json(&["--server", &o.api, "models", "list"]);
    assert_eq!(listed["in_use"], a.as_str());
    assert_eq!(listed["promotions"], json!([a]));
    // A record whose artifact is not stored is refused.
    let mut bogus = listed["models"][0].clone();
    let record = json!({
        "model": "global-linear-000000000000", "kind": "global-linear", "digest": "0".repeat(64),
        "hyperparameters": bogus["hyperparameters"].take(), "scores": bogus["scores"].take(), "data": bogus["data"].take(),
    });
    let (status, body) = post(&o.api, "/api/v1/models", &record);
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("no artifact"), "{body}");
}

#[test]
fn the_failure_risk_classifier_reads_failure_records_and_says_how_it_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("failures.csv");
    // One system of four nodes over three years: node 0 fails every 4 days, the others yearly.
    let mut csv = String::from("System,nodes,nodenumz,Prob Started,Down Time,Hardware,Software\n");
    for day in (0..1100).step_by(4) {
        let (y, doy) = (2001 + day / 365, day % 365);
        let (m, d) = (1 + doy / 31, 1 + doy % 28);
        csv.push_str(&format!("1,4,0,{m}/{d}/{y} 10:00,30,Disk,\n"));
    }
    for (node, y) in [(1, 2001), (2, 2002), (3, 2003), (1, 2003)] {
        csv.push_str(&format!("1,4,{node},6/15/{y} 12:00,60,,Kernel\n"));
    }
    std::fs::write(&path, csv).unwrap();
    let out =
        cli_json(&["models", "risk", "--data", path.to_str().unwrap(), "--cutoff", "2003-01-01", "--val-days", "120"]);
    let scores = out["report"]["scores"].as_array().unwrap();
    let model = scores.iter().find(|s| s["model"].as_str().unwrap().starts_with("logistic")).unwrap();
    assert!(model["roc_auc"].as_f64().unwrap() > 0.8, "{out}");
    assert!(scores.iter().any(|s| s["model"] == "most failures so far"), "baselines reported: {out}");
    let (ok, _, err) = cli(&["models", "risk", "--data", path.to_str().unwrap(), "--cutoff", "2003-13-01"]);
    assert!(!ok && err.contains("must be YYYY-MM-DD"), "{err}");
}

/// `HH:MM` (UTC) `minutes` from now, wrapping around midnight.
fn utc_hhmm(minutes: i64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64 / 60;
    let m = (now + minutes).rem_euclid(24 * 60);
    format!("{:02}:{:02}", m / 60, m % 60)
}

#[test]
fn an_anti_affinity_policy_spreads_co_located_vms_inside_the_maintenance_window_only() {
    let cluster = ThreeHosts::start(&[]);
    let (dir, o) = (&cluster.dir, &cluster.o);
    // Bin-pack puts the three web VMs on one host.
    let created = cli_json(&[
        "--server",
        &o.api,
        "vm",
        "create",
        "web",
        "--group",
        "web",
        "--vcpus",
        "1",
        "--memory-mib",
        "256",
        "--count",
        "3",
    ]);
    let ids: Vec<String> = created.as_array().unwrap().iter().map(|v| v["id"].as_str().unwrap().to_owned()).collect();
    let hosts_of = || -> Vec<String> {
        let vms = get(&o.api, "/api/v1/vms").1;
        ids.iter()
            .map(|id| {
                let v = vms.as_array().unwrap().iter().find(|v| v["id"].as_str() == Some(id)).unwrap();
                format!("{}:{}", v["host"].as_str().unwrap_or("-"), v["status"].as_str().unwrap_or("-"))
            })
            .collect()
    };
    wait_for("the VMs running together", || {
        let h = hosts_of();
        h.iter().all(|x| x.ends_with(":running")) && h.iter().all(|x| *x == h[0])
    });
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let rules = write(
        "web.yaml",
        format!(
            "name: web-apart\nscope: {{group: web}}\nrule:\n  anti-affinity: {{}}\n---\n\
             name: web-window\nrule:\n  maintenance-window: {{start: '{}', end: '{}'}}\n",
            utc_hhmm(120),
            utc_hhmm(180)
        ),
    );
    // The dry run says what would happen: two VMs break the rule and wait for the window.
    let dry = cli_json(&["--server", &o.api, "policy", "dry-run", &rules]);
    let actions: Vec<&str> =
        dry["violations"].as_array().unwrap().iter().filter_map(|v| v["action"].as_str()).collect();
    assert_eq!(actions, ["wait for a maintenance window"; 2], "{dry}");
    cli_json(&["--server", &o.api, "policy", "apply", &rules]);
    wait_for("the violations recorded", || {
        get(&o.api, "/api/v1/policies").1["violations"].as_array().is_some_and(|v| v.len() == 2)
    });
    let recorded = get(&o.api, "/api/v1/policies").1;
    for v in recorded["violations"].as_array().unwrap() {
        assert_eq!(v["action"], "wait for a maintenance window", "{recorded}");
    }
    let h = hosts_of();
    assert!(h.iter().all(|x| *x == h[0]), "nothing moved outside the window: {h:?}");

    // The window opens (a new version of it): the two move, one per host.
    let open = write(
        "window.yaml",
        format!(
            "name: web-window\nrule:\n  maintenance-window: {{start: '{}', end: '{}'}}\n",
            utc_hhmm(-60),
            utc_hhmm(60)
        ),
    );
    let dry = cli_json(&["--server", &o.api, "policy", "dry-run", &open]);
    let predicted: Vec<&str> =
        dry["violations"].as_array().unwrap().iter().filter_map(|v| v["action"].as_str()).collect();
    assert!(predicted.len() == 2 && predicted.iter().all(|a| a.starts_with("migrate to host-")), "{dry}");
    cli_json(&["--server", &o.api, "policy", "apply", &open]);
    wait_for("the web VMs on three hosts", || {
        let h = hosts_of();
        let mut distinct = h.clone();
        distinct.sort();
        distinct.dedup();
        h.iter().all(|x| x.ends_with(":running")) && distinct.len() == 3
    });
}

#[test]
fn a_standby_takes_over_when_the_leader_dies_and_nothing_acknowledged_is_lost() {
    let nats = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let start = |replica: &'static str| {
        let d = dir.path().join(replica);
        let addr_file = d.join("orchestrator.addr");
        let p = Proc::spawn(
            "orchestrator",
            &[
                "orchestrator",
                "--nats",
                &nats.url(),
                "--http",
                "127.0.0.1:0",
                "--data-dir",
                d.to_str().unwrap(),
                "--replica-id",
                replica,
            ],
        );
        wait_for("the replica's API", || std::fs::read_to_string(&addr_file).is_ok_and(|a| !a.is_empty()));
        let api = format!("http://{}", std::fs::read_to_string(&addr_file).unwrap().trim());
        wait_for("the replica ready", || get(&api, "/readyz").0 == 200);
        (p, api)
    };
    let (mut first, api1) = start("replica-1");
    wait_for("replica-1 leads", || get(&api1, "/api/v1/leader").1["role"] == "leader");
    let (_second, api2) = start("replica-2");
    assert_eq!(get(&api2, "/api/v1/leader").1["role"], "follower");
    let _agents = agents_sized(&nats.url(), "host", 2, 256, &dir.path().join("agents"));
    wait_for("two hosts on the standby too", || get(&api2, "/api/v1/hosts").1.as_array().is_some_and(|h| h.len() == 2));

    // A write sent to the standby is answered with the leader's address; the CLI follows it.
    let (status, refused) = post(&api2, "/api/v1/vms", &json!({"name": "x", "vcpus": 1, "memory_mib": 128}));
    assert_eq!(status, 503);
    assert_eq!(refused["leader"], api1.as_str());
    let via_standby =
        cli_json(&["--server", &api2, "vm", "create", "via-standby", "--vcpus", "1", "--memory-mib", "128"]);
    assert_eq!(via_standby["name"], "via-standby");

    let leader_api = api1.clone();
    let creator = std::thread::spawn(move || {
        let mut acknowledged = Vec::new();
        for i in 0..300 {
            let (status, vm) =
                post(&leader_api, "/api/v1/vms", &json!({"name": format!("vm-{i}"), "vcpus": 1, "memory_mib": 128}));
            if status != 201 {
                break;
            }
            acknowledged.push(vm["id"].as_str().unwrap().to_owned());
        }
        acknowledged
    });
    wait_for("some VMs acknowledged", || get(&api2, "/api/v1/state").1["vms"].as_u64().unwrap_or(0) >= 10);
    first.kill9();
    let acknowledged = creator.join().unwrap();

    wait_for("replica-2 leads", || get(&api2, "/api/v1/leader").1["role"] == "leader");
    for id in &acknowledged {
        assert_eq!(get(&api2, &format!("/api/v1/vms/{id}")).0, 200, "acknowledged VM {id} lost in the failover");
    }
    if !novacron_testkit::wait_until(TIMEOUT, || acknowledged.iter().all(|id| vm_status(&api2, id) == "running")) {
        let stuck: Vec<String> = acknowledged
            .iter()
            .map(|id| get(&api2, &format!("/api/v1/vms/{id}")).1)
            .filter(|v| v["status"] != "running")
            .map(|v| format!("{} {} on {}", v["name"], v["status"], v["host"]))
            .collect();
        panic!("not running on the new leader: {stuck:?}");
    }
    let events = cli_json(&["--nats", &nats.url(), "events", "--subject", "nc.events.cluster.leader"]);
    let terms: Vec<&str> = events.as_array().unwrap().iter().filter_map(|e| e["payload"]["replica"].as_str()).collect();
    assert_eq!(terms, ["replica-1", "replica-2"], "each term is in the log");
    wait_for("the new leader's state equals a fresh replay", || {
        cli_json(&["--nats", &nats.url(), "state"]) == get(&api2, "/api/v1/state").1
    });
}

#[test]
fn plan_consolidate_replays_the_log_and_plans_without_executing() {
    let cluster = ThreeHosts::start(&[]);
    let (nats, o) = (&cluster.nats, &cluster.o);

    // Bin-packing puts three small VMs on one host; spread them out by hand.
    let mut ids = Vec::new();
    for i in 0..3 {
        let (status, vm) =
            post(&o.api, "/api/v1/vms", &json!({"name": format!("c-{i}"), "vcpus": 2, "memory_mib": 1024}));
        assert_eq!(status, 201, "{vm}");
        ids.push(vm["id"].as_str().unwrap().to_owned());
    }
    wait_for("all running", || ids.iter().all(|id| vm_status(&o.api, id) == "running"));
    let first = get(&o.api, &format!("/api/v1/vms/{}", ids[0])).1["host"].as_str().unwrap().to_owned();
    let others: Vec<String> = (1..=3).map(|i| format!("host-{i}")).filter(|h| *h != first).collect();
    for (id, to) in ids[1..].iter().zip(&others) {
        let (ok, _, err) = cli(&["--server", &o.api, "vm", "migrate", id, "--to", to]);
        assert!(ok, "{err}");
        wait_for("migrated", || {
            let vm = get(&o.api, &format!("/api/v1/vms/{id}")).1;
            vm["host"] == to.as_str() && vm["status"] == "running"
        });
    }

    let before = get(&o.api, "/api/v1/state").1;
    let plan = cli_json(&["--nats", &nats.url(), "plan", "consolidate"]);
    assert_eq!((plan["hosts_before"].as_u64(), plan["hosts_after"].as_u64()), (Some(3), Some(1)), "{plan}");
    assert_eq!(plan["emptied"].as_array().unwrap().len(), 2, "{plan}");
    let moves = plan["moves"].as_array().unwrap();
    assert_eq!(moves.len(), 2, "{plan}");
    let target = moves[0]["to"].clone();
    assert!(moves.iter().all(|m| m["to"] == target && m["from"] != target), "{plan}");
    assert_eq!(plan["log_seq"], before["seq"]);
    // Planning wrote nothing: the log and the state are as they were.
    assert_eq!(get(&o.api, "/api/v1/state").1, before);
    let (ok, text, _) = cli(&["--nats", &nats.url(), "plan", "consolidate"]);
    assert!(ok && text.contains("hosts in use 3 → 1") && text.contains("nothing executed"), "{text}");
    let (ok, _, err) = cli(&["--nats", &nats.url(), "plan", "consolidate", "--cpu-overcommit", "0.5"]);
    assert!(!ok && err.contains("at least 1.0"), "{err}");
}

/// An interrupted benchmark leaves nothing behind: its temporary directory (the nats-server
/// store) is removed and the processes it started are stopped.
#[test]
fn an_interrupted_benchmark_removes_its_temporary_files() {
    let nats = novacron_testkit::find_nats_server().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut bench = std::process::Command::new(BIN)
        .args(["bench", "e2e", "--hosts", "2", "--rate", "5", "--duration", "60s", "--nats-server"])
        .arg(&nats)
        .env("TMPDIR", tmp.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let entries = || std::fs::read_dir(tmp.path()).unwrap().count();
    // Interrupted once the simulated hosts run (their journal is in the directory).
    wait_for("the benchmark's directory with the hosts' journal", || {
        std::fs::read_dir(tmp.path()).unwrap().filter_map(Result::ok).any(|d| d.path().join("agents").exists())
    });
    let status = std::process::Command::new("kill").args(["-TERM", &bench.id().to_string()]).status().unwrap();
    assert!(status.success());
    wait_for("the benchmark to stop", || bench.try_wait().unwrap().is_some());
    let exit = bench.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(bench.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!exit.success() && err.contains("interrupted"), "{exit:?}: {err}");
    assert_eq!(entries(), 0, "the temporary directory is gone");
    // Its nats-server and simulated hosts ran with paths under it: none of them is left.
    let under_tmp = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(Result::ok)
            .filter_map(|d| std::fs::read(d.path().join("cmdline")).ok())
            .any(|c| String::from_utf8_lossy(&c).contains(tmp.path().to_str().unwrap()))
    };
    wait_for("the benchmark's processes to stop", || !under_tmp());
}

#[test]
fn bench_e2e_places_every_offered_vm_and_sees_each_start_command() {
    let nats = novacron_testkit::find_nats_server().unwrap();
    let bench = cli_json(&[
        "bench",
        "e2e",
        "--hosts",
        "3",
        "--rate",
        "100",
        "--duration",
        "1s",
        "--connections",
        "4",
        "--nats-server",
        nats.to_str().unwrap(),
    ]);
    let e = &bench["e2e"];
    assert_eq!(
        (e["requests"].as_u64(), e["placed"].as_u64(), e["failed"].as_u64()),
        (Some(100), Some(100), Some(0)),
        "{e}"
    );
    assert!(e["start_commands_in_log"].as_u64().unwrap() >= 100, "{e}");
    assert_eq!(e["start_commands_complete"], true);
    assert_eq!(e["pending_no_room"], 0, "three 64-vCPU hosts hold 100 one-vCPU VMs: {e}");
    let (p50, p99) = (e["p50_ms"].as_f64().unwrap(), e["p99_ms"].as_f64().unwrap());
    assert!(p50 > 0.0 && p50 <= p99, "{e}");
    // The worst placement of each second: one second of requests, its worst the run's worst.
    let worst: Vec<f64> = e["worst_ms_by_second"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(worst.len(), 1, "{e}");
    assert!((worst[0] - e["max_ms"].as_f64().unwrap()).abs() <= 0.05, "{e}");
    assert!(e["raw_jetstream_publish_per_sec"].as_f64().unwrap() > 0.0, "{e}");
    assert!(e["rss_mib"].as_f64().unwrap() > 0.0 && e["agents_rss_mib"].as_f64().unwrap() > 0.0, "{e}");

    // With the orchestrator in a process of its own, its memory is measured alone; here the
    // VMs go seven per request (the last request carries the one left over).
    let bench = cli_json(&[
        "bench",
        "e2e",
        "--hosts",
        "3",
        "--rate",
        "50",
        "--duration",
        "1s",
        "--connections",
        "4",
        "--batch",
        "7",
        "--separate-orchestrator",
        "--nats-server",
        nats.to_str().unwrap(),
    ]);
    let e = &bench["e2e"];
    assert_eq!((e["placed"].as_u64(), e["failed"].as_u64()), (Some(50), Some(0)), "{e}");
    assert_eq!((e["batch"].as_u64(), e["requests"].as_u64()), (Some(7), Some(8)), "{e}");
    assert!(e["start_commands_in_log"].as_u64().unwrap() >= 50, "{e}");
    assert_eq!(e["rss_note"], "the orchestrator's own process", "{e}");
    assert!(e["rss_mib"].as_f64().unwrap() > 0.0, "{e}");
}

#[test]
fn bench_failover_times_a_takeover_after_the_leader_is_killed() {
    let nats = novacron_testkit::find_nats_server().unwrap();
    let bench = cli_json(&[
        "bench",
        "failover",
        "--runs",
        "1",
        "--leader-lease",
        "1s",
        "--nats-server",
        nats.to_str().unwrap(),
    ]);
    let f = &bench["failover"];
    let (elected, written) =
        (f["median_leader_elected_s"].as_f64().unwrap(), f["median_first_write_s"].as_f64().unwrap());
    // The lease must run out first (a SIGKILLed leader does not resign), and a standby cannot
    // write before it leads.
    assert!(elected >= 0.5 && elected <= written, "{f}");
    assert!(written < 30.0, "{f}");
    assert_eq!(f["runs"].as_array().unwrap().len(), 1);
}
