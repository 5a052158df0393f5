//! The scheduled jobs: their records, pause and resume through the API, failures that
//! do not stop them, and the advisory locks that keep replicas from doubling a round.

use std::time::Duration;

use orchestrator::jobs;
use orchestrator::services::locks::Singleton;
use orchestrator::services::{health_monitor, task_recovery};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::*;

const EVERY_SECOND: [(&str, &str); 5] = [
    ("HEARTBEAT_CHECK_INTERVAL", "1"),
    ("TASK_ROUTER_INTERVAL", "1"),
    ("REGISTRY_SYNC_INTERVAL", "1"),
    ("HEARTBEAT_CLEANUP_INTERVAL", "1"),
    ("WS_HEARTBEAT_INTERVAL", "1"),
];

async fn listed(app: &TestApp) -> Vec<Value> {
    let (s, body) = app.get("/management/scheduler/jobs", &app.admin()).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body["payload"]["jobs"].as_array().unwrap().clone()
}

fn job<'a>(jobs: &'a [Value], id: &str) -> &'a Value {
    jobs.iter().find(|j| j["id"] == id).unwrap()
}

async fn admin_post(app: &TestApp, path: &str) -> (StatusCode, Value) {
    app.request(Method::POST, path, Some(&app.admin()), None)
        .await
}

#[tokio::test]
async fn the_five_jobs_are_listed_with_their_last_and_next_runs() {
    let app = TestApp::spawn_with(&EVERY_SECOND).await;
    let jobs = eventually(Duration::from_secs(10), "every job ran", || async {
        let jobs = listed(&app).await;
        jobs.iter()
            .all(|j| j["runs"].as_u64() >= Some(1))
            .then_some(jobs)
    })
    .await;
    let ids: Vec<&str> = jobs.iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(ids, JobId::ALL.map(JobId::as_str));
    for j in &jobs {
        assert_eq!(j["interval_seconds"], 1, "{j}");
        assert_eq!(j["paused"], false, "{j}");
        assert!(j["last_run"].as_str().unwrap().ends_with('Z'), "{j}");
        assert!(j["next_run"].is_string(), "{j}");
        assert!(j["last_duration_ms"].as_f64().unwrap() >= 0.0, "{j}");
        assert!(j["last_outcome"].as_str().unwrap().starts_with("ok"), "{j}");
    }
}

#[tokio::test]
async fn every_job_runs_once_on_demand() {
    let app = TestApp::spawn().await;
    for id in JobId::ALL {
        let outcome = jobs::run_once(&app.state, id).await;
        assert!(outcome.is_ok(), "{id}: {outcome:?}");
        assert_eq!(JobId::parse(id.as_str()), Some(id));
    }
    assert_eq!(JobId::parse("nope"), None);
}

#[tokio::test]
async fn pausing_the_router_stops_assignment_and_resuming_restarts_it() {
    let app = TestApp::spawn_with(&[
        ("TASK_ROUTER_INTERVAL", "1"),
        ("HEARTBEAT_CHECK_INTERVAL", "1"),
    ])
    .await;
    let server = DropletServer::start(Behaviour::Ok).await;
    app.register(50, &["p"], &server.endpoint).await;
    // The registration's own pass is over before the router stops.
    eventually(
        Duration::from_secs(3),
        "the registration's pass",
        || async { app.state.router.has_room_for(Some("p")).then_some(()) },
    )
    .await;

    let (s, body) = admin_post(&app, "/management/scheduler/jobs/task_router/pause").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["payload"]["job"]["id"], "task_router");
    assert_eq!(body["payload"]["job"]["paused"], true);
    assert!(body["payload"]["job"]["next_run"].is_null());
    // A round that began before the pause may still finish; none starts after it.
    eventually(
        Duration::from_secs(2),
        "no router round in flight",
        || async { (!app.state.jobs.get(JobId::TaskRouter).unwrap().running).then_some(()) },
    )
    .await;
    let runs = app.job_runs(JobId::TaskRouter);

    let id = app
        .create_task(
            5,
            json!({"task_type": "t", "title": "t", "required_capability": "p"}),
        )
        .await;
    // Two health monitor runs: more than a router interval has passed.
    app.wait_job_runs(JobId::HealthMonitor, 2, Duration::from_secs(10))
        .await;
    assert_eq!(app.holder(id).await.0, "pending");
    assert_eq!(app.job_runs(JobId::TaskRouter), runs, "a paused job ran");
    assert!(job(&listed(&app).await, "task_router")["paused"] == true);

    let (s, body) = admin_post(&app, "/management/scheduler/jobs/task_router/resume").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["payload"]["job"]["paused"], false);
    app.wait_assigned(id, 50, Duration::from_secs(10)).await;
    app.wait_job_runs(JobId::TaskRouter, 1, Duration::from_secs(10))
        .await;
}

