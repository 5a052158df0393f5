//! Droplets push back (issue 27, item 4): a delivery answered 429 with `Retry-After` is a
//! deferral, not a failure. The task keeps its assignment, attempt and retry count and is
//! delivered again once the wait is over, nothing else goes to that droplet meanwhile, and its
//! in-flight allowance halves, then grows back by one per accepted delivery.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::fixture_droplet::{FixtureDroplet, Mode};
use crate::helpers::*;
use crate::real_mesh::task_for;

const SOON: Duration = Duration::from_secs(20);

fn push_back_once(seconds: &str) -> Mode {
    Mode::Answers(vec![(429, Some(seconds.to_string())), (200, None)])
}

/// `GET /droplets/{id}`'s droplet.
async fn droplet(app: &TestApp, id: i32) -> Value {
    let (status, body) = app.get(&format!("/droplets/{id}"), &app.admin()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["payload"]["droplet"].clone()
}

async fn wait_allowance(app: &TestApp, id: i32, allowance: i64) -> Value {
    eventually(SOON, &format!("allowance {allowance}"), || async {
        let d = droplet(app, id).await;
        (d["in_flight_allowance"] == allowance).then_some(d)
    })
    .await
}

#[tokio::test]
async fn a_429_with_retry_after_defers_the_delivery_without_a_retry_and_halves_the_allowance() {
    let app = TestApp::spawn().await;
    let fixture = FixtureDroplet::start(push_back_once("2")).await;
    app.register_max(71, &["push"], &fixture.endpoint, 4).await;
    assert_eq!(droplet(&app, 71).await["in_flight_allowance"], 4);

    let task = app.create_task(5, task_for("push", json!({}))).await;
    eventually(SOON, "the first delivery, answered 429", || async {
        (!fixture.commands("execute_task").is_empty()).then_some(())
    })
    .await;
    // Deferred: the allowance halves, the droplet says until when.
    let d = wait_allowance(&app, 71, 2).await;
    assert!(d["deferred_until"].is_string(), "{d}");
    assert_eq!(d["max_concurrent_tasks"], 4);

    // Delivered again after the wait: still assigned, same attempt, no retry counted.
    let executes = eventually(SOON, "the delivery again", || async {
        let e = fixture.commands("execute_task");
        (e.len() >= 2).then_some(e)
    })
    .await;
    assert_eq!(
        (executes[0].answered, executes[1].answered),
        (429, 200),
        "{executes:?}"
    );
    let waited = executes[1].at - executes[0].at;
    assert!(
        waited >= Duration::from_secs(2),
        "delivered again after {waited:?}"
    );
    assert_eq!(executes[1].body["payload"]["task"]["id"], task);
    let t = app.task(task).await;
    assert_eq!(
        (
            t["status"].as_str(),
            t["attempt"].as_i64(),
            t["retry_count"].as_i64()
        ),
        (Some("assigned"), Some(1), Some(0)),
        "{t}"
    );
    let moves: Vec<String> = app.history(task).await.into_iter().map(|h| h.1).collect();
    assert_eq!(moves, ["pending", "assigned"], "no requeue, no retry");

    // Each accepted delivery grows the allowance by one, up to its maximum.
    wait_allowance(&app, 71, 3).await;
    app.create_task(5, task_for("push", json!({}))).await;
    let d = wait_allowance(&app, 71, 4).await;
    assert!(d["deferred_until"].is_null(), "{d}");
    let held: (Option<i32>, Option<i32>) = sqlx::query_as(
        "SELECT in_flight_allowance, in_flight_allowance_ceiling FROM droplets WHERE droplet_id = 71",
    )
    .fetch_one(&app.db)
    .await
    .expect("droplet row");
    assert_eq!(
        held,
        (None, None),
        "back to its maximum: the reduction cleared"
    );
}

#[tokio::test]
async fn a_pushed_back_droplet_gets_no_new_work_until_its_wait_is_over_and_explain_says_why() {
    let app = TestApp::spawn().await;
    let fixture = FixtureDroplet::start(push_back_once("5")).await;
    app.register_max(72, &["push"], &fixture.endpoint, 10).await;
    let first = app.create_task(5, task_for("push", json!({}))).await;
    let d = wait_allowance(&app, 72, 5).await;
    let until = d["deferred_until"]
        .as_str()
        .expect("deferred_until")
        .to_string();

    // A new task waits: the router leaves the droplet out, and explain says why.
    let second = app.create_task(5, task_for("push", json!({}))).await;
    let (status, body) = app
        .get(&format!("/tasks/{second}/explain"), &app.admin())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let e = &body["payload"];
    assert_eq!(e["reason"], "droplet_deferred", "{e}");
    assert_eq!(e["deferred_until"], until.as_str(), "{e}");
    assert!(
        e["retry_after_seconds"].as_f64().is_some_and(|s| s > 0.0),
        "{e}"
    );
    assert!(
        e["candidates"][0]["why_not"]
            .as_str()
            .is_some_and(|w| w.contains("pushed back")),
        "{e}"
    );
    assert_eq!(app.holder(second).await.0, "pending");
    // The assigned task's explanation names the wait too.
    let (_, body) = app
        .get(&format!("/tasks/{first}/explain"), &app.admin())
        .await;
    assert_eq!(body["payload"]["reason"], "droplet_deferred", "{body}");

    // Once the wait is over both go to the droplet; nothing reached it before.
    app.wait_assigned(second, 72, SOON).await;
    let executes = eventually(SOON, "both delivered", || async {
        let e = fixture.commands("execute_task");
        (e.len() >= 3).then_some(e)
    })
    .await;
    for later in &executes[1..] {
        let waited = later.at - executes[0].at;
        assert!(
            waited >= Duration::from_secs(5),
            "a delivery after {waited:?}"
        );
    }
    let t = app.task(second).await;
    assert_eq!(
        (t["attempt"].as_i64(), t["retry_count"].as_i64()),
        (Some(1), Some(0))
    );
}

/// The push-back is in the droplet's row: a replica that did not get the 429 routes nothing
/// to the droplet either until the wait is over.
#[tokio::test]
async fn another_replica_routes_nothing_to_a_droplet_that_pushed_back() {
    let a = TestApp::spawn().await;
    let b = TestApp::spawn_on(&a.database_url, &[]).await;
    let fixture = FixtureDroplet::start(push_back_once("5")).await;
    a.register_max(73, &["push"], &fixture.endpoint, 10).await;
    a.create_task(5, task_for("push", json!({}))).await;
    wait_allowance(&a, 73, 5).await;

    let second = b.create_task(5, task_for("push", json!({}))).await;
    let (_, body) = b.get(&format!("/tasks/{second}/explain"), &b.admin()).await;
    assert_eq!(body["payload"]["reason"], "droplet_deferred", "{body}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(b.holder(second).await.0, "pending");
    b.wait_assigned(second, 73, SOON).await;
    let executes = fixture.commands("execute_task");
    assert!(
        executes[1..]
            .iter()
            .all(|e| e.at - executes[0].at >= Duration::from_secs(5)),
        "{executes:?}"
    );
}
