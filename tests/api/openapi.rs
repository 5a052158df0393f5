//! `/openapi.json` is valid OpenAPI 3 and describes every route the router serves;
//! Swagger UI is at `/docs` when enabled.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::helpers::*;

/// Routes that are not API operations: Swagger UI's page and its assets.
const NOT_OPERATIONS: [&str; 3] = ["/docs", "/docs/", "/docs/{*rest}"];

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `(method, path)` the application's routers declare, read from their source: each
/// `.route("<path>", <method>(..).<method>(..))` under src/api and in src/lib.rs. Any other
/// way of adding routes there (`nest`, `route_service`, a path that is not a literal) fails
/// the scan, so a route cannot slip past this list.
fn declared_routes() -> BTreeSet<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src/api"), &mut files);
    files.push(root.join("src/lib.rs"));
    let mut routes = BTreeSet::new();
    for file in files {
        let source = std::fs::read_to_string(&file).expect("read source");
        for forbidden in [
            ".nest(",
            ".nest_service(",
            ".route_service(",
            "merge(SwaggerUi",
        ] {
            assert!(
                !source.contains(forbidden),
                "{}: routes added with {forbidden} are invisible to this test; use .route(\"..\", ..)",
                file.display()
            );
        }
        let mut rest = source.as_str();
        while let Some(at) = rest.find(".route(") {
            let after = &rest[at + ".route(".len()..];
            let trimmed = after.trim_start();
            let literal = trimmed.strip_prefix('"').unwrap_or_else(|| {
                panic!(
                    "{}: .route( without a literal path: {}",
                    file.display(),
                    &trimmed[..trimmed.len().min(60)]
                )
            });
            let end = literal.find('"').expect("closing quote");
            let path = literal[..end].to_string();
            // The method router: up to the parenthesis that closes `.route(`.
            let body = &literal[end + 1..];
            let mut depth = 1usize;
            let mut close = body.len();
            for (i, c) in body.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        if depth == 0 {
                            close = i;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let method_router = &body[..close];
            let mut found = false;
            for (i, c) in method_router.char_indices() {
                if c != '(' {
                    continue;
                }
                let start = method_router[..i]
                    .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .map_or(0, |p| p + 1);
                let m = method_router[start..i].trim_end_matches("_service");
                if METHODS.contains(&m) {
                    routes.insert((m.to_string(), path.clone()));
                    found = true;
                }
                assert!(
                    m != "any" && m != "on",
                    "{}: {path} uses {m}(..); list its methods",
                    file.display()
                );
            }
            assert!(
                found,
                "{}: no method found for route {path}: {method_router}",
                file.display()
            );
            rest = &body[close..];
        }
    }
    routes
}

/// The OpenAPI form of an axum path: `/{*rest}` stays as is (not an operation).
fn spec_operations(spec: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().expect("paths object") {
        for m in METHODS {
            if item.get(m).is_some() {
                ops.insert((m.to_string(), path.clone()));
            }
        }
    }
    ops
}

/// A concrete URL for a path template (ids that exist nowhere).
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|seg| if seg.starts_with('{') { "999999" } else { seg })
        .collect::<Vec<_>>()
        .join("/")
}

async fn spec_of(app: &TestApp) -> Value {
    let resp = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json().await.expect("openapi.json is JSON")
}

