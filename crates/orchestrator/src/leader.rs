//! Leader election over a NATS KV lease.
//!
//! ```text
//! KV bucket nc-leader (history 1, max_age = lease TTL), key "orchestrator"
//!   value: {"replica": "orchestrator-2", "http": "http://10.0.0.2:8080"}
//! acquire  create(key)                      succeeds only if nobody holds it (or it expired)
//! renew    update(key, revision) every TTL/3  compare-and-set on the revision we hold
//! resign   delete(key) on a clean shutdown  the next replica takes over at once
//! ```
//! A leader that has not renewed for `TTL − TTL/3` demotes itself before its lease can expire
//! elsewhere; a renewal refused because the revision moved demotes it at once. Followers retry
//! `create` every TTL/3, so a crashed leader is replaced within about TTL + TTL/3.
//!
//! Correctness never rests on the lease alone: every append to the log carries the expected
//! last sequence, so a deposed leader that still believes it leads is refused by the server and
//! has to catch up (see `engine.rs`). The lease decides who *acts* — runs reconcilers, consumes
//! reports, answers writes; the log's fence decides what is *written*.

use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The KV bucket of the lease.
pub const BUCKET: &str = "nc-leader";
/// The key every orchestrator replica competes for.
pub const KEY: &str = "orchestrator";

/// Who holds (or claims) the lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    /// The replica's id.
    pub replica: String,
    /// Where its HTTP API listens.
    pub http: String,
    /// Unique to this process: the lease's value is then this process's alone, even if two
    /// replicas were given the same id.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub process: String,
}

/// What this replica is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Not (yet) known: the election has not run.
    Starting,
    /// Another replica leads (if known); this one follows the log and serves reads.
    Follower {
        /// The current leader.
        leader: Option<LeaderInfo>,
    },
    /// This replica leads; `term` is the lease's revision when it was acquired.
    Leader {
        /// The term.
        term: u64,
    },
}

impl Role {
    /// Whether this replica leads.
    #[must_use]
    pub fn is_leader(&self) -> bool {
        matches!(self, Role::Leader { .. })
    }
}

/// Lease timing.
#[derive(Clone, Copy, Debug)]
pub struct LeaseConfig {
    /// How long a lease lasts without renewal.
    pub ttl: Duration,
}

impl Default for LeaseConfig {
    /// 2 s: on a single server the lease bucket never changes leader, so a short lease is safe
    /// and a killed leader is replaced within TTL + TTL/3 ≈ 2.7 s. In an R3 cluster use ~20 s:
    /// the KV stream's own leader election takes up to 9 s, and a shorter lease would expire then.
    fn default() -> Self {
        LeaseConfig { ttl: Duration::from_secs(2) }
    }
}

