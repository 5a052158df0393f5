//! PATCHes of tasks arriving at one moment share one transaction and one commit (one lock,
//! one `UPDATE`, one history insert, one events insert), as creations and heartbeats do, and
//! each is answered on its own: a refused PATCH fails alone, in the contract's order.

use std::time::Duration;

use orchestrator::services::state_machine::{Actor, Mode, Move, Status};
use orchestrator::services::transition::run as run_moves;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::Connection;

use crate::helpers::*;

fn held_task(title: &str) -> Value {
    json!({"task_type": "verify", "title": title, "required_capability": "held_for_the_test"})
}

/// Assigns the tasks to `droplet_id` in one move, as the router does.
async fn assign_all(app: &TestApp, tasks: &[i32], droplet_id: i32) {
    let internal: i32 = sqlx::query_scalar("SELECT id FROM droplets WHERE droplet_id = $1")
        .bind(droplet_id)
        .fetch_one(&app.db)
        .await
        .expect("droplet row");
    let moves: Vec<Move> = tasks
        .iter()
        .map(|&id| {
            let mut m = Move::new(id, Status::Assigned, Actor::System, "task_router");
            m.assign_to = Some(internal);
            m
        })
        .collect();
    let applied = run_moves(&app.state.changes(), &moves, Mode::Strict)
        .await
        .expect("assigned");
    assert_eq!(applied.len(), tasks.len());
}

/// (how many distinct transactions last wrote these tasks, their history rows in all)
async fn writes_of(app: &TestApp, ids: &[i32]) -> (i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT COUNT(DISTINCT xmin::text) FROM tasks WHERE id = ANY($1)),
                (SELECT COUNT(*) FROM task_state_history WHERE task_id = ANY($1))",
    )
    .bind(ids)
    .fetch_one(&app.db)
    .await
    .expect("writes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patches_at_one_moment_share_one_commit_and_each_refusal_is_its_own() {
    // One leader (a quarter of the pool): PATCHes that arrive while it writes wait for its
    // next batch, all together.
    let app =
        TestApp::spawn_with(&[("DATABASE_POOL_SIZE", "4"), ("DATABASE_MAX_OVERFLOW", "0")]).await;
    app.pause_routing().await;
    app.register(8, &[], &dead_endpoint()).await;
    app.register(9, &[], &dead_endpoint()).await;
    let mut mine = Vec::new();
    for i in 0..20 {
        mine.push(app.create_task(5, held_task(&format!("mine {i}"))).await);
    }
    let others = app.create_task(5, held_task("droplet 9's")).await;
    assign_all(&app, &mine, 8).await;
    assign_all(&app, &[others], 9).await;
    let (_, history_before) = writes_of(&app, &mine).await;
    let first_attempt: i32 = sqlx::query_scalar("SELECT attempt FROM tasks WHERE id = $1")
        .bind(mine[17])
        .fetch_one(&app.db)
        .await
        .expect("attempt");

    // The first task's row held by another transaction: the first shared write waits on it,
    // and the PATCHes arriving meanwhile wait for the next one, together.
    let mut blocker = sqlx::PgConnection::connect(&app.database_url)
        .await
        .expect("blocker");
    let mut held = blocker.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE")
        .bind(mine[0])
        .execute(&mut *held)
        .await
        .expect("lock");

    let me = app.token(8, &["read", "write"]);
    let patch = |id: i32, body: Value| {
        let (app, me) = (&app, me.clone());
        async move { (id, app.patch(&format!("/tasks/{id}"), &me, body).await) }
    };
    // Droplet 8 starts 17 of its tasks: the first alone, whose write waits on the held row;
    // then, once it waits, the 16 others at once with the refused: a stale attempt, a move
    // that may not happen (assigned -> completed), droplet 9's task, a task that does not
    // exist. They queue behind the waiting write and share the next one.
    let first = patch(mine[0], json!({"status": "in_progress"}));
    let mut rest = Vec::new();
    for &id in &mine[1..17] {
        rest.push(patch(id, json!({"status": "in_progress"})));
    }
    rest.push(patch(
        mine[17],
        json!({"status": "in_progress", "attempt": first_attempt + 5}),
    ));
    rest.push(patch(mine[18], json!({"status": "completed"})));
    rest.push(patch(others, json!({"status": "in_progress"})));
    rest.push(patch(i32::MAX - 1, json!({"status": "in_progress"})));
    let rest_then_release = async {
        eventually(
            Duration::from_secs(10),
            "the first PATCH's write waiting on the row",
            || async {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                .fetch_one(&app.db)
                .await
                .expect("activity");
                (waiting > 0).then_some(())
            },
        )
        .await;
        let release = async {
            // The others arrive and queue behind the waiting write.
            tokio::time::sleep(Duration::from_millis(500)).await;
            held.rollback().await.expect("release");
        };
        let (answers, ()) = tokio::join!(futures::future::join_all(rest), release);
        answers
    };
    let (first, mut answers) = tokio::join!(first, rest_then_release);
    answers.push(first);

    for (id, (status, body)) in &answers {
        let expected = match *id {
            id if id == mine[17] || id == mine[18] => StatusCode::CONFLICT,
            id if id == others => StatusCode::FORBIDDEN,
            id if id == i32::MAX - 1 => StatusCode::NOT_FOUND,
            _ => StatusCode::OK,
        };
        assert_eq!(*status, expected, "task {id}: {body}");
        if expected == StatusCode::OK {
            assert_eq!(body["payload"]["status"], "in_progress", "{body}");
            assert_eq!(body["payload"]["task_id"], *id, "{body}");
        }
    }
    let detail = |id: i32| {
        answers
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, (_, b))| b["detail"].clone())
            .expect("answer")
    };
    assert_eq!(
        detail(others),
        format!("Task {others} is not assigned to droplet 8")
    );
    assert_eq!(
        detail(mine[17]),
        format!(
            "Task {} is on attempt {first_attempt}; this update is for attempt {}",
            mine[17],
            first_attempt + 5
        )
    );
    assert_eq!(detail(mine[18]), "Invalid transition assigned -> completed");

    // The 17 started: each with its history row, written by two transactions (the first's,
    // which waited on the row, and the one the 16 others shared). The refused are as they were.
    let started = &mine[..17];
    let (transactions, history) = writes_of(&app, started).await;
    assert!(
        transactions <= 2,
        "{transactions} transactions wrote 17 PATCHes"
    );
    let (_, history_after) = writes_of(&app, &mine).await;
    assert_eq!(history_after - history_before, 17);
    assert_eq!(history, 17 * 3, "created, assigned, started");
    for id in started {
        assert_eq!(app.task_status(*id).await, "in_progress");
    }
    for id in [mine[17], mine[18]] {
        assert_eq!(app.task_status(id).await, "assigned");
    }
    assert_eq!(app.holder(others).await, ("assigned".to_string(), Some(9)));
    // One `task_started` event per started task.
    let events: i64 = sqlx::query_scalar(
        "SELECT (SELECT COUNT(*) FROM event_outbox WHERE envelope->'payload'->>'event' = 'task_started')
              + (SELECT COUNT(*) FROM events WHERE envelope->'payload'->>'event' = 'task_started')",
    )
    .fetch_one(&app.db)
    .await
    .expect("events");
    assert_eq!(events, 17);
}
