//! Capability contracts (a droplet's JSON Schema for the task payloads it accepts: checked at
//! registration, at task creation and by the router) and `GET /tasks/{id}/explain` (every
//! reason a task waits, each produced by a real situation, and a finished task's attempts).

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use orchestrator::services::locks::DROPLET_FILL;
use orchestrator::services::task_router::route_pass;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::fixture_droplet::{FixtureDroplet, Mode};
use crate::helpers::*;

/// Loose enough for a loaded machine (CI, with the whole suite running on two cores, once
/// took more than 5 s to see an assignment here), as in routing.rs and recovery.rs. These
/// tests are about what explain says; routing.rs holds the tests of routing at once.
const SOON: Duration = Duration::from_secs(10);

/// The Verifier's contract: a `code_url` that is a URI, an optional language from a list,
/// nested options, tags, and a key that needs JSON-pointer escaping.
fn verify_schema() -> Value {
    json!({
        "type": "object",
        "required": ["code_url"],
        "properties": {
            "code_url": {"type": "string", "format": "uri"},
            "language": {"enum": ["rust", "python"]},
            "options": {"type": "object", "properties": {"depth": {"type": "integer"}}},
            "tags": {"type": "array", "items": {"type": "string"}},
            "a/b": {"type": "integer"}
        }
    })
}

/// Another contract for the same capability: a `language` is required, no `code_url`.
fn language_schema() -> Value {
    json!({
        "type": "object",
        "required": ["language"],
        "properties": {"language": {"type": "string", "minLength": 1}}
    })
}

/// Registers droplet `id` as itself with these schemas (and a limit, if any); the raw answer.
async fn register_with(
    app: &TestApp,
    id: i32,
    capabilities: &[&str],
    endpoint: &str,
    schemas: Option<Value>,
    max: Option<i64>,
) -> (StatusCode, Value) {
    let mut body = json!({
        "droplet_id": id, "name": format!("droplet-{id}"), "steward": "tests",
        "endpoint": endpoint, "capabilities": capabilities,
    });
    if let Some(s) = schemas {
        body["capability_schemas"] = s;
    }
    if let Some(m) = max {
        body["max_concurrent_tasks"] = json!(m);
    }
    app.post(
        "/droplets/register",
        &app.token(id, &["read", "write"]),
        body,
    )
    .await
}

async fn register_ok(
    app: &TestApp,
    id: i32,
    capabilities: &[&str],
    endpoint: &str,
    schemas: Option<Value>,
    max: Option<i64>,
) {
    let (s, b) = register_with(app, id, capabilities, endpoint, schemas, max).await;
    assert!(s.is_success(), "register {id}: {s} {b}");
}

fn task(capability: Option<&str>, priority: i64, payload: Value) -> Value {
    let mut t = json!({
        "task_type": "verify", "title": "contract test", "priority": priority, "payload": payload,
    });
    if let Some(c) = capability {
        t["required_capability"] = json!(c);
    }
    t
}

async fn post_task(app: &TestApp, body: Value) -> (StatusCode, Value) {
    app.post("/tasks", &app.token(5, &["read", "write"]), body)
        .await
}

async fn task_count(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM tasks")
        .fetch_one(&app.db)
        .await
        .unwrap()
}

async fn admin_post(app: &TestApp, path: &str) -> (StatusCode, Value) {
    app.request(Method::POST, path, Some(&app.admin()), None)
        .await
}

/// The explanation's payload, read with a read-only token.
async fn explain(app: &TestApp, id: i32) -> Value {
    let (s, b) = app
        .get(&format!("/tasks/{id}/explain"), &app.token(7, &["read"]))
        .await;
    assert_eq!(s, StatusCode::OK, "explain {id}: {b}");
    assert_eq!(b["message_type"], "response", "{b}");
    b["payload"].clone()
}

/// The `loc`s of a 422 answer, as a set.
fn locs(body: &Value) -> BTreeSet<String> {
    body["detail"]
        .as_array()
        .unwrap_or_else(|| panic!("a 422 list: {body}"))
        .iter()
        .map(|e| e["loc"].to_string())
        .collect()
}

fn loc(segments: &[&str]) -> String {
    json!(segments).to_string()
}

/// Starts then completes a task as its droplet.
async fn finish(app: &TestApp, droplet: i32, task: i32) {
    let (s, b) = app.move_task(droplet, task, "in_progress").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = app.move_task(droplet, task, "completed").await;
    assert_eq!(s, StatusCode::OK, "{b}");
}

/// The keys of an object, as a set.
fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

// ---------------------------------------------------------------------------
// Contracts at task creation.

