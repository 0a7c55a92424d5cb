//! The simulated hypervisor: a fake at the hypervisor boundary only.
//!
//! It keeps its VMs in memory, starts them instantly (or after a configured delay) and counts
//! every real start, so tests can prove that no incarnation was started twice. Its state lives
//! in an `Arc`, so one `SimDriver` can outlive an agent and be handed to the next — exactly as
//! a real hypervisor outlives a crashed agent.
//!
//! Failure injection drives the agent's failure paths with the same code as QEMU would:
//! [`SimDriver::crash`] (a VM dies), [`SimDriver::crash_all`] (the hypervisor loses every VM),
//! [`SimDriver::fail_next_starts`] and [`SimDriver::set_start_delay`] (slow or failing starts).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use novacron_types::{IncarnationId, Labels, PrepareIncoming, Resources, StartVm, VmId};
use tokio::sync::broadcast;

use crate::driver::{Driver, DriverError, HostUsage, MigrationStats, RunningVm, VmExit, VmUsage};

#[derive(serde::Serialize, serde::Deserialize)]
struct SimVm {
    incarnation: IncarnationId,
    resources: Resources,
    paused: bool,
}

struct Inner {
    running: BTreeMap<VmId, SimVm>,
    starts: BTreeMap<IncarnationId, u32>,
    fail_starts: u32,
    fail_migrations: u32,
    start_delay: Duration,
    /// The CPU utilisation every running VM reports, 0–1 (60 % unless set).
    vm_cpu: f64,
}

/// An in-memory hypervisor. Cloning shares the same simulated machine.
#[derive(Clone)]
pub struct SimDriver {
    inner: Arc<Mutex<Inner>>,
    exits: broadcast::Sender<VmExit>,
    /// Where a persistent simulated host keeps its VMs, so they outlive the agent process: a
    /// tree and this host's key prefix in it.
    store: Option<(sled::Tree, Vec<u8>)>,
}

impl Default for SimDriver {
    fn default() -> Self {
        SimDriver {
            inner: Arc::new(Mutex::new(Inner {
                running: BTreeMap::new(),
                starts: BTreeMap::new(),
                fail_starts: 0,
                fail_migrations: 0,
                start_delay: Duration::ZERO,
                vm_cpu: 0.6,
            })),
            exits: broadcast::channel(1024).0,
            store: None,
        }
    }
}

impl SimDriver {
    /// Sets the CPU utilisation the simulated VMs report (and load their host with), 0–1 —
    /// a load that a test or a replay can raise and lower.
    pub fn set_vm_cpu(&self, util: f64) {
        self.lock().vm_cpu = util.clamp(0.0, 1.0);
    }

    /// A simulated host whose VMs start after `start_delay`.
    #[must_use]
    pub fn with_start_delay(start_delay: Duration) -> Self {
        let d = SimDriver::default();
        d.set_start_delay(start_delay);
        d
    }

    /// A simulated host whose VMs are kept in `store` under keys starting with `prefix` (one
    /// tree serves the hosts of a process, [`crate::journal::SIM_TREE`]), and so outlive the
    /// agent process, as VMs on a real hypervisor do; the next agent finds them with
    /// [`Driver::adopt`].
    #[must_use]
    pub fn persistent(store: sled::Tree, prefix: Vec<u8>) -> Self {
        SimDriver { store: Some((store, prefix)), ..SimDriver::default() }
    }

