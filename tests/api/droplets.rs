//! Droplets: registration in both payload forms (an upsert, 201 then 200), heartbeats (one
//! row each, `last_heartbeat`), acting only as oneself, and an admin's deactivation that
//! holds until activation.

use chrono::NaiveDateTime;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::*;

/// The API guide's registration request, exactly as droplets send it.
fn api_guide_registration() -> Value {
    json!({
        "trace_id": "550e8400-e29b-41d4-a716-446655440000",
        "source": 42,
        "target": 10,
        "message_type": "command",
        "payload": {
            "id": 42,
            "name": "droplet0",
            "steward": "Haythem",
            "endpoint": "http://localhost:8002",
            "capabilities": [
                "udc_compliance",
                "health_monitoring",
                "message_handling"
            ],
            "version": "1.0.0",
            "status": "active"
        },
        "timestamp": "2025-01-18T10:00:00Z"
    })
}

/// The API guide's heartbeat request.
fn api_guide_heartbeat() -> Value {
    json!({
        "trace_id": "550e8400-e29b-41d4-a716-446655440001",
        "source": 42,
        "target": 10,
        "message_type": "heartbeat",
        "payload": {
            "status": "active",
            "metrics": {
                "cpu_percent": 15.5,
                "memory_mb": 256,
                "requests_last_minute": 10,
                "errors_last_minute": 0
            }
        },
        "timestamp": "2025-01-18T10:01:00Z"
    })
}

#[derive(Debug, sqlx::FromRow)]
struct Row {
    id: i32,
    name: String,
    steward: Option<String>,
    endpoint: String,
    capabilities: Value,
    status: String,
    last_heartbeat: Option<NaiveDateTime>,
    registered_at: Option<NaiveDateTime>,
}

async fn row(app: &TestApp, droplet_id: i32) -> Option<Row> {
    sqlx::query_as(
        "SELECT id, name, steward, endpoint, capabilities, status, last_heartbeat, registered_at
         FROM droplets WHERE droplet_id = $1",
    )
    .bind(droplet_id)
    .fetch_optional(&app.db)
    .await
    .expect("query")
}

async fn heartbeats(app: &TestApp, droplet_id: i32) -> Vec<(String, Option<Value>)> {
    sqlx::query_as(
        "SELECT h.status, h.metrics FROM heartbeats h JOIN droplets d ON d.id = h.droplet_id
         WHERE d.droplet_id = $1 ORDER BY h.id",
    )
    .bind(droplet_id)
    .fetch_all(&app.db)
    .await
    .expect("query")
}

async fn count(app: &TestApp, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&app.db)
        .await
        .expect("count")
}

async fn raw_post(app: &TestApp, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
    app.request(Method::POST, path, Some(token), Some(body))
        .await
}

async fn admin_post(app: &TestApp, path: &str) -> (StatusCode, Value) {
    app.request(Method::POST, path, Some(&app.admin()), None)
        .await
}

