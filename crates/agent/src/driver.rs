//! The hypervisor boundary: what an agent needs from whatever runs VMs.
//!
//! Drivers are idempotent per incarnation: starting an incarnation that already runs, or
//! stopping one that is already gone, succeeds without doing anything twice. The agent relies
//! on this to recover from a crash between driving the hypervisor and writing its journal.
//!
//! A driver also tells the agent when a VM ends on its own ([`Driver::exits`]), finds the VMs
//! that outlived a previous agent process ([`Driver::adopt`]), and measures load.

use std::future::Future;

use novacron_types::{IncarnationId, Labels, PrepareIncoming, Resources, StartVm, VmId};
use tokio::sync::broadcast;

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
    /// A live migration failed; the source keeps running.
    #[error("migration of VM {vm} failed: {reason}")]
    MigrationFailed {
        /// The VM.
        vm: VmId,
        /// Why.
        reason: String,
    },
    /// Pause or resume failed, or the VM is not running here.
    #[error("{op} of VM {vm} failed: {reason}")]
    ControlFailed {
        /// `pause` or `resume`.
        op: &'static str,
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

/// A VM that ended without being told to: crashed, killed, or shut down from inside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmExit {
    /// The VM.
    pub vm: VmId,
    /// Which run of it.
    pub incarnation: IncarnationId,
    /// What the driver saw, for the `VmFailed` report.
    pub reason: String,
}

/// A host's load, for telemetry.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HostUsage {
    /// CPU utilisation, 0.0–1.0.
    pub cpu_util: f64,
    /// Memory in use, MiB.
    pub memory_used_mib: u64,
    /// One-minute load average, where the driver measures the real host.
    pub load1: Option<f64>,
}

/// One VM's load, for telemetry.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VmUsage {
    /// The VM.
    pub vm: VmId,
    /// CPU utilisation of its vCPUs, 0.0–1.0.
    pub cpu_util: f64,
    /// Memory in use, MiB.
    pub memory_used_mib: u64,
    /// `running` or `paused`, as the hypervisor last said.
    pub status: &'static str,
}

/// What a completed live migration cost, as the hypervisor measured it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MigrationStats {
    /// How long the VM was paused for the switch-over.
    pub downtime_ms: u64,
    /// How long the whole transfer took.
    pub duration_ms: u64,
}

/// A hypervisor, real (QEMU) or simulated.
pub trait Driver: Send + Sync + 'static {
    /// The driver's name, reported at registration (`sim`, `qemu`).
    fn name(&self) -> &'static str;

    /// Labels the driver adds to the host's registration (e.g. `accel=kvm`).
    fn host_labels(&self) -> Labels {
        Labels::new()
    }

    /// Starts the incarnation; a no-op if it already runs.
    fn start(&self, cmd: &StartVm) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Stops the incarnation (gracefully, then by force) and removes its process and files;
    /// a no-op if it is not running.
    fn stop(&self, vm: VmId, incarnation: IncarnationId) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Ends the incarnation at once, without asking the guest (fencing: the VM is about to be
    /// restarted elsewhere, and every moment it keeps running here is a risk). A no-op if it is
    /// not running. The default is [`Driver::stop`], for drivers whose stop is immediate.
    fn kill(&self, vm: VmId, incarnation: IncarnationId) -> impl Future<Output = Result<(), DriverError>> + Send {
        self.stop(vm, incarnation)
    }

    /// Starts an incarnation that waits for a live migration; returns the URI the source must
    /// send the VM to. A start of the same incarnation later confirms it (a no-op once the
    /// migration has completed).
    fn prepare_incoming(&self, cmd: &PrepareIncoming) -> impl Future<Output = Result<String, DriverError>> + Send;

    /// Sends the running incarnation to `uri`. On success the VM runs there and the local
    /// incarnation is gone; on failure it keeps running here.
    fn migrate_out(
        &self,
        vm: VmId,
        incarnation: IncarnationId,
        uri: &str,
    ) -> impl Future<Output = Result<MigrationStats, DriverError>> + Send;

    /// Pauses the incarnation's vCPUs.
    fn pause(&self, vm: VmId, incarnation: IncarnationId) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Resumes a paused incarnation.
    fn resume(&self, vm: VmId, incarnation: IncarnationId) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Finds the VMs that outlived a previous agent process and takes them over; returns
    /// everything that runs now. Leftovers of dead VMs are cleaned up.
    fn adopt(&self) -> impl Future<Output = Vec<RunningVm>> + Send;

    /// What runs now.
    fn running(&self) -> Vec<RunningVm>;

    /// The host's load as the hypervisor sees it, given the host's capacity.
    fn host_usage(&self, capacity: Resources) -> HostUsage;

    /// Each running VM's load.
    fn vm_usage(&self) -> Vec<VmUsage>;

    /// VMs that end without being told to, from now on.
    fn exits(&self) -> broadcast::Receiver<VmExit>;

    /// Lets go of the VMs without stopping them (the agent is shutting down; the next agent
    /// adopts them). The driver controls nothing afterwards.
    fn detach(&self) {}

    /// The agent's lease is good for `valid_for` from now. A driver whose VMs outlive the agent
    /// hands this to whatever fences them when the agent is gone (the QEMU lease keeper).
    fn lease_valid_for(&self, _valid_for: std::time::Duration) {}
}
