//! `ENVIRONMENT`: where the service runs. Production tightens the defaults of other settings
//! (`HOST`, `JWT_SECRET_KEY`, `ENABLE_SWAGGER`).

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

    /// The value of `ENVIRONMENT` (already lower-cased), with the Python service's aliases.
    pub(super) fn parse(value: &str) -> Option<Environment> {
        match value {
            "development" | "dev" | "local" | "test" => Some(Environment::Development),
            "production" | "prod" | "staging" => Some(Environment::Production),
            _ => None,
        }
    }

    pub fn is_production(self) -> bool {
        self == Environment::Production
    }
}
