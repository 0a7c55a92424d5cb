//! The HTTP API under `/api/v1`, health, metrics and the dashboard.
//!
//! Writes go through the engine and answer only once their events are in the log; reads come
//! from the folded state. Errors are JSON: `{"error": "...", "field": "vcpus"}` (`field` when
//! one field is to blame), with 400 for bad input, 404, 409 for conflicts and 503 when the log
//! is unavailable.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use novacron_state::{HostView, StateSummary};
use novacron_types::{Actor, Validate, VmSpec};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::decide::{Origin, Refusal};
use crate::engine::{EngineError, EngineHandle, read};
use crate::ingest::{SharedObservations, lock};
use crate::metrics as m;

#[derive(Clone)]
pub(crate) struct Api {
    pub engine: EngineHandle,
    pub observations: SharedObservations,
    pub client: async_nats::Client,
    /// The EVENTS stream, to read decisions back by sequence.
    pub events: async_nats::jetstream::stream::Stream,
    /// This replica's role.
    pub role: tokio::sync::watch::Receiver<crate::leader::Role>,
    /// What the policy pass runs with, for dry runs: planner settings, migration limits and
    /// the rebalancer's VM cooldown.
    pub passes:
        std::sync::Arc<(novacron_scheduler::PlannerConfig, crate::decide::MigrationLimits, std::time::Duration)>,
    /// Trained models' artifacts (a registration must name a stored one).
    pub model_artifacts: novacron_eventlog::Artifacts,
    /// Live forecast accuracy per model.
    pub ledger: crate::ingest::SharedLedger,
    /// The most members a group may be created with (the profile's limit).
    pub max_group_members: u32,
    /// Fires at shutdown: live streams end with it (the HTTP server waits for them).
    pub shutdown: tokio_util::sync::CancellationToken,
}

pub(crate) fn router(api: Api) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/state", get(state))
        .route("/api/v1/stream", get(stream_events))
        .route("/api/v1/leader", get(leader))
        .route("/api/v1/vms", get(list_vms).post(create_vm))
        .route("/api/v1/vms/{id}", get(show_vm).delete(delete_vm))
        .route("/api/v1/vms/{id}/migrate", axum::routing::post(migrate_vm))
        .route("/api/v1/decisions", get(list_decisions))
        .route("/api/v1/decisions/{id}", get(show_decision))
        .route("/api/v1/hosts", get(list_hosts))
        .route("/api/v1/hosts/{id}", get(show_host))
        .route("/api/v1/hosts/{id}/{action}", axum::routing::post(host_action))
        .route("/api/v1/models", get(list_models).post(register_model))
        .route("/api/v1/models/rollback", axum::routing::post(rollback_model))
        .route("/api/v1/models/{id}/promote", axum::routing::post(promote_model))
        .route("/api/v1/groups", get(list_groups).post(create_group))
        .route("/api/v1/groups/{name}", get(show_group).delete(delete_group))
        .route("/api/v1/policies", get(list_policies).post(apply_policies))
        .route("/api/v1/policies/validate", axum::routing::post(validate_policies))
        .route("/api/v1/policies/dry-run", axum::routing::post(dry_run_policies))
        .route("/api/v1/policies/{name}", get(show_policy).delete(remove_policy))
        .fallback(not_found)
        .with_state(api)
}

#[derive(Deserialize)]
struct StreamQuery {
    /// The first sequence to send; default: the next event appended.
    from: Option<u64>,
}

/// Live events over a WebSocket: one JSON text message per event of the log (the shape of
/// `novacron events -o json`), from `?from=SEQ` or from the next one appended, until the client
/// closes or the orchestrator stops. Any replica serves it (the log is the same everywhere).
async fn stream_events(
    State(api): State<Api>,
    Query(q): Query<StreamQuery>,
    ws: axum::extract::ws::WebSocketUpgrade,
) -> Response {
    let from = q.from.unwrap_or_else(|| read(&api.engine.state).seq + 1).max(1);
    let (events, shutdown) = (api.events.clone(), api.shutdown.clone());
    ws.on_upgrade(move |socket| stream_to(socket, events, from, shutdown))
}

