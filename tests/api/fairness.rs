//! Fair share between keys, limits per key across replicas, priority aging, producers
//! pushed back past `max_queued`, and what `explain` says of a key holding a task (issue 27).

use std::time::Duration;

use orchestrator::jobs::JobId;
use orchestrator::services::task_router::route_pass;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::*;

fn task(capability: &str, priority: i64, key: Option<&str>) -> Value {
    let mut t = json!({
        "task_type": "verify", "title": "t", "priority": priority,
        "required_capability": capability, "payload": {},
    });
    if let Some(k) = key {
        t["concurrency_key"] = json!(k);
    }
    t
}

async fn set_limits(app: &TestApp, key: &str, limits: Value) -> Value {
    let (s, b) = app
        .request(
            Method::PUT,
            &format!("/management/limits/{key}"),
            Some(&app.admin()),
            Some(envelope(limits)),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b["payload"].clone()
}

/// Tasks of `key` assigned or running now.
async fn in_flight(app: &TestApp, key: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM tasks WHERE fairness_key = $1 AND status IN ('assigned', 'in_progress')",
    )
    .bind(key)
    .fetch_one(&app.db)
    .await
    .unwrap()
}

async fn explain(app: &TestApp, id: i32) -> Value {
    let (s, b) = app.get(&format!("/tasks/{id}/explain"), &app.admin()).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b["payload"].clone()
}

#[tokio::test]
async fn a_later_creator_is_among_the_first_assignments_despite_a_flood() {
    let app = TestApp::spawn().await;
    let server = DropletServer::start(Behaviour::Ok).await;
    // Creator 5 (A) queues 300 tasks, then creator 6 (B) one of the same capability and
    // priority.
    let flood = app.insert_pending(300, Some("ocr"), 5).await;
    assert_eq!(flood.len(), 300);
    let b = app.create_task(6, task("ocr", 5, None)).await;
    assert_eq!(app.task(b).await["fairness_key"], "creator:6");
    // A droplet with room for 10 joins.
    app.register_max(30, &["ocr"], &server.endpoint, 10).await;
    app.wait_assigned(b, 30, Duration::from_secs(10)).await;
    let assigned: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tasks WHERE status = 'assigned'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(assigned, 10);
}

#[tokio::test]
async fn a_key_at_its_limit_waits_without_holding_up_another_key() {
    let app = TestApp::spawn().await;
    let server = DropletServer::start(Behaviour::Ok).await;
    app.pause_routing().await;
    let limits = set_limits(&app, "tenant-a", json!({ "max_in_flight": 1 })).await;
    assert_eq!(limits["max_in_flight"], 1);
    assert_eq!(limits["weight"], 1);
    let mut a = Vec::new();
    for _ in 0..3 {
        a.push(app.create_task(5, task("ocr", 5, Some("tenant-a"))).await);
    }
    let b = app.create_task(5, task("ocr", 5, Some("tenant-b"))).await;
    app.register_max(31, &["ocr"], &server.endpoint, 10).await;
    app.state
        .jobs
        .set_paused(&app.state, JobId::TaskRouter, false);
    app.wait_assigned(b, 31, Duration::from_secs(10)).await;
    assert_eq!(route_pass(&app.state.routing()).await.unwrap(), 0);
    assert_eq!(in_flight(&app, "tenant-a").await, 1);
    assert_eq!(app.holder(a[0]).await.0, "assigned", "oldest first");

    let why = explain(&app, a[2]).await;
    assert_eq!(why["reason"], "key_at_limit", "{why}");
    assert_eq!(why["key"]["key"], "tenant-a");
    assert_eq!(why["key"]["in_flight"], 1);
    assert_eq!(why["key"]["max_in_flight"], 1);
    assert_eq!(why["key"]["position_in_key"], 1);

    let (s, list) = app.get("/management/limits", &app.admin()).await;
    assert_eq!(s, StatusCode::OK, "{list}");
    let row = &list["payload"]["limits"][0];
    assert_eq!(row["key"], "tenant-a");
    assert_eq!(
        (row["in_flight"].as_i64(), row["queued"].as_i64()),
        (Some(1), Some(2))
    );
    assert_eq!(row["at_in_flight_limit"], true);

    // The running task ends: the next one of the key goes.
    finish(&app, 31, a[0]).await;
    app.wait_assigned(a[1], 31, Duration::from_secs(10)).await;
    // Removing the limit lets the rest go at once.
    let (s, b) = app
        .delete("/management/limits/tenant-a", &app.admin())
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    app.wait_assigned(a[2], 31, Duration::from_secs(10)).await;
}

