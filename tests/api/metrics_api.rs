//! The JSON metrics endpoints, checked against a data set written straight into the database
//! with known timestamps, so every count, rate and duration has one right answer.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::*;

/// One task of the data set; times are seconds after its creation.
struct Row {
    task_type: &'static str,
    status: &'static str,
    created_ago: f64,
    assigned: Option<f64>,
    started: Option<f64>,
    ended: Option<f64>,
    retries: i32,
    capability: Option<&'static str>,
    on_droplet: bool,
}

const fn row(task_type: &'static str, status: &'static str, created_ago: f64) -> Row {
    Row {
        task_type,
        status,
        created_ago,
        assigned: None,
        started: None,
        ended: None,
        retries: 0,
        capability: None,
        on_droplet: false,
    }
}

const fn done(
    task_type: &'static str,
    status: &'static str,
    created_ago: f64,
    assigned: f64,
    started: f64,
    ended: f64,
) -> Row {
    Row {
        task_type,
        status,
        created_ago,
        assigned: Some(assigned),
        started: Some(started),
        ended: Some(ended),
        retries: 0,
        capability: None,
        on_droplet: true,
    }
}

const HALF_HOUR: f64 = 1800.0;
const TWO_DAYS: f64 = 2.0 * 86_400.0;

/// The data set:
/// - alpha, created 30 min ago on droplet 8: completed in 10, 20, 30, 40 s (assigned after
///   2, 4, 6, 8 s) and one failed after 2 retries (assigned after 10 s);
/// - beta, created 2 days ago on droplet 8: completed in 100 and 300 s (assigned after 1 and
///   3 s), one cancelled;
/// - gamma, pending for 10 min: two need `verify` (droplet 8 has it), one `nobody`, one any;
/// - delta, in progress on droplet 8 (assigned 1 s after creation, 5 min ago);
/// - droplet 8 active with `verify`, droplet 9 inactive; both first registered 2 days ago;
/// - droplet 8's heartbeats: 30 healthy ones a minute apart from 50 min ago, then one
///   `maintenance` a minute after the last (so 29 * 60 + 60 = 1800 s of uptime);
/// - an `assigned` history row for every assignment.
async fn data_set(app: &TestApp) -> i32 {
    // The router and the jobs must not move the data set.
    app.pause_routing().await;
    app.state
        .jobs
        .set_paused(&app.state, JobId::HealthMonitor, true);
    let d8: i32 = sqlx::query_scalar(
        "INSERT INTO droplets (droplet_id, name, endpoint, capabilities, status, last_heartbeat, registered_at)
         VALUES (8, 'verifier', 'http://127.0.0.1:9', '[\"verify\"]', 'active', NOW(), NOW() - interval '2 days'),
                (9, 'idle', 'http://127.0.0.1:9', '[\"other\"]', 'inactive', NULL, NOW() - interval '2 days')
         RETURNING id",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    let mut failed = done("alpha", "failed", HALF_HOUR, 10.0, 12.0, 17.0);
    failed.retries = 2;
    let mut cancelled = row("beta", "cancelled", TWO_DAYS);
    cancelled.ended = Some(50.0);
    let mut verify = row("gamma", "pending", 600.0);
    verify.capability = Some("verify");
    let mut verify2 = row("gamma", "pending", 600.0);
    verify2.capability = Some("verify");
    let mut nobody = row("gamma", "pending", 600.0);
    nobody.capability = Some("nobody");
    let mut running = done("delta", "in_progress", 300.0, 1.0, 2.0, 0.0);
    running.ended = None;
    let rows = [
        done("alpha", "completed", HALF_HOUR, 2.0, 5.0, 15.0),
        done("alpha", "completed", HALF_HOUR, 4.0, 5.0, 25.0),
        done("alpha", "completed", HALF_HOUR, 6.0, 10.0, 40.0),
        done("alpha", "completed", HALF_HOUR, 8.0, 10.0, 50.0),
        failed,
        done("beta", "completed", TWO_DAYS, 1.0, 5.0, 105.0),
        done("beta", "completed", TWO_DAYS, 3.0, 5.0, 305.0),
        cancelled,
        verify,
        verify2,
        nobody,
        row("gamma", "pending", 600.0),
        running,
    ];
    for r in rows {
        sqlx::query(
            "INSERT INTO tasks (task_type, title, payload, status, required_capability, assigned_droplet_id,
                                created_at, assigned_at, started_at, completed_at, retry_count, max_retries, updated_at)
             SELECT $1, $1, '{}', $2, $3, $4, c, c + make_interval(secs => $6), c + make_interval(secs => $7),
                    c + make_interval(secs => $8), $9, GREATEST($9, 3), NOW()
             FROM (SELECT NOW()::timestamp - make_interval(secs => $5) AS c) x",
        )
        .bind(r.task_type)
        .bind(r.status)
        .bind(r.capability)
        .bind(r.on_droplet.then_some(d8))
        .bind(r.created_ago)
        .bind(r.assigned)
        .bind(r.started)
        .bind(r.ended)
        .bind(r.retries)
        .execute(&app.db)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO task_state_history (task_id, from_status, to_status, changed_by, changed_at)
         SELECT id, 'pending', 'assigned', 'task_router', assigned_at FROM tasks WHERE assigned_at IS NOT NULL",
    )
    .execute(&app.db)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO heartbeats (droplet_id, status, metrics, received_at)
         SELECT $1, 'active', jsonb_build_object('beat', i), NOW()::timestamp - make_interval(secs => 3000 - 60 * i)
         FROM generate_series(0, 29) AS i
         UNION ALL
         SELECT $1, 'maintenance', '{\"beat\": \"m\"}', NOW()::timestamp - make_interval(secs => 1200)",
    )
    .bind(d8)
    .execute(&app.db)
    .await
    .unwrap();
    d8
}