#[tokio::test]
async fn a_payload_the_contract_refuses_is_a_422_per_rule_and_nothing_is_written() {
    let app = TestApp::spawn().await;
    let server = DropletServer::start(Behaviour::Ok).await;
    register_ok(
        &app,
        30,
        &["verify"],
        &server.endpoint,
        Some(json!({ "verify": verify_schema() })),
        None,
    )
    .await;

    // Two rules broken: one entry each, located in the task's payload.
    let (s, b) = post_task(
        &app,
        task(
            Some("verify"),
            5,
            json!({"code_url": "not a uri", "language": "cobol"}),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(
        locs(&b),
        BTreeSet::from([
            loc(&["body", "payload", "payload", "code_url"]),
            loc(&["body", "payload", "payload", "language"]),
        ]),
        "{b}"
    );
    for e in b["detail"].as_array().unwrap() {
        assert_eq!(e["type"], "contract_violation", "{b}");
        assert!(
            e["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "a message says what is wrong: {b}"
        );
    }

    // A wrong type, nested and escaped pointers, an array item.
    let (s, b) = post_task(&app, task(Some("verify"), 5, json!({"code_url": 5}))).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(
        locs(&b),
        BTreeSet::from([loc(&["body", "payload", "payload", "code_url"])])
    );
    let (s, b) = post_task(
        &app,
        task(
            Some("verify"),
            5,
            json!({"code_url": "https://example.com/r.git", "options": {"depth": "deep"}, "a/b": "x"}),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(
        locs(&b),
        BTreeSet::from([
            loc(&["body", "payload", "payload", "options", "depth"]),
            loc(&["body", "payload", "payload", "a/b"]),
        ]),
        "{b}"
    );
    let (s, b) = post_task(
        &app,
        task(
            Some("verify"),
            5,
            json!({"code_url": "https://example.com/r.git", "tags": ["ok", 3]}),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    let detail = b["detail"].as_array().unwrap();
    assert_eq!(detail.len(), 1, "{b}");
    let l = detail[0]["loc"].as_array().unwrap();
    assert_eq!(
        l[..4],
        [
            json!("body"),
            json!("payload"),
            json!("payload"),
            json!("tags")
        ],
        "{b}"
    );
    assert!(
        l[4] == json!("1") || l[4] == json!(1),
        "the item's index: {b}"
    );
    assert_eq!(l.len(), 5, "{b}");

    // A missing required property is a rule of the payload object itself.
    let (s, b) = post_task(&app, task(Some("verify"), 5, json!({}))).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(b["detail"].as_array().map(Vec::len), Some(1), "{b}");
    assert_eq!(
        b["detail"][0]["loc"],
        json!(["body", "payload", "payload"]),
        "{b}"
    );
    assert!(
        b["detail"][0]["msg"]
            .as_str()
            .is_some_and(|m| m.contains("code_url")),
        "the message names the missing property: {b}"
    );
    // No payload at all is the empty object: refused the same way.
    let mut no_payload = task(Some("verify"), 5, json!({}));
    no_payload.as_object_mut().unwrap().remove("payload");
    let (s, b) = post_task(&app, no_payload).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");

    // The same through /message's create_task.
    let mut message = envelope(json!({
        "command": "create_task",
        "task_data": task(Some("verify"), 5, json!({"code_url": 5})),
    }));
    message["message_type"] = json!("command");
    let (s, b) = app
        .request(
            Method::POST,
            "/message",
            Some(&app.token(5, &["read", "write"])),
            Some(message),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    let l = b["detail"][0]["loc"].as_array().unwrap();
    assert_eq!(
        l[l.len() - 2..],
        [json!("payload"), json!("code_url")],
        "{b}"
    );

    assert_eq!(task_count(&app).await, 0, "a refused task is never written");
    let history: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM task_state_history")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(history, 0);

    // A payload the contract accepts is created and routed to that droplet.
    let (s, b) = post_task(
        &app,
        task(
            Some("verify"),
            5,
            json!({"code_url": "https://example.com/r.git", "language": "rust",
                   "options": {"depth": 2}, "tags": ["a"], "a/b": 1}),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let id = b["payload"]["task_id"].as_i64().unwrap() as i32;
    assert_eq!(task_count(&app).await, 1);
    app.wait_assigned(id, 30, SOON).await;
}

#[tokio::test]
async fn a_droplet_without_a_contract_accepts_any_payload() {
    let app = TestApp::spawn().await;
    let server = DropletServer::start(Behaviour::Ok).await;
    // Only a droplet without a contract: anything goes.
    register_ok(&app, 33, &["verify"], &server.endpoint, None, None).await;
    let (s, b) = post_task(&app, task(Some("verify"), 5, json!({"code_url": 5}))).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let first = b["payload"]["task_id"].as_i64().unwrap() as i32;
    app.wait_assigned(first, 33, SOON).await;

    // With a strict droplet beside it, a payload only the free one accepts is still created,
    // and it is always the free one that gets it, though the strict one is less loaded.
    register_ok(
        &app,
        34,
        &["verify"],
        &server.endpoint,
        Some(json!({ "verify": verify_schema() })),
        None,
    )
    .await;
    let mut ids = vec![first];
    for i in 0..6 {
        let (s, b) = post_task(&app, task(Some("verify"), 5, json!({"anything": i}))).await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        ids.push(b["payload"]["task_id"].as_i64().unwrap() as i32);
    }
    for id in &ids {
        app.wait_assigned(*id, 33, SOON).await;
    }
    // A payload both accept may go to the strict one (it is the least loaded now).
    let (s, b) = post_task(
        &app,
        task(
            Some("verify"),
            5,
            json!({"code_url": "https://example.com/x"}),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let both = b["payload"]["task_id"].as_i64().unwrap() as i32;
    app.wait_assigned(both, 34, SOON).await;
}

#[tokio::test]
async fn the_router_gives_a_task_only_to_a_droplet_whose_contract_accepts_it() {
    let app = TestApp::spawn().await;
    let server = DropletServer::start(Behaviour::Ok).await;
    register_ok(
        &app,
        31,
        &["verify"],
        &server.endpoint,
        Some(json!({ "verify": verify_schema() })),
        None,
    )
    .await;
    register_ok(
        &app,
        32,
        &["verify"],
        &server.endpoint,
        Some(json!({ "verify": language_schema() })),
        None,
    )
    .await;
    // Both have room throughout; without contracts the least-loaded rule would spread
    // these over both.
    let mut expected = Vec::new();
    for i in 0..8 {
        let (payload, droplet) = if i % 2 == 0 {
            (json!({"code_url": format!("https://example.com/{i}")}), 31)
        } else {
            (json!({"language": "go"}), 32)
        };
        let (s, b) = post_task(&app, task(Some("verify"), 5, payload)).await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        expected.push((b["payload"]["task_id"].as_i64().unwrap() as i32, droplet));
    }
    for (id, droplet) in &expected {
        app.wait_assigned(*id, *droplet, SOON).await;
    }
    // The same tasks created while routing is paused, then routed in one pass.
    let (s, b) = admin_post(&app, "/management/scheduler/jobs/task_router/pause").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let mut batch = Vec::new();
    for i in 0..8 {
        let (payload, droplet) = if i % 2 == 0 {
            (json!({"language": "rust"}), 32)
        } else {
            (json!({"code_url": "https://example.com/b"}), 31)
        };
        let (s, b) = post_task(&app, task(Some("verify"), 5, payload)).await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        batch.push((b["payload"]["task_id"].as_i64().unwrap() as i32, droplet));
    }
    let (s, b) = admin_post(&app, "/management/scheduler/jobs/task_router/resume").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    for (id, droplet) in &batch {
        app.wait_assigned(*id, *droplet, SOON).await;
    }
    // The router's record of the choice names only the droplet whose contract accepts.
    let (id, droplet) = batch[0];
    let e = explain(&app, id).await;
    let attempt = &e["attempts"][0];
    assert_eq!(attempt["chosen_droplet_id"], droplet, "{e}");
    let considered: Vec<i64> = attempt["candidates"]
        .as_array()
        .unwrap_or_else(|| panic!("candidates: {e}"))
        .iter()
        .map(|c| c["droplet_id"].as_i64().unwrap())
        .collect();
    assert_eq!(considered, vec![i64::from(droplet)], "{e}");
    // A payload neither accepts is refused with the rules of the closest contract.
    let (s, b) = post_task(&app, task(Some("verify"), 5, json!({"other": 1}))).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(task_count(&app).await, 16);
}

// ---------------------------------------------------------------------------
// Contracts at registration.

#[tokio::test]
async fn a_schema_that_does_not_compile_refuses_the_registration() {
    let app = TestApp::spawn().await;
    let server = DropletServer::start(Behaviour::Ok).await;
    for (schemas, bad) in [
        (json!({"verify": {"type": 12}}), vec!["verify"]),
        (
            json!({"verify": {"$ref": "https://example.com/schema.json"}}),
            vec!["verify"],
        ),
        (
            json!({"verify": {"type": "object", "properties": {"x": {"minLength": "five"}}}}),
            vec!["verify"],
        ),
        // A contract for a capability the droplet does not declare.
        (json!({"ocr": {"type": "object"}}), vec!["ocr"]),
        (
            json!({"verify": {"type": 12}, "ocr": {"type": "object"}, "summarize": {"type": "object"}}),
            vec!["ocr", "verify"],
        ),
    ] {
        let (s, b) = register_with(
            &app,
            35,
            &["verify", "summarize"],
            &server.endpoint,
            Some(schemas.clone()),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{schemas}: {b}");
        let expected: BTreeSet<String> = bad
            .iter()
            .map(|c| loc(&["body", "payload", "capability_schemas", c]))
            .collect();
        assert_eq!(locs(&b), expected, "{schemas}: {b}");
        for e in b["detail"].as_array().unwrap() {
            let named = e["loc"][3].as_str().unwrap();
            assert!(
                e["msg"].as_str().is_some_and(|m| m.contains(named)),
                "the message names the capability: {b}"
            );
        }
        let (s, b) = app.get("/droplets/35", &app.admin()).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "nothing registered: {b}");
    }
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM droplets")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(rows, 0);

    // A registered droplet that sends a bad contract again keeps what it had.
    register_ok(
        &app,
        35,
        &["verify"],
        &server.endpoint,
        Some(json!({ "verify": verify_schema() })),
        None,
    )
    .await;
    let (s, b) = register_with(
        &app,
        35,
        &["verify", "ocr"],
        "http://127.0.0.1:9/elsewhere",
        Some(json!({"verify": {"type": 12}})),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    let (s, b) = app
        .get("/droplets/35/capabilities", &app.token(7, &["read"]))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["payload"]["capabilities"], json!(["verify"]), "{b}");
    assert_eq!(
        b["payload"]["capability_schemas"],
        json!({ "verify": verify_schema() }),
        "{b}"
    );
}

#[tokio::test]
async fn the_capabilities_endpoint_shows_the_contracts() {
    let app = TestApp::spawn().await;
    let server = DropletServer::start(Behaviour::Ok).await;
    let schemas = json!({ "verify": verify_schema(), "summarize": language_schema() });
    register_ok(
        &app,
        36,
        &["verify", "summarize", "ocr"],
        &server.endpoint,
        Some(schemas.clone()),
        None,
    )
    .await;
    register_ok(&app, 37, &["verify"], &server.endpoint, None, None).await;
    let reader = app.token(7, &["read"]);

    let (s, b) = app.get("/droplets/36/capabilities", &reader).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["payload"]["droplet_id"], 36, "{b}");
    assert_eq!(
        b["payload"]["capabilities"],
        json!(["verify", "summarize", "ocr"])
    );
    assert_eq!(b["payload"]["capability_schemas"], schemas, "{b}");

    let (s, b) = app.get("/droplets/37/capabilities", &reader).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["payload"]["capability_schemas"], json!({}), "{b}");

    // A re-registration without contracts drops them: anything goes again.
    register_ok(&app, 36, &["verify"], &server.endpoint, None, None).await;
    let (s, b) = app.get("/droplets/36/capabilities", &reader).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["payload"]["capability_schemas"], json!({}), "{b}");
    let (s, b) = app.get("/droplets/404/capabilities", &reader).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
}

// ---------------------------------------------------------------------------
// Explain: every reason a task waits.

#[tokio::test]
async fn explain_needs_read_permission_and_a_known_task() {
    let app = TestApp::spawn().await;
    let id = app.create_task(5, task_payload("x")).await;
    let (s, b) = app
        .request(Method::GET, &format!("/tasks/{id}/explain"), None, None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
    let (s, b) = app
        // (`write` implies `read`: only a token with neither is refused.)
        .get(&format!("/tasks/{id}/explain"), &app.token(7, &[]))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    let (s, b) = app.get("/tasks/999999/explain", &app.admin()).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert_eq!(b["detail"], "Task 999999 not found", "{b}");
    let e = explain(&app, id).await;
    assert_eq!(e["task_id"], id);
}

#[tokio::test]
async fn explain_no_capable_droplet() {
    let app = TestApp::spawn().await;
    let server = DropletServer::start(Behaviour::Ok).await;
    register_ok(&app, 40, &["translate"], &server.endpoint, None, None).await;
    let id = app.create_task(5, task(Some("ocr"), 5, json!({}))).await;
    let e = explain(&app, id).await;
    assert_eq!(e["reason"], "no_capable_droplet", "{e}");
    assert_eq!(e["task_id"], id);
    assert_eq!(e["status"], "pending");
    assert_eq!(e["attempt"], 0);
    assert_eq!(e["attempts"], json!([]), "{e}");
    assert_eq!(
        e["candidates"],
        json!([]),
        "the translator is no candidate: {e}"
    );
    assert!(
        keys(&e["time_in_state_seconds"]) == BTreeSet::from(["pending".to_string()]),
        "{e}"
    );
    assert!(e["time_in_state_seconds"]["pending"].as_f64().unwrap() >= 0.0);
    // The reason is real: a capable droplet takes it at once.
    register_ok(&app, 41, &["ocr"], &server.endpoint, None, None).await;
    app.wait_assigned(id, 41, SOON).await;
    let e = explain(&app, id).await;
    assert!(
        e.get("reason").is_none(),
        "an assigned task waits for nothing: {e}"
    );
    assert!(e.get("candidates").is_none(), "{e}");
}

#[tokio::test]
async fn explain_capable_droplets_inactive() {
    let app = TestApp::spawn().await;
    let server = DropletServer::start(Behaviour::Ok).await;
    register_ok(&app, 42, &["ocr"], &server.endpoint, None, None).await;
    let (s, b) = admin_post(&app, "/droplets/42/deactivate").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let id = app.create_task(5, task(Some("ocr"), 5, json!({}))).await;
    assert_eq!(route_pass(&app.state.routing()).await.unwrap(), 0);
    let e = explain(&app, id).await;
    assert_eq!(e["reason"], "capable_droplets_inactive", "{e}");
    let c = &e["candidates"];
    assert_eq!(c.as_array().map(Vec::len), Some(1), "{e}");
    assert_eq!(c[0]["droplet_id"], 42);
    assert_eq!(c[0]["status"], "inactive");
    assert_eq!(c[0]["load"], 0);
    assert!(c[0]["why_not"].is_string(), "{e}");
    assert!(c[0].get("violations").is_none(), "{e}");
    let (s, b) = admin_post(&app, "/droplets/42/activate").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    app.wait_assigned(id, 42, SOON).await;
}

#[tokio::test]
async fn explain_capable_droplets_full() {
    let app = TestApp::spawn().await;
    let server = DropletServer::start(Behaviour::Ok).await;
    register_ok(&app, 43, &["ocr"], &server.endpoint, None, Some(1)).await;
    let first = app.create_task(5, task(Some("ocr"), 5, json!({}))).await;
    app.wait_assigned(first, 43, SOON).await;
    let second = app.create_task(5, task(Some("ocr"), 5, json!({}))).await;
    assert_eq!(route_pass(&app.state.routing()).await.unwrap(), 0);
    let e = explain(&app, second).await;
    assert_eq!(e["reason"], "capable_droplets_full", "{e}");
    let c = &e["candidates"][0];
    assert_eq!(c["droplet_id"], 43, "{e}");
    assert_eq!(c["status"], "active");
    assert_eq!(c["load"], 1, "{e}");
    assert_eq!(c["max_concurrent_tasks"], 1, "{e}");
    assert!(
        c["why_not"].as_str().is_some_and(|w| w.contains("full")),
        "{e}"
    );
    // Room appears: the waiting task is taken.
    finish(&app, 43, first).await;
    app.wait_assigned(second, 43, SOON).await;
}

#[tokio::test]
async fn explain_payload_rejected_by_contracts() {
    let app = TestApp::spawn().await;
    let server = DropletServer::start(Behaviour::Ok).await;
    // Created while no droplet has a contract for the capability, so creation accepts it.
    let id = app
        .create_task(5, task(Some("verify"), 5, json!({"code_url": 5})))
        .await;
    register_ok(
        &app,
        44,
        &["verify"],
        &server.endpoint,
        Some(json!({ "verify": verify_schema() })),
        None,
    )
    .await;
    assert_eq!(route_pass(&app.state.routing()).await.unwrap(), 0);
    assert_eq!(app.holder(id).await, ("pending".to_string(), None));
    let e = explain(&app, id).await;
    assert_eq!(e["reason"], "payload_rejected_by_contracts", "{e}");
    let c = &e["candidates"];
    assert_eq!(c.as_array().map(Vec::len), Some(1), "{e}");
    assert_eq!(c[0]["droplet_id"], 44);
    assert_eq!(c[0]["status"], "active");
    assert!(c[0]["why_not"].is_string(), "{e}");
    let v = c[0]["violations"]
        .as_array()
        .unwrap_or_else(|| panic!("violations: {e}"));
    assert_eq!(v.len(), 1, "{e}");
    assert_eq!(v[0]["path"], json!(["code_url"]), "{e}");
    assert!(v[0]["message"].is_string(), "{e}");
    // A droplet whose contract accepts it (here: none at all) takes it.
    register_ok(&app, 45, &["verify"], &server.endpoint, None, None).await;
    app.wait_assigned(id, 45, SOON).await;
}

#[tokio::test]
async fn explain_waiting_for_retry_and_a_final_failure() {
    let app = TestApp::spawn_with(&[
        ("RETRY_BACKOFF_SECONDS", "3600"),
        ("RETRY_BACKOFF_MAX_SECONDS", "3600"),
    ])
    .await;
    let server = DropletServer::start(Behaviour::Ok).await;
    register_ok(&app, 46, &["ocr"], &server.endpoint, None, None).await;
    let mut retried = task(Some("ocr"), 5, json!({}));
    retried["max_retries"] = json!(2);
    let id = app.create_task(5, retried).await;
    app.wait_assigned(id, 46, SOON).await;
    let (s, b) = app.move_task(46, id, "in_progress").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let before = chrono::Utc::now();
    let (s, b) = app
        .patch(
            &format!("/tasks/{id}"),
            &app.token(46, &["read", "write"]),
            json!({"status": "failed", "error_message": "boom"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let after = chrono::Utc::now();
    let e = explain(&app, id).await;
    assert_eq!(e["status"], "failed", "{e}");
    assert_eq!(e["reason"], "waiting_for_retry", "{e}");
    let at = e["retry_at"]
        .as_str()
        .unwrap_or_else(|| panic!("retry_at: {e}"));
    assert!(at.ends_with('Z'), "{e}");
    let at = chrono::DateTime::parse_from_rfc3339(at).unwrap();
    let hour = chrono::Duration::seconds(3600);
    let slack = chrono::Duration::seconds(2);
    assert!(
        at >= before + hour - slack && at <= after + hour + slack,
        "retry_at one backoff after the failure: {e}"
    );
    assert_eq!(e["candidates"][0]["droplet_id"], 46, "{e}");
    assert_eq!(e["attempts"][0]["ended_as"], "failed", "{e}");
    assert!(
        keys(&e["time_in_state_seconds"]).contains("failed"),
        "waiting in failed counts: {e}"
    );

    // No retries left: nothing to wait for.
    let mut final_task = task(Some("ocr"), 5, json!({}));
    final_task["max_retries"] = json!(0);
    let id = app.create_task(5, final_task).await;
    app.wait_assigned(id, 46, SOON).await;
    let (s, b) = app.move_task(46, id, "in_progress").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = app.move_task(46, id, "failed").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let e = explain(&app, id).await;
    assert_eq!(e["status"], "failed");
    assert!(e.get("reason").is_none(), "{e}");
    assert!(e.get("candidates").is_none(), "{e}");
    assert_eq!(
        keys(&e["time_in_state_seconds"]),
        BTreeSet::from(["pending".into(), "assigned".into(), "in_progress".into()]),
        "{e}"
    );
}

#[tokio::test]
async fn explain_routing_paused() {
    let app = TestApp::spawn().await;
    let server = DropletServer::start(Behaviour::Ok).await;
    register_ok(&app, 47, &["ocr"], &server.endpoint, None, None).await;
    let (s, b) = admin_post(&app, "/management/scheduler/jobs/task_router/pause").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let id = app.create_task(5, task(Some("ocr"), 5, json!({}))).await;
    let e = explain(&app, id).await;
    assert_eq!(e["reason"], "routing_paused", "{e}");
    let c = &e["candidates"][0];
    assert_eq!(c["droplet_id"], 47, "{e}");
    assert!(
        c.get("why_not").is_none(),
        "the droplet itself could take it: {e}"
    );
    let (s, b) = admin_post(&app, "/management/scheduler/jobs/task_router/resume").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    app.wait_assigned(id, 47, SOON).await;
}

#[tokio::test]
async fn explain_emergency_stop() {
    let app = TestApp::spawn().await;
    let server = DropletServer::start(Behaviour::Ok).await;
    register_ok(&app, 48, &["ocr"], &server.endpoint, None, None).await;
    // The registration's own routing pass is over before the stop.
    eventually(SOON, "the registration's pass", || async {
        app.state.router.has_room_for(Some("ocr")).then_some(())
    })
    .await;
    let (s, b) = admin_post(&app, "/management/emergency-stop").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let id = app.create_task(5, task(Some("ocr"), 5, json!({}))).await;
    let e = explain(&app, id).await;
    assert_eq!(e["reason"], "emergency_stop", "{e}");
    assert_eq!(e["candidates"][0]["droplet_id"], 48, "{e}");
    let (s, b) = admin_post(&app, "/management/scheduler/jobs/task_router/resume").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    app.wait_assigned(id, 48, SOON).await;
}

/// `queued_behind` is what a task says while a capable, active droplet with room that
/// accepts it exists but no pass has taken it yet. To hold that state without racing the
/// router, the test holds the droplet's fill lock, as another replica filling that droplet
/// would: every pass skips the droplet (and the safety-net job runs once an hour).
#[tokio::test]
async fn explain_queued_behind_counts_the_tasks_the_router_takes_first() {
    let app = TestApp::spawn_with(&[("TASK_ROUTER_INTERVAL", "3600")]).await;
    let server = DropletServer::start(Behaviour::Ok).await;
    register_ok(&app, 49, &["ocr"], &server.endpoint, None, Some(1)).await;
    let internal: i32 = sqlx::query_scalar("SELECT id FROM droplets WHERE droplet_id = 49")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let mut lock = app.db.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1, $2)")
        .bind(DROPLET_FILL)
        .bind(internal)
        .execute(&mut *lock)
        .await
        .unwrap();

    // Another capability's urgent task is not ahead of these.
    let other = app.create_task(5, task(Some("other"), 1, json!({}))).await;
    let mut ids = Vec::new();
    for priority in [5, 1, 5, 10, 1] {
        ids.push(
            app.create_task(5, task(Some("ocr"), priority, json!({})))
                .await,
        );
    }
    // Routing order: priority, then age.
    let order = [ids[1], ids[4], ids[0], ids[2], ids[3]];
    assert_eq!(
        route_pass(&app.state.routing()).await.unwrap(),
        0,
        "the droplet is held"
    );
    for (position, id) in order.iter().enumerate() {
        let e = explain(&app, *id).await;
        assert_eq!(e["reason"], "queued_behind", "task {id}: {e}");
        assert_eq!(e["position"], position, "task {id}: {e}");
        let c = &e["candidates"][0];
        assert_eq!(c["droplet_id"], 49, "{e}");
        assert_eq!(c["load"], 0, "{e}");
        assert!(c.get("why_not").is_none(), "{e}");
    }
    assert_eq!(explain(&app, other).await["reason"], "no_capable_droplet");

    // Released: the router takes them one at a time (one slot), in the order of `position`.
    sqlx::query("SELECT pg_advisory_unlock($1, $2)")
        .bind(DROPLET_FILL)
        .bind(internal)
        .execute(&mut *lock)
        .await
        .unwrap();
    drop(lock);
    app.state.router.trigger();
    for (i, id) in order.iter().enumerate() {
        app.wait_assigned(*id, 49, SOON).await;
        // The rest now wait for room.
        if let Some(next) = order.get(i + 1) {
            let e = explain(&app, *next).await;
            assert_eq!(e["reason"], "capable_droplets_full", "{e}");
        }
        finish(&app, 49, *id).await;
    }
}

#[tokio::test]
async fn explain_of_a_completed_task_shows_its_attempts_and_time_in_each_state() {
    let app = TestApp::spawn().await;
    let server = DropletServer::start(Behaviour::Ok).await;
    register_ok(&app, 50, &["ocr"], &server.endpoint, None, None).await;
    register_ok(&app, 51, &["ocr"], &server.endpoint, None, Some(2)).await;
    let (s, b) = admin_post(&app, "/droplets/51/deactivate").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let id = app.create_task(5, task(Some("ocr"), 5, json!({}))).await;
    app.wait_assigned(id, 50, SOON).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    finish(&app, 50, id).await;
    let e = explain(&app, id).await;
    assert_eq!(e["task_id"], id);
    assert_eq!(e["status"], "completed");
    assert_eq!(e["attempt"], 1, "{e}");
    assert!(e.get("reason").is_none(), "{e}");
    assert!(e.get("candidates").is_none(), "{e}");
    let attempts = e["attempts"].as_array().unwrap_or_else(|| panic!("{e}"));
    assert_eq!(attempts.len(), 1, "{e}");
    let a = &attempts[0];
    assert_eq!(a["attempt"], 1, "{e}");
    assert_eq!(a["chosen_droplet_id"], 50, "{e}");
    assert!(a["rule"].as_str().is_some_and(|r| !r.is_empty()), "{e}");
    assert!(
        a["assigned_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z') && chrono::DateTime::parse_from_rfc3339(t).is_ok()),
        "{e}"
    );
    let considered: HashSet<i64> = a["candidates"]
        .as_array()
        .unwrap_or_else(|| panic!("{e}"))
        .iter()
        .map(|c| c["droplet_id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        considered,
        HashSet::from([50]),
        "the inactive one was no candidate: {e}"
    );
    assert_eq!(a["ended_as"], "completed", "{e}");
    assert!(
        a["ended_because"].is_string() || a["ended_because"].is_null(),
        "{e}"
    );
    let t = &e["time_in_state_seconds"];
    assert_eq!(
        keys(t),
        BTreeSet::from(["pending".into(), "assigned".into(), "in_progress".into()]),
        "{e}"
    );
    assert!(
        t["assigned"].as_f64().unwrap() >= 0.25,
        "held assigned ~0.3 s: {e}"
    );
    for k in ["pending", "in_progress"] {
        assert!(
            t[k].as_f64().is_some_and(|s| (0.0..60.0).contains(&s)),
            "{e}"
        );
    }
    // The trace id the explanation answers under is the request's.
    let trace = Uuid::new_v4().to_string();
    let resp = app
        .client
        .get(app.url(&format!("/tasks/{id}/explain")))
        .bearer_auth(app.token(7, &["read"]))
        .header("X-Trace-Id", &trace)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["trace_id"], trace.as_str(), "{body}");
}

/// A task refused by the droplet the router chose first, then completed by another: two
/// attempts, each with its own chosen droplet, the first ended back in `pending` because of
/// the refusal.
#[tokio::test]
async fn explain_of_a_task_refused_once_then_completed_elsewhere_shows_both_attempts() {
    let app = TestApp::spawn_with(&[("TASK_ROUTER_INTERVAL", "1")]).await;
    let good = DropletServer::start(Behaviour::Ok).await;
    let refusing = FixtureDroplet::start(Mode::Refuse).await;
    register_ok(&app, 52, &["ocr"], &good.endpoint, None, None).await;
    // Registered last: the freshest heartbeat, so the router tries it first.
    register_ok(&app, 53, &["ocr"], &refusing.endpoint, None, None).await;
    let id = app.create_task(5, task(Some("ocr"), 5, json!({}))).await;
    app.wait_assigned(id, 52, Duration::from_secs(10)).await;
    assert_eq!(refusing.executed(), [id as i64], "asked once");
    finish(&app, 52, id).await;

    let e = explain(&app, id).await;
    assert_eq!(e["status"], "completed", "{e}");
    assert_eq!(e["attempt"], 2, "{e}");
    let attempts = e["attempts"].as_array().unwrap_or_else(|| panic!("{e}"));
    assert_eq!(attempts.len(), 2, "{e}");
    let (first, second) = (&attempts[0], &attempts[1]);
    assert_eq!(first["attempt"], 1, "{e}");
    assert_eq!(first["chosen_droplet_id"], 53, "{e}");
    assert_eq!(first["ended_as"], "pending", "{e}");
    let why = first["ended_because"].as_str().unwrap_or_default();
    assert!(why.contains("refused"), "the refusal is named: {e}");
    assert_eq!(second["attempt"], 2, "{e}");
    assert_eq!(second["chosen_droplet_id"], 52, "{e}");
    assert_ne!(first["chosen_droplet_id"], second["chosen_droplet_id"]);
    assert_eq!(second["ended_as"], "completed", "{e}");
    let t = &e["time_in_state_seconds"];
    assert_eq!(
        keys(t),
        BTreeSet::from(["pending".into(), "assigned".into(), "in_progress".into()]),
        "{e}"
    );
    assert!(
        t["pending"].as_f64().is_some_and(|s| s >= 0.0)
            && t["assigned"].as_f64().is_some_and(|s| s > 0.0),
        "both stays in pending and in assigned count: {e}"
    );
}

/// `POST /tasks` retries are safe (CONTRACT.md): the same creator resending the same trace id
/// gets the task it already made (200), even if a contract that refuses its payload was
/// registered in between; another creator still gets 409. Nothing new is written.
#[tokio::test]
async fn a_retried_creation_gets_its_task_back_though_a_contract_now_refuses_it() {
    let app = TestApp::spawn().await;
    let server = DropletServer::start(Behaviour::Ok).await;
    let trace = Uuid::new_v4().to_string();
    let body = envelope_with_trace(&trace, task(Some("verify"), 5, json!({"code_url": 5})));
    let creator = app.token(5, &["read", "write"]);
    let (s, b) = app
        .request(Method::POST, "/tasks", Some(&creator), Some(body.clone()))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let id = b["payload"]["task_id"].clone();
    register_ok(
        &app,
        60,
        &["verify"],
        &server.endpoint,
        Some(json!({ "verify": verify_schema() })),
        None,
    )
    .await;
    let (s, b) = app
        .request(Method::POST, "/tasks", Some(&creator), Some(body.clone()))
        .await;
    assert_eq!(s, StatusCode::OK, "the retry gets the existing task: {b}");
    assert_eq!(b["payload"]["task_id"], id, "{b}");
    let (s, b) = app
        .request(
            Method::POST,
            "/tasks",
            Some(&app.token(6, &["read", "write"])),
            Some(body),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "another creator's trace id: {b}");
    assert_eq!(task_count(&app).await, 1);
}
