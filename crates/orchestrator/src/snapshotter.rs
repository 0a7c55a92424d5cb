//! Snapshots taken beside the engine, never in its way.
//!
//! A snapshot encodes the whole state (with 10,000 hosts and 10,000 VMs some 5 MB, 12–35 ms
//! on the development machine). Taken by the engine, every request queued behind it waited
//! that long: the largest share of the tail latency at 10,000 hosts. So this task keeps a
//! copy of its own: it folds the log as it grows (the fold is pure, so the copy is the
//! engine's state at the same sequence, hash for hash) and saves it on a blocking thread
//! after every `every` new events — or as many as the state has hosts and VMs, if more (see
//! [`save_due`]) — and once more when the orchestrator stops.
//!
//! The price is a second copy of the folded state in memory (about 1.1 KiB per VM) and a
//! re-read of the log (cheap next to writing it). A save that fails is logged and retried
//! after the next batch of events; the log stays the record either way.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::stream::Stream;
use novacron_eventlog::{SnapshotStore, fold_range};
use novacron_state::ClusterState;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

/// How often the task looks for new events.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// How long a stopping orchestrator waits for the last events before its last snapshot.
const FINAL_CATCH_UP: Duration = Duration::from_secs(1);

/// The snapshot task: its own copy of the state, where it saves, and how often.
pub(crate) struct Snapshotter {
    pub(crate) state: ClusterState,
    pub(crate) stream: Stream,
    pub(crate) store: Arc<SnapshotStore>,
    pub(crate) stream_created_ns: i128,
    /// New events between two snapshots.
    pub(crate) every: u64,
    /// The sequence of the last snapshot saved (or loaded at start).
    pub(crate) saved_at: u64,
}

/// Whether to save now: at least `every` events since the last save, and at least as many as
/// the state has hosts and VMs (`entities`). A save costs in proportion to the state, the
/// replay a restart faces in proportion to the events after the last save; with this rule the
/// saves stay a bounded share of the work the log's growth costs anyway, and the replay is
/// never much longer than loading the snapshot itself. With a fixed 10,000, 100-VM batch
/// creates at 100,000+ VMs saved a state of 140 MB or more every second, a quarter of a core.
fn save_due(seq: u64, saved_at: u64, every: u64, entities: u64) -> bool {
    seq >= saved_at.saturating_add(every.max(entities))
}

