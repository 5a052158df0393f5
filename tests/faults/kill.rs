//! Scenario 1: `kill -9` of the orchestrator under steady load, then a restart on the same
//! database: nothing lost, nothing duplicated, routing resumes on its own.

use std::time::{Duration, Instant};

use crate::fleet::{Api, Fleet, Producer};
use crate::harness::*;
use crate::invariants;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "slow fault scenario: cargo test --test faults -- --include-ignored --test-threads 1"]
async fn kill_9_under_load_loses_nothing_and_routing_resumes() {
    let (db, url) = fresh_database().await;
    let env = base_env(&url, free_port());
    let mut first = Server::start("s1-kill-first", &env).await;
    let pool = pool(&url).await;
    let api = Api::new(vec![first.base.clone()]);
    let ids: Vec<i32> = (1101..=1108).collect();
    let fleet = Fleet::start(
        api.clone(),
        &ids,
        &["a", "b"],
        Duration::from_millis(50),
        Duration::from_secs(1),
    )
    .await;
    let producer = Producer::start(api.clone(), 1101, rate(), &["a", "b"], None);
    let load_started = Instant::now();

    // Steady load, then the kill in the middle of it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let completed_before = fleet.completed.load(std::sync::atomic::Ordering::Relaxed);
    assert!(completed_before > 0, "no task completed before the kill");
    first.kill9().await;
    let killed = Instant::now();
    let live_at_kill: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM tasks WHERE status IN ('pending', 'assigned', 'in_progress')",
    )
    .fetch_one(&pool)
    .await
    .expect("count live tasks");
    let assigned_at_kill = assignments(&pool).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The restart: same database, same port; nobody tells it anything.
    let second = Server::start("s1-kill-second", &env).await;
    let ready = Instant::now();
    let routed_again = wait_for(Duration::from_secs(30), || async {
        (assignments(&pool).await > assigned_at_kill).then(Instant::now)
    })
    .await
    .expect("routing resumed after the restart");

    tokio::time::sleep(Duration::from_secs(4)).await;
    let produced = producer.finish().await;
    let produced_for = load_started.elapsed();
    let acked = produced.acked();
    let task_ids: Vec<i32> = acked.iter().map(|(_, id)| *id).collect();
    let unfinished = drain(&pool, &task_ids, Duration::from_secs(60)).await;
    let drained = Instant::now();

    let traces: Vec<_> = acked.iter().map(|(t, _)| *t).collect();
    let findings = invariants::check_database(&pool, &traces).await;
    let completed = invariants::completed(&pool, &task_ids).await;
    let errors = api.server_errors(None);
    let mut figures = Figures::new("s1_kill_9");
    figures.tasks_created = acked.len();
    figures.tasks_lost = findings.lost() + unfinished.len();
    figures.tasks_duplicated = findings.duplicated() + fleet.completed_twice().len();
    figures.recover_seconds = Some(secs(routed_again - killed));
    figures.server_errors_5xx = errors.len() as u64;
    figures.note("rate_asked_per_second", rate());
    figures.note(
        "rate_acknowledged_per_second",
        acked.len() as f64 / produced_for.as_secs_f64(),
    );
    figures.note("tasks_live_at_kill", live_at_kill);
    figures.note("down_seconds_kill_to_ready", secs(ready - killed));
    figures.note(
        "ready_to_first_assignment_seconds",
        secs(routed_again - ready),
    );
    figures.note("completed", completed);
    figures.note("drain_seconds_after_load", secs(drained - killed));
    figures.note("gave_up_creations", produced.gave_up().len());
    figures.note("executed_more_than_once", fleet.executed_more_than_once());
    figures.note("answers_by_status", api.by_status());
    figures.note(
        "patch_409_first_attempt_had_won",
        fleet
            .already_done
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    figures.note("panics", first.panics() + second.panics());
    figures.report();

    findings.assert_clean();
    assert!(
        unfinished.is_empty(),
        "tasks never finished: {unfinished:?}"
    );
    assert_eq!(completed, task_ids.len(), "every task completed");
    assert!(
        produced.gave_up().is_empty(),
        "creations never acknowledged: {:?}",
        produced.gave_up()
    );
    assert!(fleet.completed_twice().is_empty());
    // A 503 is the pool shedding load (the restart meets every client's retry at once);
    // any other 5xx is a defect.
    let not_503: Vec<_> = errors.iter().filter(|e| e.status != Some(503)).collect();
    assert!(
        not_503.is_empty(),
        "5xx answers other than 503: {not_503:?}"
    );
    assert_eq!(
        first.panics() + second.panics(),
        0,
        "{}",
        second.stderr_text()
    );
    fleet.stop();
    drop(second);
    pool.close().await;
    drop(db);
}
