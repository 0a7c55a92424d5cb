//! The QEMU driver with real QEMU (KVM when usable, TCG otherwise). The VMs have no guest OS:
//! the firmware idling is a running VM.

use std::time::Duration;

use novacron_agent::FenceAction;
use novacron_agent::driver::Driver;
use novacron_agent::qemu::{QemuConfig, QemuDriver, keeper};
use novacron_types::{Generation, HostId, IncarnationId, StartVm, VmId, VmSpec};

fn driver(dir: &std::path::Path) -> QemuDriver {
    let mut cfg = QemuConfig::detect(dir.join("qemu")).expect("QEMU must be installed for these tests (make tools)");
    // Firmware ignores ACPI power-down; don't wait long for it.
    cfg.powerdown_timeout = Duration::from_millis(300);
    QemuDriver::new(cfg)
}

fn start_cmd(vm: VmId, incarnation: IncarnationId, disk_gib: u64) -> StartVm {
    StartVm {
        vm,
        host: HostId::new("qemu-host").unwrap(),
        incarnation,
        generation: Generation(1),
        spec: VmSpec {
            name: "tiny".into(),
            vcpus: 1,
            memory_mib: 64,
            disk_gib,
            group: None,
            labels: Default::default(),
            restart: Default::default(),
            placement: Default::default(),
        },
    }
}

/// A short temporary directory (unix socket paths are short) whose QEMU processes are killed
/// when it is dropped, even if the test fails: QEMU runs daemonized.
struct QemuDir {
    _reaper: novacron_testkit::ProcessReaper,
    dir: tempfile::TempDir,
}

impl QemuDir {
    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

fn short_tempdir() -> QemuDir {
    let dir = tempfile::Builder::new().prefix("ncq").tempdir_in("/tmp").unwrap();
    QemuDir { _reaper: novacron_testkit::ProcessReaper::new(dir.path()), dir }
}

fn qemu_processes_of(vm: VmId) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline"))
            && String::from_utf8_lossy(&cmd).contains(&format!("guest={vm}"))
        {
            n += 1;
        }
    }
    n
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_qemu_vm_runs_pauses_resumes_and_stops_leaving_nothing_behind() {
    let dir = short_tempdir();
    let d = driver(dir.path());
    let (vm, inc) = (VmId::new_v7(), IncarnationId::new_v7());
    d.start(&start_cmd(vm, inc, 1)).await.expect("start");
    assert_eq!(d.qmp_status(vm).await.unwrap(), "running");
    assert_eq!(qemu_processes_of(vm), 1, "one QEMU process, findable by its name");
    let vm_dir = d.config().data_dir.join(vm.to_string());
    assert!(vm_dir.join("disk.qcow2").is_file(), "the disk was created");
    assert!(vm_dir.join("qemu.pid").is_file());

    d.start(&start_cmd(vm, inc, 1)).await.expect("starting the same incarnation again is a no-op");
    assert_eq!(qemu_processes_of(vm), 1);

    d.pause(vm, inc).await.unwrap();
    assert_eq!(d.qmp_status(vm).await.unwrap(), "paused");
    d.resume(vm, inc).await.unwrap();
    assert_eq!(d.qmp_status(vm).await.unwrap(), "running");

    let usage = d.vm_usage();
    assert_eq!(usage.len(), 1);
    assert!(usage[0].memory_used_mib > 0, "RSS of the QEMU process is measured");

    d.stop(vm, inc).await.expect("stop");
    assert_eq!(qemu_processes_of(vm), 0, "the process is gone");
    assert!(!vm_dir.exists(), "its files are gone");
    assert!(d.running().is_empty());
    d.stop(vm, inc).await.expect("stopping again is a no-op");
}

#[tokio::test]
async fn a_killed_qemu_is_noticed_and_reported_with_a_reason() {
    let dir = short_tempdir();
    let d = driver(dir.path());
    let mut exits = d.exits();
    let (vm, inc) = (VmId::new_v7(), IncarnationId::new_v7());
    d.start(&start_cmd(vm, inc, 0)).await.unwrap();
    let pid = d.pid(vm).unwrap();
    std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(10), exits.recv()).await.expect("an exit").unwrap();
    assert_eq!((exit.vm, exit.incarnation), (vm, inc));
    assert!(exit.reason.contains("exited unexpectedly"), "{}", exit.reason);
    assert!(d.running().is_empty());
}

