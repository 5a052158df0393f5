//! Droplet #10, the orchestrator: routes tasks to droplets, tracks them through a state
//! machine, recovers work from droplets that die, and streams every change to dashboards.

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod db;
pub mod error;
pub mod jobs;
pub mod metrics;
pub mod services;
pub mod state;
pub mod system;
pub mod telemetry;
pub mod udc;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderName, Method};
use axum::Router;
use tokio::net::TcpListener;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::Config;
use crate::error::ApiError;
use crate::state::AppState;
use crate::telemetry::LogHandle;

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Database(#[from] db::DbStartError),
    #[error("invalid configuration: {0}")]
    Keys(String),
    #[error("cannot start the scheduler: {0}")]
    Scheduler(String),
}

/// The whole HTTP application over a state; tests build exactly this.
pub fn app(state: AppState) -> Router {
    let config = state.config();
    let api = Router::new()
        .merge(api::health::router())
        .merge(api::token::router())
        .merge(api::droplets::router())
        .merge(api::tasks::router())
        .fallback(|| async { ApiError::not_found("Not found") });
    api.layer(axum::middleware::from_fn_with_state(
        state.clone(),
        api::middleware::observe,
    ))
    .layer(axum::middleware::from_fn(api::middleware::security_headers))
    .layer(cors(&config))
    .layer(tower_http::timeout::TimeoutLayer::with_status_code(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_secs(config.request_timeout_seconds),
    ))
    .layer(DefaultBodyLimit::max(config.max_body_bytes))
    .with_state(state)
}

fn cors(config: &Config) -> CorsLayer {
    let origins: Vec<_> = config
        .cors_origins
        .iter()
        .filter(|o| *o != "*")
        .filter_map(|o| o.parse().ok())
        .collect();
    let layer = CorsLayer::new()
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("x-trace-id"),
        ])
        .expose_headers([HeaderName::from_static("x-trace-id")])
        .max_age(Duration::from_secs(600));
    if config.cors_origins.iter().any(|o| o == "*") && !config.cors_allow_credentials {
        layer.allow_origin(AllowOrigin::any())
    } else {
        layer
            .allow_origin(AllowOrigin::list(origins))
            .allow_credentials(config.cors_allow_credentials)
    }
}

/// Connects to the database (creating and migrating it) and builds the shared state.
pub async fn build_state(config: Config, log: LogHandle) -> Result<AppState, StartError> {
    let keys = auth::Keys::from_config(&config).map_err(StartError::Keys)?;
    let pool = db::connect(&config).await?;
    Ok(AppState::new(pool, config, keys, log))
}

/// Starts the background work: the event listener, immediate routing, the process sampler
/// and the five scheduled jobs.
pub async fn start_background(state: &AppState) -> Result<(), StartError> {
    let stop = state.shutdown.clone();
    tokio::spawn(services::events::run_listener(state.clone(), stop.clone()));
    tokio::spawn(services::task_router::run_loop(state.clone(), stop.clone()));
    tokio::spawn(system::run_sampler(state.clone(), stop));
    jobs::start(state).await.map_err(StartError::Scheduler)
}

/// A running server: its state and address.
pub struct Running {
    pub state: AppState,
    pub addr: SocketAddr,
    pub handle: tokio::task::JoinHandle<()>,
}

/// Serves the app on `listener` until `shutdown` resolves or the state's shutdown token is
/// cancelled; then stops accepting, lets in-flight requests finish, closes every WebSocket
/// with 1001, stops the jobs and closes the pool.
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let token = state.shutdown.clone();
    let signal = {
        let token = token.clone();
        async move {
            tokio::select! {
                _ = shutdown => {}
                _ = token.cancelled() => {}
            }
        }
    };
    let closing = {
        let state = state.clone();
        async move {
            signal.await;
            tracing::info!("shutting down: finishing in-flight requests");
            state.events.close_all(1001, "server shutting down");
            state.shutdown.cancel();
        }
    };
    let app = app(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(closing)
        .await
    {
        tracing::error!(error = %e, "server error");
    }
    jobs::stop(&state).await;
    state.db.close().await;
}

/// Builds everything and serves on `listener` in the background (tests and the binary).
pub async fn spawn(
    config: Config,
    listener: TcpListener,
    log: LogHandle,
) -> Result<Running, StartError> {
    let state = build_state(config, log).await?;
    start_background(&state).await?;
    let addr = listener
        .local_addr()
        .map_err(|e| StartError::Keys(e.to_string()))?;
    let handle = tokio::spawn(serve(state.clone(), listener, std::future::pending()));
    Ok(Running {
        state,
        addr,
        handle,
    })
}
