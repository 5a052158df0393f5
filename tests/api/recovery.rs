//! Health monitoring and recovery: silent droplets, requeues, retries with backoff,
//! deadlines, unreachable droplets and assignment timeouts.

use std::time::Duration;

use orchestrator::services::{health_monitor, task_recovery};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::*;

/// Loose enough for a loaded CI machine, well under the intervals that would otherwise act.
const SOON: Duration = Duration::from_secs(10);

fn task_for(capability: &str, extra: Value) -> Value {
    let mut t = json!({ "task_type": "work", "title": "work", "required_capability": capability, "payload": {} });
    if let (Some(t), Value::Object(extra)) = (t.as_object_mut(), extra) {
        t.extend(extra);
    }
    t
}

fn steps(history: &[HistoryEntry]) -> Vec<(String, String)> {
    history
        .iter()
        .map(|(from, to, by, _)| {
            (
                format!("{}->{to}", from.as_deref().unwrap_or("null")),
                by.clone().unwrap_or_default(),
            )
        })
        .collect()
}

fn step(from: &str, to: &str, by: &str) -> (String, String) {
    (format!("{from}->{to}"), by.to_string())
}

async fn droplet_status(app: &TestApp, droplet: i32) -> String {
    sqlx::query_scalar("SELECT status FROM droplets WHERE droplet_id = $1")
        .bind(droplet)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

fn commands_for(server: &DropletServer, command: &str) -> Vec<i64> {
    server
        .messages()
        .iter()
        .filter(|m| m["payload"]["command"] == command)
        .filter_map(|m| {
            m["payload"]["task_id"]
                .as_i64()
                .or(m["payload"]["task"]["id"].as_i64())
        })
        .collect()
}

#[tokio::test]
async fn a_silent_droplet_loses_its_work_to_another_droplet() {
    let app = TestApp::spawn_with(&[
        ("HEARTBEAT_TIMEOUT", "1"),
        ("HEARTBEAT_CHECK_INTERVAL", "1"),
        ("TASK_ROUTER_INTERVAL", "1"),
        ("RETRY_BACKOFF_SECONDS", "0"),
    ])
    .await;
    let dying = DropletServer::start(Behaviour::Ok).await;
    let healthy = DropletServer::start(Behaviour::Ok).await;
    app.register(70, &["render"], &dying.endpoint).await;
    let dying_beats = keep_beating(&app, 70);
    let waiting = app.create_task(5, task_for("render", json!({}))).await;
    let running = app.create_task(5, task_for("render", json!({}))).await;
    app.wait_assigned(waiting, 70, SOON).await;
    app.wait_assigned(running, 70, SOON).await;
    let (s, b) = app.move_task(70, running, "in_progress").await;
    assert_eq!(s, StatusCode::OK, "{b}");

    app.register(71, &["render"], &healthy.endpoint).await;
    let healthy_beats = keep_beating(&app, 71);
    dying_beats.abort();

    eventually(Duration::from_secs(10), "droplet 70 inactive", || async {
        (droplet_status(&app, 70).await == "inactive").then_some(())
    })
    .await;
    // The task it had not started moves at once, without counting a retry.
    app.wait_assigned(waiting, 71, Duration::from_secs(10))
        .await;
    assert_eq!(app.retry_count(waiting).await, 0);
    // The task it was running failed with it and is retried elsewhere.
    app.wait_assigned(running, 71, Duration::from_secs(10))
        .await;
    assert_eq!(app.retry_count(running).await, 1);
    assert_eq!(droplet_status(&app, 71).await, "active");

    let history = app.history(waiting).await;
    assert_eq!(
        steps(&history),
        [
            step("null", "pending", "droplet-5"),
            step("pending", "assigned", "task_router"),
            step("assigned", "pending", "system"),
            step("pending", "assigned", "task_router"),
        ]
    );
    let reason = history[2].3.clone().unwrap();
    assert!(
        reason.contains("droplet 70 lost") && reason.contains("not a retry"),
        "{reason}"
    );

    let history = app.history(running).await;
    assert_eq!(
        steps(&history),
        [
            step("null", "pending", "droplet-5"),
            step("pending", "assigned", "task_router"),
            step("assigned", "in_progress", "droplet-70"),
            step("in_progress", "failed", "system"),
            step("failed", "pending", "system"),
            step("pending", "assigned", "task_router"),
        ]
    );
    assert_eq!(history[3].3.as_deref(), Some("droplet 70 lost"));
    assert_eq!(history[4].3.as_deref(), Some("retry 1 after failure"));

    // The lost droplet is told, the new one gets the work.
    eventually(SOON, "cancel_task sent to droplet 70", || async {
        let cancelled = commands_for(&dying, "cancel_task");
        (cancelled.contains(&(waiting as i64)) && cancelled.contains(&(running as i64)))
            .then_some(())
    })
    .await;
    eventually(SOON, "execute_task sent to droplet 71", || async {
        let executed = healthy.executed();
        (executed.contains(&(waiting as i64)) && executed.contains(&(running as i64))).then_some(())
    })
    .await;

    // A late word from the lost droplet is refused and changes nothing.
    let (s, b) = app.move_task(70, waiting, "in_progress").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    let (s, b) = app.move_task(70, running, "completed").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert_eq!(
        app.holder(waiting).await,
        ("assigned".to_string(), Some(71))
    );
    assert_eq!(
        app.holder(running).await,
        ("assigned".to_string(), Some(71))
    );
    healthy_beats.abort();
}

#[tokio::test]
async fn a_task_that_always_fails_runs_max_retries_plus_one_times_then_stays_failed() {
    let app = TestApp::spawn_with(&[
        ("TASK_ROUTER_INTERVAL", "1"),
        ("RETRY_BACKOFF_SECONDS", "0"),
    ])
    .await;
    let server = DropletServer::start(Behaviour::Ok).await;
    app.register(72, &["flaky"], &server.endpoint).await;
    let id = app
        .create_task(5, task_for("flaky", json!({"max_retries": 2})))
        .await;
    for attempt in 0..3 {
        app.wait_assigned(id, 72, Duration::from_secs(10)).await;
        assert_eq!(app.retry_count(id).await, attempt);
        let (s, b) = app.move_task(72, id, "in_progress").await;
        assert_eq!(s, StatusCode::OK, "{b}");
        let (s, b) = app
            .patch(
                &format!("/tasks/{id}"),
                &app.token(72, &["read", "write"]),
                json!({"status": "failed", "error_message": format!("attempt {attempt} broke")}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
    }
    // The retry job runs twice more; the task has used its retries.
    app.wait_job_runs(JobId::TaskRouter, 2, Duration::from_secs(10))
        .await;
    assert_eq!(app.holder(id).await.0, "failed");
    assert_eq!(app.retry_count(id).await, 2);
    let task = app.task(id).await;
    assert_eq!(task["error_message"], "attempt 2 broke");
    let history = app.history(id).await;
    let count = |to: &str| history.iter().filter(|h| h.1 == to).count();
    assert_eq!(count("assigned"), 3);
    assert_eq!(count("failed"), 3);
    assert_eq!(count("pending"), 3, "created once, retried twice");
    let executed = server.executed();
    assert_eq!(executed.iter().filter(|t| **t == id as i64).count(), 3);
}

#[tokio::test]
async fn a_retry_waits_for_its_backoff_which_doubles_up_to_the_cap() {
    let app = TestApp::spawn_with(&[
        ("TASK_ROUTER_INTERVAL", "3600"),
        ("RETRY_BACKOFF_SECONDS", "60"),
        ("RETRY_BACKOFF_MAX_SECONDS", "100"),
    ])
    .await;
    let server = DropletServer::start(Behaviour::Ok).await;
    app.register(73, &["slow"], &server.endpoint).await;
    let id = app.create_task(5, task_for("slow", json!({}))).await;
    let failed_ago = |seconds: i64| {
        let db = app.db.clone();
        async move {
            sqlx::query(
                "UPDATE tasks SET completed_at = NOW() - make_interval(secs => $2) WHERE id = $1",
            )
            .bind(id)
            .bind(seconds as f64)
            .execute(&db)
            .await
            .unwrap();
        }
    };
    // (seconds since the failure that are too early, enough) for the first and second retry.
    for (attempt, (early, due)) in [(59, 61), (99, 101)].into_iter().enumerate() {
        app.wait_assigned(id, 73, SOON).await;
        app.move_task(73, id, "in_progress").await;
        let (s, b) = app.move_task(73, id, "failed").await;
        assert_eq!(s, StatusCode::OK, "{b}");

        let m = task_recovery::maintain(&app.state.changes()).await.unwrap();
        assert_eq!((m.retried, app.holder(id).await.0.as_str()), (0, "failed"));
        failed_ago(early).await;
        let m = task_recovery::maintain(&app.state.changes()).await.unwrap();
        assert_eq!(
            m.retried,
            0,
            "retry {} came before its backoff",
            attempt + 1
        );
        failed_ago(due).await;
        let m = task_recovery::maintain(&app.state.changes()).await.unwrap();
        assert_eq!(
            m.retried,
            1,
            "retry {} did not come after its backoff",
            attempt + 1
        );
        assert_eq!(app.retry_count(id).await, attempt as i32 + 1);
    }
}

#[tokio::test]
async fn a_task_past_its_deadline_fails_for_good_whatever_its_state() {
    let app = TestApp::spawn_with(&[
        ("TASK_ROUTER_INTERVAL", "3600"),
        ("RETRY_BACKOFF_SECONDS", "0"),
    ])
    .await;
    let server = DropletServer::start(Behaviour::Ok).await;
    app.register(74, &["due"], &server.endpoint).await;
    let later = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let pending = app
        .create_task(5, task_for("nobody-has-this", json!({"deadline": later})))
        .await;
    let assigned = app
        .create_task(5, task_for("due", json!({"deadline": later})))
        .await;
    let running = app
        .create_task(5, task_for("due", json!({"deadline": later})))
        .await;
    app.wait_assigned(assigned, 74, SOON).await;
    app.wait_assigned(running, 74, SOON).await;
    app.move_task(74, running, "in_progress").await;

    sqlx::query("UPDATE tasks SET deadline = NOW() - interval '1 second'")
        .execute(&app.db)
        .await
        .unwrap();
    let m = task_recovery::maintain(&app.state.changes()).await.unwrap();
    assert_eq!(m.deadlines_failed, 3);
    for id in [pending, assigned, running] {
        let task = app.task(id).await;
        assert_eq!(task["status"], "failed", "task {id}");
        assert_eq!(task["retry_count"], 0);
        assert_eq!(task["error_message"], "deadline exceeded");
        let last = app.history(id).await.pop().unwrap();
        assert_eq!(last.3.as_deref(), Some("deadline passed; not retried"));
    }
    // No retry, however often the job runs; the droplet is told and cannot finish it.
    let m = task_recovery::maintain(&app.state.changes()).await.unwrap();
    assert_eq!((m.retried, m.deadlines_failed), (0, 0));
    assert_eq!(app.holder(running).await.0, "failed");
    eventually(
        SOON,
        "cancel_task for both of droplet 74's tasks",
        || async {
            let c = commands_for(&server, "cancel_task");
            (c.contains(&(assigned as i64)) && c.contains(&(running as i64))).then_some(())
        },
    )
    .await;
    let (s, _) = app.move_task(74, running, "completed").await;
    assert_eq!(s, StatusCode::CONFLICT);
}

#[tokio::test]
async fn a_deadline_given_at_creation_is_enforced_by_the_router_job() {
    let app = TestApp::spawn_with(&[("TASK_ROUTER_INTERVAL", "1")]).await;
    let soon = (chrono::Utc::now() + chrono::Duration::milliseconds(500)).to_rfc3339();
    let id = app
        .create_task(5, task_for("nobody-has-this", json!({"deadline": soon})))
        .await;
    eventually(
        Duration::from_secs(4),
        "failed past its deadline",
        || async { (app.holder(id).await.0 == "failed").then_some(()) },
    )
    .await;
    assert_eq!(app.retry_count(id).await, 0);
}

#[tokio::test]
async fn an_unreachable_droplet_neither_blocks_routing_nor_keeps_its_task() {
    let app = TestApp::spawn_with(&[
        ("ASSIGNMENT_TIMEOUT_SECONDS", "2"),
        ("TASK_ROUTER_INTERVAL", "1"),
        ("DISPATCH_TIMEOUT_SECONDS", "1"),
    ])
    .await;
    let other = DropletServer::start(Behaviour::Ok).await;
    let rescuer = DropletServer::start(Behaviour::Ok).await;
    app.register(75, &["gpu"], &dead_endpoint()).await;
    app.register(76, &["cpu"], &other.endpoint).await;
    let id = app.create_task(5, task_for("gpu", json!({}))).await;
    app.wait_assigned(id, 75, SOON).await;

    // Routing goes on while the delivery to 75 fails.
    let cpu = app.create_task(5, task_for("cpu", json!({}))).await;
    app.wait_assigned(cpu, 76, SOON).await;
    eventually(SOON, "the cpu task delivered", || async {
        other.executed().contains(&(cpu as i64)).then_some(())
    })
    .await;
    // The delivery to 75 is retried.
    let failed = || {
        app.state
            .metrics
            .dispatch
            .with_label_values(&["failed"])
            .get()
    };
    eventually(Duration::from_secs(10), "two failed deliveries", || async {
        (failed() >= 2).then_some(())
    })
    .await;

    // Not started within 2 s: back to pending, and to the other gpu droplet.
    app.register(77, &["gpu"], &rescuer.endpoint).await;
    app.wait_assigned(id, 77, Duration::from_secs(10)).await;
    assert_eq!(app.retry_count(id).await, 0);
    let history = app.history(id).await;
    assert_eq!(
        steps(&history),
        [
            step("null", "pending", "droplet-5"),
            step("pending", "assigned", "task_router"),
            step("assigned", "pending", "system"),
            step("pending", "assigned", "task_router"),
        ]
    );
    let reason = history[2].3.clone().unwrap();
    assert!(reason.contains("not started within 2 s"), "{reason}");
    eventually(SOON, "execute_task delivered to 77", || async {
        rescuer.executed().contains(&(id as i64)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_heartbeat_brings_a_silent_droplet_back_unless_an_admin_deactivated_it() {
    let app = TestApp::spawn_with(&[
        ("HEARTBEAT_TIMEOUT", "1"),
        ("HEARTBEAT_CHECK_INTERVAL", "3600"),
    ])
    .await;
    let server = DropletServer::start(Behaviour::Ok).await;
    app.register(78, &["x"], &server.endpoint).await;
    app.register(79, &["x"], &server.endpoint).await;
    // The droplet events so far (the registrations); the round's follow them in the log.
    let before = eventually(
        Duration::from_secs(5),
        "the registrations' events",
        || async {
            let logged = logged_events(&app.db, "droplets", 0).await;
            (logged.len() >= 2).then(|| logged.last().map(|(id, _)| *id).unwrap_or(0))
        },
    )
    .await;
    sqlx::query("UPDATE droplets SET last_heartbeat = NOW() - interval '5 seconds'")
        .execute(&app.db)
        .await
        .unwrap();

    let mut round = health_monitor::run_once(&app.state.changes())
        .await
        .unwrap();
    round.marked_inactive.sort_unstable();
    assert_eq!(round.marked_inactive, [78, 79]);
    let mut events: Vec<(String, i64)> =
        eventually(Duration::from_secs(10), "droplet events", || async {
            let logged = logged_events(&app.db, "droplets", before).await;
            (logged.len() >= 4).then(|| {
                logged
                    .iter()
                    .map(|(_, v)| {
                        (
                            v["payload"]["event"].as_str().unwrap().to_string(),
                            v["payload"]["droplet"]["droplet_id"].as_i64().unwrap(),
                        )
                    })
                    .collect()
            })
        })
        .await;
    events.sort();
    assert_eq!(
        events,
        [
            ("droplet_health_changed".to_string(), 78),
            ("droplet_health_changed".to_string(), 79),
            ("droplet_heartbeat_missed".to_string(), 78),
            ("droplet_heartbeat_missed".to_string(), 79),
        ]
    );

    // 78 comes back with a heartbeat; 79, deactivated by an admin, does not.
    let (s, b) = app
        .request(
            Method::POST,
            "/droplets/79/deactivate",
            Some(&app.admin()),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    for id in [78, 79] {
        let (s, b) = app
            .post(
                &format!("/droplets/{id}/heartbeat"),
                &app.token(id, &["read", "write"]),
                json!({"status": "active"}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
    }
    assert_eq!(droplet_status(&app, 78).await, "active");
    assert_eq!(droplet_status(&app, 79).await, "inactive");
}

#[tokio::test]
async fn a_droplet_that_went_quiet_after_reporting_maintenance_loses_its_running_task() {
    let app = TestApp::spawn_with(&[
        ("HEARTBEAT_TIMEOUT", "1"),
        ("HEARTBEAT_CHECK_INTERVAL", "3600"),
        ("TASK_ROUTER_INTERVAL", "3600"),
    ])
    .await;
    let server = DropletServer::start(Behaviour::Ok).await;
    app.register(80, &["m"], &server.endpoint).await;
    let id = app.create_task(5, task_for("m", json!({}))).await;
    app.wait_assigned(id, 80, SOON).await;
    app.move_task(80, id, "in_progress").await;
    // It says it is in maintenance (inactive, but alive), then falls silent.
    let (s, b) = app
        .post(
            "/droplets/80/heartbeat",
            &app.token(80, &["read", "write"]),
            json!({"status": "maintenance"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(droplet_status(&app, 80).await, "inactive");
    let round = health_monitor::run_once(&app.state.changes())
        .await
        .unwrap();
    assert_eq!(round.tasks_recovered, 0, "it was still heartbeating");
    assert_eq!(app.holder(id).await.0, "in_progress");

    sqlx::query("UPDATE droplets SET last_heartbeat = NOW() - interval '5 seconds'")
        .execute(&app.db)
        .await
        .unwrap();
    let round = health_monitor::run_once(&app.state.changes())
        .await
        .unwrap();
    assert_eq!(round.tasks_recovered, 1);
    assert_eq!(app.holder(id).await.0, "failed");
    assert_eq!(
        app.history(id).await.pop().unwrap().3.as_deref(),
        Some("droplet 80 lost")
    );
}

#[tokio::test]
async fn a_retry_prefers_another_droplet_even_a_busier_one() {
    let app = TestApp::spawn_with(&[
        ("TASK_ROUTER_INTERVAL", "1"),
        ("RETRY_BACKOFF_SECONDS", "0"),
    ])
    .await;
    let server = DropletServer::start(Behaviour::Ok).await;
    app.register(81, &["r"], &server.endpoint).await;
    let busy = app.create_task(5, task_for("r", json!({}))).await;
    app.wait_assigned(busy, 81, SOON).await;
    app.move_task(81, busy, "in_progress").await;
    app.register(82, &["r"], &server.endpoint).await;
    let id = app.create_task(5, task_for("r", json!({}))).await;
    // 82 is idle, so it gets the task; it fails it.
    app.wait_assigned(id, 82, SOON).await;
    app.move_task(82, id, "in_progress").await;
    let (s, b) = app.move_task(82, id, "failed").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    // The retry goes to 81, although 82 is the less loaded.
    app.wait_assigned(id, 81, Duration::from_secs(10)).await;
    assert_eq!(app.retry_count(id).await, 1);
}
