//! Self-fencing: an agent cut off from the bus stops its VMs before anyone restarts them
//! elsewhere.
//!
//! The agent holds a **lease**: its key in the KV bucket [`proto::HOST_LEASE_BUCKET`], renewed
//! about every third of the lease (and a heartbeat period after a failed attempt) by a
//! compare-and-set on the revision it last wrote. An attempt runs beside the heartbeats and may
//! take up to a lease: an overloaded server answers late, not never. Every heartbeat carries
//! the revision of the last acknowledged renewal. Each renewal that the server acknowledges extends the lease to
//! *its send time* + `lease`. When the lease runs out
//! the agent fences at once (a timer wakes it at the deadline): every VM it runs is killed (or
//! paused, by configuration) and recorded as not running. When the bus comes back it reports
//! each fenced VM as `VmFailed` with the reason.
//!
//! The orchestrator declares a host failed by a compare-and-set of [`proto::LEASE_FAILED`] on
//! the revision the host's last heartbeat carried, after `host_failure_timeout` of silence. That
//! write succeeds only if the agent has not renewed since — so the agent's lease ended by then,
//! [`crate::FENCE_MARGIN`] earlier. A renewal that finds the marker tells a connected agent it
//! was declared failed: it fences at once, notes where EVENTS ends (in the journal, flushed),
//! and only then takes a fresh lease. `docs/fencing.md` has the argument.
//!
//! Commands keep arriving while renewals fail (an overloaded server answers the consumer but
//! not the lease write in time), so the lease also gates the commands that start a VM
//! ([`LeaseView`]): a start waits while the lease does not hold for a third of its length
//! more; a start logged at or below the noted end of EVENTS was issued before the host was
//! declared failed — its VM has been placed elsewhere since — and is refused; a VM whose lease
//! ran out while it started is fenced at once.

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

/// The lease as the command loop sees it (the fence loop writes it).
#[derive(Clone, Copy, Debug)]
pub(crate) struct LeaseView {
    /// The lease holds until then; `None` before the first renewal and after a declared
    /// failure until the fresh lease.
    pub(crate) until: Option<Instant>,
    /// The last EVENTS sequence written before the orchestrator last declared this host
    /// failed (0: never): no VM starts for a command logged at or below it.
    pub(crate) fenced_through: u64,
}

/// Whether a command may start a VM.
pub(crate) enum StartGate {
    Open,
    /// Never: it was issued before this host was declared failed.
    Refused(String),
    Cancelled,
}

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
    /// Whether the VMs were fenced since the lease last lapsed.
    lapse_fenced: bool,
    /// The failure marker's revision whose end of EVENTS is noted (a retry of the fresh lease
    /// does not note a later end, which could refuse commands issued after the declaration).
    noted: Option<u64>,
}

/// What one attempt to renew the lease found.
enum Renewal {
    /// The server stored the renewal at this revision.
    Renewed(u64),
    /// The orchestrator declared the host failed (the marker is at this revision).
    DeclaredFailed(u64),
    /// No answer, or an error: the lease is not extended. `reopen`: the bucket may be gone.
    Unreachable { why: String, reopen: bool },
}

impl Renewal {
    fn unanswered() -> Renewal {
        Renewal::Unreachable { why: "no answer within the lease".into(), reopen: false }
    }

    /// An error of the server or the client: a timeout means a slow server, anything else
    /// that the bucket may need opening again.
    fn failed(e: &impl std::fmt::Display, timed_out: bool) -> Renewal {
        Renewal::Unreachable { why: e.to_string(), reopen: !timed_out }
    }
}

/// The answer of the renewal under way; never, without one.
async fn answered(
    renewal: &mut Option<(Instant, tokio::task::JoinHandle<Attempt>)>,
) -> Result<Attempt, tokio::task::JoinError> {
    match renewal {
        Some((_, task)) => task.await,
        None => std::future::pending().await,
    }
}

/// A renewal attempt's outcome, with the bucket it used (`None`: keep the one known).
struct Attempt {
    renewal: Renewal,
    store: Option<kv::Store>,
}

