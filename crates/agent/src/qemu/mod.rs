//! The QEMU driver: real VMs, driven over QMP (no libvirt).
//!
//! ```text
//! <data-dir>/qemu/<vm-id>/
//!     vm.json       {incarnation, vcpus, memory_mib}   written before QEMU starts
//!     qemu.pid      QEMU's pid (QEMU writes it)
//!     qmp.sock      the QMP socket
//!     qemu.log      QEMU's stderr
//!     disk.qcow2    the VM's disk: an overlay on the spec's base image, or a blank thin disk
//! ```
//! QEMU runs daemonized (`-daemonize`), so a VM outlives a crashed or restarted agent; the next
//! agent finds it by its pid file, checks that the process really is that VM's QEMU (its
//! command line carries `-name guest=<vm-id>`, which also lets an operator find it with `ps`),
//! and reconnects to its QMP socket ([`QemuDriver::adopt`]). A VM must not outlive the agent's
//! *lease*, though: the [`keeper`] process kills (or pauses) what runs when the lease ends
//! without an agent to do it.
//!
//! A VM's death is noticed when its QMP socket closes — within moments of the process exiting —
//! and reported as a [`VmExit`] with the reason QEMU gave (`SHUTDOWN` event) or "exited
//! unexpectedly" when it gave none (killed).
//!
//! Stop is graceful first (`system_powerdown`, which a guest OS honours), then `quit` after
//! [`QemuConfig::powerdown_timeout`], then SIGKILL; the VM's directory is removed afterwards.

pub mod keeper;
pub mod qmp;

/// Longest the final phase of an outgoing migration may keep the VM stopped while waiting for
/// the destination's confirmation before the migration is cancelled and the VM resumes here.
const FINAL_PHASE_LIMIT: Duration = Duration::from_secs(5);

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use novacron_types::{IncarnationId, Labels, PrepareIncoming, Resources, StartVm, VmId};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use self::qmp::Qmp;
use crate::driver::{Driver, DriverError, HostUsage, MigrationStats, RunningVm, VmExit, VmUsage};

/// Hardware acceleration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// `/dev/kvm` is usable.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accel {
    /// `kvm` or `tcg`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// KVM when `/dev/kvm` opens read-write, TCG otherwise; `NOVACRON_QEMU_ACCEL=tcg|kvm` overrides.
    #[must_use]
    pub fn detect() -> Accel {
        match std::env::var("NOVACRON_QEMU_ACCEL").as_deref() {
            Ok("tcg") => return Accel::Tcg,
            Ok("kvm") => return Accel::Kvm,
            _ => {}
        }
        let usable = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
        if usable { Accel::Kvm } else { Accel::Tcg }
    }
}

/// How the QEMU driver runs VMs.
#[derive(Clone, Debug)]
pub struct QemuConfig {
    /// `qemu-system-x86_64`.
    pub binary: PathBuf,
    /// `qemu-img`.
    pub img_binary: PathBuf,
    /// Where VM directories live.
    pub data_dir: PathBuf,
    /// KVM or TCG.
    pub accel: Accel,
    /// How long a graceful `system_powerdown` may take before `quit`.
    pub powerdown_timeout: Duration,
    /// Where incoming migrations listen (an address of this host other agents can reach).
    pub migration_address: std::net::IpAddr,
    /// Cap on outgoing migration bandwidth, bytes/s (`None`: QEMU's default).
    pub migration_max_bandwidth: Option<u64>,
    /// The lease keeper to run beside the VMs ([`keeper`]): `None` leaves VMs that outlive
    /// their agent unfenced (tests that drive the driver without an agent).
    pub keeper: Option<KeeperConfig>,
}

/// How to start the lease keeper.
#[derive(Clone, Debug)]
pub struct KeeperConfig {
    /// Its program and leading arguments (`novacron qemu-fence-keeper`).
    pub command: Vec<std::ffi::OsString>,
    /// What it does to VMs when the lease ends.
    pub action: crate::FenceAction,
}

