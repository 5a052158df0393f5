//! The orchestrator binary: configuration, telemetry, serve, shutdown.

use std::process::ExitCode;

use clap::Parser;
use orchestrator::auth::{Keys, Permission};
use orchestrator::cli::{Cli, Command};
use orchestrator::config::Config;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc (v2) `mi_option_purge_delay` (`mimalloc.h`; the Rust bindings name no constant
/// for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // Freed memory goes back to the system at once rather than after a delay that only
    // passes while the freeing thread allocates again: an idle worker thread would otherwise
    // keep the peak of the last burst resident (130 MB instead of 73 MB after 100,000
    // assignments, see BENCHMARKS.md).
    // SAFETY: sets one of mimalloc's documented options before any other thread runs.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    let cli = Cli::parse();
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("orchestrator: {e}");
            return ExitCode::from(2);
        }
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(workers) = config.workers {
        runtime.worker_threads(workers);
    }
    let runtime = match runtime.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("orchestrator: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli.command.unwrap_or(Command::Serve), config))
}

async fn run(command: Command, config: Config) -> ExitCode {
    match command {
        Command::CheckConfig => {
            // The keys are parsed too: a PEM that does not load fails here, not at start-up.
            if let Err(e) = Keys::from_config(&config) {
                eprintln!("orchestrator: invalid configuration: {e}");
                return ExitCode::from(2);
            }
            for warning in config.warnings() {
                eprintln!("orchestrator: warning: {warning}");
            }
            for (name, value) in config.describe() {
                println!("{name}={value}");
            }
            ExitCode::SUCCESS
        }
        Command::Token {
            droplet_id,
            steward,
            permissions,
            expires_in,
        } => {
            if droplet_id == config.droplet_id {
                eprintln!(
                    "orchestrator: droplet id {droplet_id} is the orchestrator's own (DROPLET_ID); \
                     the orchestrator refuses every token that names it"
                );
                return ExitCode::from(2);
            }
            let mut perms = Vec::new();
            for p in permissions
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
            {
                match Permission::parse(p) {
                    Some(p) => perms.push(p),
                    None => {
                        eprintln!(
                            "orchestrator: unknown permission {p:?} (expected read, write, admin)"
                        );
                        return ExitCode::from(2);
                    }
                }
            }
            if config.jwt_secret_generated {
                eprintln!("orchestrator: JWT_SECRET_KEY is not set; a token signed with a random secret would be useless");
                return ExitCode::from(2);
            }
            let keys = match Keys::from_config(&config) {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("orchestrator: {e}");
                    return ExitCode::from(2);
                }
            };
            match keys.mint(
                droplet_id,
                Some(steward),
                &perms,
                expires_in.unwrap_or(config.jwt_expiration_seconds),
            ) {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("orchestrator: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Migrate => {
            orchestrator::telemetry::init(&config);
            match orchestrator::db::connect(&config).await {
                Ok(pool) => {
                    pool.close().await;
                    println!("migrations applied");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("orchestrator: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Serve => serve(config).await,
        Command::Healthcheck { url } => healthcheck(&config, url).await,
    }
}

async fn serve(config: Config) -> ExitCode {
    let log = orchestrator::telemetry::init(&config);
    if config.jwt_secret_generated {
        tracing::warn!("JWT_SECRET_KEY is not set: using a random secret for this process (tokens end with it)");
    }
    if config.token_endpoint_open() {
        tracing::warn!("ENVIRONMENT=development: POST /token is open to anyone");
    }
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let addr = std::net::SocketAddr::new(config.host, config.port);
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("orchestrator: cannot listen on {addr}: {e} (is another process using port {}? set PORT)", config.port);
            return ExitCode::FAILURE;
        }
    };
    let state = match orchestrator::build_state(config, log).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("orchestrator: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = orchestrator::start_background(&state).await {
        eprintln!("orchestrator: {e}");
        return ExitCode::FAILURE;
    }
    let config = state.config();
    tracing::info!(
        %addr,
        version = env!("CARGO_PKG_VERSION"),
        max_connections = config.max_connections,
        ws_max_connections = config.ws_max_connections,
        header_read_timeout_seconds = config.header_read_timeout_seconds,
        "orchestrator listening"
    );
    warn_if_too_few_files(config.max_connections);
    orchestrator::serve(state, listener, shutdown_signal()).await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// Every client connection (a WebSocket too) is a file descriptor: warns when the process
/// may open fewer files than `MAX_CONNECTIONS` and what else it holds (database pool, outbound
/// deliveries, logs) need, since accepting then fails instead of waiting for a slot.
fn warn_if_too_few_files(max_connections: usize) {
    const OTHER_FILES: u64 = 512;
    let Some(limit) = open_files_limit() else {
        return;
    };
    let needed = max_connections as u64 + OTHER_FILES;
    if limit < needed {
        tracing::warn!(
            open_files_limit = limit,
            max_connections,
            "the process may open {limit} files but MAX_CONNECTIONS needs about {needed}: \
             raise the limit (ulimit -n, or the container's nofile) or lower MAX_CONNECTIONS"
        );
    }
}

/// The soft limit of open files (Linux: /proc/self/limits); `None` when unknown or unlimited.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// GET /health of the local service (or `url`) within three seconds.
async fn healthcheck(config: &Config, url: Option<String>) -> ExitCode {
    let url = url.unwrap_or_else(|| {
        // A service bound to every address is reached on loopback.
        let host = match config.host {
            std::net::IpAddr::V4(ip) if ip.is_unspecified() => "127.0.0.1".to_string(),
            std::net::IpAddr::V6(ip) if ip.is_unspecified() => "[::1]".to_string(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        format!("http://{host}:{}/health", config.port)
    });
    let client = match reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(3))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("orchestrator: {e}");
            return ExitCode::FAILURE;
        }
    };
    match client.get(&url).send().await {
        Ok(r) if r.status().is_success() => ExitCode::SUCCESS,
        Ok(r) => {
            eprintln!("orchestrator: {url} answered {}", r.status());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("orchestrator: {url}: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
