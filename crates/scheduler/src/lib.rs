//! NovaCron's pure planners.
//!
//! [`Planner`] places VMs by **filter → score** over the hosts of a [`ClusterState`]:
//!
//! ```text
//! filters (hard; a host failing one is out, counted under its name):
//!   host_state        not ready, or cordoned/draining
//!   avoided           the request asked to avoid it (e.g. the VM kept failing there)
//!   required_labels   lacks a label the VM requires
//!   max_vms           already runs the most VMs a host may
//!   anti_affinity     runs another VM of the group (hard group anti-affinity)
//!   capacity          lacks vCPUs, memory or disk (capacity × the host's overcommit ratios)
//! scores (weighted sum; the best total wins, ties go to the lowest host id):
//!   fit               bin-pack: how full the host is after placing; spread: how empty
//!   domain_spread     fewer VMs of the group in the host's failure domain (label, e.g. zone)
//!   anti_affinity     fewer VMs of the group on the host (soft group anti-affinity)
//!   load              lower observed CPU utilisation (telemetry)
//! ```
//!
//! A planner carries the reservations of the decisions it has already made, so one pass can
//! place a batch without double-booking a host. It is pure: the same state, configuration,
//! load view and requests give the same decisions, and each decision carries its
//! [`PlacementExplanation`] — what was read, how many hosts each filter eliminated, and the best
//! candidates with their score components.

use std::collections::BTreeMap;

use novacron_state::{ClusterState, HostRecord};
use novacron_types::event::{Candidate, PlacementExplanation};
use novacron_types::{AntiAffinity, HostId, Labels, Resources, VmSpec};

/// Filter names, as they appear in `rejections`.
pub mod filters {
    /// The host is not ready and in service (suspect, failed, cordoned, draining).
    pub const HOST_STATE: &str = "host_state";
    /// The request asked to avoid the host.
    pub const AVOIDED: &str = "avoided";
    /// The host lacks a required label.
    pub const REQUIRED_LABELS: &str = "required_labels";
    /// The host already runs the most VMs a host may.
    pub const MAX_VMS: &str = "max_vms";
    /// The host runs another VM of the group (hard anti-affinity).
    pub const ANTI_AFFINITY: &str = "anti_affinity";
    /// The host lacks free vCPUs, memory or disk.
    pub const CAPACITY: &str = "capacity";
}

/// Host label overriding the cluster's CPU overcommit ratio for one host.
pub const LABEL_CPU_OVERCOMMIT: &str = "overcommit.cpu";
/// Host label overriding the cluster's memory overcommit ratio for one host.
pub const LABEL_MEMORY_OVERCOMMIT: &str = "overcommit.memory";

/// Pack VMs tightly or spread them out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Fill hosts before using new ones (fewer hosts busy; room for big VMs).
    #[default]
    BinPack,
    /// Use the emptiest host (less contention; smaller blast radius).
    Spread,
}

/// Weights of the score components.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Weights {
    /// Of `fit`.
    pub fit: f64,
    /// Of `domain_spread`.
    pub domain_spread: f64,
    /// Of soft `anti_affinity`.
    pub anti_affinity: f64,
    /// Of `load`.
    pub load: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights { fit: 1.0, domain_spread: 0.5, anti_affinity: 1.0, load: 0.5 }
    }
}

/// The cluster's placement settings.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannerConfig {
    /// Bin-pack or spread.
    pub strategy: Strategy,
    /// vCPUs sold per physical vCPU (a host's `overcommit.cpu` label overrides it).
    pub cpu_overcommit: f64,
    /// MiB sold per MiB (a host's `overcommit.memory` label overrides it).
    pub memory_overcommit: f64,
    /// Most VMs on one host, if limited.
    pub max_vms_per_host: Option<u32>,
    /// The host label naming failure domains a group is spread across (`zone`).
    pub failure_domain_label: Option<String>,
    /// Score weights.
    pub weights: Weights,
    /// How many candidates an explanation lists.
    pub explain_top: usize,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        PlannerConfig {
            strategy: Strategy::BinPack,
            cpu_overcommit: 1.0,
            memory_overcommit: 1.0,
            max_vms_per_host: None,
            failure_domain_label: Some("zone".into()),
            weights: Weights::default(),
            explain_top: 3,
        }
    }
}

