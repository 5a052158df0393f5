//! Requeues are bounded and refusals back off (issue 24, items 7 and 8): a droplet that
//! acknowledges `execute_task` and never starts (droplet-12's real case) cannot keep a task
//! forever nor take every requeue; a refusal of the orchestrator's credentials costs the task
//! no retry; a droplet that refused a task is never sent `cancel_task` for it.

use std::time::Duration;

use orchestrator::jobs::JobId;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::fixture_droplet::*;
use crate::helpers::*;
use crate::real_mesh::{
    droplet_row, event_name, events_until, execute_of, feed, register_from, task_for,
};

const SOON: Duration = Duration::from_secs(10);

/// The droplet's run of assignment timeouts, and its status.
async fn timeouts_of(app: &TestApp, id: i32) -> (String, i32) {
    sqlx::query_as("SELECT status, timed_out_assignments FROM droplets WHERE droplet_id = $1")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .expect("droplet row")
}

/// The `droplet_health_changed` events logged for droplet `id`.
async fn health_changes(app: &TestApp, id: i32) -> Vec<Value> {
    logged_events(&app.db, "droplets", 0)
        .await
        .into_iter()
        .map(|(_, e)| e["payload"].clone())
        .filter(|p| p["event"] == "droplet_health_changed" && p["droplet"]["droplet_id"] == id)
        .collect()
}

/// droplet-12 acknowledges every `execute_task` and never PATCHes. With `MAX_REQUEUES=2` the
/// third timeout fails the task (the reason in its history), the retry rules then apply (one
/// retry, whose timeout fails it for good: the count is the task's, over its whole life), and
/// nothing is sent after that.
#[tokio::test]
async fn a_task_droplet_12_never_starts_fails_after_max_requeues_then_retries_as_any_failure() {
    let app = TestApp::spawn_with(&[
        ("TASK_ROUTER_INTERVAL", "1"),
        ("ASSIGNMENT_TIMEOUT_SECONDS", "1"),
        ("MAX_REQUEUES", "2"),
        ("ASSIGNMENT_TIMEOUTS_BEFORE_ERROR", "100"),
        ("RETRY_BACKOFF_SECONDS", "0"),
    ])
    .await;
    let d12 = FixtureDroplet::start(Mode::Droplet12).await;
    register_from(&app, 12, &["render"], &d12.endpoint, json!("droplet-12")).await;
    let id = app
        .create_task(5, task_for("render", json!({"max_retries": 1})))
        .await;

    let history = eventually(Duration::from_secs(40), "the task failed twice", || async {
        let h = app.history(id).await;
        (h.iter().filter(|s| s.1 == "failed").count() == 2).then_some(h)
    })
    .await;
    let steps: Vec<(&str, &str)> = history
        .iter()
        .map(|h| (h.0.as_deref().unwrap_or("-"), h.1.as_str()))
        .collect();
    assert_eq!(
        steps,
        [
            ("-", "pending"),
            ("pending", "assigned"),
            ("assigned", "pending"),
            ("pending", "assigned"),
            ("assigned", "pending"),
            ("pending", "assigned"),
            ("assigned", "failed"),
            ("failed", "pending"),
            ("pending", "assigned"),
            ("assigned", "failed"),
        ]
    );
    let requeued = history[2].3.clone().unwrap_or_default();
    assert!(
        requeued.contains("requeued (not a retry; requeue 1 of at most 2)"),
        "{requeued}"
    );
    let failed = history[6].3.clone().unwrap_or_default();
    assert!(
        failed.contains("not started within 1 s of assignment 3 times (MAX_REQUEUES is 2)"),
        "{failed}"
    );
    let last = history[9].3.clone().unwrap_or_default();
    assert!(last.contains("4 times"), "{last}");
    let task = app.task(id).await;
    assert_eq!(task["status"], "failed", "{task}");
    assert_eq!(task["retry_count"], 1, "{task}");
    assert!(
        task["error_message"]
            .as_str()
            .is_some_and(|e| e.contains("MAX_REQUEUES")),
        "{task}"
    );

    // Every delivery was acknowledged; it was told once each time the task was taken away
    // (not again when the failed task was retried).
    let executed: Vec<u16> = d12
        .commands("execute_task")
        .iter()
        .map(|r| r.answered)
        .collect();
    assert_eq!(executed, [200; 4]);
    eventually(SOON, "one cancel_task per attempt", || async {
        let attempts: Vec<Value> = d12
            .commands("cancel_task")
            .iter()
            .map(|r| r.body["payload"]["attempt"].clone())
            .collect();
        (attempts == [json!(1), json!(2), json!(3), json!(4)]).then_some(())
    })
    .await;
    // Failed for good: the router passes again and sends nothing more.
    app.wait_job_runs(JobId::TaskRouter, 2, SOON).await;
    assert_eq!(app.task_status(id).await, "failed");
    assert_eq!(d12.commands("execute_task").len(), 4);
    assert_eq!(d12.commands("cancel_task").len(), 4);
}

