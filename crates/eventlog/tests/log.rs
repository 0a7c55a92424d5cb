//! The event log against a real nats-server.

use std::time::Duration;

use async_nats::jetstream::message::PublishMessage as Publish;
use futures::StreamExt;
use novacron_eventlog::{
    AppendError, Bus, BusConfig, BusError, DeadLetters, EventLog, SnapshotStore, fold_range, replay,
};
use novacron_state::ClusterState;
use novacron_testkit::NatsServer;
use novacron_types::event::{HostRegistered, VmRequested};
use novacron_types::{Actor, Envelope, EventKind, HostId, Resources, VmId, VmSpec};

async fn bus(server: &NatsServer) -> Bus {
    let bus = Bus::connect(&BusConfig::new(server.url(), "test")).await.expect("connect");
    bus.provision(1).await.expect("provision");
    bus
}

fn host_event(i: usize) -> Envelope {
    Envelope::new(
        1_000 + i as u64,
        Actor::Orchestrator("test".into()),
        EventKind::HostRegistered(HostRegistered {
            host: HostId::new(format!("h{i}")).unwrap(),
            capacity: Resources { vcpus: 8, memory_mib: 16384, disk_gib: 100 },
            labels: Default::default(),
            driver: "sim".into(),
        }),
    )
}

fn vm_event(name: &str) -> Envelope {
    Envelope::new(
        2_000,
        Actor::User("alice".into()),
        EventKind::VmRequested(VmRequested {
            vm: VmId::new_v7(),
            spec: VmSpec {
                name: name.into(),
                vcpus: 1,
                memory_mib: 256,
                disk_gib: 0,
                group: None,
                labels: Default::default(),
                restart: Default::default(),
                placement: Default::default(),
            },
        }),
    )
}

async fn all_events(log: &EventLog) -> Vec<(u64, Envelope)> {
    let mut out = Vec::new();
    let tail = log.stream().clone().info().await.unwrap().state.last_sequence;
    replay(log.stream(), 1, tail, |e| out.push((e.seq, e.envelope.expect("decodes")))).await.unwrap();
    out
}

#[tokio::test]
async fn provisioning_is_idempotent_and_creates_the_five_streams() {
    let server = NatsServer::start().unwrap();
    let bus = bus(&server).await;
    bus.provision(1).await.expect("second provision is a no-op");
    for name in ["EVENTS", "COMMANDS", "REPORTS", "TELEMETRY", "DEADLETTER"] {
        let mut s = bus.js.get_stream(name).await.unwrap_or_else(|e| panic!("{name}: {e}"));
        let info = s.info().await.unwrap();
        assert_eq!(info.config.storage, async_nats::jetstream::stream::StorageType::File, "{name}");
    }
    let mut events = bus.js.get_stream("EVENTS").await.unwrap();
    let cfg = &events.info().await.unwrap().config;
    assert_eq!(cfg.duplicate_window, Duration::from_secs(120));
    assert!(cfg.deny_delete && cfg.deny_purge, "the log of record refuses deletes");
}

fn stop_command(host: &str) -> Envelope {
    Envelope::new(
        3_000,
        Actor::Orchestrator("test".into()),
        EventKind::VmStopCommanded(novacron_types::StopVm {
            vm: VmId::new_v7(),
            host: HostId::new(host).unwrap(),
            incarnation: novacron_types::IncarnationId::new_v7(),
            generation: novacron_types::Generation(1),
            reason: "test".into(),
        }),
    )
}

