//! The lease keeper: fences QEMU VMs that outlive their agent.
//!
//! QEMU runs daemonized so that a VM survives an agent crash or restart and the next agent
//! adopts it. But the agent's lease ([`crate::fencing`]) is kept by the agent process: if the
//! agent dies and does not come back, nothing would stop its VMs when the lease ends, the
//! orchestrator would restart them elsewhere after `host_failure_timeout`, and each would run
//! twice. The keeper is the part of the lease that outlives the agent:
//!
//! ```text
//! <qemu-dir>/lease-deadline   the end of the agent's lease, in seconds since boot
//!                             (/proc/uptime's clock: monotonic, counts suspend), rewritten at
//!                             every renewal (write, then rename)
//! <qemu-dir>/keeper.pid       the keeper's pid
//! <qemu-dir>/keeper.log       what it did
//! <qemu-dir>/agent.pid        the pid and start time of the agent that writes the deadline
//! ```
//! A separate process (`novacron qemu-fence-keeper`, started by the agent in its own process
//! group, so neither a crash nor a Ctrl-C of the agent takes it along) polls the deadline every
//! [`POLL`]. Once it has passed, every QEMU under the directory is fenced the way the agent
//! would: killed (SIGKILL) — at once if the agent is gone, 300 ms late if it lives (it kills
//! at the deadline itself and reports why; a wedged one is overtaken) — or, with
//! `--fence-action pause`, paused over QMP if the agent is gone (a live agent holds the VM's
//! one QMP connection and pauses it itself), killed if QMP does not answer. The agent,
//! while it lives, fences at the same deadline; either way the VM is not running by the
//! deadline plus the poll period, inside [`crate::FENCE_MARGIN`]. A restarted agent renews the
//! lease (a new deadline) and adopts what still runs. The keeper exits once the agent is gone,
//! the deadline has passed and no VM is left; the next agent starts a new one.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use novacron_types::VmId;

use crate::FenceAction;

/// How often the keeper reads the deadline.
pub const POLL: Duration = Duration::from_millis(100);

/// How long after the deadline a live agent has to fence by itself before the keeper kills.
const AGENT_FIRST: Duration = Duration::from_millis(300);

const DEADLINE_FILE: &str = "lease-deadline";
const PID_FILE: &str = "keeper.pid";
const AGENT_PID_FILE: &str = "agent.pid";
/// What the keeper's command line carries, to tell it from a reused pid.
pub const SUBCOMMAND: &str = "qemu-fence-keeper";

/// Seconds since boot, from `/proc/uptime` (CLOCK_BOOTTIME: never steps, counts suspend).
///
/// # Errors
/// When `/proc/uptime` cannot be read.
pub fn uptime() -> std::io::Result<f64> {
    let text = std::fs::read_to_string("/proc/uptime")?;
    text.split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("/proc/uptime: unexpected {text:?}")))
}

/// Records that the lease is good for `valid_for` more (atomically: a reader sees the old or
/// the new deadline, never a torn one).
///
/// # Errors
/// When the file cannot be written.
pub fn write_deadline(dir: &Path, valid_for: Duration) -> std::io::Result<()> {
    let deadline = uptime()? + valid_for.as_secs_f64();
    let tmp = dir.join(format!("{DEADLINE_FILE}.tmp"));
    std::fs::write(&tmp, format!("{deadline:.3}\n"))?;
    std::fs::rename(&tmp, dir.join(DEADLINE_FILE))
}

/// The recorded end of the lease, if any.
#[must_use]
pub fn read_deadline(dir: &Path) -> Option<f64> {
    std::fs::read_to_string(dir.join(DEADLINE_FILE)).ok()?.trim().parse().ok()
}

/// Whether a keeper for `dir` runs.
#[must_use]
pub fn running(dir: &Path) -> bool {
    let Some(pid) = std::fs::read_to_string(dir.join(PID_FILE)).ok().and_then(|p| p.trim().parse::<u32>().ok()) else {
        return false;
    };
    super::process_alive(pid)
        && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(SUBCOMMAND))
}

/// Records this process as the agent of `dir` and starts `command` (the keeper's program and
/// leading arguments) for it unless a keeper already runs there. The child is reaped by a task
/// of its own.
///
/// # Errors
/// When the pid cannot be recorded or the keeper cannot be spawned.
pub fn ensure(command: &[std::ffi::OsString], dir: &Path, action: FenceAction) -> std::io::Result<()> {
    std::fs::write(dir.join(AGENT_PID_FILE), identity(std::process::id()))?;
    if running(dir) {
        return Ok(());
    }
    let (program, args) = command.split_first().ok_or_else(|| std::io::Error::other("no keeper command"))?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("keeper.log"))?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .arg("--dir")
        .arg(dir)
        .args(["--fence-action", action_name(action)])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()?;
    tracing::info!(dir = %dir.display(), pid = child.id(), "started the lease keeper");
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    Ok(())
}

fn action_name(action: FenceAction) -> &'static str {
    match action {
        FenceAction::Stop => "stop",
        FenceAction::Pause => "pause",
    }
}

