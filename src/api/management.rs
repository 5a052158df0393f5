//! Admin operations: the scheduler's jobs, live configuration reload, graceful shutdown,
//! emergency stop and cache clearing. Admin only, enveloped (`GET /management/version`,
//! public, lives with the health endpoints).

use axum::extract::State;
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::{Caller, Permission};
use crate::error::{ApiError, ApiResult};
use crate::jobs::{self, JobId, JobInfo};
use crate::services::config_reload::{self, Reload, ReloadError};
use crate::services::registry_client;
use crate::state::AppState;
use crate::udc::{PathParam, RawBody, Udc};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/management/scheduler/jobs", get(list_jobs))
        .route("/management/scheduler/jobs/{job_id}/pause", post(pause_job))
        .route(
            "/management/scheduler/jobs/{job_id}/resume",
            post(resume_job),
        )
        .route("/management/reload-config", post(reload_config))
        .route("/management/shutdown", post(shutdown))
        .route("/management/emergency-stop", post(emergency_stop))
        .route("/management/cache/clear", post(clear_cache))
}

/// `GET /management/scheduler/jobs`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Jobs {
    pub jobs: Vec<JobInfo>,
    pub emergency_stop: bool,
}

/// A job paused or resumed.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobChanged {
    pub job: JobInfo,
    pub emergency_stop: bool,
    /// Resuming `task_router` during an emergency stop ends the stop.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub emergency_stop_ended: Option<bool>,
    /// The jobs the stop had paused that run again with its end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jobs_resumed_with_it: Option<Vec<JobId>>,
    pub message: String,
}

/// `POST /management/reload-config`: what changed, what was applied, what waits for a restart.
#[derive(Debug, Serialize, ToSchema)]
pub struct Reloaded {
    #[serde(flatten)]
    pub report: Reload,
    pub rescheduled_jobs: Vec<JobId>,
    pub reloaded: bool,
    pub message: String,
}

/// `POST /management/shutdown`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ShuttingDown {
    pub shutting_down: bool,
    pub message: &'static str,
}

/// `POST /management/emergency-stop`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Stopped {
    pub emergency_stop: bool,
    pub paused_jobs: Vec<JobId>,
    pub message: &'static str,
}

/// `POST /management/cache/clear`.
#[derive(Debug, Serialize, ToSchema)]
pub struct CacheCleared {
    pub cleared: Cleared,
    pub message: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Cleared {
    /// Whether the router held a room snapshot to clear.
    pub router_room_snapshot: bool,
    /// Registry directory entries deleted.
    pub registry_directory: u64,
}

fn job_or_404(job_id: &str) -> ApiResult<JobId> {
    JobId::parse(job_id).ok_or_else(|| {
        let known: Vec<&str> = JobId::ALL.iter().map(|id| id.as_str()).collect();
        ApiError::not_found(format!(
            "Job {job_id} not found (jobs: {})",
            known.join(", ")
        ))
    })
}

/// The scheduled jobs: interval, paused, last run, its duration and outcome, next run.
#[utoipa::path(get, path = "/management/scheduler/jobs", tag = "management", security(("bearer" = [])),
    responses((status = 200, description = "The scheduled jobs", body = Jobs), (status = 403, description = "Admin only")))]
pub async fn list_jobs(State(state): State<AppState>, caller: Caller) -> ApiResult<Udc<Jobs>> {
    caller.require(Permission::Admin)?;
    Ok(Udc::ok(Jobs {
        jobs: state.jobs.list(),
        emergency_stop: state.emergency_stopped(),
    }))
}

/// Pauses one job; a paused `task_router` also stops the immediate routing passes.
#[utoipa::path(post, path = "/management/scheduler/jobs/{job_id}/pause", tag = "management", security(("bearer" = [])),
    params(("job_id" = String, Path, description = "health_monitor, task_router, registry_sync, heartbeat_cleanup or websocket_ping")),
    responses((status = 200, description = "Paused", body = JobChanged), (status = 403, description = "Admin only"), (status = 404, description = "Unknown job")))]
