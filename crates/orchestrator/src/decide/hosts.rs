//! Decisions about hosts: operators' cordon/drain/uncordon, and failure detection.

use std::collections::BTreeMap;

use novacron_state::ClusterState;
use novacron_types::{Envelope, EventKind, HostId};

use super::*;

/// What an operator can do to a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostAction {
    /// No new VMs.
    Cordon,
    /// Move every VM away, then stay cordoned.
    Drain,
    /// Back to service.
    Uncordon,
}

/// An operator's host action. Repeating one is a no-op (no events); one that does not fit the
/// host's state (e.g. draining a failed host) is refused.
///
/// # Errors
/// [`Refusal::NotFound`] for an unknown host, [`Refusal::Conflict`] for a state that does not allow it.
pub fn host_action(
    state: &ClusterState,
    host: &str,
    action: HostAction,
    stamp: &mut impl Stamp,
    origin: &Origin,
) -> Result<(HostId, Vec<Envelope>), Refusal> {
    use novacron_state::{HostAdmin as A, HostState as S};
    use novacron_types::event::{HostCordoned, HostDrainRequested, HostUncordoned};
    let id = HostId::new(host).map_err(|_| Refusal::NotFound(format!("host {host}")))?;
    let h = state.hosts.get(&id).ok_or_else(|| Refusal::NotFound(format!("host {host}")))?;
    let conflict = || Refusal::Conflict(format!("host {id} is {}; cannot {action:?} it now", h.status()));
    if h.state == S::Failed && action != HostAction::Uncordon {
        return Err(conflict());
    }
    let event = match (action, h.admin) {
        (HostAction::Cordon, A::Cordoned | A::Draining)
        | (HostAction::Drain, A::Draining)
        | (HostAction::Uncordon, A::InService) => None,
        (HostAction::Cordon, A::InService) => Some(EventKind::HostCordoned(HostCordoned { host: id.clone() })),
        (HostAction::Drain, A::InService | A::Cordoned) => Some(EventKind::HostDrainRequested(HostDrainRequested {
            host: id.clone(),
            vms: u32::try_from(h.vms.len()).unwrap_or(u32::MAX),
        })),
        (HostAction::Uncordon, A::Cordoned | A::Draining) => {
            Some(EventKind::HostUncordoned(HostUncordoned { host: id.clone() }))
        }
    };
    Ok((id, event.into_iter().map(|e| envelope(stamp, origin, e)).collect()))
}

/// The failure detector's settings.
#[derive(Clone, Copy, Debug)]
pub struct FailureTimeouts {
    /// Silence after which a host is suspected (takes no new VMs).
    pub suspect_after: std::time::Duration,
    /// Silence after which it is failed and its VMs are placed elsewhere.
    pub host_failure_timeout: std::time::Duration,
    /// The agents' lease, recorded in `HostFailed`.
    pub agent_lease: std::time::Duration,
}

/// Host failure detection from heartbeat silences (measured by the caller on its own
/// monotonic clock; a host never heard from since the orchestrator started counts from the
/// start, which gives every host a full grace period after a restart).
///
/// Ready → suspected after `suspect_after`; suspected → failed after `host_failure_timeout`;
/// back to ready as soon as heartbeats return. When more than half of the hosts that are not
/// already failed — and at least two — are silent at once, nobody is suspected or failed: the
/// orchestrator itself is probably cut off, and evacuating everything would be the worst
/// response. Healing is paused, and said so with `HealingPaused`, until that clears.
///
/// `silences` needs to list only the hosts silent for at least the shorter of the two
/// timeouts: a host it does not list counts as heard from just now (with 10,000 hosts the
/// engine passes only the quiet ones, not a map of every host per pass).
pub fn detect(
    state: &ClusterState,
    silences: &BTreeMap<HostId, std::time::Duration>,
    t: FailureTimeouts,
    stamp: &mut impl Stamp,
    origin: &Origin,
) -> Vec<Envelope> {
    use novacron_state::HostState;
    use novacron_types::event::{HealingPaused, HealingResumed, HostFailed, HostRecovered, HostSuspected};
    let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let silence = |h: &HostId| silences.get(h).copied().unwrap_or_default();
    let mut events = Vec::new();
    let live = state.hosts.values().filter(|h| h.state != HostState::Failed).count();
    let silent = silences
        .iter()
        .filter(|(h, d)| **d >= t.suspect_after && state.hosts.get(*h).is_some_and(|h| h.state != HostState::Failed))
        .count();
    let mass = silent >= 2 && silent * 2 > live;
    if mass && !state.healing_paused {
        events.push(envelope(
            stamp,
            origin,
            EventKind::HealingPaused(HealingPaused {
                silent_hosts: u32::try_from(silent).unwrap_or(u32::MAX),
                hosts: u32::try_from(live).unwrap_or(u32::MAX),
                reason: format!(
                    "{silent} of {live} hosts went silent at once: the orchestrator may be the one cut off, so no host \
                     is declared failed until this clears"
                ),
            }),
        ));
    } else if !mass && state.healing_paused {
        events.push(envelope(
            stamp,
            origin,
            EventKind::HealingResumed(HealingResumed { silent_hosts: u32::try_from(silent).unwrap_or(u32::MAX) }),
        ));
    }
    for h in state.hosts.values() {
        // Ready hosts that no silence lists are the common case: nothing to look up.
        if h.state == HostState::Ready && (mass || silences.is_empty()) {
            continue;
        }
        let quiet = silence(&h.id);
        match h.state {
            HostState::Suspect | HostState::Failed if quiet < t.suspect_after => {
                events.push(envelope(stamp, origin, EventKind::HostRecovered(HostRecovered { host: h.id.clone() })));
            }
            _ if mass => {}
            HostState::Ready if quiet >= t.suspect_after => {
                events.push(envelope(
                    stamp,
                    origin,
                    EventKind::HostSuspected(HostSuspected { host: h.id.clone(), silent_ms: ms(quiet) }),
                ));
            }
            HostState::Suspect if quiet >= t.host_failure_timeout => {
                events.push(envelope(
                    stamp,
                    origin,
                    EventKind::HostFailed(HostFailed {
                        host: h.id.clone(),
                        silent_ms: ms(quiet),
                        agent_lease_ms: ms(t.agent_lease),
                        host_failure_timeout_ms: ms(t.host_failure_timeout),
                    }),
                ));
            }
            _ => {}
        }
    }
    events
}
