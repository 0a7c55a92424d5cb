//! Self-fencing: an agent cut off from the bus stops its VMs before anyone restarts them
//! elsewhere.
//!
//! The agent holds a **lease**: its key in the KV bucket [`proto::HOST_LEASE_BUCKET`], renewed
//! about every third of the lease (and on every heartbeat after a failed attempt) by a
//! compare-and-set on the revision it last wrote. Every heartbeat carries the revision of the
//! last acknowledged renewal. Each renewal that the server acknowledges extends the lease to
//! *its send time* + `lease`. When the lease runs out
//! the agent fences at once (a timer wakes it at the deadline): every VM it runs is killed (or
//! paused, by configuration) and recorded as not running. When the bus comes back it reports
//! each fenced VM as `VmFailed` with the reason.
//!
//! The orchestrator declares a host failed by a compare-and-set of [`proto::LEASE_FAILED`] on
//! the revision the host's last heartbeat carried, after `host_failure_timeout` of silence. That
//! write succeeds only if the agent has not renewed since — so the agent's lease ended by then,
//! [`crate::FENCE_MARGIN`] earlier. A renewal that finds the marker tells a connected agent it
//! was declared failed: it fences at once and takes a fresh lease. `docs/fencing.md` has the
//! argument.

use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use bytes::Bytes;
use novacron_protocol as proto;
use novacron_types::event::VmFailed;
use novacron_types::telemetry::Heartbeat;
use novacron_types::{Generation, IncarnationId, ReportKind, SCHEMA_VERSION, VmId};
use tokio_util::sync::CancellationToken;

use crate::driver::Driver;
use crate::journal::JournalVm;
use crate::{Agent, FenceAction, metrics as m};

/// What the fence loop knows of its lease from one tick to the next.
struct LeaseState {
    /// The lease bucket, while it answers.
    store: Option<kv::Store>,
    /// The revision of the last acknowledged renewal.
    held: Option<u64>,
    /// When the renewal that holds the lease was sent: the lease ends `lease` later.
    from: Instant,
    /// VMs fenced and not yet reported as failed, and why they were fenced.
    fenced: Vec<(VmId, IncarnationId, Generation)>,
    fenced_why: String,
}

/// What one attempt to renew the lease found.
enum Renewal {
    /// The server stored the renewal at this revision.
    Renewed(u64),
    /// The orchestrator declared the host failed (the marker is at this revision).
    DeclaredFailed(u64),
    /// No answer, or an error: the lease is not extended.
    Unreachable(String),
}