    fn persist(&self, vm: VmId, v: Option<&SimVm>) {
        if let Some((store, prefix)) = &self.store {
            let key = [&prefix[..], vm.0.as_bytes()].concat();
            let result = match v {
                Some(v) => store.insert(key, novacron_types::encode(v)).map(|_| ()),
                None => store.remove(key).map(|_| ()),
            };
            if let Err(e) = result {
                tracing::warn!(%vm, error = %e, "simulated hypervisor state not persisted");
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Each critical section is a single map update, so a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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

    /// Whether the VM is running and paused.
    #[must_use]
    pub fn is_paused(&self, vm: VmId) -> bool {
        self.lock().running.get(&vm).is_some_and(|v| v.paused)
    }

    /// Fault: the VM dies now. Returns false if it was not running.
    pub fn crash(&self, vm: VmId) -> bool {
        let gone = self.lock().running.remove(&vm);
        match gone {
            Some(v) => {
                self.persist(vm, None);
                let _ = self.exits.send(VmExit { vm, incarnation: v.incarnation, reason: "simulated crash".into() });
                true
            }
            None => false,
        }
    }

    /// Fault: every VM dies at once (a hypervisor crash).
    pub fn crash_all(&self) {
        let all = std::mem::take(&mut self.lock().running);
        for (vm, v) in all {
            self.persist(vm, None);
            let _ = self.exits.send(VmExit { vm, incarnation: v.incarnation, reason: "simulated host crash".into() });
        }
    }

    /// Fault: the next `n` starts fail.
    pub fn fail_next_starts(&self, n: u32) {
        self.lock().fail_starts = n;
    }

    /// Fault: the next `n` outgoing migrations fail (the VM keeps running here).
    pub fn fail_next_migrations(&self, n: u32) {
        self.lock().fail_migrations = n;
    }

    /// Fault: starts take this long.
    pub fn set_start_delay(&self, delay: Duration) {
        self.lock().start_delay = delay;
    }
}

impl Driver for SimDriver {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn host_labels(&self) -> Labels {
        [("accel".to_owned(), "sim".to_owned())].into()
    }

    async fn start(&self, cmd: &StartVm) -> Result<(), DriverError> {
        let delay = {
            let mut inner = self.lock();
            if let Some(v) = inner.running.get_mut(&cmd.vm).filter(|v| v.incarnation == cmd.incarnation) {
                // Confirming an incarnation that received a migration lets it run.
                v.paused = false;
                return Ok(());
            }
            if inner.fail_starts > 0 {
                inner.fail_starts -= 1;
                return Err(DriverError::StartFailed { vm: cmd.vm, reason: "simulated start failure".into() });
            }
            inner.start_delay
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let v = SimVm { incarnation: cmd.incarnation, resources: cmd.spec.resources(), paused: false };
        self.persist(cmd.vm, Some(&v));
        let mut inner = self.lock();
        inner.running.insert(cmd.vm, v);
        *inner.starts.entry(cmd.incarnation).or_default() += 1;
        Ok(())
    }

    async fn stop(&self, vm: VmId, incarnation: IncarnationId) -> Result<(), DriverError> {
        let removed = {
            let mut inner = self.lock();
            if inner.running.get(&vm).map(|r| r.incarnation) == Some(incarnation) {
                inner.running.remove(&vm)
            } else {
                None
            }
        };
        if removed.is_some() {
            self.persist(vm, None);
        }
        Ok(())
    }

    async fn prepare_incoming(&self, cmd: &PrepareIncoming) -> Result<String, DriverError> {
        let v = SimVm { incarnation: cmd.incarnation, resources: cmd.spec.resources(), paused: true };
        self.persist(cmd.vm, Some(&v));
        self.lock().running.insert(cmd.vm, v);
        Ok(format!("sim://{}/{}", cmd.vm, cmd.incarnation))
    }

    async fn migrate_out(
        &self,
        vm: VmId,
        incarnation: IncarnationId,
        uri: &str,
    ) -> Result<MigrationStats, DriverError> {
        let mut inner = self.lock();
        if inner.running.get(&vm).map(|v| v.incarnation) != Some(incarnation) {
            return Err(DriverError::MigrationFailed { vm, reason: "not running here".into() });
        }
        if inner.fail_migrations > 0 {
            inner.fail_migrations -= 1;
            return Err(DriverError::MigrationFailed { vm, reason: format!("simulated migration failure to {uri}") });
        }
        inner.running.remove(&vm);
        drop(inner);
        self.persist(vm, None);
        Ok(MigrationStats { downtime_ms: 0, duration_ms: 0 })
    }

    async fn pause(&self, vm: VmId, incarnation: IncarnationId) -> Result<(), DriverError> {
        self.set_paused(vm, incarnation, true, "pause")
    }

    async fn resume(&self, vm: VmId, incarnation: IncarnationId) -> Result<(), DriverError> {
        self.set_paused(vm, incarnation, false, "resume")
    }

    async fn adopt(&self) -> Vec<RunningVm> {
        if let Some((store, prefix)) = &self.store {
            let mut inner = self.lock();
            for (k, v) in store.scan_prefix(prefix).flatten() {
                let (Ok(id), Ok(v)) = (uuid::Uuid::from_slice(&k[prefix.len()..]), rmp_serde::from_slice::<SimVm>(&v))
                else {
                    continue;
                };
                inner.running.entry(VmId(id)).or_insert(v);
            }
        }
        self.running()
    }

    fn running(&self) -> Vec<RunningVm> {
        self.lock().running.iter().map(|(vm, v)| RunningVm { vm: *vm, incarnation: v.incarnation }).collect()
    }

    /// Simulated load: each reserved vCPU keeps the VMs' utilisation (60 % unless set) of a host
    /// vCPU busy; memory is fully used.
    fn host_usage(&self, capacity: Resources) -> HostUsage {
        let inner = self.lock();
        let (vcpus, mem) = inner.running.values().fold((0u64, 0u64), |(c, m), v| {
            (c + if v.paused { 0 } else { u64::from(v.resources.vcpus) }, m + v.resources.memory_mib)
        });
        let cpu_util =
            if capacity.vcpus == 0 { 0.0 } else { (vcpus as f64 * inner.vm_cpu / f64::from(capacity.vcpus)).min(1.0) };
        HostUsage { cpu_util, memory_used_mib: mem, load1: None }
    }

    fn vm_usage(&self) -> Vec<VmUsage> {
        let inner = self.lock();
        let cpu = inner.vm_cpu;
        inner
            .running
            .iter()
            .map(|(vm, v)| VmUsage {
                vm: *vm,
                cpu_util: if v.paused { 0.0 } else { cpu },
                memory_used_mib: v.resources.memory_mib,
                status: if v.paused { "paused" } else { "running" },
            })
            .collect()
    }

    fn exits(&self) -> broadcast::Receiver<VmExit> {
        self.exits.subscribe()
    }
}

impl SimDriver {
    fn set_paused(
        &self,
        vm: VmId,
        incarnation: IncarnationId,
        paused: bool,
        op: &'static str,
    ) -> Result<(), DriverError> {
        let mut inner = self.lock();
        match inner.running.get_mut(&vm) {
            Some(v) if v.incarnation == incarnation => {
                v.paused = paused;
                self.persist(vm, Some(v));
                Ok(())
            }
            _ => Err(DriverError::ControlFailed { op, vm, reason: "not running here".into() }),
        }
    }
}
