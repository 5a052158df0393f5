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
pub mod simulate;
pub mod state;
pub mod system;
pub mod telemetry;
pub mod udc;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
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
        .merge(api::dashboard::router())
        .merge(api::message::router())
        .merge(api::metrics::router())
        .merge(api::openapi::router())
        .merge(api::prometheus::router())
        .merge(api::ws::router())
        .merge(api::management::router())
        .fallback(|| async { ApiError::not_found("Not found") });
    let limits = Arc::new(api::ratelimit::RateLimits::new(
        config.rate_limit_per_minute,
        config.broadcast_rate_limit_per_minute,
    ));
    // Innermost first. Every layer wraps every route and the fallback, so `observe` (the
    // outermost) gives each response, the 404s, 413s, 429s, timeouts and CORS preflights
    // included, its X-Trace-Id, span and metrics; CORS headers reach the 429s too.
    api.layer(axum::middleware::from_fn_with_state(
        (state.clone(), limits),
        api::ratelimit::enforce,
    ))
    .layer(axum::middleware::from_fn_with_state(
        config.max_body_bytes,
        api::middleware::body_limit,
    ))
    .layer(DefaultBodyLimit::max(config.max_body_bytes))
    .layer(axum::middleware::from_fn_with_state(
        state.clone(),
        api::middleware::timeout,
    ))
    .layer(cors(&state, &config))
    .layer(axum::middleware::from_fn(api::middleware::security_headers))
    .layer(axum::middleware::from_fn_with_state(
        state.clone(),
        api::middleware::observe,
    ))
    .with_state(state)
}

/// CORS: the allowed origins are read per request, so `/management/reload-config` changes
/// them live; whether credentials are allowed is fixed at start-up.
fn cors(state: &AppState, config: &Config) -> CorsLayer {
    let live = state.clone();
    let allowed = AllowOrigin::predicate(move |origin, _| {
        let origins = &live.config().cors_origins;
        origins
            .iter()
            .any(|o| o == "*" || o.as_bytes() == origin.as_bytes())
    });
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
    layer
        .allow_origin(allowed)
        .allow_credentials(config.cors_allow_credentials)
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
    tokio::spawn(services::registry_client::run_at_startup(state.clone()));
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
    // Upgraded sockets run outside the server's connection tracking: give their 1001 close
    // frames a moment to leave before the process exits.
    state.events.wait_closed(Duration::from_secs(3)).await;
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
