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
//!   anti_affinity     hard anti-affinity: runs another VM of the group, or a VM the request's
//!                     rules select is in its domain, or it is in the domain of a VM whose own
//!                     hard anti-affinity selects this one
//!   affinity          hard affinity: the group, or VMs the rules select, run elsewhere but not
//!                     in this host's domain
//!   capacity          lacks vCPUs, memory or disk (capacity × the host's overcommit ratios)
//! scores (weighted sum; the best total wins, ties go to the lowest host id):
//!   fit               bin-pack: how full the host is after placing; spread: how empty (the
//!                     VM's own strategy, else its group's, else the cluster's)
//!   domain_spread     fewer VMs of the group in the host's failure domain (label, e.g. zone)
//!   anti_affinity     soft anti-affinity: fewer of the avoided VMs in the domain
//!   affinity          soft affinity: more of the sought VMs in the domain
//!   preferred_labels  the share of the preferred host labels the host carries
//!   load              lower observed CPU utilisation (telemetry)
//!   failure_risk      lower probability that the host fails soon (the failure-risk model's
//!                     score of its failure history; absent without a model)
//! ```
//!
//! Affinity rules name their VMs by group ([`PlacementRules::group_affinity`],
//! [`PlacementRules::group_anti_affinity`]) or by labels ([`VmAffinity`], per host or per
//! failure domain). A VM being moved or restarted never counts against itself.
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

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use novacron_state::{ClusterState, HostRecord, VmRecord, VmStatus};
pub use novacron_types::Strategy;
use novacron_types::event::{Candidate, PlacementExplanation};
use novacron_types::{HostId, Labels, PlacementRules, Relation, Resources, Strength, VmAffinity, VmId, VmSpec};

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
    /// Hard anti-affinity: the host's domain holds a VM to keep away from (or one that keeps
    /// this VM away).
    pub const ANTI_AFFINITY: &str = "anti_affinity";
    /// Hard affinity: the VMs to be near run elsewhere.
    pub const AFFINITY: &str = "affinity";
    /// The host lacks free vCPUs, memory or disk.
    pub const CAPACITY: &str = "capacity";
}

pub use novacron_state::{LABEL_CPU_OVERCOMMIT, LABEL_MEMORY_OVERCOMMIT};

/// Weights of the score components.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Weights {
    /// Of `fit`.
    pub fit: f64,
    /// Of `domain_spread`.
    pub domain_spread: f64,
    /// Of soft `anti_affinity`.
    pub anti_affinity: f64,
    /// Of soft `affinity`.
    pub affinity: f64,
    /// Of `preferred_labels`.
    pub preferred_labels: f64,
    /// Of `load`.
    pub load: f64,
    /// Of `failure_risk`.
    pub failure_risk: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            fit: 1.0,
            domain_spread: 0.5,
            anti_affinity: 1.0,
            affinity: 1.0,
            preferred_labels: 1.0,
            load: 0.5,
            failure_risk: 2.0,
        }
    }
}

/// The cluster's placement settings.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannerConfig {
    /// Bin-pack or spread.
    pub strategy: Strategy,
    /// Per group: bin-pack or spread, overriding `strategy` (a VM's own setting overrides this).
    pub group_strategy: BTreeMap<String, Strategy>,
    /// vCPUs sold per physical vCPU (a host's `overcommit.cpu` label overrides it).
    pub cpu_overcommit: f64,
    /// MiB sold per MiB (a host's `overcommit.memory` label overrides it).
    pub memory_overcommit: f64,
    /// Most VMs on one host, if limited.
    pub max_vms_per_host: Option<u32>,
    /// Held back on every host (after overcommit), never given to VMs.
    pub reserved: Resources,
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
            group_strategy: BTreeMap::new(),
            cpu_overcommit: 1.0,
            memory_overcommit: 1.0,
            max_vms_per_host: None,
            reserved: Resources::ZERO,
            failure_domain_label: Some("zone".into()),
            weights: Weights::default(),
            explain_top: 3,
            max_candidates: Some(64),
        }
    }
}

