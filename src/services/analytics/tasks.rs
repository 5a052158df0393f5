//! `GET /metrics/tasks/performance` and `GET /metrics/tasks/by-type`: tasks created in a
//! window, by outcome and by type.

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use super::rollups;
use super::{rate, reading, Durations, TimeRange};
use crate::protocol;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Performance {
    pub total: i64,
    pub pending: i64,
    pub assigned: i64,
    pub in_progress: i64,
    pub completed: i64,
    pub failed: i64,
    pub cancelled: i64,
    /// Retries made (the sum of `retry_count`).
    pub retries: i64,
    /// Tasks retried at least once.
    pub tasks_retried: i64,
    pub duration: Durations,
}

/// [`Performance`] over the tasks `$filter` keeps (the end of the inner `FROM tasks`, closing
/// it): one literal, so that each statement is checked at compile time.
macro_rules! performance {
    ($tx:expr, $filter:literal, $($arg:expr),+) => {
        sqlx::query!(
            r#"SELECT COUNT(*) AS "total!",
        COUNT(*) FILTER (WHERE status = 'pending') AS "pending!",
        COUNT(*) FILTER (WHERE status = 'assigned') AS "assigned!",
        COUNT(*) FILTER (WHERE status = 'in_progress') AS "in_progress!",
        COUNT(*) FILTER (WHERE status = 'completed') AS "completed!",
        COUNT(*) FILTER (WHERE status = 'failed') AS "failed!",
        COUNT(*) FILTER (WHERE status = 'cancelled') AS "cancelled!",
        COALESCE(SUM(retry_count), 0)::bigint AS "retries!",
        COUNT(*) FILTER (WHERE retry_count > 0) AS "tasks_retried!",
        COUNT(d) AS "count!", AVG(d) AS mean_seconds,
        (percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY d))[1] AS p50_seconds,
        (percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY d))[2] AS p95_seconds,
        MAX(d) AS max_seconds
    FROM (SELECT status, COALESCE(retry_count, 0) AS retry_count,
                 CASE WHEN status = 'completed'
                      THEN date_part('epoch', completed_at - started_at) END AS d
          FROM tasks"# + $filter,
            $($arg),+
        )
        .fetch_one($tx)
        .await
        .map(|r| Performance {
            total: r.total,
            pending: r.pending,
            assigned: r.assigned,
            in_progress: r.in_progress,
            completed: r.completed,
            failed: r.failed,
            cancelled: r.cancelled,
            retries: r.retries,
            tasks_retried: r.tasks_retried,
            duration: Durations {
                count: r.count,
                mean_seconds: r.mean_seconds,
                p50_seconds: r.p50_seconds,
                p95_seconds: r.p95_seconds,
                max_seconds: r.max_seconds,
            },
        })
    };
}

/// Tasks by where they ended up (or are now).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Outcomes {
    pub completed: i64,
    pub failed: i64,
    pub cancelled: i64,
    pub pending: i64,
    pub assigned: i64,
    pub in_progress: i64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Retries {
    /// Retries made (the sum of `retry_count`).
    pub total: i64,
    /// Tasks retried at least once.
    pub tasks_retried: i64,
}

/// A window reaching further back than `TASK_RETENTION_DAYS` covers tasks that were deleted:
/// an answer over such a window says so (both absent without a retention).
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct RetentionNote {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention_days: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_exceeds_retention: Option<bool>,
}

impl RetentionNote {
    /// The note for a window of `range` (all time when none) under `retention_days` (0: none).
    pub fn of(retention_days: u64, range: Option<TimeRange>) -> RetentionNote {
        if retention_days == 0 {
            return RetentionNote::default();
        }
        RetentionNote {
            retention_days: Some(retention_days),
            window_exceeds_retention: Some(range.is_none_or(|r| r.days() > retention_days as f64)),
        }
    }
}

/// `GET /metrics/tasks/performance`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TaskPerformance {
    pub time_range: &'static str,
    pub task_type: Option<String>,
    pub population: &'static str,
    pub total: i64,
    pub by_outcome: Outcomes,
    pub success_rate: Option<f64>,
    /// Run time (started to completed) of the completed ones.
    pub duration: Durations,
    pub retries: Retries,
    pub generated_at: String,
    #[serde(flatten)]
    pub retention: RetentionNote,
}

