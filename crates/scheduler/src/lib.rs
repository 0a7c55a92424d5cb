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
//! In clusters larger than [`PlannerConfig::max_candidates`] (64) a decision does not score every
//! host: it scans from where the previous decision of the pass landed and stops once that many
//! feasible hosts are scored (a next-fit cursor, as Nomad limits its candidates). Filters still
//! apply to every host it looks at, the explanation reports how many it looked at, and a VM is
//! only unplaceable after every host was examined.
//!
//! A planner carries the reservations of the decisions it has already made, so one pass can
//! place a batch without double-booking a host. It is pure: the same state, configuration,
//! load view and requests give the same decisions, and each decision carries its
//! [`PlacementExplanation`] — what was read, how many hosts each filter eliminated, and the best
//! candidates with their score components.

pub mod consolidation;
pub mod packing;

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
    /// In clusters with more hosts than this, stop after scoring this many feasible hosts,
    /// scanning from where the previous decision of the pass landed (`None`: always every host).
    pub max_candidates: Option<usize>,
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
            max_candidates: Some(64),
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

/// Facts about one host, computed once per planner.
struct HostFacts {
    /// Capacity × overcommit.
    capacity: Resources,
    /// Index of its failure domain in `Planner::domain_names`, if it has one.
    domain: Option<usize>,
    /// Observed CPU load, if known.
    load: Option<f64>,
}

/// The score components of one candidate (kept as numbers while scanning; turned into the
/// explanation's map only for the best few).
#[derive(Clone, Copy)]
struct Parts {
    fit: f64,
    domain_spread: Option<f64>,
    anti_affinity: Option<f64>,
    load: Option<f64>,
}

impl Parts {
    fn total(&self, w: Weights) -> f64 {
        w.fit * self.fit
            + w.domain_spread * self.domain_spread.unwrap_or(0.0)
            + w.anti_affinity * self.anti_affinity.unwrap_or(0.0)
            + w.load * self.load.unwrap_or(0.0)
    }

    fn map(&self) -> BTreeMap<String, f64> {
        let mut m = BTreeMap::new();
        m.insert("fit".to_owned(), self.fit);
        if let Some(v) = self.domain_spread {
            m.insert("domain_spread".to_owned(), v);
        }
        if let Some(v) = self.anti_affinity {
            m.insert("anti_affinity".to_owned(), v);
        }
        if let Some(v) = self.load {
            m.insert("load".to_owned(), v);
        }
        m
    }
}

/// Places VMs one request at a time, remembering what it placed.
pub struct Planner<'a> {
    state: &'a ClusterState,
    cfg: &'a PlannerConfig,
    load: &'a LoadView,
    /// The hosts in id order, with their facts.
    hosts: Vec<(&'a HostRecord, HostFacts)>,
    /// Host id → position in `hosts`.
    index: BTreeMap<HostId, usize>,
    /// Per group: VMs of the group per host position (the state's, plus this planner's own).
    groups: BTreeMap<String, BTreeMap<usize, u32>>,
    /// Per group: VMs of the group per failure domain (index).
    domains: BTreeMap<String, BTreeMap<usize, u32>>,
    /// What this planner's decisions took on each host (by position): resources, VM count.
    reserved: BTreeMap<usize, (Resources, u32)>,
    /// Where the next limited scan starts: the previous winner's position.
    cursor: usize,
}

fn ratio(labels: &Labels, key: &str, default: f64) -> f64 {
    labels.get(key).and_then(|v| v.parse::<f64>().ok()).filter(|r| r.is_finite() && *r >= 1.0).unwrap_or(default)
}

/// What a host offers the planners: its capacity × the overcommit ratios (the cluster's, or
/// the host's `overcommit.*` labels).
#[must_use]
pub fn effective_capacity(h: &HostRecord, cfg: &PlannerConfig) -> Resources {
    let cpu_r = ratio(&h.labels, LABEL_CPU_OVERCOMMIT, cfg.cpu_overcommit);
    let mem_r = ratio(&h.labels, LABEL_MEMORY_OVERCOMMIT, cfg.memory_overcommit);
    Resources {
        vcpus: u32::try_from(scaled(u64::from(h.capacity.vcpus), cpu_r)).unwrap_or(u32::MAX),
        memory_mib: scaled(h.capacity.memory_mib, mem_r),
        disk_gib: h.capacity.disk_gib,
    }
}

