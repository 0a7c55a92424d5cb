//! Metric names of this crate, described once in [`describe`].

/// Events appended to the log.
pub const EVENTS_APPENDED: &str = "novacron_eventlog_appended_events_total";
/// Appends refused because the writer's view of the tail was stale.
pub const APPEND_CONFLICTS: &str = "novacron_eventlog_append_conflicts_total";
/// Appends retried after a transient error (same message id).
pub const APPEND_RETRIES: &str = "novacron_eventlog_append_retries_total";
/// Events read back from the log.
pub const EVENTS_REPLAYED: &str = "novacron_eventlog_replayed_events_total";
/// Messages sent to the dead-letter stream, labelled by `source`.
pub const DEADLETTERS: &str = "novacron_deadletters_total";

/// Registers descriptions with the installed recorder.
pub fn describe() {
    metrics::describe_counter!(EVENTS_APPENDED, "Events appended to the EVENTS stream");
    metrics::describe_counter!(APPEND_CONFLICTS, "Appends refused because the writer's tail was stale");
    metrics::describe_counter!(APPEND_RETRIES, "Appends retried after a transient error");
    metrics::describe_counter!(EVENTS_REPLAYED, "Events read back from the EVENTS stream");
    metrics::describe_counter!(DEADLETTERS, "Malformed messages sent to the dead-letter stream, by source");
}
