//! Processes and waits for the end-to-end tests: the real `novacron` binary, real nats-server.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use novacron_testkit::wait_until;
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_novacron");
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// A child process killed (SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub name: &'static str,
}

impl Proc {
    pub fn spawn(name: &'static str, args: &[&str]) -> Proc {
        let child = Command::new(BIN)
            .args(args)
            .env("NOVACRON_LOG", "info")
            // The same nats-server the testkit uses, wherever the target dir is.
            .env("NOVACRON_NATS_SERVER", novacron_testkit::find_nats_server().expect("nats-server"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc { child, name }
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and the exit status within the timeout.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let mut status = None;
        let stopped = wait_until(TIMEOUT, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        if !stopped {
            // Its log says where it waits; it is readable once the process is gone.
            self.kill9();
            let log = self.stderr();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "{} did not stop on SIGTERM; the end of its log:\n{}",
                self.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        status.unwrap()
    }

    pub fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(e) = self.child.stderr.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `novacron ARGS` to completion: (exit success, stdout, stderr).
pub fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).stdin(Stdio::null()).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `novacron ARGS -o json` and parses the one JSON document it must print.
pub fn cli_json(args: &[&str]) -> Value {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["-o", "json"]);
    let (ok, out, err) = cli(&all);
    assert!(ok, "novacron {args:?} failed: {err}");
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("novacron {args:?} printed no single JSON document ({e}): {out}"))
}

/// An orchestrator child process and the address of its API.
pub struct Orchestrator {
    pub proc: Proc,
    pub api: String,
}

impl Orchestrator {
    /// Same as [`Orchestrator::start`]; the name reads better next to the library's in-process one.
    pub fn start_process(nats: &str, data_dir: &Path) -> Orchestrator {
        Self::start(nats, data_dir)
    }

    pub fn start(nats: &str, data_dir: &Path) -> Orchestrator {
        Self::start_with(nats, data_dir, &[])
    }

    /// [`Orchestrator::start`] with extra `novacron orchestrator` flags.
    pub fn start_with(nats: &str, data_dir: &Path, extra: &[&str]) -> Orchestrator {
        let addr_file = data_dir.join("orchestrator.addr");
        let _ = std::fs::remove_file(&addr_file);
        let dir = data_dir.to_str().unwrap();
        let mut args = vec!["orchestrator", "--nats", nats, "--http", "127.0.0.1:0", "--data-dir", dir];
        args.extend_from_slice(extra);
        let proc = Proc::spawn("orchestrator", &args);
        let mut o = Orchestrator { proc, api: String::new() };
        let found = wait_until(TIMEOUT, || std::fs::read_to_string(&addr_file).is_ok_and(|a| !a.is_empty()));
        if !found {
            panic!("orchestrator did not start: {}", o.proc.stderr());
        }
        o.api = format!("http://{}", std::fs::read_to_string(&addr_file).unwrap().trim());
        assert!(wait_until(TIMEOUT, || get(&o.api, "/readyz").0 == 200), "orchestrator never ready");
        o
    }
}

/// Starts `count` simulated hosts `<prefix>-1..N` (8 vCPUs, 16 GiB) in one agent process.
pub fn agents(nats: &str, prefix: &str, count: u32, data_dir: &Path) -> Proc {
    agents_sized(nats, prefix, count, 8, data_dir)
}

/// [`agents`] with `vcpus` per host (2 GiB per vCPU).
pub fn agents_sized(nats: &str, prefix: &str, count: u32, vcpus: u32, data_dir: &Path) -> Proc {
    let (c, v, m) = (count.to_string(), vcpus.to_string(), (u64::from(vcpus) * 2048).to_string());
    let d = data_dir.to_str().unwrap();
    Proc::spawn(
        "agent",
        &["agent", "--nats", nats, "--host", prefix, "--count", &c, "--vcpus", &v, "--memory-mib", &m, "--data-dir", d],
    )
}

/// A `novacron agent --driver qemu` process for host `host`, journaling under `data_dir`.
/// Firmware-only VMs ignore ACPI, so their graceful stop is kept short.
pub fn qemu_agent(nats: &str, host: &str, data_dir: &Path) -> Proc {
    qemu_agent_with(nats, host, data_dir, &[])
}

/// [`qemu_agent`] with extra `novacron agent` flags.
pub fn qemu_agent_with(nats: &str, host: &str, data_dir: &Path, extra: &[&str]) -> Proc {
    let d = data_dir.to_str().unwrap();
    let mut args = vec![
        "agent",
        "--nats",
        nats,
        "--host",
        host,
        "--driver",
        "qemu",
        "--vcpus",
        "4",
        "--memory-mib",
        "2048",
        "--data-dir",
        d,
        "--powerdown-timeout",
        "300ms",
    ];
    args.extend_from_slice(extra);
    Proc::spawn("qemu agent", &args)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

/// GET → (status, JSON body or Null). Status 0 when unreachable.
pub fn get(api: &str, path: &str) -> (u16, Value) {
    match agent().get(format!("{api}{path}")).call() {
        Ok(mut r) => {
            let status = r.status().as_u16();
            let text = r.body_mut().read_to_string().unwrap_or_default();
            (status, serde_json::from_str(&text).unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

/// GET with an `Authorization` header → (status, JSON body or Null).
pub fn get_authorized(api: &str, path: &str, authorization: &str) -> (u16, Value) {
    match agent().get(format!("{api}{path}")).header("authorization", authorization).call() {
        Ok(mut r) => {
            let status = r.status().as_u16();
            let text = r.body_mut().read_to_string().unwrap_or_default();
            (status, serde_json::from_str(&text).unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

/// POST JSON → (status, JSON body). Status 0 when unreachable.
pub fn post(api: &str, path: &str, body: &Value) -> (u16, Value) {
    match agent().post(format!("{api}{path}")).send_json(body) {
        Ok(mut r) => {
            let status = r.status().as_u16();
            let text = r.body_mut().read_to_string().unwrap_or_default();
            (status, serde_json::from_str(&text).unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

pub fn wait_for(what: &str, cond: impl FnMut() -> bool) {
    assert!(wait_until(TIMEOUT, cond), "timed out waiting for {what}");
}

pub fn vm_status(api: &str, id: &str) -> String {
    get(api, &format!("/api/v1/vms/{id}")).1["status"].as_str().unwrap_or("").to_owned()
}

/// A nats-server, an orchestrator process (with `flags`) and three simulated hosts
/// `host-1..3` in one agent process, every host registered. Fields keep them alive.
pub struct ThreeHosts {
    pub nats: novacron_testkit::NatsServer,
    pub dir: tempfile::TempDir,
    pub o: Orchestrator,
    pub _agents: Proc,
}

impl ThreeHosts {
    pub fn start(flags: &[&str]) -> ThreeHosts {
        let nats = novacron_testkit::NatsServer::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let o = Orchestrator::start_with(&nats.url(), &dir.path().join("orch"), flags);
        let agents = agents(&nats.url(), "host", 3, &dir.path().join("agents"));
        wait_for("three hosts", || get(&o.api, "/api/v1/hosts").1.as_array().is_some_and(|h| h.len() == 3));
        ThreeHosts { nats, dir, o, _agents: agents }
    }
}