/// Over the tasks created in the range (of one type, when given): counts by outcome, retries,
/// and the run time (started to completed) of the completed ones.
pub async fn performance(
    db: &PgPool,
    range: TimeRange,
    task_type: Option<&str>,
    retention: RetentionNote,
) -> Result<TaskPerformance, sqlx::Error> {
    let mut tx = reading(db).await?;
    // Counts from the kept rollups of the tasks created in the window (of the type); the
    // run time's percentiles from the tasks themselves while the window holds few.
    let key = task_type.map_or_else(|| rollups::CREATED.to_string(), rollups::of_type);
    let kept = rollups::window(&mut tx, range.seconds(), &key).await?;
    let duration = if kept.now_total() < rollups::EXACT_BELOW {
        exact(&mut tx, range, task_type).await?.duration
    } else {
        kept.durations("runc")
    };
    let p = Performance {
        total: kept.now_total(),
        pending: kept.now_in("pending"),
        assigned: kept.now_in("assigned"),
        in_progress: kept.now_in("in_progress"),
        completed: kept.now_in("completed"),
        failed: kept.now_in("failed"),
        cancelled: kept.now_in("cancelled"),
        retries: kept.sum("retries").round() as i64,
        tasks_retried: kept.count("retries"),
        duration,
    };
    tx.commit().await?;
    Ok(TaskPerformance {
        time_range: range.as_str(),
        task_type: task_type.map(str::to_string),
        population: "tasks created in the time range",
        total: p.total,
        by_outcome: Outcomes {
            completed: p.completed,
            failed: p.failed,
            cancelled: p.cancelled,
            pending: p.pending,
            assigned: p.assigned,
            in_progress: p.in_progress,
        },
        success_rate: rate(p.completed, p.completed + p.failed),
        duration: p.duration,
        retries: Retries {
            total: p.retries,
            tasks_retried: p.tasks_retried,
        },
        generated_at: protocol::now_iso(),
        retention,
    })
}

/// [`Performance`] over the tasks created in the range (of one type), from the tasks: two
/// statements, so each has a plan that uses its index, (created_at) for every type,
/// (task_type, created_at) for one.
async fn exact(
    conn: &mut PgConnection,
    range: TimeRange,
    task_type: Option<&str>,
) -> Result<Performance, sqlx::Error> {
    match task_type {
        None => performance!(
            &mut *conn,
            " WHERE created_at >= NOW() - make_interval(secs => $1)) s",
            range.seconds()
        ),
        Some(t) => performance!(
            &mut *conn,
            " WHERE task_type = $2 AND created_at >= NOW() - make_interval(secs => $1)) s",
            range.seconds(),
            t
        ),
    }
}

// ---------------------------------------------------------------------------
// GET /metrics/tasks/by-type

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct TypeRow {
    pub task_type: String,
    pub total: i64,
    pub pending: i64,
    pub assigned: i64,
    pub in_progress: i64,
    pub completed: i64,
    pub failed: i64,
    pub cancelled: i64,
    pub retries: i64,
    pub mean_duration_seconds: Option<f64>,
    #[sqlx(skip)]
    pub success_rate: Option<f64>,
    #[sqlx(skip)]
    pub share: f64,
}

/// [`TypeRow`]s from a query naming its columns (the rates are filled in afterwards).
macro_rules! type_rows {
    ($query:expr, $db:expr) => {
        $query
            .fetch_all($db)
            .await?
            .into_iter()
            .map(|r| TypeRow {
                task_type: r.task_type,
                total: r.total,
                pending: r.pending,
                assigned: r.assigned,
                in_progress: r.in_progress,
                completed: r.completed,
                failed: r.failed,
                cancelled: r.cancelled,
                retries: r.retries,
                mean_duration_seconds: r.mean_duration_seconds,
                success_rate: None,
                share: 0.0,
            })
            .collect::<Vec<TypeRow>>()
    };
}

/// Tasks per type (all of them, from `task_counts`, or those created in the range, from the
/// rollups): counts by status, success rate, share of all tasks, and the mean run time of the
/// completed ones. Per-type percentiles are left to `/metrics/tasks/performance?task_type=`.
/// `GET /metrics/tasks/by-type`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ByType {
    /// 1h, 24h, 7d, 30d, or `all`.
    pub time_range: &'static str,
    pub total: i64,
    pub types: Vec<TypeRow>,
    pub generated_at: String,
    #[serde(flatten)]
    pub retention: RetentionNote,
}