async fn stream_to(
    mut socket: axum::extract::ws::WebSocket,
    events: async_nats::jetstream::stream::Stream,
    from: u64,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use axum::extract::ws::{CloseFrame, Message, close_code};
    use futures::StreamExt;
    let close = |code, why: String| Message::Close(Some(CloseFrame { code, reason: why.into() }));
    let mut follow = match novacron_eventlog::follow(&events, from).await {
        Ok(f) => Box::pin(f),
        Err(e) => {
            let _ = socket.send(close(close_code::ERROR, format!("cannot read the log: {e}"))).await;
            return;
        }
    };
    ::metrics::gauge!(m::STREAM_CLIENTS).increment(1.0);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                let _ = socket.send(close(close_code::AWAY, "the orchestrator is stopping".into())).await;
                break;
            }
            ev = follow.next() => match ev {
                Some(Ok(ev)) => {
                    if socket.send(Message::Text(ev.to_json().to_string().into())).await.is_err() {
                        break;
                    }
                }
                Some(Err(e)) => {
                    let _ = socket.send(close(close_code::ERROR, format!("reading the log: {e}"))).await;
                    break;
                }
                None => break,
            },
            incoming = socket.recv() => match incoming {
                None | Some(Err(_) | Ok(Message::Close(_))) => break,
                Some(Ok(_)) => {} // pings are answered by axum; nothing else is expected
            },
        }
    }
    ::metrics::gauge!(m::STREAM_CLIENTS).decrement(1.0);
}

/// Guards `/api/v1` with a bearer token, when one is configured.
pub(crate) fn require_token(app: Router, token: Option<String>) -> Router {
    let Some(token) = token.filter(|t| !t.is_empty()) else { return app };
    let token = std::sync::Arc::new(token);
    app.layer(axum::middleware::from_fn(move |req: axum::extract::Request, next: axum::middleware::Next| {
        let token = token.clone();
        async move {
            if !req.uri().path().starts_with("/api/") {
                return next.run(req).await;
            }
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            match given {
                Some(given) if same_secret(given.as_bytes(), token.as_bytes()) => next.run(req).await,
                Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "wrong API token").into_response(),
                None => ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "this API needs a token: send `Authorization: Bearer <token>` (the CLI sends $NOVACRON_TOKEN or --token)",
                )
                .into_response(),
            }
        }
    }))
}

/// Compares without leaking, through its timing, how much of the secret a guess got right.
fn same_secret(given: &[u8], secret: &[u8]) -> bool {
    let mut diff = given.len() ^ secret.len();
    for (i, s) in secret.iter().enumerate() {
        diff |= usize::from(given.get(i).copied().unwrap_or(0) ^ s);
    }
    diff == 0
}

/// A JSON error response.
#[derive(Debug, Serialize)]
struct ApiError {
    #[serde(skip)]
    status: StatusCode,
    error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
    /// On a standby: the leader's API, where writes go.
    #[serde(skip_serializing_if = "Option::is_none")]
    leader: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, error: impl Into<String>) -> Self {
        ApiError { status, error: error.into(), field: None, leader: None }
    }
    fn field(field: impl Into<String>, error: impl Into<String>) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, error: error.into(), field: Some(field.into()), leader: None }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        count(self.status);
        (self.status, Json(&self)).into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Refused(Refusal::Invalid { field, reason }) => ApiError::field(field, reason),
            EngineError::Refused(r @ Refusal::NotFound(_)) => ApiError::new(StatusCode::NOT_FOUND, r.to_string()),
            EngineError::Refused(r @ (Refusal::NameInUse(_) | Refusal::AlreadyDeleted(_) | Refusal::Conflict(_))) => {
                ApiError::new(StatusCode::CONFLICT, r.to_string())
            }
            e @ (EngineError::LogUnavailable(_) | EngineError::ShuttingDown) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            EngineError::NotLeader(leader) => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                error: EngineError::NotLeader(leader.clone()).to_string(),
                field: None,
                leader: leader.map(|l| l.http),
            },
        }
    }
}

