//! Operator commands over the HTTP API.

use anyhow::{Context, anyhow};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::output::{self, or_dash};
use crate::{Format, GroupCommand, HostCommand, PolicyCommand, VmCommand};

static TOKEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// The API token every call sends (`--token`, `$NOVACRON_TOKEN`); set once at start.
pub(crate) fn set_token(token: Option<String>) {
    let _ = TOKEN.set(token);
}

fn token() -> Option<&'static str> {
    TOKEN.get().and_then(Option::as_deref)
}

/// A small blocking HTTP client, run off the async threads.
#[derive(Clone)]
struct Api {
    base: String,
    agent: ureq::Agent,
}

impl Api {
    fn new(server: &str) -> Api {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(30)))
            .build();
        Api { base: server.trim_end_matches('/').to_owned(), agent: config.into() }
    }

    async fn call<T: DeserializeOwned + Send + 'static>(
        &self,
        method: &'static str,
        path: String,
        body: Option<Value>,
    ) -> anyhow::Result<T> {
        let api = self.clone();
        tokio::task::spawn_blocking(move || api.call_blocking(method, &path, body)).await?
    }

    fn call_blocking<T: DeserializeOwned>(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<T> {
        self.call_at(&self.base, method, path, body, true)
    }

    /// One call; a standby's "not the leader" answer names the leader, and the call is made
    /// there once (`follow`).
    fn call_at<T: DeserializeOwned>(
        &self,
        base: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
        follow: bool,
    ) -> anyhow::Result<T> {
        let url = format!("{base}{path}");
        let user = std::env::var("USER").unwrap_or_else(|_| "anonymous".into());
        let auth = token().map(|t| format!("Bearer {t}")).unwrap_or_default();
        let sent = match (method, body.clone()) {
            ("POST", Some(b)) => {
                self.agent.post(&url).header("x-novacron-user", &user).header("authorization", &auth).send_json(b)
            }
            ("DELETE", _) => {
                self.agent.delete(&url).header("x-novacron-user", &user).header("authorization", &auth).call()
            }
            _ => self.agent.get(&url).header("authorization", &auth).call(),
        };
        let mut resp = sent.with_context(|| {
            format!("cannot reach the NovaCron API at {base} (is `novacron up` running? set --server)")
        })?;
        let status = resp.status();
        let text = resp.body_mut().read_to_string().context("reading the API's answer")?;
        if !status.is_success() {
            let detail: Option<Value> = serde_json::from_str(&text).ok();
            if let Some(leader) = detail.as_ref().and_then(|d| d.get("leader")).and_then(Value::as_str)
                && follow
                && status.as_u16() == 503
                && leader.trim_end_matches('/') != base
            {
                tracing::info!(%leader, "this replica does not lead; asking the leader");
                return self.call_at(leader.trim_end_matches('/'), method, path, body, false);
            }
            let msg = detail
                .as_ref()
                .and_then(|d| d.get("error"))
                .and_then(Value::as_str)
                .map_or_else(|| text.trim().to_owned(), str::to_owned);
            let field = detail.as_ref().and_then(|d| d.get("field")).and_then(Value::as_str);
            return Err(match field {
                Some(f) => anyhow!("{method} {path}: {status}: {f}: {msg}"),
                None => anyhow!("{method} {path}: {status}: {msg}"),
            });
        }
        serde_json::from_str(&text)
            .with_context(|| format!("the API's answer to {method} {path} is not the JSON expected"))
    }
}

fn vm_rows(vms: &[Value]) -> Vec<Vec<String>> {
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64);
    vms.iter()
        .map(|v| {
            vec![
                or_dash(s(v, "id")),
                or_dash(s(v, "name")),
                or_dash(s(v, "status")),
                or_dash(s(v, "host")),
                or_dash(n(v, "generation")),
                or_dash(n(v, "vcpus")),
                or_dash(n(v, "memory_mib")),
                s(v, "pending_reason").unwrap_or_default(),
            ]
        })
        .collect()
}

const VM_HEADER: [&str; 8] = ["id", "name", "status", "host", "gen", "vcpus", "memory_mib", "note"];

