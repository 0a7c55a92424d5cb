//! Metric names of the agent.

/// Commands applied (first delivery).
pub const COMMANDS_APPLIED: &str = "novacron_agent_commands_applied_total";
/// Commands delivered again and recognised by their event id.
pub const COMMANDS_DUPLICATE: &str = "novacron_agent_commands_duplicate_total";
/// Commands refused because their generation was stale.
pub const COMMANDS_STALE: &str = "novacron_agent_commands_stale_total";
/// VM starts refused because the orchestrator declared this host failed after issuing them.
pub const STARTS_REFUSED_FENCED: &str = "novacron_agent_starts_refused_fenced_total";
/// Times a VM start had to wait for the lease to be renewed.
pub const STARTS_WAITED_FOR_LEASE: &str = "novacron_agent_starts_waited_for_lease_total";

/// VMs stopped at start because the journal did not expect them to run.
pub const RECONCILE_STOPPED: &str = "novacron_agent_reconcile_stopped_vms_total";
/// VMs that ended on their own (crash, kill, power-off).
pub const VM_EXITS: &str = "novacron_agent_vm_exits_total";
/// VMs stopped or paused by a self-fence.
pub const FENCED_VMS: &str = "novacron_agent_fenced_vms_total";

/// Registers descriptions with the installed recorder.
pub fn describe() {
    metrics::describe_counter!(COMMANDS_APPLIED, "Commands applied by agents");
    metrics::describe_counter!(COMMANDS_DUPLICATE, "Commands delivered again and recognised by event id");
    metrics::describe_counter!(COMMANDS_STALE, "Commands refused for a stale generation");
    metrics::describe_counter!(
        STARTS_REFUSED_FENCED,
        "VM starts refused: issued before the orchestrator declared this host failed"
    );
    metrics::describe_counter!(STARTS_WAITED_FOR_LEASE, "VM starts that waited for the lease to be renewed");
    metrics::describe_counter!(RECONCILE_STOPPED, "VMs stopped at agent start because the journal did not expect them");
    metrics::describe_counter!(VM_EXITS, "VMs that ended on their own");
    metrics::describe_counter!(FENCED_VMS, "VMs stopped or paused by a self-fence");
}