impl<D: Driver> Agent<D> {
    /// Waits until the lease holds for a third of its length more, so that a VM started now
    /// does not outlive it unnoticed; refuses at once a command logged (at EVENTS sequence
    /// `logged_at`) before this host was last declared failed.
    pub(crate) async fn start_gate(&self, logged_at: Option<u64>, cancel: &CancellationToken) -> StartGate {
        let margin = self.cfg.lease / 3;
        let mut view = self.lease_view.subscribe();
        let mut waited = false;
        loop {
            let now = *view.borrow_and_update();
            match logged_at {
                Some(seq) if seq > now.fenced_through => {}
                _ if now.fenced_through == 0 => {}
                Some(seq) => {
                    return StartGate::Refused(format!(
                        "issued before the orchestrator declared this host failed (logged at EVENTS sequence {seq}, \
                         the log ended at {} then): its VM has been placed elsewhere",
                        now.fenced_through
                    ));
                }
                None => {
                    return StartGate::Refused(
                        "its place in EVENTS is unknown, and this host was declared failed before".into(),
                    );
                }
            }
            if now.until.is_some_and(|until| until > Instant::now() + margin) {
                return StartGate::Open;
            }
            if !waited {
                waited = true;
                ::metrics::counter!(m::STARTS_WAITED_FOR_LEASE).increment(1);
                tracing::warn!(host = %self.cfg.host, "the lease is not renewed; VM starts wait for it");
            }
            // The fence loop writes the view on every renewal and fence.
            tokio::select! {
                () = cancel.cancelled() => return StartGate::Cancelled,
                changed = view.changed() => if changed.is_err() { return StartGate::Cancelled },
            }
        }
    }

    /// Whether the lease holds right now.
    pub(crate) fn lease_holds(&self) -> bool {
        self.lease_view.borrow().until.is_some_and(|until| until > Instant::now())
    }