#[tokio::test]
async fn a_new_driver_adopts_running_vms_and_cleans_up_dead_ones() {
    let dir = short_tempdir();
    let first = driver(dir.path());
    let (vm, inc) = (VmId::new_v7(), IncarnationId::new_v7());
    let (dead, dead_inc) = (VmId::new_v7(), IncarnationId::new_v7());
    first.start(&start_cmd(vm, inc, 0)).await.unwrap();
    first.start(&start_cmd(dead, dead_inc, 0)).await.unwrap();
    let dead_pid = first.pid(dead).unwrap();
    // The agent goes away (as a crashed process's sockets close); the VMs keep running. One of
    // them dies while no agent watches.
    first.detach();
    drop(first);
    std::process::Command::new("kill").args(["-9", &dead_pid.to_string()]).status().unwrap();
    wait_for("the killed QEMU to disappear", || qemu_processes_of(dead) == 0).await;

    let second = driver(dir.path());
    let running = second.adopt().await;
    assert_eq!(running.len(), 1, "{running:?}");
    assert_eq!((running[0].vm, running[0].incarnation), (vm, inc));
    assert_eq!(second.qmp_status(vm).await.unwrap(), "running", "controllable after adoption");
    assert!(!second.config().data_dir.join(dead.to_string()).exists(), "leftovers of the dead VM removed");
    assert_eq!(qemu_processes_of(vm), 1, "adopted, not restarted");
    second.stop(vm, inc).await.unwrap();
    assert_eq!(qemu_processes_of(vm), 0);
}

#[tokio::test]
async fn a_bad_configuration_fails_the_start_with_qemus_reason() {
    let dir = short_tempdir();
    let d = driver(dir.path());
    let mut cmd = start_cmd(VmId::new_v7(), IncarnationId::new_v7(), 0);
    cmd.spec.labels.insert("image".into(), "/nonexistent/base.qcow2".into());
    let err = d.start(&cmd).await.unwrap_err();
    assert!(err.to_string().contains("qemu-img create failed"), "{err}");
    assert!(d.running().is_empty());
}

fn incoming_cmd(vm: VmId, incarnation: IncarnationId) -> novacron_types::PrepareIncoming {
    let s = start_cmd(vm, incarnation, 0);
    novacron_types::PrepareIncoming {
        vm,
        host: HostId::new("qemu-dest").unwrap(),
        incarnation,
        generation: Generation(2),
        spec: s.spec,
    }
}

