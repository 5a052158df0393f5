//! The UDC envelope: both request forms, the response envelope and `X-Trace-Id`, and
//! FastAPI-shaped 422s that name each bad field; malformed bodies are 4xx, never 5xx.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::*;

async fn task_count(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM tasks")
        .fetch_one(&app.db)
        .await
        .expect("count")
}

/// POSTs a raw body to `/tasks` as droplet 5 with write permission.
async fn post_raw(app: &TestApp, body: impl Into<reqwest::Body>) -> (StatusCode, Value) {
    let resp = app
        .client
        .post(app.url("/tasks"))
        .bearer_auth(app.token(5, &["read", "write"]))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("sent");
    let status = StatusCode::from_u16(resp.status().as_u16()).expect("status");
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn post_json(app: &TestApp, body: Value) -> (StatusCode, Value) {
    app.request(
        Method::POST,
        "/tasks",
        Some(&app.token(5, &["read", "write"])),
        Some(body),
    )
    .await
}

/// The `loc` of every entry of a 422 body.
fn locs(body: &Value) -> Vec<Value> {
    body["detail"]
        .as_array()
        .unwrap_or_else(|| panic!("a FastAPI 422 list: {body}"))
        .iter()
        .map(|e| {
            assert!(
                e["msg"].is_string() && e["type"].is_string(),
                "entry shape: {e}"
            );
            e["loc"].clone()
        })
        .collect()
}

fn valid_envelope() -> Value {
    envelope(task_payload("an envelope test"))
}

#[tokio::test]
async fn the_standard_envelope_is_accepted_and_answered_in_the_response_envelope() {
    let app = TestApp::spawn().await;
    let trace = Uuid::new_v4().to_string();
    let resp = app
        .client
        .post(app.url("/tasks"))
        .bearer_auth(app.token(5, &["write"]))
        .json(&envelope_with_trace(&trace, task_payload("t")))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 201);
    let header = resp
        .headers()
        .get("x-trace-id")
        .and_then(|h| h.to_str().ok())
        .map(str::to_string);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(header.as_deref(), Some(trace.as_str()));
    assert_eq!(body["udc_version"], "1.0");
    assert_eq!(body["trace_id"], trace.as_str());
    assert_eq!(body["source"], 10);
    assert_eq!(body["target"], 5);
    assert_eq!(body["message_type"], "response");
    assert!(
        body["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{body}"
    );
    assert_eq!(body["payload"]["status"], "pending");
    assert_eq!(body["payload"]["trace_id"], trace.as_str());
}

#[tokio::test]
async fn the_string_forms_of_source_and_target_are_accepted() {
    let app = TestApp::spawn().await;
    let mut env = valid_envelope();
    env["source"] = json!("droplet-5");
    env["target"] = json!("droplet-10");
    env["timestamp"] = json!("2025-11-15T10:30:00+02:00");
    let (status, body) = post_json(&app, env).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let mut env = valid_envelope();
    env.as_object_mut().unwrap().remove("udc_version");
    env.as_object_mut().unwrap().remove("target");
    env["timestamp"] = json!("2025-11-15T10:30:00");
    let (status, body) = post_json(&app, env).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

#[tokio::test]
async fn the_legacy_metadata_form_is_accepted() {
    let app = TestApp::spawn().await;
    let trace = Uuid::new_v4().to_string();
    let (status, body) = post_json(
        &app,
        json!({
            "metadata": {"source_droplet_id": 5, "trace_id": trace, "timestamp": "2025-01-18T10:00:00Z"},
            "payload": task_payload("legacy"),
        }),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["trace_id"], trace.as_str());
    assert_eq!(body["payload"]["trace_id"], trace.as_str());
    let stored: Uuid = sqlx::query_scalar("SELECT trace_id FROM tasks")
        .fetch_one(&app.db)
        .await
        .expect("row");
    assert_eq!(stored.to_string(), trace);
}

#[tokio::test]
async fn a_legacy_envelope_without_its_trace_id_names_it() {
    let app = TestApp::spawn().await;
    let (status, body) = post_json(
        &app,
        json!({"metadata": {"source_droplet_id": 5}, "payload": task_payload("legacy")}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        locs(&body).contains(&json!(["body", "metadata", "trace_id"])),
        "{body}"
    );
    assert_eq!(task_count(&app).await, 0);
}

#[tokio::test]
async fn each_missing_field_is_a_422_naming_it() {
    let app = TestApp::spawn().await;
    for field in ["trace_id", "source", "message_type", "payload", "timestamp"] {
        let mut env = valid_envelope();
        env.as_object_mut().unwrap().remove(field);
        let (status, body) = post_json(&app, env).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{field}: {body}");
        let entry = &body["detail"][0];
        assert_eq!(entry["loc"], json!(["body", field]), "{body}");
        assert_eq!(entry["msg"], "Field required", "{body}");
        assert_eq!(entry["type"], "missing", "{body}");
        assert_eq!(body["detail"].as_array().map(Vec::len), Some(1), "{body}");
    }
    assert_eq!(task_count(&app).await, 0);
}

#[tokio::test]
async fn each_mistyped_field_is_a_422_naming_it() {
    let app = TestApp::spawn().await;
    let cases = [
        ("trace_id", json!(5)),
        ("trace_id", json!("")),
        ("source", json!([1])),
        ("source", json!({"id": 5})),
        ("target", json!(true)),
        ("message_type", json!("shout")),
        ("message_type", json!(3)),
        ("payload", json!([])),
        ("payload", json!("a string")),
        ("timestamp", json!("yesterday")),
        ("timestamp", json!(12)),
        ("udc_version", json!(1)),
    ];
    for (field, value) in cases {
        let mut env = valid_envelope();
        env[field] = value.clone();
        let (status, body) = post_json(&app, env).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{field}={value}: {body}"
        );
        assert_eq!(
            locs(&body),
            vec![json!(["body", field])],
            "{field}={value}: {body}"
        );
    }
    assert_eq!(task_count(&app).await, 0);
}

#[tokio::test]
async fn payload_errors_point_into_the_payload() {
    let app = TestApp::spawn().await;
    let (status, body) = post_json(
        &app,
        envelope(json!({"task_type": "t", "title": "x", "priority": "high"})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(locs(&body), vec![json!(["body", "payload", "priority"])]);
    let (status, body) = post_json(&app, envelope(json!({"task_type": "t"}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(locs(&body), vec![json!(["body", "payload", "title"])]);
    assert_eq!(body["detail"][0]["type"], "missing");
    assert_eq!(task_count(&app).await, 0);
}

#[tokio::test]
async fn malformed_bodies_are_4xx_never_5xx() {
    let app = TestApp::spawn().await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("invalid JSON", b"{\"trace_id\": ".to_vec()),
        ("not JSON at all", b"hello".to_vec()),
        ("an array", b"[1, 2, 3]".to_vec()),
        (
            "an array of envelopes",
            serde_json::to_vec(&json!([valid_envelope()])).unwrap(),
        ),
        ("a string", b"\"envelope\"".to_vec()),
        ("null", b"null".to_vec()),
        ("empty", Vec::new()),
        ("whitespace", b"   \n".to_vec()),
        ("invalid UTF-8", vec![b'{', 0xff, 0xfe, b'}']),
    ];
    for (what, body) in cases {
        let (status, answer) = post_raw(&app, body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{what}: {answer}");
        assert!(answer["detail"].is_array(), "{what}: {answer}");
    }
    assert_eq!(task_count(&app).await, 0);
}

#[tokio::test]
async fn a_two_mib_body_is_413() {
    let app = TestApp::spawn().await;
    let mut env = valid_envelope();
    env["payload"]["description"] = json!("x".repeat(2 * 1024 * 1024));
    let (status, body) = post_raw(&app, serde_json::to_vec(&env).unwrap()).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(body["detail"].is_string(), "{body}");
    assert_eq!(task_count(&app).await, 0);
    // The service is still fine afterwards.
    let (status, _) = post_json(&app, valid_envelope()).await;
    assert_eq!(status, StatusCode::CREATED);
}

#[tokio::test]
async fn a_body_just_under_the_limit_is_accepted() {
    let app = TestApp::spawn().await;
    let mut env = valid_envelope();
    env["payload"]["description"] = json!("x".repeat(900 * 1024));
    let (status, body) = post_raw(&app, serde_json::to_vec(&env).unwrap()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

#[tokio::test]
async fn the_trace_id_header_is_echoed_on_get_and_a_new_one_made_without_it() {
    let app = TestApp::spawn().await;
    let resp = app
        .client
        .get(app.url("/tasks"))
        .bearer_auth(app.token(7, &["read"]))
        .header("x-trace-id", "my-trace-123")
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.headers()["x-trace-id"], "my-trace-123");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["trace_id"], "my-trace-123");
    assert_eq!(body["target"], 7);

    let resp = app
        .client
        .get(app.url("/tasks"))
        .bearer_auth(app.token(7, &["read"]))
        .send()
        .await
        .expect("sent");
    let header = resp.headers()["x-trace-id"].to_str().unwrap().to_string();
    let body: Value = resp.json().await.expect("json");
    assert!(Uuid::parse_str(&header).is_ok(), "{header}");
    assert_eq!(body["trace_id"], header.as_str());
}

#[tokio::test]
async fn errors_carry_the_trace_id_too() {
    let app = TestApp::spawn().await;
    let resp = app
        .client
        .get(app.url("/tasks/999"))
        .bearer_auth(app.token(7, &["read"]))
        .header("x-trace-id", "err-trace")
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 404);
    assert_eq!(resp.headers()["x-trace-id"], "err-trace");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["detail"], "Task 999 not found");
}
