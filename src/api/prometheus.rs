//! `GET /metrics`: the Prometheus text exposition (public, when `ENABLE_METRICS=true`).

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, TextEncoder};

use crate::error::{ApiError, ApiResult};
use crate::services::{key_limits, system_status};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(scrape))
}

/// Every status a gauge reports, so a status that empties reads 0 instead of its last value.
const TASK_STATUSES: [&str; 6] = [
    "pending",
    "assigned",
    "in_progress",
    "completed",
    "failed",
    "cancelled",
];
const DROPLET_STATUSES: [&str; 3] = ["active", "inactive", "error"];

/// Request counts and latencies by route and status, tasks created and their outcomes,
/// assignments, dispatch outcomes, job runs and durations, and (refreshed on each scrape)
/// tasks and droplets by status, WebSocket connections and database pool usage.
#[utoipa::path(get, path = "/metrics", tag = "public",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4", content_type = "text/plain", body = String),
              (status = 404, description = "ENABLE_METRICS=false")))]
pub async fn scrape(State(state): State<AppState>) -> ApiResult<Response> {
    if !state.config().enable_metrics {
        return Err(ApiError::not_found("Not found"));
    }
    refresh_gauges(&state).await;
    let mut out = Vec::new();
    let encoder = TextEncoder::new();
    encoder
        .encode(&state.metrics.registry.gather(), &mut out)
        .map_err(ApiError::internal)?;
    let mut response = out.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(response)
}

/// The gauges at scrape time: tasks by status from the counts kept as changes happen
/// (exact, a handful of rows however many tasks there are), droplets by status, WebSocket
/// connections and the pool. An unreachable database leaves the gauges as they were (the
/// scrape still answers, so the pool and request metrics show the outage).
async fn refresh_gauges(state: &AppState) {
    let m = &state.metrics;
    match system_status::by_status(&state.db).await {
        Ok(rows) => {
            for s in TASK_STATUSES {
                m.tasks_by_status.with_label_values(&[s]).set(0);
            }
            for s in DROPLET_STATUSES {
                m.droplets_by_status.with_label_values(&[s]).set(0);
            }
            for (kind, status, n) in rows {
                let gauge = if kind == "task" {
                    &m.tasks_by_status
                } else {
                    &m.droplets_by_status
                };
                gauge.with_label_values(&[status.as_str()]).set(n);
            }
        }
        Err(e) => tracing::warn!(error = %e, "metrics: cannot count tasks and droplets"),
    }
    match key_limits::queue_depths(&state.db).await {
        Ok(depths) => {
            // Keys whose limits were removed leave the label set.
            m.queue_depth.reset();
            for (key, n) in depths {
                m.queue_depth.with_label_values(&[key.as_str()]).set(n);
            }
        }
        Err(e) => tracing::warn!(error = %e, "metrics: cannot read the queue depth per key"),
    }
    let ws = state.events.stats();
    for (feed, n) in &ws.connections {
        m.ws_connections
            .with_label_values(&[feed])
            .set(i64::try_from(*n).unwrap_or(i64::MAX));
    }
    let size = i64::from(state.db.size());
    let idle = i64::try_from(state.db.num_idle()).unwrap_or(i64::MAX);
    let max = i64::from(state.config().pool_max_connections());
    m.pool.with_label_values(&["open"]).set(size);
    m.pool.with_label_values(&["idle"]).set(idle);
    m.pool
        .with_label_values(&["in_use"])
        .set((size - idle).max(0));
    m.pool.with_label_values(&["max"]).set(max);
}