#[track_caller]
fn close(v: &Value, expected: f64) {
    let got = v
        .as_f64()
        .unwrap_or_else(|| panic!("expected {expected}, got {v}"));
    assert!(
        (got - expected).abs() < 1e-6,
        "expected {expected}, got {got}"
    );
}

async fn metrics(app: &TestApp, path: &str) -> Value {
    let (s, b) = app.get(path, &app.token(5, &["read"])).await;
    assert_eq!(s, StatusCode::OK, "{path}: {b}");
    b["payload"].clone()
}

#[tokio::test]
async fn summary_counts_rates_and_latencies_are_exact() {
    let app = TestApp::spawn().await;
    data_set(&app).await;
    let p = metrics(&app, "/metrics/summary").await;
    assert_eq!(
        p["tasks"]["by_status"],
        json!({"pending": 4, "assigned": 0, "in_progress": 1, "completed": 6, "failed": 1, "cancelled": 1})
    );
    assert_eq!(p["tasks"]["total"], 13);
    assert_eq!(
        p["droplets"]["by_status"],
        json!({"active": 1, "inactive": 1, "error": 0})
    );
    close(&p["success_rate"], 6.0 / 7.0);
    assert_eq!(
        (
            &p["last_hour"]["created"],
            &p["last_hour"]["completed"],
            &p["last_hour"]["failed"]
        ),
        (&json!(10), &json!(4), &json!(1))
    );
    close(&p["last_hour"]["success_rate"], 0.8);
    assert_eq!(p["last_24h"]["created"], 10);
    assert_eq!(p["last_24h"]["completed"], 4);
    // Assignment: 1, 2, 4, 6, 8, 10 s (the tasks created in the last day).
    let a = &p["assignment_latency"];
    assert_eq!(a["count"], 6);
    close(&a["mean_seconds"], 31.0 / 6.0);
    close(&a["p50_seconds"], 5.0);
    close(&a["p95_seconds"], 9.5);
    close(&a["max_seconds"], 10.0);
    // Execution: 10, 20, 30, 40 s (completed in the last day).
    let e = &p["execution_time"];
    assert_eq!(e["count"], 4);
    close(&e["mean_seconds"], 25.0);
    close(&e["p95_seconds"], 38.5);
}

