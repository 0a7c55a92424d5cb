//! A QMP (QEMU Machine Protocol) client over a unix socket.
//!
//! ```text
//!  QEMU ──► {"QMP": {...}}                      greeting
//!  us   ──► {"execute": "qmp_capabilities", "id": 0}
//!  QEMU ──► {"return": {}, "id": 0}
//!  us   ──► {"execute": "query-status", "id": 1}
//!  QEMU ──► {"event": "STOP", "timestamp": ...}  events may come at any time, between replies
//!  QEMU ──► {"return": {"status": "running", ...}, "id": 1}
//! ```
//! A QMP socket serves one client at a time, so one task owns the connection: it writes
//! commands tagged with an id, matches replies by that id, and broadcasts events. When QEMU
//! exits the socket closes; [`Qmp::closed`] resolves within the moment the kernel says so —
//! that is how the driver notices a dead VM.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

/// QMP failures.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached.
    #[error("cannot connect to QMP at {path}: {reason}")]
    Connect {
        /// Socket path.
        path: String,
        /// OS error.
        reason: String,
    },
    /// QEMU answered with an error.
    #[error("QMP {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QMP error class.
        class: String,
        /// QMP description.
        desc: String,
    },
    /// The connection closed (QEMU exited) before the reply.
    #[error("QMP connection closed")]
    Closed,
    /// No reply in time.
    #[error("QMP {0} timed out")]
    Timeout(String),
    /// QEMU sent something that is not QMP.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
}

/// An asynchronous QMP event.
#[derive(Clone, Debug)]
pub struct QmpEvent {
    /// Event name, e.g. `SHUTDOWN`, `STOP`, `RESUME`, `MIGRATION`.
    pub name: String,
    /// Its data.
    pub data: Value,
}

struct Request {
    command: String,
    arguments: Option<Value>,
    reply: oneshot::Sender<Result<Value, QmpError>>,
}

/// A handle to one QMP connection. Cheap to clone.
#[derive(Clone)]
pub struct Qmp {
    tx: mpsc::Sender<Request>,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Receiver<bool>,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities. Retries the connection for up
    /// to `wait` (QEMU creates the socket a moment after it starts).
    ///
    /// # Errors
    /// When the socket never accepts, or the handshake fails.
    /// The connection closes when `detach` is cancelled, even while handles remain.
    pub async fn connect(path: &Path, wait: Duration, detach: CancellationToken) -> Result<Qmp, QmpError> {
        let deadline = tokio::time::Instant::now() + wait;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(QmpError::Connect { path: path.display().to_string(), reason: e.to_string() });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
            .await
            .map_err(|_| QmpError::Timeout("greeting".into()))?
            .map_err(|e| QmpError::Protocol(e.to_string()))?
            .ok_or(QmpError::Closed)?;
        if !greeting.contains("\"QMP\"") {
            return Err(QmpError::Protocol(format!("unexpected greeting {greeting:?}")));
        }
        write
            .write_all(b"{\"execute\":\"qmp_capabilities\",\"id\":0}\n")
            .await
            .map_err(|e| QmpError::Protocol(e.to_string()))?;
        loop {
            let line = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
                .await
                .map_err(|_| QmpError::Timeout("qmp_capabilities".into()))?
                .map_err(|e| QmpError::Protocol(e.to_string()))?
                .ok_or(QmpError::Closed)?;
            let v: Value = serde_json::from_str(&line).map_err(|e| QmpError::Protocol(e.to_string()))?;
            if v.get("id") == Some(&json!(0)) {
                if let Some(err) = v.get("error") {
                    return Err(command_error("qmp_capabilities", err));
                }
                break;
            }
        }

        let (tx, mut rx) = mpsc::channel::<Request>(32);
        let (events, _) = broadcast::channel(64);
        let (closed_tx, closed) = watch::channel(false);
        let ev = events.clone();
        // The connection task ends when QEMU closes the socket or every handle is dropped;
        // either way it fails what is pending and marks the connection closed.
        tokio::spawn(async move {
            let mut pending: HashMap<u64, (String, oneshot::Sender<Result<Value, QmpError>>)> = HashMap::new();
            let mut next_id: u64 = 1;
            loop {
                tokio::select! {
                    () = detach.cancelled() => break,
                    line = lines.next_line() => {
                        let Ok(Some(line)) = line else { break };
                        let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
                        if let Some(name) = v.get("event").and_then(Value::as_str) {
                            let _ = ev.send(QmpEvent { name: name.to_owned(), data: v.get("data").cloned().unwrap_or(Value::Null) });
                        } else if let Some(id) = v.get("id").and_then(Value::as_u64)
                            && let Some((command, reply)) = pending.remove(&id)
                        {
                            let result = match v.get("error") {
                                Some(err) => Err(command_error(&command, err)),
                                None => Ok(v.get("return").cloned().unwrap_or(Value::Null)),
                            };
                            let _ = reply.send(result);
                        }
                    }
                    req = rx.recv() => {
                        let Some(req) = req else { break };
                        let id = next_id;
                        next_id += 1;
                        let mut msg = json!({ "execute": req.command, "id": id });
                        if let Some(args) = req.arguments {
                            msg["arguments"] = args;
                        }
                        let mut bytes = msg.to_string().into_bytes();
                        bytes.push(b'\n');
                        if write.write_all(&bytes).await.is_err() {
                            let _ = req.reply.send(Err(QmpError::Closed));
                            break;
                        }
                        pending.insert(id, (req.command, req.reply));
                    }
                }
            }
            for (_, (_, reply)) in pending.drain() {
                let _ = reply.send(Err(QmpError::Closed));
            }
            let _ = closed_tx.send(true);
        });
        Ok(Qmp { tx, events, closed })
    }

    /// Runs one command and returns its `return` value.
    ///
    /// # Errors
    /// QEMU's error, a closed connection, or no answer within 10 s.
    pub async fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Request { command: command.to_owned(), arguments, reply }).await.map_err(|_| QmpError::Closed)?;
        tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .map_err(|_| QmpError::Timeout(command.to_owned()))?
            .map_err(|_| QmpError::Closed)?
    }

    /// `query-status` → e.g. `running`, `paused`, `inmigrate`, `postmigrate`, `shutdown`.
    ///
    /// # Errors
    /// As [`execute`](Self::execute).
    pub async fn status(&self) -> Result<String, QmpError> {
        let v = self.execute("query-status", None).await?;
        v.get("status")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| QmpError::Protocol(format!("query-status without status: {v}")))
    }

    /// Subscribes to QMP events from now on.
    #[must_use]
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    /// Resolves once the connection is closed (QEMU exited or closed the socket).
    pub async fn closed(&self) {
        let mut c = self.closed.clone();
        let _ = c.wait_for(|closed| *closed).await;
    }

    /// Whether the connection is already closed.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }
}

fn command_error(command: &str, err: &Value) -> QmpError {
    QmpError::Command {
        command: command.to_owned(),
        class: err.get("class").and_then(Value::as_str).unwrap_or("Unknown").to_owned(),
        desc: err.get("desc").and_then(Value::as_str).unwrap_or("").to_owned(),
    }
}
