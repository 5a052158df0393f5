//! The SQL behind `/metrics/*`: counts, rates and duration percentiles computed in
//! PostgreSQL over indexed columns (`created_at`, `completed_at`, `status`, the partial
//! pending index, `heartbeats (droplet_id, received_at)`), so they stay fast at a million tasks.

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::{PgPool, Postgres, Transaction};

use crate::protocol;
use crate::services::state_machine::ALL_STATUSES;
use crate::validation::FieldError;
use crate::validation::Validate;

/// The windows the metrics endpoints accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeRange {
    Hour,
    Day,
    Week,
    Month,
}

impl TimeRange {
    pub const ALLOWED: &'static str = "'1h', '24h', '7d' or '30d'";

    /// How long the window is, in days.
    pub fn days(self) -> f64 {
        match self {
            TimeRange::Hour => 1.0 / 24.0,
            TimeRange::Day => 1.0,
            TimeRange::Week => 7.0,
            TimeRange::Month => 30.0,
        }
    }

    pub fn parse(raw: &str) -> Option<TimeRange> {
        Some(match raw {
            "1h" => TimeRange::Hour,
            "24h" => TimeRange::Day,
            "7d" => TimeRange::Week,
            "30d" => TimeRange::Month,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TimeRange::Hour => "1h",
            TimeRange::Day => "24h",
            TimeRange::Week => "7d",
            TimeRange::Month => "30d",
        }
    }

    pub fn seconds(self) -> f64 {
        match self {
            TimeRange::Hour => 3600.0,
            TimeRange::Day => 86_400.0,
            TimeRange::Week => 7.0 * 86_400.0,
            TimeRange::Month => 30.0 * 86_400.0,
        }
    }
}

/// `time_range` (and for task metrics `task_type`) of a metrics request.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RangeParams {
    /// 1h, 24h, 7d or 30d.
    pub time_range: Option<String>,
    /// Only tasks of this type.
    pub task_type: Option<String>,
}

impl RangeParams {
    /// The range asked for, or `default` (validation already refused anything else).
    pub fn range_or(&self, default: TimeRange) -> TimeRange {
        self.time_range
            .as_deref()
            .and_then(TimeRange::parse)
            .unwrap_or(default)
    }
}

impl Validate for RangeParams {
    fn validate(&self) -> Vec<FieldError> {
        match self.time_range.as_deref() {
            Some(r) if TimeRange::parse(r).is_none() => vec![FieldError::new(
                &["time_range"],
                format!("Input should be {}, got {r:?}", TimeRange::ALLOWED),
                "enum",
            )],
            _ => Vec::new(),
        }
    }
}

/// Count, mean, median, 95th percentile and maximum of a duration, in seconds.
#[derive(Debug, Clone, Default, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Durations {
    pub count: i64,
    pub mean_seconds: Option<f64>,
    pub p50_seconds: Option<f64>,
    pub p95_seconds: Option<f64>,
    pub max_seconds: Option<f64>,
}

fn rate(part: i64, whole: i64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

/// Every status with its count (zeros included), from `(status, count)` rows.
fn by_status(rows: Vec<(String, i64)>, statuses: &[&str]) -> BTreeMap<String, i64> {
    let mut map: BTreeMap<String, i64> = statuses.iter().map(|s| (s.to_string(), 0)).collect();
    for (status, n) in rows {
        *map.entry(status).or_insert(0) += n;
    }
    map
}

/// A transaction with room to sort in memory: a percentile over a month of tasks sorts up
/// to a million durations, which at PostgreSQL's default 4 MB spills to disk (2-3x slower).
async fn reading(db: &PgPool) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = db.begin().await?;
    sqlx::query("SET LOCAL work_mem = '64MB'")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

// ---------------------------------------------------------------------------
// GET /metrics/summary

struct Windows {
    created_1h: i64,
    created_24h: i64,
    completed_1h: i64,
    completed_24h: i64,
    failed_1h: i64,
    failed_24h: i64,
}

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
    // created_at and completed_at are indexed: each window reads only its own rows.
    let w = sqlx::query_as!(
        Windows,
        r#"SELECT
            (SELECT COUNT(*) FROM tasks WHERE created_at >= NOW() - interval '1 hour') AS "created_1h!",
            (SELECT COUNT(*) FROM tasks WHERE created_at >= NOW() - interval '24 hours') AS "created_24h!",
            c.completed_1h AS "completed_1h!", c.completed_24h AS "completed_24h!",
            c.failed_1h AS "failed_1h!", c.failed_24h AS "failed_24h!"
         FROM (
            SELECT COUNT(*) FILTER (WHERE status = 'completed' AND completed_at >= NOW() - interval '1 hour') AS completed_1h,
                   COUNT(*) FILTER (WHERE status = 'completed') AS completed_24h,
                   COUNT(*) FILTER (WHERE status = 'failed' AND completed_at >= NOW() - interval '1 hour') AS failed_1h,
                   COUNT(*) FILTER (WHERE status = 'failed') AS failed_24h
            FROM tasks WHERE completed_at >= NOW() - interval '24 hours'
         ) c"#
    )
    .fetch_one(&mut *tx)
    .await?;
    let assignment = sqlx::query_as!(
        Durations,
        r#"SELECT COUNT(d) AS "count!", AVG(d) AS mean_seconds,
                (percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY d))[1] AS p50_seconds,
                (percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY d))[2] AS p95_seconds,
                MAX(d) AS max_seconds
         FROM (SELECT date_part('epoch', assigned_at - created_at) AS d
               FROM tasks WHERE created_at >= NOW() - interval '24 hours' AND assigned_at IS NOT NULL) s"#
    )
    .fetch_one(&mut *tx)
    .await?;
    let execution = sqlx::query_as!(
        Durations,
        r#"SELECT COUNT(d) AS "count!", AVG(d) AS mean_seconds,
                (percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY d))[1] AS p50_seconds,
                (percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY d))[2] AS p95_seconds,
                MAX(d) AS max_seconds
         FROM (SELECT date_part('epoch', completed_at - started_at) AS d
               FROM tasks WHERE completed_at >= NOW() - interval '24 hours'
                 AND status = 'completed' AND started_at IS NOT NULL) s"#
    )
    .fetch_one(&mut *tx)
    .await?;

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
        last_hour: Window::of(w.created_1h, w.completed_1h, w.failed_1h),
        last_24h: Window::of(w.created_24h, w.completed_24h, w.failed_24h),
        assignment_latency: assignment,
        execution_time: execution,
        latency_window:
            "24h: assignment over tasks created in it, execution over tasks completed in it",
        generated_at: protocol::now_iso(),
    })
}

