//! A NUL character (`\u0000`) is valid JSON and a valid query byte, but PostgreSQL's text
//! and jsonb refuse it: wherever it reaches the database the answer is a 422, never a 500,
//! and nothing changes (found by schemathesis, see RELIABILITY.md).

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn nul_characters_are_a_422_everywhere_and_change_nothing() {
    let app = TestApp::spawn().await;
    let admin = app.admin();
    let droplet = app.token(7, &["read", "write"]);
    app.register(7, &["a"], &dead_endpoint()).await;
    let task = app.create_task(7, task_payload("kept")).await;

    for path in [
        "/tasks?task_type=%00",
        "/tasks?required_capability=a%00",
        "/tasks?created_by=%00",
        "/droplets?capability=%00",
        "/metrics/tasks/performance?task_type=%00",
    ] {
        let (status, body) = app.get(path, &admin).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "GET {path}: {body}"
        );
        assert_eq!(body["detail"][0]["type"], "string_nul", "{body}");
    }
    let writes = [
        (
            Method::POST,
            "/tasks".to_string(),
            json!({"task_type": "t", "title": "a\u{0}"}),
        ),
        (
            Method::POST,
            "/tasks".to_string(),
            json!({"task_type": "t", "title": "a", "payload": {"x": "\u{0}"}}),
        ),
        (
            Method::POST,
            "/tasks".to_string(),
            json!({"task_type": "t", "title": "a", "concurrency_key": "k\u{0}"}),
        ),
        (
            Method::PUT,
            "/management/limits/k%00".to_string(),
            json!({"max_in_flight": 1}),
        ),
        (
            Method::POST,
            "/droplets/register".to_string(),
            json!({"droplet_id": 7, "name": "n\u{0}", "endpoint": "http://x", "capabilities": ["a"]}),
        ),
        (
            Method::POST,
            "/droplets/7/heartbeat".to_string(),
            json!({"status": "active", "metrics": {"m": "\u{0}"}}),
        ),
        (
            Method::PATCH,
            format!("/tasks/{task}"),
            json!({"status": "cancelled", "error_message": "x\u{0}"}),
        ),
    ];
    for (method, path, payload) in writes {
        let token = if path.starts_with("/droplets") {
            &droplet
        } else {
            &admin
        };
        let (status, body) = app
            .request(method.clone(), &path, Some(token), Some(envelope(payload)))
            .await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{method} {path}: {body}"
        );
    }
    let tasks: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tasks")
        .fetch_one(&app.db)
        .await
        .expect("count");
    assert_eq!(tasks, 1, "a refused creation left a row");
    let limits: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM key_limits")
        .fetch_one(&app.db)
        .await
        .expect("count");
    assert_eq!(limits, 0, "a refused limit left a row");
    let name: String = sqlx::query_scalar("SELECT name FROM droplets WHERE droplet_id = 7")
        .fetch_one(&app.db)
        .await
        .expect("droplet");
    assert_eq!(name, "droplet-7");
    assert_ne!(app.task_status(task).await, "cancelled");
}