pub async fn by_type(
    db: &PgPool,
    range: Option<TimeRange>,
    retention: RetentionNote,
) -> Result<ByType, sqlx::Error> {
    let mut rows: Vec<TypeRow> = match range {
        // All time: from the counts kept as changes happen (task_counts, kept by triggers on
        // tasks), a few rows per type.
        None => type_rows!(
            sqlx::query!(
                r#"SELECT task_type, SUM(n)::bigint AS "total!",
        COALESCE(SUM(n) FILTER (WHERE status = 'pending'), 0)::bigint AS "pending!",
        COALESCE(SUM(n) FILTER (WHERE status = 'assigned'), 0)::bigint AS "assigned!",
        COALESCE(SUM(n) FILTER (WHERE status = 'in_progress'), 0)::bigint AS "in_progress!",
        COALESCE(SUM(n) FILTER (WHERE status = 'completed'), 0)::bigint AS "completed!",
        COALESCE(SUM(n) FILTER (WHERE status = 'failed'), 0)::bigint AS "failed!",
        COALESCE(SUM(n) FILTER (WHERE status = 'cancelled'), 0)::bigint AS "cancelled!",
        SUM(retries)::bigint AS "retries!",
        (SUM(run_seconds) FILTER (WHERE status = 'completed')
          / NULLIF(SUM(runs) FILTER (WHERE status = 'completed'), 0))::float8 AS mean_duration_seconds
    FROM task_counts GROUP BY task_type HAVING SUM(n) > 0
    ORDER BY "total!" DESC, task_type"#
            ),
            db
        ),
        Some(r) => types_in(db, r).await?,
    };
    let all: i64 = rows.iter().map(|r| r.total).sum();
    for r in &mut rows {
        r.success_rate = rate(r.completed, r.completed + r.failed);
        r.share = rate(r.total, all).unwrap_or(0.0);
    }
    Ok(ByType {
        time_range: range.map(|r| r.as_str()).unwrap_or("all"),
        total: all,
        types: rows,
        generated_at: protocol::now_iso(),
        retention,
    })
}

/// Per type, the tasks created in the range, from each type's kept rollups (one index range
/// per type listed in `task_counts`; `'t:' || task_type` is `rollups::of_type`).
async fn types_in(db: &PgPool, range: TimeRange) -> Result<Vec<TypeRow>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT t.task_type AS "task_type!", w.metric AS "metric!", SUM(w.n)::bigint AS "n!",
                  COALESCE(SUM(w.seconds), 0)::float8 AS "seconds!"
           FROM (SELECT task_type FROM task_counts GROUP BY task_type HAVING SUM(n) > 0) t
           CROSS JOIN LATERAL task_rollup_window($1, 't:' || t.task_type) w
           GROUP BY t.task_type, w.metric ORDER BY t.task_type"#,
        range.seconds()
    )
    .fetch_all(db)
    .await?;
    let mut by_type: BTreeMap<String, Vec<rollups::Cell>> = BTreeMap::new();
    for r in rows {
        by_type.entry(r.task_type).or_default().push(rollups::Cell {
            metric: r.metric,
            bucket: 0,
            n: r.n,
            seconds: r.seconds,
            top: None,
        });
    }
    let mut types: Vec<TypeRow> = by_type
        .into_iter()
        .map(|(task_type, cells)| {
            let kept = rollups::Rollup::of(cells);
            TypeRow {
                task_type,
                total: kept.now_total(),
                pending: kept.now_in("pending"),
                assigned: kept.now_in("assigned"),
                in_progress: kept.now_in("in_progress"),
                completed: kept.now_in("completed"),
                failed: kept.now_in("failed"),
                cancelled: kept.now_in("cancelled"),
                retries: kept.sum("retries").round() as i64,
                mean_duration_seconds: kept.mean("runc"),
                success_rate: None,
                share: 0.0,
            }
        })
        .filter(|t| t.total > 0)
        .collect();
    types.sort_by(|a, b| {
        b.total
            .cmp(&a.total)
            .then_with(|| a.task_type.cmp(&b.task_type))
    });
    Ok(types)
}