fn count(status: StatusCode) {
    let class = match status.as_u16() {
        200..=299 => "2xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    ::metrics::counter!(m::HTTP_REQUESTS, "status" => class).increment(1);
}

fn ok<T: Serialize>(status: StatusCode, body: T) -> Response {
    count(status);
    (status, Json(body)).into_response()
}

async fn openapi() -> Response {
    static DOC: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    Json(DOC.get_or_init(crate::openapi::document)).into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such route; the API lives under /api/v1")
}

async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready when caught up and connected — leader or standby (a standby serves reads).
async fn readyz(State(api): State<Api>) -> Response {
    let engine = api.engine.ready.load(Ordering::SeqCst);
    let nats = api.client.connection_state() == async_nats::connection::State::Connected;
    let role = role_name(&api.role.borrow());
    let status = if engine && nats && role != "starting" { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({ "engine": engine, "nats": nats, "role": role }))).into_response()
}

fn role_name(role: &crate::leader::Role) -> &'static str {
    match role {
        crate::leader::Role::Starting => "starting",
        crate::leader::Role::Follower { .. } => "follower",
        crate::leader::Role::Leader { .. } => "leader",
    }
}

/// `GET /api/v1/leader`: who leads, as this replica knows it.
async fn leader(State(api): State<Api>) -> Response {
    let role = api.role.borrow().clone();
    let elected = read(&api.engine.state).leader.clone();
    let body = match &role {
        crate::leader::Role::Follower { leader } => json!({ "role": "follower", "leader": leader, "elected": elected }),
        other => json!({ "role": role_name(other), "leader": null, "elected": elected }),
    };
    ok(StatusCode::OK, body)
}

async fn metrics(State(api): State<Api>) -> Response {
    {
        let s = read(&api.engine.state);
        ::metrics::gauge!(m::STATE_SEQ).set(s.seq as f64);
        ::metrics::gauge!(m::HOSTS).set(s.hosts.len() as f64);
        // Not `summary()`: that hashes the whole state, once per scrape.
        ::metrics::gauge!(m::VMS).set(s.live_vms() as f64);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], m::prometheus().render()).into_response()
}

async fn state(State(api): State<Api>) -> Response {
    let summary: StateSummary = read(&api.engine.state).summary();
    ok(StatusCode::OK, summary)
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    all: bool,
}

async fn list_vms(State(api): State<Api>, Query(q): Query<ListQuery>) -> Response {
    let views = read(&api.engine.state).vm_views(q.all);
    ok(StatusCode::OK, views)
}

async fn show_vm(State(api): State<Api>, Path(id): Path<String>) -> Response {
    let s = read(&api.engine.state);
    match crate::decide::find_vm(&s, &id) {
        Some(vm) => ok(StatusCode::OK, novacron_state::VmView::from(vm)),
        None => ApiError::new(StatusCode::NOT_FOUND, format!("no VM {id}")).into_response(),
    }
}

/// The body of `POST /api/v1/vms`. Every field optional at the parser so that a missing one is
/// reported by name; unknown fields are errors.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateVmBody {
    /// The VM's name, unique among live VMs (required).
    name: Option<String>,
    /// vCPUs (required, ≥ 1).
    vcpus: Option<u32>,
    /// Memory in MiB (required, ≥ 1).
    memory_mib: Option<u64>,
    #[serde(default)]
    disk_gib: Option<u64>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    restart: Option<novacron_types::RestartPolicy>,
    #[serde(default)]
    placement: Option<novacron_types::PlacementRules>,
    /// Create this many VMs named `<name>-1` … `<name>-N`, placed in one planning pass.
    #[serde(default)]
    count: Option<u32>,
}

/// Most VMs one request may create.
const MAX_BATCH: u32 = 10_000;

fn parse_create(body: &[u8]) -> Result<(VmSpec, Option<u32>), ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let b: CreateVmBody = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        // serde names the field in the message for unknown fields; otherwise the path does.
        let field = backticked(&msg).filter(|_| path == ".").unwrap_or(path);
        ApiError::field(field, format!("invalid JSON body: {msg}"))
    })?;
    let name = b.name.ok_or_else(|| ApiError::field("name", "required"))?;
    let vcpus = b.vcpus.ok_or_else(|| ApiError::field("vcpus", "required"))?;
    let memory_mib = b.memory_mib.ok_or_else(|| ApiError::field("memory_mib", "required"))?;
    let spec = VmSpec {
        name,
        vcpus,
        memory_mib,
        disk_gib: b.disk_gib.unwrap_or(0),
        group: b.group,
        labels: b.labels.unwrap_or_default(),
        restart: b.restart.unwrap_or_default(),
        placement: b.placement.unwrap_or_default(),
    };
    spec.validate().map_err(|e| ApiError::field(e.field, e.reason))?;
    if let Some(n) = b.count
        && !(1..=MAX_BATCH).contains(&n)
    {
        return Err(ApiError::field("count", format!("must be 1 to {MAX_BATCH}")));
    }
    Ok((spec, b.count))
}