#[tokio::test]
async fn commands_stream_holds_each_hosts_commands_in_log_order_and_nothing_else() {
    let server = NatsServer::start().unwrap();
    let bus = bus(&server).await;
    let mut log = EventLog::open(bus.js.clone()).await.unwrap();
    let batch = vec![host_event(1), stop_command("h1"), vm_event("a"), stop_command("h2"), stop_command("h1")];
    let seqs = log.append(&batch).await.unwrap();
    let commands = bus.js.get_stream("COMMANDS").await.unwrap();
    let wait = tokio::time::Instant::now() + Duration::from_secs(10);
    while commands.clone().info().await.unwrap().state.messages < 3 {
        assert!(tokio::time::Instant::now() < wait, "the commands were never copied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut copied = Vec::new();
    for seq in 1..=3 {
        let m = commands.get_raw_message(seq).await.unwrap();
        let env: Envelope = novacron_types::decode(&m.payload, novacron_types::ContentType::MsgPack).unwrap();
        let source =
            m.headers.get(novacron_protocol::HEADER_STREAM_SOURCE).map(|v| v.as_str().to_owned()).unwrap_or_default();
        copied.push((m.subject.to_string(), env.id, source));
    }
    let want = [
        ("nc.hostcmd.h1", &batch[1], seqs[1]),
        ("nc.hostcmd.h2", &batch[3], seqs[3]),
        ("nc.hostcmd.h1", &batch[4], seqs[4]),
    ];
    for ((subject, id, source), (want_subject, env, seq)) in copied.iter().zip(want) {
        assert_eq!((subject.as_str(), *id), (want_subject, env.id));
        assert!(source.starts_with(&format!("EVENTS {seq} ")), "where it came from: {source:?}");
    }
    // The copy keeps log order, so an event copied too would have taken one of those places.
    // Nothing publishes into it directly.
    assert!(bus.js.publish("nc.hostcmd.h1", "forged".into()).await.unwrap().await.is_err());
}

#[tokio::test]
async fn a_server_without_jetstream_gets_a_clear_error() {
    let server = NatsServer::start_without_jetstream().unwrap();
    let bus = Bus::connect(&BusConfig::new(server.url(), "test")).await.unwrap();
    let err = bus.provision(1).await.unwrap_err();
    assert!(matches!(err, BusError::JetStreamUnavailable(_)), "{err:?}");
    assert!(err.to_string().contains("-js"), "the error says how to fix it: {err}");
}

#[tokio::test]
async fn appended_events_replay_in_order_and_identical() {
    let server = NatsServer::start().unwrap();
    let bus = bus(&server).await;
    let mut log = EventLog::open(bus.js.clone()).await.unwrap();
    let batch: Vec<Envelope> = (0..500).map(host_event).collect();
    let seqs = log.append(&batch).await.expect("append");
    assert_eq!(seqs, (1..=500).collect::<Vec<u64>>());
    assert_eq!(log.tail().seq, 500);
    let back = all_events(&log).await;
    assert_eq!(back.len(), 500);
    for ((seq, env), (i, sent)) in back.iter().zip(batch.iter().enumerate()) {
        assert_eq!(*seq, i as u64 + 1);
        assert_eq!(env, sent);
    }
}

#[tokio::test]
async fn two_writers_with_the_same_view_one_wins_and_history_does_not_fork() {
    let server = NatsServer::start().unwrap();
    let bus = bus(&server).await;
    let mut a = EventLog::open(bus.js.clone()).await.unwrap();
    let mut b = EventLog::open(bus.js.clone()).await.unwrap();
    a.append(&[host_event(0)]).await.unwrap();
    b.refresh_tail().await.unwrap();
    a.refresh_tail().await.unwrap();
    assert_eq!(a.tail(), b.tail());

    let batch_a: Vec<Envelope> = (0..20).map(|i| vm_event(&format!("a-{i}"))).collect();
    let batch_b: Vec<Envelope> = (0..20).map(|i| vm_event(&format!("b-{i}"))).collect();
    let (ra, rb) = tokio::join!(a.append(&batch_a), b.append(&batch_b));
    let (winner, loser_err) = match (ra, rb) {
        (Ok(_), Err(e)) => (&batch_a, e),
        (Err(e), Ok(_)) => (&batch_b, e),
        other => panic!("exactly one writer must win: {other:?}"),
    };
    let AppendError::Conflict { tail, stored_seqs, .. } = loser_err else {
        panic!("the loser gets a conflict, got {loser_err:?}");
    };
    assert!(stored_seqs.is_empty(), "nothing of the loser's batch was stored");
    assert_eq!(tail.seq, 21, "the loser re-read the tail");

    let events = all_events(&a).await;
    assert_eq!(events.len(), 21);
    let written: Vec<&Envelope> = events[1..].iter().map(|(_, e)| e).collect();
    assert_eq!(written, winner.iter().collect::<Vec<_>>(), "the log holds the winner's batch, whole and in order");
}

#[tokio::test]
async fn a_foreign_write_mid_batch_never_tears_the_batch() {
    let server = NatsServer::start().unwrap();
    let bus = bus(&server).await;
    // A window smaller than the batch: the fence must hold across window refills too.
    let mut log = EventLog::open(bus.js.clone()).await.unwrap().window(4);
    log.append(&[host_event(0)]).await.unwrap();
    // Someone else appends one event behind our back: our tail is now stale by one.
    let mut other = EventLog::open(bus.js.clone()).await.unwrap();
    other.append(&[host_event(1)]).await.unwrap();

    // Without the message-id chain, events 2.. of this batch would land (each expects
    // tail+i, and the foreign write shifted everything by one). With it, none does.
    let batch: Vec<Envelope> = (0..10).map(|i| vm_event(&format!("v{i}"))).collect();
    let err = log.append(&batch).await.unwrap_err();
    assert!(matches!(err, AppendError::Conflict { ref stored_seqs, .. } if stored_seqs.is_empty()), "{err:?}");
    let events = all_events(&log).await;
    assert_eq!(events.len(), 2, "only the two registrations are in the log: {events:?}");

    // After re-reading the tail the same writer appends fine.
    log.append(&batch).await.expect("append after catching up");
    assert_eq!(all_events(&log).await.len(), 12);
}

#[tokio::test]
async fn a_retried_append_is_stored_once() {
    let server = NatsServer::start().unwrap();
    let bus = bus(&server).await;
    let mut log = EventLog::open(bus.js.clone()).await.unwrap();
    let e = host_event(0);
    log.append(std::slice::from_ref(&e)).await.unwrap();
    // A raw re-publish with the same message id (what a retry after a lost ack does) is
    // acknowledged as a duplicate and not stored.
    let ack = bus
        .js
        .send_publish(
            "nc.events.host.h0",
            Publish::build().payload(novacron_types::encode(&e).into()).message_id(e.id.to_string()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(ack.duplicate);
    assert_eq!(ack.sequence, 1);
    assert_eq!(all_events(&log).await.len(), 1);
}

#[tokio::test]
async fn snapshot_plus_tail_gives_the_hash_of_a_full_replay() {
    let server = NatsServer::start().unwrap();
    let bus = bus(&server).await;
    let mut log = EventLog::open(bus.js.clone()).await.unwrap();
    let first: Vec<Envelope> = (0..50).map(host_event).collect();
    log.append(&first).await.unwrap();
    let created = log.stream().clone().info().await.unwrap().created.unix_timestamp_nanos();

    let dir = tempfile::tempdir().unwrap();
    let store = SnapshotStore::open(dir.path()).unwrap();
    let mut state = ClusterState::default();
    fold_range(log.stream(), &mut state, 50).await.unwrap();
    store.save(created, &state).unwrap();

    let more: Vec<Envelope> = (0..30).map(|i| vm_event(&format!("v{i}"))).collect();
    log.append(&more).await.unwrap();

    let mut restored = store.latest(created, 80).unwrap().expect("a snapshot");
    assert_eq!(restored.seq, 50);
    let stats = fold_range(log.stream(), &mut restored, 80).await.unwrap();
    assert_eq!(stats.applied, 30, "only the tail is replayed");

    let mut full = ClusterState::default();
    fold_range(log.stream(), &mut full, 80).await.unwrap();
    assert_eq!(restored.hash(), full.hash());
    assert!(store.latest(created + 1, 80).unwrap().is_none(), "a snapshot of another stream is ignored");
}

#[tokio::test]
async fn dead_letters_keep_the_original_bytes_and_the_reason() {
    let server = NatsServer::start().unwrap();
    let bus = bus(&server).await;
    DeadLetters::new(bus.js.clone())
        .send("reports", "nc.report.h1", Some("application/json"), "malformed JSON: expected value", "garbage".into())
        .await;
    let stream = bus.js.get_stream("DEADLETTER").await.unwrap();
    let msg = stream.get_raw_message(1).await.unwrap();
    assert_eq!(msg.subject.as_str(), "nc.deadletter.reports");
    assert_eq!(&msg.payload[..], b"garbage");
    let reason = msg.headers.get("Nc-Deadletter-Reason").unwrap().as_str().to_owned();
    assert!(reason.contains("malformed JSON"), "{reason}");
    assert_eq!(msg.headers.get("Nc-Deadletter-Subject").unwrap().as_str(), "nc.report.h1");
}

#[tokio::test]
async fn follow_delivers_past_and_new_events() {
    let server = NatsServer::start().unwrap();
    let bus = bus(&server).await;
    let mut log = EventLog::open(bus.js.clone()).await.unwrap();
    log.append(&[host_event(0)]).await.unwrap();
    let mut follow = novacron_eventlog::follow(log.stream(), 1).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), follow.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.seq, 1);
    log.append(&[host_event(1)]).await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), follow.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(second.seq, 2);
}

#[tokio::test]
async fn the_log_works_on_a_three_node_cluster_with_three_replicas() {
    let cluster = novacron_testkit::NatsCluster::start().unwrap();
    let mut cfg = BusConfig::new(cluster.urls().join(","), "test");
    cfg.retry_initial_connect = true;
    let bus = Bus::connect(&cfg).await.unwrap();
    // The meta leader is elected shortly after the third node starts; until then stream
    // creation is refused. Retry with a deadline rather than sleeping.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match bus.provision(3).await {
            Ok(()) => break,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("cluster never accepted the streams: {e:?}"),
        }
    }
    let mut events = bus.js.get_stream("EVENTS").await.unwrap();
    assert_eq!(events.info().await.unwrap().config.num_replicas, 3);
    let mut log = EventLog::open(bus.js.clone()).await.unwrap();
    let batch: Vec<Envelope> = (0..100).map(host_event).collect();
    log.append(&batch).await.expect("append to an R3 stream");
    assert_eq!(all_events(&log).await.len(), 100);
}

