//! `GET /ws/status`: the hub's figures, the ping interval and what the event log keeps.

use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::{Caller, Permission};
use crate::error::ApiResult;
use crate::services::events::{self, WsStats};
use crate::state::AppState;
use crate::udc::Udc;

/// Connections per feed and per droplet, events published and sent, clients dropped for
/// slowness or silence, and the NOTIFY listener's state.
#[utoipa::path(get, path = "/ws/status", tag = "websocket", security(("bearer" = [])),
    responses((status = 200, description = "WebSocket statistics", body = WsStatus), (status = 401, description = "Missing or invalid token")))]
pub async fn status(State(state): State<AppState>, caller: Caller) -> ApiResult<Udc<WsStatus>> {
    caller.require(Permission::Read)?;
    let bounds = events::log::bounds(&state.db).await?;
    Ok(Udc::ok(WsStatus {
        stats: state.events.stats(),
        heartbeat_interval_seconds: state.config().ws_heartbeat_interval,
        retained_events: RetainedEvents {
            oldest_event_id: bounds.oldest,
            newest_event_id: bounds.newest,
            trimmed_through: bounds.trimmed_through,
            retention_seconds: state.config().event_retention_seconds,
        },
    }))
}

/// `GET /ws/status`: the hub's figures, the ping interval and what the event log keeps.
#[derive(Debug, Serialize, ToSchema)]
pub struct WsStatus {
    #[serde(flatten)]
    pub stats: WsStats,
    pub heartbeat_interval_seconds: u64,
    pub retained_events: RetainedEvents,
}

/// The event log a client can resume from (`?after=`).
#[derive(Debug, Serialize, ToSchema)]
pub struct RetainedEvents {
    pub oldest_event_id: Option<i64>,
    pub newest_event_id: Option<i64>,
    /// Events up to this id were trimmed: a client behind it must resync.
    pub trimmed_through: i64,
    pub retention_seconds: u64,
}