pub async fn vm(server: &str, cmd: VmCommand, fmt: Format) -> anyhow::Result<()> {
    let api = Api::new(server);
    let one = |v: Value| -> anyhow::Result<()> {
        match fmt {
            Format::Json => output::json(&v),
            Format::Text => {
                output::table(&VM_HEADER, &vm_rows(std::slice::from_ref(&v)));
                Ok(())
            }
        }
    };
    match cmd {
        VmCommand::Create(a) => {
            let labels: serde_json::Map<String, Value> =
                a.labels.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
            let required: serde_json::Map<String, Value> =
                a.require_labels.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
            let strength = |s: Option<crate::AntiAffinityArg>| match s {
                None => "none",
                Some(crate::AntiAffinityArg::Hard) => "hard",
                Some(crate::AntiAffinityArg::Soft) => "soft",
            };
            let rule = |r: crate::LabelRule, relation: &str| {
                let selector: serde_json::Map<String, Value> =
                    r.selector.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
                serde_json::json!({
                    "selector": selector, "relation": relation,
                    "strength": if r.hard { "hard" } else { "soft" }, "topology": r.topology,
                })
            };
            let rules: Vec<Value> = a
                .vm_affinity
                .into_iter()
                .map(|r| rule(r, "affinity"))
                .chain(a.vm_anti_affinity.into_iter().map(|r| rule(r, "anti-affinity")))
                .collect();
            let body = serde_json::json!({
                "name": a.name, "vcpus": a.vcpus, "memory_mib": a.memory_mib, "disk_gib": a.disk_gib,
                "group": a.group, "labels": labels,
                "restart": match a.restart {
                    crate::RestartArg::Always => "always",
                    crate::RestartArg::OnFailure => "on-failure",
                    crate::RestartArg::Never => "never",
                },
                "placement": {
                    "require_labels": required,
                    "group_anti_affinity": strength(a.anti_affinity),
                    "group_affinity": strength(a.group_affinity),
                    "vm_affinity": rules,
                    "strategy": a.strategy.map(|s| novacron_types::Strategy::from(s).as_str()),
                },
                "count": a.count,
            });
            let created: Value = api.call("POST", "/api/v1/vms".into(), Some(body)).await?;
            match (created, fmt) {
                (v @ Value::Array(_), Format::Json) => output::json(&v),
                (Value::Array(vms), Format::Text) => {
                    output::table(&VM_HEADER, &vm_rows(&vms));
                    Ok(())
                }
                (v, _) => one(v),
            }
        }
        VmCommand::List { all } => {
            let vms: Vec<Value> = api.call("GET", format!("/api/v1/vms?all={all}"), None).await?;
            match fmt {
                Format::Json => output::json(&vms),
                Format::Text => {
                    output::table(&VM_HEADER, &vm_rows(&vms));
                    Ok(())
                }
            }
        }
        VmCommand::Show { id } => one(api.call("GET", format!("/api/v1/vms/{}", encode(&id)), None).await?),
        VmCommand::Delete { id } => one(api.call("DELETE", format!("/api/v1/vms/{}", encode(&id)), None).await?),
        VmCommand::Migrate { id, to } => {
            let body = serde_json::json!({ "to": to });
            one(api.call("POST", format!("/api/v1/vms/{}/migrate", encode(&id)), Some(body)).await?)
        }
    }
}