/// What the planner reads besides the state: observed load per host (telemetry) and how recent
/// it is, and each host's failure risk.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadView {
    /// CPU utilisation 0.0–1.0 per host.
    pub cpu_util: BTreeMap<HostId, f64>,
    /// The newest sample's time, ms since the epoch.
    pub watermark_ms: Option<u64>,
    /// The probability that each host fails within the risk model's window, from its failure
    /// history (empty without a model).
    pub failure_risk: BTreeMap<HostId, f64>,
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
    /// The VM's group, for (anti-)affinity and domain spread.
    pub group: Option<String>,
    /// The VM's own labels (other VMs' rules select it by them).
    pub labels: Labels,
    /// Labels a host must carry.
    pub require_labels: Labels,
    /// Group anti-affinity.
    pub anti_affinity: Strength,
    /// Group affinity.
    pub group_affinity: Strength,
    /// Affinity and anti-affinity to VMs selected by labels.
    pub vm_affinity: Vec<VmAffinity>,
    /// Affinity and anti-affinity to the other VMs of the request's group, per domain.
    pub group_rules: Vec<GroupRule>,
    /// Host labels preferred (a score, not a filter).
    pub prefer_labels: Labels,
    /// The VM's own bin-pack/spread setting.
    pub strategy: Option<Strategy>,
    /// The VM, when it already exists (its own rules never count against it).
    pub vm: Option<VmId>,
    /// Where the VM already counts (it is being moved or restarted): it is not counted there.
    pub self_at: Option<HostId>,
}

impl PlacementRequest {
    /// The request for a new VM of this spec.
    #[must_use]
    pub fn for_spec(spec: &VmSpec) -> PlacementRequest {
        let PlacementRules { require_labels, group_anti_affinity, group_affinity, vm_affinity, strategy } =
            &spec.placement;
        PlacementRequest {
            need: spec.resources(),
            group: spec.group.clone(),
            labels: spec.labels.clone(),
            require_labels: require_labels.clone(),
            anti_affinity: *group_anti_affinity,
            group_affinity: *group_affinity,
            vm_affinity: vm_affinity.clone(),
            strategy: *strategy,
            ..PlacementRequest::default()
        }
    }

    /// The request to place an existing VM again (restart, move, migration): as for its spec,
    /// and it does not count against itself where it is now.
    #[must_use]
    pub fn for_vm(vm: &VmRecord) -> PlacementRequest {
        PlacementRequest {
            vm: Some(vm.id),
            self_at: vm.host.clone().filter(|_| vm.status != VmStatus::Deleted),
            ..PlacementRequest::for_spec(&vm.spec)
        }
    }

    /// Whether this request can only fail where `other` failed: the same rules, no less of
    /// any resource, and neither counts on a host already. A planner only takes capacity as
    /// it places, so within one pass a request no easier than one that found no host finds
    /// none either — with the cluster full, a reconcile pass need not plan each of thousands
    /// of pending VMs over every host to learn that.
    #[must_use]
    pub fn no_easier_than(&self, other: &PlacementRequest) -> bool {
        // Every field but `need` and `vm` is a rule: named here, so a new field must be sorted.
        let PlacementRequest {
            need,
            avoid,
            credit,
            group,
            labels,
            require_labels,
            anti_affinity,
            group_affinity,
            vm_affinity,
            group_rules,
            prefer_labels,
            strategy,
            vm: _,
            self_at,
        } = self;
        credit.is_none()
            && self_at.is_none()
            && other.credit.is_none()
            && other.self_at.is_none()
            && other.need.fits_within(*need)
            && *avoid == other.avoid
            && *group == other.group
            && *labels == other.labels
            && *require_labels == other.require_labels
            && *anti_affinity == other.anti_affinity
            && *group_affinity == other.group_affinity
            && *vm_affinity == other.vm_affinity
            && *group_rules == other.group_rules
            && *prefer_labels == other.prefer_labels
            && *strategy == other.strategy
    }
}

/// An affinity or anti-affinity rule between a VM and the rest of its group, per host or per
/// failure domain (policies write these; a VM spec's own group rules are per host).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupRule {
    /// Towards the group or away from it.
    pub relation: Relation,
    /// Hard or soft.
    pub strength: Strength,
    /// The host label whose values are the domains; `None`: the host.
    pub topology: Option<String>,
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