/// Observed load per host, from telemetry, and how recent it is.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadView {
    /// CPU utilisation 0.0–1.0 per host.
    pub cpu_util: BTreeMap<HostId, f64>,
    /// The newest sample's time, ms since the epoch.
    pub watermark_ms: Option<u64>,
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
    /// The VM's group, for anti-affinity and domain spread.
    pub group: Option<String>,
    /// Labels a host must carry.
    pub require_labels: Labels,
    /// Group anti-affinity.
    pub anti_affinity: AntiAffinity,
}

impl PlacementRequest {
    /// The request for a VM of this spec.
    #[must_use]
    pub fn for_spec(spec: &VmSpec) -> PlacementRequest {
        PlacementRequest {
            need: spec.resources(),
            group: spec.group.clone(),
            require_labels: spec.placement.require_labels.clone(),
            anti_affinity: spec.placement.group_anti_affinity,
            ..PlacementRequest::default()
        }
    }
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

/// Places VMs one request at a time, remembering what it placed.
pub struct Planner<'a> {
    state: &'a ClusterState,
    cfg: &'a PlannerConfig,
    load: &'a LoadView,
    /// Per group, per host: VMs of the group (the state's, plus this planner's own decisions).
    groups: BTreeMap<String, BTreeMap<HostId, u32>>,
    /// Per failure domain value, per group: VMs of the group.
    domains: BTreeMap<(String, String), u32>,
    /// What this planner's decisions took on each host: resources and VM count.
    reserved: BTreeMap<HostId, (Resources, u32)>,
}

fn ratio(labels: &Labels, key: &str, default: f64) -> f64 {
    labels.get(key).and_then(|v| v.parse::<f64>().ok()).filter(|r| r.is_finite() && *r >= 1.0).unwrap_or(default)
}

fn scaled(v: u64, r: f64) -> u64 {
    // Capacity × ratio, rounded down; exact for the ratio 1.0.
    if (r - 1.0).abs() < f64::EPSILON { v } else { (v as f64 * r).floor() as u64 }
}

