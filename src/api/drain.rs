//! `POST /management/droplets/{droplet_id}/drain` (admin): the droplet takes no new work,
//! what it runs finishes (or goes back to pending at `?deadline_seconds=N`), then a
//! `droplet_drained` event. The rules are `services/droplet_drain.rs`.

use axum::extract::State;
use axum::routing::post;
use axum::Router;

use crate::auth::{Caller, Permission};
use crate::error::{ApiError, ApiResult};
use crate::services::droplet_drain::{self, Drain, DrainParams};
use crate::state::AppState;
use crate::udc::{PathParam, QueryParams, RawBody, Udc};

pub fn router() -> Router<AppState> {
    Router::new().route("/management/droplets/{droplet_id}/drain", post(drain))
}

/// Drains a droplet before a deploy: no new assignments from now; its running tasks finish
/// and a `droplet_drained` event (on `/ws/droplets`) says when it holds nothing more. With
/// `deadline_seconds`, what it still holds then goes back to pending (a new attempt on another
/// droplet, not a retry; 0: at once). Asking again sets the deadline anew. The drain ends when
/// the droplet registers again.
#[utoipa::path(post, path = "/management/droplets/{droplet_id}/drain", tag = "management", security(("bearer" = [])),
    params(("droplet_id" = i32, Path, description = "External droplet id"), DrainParams),
    responses((status = 200, description = "Draining (or drained already)", body = Drain), (status = 403, description = "Admin only"),
              (status = 404, description = "Unknown droplet"), (status = 422, description = "A bad deadline_seconds")))]
pub async fn drain(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(droplet_id): PathParam<i32>,
    params: Result<QueryParams<DrainParams>, ApiError>,
    body: RawBody,
) -> ApiResult<Udc<Drain>> {
    caller.require(Permission::Admin)?;
    // Read after the permission check: 403 before any 422.
    let QueryParams(params) = params?;
    body.optional_envelope()?;
    Ok(Udc::ok(
        droplet_drain::drain(&state.changes(), &caller, droplet_id, &params).await?,
    ))
}
