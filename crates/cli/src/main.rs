//! `novacron`: the one binary operators, agents and CI use.
//!
//! Service commands (`up`, `orchestrator`, `agent`) run long and stop cleanly on Ctrl-C or
//! SIGTERM. Operator commands talk to the HTTP API (`--server`); audit commands (`events`,
//! `state`) read JetStream directly (`--nats`) and need no orchestrator. Every command that
//! prints data takes `-o json` and then prints exactly one JSON document on stdout; errors go to
//! stderr with a non-zero exit code.

mod audit;
mod bench;
mod bench_agent;
mod bench_consolidate;
mod bench_e2e;
mod bench_failover;
mod bench_heal;
mod bench_scaling;
mod client;
mod models;
mod nats_server;
mod output;
mod profile;
mod services;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// NovaCron: an event-sourced orchestrator for virtual machines over NATS JetStream.
#[derive(Parser, Debug)]
#[command(name = "novacron", version, propagate_version = true, max_term_width = 100)]
struct Cli {
    /// HTTP API of the orchestrator (operator commands).
    #[arg(long, global = true, env = "NOVACRON_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// NATS URL(s), comma-separated (services and audit commands).
    #[arg(long, global = true, env = "NOVACRON_NATS", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// API token. Operator commands send it (`Authorization: Bearer`); `orchestrator` and `up`
    /// then refuse `/api/v1` requests without it. Unset: the API is open (keep it on loopback).
    #[arg(long, global = true, env = "NOVACRON_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Output format of commands that print data.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Format::Text)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    /// Human-readable tables.
    Text,
    /// Exactly one JSON document on stdout.
    Json,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum DriverKind {
    /// Simulated hypervisor (many hosts per process).
    Sim,
    /// Real VMs under QEMU (KVM when /dev/kvm is usable, TCG otherwise), driven over QMP.
    Qemu,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// All-in-one on this machine: nats-server, the orchestrator, N simulated hosts and the
    /// dashboard. Ctrl-C stops all of it; a second `up` on the same --data-dir resumes.
    Up(UpArgs),
    /// Run an orchestrator against an existing NATS server.
    Orchestrator(OrchestratorArgs),
    /// Run a host agent (or, with --count, many simulated hosts in one process).
    Agent(AgentArgs),
    /// Create, list, show and delete VMs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// List and show hosts.
    #[command(subcommand)]
    Host(HostCommand),
    /// VM groups: a set of like VMs kept within bounds and scaled to a CPU target.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Policies: validate documents, apply them, list, show, remove (docs/policies.md).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Print events straight from the log (JetStream), optionally following new ones.
    Events(audit::EventsArgs),
    /// Replay the log straight from JetStream to a point and print the state's summary and hash.
    State(audit::StateArgs),
    /// Why a decision was made: the inputs the planner read, what each filter eliminated, and
    /// the best candidates with their score components.
    Explain {
        /// The decision's event id (VmPlaced, VmPlacementFailed, VmMigrationPlanned), as
        /// `novacron events` or `GET /api/v1/decisions` show it.
        event_id: String,
    },
    /// Forecasting models: evaluate them on real traces against the naive baselines.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Sample data: synthetic telemetry with seasonality, trend, bursts, noise, outliers,
    /// gaps and failures.
    #[command(subcommand)]
    Data(DataCommand),
    /// Offline plans over the state replayed from the log; they print, they do not execute.
    #[command(subcommand)]
    Plan(PlanCommand),
    /// Benchmarks: fold, append (against raw JetStream publish) and replay.
    Bench(bench::BenchArgs),
    /// Started by `agent --driver qemu`, not by hand: fences the QEMU VMs under --dir when the
    /// agent's lease ends and the agent is not there to do it (docs/fencing.md).
    #[command(name = "qemu-fence-keeper", hide = true)]
    QemuFenceKeeper(KeeperArgs),
}

#[derive(Args, Debug)]
struct KeeperArgs {
    /// The agent's QEMU directory (its `lease-deadline` and one directory per VM).
    #[arg(long)]
    dir: PathBuf,
    /// What to do to the VMs when the lease ends: as the agent's --fence-action.
    #[arg(long, value_enum, default_value = "stop")]
    fence_action: FenceArg,
}

impl FenceArg {
    fn action(self) -> novacron_agent::FenceAction {
        match self {
            FenceArg::Stop => novacron_agent::FenceAction::Stop,
            FenceArg::Pause => novacron_agent::FenceAction::Pause,
        }
    }
}

#[derive(Subcommand, Debug)]
enum GroupCommand {
    /// Create a group; the orchestrator brings it to --min members and scales it between
    /// --min and --max to keep the members' mean CPU near --target-cpu.
    Create(GroupCreateArgs),
    /// List groups.
    List,
    /// Show one group.
    Show {
        /// Its name.
        name: String,
    },
    /// Delete a group and all its members.
    Delete {
        /// Its name.
        name: String,
    },
}

#[derive(Args, Debug)]
struct GroupCreateArgs {
    /// Name (members are NAME-1, NAME-2, …).
    name: String,
    /// Fewest members.
    #[arg(long)]
    min: u32,
    /// Most members.
    #[arg(long)]
    max: u32,
    /// vCPUs of each member.
    #[arg(long)]
    vcpus: u32,
    /// Memory of each member, MiB.
    #[arg(long)]
    memory_mib: u64,
    /// Disk of each member, GiB.
    #[arg(long, default_value_t = 0)]
    disk_gib: u64,
    /// Target mean CPU utilisation of the members, 0–1.
    #[arg(long, default_value_t = 0.6)]
    target_cpu: f64,
    /// reactive (target tracking), predictive (also scale up ahead of the forecast; never in),
    /// or forecast-only (record what the forecast recommends, act reactively).
    #[arg(long, value_enum, default_value_t = ModeArg::Reactive)]
    mode: ModeArg,
    /// Least time between two scale-ups.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    scale_up_cooldown: std::time::Duration,
    /// Least time between two scale-downs (also counted from the last scale-up).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    scale_down_cooldown: std::time::Duration,
    /// A scale-down goes no lower than the highest size recommended within this window.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    stabilization: std::time::Duration,
    /// A minimum size during a time window (UTC), repeatable: [DAYS@]HH:MM-HH:MM=MIN, e.g.
    /// mon,tue,wed,thu,fri@08:00-18:00=6 or 22:00-02:00=2.
    #[arg(long = "schedule", value_parser = parse_schedule)]
    schedules: Vec<novacron_types::group::ScheduledSize>,
    /// Member label, repeatable.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Keep members off hosts running other members: hard or soft.
    #[arg(long, value_enum)]
    anti_affinity: Option<AntiAffinityArg>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    /// Target tracking.
    Reactive,
    /// Target tracking, and scale-ups ahead of the forecast.
    Predictive,
    /// Target tracking; forecasts recorded, not acted on.
    ForecastOnly,
}

fn parse_schedule(s: &str) -> Result<novacron_types::group::ScheduledSize, String> {
    let err = || format!("schedule {s:?} must look like [mon,tue@]HH:MM-HH:MM=MIN");
    let (when, min) = s.rsplit_once('=').ok_or_else(err)?;
    let min: u32 = min.parse().map_err(|_| err())?;
    let (days, times) = match when.split_once('@') {
        Some((d, t)) => (d, t),
        None => ("", when),
    };
    let (start, end) = times.split_once('-').ok_or_else(err)?;
    let days = days
        .split(',')
        .filter(|d| !d.is_empty())
        .map(|d| {
            serde_json::from_value(serde_json::Value::String(d.to_owned()))
                .map_err(|_| format!("{d:?} is not a day (mon … sun)"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(novacron_types::group::ScheduledSize { days, start: start.to_owned(), end: end.to_owned(), min })
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Check policy files (YAML or JSON): parse errors with file:line:column, each document's
    /// values, and conflicts between them; exits non-zero when anything is wrong. With
    /// --against-cluster, also against the policies in force and the cluster (via the API).
    Validate {
        /// Policy files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Also check against the policies in force and the cluster as it is.
        #[arg(long)]
        against_cluster: bool,
    },
    /// Apply policy files: new documents and new versions go into the log (`PolicyApplied`);
    /// conflicting ones are refused with both rules named.
    Apply {
        /// Policy files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// What would change against the policies in force: new, changed (field by field) and
    /// unchanged documents.
    Diff {
        /// Policy files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Evaluate the files as if applied, against the cluster as it is: every VM that would then
    /// break a rule, and what the orchestrator would do (migrate where to, wait for a window,
    /// report). Nothing is applied.
    DryRun {
        /// Policy files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// The policies in force.
    List,
    /// One policy in full.
    Show {
        /// Its name.
        name: String,
    },
    /// Withdraw a policy.
    Remove {
        /// Its name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum ModelsCommand {
    /// Train the global model and score every forecaster on the test part of each series
    /// (rolling origin): MAE, RMSE, MASE, MAPE over actuals ≥ 1 %, 90 % interval coverage,
    /// share within ±10 points, per-series win rates against the baselines, and a paired A/B
    /// test of the per-series selection against the best baseline.
    Evaluate(models::EvaluateArgs),
    /// Train the global model on trace files, score it on their held-out test parts against
    /// the best baseline, store its artifact by digest and register it (not promoted).
    Train(models::TrainArgs),
    /// Registered models, the one in use, and live accuracy per model (the prediction ledger).
    List,
    /// Use a registered model for forecasts from now on.
    Promote {
        /// Model id.
        id: String,
        /// Why (recorded in the log).
        #[arg(long, default_value = "promoted by an operator")]
        reason: String,
    },
    /// Go back to the model in use before the current one.
    Rollback {
        /// Why (recorded in the log).
        #[arg(long, default_value = "rolled back by an operator")]
        reason: String,
    },
    /// Compare two registered models on the same traces: paired t-test of per-series error,
    /// effect size and a promote/keep recommendation.
    Abtest(models::AbTestArgs),
    /// Train and score the failure-risk classifier (which nodes fail within the next days) on
    /// failure records, against ranking baselines: ROC AUC, PR AUC, precision, recall, F1,
    /// Brier score and calibration.
    Risk(models::RiskArgs),
}

#[derive(Subcommand, Debug)]
enum DataCommand {
    /// Generate synthetic 5-minute CPU telemetry (CSV readable by `models evaluate`, or JSON).
    Generate(models::GenerateArgs),
    /// Convert a trace (the shared Azure or PlanetLab files, or a generated one) to the long
    /// layout `series_id,timestamp,value` (epoch seconds).
    Convert(models::ConvertArgs),
}

#[derive(Subcommand, Debug)]
enum PlanCommand {
    /// Pack the running VMs onto as few hosts as the hard constraints allow (capacity ×
    /// overcommit, hard anti-affinity, required labels); print the hosts it empties and the
    /// live migrations it would take.
    Consolidate(audit::ConsolidateArgs),
}

#[derive(Args, Debug)]
struct UpArgs {
    /// Number of simulated hosts.
    #[arg(long, default_value_t = 4)]
    hosts: u32,
    /// Hypervisor driver of the hosts.
    #[arg(long, value_enum, default_value_t = DriverKind::Sim)]
    driver: DriverKind,
    /// Where NATS, snapshots and agent journals keep their data.
    #[arg(long, default_value = ".data")]
    data_dir: PathBuf,
    /// HTTP API and dashboard address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// NATS client port (0 picks a free one).
    #[arg(long, default_value_t = 4222)]
    nats_port: u16,
    /// nats-server binary (default: $NOVACRON_NATS_SERVER, .tools/nats/bin/nats-server, PATH).
    #[arg(long)]
    nats_server: Option<PathBuf>,
    /// A failure-risk model (JSON from `novacron models risk --save`): placement then prefers
    /// hosts unlikely to fail soon, judged from their failure history.
    #[arg(long, value_name = "FILE")]
    risk_model: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct OrchestratorArgs {
    /// HTTP API address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// This replica's name, recorded as the actor of its decisions.
    #[arg(long, default_value = "orchestrator-1")]
    replica_id: String,
    /// Local data (snapshots).
    #[arg(long, default_value = ".data/orchestrator")]
    data_dir: PathBuf,
    /// Stream replicas (1 for a single server, 3 for a cluster).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Heartbeat silence after which a host is suspected (takes no new VMs).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    suspect_after: std::time::Duration,
    /// Heartbeat silence after which a host is failed and its VMs are placed elsewhere.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    host_failure_timeout: std::time::Duration,
    /// The agents' lease (they fence their VMs after it); must end 5 s before the timeout above.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    agent_lease: std::time::Duration,
    /// The leader lease between orchestrator replicas: failover takes up to 4/3 of it. Keep 2 s on
    /// a single NATS server; use ~20 s with an R3 cluster (its elections take up to 9 s).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    leader_lease: std::time::Duration,
    #[command(flatten)]
    placement: PlacementArgs,
    /// A profiles file (YAML; see deploy/profiles.yaml) …
    #[arg(long, requires = "profile")]
    config: Option<PathBuf>,
    /// … and the environment to take from it (dev, staging, prod): forecasting cadence,
    /// retraining triggers, resource limits.
    #[arg(long, requires = "config")]
    profile: Option<String>,
    /// A failure-risk model (JSON from `novacron models risk --save`): placement then prefers
    /// hosts unlikely to fail soon, judged from their failure history.
    #[arg(long, value_name = "FILE")]
    risk_model: Option<PathBuf>,
}

/// The cluster's placement settings.
#[derive(Args, Debug, Clone)]
struct PlacementArgs {
    /// Fill hosts before using new ones (bin-pack) or use the emptiest (spread).
    #[arg(long, value_enum, default_value_t = StrategyArg::BinPack)]
    strategy: StrategyArg,
    /// A group's own strategy, repeatable: --group-strategy batch=spread (a VM's --strategy wins).
    #[arg(long = "group-strategy", value_parser = parse_group_strategy)]
    group_strategy: Vec<(String, novacron_types::Strategy)>,
    /// vCPUs sold per physical vCPU (a host's overcommit.cpu label overrides it).
    #[arg(long, default_value_t = 1.0, value_parser = parse_ratio)]
    cpu_overcommit: f64,
    /// Memory sold per MiB (a host's overcommit.memory label overrides it).
    #[arg(long, default_value_t = 1.0, value_parser = parse_ratio)]
    memory_overcommit: f64,
    /// Most VMs on one host.
    #[arg(long)]
    max_vms_per_host: Option<u32>,
    /// The host label naming failure domains a group is spread across ("" for none).
    #[arg(long, default_value = "zone")]
    failure_domain_label: String,
}

impl PlacementArgs {
    fn config(&self) -> novacron_scheduler::PlannerConfig {
        novacron_scheduler::PlannerConfig {
            strategy: self.strategy.into(),
            group_strategy: self.group_strategy.iter().cloned().collect(),
            cpu_overcommit: self.cpu_overcommit,
            memory_overcommit: self.memory_overcommit,
            max_vms_per_host: self.max_vms_per_host,
            failure_domain_label: Some(self.failure_domain_label.clone()).filter(|l| !l.is_empty()),
            ..novacron_scheduler::PlannerConfig::default()
        }
    }
}

fn parse_group_strategy(s: &str) -> Result<(String, novacron_types::Strategy), String> {
    match s.split_once('=') {
        Some((g, st)) if !g.is_empty() => Ok((g.to_owned(), st.parse()?)),
        _ => Err(format!("{s:?} must look like GROUP=bin-pack or GROUP=spread")),
    }
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 1.0 => Ok(r),
        _ => Err(format!("{s:?} must be a ratio of at least 1.0")),
    }
}

#[derive(Args, Debug)]
struct AgentArgs {
    /// Host id (letters, digits, '-' and '_'); with --count N, the prefix of host-1..N.
    #[arg(long)]
    host: String,
    /// Hypervisor driver.
    #[arg(long, value_enum, default_value_t = DriverKind::Sim)]
    driver: DriverKind,
    /// vCPUs the host offers.
    #[arg(long)]
    vcpus: u32,
    /// Memory the host offers, MiB.
    #[arg(long)]
    memory_mib: u64,
    /// Disk the host offers, GiB.
    #[arg(long, default_value_t = 0)]
    disk_gib: u64,
    /// Host label, repeatable.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Local journal directory.
    #[arg(long, default_value = ".data/agent")]
    data_dir: PathBuf,
    /// Number of simulated hosts in this process (sim driver only).
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// How long the agent may lose the bus before it fences (stops) its VMs, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    lease: std::time::Duration,
    /// The orchestrator's host-failure timeout; the lease must end well before it.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    host_failure_timeout: std::time::Duration,
    /// What fencing does to the VMs.
    #[arg(long, value_enum, default_value_t = FenceArg::Stop)]
    fence_action: FenceArg,
    /// QEMU: how long a guest gets to power off (ACPI) before it is quit.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    powerdown_timeout: std::time::Duration,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum FenceArg {
    /// Stop the VMs.
    Stop,
    /// Pause the VMs.
    Pause,
}

#[derive(Subcommand, Debug)]
enum VmCommand {
    /// Create a VM; prints it once its placement is in the log.
    Create(VmCreateArgs),
    /// List VMs.
    List {
        /// Include deleted VMs.
        #[arg(long)]
        all: bool,
    },
    /// Show one VM (by id or name).
    Show {
        /// VM id or name.
        id: String,
    },
    /// Delete a VM (by id or name): stops it, then releases its resources.
    Delete {
        /// VM id or name.
        id: String,
    },
    /// Live-migrate a running VM to another host (the planner picks one when --to is omitted).
    /// Returns once the migration is planned; `vm show` follows it to `running` on the target.
    Migrate {
        /// VM id or name.
        id: String,
        /// Destination host.
        #[arg(long)]
        to: Option<String>,
    },
}

#[derive(Args, Debug)]
struct VmCreateArgs {
    /// Name, unique among live VMs.
    name: String,
    /// vCPUs.
    #[arg(long)]
    vcpus: u32,
    /// Memory, MiB.
    #[arg(long)]
    memory_mib: u64,
    /// Disk, GiB (0: diskless).
    #[arg(long, default_value_t = 0)]
    disk_gib: u64,
    /// Group.
    #[arg(long)]
    group: Option<String>,
    /// Label, repeatable: --label tier=web.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// When the orchestrator restarts it: after a failure (on-failure), also after an unasked-for
    /// stop (always), or never.
    #[arg(long, value_enum, default_value_t = RestartArg::OnFailure)]
    restart: RestartArg,
    /// A label the host must carry, repeatable: --require-label gpu=a100.
    #[arg(long = "require-label", value_parser = parse_label)]
    require_labels: Vec<(String, String)>,
    /// Keep it off hosts running other VMs of its --group: hard (never) or soft (preferably).
    #[arg(long, value_enum)]
    anti_affinity: Option<AntiAffinityArg>,
    /// Keep it on the host of the other VMs of its --group: hard (always, once one runs) or soft.
    #[arg(long, value_enum)]
    group_affinity: Option<AntiAffinityArg>,
    /// Near the VMs carrying these labels, repeatable: [hard:|soft:]KEY=VALUE[,KEY=VALUE…][@TOPOLOGY]
    /// (hard unless said; TOPOLOGY is a host label such as zone or rack, the host if omitted):
    /// --vm-affinity app=web@zone.
    #[arg(long = "vm-affinity", value_parser = parse_rule)]
    vm_affinity: Vec<LabelRule>,
    /// Away from the VMs carrying these labels, same form: --vm-anti-affinity soft:app=db.
    #[arg(long = "vm-anti-affinity", value_parser = parse_rule)]
    vm_anti_affinity: Vec<LabelRule>,
    /// Bin-pack or spread this VM, overriding its group's and the cluster's strategy.
    #[arg(long, value_enum)]
    strategy: Option<StrategyArg>,
    /// Create N VMs named NAME-1 … NAME-N, placed together in one planning pass.
    #[arg(long)]
    count: Option<u32>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum AntiAffinityArg {
    /// Never on a host with another VM of the group.
    Hard,
    /// Preferably not.
    Soft,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum StrategyArg {
    /// Fill hosts before using new ones.
    BinPack,
    /// Use the emptiest host.
    Spread,
}

impl From<StrategyArg> for novacron_types::Strategy {
    fn from(a: StrategyArg) -> Self {
        match a {
            StrategyArg::BinPack => novacron_types::Strategy::BinPack,
            StrategyArg::Spread => novacron_types::Strategy::Spread,
        }
    }
}

/// A label rule from the command line: `[hard:|soft:]KEY=VALUE[,KEY=VALUE…][@TOPOLOGY]`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct LabelRule {
    hard: bool,
    selector: Vec<(String, String)>,
    topology: Option<String>,
}

fn parse_rule(s: &str) -> Result<LabelRule, String> {
    let (hard, rest) = match s.split_once(':') {
        Some(("hard", r)) => (true, r),
        Some(("soft", r)) => (false, r),
        Some((p, _)) => return Err(format!("rule {s:?}: {p:?} is not hard or soft")),
        None => (true, s),
    };
    let (labels, topology) = match rest.split_once('@') {
        Some((_, "")) => return Err(format!("rule {s:?}: nothing after '@' (a host label such as zone)")),
        Some((l, t)) => (l, Some(t.to_owned())),
        None => (rest, None),
    };
    let selector =
        labels.split(',').map(parse_label).collect::<Result<Vec<_>, _>>().map_err(|e| format!("rule {s:?}: {e}"))?;
    Ok(LabelRule { hard, selector, topology })
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum RestartArg {
    /// After failures and unasked-for stops.
    Always,
    /// After failures.
    OnFailure,
    /// Never.
    Never,
}

#[derive(Subcommand, Debug)]
enum HostCommand {
    /// List hosts.
    List,
    /// Show one host.
    Show {
        /// Host id.
        id: String,
    },
    /// Take no new VMs (the host keeps its own).
    Cordon {
        /// Host id.
        id: String,
    },
    /// Live-migrate every VM away (cold-move those that cannot migrate), then stay cordoned.
    Drain {
        /// Host id.
        id: String,
    },
    /// Return a cordoned or drained host to service.
    Uncordon {
        /// Host id.
        id: String,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("label {s:?} must look like key=value")),
    }
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NOVACRON_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Command::QemuFenceKeeper(k) = &cli.command {
        // A plain loop, no runtime: it must outlive the agent and do one thing.
        return match novacron_agent::qemu::keeper::run(&k.dir, k.fence_action.action()) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: lease keeper for {}: {e}", k.dir.display());
                std::process::ExitCode::FAILURE
            }
        };
    }
    let service = matches!(cli.command, Command::Up(_) | Command::Orchestrator(_) | Command::Agent(_));
    init_logging(if service { "info,async_nats=warn" } else { "warn" });
    let result = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => {
            let result = rt.block_on(run(cli));
            // A blocking task still running (an interrupted benchmark's load generator) does
            // not hold the exit up for long.
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
            result
        }
        Err(e) => Err(anyhow::Error::new(e).context("cannot start the async runtime")),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let fmt = cli.output;
    let token = cli.token.filter(|t| !t.is_empty());
    client::set_token(token.clone());
    match cli.command {
        Command::Up(a) => services::up(a, token, fmt).await,
        Command::Orchestrator(a) => services::orchestrator(&cli.nats, a, token).await,
        Command::Agent(a) => services::agent(&cli.nats, a).await,
        Command::Vm(c) => client::vm(&cli.server, c, fmt).await,
        Command::Host(c) => client::host(&cli.server, c, fmt).await,
        Command::Policy(c) => client::policy(&cli.server, c, fmt).await,
        Command::Group(c) => client::group(&cli.server, c, fmt).await,
        Command::Events(a) => audit::events(&cli.nats, a, fmt).await,
        Command::State(a) => audit::state(&cli.nats, a, fmt).await,
        Command::Plan(PlanCommand::Consolidate(a)) => audit::plan_consolidate(&cli.nats, a, fmt).await,
        Command::Explain { event_id } => client::explain(&cli.server, &event_id, fmt).await,
        // Interrupted, a benchmark still removes its temporary directory (a nats-server store
        // of up to gigabytes) and stops the processes it started: both go when its future is
        // dropped, which the signal does here.
        Command::Bench(a) => tokio::select! {
            r = bench::run(a, fmt) => r,
            () = services::shutdown_signal() => Err(anyhow::anyhow!("interrupted; its temporary files are removed")),
        },
        Command::QemuFenceKeeper(_) => unreachable!("handled before the runtime starts"),
        Command::Models(ModelsCommand::Evaluate(a)) => {
            tokio::task::spawn_blocking(move || models::evaluate_cmd(&a, fmt)).await?
        }
        Command::Models(ModelsCommand::Risk(a)) => {
            tokio::task::spawn_blocking(move || models::risk_cmd(&a, fmt)).await?
        }
        Command::Models(ModelsCommand::Train(a)) => models::train_cmd(&cli.server, &cli.nats, a, fmt).await,
        Command::Models(ModelsCommand::Abtest(a)) => models::abtest_cmd(&cli.server, &cli.nats, a, fmt).await,
        Command::Models(ModelsCommand::List) => {
            let v = client::api_call(&cli.server, "GET", "/api/v1/models".into(), None).await?;
            models::print_models(&v, fmt)
        }
        Command::Models(ModelsCommand::Promote { id, reason }) => {
            let body = serde_json::json!({ "reason": reason });
            output::json(
                &client::api_call(&cli.server, "POST", format!("/api/v1/models/{id}/promote"), Some(body)).await?,
            )
        }
        Command::Models(ModelsCommand::Rollback { reason }) => {
            let body = serde_json::json!({ "reason": reason });
            output::json(&client::api_call(&cli.server, "POST", "/api/v1/models/rollback".into(), Some(body)).await?)
        }
        Command::Data(DataCommand::Generate(a)) => models::generate_cmd(&a),
        Command::Data(DataCommand::Convert(a)) => models::convert_cmd(&a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_and_group_strategies_parse_or_say_what_is_wrong() {
        let r = parse_rule("soft:app=web,tier=front@zone").unwrap();
        assert!(!r.hard);
        assert_eq!(r.selector, [("app".to_owned(), "web".to_owned()), ("tier".to_owned(), "front".to_owned())]);
        assert_eq!(r.topology.as_deref(), Some("zone"));
        let r = parse_rule("app=db").unwrap();
        assert!(r.hard && r.topology.is_none());
        assert!(parse_rule("must:app=db").unwrap_err().contains("not hard or soft"));
        assert!(parse_rule("app=db@").unwrap_err().contains("after '@'"));
        assert!(parse_rule("hard:app").unwrap_err().contains("key=value"));
        assert_eq!(parse_group_strategy("batch=spread").unwrap().1, novacron_types::Strategy::Spread);
        assert!(parse_group_strategy("batch=tight").unwrap_err().contains("bin-pack or spread"));
        assert!(parse_ratio("0.5").is_err());
    }
}
