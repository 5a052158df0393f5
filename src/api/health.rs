//! The public UDC endpoints: `/health`, `/capabilities`, `/state`, `/dependencies`, and
//! `GET /management/version`. Bare JSON, no token.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::ApiResult;
use crate::services::system_status::{self, LiveCounts};
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

/// `GET /health`: the UDC health answer (bare JSON).
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthAnswer {
    pub id: i32,
    pub name: String,
    pub steward: String,
    /// `active`, or `maintenance` during an emergency stop.
    pub status: &'static str,
    pub endpoint: String,
    pub updated_at: String,
    pub message: &'static str,
}

/// `GET /capabilities`: what this service offers.
#[derive(Debug, Serialize, ToSchema)]
pub struct CapabilitiesAnswer {
    pub version: &'static str,
    pub features: [&'static str; 9],
    pub dependencies: [&'static str; 1],
    pub udc_version: &'static str,
}

/// `custom_metrics` of `GET /state`: the live counts, this process's threads and sockets.
#[derive(Debug, Serialize, ToSchema)]
pub struct StateCustomMetrics {
    #[serde(flatten)]
    pub counts: LiveCounts,
    pub num_threads: usize,
    pub websocket_connections: usize,
}

/// `GET /state`: this process's resource use.
#[derive(Debug, Serialize, ToSchema)]
pub struct StateAnswer {
    pub cpu_percent: f32,
    pub memory_mb: f64,
    pub uptime_seconds: u64,
    pub custom_metrics: StateCustomMetrics,
}

/// One dependency of `GET /dependencies`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Dependency {
    pub id: i32,
    pub name: &'static str,
    /// `connected`, `disconnected`, `unconfigured`, or `unknown` for the optional ones.
    pub status: &'static str,
    pub last_check: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// `GET /dependencies`: the Registry (required) and the droplets this one may use.
#[derive(Debug, Serialize, ToSchema)]
pub struct DependenciesAnswer {
    pub required: Vec<Dependency>,
    pub optional: Vec<Dependency>,
    /// The names of required dependencies not connected (none while the Registry is
    /// unconfigured).
    pub missing: Vec<&'static str>,
}

/// `GET /management/version`: the build.
#[derive(Debug, Serialize, ToSchema)]
pub struct VersionAnswer {
    pub version: &'static str,
    pub name: &'static str,
    pub git_commit: &'static str,
    pub build_time: &'static str,
    pub rustc_version: &'static str,
    pub udc_version: &'static str,
}

/// Liveness; says `maintenance` during an emergency stop. Never touches the database.
#[utoipa::path(get, path = "/health", tag = "public", responses((status = 200, description = "UDC health", body = HealthAnswer)))]
pub async fn health(State(state): State<AppState>) -> Json<HealthAnswer> {
    let config = state.config();
    let (status, message) = if state.emergency_stopped() {
        (
            "maintenance",
            "Emergency stop: routing and dispatch are halted; resume the jobs to end it",
        )
    } else {
        ("active", "All systems operational")
    };
    Json(HealthAnswer {
        id: config.droplet_id,
        name: config.droplet_name.clone(),
        steward: config.droplet_steward.clone(),
        status,
        endpoint: config.droplet_endpoint.clone(),
        updated_at: now_iso(),
        message,
    })
}

#[utoipa::path(get, path = "/capabilities", tag = "public", operation_id = "public_capabilities", responses((status = 200, description = "Features", body = CapabilitiesAnswer)))]
pub async fn capabilities() -> Json<CapabilitiesAnswer> {
    Json(CapabilitiesAnswer {
        version: env!("CARGO_PKG_VERSION"),
        features: FEATURES,
        dependencies: ["registry"],
        udc_version: crate::udc::UDC_VERSION,
    })
}

/// This process's CPU, memory, uptime and threads, with the live task and droplet counts.
#[utoipa::path(get, path = "/state", tag = "public", responses((status = 200, description = "Resource usage", body = StateAnswer), (status = 503, description = "Database unreachable")))]
pub async fn state_of(State(state): State<AppState>) -> ApiResult<Json<StateAnswer>> {
    let sample = state.process.latest();
    let counts = system_status::counts(&state.db).await?;
    Ok(Json(StateAnswer {
        cpu_percent: (sample.cpu_percent * 10.0).round() / 10.0,
        memory_mb: (sample.memory_mb * 10.0).round() / 10.0,
        uptime_seconds: state.started_at.elapsed().as_secs(),
        custom_metrics: StateCustomMetrics {
            counts,
            num_threads: sample.num_threads,
            websocket_connections: state.events.connection_count(),
        },
    }))
}

#[utoipa::path(get, path = "/dependencies", tag = "public", responses((status = 200, description = "Dependency status", body = DependenciesAnswer)))]
pub async fn dependencies(State(state): State<AppState>) -> Json<DependenciesAnswer> {
    let registry = state.registry.snapshot();
    let missing = match registry.status {
        "connected" | "unconfigured" => vec![],
        _ => vec!["registry"],
    };
    let unknown = |id, name| Dependency {
        id,
        name,
        status: "unknown",
        last_check: None,
        last_error: None,
    };
    Json(DependenciesAnswer {
        required: vec![Dependency {
            id: 3,
            name: "Registry v2",
            status: registry.status,
            last_check: registry.last_check,
            last_error: registry.last_error,
        }],
        optional: vec![unknown(5, "Dashboard"), unknown(8, "Verifier")],
        missing,
    })
}

#[utoipa::path(get, path = "/management/version", tag = "public", responses((status = 200, description = "Version information", body = VersionAnswer)))]
pub async fn version() -> Json<VersionAnswer> {
    Json(VersionAnswer {
        version: env!("CARGO_PKG_VERSION"),
        name: "orchestrator",
        git_commit: option_env!("ORCHESTRATOR_GIT_COMMIT").unwrap_or("unknown"),
        build_time: option_env!("ORCHESTRATOR_BUILD_TIME").unwrap_or("unknown"),
        rustc_version: option_env!("ORCHESTRATOR_RUSTC_VERSION").unwrap_or("unknown"),
        udc_version: crate::udc::UDC_VERSION,
    })
}
