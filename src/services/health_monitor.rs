//! The health monitor: active droplets silent for longer than `HEARTBEAT_TIMEOUT` (by the
//! database's clock) become inactive, with their events, and their work is recovered.

use serde_json::json;

use sqlx::PgPool;

use crate::config::Config;
use crate::services::droplet_row::droplet_query;
use crate::services::droplets::Droplet;
use crate::services::events::{self, DropletEventKind, Event};
use crate::services::locks::Singleton;
use crate::services::task_recovery;
use crate::services::transition::Changes;

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct HealthRound {
    pub marked_inactive: Vec<i32>,
    pub tasks_recovered: usize,
    pub skipped: bool,
}

/// One round of the `health_monitor` job.
pub async fn run_once(state: &Changes) -> Result<HealthRound, sqlx::Error> {
    let config = state.settings.current();
    let mut tx = state.db.begin().await?;
    if !Singleton::HealthRound.try_for_transaction(&mut tx).await? {
        tx.rollback().await?;
        return Ok(HealthRound {
            skipped: true,
            ..Default::default()
        });
    }
    let lost: Vec<Droplet> = droplet_query!(
        "UPDATE droplets SET status = 'inactive', updated_at = NOW()
         WHERE status = 'active'
           AND (last_heartbeat IS NULL OR last_heartbeat < NOW() - make_interval(secs => $1::double precision))
         RETURNING ",
        "",
        config.heartbeat_timeout as f64
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut evs = Vec::with_capacity(lost.len() * 2);
    for d in &lost {
        let silence = json!({
            "previous_status": "active",
            "heartbeat_timeout_seconds": config.heartbeat_timeout,
            "reason": format!("no heartbeat for more than {} s", config.heartbeat_timeout),
        });
        evs.push(Event::droplet(
            DropletEventKind::DropletHeartbeatMissed,
            d,
            Some(silence.clone()),
        ));
        evs.push(Event::droplet(
            DropletEventKind::DropletHealthChanged,
            d,
            Some(silence),
        ));
    }
    events::record(&mut tx, &evs).await?;
    tx.commit().await?;
    state.relay.committed();
    let mut round = HealthRound {
        marked_inactive: lost.iter().map(|d| d.droplet_id).collect(),
        ..Default::default()
    };
    for d in &lost {
        tracing::warn!(
            droplet_id = d.droplet_id,
            "droplet missed its heartbeats; marked inactive"
        );
    }
    if config.enable_auto_recovery {
        // Every silent droplet that is not active and still holds live tasks: the ones just
        // marked, one whose recovery did not finish (the process died between the two
        // transactions), one that reported `maintenance` and then went quiet, or one left
        // over while auto-recovery was off. Without this their running tasks would never end.
        let holders = sqlx::query!(
            "SELECT d.id, d.droplet_id FROM droplets d
             WHERE d.status <> 'active'
               AND (d.last_heartbeat IS NULL OR d.last_heartbeat < NOW() - make_interval(secs => $1::double precision))
               AND EXISTS (SELECT 1 FROM tasks t WHERE t.assigned_droplet_id = d.id
                             AND t.status IN ('assigned', 'in_progress'))
             ORDER BY d.id",
            config.heartbeat_timeout as f64
        )
        .fetch_all(&state.db)
        .await?;
        for h in holders {
            round.tasks_recovered +=
                task_recovery::recover_droplet(state, h.id, h.droplet_id).await?;
        }
    }
    Ok(round)
}

/// Finished tasks deleted per statement, so no statement holds many locks for long.
const RETENTION_BATCH: i64 = 500;
/// Batches one cleanup round runs at most (the next round goes on).
const RETENTION_BATCHES: usize = 200;

/// Finished tasks (completed, cancelled, or failed with no retry to come) older than
/// `TASK_RETENTION_DAYS` go with their history (`ON DELETE CASCADE`), in small batches whose
/// rows are taken with `SKIP LOCKED`: a task the router or a PATCH holds is left for the next
/// round, and nothing live (pending, assigned, running, or failed with a retry due) is ever
/// touched. Returns how many tasks were deleted.
pub async fn cleanup_old_tasks(db: &PgPool, config: &Config) -> Result<u64, sqlx::Error> {
    let days = config.task_retention_days;
    if days == 0 {
        return Ok(0);
    }
    let mut deleted = 0u64;
    for _ in 0..RETENTION_BATCHES {
        let n = sqlx::query!(
            "WITH doomed AS (
                SELECT id FROM tasks
                WHERE completed_at < NOW() - make_interval(days => $1::int)
                  AND (status IN ('completed', 'cancelled')
                       OR (status = 'failed' AND (COALESCE(retry_count, 0) >= COALESCE(max_retries, 3)
                                                  OR (deadline IS NOT NULL AND deadline <= NOW()))))
                ORDER BY completed_at
                LIMIT $2
                FOR UPDATE SKIP LOCKED
             )
             DELETE FROM tasks WHERE id IN (SELECT id FROM doomed)",
            days as i32,
            RETENTION_BATCH
        )
        .execute(db)
        .await?
        .rows_affected();
        deleted += n;
        if (n as i64) < RETENTION_BATCH {
            break;
        }
    }
    if deleted > 0 {
        tracing::info!(
            deleted,
            days,
            "finished tasks past their retention deleted with their history"
        );
    }
    Ok(deleted)
}

/// One round of the `heartbeat_cleanup` job: heartbeats older than the retention go.
pub async fn cleanup_old_heartbeats(db: &PgPool, config: &Config) -> Result<u64, sqlx::Error> {
    let days = config.heartbeat_retention_days;
    let mut tx = db.begin().await?;
    if !Singleton::HeartbeatCleanup
        .try_for_transaction(&mut tx)
        .await?
    {
        tx.rollback().await?;
        return Ok(0);
    }
    let deleted = sqlx::query!(
        "DELETE FROM heartbeats WHERE received_at < NOW() - make_interval(days => $1::int)",
        days as i32
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    // The status counts of backends that are gone fold into shard 0 (no live backend
    // writes those rows, so nothing waits on them).
    sqlx::query!(
        "WITH gone AS (
            DELETE FROM task_counts
            WHERE shard <> 0 AND shard NOT IN (SELECT pid FROM pg_stat_activity WHERE pid IS NOT NULL)
            RETURNING *
         )
         INSERT INTO task_counts AS c (task_type, status, shard, n, retries, run_seconds, runs)
         SELECT task_type, status, 0, SUM(n), SUM(retries), SUM(run_seconds), SUM(runs)
         FROM gone GROUP BY task_type, status ORDER BY task_type, status
         ON CONFLICT (task_type, status, shard) DO UPDATE
            SET n = c.n + EXCLUDED.n, retries = c.retries + EXCLUDED.retries,
                run_seconds = c.run_seconds + EXCLUDED.run_seconds, runs = c.runs + EXCLUDED.runs",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(deleted)
}
