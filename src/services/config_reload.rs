//! Live configuration reload: reads the settings again, applies what a running process can
//! change, keeps the rest until a restart, and says which is which.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::{Config, ConfigError};
use crate::services::Core;

/// Settings a running process cannot change: the listener, the pool, the runtime, the keys
/// and the layers built at start-up. A reload reports them and keeps the values in force.
pub const RESTART_REQUIRED: &[&str] = &[
    "ENVIRONMENT",
    "HOST",
    "PORT",
    "WORKERS",
    "DATABASE_URL",
    "DATABASE_POOL_SIZE",
    "DATABASE_MAX_OVERFLOW",
    "DATABASE_ACQUIRE_TIMEOUT_SECONDS",
    "JWT_SECRET_KEY",
    "JWT_ALGORITHM",
    "JWT_EXPIRATION_SECONDS",
    "REGISTRY_PUBLIC_KEY",
    "ORCHESTRATOR_PRIVATE_KEY",
    "DROPLET_ID",
    "DROPLET_STEWARD",
    "DISPATCH_CONCURRENCY",
    "DISPATCH_PER_DROPLET_CONCURRENCY",
    "REGISTRY_TOKEN",
    "REGISTRY_KEY",
    "REGISTRY_FETCH_PUBLIC_KEY",
    "REGISTRY_ISSUER",
    "REGISTRY_AUDIENCE",
    "OUTBOUND_TOKEN_SECONDS",
    "HEADER_READ_TIMEOUT_SECONDS",
    "MAX_CONNECTIONS",
    "WS_MAX_CONNECTIONS",
    "WS_CLIENT_QUEUE",
    "WS_MAX_MESSAGE_BYTES",
    "MAX_BODY_BYTES",
    "CORS_ALLOW_CREDENTIALS",
];

/// Settings whose values are secret: a change is reported, the values never.
const SECRET: &[&str] = &[
    "JWT_SECRET_KEY",
    "REGISTRY_PUBLIC_KEY",
    "ORCHESTRATOR_PRIVATE_KEY",
    "REGISTRY_TOKEN",
    "REGISTRY_KEY",
];

pub use crate::services::config_source::ConfigSource;

/// One setting that differs from the one in force.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub setting: &'static str,
    pub from: String,
    pub to: String,
    /// Whether it took effect now; otherwise it waits for a restart.
    pub applied: bool,
}

/// What a reload did.
#[derive(Debug, Clone, Serialize)]
pub struct Reload {
    pub source: &'static str,
    pub changed: Vec<Change>,
    pub applied: Vec<&'static str>,
    pub restart_required: Vec<&'static str>,
    pub rescheduled_jobs: Vec<&'static str>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Invalid(#[from] ConfigError),
    #[error("{0}")]
    Apply(String),
}

/// Re-reads the settings and applies what can change live: the log level (through
/// `set_log_level`), feature flags, rate limits, CORS origins, timeouts and the other values
/// read where they are used. An invalid configuration changes nothing. The jobs are
/// rescheduled by the caller (`jobs::reload_config`), which fills `rescheduled_jobs`.
pub async fn reload(
    state: &Core,
    set_log_level: impl FnOnce(&str) -> Result<(), String>,
) -> Result<Reload, ReloadError> {
    let mut next = state.config_source.load()?;
    let current = state.config();
    let changed = diff(&current, &next);
    keep_restart_required(&mut next, &current);
    if next.cors_allow_credentials && next.cors_origins.iter().any(|o| o == "*") {
        return Err(ConfigError {
            variable: "CORS_ORIGINS",
            message: "\"*\" cannot be combined with the credentials allowed at start-up; list the origins".into(),
        }
        .into());
    }
    if next.log_level != current.log_level {
        set_log_level(&next.log_level).map_err(ReloadError::Apply)?;
    }
    if next.ws_max_connections_per_droplet != current.ws_max_connections_per_droplet {
        state
            .events
            .set_max_per_droplet(next.ws_max_connections_per_droplet);
    }
    state.replace_config(next);
    let applied = changed
        .iter()
        .filter(|c| c.applied)
        .map(|c| c.setting)
        .collect();
    let restart_required = changed
        .iter()
        .filter(|c| !c.applied)
        .map(|c| c.setting)
        .collect();
    Ok(Reload {
        source: state.config_source.describe(),
        changed,
        applied,
        restart_required,
        rescheduled_jobs: Vec::new(),
    })
}

