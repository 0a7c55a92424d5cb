//! NovaCron's pure planners.
//!
//! For now one planner: [`place`], a first-fit placement that filters hosts (state, capacity)
//! and takes the first that fits in host-id order, and explains itself. The engine issue
//! replaces the scoring with bin-pack/spread, affinity and load-aware scores; the seam — pure
//! function of the folded state, explanation in the event — stays.

use std::collections::BTreeMap;

use novacron_state::ClusterState;
use novacron_types::event::{Candidate, PlacementExplanation};
use novacron_types::{HostId, Resources};

/// The planner's name in explanations.
pub const FIRST_FIT: &str = "first-fit";

/// Filter names, as they appear in `rejections`.
pub mod filters {
    /// The host is not ready and in service (suspect, failed, cordoned, draining).
    pub const HOST_STATE: &str = "host_state";
    /// The host lacks free vCPUs, memory or disk.
    pub const CAPACITY: &str = "capacity";
    /// The request asked to avoid the host (e.g. the VM kept failing there).
    pub const AVOIDED: &str = "avoided";
}

/// What to place, and under which extra conditions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PlacementRequest {
    /// What the VM needs.
    pub need: Resources,
    /// Hosts not to use.
    pub avoid: Vec<HostId>,
    /// Resources already reserved by this very VM on a host (a restart in place), which count
    /// as free there.
    pub credit: Option<(HostId, Resources)>,
}

/// The planner's answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Placement {
    /// Put it here.
    Host {
        /// The chosen host.
        host: HostId,
        /// Why.
        explanation: PlacementExplanation,
    },
    /// Nowhere fits.
    Unplaceable {
        /// One line for humans.
        reason: String,
        /// Which filter eliminated how many hosts.
        explanation: PlacementExplanation,
    },
}

/// Chooses a host for a VM needing `need`, given the cluster state and what earlier decisions of
/// the same planning pass have already reserved (`pending`, per host).
///
/// Pure: the same inputs always give the same answer.
#[must_use]
pub fn place(state: &ClusterState, need: Resources, pending: &BTreeMap<HostId, Resources>) -> Placement {
    place_request(state, &PlacementRequest { need, ..PlacementRequest::default() }, pending)
}

/// [`place`] with hosts to avoid and a credit for the VM's own reservation.
#[must_use]
pub fn place_request(state: &ClusterState, req: &PlacementRequest, pending: &BTreeMap<HostId, Resources>) -> Placement {
    let need = req.need;
    let mut rejections: BTreeMap<String, u32> = BTreeMap::new();
    let mut chosen: Option<(HostId, Resources)> = None;
    let mut considered = 0u32;
    for host in state.hosts.values() {
        considered += 1;
        if !host.schedulable() {
            *rejections.entry(filters::HOST_STATE.into()).or_default() += 1;
            continue;
        }
        if req.avoid.contains(&host.id) {
            *rejections.entry(filters::AVOIDED.into()).or_default() += 1;
            continue;
        }
        let reserved = pending.get(&host.id).copied().unwrap_or(Resources::ZERO);
        let mut free = host.free().saturating_sub(reserved);
        if let Some((h, own)) = &req.credit
            && *h == host.id
        {
            free = free.checked_add(*own).unwrap_or(free).min_with(host.capacity);
        }
        if !need.fits_within(free) {
            *rejections.entry(filters::CAPACITY.into()).or_default() += 1;
            continue;
        }
        if chosen.is_none() {
            chosen = Some((host.id.clone(), free));
        }
    }
    let mut explanation = PlacementExplanation {
        planner: FIRST_FIT.into(),
        log_seq: state.seq,
        hosts_considered: considered,
        rejections,
        candidates: Vec::new(),
        trigger: None,
    };
    match chosen {
        Some((host, free)) => {
            let mut components = BTreeMap::new();
            components.insert("free_vcpus_after".into(), f64::from(free.vcpus - need.vcpus));
            components.insert("free_memory_mib_after".into(), (free.memory_mib - need.memory_mib) as f64);
            explanation.candidates.push(Candidate { host: host.clone(), score: 1.0, components });
            Placement::Host { host, explanation }
        }
        None => {
            let reason = if considered == 0 {
                "no hosts are registered".to_owned()
            } else {
                let parts: Vec<String> =
                    explanation.rejections.iter().map(|(f, n)| format!("{f} eliminated {n} of {considered}")).collect();
                format!(
                    "no host can take {} vCPUs, {} MiB memory, {} GiB disk ({})",
                    need.vcpus,
                    need.memory_mib,
                    need.disk_gib,
                    parts.join(", ")
                )
            };
            Placement::Unplaceable { reason, explanation }
        }
    }
}

#[cfg(test)]
mod tests {
    use novacron_types::event::HostRegistered;
    use novacron_types::{Actor, Envelope, EventKind};
    use proptest::prelude::*;

    use super::*;

    fn state_with(hosts: &[(u32, u64)]) -> ClusterState {
        let mut s = ClusterState::default();
        for (i, (vcpus, mem)) in hosts.iter().enumerate() {
            let e = Envelope::new(
                0,
                Actor::Orchestrator("t".into()),
                EventKind::HostRegistered(HostRegistered {
                    host: HostId::new(format!("h{i:02}")).unwrap(),
                    capacity: Resources { vcpus: *vcpus, memory_mib: *mem, disk_gib: 0 },
                    labels: Default::default(),
                    driver: "sim".into(),
                }),
            );
            s.apply(i as u64 + 1, &e);
        }
        s
    }

    #[test]
    fn unplaceable_vm_explains_which_filter_eliminated_the_hosts() {
        let s = state_with(&[(2, 1024), (4, 2048)]);
        let need = Resources { vcpus: 8, memory_mib: 512, disk_gib: 0 };
        let Placement::Unplaceable { reason, explanation } = place(&s, need, &BTreeMap::new()) else {
            panic!("8 vCPUs must not fit");
        };
        assert_eq!(explanation.rejections.get(filters::CAPACITY), Some(&2));
        assert!(reason.contains("capacity eliminated 2 of 2"), "{reason}");
    }

    proptest! {
        #[test]
        fn placement_never_exceeds_host_capacity(
            hosts in prop::collection::vec((1u32..32, 512u64..65536), 1..8),
            vms in prop::collection::vec((1u32..16, 128u64..16384), 1..40),
        ) {
            let s = state_with(&hosts);
            let mut pending: BTreeMap<HostId, Resources> = BTreeMap::new();
            for (vcpus, mem) in vms {
                let need = Resources { vcpus, memory_mib: mem, disk_gib: 0 };
                if let Placement::Host { host, .. } = place(&s, need, &pending) {
                    let r = pending.entry(host).or_default();
                    *r = r.checked_add(need).unwrap();
                }
            }
            for (h, used) in &pending {
                prop_assert!(used.fits_within(s.hosts[h].capacity), "{h} overcommitted: {used:?}");
            }
        }
    }
}