/// Creates (or opens) the lease bucket.
///
/// # Errors
/// When JetStream refuses.
pub async fn bucket(
    js: &async_nats::jetstream::Context,
    cfg: LeaseConfig,
    replicas: usize,
) -> Result<kv::Store, String> {
    js.create_key_value(kv::Config {
        bucket: BUCKET.into(),
        description: "NovaCron orchestrator leader lease".into(),
        history: 1,
        max_age: cfg.ttl,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("cannot create the lease bucket {BUCKET}: {e}"))
}

/// One renewal, bounded by `within`; the lease runs from when it was sent, not answered.
async fn renew(
    store: &kv::Store,
    value: &Bytes,
    rev: u64,
    within: Duration,
) -> Result<Result<(u64, Instant), kv::UpdateError>, tokio::time::error::Elapsed> {
    let sent = Instant::now();
    tokio::time::timeout(within, store.update(KEY, value.clone(), rev)).await.map(|r| r.map(|n| (n, sent)))
}

/// Runs the election until `cancel` fires, publishing this replica's role on `role`.
pub async fn run(
    store: kv::Store,
    me: LeaderInfo,
    cfg: LeaseConfig,
    role: watch::Sender<Role>,
    cancel: CancellationToken,
) {
    let value = Bytes::from(serde_json::to_vec(&me).unwrap_or_default());
    let period = (cfg.ttl / 3).max(Duration::from_millis(50));
    let give_up_after = cfg.ttl - cfg.ttl / 3;
    let mut held: Option<(u64, Instant)> = None; // (revision, last successful renewal)
    loop {
        // Every step is a request that waits out a timeout while the bus is unreachable; a
        // shutdown does not wait with it.
        let step = async {
            match held {
                None => match store.create(KEY, value.clone()).await {
                    Ok(rev) => {
                        tracing::info!(replica = %me.replica, term = rev, "acquired the leader lease");
                        held = Some((rev, Instant::now()));
                        role.send_replace(Role::Leader { term: rev });
                    }
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                        let leader = match store.entry(KEY).await {
                            Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                                serde_json::from_slice(&entry.value).ok()
                            }
                            _ => None,
                        };
                        role.send_if_modified(|r| {
                            let next = Role::Follower { leader: leader.clone() };
                            if *r == next {
                                false
                            } else {
                                *r = next;
                                true
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "lease unavailable; following");
                        role.send_if_modified(|r| {
                            if matches!(r, Role::Follower { .. }) {
                                false
                            } else {
                                *r = Role::Follower { leader: None };
                                true
                            }
                        });
                    }
                },
                Some((rev, last)) => match renew(&store, &value, rev, period).await {
                    Ok(Ok((next, sent))) => held = Some((next, sent)),
                    Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                        // A renewal that timed out may still have landed (a busy server): then
                        // the key holds this process's value at a newer revision, no one else
                        // can have taken it since, and the lease is still ours. Its deadline
                        // still counts from the last renewal seen acknowledged.
                        match store.entry(KEY).await {
                            Ok(Some(entry)) if entry.operation == kv::Operation::Put && entry.value == value => {
                                tracing::info!(replica = %me.replica, revision = entry.revision, "a renewal that timed out had landed; still leading");
                                held = Some((entry.revision, last));
                            }
                            _ => {
                                tracing::warn!(replica = %me.replica, "the lease moved to another replica; stepping down");
                                held = None;
                                role.send_replace(Role::Follower { leader: None });
                            }
                        }
                    }
                    other => {
                        if last.elapsed() > give_up_after {
                            tracing::error!(
                                replica = %me.replica, silent_ms = last.elapsed().as_millis() as u64, error = ?other.err(),
                                "could not renew the lease in time; stepping down before it expires"
                            );
                            held = None;
                            role.send_replace(Role::Follower { leader: None });
                        }
                    }
                },
            }
        };
        if cancel.run_until_cancelled(step).await.is_none() {
            break;
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(period) => {}
        }
    }
    if let Some((rev, _)) = held {
        // Hand over at once instead of letting the lease expire.
        // Bounded: with the bus gone the lease simply expires.
        let _ = tokio::time::timeout(period, store.delete_expect_revision(KEY, Some(rev))).await;
        tracing::info!(replica = %me.replica, "resigned the leader lease");
    }
    role.send_replace(Role::Follower { leader: None });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(process: &str) -> LeaderInfo {
        LeaderInfo { replica: "orchestrator-1".into(), http: "http://127.0.0.1:1".into(), process: process.into() }
    }

    #[tokio::test]
    async fn a_renewal_that_landed_after_its_timeout_does_not_depose_the_leader() {
        let server = novacron_testkit::NatsServer::start().unwrap();
        let client = async_nats::connect(server.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let cfg = LeaseConfig { ttl: Duration::from_secs(3) };
        let store = bucket(&js, cfg, 1).await.unwrap();
        let (role, mut watch) = watch::channel(Role::Starting);
        let cancel = CancellationToken::new();
        let me = info("p1");
        let task = tokio::spawn(run(store.clone(), me.clone(), cfg, role, cancel.clone()));
        let term = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Role::Leader { term } = *watch.borrow_and_update() {
                    return term;
                }
                watch.changed().await.unwrap();
            }
        })
        .await
        .expect("the lease is taken");
        // What a renewal whose answer came too late leaves: our own value, one revision on.
        let ours = Bytes::from(serde_json::to_vec(&me).unwrap());
        let current = store.entry(KEY).await.unwrap().unwrap().revision;
        store.update(KEY, ours, current).await.unwrap();
        // The leader's next renewals meet a revision they did not expect; it must keep leading
        // and keep renewing on from the newer revision.
        let seen = store.entry(KEY).await.unwrap().unwrap().revision;
        let renewed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let rev = store.entry(KEY).await.unwrap().unwrap().revision;
                if rev > seen + 1 {
                    return rev;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the leader renews past the landed renewal");
        assert!(renewed > seen);
        assert_eq!(*watch.borrow(), Role::Leader { term }, "never stepped down");
        assert!(!watch.has_changed().unwrap(), "no step down and back");

        // Another process's value at a newer revision is another leader: step down.
        let other = Bytes::from(serde_json::to_vec(&info("p2")).unwrap());
        let current = store.entry(KEY).await.unwrap().unwrap().revision;
        store.update(KEY, other, current).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            while watch.borrow_and_update().is_leader() {
                watch.changed().await.unwrap();
            }
        })
        .await
        .expect("a lease taken by another process deposes this one");
        cancel.cancel();
        task.await.unwrap();
    }
}