/// The keeper's loop (blocking): fences every VM under `dir` whenever the recorded deadline
/// has passed, until the agent is gone and nothing is left to guard.
///
/// # Errors
/// When its pid file cannot be written or `/proc/uptime` read.
pub fn run(dir: &Path, action: FenceAction) -> std::io::Result<()> {
    std::fs::write(dir.join(PID_FILE), format!("{}\n", std::process::id()))?;
    say(&format!("keeping the lease of {} ({})", dir.display(), action_name(action)));
    loop {
        let now = uptime()?;
        let agent_alive = agent_alive(dir);
        if let Some(late) = read_deadline(dir).map(|d| now - d).filter(|late| *late > 0.0) {
            for (vm, pid, vm_dir) in live_vms(dir) {
                match action {
                    // A live agent kills at the deadline itself (and reports why): it gets the
                    // first go, a wedged one is overtaken well inside the fence margin.
                    FenceAction::Stop if agent_alive && late < AGENT_FIRST.as_secs_f64() => {}
                    FenceAction::Stop => fence_kill(vm, pid, late, "killed"),
                    // A live agent holds the QMP connection and pauses it itself.
                    FenceAction::Pause if agent_alive => {}
                    FenceAction::Pause => match pause_over_qmp(&vm_dir.join("qmp.sock")) {
                        Ok(()) => {
                            // Marked, so that it is not paused again every poll; the next agent
                            // adopts it paused and clears the mark.
                            let _ = std::fs::write(vm_dir.join(FENCED_MARK), "paused by the lease keeper\n");
                            say(&format!("lease ended {late:.2} s ago: paused VM {vm} (QEMU pid {pid})"));
                        }
                        Err(e) => fence_kill(vm, pid, late, &format!("killed (QMP pause failed: {e})")),
                    },
                }
            }
            if !agent_alive && live_vms(dir).is_empty() {
                say("the agent is gone and nothing runs here; exiting");
                let _ = std::fs::remove_file(dir.join(PID_FILE));
                return Ok(());
            }
        }
        std::thread::sleep(POLL);
    }
}

/// `<pid> <start time>`: a pid alone may name another process once the agent is gone.
fn identity(pid: u32) -> String {
    format!("{pid} {}\n", start_ticks(pid).unwrap_or(0))
}

/// When the process started, in clock ticks since boot (`/proc/<pid>/stat`, field 22).
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the agent recorded in `dir` still runs: the same pid, started at the same time.
fn agent_alive(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join(AGENT_PID_FILE)) else { return false };
    let mut fields = text.split_whitespace();
    let Some(pid) = fields.next().and_then(|p| p.parse::<u32>().ok()) else { return false };
    let started = fields.next().and_then(|t| t.parse::<u64>().ok());
    super::process_alive(pid) && started.is_none_or(|t| start_ticks(pid) == Some(t))
}

/// The mark the keeper leaves on a VM it paused.
pub const FENCED_MARK: &str = "fenced";

/// (vm, QEMU pid, its directory) of every QEMU that runs, and is not yet paused by us.
fn live_vms(dir: &Path) -> Vec<(VmId, u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            let vm: VmId = path.file_name()?.to_str()?.parse().ok()?;
            let pid = super::read_pid(&path.join("qemu.pid"))?;
            let alive = super::process_alive(pid) && super::is_qemu_of(pid, vm);
            (alive && !path.join(FENCED_MARK).exists()).then_some((vm, pid, path))
        })
        .collect()
}

fn fence_kill(vm: VmId, pid: u32, late_s: f64, how: &str) {
    let _ = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status();
    say(&format!("lease ended {late_s:.2} s ago: {how} VM {vm} (QEMU pid {pid})"));
}

/// `stop` over QMP, with short timeouts: the fence margin is a second.
fn pause_over_qmp(sock: &Path) -> std::io::Result<()> {
    let stream = UnixStream::connect(sock)?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    stream.set_write_timeout(Some(Duration::from_millis(500)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?; // the greeting
    let mut writer = stream;
    for command in ["qmp_capabilities", "stop"] {
        writeln!(writer, "{{\"execute\":\"{command}\"}}")?;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Err(std::io::Error::other("QMP closed"));
            }
            if line.contains("\"return\"") {
                break;
            }
            if line.contains("\"error\"") {
                return Err(std::io::Error::other(line.trim().to_owned()));
            }
        }
    }
    Ok(())
}

fn say(what: &str) {
    eprintln!("{} novacron lease keeper: {what}", uptime().map(|u| format!("[{u:.2}]")).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_is_known_by_its_pid_and_its_start_time() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        std::fs::write(dir.path().join(AGENT_PID_FILE), identity(me)).unwrap();
        assert!(agent_alive(dir.path()), "this very process");
        let started = start_ticks(me).unwrap();
        // The same pid started at another time is another process: the agent is gone.
        std::fs::write(dir.path().join(AGENT_PID_FILE), format!("{me} {}\n", started + 1)).unwrap();
        assert!(!agent_alive(dir.path()));
        std::fs::write(dir.path().join(AGENT_PID_FILE), "not a pid\n").unwrap();
        assert!(!agent_alive(dir.path()));
        assert!(!agent_alive(&dir.path().join("nowhere")));
    }
}
