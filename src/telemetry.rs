//! Logging: tracing with JSON lines in production and readable lines elsewhere.

use tracing_subscriber::{fmt, prelude::*, reload, EnvFilter, Registry};

use crate::config::Config;

/// Turns `LOG_LEVEL` (Python's names or a tracing filter) into a filter.
pub fn filter_from_level(level: &str) -> Result<EnvFilter, String> {
    let base = match level.trim().to_ascii_uppercase().as_str() {
        "TRACE" => "trace",
        "DEBUG" => "debug",
        "INFO" => "info",
        "WARNING" | "WARN" => "warn",
        "ERROR" | "CRITICAL" | "FATAL" => "error",
        _ => {
            return EnvFilter::try_new(level).map_err(|e| {
                format!("expected DEBUG, INFO, WARNING, ERROR or a tracing filter: {e}")
            })
        }
    };
    // Dependencies speak only when something is wrong.
    EnvFilter::try_new(format!(
        "{base},sqlx=warn,hyper=warn,tower_http=warn,reqwest=warn,tokio_cron_scheduler=warn"
    ))
    .map_err(|e| e.to_string())
}

/// Lets `/management/reload-config` change the log level of a running process.
#[derive(Clone)]
pub struct LogHandle(Option<reload::Handle<EnvFilter, Registry>>);

impl LogHandle {
    /// A handle that changes nothing (tests, or when logging was set up elsewhere).
    pub fn none() -> Self {
        LogHandle(None)
    }

    pub fn set_level(&self, level: &str) -> Result<(), String> {
        let filter = filter_from_level(level)?;
        if let Some(handle) = &self.0 {
            handle.reload(filter).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// Installs the global subscriber; the first call wins.
pub fn init(config: &Config) -> LogHandle {
    let filter = filter_from_level(&config.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = if config.is_production() {
        registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init()
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        registry
            .with(
                fmt::layer()
                    .with_target(false)
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .try_init()
    };
    match installed {
        Ok(()) => LogHandle(Some(handle)),
        Err(_) => LogHandle::none(),
    }
}
