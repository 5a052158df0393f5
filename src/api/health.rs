//! The public UDC endpoints: `/health`, `/capabilities`, `/state`, `/dependencies`, and
//! `GET /management/version`. Bare JSON, no token.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::error::ApiResult;
use crate::services::system_status;
use crate::state::AppState;
use crate::udc::now_iso;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/health", get(health))
        .route("/capabilities", get(capabilities))
        .route("/state", get(state_of))
        .route("/dependencies", get(dependencies))
        .route("/management/version", get(version))
}

pub const FEATURES: [&str; 9] = [
    "task_routing",
    "droplet_discovery",
    "health_monitoring",
    "workflow_management",
    "real_time_updates",
    "task_recovery",
    "state_machine_management",
    "priority_queuing",
    "automatic_retry",
];

/// Liveness; says `maintenance` during an emergency stop. Never touches the database.
#[utoipa::path(get, path = "/health", tag = "public", responses((status = 200, description = "UDC health")))]
pub async fn health(State(state): State<AppState>) -> Json<Value> {
    let config = state.config();
    let (status, message) = if state.emergency_stopped() {
        (
            "maintenance",
            "Emergency stop: routing and dispatch are halted; resume the jobs to end it",
        )
    } else {
        ("active", "All systems operational")
    };
    Json(json!({
        "id": config.droplet_id,
        "name": config.droplet_name,
        "steward": config.droplet_steward,
        "status": status,
        "endpoint": config.droplet_endpoint,
        "updated_at": now_iso(),
        "message": message,
    }))
}

#[utoipa::path(get, path = "/capabilities", tag = "public", operation_id = "public_capabilities", responses((status = 200, description = "Features")))]
pub async fn capabilities() -> Json<Value> {
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "features": FEATURES,
        "dependencies": ["registry"],
        "udc_version": crate::udc::UDC_VERSION,
    }))
}

/// This process's CPU, memory, uptime and threads, with the live task and droplet counts.
#[utoipa::path(get, path = "/state", tag = "public", responses((status = 200, description = "Resource usage"), (status = 503, description = "Database unreachable")))]
pub async fn state_of(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let sample = state.process.latest();
    let mut custom =
        serde_json::to_value(system_status::counts(&state.db).await?).unwrap_or_default();
    custom["num_threads"] = json!(sample.num_threads);
    custom["websocket_connections"] = json!(state.events.connection_count());
    Ok(Json(json!({
        "cpu_percent": (sample.cpu_percent * 10.0).round() / 10.0,
        "memory_mb": (sample.memory_mb * 10.0).round() / 10.0,
        "uptime_seconds": state.started_at.elapsed().as_secs(),
        "custom_metrics": custom,
    })))
}

#[utoipa::path(get, path = "/dependencies", tag = "public", responses((status = 200, description = "Dependency status")))]
pub async fn dependencies(State(state): State<AppState>) -> Json<Value> {
    let registry = state.registry.snapshot();
    let mut entry = json!({
        "id": 3,
        "name": "Registry v2",
        "status": registry.status,
        "last_check": registry.last_check,
    });
    if let Some(e) = registry.last_error {
        entry["last_error"] = json!(e);
    }
    let required = vec![entry];
    let missing: Vec<Value> = if registry.status == "connected" {
        vec![]
    } else {
        vec![json!("registry")]
    };
    Json(json!({
        "required": required,
        "optional": [
            {"id": 5, "name": "Dashboard", "status": "unknown", "last_check": null},
            {"id": 8, "name": "Verifier", "status": "unknown", "last_check": null}
        ],
        "missing": if registry.status == "unconfigured" { vec![] } else { missing },
    }))
}

#[utoipa::path(get, path = "/management/version", tag = "public", responses((status = 200, description = "Version information")))]
pub async fn version() -> Json<Value> {
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "name": "orchestrator",
        "git_commit": option_env!("ORCHESTRATOR_GIT_COMMIT").unwrap_or("unknown"),
        "build_time": option_env!("ORCHESTRATOR_BUILD_TIME").unwrap_or("unknown"),
        "rustc_version": option_env!("ORCHESTRATOR_RUSTC_VERSION").unwrap_or("unknown"),
        "udc_version": crate::udc::UDC_VERSION,
    }))
}