pub async fn host(server: &str, cmd: HostCommand, fmt: Format) -> anyhow::Result<()> {
    let api = Api::new(server);
    let cmd_name = match &cmd {
        HostCommand::Cordon { .. } => Some("cordon"),
        HostCommand::Drain { .. } => Some("drain"),
        HostCommand::Uncordon { .. } => Some("uncordon"),
        _ => None,
    };
    let hosts: Vec<Value> = match cmd {
        HostCommand::List => api.call("GET", "/api/v1/hosts".into(), None).await?,
        HostCommand::Cordon { id } | HostCommand::Drain { id } | HostCommand::Uncordon { id } => {
            let action = cmd_name.unwrap_or("cordon");
            let h: Value =
                api.call("POST", format!("/api/v1/hosts/{}/{action}", encode(&id)), Some(Value::Null)).await?;
            if fmt == Format::Json {
                return output::json(&h);
            }
            vec![h]
        }
        HostCommand::Show { id } => {
            let h: Value = api.call("GET", format!("/api/v1/hosts/{}", encode(&id)), None).await?;
            if fmt == Format::Json {
                return output::json(&h);
            }
            vec![h]
        }
    };
    if fmt == Format::Json {
        return output::json(&hosts);
    }
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64);
    let rows: Vec<Vec<String>> = hosts
        .iter()
        .map(|h| {
            vec![
                or_dash(s(h, "id")),
                or_dash(s(h, "state")),
                or_dash(s(h, "driver")),
                or_dash(n(h, "vms")),
                format!("{}/{}", n(h, "allocated_vcpus").unwrap_or(0), n(h, "vcpus").unwrap_or(0)),
                format!("{}/{}", n(h, "allocated_memory_mib").unwrap_or(0), n(h, "memory_mib").unwrap_or(0)),
                h.get("cpu_util").and_then(Value::as_f64).map_or("-".into(), |c| format!("{:.0}%", c * 100.0)),
                or_dash(n(h, "failures")),
                h.get("failure_risk").and_then(Value::as_f64).map_or("-".into(), |p| format!("{:.1}%", p * 100.0)),
            ]
        })
        .collect();
    output::table(&["id", "state", "driver", "vms", "vcpus", "memory_mib", "cpu", "failures", "risk"], &rows);
    Ok(())
}

/// Percent-encodes a path segment (names may hold spaces or slashes).
fn encode(segment: &str) -> String {
    let mut out = String::new();
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub async fn explain(server: &str, event_id: &str, fmt: Format) -> anyhow::Result<()> {
    let api = Api::new(server);
    let d: Value = api.call("GET", format!("/api/v1/decisions/{}", encode(event_id)), None).await?;
    if fmt == Format::Json {
        return output::json(&d);
    }
    let s = |v: &Value| v.as_str().map(str::to_owned).unwrap_or_else(|| "-".to_owned());
    let actor = format!("{}:{}", s(&d["actor"]["type"]), s(&d["actor"]["name"]));
    println!("decision   {}  {}  (log seq {}, {}, by {actor})", s(&d["id"]), s(&d["kind"]), d["seq"], s(&d["at"]));
    println!("vm         {} ({})", s(&d["vm_name"]), s(&d["vm"]));
    match d["kind"].as_str() {
        Some("VmPlaced") => println!("chosen     {}  generation {}", s(&d["host"]), d["generation"]),
        Some("VmMigrationPlanned") => {
            println!("move       {} → {}  generation {}", s(&d["from"]), s(&d["host"]), d["generation"]);
        }
        _ => println!("outcome    not placed: {}", s(&d["reason"])),
    }
    if let Some(r) = d["reason"].as_str().filter(|_| d["kind"] == "VmMigrationPlanned") {
        println!("reason     {r}");
    }
    let e = &d["explanation"];
    if e.is_null() {
        return Ok(());
    }
    let watermark = e["telemetry_watermark_ms"].as_u64().map_or_else(
        || "no telemetry".to_owned(),
        |ms| {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
            format!("telemetry up to {}", humantime::format_rfc3339_millis(t))
        },
    );
    println!("planner    {}; read the log at seq {}; {watermark}", s(&e["planner"]), e["log_seq"]);
    if let Some(t) = e["trigger"].as_str() {
        println!("trigger    {t}");
    }
    let rejected: Vec<String> =
        e["rejections"].as_object().map(|m| m.iter().map(|(k, v)| format!("{k} {v}")).collect()).unwrap_or_default();
    let rejected = if rejected.is_empty() { "none".to_owned() } else { rejected.join(", ") };
    println!("hosts      {} considered; eliminated: {rejected}", e["hosts_considered"]);
    let candidates = e["candidates"].as_array().cloned().unwrap_or_default();
    if candidates.is_empty() {
        return Ok(());
    }
    let mut parts: Vec<String> = candidates
        .iter()
        .flat_map(|c| c["components"].as_object().map(|m| m.keys().cloned().collect::<Vec<_>>()).unwrap_or_default())
        .collect();
    parts.sort();
    parts.dedup();
    let mut header = vec!["host", "score"];
    header.extend(parts.iter().map(String::as_str));
    let rows: Vec<Vec<String>> = candidates
        .iter()
        .map(|c| {
            let mut row = vec![s(&c["host"]), format!("{:.3}", c["score"].as_f64().unwrap_or(0.0))];
            row.extend(parts.iter().map(|p| c["components"][p].as_f64().map_or("-".into(), |v| format!("{v:.3}"))));
            row
        })
        .collect();
    println!("candidates (best first)");
    output::table(&header, &rows);
    Ok(())
}

/// Reads and parses policy files; a parse error names the file, line and column.
fn read_policies(files: &[std::path::PathBuf]) -> anyhow::Result<Vec<novacron_types::policy::Policy>> {
    let mut all = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        all.extend(novacron_policy::parse_policies(&f.display().to_string(), &text)?);
    }
    Ok(all)
}