#[tokio::test]
async fn the_log_takes_a_durable_consumer_per_host_beyond_the_servers_default_cap() {
    // nats-server 2.15 caps a stream at 1,000 consumers unless the stream says otherwise; each
    // host agent holds one on EVENTS, so the 1,001st host must still get its consumer.
    let server = NatsServer::start().unwrap();
    let bus = bus(&server).await;
    let events = bus.js.get_stream("EVENTS").await.unwrap();
    for i in 0..1_050 {
        let cfg = async_nats::jetstream::consumer::pull::Config {
            durable_name: Some(format!("host-{i}")),
            filter_subject: format!("nc.cmd.host-{i}.>"),
            ..Default::default()
        };
        events.create_consumer(cfg).await.unwrap_or_else(|e| panic!("consumer {i}: {e}"));
    }
    let mut events = bus.js.get_stream("EVENTS").await.unwrap();
    assert_eq!(events.info().await.unwrap().state.consumer_count, 1_050);
}

/// A state folded from `hosts` registrations and `vms` requests, sequences 1…
fn big_state(hosts: usize, vms: usize) -> ClusterState {
    let mut state = ClusterState::default();
    let events = (0..hosts).map(host_event).chain((0..vms).map(|i| vm_event(&format!("vm-{i}"))));
    for (i, e) in events.enumerate() {
        state.apply(i as u64 + 1, &e);
    }
    state
}