/// Facts about one host beyond its record, worked out for each host a decision examines (with
/// `max_candidates`, a few dozen) rather than for every host when the planner is built: at
/// 10,000 hosts that walk was most of what a single create cost.
#[derive(Clone, Copy)]
struct HostFacts {
    /// Capacity × overcommit.
    capacity: Resources,
    /// Observed CPU load, if known.
    load: Option<f64>,
    /// Probability of failing soon, if scored.
    risk: Option<f64>,
}

/// The score components of one candidate (kept as numbers while scanning; turned into the
/// explanation's map only for the best few).
#[derive(Clone, Copy)]
struct Parts {
    fit: f64,
    domain_spread: Option<f64>,
    anti_affinity: Option<f64>,
    affinity: Option<f64>,
    preferred_labels: Option<f64>,
    load: Option<f64>,
    failure_risk: Option<f64>,
}

impl Parts {
    fn total(&self, w: Weights) -> f64 {
        w.fit * self.fit
            + w.domain_spread * self.domain_spread.unwrap_or(0.0)
            + w.anti_affinity * self.anti_affinity.unwrap_or(0.0)
            + w.affinity * self.affinity.unwrap_or(0.0)
            + w.preferred_labels * self.preferred_labels.unwrap_or(0.0)
            + w.load * self.load.unwrap_or(0.0)
            + w.failure_risk * self.failure_risk.unwrap_or(0.0)
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
        if let Some(v) = self.affinity {
            m.insert("affinity".to_owned(), v);
        }
        if let Some(v) = self.preferred_labels {
            m.insert("preferred_labels".to_owned(), v);
        }
        if let Some(v) = self.load {
            m.insert("load".to_owned(), v);
        }
        if let Some(v) = self.failure_risk {
            m.insert("failure_risk".to_owned(), v);
        }
        m
    }
}

/// Places VMs one request at a time, remembering what it placed.
pub struct Planner<'a> {
    state: &'a ClusterState,
    cfg: &'a PlannerConfig,
    load: &'a LoadView,
    /// Whether `groups` and `domains` hold the state's VMs yet: counted on the first request
    /// that needs them, so that passes without groups never walk every VM.
    groups_counted: bool,
    /// Per group: VMs of the group per host (the state's, plus this planner's own).
    groups: BTreeMap<String, HashMap<At<'a>, u32>>,
    /// Per group: VMs of the group per failure domain.
    domains: BTreeMap<String, BTreeMap<&'a str, u32>>,
    /// Per label selector asked about: how many selected VMs run on each host,
    /// the state's plus this planner's own. Filled on first use.
    selected: BTreeMap<Labels, HashMap<At<'a>, u32>>,
    /// The VMs (the state's and this planner's) with hard anti-affinity rules, which keep the
    /// VMs they select out of their domain: (VM, host, rule).
    repellers: Vec<(Option<VmId>, At<'a>, VmAffinity)>,
    /// The labels of the VMs this planner placed, by host (to update `selected`).
    placed_labels: Vec<(At<'a>, Labels)>,
    /// What this planner's decisions took on each host: resources, VM count.
    reserved: HashMap<At<'a>, (Resources, u32)>,
    /// Where the next limited scan starts: the previous winner.
    cursor: Option<At<'a>>,
}

/// A host of the planner's state: what the planner's own counts and reservations are keyed
/// by. Compared, ordered and hashed by the record's address (a planner borrows the state, so
/// records stay put): an integer where the host id would cost string comparisons at every
/// lookup. That order differs from run to run: maps keyed by `At` serve lookups and integer
/// sums only, and must never be iterated into a decision or its explanation (which follow
/// host ids, as the scan does).
#[derive(Clone, Copy, Debug)]
struct At<'a>(&'a HostRecord);

impl At<'_> {
    fn addr(self) -> usize {
        std::ptr::from_ref(self.0) as usize
    }
}

impl PartialEq for At<'_> {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self.0, other.0)
    }
}

impl Eq for At<'_> {}

impl std::hash::Hash for At<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.addr().hash(state);
    }
}

impl PartialOrd for At<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for At<'_> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.addr().cmp(&other.addr())
    }
}