fn backticked(msg: &str) -> Option<String> {
    let start = msg.find('`')? + 1;
    let len = msg[start..].find('`')?;
    Some(msg[start..start + len].to_owned())
}

fn origin(headers: &HeaderMap) -> Origin {
    let user = headers
        .get("x-novacron-user")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64)
        .unwrap_or("anonymous");
    Origin { actor: Actor::User(user.to_owned()), correlation: Some(uuid::Uuid::now_v7()) }
}

async fn create_vm(State(api): State<Api>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let (spec, count) = parse_create(&body)?;
    match count {
        None => {
            let view = api.engine.create_vm(spec, origin(&headers)).await?;
            Ok(ok(StatusCode::CREATED, view))
        }
        Some(n) => {
            let specs = (1..=n).map(|i| VmSpec { name: format!("{}-{i}", spec.name), ..spec.clone() }).collect();
            let views = api.engine.create_vms(specs, origin(&headers)).await?;
            Ok(ok(StatusCode::CREATED, views))
        }
    }
}

async fn delete_vm(State(api): State<Api>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    let view = api.engine.delete_vm(id, origin(&headers)).await?;
    Ok(ok(StatusCode::ACCEPTED, view))
}

/// The body of `POST /api/v1/vms/{id}/migrate`: `{"to": "host-2"}`, or `{}` to let the
/// planner choose.
#[derive(Deserialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MigrateBody {
    /// The destination host; absent: the planner chooses.
    #[serde(default)]
    to: Option<String>,
}

async fn migrate_vm(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let b: MigrateBody = if body.iter().all(u8::is_ascii_whitespace) {
        MigrateBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::field("to", format!("invalid JSON body: {e}")))?
    };
    let view = api.engine.migrate_vm(id, b.to, origin(&headers)).await?;
    Ok(ok(StatusCode::ACCEPTED, view))
}

async fn host_action(
    State(api): State<Api>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let action = match action.as_str() {
        "cordon" => crate::decide::HostAction::Cordon,
        "drain" => crate::decide::HostAction::Drain,
        "uncordon" => crate::decide::HostAction::Uncordon,
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no host action {other:?}; use cordon, drain or uncordon"),
            ));
        }
    };
    let view = api.engine.host_action(id, action, origin(&headers)).await?;
    Ok(ok(StatusCode::OK, view))
}

async fn register_model(State(api): State<Api>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(&body);
    let m: novacron_types::model::ModelTrained = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        ApiError::field(path, format!("invalid model record: {}", e.into_inner()))
    })?;
    // The artifact must be stored, and be what the digest says.
    let key = format!("sha256-{}", m.digest);
    let stored =
        api.model_artifacts.get(&key).await.map_err(|e| {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("cannot read the artifact store: {e}"))
        })?;
    let Some(bytes) = stored else {
        return Err(ApiError::field(
            "digest",
            format!("no artifact {key} in {}", novacron_protocol::MODEL_OBJECTS_BUCKET),
        ));
    };
    use sha2::Digest;
    let actual = sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect::<String>();
    if actual != m.digest {
        return Err(ApiError::field("digest", format!("the stored artifact's digest is {actual}")));
    }
    let id = api.engine.model(crate::decide::ModelAction::Register(Box::new(m)), origin(&headers)).await?;
    Ok(ok(StatusCode::CREATED, json!({ "model": id })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReasonBody {
    #[serde(default)]
    reason: Option<String>,
}

fn reason(body: &[u8], default: &str) -> Result<String, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(default.to_owned());
    }
    let b: ReasonBody = serde_json::from_slice(body).map_err(|e| ApiError::field("reason", e.to_string()))?;
    Ok(b.reason.unwrap_or_else(|| default.to_owned()))
}

async fn promote_model(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let reason = reason(&body, "promoted by an operator")?;
    let id = api.engine.model(crate::decide::ModelAction::Promote { model: id, reason }, origin(&headers)).await?;
    Ok(ok(StatusCode::OK, json!({ "in_use": id })))
}

