//! Typed identifiers and counters.
//!
//! Every entity has its own id type so that a `VmId` can never be passed where a `HostId` is
//! expected. UUID-based ids print as the canonical hyphenated form, which is also a valid NATS
//! subject token. Host ids are chosen by operators (`--host rack1-h07`) and are restricted to
//! the characters that are safe in a subject token.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new, time-ordered (UUID v7) id. Call this in the I/O shell, before an append,
            /// never inside a fold.
            #[must_use]
            pub fn new_v7() -> Self {
                Self(Uuid::now_v7())
            }
            /// The underlying UUID.
            #[must_use]
            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

uuid_id!(
    /// The identity of a VM: the operator's intent, which outlives any one run of it.
    VmId
);
uuid_id!(
    /// One run of a VM on one host. A start, a restart elsewhere or a migration makes a new one.
    IncarnationId
);
uuid_id!(
    /// The id of one event in the log; also its `Nats-Msg-Id`, which makes appends idempotent.
    EventId
);
uuid_id!(
    /// The id of one report from an agent; the orchestrator de-duplicates reports by it.
    ReportId
);

/// A hypervisor host's id, chosen by the operator.
///
/// 1 to 64 characters from `[A-Za-z0-9_-]`, so that it is one NATS subject token.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, JsonSchema)]
#[serde(transparent)]
pub struct HostId(String);

/// Why a string is not a valid [`HostId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid host id {value:?}: {reason}")]
pub struct InvalidHostId {
    /// The rejected text.
    pub value: String,
    /// What rule it broke.
    pub reason: &'static str,
}

impl HostId {
    /// Longest accepted host id.
    pub const MAX_LEN: usize = 64;

    /// Checks and wraps an operator-chosen host id.
    ///
    /// # Errors
    /// When the id is empty, too long, or has a character outside `[A-Za-z0-9_-]`.
    pub fn new(value: impl Into<String>) -> Result<Self, InvalidHostId> {
        let value = value.into();
        let reason = if value.is_empty() {
            Some("must not be empty")
        } else if value.len() > Self::MAX_LEN {
            Some("must be at most 64 characters")
        } else if !value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            Some("may only contain letters, digits, '-' and '_'")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(InvalidHostId { value, reason }),
            None => Ok(Self(value)),
        }
    }

    /// The id as text (also its subject token).
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for HostId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HostId::new(s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for HostId {
    type Err = InvalidHostId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HostId::new(s)
    }
}

/// The generation of a VM's assignment: raised by every new placement of the VM.
///
/// Agents refuse commands whose generation is older than the newest they have seen for that VM,
/// which fences off decisions made before a re-placement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct Generation(pub u64);

impl Generation {
    /// The generation of a VM's first placement.
    pub const FIRST: Generation = Generation(1);

    /// The next generation, or `None` on overflow (never in practice, but never silently).
    #[must_use]
    pub fn next(self) -> Option<Generation> {
        self.0.checked_add(1).map(Generation)
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_id_accepts_subject_safe_names_only() {
        assert!(HostId::new("rack1-h07_a").is_ok());
        for bad in ["", "a.b", "a b", "a*", "a>", &"x".repeat(65)] {
            assert!(HostId::new(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn host_id_deserialisation_validates() {
        let err = serde_json::from_str::<HostId>("\"a.b\"").unwrap_err();
        assert!(err.to_string().contains("invalid host id"), "{err}");
    }

    #[test]
    fn generation_next_is_checked() {
        assert_eq!(Generation(1).next(), Some(Generation(2)));
        assert_eq!(Generation(u64::MAX).next(), None);
    }
}