#[tokio::test]
async fn a_vm_live_migrates_between_two_drivers_on_this_machine() {
    let (da, db) = (short_tempdir(), short_tempdir());
    // A source whose graceful stop would wait a minute: the copy left behind by a completed
    // migration must be quit at once, not powered down.
    let mut slow = QemuConfig::detect(da.path().join("qemu")).unwrap();
    slow.powerdown_timeout = Duration::from_secs(60);
    let (source, dest) = (QemuDriver::new(slow), driver(db.path()));
    let (vm, src_inc, dst_inc) = (VmId::new_v7(), IncarnationId::new_v7(), IncarnationId::new_v7());
    source.start(&start_cmd(vm, src_inc, 0)).await.unwrap();
    let source_pid = source.pid(vm).unwrap();

    let uri = dest.prepare_incoming(&incoming_cmd(vm, dst_inc)).await.expect("prepare incoming");
    assert!(uri.starts_with("tcp:127.0.0.1:"), "{uri}");
    assert_eq!(dest.qmp_status(vm).await.unwrap(), "inmigrate");
    assert_eq!(qemu_processes_of(vm), 2, "source and waiting destination");

    let stats = tokio::time::timeout(Duration::from_secs(20), source.migrate_out(vm, src_inc, &uri))
        .await
        .expect("the migration returns without waiting for a power-down")
        .expect("migration");
    assert!(stats.duration_ms > 0, "{stats:?}");
    wait_for("the destination running", || dest.running().len() == 1).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while dest.qmp_status(vm).await.unwrap() != "running" {
        assert!(tokio::time::Instant::now() < deadline, "destination never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(source.running().is_empty(), "the source forgot it");
    assert_eq!(qemu_processes_of(vm), 1, "exactly one copy, on the destination");
    assert_ne!(dest.pid(vm).unwrap(), source_pid);
    dest.stop(vm, dst_inc).await.unwrap();
    assert_eq!(qemu_processes_of(vm), 0);
}

#[tokio::test]
async fn a_migration_whose_destination_dies_leaves_the_vm_running_on_the_source() {
    let (da, db) = (short_tempdir(), short_tempdir());
    let (source, dest) = (driver(da.path()), driver(db.path()));
    let (vm, src_inc, dst_inc) = (VmId::new_v7(), IncarnationId::new_v7(), IncarnationId::new_v7());
    source.start(&start_cmd(vm, src_inc, 0)).await.unwrap();
    let uri = dest.prepare_incoming(&incoming_cmd(vm, dst_inc)).await.unwrap();
    // The destination dies after it said it was ready, before the state arrives.
    let dest_pid = dest.pid(vm).unwrap();
    std::process::Command::new("kill").args(["-9", &dest_pid.to_string()]).status().unwrap();
    wait_for("the destination gone", || qemu_processes_of(vm) == 1).await;

    let err = source.migrate_out(vm, src_inc, &uri).await.unwrap_err();
    assert!(err.to_string().contains("migration of VM"), "{err}");
    assert_eq!(source.qmp_status(vm).await.unwrap(), "running", "the VM keeps running on the source");
    assert_eq!(source.running().len(), 1);
    source.stop(vm, src_inc).await.unwrap();
}

#[tokio::test]
async fn a_migration_never_lands_in_another_vms_waiting_qemu() {
    // What a dead destination's reused port would lead to: another VM's incoming QEMU, of the
    // same size, at the address the source was given.
    let (da, db) = (short_tempdir(), short_tempdir());
    let (source, dest) = (driver(da.path()), driver(db.path()));
    let (vm, src_inc) = (VmId::new_v7(), IncarnationId::new_v7());
    let (other, other_inc) = (VmId::new_v7(), IncarnationId::new_v7());
    source.start(&start_cmd(vm, src_inc, 0)).await.unwrap();
    let uri = dest.prepare_incoming(&incoming_cmd(other, other_inc)).await.unwrap();

    let err = source.migrate_out(vm, src_inc, &uri).await.unwrap_err();
    assert!(err.to_string().contains("migration of VM"), "{err}");
    assert_eq!(source.qmp_status(vm).await.unwrap(), "running", "the VM keeps running on the source");
    assert_eq!(qemu_processes_of(vm), 1, "one copy of the VM, on the source");
    source.stop(vm, src_inc).await.unwrap();
}

#[tokio::test]
async fn a_migration_whose_stream_is_swallowed_by_something_else_fails() {
    // A dead destination's port taken by some other program that reads whatever comes: the
    // source writes its whole stream, but nobody loads it — that is not a migration.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut &conn, &mut std::io::sink());
            });
        }
    });
    let dir = short_tempdir();
    let source = driver(dir.path());
    let (vm, inc) = (VmId::new_v7(), IncarnationId::new_v7());
    source.start(&start_cmd(vm, inc, 0)).await.unwrap();
    let asked = std::time::Instant::now();
    let err = source.migrate_out(vm, inc, &format!("tcp:127.0.0.1:{port}")).await.unwrap_err();
    assert!(err.to_string().contains("did not confirm"), "{err}");
    assert!(asked.elapsed() < Duration::from_secs(20), "the VM was stopped for {:?}", asked.elapsed());
    assert_eq!(source.qmp_status(vm).await.unwrap(), "running", "the VM runs on the source again");
    assert_eq!(qemu_processes_of(vm), 1, "the source copy is still there");
    source.stop(vm, inc).await.unwrap();
}

/// A pid that surely is not running: a child that has exited and been reaped.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

fn qmp_greets(sock: &std::path::Path) -> bool {
    use std::io::BufRead;
    let Ok(stream) = std::os::unix::net::UnixStream::connect(sock) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut line = String::new();
    std::io::BufReader::new(stream).read_line(&mut line).is_ok_and(|_| line.contains("QMP"))
}