/// A failure domain: the value of a topology label, or a host lacking it (or no topology).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Domain<'a> {
    Label(&'a str),
    Host(At<'a>),
}

/// One of a request's affinity rules, resolved against the current placements.
struct Rule<'a> {
    relation: Relation,
    strength: Strength,
    topology: Option<&'a str>,
    /// Selected VMs per domain, not counting the VM being placed.
    per_domain: BTreeMap<Domain<'a>, u32>,
    /// Selected VMs anywhere, not counting the VM being placed.
    total: u32,
}

/// What a host offers the planners: its capacity × the overcommit ratios (the cluster's, or
/// the host's `overcommit.*` labels).
#[must_use]
pub fn effective_capacity(h: &HostRecord, cfg: &PlannerConfig) -> Resources {
    // The host's own ratios were read from its labels when the state folded them in.
    let cpu_r = h.overcommit.cpu.unwrap_or(cfg.cpu_overcommit);
    let mem_r = h.overcommit.memory.unwrap_or(cfg.memory_overcommit);
    Resources {
        vcpus: u32::try_from(scaled(u64::from(h.capacity.vcpus), cpu_r)).unwrap_or(u32::MAX),
        memory_mib: scaled(h.capacity.memory_mib, mem_r),
        disk_gib: h.capacity.disk_gib,
    }
    .saturating_sub(cfg.reserved)
}

fn scaled(v: u64, r: f64) -> u64 {
    // Capacity × ratio, rounded down; exact for the ratio 1.0.
    if (r - 1.0).abs() < f64::EPSILON { v } else { (v as f64 * r).floor() as u64 }
}

impl<'a> Planner<'a> {
    /// A planner over `state`.
    #[must_use]
    pub fn new(state: &'a ClusterState, cfg: &'a PlannerConfig, load: &'a LoadView) -> Planner<'a> {
        let mut planner = Planner {
            state,
            cfg,
            load,
            groups_counted: false,
            groups: BTreeMap::new(),
            domains: BTreeMap::new(),
            selected: BTreeMap::new(),
            repellers: Vec::new(),
            placed_labels: Vec::new(),
            reserved: HashMap::new(),
            cursor: None,
        };
        for vm in state.hard_anti_affinity.iter().filter_map(|id| state.vms.get(id)) {
            if vm.status == VmStatus::Deleted || !vm.spec.placement.vm_affinity.iter().any(VmAffinity::is_hard_anti) {
                continue;
            }
            let Some(i) = vm.host.as_ref().and_then(|h| planner.at(h)) else { continue };
            for rule in vm.spec.placement.vm_affinity.iter().filter(|r| r.is_hard_anti()) {
                planner.repellers.push((Some(vm.id), i, rule.clone()));
            }
        }
        planner
    }

    /// A host of the state.
    fn at(&self, id: &HostId) -> Option<At<'a>> {
        self.state.hosts.get(id).map(At)
    }