impl<'a> Planner<'a> {
    /// A planner over `state`.
    #[must_use]
    pub fn new(state: &'a ClusterState, cfg: &'a PlannerConfig, load: &'a LoadView) -> Planner<'a> {
        let mut groups: BTreeMap<String, BTreeMap<HostId, u32>> = BTreeMap::new();
        let mut domains = BTreeMap::new();
        for vm in state.vms.values() {
            let (Some(group), Some(host)) = (&vm.spec.group, &vm.host) else { continue };
            if vm.status == novacron_state::VmStatus::Deleted {
                continue;
            }
            *groups.entry(group.clone()).or_default().entry(host.clone()).or_default() += 1;
            if let Some(d) = Self::domain_of(state, cfg, host) {
                *domains.entry((d, group.clone())).or_default() += 1;
            }
        }
        Planner { state, cfg, load, groups, domains, reserved: BTreeMap::new() }
    }

    fn domain_of(state: &ClusterState, cfg: &PlannerConfig, host: &HostId) -> Option<String> {
        let label = cfg.failure_domain_label.as_ref()?;
        state.hosts.get(host)?.labels.get(label).cloned()
    }

    /// Counts a VM placed elsewhere in this pass (e.g. a migration's target) as if the planner
    /// had placed it.
    pub fn reserve(&mut self, host: &HostId, need: Resources, group: Option<&str>) {
        let r = self.reserved.entry(host.clone()).or_default();
        r.0 = r.0.checked_add(need).unwrap_or(r.0);
        r.1 += 1;
        if let Some(g) = group {
            *self.groups.entry(g.to_owned()).or_default().entry(host.clone()).or_default() += 1;
            if let Some(d) = Self::domain_of(self.state, self.cfg, host) {
                *self.domains.entry((d, g.to_owned())).or_default() += 1;
            }
        }
    }

    /// Capacity × the host's overcommit ratios.
    fn capacity(&self, host: &HostRecord) -> Resources {
        let cpu_r = ratio(&host.labels, LABEL_CPU_OVERCOMMIT, self.cfg.cpu_overcommit);
        let mem_r = ratio(&host.labels, LABEL_MEMORY_OVERCOMMIT, self.cfg.memory_overcommit);
        Resources {
            vcpus: u32::try_from(scaled(u64::from(host.capacity.vcpus), cpu_r)).unwrap_or(u32::MAX),
            memory_mib: scaled(host.capacity.memory_mib, mem_r),
            disk_gib: host.capacity.disk_gib,
        }
    }

    /// Free resources on `host` as the planner sees them: capacity × overcommit, less what is
    /// allocated and what this planner reserved, plus the request's credit.
    fn free(&self, host: &HostRecord, req: &PlacementRequest) -> Resources {
        let cap = self.capacity(host);
        let mut free = cap.saturating_sub(host.allocated);
        if let Some((h, own)) = &req.credit
            && *h == host.id
        {
            free = free.checked_add(*own).unwrap_or(free).min_with(cap);
        }
        let taken = self.reserved.get(&host.id).map_or(Resources::ZERO, |r| r.0);
        free.saturating_sub(taken)
    }

    /// The first filter `host` fails, if any.
    fn rejects(&self, host: &HostRecord, req: &PlacementRequest) -> Option<&'static str> {
        if !host.schedulable() {
            return Some(filters::HOST_STATE);
        }
        if req.avoid.contains(&host.id) {
            return Some(filters::AVOIDED);
        }
        if req.require_labels.iter().any(|(k, v)| host.labels.get(k) != Some(v)) {
            return Some(filters::REQUIRED_LABELS);
        }
        if let Some(max) = self.cfg.max_vms_per_host {
            let own = u32::try_from(host.vms.len() + host.incoming.len()).unwrap_or(u32::MAX);
            let here = own + self.reserved.get(&host.id).map_or(0, |r| r.1);
            let leaving = u32::from(req.credit.as_ref().is_some_and(|(h, _)| *h == host.id));
            if here.saturating_sub(leaving) >= max {
                return Some(filters::MAX_VMS);
            }
        }
        if req.anti_affinity == AntiAffinity::Hard && self.group_on(req, &host.id) > 0 {
            return Some(filters::ANTI_AFFINITY);
        }
        if !req.need.fits_within(self.free(host, req)) {
            return Some(filters::CAPACITY);
        }
        None
    }

    /// VMs of the request's group on `host`, not counting the VM itself when it restarts there.
    fn group_on(&self, req: &PlacementRequest, host: &HostId) -> u32 {
        let Some(g) = &req.group else { return 0 };
        let n = self.groups.get(g).and_then(|m| m.get(host)).copied().unwrap_or(0);
        let itself = u32::from(req.credit.as_ref().is_some_and(|(h, _)| h == host));
        n.saturating_sub(itself)
    }

