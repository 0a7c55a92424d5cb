//! Metric names of the agent.

/// Commands applied (first delivery).
pub const COMMANDS_APPLIED: &str = "novacron_agent_commands_applied_total";
/// Commands delivered again and recognised by their event id.
pub const COMMANDS_DUPLICATE: &str = "novacron_agent_commands_duplicate_total";
/// Commands refused because their generation was stale.
pub const COMMANDS_STALE: &str = "novacron_agent_commands_stale_total";

/// Registers descriptions with the installed recorder.
pub fn describe() {
    metrics::describe_counter!(COMMANDS_APPLIED, "Commands applied by agents");
    metrics::describe_counter!(
        COMMANDS_DUPLICATE,
        "Commands delivered again and recognised by event id"
    );
    metrics::describe_counter!(COMMANDS_STALE, "Commands refused for a stale generation");
}
