//! Resource vectors: what a host offers and what a VM reserves.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An amount of compute: virtual CPUs, memory in MiB and disk in GiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disk in GiB (0 when the VM has no disk).
    #[serde(default)]
    pub disk_gib: u64,
}

impl Resources {
    /// Nothing at all.
    pub const ZERO: Resources = Resources { vcpus: 0, memory_mib: 0, disk_gib: 0 };

    /// Component-wise sum, `None` on overflow.
    #[must_use]
    pub fn checked_add(self, other: Resources) -> Option<Resources> {
        Some(Resources {
            vcpus: self.vcpus.checked_add(other.vcpus)?,
            memory_mib: self.memory_mib.checked_add(other.memory_mib)?,
            disk_gib: self.disk_gib.checked_add(other.disk_gib)?,
        })
    }

    /// Component-wise difference, clamped at zero.
    #[must_use]
    pub fn saturating_sub(self, other: Resources) -> Resources {
        Resources {
            vcpus: self.vcpus.saturating_sub(other.vcpus),
            memory_mib: self.memory_mib.saturating_sub(other.memory_mib),
            disk_gib: self.disk_gib.saturating_sub(other.disk_gib),
        }
    }

    /// Component-wise minimum.
    #[must_use]
    pub fn min_with(self, other: Resources) -> Resources {
        Resources {
            vcpus: self.vcpus.min(other.vcpus),
            memory_mib: self.memory_mib.min(other.memory_mib),
            disk_gib: self.disk_gib.min(other.disk_gib),
        }
    }

    /// True when every component of `self` is at most the matching one of `capacity`.
    #[must_use]
    pub fn fits_within(self, capacity: Resources) -> bool {
        self.vcpus <= capacity.vcpus && self.memory_mib <= capacity.memory_mib && self.disk_gib <= capacity.disk_gib
    }
}
