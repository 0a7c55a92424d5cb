//! Making the journal, the hypervisor and the reports agree.
//!
//! At start, the agent compares what the driver finds running (it adopts VMs that outlived the
//! previous agent) with what its journal says should run, and settles every difference towards
//! the one rule that matters — never a second copy of a VM:
//!
//! | driver runs it? | journal says            | action                                   | report     |
//! |-----------------|-------------------------|------------------------------------------|------------|
//! | yes             | this incarnation runs   | adopt                                    | VmRunning  |
//! | yes             | stopped / other / none  | stop it                                  | VmStopped  |
//! | no              | this incarnation runs   | record it stopped                        | VmFailed   |
//!
//! While running, VMs that end on their own (crash, kill, guest power-off) come from the
//! driver's exit channel and are reported as `VmFailed` with the driver's reason.

use std::collections::BTreeMap;

use novacron_types::event::{VmFailed, VmIncarnationReport};
use novacron_types::{IncarnationId, ReportKind, VmId};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::driver::{Driver, RunningVm, VmExit};
use crate::journal::{JournalError, JournalVm};
use crate::{Agent, metrics as m};

impl<D: Driver> Agent<D> {
    /// Settles the journal against what the driver runs; returns the reports to send once the
    /// host is registered.
    pub(crate) async fn reconcile_at_start(&self, running: &[RunningVm]) -> Result<Vec<ReportKind>, JournalError> {
        let journal: BTreeMap<VmId, JournalVm> = self.journal.vms()?.into_iter().collect();
        let live: BTreeMap<VmId, IncarnationId> = running.iter().map(|r| (r.vm, r.incarnation)).collect();
        let mut reports = Vec::new();
        for (&vm, &incarnation) in &live {
            match journal.get(&vm) {
                Some(j) if j.incarnation == incarnation && j.running => {
                    tracing::info!(host = %self.cfg.host, %vm, "adopted a VM that outlived the previous agent");
                    reports.push(ReportKind::VmRunning(self.observed(vm, j)));
                }
                other => {
                    tracing::warn!(host = %self.cfg.host, %vm, %incarnation, "stopping a VM the journal does not expect to run");
                    if let Err(e) = self.driver.stop(vm, incarnation).await {
                        tracing::error!(host = %self.cfg.host, %vm, error = %e, "could not stop an unexpected VM");
                        continue;
                    }
                    ::metrics::counter!(m::RECONCILE_STOPPED).increment(1);
                    if let Some(j) = other.filter(|j| j.incarnation == incarnation) {
                        let rec = JournalVm { running: false, ..j.clone() };
                        self.journal.set_vm(vm, &rec)?;
                        reports.push(ReportKind::VmStopped(self.observed(vm, &rec)));
                    }
                }
            }
        }
        for (&vm, j) in &journal {
            if j.running && live.get(&vm) != Some(&j.incarnation) {
                tracing::warn!(host = %self.cfg.host, %vm, "a VM the journal says runs is gone");
                let rec = JournalVm { running: false, ..j.clone() };
                self.journal.set_vm(vm, &rec)?;
                reports.push(ReportKind::VmFailed(VmFailed {
                    vm,
                    host: self.cfg.host.clone(),
                    incarnation: j.incarnation,
                    generation: j.generation,
                    reason: "not running when the agent restarted".into(),
                }));
            }
        }
        Ok(reports)
    }

    pub(crate) fn observed(&self, vm: VmId, j: &JournalVm) -> VmIncarnationReport {
        VmIncarnationReport { vm, host: self.cfg.host.clone(), incarnation: j.incarnation, generation: j.generation }
    }

    /// Reports VMs that end on their own.
    pub(crate) async fn exit_watcher(self: std::sync::Arc<Self>, cancel: CancellationToken) {
        let mut exits = self.driver.exits();
        loop {
            let exit = tokio::select! {
                () = cancel.cancelled() => return,
                e = exits.recv() => e,
            };
            match exit {
                Ok(exit) => self.vm_exited(exit, &cancel).await,
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(host = %self.cfg.host, missed = n, "missed VM exits; sweeping");
                    self.sweep(&cancel).await;
                }
                Err(RecvError::Closed) => return,
            }
        }
    }

    async fn vm_exited(&self, exit: VmExit, cancel: &CancellationToken) {
        let Ok(Some(j)) = self.journal.vm(exit.vm) else { return };
        if j.incarnation != exit.incarnation || !j.running {
            return;
        }
        let rec = JournalVm { running: false, ..j };
        if let Err(e) = self.journal.set_vm(exit.vm, &rec) {
            tracing::error!(host = %self.cfg.host, vm = %exit.vm, error = %e, "journal write failed for a VM exit");
        }
        ::metrics::counter!(m::VM_EXITS).increment(1);
        tracing::warn!(host = %self.cfg.host, vm = %exit.vm, reason = %exit.reason, "VM failed");
        let report = ReportKind::VmFailed(VmFailed {
            vm: exit.vm,
            host: self.cfg.host.clone(),
            incarnation: exit.incarnation,
            generation: rec.generation,
            reason: exit.reason,
        });
        self.report(report, cancel).await;
    }

    /// Every VM the journal says runs but the driver does not: reported failed.
    async fn sweep(&self, cancel: &CancellationToken) {
        let live: BTreeMap<VmId, IncarnationId> =
            self.driver.running().into_iter().map(|r| (r.vm, r.incarnation)).collect();
        let Ok(journal) = self.journal.vms() else { return };
        for (vm, j) in journal {
            if j.running && live.get(&vm) != Some(&j.incarnation) {
                let exit =
                    VmExit { vm, incarnation: j.incarnation, reason: "no longer running (found by a sweep)".into() };
                self.vm_exited(exit, cancel).await;
            }
        }
    }
}
