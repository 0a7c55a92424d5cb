//! The hypervisor boundary: what an agent needs from whatever runs VMs.
//!
//! Drivers are idempotent per incarnation: starting an incarnation that already runs, or
//! stopping one that is already gone, succeeds without doing anything twice. The agent relies
//! on this to recover from a crash between driving the hypervisor and writing its journal.

use std::future::Future;

use novacron_types::{IncarnationId, Resources, StartVm, VmId};

/// What a driver can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DriverError {
    /// The hypervisor refused or failed to start the VM.
    #[error("start of VM {vm} failed: {reason}")]
    StartFailed {
        /// The VM.
        vm: VmId,
        /// Why.
        reason: String,
    },
    /// The hypervisor failed to stop the VM.
    #[error("stop of VM {vm} failed: {reason}")]
    StopFailed {
        /// The VM.
        vm: VmId,
        /// Why.
        reason: String,
    },
}

/// One VM the hypervisor is running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunningVm {
    /// The VM.
    pub vm: VmId,
    /// Which run of it.
    pub incarnation: IncarnationId,
}

/// A hypervisor, real (QEMU) or simulated.
pub trait Driver: Send + Sync + 'static {
    /// The driver's name, reported at registration (`sim`, `qemu`).
    fn name(&self) -> &'static str;

    /// Starts the incarnation; a no-op if it already runs.
    fn start(&self, cmd: &StartVm) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Stops and forgets the incarnation; a no-op if it is not running.
    fn stop(
        &self,
        vm: VmId,
        incarnation: IncarnationId,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// What runs now.
    fn running(&self) -> Vec<RunningVm>;

    /// The host's load as the hypervisor sees it, given the host's capacity.
    fn host_usage(&self, capacity: Resources) -> HostUsage;
}

/// A host's load, for telemetry.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HostUsage {
    /// CPU utilisation, 0.0–1.0.
    pub cpu_util: f64,
    /// Memory in use, MiB.
    pub memory_used_mib: u64,
}
