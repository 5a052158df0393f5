//! The real mesh's dispatch and intake: transient deliveries
//! keep the task where it is, refusals count in a row, an `error` droplet rejoins by
//! registering, droplet-2's join sequence, and the attempt in events.

use std::cell::Cell;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::fixture_droplet::*;
use crate::helpers::*;
use crate::real_mesh::{
    droplet_row, event_name, events_until, execute_of, feed, post_bare, task_for, Droplet2,
};

const SOON: Duration = Duration::from_secs(10);

/// The `execute_task` requests the droplet got, once there are at least `n`.
async fn executes(droplet: &FixtureDroplet, n: usize) -> Vec<Received> {
    eventually(
        SOON,
        &format!("{n} execute_task at {}", droplet.endpoint),
        || async move { Some(droplet.commands("execute_task")).filter(|c| c.len() >= n) },
    )
    .await
}

/// How many deliveries of this outcome the app counted (`dispatch_total`).
fn dispatched(app: &TestApp, outcome: &str) -> u64 {
    app.state
        .metrics
        .dispatch
        .with_label_values(&[outcome])
        .get()
}

/// The task is still with droplet `id` as a first attempt: assigned, no retry counted, and
/// the droplet has no refusal counted.
async fn still_first_attempt_with(app: &TestApp, task: i32, id: i32) {
    assert_eq!(app.holder(task).await, ("assigned".to_string(), Some(id)));
    assert_eq!(app.retry_count(task).await, 0);
    assert_eq!(droplet_row(app, id).await, ("active".to_string(), 0));
    let steps: Vec<String> = app.history(task).await.into_iter().map(|h| h.1).collect();
    assert_eq!(steps, ["pending", "assigned"]);
}

// ---------------------------------------------------------------------------
// Transient deliveries: retried on the same droplet, never counted as refusals.

#[tokio::test]
async fn a_droplet_answering_408_then_429_keeps_the_task_and_takes_the_third_delivery() {
    let app = TestApp::spawn_with(&[("TASK_ROUTER_INTERVAL", "1")]).await;
    let d = FixtureDroplet::start(Mode::Statuses(vec![408, 429, 200])).await;
    app.register(71, &["t"], &d.endpoint).await;
    let id = app.create_task(5, task_for("t", json!({}))).await;

    let got = executes(&d, 3).await;
    let answered: Vec<u16> = got.iter().map(|r| r.answered).collect();
    assert_eq!(answered, [408, 429, 200]);
    for r in &got {
        assert_eq!(r.body["payload"]["task"]["id"], id);
        assert_eq!(r.body["payload"]["task"]["attempt"], 1, "{:?}", r.body);
    }
    // Taken: no further try (the next would have come within 1 s).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(d.commands("execute_task").len(), 3);
    still_first_attempt_with(&app, id, 71).await;
}

#[tokio::test]
async fn a_droplet_that_never_answers_keeps_the_task_and_is_asked_again() {
    let app = TestApp::spawn_with(&[
        ("TASK_ROUTER_INTERVAL", "1"),
        ("DISPATCH_TIMEOUT_SECONDS", "1"),
    ])
    .await;
    let silent = FixtureDroplet::silent().await;
    app.register(72, &["t"], &silent.endpoint).await;
    let id = app.create_task(5, task_for("t", json!({}))).await;

    eventually(SOON, "a second delivery after a timeout", || async {
        (silent.accepted.load(std::sync::atomic::Ordering::SeqCst) >= 2
            && dispatched(&app, "timeout") >= 1)
            .then_some(())
    })
    .await;
    still_first_attempt_with(&app, id, 72).await;
}