#[test]
fn a_large_snapshot_is_streamed_to_its_file_and_read_back_verified() {
    let dir = tempfile::tempdir().unwrap();
    let state = big_state(2_000, 20_000);
    assert!(state.to_canonical_bytes().len() > 4 << 20, "a state of several MiB");
    {
        let store = SnapshotStore::open(dir.path()).unwrap();
        store.save(7, &state).unwrap();
    }
    // Reopened, as after a restart.
    let store = SnapshotStore::open(dir.path()).unwrap();
    let back = store.latest(7, u64::MAX).unwrap().expect("a snapshot");
    assert_eq!(back.hash(), state.hash());
    assert_eq!(back, state);
    assert!(store.latest(7, state.seq - 1).unwrap().is_none(), "none at or below an earlier sequence");
}

fn snapshot_files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn only_the_newest_three_snapshots_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = SnapshotStore::open(dir.path()).unwrap();
    let mut state = big_state(10, 0);
    for i in 0..5 {
        state.apply(state.seq + 1, &vm_event(&format!("more-{i}")));
        store.save(7, &state).unwrap();
    }
    let expected: Vec<String> = (state.seq - 2..=state.seq).map(|s| format!("state-{s:020}.snap")).collect();
    assert_eq!(snapshot_files(dir.path()), expected);
}

