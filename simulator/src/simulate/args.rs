//! `orchestrator-simulator`'s flags.

#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// The orchestrator's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// How many droplets to simulate.
    #[arg(long, default_value_t = 10)]
    pub droplets: usize,
    /// Capabilities, spread round-robin over the droplets; tasks pick one at random.
    #[arg(long, value_delimiter = ',', default_value = "a,b,c")]
    pub capabilities: Vec<String>,
    /// Tasks created per second.
    #[arg(long, default_value_t = 50.0)]
    pub tasks_per_second: f64,
    /// Seconds of task production.
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// How long a simulated droplet works on a task.
    #[arg(long, default_value_t = 20)]
    pub work_ms: u64,
    /// Share of tasks a droplet fails (0.0-1.0).
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// An admin token; without one, tokens are signed with JWT_SECRET_KEY when it is set,
    /// else minted through /token (development).
    #[arg(long)]
    pub token: Option<String>,
    /// The first simulated droplet id.
    #[arg(long, default_value_t = 1000)]
    pub first_droplet_id: i32,
    /// Seconds to wait for the last tasks to finish after production stops.
    #[arg(long, default_value_t = 15.0)]
    pub drain_seconds: f64,
    /// Task creations in flight at once.
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,
    /// No live progress line.
    #[arg(long)]
    pub quiet: bool,
    /// The orchestrator's JWT_SECRET_KEY, to sign the tokens locally: read from the
    /// environment by the command (never a flag: a command line is visible to every user).
    #[arg(skip)]
    pub jwt_secret: Option<String>,
}
