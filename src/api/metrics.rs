//! The JSON metrics endpoints under `/metrics/...` (read permission; `ENABLE_METRICS=false`
//! turns them into 404s). The numbers come from `services::analytics`.

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::auth::{Caller, Permission};
use crate::error::{ApiError, ApiResult};
use crate::jobs::JobInfo;
use crate::services::analytics::{
    self as queries, ByType, DropletWorkReport, RangeParams, RetentionNote, RoutingReport, Summary,
    TaskPerformance, TimeRange,
};
use crate::services::droplets::{self, Load};
use crate::services::heartbeats;
use crate::services::status::DropletStatus;
use crate::services::system_status::{self, HealthReport};
use crate::state::AppState;
use crate::udc::{self, PathParam, QueryParams, Udc};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/metrics/summary", get(summary))
        .route("/metrics/tasks/performance", get(task_performance))
        .route("/metrics/tasks/by-type", get(tasks_by_type))
        .route(
            "/metrics/droplets/{droplet_id}/performance",
            get(droplet_performance),
        )
        .route("/metrics/routing", get(routing))
        .route("/metrics/system/health", get(system_health))
}

/// First extractor of every metrics handler: with `ENABLE_METRICS=false` the endpoints do
/// not exist (404), whoever asks.
pub struct MetricsEnabled;

impl FromRequestParts<AppState> for MetricsEnabled {
    type Rejection = ApiError;

    async fn from_request_parts(_: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if state.config().enable_metrics {
            Ok(MetricsEnabled)
        } else {
            Err(ApiError::not_found("Not found"))
        }
    }
}

#[utoipa::path(get, path = "/metrics/summary", tag = "metrics", security(("bearer" = [])),
    responses((status = 200, description = "Tasks and droplets by status, the last hour and day, success rate, assignment and execution latency", body = Summary),
              (status = 404, description = "ENABLE_METRICS=false")))]
pub async fn summary(
    _on: MetricsEnabled,
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Udc<Summary>> {
    caller.require(Permission::Read)?;
    Ok(Udc::ok(queries::summary(&state.db).await?))
}

#[utoipa::path(get, path = "/metrics/tasks/performance", tag = "metrics", params(RangeParams), security(("bearer" = [])),
    responses((status = 200, description = "Counts by outcome, success rate, duration mean/p50/p95/max, retries (default 24h)", body = TaskPerformance),
              (status = 404, description = "ENABLE_METRICS=false"), (status = 422, description = "time_range not 1h, 24h, 7d or 30d")))]
pub async fn task_performance(
    _on: MetricsEnabled,
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(params): QueryParams<RangeParams>,
) -> ApiResult<Udc<TaskPerformance>> {
    caller.require(Permission::Read)?;
    let range = params.range_or(TimeRange::Day);
    let task_type = params.task_type.as_deref().filter(|t| !t.is_empty());
    let note = RetentionNote::of(state.config().task_retention_days, Some(range));
    Ok(Udc::ok(
        queries::performance(&state.db, range, task_type, note).await?,
    ))
}

#[utoipa::path(get, path = "/metrics/tasks/by-type", tag = "metrics", params(RangeParams), security(("bearer" = [])),
    responses((status = 200, description = "Per task type: counts by status, share, success rate, duration (all tasks unless time_range)", body = ByType),
              (status = 404, description = "ENABLE_METRICS=false"), (status = 422, description = "Bad time_range")))]
pub async fn tasks_by_type(
    _on: MetricsEnabled,
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(params): QueryParams<RangeParams>,
) -> ApiResult<Udc<ByType>> {
    caller.require(Permission::Read)?;
    let range = params.time_range.as_deref().and_then(TimeRange::parse);
    let note = RetentionNote::of(state.config().task_retention_days, range);
    Ok(Udc::ok(queries::by_type(&state.db, range, note).await?))
}

/// `GET /metrics/droplets/{droplet_id}/performance`: the droplet as it is now, and its work
/// and uptime in the window.
#[derive(Debug, Serialize, ToSchema)]
pub struct DropletPerformance {
    pub droplet_id: i32,
    pub name: String,
    pub status: DropletStatus,
    pub current_load: Load,
    pub max_concurrent_tasks: Option<i32>,
    #[schema(format = DateTime)]
    pub last_heartbeat: Option<String>,
    pub last_heartbeat_status: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub last_heartbeat_metrics: Option<Value>,
    #[serde(flatten)]
    pub work: DropletWorkReport,
}

/// `GET /metrics/routing`: the routing figures and this process's deliveries.
#[derive(Debug, Serialize, ToSchema)]
pub struct Routing {
    #[serde(flatten)]
    pub report: RoutingReport,
    pub dispatch: Deliveries,
    /// Whether the `task_router` job is paused.
    pub router_paused: bool,
}

