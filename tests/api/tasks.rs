//! Tasks and the state machine over HTTP and PostgreSQL: the happy path with its history,
//! every forbidden move a 409 that changes nothing, races, idempotent creation by trace id,
//! who may act, bad input, and SQL-looking text kept verbatim.

use std::time::Duration;

use chrono::NaiveDateTime;
use orchestrator::services::state_machine::{Actor, Mode, Move, Status, ALL_STATUSES};
use orchestrator::services::transition::run as run_moves;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::droplets::urlencode;
use crate::helpers::*;

/// A capability no droplet has, so the router leaves these tasks alone.
const NOBODY: &str = "held_for_the_test";

fn held_task(title: &str) -> Value {
    json!({"task_type": "verify", "title": title, "required_capability": NOBODY, "max_retries": 0})
}

async fn internal_id(app: &TestApp, droplet_id: i32) -> i32 {
    sqlx::query_scalar("SELECT id FROM droplets WHERE droplet_id = $1")
        .bind(droplet_id)
        .fetch_one(&app.db)
        .await
        .expect("droplet row")
}

/// Assigns a pending task to `droplet_id` through the state machine, as the router would.
async fn assign(app: &TestApp, task: i32, droplet_id: i32) {
    let mut m = Move::new(task, Status::Assigned, Actor::System, "task_router");
    m.assign_to = Some(internal_id(app, droplet_id).await);
    m.reason = Some("assigned by the test".into());
    let applied = run_moves(&app.state.changes(), &[m], Mode::Strict)
        .await
        .expect("assigned");
    assert_eq!(applied.len(), 1);
}

async fn admin_move(app: &TestApp, task: i32, to: Status) {
    let m = Move::new(task, to, Actor::Admin, "admin-1");
    run_moves(&app.state.changes(), &[m], Mode::Strict)
        .await
        .unwrap_or_else(|e| panic!("move {task} to {to:?}: {e:?}"));
}

/// A task of droplet 5's making, held by droplet 8 (registered), brought to `status`.
async fn task_in(app: &TestApp, status: Status) -> i32 {
    let id = app
        .create_task(5, held_task(&format!("in {}", status.as_str())))
        .await;
    match status {
        Status::Pending => {}
        Status::Cancelled => admin_move(app, id, Status::Cancelled).await,
        _ => {
            assign(app, id, 8).await;
            match status {
                Status::Assigned => {}
                Status::InProgress => admin_move(app, id, Status::InProgress).await,
                Status::Completed | Status::Failed => {
                    admin_move(app, id, Status::InProgress).await;
                    admin_move(app, id, status).await;
                }
                _ => unreachable!(),
            }
        }
    }
    assert_eq!(app.task_status(id).await, status.as_str());
    id
}

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct Snapshot {
    status: String,
    assigned_droplet_id: Option<i32>,
    assigned_at: Option<NaiveDateTime>,
    started_at: Option<NaiveDateTime>,
    completed_at: Option<NaiveDateTime>,
    result: Option<Value>,
    error_message: Option<String>,
    retry_count: Option<i32>,
    updated_at: Option<NaiveDateTime>,
    history: i64,
}

async fn snapshot(app: &TestApp, id: i32) -> Snapshot {
    sqlx::query_as(
        "SELECT status, assigned_droplet_id, assigned_at, started_at, completed_at, result,
                error_message, retry_count, updated_at,
                (SELECT COUNT(*) FROM task_state_history h WHERE h.task_id = t.id) AS history
         FROM tasks t WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&app.db)
    .await
    .expect("task row")
}

async fn counts(app: &TestApp) -> (i64, i64) {
    sqlx::query_as("SELECT (SELECT COUNT(*) FROM tasks), (SELECT COUNT(*) FROM task_state_history)")
        .fetch_one(&app.db)
        .await
        .expect("counts")
}

/// The admin's allowed PATCH moves (the droplet's, plus cancelling what has not started).
fn admin_may(from: Status, to: Status) -> bool {
    use Status::*;
    matches!(
        (from, to),
        (Assigned, InProgress)
            | (InProgress, Completed)
            | (InProgress, Failed)
            | (Pending, Cancelled)
            | (Assigned, Cancelled)
    )
}

