//! `orchestrator-simulator`, the command: simulated droplets (register, heartbeat, receive
//! dispatched tasks, run and finish them), a task producer at a fixed rate and a dashboard
//! client on `/ws/tasks`, against a running orchestrator; a live progress line and a latency
//! summary.
//! The droplets, producer and dashboard are this crate's; this module wires them for the
//! command line (`main.rs` only parses the flags and prints the summary).
//!
//! - `args.rs`: the flags.
//! - `tokens.rs`: the admin's and droplets' tokens.
//! - `progress.rs`: the live line.
//! - `summary.rs`: what the run measured, printed.

mod args;
mod progress;
mod summary;
mod tokens;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::{
    Api, ApiOptions, Dashboard, Fleet, FleetConfig, Heartbeats, Patience, Pick, Producer,
    ProducerConfig, Timeline, Watch, Wire,
};

pub use crate::report::Latency;
pub use args::SimulateArgs;
pub use summary::Summary;

/// Runs a simulation against `args.url` and returns what it measured.
pub async fn run(args: SimulateArgs) -> Result<Summary, String> {
    if args.droplets == 0 || args.tasks_per_second <= 0.0 || args.duration < 0.0 {
        return Err("--droplets and --tasks-per-second must be above 0".into());
    }
    let base = args.url.trim_end_matches('/').to_string();
    let api = Api::with_options(
        vec![base.clone()],
        ApiOptions {
            timeout: Duration::from_secs(30),
            idle_per_host: 256,
            keep_log: false,
        },
    );
    let ids: Vec<i32> = (0..args.droplets as i32)
        .map(|i| args.first_droplet_id + i)
        .collect();
    let (admin, mut droplet_tokens) = tokens::tokens(&args, api.http(), &ids).await?;
    let droplets: Vec<(i32, String)> = ids
        .iter()
        .map(|id| (*id, droplet_tokens.remove(id).unwrap_or_default()))
        .collect();
    let capabilities: Vec<String> = if args.capabilities.is_empty() {
        vec!["a".into()]
    } else {
        args.capabilities.clone()
    };
    let timeline = Arc::new(Timeline::default());

    // One HTTP server plays every droplet (/d/{id}/message); heartbeats as real droplets
    // send them, as often as the server asks and at least every 10 s.
    let fleet = Fleet::start(
        api.clone(),
        droplets.clone(),
        FleetConfig {
            capabilities: capabilities.clone(),
            work: Duration::from_millis(args.work_ms),
            fail_rate: args.fail_rate.clamp(0.0, 1.0),
            heartbeats: Heartbeats::AsServerAsks {
                at_most: Duration::from_secs(10),
            },
            patience: Patience::Once,
            timeline: Some(timeline.clone()),
            ..FleetConfig::new(Wire::SIMULATE, &[])
        },
    )
    .await?;

    let watch = Watch {
        keep_events: false,
        timeline: Some(timeline.clone()),
    };
    let connect = Dashboard::connect(&base, "tasks", &admin, watch);
    let dashboard = match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok(d)) => Some(Arc::new(d)),
        _ => {
            eprintln!(
                "simulate: could not connect to /ws/tasks; assignment latency will be missing"
            );
            None
        }
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The producer: a steady rate, each creation on its own task, bounded in flight;
    // creations are spread over the simulated droplets' tokens, as many clients would.
    let started = Instant::now();
    let producer = Producer::start(
        api.clone(),
        ProducerConfig {
            wire: Wire::SIMULATE,
            per_second: args.tasks_per_second,
            total: Some((args.tasks_per_second * args.duration).round() as u64),
            creators: droplets,
            capabilities,
            pick: Pick::Random,
            in_flight: args.concurrency,
            patience: Patience::Once,
            task_type: "simulated".into(),
            title: "simulated task".into(),
            timeline: Some(timeline.clone()),
        },
    );
    let stop_progress = CancellationToken::new();
    if !args.quiet {
        progress::spawn(
            fleet.clone(),
            dashboard.clone(),
            producer.produced.clone(),
            started,
            stop_progress.clone(),
        );
    }
    let produced = producer.join().await;
    let produced_for = started.elapsed();

    // Drain: wait for the last tasks to finish.
    let drain_until = Instant::now() + Duration::from_secs_f64(args.drain_seconds);
    while Instant::now() < drain_until {
        let done = fleet.completed.load(Ordering::Relaxed) + fleet.failed.load(Ordering::Relaxed);
        if done >= produced.created() && args.fail_rate == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    fleet.stop();
    stop_progress.cancel();
    if let Some(d) = &dashboard {
        d.stop();
    }
    if !args.quiet {
        eprintln!();
    }
    let limited = produced.rate_limited.load(Ordering::Relaxed);
    if limited > 0 {
        eprintln!(
            "simulate: {limited} task creations were refused with 429: the server's RATE_LIMIT_PER_MINUTE \
             (per droplet) is below this load; start it with e.g. RATE_LIMIT_PER_MINUTE=1000000"
        );
    }

    let seen = |kind: &str| dashboard.as_ref().map_or(0, |d| d.count_of(kind));
    let completed = fleet.completed.load(Ordering::Relaxed);
    Ok(Summary {
        seconds: elapsed,
        created: produced.created(),
        create_errors: produced.errors(),
        completed,
        failed: fleet.failed.load(Ordering::Relaxed),
        retried: seen("task_retrying"),
        requeued: seen("task_requeued"),
        events: dashboard.as_ref().map_or(0, |d| d.count() as u64),
        throughput_per_second: completed as f64 / produced_for.as_secs_f64().max(0.001),
        create_to_assigned_ms: timeline.since_sent(|m| m.assigned),
        create_to_dispatched_ms: timeline.since_sent(|m| m.dispatched),
        create_to_completed_ms: timeline.since_sent(|m| m.finished),
    })
}
