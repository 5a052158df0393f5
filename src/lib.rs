//! Droplet #10, the orchestrator: routes tasks to droplets, tracks them through a state
//! machine, recovers work from droplets that die, and streams every change to dashboards.

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod db;
pub mod error;
pub mod identity;
pub mod instruments;
pub mod jobs;
pub mod protocol;
pub mod services;
pub mod state;
pub mod system;
pub mod telemetry;
pub mod udc;
pub mod validation;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, DefaultBodyLimit};
use axum::http::{header, HeaderName, Method};
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
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
    #[error("{0}")]
    HttpClient(#[from] services::http_client::ClientBuildError),
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
        .merge(api::drain::router())
        .merge(api::limits::router())
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
    Ok(AppState::new(pool, config, keys, log)?)
}

/// Starts the background work: the event relay and reader, immediate routing, the process sampler
/// and the scheduled jobs (`jobs::JobId::ALL`).
pub async fn start_background(state: &AppState) -> Result<(), StartError> {
    let stop = state.shutdown.clone();
    // The relay hands its rounds to this replica's reader (a few rounds' room; a reader that
    // lags reads the log instead).
    let (relayed, rounds) = tokio::sync::mpsc::channel(16);
    tokio::spawn(services::events::run_listener(
        (&state.core).into(),
        rounds,
        stop.clone(),
    ));
    tokio::spawn(services::events::run_relay(
        state.db.clone(),
        state.keys.orchestrator_id(),
        state.settings.clone(),
        state.relay.clone(),
        relayed,
        stop.clone(),
    ));
    tokio::spawn(services::task_recovery::run_refusals(
        state.changes(),
        stop.clone(),
    ));
    tokio::spawn(services::dispatch::probe::run(
        state.courier(),
        stop.clone(),
    ));
    tokio::spawn(services::dispatch::run_workers(
        state.courier(),
        stop.clone(),
    ));
    tokio::spawn(services::task_router::run_loop(
        state.routing(),
        stop.clone(),
    ));
    tokio::spawn(system::run_sampler(state.process.clone(), stop));
    let core = state.core.clone();
    tokio::spawn(async move {
        services::registry_client::run_at_startup((&core).into()).await;
    });
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
///
/// Each connection is HTTP/1.1 with WebSocket upgrades. A client gets
/// `HEADER_READ_TIMEOUT_SECONDS` to send a request's headers (a first request's as well as an
/// idle keep-alive connection's next one), then the connection is closed: half-open
/// connections are not held. At most `MAX_CONNECTIONS` client connections are open at once
/// (an upgraded WebSocket keeps its slot until it closes); past that, new connections wait in
/// the listen backlog until one closes.
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
    let max_connections = state.config().max_connections;
    let slots = Arc::new(Semaphore::new(max_connections));
    let app = app(state.clone());
    let drain = CancellationToken::new();
    let connections = TaskTracker::new();
    let mut full_since_warned: Option<Instant> = None;
    tokio::pin!(closing);
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if full_since_warned.is_none_or(|t| t.elapsed() >= FULL_WARNING_EVERY) {
                    tracing::warn!(
                        max_connections,
                        "connection limit reached (MAX_CONNECTIONS): new connections wait"
                    );
                    full_since_warned = Some(Instant::now());
                }
                tokio::select! {
                    biased;
                    _ = &mut closing => break,
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                }
            }
        };
        let (stream, remote) = tokio::select! {
            biased;
            _ = &mut closing => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        let header_timeout = Duration::from_secs(state.config().header_read_timeout_seconds);
        connections.spawn(serve_connection(
            app.clone(),
            stream,
            remote,
            slot,
            header_timeout,
            drain.clone(),
        ));
    }
    // No new connections; the open ones finish their requests (idle ones close at once).
    drop(listener);
    drain.cancel();
    connections.close();
    connections.wait().await;
    // Upgraded sockets run outside the server's connection tracking: give their 1001 close
    // frames a moment to leave before the process exits.
    state.events.wait_closed(Duration::from_secs(3)).await;
    jobs::stop(&state).await;
    state.db.close().await;
}

/// How often "connection limit reached" may be logged while the server stays full.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(60);

/// One client connection: HTTP/1.1 with upgrades, the header read timeout, the client's
/// address as `ConnectInfo<SocketAddr>` (the rate limiter keys anonymous requests by it),
/// and a graceful end when the server drains.
async fn serve_connection(
    app: Router,
    stream: TcpStream,
    remote: SocketAddr,
    slot: OwnedSemaphorePermit,
    header_timeout: Duration,
    drain: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(Counted {
        io: stream,
        _slot: slot,
    });
    let service = app.map_request(move |mut request: axum::http::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(remote));
        request
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let connection = builder
        .serve_connection(io, TowerToHyperService::new(service))
        .with_upgrades();
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = drain.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, client = %remote, "connection ended with an error");
    }
}

/// As hyper 0.14 and axum do: a failed accept of one connection is nothing; anything else
/// (out of file descriptors, most likely) is logged and retried after a pause, as the process
/// will likely close some connections meanwhile.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept failed; retrying in a second");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// A client's TCP stream holding its slot under `MAX_CONNECTIONS`: the slot is freed when the
/// stream is dropped, which for a WebSocket is when the upgraded socket closes.
struct Counted {
    io: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
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
