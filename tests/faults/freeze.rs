//! Scenario 4: a droplet freezes mid-task (no heartbeats, no answers, no PATCHes), its
//! work goes elsewhere, then it comes back and PATCHes its old tasks: every late PATCH is a
//! 403 and changes nothing.

use std::time::{Duration, Instant};

use crate::fleet::{Api, Fleet, Producer};
use crate::harness::*;
use crate::invariants;

const FROZEN: i32 = 1401;

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct Snapshot {
    id: i32,
    status: String,
    assigned_droplet_id: Option<i32>,
    retry_count: Option<i32>,
    history: i64,
}

async fn snapshot(pool: &sqlx::PgPool, ids: &[i32]) -> Vec<Snapshot> {
    sqlx::query_as(
        "SELECT t.id, t.status, t.assigned_droplet_id, t.retry_count,
                (SELECT COUNT(*) FROM task_state_history h WHERE h.task_id = t.id) AS history
         FROM tasks t WHERE t.id = ANY($1) ORDER BY t.id",
    )
    .bind(ids)
    .fetch_all(pool)
    .await
    .expect("snapshot")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "slow fault scenario: cargo test --test faults -- --include-ignored --test-threads 1"]
async fn a_frozen_droplet_loses_its_tasks_and_its_late_patches_are_refused() {
    let (db, url) = fresh_database().await;
    let mut env = base_env(&url, free_port());
    env.push(("HEARTBEAT_TIMEOUT".into(), "3".into()));
    let server = Server::start("s4-freeze", &env).await;
    let pool = pool(&url).await;
    let api = Api::new(vec![server.base.clone()]);
    // Long work, so the frozen droplet is in the middle of several tasks.
    let fleet = Fleet::start(
        api.clone(),
        &[1401, 1402, 1403],
        &["a"],
        Duration::from_millis(1500),
        Duration::from_secs(1),
    )
    .await;
    let producer = Producer::start(api.clone(), 1402, 20.0, &["a"], None);
    tokio::time::sleep(Duration::from_secs(3)).await;

    let frozen = fleet.droplet(FROZEN);
    let internal: i32 = sqlx::query_scalar("SELECT id FROM droplets WHERE droplet_id = $1")
        .bind(FROZEN)
        .fetch_one(&pool)
        .await
        .expect("frozen droplet row");
    frozen.freeze();
    let froze = Instant::now();
    // PATCHes it sent just before freezing land first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held: Vec<(i32, String)> = sqlx::query_as(
        "SELECT id, status FROM tasks WHERE assigned_droplet_id = $1
           AND status IN ('assigned', 'in_progress') ORDER BY id",
    )
    .bind(internal)
    .fetch_all(&pool)
    .await
    .expect("tasks of the frozen droplet");
    let held_ids: Vec<i32> = held.iter().map(|(id, _)| *id).collect();
    let running_ids: Vec<i32> = held
        .iter()
        .filter(|(_, s)| s == "in_progress")
        .map(|(id, _)| *id)
        .collect();
    let running = running_ids.len();
    assert!(
        running > 0,
        "the droplet was not mid-task when it froze: {held:?}"
    );

    // Its tasks go elsewhere and finish there.
    let inactive = wait_for(Duration::from_secs(20), || async {
        let s: String = sqlx::query_scalar("SELECT status FROM droplets WHERE id = $1")
            .bind(internal)
            .fetch_one(&pool)
            .await
            .ok()?;
        (s == "inactive").then(Instant::now)
    })
    .await
    .expect("the frozen droplet is marked inactive");
    let rehomed = wait_for(Duration::from_secs(40), || async {
        let left: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM tasks WHERE id = ANY($1)
               AND NOT (status = 'completed' AND assigned_droplet_id <> $2)",
        )
        .bind(&held_ids)
        .bind(internal)
        .fetch_one(&pool)
        .await
        .ok()?;
        (left == 0).then(Instant::now)
    })
    .await
    .expect("every task of the frozen droplet completed on another droplet");
    let retried: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM tasks WHERE id = ANY($1) AND retry_count = 1")
            .bind(&held_ids)
            .fetch_one(&pool)
            .await
            .expect("retried");

    // It comes back and PATCHes what it was doing.
    let before = snapshot(&pool, &held_ids).await;
    frozen.thaw();
    let late = wait_for(Duration::from_secs(30), || async {
        let late = frozen.late.lock().map(|l| l.clone()).unwrap_or_default();
        let answered: std::collections::HashSet<i32> = late.iter().map(|(t, _, _)| *t).collect();
        // Every task it had in hand when it froze has been PATCHed late. (Not "nothing in
        // hand": once thawed it heartbeats, is active again and takes new work, so its hands
        // may never be empty at the moment this looks.)
        running_ids
            .iter()
            .all(|t| answered.contains(t))
            .then_some(late)
    })
    .await
    .expect("the thawed droplet PATCHed its old tasks");
    let after = snapshot(&pool, &held_ids).await;

    tokio::time::sleep(Duration::from_secs(2)).await;
    let produced = producer.finish().await;
    let acked = produced.acked();
    let task_ids: Vec<i32> = acked.iter().map(|(_, id)| *id).collect();
    let unfinished = drain(&pool, &task_ids, Duration::from_secs(60)).await;
    let traces: Vec<_> = acked.iter().map(|(t, _)| *t).collect();
    let findings = invariants::check_database(&pool, &traces).await;
    let errors = api.server_errors(None);
    let old_task_patches: Vec<_> = late
        .iter()
        .filter(|(t, _, _)| held_ids.contains(t))
        .collect();

    let mut figures = Figures::new("s4_frozen_droplet");
    figures.tasks_created = acked.len();
    figures.tasks_lost = findings.lost() + unfinished.len();
    figures.tasks_duplicated = findings.duplicated() + fleet.completed_twice().len();
    figures.recover_seconds = Some(secs(rehomed - froze));
    figures.server_errors_5xx = errors.len() as u64;
    figures.note("held_at_freeze_assigned", held.len() - running);
    figures.note("held_at_freeze_in_progress", running);
    figures.note("freeze_to_inactive_seconds", secs(inactive - froze));
    figures.note("retried_with_retry_count_1", retried);
    figures.note("late_patches", &late);
    figures.note(
        "late_patches_not_403",
        old_task_patches
            .iter()
            .filter(|(_, _, s)| *s != Some(403))
            .count(),
    );
    figures.note(
        "rows_changed_by_late_patches",
        before.iter().zip(&after).filter(|(a, b)| a != b).count(),
    );
    figures.note("answers_by_status", api.by_status());
    figures.note("panics", server.panics());
    figures.report();

    findings.assert_clean();
    assert!(
        unfinished.is_empty(),
        "tasks never finished: {unfinished:?}"
    );
    assert!(!old_task_patches.is_empty(), "no late PATCH was sent");
    for (task, status, answer) in &old_task_patches {
        assert_eq!(*answer, Some(403), "late PATCH of task {task} to {status}");
    }
    assert_eq!(before, after, "a late PATCH changed a task");
    assert_eq!(
        retried as usize, running,
        "each running task was retried once elsewhere"
    );
    assert!(errors.iter().all(|e| e.status == Some(503)), "{errors:?}");
    assert_eq!(server.panics(), 0, "{}", server.stderr_text());
    fleet.stop();
    drop(server);
    pool.close().await;
    drop(db);
}
