//! Every setting of the service, read from the environment (and `.env`), parsed and checked once.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

/// Where the service runs; production tightens defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    Development,
    Production,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Development => "development",
            Environment::Production => "production",
        }
    }
}

/// A setting that could not be used; start-up stops with this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {variable}: {message}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub message: String,
}

fn invalid(variable: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        variable,
        message: message.into(),
    }
}

/// The JWT secret, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"********\"")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub environment: Environment,
    pub host: IpAddr,
    pub port: u16,
    pub workers: Option<usize>,
    pub log_level: String,

    pub database_url: String,
    pub database_pool_size: u32,
    pub database_max_overflow: u32,
    pub database_acquire_timeout: Duration,

    pub jwt_secret_key: Secret,
    /// True when no secret was given and one was generated for this process.
    pub jwt_secret_generated: bool,
    pub jwt_algorithm: String,
    pub jwt_expiration_seconds: u64,
    pub registry_public_key: Option<String>,
    pub orchestrator_private_key: Option<String>,

    pub registry_url: Option<String>,
    pub registry_sync_interval: u64,
    /// A token the Registry issued to the orchestrator (bearer and `signature` of dispatch).
    pub registry_token: Option<Secret>,
    /// The orchestrator's Registry credential (`X-Registry-Key`) to fetch such a token.
    pub registry_key: Option<Secret>,
    /// Fetch the Registry's public key over https (off: only `REGISTRY_PUBLIC_KEY`).
    pub registry_fetch_public_key: bool,
    /// `iss`/`aud` of RS256 outbound tokens, when set.
    pub registry_issuer: Option<String>,
    pub registry_audience: Option<String>,
    pub outbound_token_seconds: u64,

    pub droplet_id: i32,
    pub droplet_name: String,
    pub droplet_steward: String,
    pub droplet_endpoint: String,

    pub heartbeat_interval: u64,
    pub heartbeat_check_interval: u64,
    pub heartbeat_timeout: u64,
    pub heartbeat_cleanup_interval: u64,
    pub heartbeat_retention_days: u64,
    /// Days finished tasks are kept (0: forever).
    pub task_retention_days: u64,
    pub task_router_interval: u64,
    pub assignment_timeout_seconds: u64,
    pub retry_backoff_seconds: u64,
    pub retry_backoff_max_seconds: u64,
    pub dispatch_timeout_seconds: u64,
    pub dispatch_concurrency: usize,
    pub dispatch_per_droplet_concurrency: usize,
    pub dispatch_refusals_before_error: u32,
    /// Networks registered endpoints may resolve to (empty: any but the refused kinds).
    pub endpoint_allowed_networks: Vec<ipnet::IpNet>,

    pub ws_heartbeat_interval: u64,
    pub ws_max_connections_per_droplet: usize,
    pub ws_client_queue: usize,
    pub ws_max_message_bytes: usize,
    pub ws_max_connections: usize,
    /// How long events stay in the log clients resume from.
    pub event_retention_seconds: u64,

    pub enable_auto_recovery: bool,
    pub enable_swagger: bool,
    pub enable_metrics: bool,

    pub rate_limit_per_minute: u32,
    pub broadcast_rate_limit_per_minute: u32,
    pub max_body_bytes: usize,
    pub request_timeout_seconds: u64,
    pub header_read_timeout_seconds: u64,
    pub max_connections: usize,
    pub cors_origins: Vec<String>,
    pub cors_allow_credentials: bool,
}