pub async fn pause_job(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(job_id): PathParam<String>,
    body: RawBody,
) -> ApiResult<Udc<JobChanged>> {
    caller.require(Permission::Admin)?;
    let id = job_or_404(&job_id)?;
    body.optional_envelope()?;
    let job = state
        .jobs
        .set_paused(&state, id, true)
        .ok_or_else(|| ApiError::not_found(format!("Job {job_id} not found")))?;
    tracing::warn!(job = id.as_str(), by = %caller.actor_name(), "job paused");
    Ok(Udc::ok(JobChanged {
        job,
        emergency_stop: state.emergency_stopped(),
        emergency_stop_ended: None,
        jobs_resumed_with_it: None,
        message: format!("Job {id} paused"),
    }))
}

/// Resumes one job.
///
/// Resuming `task_router` also ends an emergency stop: routing is what the stop halts, so
/// turning it back on means the stop is over. The stop's flag is cleared and every job the
/// stop paused runs again (a job an operator paused by hand, before or during the stop,
/// stays paused). Resuming any other job during a stop only marks that job to run again
/// once the stop ends.
#[utoipa::path(post, path = "/management/scheduler/jobs/{job_id}/resume", tag = "management", security(("bearer" = [])),
    params(("job_id" = String, Path, description = "health_monitor, task_router, registry_sync, heartbeat_cleanup or websocket_ping")),
    responses((status = 200, description = "Resumed; for task_router, an emergency stop ends", body = JobChanged), (status = 403, description = "Admin only"), (status = 404, description = "Unknown job")))]
pub async fn resume_job(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(job_id): PathParam<String>,
    body: RawBody,
) -> ApiResult<Udc<JobChanged>> {
    caller.require(Permission::Admin)?;
    let id = job_or_404(&job_id)?;
    body.optional_envelope()?;
    let ends_stop = id == JobId::TaskRouter && state.emergency_stopped();
    let resumed_by_stop_end = if ends_stop {
        state.jobs.end_emergency(&state)
    } else {
        Vec::new()
    };
    let job = state
        .jobs
        .set_paused(&state, id, false)
        .ok_or_else(|| ApiError::not_found(format!("Job {job_id} not found")))?;
    if ends_stop {
        tracing::warn!(by = %caller.actor_name(), "emergency stop ended");
    }
    tracing::info!(job = id.as_str(), by = %caller.actor_name(), "job resumed");
    Ok(Udc::ok(JobChanged {
        job,
        emergency_stop: state.emergency_stopped(),
        emergency_stop_ended: Some(ends_stop),
        jobs_resumed_with_it: Some(resumed_by_stop_end),
        message: if ends_stop {
            format!("Job {id} resumed; the emergency stop is over")
        } else {
            format!("Job {id} resumed")
        },
    }))
}

/// Re-reads the environment and `.env`, applies what can change live (job intervals, log
/// level, feature flags, rate limits, CORS origins, timeouts) and says which settings
/// changed and which wait for a restart. An invalid setting is a 422 and changes nothing.
#[utoipa::path(post, path = "/management/reload-config", tag = "management", security(("bearer" = [])),
    responses((status = 200, description = "What changed, what was applied, what needs a restart", body = Reloaded), (status = 403, description = "Admin only"),
              (status = 422, description = "A setting is invalid; nothing changed")))]
pub async fn reload_config(
    State(state): State<AppState>,
    caller: Caller,
    body: RawBody,
) -> ApiResult<Udc<Reloaded>> {
    caller.require(Permission::Admin)?;
    // The body is read after the permission check: 403 before any 422.
    body.optional_envelope()?;
    let report = config_reload::reload(
        &state.settings,
        &state.config_source,
        &state.events,
        |level| state.log.set_level(level),
    )
    .map_err(|e| match e {
        ReloadError::Invalid(e) => {
            ApiError::invalid(&["env", e.variable], e.message, "value_error")
        }
        ReloadError::Apply(e) => ApiError::internal(format!("reload-config: {e}")),
    })?;
    // New intervals take effect: each job whose interval changed is rescheduled.
    let rescheduled_jobs = jobs::reschedule(&state)
        .await
        .map_err(|e| ApiError::internal(format!("reload-config: {e}")))?;
    tracing::warn!(by = %caller.actor_name(), applied = ?report.applied,
        restart_required = ?report.restart_required, "configuration reloaded");
    let message = match (
        report.changed.is_empty(),
        report.restart_required.is_empty(),
    ) {
        (true, _) => "Configuration reloaded; nothing changed".to_string(),
        (false, true) => "Configuration reloaded; every change applied".to_string(),
        (false, false) => format!(
            "Configuration reloaded; {} need a restart",
            report.restart_required.join(", ")
        ),
    };
    Ok(Udc::ok(Reloaded {
        report,
        rescheduled_jobs,
        reloaded: true,
        message,
    }))
}

