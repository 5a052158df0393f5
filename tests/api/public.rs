//! The public endpoints: `/health`, `/capabilities`, `/state`, `/dependencies` and
//! `GET /management/version`, bare JSON without a token, with the spec's names and values.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::*;

/// GETs a public path without a token.
async fn public(app: &TestApp, path: &str) -> (StatusCode, Value) {
    app.request(Method::GET, path, None, None).await
}

fn is_utc_iso(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|s| s.ends_with('Z') && chrono::DateTime::parse_from_rfc3339(s).is_ok())
}

#[tokio::test]
async fn health_answers_the_spec_fields_without_a_token() {
    let app = TestApp::spawn().await;
    let (status, body) = public(&app, "/health").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["id"], 10);
    assert_eq!(body["name"], "Orchestrator");
    assert_eq!(body["steward"], "Tnsae");
    assert_eq!(body["status"], "active");
    assert_eq!(body["endpoint"], "https://drop10.fullpotential.ai");
    assert_eq!(body["message"], "All systems operational");
    assert!(is_utc_iso(&body["updated_at"]), "{body}");
    // Bare JSON, not an envelope.
    assert!(body.get("payload").is_none());
}

#[tokio::test]
async fn health_reports_the_configured_identity() {
    let app = TestApp::spawn_with(&[
        ("DROPLET_ID", "11"),
        ("DROPLET_NAME", "Orchestrator B"),
        ("DROPLET_STEWARD", "Someone"),
        ("DROPLET_ENDPOINT", "https://b.example"),
    ])
    .await;
    let (_, body) = public(&app, "/health").await;
    assert_eq!(body["id"], 11);
    assert_eq!(body["name"], "Orchestrator B");
    assert_eq!(body["steward"], "Someone");
    assert_eq!(body["endpoint"], "https://b.example");
}

#[tokio::test]
async fn capabilities_are_exactly_the_spec() {
    let app = TestApp::spawn().await;
    let (status, body) = public(&app, "/capabilities").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({
            "version": "2.0.0",
            "features": [
                "task_routing",
                "droplet_discovery",
                "health_monitoring",
                "workflow_management",
                "real_time_updates",
                "task_recovery",
                "state_machine_management",
                "priority_queuing",
                "automatic_retry"
            ],
            "dependencies": ["registry"],
            "udc_version": "1.0"
        })
    );
}

#[tokio::test]
async fn state_reports_this_process_and_correctly_labelled_counts() {
    let app = TestApp::spawn().await;
    // Droplet 8 runs `x`; droplet 9 is registered then deactivated.
    let droplet = DropletServer::start(Behaviour::Ok).await;
    app.register(8, &["x"], &droplet.endpoint).await;
    app.register(9, &["y"], &dead_endpoint()).await;
    let (s, b) = app
        .request(
            Method::POST,
            "/droplets/9/deactivate",
            Some(&app.admin()),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    // Two tasks nobody can run stay pending; one goes to droplet 8 and is started.
    for title in ["a", "b"] {
        app.create_task(
            5,
            json!({"task_type": "t", "title": title, "required_capability": "nobody"}),
        )
        .await;
    }
    let running = app
        .create_task(
            5,
            json!({"task_type": "t", "title": "run", "required_capability": "x"}),
        )
        .await;
    let assigned = app
        .create_task(
            5,
            json!({"task_type": "t", "title": "wait", "required_capability": "x"}),
        )
        .await;
    let app_ref = &app;
    for id in [running, assigned] {
        eventually(Duration::from_secs(10), "task assigned", || async move {
            (app_ref.task_status(id).await == "assigned").then_some(())
        })
        .await;
    }
    let (s, b) = app
        .patch(
            &format!("/tasks/{running}"),
            &app.token(8, &["write"]),
            json!({"status": "in_progress"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");

    let body = eventually(Duration::from_secs(10), "a process sample", || async {
        let (status, body) = public(&app, "/state").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        (body["memory_mb"].as_f64().unwrap_or(0.0) > 0.0).then_some(body)
    })
    .await;
    assert!(
        body["cpu_percent"].as_f64().is_some_and(|c| c >= 0.0),
        "{body}"
    );
    assert!(body["uptime_seconds"].as_u64().is_some(), "{body}");
    let m = &body["custom_metrics"];
    assert_eq!(m["tasks_pending"], 2, "{body}");
    assert_eq!(m["tasks_assigned"], 1, "{body}");
    assert_eq!(m["tasks_in_progress"], 1, "{body}");
    assert_eq!(m["tasks_active"], 2, "assigned + in progress: {body}");
    assert_eq!(m["droplets_active"], 1, "{body}");
    assert_eq!(m["droplets_total"], 2, "{body}");
    assert!(m["num_threads"].as_u64().is_some_and(|n| n >= 1), "{body}");
}

#[tokio::test]
async fn state_uptime_grows() {
    let app = TestApp::spawn().await;
    let (_, first) = public(&app, "/state").await;
    let first = first["uptime_seconds"].as_u64().expect("uptime");
    eventually(Duration::from_secs(10), "uptime to grow", || async {
        let (_, b) = public(&app, "/state").await;
        (b["uptime_seconds"].as_u64() > Some(first)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn dependencies_say_the_registry_is_unconfigured_without_a_url() {
    let app = TestApp::spawn().await;
    let (status, body) = public(&app, "/dependencies").await;
    assert_eq!(status, StatusCode::OK);
    let required = body["required"].as_array().expect("required");
    assert_eq!(required.len(), 1);
    assert_eq!(required[0]["id"], 3);
    assert_eq!(required[0]["name"], "Registry v2");
    assert_eq!(required[0]["status"], "unconfigured");
    assert!(required[0].get("last_check").is_some());
    assert_eq!(
        body["optional"],
        json!([
            {"id": 5, "name": "Dashboard", "status": "unknown", "last_check": null},
            {"id": 8, "name": "Verifier", "status": "unknown", "last_check": null}
        ])
    );
    assert_eq!(body["missing"], json!([]));
}

#[tokio::test]
async fn dependencies_list_an_unreachable_registry_as_missing() {
    let app = TestApp::spawn_with(&[("REGISTRY_URL", &dead_endpoint())]).await;
    let (status, body) = public(&app, "/dependencies").await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(body["required"][0]["status"], "connected", "{body}");
    assert_ne!(body["required"][0]["status"], "unconfigured", "{body}");
    assert_eq!(body["missing"], json!(["registry"]), "{body}");
}

#[tokio::test]
async fn management_version_is_public() {
    let app = TestApp::spawn().await;
    let (status, body) = public(&app, "/management/version").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["version"], "2.0.0");
    assert_eq!(body["name"], "orchestrator");
    assert_eq!(body["udc_version"], "1.0");
}

#[tokio::test]
async fn an_unknown_route_is_a_404_in_the_contracts_shape() {
    let app = TestApp::spawn().await;
    let (status, body) = public(&app, "/no/such/route").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["detail"].is_string(), "{body}");
}