/// Every setting whose value differs, secrets compared but never shown.
fn diff(current: &Config, next: &Config) -> Vec<Change> {
    let before = current.describe();
    let after = next.describe();
    let secret_changed = |name: &str| match name {
        "JWT_SECRET_KEY" => {
            // A secret generated per process is not a setting that changed.
            !(current.jwt_secret_generated && next.jwt_secret_generated)
                && current.jwt_secret_key != next.jwt_secret_key
        }
        "REGISTRY_PUBLIC_KEY" => current.registry_public_key != next.registry_public_key,
        _ => current.orchestrator_private_key != next.orchestrator_private_key,
    };
    let mut names: Vec<&'static str> = before.keys().chain(after.keys()).copied().collect();
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .filter_map(|name| {
            let (from, to) = (shown(&before, name), shown(&after, name));
            let differs = if SECRET.contains(&name) {
                secret_changed(name)
            } else {
                from != to
            };
            differs.then(|| Change {
                setting: name,
                from,
                to,
                applied: !RESTART_REQUIRED.contains(&name),
            })
        })
        .collect()
}

fn shown(described: &BTreeMap<&'static str, String>, name: &str) -> String {
    if SECRET.contains(&name) {
        return "********".into();
    }
    described.get(name).cloned().unwrap_or_default()
}