async fn rollback_model(State(api): State<Api>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let reason = reason(&body, "rolled back by an operator")?;
    let id = api.engine.model(crate::decide::ModelAction::Rollback { reason }, origin(&headers)).await?;
    Ok(ok(StatusCode::OK, json!({ "in_use": id })))
}

async fn list_models(State(api): State<Api>) -> Response {
    let state = read(&api.engine.state);
    let ledger = crate::ingest::lock_ledger(&api.ledger);
    let live: serde_json::Map<String, serde_json::Value> = ledger
        .iter()
        .map(|(m, e)| {
            let mae = if e.forecasts == 0 { None } else { Some(e.abs_error / e.forecasts as f64) };
            (m.clone(), json!({ "forecasts": e.forecasts, "live_mae": mae, "drift_alarms": e.drift_alarms }))
        })
        .collect();
    let models: Vec<_> = state
        .models
        .values()
        .map(|m| {
            json!({
                "model": m.trained.model, "kind": m.trained.kind, "digest": m.trained.digest,
                "trained_at": humantime_rfc3339(m.at_ms), "scores": m.trained.scores,
                "hyperparameters": m.trained.hyperparameters, "data": m.trained.data,
                "in_use": state.promoted.last() == Some(&m.trained.model),
            })
        })
        .collect();
    ok(
        StatusCode::OK,
        json!({
            "in_use": state.promoted.last(), "promotions": state.promoted, "models": models, "live": live,
            "retraining_requests": state.retraining_requests,
        }),
    )
}

async fn create_group(State(api): State<Api>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(&body);
    let spec: novacron_types::group::GroupSpec = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        ApiError::field(path, format!("invalid group: {}", e.into_inner()))
    })?;
    if spec.max > api.max_group_members {
        return Err(ApiError::field(
            "max",
            format!("{} is above this orchestrator's limit of {} members per group", spec.max, api.max_group_members),
        ));
    }
    let name = api.engine.create_group(spec, origin(&headers)).await?;
    let state = read(&api.engine.state);
    Ok(ok(StatusCode::CREATED, group_json(&state, &state.groups[&name])))
}

fn group_json(state: &novacron_state::ClusterState, g: &novacron_state::GroupRecord) -> serde_json::Value {
    let members = crate::decide::members(state, &g.spec.name);
    let (min, max, target) = crate::decide::bounds(state, g, novacron_eventlog::now_ms());
    json!({
        "name": g.spec.name, "members": members.len(),
        "running": members.iter().filter(|v| v.status == novacron_state::VmStatus::Running).count(),
        "min": min, "max": max, "target_cpu": target, "mode": g.spec.mode,
        "last_scale_up_ms": g.last_up_ms, "last_scale_down_ms": g.last_down_ms,
        "last_recommendation": g.last_recommendation,
        "member_names": members.iter().map(|v| v.spec.name.clone()).collect::<Vec<_>>(),
        "spec": g.spec,
    })
}

async fn list_groups(State(api): State<Api>) -> Response {
    let state = read(&api.engine.state);
    let list: Vec<_> = state.groups.values().map(|g| group_json(&state, g)).collect();
    ok(StatusCode::OK, list)
}

async fn show_group(State(api): State<Api>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let state = read(&api.engine.state);
    let g = state.groups.get(&name).ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no group {name}")))?;
    Ok(ok(StatusCode::OK, group_json(&state, g)))
}

async fn delete_group(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let removed = api.engine.delete_group(name, origin(&headers)).await?;
    Ok(ok(StatusCode::ACCEPTED, json!({ "deleted": removed })))
}

/// The body of the policy endpoints: a document's text (YAML or JSON) and the file it came
/// from, so that errors can say where.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PolicySource {
    /// The file the text came from, for error messages.
    #[serde(default = "default_file")]
    file: String,
    /// One or more policy documents, YAML or JSON.
    source: String,
}

fn default_file() -> String {
    "request".into()
}

fn parse_source(body: &[u8]) -> Result<Vec<novacron_types::policy::Policy>, ApiError> {
    let src: PolicySource = serde_json::from_slice(body)
        .map_err(|e| ApiError::field("source", format!("expected {{\"file\": …, \"source\": …}}: {e}")))?;
    novacron_policy::parse_policies(&src.file, &src.source).map_err(|e| ApiError::field("source", e.to_string()))
}

