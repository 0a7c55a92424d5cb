//! The bus contract between the orchestrator and the agents — and anyone else on the bus.
//!
//! Both sides depend on this crate and never on each other. It names the streams, builds and
//! parses subjects, and fixes the header names. No I/O.
//!
//! ```text
//! subject                         stream        publisher → consumer
//! nc.events.<aggregate>.<id>      EVENTS        orchestrator leader → orchestrators, CLI audit
//! nc.cmd.<host>.<vm>              EVENTS        orchestrator leader → that host's agent
//! nc.report.<host>                REPORTS       agents → orchestrator (work queue)
//! nc.telemetry.host.<host>        TELEMETRY     agents, other systems → orchestrator
//! nc.telemetry.vm.<vm>            TELEMETRY     agents, other systems → orchestrator
//! nc.hb.<host>                    (core NATS)   agents → orchestrator failure detector
//! nc.deadletter.<source>          DEADLETTER    whoever rejected a malformed message
//! KV nc-host-leases, key <host>   (KV)          the host's agent renews its lease; the
//!                                               orchestrator overwrites it to declare it failed
//! ```

use novacron_types::{EventKind, HostId, VmId};

use std::time::Duration;

/// How long an agent may lose the bus before it fences its VMs (default).
pub const DEFAULT_AGENT_LEASE: Duration = Duration::from_secs(10);
/// How long the orchestrator waits without heartbeats before it declares a host failed and
/// restarts its VMs elsewhere (default).
pub const DEFAULT_HOST_FAILURE_TIMEOUT: Duration = Duration::from_secs(30);
/// Slack between the end of an agent's lease and the host-failure timeout: the agent's timer
/// firing late, killing the VMs, and clock-rate differences. Both sides check
/// `lease + FENCE_MARGIN < host_failure_timeout` at start-up (see `docs/fencing.md`).
pub const FENCE_MARGIN: Duration = Duration::from_secs(1);

/// KV bucket of the agents' leases, one key per host (history 1, file storage). An agent
/// renews its lease by a compare-and-set on its key; the orchestrator declares a host failed
/// by a compare-and-set of [`LEASE_FAILED`] on the revision it last saw in the host's
/// heartbeats, which succeeds only if the agent has not renewed since.
pub const HOST_LEASE_BUCKET: &str = "nc-host-leases";
/// The value an agent writes when it renews its lease.
pub const LEASE_HELD: &[u8] = b"held";
/// The value the orchestrator writes when it declares the host failed.
pub const LEASE_FAILED: &[u8] = b"failed";

/// KV bucket of trained models' artifacts, keyed `sha256-<hex digest>`.
pub const MODEL_ARTIFACTS_BUCKET: &str = "nc-model-artifacts";
/// The JetStream object store of trained models' artifacts, named `sha256-<digest>` (chunked:
/// an artifact may be larger than a message; `MODEL_ARTIFACTS_BUCKET`, the KV bucket earlier
/// versions wrote, is still read).
pub const MODEL_OBJECTS_BUCKET: &str = "nc-model-objects";

/// Checks the fencing invariant shared by agents and the orchestrator.
///
/// # Errors
/// A message naming both values and the margin.
pub fn check_fencing(lease: Duration, host_failure_timeout: Duration) -> Result<(), String> {
    if lease.is_zero() {
        return Err("the agent lease must be longer than zero".into());
    }
    if lease + FENCE_MARGIN >= host_failure_timeout {
        return Err(format!(
            "agent lease {lease:?} + fence margin {FENCE_MARGIN:?} must be shorter than the host-failure timeout \
             {host_failure_timeout:?}: otherwise a host's VMs could be restarted elsewhere while they still run there"
        ));
    }
    Ok(())
}

/// The log of record: every event and every command.
pub const EVENTS_STREAM: &str = "EVENTS";
/// Agents' reports, consumed once each by the orchestrator.
pub const REPORTS_STREAM: &str = "REPORTS";
/// Host and VM telemetry samples.
pub const TELEMETRY_STREAM: &str = "TELEMETRY";
/// Rejected messages, with the reason.
pub const DEADLETTER_STREAM: &str = "DEADLETTER";
/// Each host's commands, copied by the server from EVENTS (a view for delivery, not a log:
/// nothing publishes to it). Stored under [`host_delivery_subject`], one literal subject per
/// host, so a host's consumer finds its next command by lookup instead of reading past every
/// other host's events.
pub const COMMANDS_STREAM: &str = "COMMANDS";
/// The EVENTS subjects COMMANDS copies (every command: `nc.cmd.<host>.<vm>`)…
pub const COMMANDS_SOURCE_FILTER: &str = "nc.cmd.*.*";
/// …and what it stores each one under (`nc.hostcmd.<host>`; host ids have no dots).
pub const COMMANDS_SOURCE_TRANSFORM: &str = "nc.hostcmd.{{wildcard(1)}}";

