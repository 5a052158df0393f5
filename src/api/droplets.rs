//! Droplet endpoints: register, heartbeat, list, details, activate/deactivate, capabilities.

use axum::extract::State;
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use crate::auth::{Caller, Permission};
use crate::error::ApiResult;
use crate::services::dispatch::id_form_of;
use crate::services::droplet_admin;
use crate::services::droplet_admin::AdminChange;
use crate::services::droplets::{self, Droplet, DropletFilter, Load, Registration};
use crate::services::heartbeats::{self, Heartbeat, HeartbeatRow};
use crate::services::status::DropletStatus;
use crate::state::AppState;
use crate::udc::{PathParam, QueryParams, RawBody, Udc};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/droplets/register", post(register))
        .route("/droplets", get(list))
        .route("/droplets/{droplet_id}", get(detail))
        .route("/droplets/{droplet_id}/heartbeat", post(heartbeat))
        .route("/droplets/{droplet_id}/activate", post(activate))
        .route("/droplets/{droplet_id}/deactivate", post(deactivate))
        .route("/droplets/{droplet_id}/capabilities", get(capabilities))
}

/// What registration answers (201 new, 200 again).
#[derive(Debug, Serialize, ToSchema)]
pub struct Registered {
    pub registered: bool,
    pub droplet_id: i32,
    pub name: String,
    pub status: DropletStatus,
    #[schema(format = DateTime)]
    pub registered_at: Option<String>,
    pub heartbeat_interval_seconds: u64,
    /// When the next heartbeat is due (Unix seconds).
    pub next_heartbeat_deadline: f64,
    pub message: &'static str,
}

/// What a heartbeat answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct HeartbeatAck {
    pub acknowledged: bool,
    pub droplet_id: i32,
    pub status: DropletStatus,
    /// Seconds until the next heartbeat is due.
    pub next_heartbeat_in: u64,
    /// When it is due (Unix seconds).
    pub next_heartbeat_deadline: f64,
}

/// `GET /droplets`.
#[derive(Debug, Serialize, ToSchema)]
pub struct DropletList {
    pub droplets: Vec<Droplet>,
    pub total: usize,
}

/// `GET /droplets/{droplet_id}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct DropletDetail {
    pub droplet: DropletView,
}

/// A droplet with the tasks it holds now and its last heartbeats.
#[derive(Debug, Serialize, ToSchema)]
pub struct DropletView {
    #[serde(flatten)]
    pub droplet: Droplet,
    pub current_load: Load,
    pub recent_heartbeats: Vec<HeartbeatRow>,
}

#[utoipa::path(post, path = "/droplets/register", tag = "droplets", request_body = Registration, security(("bearer" = [])),
    responses((status = 201, description = "Registered", body = Registered), (status = 200, description = "Re-registered", body = Registered), (status = 403, description = "Another droplet's id"), (status = 422, description = "Validation")))]
pub async fn register(
    State(state): State<AppState>,
    caller: Caller,
    body: RawBody,
) -> ApiResult<Udc<Registered>> {
    caller.require_droplet_write()?;
    let (meta, registration) = body.envelope_or_bare::<Registration>(|object| object)?;
    if meta.is_none() && registration.external_id() != Some(caller.droplet_id) {
        caller.require_self_or_admin(registration.external_id().unwrap_or(0))?;
    }
    let id_form = meta.as_ref().and_then(|m| id_form_of(&m.source));
    let (droplet, new) =
        droplets::register(&state.droplets(), &caller, registration, id_form).await?;
    let interval = state.config().heartbeat_interval;
    let deadline = next_heartbeat_deadline(&droplet, interval);
    let payload = Registered {
        registered: true,
        droplet_id: droplet.droplet_id,
        registered_at: droplet.registered_at.map(|t| crate::udc::iso(&t)),
        name: droplet.name,
        status: droplet.status,
        heartbeat_interval_seconds: interval,
        next_heartbeat_deadline: deadline,
        message: "Droplet registered successfully",
    };
    Ok(if new {
        Udc::created(payload)
    } else {
        Udc::ok(payload)
    })
}

#[utoipa::path(post, path = "/droplets/{droplet_id}/heartbeat", tag = "droplets", request_body = Heartbeat, security(("bearer" = [])),
    params(("droplet_id" = i32, Path, description = "External droplet id")),
    responses((status = 200, description = "Acknowledged", body = HeartbeatAck), (status = 403, description = "Another droplet"), (status = 404, description = "Unknown droplet")))]
pub async fn heartbeat(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(droplet_id): PathParam<i32>,
    body: RawBody,
) -> ApiResult<Udc<HeartbeatAck>> {
    caller.require_droplet_write()?;
    // A bare heartbeat (droplet-2's) carries its metrics beside its status.
    let (meta, beat) = match body.envelope_or_bare::<Heartbeat>(bare_heartbeat) {
        Ok(parsed) => parsed,
        // The contract's order: an unknown droplet (404) or another's (403) before a bad body.
        Err(invalid) => {
            droplets::may_heartbeat(&state.db, &caller, droplet_id).await?;
            return Err(invalid);
        }
    };
    let id_form = meta.as_ref().and_then(|m| id_form_of(&m.source));
    let droplet = heartbeats::heartbeat(&state.beats(), &caller, droplet_id, beat, id_form).await?;
    let interval = state.config().heartbeat_interval;
    Ok(Udc::ok(HeartbeatAck {
        acknowledged: true,
        droplet_id: droplet.droplet_id,
        status: droplet.status,
        next_heartbeat_in: interval,
        next_heartbeat_deadline: next_heartbeat_deadline(&droplet, interval),
    }))
}

