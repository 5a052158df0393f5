//! Limits per fairness key (admin): `PUT`, `GET` and `DELETE /management/limits`. Kept in
//! the database and in force on every replica at its next routing pass, no restart.

use axum::extract::State;
use axum::routing::{get, put};
use axum::Router;
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::{Caller, Permission};
use crate::error::ApiResult;
use crate::services::key_limits::{self, KeyLimits, LimitsList, LimitsUpdate};
use crate::state::AppState;
use crate::udc::{PathParam, RawBody, Udc};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/management/limits", get(list))
        .route("/management/limits/{key}", put(set).delete(remove))
}

/// `DELETE /management/limits/{key}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct LimitsRemoved {
    pub key: String,
    pub deleted: bool,
}

/// Every key with limits, with its live counts (tasks in flight and queued) and whether it
/// is at a limit now.
#[utoipa::path(get, path = "/management/limits", tag = "management", security(("bearer" = [])),
    responses((status = 200, description = "The limits per key with live counts", body = LimitsList), (status = 403, description = "Admin only")))]
pub async fn list(State(state): State<AppState>, caller: Caller) -> ApiResult<Udc<LimitsList>> {
    caller.require(Permission::Admin)?;
    Ok(Udc::ok(LimitsList {
        limits: key_limits::list(&state.db).await?,
    }))
}

/// Sets a key's limits, replacing what it had: `max_in_flight` (tasks assigned or running
/// at once, across replicas), `max_per_second` (assignments per second), `max_queued`
/// (pending tasks; a creation past it is answered 429) and `weight` (its turns against
/// other keys within one priority), each optional.
#[utoipa::path(put, path = "/management/limits/{key}", tag = "management", security(("bearer" = [])),
    params(("key" = String, Path, description = "A concurrency_key, or `creator:<droplet id>` for a creator's own tasks")),
    request_body = LimitsUpdate,
    responses((status = 200, description = "The key's limits with its live counts", body = KeyLimits), (status = 403, description = "Admin only"),
              (status = 422, description = "A limit out of range")))]
pub async fn set(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(key): PathParam<String>,
    body: RawBody,
) -> ApiResult<Udc<KeyLimits>> {
    caller.require(Permission::Admin)?;
    let body = body.envelope::<LimitsUpdate>()?;
    let limits = key_limits::put(&state.key_limits(), &key, &body.payload).await?;
    tracing::info!(key = %key, by = %caller.actor_name(), "key limits set");
    Ok(Udc::ok(limits))
}

/// Removes a key's limits (its tasks are routed without them from the next pass).
#[utoipa::path(delete, path = "/management/limits/{key}", tag = "management", security(("bearer" = [])),
    params(("key" = String, Path, description = "The key")),
    responses((status = 200, description = "Removed", body = LimitsRemoved), (status = 403, description = "Admin only"),
              (status = 404, description = "No limits for this key")))]
pub async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(key): PathParam<String>,
    body: RawBody,
) -> ApiResult<Udc<LimitsRemoved>> {
    caller.require(Permission::Admin)?;
    body.optional_envelope()?;
    key_limits::delete(&state.key_limits(), &key).await?;
    tracing::info!(key = %key, by = %caller.actor_name(), "key limits removed");
    Ok(Udc::ok(LimitsRemoved { key, deleted: true }))
}
