//! Draining a droplet (issue 27, item 6): `POST /management/droplets/{id}/drain` stops new
//! assignments, lets running tasks finish and announces `droplet_drained` when the last one
//! ends; with `?deadline_seconds=N` what it still holds then goes back to pending (a new
//! attempt elsewhere) through the job's recovery round. A registration ends the drain.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::fixture_droplet::{FixtureDroplet, Mode};
use crate::helpers::*;
use crate::real_mesh::task_for;

const SOON: Duration = Duration::from_secs(20);

async fn drain(app: &TestApp, id: i32, query: &str) -> (StatusCode, Value) {
    app.post(
        &format!("/management/droplets/{id}/drain{query}"),
        &app.admin(),
        json!({}),
    )
    .await
}

/// The `droplet_drained` events logged for droplet `id`.
async fn drained_events(app: &TestApp, id: i32) -> Vec<Value> {
    logged_events(&app.db, "droplets", 0)
        .await
        .into_iter()
        .map(|(_, e)| e["payload"].clone())
        .filter(|p| p["event"] == "droplet_drained" && p["droplet"]["droplet_id"] == id)
        .collect()
}

async fn droplet(app: &TestApp, id: i32) -> Value {
    let (status, body) = app.get(&format!("/droplets/{id}"), &app.admin()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["payload"]["droplet"].clone()
}

#[tokio::test]
async fn a_drain_lets_running_work_finish_takes_no_new_work_and_says_when_it_is_drained() {
    let app = TestApp::spawn().await;
    let fixture = FixtureDroplet::start(Mode::Accept).await;
    app.register(81, &["drain"], &fixture.endpoint).await;
    let running = app.create_task(5, task_for("drain", json!({}))).await;
    app.wait_assigned(running, 81, SOON).await;
    assert_eq!(
        app.move_task(81, running, "in_progress").await.0,
        StatusCode::OK
    );

    // Bad asks change nothing.
    let (status, _) = app
        .post(
            "/management/droplets/81/drain",
            &app.token(81, &["read", "write"]),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(drain(&app, 999, "").await.0, StatusCode::NOT_FOUND);
    for bad in [
        "?deadline_seconds=-1",
        "?deadline_seconds=soon",
        "?deadline_seconds=99999999",
    ] {
        let (status, body) = drain(&app, 81, bad).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
    }
    assert_eq!(droplet(&app, 81).await["draining"], false);

    let (status, body) = drain(&app, 81, "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let answer = &body["payload"];
    assert_eq!(
        (
            &answer["draining"],
            &answer["in_flight"],
            &answer["drained"]
        ),
        (&json!(true), &json!(1), &json!(false)),
        "{answer}"
    );
    assert!(answer["drain_deadline"].is_null(), "{answer}");
    let d = droplet(&app, 81).await;
    assert_eq!(
        (&d["draining"], &d["status"]),
        (&json!(true), &json!("active")),
        "{d}"
    );

    // No new work meanwhile; explain says why.
    let waiting = app.create_task(5, task_for("drain", json!({}))).await;
    let (_, body) = app
        .get(&format!("/tasks/{waiting}/explain"), &app.admin())
        .await;
    assert_eq!(body["payload"]["reason"], "droplet_draining", "{body}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.holder(waiting).await.0, "pending");
    assert!(drained_events(&app, 81).await.is_empty());

    // The running task finishes: drained, with its event.
    assert_eq!(
        app.move_task(81, running, "completed").await.0,
        StatusCode::OK
    );
    let events = eventually(SOON, "the droplet_drained event", || async {
        let e = drained_events(&app, 81).await;
        (!e.is_empty()).then_some(e)
    })
    .await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0]["droplet"]["drained_at"].is_string(), "{events:?}");
    assert!(droplet(&app, 81).await["drained_at"].is_string());
    assert_eq!(app.holder(waiting).await.0, "pending");

    // A registration (the deployed droplet) ends the drain: the waiting task goes to it.
    app.register(81, &["drain"], &fixture.endpoint).await;
    app.wait_assigned(waiting, 81, SOON).await;
    let d = droplet(&app, 81).await;
    assert_eq!(
        (&d["draining"], &d["drained_at"]),
        (&json!(false), &Value::Null),
        "{d}"
    );
}

#[tokio::test]
async fn at_the_drain_deadline_what_the_droplet_still_holds_goes_back_to_pending() {
    let app = TestApp::spawn_with(&[("TASK_ROUTER_INTERVAL", "1")]).await;
    let old = FixtureDroplet::start(Mode::Accept).await;
    app.register(83, &["deploy"], &old.endpoint).await;
    let running = app.create_task(5, task_for("deploy", json!({}))).await;
    let assigned = app.create_task(5, task_for("deploy", json!({}))).await;
    app.wait_assigned(running, 83, SOON).await;
    app.wait_assigned(assigned, 83, SOON).await;
    assert_eq!(
        app.move_task(83, running, "in_progress").await.0,
        StatusCode::OK
    );

    let (status, body) = drain(&app, 83, "?deadline_seconds=2").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["payload"]["drain_deadline"].is_string(), "{body}");
    assert_eq!(body["payload"]["in_flight"], 2, "{body}");
    // The new droplet of the deploy is up; nothing moves before the deadline.
    let new = FixtureDroplet::start(Mode::Accept).await;
    app.register(84, &["deploy"], &new.endpoint).await;
    assert_eq!(
        app.holder(running).await,
        ("in_progress".to_string(), Some(83))
    );
    assert_eq!(
        app.holder(assigned).await,
        ("assigned".to_string(), Some(83))
    );

    // At the deadline both go back to pending and on to droplet 84: a new attempt, no retry.
    for task in [running, assigned] {
        app.wait_assigned(task, 84, SOON).await;
        let t = app.task(task).await;
        assert_eq!(
            (t["attempt"].as_i64(), t["retry_count"].as_i64()),
            (Some(2), Some(0)),
            "{t}"
        );
        let history = app.history(task).await;
        assert!(
            history.iter().any(|(_, to, _, reason)| to == "pending"
                && reason
                    .as_deref()
                    .unwrap_or("")
                    .contains("droplet 83 drained")),
            "{history:?}"
        );
    }
    let moves: Vec<(Option<String>, String)> = app
        .history(running)
        .await
        .into_iter()
        .map(|h| (h.0, h.1))
        .collect();
    assert!(
        moves.contains(&(Some("in_progress".into()), "pending".into())),
        "{moves:?}"
    );
    eventually(SOON, "the droplet_drained event", || async {
        (drained_events(&app, 83).await.len() == 1).then_some(())
    })
    .await;
    // The old droplet is told its tasks were taken away; its late update is refused.
    eventually(SOON, "cancel_task for both", || async {
        (old.commands("cancel_task").len() >= 2).then_some(())
    })
    .await;
    let (status, _) = app.move_task(83, running, "completed").await;
    assert!(status.is_client_error(), "{status}");
}

/// The deadline is a column and the job's round on any replica enforces it: the replica that
/// took the drain may be gone by then.
#[tokio::test]
async fn a_drain_deadline_holds_when_the_replica_that_took_it_is_gone() {
    let a = TestApp::spawn_with(&[("TASK_ROUTER_INTERVAL", "3600")]).await;
    let b = TestApp::spawn_on(&a.database_url, &[("TASK_ROUTER_INTERVAL", "1")]).await;
    let fixture = FixtureDroplet::start(Mode::Accept).await;
    a.register(85, &["gone"], &fixture.endpoint).await;
    let task = a.create_task(5, task_for("gone", json!({}))).await;
    a.wait_assigned(task, 85, SOON).await;

    let (status, body) = drain(&a, 85, "?deadline_seconds=2").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    a.state.shutdown.cancel();

    eventually(SOON, "the task back to pending", || async {
        (b.holder(task).await == ("pending".to_string(), None)).then_some(())
    })
    .await;
    let history = b.history(task).await;
    assert!(
        history.iter().any(|(_, to, _, reason)| to == "pending"
            && reason
                .as_deref()
                .unwrap_or("")
                .contains("droplet 85 drained")),
        "{history:?}"
    );
    eventually(SOON, "the droplet_drained event", || async {
        (drained_events(&b, 85).await.len() == 1).then_some(())
    })
    .await;
    assert_eq!(b.retry_count(task).await, 0);
}