#[tokio::test]
async fn register_with_the_api_guides_exact_body() {
    let app = TestApp::spawn().await;
    let token = app.token(42, &["read", "write"]);
    let (status, body) =
        raw_post(&app, "/droplets/register", &token, api_guide_registration()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["trace_id"], "550e8400-e29b-41d4-a716-446655440000");
    assert_eq!(body["source"], 10);
    assert_eq!(body["target"], 42);
    assert_eq!(body["message_type"], "response");
    let p = &body["payload"];
    assert_eq!(p["registered"], true);
    assert_eq!(p["droplet_id"], 42);
    assert_eq!(p["name"], "droplet0");
    assert_eq!(p["status"], "active");
    assert_eq!(p["message"], "Droplet registered successfully");
    assert_eq!(p["heartbeat_interval_seconds"], 60);
    assert!(
        p["registered_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{body}"
    );
    let deadline = p["next_heartbeat_deadline"].as_f64().expect("deadline");
    let now = chrono::Utc::now().timestamp() as f64;
    assert!(
        (now + 50.0..now + 70.0).contains(&deadline),
        "{deadline} vs {now}"
    );

    let r = row(&app, 42).await.expect("row");
    assert_eq!(r.name, "droplet0");
    assert_eq!(r.steward.as_deref(), Some("Haythem"));
    assert_eq!(r.endpoint, "http://localhost:8002");
    assert_eq!(
        r.capabilities,
        json!(["udc_compliance", "health_monitoring", "message_handling"])
    );
    assert_eq!(r.status, "active");
    assert!(r.last_heartbeat.is_some());

    // The very same envelope again is fine: a re-registration.
    let (status, body) =
        raw_post(&app, "/droplets/register", &token, api_guide_registration()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["payload"]["registered"], true);
    assert_eq!(count(&app, "SELECT COUNT(*) FROM droplets").await, 1);
}

#[tokio::test]
async fn register_with_the_specs_body() {
    let app = TestApp::spawn().await;
    let (status, body) = app
        .post(
            "/droplets/register",
            &app.token(14, &["write"]),
            json!({
                "droplet_id": 14,
                "name": "Visibility Deck",
                "steward": "Haythem",
                "endpoint": "https://visibility.fullpotential.ai",
                "capabilities": ["monitoring", "alerts", "snapshots"]
            }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let p = &body["payload"];
    assert_eq!(p["droplet_id"], 14);
    assert_eq!(p["name"], "Visibility Deck");
    assert_eq!(p["status"], "active");
    assert!(p["registered_at"].is_string());
    assert_eq!(p["heartbeat_interval_seconds"], 60);
    assert!(p["next_heartbeat_deadline"].is_number());
    let r = row(&app, 14).await.expect("row");
    assert_eq!(r.capabilities, json!(["monitoring", "alerts", "snapshots"]));

    // It is listed with the external id, and its capabilities can be asked for.
    let (status, body) = app.get("/droplets", &app.token(5, &["read"])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["payload"]["total"], 1);
    assert_eq!(body["payload"]["droplets"][0]["id"], 14);
    assert_eq!(body["payload"]["droplets"][0]["droplet_id"], 14);
    let (status, body) = app
        .get("/droplets/14/capabilities", &app.token(5, &["read"]))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["payload"]["capabilities"],
        json!(["monitoring", "alerts", "snapshots"])
    );
}

#[tokio::test]
async fn re_registration_is_an_upsert_with_200() {
    let app = TestApp::spawn().await;
    let token = app.token(8, &["write"]);
    let first = json!({"droplet_id": 8, "name": "Verifier", "endpoint": "http://a:1", "capabilities": ["a"]});
    let (status, _) = app.post("/droplets/register", &token, first).await;
    assert_eq!(status, StatusCode::CREATED);
    let before = row(&app, 8).await.expect("row");
    // The droplet restarts elsewhere with new capabilities (a new envelope this time).
    let (status, body) = app
        .post(
            "/droplets/register",
            &token,
            json!({"id": "droplet-8", "name": "Verifier 2", "endpoint": "http://b:2", "capabilities": ["b", "c", "b"], "max_concurrent_tasks": 3, "extra": "ignored"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let after = row(&app, 8).await.expect("row");
    assert_eq!(after.id, before.id, "same row");
    assert_eq!(after.registered_at, before.registered_at);
    assert_eq!(after.name, "Verifier 2");
    assert_eq!(after.endpoint, "http://b:2");
    assert_eq!(after.capabilities, json!(["b", "c"]));
    assert_eq!(count(&app, "SELECT COUNT(*) FROM droplets").await, 1);
}

#[tokio::test]
async fn a_droplet_marked_inactive_comes_back_by_registering_or_by_heartbeat() {
    let app = TestApp::spawn().await;
    app.register(8, &[], &dead_endpoint()).await;
    // As the health monitor would.
    sqlx::query("UPDATE droplets SET status = 'inactive' WHERE droplet_id = 8")
        .execute(&app.db)
        .await
        .expect("update");
    let (status, body) = app
        .post(
            "/droplets/8/heartbeat",
            &app.token(8, &["write"]),
            json!({"status": "active"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(row(&app, 8).await.unwrap().status, "active");
    sqlx::query("UPDATE droplets SET status = 'inactive' WHERE droplet_id = 8")
        .execute(&app.db)
        .await
        .expect("update");
    let body = app.register(8, &[], &dead_endpoint()).await;
    assert_eq!(body["payload"]["status"], "active");
    assert_eq!(row(&app, 8).await.unwrap().status, "active");
}

#[tokio::test]
async fn heartbeat_updates_last_heartbeat_and_inserts_one_row() {
    let app = TestApp::spawn().await;
    let token = app.token(42, &["read", "write"]);
    let (status, _) = raw_post(&app, "/droplets/register", &token, api_guide_registration()).await;
    assert_eq!(status, StatusCode::CREATED);
    sqlx::query(
        "UPDATE droplets SET last_heartbeat = NOW() - INTERVAL '1 hour' WHERE droplet_id = 42",
    )
    .execute(&app.db)
    .await
    .expect("update");
    let before = row(&app, 42).await.unwrap().last_heartbeat.unwrap();

    let (status, body) = raw_post(
        &app,
        "/droplets/42/heartbeat",
        &token,
        api_guide_heartbeat(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["trace_id"], "550e8400-e29b-41d4-a716-446655440001");
    assert_eq!(body["target"], 42);
    assert_eq!(body["payload"]["acknowledged"], true);
    assert_eq!(body["payload"]["droplet_id"], 42);
    assert_eq!(body["payload"]["next_heartbeat_in"], 60);

    let after = row(&app, 42).await.unwrap().last_heartbeat.unwrap();
    assert!(
        after > before + chrono::Duration::minutes(59),
        "{before} -> {after}"
    );
    let beats = heartbeats(&app, 42).await;
    assert_eq!(beats.len(), 1);
    assert_eq!(beats[0].0, "active");
    assert_eq!(
        beats[0].1,
        Some(
            json!({"cpu_percent": 15.5, "memory_mb": 256, "requests_last_minute": 10, "errors_last_minute": 0})
        )
    );

    // The same envelope again is one more heartbeat, not an error.
    let (status, _) = raw_post(
        &app,
        "/droplets/42/heartbeat",
        &token,
        api_guide_heartbeat(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(heartbeats(&app, 42).await.len(), 2);

    // The droplet's details show its recent heartbeats and its load.
    let (status, body) = app.get("/droplets/42", &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let d = &body["payload"]["droplet"];
    assert_eq!(d["droplet_id"], 42);
    assert_eq!(d["recent_heartbeats"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        d["current_load"],
        json!({"assigned": 0, "in_progress": 0, "total": 0})
    );
}

#[tokio::test]
async fn a_heartbeat_reporting_maintenance_keeps_the_word_and_takes_the_droplet_out() {
    let app = TestApp::spawn().await;
    app.register(8, &[], &dead_endpoint()).await;
    let (status, body) = app
        .post(
            "/droplets/8/heartbeat",
            &app.token(8, &["write"]),
            json!({"status": "maintenance"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(heartbeats(&app, 8).await[0].0, "maintenance");
    assert_ne!(row(&app, 8).await.unwrap().status, "active");
}

#[tokio::test]
async fn heartbeat_of_an_unknown_droplet_is_404() {
    let app = TestApp::spawn().await;
    let (status, body) = app
        .post(
            "/droplets/77/heartbeat",
            &app.token(77, &["write"]),
            json!({"status": "active"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["detail"], "Droplet 77 not found");
    let (status, _) = app
        .post(
            "/droplets/77/heartbeat",
            &app.admin(),
            json!({"status": "active"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app.get("/droplets/77", &app.admin()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = admin_post(&app, "/droplets/77/activate").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(count(&app, "SELECT COUNT(*) FROM heartbeats").await, 0);
    assert_eq!(count(&app, "SELECT COUNT(*) FROM droplets").await, 0);
}

#[tokio::test]
async fn droplet_5_heartbeating_or_registering_droplet_6_is_403() {
    let app = TestApp::spawn().await;
    app.register(6, &[], &dead_endpoint()).await;
    let five = app.token(5, &["read", "write"]);
    let (status, body) = app
        .post("/droplets/6/heartbeat", &five, json!({"status": "active"}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["detail"].as_str().is_some_and(|d| d.contains('6')),
        "{body}"
    );
    assert!(heartbeats(&app, 6).await.is_empty());
    let (status, _) = app
        .post(
            "/droplets/register",
            &five,
            json!({"droplet_id": 6, "name": "impostor", "endpoint": "http://evil:1"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(row(&app, 6).await.unwrap().name, "droplet-6");
    // An admin may act for any droplet.
    let (status, _) = app
        .post(
            "/droplets/6/heartbeat",
            &app.admin(),
            json!({"status": "active"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_deactivated_droplet_stays_inactive_after_heartbeats_until_activated() {
    let app = TestApp::spawn().await;
    app.register(8, &["x"], &dead_endpoint()).await;
    let me = app.token(8, &["write"]);
    let (status, body) = admin_post(&app, "/droplets/8/deactivate").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["payload"]["status"], "inactive");
    assert_eq!(body["payload"]["previous_status"], "active");

    for _ in 0..3 {
        let (status, _) = app
            .post("/droplets/8/heartbeat", &me, json!({"status": "active"}))
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(
        heartbeats(&app, 8).await.len(),
        3,
        "heartbeats are still recorded"
    );
    assert_eq!(row(&app, 8).await.unwrap().status, "inactive");
    // Registering again does not lift it either.
    app.register(8, &["x"], &dead_endpoint()).await;
    assert_eq!(row(&app, 8).await.unwrap().status, "inactive");
    // And it gets no work.
    let task = app
        .create_task(
            5,
            json!({"task_type": "t", "title": "t", "required_capability": "x"}),
        )
        .await;
    let (status, body) = app.get("/droplets?status=active", &app.admin()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["payload"]["total"], 0, "{body}");

    let (status, body) = admin_post(&app, "/droplets/8/activate").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["payload"]["status"], "active");
    assert_eq!(row(&app, 8).await.unwrap().status, "active");
    let (status, _) = app
        .post("/droplets/8/heartbeat", &me, json!({"status": "active"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(row(&app, 8).await.unwrap().status, "active");
    eventually(
        std::time::Duration::from_secs(5),
        "the task routed after activation",
        || async { (app.task_status(task).await == "assigned").then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn listing_filters_by_status_and_capability() {
    let app = TestApp::spawn().await;
    app.register(8, &["code_verification"], &dead_endpoint())
        .await;
    app.register(9, &["deploy", "build"], &dead_endpoint())
        .await;
    admin_post(&app, "/droplets/9/deactivate").await;
    let reader = app.token(5, &["read"]);
    let ids = |body: &Value| -> Vec<i64> {
        body["payload"]["droplets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["droplet_id"].as_i64().unwrap())
            .collect()
    };
    let (_, body) = app.get("/droplets", &reader).await;
    assert_eq!(ids(&body), vec![8, 9]);
    let (_, body) = app.get("/droplets?status=active", &reader).await;
    assert_eq!(ids(&body), vec![8]);
    let (_, body) = app.get("/droplets?status=inactive", &reader).await;
    assert_eq!(ids(&body), vec![9]);
    let (_, body) = app.get("/droplets?capability=build", &reader).await;
    assert_eq!(ids(&body), vec![9]);
    let (_, body) = app.get("/droplets?capability=nothing", &reader).await;
    assert_eq!(ids(&body), Vec::<i64>::new());
    let (status, body) = app.get("/droplets?status=sleeping", &reader).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["detail"][0]["loc"], json!(["query", "status"]));
}

#[tokio::test]
async fn bad_registrations_are_422_naming_the_field_and_write_nothing() {
    let app = TestApp::spawn().await;
    let token = app.token(8, &["write"]);
    let base = json!({"droplet_id": 8, "name": "n", "endpoint": "http://a:1", "capabilities": []});
    let cases: Vec<(&str, Value)> = vec![
        ("droplet_id", json!(null)),
        ("name", json!(null)),
        ("name", json!("")),
        ("name", json!(5)),
        ("name", json!("n".repeat(101))),
        ("endpoint", json!(null)),
        ("endpoint", json!("not a url")),
        ("endpoint", json!("ftp://a")),
        ("capabilities", json!("a")),
        ("capabilities", json!([1])),
        ("droplet_id", json!("eight")),
        ("droplet_id", json!(0)),
        ("max_concurrent_tasks", json!(0)),
        ("steward", json!(["x"])),
    ];
    for (field, value) in cases {
        let mut payload = base.clone();
        if value.is_null() {
            payload.as_object_mut().unwrap().remove(field);
        } else {
            payload[field] = value.clone();
        }
        let (status, body) = app.post("/droplets/register", &token, payload).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{field}={value}: {body}"
        );
        let loc = &body["detail"][0]["loc"];
        assert_eq!(loc[0], "body", "{body}");
        assert_eq!(loc[1], "payload", "{body}");
        assert_eq!(loc[2], field, "{field}={value}: {body}");
    }
    assert_eq!(count(&app, "SELECT COUNT(*) FROM droplets").await, 0);
}

#[tokio::test]
async fn non_numeric_droplet_ids_in_paths_are_422() {
    let app = TestApp::spawn().await;
    for (method, path) in [
        (Method::GET, "/droplets/abc"),
        (Method::GET, "/droplets/abc/capabilities"),
        (Method::POST, "/droplets/abc/activate"),
        (Method::POST, "/droplets/1.5/deactivate"),
        (Method::POST, "/droplets/99999999999/heartbeat"),
    ] {
        let (status, body) = app
            .request(
                method.clone(),
                path,
                Some(&app.admin()),
                Some(envelope(json!({"status": "active"}))),
            )
            .await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{method} {path}: {body}"
        );
        assert_eq!(
            body["detail"][0]["loc"],
            json!(["path", "droplet_id"]),
            "{body}"
        );
    }
}

#[tokio::test]
async fn sql_looking_strings_in_droplet_fields_are_stored_verbatim() {
    let app = TestApp::spawn().await;
    let evil = "x'); DROP TABLE droplets; --";
    let cap = "' OR '1'='1";
    let (status, body) = app
        .post(
            "/droplets/register",
            &app.token(8, &["write"]),
            json!({"droplet_id": 8, "name": evil, "steward": "\"; DELETE FROM tasks; --", "endpoint": "http://a:1/'--", "capabilities": [cap, "%", "_"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    app.register(9, &["plain"], &dead_endpoint()).await;
    let reader = app.token(5, &["read"]);
    let (status, body) = app
        .get(&format!("/droplets?capability={}", urlencode(cap)), &reader)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["payload"]["total"], 1, "{body}");
    let d = &body["payload"]["droplets"][0];
    assert_eq!(d["name"], evil);
    assert_eq!(d["steward"], "\"; DELETE FROM tasks; --");
    assert_eq!(d["endpoint"], "http://a:1/'--");
    assert_eq!(d["capabilities"], json!([cap, "%", "_"]));
    // `%` and `_` are not wildcards.
    let (_, body) = app.get("/droplets?capability=%25", &reader).await;
    assert_eq!(body["payload"]["total"], 1, "{body}");
    let (_, body) = app.get("/droplets?capability=pla_n", &reader).await;
    assert_eq!(body["payload"]["total"], 0, "{body}");
    let (status, _) = app
        .post(
            "/droplets/8/heartbeat",
            &app.token(8, &["write"]),
            json!({"status": "x'--"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(heartbeats(&app, 8).await[0].0, "x'--");
    assert_eq!(count(&app, "SELECT COUNT(*) FROM droplets").await, 2);
}

/// Percent-encodes everything but letters and digits.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test]
async fn concurrent_heartbeats_share_statements_and_each_counts_once() {
    // 20 inactive droplets, three heartbeats each at the same moment: heartbeats of distinct
    // droplets share a statement, a droplet's second and third wait for the next one.
    let app = TestApp::spawn().await;
    for id in 60..80 {
        app.register(id, &["x"], "http://127.0.0.1:9").await;
    }
    sqlx::query("UPDATE droplets SET status = 'inactive' WHERE droplet_id BETWEEN 60 AND 79")
        .execute(&app.db)
        .await
        .expect("inactive");
    let after: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(event_id), 0) FROM events")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let beats = (60..80)
        .flat_map(|id| (0..3).map(move |k| (id, k)))
        .map(|(id, k)| {
            let app = &app;
            async move {
                let body = envelope(json!({"status": "active", "metrics": {"beat": k}}));
                app.post(
                    &format!("/droplets/{id}/heartbeat"),
                    &app.token(id, &["read", "write"]),
                    body,
                )
                .await
            }
        });
    for (status, body) in futures::future::join_all(beats).await {
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["payload"]["acknowledged"], true, "{body}");
    }
    for id in 60..80 {
        let rows = heartbeats(&app, id).await;
        assert_eq!(rows.len(), 3, "droplet {id}: {rows:?}");
        assert_eq!(row(&app, id).await.unwrap().status, "active");
    }
    // One status change each: one `droplet_health_changed` per droplet, from inactive.
    eventually(
        std::time::Duration::from_secs(10),
        "20 health events",
        || async {
            let events = logged_events(&app.db, "droplets", after).await;
            let changed: Vec<_> = events
                .iter()
                .filter(|(_, e)| e["payload"]["event"] == "droplet_health_changed")
                .collect();
            (changed.len() >= 20).then_some(changed.len())
        },
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let events = logged_events(&app.db, "droplets", after).await;
    let mut changed: Vec<i64> = events
        .iter()
        .filter(|(_, e)| e["payload"]["event"] == "droplet_health_changed")
        .map(|(_, e)| {
            assert_eq!(e["payload"]["previous_status"], "inactive", "{e}");
            e["payload"]["droplet"]["droplet_id"].as_i64().unwrap()
        })
        .collect();
    changed.sort_unstable();
    assert_eq!(changed, (60..80).collect::<Vec<i64>>());
}
