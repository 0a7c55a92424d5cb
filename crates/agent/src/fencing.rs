//! Self-fencing: an agent cut off from the bus stops its VMs before anyone restarts them
//! elsewhere.
//!
//! The agent proves it can reach NATS every `lease / 5` with a round trip to the server (a
//! request on `nc.lease.<host>`; "no responders" is an answer from the server, so it counts).
//! When no round trip has succeeded for longer than the lease, it fences: every VM it runs is
//! stopped (or paused, by configuration) and recorded as not running. When the bus comes back it
//! reports each fenced VM as `VmFailed` with the reason.
//!
//! The orchestrator declares a host failed — and only then restarts its VMs elsewhere — after
//! `host_failure_timeout` without heartbeats. [`crate::AgentConfig::check`] refuses a lease that
//! is not shorter than that timeout by [`crate::FENCE_MARGIN`], which covers the probe period,
//! the time to stop the VMs and clock-rate differences. `docs/fencing.md` has the argument.

use std::time::{Duration, Instant};

use async_nats::RequestErrorKind;
use novacron_types::event::VmFailed;
use novacron_types::{Generation, IncarnationId, ReportKind, VmId};
use tokio_util::sync::CancellationToken;

use crate::driver::Driver;
use crate::journal::JournalVm;
use crate::{Agent, FenceAction, metrics as m};

impl<D: Driver> Agent<D> {
    /// One round trip to the server, bounded by `within`.
    async fn bus_reachable(&self, within: Duration) -> bool {
        let probe = self.bus.client.request(format!("nc.lease.{}", self.cfg.host), bytes::Bytes::new());
        match tokio::time::timeout(within, probe).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => e.kind() == RequestErrorKind::NoResponders,
            Err(_) => false,
        }
    }

    pub(crate) async fn fence_loop(self: std::sync::Arc<Self>, cancel: CancellationToken) {
        let period = (self.cfg.lease / 5).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut last_contact = Instant::now();
        let mut fenced: Vec<(VmId, IncarnationId, Generation)> = Vec::new();
        let mut fenced_after = Duration::ZERO;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            if self.bus_reachable(period.max(Duration::from_millis(250))).await {
                last_contact = Instant::now();
                if !fenced.is_empty() {
                    tracing::warn!(host = %self.cfg.host, vms = fenced.len(), "bus reachable again; reporting fenced VMs");
                    for (vm, incarnation, generation) in std::mem::take(&mut fenced) {
                        let reason = format!(
                            "self-fenced ({}) after losing the bus for {:.1} s (lease {:.1} s)",
                            match self.cfg.fence_action {
                                FenceAction::Stop => "stopped",
                                FenceAction::Pause => "paused",
                            },
                            fenced_after.as_secs_f64(),
                            self.cfg.lease.as_secs_f64()
                        );
                        let report = ReportKind::VmFailed(VmFailed {
                            vm,
                            host: self.cfg.host.clone(),
                            incarnation,
                            generation,
                            reason,
                        });
                        if !self.report(report, &cancel).await {
                            return;
                        }
                    }
                }
                continue;
            }
            let silent = last_contact.elapsed();
            if silent <= self.cfg.lease {
                continue;
            }
            let newly = self.fence(silent).await;
            if !newly.is_empty() {
                fenced_after = silent;
                fenced.extend(newly);
            }
        }
    }

    /// Stops (or pauses) every VM the journal says runs. Returns what it fenced.
    async fn fence(&self, silent: Duration) -> Vec<(VmId, IncarnationId, Generation)> {
        let Ok(vms) = self.journal.vms() else { return Vec::new() };
        let mut done = Vec::new();
        for (vm, j) in vms.into_iter().filter(|(_, j)| j.running) {
            let result = match self.cfg.fence_action {
                FenceAction::Stop => self.driver.stop(vm, j.incarnation).await,
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
                        host = %self.cfg.host, %vm, silent_ms = silent.as_millis() as u64, lease_ms = self.cfg.lease.as_millis() as u64,
                        action = ?self.cfg.fence_action, "self-fenced: no contact with the bus for longer than the lease"
                    );
                    done.push((vm, j.incarnation, j.generation));
                }
                Err(e) => tracing::error!(host = %self.cfg.host, %vm, error = %e, "could not fence a VM"),
            }
        }
        done
    }
}