#[tokio::test]
async fn every_route_the_router_serves_is_in_the_spec_and_every_spec_path_is_served() {
    let app = TestApp::spawn_with(&[
        ("RATE_LIMIT_PER_MINUTE", "10000"),
        ("ENABLE_SWAGGER", "true"),
    ])
    .await;
    let spec = spec_of(&app).await;
    let declared = declared_routes();
    assert!(
        declared.len() >= 20,
        "suspiciously few routes found: {declared:?}"
    );
    let in_spec = spec_operations(&spec);
    // A trailing-slash alias of a described path (`/dashboard/`) is the same operation.
    let operations: BTreeSet<_> = declared
        .iter()
        .filter(|(_, p)| !NOT_OPERATIONS.contains(&p.as_str()))
        .filter(|(m, p)| {
            !(p.len() > 1
                && p.ends_with('/')
                && declared.contains(&(m.clone(), p.trim_end_matches('/').to_string())))
        })
        .cloned()
        .collect();
    let missing: Vec<_> = operations.difference(&in_spec).collect();
    assert!(
        missing.is_empty(),
        "routes missing from /openapi.json: {missing:?}"
    );
    let stale: Vec<_> = in_spec.difference(&operations).collect();
    assert!(
        stale.is_empty(),
        "operations in /openapi.json that no router declares: {stale:?}"
    );

    // Every declared route is really served: no token, so nothing is changed, and the
    // answer is the handler's (401, 422, ...) rather than the router's 404 or 405.
    for (method, path) in &declared {
        let url = app.url(&concrete(&path.replace("{*rest}", "swagger-ui.css")));
        let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap();
        let resp = app
            .client
            .request(method.clone(), url)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        assert_ne!(
            status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path} is not served"
        );
        assert!(
            !(status == StatusCode::NOT_FOUND && body.contains(r#""detail":"Not found""#)),
            "{method} {path} fell through to the router's 404: {body}"
        );
    }
}

#[tokio::test]
async fn openapi_json_is_valid_openapi_3() {
    let app = TestApp::spawn().await;
    let spec = spec_of(&app).await;
    assert!(
        spec["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.")),
        "{}",
        spec["openapi"]
    );
    assert_eq!(spec["info"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(spec["info"]["title"].is_string());
    let schemas = spec["components"]["schemas"]
        .as_object()
        .expect("component schemas");
    for name in [
        "RequestEnvelope",
        "ResponseEnvelope",
        "ErrorBody",
        "ValidationErrorBody",
        "FieldError",
    ] {
        assert!(schemas.contains_key(name), "schema {name} missing");
    }
    let bearer = &spec["components"]["securitySchemes"]["bearer"];
    assert_eq!(bearer["type"], "http");
    assert_eq!(bearer["scheme"], "bearer");

    // Every $ref resolves.
    let text = spec.to_string();
    for part in text.split("\"$ref\":\"").skip(1) {
        let target = &part[..part.find('"').unwrap()];
        let pointer = target
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("external $ref {target}"));
        assert!(spec.pointer(pointer).is_some(), "unresolved $ref {target}");
    }

    for (path, item) in spec["paths"].as_object().expect("paths") {
        assert!(path.starts_with('/'), "{path}");
        let template: BTreeSet<&str> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .collect();
        for (method, op) in item.as_object().unwrap() {
            assert!(
                METHODS.contains(&method.as_str()),
                "{path}: unexpected key {method}"
            );
            let responses = op["responses"]
                .as_object()
                .unwrap_or_else(|| panic!("{method} {path}: no responses"));
            assert!(!responses.is_empty(), "{method} {path}: no responses");
            for (code, r) in responses {
                assert!(
                    code.len() == 3 && code.parse::<u16>().is_ok(),
                    "{method} {path}: {code}"
                );
                assert!(
                    r["description"].is_string(),
                    "{method} {path} {code}: no description"
                );
            }
            let declared: BTreeSet<&str> = op["parameters"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .filter(|p| p["in"] == "path")
                        .filter_map(|p| p["name"].as_str())
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(declared, template, "{method} {path}: path parameters");
            let secured = op["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|r| r.get("bearer").is_some()));
            if secured {
                assert!(
                    responses.contains_key("401"),
                    "{method} {path}: 401 not described"
                );
                assert_eq!(
                    responses["401"]["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ErrorBody"
                );
                if let Some(body) = op.get("requestBody") {
                    let schema = &body["content"]["application/json"]["schema"];
                    assert_eq!(
                        schema["allOf"][0]["$ref"], "#/components/schemas/RequestEnvelope",
                        "{method} {path}"
                    );
                }
            }
            if responses.contains_key("429") {
                assert!(
                    responses["429"]["headers"]["Retry-After"].is_object(),
                    "{method} {path}"
                );
            }
        }
    }
    let mut ids = BTreeSet::new();
    for item in spec["paths"].as_object().unwrap().values() {
        for op in item.as_object().unwrap().values() {
            let id = op["operationId"].as_str().expect("operationId");
            assert!(ids.insert(id.to_string()), "operationId {id} is not unique");
        }
    }
    let create = &spec["paths"]["/tasks"]["post"];
    assert_eq!(
        create["requestBody"]["content"]["application/json"]["schema"]["allOf"][1]["properties"]
            ["payload"]["$ref"],
        "#/components/schemas/NewTask"
    );
    assert_eq!(
        create["responses"]["201"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/ResponseEnvelope"
    );
    assert_eq!(
        create["responses"]["422"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/ValidationErrorBody"
    );
    assert!(create["responses"]["429"].is_object());
    assert!(
        spec["paths"]["/health"]["get"]["responses"]
            .get("429")
            .is_none(),
        "/health is not rate limited"
    );
}

/// The full OpenAPI schema check of `openapi-spec-validator` (PyPI), where it is installed
/// (`pip install openapi-spec-validator`); the structural checks above run everywhere.
#[tokio::test]
async fn openapi_json_passes_openapi_spec_validator_when_installed() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import openapi_spec_validator"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("openapi-spec-validator is not installed; skipped");
        return;
    }
    let app = TestApp::spawn().await;
    let spec = spec_of(&app).await;
    let path = std::env::temp_dir().join(format!(
        "orchestrator-openapi-{}.json",
        uuid::Uuid::new_v4()
    ));
    std::fs::write(&path, spec.to_string()).unwrap();
    let out = std::process::Command::new("python3")
        .args(["-c", "import json, sys\nfrom openapi_spec_validator import validate\nvalidate(json.load(open(sys.argv[1])))", path.to_str().unwrap()])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn swagger_ui_is_served_at_docs_only_when_enabled() {
    let app = TestApp::spawn_with(&[("ENABLE_SWAGGER", "true")]).await;
    let resp = app.client.get(app.url("/docs/")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.text().await.unwrap().contains("swagger-ui"));
    let init = app
        .client
        .get(app.url("/docs/swagger-initializer.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(init.status(), StatusCode::OK);
    assert!(init.text().await.unwrap().contains("/openapi.json"));
    let redirect = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = redirect.get(app.url("/docs")).send().await.unwrap();
    assert!(resp.status().is_redirection());
    drop(app);

    let app = TestApp::spawn_with(&[("ENABLE_SWAGGER", "false")]).await;
    let resp = app.client.get(app.url("/docs/")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    // The description itself stays public.
    let resp = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

/// The schema of an operation's answer, with the description's components beside it, so
/// that its `$ref`s resolve when it is compiled on its own (OpenAPI 3.1 schemas are JSON
/// Schema 2020-12).
fn response_schema(spec: &Value, method: &str, path: &str, code: &str) -> Value {
    let mut schema = spec["paths"][path][method]["responses"][code]["content"]["application/json"]
        ["schema"]
        .clone();
    assert!(schema.is_object(), "{method} {path} {code}: no schema");
    schema["components"] = spec["components"].clone();
    schema
}

/// The payload schema an enveloped answer declares: the `$ref` inside its envelope.
fn payload_ref(spec: &Value, method: &str, path: &str) -> String {
    let schema =
        &spec["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"];
    assert_eq!(
        schema["allOf"][0]["$ref"], "#/components/schemas/ResponseEnvelope",
        "{method} {path}: {schema}"
    );
    schema["allOf"][1]["properties"]["payload"]["$ref"]
        .as_str()
        .unwrap_or_else(|| panic!("{method} {path}: no payload schema: {schema}"))
        .to_string()
}

/// Asserts a live answer holds to the schema the description gives it.
fn assert_conforms(spec: &Value, method: &str, path: &str, code: &str, body: &Value) {
    let schema = response_schema(spec, method, path, code);
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&schema)
        .unwrap_or_else(|e| panic!("{method} {path}: schema does not compile: {e}"));
    let errors: Vec<String> = validator
        .iter_errors(body)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {path} {code} does not match its schema: {errors:?}\n{body}"
    );
}

fn properties(spec: &Value, schema: &str) -> BTreeSet<String> {
    spec["components"]["schemas"][schema]["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("schema {schema} has no properties"))
        .keys()
        .cloned()
        .collect()
}

fn has_all(spec: &Value, schema: &str, wanted: &[&str]) {
    let have = properties(spec, schema);
    for w in wanted {
        assert!(have.contains(*w), "{schema} lacks {w}: {have:?}");
    }
}

/// Issue 17 in the description: fencing by attempt, capability contracts and explain.
#[tokio::test]
async fn the_spec_documents_attempts_contracts_and_explain() {
    let app = TestApp::spawn().await;
    let spec = spec_of(&app).await;

    let explain = "/tasks/{task_id}/explain";
    assert!(
        spec["paths"][explain]["get"].is_object(),
        "{explain} missing"
    );
    assert_eq!(
        payload_ref(&spec, "get", explain),
        "#/components/schemas/Explanation"
    );
    let reasons: BTreeSet<&str> = spec["components"]["schemas"]["Reason"]["enum"]
        .as_array()
        .unwrap_or_else(|| panic!("Reason enum: {}", spec["components"]["schemas"]["Reason"]))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        reasons,
        BTreeSet::from([
            "no_capable_droplet",
            "capable_droplets_inactive",
            "capable_droplets_full",
            "payload_rejected_by_contracts",
            "waiting_for_retry",
            "routing_paused",
            "emergency_stop",
            "queued_behind",
            "droplet_deferred",
            "droplet_draining",
            "key_at_limit",
            "key_rate_limited",
        ])
    );
    has_all(
        &spec,
        "Explanation",
        &[
            "task_id",
            "status",
            "attempt",
            "reason",
            "position",
            "retry_at",
            "candidates",
            "attempts",
            "time_in_state_seconds",
        ],
    );
    assert!(
        spec["components"]["schemas"]["Explanation"]["properties"]["reason"]
            .to_string()
            .contains("#/components/schemas/Reason"),
        "reason is a Reason"
    );
    has_all(
        &spec,
        "Candidate",
        &[
            "droplet_id",
            "status",
            "load",
            "max_concurrent_tasks",
            "why_not",
        ],
    );
    has_all(
        &spec,
        "AttemptDecision",
        &[
            "attempt",
            "chosen_droplet_id",
            "rule",
            "candidates",
            "ended_as",
        ],
    );

    // Fencing: the update's attempt, the task's and each history row's, and the 409.
    has_all(&spec, "TaskUpdate", &["attempt"]);
    has_all(&spec, "Task", &["attempt"]);
    has_all(&spec, "HistoryRow", &["attempt"]);
    has_all(&spec, "ListedTask", &["attempt"]);
    assert_eq!(
        payload_ref(&spec, "get", "/tasks/{task_id}"),
        "#/components/schemas/TaskDetail"
    );
    assert_eq!(
        payload_ref(&spec, "get", "/tasks"),
        "#/components/schemas/Listing"
    );
    let conflict = spec["paths"]["/tasks/{task_id}"]["patch"]["responses"]["409"]["description"]
        .as_str()
        .unwrap_or_default();
    assert!(
        conflict.contains("is on attempt") && conflict.contains("this update is for attempt"),
        "{conflict}"
    );

    // Contracts: declared at registration, shown by the capabilities endpoint.
    has_all(&spec, "Registration", &["capability_schemas"]);
    assert_eq!(
        payload_ref(&spec, "get", "/droplets/{droplet_id}/capabilities"),
        "#/components/schemas/Capabilities"
    );
    has_all(
        &spec,
        "Capabilities",
        &["capabilities", "capability_schemas"],
    );
}

/// The answers the description now details are what the server sends: a pending task's
/// explanation (no capable droplet; a full one with its candidates), a finished task's, the
/// task with its history, the listing (with and without payloads) and the capabilities.
#[tokio::test]
async fn the_answers_of_tasks_explain_and_capabilities_match_their_schemas() {
    let app = TestApp::spawn_with(&[("RATE_LIMIT_PER_MINUTE", "10000")]).await;
    let spec = spec_of(&app).await;
    let server = DropletServer::start(Behaviour::Ok).await;
    let (s, b) = app
        .post(
            "/droplets/register",
            &app.token(61, &["read", "write"]),
            serde_json::json!({
                "droplet_id": 61, "name": "droplet-61", "endpoint": server.endpoint,
                "capabilities": ["verify"], "max_concurrent_tasks": 1,
                "capability_schemas": {"verify": {"type": "object", "required": ["code_url"]}},
            }),
        )
        .await;
    assert!(s.is_success(), "{s} {b}");
    let task = |capability: &str| {
        serde_json::json!({"task_type": "verify", "title": "schema", "required_capability": capability,
                           "payload": {"code_url": "https://example.com/x"}})
    };
    let done = app.create_task(5, task("verify")).await;
    app.wait_assigned(done, 61, Duration::from_secs(10)).await;
    let full = app.create_task(5, task("verify")).await;
    let nobody = app.create_task(5, task("nobody-has-it")).await;
    let admin = app.admin();

    let explain = "/tasks/{task_id}/explain";
    let (s, b) = app.get(&format!("/tasks/{full}/explain"), &admin).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["payload"]["reason"], "capable_droplets_full", "{b}");
    assert!(b["payload"]["candidates"][0]["why_not"].is_string(), "{b}");
    assert_conforms(&spec, "get", explain, "200", &b);
    let (s, b) = app.get(&format!("/tasks/{nobody}/explain"), &admin).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["payload"]["reason"], "no_capable_droplet", "{b}");
    assert_conforms(&spec, "get", explain, "200", &b);

    assert_eq!(
        payload_ref(&spec, "patch", "/tasks/{task_id}"),
        "#/components/schemas/Updated"
    );
    for status in ["in_progress", "completed"] {
        let (s, b) = app.move_task(61, done, status).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        assert_conforms(&spec, "patch", "/tasks/{task_id}", "200", &b);
    }
    let (s, b) = app.get(&format!("/tasks/{done}/explain"), &admin).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["payload"]["attempts"][0]["chosen_droplet_id"], 61, "{b}");
    assert_conforms(&spec, "get", explain, "200", &b);

    let (s, b) = app.get(&format!("/tasks/{done}"), &admin).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["payload"]["task"]["attempt"], 1, "{b}");
    assert_conforms(&spec, "get", "/tasks/{task_id}", "200", &b);
    for query in ["", "?include=payload"] {
        let (s, b) = app.get(&format!("/tasks{query}"), &admin).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        assert_eq!(
            b["payload"]["tasks"].as_array().map(Vec::len),
            Some(3),
            "{b}"
        );
        assert_conforms(&spec, "get", "/tasks", "200", &b);
    }
    assert_eq!(
        payload_ref(&spec, "delete", "/tasks/{task_id}"),
        "#/components/schemas/Cancelled"
    );
    let (s, b) = app.delete(&format!("/tasks/{nobody}"), &admin).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["payload"]["status"], "cancelled", "{b}");
    assert_conforms(&spec, "delete", "/tasks/{task_id}", "200", &b);

    let (s, b) = app.get("/droplets/61/capabilities", &admin).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(
        b["payload"]["capability_schemas"]["verify"]["required"][0], "code_url",
        "{b}"
    );
    assert_conforms(
        &spec,
        "get",
        "/droplets/{droplet_id}/capabilities",
        "200",
        &b,
    );
}

/// Calls `method url` (a POST with an empty body) and asserts that the operation at `path`
/// declares `schema` as its payload and that the 200 answer holds to it; returns the answer.
async fn typed_answer(
    app: &TestApp,
    spec: &Value,
    token: &str,
    (method, path, url, schema): (&str, &str, &str, &str),
) -> Value {
    assert_eq!(
        payload_ref(spec, method, path),
        format!("#/components/schemas/{schema}"),
        "{method} {path}"
    );
    let (s, b) = if method == "get" {
        app.get(url, token).await
    } else {
        app.post(url, token, serde_json::json!({})).await
    };
    assert_eq!(s, StatusCode::OK, "{url}: {b}");
    assert_conforms(spec, method, path, "200", &b);
    b
}

/// The management answers are typed: each declares its payload's schema, and what the
/// service answers holds to it (pause, resume ending an emergency stop, reload, cache clear,
/// shutdown last).
#[tokio::test]
async fn the_management_answers_match_their_schemas() {
    let app = TestApp::spawn().await;
    let spec = spec_of(&app).await;
    let admin = app.admin();
    let jobs = "/management/scheduler/jobs";
    let pause = "/management/scheduler/jobs/{job_id}/pause";
    let resume = "/management/scheduler/jobs/{job_id}/resume";
    let calls: [(&str, &str, String, &str); 8] = [
        ("get", jobs, jobs.into(), "Jobs"),
        (
            "post",
            pause,
            format!("{jobs}/health_monitor/pause"),
            "JobChanged",
        ),
        (
            "post",
            resume,
            format!("{jobs}/health_monitor/resume"),
            "JobChanged",
        ),
        (
            "post",
            "/management/emergency-stop",
            "/management/emergency-stop".into(),
            "Stopped",
        ),
        (
            "post",
            resume,
            format!("{jobs}/task_router/resume"),
            "JobChanged",
        ),
        (
            "post",
            "/management/reload-config",
            "/management/reload-config".into(),
            "Reloaded",
        ),
        (
            "post",
            "/management/cache/clear",
            "/management/cache/clear".into(),
            "CacheCleared",
        ),
        (
            "post",
            "/management/shutdown",
            "/management/shutdown".into(),
            "ShuttingDown",
        ),
    ];
    for (method, path, url, schema) in calls {
        let b = typed_answer(&app, &spec, &admin, (method, path, &url, schema)).await;
        if url.ends_with("task_router/resume") {
            assert_eq!(b["payload"]["emergency_stop_ended"], true, "{b}");
        }
    }
}

/// The limits per key answer typed payloads (PUT, GET with live counts, DELETE), as the
/// spec declares them.
#[tokio::test]
async fn the_limits_answers_match_their_schemas() {
    let app = TestApp::spawn().await;
    let spec = spec_of(&app).await;
    let admin = app.admin();
    let one = "/management/limits/{key}";
    for (method, schema) in [("put", "KeyLimits"), ("delete", "LimitsRemoved")] {
        assert_eq!(
            payload_ref(&spec, method, one),
            format!("#/components/schemas/{schema}")
        );
    }
    let (s, b) = app
        .request(
            reqwest::Method::PUT,
            "/management/limits/tenant-a",
            Some(&admin),
            Some(envelope(serde_json::json!({ "max_in_flight": 2, "max_per_second": 1.5, "max_queued": 10, "weight": 3 }))),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_conforms(&spec, "put", one, "200", &b);
    let b = typed_answer(
        &app,
        &spec,
        &admin,
        (
            "get",
            "/management/limits",
            "/management/limits",
            "LimitsList",
        ),
    )
    .await;
    assert_eq!(b["payload"]["limits"][0]["weight"], 3, "{b}");
    let (s, b) = app.delete("/management/limits/tenant-a", &admin).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_conforms(&spec, "delete", one, "200", &b);
}

/// The metrics answers are typed: each declares its payload's schema, and what the service
/// answers (with work done, and a retention the windows reach past) holds to it.
#[tokio::test]
async fn the_metrics_answers_match_their_schemas() {
    let app = TestApp::spawn_with(&[("TASK_RETENTION_DAYS", "1")]).await;
    let spec = spec_of(&app).await;
    let server = DropletServer::start(Behaviour::Ok).await;
    app.register(62, &["verify"], &server.endpoint).await;
    let done = app
        .create_task(5, serde_json::json!({"task_type": "verify", "title": "metrics", "required_capability": "verify"}))
        .await;
    app.wait_assigned(done, 62, Duration::from_secs(10)).await;
    for status in ["in_progress", "completed"] {
        let (s, b) = app.move_task(62, done, status).await;
        assert_eq!(s, StatusCode::OK, "{b}");
    }
    app.create_task(5, serde_json::json!({"task_type": "other", "title": "waits", "required_capability": "nobody"}))
        .await;
    let reader = app.token(5, &["read"]);
    let calls: [(&str, &str, &str); 7] = [
        ("/ws/status", "/ws/status", "WsStatus"),
        ("/metrics/summary", "/metrics/summary", "Summary"),
        (
            "/metrics/tasks/performance",
            "/metrics/tasks/performance?time_range=7d",
            "TaskPerformance",
        ),
        ("/metrics/tasks/by-type", "/metrics/tasks/by-type", "ByType"),
        (
            "/metrics/tasks/by-type",
            "/metrics/tasks/by-type?time_range=1h",
            "ByType",
        ),
        (
            "/metrics/droplets/{droplet_id}/performance",
            "/metrics/droplets/62/performance",
            "DropletPerformance",
        ),
        ("/metrics/routing", "/metrics/routing", "Routing"),
    ];
    for (path, url, schema) in calls {
        typed_answer(&app, &spec, &reader, ("get", path, url, schema)).await;
    }
    let (_, b) = app
        .get("/metrics/tasks/performance?time_range=7d", &reader)
        .await;
    assert_eq!(b["payload"]["window_exceeds_retention"], true, "{b}");
    assert_eq!(b["payload"]["by_outcome"]["completed"], 1, "{b}");
    let (_, b) = app.get("/metrics/droplets/62/performance", &reader).await;
    assert_eq!(b["payload"]["tasks_completed"], 1, "{b}");
    assert_eq!(b["payload"]["current_load"]["total"], 0, "{b}");
    let (_, b) = app.get("/metrics/routing", &reader).await;
    assert_eq!(b["payload"]["pending_unroutable"], 1, "{b}");
}

/// The droplet answers are typed: registration (201, then 200), heartbeat, the list, one
/// droplet with its load and heartbeats, and an admin's deactivation and activation.
#[tokio::test]
async fn the_droplet_answers_match_their_schemas() {
    let app = TestApp::spawn().await;
    let spec = spec_of(&app).await;
    let me = app.token(63, &["read", "write"]);
    let admin = app.admin();
    let registration = serde_json::json!({
        "droplet_id": 63, "name": "droplet-63", "endpoint": dead_endpoint(), "capabilities": ["x"],
    });
    for code in ["201", "200"] {
        let (s, b) = app
            .post("/droplets/register", &me, registration.clone())
            .await;
        assert_eq!(s.as_str(), code, "{b}");
        assert_conforms(&spec, "post", "/droplets/register", code, &b);
    }
    let (s, b) = app
        .post(
            "/droplets/63/heartbeat",
            &me,
            serde_json::json!({"status": "active"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_conforms(&spec, "post", "/droplets/{droplet_id}/heartbeat", "200", &b);
    let calls: [(&str, &str, &str, &str); 4] = [
        ("get", "/droplets", "/droplets", "DropletList"),
        (
            "get",
            "/droplets/{droplet_id}",
            "/droplets/63",
            "DropletDetail",
        ),
        (
            "post",
            "/droplets/{droplet_id}/deactivate",
            "/droplets/63/deactivate",
            "AdminChange",
        ),
        (
            "post",
            "/droplets/{droplet_id}/activate",
            "/droplets/63/activate",
            "AdminChange",
        ),
    ];
    for call in calls {
        typed_answer(&app, &spec, &admin, call).await;
    }
    let (_, b) = app.get("/droplets/63", &admin).await;
    assert_eq!(
        b["payload"]["droplet"]["recent_heartbeats"][0]["status"], "active",
        "{b}"
    );
    assert_eq!(b["payload"]["droplet"]["current_load"]["total"], 0, "{b}");
}

/// `/message` and `/metrics/system/health` answer typed payloads too: each declares its
/// schema, and every answer `/message` gives (each command, each query, a heartbeat, an
/// event) and the health report hold to it, each fitting exactly one shape of the `oneOf`.
#[tokio::test]
async fn the_message_and_system_health_answers_match_their_schemas() {
    let app = TestApp::spawn().await;
    let spec = spec_of(&app).await;
    assert_eq!(
        payload_ref(&spec, "post", "/message"),
        "#/components/schemas/MessageAnswer"
    );
    let me = app.token(64, &["read", "write"]);
    let (s, b) = app
        .post(
            "/droplets/register",
            &me,
            serde_json::json!({"droplet_id": 64, "name": "droplet-64", "endpoint": dead_endpoint(), "capabilities": ["x"]}),
        )
        .await;
    assert!(s.is_success(), "{b}");
    let message = |message_type: &str, payload: Value| {
        let mut e = envelope(payload);
        e["message_type"] = serde_json::json!(message_type);
        e
    };
    let (s, created) = app
        .request(
            reqwest::Method::POST,
            "/message",
            Some(&me),
            Some(message(
                "command",
                serde_json::json!({"command": "create_task", "task_data": {"task_type": "t", "title": "typed", "required_capability": "nobody"}}),
            )),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{created}");
    assert_conforms(&spec, "post", "/message", "200", &created);
    let id = created["payload"]["task_id"].clone();
    let messages = [
        (
            "query",
            serde_json::json!({"query": "task_status", "task_id": id}),
        ),
        ("query", serde_json::json!({"query": "droplet_list"})),
        ("query", serde_json::json!({"query": "system_status"})),
        ("heartbeat", serde_json::json!({"status": "active"})),
        ("event", serde_json::json!({"anything": 1})),
        (
            "command",
            serde_json::json!({"command": "cancel_task", "task_id": id}),
        ),
    ];
    for (message_type, payload) in messages {
        let (s, b) = app
            .request(
                reqwest::Method::POST,
                "/message",
                Some(&me),
                Some(message(message_type, payload.clone())),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{payload}: {b}");
        assert_conforms(&spec, "post", "/message", "200", &b);
    }
    let reader = app.token(5, &["read"]);
    let b = typed_answer(
        &app,
        &spec,
        &reader,
        (
            "get",
            "/metrics/system/health",
            "/metrics/system/health",
            "SystemHealth",
        ),
    )
    .await;
    assert!(
        b["payload"]["jobs"]
            .as_array()
            .is_some_and(|j| !j.is_empty()),
        "{b}"
    );
    assert_eq!(b["payload"]["database"]["status"], "ok", "{b}");
}

/// The public answers are typed too: each declares its schema (bare JSON, no envelope), and
/// what the service answers holds to it.
#[tokio::test]
async fn the_public_answers_match_their_schemas() {
    let app = TestApp::spawn().await;
    let spec = spec_of(&app).await;
    let calls: [(&str, &str); 5] = [
        ("/health", "HealthAnswer"),
        ("/capabilities", "CapabilitiesAnswer"),
        ("/state", "StateAnswer"),
        ("/dependencies", "DependenciesAnswer"),
        ("/management/version", "VersionAnswer"),
    ];
    for (path, schema) in calls {
        let declared = &spec["paths"][path]["get"]["responses"]["200"]["content"]
            ["application/json"]["schema"]["$ref"];
        assert_eq!(
            declared.as_str(),
            Some(format!("#/components/schemas/{schema}").as_str()),
            "GET {path}"
        );
        let (status, body) = app.request(reqwest::Method::GET, path, None, None).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        assert_conforms(&spec, "get", path, "200", &body);
    }
    // POST /token (development: no admin token needed) answers its schema too.
    let declared = &spec["paths"]["/token"]["post"]["responses"]["200"]["content"]
        ["application/json"]["schema"]["$ref"];
    assert_eq!(declared, "#/components/schemas/TokenAnswer", "POST /token");
    let (status, body) = app
        .request(
            reqwest::Method::POST,
            "/token",
            None,
            Some(serde_json::json!({"droplet_id": 5, "permissions": ["read"]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_conforms(&spec, "post", "/token", "200", &body);
}