/// Deliveries by outcome since this process started.
#[derive(Debug, Serialize, ToSchema)]
pub struct Deliveries {
    pub since: &'static str,
    pub delivered: u64,
    pub failed: u64,
    pub timeout: u64,
    pub success_rate: Option<f64>,
}

#[utoipa::path(get, path = "/metrics/droplets/{droplet_id}/performance", tag = "metrics", params(("droplet_id" = i32, Path, description = "External droplet id"), RangeParams), security(("bearer" = [])),
    responses((status = 200, description = "Tasks completed/failed, mean duration, current load, last heartbeat, uptime ratio (default 24h)", body = DropletPerformance),
              (status = 404, description = "Unknown droplet, or ENABLE_METRICS=false"), (status = 422, description = "Bad time_range")))]
pub async fn droplet_performance(
    _on: MetricsEnabled,
    State(state): State<AppState>,
    caller: Caller,
    PathParam(droplet_id): PathParam<i32>,
    QueryParams(params): QueryParams<RangeParams>,
) -> ApiResult<Udc<DropletPerformance>> {
    caller.require(Permission::Read)?;
    let droplet = droplets::require(&state.db, droplet_id).await?;
    let range = params.range_or(TimeRange::Day);
    let work = queries::droplet_performance(
        &state.db,
        droplet.internal_id,
        range,
        state.config().heartbeat_timeout,
    )
    .await?;
    let load = droplets::load_of(&state.db, droplet.internal_id).await?;
    let last = heartbeats::recent_heartbeats(&state.db, droplet.internal_id, 1)
        .await?
        .into_iter()
        .next();
    Ok(Udc::ok(DropletPerformance {
        droplet_id: droplet.droplet_id,
        name: droplet.name,
        status: droplet.status,
        current_load: load,
        max_concurrent_tasks: droplet.max_concurrent_tasks,
        last_heartbeat: droplet.last_heartbeat.map(|t| udc::iso(&t)),
        last_heartbeat_status: last.as_ref().map(|h| h.status.clone()),
        last_heartbeat_metrics: last.and_then(|h| h.metrics),
        work,
    }))
}

#[utoipa::path(get, path = "/metrics/routing", tag = "metrics", params(RangeParams), security(("bearer" = [])),
    responses((status = 200, description = "Assignments per minute, assignment latency, pending per capability, unroutable pending, dispatch outcomes (default 1h)", body = Routing),
              (status = 404, description = "ENABLE_METRICS=false"), (status = 422, description = "Bad time_range")))]
pub async fn routing(
    _on: MetricsEnabled,
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(params): QueryParams<RangeParams>,
) -> ApiResult<Udc<Routing>> {
    caller.require(Permission::Read)?;
    let range = params.range_or(TimeRange::Hour);
    let report = queries::routing(&state.db, range).await?;
    let dispatch = |label: &str| state.metrics.dispatch.with_label_values(&[label]).get();
    let (delivered, failed, timeout) = (
        dispatch("delivered"),
        dispatch("failed"),
        dispatch("timeout"),
    );
    Ok(Udc::ok(Routing {
        report,
        dispatch: Deliveries {
            since: "process start",
            delivered,
            failed,
            timeout,
            success_rate: (delivered + failed + timeout > 0)
                .then(|| delivered as f64 / (delivered + failed + timeout) as f64),
        },
        router_paused: state.router.is_paused(),
    }))
}

/// `/metrics/system/health`: the services' report and, beside it, the scheduler's jobs.
#[derive(Debug, Serialize, ToSchema)]
pub struct SystemHealth {
    #[serde(flatten)]
    pub report: HealthReport,
    pub jobs: Vec<JobInfo>,
}

#[utoipa::path(get, path = "/metrics/system/health", tag = "metrics", security(("bearer" = [])),
    responses((status = 200, description = "Database round trip and pool usage, job states, WebSocket connections, Registry status", body = SystemHealth),
              (status = 404, description = "ENABLE_METRICS=false")))]
pub async fn system_health(
    _on: MetricsEnabled,
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Udc<SystemHealth>> {
    caller.require(Permission::Read)?;
    let jobs = state.jobs.list();
    let outside = system_status::Outside {
        failed_jobs: jobs
            .iter()
            .filter(|j| j.last_error.is_some())
            .map(|j| j.id.to_string())
            .collect(),
        process: state.process.latest(),
        uptime_seconds: state.started_at.elapsed().as_secs(),
    };
    Ok(Udc::ok(SystemHealth {
        report: system_status::health_report(state.health(), outside).await,
        jobs,
    }))
}
