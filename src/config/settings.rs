//! The one table of settings: each variable declared once, with its default and meaning (the
//! README's configuration table and `.env.example`), whether a reload may change it, whether
//! it is secret, how it is parsed, and the `Config` field it fills. `check` holds the rules
//! that involve two settings.

use std::net::IpAddr;
use std::time::Duration;

use super::parse::Reader;
use super::redact::{redact_url, set_or_unset, Shown, MASK};
use super::table::{always_same, keep_nothing, kept, settings, Setting};
use super::{invalid, ConfigError, Environment, Secret};

settings! {
    environment: Environment = "ENVIRONMENT" {
        default: "development",
        help: "development or production (production: 32+ byte JWT secret required, /token closed, JSON logs, Swagger off)",
        restart: true,
        parse: environment(),
    }
    host: IpAddr = "HOST" {
        default: "127.0.0.1 (development), 0.0.0.0 (production)",
        help: "address to bind",
        restart: true,
        parse: host(environment),
    }
    port: u16 = "PORT" {
        default: "8000",
        help: "port to bind",
        restart: true,
        parse: number(8000u16, 0, u16::MAX),
    }
    workers: Option<usize> = "WORKERS" {
        default: "number of cores",
        help: "runtime worker threads",
        restart: true,
        parse: workers(),
        show: |c| c.workers.map_or("(cores)".into(), |w| w.to_string()),
    }
    "RELOAD" {
        default: "false",
        help: "accepted and ignored (Python's auto-reload)",
    }
    log_level: String = "LOG_LEVEL" {
        default: "INFO",
        help: "log level: Python's names (DEBUG, INFO, WARNING, ERROR) or a tracing filter",
        parse: log_level(),
    }

    database_url: String = "DATABASE_URL" {
        default: "postgres://postgres@localhost:5432/orchestrator",
        help: "PostgreSQL; the database is created if missing and migrated at start-up",
        restart: true,
        parse: database_url("postgres://postgres@localhost:5432/orchestrator"),
        show: |c| redact_url(&c.database_url),
    }
    database_pool_size: u32 = "DATABASE_POOL_SIZE" {
        default: "20",
        help: "pool connections (with DATABASE_MAX_OVERFLOW: the pool's maximum)",
        restart: true,
        parse: number(20u32, 0, 10_000),
    }
    database_max_overflow: u32 = "DATABASE_MAX_OVERFLOW" {
        default: "10",
        help: "extra pool connections",
        restart: true,
        parse: number(10u32, 0, 10_000),
    }
    database_acquire_timeout: Duration = "DATABASE_ACQUIRE_TIMEOUT_SECONDS" {
        default: "3",
        help: "how long a request waits for a connection before answering 503",
        restart: true,
        parse: seconds(3, 1, 600),
    }

    /// The JWT secret; one is generated when none is given (development only).
    jwt_secret_key: Secret = "JWT_SECRET_KEY" {
        default: "random per process (development); required, 32+ bytes (production)",
        help: "HS256 secret",
        restart: true,
        secret: true,
        parse: jwt_secret(environment),
        show: |c| if c.jwt_secret_generated {
            "(generated for this process)".into()
        } else {
            MASK.into()
        },
        // A secret generated per process is not a setting that changed.
        same: |a, b| {
            (a.jwt_secret_generated && b.jwt_secret_generated) || a.jwt_secret_key == b.jwt_secret_key
        },
        keep: |next, current| {
            next.jwt_secret_key = current.jwt_secret_key.clone();
            next.jwt_secret_generated = current.jwt_secret_generated;
        },
    }
    jwt_algorithm: String = "JWT_ALGORITHM" {
        default: "HS256",
        help: "algorithm of the tokens /token mints (HS256)",
        restart: true,
        parse: jwt_algorithm(),
    }
    jwt_expiration_seconds: u64 = "JWT_EXPIRATION_SECONDS" {
        default: "86400",
        help: "lifetime of minted tokens",
        restart: true,
        parse: number(86_400u64, 1, 10 * 365 * 86_400),
    }
    registry_public_key: Option<String> = "REGISTRY_PUBLIC_KEY" {
        default: "unset",
        help: "PEM text or path: RS256 tokens signed by the Registry are accepted",
        restart: true,
        secret: true,
        parse: optional(),
        show: |c| set_or_unset(&c.registry_public_key),
    }
    orchestrator_private_key: Option<String> = "ORCHESTRATOR_PRIVATE_KEY" {
        default: "unset",
        help: "PEM text or path: tokens the orchestrator sends are RS256",
        restart: true,
        secret: true,
        parse: optional(),
        show: |c| set_or_unset(&c.orchestrator_private_key),
    }

    registry_url: Option<String> = "REGISTRY_URL" {
        default: "unset (Registry off)",
        help: "the Registry's base URL",
        parse: base_url(),
    }
    registry_sync_interval: u64 = "REGISTRY_SYNC_INTERVAL" {
        default: "300",
        help: "seconds between Registry directory syncs",
        parse: interval(300),
    }
    /// A token the Registry issued to the orchestrator (bearer and `signature` of dispatch).
    registry_token: Option<Secret> = "REGISTRY_TOKEN" {
        default: "unset",
        help: "a token the Registry issued to the orchestrator: sent as the bearer and the envelope's signature of deliveries",
        restart: true,
        secret: true,
        parse: secret(),
    }
    /// The orchestrator's Registry credential (`X-Registry-Key`) to fetch such a token.
    registry_key: Option<Secret> = "REGISTRY_KEY" {
        default: "unset",
        help: "the orchestrator's Registry key: a token is fetched from REGISTRY_URL/auth/token with it",
        restart: true,
        secret: true,
        parse: secret(),
    }
    /// Fetch the Registry's public key over https (off: only `REGISTRY_PUBLIC_KEY`).
    registry_fetch_public_key: bool = "REGISTRY_FETCH_PUBLIC_KEY" {
        default: "false",
        help: "fetch the Registry's public key from REGISTRY_URL (https only) when REGISTRY_PUBLIC_KEY is unset",
        restart: true,
        parse: flag(false),
    }
    /// `iss` of RS256 outbound tokens, when set.
    registry_issuer: Option<String> = "REGISTRY_ISSUER" {
        default: "unset",
        help: "iss claim of RS256 tokens the orchestrator sends",
        restart: true,
        parse: optional(),
    }
    /// `aud` of RS256 outbound tokens, when set.
    registry_audience: Option<String> = "REGISTRY_AUDIENCE" {
        default: "unset",
        help: "aud claim of RS256 tokens the orchestrator sends",
        restart: true,
        parse: optional(),
    }
    outbound_token_seconds: u64 = "OUTBOUND_TOKEN_SECONDS" {
        default: "300",
        help: "lifetime of the tokens the orchestrator sends",
        restart: true,
        parse: number(300u64, 30, 3600),
    }

    droplet_id: i32 = "DROPLET_ID" {
        default: "10",
        help: "this droplet's id",
        restart: true,
        parse: number(10i32, 1, i32::MAX),
    }
    droplet_name: String = "DROPLET_NAME" {
        default: "Orchestrator",
        help: "this droplet's name",
        parse: string("Orchestrator"),
    }
    droplet_steward: String = "DROPLET_STEWARD" {
        default: "Tnsae",
        help: "this droplet's steward",
        restart: true,
        parse: string("Tnsae"),
    }
    droplet_endpoint: String = "DROPLET_ENDPOINT" {
        default: "https://drop10.fullpotential.ai",
        help: "this droplet's public URL",
        parse: string("https://drop10.fullpotential.ai"),
    }

    heartbeat_interval: u64 = "HEARTBEAT_INTERVAL" {
        default: "60",
        help: "seconds between heartbeats droplets are told to use",
        parse: interval(60),
    }
    heartbeat_check_interval: u64 = "HEARTBEAT_CHECK_INTERVAL" {
        default: "60",
        help: "seconds between health monitor runs",
        parse: interval(60),
    }
    heartbeat_timeout: u64 = "HEARTBEAT_TIMEOUT" {
        default: "90",
        help: "seconds without a heartbeat before a droplet is inactive",
        parse: interval(90),
    }
    heartbeat_cleanup_interval: u64 = "HEARTBEAT_CLEANUP_INTERVAL" {
        default: "3600",
        help: "seconds between heartbeat cleanups",
        parse: interval(3600),
    }
    heartbeat_retention_days: u64 = "HEARTBEAT_RETENTION_DAYS" {
        default: "7",
        help: "days heartbeat rows are kept",
        parse: number(7u64, 1, 3650),
    }
    /// Days finished tasks are kept (0: forever).
    task_retention_days: u64 = "TASK_RETENTION_DAYS" {
        default: "0",
        help: "days finished tasks (completed, cancelled, failed for good) are kept with their history; 0 keeps them forever",
        parse: number(0u64, 0, 36_500),
    }
    task_router_interval: u64 = "TASK_ROUTER_INTERVAL" {
        default: "10",
        help: "seconds between the router's safety-net passes",
        parse: interval(10),
    }
    assignment_timeout_seconds: u64 = "ASSIGNMENT_TIMEOUT_SECONDS" {
        default: "300",
        help: "assigned but not started for this long: back to pending",
        parse: interval(300),
    }
    priority_aging_seconds: u64 = "PRIORITY_AGING_SECONDS" {
        default: "300",
        help: "a pending task counts one priority more urgent per this many seconds waited, up to the most urgent (0: no aging)",
        parse: number(300u64, 0, 86_400 * 365),
    }
    max_requeues: u32 = "MAX_REQUEUES" {
        default: "3",
        help: "times one task may be requeued for not starting in time; the next timeout fails it (then the retry rules apply)",
        parse: number(3u32, 0, 1000),
    }
    assignment_timeouts_before_error: u32 = "ASSIGNMENT_TIMEOUTS_BEFORE_ERROR" {
        default: "3",
        help: "tasks a droplet lets time out in a row (never started) before it is marked error",
        parse: number(3u32, 1, 1000),
    }
    retry_backoff_seconds: u64 = "RETRY_BACKOFF_SECONDS" {
        default: "5",
        help: "first retry delay, doubled per attempt",
        parse: number(5u64, 0, 86_400),
    }
    retry_backoff_max_seconds: u64 = "RETRY_BACKOFF_MAX_SECONDS" {
        default: "300",
        help: "longest retry delay",
        parse: number(300u64, 0, 86_400 * 7),
    }
    dispatch_timeout_seconds: u64 = "DISPATCH_TIMEOUT_SECONDS" {
        default: "5",
        help: "timeout of one delivery to a droplet",
        parse: interval(5),
    }
    dispatch_concurrency: usize = "DISPATCH_CONCURRENCY" {
        default: "64",
        help: "deliveries to droplets in flight at once",
        restart: true,
        parse: number(64usize, 1, 10_000),
    }
    dispatch_per_droplet_concurrency: usize = "DISPATCH_PER_DROPLET_CONCURRENCY" {
        default: "4",
        help: "deliveries to one droplet in flight at once",
        restart: true,
        parse: number(4usize, 1, 10_000),
    }
    dispatch_queue_bodies: usize = "DISPATCH_QUEUE_BODIES" {
        default: "8192",
        help: "queued deliveries that keep their task in memory; the rest are read back",
        restart: true,
        parse: number(8192usize, 0, 1_000_000),
    }
    dispatch_refusals_before_error: u32 = "DISPATCH_REFUSALS_BEFORE_ERROR" {
        default: "3",
        help: "deliveries a droplet refuses in a row (4xx) before it is marked error",
        parse: number(3u32, 1, 1000),
    }
    dispatch_failures_before_unreachable: u32 = "DISPATCH_FAILURES_BEFORE_UNREACHABLE" {
        default: "5",
        help: "deliveries to a droplet that cannot connect or time out, in a row, before it is marked unreachable (error) and probed",
        parse: number(5u32, 1, 1000),
    }
    /// Networks registered endpoints may resolve to (empty: any but the refused kinds); a list
    /// narrows the checks and never lifts them, see `services::endpoints::EndpointPolicy`.
    endpoint_allowed_networks: Vec<ipnet::IpNet> = "ENDPOINT_ALLOWED_NETWORKS" {
        default: "unset (any but loopback, link-local, multicast, unspecified in production)",
        help: "CIDR list registered endpoints must resolve into; it only narrows the checks: loopback and link-local stay refused unless a listed network lies wholly inside them (`127.0.0.1/32` opts in, `0.0.0.0/0` does not); unspecified and multicast never",
        parse: networks(),
    }

    /// The names `/send` and `/broadcast` relay (empty: any of the allowed shape); the
    /// orchestrator's own are refused whatever is listed, see `services::messaging`.
    relay_allowed_names: Vec<String> = "RELAY_ALLOWED_NAMES" {
        default: "unset (any name of a-z 0-9 _ . : / - but the orchestrator's own)",
        help: "comma-separated command and event names /send and /broadcast may relay at a payload's top level (compared trimmed and in lower case); the orchestrator's own names stay refused whatever is listed",
        parse: names(),
    }

    ws_heartbeat_interval: u64 = "WS_HEARTBEAT_INTERVAL" {
        default: "30",
        help: "seconds between WebSocket pings; no answer in two: dropped",
        parse: interval(30),
    }
    ws_max_connections_per_droplet: usize = "WS_MAX_CONNECTIONS_PER_DROPLET" {
        default: "10",
        help: "concurrent WebSockets per droplet id",
        parse: number(10usize, 1, 1_000_000),
    }
    ws_client_queue: usize = "WS_CLIENT_QUEUE" {
        default: "1024",
        help: "events queued for one WebSocket client before it is dropped as too slow",
        restart: true,
        parse: number(1024usize, 1, 1_000_000),
    }
    ws_send_timeout: Duration = "WS_SEND_TIMEOUT_SECONDS" {
        default: "10",
        help: "how long one frame may wait for a WebSocket client to read; longer: dropped (1013)",
        parse: seconds(10, 1, 600),
    }
    ws_max_message_bytes: usize = "WS_MAX_MESSAGE_BYTES" {
        default: "4096",
        help: "largest message a WebSocket client may send",
        restart: true,
        parse: number(4096usize, 256, 1 << 20),
    }
    ws_max_connections: usize = "WS_MAX_CONNECTIONS" {
        default: "15000",
        help: "concurrent WebSockets in all",
        restart: true,
        parse: number(15_000usize, 1, 10_000_000),
    }
    /// How long events stay in the log clients resume from.
    event_retention_seconds: u64 = "EVENT_RETENTION_SECONDS" {
        default: "3600",
        help: "how long events are kept for clients resuming with ?after=<event_id>",
        parse: number(3600u64, 10, 30 * 86_400),
    }
    /// How often the relay looks for events without a wake-up: a write on this replica wakes
    /// it after its commit; another replica's writes are found by this poll.
    event_relay_poll: Duration = "EVENT_RELAY_POLL_MS" {
        default: "100",
        help: "milliseconds between the event relay's looks for events written on other replicas (this replica's writes wake it at their commit)",
        parse: millis(100, 10, 60_000),
    }

    enable_auto_recovery: bool = "ENABLE_AUTO_RECOVERY" {
        default: "true",
        help: "requeue and retry the tasks of lost droplets",
        parse: flag(true),
    }
    enable_swagger: bool = "ENABLE_SWAGGER" {
        default: "true (development), false (production)",
        help: "serve Swagger UI at /docs",
        // Production turns Swagger off unless it is asked for explicitly.
        parse: flag(!environment.is_production()),
    }
    enable_metrics: bool = "ENABLE_METRICS" {
        default: "true",
        help: "serve /metrics and /metrics/*",
        parse: flag(true),
    }

    rate_limit_per_minute: u32 = "RATE_LIMIT_PER_MINUTE" {
        default: "100",
        help: "requests a minute per droplet (per address without a token), 1-10000000",
        parse: number(100u32, 1, 10_000_000),
    }
    broadcast_rate_limit_per_minute: u32 = "BROADCAST_RATE_LIMIT_PER_MINUTE" {
        default: "10",
        help: "/broadcast calls a minute",
        parse: number(10u32, 1, 10_000_000),
    }
    max_body_bytes: usize = "MAX_BODY_BYTES" {
        default: "1048576",
        help: "largest request body",
        restart: true,
        parse: number(1_048_576usize, 1024, 1 << 30),
    }
    request_timeout_seconds: u64 = "REQUEST_TIMEOUT_SECONDS" {
        default: "30",
        help: "longest a request may take",
        parse: number(30u64, 1, 3600),
    }
    header_read_timeout_seconds: u64 = "HEADER_READ_TIMEOUT_SECONDS" {
        default: "10",
        help: "longest a client may take to send a request's headers",
        restart: true,
        parse: number(10u64, 1, 3600),
    }
    max_connections: usize = "MAX_CONNECTIONS" {
        default: "16384",
        help: "open client connections at once; more wait to be accepted",
        restart: true,
        parse: number(16_384usize, 1, 10_000_000),
    }
    cors_origins: Vec<String> = "CORS_ORIGINS" {
        default: "none allowed",
        help: "allowed origins: a JSON list or comma-separated",
        parse: origins(),
    }
    cors_allow_credentials: bool = "CORS_ALLOW_CREDENTIALS" {
        default: "false",
        help: "allow credentials on CORS requests (never with *)",
        restart: true,
        parse: flag(false),
    }

    @derived {
        /// True when no secret was given and one was generated for this process.
        jwt_secret_generated: bool = unset("JWT_SECRET_KEY");
    }
}

/// The rules that involve more than one setting, after each was parsed on its own.
pub(super) fn check(config: &Config) -> Result<(), ConfigError> {
    if config.cors_allow_credentials && config.cors_origins.iter().any(|o| o == "*") {
        return Err(invalid(
            "CORS_ORIGINS",
            "\"*\" cannot be combined with CORS_ALLOW_CREDENTIALS=true; list the origins",
        ));
    }
    if config.database_pool_size + config.database_max_overflow == 0 {
        return Err(invalid(
            "DATABASE_POOL_SIZE",
            "DATABASE_POOL_SIZE + DATABASE_MAX_OVERFLOW must be at least 1",
        ));
    }
    Ok(())
}
