//! The command line: `serve` (the default), `migrate`, `token`, `check-config`.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "orchestrator",
    version,
    about = "Droplet #10: task routing and workflow management for the droplet mesh"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service (the default): HTTP API, WebSockets and the scheduled jobs.
    Serve,
    /// Create the database if it is missing, apply the migrations, and exit.
    Migrate,
    /// Sign a token with JWT_SECRET_KEY (for operators when /token is closed).
    Token {
        /// The droplet id the token acts as.
        #[arg(long)]
        droplet_id: i32,
        /// The steward's name.
        #[arg(long, default_value = "operator")]
        steward: String,
        /// Comma-separated permissions: read, write, admin.
        #[arg(long, default_value = "read")]
        permissions: String,
        /// Lifetime in seconds (default JWT_EXPIRATION_SECONDS).
        #[arg(long)]
        expires_in: Option<u64>,
    },
    /// Print the effective configuration (secrets masked); exit non-zero when it is invalid.
    CheckConfig,
    /// Exit 0 when the service answers GET /health (the container's HEALTHCHECK; the
    /// runtime image has no curl).
    Healthcheck {
        /// The URL to check (default: http://127.0.0.1:$PORT/health).
        #[arg(long)]
        url: Option<String>,
    },
}