async fn finish(app: &TestApp, droplet: i32, task: i32) {
    let (s, b) = app.move_task(droplet, task, "in_progress").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = app.move_task(droplet, task, "completed").await;
    assert_eq!(s, StatusCode::OK, "{b}");
}

#[tokio::test]
async fn two_replicas_never_exceed_a_keys_max_in_flight_over_500_tasks() {
    let a = TestApp::spawn().await;
    let b = TestApp::spawn_on(&a.database_url, &[]).await;
    let server = DropletServer::start(Behaviour::Ok).await;
    for app in [&a, &b] {
        app.pause_routing().await;
    }
    set_limits(&a, "shared", json!({ "max_in_flight": 5 })).await;
    for id in 50..60 {
        a.register_max(id, &["lim"], &server.endpoint, 100).await;
    }
    sqlx::query(
        "INSERT INTO tasks (task_type, title, payload, required_capability, priority, status, created_by, concurrency_key)
         SELECT 'bulk', 'bulk ' || g, '{}'::jsonb, 'lim', 5, 'pending', '5', 'shared' FROM generate_series(1, 500) g",
    )
    .execute(&a.db)
    .await
    .unwrap();
    for app in [&a, &b] {
        app.state
            .jobs
            .set_paused(&app.state, JobId::TaskRouter, false);
    }
    let mut done = 0;
    let mut most = 0;
    while done < 500 {
        let mut passes = Vec::new();
        for app in [&a, &b, &a, &b] {
            let routing = app.state.routing();
            passes.push(tokio::spawn(async move { route_pass(&routing).await }));
        }
        for p in passes {
            p.await.unwrap().expect("a pass");
        }
        // Both replicas' loops route too (completions wake them): the count is checked
        // after the passes above and before each completion below.
        most = most.max(checked_in_flight(&a).await);
        let running: Vec<(i32, i32)> = sqlx::query_as(
            "SELECT t.id, d.droplet_id FROM tasks t JOIN droplets d ON d.id = t.assigned_droplet_id
             WHERE t.status = 'assigned' ORDER BY t.id",
        )
        .fetch_all(&a.db)
        .await
        .unwrap();
        for (i, (id, droplet)) in running.into_iter().enumerate() {
            most = most.max(checked_in_flight(&a).await);
            // Completions arrive at either replica, each waking its own router.
            finish(if i % 2 == 0 { &a } else { &b }, droplet, id).await;
            done += 1;
        }
    }
    assert_eq!(most, 5, "the key was kept full");
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tasks WHERE status <> 'completed'")
        .fetch_one(&a.db)
        .await
        .unwrap();
    assert_eq!(left, 0);
}

/// The key's tasks in flight, never above its max_in_flight of 5.
async fn checked_in_flight(app: &TestApp) -> i64 {
    let now = in_flight(app, "shared").await;
    assert!(
        now <= 5,
        "{now} tasks of the key in flight, over its max_in_flight of 5"
    );
    now
}

/// What makes the run above hold whatever the timing: a pass leaves a limited key alone
/// while another replica's pass holds it (here: this test's transaction, which locks the
/// key's row and assigns up to the limit as a pass does, uncommitted while this pass runs).
#[tokio::test]
async fn a_pass_leaves_a_key_alone_while_another_replicas_pass_holds_it() {
    let app = TestApp::spawn().await;
    let server = DropletServer::start(Behaviour::Ok).await;
    app.pause_routing().await;
    set_limits(&app, "shared", json!({ "max_in_flight": 5 })).await;
    app.register_max(60, &["lim"], &server.endpoint, 100).await;
    sqlx::query(
        "INSERT INTO tasks (task_type, title, payload, required_capability, priority, status, created_by, concurrency_key)
         SELECT 'bulk', 'bulk ' || g, '{}'::jsonb, 'lim', 5, 'pending', '5', 'shared' FROM generate_series(1, 20) g",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let droplet: i32 = sqlx::query_scalar("SELECT id FROM droplets WHERE droplet_id = 60")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let mut other = app.db.begin().await.unwrap();
    sqlx::query("SELECT key FROM key_limits WHERE key = 'shared' FOR UPDATE")
        .execute(&mut *other)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE tasks SET status = 'assigned', assigned_droplet_id = $1, attempt = 1, assigned_at = NOW()
         WHERE id IN (SELECT id FROM tasks WHERE fairness_key = 'shared' ORDER BY id DESC LIMIT 5)",
    )
    .bind(droplet)
    .execute(&mut *other)
    .await
    .unwrap();
    let assigned = route_pass(&app.state.routing()).await.unwrap();
    other.commit().await.unwrap();
    assert_eq!(assigned, 0, "the key was routed under another pass");
    assert_eq!(in_flight(&app, "shared").await, 5);
    // Once that pass has committed, the key is full: still nothing.
    assert_eq!(route_pass(&app.state.routing()).await.unwrap(), 0);
}