async fn apply_policies(State(api): State<Api>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let docs = parse_source(&body)?;
    let applied = api.engine.apply_policies(docs, origin(&headers)).await?;
    let version = read(&api.engine.state).policy_version;
    Ok(ok(StatusCode::CREATED, json!({ "applied": applied, "version": version })))
}

/// Checks documents as `apply` would — parsing, each document, conflicts with the policies in
/// force and with the cluster — and changes nothing.
async fn validate_policies(State(api): State<Api>, body: Bytes) -> Result<Response, ApiError> {
    let docs = match parse_source(&body) {
        Ok(d) => d,
        Err(e) => return Ok(ok(StatusCode::OK, json!({ "valid": false, "errors": [e.error] }))),
    };
    let state = read(&api.engine.state);
    Ok(ok(
        StatusCode::OK,
        match crate::decide::plan_policies(&state, &docs) {
            Ok(plan) => json!({
                "valid": true,
                "errors": [],
                "changed": plan.changed.iter().map(|p| &p.name).collect::<Vec<_>>(),
                "warnings": plan.warnings,
                "resolutions": plan.resolutions.iter().map(|r| json!({
                    "winner": r.winner, "loser": r.loser, "reason": r.reason,
                })).collect::<Vec<_>>(),
            }),
            Err(e) => json!({ "valid": false, "errors": e.to_string().split("; ").collect::<Vec<_>>() }),
        },
    ))
}

/// What applying documents would do now — the violations the new set finds and the policy
/// pass's action on each — without writing anything.
async fn dry_run_policies(State(api): State<Api>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let docs = parse_source(&body)?;
    let planning =
        crate::decide::Planning { config: api.passes.0.clone(), load: crate::ingest::load_view(&api.observations) };
    let state = read(&api.engine.state).clone();
    let (plan, pass) = crate::decide::dry_run(
        &state,
        &docs,
        &planning,
        api.passes.1,
        api.passes.2,
        &mut crate::decide::WallClock,
        &origin(&headers),
    )
    .map_err(EngineError::from)?;
    let findings: Vec<serde_json::Value> = pass
        .findings
        .iter()
        .map(|(v, action)| {
            json!({
                "policy": v.policy, "enforcement": v.enforcement, "vm": v.vm,
                "vm_name": state.vms.get(&v.vm).map(|r| r.spec.name.clone()),
                "host": v.host, "reason": v.reason, "action": action,
            })
        })
        .collect();
    Ok(ok(
        StatusCode::OK,
        json!({
            "changed": plan.changed.iter().map(|p| &p.name).collect::<Vec<_>>(),
            "warnings": plan.warnings,
            "resolutions": plan.resolutions.iter().map(|r| json!({
                "winner": r.winner, "loser": r.loser, "reason": r.reason,
            })).collect::<Vec<_>>(),
            "violations": findings,
        }),
    ))
}

fn policy_json(r: &novacron_state::PolicyRecord) -> serde_json::Value {
    json!({
        "name": r.policy.name, "version": r.version, "kind": r.policy.rule.kind(),
        "enforcement": r.policy.enforcement, "priority": r.policy.priority, "scope": r.policy.scope,
        "applied_at": humantime_rfc3339(r.at_ms), "seq": r.seq, "policy": r.policy,
    })
}

async fn list_policies(State(api): State<Api>) -> Response {
    let state = read(&api.engine.state);
    let mut list: Vec<_> = state.policies.values().collect();
    list.sort_by_key(|r| r.version);
    let violations: Vec<_> = state.policy_violations.values().collect();
    ok(
        StatusCode::OK,
        json!({
            "version": state.policy_version,
            "policies": list.into_iter().map(policy_json).collect::<Vec<_>>(),
            "violations": violations,
        }),
    )
}

async fn show_policy(State(api): State<Api>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let state = read(&api.engine.state);
    let r =
        state.policies.get(&name).ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no policy {name}")))?;
    Ok(ok(StatusCode::OK, policy_json(r)))
}

async fn remove_policy(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let removed = api.engine.remove_policy(name, origin(&headers)).await?;
    let version = read(&api.engine.state).policy_version;
    Ok(ok(StatusCode::OK, json!({ "removed": removed, "version": version })))
}