#[tokio::test]
async fn a_dead_endpoint_keeps_the_task_and_is_tried_until_it_comes_up() {
    let app = TestApp::spawn_with(&[("TASK_ROUTER_INTERVAL", "1")]).await;
    let dead = dead_endpoint();
    let port: u16 = dead.rsplit(':').next().unwrap().parse().unwrap();
    app.register(73, &["t"], &dead).await;
    let id = app.create_task(5, task_for("t", json!({}))).await;

    // Connections refused, twice: two failed deliveries, nothing counted against the droplet.
    eventually(SOON, "two refused connections", || async {
        (dispatched(&app, "failed") >= 2).then_some(())
    })
    .await;
    assert_eq!(dispatched(&app, "refused"), 0);
    still_first_attempt_with(&app, id, 73).await;

    // The droplet comes up on that port: the next try is its first execute_task.
    let up = FixtureDroplet::start_on(port, Mode::Accept).await;
    let got = execute_of(&up, id).await;
    assert_eq!(got.answered, 200);
    assert_eq!(got.body["payload"]["task"]["attempt"], 1);
    still_first_attempt_with(&app, id, 73).await;
}

// ---------------------------------------------------------------------------
// Refusals in a row.

/// Refuse, refuse, accept, refuse, refuse: still active. A third refusal in a row: `error`,
/// and the event says why.
#[tokio::test]
async fn an_accepted_delivery_starts_the_count_of_refusals_in_a_row_again() {
    let app = TestApp::spawn_with(&[("TASK_ROUTER_INTERVAL", "1")]).await;
    let d = FixtureDroplet::start(Mode::Statuses(vec![422, 422, 200])).await;
    app.register(74, &["r"], &d.endpoint).await;

    let a = app
        .create_task(5, task_for("r", json!({"max_retries": 5})))
        .await;
    let got = executes(&d, 3).await;
    let answered: Vec<u16> = got.iter().map(|r| r.answered).collect();
    assert_eq!(answered, [422, 422, 200]);
    assert_eq!(app.holder(a).await, ("assigned".to_string(), Some(74)));
    assert_eq!(app.retry_count(a).await, 2);
    eventually(SOON, "the count reset by the accepted delivery", || async {
        (droplet_row(&app, 74).await == ("active".to_string(), 0)).then_some(())
    })
    .await;

    // Two refusals of a task with one retry: it fails, the droplet stays in routing.
    d.set(Mode::Refuse);
    let b = app
        .create_task(5, task_for("r", json!({"max_retries": 1})))
        .await;
    eventually(SOON, "task b failed after two refusals", || async {
        (app.task_status(b).await == "failed").then_some(())
    })
    .await;
    assert_eq!(droplet_row(&app, 74).await, ("active".to_string(), 2));

    // The third in a row.
    let c = app
        .create_task(5, task_for("r", json!({"max_retries": 0})))
        .await;
    eventually(SOON, "task c failed after one refusal", || async {
        (app.task_status(c).await == "failed").then_some(())
    })
    .await;
    assert_eq!(droplet_row(&app, 74).await, ("error".to_string(), 3));
    // The event, once the relay has published it.
    let changed: Vec<Value> = eventually(SOON, "droplet_health_changed logged", || async {
        let changed: Vec<Value> = logged_events(&app.db, "droplets", 0)
            .await
            .into_iter()
            .map(|(_, e)| e["payload"].clone())
            .filter(|p| p["event"] == "droplet_health_changed")
            .collect();
        Some(changed).filter(|c| !c.is_empty())
    })
    .await;
    assert_eq!(changed.len(), 1, "{changed:?}");
    let reason = changed[0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("refused 3 deliveries in a row") && reason.contains("HTTP 422"),
        "{reason}"
    );
    assert_eq!(d.commands("execute_task").len(), 6);
}

/// A droplet marked `error` for refusals registers again: active, its count reset, and it
/// gets work again.
#[tokio::test]
async fn a_droplet_marked_error_for_refusals_is_back_in_routing_once_it_registers_again() {
    let app = TestApp::spawn_with(&[("TASK_ROUTER_INTERVAL", "1")]).await;
    let d = FixtureDroplet::start(Mode::Refuse).await;
    app.register(75, &["e"], &d.endpoint).await;
    let id = app
        .create_task(5, task_for("e", json!({"max_retries": 5})))
        .await;
    eventually(
        SOON,
        "the droplet marked error, the task pending",
        || async {
            (droplet_row(&app, 75).await == ("error".to_string(), 3)
                && app.holder(id).await == ("pending".to_string(), None))
                .then_some(())
        },
    )
    .await;
    app.wait_job_runs(JobId::TaskRouter, 2, SOON).await;
    assert_eq!(app.holder(id).await, ("pending".to_string(), None));

    d.set(Mode::Accept);
    let answer = app.register(75, &["e"], &d.endpoint).await;
    assert_eq!(answer["payload"]["status"], "active", "{answer}");
    assert_eq!(droplet_row(&app, 75).await, ("active".to_string(), 0));
    app.wait_assigned(id, 75, SOON).await;
    let got = executes(&d, 4).await;
    assert_eq!(got[3].answered, 200);
    assert_eq!(got[3].body["payload"]["task"]["attempt"], 4);
    assert_eq!(app.retry_count(id).await, 3);
}