#[tokio::test]
async fn task_performance_per_type_and_range_is_exact() {
    let app = TestApp::spawn().await;
    data_set(&app).await;
    let p = metrics(
        &app,
        "/metrics/tasks/performance?task_type=alpha&time_range=24h",
    )
    .await;
    assert_eq!(p["total"], 5);
    assert_eq!(p["by_outcome"]["completed"], 4);
    assert_eq!(p["by_outcome"]["failed"], 1);
    assert_eq!(p["by_outcome"]["cancelled"], 0);
    close(&p["success_rate"], 0.8);
    let d = &p["duration"];
    assert_eq!(d["count"], 4);
    close(&d["mean_seconds"], 25.0);
    close(&d["p50_seconds"], 25.0);
    close(&d["p95_seconds"], 38.5);
    close(&d["max_seconds"], 40.0);
    assert_eq!(p["retries"], json!({"total": 2, "tasks_retried": 1}));

    // Every type over a week: beta's 100 and 300 s runs and its cancellation join in.
    let p = metrics(&app, "/metrics/tasks/performance?time_range=7d").await;
    assert_eq!(p["total"], 13);
    assert_eq!(
        p["by_outcome"],
        json!({"completed": 6, "failed": 1, "cancelled": 1, "pending": 4, "assigned": 0, "in_progress": 1})
    );
    close(&p["success_rate"], 6.0 / 7.0);
    close(&p["duration"]["mean_seconds"], 500.0 / 6.0);
    close(&p["duration"]["p50_seconds"], 35.0);
    close(&p["duration"]["p95_seconds"], 250.0);
    close(&p["duration"]["max_seconds"], 300.0);
    // The last hour: beta is too old; the default range is 24h.
    assert_eq!(
        metrics(&app, "/metrics/tasks/performance?time_range=1h").await["total"],
        10
    );
    let p = metrics(&app, "/metrics/tasks/performance").await;
    assert_eq!(
        (p["time_range"].as_str(), &p["total"]),
        (Some("24h"), &json!(10))
    );
    // No tasks of a type: zeros and nulls, not an error.
    let p = metrics(&app, "/metrics/tasks/performance?task_type=none").await;
    assert_eq!(p["total"], 0);
    assert!(p["success_rate"].is_null() && p["duration"]["mean_seconds"].is_null());
}