/// Every problem of a set of documents read from files, as lines.
fn offline_problems(docs: &[novacron_types::policy::Policy]) -> Vec<String> {
    let mut out: Vec<String> = docs.iter().flat_map(novacron_policy::validate).map(|p| p.to_string()).collect();
    out.extend(novacron_policy::conflicts(docs, None).into_iter().map(|c| c.to_string()));
    out
}

const POLICY_HEADER: [&str; 6] = ["name", "version", "kind", "enforcement", "priority", "scope"];

fn policy_row(p: &Value) -> Vec<String> {
    let scope = match (&p["scope"]["group"], &p["scope"]["selector"]) {
        (Value::String(g), _) => format!("group {g}"),
        (_, Value::Object(sel)) => {
            let labels: Vec<String> =
                sel.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())).collect();
            format!("selector {}", labels.join(","))
        }
        _ => "cluster".into(),
    };
    vec![
        or_dash(p["name"].as_str().map(str::to_owned)),
        p["version"].to_string(),
        or_dash(p["kind"].as_str().map(str::to_owned)),
        or_dash(p["enforcement"].as_str().map(str::to_owned)),
        p["priority"].to_string(),
        scope,
    ]
}

pub async fn policy(server: &str, cmd: PolicyCommand, fmt: Format) -> anyhow::Result<()> {
    let api = Api::new(server);
    match cmd {
        PolicyCommand::Validate { files, against_cluster } => {
            let docs = read_policies(&files)?;
            let mut problems = offline_problems(&docs);
            let mut resolutions: Vec<Value> = novacron_policy::resolve(&docs)
                .into_iter()
                .map(|r| serde_json::json!({ "winner": r.winner, "loser": r.loser, "reason": r.reason }))
                .collect();
            if against_cluster && problems.is_empty() {
                let body = serde_json::json!({ "file": "cli", "source": serde_json::to_string(&docs)? });
                let v: Value = api.call("POST", "/api/v1/policies/validate".into(), Some(body)).await?;
                problems
                    .extend(v["errors"].as_array().into_iter().flatten().filter_map(|e| e.as_str().map(str::to_owned)));
                if let Some(r) = v["resolutions"].as_array() {
                    resolutions.clone_from(r);
                }
                for w in v["warnings"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                    eprintln!("warning: {w}");
                }
            }
            let valid = problems.is_empty();
            match fmt {
                Format::Json => output::json(&serde_json::json!({
                    "valid": valid, "policies": docs.len(), "errors": problems, "resolutions": resolutions,
                }))?,
                Format::Text => {
                    for p in &problems {
                        eprintln!("error: {p}");
                    }
                    for r in &resolutions {
                        println!(
                            "resolved: {} prevails over {} ({})",
                            r["winner"].as_str().unwrap_or_default(),
                            r["loser"].as_str().unwrap_or_default(),
                            r["reason"].as_str().unwrap_or_default()
                        );
                    }
                    if valid {
                        println!("{} policies valid", docs.len());
                    }
                }
            }
            if !valid {
                anyhow::bail!("{} problem(s) in {} policies", problems.len(), docs.len());
            }
            Ok(())
        }
        PolicyCommand::Apply { files } => {
            let docs = read_policies(&files)?;
            let problems = offline_problems(&docs);
            if !problems.is_empty() {
                anyhow::bail!("not applied: {}", problems.join("; "));
            }
            let body = serde_json::json!({ "file": "cli", "source": serde_json::to_string(&docs)? });
            let v: Value = api.call("POST", "/api/v1/policies".into(), Some(body)).await?;
            match fmt {
                Format::Json => output::json(&v),
                Format::Text => {
                    let applied: Vec<&str> =
                        v["applied"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                    if applied.is_empty() {
                        println!("nothing changed (policy set version {})", v["version"]);
                    } else {
                        println!("applied {} (policy set version {})", applied.join(", "), v["version"]);
                    }
                    Ok(())
                }
            }
        }
        PolicyCommand::Diff { files } => {
            let docs = read_policies(&files)?;
            let current: Value = api.call("GET", "/api/v1/policies".into(), None).await?;
            let in_force: std::collections::BTreeMap<String, Value> = current["policies"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| Some((p["name"].as_str()?.to_owned(), p["policy"].clone())))
                .collect();
            let mut report = Vec::new();
            for d in &docs {
                let new = serde_json::to_value(d)?;
                let (status, changes) = match in_force.get(&d.name) {
                    None => ("new", Vec::new()),
                    Some(old) if *old == new => ("unchanged", Vec::new()),
                    Some(old) => ("changed", json_diff("", old, &new)),
                };
                report.push(serde_json::json!({ "name": d.name, "status": status, "changes": changes }));
            }
            match fmt {
                Format::Json => output::json(&report),
                Format::Text => {
                    for r in &report {
                        println!(
                            "{} {}",
                            r["status"].as_str().unwrap_or_default(),
                            r["name"].as_str().unwrap_or_default()
                        );
                        for c in r["changes"].as_array().into_iter().flatten() {
                            println!("    {}", c.as_str().unwrap_or_default());
                        }
                    }
                    Ok(())
                }
            }
        }
        PolicyCommand::DryRun { files } => {
            let docs = read_policies(&files)?;
            let problems = offline_problems(&docs);
            if !problems.is_empty() {
                anyhow::bail!("{}", problems.join("; "));
            }
            let body = serde_json::json!({ "file": "cli", "source": serde_json::to_string(&docs)? });
            let v: Value = api.call("POST", "/api/v1/policies/dry-run".into(), Some(body)).await?;
            match fmt {
                Format::Json => output::json(&v),
                Format::Text => {
                    for w in v["warnings"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                        eprintln!("warning: {w}");
                    }
                    let rows: Vec<Vec<String>> = v["violations"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|f| {
                            ["policy", "vm_name", "host", "reason", "action"]
                                .iter()
                                .map(|k| or_dash(f[*k].as_str().map(str::to_owned)))
                                .collect()
                        })
                        .collect();
                    if rows.is_empty() {
                        println!("no VM would break these policies");
                    } else {
                        output::table(&["policy", "vm", "host", "violation", "action"], &rows);
                    }
                    Ok(())
                }
            }
        }
        PolicyCommand::List => {
            let v: Value = api.call("GET", "/api/v1/policies".into(), None).await?;
            match fmt {
                Format::Json => output::json(&v),
                Format::Text => {
                    let rows: Vec<Vec<String>> =
                        v["policies"].as_array().into_iter().flatten().map(policy_row).collect();
                    output::table(&POLICY_HEADER, &rows);
                    Ok(())
                }
            }
        }
        PolicyCommand::Show { name } => {
            let v: Value = api.call("GET", format!("/api/v1/policies/{name}"), None).await?;
            match fmt {
                Format::Json => output::json(&v),
                Format::Text => {
                    output::table(&POLICY_HEADER, &[policy_row(&v)]);
                    println!("{}", serde_json::to_string_pretty(&v["policy"])?);
                    Ok(())
                }
            }
        }
        PolicyCommand::Remove { name } => {
            let v: Value = api.call("DELETE", format!("/api/v1/policies/{name}"), None).await?;
            match fmt {
                Format::Json => output::json(&v),
                Format::Text => {
                    println!("removed {name} (policy set version {})", v["version"]);
                    Ok(())
                }
            }
        }
    }
}

/// Field-by-field differences between two JSON documents, as `path: old → new` lines.
fn json_diff(path: &str, old: &Value, new: &Value) -> Vec<String> {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            keys.into_iter()
                .flat_map(|k| {
                    let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                    json_diff(&p, a.get(k).unwrap_or(&Value::Null), b.get(k).unwrap_or(&Value::Null))
                })
                .collect()
        }
        (a, b) if a == b => Vec::new(),
        (a, b) => vec![format!("{path}: {a} → {b}")],
    }
}