/// Every variable the service reads, with its default and meaning (README and `check-config`).
pub const VARIABLES: &[(&str, &str, &str)] = &[
    ("ENVIRONMENT", "development", "development or production (production: 32+ byte JWT secret required, /token closed, JSON logs, Swagger off)"),
    ("HOST", "127.0.0.1 (development), 0.0.0.0 (production)", "address to bind"),
    ("PORT", "8000", "port to bind"),
    ("WORKERS", "number of cores", "runtime worker threads"),
    ("RELOAD", "false", "accepted and ignored (Python's auto-reload)"),
    ("LOG_LEVEL", "INFO", "log level: Python's names (DEBUG, INFO, WARNING, ERROR) or a tracing filter"),
    ("DATABASE_URL", "postgres://postgres@localhost:5432/orchestrator", "PostgreSQL; the database is created if missing and migrated at start-up"),
    ("DATABASE_POOL_SIZE", "20", "pool connections (with DATABASE_MAX_OVERFLOW: the pool's maximum)"),
    ("DATABASE_MAX_OVERFLOW", "10", "extra pool connections"),
    ("DATABASE_ACQUIRE_TIMEOUT_SECONDS", "3", "how long a request waits for a connection before answering 503"),
    ("JWT_SECRET_KEY", "random per process (development); required, 32+ bytes (production)", "HS256 secret"),
    ("JWT_ALGORITHM", "HS256", "algorithm of the tokens /token mints (HS256)"),
    ("JWT_EXPIRATION_SECONDS", "86400", "lifetime of minted tokens"),
    ("REGISTRY_PUBLIC_KEY", "unset", "PEM text or path: RS256 tokens signed by the Registry are accepted"),
    ("ORCHESTRATOR_PRIVATE_KEY", "unset", "PEM text or path: tokens the orchestrator sends are RS256"),
    ("REGISTRY_URL", "unset (Registry off)", "the Registry's base URL"),
    ("REGISTRY_SYNC_INTERVAL", "300", "seconds between Registry directory syncs"),
    ("REGISTRY_TOKEN", "unset", "a token the Registry issued to the orchestrator: sent as the bearer and the envelope's signature of deliveries"),
    ("REGISTRY_KEY", "unset", "the orchestrator's Registry key: a token is fetched from REGISTRY_URL/auth/token with it"),
    ("REGISTRY_FETCH_PUBLIC_KEY", "false", "fetch the Registry's public key from REGISTRY_URL (https only) when REGISTRY_PUBLIC_KEY is unset"),
    ("REGISTRY_ISSUER", "unset", "iss claim of RS256 tokens the orchestrator sends"),
    ("REGISTRY_AUDIENCE", "unset", "aud claim of RS256 tokens the orchestrator sends"),
    ("OUTBOUND_TOKEN_SECONDS", "300", "lifetime of the tokens the orchestrator sends"),
    ("DROPLET_ID", "10", "this droplet's id"),
    ("DROPLET_NAME", "Orchestrator", "this droplet's name"),
    ("DROPLET_STEWARD", "Tnsae", "this droplet's steward"),
    ("DROPLET_ENDPOINT", "https://drop10.fullpotential.ai", "this droplet's public URL"),
    ("HEARTBEAT_INTERVAL", "60", "seconds between heartbeats droplets are told to use"),
    ("HEARTBEAT_CHECK_INTERVAL", "60", "seconds between health monitor runs"),
    ("HEARTBEAT_TIMEOUT", "90", "seconds without a heartbeat before a droplet is inactive"),
    ("HEARTBEAT_CLEANUP_INTERVAL", "3600", "seconds between heartbeat cleanups"),
    ("HEARTBEAT_RETENTION_DAYS", "7", "days heartbeat rows are kept"),
    ("TASK_RETENTION_DAYS", "0", "days finished tasks (completed, cancelled, failed for good) are kept with their history; 0 keeps them forever"),
    ("TASK_ROUTER_INTERVAL", "10", "seconds between the router's safety-net passes"),
    ("ASSIGNMENT_TIMEOUT_SECONDS", "300", "assigned but not started for this long: back to pending"),
    ("RETRY_BACKOFF_SECONDS", "5", "first retry delay, doubled per attempt"),
    ("RETRY_BACKOFF_MAX_SECONDS", "300", "longest retry delay"),
    ("DISPATCH_TIMEOUT_SECONDS", "5", "timeout of one delivery to a droplet"),
    ("DISPATCH_CONCURRENCY", "64", "deliveries to droplets in flight at once"),
    ("DISPATCH_PER_DROPLET_CONCURRENCY", "4", "deliveries to one droplet in flight at once"),
    ("DISPATCH_REFUSALS_BEFORE_ERROR", "3", "deliveries a droplet refuses in a row (4xx) before it is marked error"),
    ("ENDPOINT_ALLOWED_NETWORKS", "unset (any but loopback, link-local, multicast, unspecified in production)", "CIDR list registered endpoints must resolve into"),
    ("WS_HEARTBEAT_INTERVAL", "30", "seconds between WebSocket pings; no answer in two: dropped"),
    ("WS_MAX_CONNECTIONS_PER_DROPLET", "10", "concurrent WebSockets per droplet id"),
    ("WS_CLIENT_QUEUE", "1024", "events queued for one WebSocket client before it is dropped as too slow"),
    ("WS_MAX_MESSAGE_BYTES", "4096", "largest message a WebSocket client may send"),
    ("WS_MAX_CONNECTIONS", "15000", "concurrent WebSockets in all"),
    ("EVENT_RETENTION_SECONDS", "3600", "how long events are kept for clients resuming with ?after=<event_id>"),
    ("ENABLE_AUTO_RECOVERY", "true", "requeue and retry the tasks of lost droplets"),
    ("ENABLE_SWAGGER", "true (development), false (production)", "serve Swagger UI at /docs"),
    ("ENABLE_METRICS", "true", "serve /metrics and /metrics/*"),
    ("RATE_LIMIT_PER_MINUTE", "100", "requests a minute per droplet (per address without a token), 1-10000000"),
    ("BROADCAST_RATE_LIMIT_PER_MINUTE", "10", "/broadcast calls a minute"),
    ("MAX_BODY_BYTES", "1048576", "largest request body"),
    ("REQUEST_TIMEOUT_SECONDS", "30", "longest a request may take"),
    ("HEADER_READ_TIMEOUT_SECONDS", "10", "longest a client may take to send a request's headers"),
    ("MAX_CONNECTIONS", "16384", "open client connections at once; more wait to be accepted"),
    ("CORS_ORIGINS", "none allowed", "allowed origins: a JSON list or comma-separated"),
    ("CORS_ALLOW_CREDENTIALS", "false", "allow credentials on CORS requests (never with *)"),
];