impl Snapshotter {
    /// Runs until `cancel`, then folds what the log holds and saves a last snapshot, so that
    /// the next start replays nothing.
    pub(crate) async fn run(mut self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // A catch-up on a bus that is gone waits out request timeouts: dropped at
            // cancellation like every other loop, so that it never holds up a stop. A save is
            // local and never dropped halfway (two saves at once could share a file name).
            let step = async {
                tick.tick().await;
                self.catch_up().await;
            };
            if cancel.run_until_cancelled(step).await.is_none() {
                break;
            }
            let entities = (self.state.hosts.len() + self.state.vms.len()) as u64;
            if save_due(self.state.seq, self.saved_at, self.every, entities) {
                self.save().await;
            }
        }
        // The last events, if the bus answers promptly; what the copy holds is in any case the
        // state of a log prefix, worth saving.
        let _ = tokio::time::timeout(FINAL_CATCH_UP, self.catch_up()).await;
        if self.state.seq > self.saved_at {
            self.save().await;
        }
    }

    async fn catch_up(&mut self) {
        let tail = match self.stream.info().await {
            Ok(info) => info.state.last_sequence,
            Err(e) => {
                tracing::debug!(error = %e, "snapshots: cannot read the log's tail");
                return;
            }
        };
        if tail <= self.state.seq {
            return;
        }
        if let Err(e) = fold_range(&self.stream, &mut self.state, tail).await {
            tracing::warn!(error = %e, seq = self.state.seq, "snapshots: cannot read the log; trying again later");
        }
    }

    async fn save(&mut self) {
        let started = std::time::Instant::now();
        let store = self.store.clone();
        let created = self.stream_created_ns;
        let state = std::mem::take(&mut self.state);
        let seq = state.seq;
        match tokio::task::spawn_blocking(move || {
            let saved = store.save(created, &state);
            (state, saved)
        })
        .await
        {
            Ok((state, saved)) => {
                self.state = state;
                match saved {
                    Ok(()) => {
                        self.saved_at = seq;
                        ::metrics::gauge!(m::SNAPSHOT_SEQ).set(seq as f64);
                        ::metrics::histogram!(m::SNAPSHOT_SECONDS).record(started.elapsed().as_secs_f64());
                        tracing::debug!(seq, elapsed_ms = started.elapsed().as_millis() as u64, "snapshot saved");
                    }
                    // Retried once `every` more events have come.
                    Err(e) => {
                        self.saved_at = seq;
                        tracing::warn!(error = %e, seq, "snapshot not saved");
                    }
                }
            }
            Err(e) => {
                // The save panicked and took the copy with it: start the copy over from the log.
                tracing::error!(error = %e, "snapshot task failed; refolding the log for the next one");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use novacron_eventlog::SnapshotStore;
    use novacron_types::{Actor, VmSpec};
    use tokio_util::sync::CancellationToken;

    use crate::decide::Origin;
    use crate::{Orchestrator, OrchestratorConfig};

    #[test]
    fn saves_come_no_more_often_than_the_state_has_hosts_and_vms() {
        use super::save_due;
        assert!(!save_due(19_999, 10_000, 10_000, 500), "a small state: every 10,000 events");
        assert!(save_due(20_000, 10_000, 10_000, 500));
        assert!(!save_due(109_999, 0, 10_000, 110_000), "110,000 hosts and VMs: every 110,000");
        assert!(save_due(110_000, 0, 10_000, 110_000));
    }

    fn spec(name: &str) -> VmSpec {
        VmSpec {
            name: name.into(),
            vcpus: 1,
            memory_mib: 128,
            disk_gib: 0,
            group: None,
            labels: Default::default(),
            restart: Default::default(),
            placement: Default::default(),
        }
    }

    /// Snapshots are saved while the orchestrator runs (not only at its stop), from the task's
    /// own copy of the state, and the one saved at the stop is the engine's final state.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn snapshots_are_saved_beside_the_engine_and_match_its_state() {
        let server = novacron_testkit::NatsServer::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = OrchestratorConfig::new(server.url(), dir.path().to_owned());
        cfg.http = "127.0.0.1:0".parse().unwrap();
        cfg.snapshot_every = 5;
        let cancel = CancellationToken::new();
        let o = Orchestrator::start(cfg, cancel.clone()).await.unwrap();
        let origin = Origin { actor: Actor::User("test".into()), correlation: None };
        // The first create is taken once this replica leads (it may not yet, on a busy machine).
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match o.engine.create_vm(spec("vm-0"), origin.clone()).await {
                    Err(crate::engine::EngineError::NotLeader(_)) => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    other => return other.unwrap(),
                }
            }
        })
        .await
        .expect("the replica leads");
        // No host: each create is a request and a placement failure, two events or more.
        for i in 1..10 {
            o.engine.create_vm(spec(&format!("vm-{i}")), origin.clone()).await.unwrap();
        }
        let snapshots = dir.path().join("snapshots");
        let saved = || {
            std::fs::read_dir(&snapshots)
                .unwrap()
                .filter_map(|e| e.unwrap().file_name().into_string().ok())
                .filter(|n| n.ends_with(".snap"))
                .count()
        };
        tokio::time::timeout(Duration::from_secs(20), async {
            while saved() == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("a snapshot is saved while the orchestrator runs");

        let acknowledged = crate::engine::read(&o.engine.state).seq;
        o.shutdown().await;
        let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
        let stream = js.get_stream(novacron_protocol::EVENTS_STREAM).await.unwrap();
        let created = stream.clone().info().await.unwrap().created;
        let store = SnapshotStore::open(&snapshots).unwrap();
        let last = store.latest(created.unix_timestamp_nanos(), u64::MAX).unwrap().expect("a snapshot at the stop");
        assert!(last.seq >= acknowledged, "the stop's snapshot holds every acknowledged create");
        // The copy was folded from the log: it is the log's state at that sequence.
        let mut replayed = novacron_state::ClusterState::default();
        novacron_eventlog::fold_range(&stream, &mut replayed, last.seq).await.unwrap();
        assert_eq!(last.hash(), replayed.hash(), "the snapshot is the log's state at its sequence");
        assert_eq!(last.vms.len(), 10);
    }
}