/// Subjects of the EVENTS stream.
pub const EVENTS_SUBJECTS: [&str; 2] = ["nc.events.>", "nc.cmd.>"];
/// Subjects of the REPORTS stream.
pub const REPORTS_SUBJECTS: [&str; 1] = ["nc.report.>"];
/// Subjects of the TELEMETRY stream.
pub const TELEMETRY_SUBJECTS: [&str; 1] = ["nc.telemetry.>"];
/// Subjects of the DEADLETTER stream.
pub const DEADLETTER_SUBJECTS: [&str; 1] = ["nc.deadletter.>"];

/// Durable consumer of REPORTS used by the orchestrator.
pub const ORCHESTRATOR_REPORTS_CONSUMER: &str = "orchestrator-reports";
/// Durable consumer of TELEMETRY used by the orchestrator.
pub const ORCHESTRATOR_TELEMETRY_CONSUMER: &str = "orchestrator-telemetry";

/// Header naming the encoding (`application/msgpack` or `application/json`).
pub const HEADER_CONTENT_TYPE: &str = "Content-Type";
/// Header carrying the event kind, so tools can filter without decoding.
pub const HEADER_EVENT_KIND: &str = "Nc-Event-Kind";
/// Dead letters: why the message was rejected.
pub const HEADER_DEADLETTER_REASON: &str = "Nc-Deadletter-Reason";
/// Dead letters: the subject the message was published on.
pub const HEADER_DEADLETTER_SUBJECT: &str = "Nc-Deadletter-Subject";
/// Dead letters: the original `Content-Type`, if any.
pub const HEADER_DEADLETTER_CONTENT_TYPE: &str = "Nc-Deadletter-Content-Type";
/// Set by nats-server on a message a stream copied from another (COMMANDS from EVENTS):
/// `<stream> <sequence> <filter> <transform> <original subject>`.
pub const HEADER_STREAM_SOURCE: &str = "Nats-Stream-Source";

/// The subject an event is appended on.
///
/// Commands go to the host that must act; everything else to its aggregate.
#[must_use]
pub fn event_subject(event: &EventKind) -> String {
    match event {
        EventKind::HostRegistered(e) => format!("nc.events.host.{}", e.host),
        EventKind::HostSuspected(e) => format!("nc.events.host.{}", e.host),
        EventKind::HostFailed(e) => format!("nc.events.host.{}", e.host),
        EventKind::HostRecovered(e) => format!("nc.events.host.{}", e.host),
        EventKind::HostCordoned(e) => format!("nc.events.host.{}", e.host),
        EventKind::HostDrainRequested(e) => format!("nc.events.host.{}", e.host),
        EventKind::HostDrained(e) => format!("nc.events.host.{}", e.host),
        EventKind::HostUncordoned(e) => format!("nc.events.host.{}", e.host),
        EventKind::HealingPaused(_) | EventKind::HealingResumed(_) => "nc.events.cluster.healing".to_owned(),
        EventKind::LeaderElected(_) => "nc.events.cluster.leader".to_owned(),
        EventKind::VmStartCommanded(c) => command_subject(&c.host, c.vm),
        EventKind::VmStopCommanded(c) => command_subject(&c.host, c.vm),
        EventKind::VmRequested(e) => vm_events(e.vm),
        EventKind::VmPlaced(e) => vm_events(e.vm),
        EventKind::VmPlacementFailed(e) => vm_events(e.vm),
        EventKind::VmRunning(e) | EventKind::VmStopped(e) => vm_events(e.vm),
        EventKind::VmFailed(e) => vm_events(e.vm),
        EventKind::VmDeleteRequested(e) => vm_events(e.vm),
        EventKind::VmDeleted(e) => vm_events(e.vm),
        EventKind::VmGaveUp(e) => vm_events(e.vm),
        EventKind::VmIncomingCommanded(c) => command_subject(&c.host, c.vm),
        EventKind::VmMigrationStarted(c) => command_subject(&c.host, c.vm),
        EventKind::VmMigrationPlanned(e) => vm_events(e.vm),
        EventKind::VmMigrationIncomingReady(e) => vm_events(e.vm),
        EventKind::VmMigrationCompleted(e) => vm_events(e.vm),
        EventKind::VmMigrationFailed(e) => vm_events(e.vm),
        EventKind::PolicyApplied(e) => format!("nc.events.policy.{}", e.policy.name),
        EventKind::PolicyRemoved(e) => format!("nc.events.policy.{}", e.name),
        EventKind::PolicyConflictResolved(_) => "nc.events.cluster.policy".to_owned(),
        EventKind::PolicyViolationObserved(e) => vm_events(e.vm),
        EventKind::GroupCreated(e) => format!("nc.events.group.{}", e.spec.name),
        EventKind::ModelTrained(e) => format!("nc.events.model.{}", e.model),
        EventKind::ModelPromoted(e) => format!("nc.events.model.{}", e.model),
        EventKind::ModelRolledBack(e) => format!("nc.events.model.{}", e.from),
        EventKind::ModelRetrainingRequested(_) => "nc.events.cluster.models".to_owned(),
        EventKind::GroupDeleted(e) => format!("nc.events.group.{}", e.group),
        EventKind::GroupScaled(e) => format!("nc.events.group.{}", e.group),
        EventKind::GroupScaleRefused(e) => format!("nc.events.group.{}", e.group),
    }
}