/// Reads the decision logged at `seq` and shapes it for the API.
async fn decision_json(api: &Api, seq: u64) -> Result<serde_json::Value, ApiError> {
    let msg = api.events.direct_get(seq).await.map_err(|e| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("cannot read sequence {seq} of the log: {e}"))
    })?;
    let ev = novacron_eventlog::decode_event(seq, msg.subject.as_str(), Some(&msg.headers), &msg.payload);
    let env = ev.envelope.map_err(|e| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("sequence {seq} does not decode: {e}"))
    })?;
    let at = humantime_rfc3339(env.at_ms);
    let mut out = json!({
        "id": env.id, "seq": seq, "at": at, "at_ms": env.at_ms, "kind": env.event.name(), "actor": env.actor,
        "correlation_id": env.correlation_id,
    });
    match &env.event {
        novacron_types::EventKind::VmPlaced(p) => {
            out["vm"] = json!(p.vm);
            out["host"] = json!(p.host);
            out["generation"] = json!(p.generation);
            out["explanation"] = json!(p.explanation);
        }
        novacron_types::EventKind::VmPlacementFailed(p) => {
            out["vm"] = json!(p.vm);
            out["host"] = serde_json::Value::Null;
            out["reason"] = json!(p.reason);
            out["explanation"] = json!(p.explanation);
        }
        novacron_types::EventKind::VmMigrationPlanned(p) => {
            out["vm"] = json!(p.vm);
            out["host"] = json!(p.to);
            out["from"] = json!(p.from);
            out["generation"] = json!(p.target_generation);
            out["reason"] = json!(p.reason);
        }
        other => out["payload"] = json!(other),
    }
    if let Some(vm) = out["vm"].as_str().and_then(|v| v.parse::<novacron_types::VmId>().ok()) {
        out["vm_name"] = json!(read(&api.engine.state).vms.get(&vm).map(|r| r.spec.name.clone()));
    }
    Ok(out)
}

fn humantime_rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
}

#[derive(Deserialize)]
struct DecisionsQuery {
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    vm: Option<String>,
}

async fn list_decisions(State(api): State<Api>, Query(q): Query<DecisionsQuery>) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(20).min(1000);
    let vm = match &q.vm {
        Some(key) => Some(
            crate::decide::find_vm(&read(&api.engine.state), key)
                .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no VM {key}")))?
                .id,
        ),
        None => None,
    };
    let mut seqs: Vec<u64> = match vm {
        // One VM's events, found by their subject (not by reading every decision of the log);
        // those the state knows as decisions.
        Some(vm) => {
            let mut found = Vec::new();
            novacron_eventlog::replay_subject(&api.events, &novacron_protocol::vm_events(vm), |ev| {
                if let Ok(env) = ev.envelope {
                    found.push((env.id, ev.seq));
                }
            })
            .await
            .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("cannot read the log: {e}")))?;
            let state = read(&api.engine.state);
            found.into_iter().filter(|(id, _)| state.decisions.contains_key(id)).map(|(_, seq)| seq).collect()
        }
        None => read(&api.engine.state).decisions.values().copied().collect(),
    };
    seqs.sort_unstable_by(|a, b| b.cmp(a));
    seqs.truncate(limit);
    let mut out = Vec::with_capacity(seqs.len());
    for seq in seqs {
        out.push(decision_json(&api, seq).await?);
    }
    Ok(ok(StatusCode::OK, out))
}

async fn show_decision(State(api): State<Api>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let event: novacron_types::EventId =
        id.parse().map_err(|_| ApiError::field("id", format!("{id:?} is not an event id")))?;
    let seq = read(&api.engine.state).decisions.get(&event).copied();
    let seq = seq.ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no decision {id}")))?;
    Ok(ok(StatusCode::OK, decision_json(&api, seq).await?))
}

/// A host as the API shows it: the log's view plus what we last observed.
#[derive(Serialize)]
struct HostWithObservation {
    #[serde(flatten)]
    host: HostView,
    last_heartbeat_ms: Option<u64>,
    cpu_util: Option<f64>,
    memory_used_mib: Option<u64>,
    /// Probability of failing within the risk model's window (with `--risk-model`, once any
    /// host has failed).
    failure_risk: Option<f64>,
}