impl<D: Driver> Agent<D> {
    /// One renewal: a compare-and-set on the revision held; without one (start, or the key
    /// moved under us), whatever is there decides.
    async fn renew(&self, store: &kv::Store, held: Option<u64>) -> Renewal {
        let key = self.cfg.host.as_str();
        let value = Bytes::from_static(proto::LEASE_HELD);
        if let Some(rev) = held {
            match store.update(key, value.clone(), rev).await {
                Ok(next) => return Renewal::Renewed(next),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
                Err(e) => return Renewal::Unreachable(e.to_string()),
            }
        }
        match store.entry(key).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put && e.value.as_ref() == proto::LEASE_FAILED => {
                Renewal::DeclaredFailed(e.revision)
            }
            // Our own lease from before (a restart, or a server that lost a write): take it over.
            Ok(Some(e)) if e.operation == kv::Operation::Put => match store.update(key, value, e.revision).await {
                Ok(next) => Renewal::Renewed(next),
                Err(e) => Renewal::Unreachable(e.to_string()),
            },
            Ok(_) => match store.create(key, value).await {
                Ok(next) => Renewal::Renewed(next),
                Err(e) => Renewal::Unreachable(e.to_string()),
            },
            Err(e) => Renewal::Unreachable(e.to_string()),
        }
    }

    pub(crate) async fn fence_loop(self: std::sync::Arc<Self>, cancel: CancellationToken) {
        let lease = self.cfg.lease;
        let period = self.cfg.heartbeat_interval.min(lease / 3).max(Duration::from_millis(20));
        // A renewal is a write to a replicated stream, a heartbeat a core message: renew about
        // every third of the lease (the last tick before that much time has passed), which
        // leaves two more tries before the lease runs out, and on every tick after a miss.
        let renew_period = (lease / 3).max(period);
        let mut seq = 0u64;
        // Registering proved contact with the bus: the lease counts from the loop's start
        // until the first renewal.
        let mut l =
            LeaseState { store: None, held: None, from: Instant::now(), fenced: Vec::new(), fenced_why: String::new() };
        self.driver.lease_valid_for(lease);
        loop {
            let now = Instant::now();
            if (l.held.is_none() || l.store.is_none() || now + period > l.from + renew_period)
                && !self.renew_lease(&mut l, now, period, &cancel).await
            {
                return;
            }
            if self.cfg.heartbeats {
                // After any renewal, so the revision it carries is the newest acknowledged: the
                // orchestrator can fail the host only by overwriting that very revision.
                let beat = Heartbeat {
                    schema: SCHEMA_VERSION,
                    host: self.cfg.host.clone(),
                    at_ms: crate::now_ms(),
                    seq,
                    lease_revision: l.held,
                };
                seq += 1;
                // Losing a heartbeat is harmless; the next one follows.
                let subject = proto::heartbeat_subject(&self.cfg.host);
                let _ = self.bus.client.publish(subject, novacron_types::encode(&beat).into()).await;
            }
            let silent = l.from.elapsed();
            if silent > lease {
                let why =
                    format!("no lease renewal for {:.1} s (lease {:.1} s)", silent.as_secs_f64(), lease.as_secs_f64());
                let newly = self.fence(&why).await;
                if !newly.is_empty() {
                    l.fenced_why = why;
                    l.fenced.extend(newly);
                }
            }
            // Sleep until the next tick, but wake at the lease's end to fence on time.
            let until_end = (l.from + lease).saturating_duration_since(Instant::now());
            let nap = if until_end.is_zero() { period } else { period.min(until_end + Duration::from_millis(1)) };
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(nap) => {}
            }
        }
    }

    /// One attempt to renew the lease, begun at `now`, and what follows from its outcome: the
    /// new revision, a fence when the orchestrator declared this host failed, the report of
    /// fenced VMs once the bus is back. False when cancelled.
    async fn renew_lease(
        &self,
        l: &mut LeaseState,
        now: Instant,
        period: Duration,
        cancel: &CancellationToken,
    ) -> bool {
        let lease = self.cfg.lease;
        let remaining = (l.from + lease).saturating_duration_since(now);
        // An attempt never runs past the lease's end: fencing must not wait for it.
        let within = if remaining.is_zero() { period } else { period.min(remaining) };
        let attempt = async {
            if l.store.is_none() {
                l.store = self.bus.host_leases(self.cfg.replicas).await.ok();
            }
            match &l.store {
                Some(s) => self.renew(s, l.held).await,
                None => Renewal::Unreachable(format!("the lease bucket {} is unavailable", proto::HOST_LEASE_BUCKET)),
            }
        };
        let outcome = tokio::select! {
            () = cancel.cancelled() => return false,
            r = tokio::time::timeout(within, attempt) => r.unwrap_or_else(|_| Renewal::Unreachable("timed out".into())),
        };
        match outcome {
            Renewal::Renewed(rev) => {
                l.held = Some(rev);
                l.from = now;
                self.driver.lease_valid_for(lease.saturating_sub(now.elapsed()));
                if !l.fenced.is_empty() && !self.report_fenced(&mut l.fenced, &l.fenced_why, cancel).await {
                    return false;
                }
            }
            Renewal::DeclaredFailed(rev) => {
                l.held = None;
                tracing::error!(host = %self.cfg.host, "the orchestrator declared this host failed; fencing now");
                let newly = self.fence("the orchestrator declared this host failed").await;
                if !newly.is_empty() {
                    l.fenced_why = "the orchestrator declared this host failed".into();
                    l.fenced.extend(newly);
                }
                // Nothing runs here any more: take a fresh lease over the marker.
                if let Some(s) = &l.store
                    && let Ok(next) = s.update(self.cfg.host.as_str(), Bytes::from_static(proto::LEASE_HELD), rev).await
                {
                    l.held = Some(next);
                    l.from = Instant::now();
                    self.driver.lease_valid_for(lease);
                }
                if !l.fenced.is_empty()
                    && l.held.is_some()
                    && !self.report_fenced(&mut l.fenced, &l.fenced_why, cancel).await
                {
                    return false;
                }
            }
            // A write whose answer was lost moved the revision: the next compare-and-set fails
            // and `renew` reads it back. The bucket is opened afresh (and re-created if the
            // server lost it).
            Renewal::Unreachable(why) => {
                tracing::debug!(host = %self.cfg.host, %why, "lease not renewed");
                l.store = None;
            }
        }
        true
    }

    /// Reports the fenced VMs as failed, once the bus is back. False when cancelled.
    async fn report_fenced(
        &self,
        fenced: &mut Vec<(VmId, IncarnationId, Generation)>,
        why: &str,
        cancel: &CancellationToken,
    ) -> bool {
        tracing::warn!(host = %self.cfg.host, vms = fenced.len(), "bus reachable again; reporting fenced VMs");
        let action = match self.cfg.fence_action {
            FenceAction::Stop => "killed",
            FenceAction::Pause => "paused",
        };
        for (vm, incarnation, generation) in std::mem::take(fenced) {
            let reason = format!("self-fenced ({action}): {why}");
            let report =
                ReportKind::VmFailed(VmFailed { vm, host: self.cfg.host.clone(), incarnation, generation, reason });
            if !self.report(report, cancel).await {
                return false;
            }
        }
        true
    }

    /// Kills (or pauses) every VM the journal says runs. Returns what it fenced.
    async fn fence(&self, why: &str) -> Vec<(VmId, IncarnationId, Generation)> {
        let Ok(vms) = self.journal.vms() else { return Vec::new() };
        let mut done = Vec::new();
        for (vm, j) in vms.into_iter().filter(|(_, j)| j.running) {
            let result = match self.cfg.fence_action {
                FenceAction::Stop => self.driver.kill(vm, j.incarnation).await,
                FenceAction::Pause => self.driver.pause(vm, j.incarnation).await,
            };
            match result {
                Ok(()) => {
                    let rec = JournalVm { running: false, ..j.clone() };
                    if let Err(e) = self.journal.set_vm(vm, &rec) {
                        tracing::error!(host = %self.cfg.host, %vm, error = %e, "journal write failed while fencing");
                    }
                    ::metrics::counter!(m::FENCED_VMS).increment(1);
                    tracing::error!(
                        host = %self.cfg.host, %vm, lease_ms = self.cfg.lease.as_millis() as u64,
                        action = ?self.cfg.fence_action, why, "self-fenced"
                    );
                    done.push((vm, j.incarnation, j.generation));
                }
                Err(e) => tracing::error!(host = %self.cfg.host, %vm, error = %e, "could not fence a VM"),
            }
        }
        done
    }
}