/// Graceful shutdown, as SIGTERM: no new connections, in-flight requests finish, WebSockets
/// close with 1001, the jobs stop, the pool closes.
#[utoipa::path(post, path = "/management/shutdown", tag = "management", security(("bearer" = [])),
    responses((status = 200, description = "Shutting down", body = ShuttingDown), (status = 403, description = "Admin only")))]
pub async fn shutdown(
    State(state): State<AppState>,
    caller: Caller,
    body: RawBody,
) -> ApiResult<Udc<ShuttingDown>> {
    caller.require(Permission::Admin)?;
    // The body is read after the permission check: 403 before any 422.
    body.optional_envelope()?;
    tracing::warn!(by = %caller.actor_name(), "shutdown requested");
    let token = state.shutdown.clone();
    // Cancelled from another task once this one has yielded: the graceful shutdown lets this
    // request, in flight by then, finish sending its answer.
    tokio::spawn(async move {
        tokio::task::yield_now().await;
        token.cancel();
    });
    Ok(Udc::ok(ShuttingDown {
        shutting_down: true,
        message: "Graceful shutdown started: in-flight requests finish, then the process exits",
    }))
}

/// Stops routing and dispatch at once and pauses every job. Reads keep working, `POST
/// /tasks` still records tasks as pending, `/health` says `maintenance`. Resuming
/// `task_router` ends the stop (see the resume endpoint).
#[utoipa::path(post, path = "/management/emergency-stop", tag = "management", security(("bearer" = [])),
    responses((status = 200, description = "Stopped", body = Stopped), (status = 403, description = "Admin only")))]
pub async fn emergency_stop(
    State(state): State<AppState>,
    caller: Caller,
    body: RawBody,
) -> ApiResult<Udc<Stopped>> {
    caller.require(Permission::Admin)?;
    // The body is read after the permission check: 403 before any 422.
    body.optional_envelope()?;
    let paused = state.jobs.emergency_stop(&state);
    tracing::warn!(by = %caller.actor_name(), jobs = ?paused, "EMERGENCY STOP: routing and dispatch halted");
    Ok(Udc::ok(Stopped {
        emergency_stop: true,
        paused_jobs: paused,
        message: "Routing and dispatch stopped and every job paused; reads and task creation keep working. \
                  Resume task_router (POST /management/scheduler/jobs/task_router/resume) to end the stop.",
    }))
}

/// Clears the in-memory caches (the router's room snapshot behind
/// `estimated_assignment_seconds`) and the Registry directory cached in the database (the
/// next `registry_sync` fills it again); answers what was cleared.
#[utoipa::path(post, path = "/management/cache/clear", tag = "management", security(("bearer" = [])),
    responses((status = 200, description = "What was cleared", body = CacheCleared), (status = 403, description = "Admin only")))]
pub async fn clear_cache(
    State(state): State<AppState>,
    caller: Caller,
    body: RawBody,
) -> ApiResult<Udc<CacheCleared>> {
    caller.require(Permission::Admin)?;
    // The body is read after the permission check: 403 before any 422.
    body.optional_envelope()?;
    let router_snapshot = state.router.clear_room();
    // A pass rebuilds the snapshot at once (when routing runs).
    state.router.trigger();
    let registry_entries = registry_client::Registry::from(&state.core)
        .clear_cache()
        .await?;
    tracing::info!(by = %caller.actor_name(), registry_entries, "caches cleared");
    Ok(Udc::ok(CacheCleared {
        cleared: Cleared {
            router_room_snapshot: router_snapshot,
            registry_directory: registry_entries,
        },
        message: format!(
            "Caches cleared: router room snapshot, {registry_entries} Registry directory entries"
        ),
    }))
}
