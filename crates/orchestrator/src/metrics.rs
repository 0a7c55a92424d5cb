//! Metric names of the orchestrator, and the Prometheus recorder.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// VMs created through the API.
pub const VMS_CREATED: &str = "novacron_vms_created_total";
/// Reports received, by outcome (`accepted`, `rejected`, `malformed`).
pub const REPORTS: &str = "novacron_reports_total";
/// Telemetry samples received, by outcome.
pub const TELEMETRY: &str = "novacron_telemetry_samples_total";
/// Heartbeats received, by outcome.
pub const HEARTBEATS: &str = "novacron_heartbeats_total";
/// HTTP requests, by route and status class.
pub const HTTP_REQUESTS: &str = "novacron_http_requests_total";
/// Open WebSocket streams of live events.
pub const STREAM_CLIENTS: &str = "novacron_event_stream_clients";
/// Last folded log sequence.
pub const STATE_SEQ: &str = "novacron_state_seq";
/// Hosts known.
pub const HOSTS: &str = "novacron_hosts";
/// VMs not deleted.
pub const VMS: &str = "novacron_vms";
/// Log sequence of the last snapshot saved.
pub const SNAPSHOT_SEQ: &str = "novacron_snapshot_seq";
/// Time to save a snapshot (encode, write, sync), seconds; off the engine's path.
pub const SNAPSHOT_SECONDS: &str = "novacron_snapshot_seconds";

/// The process-wide Prometheus handle; installs the recorder on first use. If another recorder
/// is already installed (several orchestrators in one test process), the handle still renders
/// what this recorder sees.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_ok() {
            describe();
            novacron_eventlog::metrics::describe();
        }
        handle
    })
}

fn describe() {
    metrics::describe_counter!(VMS_CREATED, "VMs created through the API");
    metrics::describe_counter!(REPORTS, "Agent reports received, by outcome");
    metrics::describe_counter!(TELEMETRY, "Telemetry samples received, by outcome");
    metrics::describe_counter!(HEARTBEATS, "Heartbeats received, by outcome");
    metrics::describe_counter!(HTTP_REQUESTS, "HTTP API requests, by route and status class");
    metrics::describe_gauge!(STREAM_CLIENTS, "Open WebSocket streams of live events (/api/v1/stream)");
    metrics::describe_gauge!(STATE_SEQ, "Last log sequence folded into the orchestrator's state");
    metrics::describe_gauge!(HOSTS, "Hosts known to the orchestrator");
    metrics::describe_gauge!(VMS, "VMs not deleted");
    metrics::describe_gauge!(SNAPSHOT_SEQ, "Log sequence of the last snapshot saved");
    metrics::describe_histogram!(SNAPSHOT_SECONDS, "Time to save a snapshot (encode, write, sync), seconds");
}
