//! The system's state in one place: the live task and droplet counts (`/state`, `/message`'s
//! `system_status`) and the health report of `/metrics/system/health` (the database's round
//! trip and pool, the jobs, the event listener, the Registry), with the rule that decides
//! healthy, degraded or maintenance.

use std::time::Instant;

use serde::Serialize;
use sqlx::PgPool;

use crate::protocol::now_iso;
use crate::services::core::{EmergencyStop, Settings};
use crate::services::events::{EventHub, WsStats};
use crate::services::registry_status::{RegistrySnapshot, RegistryStatus};
use crate::services::router_trigger::RouterTrigger;
use crate::services::Core;
use crate::system::ProcessSample;

/// Live tasks and droplets.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct LiveCounts {
    pub tasks_pending: i64,
    pub tasks_assigned: i64,
    pub tasks_in_progress: i64,
    pub tasks_active: i64,
    pub droplets_active: i64,
    pub droplets_total: i64,
}

pub async fn counts(db: &PgPool) -> Result<LiveCounts, sqlx::Error> {
    let c = sqlx::query!(
        r#"SELECT (SELECT COUNT(*) FROM tasks WHERE status = 'pending') AS "pending!",
                  (SELECT COUNT(*) FROM tasks WHERE status = 'assigned') AS "assigned!",
                  (SELECT COUNT(*) FROM tasks WHERE status = 'in_progress') AS "in_progress!",
                  (SELECT COUNT(*) FROM droplets WHERE status = 'active') AS "droplets_active!",
                  (SELECT COUNT(*) FROM droplets) AS "droplets_total!""#
    )
    .fetch_one(db)
    .await?;
    Ok(LiveCounts {
        tasks_pending: c.pending,
        tasks_assigned: c.assigned,
        tasks_in_progress: c.in_progress,
        tasks_active: c.assigned + c.in_progress,
        droplets_active: c.droplets_active,
        droplets_total: c.droplets_total,
    })
}

/// Tasks per status (from the counts kept as changes happen: a handful of rows, whatever
/// the size of the table) and droplets per status.
pub async fn by_status(db: &PgPool) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT 'task' AS "kind!", status AS "status!", SUM(n)::bigint AS "n!"
           FROM task_counts GROUP BY status
           UNION ALL
           SELECT 'droplet', status, COUNT(*) FROM droplets GROUP BY status"#
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| (r.kind, r.status, r.n)).collect())
}

/// What the report needs from above the services: the ids of the scheduler's jobs whose
/// last run failed (the jobs themselves are shown beside the report, by the edge) and the
/// process's figures.
pub struct Outside {
    pub failed_jobs: Vec<String>,
    pub process: ProcessSample,
    pub uptime_seconds: u64,
}

/// `/metrics/system/health` (the edge adds the jobs beside it).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HealthReport {
    /// `healthy`, `degraded` (see `problems`) or `maintenance` (an emergency stop).
    #[schema(example = "healthy")]
    pub status: &'static str,
    pub problems: Vec<String>,
    pub database: DatabaseHealth,
    pub router_paused: bool,
    pub emergency_stopped: bool,
    pub websocket: WsStats,
    pub registry: RegistrySnapshot,
    pub process: ProcessHealth,
    #[schema(format = DateTime)]
    pub generated_at: String,
}

/// The database as this process reaches it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DatabaseHealth {
    /// `ok` or `unreachable`.
    #[schema(example = "ok")]
    pub status: &'static str,
    /// Of a `SELECT 1`.
    pub round_trip_ms: f64,
    pub pool: PoolUsage,
    /// Why it is unreachable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// This process's connection pool.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PoolUsage {
    pub size: u32,
    pub idle: u32,
    pub in_use: u32,
    pub max: u32,
    /// `in_use / max`.
    pub usage: f64,
}

/// This process's figures.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProcessHealth {
    pub cpu_percent: f32,
    pub memory_mb: f64,
    pub num_threads: usize,
    pub uptime_seconds: u64,
}

/// What the health report reads of the shared parts: the pool (and its figures), the
/// settings, the event hub's figures, the Registry's status, the router's trigger and the
/// emergency stop.
#[derive(Clone, Copy)]
pub struct Health<'a> {
    db: &'a PgPool,
    settings: &'a Settings,
    events: &'a EventHub,
    registry: &'a RegistryStatus,
    router: &'a RouterTrigger,
    stop: &'a EmergencyStop,
}

impl Core {
    /// The parts the health report reads ([`health_report`]).
    pub fn health(&self) -> Health<'_> {
        Health {
            db: &self.db,
            settings: &self.settings,
            events: &self.events,
            registry: &self.registry,
            router: &self.router,
            stop: &self.emergency_stop,
        }
    }
}

/// `/metrics/system/health`: `maintenance` during an emergency stop, `healthy` with no
/// problem, else `degraded` with the problems named.
pub async fn health_report(core: Health<'_>, outside: Outside) -> HealthReport {
    let config = core.settings.current();
    let mut problems: Vec<String> = Vec::new();

    let started = Instant::now();
    let ping = sqlx::query_scalar!(r#"SELECT 1 AS "one!""#)
        .fetch_one(core.db)
        .await;
    let round_trip_ms = started.elapsed().as_secs_f64() * 1000.0;
    let size = core.db.size();
    let idle = core.db.num_idle() as u32;
    let max = config.pool_max_connections();
    let in_use = size.saturating_sub(idle);
    let mut database = DatabaseHealth {
        status: "ok",
        round_trip_ms: (round_trip_ms * 1000.0).round() / 1000.0,
        pool: PoolUsage {
            size,
            idle,
            in_use,
            max,
            usage: if max > 0 {
                f64::from(in_use) / f64::from(max)
            } else {
                0.0
            },
        },
        error: None,
    };
    if let Err(e) = ping {
        database.status = "unreachable";
        database.error = Some(e.to_string());
        problems.push("database unreachable".into());
    }
    for id in &outside.failed_jobs {
        problems.push(format!("job {id} failed its last run"));
    }
    let websocket = core.events.stats();
    if !websocket.listener.connected {
        problems.push("event listener not connected".into());
    }
    let registry = core.registry.snapshot();
    if registry.status == "disconnected" {
        problems.push("registry disconnected".into());
    }
    let status = if core.stop.is_on() {
        "maintenance"
    } else if problems.is_empty() {
        "healthy"
    } else {
        "degraded"
    };
    let sample = outside.process;
    HealthReport {
        status,
        problems,
        database,
        router_paused: core.router.is_paused(),
        emergency_stopped: core.stop.is_on(),
        websocket,
        registry,
        process: ProcessHealth {
            cpu_percent: (sample.cpu_percent * 10.0).round() / 10.0,
            memory_mb: (sample.memory_mb * 10.0).round() / 10.0,
            num_threads: sample.num_threads,
            uptime_seconds: outside.uptime_seconds,
        },
        generated_at: now_iso(),
    }
}