#[test]
fn a_crashed_save_and_the_earlier_layout_are_cleared_and_a_corrupt_snapshot_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = big_state(100, 100);
    SnapshotStore::open(dir.path()).unwrap().save(7, &state).unwrap();
    // A save that died half-way, and what the sled-based first version left.
    std::fs::write(dir.path().join(format!("state-{:020}.snap.tmp", state.seq + 10)), b"half a state").unwrap();
    std::fs::write(dir.path().join("conf"), b"segment_size: 524288").unwrap();
    std::fs::write(dir.path().join("db"), b"sled").unwrap();
    std::fs::create_dir(dir.path().join("blobs")).unwrap();

    let store = SnapshotStore::open(dir.path()).unwrap();
    let name = format!("state-{:020}.snap", state.seq);
    assert_eq!(snapshot_files(dir.path()), vec![name.clone()], "only the finished snapshot remains");
    assert_eq!(store.latest(7, u64::MAX).unwrap().expect("the finished one"), state);

    // Flip a byte in the middle of the encoding.
    let path = dir.path().join(&name);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 3;
    bytes[mid] ^= 0x55;
    std::fs::write(&path, &bytes).unwrap();
    let err = store.latest(7, u64::MAX).expect_err("a flipped byte is caught");
    assert!(err.to_string().contains("corrupt"), "{err}");
    // A cut-off file has no trailer.
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = store.latest(7, u64::MAX).expect_err("a truncated file is caught");
    assert!(err.to_string().contains("corrupt"), "{err}");
}

#[test]
fn a_snapshot_that_cannot_be_written_is_an_error_and_the_next_one_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let store = SnapshotStore::open(dir.path()).unwrap();
    let state = big_state(10, 10);
    // The final name is taken by a directory: the rename fails, as a full disk would fail the write.
    std::fs::create_dir(dir.path().join(format!("state-{:020}.snap", state.seq))).unwrap();
    let err = store.save(7, &state).expect_err("cannot rename onto a directory");
    assert!(err.to_string().contains("snapshot store"), "{err}");
    std::fs::remove_dir(dir.path().join(format!("state-{:020}.snap", state.seq))).unwrap();
    store.save(7, &state).unwrap();
    assert_eq!(store.latest(7, u64::MAX).unwrap().expect("saved"), state);
}