/// The subject of a host's own events (`nc.events.host.<id>`: its registration, suspicion,
/// failure, recovery, cordon and drain).
#[must_use]
pub fn host_events(host: &HostId) -> String {
    format!("nc.events.host.{host}")
}

/// The subject of a VM's own events (`nc.events.vm.<id>`).
#[must_use]
pub fn vm_events(vm: VmId) -> String {
    format!("nc.events.vm.{vm}")
}

/// `nc.cmd.<host>.<vm>`: a command to one host about one VM.
#[must_use]
pub fn command_subject(host: &HostId, vm: VmId) -> String {
    format!("nc.cmd.{host}.{vm}")
}

/// `nc.cmd.<host>.>`: a host's commands in EVENTS.
#[must_use]
pub fn host_commands_filter(host: &HostId) -> String {
    format!("nc.cmd.{host}.>")
}

/// `nc.hostcmd.<host>`: a host's commands in [`COMMANDS_STREAM`], the filter of its agent's
/// consumer.
#[must_use]
pub fn host_delivery_subject(host: &HostId) -> String {
    format!("nc.hostcmd.{host}")
}

/// The durable consumer name of a host's agent (on [`COMMANDS_STREAM`]; on EVENTS before).
#[must_use]
pub fn agent_consumer_name(host: &HostId) -> String {
    format!("agent-{host}")
}

/// `nc.report.<host>`.
#[must_use]
pub fn report_subject(host: &HostId) -> String {
    format!("nc.report.{host}")
}

/// `nc.hb.<host>`.
#[must_use]
pub fn heartbeat_subject(host: &HostId) -> String {
    format!("nc.hb.{host}")
}

/// `nc.hb.*`: every host's heartbeats.
pub const HEARTBEAT_WILDCARD: &str = "nc.hb.*";

/// `nc.telemetry.host.<host>`.
#[must_use]
pub fn host_telemetry_subject(host: &HostId) -> String {
    format!("nc.telemetry.host.{host}")
}

/// `nc.telemetry.vm.<vm>`.
#[must_use]
pub fn vm_telemetry_subject(vm: VmId) -> String {
    format!("nc.telemetry.vm.{vm}")
}

/// `nc.deadletter.<source>`; `source` is a static component name (`reports`, `telemetry`, …).
#[must_use]
pub fn deadletter_subject(source: &str) -> String {
    format!("nc.deadletter.{source}")
}

/// What a subject is, once parsed. Anything the orchestrator reads is parsed through this so
/// that the host or VM named in the subject can be checked against the payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// `nc.report.<host>`.
    Report(HostId),
    /// `nc.telemetry.host.<host>`.
    HostTelemetry(HostId),
    /// `nc.telemetry.vm.<vm>`.
    VmTelemetry(VmId),
    /// `nc.hb.<host>`.
    Heartbeat(HostId),
}

/// A subject that does not follow the contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("subject {subject:?} does not follow the bus contract: {reason}")]
pub struct SubjectError {
    /// The subject.
    pub subject: String,
    /// What is wrong.
    pub reason: String,
}

impl Subject {
    /// Parses one of the subjects agents and other systems publish on.
    ///
    /// # Errors
    /// When the subject is not one of them or its id token is invalid.
    pub fn parse(subject: &str) -> Result<Subject, SubjectError> {
        let err = |reason: String| SubjectError { subject: subject.to_owned(), reason };
        let tokens: Vec<&str> = subject.split('.').collect();
        let host = |t: &str| HostId::new(t).map_err(|e| err(e.to_string()));
        let vm = |t: &str| t.parse::<VmId>().map_err(|e| err(format!("invalid VM id {t:?}: {e}")));
        match tokens.as_slice() {
            ["nc", "report", h] => Ok(Subject::Report(host(h)?)),
            ["nc", "telemetry", "host", h] => Ok(Subject::HostTelemetry(host(h)?)),
            ["nc", "telemetry", "vm", v] => Ok(Subject::VmTelemetry(vm(v)?)),
            ["nc", "hb", h] => Ok(Subject::Heartbeat(host(h)?)),
            _ => Err(err("not a report, telemetry or heartbeat subject".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_round_trip_through_the_parser() {
        let h = HostId::new("h-1").unwrap();
        let v = VmId::new_v7();
        assert_eq!(Subject::parse(&report_subject(&h)).unwrap(), Subject::Report(h.clone()));
        assert_eq!(Subject::parse(&host_telemetry_subject(&h)).unwrap(), Subject::HostTelemetry(h.clone()));
        assert_eq!(Subject::parse(&vm_telemetry_subject(v)).unwrap(), Subject::VmTelemetry(v));
        assert_eq!(Subject::parse(&heartbeat_subject(&h)).unwrap(), Subject::Heartbeat(h));
    }

    #[test]
    fn malformed_subjects_are_rejected_with_the_reason() {
        assert!(Subject::parse("nc.telemetry.vm.not-a-uuid").unwrap_err().reason.contains("invalid VM id"));
        assert!(Subject::parse("nc.report").is_err());
        assert!(Subject::parse("nc.report.a.b").is_err());
    }
}