/// The values a running process cannot change stay as they are until a restart.
fn keep_restart_required(next: &mut Config, current: &Config) {
    next.environment = current.environment;
    next.host = current.host;
    next.port = current.port;
    next.workers = current.workers;
    next.database_url = current.database_url.clone();
    next.database_pool_size = current.database_pool_size;
    next.database_max_overflow = current.database_max_overflow;
    next.database_acquire_timeout = current.database_acquire_timeout;
    next.jwt_secret_key = current.jwt_secret_key.clone();
    next.jwt_secret_generated = current.jwt_secret_generated;
    next.jwt_algorithm = current.jwt_algorithm.clone();
    next.jwt_expiration_seconds = current.jwt_expiration_seconds;
    next.registry_public_key = current.registry_public_key.clone();
    next.orchestrator_private_key = current.orchestrator_private_key.clone();
    next.droplet_id = current.droplet_id;
    next.droplet_steward = current.droplet_steward.clone();
    next.dispatch_concurrency = current.dispatch_concurrency;
    next.dispatch_per_droplet_concurrency = current.dispatch_per_droplet_concurrency;
    next.registry_token = current.registry_token.clone();
    next.registry_key = current.registry_key.clone();
    next.registry_fetch_public_key = current.registry_fetch_public_key;
    next.registry_issuer = current.registry_issuer.clone();
    next.registry_audience = current.registry_audience.clone();
    next.outbound_token_seconds = current.outbound_token_seconds;
    next.header_read_timeout_seconds = current.header_read_timeout_seconds;
    next.max_connections = current.max_connections;
    next.ws_max_connections = current.ws_max_connections;
    next.ws_client_queue = current.ws_client_queue;
    next.ws_max_message_bytes = current.ws_max_message_bytes;
    next.max_body_bytes = current.max_body_bytes;
    next.cors_allow_credentials = current.cors_allow_credentials;
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Config {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(&move |k| map.get(k).cloned()).unwrap()
    }

    #[test]
    fn only_what_differs_is_reported() {
        let a = config(&[("JWT_SECRET_KEY", "s1"), ("TASK_ROUTER_INTERVAL", "10")]);
        let b = config(&[
            ("JWT_SECRET_KEY", "s2"),
            ("TASK_ROUTER_INTERVAL", "1"),
            ("PORT", "9000"),
        ]);
        let changes = diff(&a, &b);
        let names: Vec<_> = changes.iter().map(|c| c.setting).collect();
        assert_eq!(names, ["JWT_SECRET_KEY", "PORT", "TASK_ROUTER_INTERVAL"]);
        let secret = &changes[0];
        assert_eq!(
            (secret.from.as_str(), secret.to.as_str()),
            ("********", "********")
        );
        assert!(!secret.applied);
        assert!(!changes[1].applied);
        assert!(changes[2].applied);
        assert!(diff(&a, &a).is_empty());
    }

    #[test]
    fn a_generated_secret_is_not_a_change() {
        assert!(diff(&config(&[]), &config(&[])).is_empty());
    }

    #[test]
    fn every_restart_required_setting_is_kept() {
        let current = config(&[]);
        let mut next = config(&[
            ("ENVIRONMENT", "production"),
            ("HOST", "127.0.0.2"),
            ("PORT", "9001"),
            ("WORKERS", "3"),
            ("DATABASE_URL", "postgres://x@elsewhere/other"),
            ("DATABASE_POOL_SIZE", "7"),
            ("DATABASE_MAX_OVERFLOW", "2"),
            ("DATABASE_ACQUIRE_TIMEOUT_SECONDS", "9"),
            ("JWT_SECRET_KEY", "0123456789abcdef0123456789abcdef-other"),
            ("JWT_ALGORITHM", "RS256"),
            ("JWT_EXPIRATION_SECONDS", "60"),
            ("REGISTRY_PUBLIC_KEY", "/keys/registry.pem"),
            ("ORCHESTRATOR_PRIVATE_KEY", "/keys/orchestrator.pem"),
            ("DROPLET_ID", "11"),
            ("DROPLET_STEWARD", "Someone"),
            ("DISPATCH_CONCURRENCY", "3"),
            ("DISPATCH_PER_DROPLET_CONCURRENCY", "2"),
            ("REGISTRY_TOKEN", "a.b.c"),
            ("REGISTRY_KEY", "key"),
            ("REGISTRY_FETCH_PUBLIC_KEY", "true"),
            ("REGISTRY_ISSUER", "registry.example"),
            ("REGISTRY_AUDIENCE", "droplets"),
            ("OUTBOUND_TOKEN_SECONDS", "60"),
            ("HEADER_READ_TIMEOUT_SECONDS", "3"),
            ("MAX_CONNECTIONS", "9"),
            ("WS_MAX_CONNECTIONS", "8"),
            ("WS_CLIENT_QUEUE", "5"),
            ("WS_MAX_MESSAGE_BYTES", "512"),
            ("MAX_BODY_BYTES", "2048"),
            ("CORS_ALLOW_CREDENTIALS", "true"),
        ]);
        let reported: Vec<_> = diff(&current, &next).iter().map(|c| c.setting).collect();
        // ENABLE_SWAGGER and HOST's default follow ENVIRONMENT; the rest is this list.
        for name in RESTART_REQUIRED {
            assert!(reported.contains(name), "{name} not reported");
        }
        keep_restart_required(&mut next, &current);
        let left: Vec<_> = diff(&current, &next)
            .into_iter()
            .filter(|c| !c.applied)
            .map(|c| c.setting)
            .collect();
        assert!(left.is_empty(), "not kept: {left:?}");
    }

    #[test]
    fn restart_required_values_stay_in_force() {
        let current = config(&[("PORT", "8000"), ("LOG_LEVEL", "INFO")]);
        let mut next = config(&[("PORT", "9000"), ("LOG_LEVEL", "ERROR")]);
        keep_restart_required(&mut next, &current);
        assert_eq!(next.port, 8000);
        assert_eq!(next.log_level, "ERROR");
    }
}