    /// One renewal: a compare-and-set on the revision held; without one (start, or the key
    /// moved under us), whatever is there decides.
    async fn renew(&self, store: &kv::Store, held: Option<u64>) -> Renewal {
        let key = self.cfg.host.as_str();
        let value = Bytes::from_static(proto::LEASE_HELD);
        let update_failed = |e: &kv::UpdateError| Renewal::failed(e, e.kind() == kv::UpdateErrorKind::TimedOut);
        if let Some(rev) = held {
            match store.update(key, value.clone(), rev).await {
                Ok(next) => return Renewal::Renewed(next),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
                Err(e) => return update_failed(&e),
            }
        }
        match store.entry(key).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put && e.value.as_ref() == proto::LEASE_FAILED => {
                Renewal::DeclaredFailed(e.revision)
            }
            // Our own lease from before (a restart, or a server that lost a write): take it over.
            Ok(Some(e)) if e.operation == kv::Operation::Put => match store.update(key, value, e.revision).await {
                Ok(next) => Renewal::Renewed(next),
                Err(e) => update_failed(&e),
            },
            Ok(_) => match store.create(key, value).await {
                Ok(next) => Renewal::Renewed(next),
                Err(e) => Renewal::failed(&e, e.kind() == kv::CreateErrorKind::Ack),
            },
            Err(e) => Renewal::failed(&e, e.kind() == kv::EntryErrorKind::TimedOut),
        }
    }

    pub(crate) async fn fence_loop(self: std::sync::Arc<Self>, cancel: CancellationToken) {
        let lease = self.cfg.lease;
        let period = self.cfg.heartbeat_interval.min(lease / 3).max(Duration::from_millis(20));
        // A renewal is a write to a replicated stream, a heartbeat a core message: renew about
        // every third of the lease (the last tick before that much time has passed), which
        // leaves two more tries before the lease runs out, and a tick after a miss.
        let renew_period = (lease / 3).max(period);
        let mut seq = 0u64;
        // Registering proved contact with the bus: the lease counts from the loop's start
        // until the first renewal.
        let mut l = LeaseState {
            store: None,
            held: None,
            from: Instant::now(),
            fenced: Vec::new(),
            fenced_why: String::new(),
            lapse_fenced: false,
            noted: None,
        };
        self.driver.lease_valid_for(lease);
        // The renewal under way (sent at), in a task of its own: on an overloaded server a
        // write can take seconds, and heartbeats must go on meanwhile. An attempt may take up
        // to a lease; cutting it short after one period and starting over, as the first
        // version did, renewed nothing at all once writes took longer than that.
        let mut renewal: Option<(Instant, tokio::task::JoinHandle<Attempt>)> = None;
        let mut next_try = Instant::now();
        let mut next_beat = Instant::now();
        loop {
            let now = Instant::now();
            if renewal.is_none()
                && now >= next_try
                && (l.held.is_none() || l.store.is_none() || now + period > l.from + renew_period)
            {
                let (agent, store, held) = (self.clone(), l.store.clone(), l.held);
                let attempt = async move {
                    match tokio::time::timeout(lease, agent.attempt(store, held)).await {
                        Ok(done) => done,
                        Err(_) => Attempt { renewal: Renewal::unanswered(), store: None },
                    }
                };
                renewal = Some((now, tokio::spawn(attempt)));
            }
            if self.cfg.heartbeats && now >= next_beat {
                // A heartbeat names the last acknowledged renewal, never one under way: the
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
                let _ = self.lease_bus.client.publish(subject, novacron_types::encode(&beat).into()).await;
                next_beat = now + period;
            }
            // Fenced VMs are reported once the lease holds again, from a task of their own:
            // reports can wait long on an overloaded server, and heartbeats, renewals and the
            // next fence must not wait with them.
            if !l.fenced.is_empty() && self.lease_holds() {
                let (agent, cancel) = (self.clone(), cancel.clone());
                let (fenced, why) = (std::mem::take(&mut l.fenced), l.fenced_why.clone());
                tokio::spawn(async move { agent.report_fenced(fenced, &why, &cancel).await });
            }
            // Once per lapse: nothing starts while the lease does not hold (`start_gate`, and a
            // start that outlived it is fenced when it returns), so there is nothing new to fence
            // until the next renewal. Every tick, a fenced fleet of thousands spent its runtime
            // reading its journals again.
            let silent = l.from.elapsed();
            if silent > lease && !l.lapse_fenced {
                l.lapse_fenced = true;
                let why =
                    format!("no lease renewal for {:.1} s (lease {:.1} s)", silent.as_secs_f64(), lease.as_secs_f64());
                let newly = self.fence(&why).await;
                if !newly.is_empty() {
                    l.fenced_why = why;
                    l.fenced.extend(newly);
                }
            }
            // Sleep until the next heartbeat or the renewal's answer, but wake at the lease's
            // end to fence on time.
            let now = Instant::now();
            let until_end = (l.from + lease).saturating_duration_since(now);
            let until_beat = next_beat.saturating_duration_since(now).max(Duration::from_millis(1));
            let nap =
                if until_end.is_zero() { until_beat } else { until_beat.min(until_end + Duration::from_millis(1)) };
            tokio::select! {
                () = cancel.cancelled() => {
                    if let Some((_, task)) = renewal {
                        task.abort();
                    }
                    return;
                }
                () = tokio::time::sleep(nap) => {}
                done = answered(&mut renewal) => {
                    let sent = renewal.take().map_or(now, |(sent, _)| sent);
                    let done = done.unwrap_or_else(|e| Attempt {
                        renewal: Renewal::Unreachable { why: format!("renewal task: {e}"), reopen: false },
                        store: None,
                    });
                    if let Some(store) = done.store {
                        l.store = Some(store);
                    }
                    if !matches!(done.renewal, Renewal::Renewed(_)) {
                        next_try = Instant::now() + period;
                    }
                    self.settle(&mut l, sent, done.renewal, period).await;
                }
            }
        }
    }

    /// One attempt to renew the lease, opening the bucket first if need be.
    async fn attempt(&self, store: Option<kv::Store>, held: Option<u64>) -> Attempt {
        let store = match store {
            Some(s) => s,
            None => match self.lease_bus.host_leases(self.cfg.replicas).await {
                Ok(s) => s,
                Err(e) => {
                    let why = format!("the lease bucket {} is unavailable: {e}", proto::HOST_LEASE_BUCKET);
                    return Attempt { renewal: Renewal::Unreachable { why, reopen: true }, store: None };
                }
            },
        };
        Attempt { renewal: self.renew(&store, held).await, store: Some(store) }
    }

    /// What follows from a renewal sent at `sent`: the new revision, or a fence when the
    /// orchestrator declared this host failed (then, once where EVENTS ends is noted, a fresh
    /// lease over the marker).
    async fn settle(&self, l: &mut LeaseState, sent: Instant, outcome: Renewal, period: Duration) {
        let lease = self.cfg.lease;
        match outcome {
            Renewal::Renewed(rev) => {
                l.held = Some(rev);
                l.from = sent;
                l.lapse_fenced = false;
                self.lease_view.send_modify(|v| v.until = Some(sent + lease));
                self.driver.lease_valid_for(lease.saturating_sub(sent.elapsed()));
            }
            Renewal::DeclaredFailed(rev) => {
                l.held = None;
                self.lease_view.send_modify(|v| v.until = None);
                tracing::error!(host = %self.cfg.host, "the orchestrator declared this host failed; fencing now");
                let newly = self.fence("the orchestrator declared this host failed").await;
                if !newly.is_empty() {
                    l.fenced_why = "the orchestrator declared this host failed".into();
                    l.fenced.extend(newly);
                }
                // Every command issued before the declaration is in EVENTS by now: note where
                // the log ends, so that none of them starts a VM here, then take a fresh lease.
                if l.noted != Some(rev) {
                    if self.note_fenced_through(period).await.is_none() {
                        return;
                    }
                    l.noted = Some(rev);
                }
                let fresh = Instant::now();
                if let Some(s) = &l.store
                    && let Ok(next) = s.update(self.cfg.host.as_str(), Bytes::from_static(proto::LEASE_HELD), rev).await
                {
                    l.held = Some(next);
                    l.from = fresh;
                    l.lapse_fenced = false;
                    self.lease_view.send_modify(|v| v.until = Some(fresh + lease));
                    self.driver.lease_valid_for(lease);
                    tracing::warn!(
                        host = %self.cfg.host, fenced_through = self.lease_view.borrow().fenced_through,
                        "fresh lease taken after the declared failure"
                    );
                }
            }
            // A write whose answer was lost moved the revision: the next compare-and-set fails
            // and `renew` reads it back. A bucket that is gone is opened afresh (and
            // re-created); a slow one is kept — reopening asks the server's API, which is what
            // is slow under load.
            Renewal::Unreachable { why, reopen } => {
                tracing::debug!(host = %self.cfg.host, %why, "lease not renewed");
                if reopen {
                    l.store = None;
                }
            }
        }
    }

    /// Where EVENTS ends now, raised into the journal (flushed) and the lease view; `None`
    /// (and a warning) when the server does not say within `patience` or the journal fails:
    /// the fresh lease waits for the next try.
    async fn note_fenced_through(&self, patience: Duration) -> Option<u64> {
        let end = async {
            let events = self.lease_bus.js.get_stream(proto::EVENTS_STREAM).await.map_err(|e| e.to_string())?;
            Ok::<u64, String>(events.cached_info().state.last_sequence)
        };
        let end = match tokio::time::timeout(patience, end).await {
            Ok(Ok(end)) => end,
            Ok(Err(why)) => {
                tracing::warn!(host = %self.cfg.host, %why, "cannot read where EVENTS ends; the fresh lease waits");
                return None;
            }
            Err(_) => {
                tracing::warn!(host = %self.cfg.host, "no answer on where EVENTS ends; the fresh lease waits");
                return None;
            }
        };
        if let Err(e) = self.journal.raise_fenced_through(end) {
            tracing::error!(host = %self.cfg.host, error = %e, "cannot journal where EVENTS ended; the fresh lease waits");
            return None;
        }
        self.lease_view.send_modify(|v| v.fenced_through = v.fenced_through.max(end));
        Some(end)
    }

    /// Reports the fenced VMs as failed (the lease holds again, so the bus is back). False
    /// when cancelled.
    async fn report_fenced(
        &self,
        fenced: Vec<(VmId, IncarnationId, Generation)>,
        why: &str,
        cancel: &CancellationToken,
    ) -> bool {
        tracing::warn!(host = %self.cfg.host, vms = fenced.len(), "bus reachable again; reporting fenced VMs");
        for (vm, incarnation, generation) in fenced {
            let reason = format!("self-fenced ({}): {why}", self.cfg.fence_action.done());
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
            if self.fence_vm(vm, &j, why).await {
                done.push((vm, j.incarnation, j.generation));
            }
        }
        done
    }

    /// Fences one VM that just started, as its report: `VmFailed` with the reason, or the
    /// `VmRunning` it had (`running`) when it could not be fenced (the fence loop tries again).
    pub(crate) async fn fence_one(&self, running: ReportKind, why: &str) -> ReportKind {
        let ReportKind::VmRunning(r) = &running else { return running };
        if !self
            .fence_vm(r.vm, &JournalVm { incarnation: r.incarnation, generation: r.generation, running: true }, why)
            .await
        {
            return running;
        }
        ReportKind::VmFailed(VmFailed {
            vm: r.vm,
            host: r.host.clone(),
            incarnation: r.incarnation,
            generation: r.generation,
            reason: format!("self-fenced ({}): {why}", self.cfg.fence_action.done()),
        })
    }

    /// Kills (or pauses) one VM and journals it as not running. False when the driver failed.
    async fn fence_vm(&self, vm: VmId, j: &JournalVm, why: &str) -> bool {
        let result = match self.cfg.fence_action {
            FenceAction::Stop => self.driver.kill(vm, j.incarnation).await,
            FenceAction::Pause => self.driver.pause(vm, j.incarnation).await,
        };
        if let Err(e) = result {
            tracing::error!(host = %self.cfg.host, %vm, error = %e, "could not fence a VM");
            return false;
        }
        let rec = JournalVm { running: false, ..j.clone() };
        if let Err(e) = self.journaled(move |j| j.set_vm(vm, &rec)).await {
            tracing::error!(host = %self.cfg.host, %vm, error = %e, "journal write failed while fencing");
        }
        ::metrics::counter!(m::FENCED_VMS).increment(1);
        tracing::error!(
            host = %self.cfg.host, %vm, lease_ms = self.cfg.lease.as_millis() as u64,
            action = ?self.cfg.fence_action, why, "self-fenced"
        );
        true
    }
}