/// When the droplet's next heartbeat is due (Unix seconds): its last one plus the interval,
/// as registration and every heartbeat answer it.
pub fn next_heartbeat_deadline(droplet: &droplets::Droplet, interval: u64) -> f64 {
    droplet
        .last_heartbeat
        .map(|t| t.and_utc().timestamp() as f64)
        .unwrap_or_else(|| chrono::Utc::now().timestamp() as f64)
        + interval as f64
}

/// `{"status": "active", "cpu_percent": 1.0, ...}` as `{"status": "active", "metrics": {...}}`.
fn bare_heartbeat(mut object: Map<String, Value>) -> Map<String, Value> {
    if object.contains_key("metrics") {
        return object;
    }
    let status = object.remove("status");
    object.remove("droplet_id");
    object.remove("timestamp");
    let mut reshaped = Map::new();
    if let Some(status) = status {
        reshaped.insert("status".into(), status);
    }
    if !object.is_empty() {
        reshaped.insert("metrics".into(), Value::Object(object));
    }
    reshaped
}

#[utoipa::path(get, path = "/droplets", tag = "droplets", operation_id = "droplets_list", params(DropletFilter), security(("bearer" = [])),
    responses((status = 200, description = "Droplets", body = DropletList)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(filter): QueryParams<DropletFilter>,
) -> ApiResult<Udc<DropletList>> {
    caller.require(Permission::Read)?;
    let droplets = droplets::list(&state.db, &filter).await?;
    Ok(Udc::ok(DropletList {
        total: droplets.len(),
        droplets,
    }))
}

#[utoipa::path(get, path = "/droplets/{droplet_id}", tag = "droplets", operation_id = "droplets_detail", security(("bearer" = [])),
    params(("droplet_id" = i32, Path, description = "External droplet id")),
    responses((status = 200, description = "The droplet with its load and recent heartbeats", body = DropletDetail), (status = 404, description = "Unknown droplet")))]
pub async fn detail(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(droplet_id): PathParam<i32>,
) -> ApiResult<Udc<DropletDetail>> {
    caller.require(Permission::Read)?;
    let droplet = droplets::require(&state.db, droplet_id).await?;
    let load = droplets::load_of(&state.db, droplet.internal_id).await?;
    let recent_heartbeats =
        heartbeats::recent_heartbeats(&state.db, droplet.internal_id, 10).await?;
    Ok(Udc::ok(DropletDetail {
        droplet: DropletView {
            droplet,
            current_load: load,
            recent_heartbeats,
        },
    }))
}

async fn set_active(
    state: &AppState,
    caller: &Caller,
    droplet_id: i32,
    activate: bool,
) -> ApiResult<Udc<AdminChange>> {
    caller.require(Permission::Admin)?;
    Ok(Udc::ok(
        droplet_admin::set_active(&state.changes(), caller, droplet_id, activate).await?,
    ))
}

#[utoipa::path(post, path = "/droplets/{droplet_id}/activate", tag = "droplets", security(("bearer" = [])),
    params(("droplet_id" = i32, Path, description = "External droplet id")),
    responses((status = 200, description = "Active", body = AdminChange), (status = 403, description = "Admin only"), (status = 404, description = "Unknown droplet")))]
pub async fn activate(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(droplet_id): PathParam<i32>,
) -> ApiResult<Udc<AdminChange>> {
    set_active(&state, &caller, droplet_id, true).await
}

#[utoipa::path(post, path = "/droplets/{droplet_id}/deactivate", tag = "droplets", security(("bearer" = [])),
    params(("droplet_id" = i32, Path, description = "External droplet id")),
    responses((status = 200, description = "Inactive until activated", body = AdminChange), (status = 403, description = "Admin only"), (status = 404, description = "Unknown droplet")))]
pub async fn deactivate(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(droplet_id): PathParam<i32>,
) -> ApiResult<Udc<AdminChange>> {
    set_active(&state, &caller, droplet_id, false).await
}

/// What `GET /droplets/{id}/capabilities` answers.
#[derive(Serialize, ToSchema)]
pub struct Capabilities {
    pub droplet_id: i32,
    pub name: String,
    #[schema(value_type = Vec<String>)]
    pub capabilities: Value,
    /// Per capability, the JSON Schema (draft 2020-12) of the task payloads the droplet
    /// accepts (an object, or a boolean schema); `{}` when it declared none. A client can
    /// validate a payload before sending it.
    #[schema(value_type = HashMap<String, Value>)]
    pub capability_schemas: Value,
}

#[utoipa::path(get, path = "/droplets/{droplet_id}/capabilities", tag = "droplets", operation_id = "droplets_capabilities", security(("bearer" = [])),
    params(("droplet_id" = i32, Path, description = "External droplet id")),
    responses((status = 200, description = "Its capabilities and their contracts", body = Capabilities), (status = 404, description = "Unknown droplet")))]
pub async fn capabilities(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(droplet_id): PathParam<i32>,
) -> ApiResult<Udc<Capabilities>> {
    caller.require(Permission::Read)?;
    let droplet = droplets::require(&state.db, droplet_id).await?;
    Ok(Udc::ok(Capabilities {
        droplet_id: droplet.droplet_id,
        name: droplet.name,
        capabilities: droplet.capabilities,
        capability_schemas: droplet.capability_schemas.unwrap_or_else(|| json!({})),
    }))
}
