//! Semantic checks on messages from outside, after they decode.
//!
//! Decoding proves the shape; [`Validate`] proves the values make sense (no NaN, utilisation in
//! range, sane sizes, names within bounds). A message that fails goes to the dead-letter stream
//! with the [`ValidationError`] as its reason.

use crate::report::{HostRegistration, Report, ReportKind};
use crate::telemetry::{Heartbeat, HostTelemetry, VmTelemetry};
use crate::{Resources, SCHEMA_VERSION, Strength, VmSpec};

/// A value that decoded but makes no sense. `field` is a dotted path into the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {reason}")]
pub struct ValidationError {
    /// Where, e.g. `report.payload.capacity.vcpus`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ValidationError {
    fn new(field: &str, reason: impl Into<String>) -> Self {
        ValidationError { field: field.to_owned(), reason: reason.into() }
    }
}

/// Checks the values of a decoded message.
pub trait Validate {
    /// # Errors
    /// The first value that makes no sense, with its field path.
    fn validate(&self) -> Result<(), ValidationError>;
}

fn schema_ok(schema: u32) -> Result<(), ValidationError> {
    if schema == SCHEMA_VERSION {
        Ok(())
    } else {
        Err(ValidationError::new(
            "schema",
            format!("unsupported schema version {schema}; this build reads version {SCHEMA_VERSION}"),
        ))
    }
}

fn unit_interval(field: &str, v: f64) -> Result<(), ValidationError> {
    if v.is_finite() && (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(ValidationError::new(field, format!("must be a number from 0.0 to 1.0, got {v}")))
    }
}

/// Largest vCPU count accepted for one VM or host (sanity bound, not a policy).
pub const MAX_VCPUS: u32 = 4096;
/// Largest memory accepted for one VM or host: 64 TiB.
pub const MAX_MEMORY_MIB: u64 = 64 * 1024 * 1024;
/// Largest disk accepted: 1 PiB.
pub const MAX_DISK_GIB: u64 = 1024 * 1024;

fn resources_ok(prefix: &str, r: &Resources, allow_zero: bool) -> Result<(), ValidationError> {
    if !allow_zero && r.vcpus == 0 {
        return Err(ValidationError::new(&format!("{prefix}vcpus"), "must be at least 1"));
    }
    if r.vcpus > MAX_VCPUS {
        return Err(ValidationError::new(&format!("{prefix}vcpus"), format!("must be at most {MAX_VCPUS}")));
    }
    if !allow_zero && r.memory_mib == 0 {
        return Err(ValidationError::new(&format!("{prefix}memory_mib"), "must be at least 1"));
    }
    if r.memory_mib > MAX_MEMORY_MIB {
        return Err(ValidationError::new(&format!("{prefix}memory_mib"), format!("must be at most {MAX_MEMORY_MIB}")));
    }
    if r.disk_gib > MAX_DISK_GIB {
        return Err(ValidationError::new(&format!("{prefix}disk_gib"), format!("must be at most {MAX_DISK_GIB}")));
    }
    Ok(())
}

impl Validate for VmSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        let name_len = self.name.chars().count();
        if name_len == 0 || name_len > 128 {
            return Err(ValidationError::new("name", "must be 1 to 128 characters"));
        }
        if self.name.chars().any(char::is_control) {
            return Err(ValidationError::new("name", "must not contain control characters"));
        }
        resources_ok("", &self.resources(), false)?;
        for (k, v) in &self.labels {
            if k.is_empty() || k.len() > 63 || v.len() > 255 {
                return Err(ValidationError::new(
                    &format!("labels.{k}"),
                    "keys must be 1 to 63 bytes and values at most 255",
                ));
            }
        }
        rules_ok(self)
    }
}

/// Most label rules on one VM.
pub const MAX_AFFINITY_RULES: usize = 16;

