//! Creation costs one shared statement (issue 26, item 1): the contracts come from a
//! directory kept in memory and current on every replica from the droplet events, and the
//! repeat of a trace id is found by the insert itself, at once, without deadlocks.

use std::collections::HashMap;
use std::time::Duration;

use orchestrator::services::create_queue::NewRow;
use orchestrator::services::new_task::NewTask;
use orchestrator::services::tasks::insert_all;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::*;

/// Loose for a loaded machine; the event delay is a poll of 250 ms at worst.
const SOON: Duration = Duration::from_secs(10);

async fn register_verify(app: &TestApp, id: i32, endpoint: &str, schemas: Value) {
    let (s, b) = app
        .post(
            "/droplets/register",
            &app.token(id, &["read", "write"]),
            json!({"droplet_id": id, "name": format!("droplet-{id}"), "steward": "tests",
                   "endpoint": endpoint, "capabilities": ["verify"],
                   "capability_schemas": schemas}),
        )
        .await;
    assert!(s.is_success(), "register {id}: {b}");
}

async fn post_verify(app: &TestApp, payload: Value) -> (StatusCode, Value) {
    app.post(
        "/tasks",
        &app.token(5, &["read", "write"]),
        json!({"task_type": "verify", "title": "checked", "required_capability": "verify",
               "payload": payload}),
    )
    .await
}

/// Deadlocks PostgreSQL broke in this database so far.
async fn deadlocks(db: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
        .fetch_one(db)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_contract_registered_on_another_replica_checks_creations_here() {
    let a = TestApp::spawn().await;
    let b = TestApp::spawn_on(&a.database_url, &[]).await;
    let server = DropletServer::start(Behaviour::Ok).await;
    a.pause_routing().await;
    b.pause_routing().await;
    // Replica a checks from its directory (not the database), once its event reader stands.
    eventually(SOON, "a's directory loaded", || async {
        a.state.directory.is_known().then_some(())
    })
    .await;
    let strict = json!({"verify": {"type": "object", "required": ["code_url"],
                                    "properties": {"code_url": {"type": "string"}}}});
    register_verify(&b, 61, &server.endpoint, strict).await;
    let refused = eventually(SOON, "b's contract in force on a", || async {
        let (s, body) = post_verify(&a, json!({"code_url": 5})).await;
        (s == StatusCode::UNPROCESSABLE_ENTITY).then_some(body)
    })
    .await;
    assert_eq!(
        refused["detail"][0]["loc"],
        json!(["body", "payload", "payload", "code_url"]),
        "{refused}"
    );
    let (s, body) = post_verify(&a, json!({"code_url": "https://x.example/r"})).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    // Registered again on b without a contract: a stops validating against the old one.
    register_verify(&b, 61, &server.endpoint, json!({})).await;
    eventually(SOON, "the contract withdrawn on a", || async {
        let (s, _) = post_verify(&a, json!({"code_url": 5})).await;
        (s == StatusCode::CREATED).then_some(())
    })
    .await;
    assert!(a.state.directory.is_known(), "checked from the directory");
}

/// 40 trace ids, each sent 4 times at once: twice to one replica in one order, twice to
/// another in the opposite order. One task per trace id, one 201 for it, and every answer
/// names that task. The shared inserts of the two replicas hold the same trace ids: before,
/// each went in its order of arrival, two of them could wait for each other in a circle, and
/// PostgreSQL broke the deadlock after a second (the issue's 1.07 s stalls). Now none is.
#[tokio::test]
async fn repeats_of_trace_ids_sent_at_once_give_one_task_each_and_no_deadlock() {
    let a = TestApp::spawn().await;
    let b = TestApp::spawn_on(&a.database_url, &[]).await;
    a.pause_routing().await;
    let before = deadlocks(&a.db).await;
    let n = 40;
    let traces: Vec<String> = (0..n).map(|_| Uuid::new_v4().to_string()).collect();
    let mut sends: Vec<(usize, &TestApp)> = Vec::new();
    for i in 0..n {
        for _ in 0..2 {
            sends.push((i, &a));
            sends.push((n - 1 - i, &b));
        }
    }
    let creator = a.token(5, &["read", "write"]);
    let answers = futures::future::join_all(sends.iter().map(|(k, app)| {
        let body = envelope_with_trace(&traces[*k], task_payload(&format!("repeat {k}")));
        let creator = creator.clone();
        async move {
            let (s, b) = app
                .request(Method::POST, "/tasks", Some(&creator), Some(body))
                .await;
            (*k, s, b)
        }
    }))
    .await;
    let mut task_of: HashMap<usize, Value> = HashMap::new();
    let mut created: HashMap<usize, usize> = HashMap::new();
    for (k, s, body) in &answers {
        assert!(
            *s == StatusCode::CREATED || *s == StatusCode::OK,
            "{s} {body}"
        );
        let id = body["payload"]["task_id"].clone();
        assert_eq!(task_of.entry(*k).or_insert(id.clone()), &id, "{body}");
        *created.entry(*k).or_default() += usize::from(*s == StatusCode::CREATED);
    }
    assert!(created.values().all(|n| *n == 1), "{created:?}");
    let (tasks, history): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM tasks), (SELECT COUNT(*) FROM task_state_history)",
    )
    .fetch_one(&a.db)
    .await
    .unwrap();
    assert_eq!((tasks, history), (n as i64, n as i64));
    assert_eq!(deadlocks(&a.db).await - before, 0, "no deadlock broken");
}

fn row(trace_id: Uuid, creator: &str) -> NewRow {
    let task: NewTask =
        serde_json::from_value(json!({"task_type": "batched", "title": "same ids"}))
            .expect("a task");
    NewRow {
        trace_id,
        created_by: creator.into(),
        changed_by: format!("droplet-{creator}"),
        task: task.settled(),
    }
}

/// The same 200 trace ids given to two replicas' shared inserts at the same moment, in
/// opposite orders: each trace id is one task, each replica answers every one with it, and
/// the two inserts waited for each other without a deadlock.
#[tokio::test]
async fn two_shared_inserts_of_the_same_trace_ids_in_opposite_orders_never_deadlock() {
    let a = TestApp::spawn().await;
    let b = TestApp::spawn_on(&a.database_url, &[]).await;
    a.pause_routing().await;
    let before = deadlocks(&a.db).await;
    for _ in 0..3 {
        let ids: Vec<Uuid> = (0..200).map(|_| Uuid::new_v4()).collect();
        let forward: Vec<NewRow> = ids.iter().map(|id| row(*id, "5")).collect();
        let backward: Vec<NewRow> = ids.iter().rev().map(|id| row(*id, "5")).collect();
        let (at_a, at_b) = (a.state.tasks(), b.state.tasks());
        let (x, y) = tokio::join!(insert_all(&at_a, forward), insert_all(&at_b, backward));
        let mut y = y;
        y.reverse();
        for (i, (p, q)) in x.iter().zip(&y).enumerate() {
            let (Ok(Some(p)), Ok(Some(q))) = (p, q) else {
                panic!("row {i}: {p:?} {q:?}");
            };
            assert_eq!(p.task.id, q.task.id, "row {i}");
            assert_eq!(p.task.trace_id, ids[i]);
            assert!(p.new != q.new, "row {i}: one of the two inserted it");
        }
    }
    assert_eq!(deadlocks(&a.db).await - before, 0, "no deadlock broken");
}
