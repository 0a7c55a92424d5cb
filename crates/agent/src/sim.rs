//! The simulated hypervisor: a fake at the hypervisor boundary only.
//!
//! It keeps its VMs in memory, starts them instantly (or after a configured delay) and counts
//! every real start, so tests can prove that no incarnation was started twice. Its state lives
//! in an `Arc`, so one `SimDriver` can outlive an agent and be handed to the next — exactly as
//! a real hypervisor outlives a crashed agent.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use novacron_types::{IncarnationId, Resources, StartVm, VmId};

use crate::driver::{Driver, DriverError, HostUsage, RunningVm};

#[derive(Default)]
struct Inner {
    running: BTreeMap<VmId, (IncarnationId, Resources)>,
    starts: BTreeMap<IncarnationId, u32>,
}

/// An in-memory hypervisor. Cloning shares the same simulated machine.
#[derive(Clone, Default)]
pub struct SimDriver {
    inner: Arc<Mutex<Inner>>,
    start_delay: Duration,
}

impl SimDriver {
    /// A simulated host whose VMs start after `start_delay`.
    #[must_use]
    pub fn with_start_delay(start_delay: Duration) -> Self {
        SimDriver {
            inner: Arc::default(),
            start_delay,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the maps half-updated (each critical
        // section is one insert/remove), so a poisoned lock is still consistent.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How many times this incarnation was really started (0 or 1, unless something is wrong).
    #[must_use]
    pub fn start_count(&self, incarnation: IncarnationId) -> u32 {
        self.lock().starts.get(&incarnation).copied().unwrap_or(0)
    }

    /// Total real starts across all incarnations.
    #[must_use]
    pub fn total_starts(&self) -> u32 {
        self.lock().starts.values().sum()
    }
}

impl Driver for SimDriver {
    fn name(&self) -> &'static str {
        "sim"
    }

    async fn start(&self, cmd: &StartVm) -> Result<(), DriverError> {
        if self.lock().running.get(&cmd.vm).map(|r| r.0) == Some(cmd.incarnation) {
            return Ok(());
        }
        if !self.start_delay.is_zero() {
            tokio::time::sleep(self.start_delay).await;
        }
        let mut inner = self.lock();
        inner
            .running
            .insert(cmd.vm, (cmd.incarnation, cmd.spec.resources()));
        *inner.starts.entry(cmd.incarnation).or_default() += 1;
        Ok(())
    }

    async fn stop(&self, vm: VmId, incarnation: IncarnationId) -> Result<(), DriverError> {
        let mut inner = self.lock();
        if inner.running.get(&vm).map(|r| r.0) == Some(incarnation) {
            inner.running.remove(&vm);
        }
        Ok(())
    }

    fn running(&self) -> Vec<RunningVm> {
        self.lock()
            .running
            .iter()
            .map(|(vm, (inc, _))| RunningVm {
                vm: *vm,
                incarnation: *inc,
            })
            .collect()
    }

    /// Simulated load: each vCPU reserved keeps 60% of a host vCPU busy; memory is fully used.
    fn host_usage(&self, capacity: Resources) -> HostUsage {
        let inner = self.lock();
        let (vcpus, mem) = inner.running.values().fold((0u64, 0u64), |(c, m), (_, r)| {
            (c + u64::from(r.vcpus), m + r.memory_mib)
        });
        let cpu_util = if capacity.vcpus == 0 {
            0.0
        } else {
            (vcpus as f64 * 0.6 / f64::from(capacity.vcpus)).min(1.0)
        };
        HostUsage {
            cpu_util,
            memory_used_mib: mem,
        }
    }
}