// ---------------------------------------------------------------------------
// droplet-2's join.

/// A heartbeat message in an envelope, as `POST /message` takes it.
fn heartbeat_message(payload: Value) -> Value {
    let mut e = envelope(payload);
    e["message_type"] = json!("heartbeat");
    e
}

async fn beats_of(app: &TestApp, id: i32) -> i64 {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM heartbeats h JOIN droplets d ON d.id = h.droplet_id WHERE d.droplet_id = $1",
    )
    .bind(id)
    .fetch_one(&app.db)
    .await
    .unwrap()
}

/// droplet-2 heartbeats first, gets 404, registers, heartbeats: all with a Registry token
/// that has no `permissions` claim, which may do that (also as a `/message` heartbeat) and
/// nothing else.
#[tokio::test]
async fn droplet_2_joins_after_a_404_heartbeat_with_a_token_that_may_do_nothing_else() {
    let Droplet2 {
        app,
        server,
        private,
        registry,
    } = Droplet2::start().await;
    let now = chrono::Utc::now().timestamp();
    let heartbeat = json!({"status": "active", "cpu_percent": 1.0, "memory_mb": 100});

    let (s, b) = post_bare(&app, "/droplets/42/heartbeat", &registry, heartbeat.clone()).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert_eq!(b["detail"], "Droplet 42 not found");
    let (s, b) = post_bare(
        &app,
        "/droplets/register",
        &registry,
        json!({"droplet_id": 42, "name": "droplet-2", "endpoint": server.endpoint, "capabilities": ["a"]}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let (s, b) = post_bare(&app, "/droplets/42/heartbeat", &registry, heartbeat).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["payload"]["acknowledged"], true);
    assert_eq!(beats_of(&app, 42).await, 1);

    // A heartbeat sent to /message follows the same rule.
    let (s, b) = app
        .request(
            Method::POST,
            "/message",
            Some(&registry),
            Some(heartbeat_message(json!({"status": "active"}))),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["payload"]["acknowledged"], true, "{b}");
    assert_eq!(b["payload"]["droplet_id"], 42, "{b}");
    assert_eq!(beats_of(&app, 42).await, 2);
    // ...for its own droplet only, and not for a read-only token.
    let other = rs256(
        &private,
        json!({"droplet_id": 43, "iat": now, "exp": now + 3600}),
    );
    let (s, b) = app
        .request(
            Method::POST,
            "/message",
            Some(&other),
            Some(heartbeat_message(
                json!({"status": "active", "droplet_id": 42}),
            )),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    let (s, b) = app
        .request(
            Method::POST,
            "/message",
            Some(&app.token(42, &["read"])),
            Some(heartbeat_message(json!({"status": "active"}))),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert_eq!(beats_of(&app, 42).await, 2);

    // Nothing else: tasks (REST or /message) and queries need permissions it lacks.
    let (s, b) = app
        .post("/tasks", &registry, task_for("a", json!({})))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    let (s, b) = app.get("/tasks", &registry).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    for payload in [
        json!({"command": "create_task", "task_data": task_for("a", json!({}))}),
        json!({"query": "system_status"}),
    ] {
        let mut message = envelope(payload.clone());
        if payload.get("query").is_some() {
            message["message_type"] = json!("query");
        }
        let (s, b) = app
            .request(Method::POST, "/message", Some(&registry), Some(message))
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{payload}: {b}");
    }
    let tasks: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tasks")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(tasks, 0);
}

// ---------------------------------------------------------------------------
// The attempt in events.

/// A task assigned, refused (requeued) and assigned again: its events carry attempt 1, then 2.
#[tokio::test]
async fn events_carry_the_attempt_of_each_assignment() {
    let app = TestApp::spawn_with(&[("TASK_ROUTER_INTERVAL", "1")]).await;
    let d = FixtureDroplet::start(Mode::Statuses(vec![422, 200])).await;
    app.register(76, &["v"], &d.endpoint).await;
    let mut ws = feed(&app, "tasks", "").await;

    let id = app.create_task(5, task_for("v", json!({}))).await;
    let assigned = Cell::new(0);
    let events = events_until(&mut ws, |e| {
        if event_name(e) == "task_assigned" {
            assigned.set(assigned.get() + 1);
        }
        assigned.get() == 2
    })
    .await;
    let seen: Vec<(&str, i64)> = events
        .iter()
        .filter(|e| e["payload"]["task"]["id"] == id)
        .map(|e| {
            (
                event_name(e),
                e["payload"]["task"]["attempt"].as_i64().expect("attempt"),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("task_created", 0),
            ("task_assigned", 1),
            ("task_requeued", 1),
            ("task_assigned", 2),
        ]
    );
    let delivered: Vec<(u16, Value)> = executes(&d, 2)
        .await
        .into_iter()
        .map(|r| (r.answered, r.body["payload"]["task"]["attempt"].clone()))
        .collect();
    assert_eq!(delivered, [(422, json!(1)), (200, json!(2))]);
}

/// The log line of a refusal shows what the droplet answered (its body, bounded), so the
/// operator sees why without the droplet's own log; the task's history keeps the status only.
#[tokio::test]
async fn a_refusal_is_logged_with_the_droplets_answer() {
    let log = LogCapture::start("warn");
    let app = TestApp::spawn().await;
    let refusing = FixtureDroplet::start(Mode::Unauthorized).await;
    app.register(61, &["render"], &refusing.endpoint).await;
    let id = app.create_task(5, task_for("render", json!({}))).await;
    assert_eq!(execute_of(&refusing, id).await.answered, 401);
    let line = eventually(SOON, "the refusal's log line", || async {
        log.text()
            .lines()
            .find(|l| {
                l.contains("droplet refused the task") && l.contains(&format!("task_id={id}"))
            })
            .map(str::to_string)
    })
    .await;
    assert!(line.contains("HTTP 401"), "{line}");
    assert!(line.contains("Could not validate credentials"), "{line}");
}

/// A droplet that echoes the bearer (and the envelope's signature) in its refusal: the log
/// line shows the rest of its answer, never the token.
#[tokio::test]
async fn a_refusal_echoing_the_token_is_logged_without_it() {
    let log = LogCapture::start("warn");
    // The orchestrator's own JWT as bearer, then a Registry token of any shape as bearer and
    // signature.
    for (n, settings) in [
        vec![],
        vec![("REGISTRY_TOKEN", "opaque-registry-token-4711")],
    ]
    .into_iter()
    .enumerate()
    {
        let app = TestApp::spawn_with(&settings).await;
        let echoing = FixtureDroplet::start(Mode::RefuseEchoing).await;
        let droplet = 62 + n as i32;
        app.register(droplet, &["render"], &echoing.endpoint).await;
        let id = app.create_task(5, task_for("render", json!({}))).await;
        let received = execute_of(&echoing, id).await;
        assert_eq!(received.answered, 401);
        let line = eventually(SOON, "the refusal's log line", || async {
            log.text()
                .lines()
                .find(|l| {
                    l.contains("droplet refused the task")
                        && l.contains(&format!("droplet={droplet}"))
                })
                .map(str::to_string)
        })
        .await;
        assert!(
            line.contains("bad_token") && line.contains("[token]"),
            "{line}"
        );
        assert!(!line.contains("opaque-registry-token-4711"), "{line}");
        assert!(!line.contains("eyJ"), "{line}");
    }
}