fn scaled(v: u64, r: f64) -> u64 {
    // Capacity × ratio, rounded down; exact for the ratio 1.0.
    if (r - 1.0).abs() < f64::EPSILON { v } else { (v as f64 * r).floor() as u64 }
}

impl<'a> Planner<'a> {
    /// A planner over `state`.
    #[must_use]
    pub fn new(state: &'a ClusterState, cfg: &'a PlannerConfig, load: &'a LoadView) -> Planner<'a> {
        let mut domain_index: BTreeMap<&str, usize> = BTreeMap::new();
        let mut hosts = Vec::with_capacity(state.hosts.len());
        let mut index = BTreeMap::new();
        for (i, h) in state.hosts.values().enumerate() {
            let capacity = effective_capacity(h, cfg);
            let domain = cfg.failure_domain_label.as_ref().and_then(|l| h.labels.get(l)).map(|d| {
                let next = domain_index.len();
                *domain_index.entry(d.as_str()).or_insert(next)
            });
            let facts = HostFacts { capacity, domain, load: load.cpu_util.get(&h.id).copied() };
            index.insert(h.id.clone(), i);
            hosts.push((h, facts));
        }
        let mut planner = Planner {
            state,
            cfg,
            load,
            hosts,
            index,
            groups: BTreeMap::new(),
            domains: BTreeMap::new(),
            reserved: BTreeMap::new(),
            cursor: 0,
        };
        for vm in state.vms.values() {
            let (Some(group), Some(host)) = (&vm.spec.group, &vm.host) else { continue };
            if vm.status == novacron_state::VmStatus::Deleted {
                continue;
            }
            if let Some(&i) = planner.index.get(host) {
                planner.count_group(group, i);
            }
        }
        planner
    }

    fn count_group(&mut self, group: &str, i: usize) {
        *self.groups.entry(group.to_owned()).or_default().entry(i).or_default() += 1;
        if let Some(d) = self.hosts[i].1.domain {
            *self.domains.entry(group.to_owned()).or_default().entry(d).or_default() += 1;
        }
    }

    /// Counts a VM placed elsewhere in this pass (e.g. a migration's target) as if the planner
    /// had placed it.
    pub fn reserve(&mut self, host: &HostId, need: Resources, group: Option<&str>) {
        let Some(&i) = self.index.get(host) else { return };
        self.reserve_at(i, need, group);
    }

    fn reserve_at(&mut self, i: usize, need: Resources, group: Option<&str>) {
        let r = self.reserved.entry(i).or_default();
        r.0 = r.0.checked_add(need).unwrap_or(r.0);
        r.1 += 1;
        if let Some(g) = group {
            self.count_group(g, i);
        }
    }

    /// Free resources on host `i` as the planner sees them: capacity × overcommit, less what
    /// is allocated and what this planner reserved, plus the request's credit.
    fn free(&self, i: usize, req: &PlacementRequest, credit_here: bool) -> Resources {
        let (host, facts) = &self.hosts[i];
        let mut free = facts.capacity.saturating_sub(host.allocated);
        if credit_here && let Some((_, own)) = &req.credit {
            free = free.checked_add(*own).unwrap_or(free).min_with(facts.capacity);
        }
        let taken = self.reserved.get(&i).map_or(Resources::ZERO, |r| r.0);
        free.saturating_sub(taken)
    }

    /// Places one VM. On success the host is reserved for the rest of this planner's pass.
    pub fn place(&mut self, req: &PlacementRequest) -> Placement {
        let w = self.cfg.weights;
        let top = self.cfg.explain_top.max(1);
        let credit_at = req.credit.as_ref().and_then(|(h, _)| self.index.get(h)).copied();
        let avoid: Vec<usize> = req.avoid.iter().filter_map(|h| self.index.get(h).copied()).collect();
        let group_hosts = req.group.as_ref().and_then(|g| self.groups.get(g));
        let group_domains = req.group.as_ref().and_then(|g| self.domains.get(g));
        let group_total = f64::from(group_hosts.map_or(0, |m| m.values().sum::<u32>()));
        let mut counts = [0u32; 6];
        let names = [
            filters::HOST_STATE,
            filters::AVOIDED,
            filters::REQUIRED_LABELS,
            filters::MAX_VMS,
            filters::ANTI_AFFINITY,
            filters::CAPACITY,
        ];
        let mut best: Vec<(f64, usize, Parts)> = Vec::with_capacity(top + 1);
        let n = self.hosts.len();
        // Small clusters: every host, in id order (ties go to the lowest id). Large ones: from the
        // cursor, until enough feasible hosts have been scored.
        let limit = self.cfg.max_candidates.filter(|m| n > *m);
        let start = if limit.is_some() { self.cursor % n.max(1) } else { 0 };
        let mut feasible = 0usize;
        let mut examined = 0usize;
        for k in 0..n {
            if limit.is_some_and(|m| feasible >= m) {
                break;
            }
            let i = (start + k) % n;
            let (host, facts) = &self.hosts[i];
            examined += 1;
            let credit_here = credit_at == Some(i);
            if !host.schedulable() {
                counts[0] += 1;
                continue;
            }
            if avoid.contains(&i) {
                counts[1] += 1;
                continue;
            }
            if req.require_labels.iter().any(|(k, v)| host.labels.get(k) != Some(v)) {
                counts[2] += 1;
                continue;
            }
            if let Some(max) = self.cfg.max_vms_per_host {
                let own = u32::try_from(host.vms.len() + host.incoming.len()).unwrap_or(u32::MAX);
                let here = own + self.reserved.get(&i).map_or(0, |r| r.1);
                if here.saturating_sub(u32::from(credit_here)) >= max {
                    counts[3] += 1;
                    continue;
                }
            }
            let group_here =
                group_hosts.and_then(|m| m.get(&i)).copied().unwrap_or(0).saturating_sub(u32::from(credit_here));
            if req.anti_affinity == AntiAffinity::Hard && group_here > 0 {
                counts[4] += 1;
                continue;
            }
            let free = self.free(i, req, credit_here);
            if !req.need.fits_within(free) {
                counts[5] += 1;
                continue;
            }
            // How full the host is after placing, averaged over vCPUs and memory.
            let cap = facts.capacity;
            let used = |free: u64, need: u64, cap: u64| 1.0 - free.saturating_sub(need) as f64 / cap.max(1) as f64;
            let fullness = (used(u64::from(free.vcpus), u64::from(req.need.vcpus), u64::from(cap.vcpus))
                + used(free.memory_mib, req.need.memory_mib, cap.memory_mib))
                / 2.0;
            let parts = Parts {
                fit: match self.cfg.strategy {
                    Strategy::BinPack => fullness,
                    Strategy::Spread => 1.0 - fullness,
                },
                domain_spread: match (req.group.is_some(), facts.domain) {
                    (true, Some(d)) => {
                        let in_domain = f64::from(group_domains.and_then(|m| m.get(&d)).copied().unwrap_or(0));
                        Some(-in_domain / (group_total + 1.0))
                    }
                    _ => None,
                },
                anti_affinity: (req.anti_affinity == AntiAffinity::Soft && req.group.is_some()).then(|| {
                    let here = f64::from(group_here);
                    -here / (here + 1.0)
                }),
                load: facts.load.map(|u| -u.clamp(0.0, 1.0)),
            };
            feasible += 1;
            let score = parts.total(w);
            // Keep the best `top`, best first; hosts come in id order, so on equal scores the
            // lower id stays ahead.
            if best.len() < top || score > best[best.len() - 1].0 {
                let at = best.iter().position(|c| score > c.0).unwrap_or(best.len());
                best.insert(at, (score, i, parts));
                best.truncate(top);
            }
        }
        let considered = u32::try_from(examined).unwrap_or(u32::MAX);
        let rejections: BTreeMap<String, u32> =
            names.iter().zip(counts).filter(|(_, n)| *n > 0).map(|(f, n)| ((*f).to_owned(), n)).collect();
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
        match best.first().map(|(_, i, _)| *i) {
            Some(i) => {
                explanation.candidates = best
                    .iter()
                    .map(|(score, j, parts)| Candidate {
                        host: self.hosts[*j].0.id.clone(),
                        score: *score,
                        components: parts.map(),
                    })
                    .collect();
                let host = self.hosts[i].0.id.clone();
                self.cursor = i;
                self.reserve_at(i, req.need, req.group.as_deref());
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
