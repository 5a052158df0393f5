//! A droplet that cannot be reached stops getting work (issue 26, item 5): after
//! `DISPATCH_FAILURES_BEFORE_UNREACHABLE` deliveries in a row that cannot connect, it is
//! marked (`error`, an event), its assigned tasks go back to pending and land on a healthy
//! droplet, its heartbeats do not bring it back, and a probe does once its endpoint is up.
//! An accepted delivery resets the count.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::*;
use crate::real_mesh::task_for;

const SOON: Duration = Duration::from_secs(20);

/// The droplet's status, its failed deliveries in a row, and whether it is unreachable.
async fn reach_of(app: &TestApp, id: i32) -> (String, i32, bool) {
    sqlx::query_as(
        "SELECT status, failed_deliveries, unreachable_since IS NOT NULL FROM droplets WHERE droplet_id = $1",
    )
    .bind(id)
    .fetch_one(&app.db)
    .await
    .expect("droplet row")
}

/// The reasons of the `droplet_health_changed` events logged for droplet `id`.
async fn health_reasons(app: &TestApp, id: i32) -> Vec<String> {
    logged_events(&app.db, "droplets", 0)
        .await
        .into_iter()
        .map(|(_, e)| e["payload"].clone())
        .filter(|p| p["event"] == "droplet_health_changed" && p["droplet"]["droplet_id"] == id)
        .map(|p: Value| p["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test]
async fn an_unreachable_droplet_is_marked_drained_and_brought_back_by_a_probe() {
    let app = TestApp::spawn_with(&[
        ("DISPATCH_FAILURES_BEFORE_UNREACHABLE", "3"),
        ("TASK_ROUTER_INTERVAL", "1"),
    ])
    .await;
    let dead = dead_endpoint();
    app.register(61, &["reach"], &dead).await;
    // Its heartbeats go on: they show it reaches us, not that we reach it.
    let beats = keep_beating(&app, 61);
    let tasks = [
        app.create_task(5, task_for("reach", json!({}))).await,
        app.create_task(5, task_for("reach", json!({}))).await,
    ];

    // Marked: `error`, unreachable, with an event saying why; its tasks back to pending.
    eventually(SOON, "droplet 61 marked unreachable", || async {
        let (status, _, unreachable) = reach_of(&app, 61).await;
        (status == "error" && unreachable).then_some(())
    })
    .await;
    eventually(SOON, "the event saying why", || async {
        let reasons = health_reasons(&app, 61).await;
        reasons
            .iter()
            .any(|r| r.contains("could not be reached") && r.contains("3 deliveries in a row"))
            .then_some(())
    })
    .await;
    for &task in &tasks {
        eventually(SOON, "the task back to pending", || async {
            (app.holder(task).await.0 == "pending").then_some(())
        })
        .await;
        let history = app.history(task).await;
        assert!(
            history
                .iter()
                .any(|(from, to, _, reason)| from.as_deref() == Some("assigned")
                    && to == "pending"
                    && reason
                        .as_deref()
                        .unwrap_or("")
                        .contains("droplet 61 unreachable")),
            "{history:?}"
        );
    }

    // They land on a healthy droplet: a requeue, not a retry, on the next attempt.
    let healthy = DropletServer::start(Behaviour::Ok).await;
    app.register(62, &["reach"], &healthy.endpoint).await;
    for &task in &tasks {
        app.wait_assigned(task, 62, SOON).await;
        let t = app.task(task).await;
        assert_eq!(
            (t["attempt"].as_i64(), t["retry_count"].as_i64()),
            (Some(2), Some(0)),
            "{t}"
        );
    }
    eventually(SOON, "both delivered to droplet 62", || async {
        let executed = healthy.executed();
        tasks
            .iter()
            .all(|t| executed.contains(&i64::from(*t)))
            .then_some(())
    })
    .await;
    // Heartbeats all along did not bring it back.
    assert_eq!(reach_of(&app, 61).await.0, "error");

    // Its endpoint comes up: a probe brings it back, counts reset.
    let _back = DropletServer::start_at(&dead, Behaviour::Ok).await;
    eventually(SOON, "droplet 61 back after a probe", || async {
        (reach_of(&app, 61).await == ("active".to_string(), 0, false)).then_some(())
    })
    .await;
    eventually(SOON, "the event saying it is back", || async {
        let reasons = health_reasons(&app, 61).await;
        reasons
            .iter()
            .any(|r| r.contains("answered a probe"))
            .then_some(())
    })
    .await;
    beats.abort();
}

#[tokio::test]
async fn an_accepted_delivery_resets_the_count_of_failed_deliveries() {
    let app = TestApp::spawn_with(&[("DISPATCH_FAILURES_BEFORE_UNREACHABLE", "100")]).await;
    let dead = dead_endpoint();
    app.register(63, &["reach"], &dead).await;
    let task = app.create_task(5, task_for("reach", json!({}))).await;
    eventually(SOON, "failed deliveries counted", || async {
        (reach_of(&app, 63).await.1 >= 2).then_some(())
    })
    .await;

    // The endpoint comes up; the delivery's retry is accepted and the count starts again.
    let droplet = DropletServer::start_at(&dead, Behaviour::Ok).await;
    eventually(SOON, "the task delivered", || async {
        droplet.executed().contains(&i64::from(task)).then_some(())
    })
    .await;
    eventually(SOON, "the count reset", || async {
        (reach_of(&app, 63).await == ("active".to_string(), 0, false)).then_some(())
    })
    .await;
}

/// An emergency stop halts the probes as it halts every other message to droplets: an
/// unreachable droplet whose endpoint answers again stays out until the stop ends.
#[tokio::test]
async fn no_probe_is_sent_during_an_emergency_stop() {
    let app = TestApp::spawn().await;
    let up = DropletServer::start(Behaviour::Ok).await;
    app.register(64, &["reach"], &up.endpoint).await;
    sqlx::query(
        "UPDATE droplets SET status = 'error', unreachable_since = NOW(), failed_deliveries = 5
         WHERE droplet_id = 64",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let admin = app.admin();
    let (s, b) = app
        .post("/management/emergency-stop", &admin, json!({}))
        .await;
    assert_eq!(s, reqwest::StatusCode::OK, "{b}");
    // The first probe would go 1 s after the droplet is seen; give it several rounds.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(reach_of(&app, 64).await, ("error".to_string(), 5, true));

    let (s, b) = app
        .post(
            "/management/scheduler/jobs/task_router/resume",
            &admin,
            json!({}),
        )
        .await;
    assert_eq!(s, reqwest::StatusCode::OK, "{b}");
    eventually(SOON, "droplet 64 back after a probe", || async {
        (reach_of(&app, 64).await == ("active".to_string(), 0, false)).then_some(())
    })
    .await;
}
