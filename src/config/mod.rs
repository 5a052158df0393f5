//! Every setting of the service, read from the environment (and `.env`), parsed and checked once.
//!
//! - `settings.rs`: the one table: each variable with its default, meaning, whether a reload
//!   may change it, whether it is secret, its parser and the `Config` field it fills.
//! - `table.rs`: what a row is ([`Setting`]) and the macro that makes `Config`, `SETTINGS`
//!   and the parsing code from that list.
//! - `parse.rs`: the value parsers the table names (numbers, flags, origins, networks...).
//! - `redact.rs`: how values are shown: [`Secret`], masks, [`redact_url`].
//! - `environment.rs`: [`Environment`].

use std::collections::BTreeMap;

mod environment;
mod parse;
mod redact;
mod settings;
mod table;

pub use environment::Environment;
pub use redact::{redact_url, Secret};
pub use settings::{Config, SETTINGS};
pub use table::Setting;

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

/// The table's row for a variable.
pub fn setting(name: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.name == name)
}

impl Config {
    /// Reads the process environment, after loading `.env` when there is one.
    pub fn from_env() -> Result<Config, ConfigError> {
        let _ = dotenvy::dotenv();
        Config::from_lookup(&|name| std::env::var(name).ok())
    }

    /// Reads settings through `lookup` (tests pass a map).
    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let config = settings::parse(&parse::Reader::new(lookup))?;
        settings::check(&config)?;
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

    /// Settings that are valid but probably not what was meant: `serve` logs each as a
    /// warning and `check-config` prints each to stderr.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.jwt_algorithm == "RS256" {
            warnings.push(
                "JWT_ALGORITHM=RS256 has no effect: /token and `orchestrator token` mint HS256 \
                 tokens all the same; RS256 tokens are the Registry's (verified with \
                 REGISTRY_PUBLIC_KEY) and the orchestrator's own outbound ones (signed with \
                 ORCHESTRATOR_PRIVATE_KEY)"
                    .to_string(),
            );
        }
        if self.dispatch_concurrency <= self.dispatch_per_droplet_concurrency {
            warnings.push(format!(
                "DISPATCH_CONCURRENCY={} is not above DISPATCH_PER_DROPLET_CONCURRENCY={}: one \
                 droplet that never answers can hold every delivery worker and delay every \
                 other droplet's deliveries; raise DISPATCH_CONCURRENCY or lower \
                 DISPATCH_PER_DROPLET_CONCURRENCY",
                self.dispatch_concurrency, self.dispatch_per_droplet_concurrency
            ));
        }
        warnings
    }

    /// The effective settings, secrets masked, for `check-config` and reload answers.
    pub fn describe(&self) -> BTreeMap<&'static str, String> {
        SETTINGS
            .iter()
            .filter_map(|s| Some((s.name, s.shown(self)?)))
            .collect()
    }

    /// Puts back, from `current`, every setting a running process cannot change: the
    /// listener, the pool, the runtime, the keys and the layers built at start-up.
    pub fn keep_restart_required(&mut self, current: &Config) {
        for s in SETTINGS.iter().filter(|s| s.restart_required) {
            s.keep(self, current);
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

    /// README's configuration table is this table's rows, as they are written there.
    #[test]
    fn readme_lists_every_setting_as_the_table_says() {
        let readme = include_str!("../../README.md");
        let mut expected = vec![
            "| variable | default | meaning |".to_string(),
            "|---|---|---|".to_string(),
        ];
        expected.extend(
            SETTINGS
                .iter()
                .map(|s| format!("| `{}` | {} | {} |", s.name, s.default, s.help)),
        );
        let start = readme
            .lines()
            .position(|l| l == expected[0])
            .expect("README has a configuration table");
        let table: Vec<&str> = readme
            .lines()
            .skip(start)
            .take_while(|l| l.starts_with('|'))
            .collect();
        assert_eq!(table, expected);
    }

    /// A default the table states as a plain value is the value used when the variable is
    /// unset: setting it explicitly changes nothing.
    #[test]
    fn stated_defaults_are_the_defaults() {
        let defaults = config(&[]).unwrap().describe();
        for s in SETTINGS {
            let plain = !s.default.contains(' ') && s.default != "unset";
            if !plain || s.shown(&config(&[]).unwrap()).is_none() {
                continue;
            }
            let explicit = config(&[(s.name, s.default)])
                .unwrap_or_else(|e| panic!("{}'s stated default: {e}", s.name));
            assert_eq!(explicit.describe(), defaults, "{}", s.name);
        }
    }

    #[test]
    fn every_variable_is_in_the_table_once() {
        let mut names: Vec<_> = SETTINGS.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), SETTINGS.len());
        assert!(setting("PORT").is_some_and(|s| s.restart_required && !s.secret));
        assert!(setting("REGISTRY_TOKEN").is_some_and(|s| s.secret));
        assert!(setting("TASK_ROUTER_INTERVAL").is_some_and(|s| !s.restart_required));
        assert!(setting("NOPE").is_none());
    }

    #[test]
    fn warnings_name_rs256_and_a_dispatch_pool_one_droplet_can_fill() {
        assert!(config(&[]).unwrap().warnings().is_empty());
        let rs256 = config(&[("JWT_ALGORITHM", "RS256")]).unwrap().warnings();
        assert_eq!(rs256.len(), 1);
        assert!(rs256[0].starts_with("JWT_ALGORITHM=RS256"), "{rs256:?}");
        for (all, one) in [("4", "4"), ("4", "8")] {
            let w = config(&[
                ("DISPATCH_CONCURRENCY", all),
                ("DISPATCH_PER_DROPLET_CONCURRENCY", one),
            ])
            .unwrap()
            .warnings();
            assert_eq!(w.len(), 1, "{all}/{one}: {w:?}");
            assert!(w[0].contains("DISPATCH_PER_DROPLET_CONCURRENCY"), "{w:?}");
        }
        let fair = config(&[
            ("DISPATCH_CONCURRENCY", "5"),
            ("DISPATCH_PER_DROPLET_CONCURRENCY", "4"),
        ])
        .unwrap();
        assert!(fair.warnings().is_empty());
    }

    #[test]
    fn restart_required_values_are_put_back() {
        let current = config(&[("PORT", "8000"), ("JWT_SECRET_KEY", "a")]).unwrap();
        let mut next = config(&[("PORT", "9000"), ("LOG_LEVEL", "ERROR")]).unwrap();
        next.keep_restart_required(&current);
        assert_eq!(next.port, 8000);
        assert_eq!(next.jwt_secret_key, current.jwt_secret_key);
        assert!(!next.jwt_secret_generated);
        assert_eq!(next.log_level, "ERROR");
    }
}
