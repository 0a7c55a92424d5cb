//! JSON Schemas of the external messages, generated from the Rust types.
//!
//! `novacron schemas write DIR` (and the drift test in `schemas/`) call [`all`]; the checked-in
//! files under `schemas/` must equal its output, so a change to a type that is not reflected in
//! the schemas fails the build.

use schemars::schema_for;

use crate::telemetry::{Heartbeat, HostTelemetry, VmTelemetry};
use crate::{Envelope, Report, VmSpec};

/// Every external message's schema: (file name, pretty JSON with a trailing newline).
#[must_use]
pub fn all() -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let mut push = |name: &'static str, schema: schemars::Schema| {
        let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
        text.push('\n');
        out.push((name, text));
    };
    push("event.schema.json", schema_for!(Envelope));
    push("report.schema.json", schema_for!(Report));
    push("host-telemetry.schema.json", schema_for!(HostTelemetry));
    push("vm-telemetry.schema.json", schema_for!(VmTelemetry));
    push("heartbeat.schema.json", schema_for!(Heartbeat));
    push("vm-spec.schema.json", schema_for!(VmSpec));
    push("policy.schema.json", schema_for!(crate::policy::Policy));
    out
}