/// Why the driver cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum QemuSetupError {
    /// A binary is missing.
    #[error("{0} not found on PATH: install qemu-system-x86 and qemu-utils (`make tools` does)")]
    Missing(&'static str),
    /// The data directory is unusable.
    #[error("QEMU data directory {path}")]
    DataDir {
        /// Which.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Socket paths under it would be too long for a unix socket.
    #[error("QEMU data directory {0} is too long for unix socket paths (keep it under 50 characters)")]
    PathTooLong(PathBuf),
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}

impl QemuConfig {
    /// Finds the binaries on `PATH`, detects acceleration, creates `data_dir`.
    ///
    /// # Errors
    /// A missing binary or an unusable directory, with how to fix it.
    pub fn detect(data_dir: PathBuf) -> Result<QemuConfig, QemuSetupError> {
        let binary = on_path("qemu-system-x86_64").ok_or(QemuSetupError::Missing("qemu-system-x86_64"))?;
        let img_binary = on_path("qemu-img").ok_or(QemuSetupError::Missing("qemu-img"))?;
        std::fs::create_dir_all(&data_dir)
            .map_err(|source| QemuSetupError::DataDir { path: data_dir.clone(), source })?;
        let data_dir = std::fs::canonicalize(&data_dir)
            .map_err(|source| QemuSetupError::DataDir { path: data_dir.clone(), source })?;
        // <dir>/<36-char uuid>/qmp.sock must fit in sun_path (108 bytes).
        if data_dir.as_os_str().len() + 46 > 107 {
            return Err(QemuSetupError::PathTooLong(data_dir));
        }
        Ok(QemuConfig {
            binary,
            img_binary,
            data_dir,
            accel: Accel::detect(),
            powerdown_timeout: Duration::from_secs(5),
            migration_address: std::net::IpAddr::from([127, 0, 0, 1]),
            migration_max_bandwidth: None,
            keeper: None,
        })
    }
}

/// What the driver writes next to each VM, so that a later agent can adopt it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct VmMeta {
    incarnation: IncarnationId,
    vcpus: u32,
    memory_mib: u64,
}

struct Instance {
    incarnation: IncarnationId,
    pid: u32,
    qmp: Qmp,
    dir: PathBuf,
    vcpus: u32,
    /// Set while we stop it on purpose, so its exit is not reported as a failure.
    stopping: Arc<AtomicBool>,
    /// (when, CPU ticks) at the last usage sample.
    last_cpu: Option<(Instant, u64)>,
    /// Set by QMP `STOP`, cleared by `RESUME` (kept by the watcher).
    paused: Arc<AtomicBool>,
}

/// Real VMs under QEMU. Cheap to clone: clones share the same VMs.
#[derive(Clone)]
pub struct QemuDriver {
    cfg: Arc<QemuConfig>,
    vms: Arc<Mutex<BTreeMap<VmId, Instance>>>,
    exits: broadcast::Sender<VmExit>,
    host_cpu: Arc<Mutex<Option<(u64, u64)>>>,
    /// Cancelled by [`Driver::detach`]: every QMP connection closes, the VMs keep running.
    detached: CancellationToken,
}

impl QemuDriver {
    /// A driver with this configuration. Call [`Driver::adopt`] before use to take over VMs
    /// left by a previous agent.
    #[must_use]
    pub fn new(cfg: QemuConfig) -> QemuDriver {
        QemuDriver {
            cfg: Arc::new(cfg),
            vms: Arc::default(),
            exits: broadcast::channel(256).0,
            host_cpu: Arc::default(),
            detached: CancellationToken::new(),
        }
    }