fn rules_ok(spec: &VmSpec) -> Result<(), ValidationError> {
    let p = &spec.placement;
    if spec.group.is_none() {
        for (field, s) in [("group_affinity", p.group_affinity), ("group_anti_affinity", p.group_anti_affinity)] {
            if !s.is_none() {
                return Err(ValidationError::new(&format!("placement.{field}"), "needs the VM to have a group"));
            }
        }
    }
    if p.group_affinity == Strength::Hard && p.group_anti_affinity == Strength::Hard {
        return Err(ValidationError::new(
            "placement.group_affinity",
            "hard affinity and hard anti-affinity to the same group cannot both hold",
        ));
    }
    if p.vm_affinity.len() > MAX_AFFINITY_RULES {
        return Err(ValidationError::new("placement.vm_affinity", format!("at most {MAX_AFFINITY_RULES} rules")));
    }
    for (i, r) in p.vm_affinity.iter().enumerate() {
        let at = |f: &str| format!("placement.vm_affinity[{i}].{f}");
        if r.selector.is_empty() {
            return Err(ValidationError::new(&at("selector"), "must name at least one label"));
        }
        if r.selector.iter().any(|(k, v)| k.is_empty() || k.len() > 63 || v.len() > 255) {
            return Err(ValidationError::new(&at("selector"), "keys must be 1 to 63 bytes and values at most 255"));
        }
        if r.strength.is_none() {
            return Err(ValidationError::new(&at("strength"), "must be soft or hard"));
        }
        if r.topology.as_ref().is_some_and(|t| t.is_empty() || t.len() > 63) {
            return Err(ValidationError::new(&at("topology"), "must be a host label key of 1 to 63 bytes"));
        }
    }
    for (i, a) in p.vm_affinity.iter().enumerate() {
        for b in &p.vm_affinity[i + 1..] {
            if a.strength == Strength::Hard
                && b.strength == Strength::Hard
                && a.relation != b.relation
                && a.selector == b.selector
                && a.topology == b.topology
            {
                return Err(ValidationError::new(
                    &format!("placement.vm_affinity[{i}]"),
                    "hard affinity and hard anti-affinity to the same VMs in the same domain cannot both hold",
                ));
            }
        }
    }
    Ok(())
}

impl Validate for Report {
    fn validate(&self) -> Result<(), ValidationError> {
        schema_ok(self.schema)?;
        match &self.report {
            ReportKind::HostRegistration(HostRegistration { capacity, driver, .. }) => {
                resources_ok("report.payload.capacity.", capacity, false)?;
                if driver.is_empty() || driver.len() > 32 {
                    return Err(ValidationError::new("report.payload.driver", "must be 1 to 32 characters"));
                }
                Ok(())
            }
            ReportKind::VmRunning(r) | ReportKind::VmStopped(r) => {
                if r.host != self.host {
                    return Err(ValidationError::new("report.payload.host", "must equal the report's host"));
                }
                Ok(())
            }
            ReportKind::VmFailed(r) => {
                if r.host != self.host {
                    return Err(ValidationError::new("report.payload.host", "must equal the report's host"));
                }
                Ok(())
            }
            ReportKind::IncomingReady(r) if r.host != self.host => {
                Err(ValidationError::new("report.payload.host", "must equal the report's host"))
            }
            ReportKind::MigrationCompleted(r) if r.from != self.host => {
                Err(ValidationError::new("report.payload.from", "must equal the report's host (the source)"))
            }
            ReportKind::MigrationFailed(r) if r.reported_by != self.host => {
                Err(ValidationError::new("report.payload.reported_by", "must equal the report's host"))
            }
            ReportKind::IncomingReady(_) | ReportKind::MigrationCompleted(_) | ReportKind::MigrationFailed(_) => Ok(()),
        }
    }
}

impl Validate for HostTelemetry {
    fn validate(&self) -> Result<(), ValidationError> {
        schema_ok(self.schema)?;
        unit_interval("cpu_util", self.cpu_util)?;
        if let Some(l) = self.load1
            && !(l.is_finite() && l >= 0.0)
        {
            return Err(ValidationError::new("load1", format!("must be a non-negative number, got {l}")));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, v) in self.vms.iter().enumerate() {
            unit_interval("cpu_util", v.cpu_util)
                .map_err(|e| ValidationError { field: format!("vms[{i}].cpu_util"), ..e })?;
            if !seen.insert(v.vm) {
                return Err(ValidationError::new(&format!("vms[{i}].vm"), format!("VM {} is sampled twice", v.vm)));
            }
        }
        Ok(())
    }
}

impl Validate for VmTelemetry {
    fn validate(&self) -> Result<(), ValidationError> {
        schema_ok(self.schema)?;
        unit_interval("cpu_util", self.cpu_util)
    }
}

