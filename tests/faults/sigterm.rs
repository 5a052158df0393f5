//! Scenario 6: SIGTERM with requests in flight and dashboards connected: the requests in
//! flight finish (they are held on a table lock the test owns, so they certainly are in
//! flight), every WebSocket gets close 1001, the process exits within 30 s, and no task is
//! left half-changed (a restart then finishes every task).

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;
use uuid::Uuid;

use crate::fleet::{Api, Dashboard, Fleet, Producer};
use crate::harness::*;
use crate::helpers::{envelope_with_trace, token};
use crate::invariants;

const IN_FLIGHT: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "slow fault scenario: cargo test --test faults -- --include-ignored --test-threads 1"]
async fn sigterm_lets_requests_finish_closes_sockets_with_1001_and_exits() {
    let (db, url) = fresh_database().await;
    let mut env = base_env(&url, free_port());
    // Requests wait on the test's lock for a while; they must not time out at the pool.
    env.push(("DATABASE_ACQUIRE_TIMEOUT_SECONDS".into(), "20".into()));
    let mut server = Server::start("s6-sigterm", &env).await;
    let pool = pool(&url).await;
    let api = Api::new(vec![server.base.clone()]);
    let fleet = Fleet::start(
        api.clone(),
        &[1601, 1602, 1603, 1604],
        &["a"],
        Duration::from_millis(50),
        Duration::from_secs(1),
    )
    .await;
    let tasks_feed = Dashboard::connect(&server.base, "tasks").await;
    let droplets_feed = Dashboard::connect(&server.base, "droplets").await;
    let producer = Producer::start(api.clone(), 1601, rate() / 2.0, &["a"], None);
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Writes to tasks now wait on the test's lock: requests are in flight for sure.
    let mut lock = pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE tasks IN SHARE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock tasks");
    let creator = token(1601, &["read", "write"]);
    let held: Vec<_> = (0..IN_FLIGHT)
        .map(|i| {
            let (api, creator) = (api.clone(), creator.clone());
            let trace = Uuid::new_v4();
            let body = envelope_with_trace(
                &trace.to_string(),
                json!({"task_type": "faults", "title": format!("in flight {i}"), "required_capability": "a"}),
            );
            let handle = tokio::spawn(async move {
                api.once(Method::POST, "/tasks", &creator, Some(&body)).await
            });
            (trace, handle)
        })
        .collect();
    let waiting = wait_for(Duration::from_secs(10), || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&pool)
        .await
        .ok()?;
        // Concurrent creations share an insert: the leader's insert waits on the lock, the
        // creations behind it wait for that insert (in flight all the same).
        (n >= 1).then_some(n)
    })
    .await
    .expect("the requests wait on the lock");
    // Others (the producer, droplets' PATCHes) wait there too; give ours time to arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Every one of ours is still unanswered: in flight, held behind the lock.
    assert!(
        held.iter().all(|(_, handle)| !handle.is_finished()),
        "a held creation was answered while the table was locked"
    );

    server.sigterm();
    let signalled = Instant::now();
    // The server waits for them: it is still running a while later.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let alive_while_in_flight = server.wait_exit(Duration::ZERO).await.is_none();
    lock.commit().await.expect("release the lock");

    let mut answers = Vec::new();
    for (trace, handle) in held {
        answers.push((trace, handle.await.expect("request task").map(|(s, _)| s)));
    }
    let exit = server.wait_exit(Duration::from_secs(30)).await;
    let exited_after = signalled.elapsed();
    let closes = (tasks_feed.close_code(), droplets_feed.close_code());
    let shutdown_logged = !server.log_lines("shutting down").is_empty();

    // The restart finishes what was left; nothing may be half-changed.
    let restarted = Server::start("s6-sigterm-restart", &env).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let produced = producer.finish().await;
    let mut acked = produced.acked();
    for (trace, status) in &answers {
        if *status == Some(201) {
            let id: i32 = sqlx::query_scalar("SELECT id FROM tasks WHERE trace_id = $1")
                .bind(trace)
                .fetch_one(&pool)
                .await
                .unwrap_or(-1);
            acked.push((*trace, id));
        }
    }
    let task_ids: Vec<i32> = acked.iter().map(|(_, id)| *id).collect();
    let unfinished = drain(&pool, &task_ids, Duration::from_secs(60)).await;
    let traces: Vec<_> = acked.iter().map(|(t, _)| *t).collect();
    let findings = invariants::check_database(&pool, &traces).await;
    let errors = api.server_errors(None);

    let mut figures = Figures::new("s6_sigterm");
    figures.tasks_created = acked.len();
    figures.tasks_lost = findings.lost() + unfinished.len();
    figures.tasks_duplicated = findings.duplicated() + fleet.completed_twice().len();
    figures.recover_seconds = Some(secs(exited_after));
    figures.server_errors_5xx = errors.len() as u64;
    figures.note("requests_held_in_flight", waiting);
    figures.note(
        "in_flight_answers",
        answers.iter().map(|(_, s)| *s).collect::<Vec<_>>(),
    );
    figures.note("alive_while_requests_in_flight", alive_while_in_flight);
    figures.note("exit_status", exit.map(|s| s.to_string()));
    figures.note("exit_seconds_after_sigterm", secs(exited_after));
    figures.note("websocket_close_codes", closes);
    figures.note("answers_by_status", api.by_status());
    figures.note("panics", server.panics() + restarted.panics());
    figures.report();

    assert!(
        alive_while_in_flight,
        "the process exited with requests in flight"
    );
    for (trace, status) in &answers {
        assert_eq!(*status, Some(201), "in-flight creation {trace}");
    }
    let exit = exit.expect("the process exits within 30 s of SIGTERM");
    assert!(exit.success(), "exit status {exit}");
    assert_eq!(closes, (Some(1001), Some(1001)), "dashboards' close codes");
    assert!(shutdown_logged, "no shutdown line in the log");
    findings.assert_clean();
    assert!(
        unfinished.is_empty(),
        "tasks never finished: {unfinished:?}"
    );
    assert!(produced.gave_up().is_empty(), "{:?}", produced.gave_up());
    assert!(errors.iter().all(|e| e.status == Some(503)), "{errors:?}");
    assert_eq!(
        server.panics() + restarted.panics(),
        0,
        "{}",
        server.stderr_text()
    );
    fleet.stop();
    drop(restarted);
    pool.close().await;
    drop(db);
}