/// `ASSIGNMENT_TIMEOUTS_BEFORE_ERROR=2`: one timeout, then a task the droplet starts (the run
/// starts again), then two timeouts in a row: marked `error` with an event and a log line.
#[tokio::test]
async fn a_droplet_letting_tasks_time_out_in_a_row_is_marked_error() {
    let log = LogCapture::start("warn");
    let app = TestApp::spawn_with(&[
        ("TASK_ROUTER_INTERVAL", "1"),
        ("ASSIGNMENT_TIMEOUT_SECONDS", "2"),
        ("ASSIGNMENT_TIMEOUTS_BEFORE_ERROR", "2"),
        ("MAX_REQUEUES", "10"),
    ])
    .await;
    let d = FixtureDroplet::start(Mode::Accept).await;
    app.register(81, &["slow"], &d.endpoint).await;

    let a = app.create_task(5, task_for("slow", json!({}))).await;
    eventually(SOON, "task a's first timeout counted", || async {
        (timeouts_of(&app, 81).await == ("active".to_string(), 1)).then_some(())
    })
    .await;
    // The only capable droplet gets it back and starts it: its run ends.
    app.wait_assigned(a, 81, SOON).await;
    let (s, b) = app.move_task(81, a, "in_progress").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(timeouts_of(&app, 81).await, ("active".to_string(), 0));

    let b = app.create_task(5, task_for("slow", json!({}))).await;
    eventually(
        Duration::from_secs(20),
        "the droplet marked error",
        || async { (timeouts_of(&app, 81).await.0 == "error").then_some(()) },
    )
    .await;
    assert_eq!(timeouts_of(&app, 81).await, ("error".to_string(), 2));
    let changes = eventually(SOON, "droplet_health_changed logged", || async {
        Some(health_changes(&app, 81).await).filter(|c| !c.is_empty())
    })
    .await;
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0]["previous_status"], "active");
    let reason = changes[0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("let 2 assigned tasks in a row go unstarted for 2 s"),
        "{reason}"
    );
    assert!(log
        .text()
        .lines()
        .any(|l| l.contains("droplet marked error")
            && l.contains("droplet_id=81")
            && l.contains("in a row go unstarted")));
    // Out of routing: task b waits, a (started) stays.
    app.wait_job_runs(JobId::TaskRouter, 2, SOON).await;
    assert_eq!(app.holder(b).await, ("pending".to_string(), None));
    assert_eq!(app.holder(a).await, ("in_progress".to_string(), Some(81)));
}