/// The VMs of an agent that died: detached (its QMP connections closed), its pid dead.
async fn orphaned_vm(dir: &std::path::Path) -> (QemuDriver, VmId, IncarnationId) {
    let d = driver(dir);
    let (vm, inc) = (VmId::new_v7(), IncarnationId::new_v7());
    d.start(&start_cmd(vm, inc, 0)).await.unwrap();
    d.detach();
    std::fs::write(d.config().data_dir.join("agent.pid"), format!("{}\n", dead_pid())).unwrap();
    // As when the agent's process is gone: QEMU takes a new QMP client once the old one closed.
    let sock = d.config().data_dir.join(vm.to_string()).join("qmp.sock");
    wait_for("the QMP socket to be free", || qmp_greets(&sock)).await;
    (d, vm, inc)
}

#[tokio::test]
async fn the_lease_keeper_kills_the_vms_of_a_dead_agent_when_the_lease_ends_and_not_before() {
    let dir = short_tempdir();
    let (d, vm, _) = orphaned_vm(dir.path()).await;
    let qemu_dir = d.config().data_dir.clone();
    keeper::write_deadline(&qemu_dir, Duration::from_millis(1500)).unwrap();
    let deadline = keeper::read_deadline(&qemu_dir).unwrap();
    let keeper = {
        let qemu_dir = qemu_dir.clone();
        std::thread::spawn(move || keeper::run(&qemu_dir, FenceAction::Stop))
    };
    wait_for("the keeper to kill the orphaned VM", || qemu_processes_of(vm) == 0).await;
    let gone_at = keeper::uptime().unwrap();
    assert!(gone_at >= deadline, "killed {:.2} s before the lease ended", deadline - gone_at);
    assert!(
        gone_at < deadline + 1.0,
        "killed {:.2} s after the lease ended, beyond the fence margin",
        gone_at - deadline
    );
    // Nothing left to guard and no agent: it exits.
    keeper.join().unwrap().unwrap();
    assert!(!qemu_dir.join("keeper.pid").exists(), "its pid file goes with it");
}

#[tokio::test]
async fn with_pause_the_lease_keeper_pauses_the_vms_and_the_next_agent_adopts_them() {
    let dir = short_tempdir();
    let (d, vm, inc) = orphaned_vm(dir.path()).await;
    let qemu_dir = d.config().data_dir.clone();
    keeper::write_deadline(&qemu_dir, Duration::ZERO).unwrap();
    let keeper = {
        let qemu_dir = qemu_dir.clone();
        std::thread::spawn(move || keeper::run(&qemu_dir, FenceAction::Pause))
    };
    // It pauses the VM, marks it, and exits: nothing left running to guard.
    keeper.join().unwrap().unwrap();
    assert_eq!(qemu_processes_of(vm), 1, "paused, not killed");
    assert!(qemu_dir.join(vm.to_string()).join(keeper::FENCED_MARK).exists());

    let next = driver(dir.path());
    let running = next.adopt().await;
    assert_eq!(running.len(), 1);
    assert_eq!(next.qmp_status(vm).await.unwrap(), "paused");
    assert!(!qemu_dir.join(vm.to_string()).join(keeper::FENCED_MARK).exists(), "the mark is cleared on adoption");
    next.stop(vm, inc).await.unwrap();
}

#[tokio::test]
async fn the_lease_keeper_leaves_the_vms_alone_while_the_lease_is_renewed() {
    let dir = short_tempdir();
    let (d, vm, _) = orphaned_vm(dir.path()).await;
    let qemu_dir = d.config().data_dir.clone();
    keeper::write_deadline(&qemu_dir, Duration::from_millis(400)).unwrap();
    {
        let qemu_dir = qemu_dir.clone();
        std::thread::spawn(move || keeper::run(&qemu_dir, FenceAction::Stop));
    }
    wait_for("the keeper to start", || qemu_dir.join("keeper.pid").exists()).await;
    // Renewed every 100 ms for three seconds, well past the first deadline: the VM lives on.
    let renewed_until = keeper::uptime().unwrap() + 3.0;
    while keeper::uptime().unwrap() < renewed_until {
        keeper::write_deadline(&qemu_dir, Duration::from_millis(400)).unwrap();
        assert_eq!(qemu_processes_of(vm), 1, "killed while the lease was being renewed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The renewals stop: it is killed within the lease and the margin.
    let stopped = keeper::uptime().unwrap();
    wait_for("the keeper to kill the VM", || qemu_processes_of(vm) == 0).await;
    assert!(keeper::uptime().unwrap() - stopped < 0.4 + 1.0);
}