const DEFAULT_DATABASE_URL: &str = "postgres://postgres@localhost:5432/orchestrator";

struct Reader<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Reader<'_> {
    fn raw(&self, name: &'static str) -> Option<String> {
        (self.lookup)(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    fn string(&self, name: &'static str, default: &str) -> String {
        self.raw(name).unwrap_or_else(|| default.to_string())
    }

    fn number<T>(&self, name: &'static str, default: T, min: T, max: T) -> Result<T, ConfigError>
    where
        T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
    {
        let Some(raw) = self.raw(name) else {
            return Ok(default);
        };
        let value: T = raw
            .parse()
            .map_err(|_| invalid(name, format!("expected a whole number, got {raw:?}")))?;
        if value < min || value > max {
            return Err(invalid(
                name,
                format!("must be between {min} and {max}, got {value}"),
            ));
        }
        Ok(value)
    }

    fn flag(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.raw(name).map(|v| v.to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) if matches!(v.as_str(), "1" | "true" | "yes" | "on") => Ok(true),
            Some(v) if matches!(v.as_str(), "0" | "false" | "no" | "off") => Ok(false),
            Some(v) => Err(invalid(name, format!("expected true or false, got {v:?}"))),
        }
    }
}

impl Config {
    /// Reads the process environment, after loading `.env` when there is one.
    pub fn from_env() -> Result<Config, ConfigError> {
        let _ = dotenvy::dotenv();
        Config::from_lookup(&|name| std::env::var(name).ok())
    }

    /// Reads settings through `lookup` (tests pass a map).
    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let r = Reader { lookup };
        let environment = match r
            .string("ENVIRONMENT", "development")
            .to_ascii_lowercase()
            .as_str()
        {
            "development" | "dev" | "local" | "test" => Environment::Development,
            "production" | "prod" | "staging" => Environment::Production,
            other => {
                return Err(invalid(
                    "ENVIRONMENT",
                    format!("expected development or production, got {other:?}"),
                ))
            }
        };
        let production = environment == Environment::Production;

        let default_host = if production { "0.0.0.0" } else { "127.0.0.1" };
        let host_raw = r.string("HOST", default_host);
        let host = match host_raw.as_str() {
            "localhost" => IpAddr::from([127, 0, 0, 1]),
            other => other
                .parse()
                .map_err(|_| invalid("HOST", format!("expected an IP address, got {other:?}")))?,
        };

        let (jwt_secret_key, jwt_secret_generated) = match r.raw("JWT_SECRET_KEY") {
            Some(secret) => {
                if production && secret.len() < 32 {
                    return Err(invalid(
                        "JWT_SECRET_KEY",
                        "must be at least 32 bytes in production",
                    ));
                }
                (Secret::new(secret), false)
            }
            None if production => {
                return Err(invalid(
                    "JWT_SECRET_KEY",
                    "is required in production (at least 32 bytes)",
                ))
            }
            None => (Secret::new(random_secret()), true),
        };

        let jwt_algorithm = r.string("JWT_ALGORITHM", "HS256").to_ascii_uppercase();
        if jwt_algorithm != "HS256" && jwt_algorithm != "RS256" {
            return Err(invalid(
                "JWT_ALGORITHM",
                format!("expected HS256 or RS256, got {jwt_algorithm:?}"),
            ));
        }

        let log_level = r.string("LOG_LEVEL", "INFO");
        crate::telemetry::filter_from_level(&log_level)
            .map_err(|message| invalid("LOG_LEVEL", message))?;

        let database_url = r.string("DATABASE_URL", DEFAULT_DATABASE_URL);
        if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")) {
            return Err(invalid(
                "DATABASE_URL",
                "expected a postgres:// or postgresql:// URL",
            ));
        }

        let registry_url = r
            .raw("REGISTRY_URL")
            .map(|u| u.trim_end_matches('/').to_string());
        if let Some(url) = &registry_url {
            url::Url::parse(url).map_err(|e| invalid("REGISTRY_URL", format!("not a URL: {e}")))?;
        }

        let interval =
            |name: &'static str, default: u64| r.number(name, default, 1u64, 86_400 * 30);

        let config = Config {
            environment,
            host,
            port: r.number("PORT", 8000u16, 0, u16::MAX)?,
            workers: match r.raw("WORKERS") {
                None => None,
                Some(_) => Some(r.number("WORKERS", 1usize, 1, 1024)?),
            },
            log_level,
            database_url,
            database_pool_size: r.number("DATABASE_POOL_SIZE", 20u32, 0, 10_000)?,
            database_max_overflow: r.number("DATABASE_MAX_OVERFLOW", 10u32, 0, 10_000)?,
            database_acquire_timeout: Duration::from_secs(r.number(
                "DATABASE_ACQUIRE_TIMEOUT_SECONDS",
                3u64,
                1,
                600,
            )?),
            jwt_secret_key,
            jwt_secret_generated,
            jwt_algorithm,
            jwt_expiration_seconds: r.number(
                "JWT_EXPIRATION_SECONDS",
                86_400u64,
                1,
                10 * 365 * 86_400,
            )?,
            registry_public_key: r.raw("REGISTRY_PUBLIC_KEY"),
            orchestrator_private_key: r.raw("ORCHESTRATOR_PRIVATE_KEY"),
            registry_url,
            registry_sync_interval: interval("REGISTRY_SYNC_INTERVAL", 300)?,
            registry_token: r.raw("REGISTRY_TOKEN").map(Secret::new),
            registry_key: r.raw("REGISTRY_KEY").map(Secret::new),
            registry_fetch_public_key: r.flag("REGISTRY_FETCH_PUBLIC_KEY", false)?,
            registry_issuer: r.raw("REGISTRY_ISSUER"),
            registry_audience: r.raw("REGISTRY_AUDIENCE"),
            outbound_token_seconds: r.number("OUTBOUND_TOKEN_SECONDS", 300u64, 30, 3600)?,
            droplet_id: r.number("DROPLET_ID", 10i32, 1, i32::MAX)?,
            droplet_name: r.string("DROPLET_NAME", "Orchestrator"),
            droplet_steward: r.string("DROPLET_STEWARD", "Tnsae"),
            droplet_endpoint: r.string("DROPLET_ENDPOINT", "https://drop10.fullpotential.ai"),
            heartbeat_interval: interval("HEARTBEAT_INTERVAL", 60)?,
            heartbeat_check_interval: interval("HEARTBEAT_CHECK_INTERVAL", 60)?,
            heartbeat_timeout: interval("HEARTBEAT_TIMEOUT", 90)?,
            heartbeat_cleanup_interval: interval("HEARTBEAT_CLEANUP_INTERVAL", 3600)?,
            heartbeat_retention_days: r.number("HEARTBEAT_RETENTION_DAYS", 7u64, 1, 3650)?,
            task_retention_days: r.number("TASK_RETENTION_DAYS", 0u64, 0, 36_500)?,
            task_router_interval: interval("TASK_ROUTER_INTERVAL", 10)?,
            assignment_timeout_seconds: interval("ASSIGNMENT_TIMEOUT_SECONDS", 300)?,
            retry_backoff_seconds: r.number("RETRY_BACKOFF_SECONDS", 5u64, 0, 86_400)?,
            retry_backoff_max_seconds: r.number(
                "RETRY_BACKOFF_MAX_SECONDS",
                300u64,
                0,
                86_400 * 7,
            )?,
            dispatch_timeout_seconds: interval("DISPATCH_TIMEOUT_SECONDS", 5)?,
            dispatch_concurrency: r.number("DISPATCH_CONCURRENCY", 64usize, 1, 10_000)?,
            dispatch_per_droplet_concurrency: r.number(
                "DISPATCH_PER_DROPLET_CONCURRENCY",
                4usize,
                1,
                10_000,
            )?,
            dispatch_refusals_before_error: r.number(
                "DISPATCH_REFUSALS_BEFORE_ERROR",
                3u32,
                1,
                1000,
            )?,
            endpoint_allowed_networks: parse_networks(
                r.raw("ENDPOINT_ALLOWED_NETWORKS").as_deref(),
            )?,
            ws_heartbeat_interval: interval("WS_HEARTBEAT_INTERVAL", 30)?,
            ws_max_connections_per_droplet: r.number(
                "WS_MAX_CONNECTIONS_PER_DROPLET",
                10usize,
                1,
                1_000_000,
            )?,
            ws_client_queue: r.number("WS_CLIENT_QUEUE", 1024usize, 1, 1_000_000)?,
            ws_max_message_bytes: r.number("WS_MAX_MESSAGE_BYTES", 4096usize, 256, 1 << 20)?,
            ws_max_connections: r.number("WS_MAX_CONNECTIONS", 15_000usize, 1, 10_000_000)?,
            event_retention_seconds: r.number(
                "EVENT_RETENTION_SECONDS",
                3600u64,
                10,
                30 * 86_400,
            )?,
            enable_auto_recovery: r.flag("ENABLE_AUTO_RECOVERY", true)?,
            // Production turns Swagger off unless it is asked for explicitly.
            enable_swagger: r.flag("ENABLE_SWAGGER", !production)?,
            enable_metrics: r.flag("ENABLE_METRICS", true)?,
            rate_limit_per_minute: r.number("RATE_LIMIT_PER_MINUTE", 100u32, 1, 10_000_000)?,
            broadcast_rate_limit_per_minute: r.number(
                "BROADCAST_RATE_LIMIT_PER_MINUTE",
                10u32,
                1,
                10_000_000,
            )?,
            max_body_bytes: r.number("MAX_BODY_BYTES", 1_048_576usize, 1024, 1 << 30)?,
            request_timeout_seconds: r.number("REQUEST_TIMEOUT_SECONDS", 30u64, 1, 3600)?,
            header_read_timeout_seconds: r.number("HEADER_READ_TIMEOUT_SECONDS", 10u64, 1, 3600)?,
            max_connections: r.number("MAX_CONNECTIONS", 16_384usize, 1, 10_000_000)?,
            cors_origins: parse_origins(r.raw("CORS_ORIGINS").as_deref())?,
            cors_allow_credentials: r.flag("CORS_ALLOW_CREDENTIALS", false)?,
        };
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
        Ok(config)
    }

    /// The pool's maximum size, as the Python service's pool + overflow.
    pub fn pool_max_connections(&self) -> u32 {
        self.database_pool_size + self.database_max_overflow
    }

    pub fn is_production(&self) -> bool {
        self.environment == Environment::Production
    }

    /// `/token` is open without a token only in development.
    pub fn token_endpoint_open(&self) -> bool {
        !self.is_production()
    }

    /// The effective settings, secrets masked, for `check-config` and reload answers.
    pub fn describe(&self) -> BTreeMap<&'static str, String> {
        let mask = |v: &Option<String>| match v {
            Some(_) => "(set)".to_string(),
            None => "(unset)".to_string(),
        };
        let mut m = BTreeMap::new();
        m.insert("ENVIRONMENT", self.environment.as_str().to_string());
        m.insert("HOST", self.host.to_string());
        m.insert("PORT", self.port.to_string());
        m.insert(
            "WORKERS",
            self.workers.map_or("(cores)".into(), |w| w.to_string()),
        );
        m.insert("LOG_LEVEL", self.log_level.clone());
        m.insert("DATABASE_URL", redact_url(&self.database_url));
        m.insert("DATABASE_POOL_SIZE", self.database_pool_size.to_string());
        m.insert(
            "DATABASE_MAX_OVERFLOW",
            self.database_max_overflow.to_string(),
        );
        m.insert(
            "DATABASE_ACQUIRE_TIMEOUT_SECONDS",
            self.database_acquire_timeout.as_secs().to_string(),
        );
        m.insert(
            "JWT_SECRET_KEY",
            if self.jwt_secret_generated {
                "(generated for this process)".into()
            } else {
                "********".into()
            },
        );
        m.insert("JWT_ALGORITHM", self.jwt_algorithm.clone());
        m.insert(
            "JWT_EXPIRATION_SECONDS",
            self.jwt_expiration_seconds.to_string(),
        );
        m.insert("REGISTRY_PUBLIC_KEY", mask(&self.registry_public_key));
        m.insert(
            "ORCHESTRATOR_PRIVATE_KEY",
            mask(&self.orchestrator_private_key),
        );
        m.insert(
            "REGISTRY_URL",
            self.registry_url
                .clone()
                .unwrap_or_else(|| "(unset)".into()),
        );
        m.insert(
            "REGISTRY_SYNC_INTERVAL",
            self.registry_sync_interval.to_string(),
        );
        let masked = |v: &Option<Secret>| {
            if v.is_some() {
                "********".to_string()
            } else {
                "(unset)".to_string()
            }
        };
        m.insert("REGISTRY_TOKEN", masked(&self.registry_token));
        m.insert("REGISTRY_KEY", masked(&self.registry_key));
        m.insert(
            "REGISTRY_FETCH_PUBLIC_KEY",
            self.registry_fetch_public_key.to_string(),
        );
        m.insert(
            "REGISTRY_ISSUER",
            self.registry_issuer
                .clone()
                .unwrap_or_else(|| "(unset)".into()),
        );
        m.insert(
            "REGISTRY_AUDIENCE",
            self.registry_audience
                .clone()
                .unwrap_or_else(|| "(unset)".into()),
        );
        m.insert(
            "OUTBOUND_TOKEN_SECONDS",
            self.outbound_token_seconds.to_string(),
        );
        m.insert(
            "DISPATCH_PER_DROPLET_CONCURRENCY",
            self.dispatch_per_droplet_concurrency.to_string(),
        );
        m.insert(
            "DISPATCH_REFUSALS_BEFORE_ERROR",
            self.dispatch_refusals_before_error.to_string(),
        );
        m.insert(
            "ENDPOINT_ALLOWED_NETWORKS",
            self.endpoint_allowed_networks
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(","),
        );
        m.insert("WS_MAX_CONNECTIONS", self.ws_max_connections.to_string());
        m.insert(
            "HEADER_READ_TIMEOUT_SECONDS",
            self.header_read_timeout_seconds.to_string(),
        );
        m.insert("MAX_CONNECTIONS", self.max_connections.to_string());
        m.insert(
            "EVENT_RETENTION_SECONDS",
            self.event_retention_seconds.to_string(),
        );
        m.insert("TASK_RETENTION_DAYS", self.task_retention_days.to_string());
        m.insert("DROPLET_ID", self.droplet_id.to_string());
        m.insert("DROPLET_NAME", self.droplet_name.clone());
        m.insert("DROPLET_STEWARD", self.droplet_steward.clone());
        m.insert("DROPLET_ENDPOINT", self.droplet_endpoint.clone());
        m.insert("HEARTBEAT_INTERVAL", self.heartbeat_interval.to_string());
        m.insert(
            "HEARTBEAT_CHECK_INTERVAL",
            self.heartbeat_check_interval.to_string(),
        );
        m.insert("HEARTBEAT_TIMEOUT", self.heartbeat_timeout.to_string());
        m.insert(
            "HEARTBEAT_CLEANUP_INTERVAL",
            self.heartbeat_cleanup_interval.to_string(),
        );
        m.insert(
            "HEARTBEAT_RETENTION_DAYS",
            self.heartbeat_retention_days.to_string(),
        );
        m.insert(
            "TASK_ROUTER_INTERVAL",
            self.task_router_interval.to_string(),
        );
        m.insert(
            "ASSIGNMENT_TIMEOUT_SECONDS",
            self.assignment_timeout_seconds.to_string(),
        );
        m.insert(
            "RETRY_BACKOFF_SECONDS",
            self.retry_backoff_seconds.to_string(),
        );
        m.insert(
            "RETRY_BACKOFF_MAX_SECONDS",
            self.retry_backoff_max_seconds.to_string(),
        );
        m.insert(
            "DISPATCH_TIMEOUT_SECONDS",
            self.dispatch_timeout_seconds.to_string(),
        );
        m.insert(
            "DISPATCH_CONCURRENCY",
            self.dispatch_concurrency.to_string(),
        );
        m.insert(
            "WS_HEARTBEAT_INTERVAL",
            self.ws_heartbeat_interval.to_string(),
        );
        m.insert(
            "WS_MAX_CONNECTIONS_PER_DROPLET",
            self.ws_max_connections_per_droplet.to_string(),
        );
        m.insert("WS_CLIENT_QUEUE", self.ws_client_queue.to_string());
        m.insert(
            "WS_MAX_MESSAGE_BYTES",
            self.ws_max_message_bytes.to_string(),
        );
        m.insert(
            "ENABLE_AUTO_RECOVERY",
            self.enable_auto_recovery.to_string(),
        );
        m.insert("ENABLE_SWAGGER", self.enable_swagger.to_string());
        m.insert("ENABLE_METRICS", self.enable_metrics.to_string());
        m.insert(
            "RATE_LIMIT_PER_MINUTE",
            self.rate_limit_per_minute.to_string(),
        );
        m.insert(
            "BROADCAST_RATE_LIMIT_PER_MINUTE",
            self.broadcast_rate_limit_per_minute.to_string(),
        );
        m.insert("MAX_BODY_BYTES", self.max_body_bytes.to_string());
        m.insert(
            "REQUEST_TIMEOUT_SECONDS",
            self.request_timeout_seconds.to_string(),
        );
        m.insert("CORS_ORIGINS", self.cors_origins.join(","));
        m.insert(
            "CORS_ALLOW_CREDENTIALS",
            self.cors_allow_credentials.to_string(),
        );
        m
    }
}