#[tokio::test]
async fn an_unknown_job_is_404() {
    let app = TestApp::spawn().await;
    for action in ["pause", "resume"] {
        let (s, body) =
            admin_post(&app, &format!("/management/scheduler/jobs/nope/{action}")).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
        assert!(body["detail"].as_str().unwrap().contains("nope"), "{body}");
    }
}

#[tokio::test]
async fn a_failing_job_is_recorded_and_runs_again_next_time() {
    let app = TestApp::spawn_with(&[("HEARTBEAT_CLEANUP_INTERVAL", "1")]).await;
    sqlx::query("ALTER TABLE heartbeats RENAME TO heartbeats_away")
        .execute(&app.db)
        .await
        .unwrap();
    let failed = eventually(Duration::from_secs(10), "the cleanup failed", || async {
        let j = job(&listed(&app).await, "heartbeat_cleanup").clone();
        (j["failures"].as_u64() >= Some(1)).then_some(j)
    })
    .await;
    assert_eq!(failed["last_outcome"], "error");
    assert!(failed["last_error"]
        .as_str()
        .unwrap()
        .contains("heartbeats"));
    let (s, _) = app.request(Method::GET, "/health", None, None).await;
    assert_eq!(s, StatusCode::OK);

    sqlx::query("ALTER TABLE heartbeats_away RENAME TO heartbeats")
        .execute(&app.db)
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the cleanup ran again", || async {
        let j = job(&listed(&app).await, "heartbeat_cleanup").clone();
        (j["last_outcome"].as_str().unwrap_or("").starts_with("ok")).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_round_another_replica_holds_is_skipped() {
    let app = TestApp::spawn().await;
    let mut other = app.db.begin().await.unwrap();
    for lock in [Singleton::HealthRound.id(), Singleton::Maintenance.id()] {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(lock)
            .execute(&mut *other)
            .await
            .unwrap();
    }
    assert!(
        health_monitor::run_once(&app.state.changes())
            .await
            .unwrap()
            .skipped
    );
    assert!(
        task_recovery::maintain(&app.state.changes())
            .await
            .unwrap()
            .skipped
    );
    other.rollback().await.unwrap();
    assert!(
        !health_monitor::run_once(&app.state.changes())
            .await
            .unwrap()
            .skipped
    );
    assert!(
        !task_recovery::maintain(&app.state.changes())
            .await
            .unwrap()
            .skipped
    );
}

/// The relay and the heartbeat cleanup once shared a lock id: while one held it, the other
/// skipped its round (no replica published events during a long cleanup).
#[tokio::test]
async fn the_relay_publishes_while_a_cleanup_runs_and_the_cleanup_runs_while_the_relay_does() {
    let app = TestApp::spawn().await;
    app.register(7, &["analysis"], &dead_endpoint()).await;

    // A long cleanup on another replica: its lock held in an open transaction.
    let mut cleanup = app.db.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(Singleton::HeartbeatCleanup.id())
        .execute(&mut *cleanup)
        .await
        .unwrap();
    let task = app
        .create_task(7, task_payload("published meanwhile"))
        .await;
    eventually(
        Duration::from_secs(10),
        "task_created published",
        || async {
            logged_events(&app.db, "tasks", 0)
                .await
                .iter()
                .any(|(_, e)| e["payload"]["task"]["id"] == task)
                .then_some(())
        },
    )
    .await;
    cleanup.rollback().await.unwrap();

    // A relay round in progress elsewhere: its lock held in an open transaction.
    sqlx::query(
        "INSERT INTO heartbeats (droplet_id, status, received_at)
         SELECT id, 'active', NOW() - interval '400 days' FROM droplets WHERE droplet_id = 7",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let mut relay = app.db.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(Singleton::EventRelay.id())
        .execute(&mut *relay)
        .await
        .unwrap();
    let deleted = health_monitor::cleanup_old_heartbeats(&app.state.db, &app.state.config())
        .await
        .unwrap();
    relay.rollback().await.unwrap();
    assert_eq!(
        deleted, 1,
        "the cleanup skipped its round while the relay held its lock"
    );
}