fn host_views(api: &Api) -> Vec<HostWithObservation> {
    let views = read(&api.engine.state).host_views();
    let obs = lock(&api.observations);
    views
        .into_iter()
        .map(|host| {
            let id = novacron_types::HostId::new(host.id.clone()).ok();
            let failure_risk = id.as_ref().and_then(|id| obs.load.failure_risk.get(id).copied());
            let o = id.and_then(|id| obs.hosts.get(&id).cloned()).unwrap_or_default();
            HostWithObservation {
                failure_risk,
                last_heartbeat_ms: o.last_heartbeat_ms,
                cpu_util: o.telemetry.as_ref().map(|t| t.cpu_util),
                memory_used_mib: o.telemetry.as_ref().map(|t| t.memory_used_mib),
                host,
            }
        })
        .collect()
}

async fn list_hosts(State(api): State<Api>) -> Response {
    ok(StatusCode::OK, host_views(&api))
}

async fn show_host(State(api): State<Api>, Path(id): Path<String>) -> Response {
    match host_views(&api).into_iter().find(|h| h.host.id == id) {
        Some(h) => ok(StatusCode::OK, h),
        None => ApiError::new(StatusCode::NOT_FOUND, format!("no host {id}")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_bodies_name_the_field() {
        let cases: [(&[u8], &str); 6] = [
            (br#"{"vcpus": 2, "memory_mib": 512}"#, "name"),
            (br#"{"name": "a", "memory_mib": 512}"#, "vcpus"),
            (br#"{"name": "a", "vcpus": "two", "memory_mib": 512}"#, "vcpus"),
            (br#"{"name": "a", "vcpus": -1, "memory_mib": 512}"#, "vcpus"),
            (br#"{"name": "a", "vcpus": 0, "memory_mib": 512}"#, "vcpus"),
            (br#"{"name": "a", "vcpus": 1, "memory_mib": 512, "colour": "red"}"#, "colour"),
        ];
        for (body, field) in cases {
            let err = parse_create(body).unwrap_err();
            assert_eq!(err.field.as_deref(), Some(field), "{}: {}", String::from_utf8_lossy(body), err.error);
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
        }
        assert!(parse_create(b"not json").is_err());
        assert!(parse_create(br#"{"name": "a", "vcpus": 1, "memory_mib": 512}"#).is_ok());
        let err = parse_create(br#"{"name": "a", "vcpus": 1, "memory_mib": 512, "count": 0}"#).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("count"));
        let (spec, n) = parse_create(
            br#"{"name": "a", "vcpus": 1, "memory_mib": 512, "count": 3, "group": "g",
                 "placement": {"require_labels": {"gpu": "yes"}, "group_anti_affinity": "hard"}}"#,
        )
        .unwrap();
        assert_eq!(n, Some(3));
        assert_eq!(spec.placement.group_anti_affinity, novacron_types::Strength::Hard);
        let err = parse_create(br#"{"name": "a", "vcpus": 1, "memory_mib": 512, "placement": {"colour": "red"}}"#)
            .unwrap_err();
        assert!(err.error.contains("colour"), "unknown placement fields are refused: {}", err.error);
        // Label rules as the CLI sends them (topology and strategy may be null).
        let (spec, _) = parse_create(
            br#"{"name": "a", "vcpus": 1, "memory_mib": 512, "placement": {"strategy": null, "vm_affinity": [
                 {"selector": {"app": "db"}, "relation": "anti-affinity", "strength": "hard", "topology": null}]}}"#,
        )
        .unwrap();
        assert_eq!(spec.placement.vm_affinity[0].relation, novacron_types::Relation::AntiAffinity);
        let err = parse_create(
            br#"{"name": "a", "vcpus": 1, "memory_mib": 512, "placement": {"vm_affinity": [
                 {"selector": {"app": "db"}, "relation": "affinity", "strength": "none"}]}}"#,
        )
        .unwrap_err();
        assert_eq!(err.field.as_deref(), Some("placement.vm_affinity[0].strength"), "{}", err.error);
        let err =
            parse_create(br#"{"name": "a", "vcpus": 1, "memory_mib": 512, "placement": {"group_affinity": "hard"}}"#)
                .unwrap_err();
        assert!(err.error.contains("needs the VM to have a group"), "{}", err.error);
    }
}