// ---------------------------------------------------------------------------
// GET /metrics/tasks/performance

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
    // Two statements, so each has a plan that uses its index: (created_at) for every type,
    // (task_type, created_at) for one.
    let p: Performance = match task_type {
        None => performance!(
            &mut *tx,
            " WHERE created_at >= NOW() - make_interval(secs => $1)) s",
            range.seconds()
        )?,
        Some(t) => performance!(
            &mut *tx,
            " WHERE task_type = $2 AND created_at >= NOW() - make_interval(secs => $1)) s",
            range.seconds(),
            t
        )?,
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

/// Tasks per type (all of them, or those created in the range): counts by status, success
/// rate, share of all tasks, and the mean run time of the completed ones. One hash aggregate
/// over the rows; per-type percentiles would sort every row by type as well, ten times the
/// cost at a million tasks, so they are left to `/metrics/tasks/performance?task_type=`.
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
        Some(r) => type_rows!(
            sqlx::query!(
                r#"SELECT task_type, COUNT(*) AS "total!",
        COUNT(*) FILTER (WHERE status = 'pending') AS "pending!",
        COUNT(*) FILTER (WHERE status = 'assigned') AS "assigned!",
        COUNT(*) FILTER (WHERE status = 'in_progress') AS "in_progress!",
        COUNT(*) FILTER (WHERE status = 'completed') AS "completed!",
        COUNT(*) FILTER (WHERE status = 'failed') AS "failed!",
        COUNT(*) FILTER (WHERE status = 'cancelled') AS "cancelled!",
        COALESCE(SUM(retry_count), 0)::bigint AS "retries!",
        AVG(date_part('epoch', completed_at - started_at))
            FILTER (WHERE status = 'completed') AS mean_duration_seconds
    FROM tasks
    WHERE created_at >= NOW() - make_interval(secs => $1) GROUP BY task_type
    ORDER BY "total!" DESC, task_type"#,
                r.seconds()
            ),
            db
        ),
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

// ---------------------------------------------------------------------------
// GET /metrics/droplets/{droplet_id}/performance

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
    let work = sqlx::query_as!(
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
    .fetch_one(&mut *tx)
    .await?;
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

// ---------------------------------------------------------------------------
// GET /metrics/routing

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct PendingByCapability {
    /// `null`: any active droplet can take these.
    pub capability: Option<String>,
    pub pending: i64,
    pub oldest_pending_seconds: Option<f64>,
    /// Whether some active droplet has the capability.
    pub routable: bool,
}

/// Assignments in the range (from the history), assignment latency of the tasks created in
/// it, and the pending queue per capability, with what no active droplet can take.
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
    let assignments = sqlx::query_scalar!(
        r#"SELECT COUNT(*) AS "n!" FROM task_state_history
         WHERE changed_at >= NOW() - make_interval(secs => $1) AND to_status = 'assigned'"#,
        range.seconds()
    )
    .fetch_one(&mut *tx)
    .await?;
    let latency = sqlx::query_as!(
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
    .fetch_one(&mut *tx)
    .await?;
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
