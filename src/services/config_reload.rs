//! Live configuration reload: reads the settings again, applies what a running process can
//! change, keeps the rest until a restart, and says which is which.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::{self, Config, ConfigError};
use crate::services::core::Settings;
use crate::services::events::EventHub;

pub use crate::services::config_source::ConfigSource;

/// One setting that differs from the one in force.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Change {
    pub setting: &'static str,
    pub from: String,
    pub to: String,
    /// Whether it took effect now; otherwise it waits for a restart.
    pub applied: bool,
}

/// What a reload did.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Reload {
    pub source: &'static str,
    pub changed: Vec<Change>,
    pub applied: Vec<&'static str>,
    pub restart_required: Vec<&'static str>,
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
/// read where they are used. New job intervals are in the configuration now in force; the
/// caller reschedules the jobs (the reload-config handler). An invalid configuration changes
/// nothing.
pub fn reload(
    settings: &Settings,
    source: &ConfigSource,
    events: &EventHub,
    set_log_level: impl FnOnce(&str) -> Result<(), String>,
) -> Result<Reload, ReloadError> {
    let mut next = source.load()?;
    let current = settings.current();
    let changed = diff(&current, &next);
    next.keep_restart_required(&current);
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
        events.set_max_per_droplet(next.ws_max_connections_per_droplet);
    }
    settings.replace(next);
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
        source: source.describe(),
        changed,
        applied,
        restart_required,
    })
}

/// Every setting whose value differs, secrets compared but never shown.
fn diff(current: &Config, next: &Config) -> Vec<Change> {
    let before = current.describe();
    let after = next.describe();
    let mut names: Vec<&'static str> = before.keys().chain(after.keys()).copied().collect();
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .filter_map(|name| {
            let setting = config::setting(name)?;
            let (from, to) = (shown(&before, name), shown(&after, name));
            let differs = if setting.secret {
                setting.differs(current, next)
            } else {
                from != to
            };
            differs.then_some(Change {
                setting: name,
                from,
                to,
                applied: !setting.restart_required,
            })
        })
        .collect()
}

fn shown(described: &BTreeMap<&'static str, String>, name: &str) -> String {
    if config::setting(name).is_some_and(|s| s.secret) {
        return "********".into();
    }
    described.get(name).cloned().unwrap_or_default()
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
    fn each_secret_is_compared_on_its_own() {
        let a = config(&[]);
        for name in ["REGISTRY_TOKEN", "REGISTRY_KEY", "ORCHESTRATOR_PRIVATE_KEY"] {
            let changes = diff(&a, &config(&[(name, "x")]));
            let names: Vec<_> = changes.iter().map(|c| c.setting).collect();
            assert_eq!(names, [name]);
            assert_eq!(changes[0].to, "********");
        }
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
            ("DISPATCH_QUEUE_BODIES", "5"),
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
        let restart_required = config::SETTINGS.iter().filter(|s| s.restart_required);
        for name in restart_required.map(|s| s.name) {
            assert!(reported.contains(&name), "{name} not reported");
        }
        next.keep_restart_required(&current);
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
        next.keep_restart_required(&current);
        assert_eq!(next.port, 8000);
        assert_eq!(next.log_level, "ERROR");
    }
}