impl Validate for Heartbeat {
    fn validate(&self) -> Result<(), ValidationError> {
        schema_ok(self.schema)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HostId;

    #[test]
    fn telemetry_rejects_nan_and_out_of_range_utilisation() {
        let mut t = HostTelemetry {
            schema: SCHEMA_VERSION,
            host: HostId::new("h1").unwrap(),
            at_ms: 1,
            cpu_util: f64::NAN,
            memory_used_mib: 1,
            load1: None,
            vms: Vec::new(),
        };
        assert_eq!(t.validate().unwrap_err().field, "cpu_util");
        t.cpu_util = 1.5;
        assert_eq!(t.validate().unwrap_err().field, "cpu_util");
        t.cpu_util = 0.5;
        t.load1 = Some(-1.0);
        assert_eq!(t.validate().unwrap_err().field, "load1");
        t.load1 = Some(0.3);
        assert!(t.validate().is_ok());
        let vm = crate::VmId::new_v7();
        let sample = |cpu_util| crate::telemetry::VmSample { vm, cpu_util, memory_used_mib: 1, status: None };
        t.vms = vec![sample(0.2), sample(f64::INFINITY)];
        assert_eq!(t.validate().unwrap_err().field, "vms[1].cpu_util");
        t.vms = vec![sample(0.2), sample(0.3)];
        let twice = t.validate().unwrap_err();
        assert_eq!((twice.field.as_str(), twice.reason.contains("twice")), ("vms[1].vm", true), "{twice}");
        t.vms.pop();
        assert!(t.validate().is_ok());
        t.schema = 2;
        assert_eq!(t.validate().unwrap_err().field, "schema");
    }

    #[test]
    fn vm_spec_rejects_zero_and_absurd_sizes() {
        let mut s = VmSpec {
            name: "web-1".into(),
            vcpus: 0,
            memory_mib: 512,
            disk_gib: 0,
            group: None,
            labels: Default::default(),
            restart: Default::default(),
            placement: Default::default(),
        };
        assert_eq!(s.validate().unwrap_err().field, "vcpus");
        s.vcpus = 2;
        s.memory_mib = MAX_MEMORY_MIB + 1;
        assert_eq!(s.validate().unwrap_err().field, "memory_mib");
        s.memory_mib = 2048;
        assert!(s.validate().is_ok());
        s.name = String::new();
        assert_eq!(s.validate().unwrap_err().field, "name");
    }

    #[test]
    fn placement_rules_that_cannot_hold_or_name_nothing_are_refused() {
        use crate::{Relation, Strength, VmAffinity};
        let base = VmSpec {
            name: "db-1".into(),
            vcpus: 1,
            memory_mib: 512,
            disk_gib: 0,
            group: None,
            labels: Default::default(),
            restart: Default::default(),
            placement: Default::default(),
        };
        let rule = |relation, strength, key: &str| VmAffinity {
            selector: [(key.to_owned(), "db".to_owned())].into(),
            relation,
            strength,
            topology: None,
        };
        let err = |f: &dyn Fn(&mut VmSpec)| {
            let mut s = base.clone();
            f(&mut s);
            s.validate().unwrap_err()
        };
        assert_eq!(err(&|s| s.placement.group_affinity = Strength::Hard).field, "placement.group_affinity");
        let e = err(&|s| {
            s.group = Some("db".into());
            s.placement.group_affinity = Strength::Hard;
            s.placement.group_anti_affinity = Strength::Hard;
        });
        assert!(e.reason.contains("cannot both hold"), "{e}");
        let e = err(&|s| s.placement.vm_affinity = vec![rule(Relation::Affinity, Strength::None, "app")]);
        assert_eq!(e.field, "placement.vm_affinity[0].strength");
        let e = err(&|s| {
            s.placement.vm_affinity = vec![
                rule(Relation::Affinity, Strength::Hard, "app"),
                rule(Relation::AntiAffinity, Strength::Hard, "app"),
            ];
        });
        assert_eq!(e.field, "placement.vm_affinity[0]");
        let e = err(&|s| {
            let mut r = rule(Relation::Affinity, Strength::Soft, "app");
            r.selector.clear();
            s.placement.vm_affinity = vec![r];
        });
        assert_eq!(e.field, "placement.vm_affinity[0].selector");
        // A soft preference against a hard rule on the same VMs is allowed (the hard one wins).
        let mut ok = base.clone();
        ok.placement.vm_affinity =
            vec![rule(Relation::Affinity, Strength::Soft, "app"), rule(Relation::AntiAffinity, Strength::Hard, "app")];
        assert!(ok.validate().is_ok());
    }
}
