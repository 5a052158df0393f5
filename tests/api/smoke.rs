use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn a_task_goes_from_creation_to_completion() {
    let app = TestApp::spawn().await;
    let droplet = DropletServer::start(Behaviour::Ok).await;
    app.register(8, &["code_verification"], &droplet.endpoint)
        .await;
    let id = app
        .create_task(5, json!({"task_type": "verify", "title": "Verify", "required_capability": "code_verification", "payload": {"x": 1}}))
        .await;
    eventually(
        Duration::from_secs(5),
        "task assigned and dispatched",
        || {
            let d = droplet.clone();
            async move { d.executed().contains(&(id as i64)).then_some(()) }
        },
    )
    .await;
    let me = app.token(8, &["read", "write"]);
    let (s, b) = app
        .patch(
            &format!("/tasks/{id}"),
            &me,
            json!({"status": "in_progress"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = app
        .patch(
            &format!("/tasks/{id}"),
            &me,
            json!({"status": "completed", "result": {"ok": true}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let task = app.task(id).await;
    assert_eq!(task["status"], "completed");
    assert_eq!(task["assigned_droplet_id"], 8);
    assert_eq!(task["result"], json!({"ok": true}));
    assert_eq!(task["state_history"].as_array().unwrap().len(), 4);
}