    /// The configuration in use.
    #[must_use]
    pub fn config(&self) -> &QemuConfig {
        &self.cfg
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<VmId, Instance>> {
        self.vms.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn vm_dir(&self, vm: VmId) -> PathBuf {
        self.cfg.data_dir.join(vm.to_string())
    }

    /// The QEMU pid of a running VM (for tests and operators).
    #[must_use]
    pub fn pid(&self, vm: VmId) -> Option<u32> {
        self.lock().get(&vm).map(|i| i.pid)
    }

    /// QMP `query-status` of a running VM.
    ///
    /// # Errors
    /// When the VM is not running here or QMP fails.
    pub async fn qmp_status(&self, vm: VmId) -> Result<String, DriverError> {
        let qmp = self.lock().get(&vm).map(|i| i.qmp.clone());
        let qmp =
            qmp.ok_or_else(|| DriverError::ControlFailed { op: "status", vm, reason: "not running here".into() })?;
        qmp.status().await.map_err(|e| DriverError::ControlFailed { op: "status", vm, reason: e.to_string() })
    }

    fn ensure_keeper(&self) -> std::io::Result<()> {
        match &self.cfg.keeper {
            Some(k) => keeper::ensure(&k.command, &self.cfg.data_dir, k.action),
            None => Ok(()),
        }
    }

    fn start_failed(vm: VmId, reason: impl Into<String>) -> DriverError {
        DriverError::StartFailed { vm, reason: reason.into() }
    }

    /// Starts QEMU for `cmd`; with `incoming`, it waits for a migration at that URI instead of
    /// booting.
    async fn launch(&self, cmd: &StartVm, incoming: Option<&str>) -> Result<Instance, DriverError> {
        let vm = cmd.vm;
        // No VM without a keeper: it is what fences the VM if this agent dies.
        self.ensure_keeper().map_err(|e| Self::start_failed(vm, format!("starting the lease keeper: {e}")))?;
        let dir = self.vm_dir(vm);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Self::start_failed(vm, format!("creating {}: {e}", dir.display())))?;
        let meta = VmMeta { incarnation: cmd.incarnation, vcpus: cmd.spec.vcpus, memory_mib: cmd.spec.memory_mib };
        let meta_json = serde_json::to_vec(&meta).map_err(|e| Self::start_failed(vm, e.to_string()))?;
        std::fs::write(dir.join("vm.json"), meta_json).map_err(|e| Self::start_failed(vm, e.to_string()))?;

        let disk = self.prepare_disk(cmd, &dir).await?;
        let log = std::fs::File::create(dir.join("qemu.log")).map_err(|e| Self::start_failed(vm, e.to_string()))?;
        let sock = dir.join("qmp.sock");
        let pidfile = dir.join("qemu.pid");
        let mut c = tokio::process::Command::new(&self.cfg.binary);
        c.arg("-name")
            .arg(format!("guest={vm},debug-threads=on"))
            .arg("-uuid")
            .arg(vm.to_string())
            // The default CPU model, not `host`: it is the same on every host (live migration
            // needs that) and works under nested KVM, where `-cpu host` can fail on MSRs.
            .args(["-machine", &format!("q35,accel={}", self.cfg.accel.as_str())])
            .args(["-smp", &cmd.spec.vcpus.to_string(), "-m", &cmd.spec.memory_mib.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-vga", "none"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .arg("-pidfile")
            .arg(&pidfile)
            .arg("-daemonize");
        if let Some(disk) = &disk {
            c.arg("-drive").arg(format!("file={},if=virtio,format=qcow2", disk.display()));
        }
        if let Some(uri) = incoming {
            c.arg("-incoming").arg(uri);
        }
        c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        // With -daemonize, the launcher exits once the VM is set up; its status tells whether
        // QEMU accepted the configuration.
        let status = c
            .status()
            .await
            .map_err(|e| Self::start_failed(vm, format!("running {}: {e}", self.cfg.binary.display())))?;
        if !status.success() {
            let text = std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
            let _ = std::fs::remove_dir_all(&dir);
            return Err(Self::start_failed(vm, format!("qemu exited with {status}: {}", text.trim())));
        }
        let pid = read_pid(&pidfile).ok_or_else(|| Self::start_failed(vm, "QEMU wrote no pid file"))?;
        let qmp = Qmp::connect(&sock, Duration::from_secs(5), self.detached.child_token())
            .await
            .map_err(|e| Self::start_failed(vm, e.to_string()))?;
        let status = qmp.status().await.map_err(|e| Self::start_failed(vm, e.to_string()))?;
        let expected = if incoming.is_some() { "inmigrate" } else { "running" };
        if status != expected {
            return Err(Self::start_failed(
                vm,
                format!("QEMU reports status {status:?} after start, expected {expected:?}"),
            ));
        }
        Ok(Instance {
            incarnation: cmd.incarnation,
            pid,
            qmp,
            dir,
            vcpus: cmd.spec.vcpus,
            stopping: Arc::default(),
            last_cpu: None,
            paused: Arc::new(AtomicBool::new(incoming.is_some())),
        })
    }

    /// A qcow2 overlay on the spec's base image (label `image`), or a blank thin disk of
    /// `disk_gib`, or none.
    async fn prepare_disk(&self, cmd: &StartVm, dir: &Path) -> Result<Option<PathBuf>, DriverError> {
        let base = cmd.spec.labels.get("image").filter(|s| !s.is_empty());
        if base.is_none() && cmd.spec.disk_gib == 0 {
            return Ok(None);
        }
        let disk = dir.join("disk.qcow2");
        let mut c = tokio::process::Command::new(&self.cfg.img_binary);
        c.args(["create", "-q", "-f", "qcow2"]);
        if let Some(base) = base {
            c.args(["-F", "qcow2", "-b", base]).arg(&disk);
            if cmd.spec.disk_gib > 0 {
                c.arg(format!("{}G", cmd.spec.disk_gib));
            }
        } else {
            c.arg(&disk).arg(format!("{}G", cmd.spec.disk_gib));
        }
        let out = c.output().await.map_err(|e| Self::start_failed(cmd.vm, format!("qemu-img: {e}")))?;
        if !out.status.success() {
            return Err(Self::start_failed(
                cmd.vm,
                format!("qemu-img create failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
            ));
        }
        Ok(Some(disk))
    }

    /// Watches one VM: records QEMU's shutdown reason, and when the QMP socket closes without us
    /// stopping it, forgets it and reports the exit.
    fn watch(
        &self,
        vm: VmId,
        incarnation: IncarnationId,
        qmp: Qmp,
        stopping: Arc<AtomicBool>,
        paused: Arc<AtomicBool>,
    ) {
        let vms = self.vms.clone();
        let exits = self.exits.clone();
        let detached = self.detached.clone();
        let mut events = qmp.events();
        tokio::spawn(async move {
            let mut reason: Option<String> = None;
            loop {
                tokio::select! {
                    () = detached.cancelled() => return,
                    () = qmp.closed() => break,
                    ev = events.recv() => match ev {
                        Ok(e) if e.name == "STOP" => paused.store(true, Ordering::SeqCst),
                        Ok(e) if e.name == "RESUME" => paused.store(false, Ordering::SeqCst),
                        Ok(e) if e.name == "SHUTDOWN" => {
                            let why = e.data.get("reason").and_then(|r| r.as_str()).unwrap_or("unknown");
                            reason = Some(format!("QEMU shut down ({why})"));
                        }
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => { qmp.closed().await; break; }
                    },
                }
            }
            if stopping.load(Ordering::SeqCst) || detached.is_cancelled() {
                return;
            }
            let removed = {
                let mut map = vms.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if map.get(&vm).is_some_and(|i| i.incarnation == incarnation) { map.remove(&vm) } else { None }
            };
            if let Some(inst) = removed {
                let _ = std::fs::remove_dir_all(&inst.dir);
                let reason =
                    reason.unwrap_or_else(|| "QEMU process exited unexpectedly (QMP connection closed)".into());
                tracing::warn!(%vm, %reason, "VM exited");
                let _ = exits.send(VmExit { vm, incarnation, reason });
            }
        });
    }

    async fn terminate(&self, inst: Instance) {
        self.terminate_with(inst, true).await;
    }

    /// Ends a VM's process and removes its files. `graceful` first asks the guest to power off
    /// (`system_powerdown`, up to the power-down timeout); without it QEMU is quit at once — for
    /// a source copy left paused after a completed migration, which has nothing to shut down.
    async fn terminate_with(&self, inst: Instance, graceful: bool) {
        inst.stopping.store(true, Ordering::SeqCst);
        // Graceful first: a guest OS powers off on ACPI; firmware alone ignores it.
        if graceful && inst.qmp.execute("system_powerdown", None).await.is_ok() {
            let _ = tokio::time::timeout(self.cfg.powerdown_timeout, inst.qmp.closed()).await;
        }
        if !inst.qmp.is_closed() {
            let _ = inst.qmp.execute("quit", None).await;
            let _ = tokio::time::timeout(Duration::from_secs(5), inst.qmp.closed()).await;
        }
        if process_alive(inst.pid) {
            let _ = tokio::process::Command::new("kill").args(["-9", &inst.pid.to_string()]).status().await;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while process_alive(inst.pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = std::fs::remove_dir_all(&inst.dir);
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether `pid` is alive (and not a zombie).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

/// Whether `pid` is the QEMU of `vm` (its command line names the guest).
fn is_qemu_of(pid: u32, vm: VmId) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(&format!("guest={vm}")))
        .unwrap_or(false)
}

/// (utime + stime in clock ticks, RSS in MiB) of a process.
fn process_usage(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    // After the command name: state is field 3; utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some((utime + stime, rss_kib / 1024))
}

/// Linux reports process CPU time in clock ticks of 1/100 s on every mainstream architecture.
const TICKS_PER_SEC: f64 = 100.0;

impl Driver for QemuDriver {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn host_labels(&self) -> Labels {
        [("accel".to_owned(), self.cfg.accel.as_str().to_owned())].into()
    }

    async fn start(&self, cmd: &StartVm) -> Result<(), DriverError> {
        let previous = {
            let mut map = self.lock();
            match map.get(&cmd.vm) {
                Some(i) if i.incarnation == cmd.incarnation => return Ok(()),
                Some(_) => map.remove(&cmd.vm),
                None => None,
            }
        };
        if let Some(old) = previous {
            // A newer assignment replaces the old run: never two copies of one VM.
            self.terminate(old).await;
        }
        let started = Instant::now();
        let inst = self.launch(cmd, None).await?;
        tracing::info!(vm = %cmd.vm, pid = inst.pid, accel = self.cfg.accel.as_str(), ms = started.elapsed().as_millis() as u64, "QEMU VM running");
        self.watch(cmd.vm, cmd.incarnation, inst.qmp.clone(), inst.stopping.clone(), inst.paused.clone());
        self.lock().insert(cmd.vm, inst);
        Ok(())
    }

    async fn stop(&self, vm: VmId, incarnation: IncarnationId) -> Result<(), DriverError> {
        let inst = {
            let mut map = self.lock();
            if map.get(&vm).is_some_and(|i| i.incarnation == incarnation) { map.remove(&vm) } else { None }
        };
        if let Some(inst) = inst {
            let pid = inst.pid;
            self.terminate(inst).await;
            if process_alive(pid) {
                return Err(DriverError::StopFailed { vm, reason: format!("QEMU pid {pid} survived SIGKILL") });
            }
        }
        Ok(())
    }

    async fn kill(&self, vm: VmId, incarnation: IncarnationId) -> Result<(), DriverError> {
        let inst = {
            let mut map = self.lock();
            if map.get(&vm).is_some_and(|i| i.incarnation == incarnation) { map.remove(&vm) } else { None }
        };
        let Some(inst) = inst else { return Ok(()) };
        let pid = inst.pid;
        inst.stopping.store(true, Ordering::SeqCst);
        // SIGKILL first: no QMP round trip that a wedged QEMU could stall.
        let _ = tokio::process::Command::new("kill").args(["-9", &pid.to_string()]).status().await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while process_alive(pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if process_alive(pid) {
            return Err(DriverError::StopFailed { vm, reason: format!("QEMU pid {pid} survived SIGKILL") });
        }
        let _ = std::fs::remove_dir_all(&inst.dir);
        Ok(())
    }

    async fn prepare_incoming(&self, cmd: &PrepareIncoming) -> Result<String, DriverError> {
        if let Some(i) = self.lock().get(&cmd.vm) {
            if i.incarnation == cmd.incarnation {
                return Err(Self::start_failed(cmd.vm, "this incarnation already exists here"));
            }
            return Err(Self::start_failed(cmd.vm, "another incarnation of this VM runs here"));
        }
        // QEMU binds a port of its own choosing on the migration address (port 0) and says which:
        // no window between finding a free port and binding it, where another incoming
        // migration could take it.
        let start = StartVm {
            vm: cmd.vm,
            host: cmd.host.clone(),
            incarnation: cmd.incarnation,
            generation: cmd.generation,
            spec: cmd.spec.clone(),
        };
        let inst = self.launch(&start, Some(&format!("tcp:{}:0", self.cfg.migration_address))).await?;
        let port = match inst.qmp.execute("query-migrate", None).await {
            Ok(info) => info.get("socket-address").and_then(|a| a.get(0)).and_then(|a| a.get("port")).and_then(|p| {
                p.as_str()
                    .and_then(|p| p.parse::<u16>().ok())
                    .or_else(|| p.as_u64().and_then(|p| u16::try_from(p).ok()))
            }),
            Err(_) => None,
        };
        let Some(port) = port else {
            self.terminate_with(inst, false).await;
            return Err(Self::start_failed(cmd.vm, "QEMU did not say which port it listens on for the migration"));
        };
        let uri = format!("tcp:{}:{port}", self.cfg.migration_address);
        tracing::info!(vm = %cmd.vm, pid = inst.pid, %uri, "QEMU waiting for an incoming migration");
        self.watch(cmd.vm, cmd.incarnation, inst.qmp.clone(), inst.stopping.clone(), inst.paused.clone());
        self.lock().insert(cmd.vm, inst);
        Ok(uri)
    }

    async fn migrate_out(
        &self,
        vm: VmId,
        incarnation: IncarnationId,
        uri: &str,
    ) -> Result<MigrationStats, DriverError> {
        let failed = |reason: String| DriverError::MigrationFailed { vm, reason };
        let qmp = {
            let map = self.lock();
            match map.get(&vm) {
                Some(i) if i.incarnation == incarnation => i.qmp.clone(),
                _ => return Err(failed("not running here".into())),
            }
        };
        if let Some(bw) = self.cfg.migration_max_bandwidth {
            qmp.execute("migrate-set-parameters", Some(serde_json::json!({ "max-bandwidth": bw })))
                .await
                .map_err(|e| failed(e.to_string()))?;
        }
        // Completion must mean the destination has the VM. `return-path`: the destination
        // confirms that it loaded the state, and only then is the migration complete (without
        // it, a source that wrote its whole stream into a socket counted as done — whoever read
        // it: a dead destination's port taken by another program "completed" a migration).
        // `validate-uuid`: the stream carries the VM's UUID and a destination of another VM
        // refuses it (every QEMU here runs with `-uuid <vm-id>`).
        let caps = serde_json::json!({ "capabilities": [
            { "capability": "return-path", "state": true },
            { "capability": "validate-uuid", "state": true },
        ] });
        qmp.execute("migrate-set-capabilities", Some(caps)).await.map_err(|e| failed(e.to_string()))?;
        let started = Instant::now();
        let (mut final_since, mut unconfirmed) = (None::<Instant>, false);
        qmp.execute("migrate", Some(serde_json::json!({ "uri": uri }))).await.map_err(|e| failed(e.to_string()))?;
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let info = match qmp.execute("query-migrate", None).await {
                Ok(v) => v,
                Err(e) => return Err(failed(format!("lost the source QEMU during migration: {e}"))),
            };
            match info.get("status").and_then(serde_json::Value::as_str).unwrap_or("") {
                "completed" => {
                    let ms = |k: &str| info.get(k).and_then(serde_json::Value::as_u64);
                    let stats = MigrationStats {
                        downtime_ms: ms("downtime").unwrap_or(0),
                        duration_ms: ms("total-time").unwrap_or_else(|| started.elapsed().as_millis() as u64),
                    };
                    // The VM runs on the destination now; this copy must go.
                    let inst = {
                        let mut map = self.lock();
                        if map.get(&vm).is_some_and(|i| i.incarnation == incarnation) { map.remove(&vm) } else { None }
                    };
                    if let Some(inst) = inst {
                        self.terminate_with(inst, false).await;
                    }
                    tracing::info!(%vm, %uri, downtime_ms = stats.downtime_ms, duration_ms = stats.duration_ms, "migrated out");
                    return Ok(stats);
                }
                "failed" | "cancelled" => {
                    let why = if unconfirmed {
                        "the destination did not confirm it had loaded the VM; cancelled"
                    } else {
                        info.get("error-desc").and_then(serde_json::Value::as_str).unwrap_or("no reason given")
                    };
                    // QEMU resumes the source after a failed migration; make sure it runs.
                    if qmp.status().await.is_ok_and(|s| s == "paused") {
                        let _ = qmp.execute("cont", None).await;
                    }
                    return Err(failed(format!("QEMU: {why}")));
                }
                _ if started.elapsed() > Duration::from_secs(600) => {
                    let _ = qmp.execute("migrate_cancel", None).await;
                    return Err(failed("took longer than 10 minutes; cancelled".into()));
                }
                _ => {
                    // The final phase (vCPUs stopped, waiting for the destination to confirm)
                    // takes milliseconds; a destination that never confirms must not keep the
                    // VM stopped: cancel, and QEMU resumes it here.
                    if qmp.status().await.is_ok_and(|s| s == "finish-migrate") {
                        let since = *final_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > FINAL_PHASE_LIMIT {
                            let _ = qmp.execute("migrate_cancel", None).await;
                            unconfirmed = true;
                        }
                    }
                }
            }
        }
    }

    async fn pause(&self, vm: VmId, incarnation: IncarnationId) -> Result<(), DriverError> {
        self.control(vm, incarnation, "pause", "stop").await
    }

    async fn resume(&self, vm: VmId, incarnation: IncarnationId) -> Result<(), DriverError> {
        self.control(vm, incarnation, "resume", "cont").await
    }

    async fn adopt(&self) -> Vec<RunningVm> {
        if let Err(e) = self.ensure_keeper() {
            tracing::error!(dir = %self.cfg.data_dir.display(), error = %e, "cannot start the lease keeper");
        }
        let Ok(entries) = std::fs::read_dir(&self.cfg.data_dir) else {
            return self.running();
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            let Some(vm) = dir.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse::<VmId>().ok()) else {
                continue;
            };
            if self.lock().contains_key(&vm) {
                continue;
            }
            let meta: Option<VmMeta> =
                std::fs::read(dir.join("vm.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
            let pid = read_pid(&dir.join("qemu.pid"));
            let (Some(meta), Some(pid)) = (meta, pid) else {
                tracing::info!(%vm, "removing the leftovers of a VM that never started");
                let _ = std::fs::remove_dir_all(&dir);
                continue;
            };
            if !process_alive(pid) || !is_qemu_of(pid, vm) {
                tracing::info!(%vm, pid, "removing the leftovers of a VM whose QEMU is gone");
                let _ = std::fs::remove_dir_all(&dir);
                continue;
            }
            match Qmp::connect(&dir.join("qmp.sock"), Duration::from_secs(2), self.detached.child_token()).await {
                Ok(qmp) => {
                    let stopping: Arc<AtomicBool> = Arc::default();
                    let paused = Arc::new(AtomicBool::new(qmp.status().await.is_ok_and(|st| st != "running")));
                    tracing::info!(%vm, pid, "adopted a running QEMU VM");
                    if std::fs::remove_file(dir.join(keeper::FENCED_MARK)).is_ok() {
                        tracing::warn!(%vm, pid, "the lease keeper had paused it: the lease ended while no agent ran");
                    }
                    self.watch(vm, meta.incarnation, qmp.clone(), stopping.clone(), paused.clone());
                    self.lock().insert(
                        vm,
                        Instance {
                            incarnation: meta.incarnation,
                            pid,
                            qmp,
                            dir,
                            vcpus: meta.vcpus,
                            stopping,
                            last_cpu: None,
                            paused,
                        },
                    );
                }
                Err(e) => {
                    // Alive but unreachable: we cannot control it, so it must not keep running
                    // unseen (it could become a second copy).
                    tracing::warn!(%vm, pid, error = %e, "QEMU alive but its QMP socket is unusable; killing it");
                    let _ = tokio::process::Command::new("kill").args(["-9", &pid.to_string()]).status().await;
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        }
        self.running()
    }

    fn running(&self) -> Vec<RunningVm> {
        self.lock().iter().map(|(vm, i)| RunningVm { vm: *vm, incarnation: i.incarnation }).collect()
    }

    fn host_usage(&self, _capacity: Resources) -> HostUsage {
        let cpu = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            let first = s.lines().next()?.to_owned();
            let nums: Vec<u64> = first.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
            let idle = nums.get(3)? + nums.get(4).unwrap_or(&0);
            Some((nums.iter().sum::<u64>(), idle))
        });
        let cpu_util = match cpu {
            Some((total, idle)) => {
                let mut last = self.host_cpu.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let util = match *last {
                    Some((t0, i0)) if total > t0 => 1.0 - (idle.saturating_sub(i0)) as f64 / (total - t0) as f64,
                    _ => 0.0,
                };
                *last = Some((total, idle));
                util.clamp(0.0, 1.0)
            }
            None => 0.0,
        };
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |name: &str| -> u64 {
            meminfo
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let used_kib = field("MemTotal:").saturating_sub(field("MemAvailable:"));
        let load1 = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().and_then(|v| v.parse().ok()));
        HostUsage { cpu_util, memory_used_mib: used_kib / 1024, load1 }
    }

    fn vm_usage(&self) -> Vec<VmUsage> {
        let now = Instant::now();
        let mut out = Vec::new();
        for (vm, inst) in self.lock().iter_mut() {
            let Some((ticks, rss_mib)) = process_usage(inst.pid) else {
                continue;
            };
            let cpu_util = match inst.last_cpu {
                Some((t0, ticks0)) if now > t0 => {
                    let cpu_secs = ticks.saturating_sub(ticks0) as f64 / TICKS_PER_SEC;
                    (cpu_secs / (now - t0).as_secs_f64() / f64::from(inst.vcpus.max(1))).clamp(0.0, 1.0)
                }
                _ => 0.0,
            };
            inst.last_cpu = Some((now, ticks));
            let status = if inst.paused.load(Ordering::SeqCst) { "paused" } else { "running" };
            out.push(VmUsage { vm: *vm, cpu_util, memory_used_mib: rss_mib, status });
        }
        out
    }

    fn exits(&self) -> broadcast::Receiver<VmExit> {
        self.exits.subscribe()
    }

    fn detach(&self) {
        self.detached.cancel();
        self.lock().clear();
    }

    fn lease_valid_for(&self, valid_for: Duration) {
        if self.cfg.keeper.is_some()
            && let Err(e) = keeper::write_deadline(&self.cfg.data_dir, valid_for)
        {
            // The keeper then fences at the previous deadline: safe, and loud.
            tracing::error!(dir = %self.cfg.data_dir.display(), error = %e, "cannot record the lease for the keeper");
        }
    }
}

impl QemuDriver {
    async fn control(
        &self,
        vm: VmId,
        incarnation: IncarnationId,
        op: &'static str,
        command: &str,
    ) -> Result<(), DriverError> {
        let qmp = self.lock().get(&vm).filter(|i| i.incarnation == incarnation).map(|i| i.qmp.clone());
        let qmp = qmp.ok_or_else(|| DriverError::ControlFailed { op, vm, reason: "not running here".into() })?;
        qmp.execute(command, None).await.map(|_| ()).map_err(|e| DriverError::ControlFailed {
            op,
            vm,
            reason: e.to_string(),
        })
    }
}