/// `CORS_ORIGINS` as a JSON list (`["https://a"]`) or comma-separated.
fn parse_origins(raw: Option<&str>) -> Result<Vec<String>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    let origins: Vec<String> = if raw.starts_with('[') {
        serde_json::from_str(raw)
            .map_err(|e| invalid("CORS_ORIGINS", format!("not a JSON list of strings: {e}")))?
    } else {
        raw.split(',').map(|s| s.trim().to_string()).collect()
    };
    Ok(origins
        .into_iter()
        .map(|o| o.trim().trim_end_matches('/').to_string())
        .filter(|o| !o.is_empty())
        .collect())
}

/// `ENDPOINT_ALLOWED_NETWORKS`: CIDRs (`10.0.0.0/8`) or single addresses, comma-separated.
fn parse_networks(raw: Option<&str>) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    invalid(
                        "ENDPOINT_ALLOWED_NETWORKS",
                        format!("expected CIDR networks like 10.0.0.0/8, got {s:?}"),
                    )
                })
        })
        .collect()
}

fn random_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

/// A database URL with its password replaced, for messages and logs.
/// Both places a PostgreSQL URL may carry a password are masked: the user info and the
/// `password` query parameter. A URL that does not parse still names its host.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("****"));
            }
            if url.query_pairs().any(|(k, _)| k == "password") {
                let pairs: Vec<(String, String)> = url
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if k == "password" { "****".into() } else { v };
                        (k.into_owned(), v.into_owned())
                    })
                    .collect();
                url.query_pairs_mut().clear().extend_pairs(pairs);
            }
            url.to_string()
        }
        Err(_) => {
            // Keep the scheme, user and host so the operator sees which server was meant.
            let Some((scheme, rest)) = raw.split_once("://") else {
                return "(unparseable URL)".to_string();
            };
            let (userinfo, host) = match rest.rsplit_once('@') {
                Some((u, h)) => (Some(u), h),
                None => (None, rest),
            };
            let host = host.split(['?', '/']).next().unwrap_or("");
            match userinfo.map(|u| u.split_once(':').map_or(u, |(user, _)| user)) {
                Some(user) => format!("{scheme}://{user}:****@{host}/... (unparseable URL)"),
                None => format!("{scheme}://{host}/... (unparseable URL)"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(&move |k| map.get(k).cloned())
    }

    #[test]
    fn defaults_follow_the_contract() {
        let c = config(&[]).unwrap();
        assert_eq!(c.environment, Environment::Development);
        assert_eq!(c.host.to_string(), "127.0.0.1");
        assert_eq!(c.port, 8000);
        assert_eq!(c.heartbeat_interval, 60);
        assert_eq!(c.heartbeat_timeout, 90);
        assert_eq!(c.task_router_interval, 10);
        assert_eq!(c.assignment_timeout_seconds, 300);
        assert_eq!(c.rate_limit_per_minute, 100);
        assert_eq!(c.ws_max_connections_per_droplet, 10);
        assert_eq!(c.pool_max_connections(), 30);
        assert!(c.jwt_secret_generated);
        assert!(c.cors_origins.is_empty());
        assert!(c.enable_swagger);
        assert!(c.registry_url.is_none());
    }

    #[test]
    fn a_bad_port_names_the_variable() {
        let err = config(&[("PORT", "abc")]).unwrap_err();
        assert_eq!(err.variable, "PORT");
        assert!(err.to_string().contains("PORT"));
    }

    #[test]
    fn a_negative_interval_names_the_variable() {
        let err = config(&[("HEARTBEAT_TIMEOUT", "-1")]).unwrap_err();
        assert_eq!(err.variable, "HEARTBEAT_TIMEOUT");
    }

    #[test]
    fn production_requires_a_long_secret() {
        assert_eq!(
            config(&[("ENVIRONMENT", "production")])
                .unwrap_err()
                .variable,
            "JWT_SECRET_KEY"
        );
        assert_eq!(
            config(&[("ENVIRONMENT", "production"), ("JWT_SECRET_KEY", "short")])
                .unwrap_err()
                .variable,
            "JWT_SECRET_KEY"
        );
        let c = config(&[
            ("ENVIRONMENT", "production"),
            ("JWT_SECRET_KEY", "0123456789abcdef0123456789abcdef"),
        ])
        .unwrap();
        assert_eq!(c.host.to_string(), "0.0.0.0");
        assert!(!c.enable_swagger);
        assert!(!c.token_endpoint_open());
    }

    #[test]
    fn cors_origins_accept_both_forms() {
        let c = config(&[(
            "CORS_ORIGINS",
            r#"["https://a.example","https://b.example/"]"#,
        )])
        .unwrap();
        assert_eq!(
            c.cors_origins,
            vec!["https://a.example", "https://b.example"]
        );
        let c = config(&[("CORS_ORIGINS", "https://a.example, https://b.example")]).unwrap();
        assert_eq!(
            c.cors_origins,
            vec!["https://a.example", "https://b.example"]
        );
        let err = config(&[("CORS_ORIGINS", "*"), ("CORS_ALLOW_CREDENTIALS", "true")]).unwrap_err();
        assert_eq!(err.variable, "CORS_ORIGINS");
    }

    #[test]
    fn rate_limits_take_the_whole_range() {
        assert_eq!(
            config(&[("RATE_LIMIT_PER_MINUTE", "10000000")])
                .unwrap()
                .rate_limit_per_minute,
            10_000_000
        );
        assert_eq!(
            config(&[("RATE_LIMIT_PER_MINUTE", "0")])
                .unwrap_err()
                .variable,
            "RATE_LIMIT_PER_MINUTE"
        );
    }

    #[test]
    fn python_log_levels_are_accepted() {
        assert!(config(&[("LOG_LEVEL", "WARNING")]).is_ok());
        assert!(config(&[("LOG_LEVEL", "debug")]).is_ok());
        assert_eq!(
            config(&[("LOG_LEVEL", "sqlx=loudest")])
                .unwrap_err()
                .variable,
            "LOG_LEVEL"
        );
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redact_url("postgres://u:secret@db:5432/x"),
            "postgres://u:****@db:5432/x"
        );
        let q = redact_url("postgres://u@db/x?sslmode=disable&password=secret");
        assert!(
            !q.contains("secret") && q.contains("sslmode=disable"),
            "{q}"
        );
        let bad = redact_url("postgres://u:secret@db:notaport/x");
        assert!(
            !bad.contains("secret") && bad.contains("u:****@db:notaport"),
            "{bad}"
        );
        assert!(!redact_url("postgres://u:sec@ret@db:x/y").contains("sec"));
    }
}
