//! The OpenAPI 3.1 document of the HTTP API, served at `/api/v1/openapi.json`.
//!
//! Built from one table of operations; request and response schemas are generated (schemars)
//! from the types the handlers parse and print, so they cannot drift from the code. A test
//! checks the table against the router: every route is documented, every documented operation
//! is routed.

use schemars::JsonSchema;
use schemars::generate::{SchemaGenerator, SchemaSettings};
use serde_json::{Map, Value, json};

/// One documented operation.
struct Op {
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    /// Query parameters: (name, JSON type, description).
    query: &'static [(&'static str, &'static str, &'static str)],
    /// The request body's schema, if any.
    body: Option<Value>,
    /// The success status and its body's schema (`None`: described in the summary).
    ok: (u16, Option<Value>),
}

/// Every operation under `/api/v1`, plus health, readiness and metrics.
fn operations(g: &mut SchemaGenerator) -> Vec<Op> {
    use novacron_state::{HostView, StateSummary, VmView};
    let vm = sub::<VmView>(g);
    let vms = sub::<Vec<VmView>>(g);
    let host = sub::<HostView>(g);
    let hosts = sub::<Vec<HostView>>(g);
    let policy = sub::<crate::api::PolicySource>(g);
    let op = |method, path, summary, ok: (u16, Option<Value>)| Op { method, path, summary, query: &[], body: None, ok };
    vec![
        op("get", "/healthz", "Liveness: 200 while the process serves HTTP.", (200, None)),
        op(
            "get",
            "/readyz",
            "Readiness: 200 once caught up with the log and connected to NATS (leader or standby), else 503; says which.",
            (200, None),
        ),
        op("get", "/metrics", "Prometheus metrics (text exposition format).", (200, None)),
        op("get", "/api/v1/openapi.json", "This document.", (200, None)),
        op(
            "get",
            "/api/v1/state",
            "The folded state's sequence, hash and counts (the same hash `novacron state` replays).",
            (200, Some(sub::<StateSummary>(g))),
        ),
        Op {
            query: &[("from", "integer", "First log sequence to send (default: the next event appended).")],
            ..op(
                "get",
                "/api/v1/stream",
                "WebSocket: one JSON text message per logged event (the shape of `novacron events -o json`), in order, until the client closes or the orchestrator stops.",
                (101, None),
            )
        },
        op("get", "/api/v1/leader", "This replica's role, the leader's API address and the elected term.", (200, None)),
        Op {
            query: &[("all", "boolean", "Include deleted VMs.")],
            ..op("get", "/api/v1/vms", "VMs, in id order.", (200, Some(vms.clone())))
        },
        Op {
            body: Some(sub::<crate::api::CreateVmBody>(g)),
            ..op(
                "post",
                "/api/v1/vms",
                "Create a VM (placed at once when it fits, else pending with the reason); with `count`, that many (`NAME-1`…), answered with an array.",
                (201, Some(vm.clone())),
            )
        },
        op("get", "/api/v1/vms/{id}", "One VM, by id or name.", (200, Some(vm.clone()))),
        op(
            "delete",
            "/api/v1/vms/{id}",
            "Delete a VM: it is stopped, then its resources are released.",
            (202, Some(vm.clone())),
        ),
        Op {
            body: Some(sub::<crate::api::MigrateBody>(g)),
            ..op(
                "post",
                "/api/v1/vms/{id}/migrate",
                "Live-migrate a VM to `to`, or to the planner's choice.",
                (202, None),
            )
        },
        Op {
            query: &[
                ("vm", "string", "Only decisions about this VM (id or name)."),
                ("limit", "integer", "At most this many, newest first."),
            ],
            ..op(
                "get",
                "/api/v1/decisions",
                "Placement and migration decisions with their explanations, newest first.",
                (200, None),
            )
        },
        op(
            "get",
            "/api/v1/decisions/{id}",
            "One decision (by event id) with its explanation: inputs read, hosts considered, rejections per filter, top candidates and their score components.",
            (200, None),
        ),
        op("get", "/api/v1/hosts", "Hosts, in id order.", (200, Some(hosts))),
        op("get", "/api/v1/hosts/{id}", "One host.", (200, Some(host))),
        op(
            "post",
            "/api/v1/hosts/{id}/{action}",
            "`cordon` (no new VMs), `drain` (live-migrate everything off) or `uncordon`.",
            (200, None),
        ),
        op(
            "get",
            "/api/v1/models",
            "Registered forecasting models, the promoted one, and live accuracy per version.",
            (200, None),
        ),
        Op {
            body: Some(sub::<novacron_types::model::ModelTrained>(g)),
            ..op(
                "post",
                "/api/v1/models",
                "Register a trained model (its artifact must be stored by digest).",
                (201, None),
            )
        },
        op("post", "/api/v1/models/{id}/promote", "Promote a registered model.", (200, None)),
        op("post", "/api/v1/models/rollback", "Go back to the previously promoted model.", (200, None)),
        op("get", "/api/v1/groups", "VM groups with their members and scaling state.", (200, None)),
        Op {
            body: Some(sub::<novacron_types::group::GroupSpec>(g)),
            ..op(
                "post",
                "/api/v1/groups",
                "Create a VM group, kept within its bounds and scaled to its CPU target.",
                (201, None),
            )
        },
        op("get", "/api/v1/groups/{name}", "One group.", (200, None)),
        op("delete", "/api/v1/groups/{name}", "Delete a group and its members.", (202, None)),
        op("get", "/api/v1/policies", "Policies in force and the policy-set version.", (200, None)),
        Op {
            body: Some(policy.clone()),
            ..op("post", "/api/v1/policies", "Apply policy documents (YAML or JSON text).", (201, None))
        },
        Op {
            body: Some(policy.clone()),
            ..op("post", "/api/v1/policies/validate", "Validate policy documents without applying them.", (200, None))
        },
        Op {
            body: Some(policy),
            ..op(
                "post",
                "/api/v1/policies/dry-run",
                "What applying the documents would do now: violations found and the actions planned, nothing written.",
                (200, None),
            )
        },
        op("get", "/api/v1/policies/{name}", "One policy.", (200, None)),
        op("delete", "/api/v1/policies/{name}", "Remove a policy.", (200, None)),
    ]
}