#[tokio::test]
async fn a_rate_limited_key_is_assigned_at_its_rate_and_explained() {
    let app = TestApp::spawn().await;
    let server = DropletServer::start(Behaviour::Ok).await;
    app.pause_routing().await;
    // One task every two seconds.
    set_limits(&app, "slow", json!({ "max_per_second": 0.5 })).await;
    let ids = [
        app.create_task(5, task("ocr", 5, Some("slow"))).await,
        app.create_task(5, task("ocr", 5, Some("slow"))).await,
        app.create_task(5, task("ocr", 5, Some("slow"))).await,
    ];
    app.register_max(32, &["ocr"], &server.endpoint, 10).await;
    assert_eq!(route_pass(&app.state.routing()).await.unwrap(), 1);
    // The rest follow at the rate without waiting for the 10 s safety-net job.
    app.state
        .jobs
        .set_paused(&app.state, JobId::TaskRouter, false);
    let why = explain(&app, ids[1]).await;
    assert_eq!(why["reason"], "key_rate_limited", "{why}");
    assert!(why["key"]["next_slot"].is_string(), "{why}");
    app.wait_assigned(ids[2], 32, Duration::from_secs(8)).await;
    let times: Vec<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM assigned_at)::float8 FROM tasks WHERE id = ANY($1) ORDER BY assigned_at",
    )
    .bind(ids.to_vec())
    .fetch_all(&app.db)
    .await
    .unwrap();
    for w in times.windows(2) {
        assert!(w[1] - w[0] >= 1.9, "assigned {:.2} s apart", w[1] - w[0]);
    }
}