#[tokio::test]
async fn time_ranges_other_than_1h_24h_7d_30d_are_422() {
    let app = TestApp::spawn().await;
    let reader = app.token(5, &["read"]);
    for path in [
        "/metrics/tasks/performance?time_range=2h",
        "/metrics/tasks/by-type?time_range=2h",
        "/metrics/routing?time_range=2h",
        "/metrics/droplets/8/performance?time_range=1y",
    ] {
        let (s, b) = app.get(path, &reader).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{path}: {b}");
        assert_eq!(b["detail"][0]["loc"], json!(["query", "time_range"]));
        assert!(b["detail"][0]["msg"].as_str().unwrap().contains("30d"));
    }
    for range in ["1h", "24h", "7d", "30d"] {
        let (s, b) = app
            .get(
                &format!("/metrics/tasks/performance?time_range={range}"),
                &reader,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{range}: {b}");
    }
}

#[tokio::test]
async fn tasks_by_type_is_exact() {
    let app = TestApp::spawn().await;
    data_set(&app).await;
    let p = metrics(&app, "/metrics/tasks/by-type").await;
    assert_eq!(p["total"], 13);
    let types = p["types"].as_array().unwrap();
    let names: Vec<&str> = types
        .iter()
        .map(|t| t["task_type"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "gamma", "beta", "delta"]);
    let alpha = &types[0];
    assert_eq!(
        (
            &alpha["total"],
            &alpha["completed"],
            &alpha["failed"],
            &alpha["retries"]
        ),
        (&json!(5), &json!(4), &json!(1), &json!(2))
    );
    close(&alpha["share"], 5.0 / 13.0);
    close(&alpha["success_rate"], 0.8);
    close(&alpha["mean_duration_seconds"], 25.0);
    let beta = &types[2];
    assert_eq!(
        (&beta["completed"], &beta["cancelled"]),
        (&json!(2), &json!(1))
    );
    close(&beta["mean_duration_seconds"], 200.0);
    close(&beta["success_rate"], 1.0);
    let gamma = &types[1];
    assert_eq!(gamma["pending"], 4);
    assert!(gamma["mean_duration_seconds"].is_null() && gamma["success_rate"].is_null());

    let p = metrics(&app, "/metrics/tasks/by-type?time_range=24h").await;
    assert_eq!(p["total"], 10);
    let names: Vec<&str> = p["types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["task_type"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "gamma", "delta"]);
}

#[tokio::test]
async fn droplet_performance_is_exact() {
    let app = TestApp::spawn().await;
    data_set(&app).await;
    let p = metrics(&app, "/metrics/droplets/8/performance?time_range=1h").await;
    assert_eq!(p["droplet_id"], 8);
    assert_eq!(
        (&p["tasks_completed"], &p["tasks_failed"]),
        (&json!(4), &json!(1))
    );
    close(&p["mean_duration_seconds"], 25.0);
    close(&p["p95_duration_seconds"], 38.5);
    close(&p["success_rate"], 0.8);
    assert_eq!(
        p["current_load"],
        json!({"assigned": 0, "in_progress": 1, "total": 1})
    );
    assert_eq!(p["last_heartbeat_status"], "maintenance");
    assert_eq!(p["last_heartbeat_metrics"], json!({"beat": "m"}));
    assert_eq!(p["uptime"]["heartbeats"], 31);
    close(&p["uptime"]["covered_seconds"], 1800.0);
    close(&p["uptime"]["observed_seconds"], 3600.0);
    close(&p["uptime"]["ratio"], 0.5);

    // Over a day the same 1800 s are a smaller share; over a week beta's runs count too.
    let p = metrics(&app, "/metrics/droplets/8/performance").await;
    close(&p["uptime"]["ratio"], 1800.0 / 86_400.0);
    assert_eq!(p["tasks_completed"], 4);
    let p = metrics(&app, "/metrics/droplets/8/performance?time_range=7d").await;
    assert_eq!(p["tasks_completed"], 6);
    close(&p["mean_duration_seconds"], 500.0 / 6.0);
    // Observed only since the droplet was first registered (2 days ago, give or take the
    // moments between writing the data set and reading it).
    let observed = p["uptime"]["observed_seconds"].as_f64().unwrap();
    assert!(
        (TWO_DAYS..TWO_DAYS + 60.0).contains(&observed),
        "{observed}"
    );

    let p = metrics(&app, "/metrics/droplets/9/performance").await;
    assert_eq!(p["tasks_completed"], 0);
    close(&p["uptime"]["ratio"], 0.0);
    let (s, b) = app
        .get("/metrics/droplets/77/performance", &app.admin())
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert_eq!(b["detail"], "Droplet 77 not found");
}

#[tokio::test]
async fn routing_metrics_are_exact() {
    let app = TestApp::spawn().await;
    data_set(&app).await;
    let p = metrics(&app, "/metrics/routing").await;
    assert_eq!(p["time_range"], "1h");
    // a1-a5 and delta were assigned in the last hour; beta's assignments are 2 days old.
    assert_eq!(p["assignments"], 6);
    close(&p["assignments_per_minute"], 0.1);
    assert_eq!(p["assignment_latency"]["count"], 6);
    close(&p["assignment_latency"]["mean_seconds"], 31.0 / 6.0);
    close(&p["assignment_latency"]["p95_seconds"], 9.5);
    assert_eq!(p["pending_total"], 4);
    assert_eq!(p["pending_unroutable"], 1);
    let by_cap: Vec<(Value, i64, bool)> = p["pending_by_capability"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["capability"].clone(),
                c["pending"].as_i64().unwrap(),
                c["routable"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        by_cap,
        vec![
            (json!("verify"), 2, true),
            (Value::Null, 1, true),
            (json!("nobody"), 1, false),
        ]
    );
    let oldest = p["pending_by_capability"][0]["oldest_pending_seconds"]
        .as_f64()
        .unwrap();
    assert!((600.0..660.0).contains(&oldest), "{oldest}");
    assert_eq!(
        (&p["dispatch"]["delivered"], &p["dispatch"]["failed"]),
        (&json!(0), &json!(0))
    );
    // Over a week beta's two assignments count too.
    let p = metrics(&app, "/metrics/routing?time_range=7d").await;
    assert_eq!(p["assignments"], 8);
}

#[tokio::test]
async fn routing_metrics_count_dispatch_outcomes() {
    let app = TestApp::spawn_with(&[("DISPATCH_TIMEOUT_SECONDS", "1")]).await;
    let ok = DropletServer::start(Behaviour::Ok).await;
    let failing = DropletServer::start(Behaviour::Error500).await;
    app.register(8, &[], &ok.endpoint).await;
    app.register(9, &[], &failing.endpoint).await;
    for target in [8, 8, 9] {
        app.request(
            Method::POST,
            &format!("/send?target_droplet_id={target}&payload=%7B%7D"),
            Some(&app.admin()),
            None,
        )
        .await;
    }
    let d = metrics(&app, "/metrics/routing").await["dispatch"].clone();
    assert_eq!(
        (&d["delivered"], &d["failed"], &d["timeout"]),
        (&json!(2), &json!(1), &json!(0))
    );
    close(&d["success_rate"], 2.0 / 3.0);
}

#[tokio::test]
async fn system_health_reports_database_pool_jobs_websockets_and_registry() {
    let app = TestApp::spawn().await;
    app.state
        .jobs
        .set_paused(&app.state, JobId::HeartbeatCleanup, true);
    eventually(Duration::from_secs(10), "event listener connected", || {
        let connected = app.state.events.stats().listener.connected;
        async move { connected.then_some(()) }
    })
    .await;
    let p = metrics(&app, "/metrics/system/health").await;
    assert_eq!(p["status"], "healthy", "{p}");
    assert_eq!(p["database"]["status"], "ok");
    assert!(p["database"]["round_trip_ms"].as_f64().unwrap() >= 0.0);
    let pool = &p["database"]["pool"];
    assert_eq!(pool["max"], 4);
    let size = pool["size"].as_u64().unwrap();
    assert!((1..=4).contains(&size), "{pool}");
    assert_eq!(
        pool["idle"].as_u64().unwrap() + pool["in_use"].as_u64().unwrap(),
        size
    );
    let jobs = p["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 5);
    let cleanup = jobs
        .iter()
        .find(|j| j["id"] == "heartbeat_cleanup")
        .unwrap();
    assert_eq!(cleanup["paused"], true);
    assert_eq!(p["websocket"]["total_connections"], 0);
    assert_eq!(p["websocket"]["listener"]["connected"], true);
    assert_eq!(p["registry"]["status"], "unconfigured");
    assert!(p["problems"].as_array().unwrap().is_empty());

    // An open WebSocket shows up in the figures.
    let url = format!(
        "ws://{}/ws/tasks?token={}",
        app.addr,
        app.token(5, &["read"])
    );
    let (_socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    eventually(Duration::from_secs(10), "the socket is counted", || {
        let n = app.state.events.connection_count();
        async move { (n == 1).then_some(()) }
    })
    .await;
    let p = metrics(&app, "/metrics/system/health").await;
    assert_eq!(p["websocket"]["total_connections"], 1);
    assert_eq!(p["websocket"]["connections"]["tasks"], 1);
}

#[tokio::test]
async fn metrics_need_read_permission_and_vanish_when_disabled() {
    let app = TestApp::spawn().await;
    let paths = [
        "/metrics/summary",
        "/metrics/tasks/performance",
        "/metrics/tasks/by-type",
        "/metrics/droplets/8/performance",
        "/metrics/routing",
        "/metrics/system/health",
    ];
    for path in paths {
        let (s, _) = app.request(Method::GET, path, None, None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path}");
        let (s, _) = app.get(path, &app.token(5, &[])).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{path}");
    }
    let off = TestApp::spawn_with(&[("ENABLE_METRICS", "false")]).await;
    for path in paths {
        let (s, _) = off.get(path, &off.admin()).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}");
        let (s, _) = off.request(Method::GET, path, None, None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}");
    }
}

type Figures = (String, String, i64, i64, String);

/// Tasks per type and status (count, retries, run seconds of the completed) as counted now,
/// and as kept by the triggers.
async fn counted_and_kept(app: &TestApp) -> (Vec<Figures>, Vec<Figures>) {
    let counted = sqlx::query_as(
        "SELECT task_type::text, status::text, COUNT(*), COALESCE(SUM(retry_count), 0)::bigint,
                COALESCE(SUM(CASE WHEN status = 'completed' AND started_at IS NOT NULL AND completed_at IS NOT NULL
                                  THEN date_part('epoch', completed_at - started_at)::numeric END), 0)::text
         FROM tasks GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    let kept = sqlx::query_as(
        "SELECT task_type::text, status::text, SUM(n)::bigint, SUM(retries)::bigint, SUM(run_seconds)::text
         FROM task_counts GROUP BY 1, 2 HAVING SUM(n) <> 0 ORDER BY 1, 2",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    (counted, kept)
}

#[tokio::test]
async fn status_counts_kept_as_changes_happen_equal_a_count_of_the_table() {
    let app = TestApp::spawn().await;
    data_set(&app).await;
    let (counted, kept) = counted_and_kept(&app).await;
    assert_eq!(kept, counted);
    // Moves through the state machine, from several connections at once, a deletion, and
    // the cleanup job folding the rows of backends that are gone: still equal.
    let ids: Vec<i32> =
        sqlx::query_scalar("SELECT id FROM tasks WHERE status = 'pending' ORDER BY id")
            .fetch_all(&app.db)
            .await
            .unwrap();
    let cancels = ids.iter().map(|id| {
        let db = app.db.clone();
        async move {
            sqlx::query("UPDATE tasks SET status = 'cancelled' WHERE id = $1")
                .bind(id)
                .execute(&db)
                .await
                .unwrap();
        }
    });
    futures::future::join_all(cancels).await;
    sqlx::query("DELETE FROM tasks WHERE status = 'completed' AND task_type = 'beta'")
        .execute(&app.db)
        .await
        .unwrap();
    let (counted, kept) = counted_and_kept(&app).await;
    assert_eq!(kept, counted);
    let cancelled: i64 = counted
        .iter()
        .filter(|f| f.1 == "cancelled")
        .map(|f| f.2)
        .sum();
    assert_eq!(cancelled, 5, "{counted:?}");
    orchestrator::services::health_monitor::cleanup_old_heartbeats(
        &app.state.db,
        &app.state.config(),
    )
    .await
    .unwrap();
    let (counted, kept) = counted_and_kept(&app).await;
    assert_eq!(kept, counted);
    // And /metrics shows them.
    let (status, text) = {
        let r = reqwest::get(app.url("/metrics")).await.unwrap();
        (r.status(), r.text().await.unwrap())
    };
    assert_eq!(status, StatusCode::OK);
    assert!(
        text.contains("orchestrator_tasks{status=\"cancelled\"} 5"),
        "{text}"
    );
}