/// The document.
#[must_use]
pub fn document() -> Value {
    let mut settings = SchemaSettings::draft2020_12();
    settings.definitions_path = "/components/schemas".into();
    settings.meta_schema = None;
    let mut g = settings.into_generator();
    let error = json!({ "$ref": "#/components/schemas/Error" });
    let mut paths = Map::new();
    for op in operations(&mut g) {
        let mut parameters: Vec<Value> = op
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }))
            .collect();
        parameters.extend(op.query.iter().map(|(name, ty, description)| {
            json!({ "name": name, "in": "query", "required": false, "description": description, "schema": { "type": ty } })
        }));
        let ok = match &op.ok.1 {
            Some(schema) => {
                json!({ "description": "success", "content": { "application/json": { "schema": schema } } })
            }
            None => json!({ "description": "success" }),
        };
        let mut responses = Map::new();
        responses.insert(op.ok.0.to_string(), ok);
        if op.path.starts_with("/api/") && op.path != "/api/v1/openapi.json" {
            for (code, why) in [
                ("400", "bad input; `field` names it"),
                ("401", "an API token is configured and the request lacks it"),
                ("404", "no such object"),
                ("409", "conflicts with the state (a name taken, a VM not running, …)"),
                ("503", "this replica does not lead (`leader` names the one that does) or the log is unreachable"),
            ] {
                responses.insert(
                    code.into(),
                    json!({ "description": why, "content": { "application/json": { "schema": error } } }),
                );
            }
        }
        let mut operation = json!({ "summary": op.summary, "responses": responses });
        if !parameters.is_empty() {
            operation["parameters"] = Value::Array(parameters);
        }
        if let Some(body) = op.body {
            operation["requestBody"] =
                json!({ "required": true, "content": { "application/json": { "schema": body } } });
        }
        let entry = paths.entry(op.path).or_insert_with(|| json!({}));
        entry[op.method] = operation;
    }
    let mut schemas = g.take_definitions(true);
    schemas.insert(
        "Error".into(),
        json!({
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": { "type": "string", "description": "what is wrong, for a person" },
                "field": { "type": "string", "description": "the input field at fault (400)" },
                "leader": { "type": "string", "description": "the leader's API (503 from a standby)" }
            }
        }),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "NovaCron orchestrator API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "An event-sourced VM orchestrator over NATS JetStream. Every write is decided by the leader and appended to the log before it is answered."
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": { "token": { "type": "http", "scheme": "bearer", "description": "Required when the orchestrator runs with --token / NOVACRON_TOKEN." } }
        },
        "security": [ {}, { "token": [] } ]
    })
}