#[tokio::test]
async fn an_aged_priority_10_task_is_assigned_under_a_priority_1_flood() {
    let app = TestApp::spawn_with(&[("PRIORITY_AGING_SECONDS", "1")]).await;
    let server = DropletServer::start(Behaviour::Ok).await;
    let low = app.create_task(5, task("ocr", 10, None)).await;
    for _ in 0..3 {
        app.create_task(5, task("ocr", 1, None)).await;
    }
    app.register_max(33, &["ocr"], &server.endpoint, 1).await;
    // A constant flood: each finished priority-1 task is replaced by a new one.
    let started = std::time::Instant::now();
    loop {
        let (status, droplet) = app.holder(low).await;
        if status == "assigned" {
            assert_eq!(droplet, Some(33));
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the priority-10 task starved under the flood"
        );
        let running: Option<i32> = sqlx::query_scalar(
            "SELECT id FROM tasks WHERE status = 'assigned' AND priority = 1 LIMIT 1",
        )
        .fetch_optional(&app.db)
        .await
        .unwrap();
        if let Some(id) = running {
            app.create_task(5, task("ocr", 1, None)).await;
            finish(&app, 33, id).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // It waited its 9 intervals (to urgency 1) while the flood went on.
    assert!(started.elapsed() >= Duration::from_secs(7));
    let pending_urgent: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM tasks WHERE status = 'pending' AND priority = 1")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert!(pending_urgent >= 1, "the flood was still on");
}

#[tokio::test]
async fn a_creation_past_max_queued_is_429_and_writes_nothing() {
    let app = TestApp::spawn().await;
    app.pause_routing().await;
    set_limits(
        &app,
        "busy",
        json!({ "max_queued": 2, "max_per_second": 1 }),
    )
    .await;
    let first = Uuid::new_v4().to_string();
    let token = app.token(5, &["read", "write"]);
    let (s, b) = app
        .request(
            Method::POST,
            "/tasks",
            Some(&token),
            Some(envelope_with_trace(&first, task("ocr", 5, Some("busy")))),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    app.create_task(5, task("ocr", 5, Some("busy"))).await;
    let before: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tasks")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let trace = Uuid::new_v4().to_string();
    let resp = reqwest::Client::new()
        .post(app.url("/tasks"))
        .bearer_auth(&token)
        .json(&envelope_with_trace(&trace, task("ocr", 5, Some("busy"))))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let body: Value = resp.json().await.unwrap();
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("busy") && detail.contains("2 tasks queued"),
        "{body}"
    );
    assert!(body["trace_id"].is_string(), "{body}");
    let after: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tasks")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(after, before, "nothing written");
    let history: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM task_state_history")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(
        history, before,
        "one history row per task, none for the refused one"
    );
    // A retry of a creation already made still gets its task; another key is not held.
    let (s, b) = app
        .request(
            Method::POST,
            "/tasks",
            Some(&token),
            Some(envelope_with_trace(&first, task("ocr", 5, Some("busy")))),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    app.create_task(5, task("ocr", 5, Some("calm"))).await;

    // The gauge: the limited key by name, every other key summed.
    let text = reqwest::get(app.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("orchestrator_queue_depth{key=\"busy\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("orchestrator_queue_depth{key=\"other\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn bad_keys_and_limits_are_422_and_limits_are_admin_only() {
    let app = TestApp::spawn().await;
    let token = app.token(5, &["read", "write"]);
    for (key, why) in [
        (json!("x".repeat(101)), "string_too_long"),
        (json!(""), "string_too_short"),
        (json!("creator:6"), "value_error"),
    ] {
        let mut t = task("ocr", 5, None);
        t["concurrency_key"] = key;
        let (s, b) = app.post("/tasks", &token, t).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
        assert_eq!(b["detail"][0]["type"], why, "{b}");
        assert_eq!(
            b["detail"][0]["loc"],
            json!(["body", "payload", "concurrency_key"])
        );
    }
    for body in [
        json!({ "weight": 0 }),
        json!({ "max_in_flight": -1 }),
        json!({ "max_per_second": 0 }),
        json!({ "max_inflight": 3 }),
    ] {
        let (s, b) = app
            .request(
                Method::PUT,
                "/management/limits/k",
                Some(&app.admin()),
                Some(envelope(body.clone())),
            )
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {b}");
    }
    let (s, _) = app
        .request(
            Method::PUT,
            "/management/limits/k",
            Some(&token),
            Some(envelope(json!({ "max_in_flight": 1 }))),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = app.get("/management/limits", &token).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, b) = app.delete("/management/limits/none", &app.admin()).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM key_limits")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(n, 0, "nothing written");
}

/// How many tasks a pass reads of one (capability, key, priority) group, as the routing
/// read computes it (`fair_read_limit`): the key's weight's share of the room, at least
/// `MIN_READ` (less when so many groups wait that the floor alone would read over four
/// times the room), at most the room.
#[tokio::test]
async fn a_groups_read_limit_shares_the_room_by_weight() {
    use orchestrator::services::fair_share::MIN_READ;
    let app = TestApp::spawn().await;
    // (room, weight, total weight, groups) -> limit
    let cases: [((i64, i32, i64, i64), i64); 8] = [
        ((10, 1, 2, 2), 10),
        ((5000, 1, 100, 100), 50),
        ((5000, 3, 100, 100), 150),
        ((5000, 1, 10_000, 10_000), 2),
        ((500, 1, 5_000, 5_000), 1),
        ((100, 1, 10, 10), 16),
        ((100, 0, 0, 0), 100),
        ((0, 1, 1, 1), 0),
    ];
    for ((room, weight, total, groups), want) in cases {
        let got: i64 = sqlx::query_scalar("SELECT fair_read_limit($1, $2, $3, $4, $5)")
            .bind(room)
            .bind(weight)
            .bind(total)
            .bind(groups)
            .bind(MIN_READ)
            .fetch_one(&app.db)
            .await
            .unwrap();
        assert_eq!(
            got, want,
            "room {room}, weight {weight}/{total}, {groups} groups"
        );
    }
}