#[tokio::test]
async fn the_happy_path_writes_four_history_rows_and_every_timestamp() {
    let app = TestApp::spawn().await;
    app.register(8, &["other"], &dead_endpoint()).await;
    let (status, body) = app
        .post(
            "/tasks",
            &app.token(5, &["write"]),
            json!({
                "task_type": "verify",
                "title": "Verify Droplet #14 code",
                "description": "UDC compliance check",
                "required_capability": NOBODY,
                "priority": 3,
                "max_retries": 3,
                "deadline": "2999-11-15T12:00:00Z",
                "payload": {"code_url": "https://github.com/fullpotential-ai/droplet-14"}
            }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let p = &body["payload"];
    let id = p["task_id"].as_i64().expect("task_id") as i32;
    assert_eq!(p["status"], "pending");
    assert_eq!(p["trace_id"], body["trace_id"]);
    assert!(p["created_at"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert!(p["estimated_assignment_seconds"].is_u64());

    assign(&app, id, 8).await;
    let me = app.token(8, &["read", "write"]);
    let (status, body) = app
        .patch(
            &format!("/tasks/{id}"),
            &me,
            json!({"status": "in_progress"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["payload"]["status"], "in_progress");
    assert!(body["payload"]["started_at"].is_string());
    let (status, body) = app
        .patch(
            &format!("/tasks/{id}"),
            &me,
            json!({"status": "completed", "result": {"passed": true, "score": 97}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["payload"]["status"], "completed");
    assert_eq!(
        body["payload"]["result"],
        json!({"passed": true, "score": 97})
    );

    let task = app.task(id).await;
    assert_eq!(task["id"], id);
    assert_eq!(task["status"], "completed");
    assert_eq!(task["title"], "Verify Droplet #14 code");
    assert_eq!(task["description"], "UDC compliance check");
    assert_eq!(task["priority"], 3);
    assert_eq!(task["max_retries"], 3);
    assert_eq!(task["retry_count"], 0);
    assert_eq!(task["required_capability"], NOBODY);
    assert_eq!(task["created_by"], "5");
    assert_eq!(task["assigned_droplet_id"], 8);
    assert_eq!(task["assigned_droplet_name"], "droplet-8");
    assert_eq!(task["result"], json!({"passed": true, "score": 97}));
    assert_eq!(task["error_message"], Value::Null);
    assert_eq!(
        task["payload"],
        json!({"code_url": "https://github.com/fullpotential-ai/droplet-14"})
    );
    assert!(task["deadline"]
        .as_str()
        .is_some_and(|d| d.starts_with("2999-11-15T12:00:00")));
    for field in [
        "created_at",
        "assigned_at",
        "started_at",
        "completed_at",
        "updated_at",
    ] {
        assert!(
            task[field].as_str().is_some_and(|t| t.ends_with('Z')),
            "{field}: {task}"
        );
    }
    let ts = |f: &str| chrono::DateTime::parse_from_rfc3339(task[f].as_str().unwrap()).unwrap();
    assert!(ts("created_at") <= ts("assigned_at"));
    assert!(ts("assigned_at") <= ts("started_at"));
    assert!(ts("started_at") <= ts("completed_at"));

    let history = task["state_history"].as_array().expect("history");
    let moves: Vec<(Value, Value, Value)> = history
        .iter()
        .map(|h| {
            (
                h["from_status"].clone(),
                h["to_status"].clone(),
                h["changed_by"].clone(),
            )
        })
        .collect();
    assert_eq!(
        moves,
        vec![
            (Value::Null, json!("pending"), json!("droplet-5")),
            (json!("pending"), json!("assigned"), json!("task_router")),
            (json!("assigned"), json!("in_progress"), json!("droplet-8")),
            (json!("in_progress"), json!("completed"), json!("droplet-8")),
        ]
    );
    for h in history {
        assert!(
            h["changed_at"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{h}"
        );
        assert!(
            h.get("reason").is_some() && h.get("metadata").is_some(),
            "{h}"
        );
    }
}

#[tokio::test]
async fn a_failing_droplet_stores_its_error_message() {
    let app = TestApp::spawn().await;
    app.register(8, &[], &dead_endpoint()).await;
    let id = task_in(&app, Status::InProgress).await;
    let (status, body) = app
        .patch(
            &format!("/tasks/{id}"),
            &app.token(8, &["write"]),
            json!({"status": "failed", "error_message": "spec not found", "result": {"partial": 1}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let s = snapshot(&app, id).await;
    assert_eq!(s.status, "failed");
    assert_eq!(s.error_message.as_deref(), Some("spec not found"));
    assert_eq!(s.result, Some(json!({"partial": 1})));
    assert!(s.completed_at.is_some());
}

#[tokio::test]
async fn every_forbidden_move_is_409_and_changes_nothing() {
    let app = TestApp::spawn().await;
    app.register(8, &[], &dead_endpoint()).await;
    let admin = app.admin();
    let droplet = app.token(8, &["read", "write"]);
    let mut checked = 0;
    for from in ALL_STATUSES {
        let id = task_in(&app, from).await;
        let before = snapshot(&app, id).await;
        for to in ALL_STATUSES {
            // The assigned droplet may not cancel, nor do anything the admin may not.
            let droplet_may = admin_may(from, to) && to != Status::Cancelled;
            let mut callers = vec![("admin", &admin, admin_may(from, to))];
            if before.assigned_droplet_id.is_some() {
                callers.push(("droplet 8", &droplet, droplet_may));
            }
            for (who, token, may) in callers {
                if may {
                    continue;
                }
                let (status, body) = app
                    .patch(
                        &format!("/tasks/{id}"),
                        token,
                        json!({"status": to.as_str(), "result": {"x": 1}, "error_message": "no"}),
                    )
                    .await;
                assert_eq!(
                    status,
                    StatusCode::CONFLICT,
                    "{who}: {from:?} -> {to:?}: {body}"
                );
                assert_eq!(
                    body["detail"],
                    format!("Invalid transition {} -> {}", from.as_str(), to.as_str()),
                    "{body}"
                );
                assert_eq!(
                    snapshot(&app, id).await,
                    before,
                    "{who}: {from:?} -> {to:?} changed the row"
                );
                checked += 1;
            }
        }
        // DELETE is cancellation: only what has not started.
        if !matches!(from, Status::Pending | Status::Assigned) {
            let (status, body) = app.delete(&format!("/tasks/{id}"), &admin).await;
            assert_eq!(status, StatusCode::CONFLICT, "DELETE of {from:?}: {body}");
            assert_eq!(snapshot(&app, id).await, before);
        }
    }
    assert!(checked > 40, "only {checked} moves checked");
}

#[tokio::test]
async fn the_allowed_patch_moves_succeed() {
    let app = TestApp::spawn().await;
    app.register(8, &[], &dead_endpoint()).await;
    for from in ALL_STATUSES {
        for to in ALL_STATUSES {
            if !admin_may(from, to) {
                continue;
            }
            let id = task_in(&app, from).await;
            let (status, body) = app
                .patch(
                    &format!("/tasks/{id}"),
                    &app.admin(),
                    json!({"status": to.as_str()}),
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{from:?} -> {to:?}: {body}");
            let s = snapshot(&app, id).await;
            assert_eq!(s.status, to.as_str());
            let changed_by: String = sqlx::query_scalar(
                "SELECT changed_by FROM task_state_history WHERE task_id = $1 ORDER BY id DESC LIMIT 1",
            )
            .bind(id)
            .fetch_one(&app.db)
            .await
            .unwrap();
            assert_eq!(changed_by, "admin-1");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_patches_of_one_task_exactly_one_wins() {
    let app = TestApp::spawn().await;
    app.register(8, &[], &dead_endpoint()).await;
    let me = app.token(8, &["write"]);
    for round in 0..5 {
        // Two starts of one assigned task.
        let id = task_in(&app, Status::Assigned).await;
        let path = format!("/tasks/{id}");
        let (a, b) = tokio::join!(
            app.patch(&path, &me, json!({"status": "in_progress"})),
            app.patch(&path, &me, json!({"status": "in_progress"}))
        );
        let mut statuses = [a.0, b.0];
        statuses.sort();
        assert_eq!(
            statuses,
            [StatusCode::OK, StatusCode::CONFLICT],
            "round {round}: {a:?} {b:?}"
        );
        assert_eq!(snapshot(&app, id).await.history, 3, "round {round}");

        // A completion racing a failure of one running task.
        let (a, b) = tokio::join!(
            app.patch(
                &path,
                &me,
                json!({"status": "completed", "result": {"r": 1}})
            ),
            app.patch(
                &path,
                &me,
                json!({"status": "failed", "error_message": "boom"})
            )
        );
        let mut statuses = [a.0, b.0];
        statuses.sort();
        assert_eq!(
            statuses,
            [StatusCode::OK, StatusCode::CONFLICT],
            "round {round}: {a:?} {b:?}"
        );
        let s = snapshot(&app, id).await;
        assert_eq!(s.history, 4);
        if a.0 == StatusCode::OK {
            assert_eq!((s.status.as_str(), s.error_message), ("completed", None));
        } else {
            assert_eq!((s.status.as_str(), s.result), ("failed", None));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_racing_a_start_leaves_one_outcome() {
    let app = TestApp::spawn().await;
    app.register(8, &[], &dead_endpoint()).await;
    for _ in 0..5 {
        let id = task_in(&app, Status::Assigned).await;
        let path = format!("/tasks/{id}");
        let creator = app.token(5, &["write"]);
        let me = app.token(8, &["write"]);
        let (cancel, start) = tokio::join!(
            app.delete(&path, &creator),
            app.patch(&path, &me, json!({"status": "in_progress"}))
        );
        let s = snapshot(&app, id).await;
        assert_eq!(s.history, 3, "{cancel:?} {start:?}");
        match (cancel.0, start.0) {
            (StatusCode::OK, StatusCode::CONFLICT) | (StatusCode::OK, StatusCode::FORBIDDEN) => {
                assert_eq!(s.status, "cancelled")
            }
            (StatusCode::CONFLICT, StatusCode::OK) => assert_eq!(s.status, "in_progress"),
            other => panic!("both or neither won: {other:?} {cancel:?} {start:?}"),
        }
    }
}

#[tokio::test]
async fn the_same_trace_id_from_the_same_creator_is_one_task_201_then_200() {
    let app = TestApp::spawn().await;
    let trace = Uuid::new_v4().to_string();
    let five = app.token(5, &["write"]);
    let body = envelope_with_trace(&trace, held_task("once"));
    let (s1, b1) = app
        .request(Method::POST, "/tasks", Some(&five), Some(body.clone()))
        .await;
    assert_eq!(s1, StatusCode::CREATED, "{b1}");
    let (s2, b2) = app
        .request(Method::POST, "/tasks", Some(&five), Some(body.clone()))
        .await;
    assert_eq!(s2, StatusCode::OK, "{b2}");
    assert_eq!(b1["payload"]["task_id"], b2["payload"]["task_id"]);
    assert_eq!(b2["payload"]["trace_id"], trace.as_str());
    assert_eq!(b2["payload"]["status"], "pending");
    assert_eq!(counts(&app).await, (1, 1));

    // Another creator with that trace id: 409, still one task.
    let six = app.token(6, &["write"]);
    let (s3, b3) = app
        .request(Method::POST, "/tasks", Some(&six), Some(body))
        .await;
    assert_eq!(s3, StatusCode::CONFLICT, "{b3}");
    assert!(b3["detail"].is_string());
    assert_eq!(counts(&app).await, (1, 1));
    let stored: Uuid = sqlx::query_scalar("SELECT trace_id FROM tasks")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(stored.to_string(), trace);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_with_one_trace_id_make_one_task() {
    let app = TestApp::spawn().await;
    let trace = Uuid::new_v4().to_string();
    let five = app.token(5, &["write"]);
    let body = envelope_with_trace(&trace, held_task("retried"));
    let sends =
        (0..6).map(|_| app.request(Method::POST, "/tasks", Some(&five), Some(body.clone())));
    let answers = futures::future::join_all(sends).await;
    let created = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .count();
    let repeated = answers.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    assert_eq!((created, repeated), (1, 5), "{answers:?}");
    assert_eq!(counts(&app).await, (1, 1));
}

#[tokio::test]
async fn a_trace_id_that_is_not_a_uuid_is_422() {
    let app = TestApp::spawn().await;
    let (status, body) = app
        .request(
            Method::POST,
            "/tasks",
            Some(&app.token(5, &["write"])),
            Some(envelope_with_trace("not-a-uuid", held_task("x"))),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["detail"][0]["loc"], json!(["body", "trace_id"]));
    assert_eq!(counts(&app).await, (0, 0));
}

#[tokio::test]
async fn who_may_act_on_a_task() {
    let app = TestApp::spawn().await;
    app.register(6, &[], &dead_endpoint()).await;
    let id = app.create_task(5, held_task("for 6")).await;
    assign(&app, id, 6).await;
    let before = snapshot(&app, id).await;

    // Droplet 5 PATCHing a task assigned to droplet 6: 403.
    let (status, body) = app
        .patch(
            &format!("/tasks/{id}"),
            &app.token(5, &["write"]),
            json!({"status": "in_progress"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(snapshot(&app, id).await, before);

    // An admin PATCH of an invalid move: 409.
    let (status, body) = app
        .patch(
            &format!("/tasks/{id}"),
            &app.admin(),
            json!({"status": "completed"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["detail"], "Invalid transition assigned -> completed");
    assert_eq!(snapshot(&app, id).await, before);

    // DELETE by a stranger (neither creator nor admin, even the assigned droplet): 403.
    for stranger in [7, 6] {
        let (status, body) = app
            .delete(&format!("/tasks/{id}"), &app.token(stranger, &["write"]))
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    }
    assert_eq!(snapshot(&app, id).await, before);

    // Unknown tasks are 404 for everyone who may ask.
    let (status, body) = app
        .patch(
            "/tasks/999999",
            &app.admin(),
            json!({"status": "in_progress"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["detail"], "Task 999999 not found");
    let (status, _) = app.delete("/tasks/999999", &app.admin()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app.get("/tasks/999999", &app.admin()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The creator cancels its own assigned task.
    let (status, body) = app
        .delete(&format!("/tasks/{id}"), &app.token(5, &["write"]))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["payload"]["task_id"], id);
    assert_eq!(body["payload"]["status"], "cancelled");
    assert!(body["payload"]["cancelled_at"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    let history = app.task(id).await["state_history"].clone();
    assert_eq!(history[2]["changed_by"], "droplet-5");
}

#[tokio::test]
async fn deleting_a_completed_task_is_409() {
    let app = TestApp::spawn().await;
    app.register(8, &[], &dead_endpoint()).await;
    let id = task_in(&app, Status::Completed).await;
    let before = snapshot(&app, id).await;
    let (status, body) = app
        .delete(&format!("/tasks/{id}"), &app.token(5, &["write"]))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["detail"], "Invalid transition completed -> cancelled");
    assert_eq!(snapshot(&app, id).await, before);
}

#[tokio::test]
async fn a_late_patch_after_the_task_moved_away_is_403() {
    let app = TestApp::spawn().await;
    app.register(8, &[], &dead_endpoint()).await;
    app.register(9, &[], &dead_endpoint()).await;
    let id = task_in(&app, Status::Assigned).await;
    // Requeued and given to droplet 9.
    let mut m = Move::new(id, Status::Pending, Actor::System, "system");
    m.cause = orchestrator::services::state_machine::Cause::Requeue;
    run_moves(&app.state.changes(), &[m], Mode::Strict)
        .await
        .expect("requeued");
    assign(&app, id, 9).await;
    let (status, body) = app
        .patch(
            &format!("/tasks/{id}"),
            &app.token(8, &["write"]),
            json!({"status": "in_progress"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(app.task_status(id).await, "assigned");
}

#[tokio::test]
async fn bad_task_input_is_422_in_the_contracts_shape_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let five = app.token(5, &["write"]);
    let base = held_task("valid");
    let cases: Vec<(&str, Value)> = vec![
        ("priority", json!(0)),
        ("priority", json!(11)),
        ("priority", json!(-3)),
        ("priority", json!("high")),
        ("priority", json!(2.5)),
        ("max_retries", json!(-1)),
        ("max_retries", json!(101)),
        ("max_retries", json!("3")),
        ("task_type", json!("")),
        ("task_type", json!("t".repeat(51))),
        ("task_type", json!(5)),
        ("task_type", json!(null)),
        ("title", json!("")),
        ("title", json!("t".repeat(256))),
        ("title", json!(["a"])),
        ("title", json!(null)),
        ("description", json!(12)),
        ("required_capability", json!("c".repeat(101))),
        ("required_capability", json!({"a": 1})),
        ("deadline", json!("tomorrow")),
        ("deadline", json!(5)),
        ("payload", json!("a string")),
        ("payload", json!([1, 2])),
    ];
    for (field, value) in cases {
        let mut payload = base.clone();
        if value.is_null() {
            payload.as_object_mut().unwrap().remove(field);
        } else {
            payload[field] = value.clone();
        }
        let (status, body) = app.post("/tasks", &five, payload).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{field}={value}: {body}"
        );
        let detail = body["detail"]
            .as_array()
            .unwrap_or_else(|| panic!("{body}"));
        let entry = &detail[0];
        assert!(
            entry["msg"].is_string() && entry["type"].is_string(),
            "{body}"
        );
        assert_eq!(
            entry["loc"].as_array().map(|l| l[..3].to_vec()),
            Some(vec![json!("body"), json!("payload"), json!(field)]),
            "{field}={value}: {body}"
        );
    }
    // Boundaries are fine.
    for (field, value) in [
        ("priority", json!(1)),
        ("priority", json!(10)),
        ("max_retries", json!(0)),
        ("max_retries", json!(100)),
    ] {
        let mut payload = base.clone();
        payload[field] = value;
        let (status, body) = app.post("/tasks", &five, payload).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    assert_eq!(counts(&app).await, (4, 4));

    // PATCH with a status that does not exist, or of the wrong type.
    let id = app.create_task(5, held_task("patched")).await;
    for status in [json!("done"), json!(3), json!(null)] {
        let mut payload = json!({"status": status});
        if status.is_null() {
            payload = json!({});
        }
        let (code, body) = app
            .patch(&format!("/tasks/{id}"), &app.admin(), payload)
            .await;
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{status}: {body}");
        assert_eq!(
            body["detail"][0]["loc"],
            json!(["body", "payload", "status"]),
            "{body}"
        );
    }
    assert_eq!(snapshot(&app, id).await.history, 1);
}

#[tokio::test]
async fn bad_queries_and_ids_are_422_naming_the_parameter() {
    let app = TestApp::spawn().await;
    let reader = app.token(5, &["read"]);
    for (query, param) in [
        ("limit=501", "limit"),
        ("limit=0", "limit"),
        ("limit=-1", "limit"),
        ("limit=ten", "limit"),
        ("offset=-1", "offset"),
        ("offset=x", "offset"),
        ("status=done", "status"),
        ("status=PENDING", "status"),
        ("priority_min=0", "priority_min"),
        ("priority_max=11", "priority_max"),
        ("priority_min=abc", "priority_min"),
        ("assigned_droplet_id=eight", "assigned_droplet_id"),
    ] {
        let (status, body) = app.get(&format!("/tasks?{query}"), &reader).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{query}: {body}");
        assert_eq!(
            body["detail"][0]["loc"],
            json!(["query", param]),
            "{query}: {body}"
        );
    }
    let (status, body) = app.get("/tasks?limit=500", &reader).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["payload"]["limit"], 500);

    for (method, path) in [
        (Method::GET, "/tasks/abc"),
        (Method::GET, "/tasks/1.5"),
        (Method::GET, "/tasks/99999999999"),
        (Method::PATCH, "/tasks/abc"),
        (Method::DELETE, "/tasks/abc"),
        (Method::GET, "/tasks/1%3B%20DROP%20TABLE%20tasks"),
    ] {
        let (status, body) = app
            .request(
                method.clone(),
                path,
                Some(&app.admin()),
                Some(envelope(json!({"status": "cancelled"}))),
            )
            .await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{method} {path}: {body}"
        );
        assert_eq!(
            body["detail"][0]["loc"],
            json!(["path", "task_id"]),
            "{body}"
        );
    }
    assert_eq!(counts(&app).await, (0, 0));
}

#[tokio::test]
async fn listing_filters_paginates_newest_first_with_external_droplet_ids() {
    let app = TestApp::spawn().await;
    app.register(8, &["other"], &dead_endpoint()).await;
    let mut ids = Vec::new();
    for (i, (task_type, priority)) in [("verify", 1), ("build", 5), ("verify", 9)]
        .into_iter()
        .enumerate()
    {
        ids.push(
            app.create_task(5, json!({"task_type": task_type, "title": format!("t{i}"), "priority": priority, "required_capability": NOBODY}))
                .await,
        );
    }
    assign(&app, ids[1], 8).await;
    let reader = app.token(7, &["read"]);
    let listed = |body: &Value| -> Vec<i32> {
        body["payload"]["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_i64().unwrap() as i32)
            .collect()
    };

    let (_, body) = app.get("/tasks", &reader).await;
    assert_eq!(listed(&body), vec![ids[2], ids[1], ids[0]], "newest first");
    let p = &body["payload"];
    assert_eq!(
        (
            p["total"].clone(),
            p["limit"].clone(),
            p["offset"].clone(),
            p["has_more"].clone()
        ),
        (json!(3), json!(50), json!(0), json!(false))
    );
    let assigned = &p["tasks"][1];
    assert_eq!(assigned["assigned_droplet_id"], 8);
    assert_eq!(assigned["assigned_droplet_name"], "droplet-8");
    assert_eq!(assigned["status"], "assigned");

    let (_, body) = app.get("/tasks?limit=2", &reader).await;
    assert_eq!(listed(&body), vec![ids[2], ids[1]]);
    assert_eq!(body["payload"]["total"], 3);
    assert_eq!(body["payload"]["has_more"], true);
    let (_, body) = app.get("/tasks?limit=2&offset=2", &reader).await;
    assert_eq!(listed(&body), vec![ids[0]]);
    assert_eq!(body["payload"]["total"], 3);
    assert_eq!(body["payload"]["has_more"], false);
    let (_, body) = app.get("/tasks?offset=10", &reader).await;
    assert_eq!(listed(&body), Vec::<i32>::new());
    assert_eq!(body["payload"]["total"], 3);

    let (_, body) = app.get("/tasks?task_type=verify", &reader).await;
    assert_eq!(listed(&body), vec![ids[2], ids[0]]);
    let (_, body) = app.get("/tasks?status=assigned", &reader).await;
    assert_eq!(listed(&body), vec![ids[1]]);
    let (_, body) = app
        .get("/tasks?assigned_droplet_id=8&status=assigned", &reader)
        .await;
    assert_eq!(listed(&body), vec![ids[1]]);
    let (_, body) = app.get("/tasks?assigned_droplet_id=9", &reader).await;
    assert_eq!(listed(&body), Vec::<i32>::new());
    let (_, body) = app
        .get("/tasks?priority_min=2&priority_max=9", &reader)
        .await;
    assert_eq!(listed(&body), vec![ids[2], ids[1]]);
    let (_, body) = app.get("/tasks?priority_max=4", &reader).await;
    assert_eq!(listed(&body), vec![ids[0]]);
}

#[tokio::test]
async fn sql_looking_strings_are_stored_and_returned_verbatim() {
    let app = TestApp::spawn().await;
    let texts = [
        "'; DROP TABLE tasks; --",
        "Robert'); DELETE FROM droplets;--",
        "\" OR \"1\"=\"1",
        "1 OR 1=1",
        "%_\\",
        "$1 $$ :: ;",
    ];
    let mut ids = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let task_type: String = text.chars().take(50).collect();
        let id = app
            .create_task(
                5,
                json!({
                    "task_type": task_type,
                    "title": text,
                    "description": text,
                    "required_capability": text,
                    "payload": {"q": text, (*text): i},
                }),
            )
            .await;
        ids.push((id, task_type));
    }
    let reader = app.token(7, &["read"]);
    for ((id, task_type), text) in ids.iter().zip(texts) {
        let task = app.task(*id).await;
        assert_eq!(task["title"], text);
        assert_eq!(task["task_type"], task_type.as_str());
        assert_eq!(task["description"], text);
        assert_eq!(task["required_capability"], text);
        assert_eq!(task["payload"]["q"], text);
        assert!(task["payload"].get(text).is_some());
        // Each filter finds exactly its own task.
        let (status, body) = app
            .get(
                &format!("/tasks?task_type={}", urlencode(task_type)),
                &reader,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["payload"]["total"], 1, "{text}: {body}");
        assert_eq!(body["payload"]["tasks"][0]["id"], *id);
        let (_, body) = app
            .get(
                &format!("/tasks?required_capability={}", urlencode(text)),
                &reader,
            )
            .await;
        assert_eq!(body["payload"]["total"], 1, "{text}: {body}");
    }
    // A PATCH carrying such text keeps it too.
    app.register(8, &[], &dead_endpoint()).await;
    let id = task_in(&app, Status::InProgress).await;
    let (status, _) = app
        .patch(
            &format!("/tasks/{id}"),
            &app.token(8, &["write"]),
            json!({"status": "failed", "error_message": texts[0]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(app.task(id).await["error_message"], texts[0]);

    // A cancellation's reason is kept as written.
    let pending = app.create_task(5, held_task("to cancel")).await;
    let (status, body) = app
        .request(
            Method::DELETE,
            &format!("/tasks/{pending}"),
            Some(&app.token(5, &["write"])),
            Some(envelope(json!({"reason": texts[1]}))),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        app.task(pending).await["state_history"][1]["reason"],
        texts[1]
    );

    // Filters that are not free text refuse such input; free ones match nothing.
    let (status, _) = app
        .get(&format!("/tasks?status={}", urlencode(texts[0])), &reader)
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, body) = app
        .get(
            &format!("/tasks?created_by={}", urlencode("5' OR '1'='1")),
            &reader,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["payload"]["total"], 0, "{body}");
    let (tasks, _) = counts(&app).await;
    assert_eq!(tasks, texts.len() as i64 + 2);
}

#[tokio::test]
async fn a_task_nobody_can_run_stays_pending_and_one_for_a_capable_droplet_is_routed() {
    let app = TestApp::spawn_with(&[("TASK_ROUTER_INTERVAL", "1")]).await;
    let droplet = DropletServer::start(Behaviour::Ok).await;
    app.register(8, &["code_verification"], &droplet.endpoint)
        .await;
    let held = app.create_task(5, held_task("held")).await;
    let routed = app
        .create_task(5, json!({"task_type": "verify", "title": "routed", "required_capability": "code_verification"}))
        .await;
    eventually(Duration::from_secs(10), "routed task assigned", || async {
        (app.task_status(routed).await == "assigned").then_some(())
    })
    .await;
    assert_eq!(app.task_status(held).await, "pending");
}

fn new_row(title: &str) -> orchestrator::services::create_queue::NewRow {
    let task: orchestrator::services::new_task::NewTask =
        serde_json::from_value(json!({"task_type": "batched", "title": title})).expect("a task");
    orchestrator::services::create_queue::NewRow {
        trace_id: Uuid::new_v4(),
        created_by: "5".into(),
        changed_by: "droplet-5".into(),
        task: task.settled(),
    }
}

/// How many transactions wrote the tasks (rows written by one share its `xmin`).
async fn writing_transactions(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT COUNT(DISTINCT xmin::text) FROM tasks")
        .fetch_one(&app.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn creations_at_one_moment_share_one_commit_and_a_bad_one_fails_alone() {
    let app = TestApp::spawn().await;
    app.pause_routing().await;
    // Twenty at once: one insert, one commit, each with its history row and its event.
    let rows: Vec<_> = (0..20).map(|i| new_row(&format!("t{i}"))).collect();
    let answers = orchestrator::services::tasks::insert_all(&app.state.tasks(), rows).await;
    assert!(answers.iter().all(|a| matches!(a, Ok(Some(_)))));
    assert_eq!(counts(&app).await, (20, 20));
    assert_eq!(writing_transactions(&app).await, 1);
    let created_events: i64 = sqlx::query_scalar(
        "SELECT (SELECT COUNT(*) FROM event_outbox WHERE envelope->'payload'->>'event' = 'task_created')
              + (SELECT COUNT(*) FROM events WHERE envelope->'payload'->>'event' = 'task_created')",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(created_events, 20);

    // Twenty more, one of which the database refuses (a NUL in its title): the other
    // nineteen are committed all the same, the bad one alone fails, nothing of it is left.
    let mut rows: Vec<_> = (0..20).map(|i| new_row(&format!("u{i}"))).collect();
    rows[7].task.title = "bad\u{0}".into();
    let bad_trace = rows[7].trace_id;
    let answers = orchestrator::services::tasks::insert_all(&app.state.tasks(), rows).await;
    for (i, a) in answers.iter().enumerate() {
        if i == 7 {
            assert!(a.is_err(), "the NUL row: {a:?}");
        } else {
            assert!(matches!(a, Ok(Some(_))), "row {i}: {a:?}");
        }
    }
    assert_eq!(counts(&app).await, (39, 39));
    let bad: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tasks WHERE trace_id = $1")
        .bind(bad_trace)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(bad, 0);

    // A trace id given twice at once: one task, the second is answered with it, not new.
    let row = new_row("twice");
    let answers =
        orchestrator::services::tasks::insert_all(&app.state.tasks(), vec![row.clone(), row]).await;
    let (Ok(Some(first)), Ok(Some(second))) = (&answers[0], &answers[1]) else {
        panic!("{answers:?}");
    };
    assert!(first.new && !second.new, "{answers:?}");
    assert_eq!(first.task.id, second.task.id);
    assert_eq!(counts(&app).await, (40, 40));
}

/// When this database's `tasks` table was last analyzed by hand (not by autovacuum).
async fn last_analyze(app: &TestApp) -> Option<chrono::DateTime<chrono::Utc>> {
    sqlx::query_scalar("SELECT last_analyze FROM pg_stat_user_tables WHERE relname = 'tasks'")
        .fetch_one(&app.db)
        .await
        .expect("table statistics")
}

#[tokio::test]
async fn the_young_task_tables_are_analyzed_after_the_500th_creation() {
    // Plans made while `tasks` held a few pages scan it whole (the history rows' foreign-key
    // check among them); the process analyzes it as it grows, not a minute later.
    let app = TestApp::spawn().await;
    app.pause_routing().await;
    let rows: Vec<_> = (0..499).map(|i| new_row(&format!("a{i}"))).collect();
    let answers = orchestrator::services::tasks::insert_all(&app.state.tasks(), rows).await;
    assert!(answers.iter().all(|a| matches!(a, Ok(Some(_)))));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(last_analyze(&app).await, None, "not before the 500th");
    let answers =
        orchestrator::services::tasks::insert_all(&app.state.tasks(), vec![new_row("the 500th")])
            .await;
    assert!(matches!(answers[0], Ok(Some(_))));
    eventually(Duration::from_secs(10), "tasks analyzed", || async {
        last_analyze(&app).await
    })
    .await;
}

/// A move's lock and its UPDATE bind arrays of ids: PostgreSQL plans them once per
/// connection (a generic plan after five custom ones), not again at every move. Given as
/// plain array parameters, a one-id array looks cheaper than the generic plan's guess and
/// they were planned at each of 9,612 moves in a 300 tasks/s run (issue 26).
#[tokio::test]
async fn a_move_s_statements_are_planned_once_per_connection_not_at_each_move() {
    use sqlx::Connection;
    let app = TestApp::spawn().await;
    let mut ids = Vec::new();
    for i in 0..9 {
        ids.push(app.create_task(5, held_task(&format!("planned {i}"))).await);
    }
    // A table of some size, as in a real run: on a few rows every plan costs the same and
    // PostgreSQL keeps the generic one whatever the statement.
    sqlx::query(
        "INSERT INTO tasks (trace_id, task_type, title, payload, status, completed_at)
         SELECT gen_random_uuid(), 'filler', 'filler', '{}', 'cancelled', NOW()
         FROM generate_series(1, 20000)",
    )
    .execute(&app.db)
    .await
    .unwrap();
    sqlx::query("ANALYZE tasks").execute(&app.db).await.unwrap();
    let mut conn = sqlx::PgConnection::connect(&app.database_url)
        .await
        .expect("a connection of its own");
    for id in &ids {
        let m = Move::new(*id, Status::Cancelled, Actor::Admin, "admin");
        let applied = orchestrator::services::state_machine::apply(&mut conn, &[m], Mode::Strict)
            .await
            .expect("cancelled");
        assert_eq!(applied.len(), 1);
    }
    let plans: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements
         WHERE (statement LIKE '%FOR UPDATE%' OR statement LIKE '%UPDATE tasks SET%')
           AND statement NOT LIKE '%pg_prepared_statements%'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(plans.len(), 2, "{plans:?}");
    for (statement, generic, custom) in &plans {
        assert!(
            *custom <= 5 && *generic >= 4,
            "planned again at each move: {generic} generic, {custom} custom plans of {statement}"
        );
    }
}
