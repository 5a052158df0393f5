//! `GET /metrics/summary`: tasks and droplets by status, the last hour and day, and latencies.

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use super::rollups::{self, Rollup};
use super::{by_status, rate, reading, Durations};
use crate::protocol;
use crate::services::state_machine::ALL_STATUSES;

/// How many, and how many in each status (every status listed, zeros included).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ByStatus {
    pub total: i64,
    pub by_status: BTreeMap<String, i64>,
}

impl ByStatus {
    fn of(rows: Vec<(String, i64)>, statuses: &[&str]) -> ByStatus {
        let by_status = by_status(rows, statuses);
        ByStatus {
            total: by_status.values().sum(),
            by_status,
        }
    }
}

/// Tasks created, completed and failed in a window.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Window {
    pub created: i64,
    pub completed: i64,
    pub failed: i64,
    /// Completed over completed and failed; null when neither.
    pub success_rate: Option<f64>,
}

impl Window {
    /// The window's tasks created, completed and failed, from its rollups.
    fn from_rollup(r: &Rollup) -> Window {
        Window::of(r.count("created"), r.count("completed"), r.count("failed"))
    }

    fn of(created: i64, completed: i64, failed: i64) -> Window {
        Window {
            created,
            completed,
            failed,
            success_rate: rate(completed, completed + failed),
        }
    }
}

/// `GET /metrics/summary`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Summary {
    pub tasks: ByStatus,
    pub droplets: ByStatus,
    /// Completed over completed and failed, over every task kept.
    pub success_rate: Option<f64>,
    pub last_hour: Window,
    pub last_24h: Window,
    pub assignment_latency: Durations,
    pub execution_time: Durations,
    pub latency_window: &'static str,
    pub generated_at: String,
}

/// Tasks and droplets by status, the last hour and day, and latencies over the last day.
pub async fn summary(db: &PgPool) -> Result<Summary, sqlx::Error> {
    let mut tx = reading(db).await?;
    // Kept as changes happen (task_counts): a handful of rows, not a million.
    let task_rows: Vec<(String, i64)> = sqlx::query!(
        r#"SELECT status AS "status!", SUM(n)::bigint AS "n!" FROM task_counts GROUP BY status"#
    )
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|r| (r.status, r.n))
    .collect();
    let droplet_rows: Vec<(String, i64)> = sqlx::query!(
        r#"SELECT status AS "status!", COUNT(*) AS "n!" FROM droplets GROUP BY status"#
    )
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|r| (r.status, r.n))
    .collect();
    // The windows from the kept rollups (a few hundred rows at any history size).
    let hour = rollups::window(&mut tx, 3600.0, rollups::SUMMARY).await?;
    let day = rollups::window(&mut tx, 86_400.0, rollups::SUMMARY).await?;
    // Few tasks in the day: their percentiles exactly, from the tasks themselves.
    let assignment = if day.count("created") < rollups::EXACT_BELOW {
        exact_assignment(&mut tx).await?
    } else {
        day.durations("assign")
    };
    let ended = day.count("completed") + day.count("failed") + day.count("cancelled");
    let execution = if ended < rollups::EXACT_BELOW {
        exact_execution(&mut tx).await?
    } else {
        day.durations("run")
    };

    let statuses: Vec<&str> = ALL_STATUSES.iter().map(|s| s.as_str()).collect();
    let tasks = ByStatus::of(task_rows, &statuses);
    let droplets = ByStatus::of(droplet_rows, &["active", "inactive", "error"]);
    let completed = tasks.by_status.get("completed").copied().unwrap_or(0);
    let failed = tasks.by_status.get("failed").copied().unwrap_or(0);
    tx.commit().await?;
    Ok(Summary {
        tasks,
        droplets,
        success_rate: rate(completed, completed + failed),
        last_hour: Window::from_rollup(&hour),
        last_24h: Window::from_rollup(&day),
        assignment_latency: assignment,
        execution_time: execution,
        latency_window:
            "24h: assignment over tasks created in it, execution over tasks completed in it",
        generated_at: protocol::now_iso(),
    })
}

/// Assignment latency of the tasks created in the last day, from the tasks (the window's
/// few rows, through the `created_at` index).
async fn exact_assignment(conn: &mut PgConnection) -> Result<Durations, sqlx::Error> {
    sqlx::query_as!(
        Durations,
        r#"SELECT COUNT(d) AS "count!", AVG(d) AS mean_seconds,
                (percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY d))[1] AS p50_seconds,
                (percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY d))[2] AS p95_seconds,
                MAX(d) AS max_seconds
         FROM (SELECT date_part('epoch', assigned_at - created_at) AS d
               FROM tasks WHERE created_at >= NOW() - interval '24 hours' AND assigned_at IS NOT NULL) s"#
    )
    .fetch_one(conn)
    .await
}

/// Run time of the tasks completed in the last day, from the tasks (through the
/// `completed_at` index).
async fn exact_execution(conn: &mut PgConnection) -> Result<Durations, sqlx::Error> {
    sqlx::query_as!(
        Durations,
        r#"SELECT COUNT(d) AS "count!", AVG(d) AS mean_seconds,
                (percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY d))[1] AS p50_seconds,
                (percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY d))[2] AS p95_seconds,
                MAX(d) AS max_seconds
         FROM (SELECT date_part('epoch', completed_at - started_at) AS d
               FROM tasks WHERE completed_at >= NOW() - interval '24 hours'
                 AND status = 'completed' AND started_at IS NOT NULL) s"#
    )
    .fetch_one(conn)
    .await
}
