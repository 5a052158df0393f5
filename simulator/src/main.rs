//! `orchestrator-simulator`: simulated droplets and a task producer against a running
//! orchestrator, with live progress and a latency summary (see [`orchestrator_simulator::simulate`]).

use std::process::ExitCode;

use clap::Parser;
use orchestrator_simulator::simulate::{self, SimulateArgs};

/// Simulate droplets and a task producer against a running orchestrator, with live progress
/// and a latency summary. Tokens are signed with JWT_SECRET_KEY when it is set, else minted
/// through /token (development), unless --token gives the admin's.
#[derive(Debug, Parser)]
#[command(name = "orchestrator-simulator", version)]
struct Cli {
    #[command(flatten)]
    args: SimulateArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = Cli::parse().args;
    args.jwt_secret = std::env::var("JWT_SECRET_KEY").ok();
    match simulate::run(args).await {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("orchestrator-simulator: {e}");
            ExitCode::FAILURE
        }
    }
}
