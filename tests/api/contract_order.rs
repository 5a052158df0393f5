//! A request whose body cannot be read still answers in the
//! contract's order (401, 403 permission, 404 exists, 403 may act on it, then 422) on tasks,
//! heartbeats and the management endpoints, and the compose file publishes no open
//! development `/token`.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use orchestrator::jobs::JobId;

use crate::fixture_droplet::*;
use crate::helpers::*;

const NOT_JSON: &str = "{not json";

/// A request with a raw JSON body; the answer's status and body.
async fn raw(
    app: &TestApp,
    method: Method,
    path: &str,
    token: &str,
    body: &str,
) -> (StatusCode, Value) {
    let resp = app
        .client
        .request(method, app.url(path))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("request sent");
    let status = StatusCode::from_u16(resp.status().as_u16()).expect("status");
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Asserts the status of each (what, method, path, token, body) request.
async fn expect_each(app: &TestApp, method: Method, cases: &[(&str, String, String, &str, u16)]) {
    for (what, path, token, body, status) in cases {
        let (s, b) = raw(app, method.clone(), path, token, body).await;
        assert_eq!(s.as_u16(), *status, "{what}: {method} {path}: {b}");
    }
}

async fn history_len(app: &TestApp, task: i32) -> usize {
    app.history(task).await.len()
}

/// A task assigned to droplet 8 (at a droplet that accepts it).
async fn task_assigned_to_8(app: &TestApp, droplet: &FixtureDroplet) -> i32 {
    app.register(8, &["review"], &droplet.endpoint).await;
    let id = app
        .create_task(
            5,
            json!({"task_type": "t", "title": "t", "required_capability": "review"}),
        )
        .await;
    app.wait_assigned(id, 8, Duration::from_secs(10)).await;
    id
}

#[tokio::test]
async fn a_patch_with_a_bad_body_is_404_for_an_unknown_task_and_403_for_anothers() {
    let app = TestApp::spawn_with(&[("TASK_ROUTER_INTERVAL", "1")]).await;
    let droplet = FixtureDroplet::start(Mode::Accept).await;
    let id = task_assigned_to_8(&app, &droplet).await;
    let before = history_len(&app, id).await;
    let bad_status = envelope(json!({"status": "sideways"})).to_string();
    let other = app.token(9, &["read", "write"]);
    let own = app.token(8, &["read", "write"]);
    let unknown = "/tasks/999999".to_string();
    let mine = format!("/tasks/{id}");
    expect_each(
        &app,
        Method::PATCH,
        &[
            (
                "unknown, not JSON",
                unknown.clone(),
                other.clone(),
                NOT_JSON,
                404,
            ),
            (
                "unknown, bad status",
                unknown.clone(),
                other.clone(),
                &bad_status,
                404,
            ),
            (
                "unknown, admin",
                unknown.clone(),
                app.admin(),
                NOT_JSON,
                404,
            ),
            (
                "another's, not JSON",
                mine.clone(),
                other.clone(),
                NOT_JSON,
                403,
            ),
            (
                "another's, bad status",
                mine.clone(),
                other.clone(),
                &bad_status,
                403,
            ),
            ("own, not JSON", mine.clone(), own.clone(), NOT_JSON, 422),
            (
                "own, bad status",
                mine.clone(),
                own.clone(),
                &bad_status,
                422,
            ),
            ("admin, not JSON", mine.clone(), app.admin(), NOT_JSON, 422),
        ],
    )
    .await;
    let (s, b) = raw(&app, Method::PATCH, &mine, &other, NOT_JSON).await;
    assert_eq!(
        b["detail"],
        format!("Task {id} is not assigned to droplet 9"),
        "{s} {b}"
    );
    let (_, b) = raw(&app, Method::PATCH, &mine, &own, &bad_status).await;
    assert_eq!(
        b["detail"][0]["loc"],
        json!(["body", "payload", "status"]),
        "{b}"
    );

    assert_eq!(app.holder(id).await, ("assigned".to_string(), Some(8)));
    assert_eq!(history_len(&app, id).await, before, "nothing was written");
}

#[tokio::test]
async fn a_cancel_with_a_bad_body_is_404_for_an_unknown_task_and_403_for_anothers() {
    let app = TestApp::spawn().await;
    let id = app.create_task(5, task_payload("to cancel")).await;
    let before = history_len(&app, id).await;
    let other = app.token(9, &["read", "write"]);
    let creator = app.token(5, &["read", "write"]);
    let unknown = "/tasks/999999".to_string();
    let mine = format!("/tasks/{id}");
    expect_each(
        &app,
        Method::DELETE,
        &[
            (
                "read-only, not JSON",
                mine.clone(),
                app.token(5, &["read"]),
                NOT_JSON,
                403,
            ),
            (
                "unknown, not JSON",
                unknown.clone(),
                other.clone(),
                NOT_JSON,
                404,
            ),
            (
                "unknown, admin",
                unknown.clone(),
                app.admin(),
                NOT_JSON,
                404,
            ),
            (
                "another's, not JSON",
                mine.clone(),
                other.clone(),
                NOT_JSON,
                403,
            ),
            (
                "another's, no envelope",
                mine.clone(),
                other.clone(),
                "{}",
                403,
            ),
            (
                "own, not JSON",
                mine.clone(),
                creator.clone(),
                NOT_JSON,
                422,
            ),
            ("own, no envelope", mine.clone(), creator.clone(), "{}", 422),
        ],
    )
    .await;
    assert_eq!(app.task_status(id).await, "pending");
    assert_eq!(history_len(&app, id).await, before, "nothing was written");

    // The happy paths are as they were: no body, or an envelope with a reason.
    let (s, b) = app.delete(&mine, &creator).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let second = app.create_task(5, task_payload("with a reason")).await;
    let (s, b) = app
        .request(
            Method::DELETE,
            &format!("/tasks/{second}"),
            Some(&creator),
            Some(envelope(json!({"reason": "not needed"}))),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let last = app.history(second).await.pop().expect("history");
    assert_eq!(last.3.as_deref(), Some("not needed"), "{last:?}");
}

#[tokio::test]
async fn a_heartbeat_with_a_bad_body_is_404_for_an_unknown_droplet_and_403_for_anothers() {
    let app = TestApp::spawn().await;
    app.register(6, &["x"], "http://127.0.0.1:9").await;
    let too_much =
        envelope(json!({"status": "active", "metrics": {"blob": "x".repeat(17_000)}})).to_string();
    let other = app.token(5, &["read", "write"]);
    let own = app.token(6, &["read", "write"]);
    let unknown = "/droplets/999/heartbeat".to_string();
    let sixes = "/droplets/6/heartbeat".to_string();
    expect_each(
        &app,
        Method::POST,
        &[
            (
                "unknown, not JSON",
                unknown.clone(),
                other.clone(),
                NOT_JSON,
                404,
            ),
            (
                "unknown, metrics too large",
                unknown.clone(),
                other.clone(),
                &too_much,
                404,
            ),
            (
                "unknown, admin",
                unknown.clone(),
                app.admin(),
                NOT_JSON,
                404,
            ),
            (
                "another's, not JSON",
                sixes.clone(),
                other.clone(),
                NOT_JSON,
                403,
            ),
            (
                "another's, metrics too large",
                sixes.clone(),
                other.clone(),
                &too_much,
                403,
            ),
            ("own, not JSON", sixes.clone(), own.clone(), NOT_JSON, 422),
            (
                "own, metrics too large",
                sixes.clone(),
                own.clone(),
                &too_much,
                422,
            ),
        ],
    )
    .await;
    let (_, b) = raw(&app, Method::POST, &unknown, &other, NOT_JSON).await;
    assert_eq!(b["detail"], "Droplet 999 not found");
    let (_, b) = raw(&app, Method::POST, &sixes, &other, NOT_JSON).await;
    assert_eq!(b["detail"], "Token of droplet 5 cannot act as droplet 6");

    let beats: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM heartbeats")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(beats, 0, "no refused heartbeat was recorded");
}

/// Management endpoints: a non-admin with a bad body is refused for the permission (403), an
/// unknown job is 404 before the body's 422, and a refused body changes nothing.
#[tokio::test]
async fn management_checks_the_permission_and_the_job_before_the_body() {
    let app = TestApp::spawn().await;
    let writer = app.token(5, &["read", "write"]);
    let paths = [
        "/management/scheduler/jobs/task_router/pause",
        "/management/scheduler/jobs/task_router/resume",
        "/management/reload-config",
        "/management/shutdown",
        "/management/emergency-stop",
        "/management/cache/clear",
    ];
    let mut cases: Vec<(&str, String, String, &str, u16)> = paths
        .iter()
        .map(|p| ("not an admin", p.to_string(), writer.clone(), NOT_JSON, 403))
        .collect();
    cases.push((
        "unknown job",
        "/management/scheduler/jobs/no_such_job/pause".into(),
        app.admin(),
        NOT_JSON,
        404,
    ));
    for p in paths {
        cases.push(("admin, not JSON", p.to_string(), app.admin(), NOT_JSON, 422));
    }
    expect_each(&app, Method::POST, &cases).await;
    assert!(!app.state.jobs.is_paused(JobId::TaskRouter));
    assert!(!app.state.emergency_stopped());
    assert!(!app.state.shutdown.is_cancelled(), "no shutdown");
    // The happy path is as it was.
    let (s, b) = app
        .post("/management/cache/clear", &app.admin(), json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
}

/// The `environment:` lines of the compose file's orchestrator service.
fn compose_orchestrator_environment() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml");
    let text = std::fs::read_to_string(path).expect("docker-compose.yml");
    let service = text
        .split("\n  orchestrator:\n")
        .nth(1)
        .expect("an orchestrator service");
    let environment = service
        .split("\n    environment:\n")
        .nth(1)
        .expect("the orchestrator's environment");
    environment
        .lines()
        .take_while(|l| l.starts_with("      ") || l.trim().is_empty())
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// The compose file publishes the port, so it must never run the open development mode
/// (anyone could mint an admin token at `POST /token`), and it passes the edge's bounds
/// through with the service's own defaults.
#[test]
fn docker_compose_runs_production_and_requires_a_jwt_secret() {
    let env = compose_orchestrator_environment();
    let value = |name: &str| {
        env.iter()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("{name} is not set in {env:?}"))
            .to_string()
    };
    assert_eq!(value("ENVIRONMENT"), "production");
    assert!(
        value("JWT_SECRET_KEY").starts_with("${JWT_SECRET_KEY:?"),
        "JWT_SECRET_KEY must be required: {}",
        value("JWT_SECRET_KEY")
    );
    for name in [
        "DISPATCH_PER_DROPLET_CONCURRENCY",
        "OUTBOUND_TOKEN_SECONDS",
        "WS_MAX_CONNECTIONS_PER_DROPLET",
        "WS_MAX_CONNECTIONS",
        "HEADER_READ_TIMEOUT_SECONDS",
        "MAX_CONNECTIONS",
    ] {
        let default = orchestrator::config::setting(name)
            .unwrap_or_else(|| panic!("{name} is a setting"))
            .default;
        assert_eq!(value(name), format!("${{{name}:-{default}}}"), "{name}");
    }
    // Unset means "no list": any network but the refused kinds.
    assert_eq!(
        value("ENDPOINT_ALLOWED_NETWORKS"),
        "${ENDPOINT_ALLOWED_NETWORKS:-}"
    );
}