/// `T`'s schema: a reference into `components/schemas` for named types.
fn sub<T: JsonSchema>(g: &mut SchemaGenerator) -> Value {
    g.subschema_for::<T>().to_value()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(method, path)` of every route the router declares, read from its source.
    fn routed() -> std::collections::BTreeSet<(String, String)> {
        let src = include_str!("api.rs");
        let mut out = std::collections::BTreeSet::new();
        for chunk in src.split(".route(\"").skip(1) {
            let path = chunk.split('"').next().unwrap().to_owned();
            let call = chunk.split(')').take(3).collect::<Vec<_>>().join(")");
            for method in ["get", "post", "delete", "put", "patch"] {
                let called = call.contains(&format!("{method}(")) || call.contains(&format!("routing::{method}("));
                let chained = call.contains(&format!(".{method}("));
                if called || chained {
                    out.insert((method.to_owned(), path.clone()));
                }
            }
        }
        out
    }

    #[test]
    fn every_route_is_documented_and_every_documented_operation_is_routed() {
        let doc = document();
        let mut documented = std::collections::BTreeSet::new();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for method in ops.as_object().unwrap().keys() {
                documented.insert((method.clone(), path.clone()));
            }
        }
        let mut routed = routed();
        // The dashboard page is not part of the API.
        routed.remove(&("get".to_owned(), "/".to_owned()));
        assert!(routed.len() > 25, "the router's routes were read: {routed:?}");
        let undocumented: Vec<_> = routed.difference(&documented).collect();
        let unrouted: Vec<_> = documented.difference(&routed).collect();
        assert!(undocumented.is_empty(), "routes missing from the OpenAPI document: {undocumented:?}");
        assert!(unrouted.is_empty(), "documented but not routed: {unrouted:?}");
    }

    /// `schemas/openapi.json` is the document as served; `make schemas` rewrites it.
    #[test]
    fn the_checked_in_document_is_the_served_one() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/openapi.json");
        let want = format!("{}\n", serde_json::to_string_pretty(&document()).unwrap());
        if std::env::var_os("NOVACRON_UPDATE_SCHEMAS").is_some() {
            std::fs::write(&path, &want).unwrap();
            return;
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "{} differs from the API's document: run `make schemas` and review the diff",
            path.display()
        );
    }

    #[test]
    fn every_reference_resolves_and_the_schemas_come_from_the_types() {
        let doc = document();
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for name in text.split("\"#/components/schemas/").skip(1).map(|r| r.split('"').next().unwrap()) {
            assert!(schemas.contains_key(name), "dangling reference to {name}");
        }
        let vm = &schemas["VmView"]["properties"];
        for field in ["id", "name", "status", "host", "generation", "vcpus", "memory_mib"] {
            assert!(vm.get(field).is_some(), "VmView lacks {field}: {vm}");
        }
        let create = &doc["paths"]["/api/v1/vms"]["post"]["requestBody"]["content"]["application/json"]["schema"];
        let create = &schemas[create["$ref"].as_str().unwrap().rsplit('/').next().unwrap()];
        assert!(create["properties"].get("count").is_some(), "the create body names count: {create}");
    }
}
