//! The JSON metrics endpoints under `/metrics/...` (read permission; `ENABLE_METRICS=false`
//! turns them into 404s). The numbers come from `services::analytics`.

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};

use crate::auth::{Caller, Permission};
use crate::error::{ApiError, ApiResult};
use crate::services::analytics::{self as queries, RangeParams, TimeRange};
use crate::services::droplets;
use crate::services::system_status;
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
    responses((status = 200, description = "Tasks and droplets by status, the last hour and day, success rate, assignment and execution latency"),
              (status = 404, description = "ENABLE_METRICS=false")))]
pub async fn summary(
    _on: MetricsEnabled,
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Udc<Value>> {
    caller.require(Permission::Read)?;
    Ok(Udc::ok(queries::summary(&state.db).await?))
}

/// A window reaching further back than `TASK_RETENTION_DAYS` (or all time, with a retention)
/// covers tasks that were deleted: the answer says so.
fn retention_note(state: &AppState, range: Option<TimeRange>, body: &mut Value) {
    let days = state.config().task_retention_days;
    if days == 0 {
        return;
    }
    let exceeds = range.is_none_or(|r| r.days() > days as f64);
    if let Value::Object(map) = body {
        map.insert("retention_days".into(), json!(days));
        map.insert("window_exceeds_retention".into(), json!(exceeds));
    }
}

#[utoipa::path(get, path = "/metrics/tasks/performance", tag = "metrics", params(RangeParams), security(("bearer" = [])),
    responses((status = 200, description = "Counts by outcome, success rate, duration mean/p50/p95/max, retries (default 24h)"),
              (status = 404, description = "ENABLE_METRICS=false"), (status = 422, description = "time_range not 1h, 24h, 7d or 30d")))]
pub async fn task_performance(
    _on: MetricsEnabled,
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(params): QueryParams<RangeParams>,
) -> ApiResult<Udc<Value>> {
    caller.require(Permission::Read)?;
    let range = params.range_or(TimeRange::Day);
    let task_type = params.task_type.as_deref().filter(|t| !t.is_empty());
    let mut body = queries::performance(&state.db, range, task_type).await?;
    retention_note(&state, Some(range), &mut body);
    Ok(Udc::ok(body))
}

#[utoipa::path(get, path = "/metrics/tasks/by-type", tag = "metrics", params(RangeParams), security(("bearer" = [])),
    responses((status = 200, description = "Per task type: counts by status, share, success rate, duration (all tasks unless time_range)"),
              (status = 404, description = "ENABLE_METRICS=false"), (status = 422, description = "Bad time_range")))]
pub async fn tasks_by_type(
    _on: MetricsEnabled,
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(params): QueryParams<RangeParams>,
) -> ApiResult<Udc<Value>> {
    caller.require(Permission::Read)?;
    let range = params.time_range.as_deref().and_then(TimeRange::parse);
    let mut body = queries::by_type(&state.db, range).await?;
    retention_note(&state, range, &mut body);
    Ok(Udc::ok(body))
}

#[utoipa::path(get, path = "/metrics/droplets/{droplet_id}/performance", tag = "metrics", params(("droplet_id" = i32, Path, description = "External droplet id"), RangeParams), security(("bearer" = [])),
    responses((status = 200, description = "Tasks completed/failed, mean duration, current load, last heartbeat, uptime ratio (default 24h)"),
              (status = 404, description = "Unknown droplet, or ENABLE_METRICS=false"), (status = 422, description = "Bad time_range")))]
pub async fn droplet_performance(
    _on: MetricsEnabled,
    State(state): State<AppState>,
    caller: Caller,
    PathParam(droplet_id): PathParam<i32>,
    QueryParams(params): QueryParams<RangeParams>,
) -> ApiResult<Udc<Value>> {
    caller.require(Permission::Read)?;
    let droplet = droplets::require(&state.db, droplet_id).await?;
    let range = params.range_or(TimeRange::Day);
    let mut body = queries::droplet_performance(
        &state.db,
        droplet.internal_id,
        range,
        state.config().heartbeat_timeout,
    )
    .await?;
    let load = droplets::load_of(&state.db, droplet.internal_id).await?;
    let last = droplets::recent_heartbeats(&state.db, droplet.internal_id, 1)
        .await?
        .into_iter()
        .next();
    body["droplet_id"] = json!(droplet.droplet_id);
    body["name"] = json!(droplet.name);
    body["status"] = json!(droplet.status);
    body["current_load"] = json!(load);
    body["max_concurrent_tasks"] = json!(droplet.max_concurrent_tasks);
    body["last_heartbeat"] = json!(droplet.last_heartbeat.map(|t| udc::iso(&t)));
    body["last_heartbeat_status"] = json!(last.as_ref().map(|h| h.status.clone()));
    body["last_heartbeat_metrics"] = json!(last.and_then(|h| h.metrics));
    Ok(Udc::ok(body))
}

#[utoipa::path(get, path = "/metrics/routing", tag = "metrics", params(RangeParams), security(("bearer" = [])),
    responses((status = 200, description = "Assignments per minute, assignment latency, pending per capability, unroutable pending, dispatch outcomes (default 1h)"),
              (status = 404, description = "ENABLE_METRICS=false"), (status = 422, description = "Bad time_range")))]
pub async fn routing(
    _on: MetricsEnabled,
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(params): QueryParams<RangeParams>,
) -> ApiResult<Udc<Value>> {
    caller.require(Permission::Read)?;
    let range = params.range_or(TimeRange::Hour);
    let mut body = queries::routing(&state.db, range).await?;
    let dispatch = |label: &str| state.metrics.dispatch.with_label_values(&[label]).get();
    let (delivered, failed, timeout) = (
        dispatch("delivered"),
        dispatch("failed"),
        dispatch("timeout"),
    );
    body["dispatch"] = json!({
        "since": "process start",
        "delivered": delivered,
        "failed": failed,
        "timeout": timeout,
        "success_rate": (delivered + failed + timeout > 0)
            .then(|| delivered as f64 / (delivered + failed + timeout) as f64),
    });
    body["router_paused"] = json!(state.router.is_paused());
    Ok(Udc::ok(body))
}

#[utoipa::path(get, path = "/metrics/system/health", tag = "metrics", security(("bearer" = [])),
    responses((status = 200, description = "Database round trip and pool usage, job states, WebSocket connections, Registry status"),
              (status = 404, description = "ENABLE_METRICS=false")))]
pub async fn system_health(
    _on: MetricsEnabled,
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Udc<Value>> {
    caller.require(Permission::Read)?;
    let jobs = state.jobs.list();
    let outside = system_status::Outside {
        failed_jobs: jobs
            .iter()
            .filter(|j| j.last_error.is_some())
            .map(|j| j.id.to_string())
            .collect(),
        jobs: serde_json::to_value(&jobs).unwrap_or_default(),
        process: state.process.latest(),
        uptime_seconds: state.started_at.elapsed().as_secs(),
    };
    Ok(Udc::ok(system_status::health_report(&state, outside).await))
}
