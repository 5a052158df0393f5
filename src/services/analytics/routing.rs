//! `GET /metrics/routing`: assignments, assignment latency and the pending queue.

use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use super::rollups;
use super::{reading, Durations, TimeRange};

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct PendingByCapability {
    /// `null`: any active droplet can take these.
    pub capability: Option<String>,
    pub pending: i64,
    pub oldest_pending_seconds: Option<f64>,
    /// Whether some active droplet has the capability.
    pub routable: bool,
}

/// Assignments in the range (history rows, counted as they are written), assignment latency
/// of the tasks created in it, and the pending queue per capability, with what no active
/// droplet can take.
/// The routing figures the database holds (`GET /metrics/routing` adds the process's own).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RoutingReport {
    pub time_range: &'static str,
    pub assignments: i64,
    pub assignments_per_minute: f64,
    pub assignment_latency: Durations,
    pub pending_total: i64,
    pub pending_by_capability: Vec<PendingByCapability>,
    pub pending_unroutable: i64,
}

pub async fn routing(db: &PgPool, range: TimeRange) -> Result<RoutingReport, sqlx::Error> {
    let mut tx = reading(db).await?;
    // Assignments and latency from the kept rollups; the latency's percentiles from the
    // tasks themselves while the window holds few.
    let kept = rollups::window(&mut tx, range.seconds(), rollups::SUMMARY).await?;
    let assignments = kept.count("assignments");
    let latency = if kept.count("created") < rollups::EXACT_BELOW {
        exact_latency(&mut tx, range).await?
    } else {
        kept.durations("assign")
    };
    // The partial index on pending tasks makes this read only the queue.
    let pending = sqlx::query_as!(
        PendingByCapability,
        r#"WITH p AS (
            SELECT required_capability AS capability, COUNT(*) AS pending,
                   date_part('epoch', NOW()::timestamp - MIN(created_at)) AS oldest_pending_seconds
            FROM tasks WHERE status = 'pending' GROUP BY required_capability
         )
         SELECT p.capability AS "capability?", p.pending AS "pending!", p.oldest_pending_seconds,
                EXISTS (SELECT 1 FROM droplets d WHERE d.status = 'active'
                          AND (p.capability IS NULL OR d.capabilities @> jsonb_build_array(p.capability))) AS "routable!"
         FROM p ORDER BY p.pending DESC, p.capability NULLS FIRST"#
    )
    .fetch_all(&mut *tx)
    .await?;
    let total_pending: i64 = pending.iter().map(|p| p.pending).sum();
    let unroutable: i64 = pending
        .iter()
        .filter(|p| !p.routable)
        .map(|p| p.pending)
        .sum();
    let minutes = range.seconds() / 60.0;
    tx.commit().await?;
    Ok(RoutingReport {
        time_range: range.as_str(),
        assignments,
        assignments_per_minute: assignments as f64 / minutes,
        assignment_latency: latency,
        pending_total: total_pending,
        pending_by_capability: pending,
        pending_unroutable: unroutable,
    })
}

/// Assignment latency of the tasks created in the range, from the tasks (through the
/// `created_at` index).
async fn exact_latency(
    conn: &mut PgConnection,
    range: TimeRange,
) -> Result<Durations, sqlx::Error> {
    sqlx::query_as!(
        Durations,
        r#"SELECT COUNT(d) AS "count!", AVG(d) AS mean_seconds,
                (percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY d))[1] AS p50_seconds,
                (percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY d))[2] AS p95_seconds,
                MAX(d) AS max_seconds
         FROM (SELECT date_part('epoch', assigned_at - created_at) AS d
               FROM tasks WHERE created_at >= NOW() - make_interval(secs => $1)
                 AND assigned_at IS NOT NULL) s"#,
        range.seconds()
    )
    .fetch_one(conn)
    .await
}
