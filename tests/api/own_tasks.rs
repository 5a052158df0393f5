//! A droplet reads and moves the tasks assigned to it with the token it registers with, a
//! Registry token with no `permissions` claim (finding 6 of issue 24); such a token reads no
//! other droplet's tasks and writes nothing else, and a read-only token still may not write.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::fixture_droplet::*;
use crate::helpers::*;
use crate::real_mesh::{post_bare, task_for, Droplet2};

const SOON: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_permissionless_registry_token_reads_and_patches_its_own_tasks_only() {
    let Droplet2 {
        app,
        server,
        registry,
        ..
    } = Droplet2::start().await;
    let registration = json!({
        "droplet_id": 42, "name": "x", "endpoint": server.endpoint,
        "capabilities": ["a"], "version": "1.0.0", "status": "active"
    });
    let (s, b) = post_bare(&app, "/droplets/register", &registry, registration).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let other = FixtureDroplet::start(Mode::Accept).await;
    app.register(43, &["b"], &other.endpoint).await;
    let own = app.create_task(5, task_for("a", json!({}))).await;
    let theirs = app.create_task(5, task_for("b", json!({}))).await;
    for (task, holder) in [(own, 42), (theirs, 43)] {
        eventually(SOON, "the task is assigned", || async {
            (app.holder(task).await == ("assigned".to_string(), Some(holder))).then_some(())
        })
        .await;
    }

    // Its own tasks: listed, read, moved.
    let (s, b) = app.get("/tasks?assigned_droplet_id=42", &registry).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let ids: Vec<i64> = b["payload"]["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [own as i64]);
    let (s, b) = app.get(&format!("/tasks/{own}"), &registry).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["payload"]["task"]["id"], own);
    for status in ["in_progress", "completed"] {
        let (s, b) = app
            .patch(
                &format!("/tasks/{own}"),
                &registry,
                json!({"status": status, "result": {"ok": true}}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{status}: {b}");
        assert_eq!(b["payload"]["status"], status);
    }

    // Nobody else's, and nothing else.
    for path in [
        "/tasks".to_string(),
        "/tasks?assigned_droplet_id=43".to_string(),
        format!("/tasks/{theirs}"),
        format!("/tasks/{theirs}/explain"),
        "/droplets".to_string(),
    ] {
        let (s, b) = app.get(&path, &registry).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{path}: {b}");
    }
    let (s, b) = app
        .patch(
            &format!("/tasks/{theirs}"),
            &registry,
            json!({"status": "in_progress"}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    let (s, b) = app
        .post("/tasks", &registry, task_for("a", json!({})))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert_eq!(app.holder(theirs).await, ("assigned".to_string(), Some(43)));

    // A read-only dashboard token of the same droplet reads but never writes.
    let reader = app.token(43, &["read"]);
    let (s, b) = app.get("/tasks?assigned_droplet_id=43", &reader).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = app
        .patch(
            &format!("/tasks/{theirs}"),
            &reader,
            json!({"status": "in_progress"}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert_eq!(app.holder(theirs).await, ("assigned".to_string(), Some(43)));
}