/// One API call from elsewhere in the CLI (the leader is followed as usual).
pub(crate) async fn api_call(
    server: &str,
    method: &'static str,
    path: String,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    Api::new(server).call(method, path, body).await
}

const GROUP_HEADER: [&str; 7] = ["name", "members", "running", "min", "max", "target_cpu", "mode"];

fn group_row(g: &Value) -> Vec<String> {
    vec![
        or_dash(g["name"].as_str().map(str::to_owned)),
        g["members"].to_string(),
        g["running"].to_string(),
        g["min"].to_string(),
        g["max"].to_string(),
        g["target_cpu"].to_string(),
        or_dash(g["mode"].as_str().map(str::to_owned)),
    ]
}

pub async fn group(server: &str, cmd: GroupCommand, fmt: Format) -> anyhow::Result<()> {
    let api = Api::new(server);
    let show = |v: Value| -> anyhow::Result<()> {
        match fmt {
            Format::Json => output::json(&v),
            Format::Text => {
                output::table(&GROUP_HEADER, &[group_row(&v)]);
                Ok(())
            }
        }
    };
    match cmd {
        GroupCommand::Create(a) => {
            let labels: serde_json::Map<String, Value> =
                a.labels.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
            let anti = match a.anti_affinity {
                None => "none",
                Some(crate::AntiAffinityArg::Hard) => "hard",
                Some(crate::AntiAffinityArg::Soft) => "soft",
            };
            let body = serde_json::json!({
                "name": a.name, "min": a.min, "max": a.max, "vcpus": a.vcpus, "memory_mib": a.memory_mib,
                "disk_gib": a.disk_gib, "target_cpu": a.target_cpu, "labels": labels,
                "placement": { "group_anti_affinity": anti },
                "mode": match a.mode {
                    crate::ModeArg::Reactive => "reactive",
                    crate::ModeArg::Predictive => "predictive",
                    crate::ModeArg::ForecastOnly => "forecast-only",
                },
                "scale_up_cooldown_s": a.scale_up_cooldown.as_secs(),
                "scale_down_cooldown_s": a.scale_down_cooldown.as_secs(),
                "stabilization_s": a.stabilization.as_secs(),
                "schedules": a.schedules,
            });
            show(api.call("POST", "/api/v1/groups".into(), Some(body)).await?)
        }
        GroupCommand::List => {
            let v: Value = api.call("GET", "/api/v1/groups".into(), None).await?;
            match fmt {
                Format::Json => output::json(&v),
                Format::Text => {
                    let rows: Vec<Vec<String>> = v.as_array().into_iter().flatten().map(group_row).collect();
                    output::table(&GROUP_HEADER, &rows);
                    Ok(())
                }
            }
        }
        GroupCommand::Show { name } => show(api.call("GET", format!("/api/v1/groups/{name}"), None).await?),
        GroupCommand::Delete { name } => {
            let v: Value = api.call("DELETE", format!("/api/v1/groups/{name}"), None).await?;
            match fmt {
                Format::Json => output::json(&v),
                Format::Text => {
                    println!("deleted group {name} and its members");
                    Ok(())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_diff_names_each_changed_field() {
        let old = serde_json::json!({"name": "a", "rule": {"scaling": {"min": 1, "max": 3}}});
        let new = serde_json::json!({"name": "a", "rule": {"scaling": {"min": 2, "max": 3}}, "priority": 5});
        assert_eq!(json_diff("", &old, &new), ["priority: null → 5", "rule.scaling.min: 1 → 2"]);
    }
}