    /// Host `i`'s failure domain: the value of the cluster's topology label, if it has one.
    fn failure_domain(&self, i: At<'a>) -> Option<&'a str> {
        let cfg: &'a PlannerConfig = self.cfg;
        cfg.failure_domain_label.as_ref().and_then(|l| i.0.labels.get(l)).map(String::as_str)
    }

    /// Host `i`'s facts (see [`HostFacts`]).
    fn facts(&self, i: At<'a>) -> HostFacts {
        let h = i.0;
        HostFacts {
            capacity: effective_capacity(h, self.cfg),
            load: self.load.cpu_util.get(&h.id).copied(),
            risk: self.load.failure_risk.get(&h.id).copied(),
        }
    }

    /// Counts the state's VMs per group (once per planner, when first needed).
    fn count_groups(&mut self) {
        if std::mem::replace(&mut self.groups_counted, true) {
            return;
        }
        let state = self.state;
        for vm in state.vms.values() {
            let Some(group) = &vm.spec.group else { continue };
            if vm.status == VmStatus::Deleted {
                continue;
            }
            if let Some(i) = vm.host.as_ref().and_then(|h| self.at(h)) {
                self.count_group(group, i);
            }
        }
    }

    /// The domain of host `i` under a topology label.
    fn domain(&self, i: At<'a>, topology: Option<&str>) -> Domain<'a> {
        let host = i.0;
        match topology.and_then(|t| host.labels.get(t)) {
            Some(v) => Domain::Label(v.as_str()),
            None => Domain::Host(i),
        }
    }

    /// How many VMs carrying `selector` run on each host.
    fn selected_counts(&mut self, selector: &Labels) -> &HashMap<At<'a>, u32> {
        if !self.selected.contains_key(selector) {
            let rule = VmAffinity {
                selector: selector.clone(),
                relation: Relation::Affinity,
                strength: Strength::Soft,
                topology: None,
            };
            let mut counts: HashMap<At<'a>, u32> = HashMap::new();
            for vm in self.state.vms.values() {
                if vm.status == VmStatus::Deleted || !rule.selects(&vm.spec.labels) {
                    continue;
                }
                if let Some(i) = vm.host.as_ref().and_then(|h| self.at(h)) {
                    *counts.entry(i).or_default() += 1;
                }
            }
            for (i, labels) in &self.placed_labels {
                if rule.selects(labels) {
                    *counts.entry(*i).or_default() += 1;
                }
            }
            self.selected.insert(selector.clone(), counts);
        }
        &self.selected[selector]
    }

    /// The request's label rules with the selected VMs counted per domain.
    fn resolve_rules<'r>(&mut self, req: &'r PlacementRequest, self_idx: Option<At<'a>>) -> Vec<Rule<'r>>
    where
        'a: 'r,
    {
        let mut rules = Vec::with_capacity(req.vm_affinity.len());
        for r in &req.vm_affinity {
            if r.strength.is_none() {
                continue;
            }
            let topology = r.topology.as_deref();
            let counts: Vec<(At<'a>, u32)> = self.selected_counts(&r.selector).iter().map(|(i, n)| (*i, *n)).collect();
            let mut per_domain: BTreeMap<Domain<'r>, u32> = BTreeMap::new();
            let mut total = 0u32;
            for (i, n) in counts {
                *per_domain.entry(self.domain(i, topology)).or_default() += n;
                total += n;
            }
            if let Some(s) = self_idx
                && r.selects(&req.labels)
                && let Some(n) = per_domain.get_mut(&self.domain(s, topology))
                && *n > 0
            {
                *n -= 1;
                total -= 1;
            }
            rules.push(Rule { relation: r.relation, strength: r.strength, topology, per_domain, total });
        }
        if req.group.is_some() {
            self.count_groups();
        }
        let members = req.group.as_ref().and_then(|g| self.groups.get(g));
        for r in req.group_rules.iter().filter(|r| !r.strength.is_none()) {
            let topology = r.topology.as_deref();
            let mut per_domain: BTreeMap<Domain<'r>, u32> = BTreeMap::new();
            let mut total = 0u32;
            for (i, n) in members.into_iter().flatten() {
                *per_domain.entry(self.domain(*i, topology)).or_default() += n;
                total += n;
            }
            if let Some(s) = self_idx
                && members.is_some_and(|m| m.contains_key(&s))
                && let Some(n) = per_domain.get_mut(&self.domain(s, topology))
                && *n > 0
            {
                *n -= 1;
                total -= 1;
            }
            rules.push(Rule { relation: r.relation, strength: r.strength, topology, per_domain, total });
        }
        rules
    }

    fn count_group(&mut self, group: &str, i: At<'a>) {
        *self.groups.entry(group.to_owned()).or_default().entry(i).or_default() += 1;
        if let Some(d) = self.failure_domain(i) {
            *self.domains.entry(group.to_owned()).or_default().entry(d).or_default() += 1;
        }
    }

    /// Counts a VM placed elsewhere in this pass (e.g. a migration's target) as if the planner
    /// had placed it.
    pub fn reserve(&mut self, host: &HostId, req: &PlacementRequest) {
        let Some(i) = self.at(host) else { return };
        self.reserve_at(i, req);
    }

    fn reserve_at(&mut self, i: At<'a>, req: &PlacementRequest) {
        let r = self.reserved.entry(i).or_default();
        r.0 = r.0.checked_add(req.need).unwrap_or(r.0);
        r.1 += 1;
        if let Some(g) = &req.group {
            self.count_groups();
            self.count_group(g, i);
        }
        for (selector, counts) in &mut self.selected {
            if selector.iter().all(|(k, v)| req.labels.get(k) == Some(v)) {
                *counts.entry(i).or_default() += 1;
            }
        }
        if !req.labels.is_empty() {
            self.placed_labels.push((i, req.labels.clone()));
        }
        for rule in req.vm_affinity.iter().filter(|r| r.is_hard_anti()) {
            self.repellers.push((req.vm, i, rule.clone()));
        }
    }

    /// Free resources on host `i` as the planner sees them: capacity × overcommit, less what
    /// is allocated and what this planner reserved, plus the request's credit.
    fn free(&self, i: At<'a>, facts: &HostFacts, req: &PlacementRequest, credit_here: bool) -> Resources {
        let host = i.0;
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
        let strategy = req
            .strategy
            .or_else(|| req.group.as_ref().and_then(|g| self.cfg.group_strategy.get(g)).copied())
            .unwrap_or(self.cfg.strategy);
        let credit_at = req.credit.as_ref().and_then(|(h, _)| self.at(h));
        // Where the VM already counts (moved, restarted): not against itself.
        let self_idx = req.self_at.as_ref().and_then(|h| self.at(h)).or(credit_at);
        // A set: a restart in place avoids every other host.
        let avoid: std::collections::BTreeSet<&HostId> = req.avoid.iter().collect();
        let rules = self.resolve_rules(req, self_idx);
        // Domains other VMs' hard anti-affinity keeps this one out of.
        let repelled: Vec<(Option<&str>, Domain<'_>)> = self
            .repellers
            .iter()
            .filter(|(vm, _, rule)| (vm.is_none() || *vm != req.vm) && rule.selects(&req.labels))
            .map(|(_, i, rule)| (rule.topology.as_deref(), self.domain(*i, rule.topology.as_deref())))
            .collect();
        let group_hosts = req.group.as_ref().and_then(|g| self.groups.get(g));
        let group_domains = req.group.as_ref().and_then(|g| self.domains.get(g));
        let group_total = f64::from(group_hosts.map_or(0, |m| m.values().sum::<u32>()));
        let group_self =
            u32::from(req.group.is_some() && self_idx.is_some_and(|s| group_hosts.is_some_and(|m| m.contains_key(&s))));
        let group_others = group_hosts.map_or(0, |m| m.values().sum::<u32>()).saturating_sub(group_self);
        let mut counts = [0u32; 7];
        let names = [
            filters::HOST_STATE,
            filters::AVOIDED,
            filters::REQUIRED_LABELS,
            filters::MAX_VMS,
            filters::ANTI_AFFINITY,
            filters::AFFINITY,
            filters::CAPACITY,
        ];
        let mut best: Vec<(f64, At<'a>, Parts)> = Vec::with_capacity(top + 1);
        let state = self.state;
        let n = state.hosts.len();
        // Small clusters: every host, in id order (ties go to the lowest id). Large ones: from the
        // cursor (then round to the hosts before it), until enough feasible hosts were scored.
        let limit = self.cfg.max_candidates.filter(|m| n > *m);
        let from = limit.and(self.cursor).map(|c| &c.0.id);
        let head = state.hosts.range::<HostId, _>((from.map_or(Bound::Unbounded, Bound::Included), Bound::Unbounded));
        let wrap = from.map(|c| state.hosts.range::<HostId, _>((Bound::Unbounded, Bound::Excluded(c))));
        let mut feasible = 0usize;
        let mut examined = 0usize;
        for (_, host) in head.chain(wrap.into_iter().flatten()) {
            if limit.is_some_and(|m| feasible >= m) {
                break;
            }
            let i = At(host);
            examined += 1;
            let credit_here = credit_at == Some(i);
            if !host.schedulable() {
                counts[0] += 1;
                continue;
            }
            if avoid.contains(&host.id) {
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
            let group_here = group_hosts
                .and_then(|m| m.get(&i))
                .copied()
                .unwrap_or(0)
                .saturating_sub(u32::from(self_idx == Some(i)));
            // Selected VMs in this host's domain, per rule.
            let near: Vec<u32> =
                rules.iter().map(|r| r.per_domain.get(&self.domain(i, r.topology)).copied().unwrap_or(0)).collect();
            let hard = |r: &Rule<'_>, rel| r.strength == Strength::Hard && r.relation == rel;
            if (req.anti_affinity == Strength::Hard && group_here > 0)
                || rules.iter().zip(&near).any(|(r, n)| hard(r, Relation::AntiAffinity) && *n > 0)
                || repelled.iter().any(|(t, d)| self.domain(i, *t) == *d)
            {
                counts[4] += 1;
                continue;
            }
            if (req.group_affinity == Strength::Hard && group_others > 0 && group_here == 0)
                || rules.iter().zip(&near).any(|(r, n)| hard(r, Relation::Affinity) && r.total > 0 && *n == 0)
            {
                counts[5] += 1;
                continue;
            }
            let facts = self.facts(i);
            let free = self.free(i, &facts, req, credit_here);
            if !req.need.fits_within(free) {
                counts[6] += 1;
                continue;
            }
            // How full the host is after placing, averaged over vCPUs and memory.
            let cap = facts.capacity;
            let used = |free: u64, need: u64, cap: u64| 1.0 - free.saturating_sub(need) as f64 / cap.max(1) as f64;
            let fullness = (used(u64::from(free.vcpus), u64::from(req.need.vcpus), u64::from(cap.vcpus))
                + used(free.memory_mib, req.need.memory_mib, cap.memory_mib))
                / 2.0;
            // Soft rules: each contributes n/(n+1) of the selected VMs in the domain, towards or
            // away from them.
            let saturate = |n: u32| f64::from(n) / (f64::from(n) + 1.0);
            let grouped = req.group.is_some();
            let mut anti = (req.anti_affinity == Strength::Soft && grouped).then(|| -saturate(group_here));
            let mut attract = (req.group_affinity == Strength::Soft && grouped).then(|| saturate(group_here));
            for (r, n) in rules.iter().zip(&near).filter(|(r, _)| r.strength == Strength::Soft) {
                match r.relation {
                    Relation::AntiAffinity => *anti.get_or_insert(0.0) -= saturate(*n),
                    Relation::Affinity => *attract.get_or_insert(0.0) += saturate(*n),
                }
            }
            let parts = Parts {
                fit: match strategy {
                    Strategy::BinPack => fullness,
                    Strategy::Spread => 1.0 - fullness,
                },
                domain_spread: grouped.then(|| self.failure_domain(i)).flatten().map(|d| {
                    let in_domain = f64::from(group_domains.and_then(|m| m.get(d)).copied().unwrap_or(0));
                    -in_domain / (group_total + 1.0)
                }),
                anti_affinity: anti,
                affinity: attract,
                preferred_labels: (!req.prefer_labels.is_empty()).then(|| {
                    let have = req.prefer_labels.iter().filter(|(k, v)| host.labels.get(*k) == Some(*v)).count();
                    have as f64 / req.prefer_labels.len() as f64
                }),
                load: facts.load.map(|u| -u.clamp(0.0, 1.0)),
                failure_risk: facts.risk.map(|p| -p.clamp(0.0, 1.0)),
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
            planner: format!("filter-score/{}", strategy.as_str()),
            log_seq: self.state.seq,
            hosts_considered: considered,
            rejections,
            candidates: Vec::new(),
            trigger: None,
            telemetry_watermark_ms: self.load.watermark_ms,
            policy_version: None,
        };
        match best.first().map(|(_, i, _)| *i) {
            Some(i) => {
                explanation.candidates = best
                    .iter()
                    .map(|(score, j, parts)| Candidate { host: j.0.id.clone(), score: *score, components: parts.map() })
                    .collect();
                let host = i.0.id.clone();
                self.cursor = Some(i);
                self.reserve_at(i, req);
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
        planner.reserve(h, &PlacementRequest { need: *r, ..PlacementRequest::default() });
    }
    planner.place(req)
}

#[cfg(test)]
mod tests;
