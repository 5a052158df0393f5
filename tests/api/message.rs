//! POST /message: every command and query, events and heartbeats; POST /send and /broadcast
//! against small droplet servers (one answers, one fails with 500, one never answers).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::*;

/// A full envelope of this message type around `payload`.
fn message(trace_id: &str, message_type: &str, payload: Value) -> Value {
    let mut e = envelope_with_trace(trace_id, payload);
    e["message_type"] = json!(message_type);
    e
}

async fn send_message(
    app: &TestApp,
    token: &str,
    message_type: &str,
    payload: Value,
) -> (StatusCode, Value, String) {
    let trace = Uuid::new_v4().to_string();
    let (s, b) = app
        .request(
            Method::POST,
            "/message",
            Some(token),
            Some(message(&trace, message_type, payload)),
        )
        .await;
    (s, b, trace)
}

fn writer(app: &TestApp, id: i32) -> String {
    app.token(id, &["read", "write"])
}

#[tokio::test]
async fn create_task_command_creates_the_task_under_the_envelopes_trace_id() {
    let app = TestApp::spawn().await;
    let (s, b, trace) = send_message(
        &app,
        &writer(&app, 5),
        "command",
        json!({"command": "create_task", "task_data": {"task_type": "verify", "title": "From a message", "priority": 2}}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["message_type"], "response");
    assert_eq!(b["trace_id"], trace.as_str());
    assert_eq!(b["target"], 5);
    assert_eq!(b["payload"]["created"], true);
    assert_eq!(b["payload"]["status"], "pending");
    let id = b["payload"]["task_id"].as_i64().unwrap() as i32;
    let task = app.task(id).await;
    assert_eq!(task["trace_id"], trace.as_str());
    assert_eq!(task["title"], "From a message");
    assert_eq!(task["priority"], 2);
    assert_eq!(task["created_by"], "5");
}

#[tokio::test]
async fn create_task_command_validates_task_data_like_post_tasks() {
    let app = TestApp::spawn().await;
    let (s, b, _) = send_message(
        &app,
        &writer(&app, 5),
        "command",
        json!({"command": "create_task", "task_data": {"task_type": "verify", "title": "x", "priority": 11}}),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(
        b["detail"][0]["loc"],
        json!(["body", "payload", "task_data", "priority"])
    );
    let (s, b, _) = send_message(
        &app,
        &writer(&app, 5),
        "command",
        json!({"command": "create_task"}),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(
        b["detail"][0]["loc"],
        json!(["body", "payload", "task_data"])
    );
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tasks")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(count, 0);
}

#[tokio::test]
async fn cancel_task_command_cancels_for_the_creator_only() {
    let app = TestApp::spawn().await;
    let id = app.create_task(5, task_payload("to cancel")).await;
    let (s, b, _) = send_message(
        &app,
        &writer(&app, 6),
        "command",
        json!({"command": "cancel_task", "task_id": id}),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    let (s, b, _) = send_message(
        &app,
        &writer(&app, 5),
        "command",
        json!({"command": "cancel_task", "task_id": id, "reason": "not needed"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["payload"]["status"], "cancelled");
    assert!(b["payload"]["cancelled_at"].is_string());
    assert_eq!(app.task_status(id).await, "cancelled");
    let reason: String = sqlx::query_scalar(
        "SELECT reason FROM task_state_history WHERE task_id = $1 AND to_status = 'cancelled'",
    )
    .bind(id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(reason, "not needed");
    // Cancelled is final: a second cancel is a 409, an unknown task a 404.
    let (s, _, _) = send_message(
        &app,
        &writer(&app, 5),
        "command",
        json!({"command": "cancel_task", "task_id": id}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _, _) = send_message(
        &app,
        &writer(&app, 5),
        "command",
        json!({"command": "cancel_task", "task_id": 999999}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn task_status_query_finds_tasks_by_id_or_trace_id() {
    let app = TestApp::spawn().await;
    let trace = Uuid::new_v4().to_string();
    let (s, b) = app
        .request(
            Method::POST,
            "/tasks",
            Some(&writer(&app, 5)),
            Some(envelope_with_trace(&trace, task_payload("status me"))),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let id = b["payload"]["task_id"].as_i64().unwrap();
    let reader = writer(&app, 7);

    let (s, b, echo) = send_message(
        &app,
        &reader,
        "query",
        json!({"query": "task_status", "task_id": id}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["trace_id"], echo.as_str());
    assert_eq!(b["payload"]["status"], "pending");
    assert_eq!(b["payload"]["task"]["id"], id);

    let (s, b, _) = send_message(
        &app,
        &reader,
        "query",
        json!({"query": "task_status", "trace_id": trace}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["payload"]["task_id"], id);
    assert_eq!(b["payload"]["task"]["title"], "status me");

    let (s, _, _) = send_message(
        &app,
        &reader,
        "query",
        json!({"query": "task_status", "trace_id": Uuid::new_v4().to_string()}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, b, _) = send_message(&app, &reader, "query", json!({"query": "task_status"})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    let (s, _, _) = send_message(
        &app,
        &reader,
        "query",
        json!({"query": "task_status", "trace_id": "not-a-uuid"}),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn droplet_list_query_filters_by_status_and_capability() {
    let app = TestApp::spawn().await;
    app.register(8, &["verify"], "http://127.0.0.1:9/a").await;
    app.register(9, &["translate"], "http://127.0.0.1:9/b")
        .await;
    app.register(11, &["verify"], "http://127.0.0.1:9/c").await;
    sqlx::query("UPDATE droplets SET status = 'inactive' WHERE droplet_id = 11")
        .execute(&app.db)
        .await
        .unwrap();
    let reader = writer(&app, 7);
    let ids = |b: &Value| -> Vec<i64> {
        b["payload"]["droplets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["droplet_id"].as_i64().unwrap())
            .collect()
    };
    let (s, b, _) = send_message(&app, &reader, "query", json!({"query": "droplet_list"})).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(ids(&b), [8, 9, 11]);
    assert_eq!(b["payload"]["total"], 3);
    let (_, b, _) = send_message(
        &app,
        &reader,
        "query",
        json!({"query": "droplet_list", "capability": "verify"}),
    )
    .await;
    assert_eq!(ids(&b), [8, 11]);
    let (_, b, _) = send_message(
        &app,
        &reader,
        "query",
        json!({"query": "droplet_list", "status": "active", "capability": "verify"}),
    )
    .await;
    assert_eq!(ids(&b), [8]);
    let (s, _, _) = send_message(
        &app,
        &reader,
        "query",
        json!({"query": "droplet_list", "status": "sleeping"}),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn system_status_query_reports_counts_scheduler_and_registry() {
    let app = TestApp::spawn().await;
    app.register(8, &["verify"], &dead_endpoint()).await;
    app.create_task(
        5,
        json!({"task_type": "t", "title": "x", "required_capability": "nobody"}),
    )
    .await;
    let (s, b, _) = send_message(
        &app,
        &writer(&app, 5),
        "query",
        json!({"query": "system_status"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let p = &b["payload"];
    assert_eq!(p["custom_metrics"]["tasks_pending"], 1);
    assert_eq!(p["custom_metrics"]["droplets_active"], 1);
    assert_eq!(p["custom_metrics"]["droplets_total"], 1);
    assert!(p["uptime_seconds"].is_u64());
    let jobs: Vec<&str> = p["scheduler"]["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    for id in [
        "health_monitor",
        "task_router",
        "registry_sync",
        "heartbeat_cleanup",
        "websocket_ping",
    ] {
        assert!(jobs.contains(&id), "{id} in {jobs:?}");
    }
    assert_eq!(p["registry"]["status"], "unconfigured");
}

#[tokio::test]
async fn unknown_commands_and_queries_are_422_naming_the_supported_ones() {
    let app = TestApp::spawn().await;
    let me = writer(&app, 5);
    let (s, b, _) = send_message(&app, &me, "command", json!({"command": "launch"})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(b["detail"][0]["loc"], json!(["body", "payload", "command"]));
    let msg = b["detail"][0]["msg"].as_str().unwrap();
    assert!(
        msg.contains("create_task") && msg.contains("cancel_task"),
        "{msg}"
    );

    let (s, b, _) = send_message(&app, &me, "query", json!({"query": "weather"})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    let msg = b["detail"][0]["msg"].as_str().unwrap();
    for q in ["task_status", "droplet_list", "system_status"] {
        assert!(msg.contains(q), "{msg}");
    }
    let (s, b, _) = send_message(&app, &me, "command", json!({})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(b["detail"][0]["type"], "missing");
}

#[tokio::test]
async fn message_needs_a_full_envelope_and_write_permission() {
    let app = TestApp::spawn().await;
    let (s, b) = app
        .request(
            Method::POST,
            "/message",
            Some(&writer(&app, 5)),
            Some(json!({"payload": {"query": "system_status"}})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    let locs: Vec<String> = b["detail"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["loc"][1].as_str().unwrap().to_string())
        .collect();
    assert!(locs.contains(&"trace_id".to_string()), "{locs:?}");
    let (s, _, _) = send_message(
        &app,
        &app.token(5, &["read"]),
        "query",
        json!({"query": "system_status"}),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = app
        .request(
            Method::POST,
            "/message",
            None,
            Some(message("t", "query", json!({"query": "system_status"}))),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn events_are_acknowledged() {
    let app = TestApp::spawn().await;
    let (s, b, trace) = send_message(
        &app,
        &writer(&app, 5),
        "event",
        json!({"event": "something_happened", "detail": 1}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["payload"]["received"], true);
    assert_eq!(b["trace_id"], trace.as_str());
}

#[tokio::test]
async fn heartbeat_message_updates_the_senders_heartbeat() {
    let app = TestApp::spawn().await;
    app.register(8, &["verify"], &dead_endpoint()).await;
    sqlx::query(
        "UPDATE droplets SET status = 'inactive', last_heartbeat = NOW() - interval '1 hour' WHERE droplet_id = 8",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let (s, b, _) = send_message(
        &app,
        &writer(&app, 8),
        "heartbeat",
        json!({"status": "active", "metrics": {"cpu_percent": 12.5}}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["payload"]["received"], true);
    assert_eq!(b["payload"]["droplet_id"], 8);
    assert_eq!(b["payload"]["status"], "active");
    let (status, fresh, metrics): (String, bool, Option<Value>) = sqlx::query_as(
        "SELECT d.status, d.last_heartbeat > NOW() - interval '1 minute', h.metrics
         FROM droplets d JOIN heartbeats h ON h.droplet_id = d.id WHERE d.droplet_id = 8",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(status, "active");
    assert!(fresh);
    assert_eq!(metrics, Some(json!({"cpu_percent": 12.5})));
    // Another droplet's token cannot beat for droplet 8; an unknown sender is a 404.
    let (s, _, _) = send_message(
        &app,
        &writer(&app, 9),
        "heartbeat",
        json!({"droplet_id": 8, "status": "active"}),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _, _) = send_message(&app, &writer(&app, 9), "heartbeat", json!({})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

// ---------------------------------------------------------------------------
// /send and /broadcast

async fn app_for_delivery() -> TestApp {
    TestApp::spawn_with(&[("DISPATCH_TIMEOUT_SECONDS", "1")]).await
}

fn query_payload(v: &Value) -> String {
    url::form_urlencoded::byte_serialize(v.to_string().as_bytes()).collect()
}

#[tokio::test]
async fn send_delivers_a_new_envelope_to_the_target() {
    let app = app_for_delivery().await;
    let droplet = DropletServer::start(Behaviour::Ok).await;
    app.register(8, &["verify"], &droplet.endpoint).await;
    let payload = json!({"command": "ping", "n": 1});
    let (s, b) = app
        .request(
            Method::POST,
            &format!(
                "/send?target_droplet_id=8&message_type=event&payload={}",
                query_payload(&payload)
            ),
            Some(&writer(&app, 5)),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["payload"]["status"], "delivered");
    let sent_trace = b["payload"]["trace_id"].as_str().unwrap().to_string();
    let got = droplet.messages();
    assert_eq!(got.len(), 1);
    let m = &got[0];
    // A relayed message: from the caller, the orchestrator named as the relay.
    assert_eq!(m["source"], 5);
    assert_eq!(m["target"], 8);
    assert_eq!(m["message_type"], "event");
    assert_eq!(
        m["payload"],
        json!({"command": "ping", "n": 1, "relayed_by": 10})
    );
    assert_eq!(m["trace_id"], sent_trace.as_str());
    assert_ne!(
        m["trace_id"], b["trace_id"],
        "a new trace id, not the request's"
    );

    // The message may come as an envelope body instead.
    let (s, b) = app
        .post(
            "/send?target_droplet_id=8",
            &writer(&app, 5),
            json!({"hello": "there"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let got = droplet.messages();
    assert_eq!(got.len(), 2);
    assert_eq!(
        got[1]["payload"],
        json!({"hello": "there", "relayed_by": 10})
    );
    assert_eq!(got[1]["message_type"], "command");
}

#[tokio::test]
async fn send_reports_a_failing_or_silent_droplet_as_502() {
    let app = app_for_delivery().await;
    let failing = DropletServer::start(Behaviour::Error500).await;
    let silent = DropletServer::start(Behaviour::Hang).await;
    app.register(8, &[], &failing.endpoint).await;
    app.register(9, &[], &silent.endpoint).await;
    let me = writer(&app, 5);
    let (s, b) = app
        .request(
            Method::POST,
            "/send?target_droplet_id=8&payload=%7B%7D",
            Some(&me),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{b}");
    assert!(b["detail"].as_str().unwrap().contains("HTTP 500"), "{b}");
    let (s, b) = app
        .request(
            Method::POST,
            "/send?target_droplet_id=9&payload=%7B%7D",
            Some(&me),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{b}");
    assert_eq!(
        b["detail"], "Delivery to droplet 9 failed: no answer within 1 s",
        "{b}"
    );
    assert_eq!(silent.messages().len(), 1);
}

#[tokio::test]
async fn send_refuses_unknown_inactive_and_malformed_requests() {
    let app = app_for_delivery().await;
    let droplet = DropletServer::start(Behaviour::Ok).await;
    app.register(8, &[], &droplet.endpoint).await;
    app.register(9, &[], &droplet.endpoint).await;
    sqlx::query("UPDATE droplets SET status = 'inactive' WHERE droplet_id = 9")
        .execute(&app.db)
        .await
        .unwrap();
    let me = writer(&app, 5);
    let post = |path: String| {
        let app = &app;
        let me = me.clone();
        async move { app.request(Method::POST, &path, Some(&me), None).await }
    };
    let (s, b) = post("/send?target_droplet_id=77&payload=%7B%7D".into()).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert_eq!(b["detail"], "Droplet 77 not found");
    let (s, b) = post("/send?target_droplet_id=9&payload=%7B%7D".into()).await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    assert!(b["detail"].as_str().unwrap().contains("inactive"), "{b}");
    let (s, b) = post("/send?payload=%7B%7D".into()).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(b["detail"][0]["loc"], json!(["query", "target_droplet_id"]));
    let (s, b) = post("/send?target_droplet_id=8&payload=not-json".into()).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(b["detail"][0]["loc"], json!(["query", "payload"]));
    let (s, _) = post("/send?target_droplet_id=8".into()).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, _) = post("/send?target_droplet_id=8&message_type=shout&payload=%7B%7D".into()).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, _) = app
        .request(
            Method::POST,
            "/send?target_droplet_id=8&payload=%7B%7D",
            Some(&app.token(5, &["read"])),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(droplet.messages().is_empty());
}

#[tokio::test]
async fn broadcast_reports_each_droplet_delivered_failed_or_timeout() {
    let app = app_for_delivery().await;
    let ok = DropletServer::start(Behaviour::Ok).await;
    let failing = DropletServer::start(Behaviour::Error500).await;
    let silent = DropletServer::start(Behaviour::Hang).await;
    let off = DropletServer::start(Behaviour::Ok).await;
    app.register(8, &["verify"], &ok.endpoint).await;
    app.register(9, &["verify"], &failing.endpoint).await;
    app.register(11, &["translate"], &silent.endpoint).await;
    app.register(12, &["verify"], &off.endpoint).await;
    app.register(13, &["verify"], &dead_endpoint()).await;
    sqlx::query("UPDATE droplets SET status = 'inactive' WHERE droplet_id = 12")
        .execute(&app.db)
        .await
        .unwrap();

    let (s, b) = app
        .request(
            Method::POST,
            "/broadcast?message_type=event&payload=%7B%22notice%22%3A1%7D",
            Some(&app.admin()),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let p = &b["payload"];
    assert_eq!(p["total"], 4, "{p}");
    assert_eq!(p["delivered"], 1);
    assert_eq!(p["failed"], 2);
    assert_eq!(p["timeout"], 1);
    let results = p["results"].as_array().unwrap();
    let of = |id: i64| results.iter().find(|r| r["droplet_id"] == id).unwrap();
    assert_eq!(of(8)["status"], "delivered");
    assert_eq!(of(9)["status"], "failed");
    assert_eq!(of(9)["reason"], "HTTP 500");
    assert_eq!(of(11)["status"], "timeout");
    assert_eq!(of(13)["status"], "failed");
    // In a word, never the transport's text (a closed port is just unreachable).
    assert_eq!(of(13)["reason"], "unreachable");
    assert!(results.iter().all(|r| r["droplet_id"] != 12));
    assert!(off.messages().is_empty(), "inactive droplets get nothing");
    let m = &ok.messages()[0];
    assert_eq!(m["payload"], json!({"notice": 1, "relayed_by": 10}));
    assert_eq!(m["message_type"], "event");
    // From the admin who broadcast it (droplet 1), relayed by the orchestrator.
    assert_eq!(m["source"], 1);
    assert_eq!(m["target"], 8);
    assert_eq!(m["trace_id"], p["trace_id"]);

    // With a capability filter, and the message from an envelope body.
    let (s, b) = app
        .post(
            "/broadcast?capability_filter=translate",
            &app.admin(),
            json!({"only": "translators"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["payload"]["total"], 1);
    assert_eq!(b["payload"]["results"][0]["droplet_id"], 11);
    assert_eq!(ok.messages().len(), 1);
}

#[tokio::test]
async fn broadcast_is_for_admins_only() {
    let app = app_for_delivery().await;
    let ok = DropletServer::start(Behaviour::Ok).await;
    app.register(8, &[], &ok.endpoint).await;
    let (s, b) = app
        .request(
            Method::POST,
            "/broadcast?payload=%7B%7D",
            Some(&writer(&app, 5)),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert!(b["detail"].as_str().unwrap().contains("admin"));
    assert!(ok.messages().is_empty());
}

#[tokio::test]
async fn nothing_is_sent_during_an_emergency_stop() {
    let app = app_for_delivery().await;
    let ok = DropletServer::start(Behaviour::Ok).await;
    app.register(8, &[], &ok.endpoint).await;
    app.state.jobs.emergency_stop(&app.state);
    for path in [
        "/send?target_droplet_id=8&payload=%7B%7D",
        "/broadcast?payload=%7B%7D",
    ] {
        let (s, b) = app
            .request(Method::POST, path, Some(&app.admin()), None)
            .await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{path}: {b}");
        assert!(b["detail"].as_str().unwrap().contains("Emergency stop"));
    }
    assert!(ok.messages().is_empty());
    app.state.jobs.end_emergency(&app.state);
    let (s, b) = app
        .request(
            Method::POST,
            "/send?target_droplet_id=8&payload=%7B%7D",
            Some(&app.admin()),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(ok.messages().len(), 1);
}

/// Droplet servers that answer only once `expected` messages are in, across all of them:
/// deliveries one after another would time out waiting for the others.
async fn rendezvous_droplets(expected: usize) -> Vec<String> {
    let arrived = Arc::new(AtomicUsize::new(0));
    let mut endpoints = Vec::new();
    for _ in 0..expected {
        let arrived = arrived.clone();
        let app = axum::Router::new().route(
            "/message",
            axum::routing::post(move || {
                let arrived = arrived.clone();
                async move {
                    arrived.fetch_add(1, Ordering::SeqCst);
                    while arrived.load(Ordering::SeqCst) < expected {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    axum::Json(json!({"received": true}))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        endpoints.push(format!("http://{}", listener.local_addr().unwrap()));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
    }
    endpoints
}

#[tokio::test]
async fn broadcast_delivers_to_all_droplets_at_once() {
    let app = TestApp::spawn_with(&[("DISPATCH_TIMEOUT_SECONDS", "3")]).await;
    let endpoints = rendezvous_droplets(3).await;
    for (i, endpoint) in endpoints.iter().enumerate() {
        app.register(20 + i as i32, &[], endpoint).await;
    }
    let (s, b) = app
        .request(
            Method::POST,
            "/broadcast?payload=%7B%7D",
            Some(&app.admin()),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["payload"]["delivered"], 3, "{b}");
}
