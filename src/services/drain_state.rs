//! The end of a drain: a droplet being drained that holds no task assigned or in progress
//! any more is marked drained (`drained_at`) with a `droplet_drained` event, in the
//! transaction that took its last task away (the transition path asks, when this replica
//! knows of a drain), or in the `task_router` job's round (every drain, whichever replica
//! took it, including two last tasks ended at once in two transactions that each saw the
//! other's still running). Once only: the row's `drained_at` guards it.

use serde_json::json;
use sqlx::PgConnection;

use crate::services::droplet_row::{droplet_query, Droplet};
use crate::services::events::{self, DropletEventKind, Event};

/// Marks drained the droplets (internal ids; `None`: every droplet being drained) that hold
/// nothing more, with their events, in the caller's transaction. Returns how many.
pub async fn finish_drains(
    conn: &mut PgConnection,
    droplets: Option<&[i32]>,
) -> Result<usize, sqlx::Error> {
    let drained: Vec<Droplet> = droplet_query!(
        // A droplet row locked elsewhere (a heartbeat, a registration) is skipped, never
        // waited for: the job's round finishes its drain.
        "WITH c AS (
            SELECT id AS cid FROM droplets
            WHERE ($1::int[] IS NULL OR id = ANY($1::int[]))
              AND drain_requested_at IS NOT NULL AND drained_at IS NULL
            ORDER BY id FOR NO KEY UPDATE SKIP LOCKED
         ), up AS (
            UPDATE droplets SET drained_at = NOW(), updated_at = NOW()
            FROM c WHERE droplets.id = c.cid
              AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.assigned_droplet_id = droplets.id
                                AND t.status IN ('assigned', 'in_progress'))
            RETURNING droplets.*
         ) SELECT ",
        " FROM up ORDER BY droplet_id",
        droplets
    )
    .fetch_all(&mut *conn)
    .await?;
    let events: Vec<Event> = drained
        .iter()
        .map(|d| {
            Event::droplet(
                DropletEventKind::DropletDrained,
                d,
                Some(json!({ "reason": "drained: it holds no task assigned or in progress; it takes no new work until it registers again" })),
            )
        })
        .collect();
    events::record(conn, &events).await?;
    for d in &drained {
        tracing::info!(droplet_id = d.droplet_id, "droplet drained");
    }
    Ok(drained.len())
}