/// A requeue goes to another capable droplet: droplet-12 (registered last, so chosen first)
/// lets the task time out; the task goes to the other one, not back to droplet-12.
#[tokio::test]
async fn a_requeue_goes_to_another_capable_droplet() {
    let app = TestApp::spawn_with(&[
        ("TASK_ROUTER_INTERVAL", "1"),
        ("ASSIGNMENT_TIMEOUT_SECONDS", "2"),
    ])
    .await;
    let other = FixtureDroplet::start(Mode::Accept).await;
    let d12 = FixtureDroplet::start(Mode::Droplet12).await;
    app.register(83, &["scan"], &other.endpoint).await;
    register_from(&app, 12, &["scan"], &d12.endpoint, json!("droplet-12")).await;

    let id = app.create_task(5, task_for("scan", json!({}))).await;
    app.wait_assigned(id, 12, SOON).await;
    app.wait_assigned(id, 83, SOON).await;
    let (s, b) = app.move_task(83, id, "in_progress").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let steps: Vec<(String, Option<String>)> = app
        .history(id)
        .await
        .into_iter()
        .map(|h| (h.1, h.3))
        .collect();
    assert_eq!(steps.len(), 5, "{steps:?}");
    assert_eq!(steps[1].1.as_deref(), Some("routed to droplet 12"));
    assert!(steps[2]
        .1
        .as_deref()
        .unwrap_or("")
        .contains("not started within 2 s"));
    assert_eq!(steps[3].1.as_deref(), Some("routed to droplet 83"));
    assert_eq!(d12.executed(), [id as i64]);
}

/// A 401 (the droplet does not take the orchestrator's token) is a configuration fault: the
/// task goes to another droplet with `retry_count` still 0 (even with no retries at all), the
/// refusing droplet is marked `error` at once and told nothing more; an ordinary refusal
/// (422) still counts a retry, and is not followed by a `cancel_task` either.
#[tokio::test]
async fn a_credentials_refusal_costs_no_retry_and_no_refusal_is_followed_by_a_cancel() {
    let app = TestApp::spawn_with(&[("TASK_ROUTER_INTERVAL", "1")]).await;
    let good = FixtureDroplet::start(Mode::Accept).await;
    let unauthorized = FixtureDroplet::start(Mode::Unauthorized).await;
    app.register(85, &["ocr"], &good.endpoint).await;
    // Registered last: the freshest heartbeat, so the router tries it first.
    app.register(86, &["ocr"], &unauthorized.endpoint).await;
    let mut droplets = feed(&app, "droplets", "&droplet_id=86").await;

    let id = app
        .create_task(5, task_for("ocr", json!({"max_retries": 0})))
        .await;
    assert_eq!(execute_of(&unauthorized, id).await.answered, 401);
    app.wait_assigned(id, 85, SOON).await;
    assert_eq!(app.retry_count(id).await, 0);
    assert_eq!(droplet_row(&app, 86).await, ("error".to_string(), 1));
    let events = events_until(&mut droplets, |e| event_name(e) == "droplet_health_changed").await;
    let reason = events.last().unwrap()["payload"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("refused the orchestrator's credentials (refused with HTTP 401)"),
        "{reason}"
    );
    let why = app.history(id).await[2].3.clone().unwrap_or_default();
    assert!(
        why.contains("configuration fault; requeued (not a retry)"),
        "{why}"
    );

    // An ordinary refusal: a retry counted, the task to the other droplet.
    let refusing = FixtureDroplet::start(Mode::Refuse).await;
    app.register(87, &["ocr"], &refusing.endpoint).await;
    let other = app
        .create_task(5, task_for("ocr", json!({"max_retries": 2})))
        .await;
    assert_eq!(execute_of(&refusing, other).await.answered, 422);
    app.wait_assigned(other, 85, SOON).await;
    assert_eq!(app.retry_count(other).await, 1);

    // Time for any cancel_task to arrive (they are sent right after each commit).
    app.wait_job_runs(JobId::TaskRouter, 2, SOON).await;
    assert!(unauthorized.commands("cancel_task").is_empty());
    assert!(refusing.commands("cancel_task").is_empty());
    assert_eq!(unauthorized.commands("execute_task").len(), 1);
}
