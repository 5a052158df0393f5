//! The value parsers the settings table names (`parse: number(...)`): each reads one variable
//! and answers its value or a [`ConfigError`] naming it. Unset and blank are the same.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use super::{invalid, ConfigError, Environment, Secret};

/// Reads variables through a lookup (the environment, or a map in tests).
pub(super) struct Reader<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl<'a> Reader<'a> {
    pub(super) fn new(lookup: &'a dyn Fn(&str) -> Option<String>) -> Self {
        Reader { lookup }
    }

    /// The trimmed value; unset or blank is `None`.
    fn raw(&self, name: &'static str) -> Option<String> {
        (self.lookup)(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    pub(super) fn string(&self, name: &'static str, default: &str) -> Result<String, ConfigError> {
        Ok(self.raw(name).unwrap_or_else(|| default.to_string()))
    }

    pub(super) fn optional(&self, name: &'static str) -> Result<Option<String>, ConfigError> {
        Ok(self.raw(name))
    }

    pub(super) fn secret(&self, name: &'static str) -> Result<Option<Secret>, ConfigError> {
        Ok(self.raw(name).map(Secret::new))
    }

    /// Whether the variable is unset (blank counts as unset).
    pub(super) fn unset(&self, name: &'static str) -> Result<bool, ConfigError> {
        Ok(self.raw(name).is_none())
    }

    pub(super) fn number<T>(
        &self,
        name: &'static str,
        default: T,
        min: T,
        max: T,
    ) -> Result<T, ConfigError>
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

    /// A job's or a check's interval: 1 second to 30 days.
    pub(super) fn interval(&self, name: &'static str, default: u64) -> Result<u64, ConfigError> {
        self.number(name, default, 1, 86_400 * 30)
    }

    /// Whole seconds as a `Duration`.
    pub(super) fn seconds(
        &self,
        name: &'static str,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<Duration, ConfigError> {
        self.number(name, default, min, max)
            .map(Duration::from_secs)
    }

    /// Whole milliseconds as a `Duration`.
    pub(super) fn millis(
        &self,
        name: &'static str,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<Duration, ConfigError> {
        self.number(name, default, min, max)
            .map(Duration::from_millis)
    }

    pub(super) fn flag(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.raw(name).map(|v| v.to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) if matches!(v.as_str(), "1" | "true" | "yes" | "on") => Ok(true),
            Some(v) if matches!(v.as_str(), "0" | "false" | "no" | "off") => Ok(false),
            Some(v) => Err(invalid(name, format!("expected true or false, got {v:?}"))),
        }
    }

    /// Runtime worker threads; unset: one per core.
    pub(super) fn workers(&self, name: &'static str) -> Result<Option<usize>, ConfigError> {
        match self.raw(name) {
            None => Ok(None),
            Some(_) => self.number(name, 1usize, 1, 1024).map(Some),
        }
    }

    pub(super) fn environment(&self, name: &'static str) -> Result<Environment, ConfigError> {
        let value = self.string(name, "development")?.to_ascii_lowercase();
        Environment::parse(&value).ok_or_else(|| {
            invalid(
                name,
                format!("expected development or production, got {value:?}"),
            )
        })
    }

    /// The address to bind: loopback in development, every interface in production.
    pub(super) fn host(
        &self,
        name: &'static str,
        environment: Environment,
    ) -> Result<IpAddr, ConfigError> {
        let default = if environment.is_production() {
            "0.0.0.0"
        } else {
            "127.0.0.1"
        };
        match self.string(name, default)?.as_str() {
            "localhost" => Ok(IpAddr::from([127, 0, 0, 1])),
            other => other
                .parse()
                .map_err(|_| invalid(name, format!("expected an IP address, got {other:?}"))),
        }
    }

    /// Required and 32+ bytes in production; in development, unset means one generated for
    /// this process.
    pub(super) fn jwt_secret(
        &self,
        name: &'static str,
        environment: Environment,
    ) -> Result<Secret, ConfigError> {
        let production = environment.is_production();
        match self.raw(name) {
            Some(secret) if production && secret.len() < 32 => {
                Err(invalid(name, "must be at least 32 bytes in production"))
            }
            Some(secret) => Ok(Secret::new(secret)),
            None if production => Err(invalid(
                name,
                "is required in production (at least 32 bytes)",
            )),
            None => Ok(Secret::new(random_secret())),
        }
    }

    pub(super) fn jwt_algorithm(&self, name: &'static str) -> Result<String, ConfigError> {
        let algorithm = self.string(name, "HS256")?.to_ascii_uppercase();
        if algorithm != "HS256" && algorithm != "RS256" {
            return Err(invalid(
                name,
                format!("expected HS256 or RS256, got {algorithm:?}"),
            ));
        }
        Ok(algorithm)
    }

    /// Python's level names or a tracing filter, checked as the log layer will read it.
    pub(super) fn log_level(&self, name: &'static str) -> Result<String, ConfigError> {
        let level = self.string(name, "INFO")?;
        crate::telemetry::filter_from_level(&level).map_err(|message| invalid(name, message))?;
        Ok(level)
    }

    pub(super) fn database_url(
        &self,
        name: &'static str,
        default: &str,
    ) -> Result<String, ConfigError> {
        let url = self.string(name, default)?;
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(invalid(name, "expected a postgres:// or postgresql:// URL"));
        }
        Ok(url)
    }

    /// A base URL, without its trailing slashes.
    pub(super) fn base_url(&self, name: &'static str) -> Result<Option<String>, ConfigError> {
        let Some(url) = self.raw(name) else {
            return Ok(None);
        };
        let url = url.trim_end_matches('/').to_string();
        url::Url::parse(&url).map_err(|e| invalid(name, format!("not a URL: {e}")))?;
        Ok(Some(url))
    }

    /// CORS origins as a JSON list (`["https://a"]`) or comma-separated.
    pub(super) fn origins(&self, name: &'static str) -> Result<Vec<String>, ConfigError> {
        let Some(raw) = self.raw(name) else {
            return Ok(Vec::new());
        };
        let origins: Vec<String> = if raw.starts_with('[') {
            serde_json::from_str(&raw)
                .map_err(|e| invalid(name, format!("not a JSON list of strings: {e}")))?
        } else {
            raw.split(',').map(|s| s.trim().to_string()).collect()
        };
        Ok(origins
            .into_iter()
            .map(|o| o.trim().trim_end_matches('/').to_string())
            .filter(|o| !o.is_empty())
            .collect())
    }

    /// CIDRs (`10.0.0.0/8`) or single addresses, comma-separated.
    /// A comma-separated list of names, trimmed and in lower case, empty ones left out.
    pub(super) fn names(&self, name: &'static str) -> Result<Vec<String>, ConfigError> {
        Ok(self
            .raw(name)
            .map(|raw| {
                raw.split(',')
                    .map(|s| s.trim().to_lowercase())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default())
    }

    pub(super) fn networks(&self, name: &'static str) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        let Some(raw) = self.raw(name) else {
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
                            name,
                            format!("expected CIDR networks like 10.0.0.0/8, got {s:?}"),
                        )
                    })
            })
            .collect()
    }
}

fn random_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}