    fn score(&self, host: &HostRecord, req: &PlacementRequest) -> (f64, BTreeMap<String, f64>) {
        let w = self.cfg.weights;
        let mut parts = BTreeMap::new();
        let free = self.free(host, req);
        let cap = self.capacity(host);
        // How full the host is after placing, averaged over vCPUs and memory.
        let used = |free: u64, need: u64, cap: u64| 1.0 - free.saturating_sub(need) as f64 / cap.max(1) as f64;
        let fullness = (used(u64::from(free.vcpus), u64::from(req.need.vcpus), u64::from(cap.vcpus))
            + used(free.memory_mib, req.need.memory_mib, cap.memory_mib))
            / 2.0;
        let fit = match self.cfg.strategy {
            Strategy::BinPack => fullness,
            Strategy::Spread => 1.0 - fullness,
        };
        parts.insert("fit".to_owned(), fit);
        let mut total = w.fit * fit;
        if let (Some(g), Some(d)) = (&req.group, Self::domain_of(self.state, self.cfg, &host.id)) {
            let in_domain = f64::from(self.domains.get(&(d, g.clone())).copied().unwrap_or(0));
            let in_group = f64::from(self.groups.get(g).map_or(0, |m| m.values().sum::<u32>()));
            let c = -in_domain / (in_group + 1.0);
            parts.insert("domain_spread".to_owned(), c);
            total += w.domain_spread * c;
        }
        if req.anti_affinity == AntiAffinity::Soft && req.group.is_some() {
            let here = f64::from(self.group_on(req, &host.id));
            let c = -here / (here + 1.0);
            parts.insert("anti_affinity".to_owned(), c);
            total += w.anti_affinity * c;
        }
        if let Some(u) = self.load.cpu_util.get(&host.id) {
            let c = -u.clamp(0.0, 1.0);
            parts.insert("load".to_owned(), c);
            total += w.load * c;
        }
        (total, parts)
    }

    /// Places one VM. On success the host is reserved for the rest of this planner's pass.
    pub fn place(&mut self, req: &PlacementRequest) -> Placement {
        let mut rejections: BTreeMap<String, u32> = BTreeMap::new();
        let mut considered = 0u32;
        let mut best: Vec<Candidate> = Vec::new();
        let top = self.cfg.explain_top.max(1);
        for host in self.state.hosts.values() {
            considered += 1;
            if let Some(f) = self.rejects(host, req) {
                *rejections.entry(f.to_owned()).or_default() += 1;
                continue;
            }
            let (score, components) = self.score(host, req);
            // Keep the best `top`, best first; hosts come in id order, so on equal scores the
            // lower id stays ahead.
            let at = best.iter().position(|c| score > c.score).unwrap_or(best.len());
            if at < top {
                best.insert(at, Candidate { host: host.id.clone(), score, components });
                best.truncate(top);
            }
        }
        let mut explanation = PlacementExplanation {
            planner: match self.cfg.strategy {
                Strategy::BinPack => "filter-score/bin-pack".into(),
                Strategy::Spread => "filter-score/spread".into(),
            },
            log_seq: self.state.seq,
            hosts_considered: considered,
            rejections,
            candidates: Vec::new(),
            trigger: None,
            telemetry_watermark_ms: self.load.watermark_ms,
        };
        match best.first().map(|c| c.host.clone()) {
            Some(host) => {
                explanation.candidates = best;
                self.reserve(&host, req.need, req.group.as_deref());
                Placement::Host { host, explanation }
            }
            None => {
                let reason = if considered == 0 {
                    "no hosts are registered".to_owned()
                } else {
                    let parts: Vec<String> = explanation
                        .rejections
                        .iter()
                        .map(|(f, n)| format!("{f} eliminated {n} of {considered}"))
                        .collect();
                    format!(
                        "no host can take {} vCPUs, {} MiB memory, {} GiB disk ({})",
                        req.need.vcpus,
                        req.need.memory_mib,
                        req.need.disk_gib,
                        parts.join(", ")
                    )
                };
                Placement::Unplaceable { reason, explanation }
            }
        }
    }
}

/// One placement with the default settings and no load view (tests, simple callers).
#[must_use]
pub fn place(state: &ClusterState, need: Resources, pending: &BTreeMap<HostId, Resources>) -> Placement {
    place_request(state, &PlacementRequest { need, ..PlacementRequest::default() }, pending)
}

/// One placement with the default settings; `pending` holds resources taken by earlier
/// decisions not yet in `state`.
#[must_use]
pub fn place_request(state: &ClusterState, req: &PlacementRequest, pending: &BTreeMap<HostId, Resources>) -> Placement {
    let cfg = PlannerConfig::default();
    let load = LoadView::default();
    let mut planner = Planner::new(state, &cfg, &load);
    for (h, r) in pending {
        planner.reserve(h, *r, None);
    }
    planner.place(req)
}

#[cfg(test)]
mod tests;
