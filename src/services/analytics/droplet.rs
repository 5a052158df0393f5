//! `GET /metrics/droplets/{droplet_id}/performance`: a droplet's finished work and uptime.

use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use super::rollups;
use super::{rate, reading, TimeRange};

struct DropletWork {
    completed: i64,
    failed: i64,
    mean_duration_seconds: Option<f64>,
    p95_duration_seconds: Option<f64>,
}

struct Uptime {
    heartbeats: i64,
    covered_seconds: Option<f64>,
    observed_seconds: Option<f64>,
}

/// A droplet's finished work in a window and its uptime.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DropletWorkReport {
    pub time_range: &'static str,
    pub tasks_completed: i64,
    pub tasks_failed: i64,
    pub success_rate: Option<f64>,
    pub mean_duration_seconds: Option<f64>,
    pub p95_duration_seconds: Option<f64>,
    pub uptime: UptimeReport,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct UptimeReport {
    /// Covered over observed seconds; null before any time was observed.
    pub ratio: Option<f64>,
    pub heartbeats: i64,
    pub covered_seconds: f64,
    pub observed_seconds: f64,
}

/// A droplet's finished work in the range (by `completed_at`), and its uptime: each healthy
/// heartbeat covers the time until the next one, at most `heartbeat_timeout` seconds; the
/// ratio is covered time over the part of the range since the droplet was first registered.
pub async fn droplet_performance(
    db: &PgPool,
    internal_id: i32,
    range: TimeRange,
    heartbeat_timeout: u64,
) -> Result<DropletWorkReport, sqlx::Error> {
    let mut tx = reading(db).await?;
    // The finished work from the droplet's kept rollups; the p95 from its tasks while the
    // window holds few.
    let kept = rollups::window(&mut tx, range.seconds(), &rollups::of_droplet(internal_id)).await?;
    let (completed, failed) = (kept.count("completed"), kept.count("failed"));
    let p95_duration_seconds = if completed + failed < rollups::EXACT_BELOW {
        exact_work(&mut tx, internal_id, range)
            .await?
            .p95_duration_seconds
    } else {
        kept.durations("run").p95_seconds
    };
    let work = DropletWork {
        completed,
        failed,
        mean_duration_seconds: kept.mean("run"),
        p95_duration_seconds,
    };
    let uptime = sqlx::query_as!(
        Uptime,
        r#"WITH since AS (
            SELECT GREATEST(NOW()::timestamp - make_interval(secs => $2),
                            COALESCE(registered_at, NOW()::timestamp - make_interval(secs => $2))) AS t
            FROM droplets WHERE id = $1
         ), beats AS (
            SELECT received_at, lower(status) IN ('active', 'healthy', 'ok') AS healthy,
                   LEAD(received_at) OVER (ORDER BY received_at, id) AS next_at
            FROM heartbeats
            WHERE droplet_id = $1 AND received_at >= (SELECT t FROM since)
         )
         SELECT COUNT(*) AS "heartbeats!",
                COALESCE(SUM(date_part('epoch',
                    LEAST(COALESCE(next_at, NOW()::timestamp), NOW()::timestamp,
                          received_at + make_interval(secs => $3)) - received_at))
                    FILTER (WHERE healthy), 0) AS covered_seconds,
                date_part('epoch', NOW()::timestamp - (SELECT t FROM since)) AS observed_seconds
         FROM beats"#,
        internal_id,
        range.seconds(),
        heartbeat_timeout as f64
    )
    .fetch_one(&mut *tx)
    .await?;
    let covered = uptime.covered_seconds.unwrap_or(0.0).max(0.0);
    let observed = uptime.observed_seconds.unwrap_or(0.0);
    let ratio = (observed > 0.0).then(|| (covered / observed).clamp(0.0, 1.0));
    tx.commit().await?;
    Ok(DropletWorkReport {
        time_range: range.as_str(),
        tasks_completed: work.completed,
        tasks_failed: work.failed,
        success_rate: rate(work.completed, work.completed + work.failed),
        mean_duration_seconds: work.mean_duration_seconds,
        p95_duration_seconds: work.p95_duration_seconds,
        uptime: UptimeReport {
            ratio,
            heartbeats: uptime.heartbeats,
            covered_seconds: covered,
            observed_seconds: observed,
        },
    })
}

/// The droplet's finished work in the range, from its tasks (through `assigned_droplet_id`).
async fn exact_work(
    conn: &mut PgConnection,
    internal_id: i32,
    range: TimeRange,
) -> Result<DropletWork, sqlx::Error> {
    sqlx::query_as!(
        DropletWork,
        r#"SELECT COUNT(*) FILTER (WHERE status = 'completed') AS "completed!",
                COUNT(*) FILTER (WHERE status = 'failed') AS "failed!",
                AVG(d) AS mean_duration_seconds,
                percentile_cont(0.95) WITHIN GROUP (ORDER BY d) AS p95_duration_seconds
         FROM (SELECT status,
                      CASE WHEN status = 'completed' THEN date_part('epoch', completed_at - started_at) END AS d
               FROM tasks
               WHERE assigned_droplet_id = $1 AND status IN ('completed', 'failed')
                 AND completed_at >= NOW() - make_interval(secs => $2)) s"#,
        internal_id,
        range.seconds()
    )
    .fetch_one(conn)
    .await
}
