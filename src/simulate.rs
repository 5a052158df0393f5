//! `orchestrator simulate`: simulated droplets (register, heartbeat, receive dispatched tasks,
//! run and finish them), a task producer at a fixed rate and a dashboard client on
//! `/ws/tasks`, against a running orchestrator; a live progress line and a latency summary.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::config::Config;
use crate::identity::{Keys, Permission};

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
}

#[derive(Default, Clone, Copy)]
struct Timing {
    sent: Option<Instant>,
    assigned: Option<Instant>,
    dispatched: Option<Instant>,
    finished: Option<Instant>,
}

#[derive(Default)]
struct Counters {
    created: AtomicU64,
    create_errors: AtomicU64,
    assigned: AtomicU64,
    dispatched: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    requeued: AtomicU64,
    patch_errors: AtomicU64,
    rate_limited: AtomicU64,
    events: AtomicU64,
}

struct Shared {
    base: String,
    http: reqwest::Client,
    tokens: HashMap<i32, String>,
    timings: Mutex<HashMap<Uuid, Timing>>,
    counters: Counters,
    work: Duration,
    fail_rate: f64,
}

impl Shared {
    fn mark(&self, trace: Uuid, f: impl FnOnce(&mut Timing)) {
        if let Ok(mut t) = self.timings.lock() {
            f(t.entry(trace).or_default());
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Latency {
    pub count: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Latency {
    pub fn of(mut samples: Vec<f64>) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| {
            samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1]
        };
        Latency {
            count: samples.len(),
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
            max: samples[samples.len() - 1],
        }
    }
}

/// What a simulation measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    pub seconds: f64,
    pub created: u64,
    pub create_errors: u64,
    pub completed: u64,
    pub failed: u64,
    pub retried: u64,
    pub requeued: u64,
    pub events: u64,
    pub throughput_per_second: f64,
    pub create_to_assigned_ms: Latency,
    pub create_to_dispatched_ms: Latency,
    pub create_to_completed_ms: Latency,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "simulation: {:.1} s", self.seconds)?;
        writeln!(
            f,
            "tasks: created {} (errors {}), completed {}, failed {}, retried {}, requeued {}",
            self.created,
            self.create_errors,
            self.completed,
            self.failed,
            self.retried,
            self.requeued
        )?;
        writeln!(
            f,
            "throughput: {:.1} tasks/s completed; {} dashboard events",
            self.throughput_per_second, self.events
        )?;
        for (name, l) in [
            ("create -> assigned", self.create_to_assigned_ms),
            ("create -> dispatched", self.create_to_dispatched_ms),
            ("create -> completed", self.create_to_completed_ms),
        ] {
            writeln!(
                f,
                "{name:<22} p50 {:>8.2} ms  p95 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms  (n={})",
                l.p50, l.p95, l.p99, l.max, l.count
            )?;
        }
        Ok(())
    }
}

fn envelope(source: i32, message_type: &str, payload: Value) -> Value {
    json!({
        "udc_version": "1.0",
        "trace_id": Uuid::new_v4(),
        "source": source,
        "target": 10,
        "message_type": message_type,
        "payload": payload,
        "timestamp": crate::protocol::now_iso(),
    })
}

/// Tokens for the droplets and the admin: given, signed locally, or minted in development.
async fn tokens(
    args: &SimulateArgs,
    http: &reqwest::Client,
    ids: &[i32],
) -> Result<(String, HashMap<i32, String>), String> {
    let secret_keys = match std::env::var("JWT_SECRET_KEY") {
        Ok(s) if !s.is_empty() => Config::from_lookup(&|k| match k {
            "JWT_SECRET_KEY" => Some(s.clone()),
            _ => None,
        })
        .ok()
        .and_then(|c| Keys::from_config(&c).ok()),
        _ => None,
    };
    let mint = |id: i32, perms: &'static [&'static str]| {
        let keys = secret_keys.as_ref();
        let http = http.clone();
        let url = format!("{}/token", args.url.trim_end_matches('/'));
        async move {
            if let Some(keys) = keys {
                let p: Vec<Permission> =
                    perms.iter().filter_map(|p| Permission::parse(p)).collect();
                return keys
                    .mint(id, Some("simulator".into()), &p, 86_400)
                    .map_err(|e| e.to_string());
            }
            let r = http
                .post(url)
                .json(&json!({"droplet_id": id, "steward": "simulator", "permissions": perms}))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if !r.status().is_success() {
                return Err(format!(
                    "POST /token answered {} (outside development, pass --token or set JWT_SECRET_KEY)",
                    r.status()
                ));
            }
            let body: Value = r.json().await.map_err(|e| e.to_string())?;
            body["access_token"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| "no access_token".to_string())
        }
    };
    let admin = match &args.token {
        Some(t) => t.clone(),
        None => mint(1, &["read", "write", "admin"]).await?,
    };
    let mut map = HashMap::new();
    for id in ids {
        map.insert(*id, mint(*id, &["read", "write"]).await?);
    }
    Ok((admin, map))
}

/// The droplets' `/message`: `execute_task` starts the simulated work.
async fn on_message(
    State(shared): State<Arc<Shared>>,
    Path(droplet): Path<i32>,
    Json(body): Json<Value>,
) -> Json<Value> {
    if body["payload"]["command"] == "execute_task" {
        let task_id = body["payload"]["task"]["id"].as_i64().unwrap_or(0);
        if let Ok(trace) =
            Uuid::parse_str(body["payload"]["task"]["trace_id"].as_str().unwrap_or(""))
        {
            shared.mark(trace, |t| {
                t.dispatched.get_or_insert(Instant::now());
            });
        }
        shared.counters.dispatched.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        tokio::spawn(async move { work(shared, droplet, task_id, body).await });
    }
    Json(json!({"received": true}))
}

async fn patch(shared: &Shared, droplet: i32, task_id: i64, payload: Value) -> bool {
    let Some(token) = shared.tokens.get(&droplet) else {
        return false;
    };
    let sent = shared
        .http
        .patch(format!("{}/tasks/{task_id}", shared.base))
        .bearer_auth(token)
        .json(&envelope(droplet, "command", payload))
        .send()
        .await;
    match sent {
        Ok(r) if r.status().is_success() => true,
        _ => {
            shared.counters.patch_errors.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

async fn work(shared: Arc<Shared>, droplet: i32, task_id: i64, body: Value) {
    if !patch(&shared, droplet, task_id, json!({"status": "in_progress"})).await {
        return;
    }
    tokio::time::sleep(shared.work).await;
    let fail = shared.fail_rate > 0.0 && rand::random::<f64>() < shared.fail_rate;
    let outcome = if fail {
        json!({"status": "failed", "error_message": "simulated failure"})
    } else {
        json!({"status": "completed", "result": {"simulated": true, "droplet": droplet}})
    };
    if patch(&shared, droplet, task_id, outcome).await {
        if let Ok(trace) =
            Uuid::parse_str(body["payload"]["task"]["trace_id"].as_str().unwrap_or(""))
        {
            shared.mark(trace, |t| {
                t.finished = Some(Instant::now());
            });
        }
        if fail {
            shared.counters.failed.fetch_add(1, Ordering::Relaxed);
        } else {
            shared.counters.completed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Watches `/ws/tasks` as a dashboard would, recording when each task was assigned.
async fn dashboard(shared: Arc<Shared>, ws_url: String, stop: tokio_util::sync::CancellationToken) {
    let Ok((mut socket, _)) = tokio_tungstenite::connect_async(ws_url.as_str()).await else {
        eprintln!("simulate: could not connect to /ws/tasks; assignment latency will be missing");
        return;
    };
    loop {
        let frame = tokio::select! {
            _ = stop.cancelled() => return,
            f = socket.next() => f,
        };
        let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) = frame else {
            if frame.is_none() {
                return;
            }
            continue;
        };
        let Ok(event) = serde_json::from_str::<Value>(text.as_str()) else {
            continue;
        };
        shared.counters.events.fetch_add(1, Ordering::Relaxed);
        let trace = Uuid::parse_str(event["payload"]["task"]["trace_id"].as_str().unwrap_or(""));
        match event["payload"]["event"].as_str() {
            Some("task_assigned") => {
                shared.counters.assigned.fetch_add(1, Ordering::Relaxed);
                if let Ok(trace) = trace {
                    shared.mark(trace, |t| {
                        t.assigned.get_or_insert(Instant::now());
                    });
                }
            }
            Some("task_retrying") => {
                shared.counters.retried.fetch_add(1, Ordering::Relaxed);
            }
            Some("task_requeued") => {
                shared.counters.requeued.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

/// Runs a simulation against `args.url` and returns what it measured.
pub async fn run(args: SimulateArgs) -> Result<Summary, String> {
    if args.droplets == 0 || args.tasks_per_second <= 0.0 || args.duration < 0.0 {
        return Err("--droplets and --tasks-per-second must be above 0".into());
    }
    let base = args.url.trim_end_matches('/').to_string();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(256)
        .build()
        .map_err(|e| e.to_string())?;
    let ids: Vec<i32> = (0..args.droplets as i32)
        .map(|i| args.first_droplet_id + i)
        .collect();
    let (admin, droplet_tokens) = tokens(&args, &http, &ids).await?;
    let shared = Arc::new(Shared {
        base: base.clone(),
        http: http.clone(),
        tokens: droplet_tokens,
        timings: Mutex::new(HashMap::new()),
        counters: Counters::default(),
        work: Duration::from_millis(args.work_ms),
        fail_rate: args.fail_rate.clamp(0.0, 1.0),
    });

    // One HTTP server plays every droplet: /d/{id}/message.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let droplet_addr = listener.local_addr().map_err(|e| e.to_string())?;
    let server = Router::new()
        .route("/d/{id}/message", post(on_message))
        .with_state(shared.clone());
    let stop = tokio_util::sync::CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, server)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
    }

    let capabilities: Vec<String> = if args.capabilities.is_empty() {
        vec!["a".into()]
    } else {
        args.capabilities.clone()
    };
    let mut heartbeat_every = 10u64;
    for (i, id) in ids.iter().enumerate() {
        let body = envelope(
            *id,
            "command",
            json!({
                "droplet_id": id,
                "name": format!("sim-{id}"),
                "steward": "simulator",
                "endpoint": format!("http://{droplet_addr}/d/{id}"),
                "capabilities": [capabilities[i % capabilities.len()]],
            }),
        );
        let r = http
            .post(format!("{base}/droplets/register"))
            .bearer_auth(&shared.tokens[id])
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("cannot reach {base}: {e}"))?;
        if !r.status().is_success() {
            return Err(format!(
                "registering droplet {id}: HTTP {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            ));
        }
        let answer: Value = r.json().await.unwrap_or_default();
        if let Some(n) = answer["payload"]["heartbeat_interval_seconds"].as_u64() {
            heartbeat_every = heartbeat_every.min(n.max(1));
        }
    }

    // Heartbeats, as real droplets send them.
    {
        let shared = shared.clone();
        let ids = ids.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(heartbeat_every));
            loop {
                tokio::select! { _ = stop.cancelled() => return, _ = tick.tick() => {} }
                for id in &ids {
                    let _ = shared
                        .http
                        .post(format!("{}/droplets/{id}/heartbeat", shared.base))
                        .bearer_auth(&shared.tokens[id])
                        .json(&envelope(
                            *id,
                            "heartbeat",
                            json!({"status": "active", "metrics": {"simulated": true}}),
                        ))
                        .send()
                        .await;
                }
            }
        });
    }

    let ws_url = format!("{}/ws/tasks?token={admin}", base.replacen("http", "ws", 1));
    tokio::spawn(dashboard(shared.clone(), ws_url, stop.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Progress line.
    let started = Instant::now();
    if !args.quiet {
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! { _ = stop.cancelled() => return, _ = tick.tick() => {} }
                let c = &shared.counters;
                let secs = started.elapsed().as_secs_f64().max(0.001);
                eprint!(
                    "\r[{:>5.1}s] created {:>7}  assigned {:>7}  dispatched {:>7}  completed {:>7}  failed {:>5}  retried {:>5}  {:>7.1} done/s   ",
                    secs,
                    c.created.load(Ordering::Relaxed),
                    c.assigned.load(Ordering::Relaxed),
                    c.dispatched.load(Ordering::Relaxed),
                    c.completed.load(Ordering::Relaxed),
                    c.failed.load(Ordering::Relaxed),
                    c.retried.load(Ordering::Relaxed),
                    c.completed.load(Ordering::Relaxed) as f64 / secs,
                );
            }
        });
    }

    // The producer: a steady rate, each creation on its own task, bounded in flight.
    let permits = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let total = (args.tasks_per_second * args.duration).round() as u64;
    let period = Duration::from_secs_f64(1.0 / args.tasks_per_second.max(0.001));
    for n in 0..total {
        // Creations are spread over the simulated droplets' tokens, as many clients would.
        let creator = ids[(n as usize) % ids.len().max(1)];
        let due = started + period.mul_f64(n as f64);
        tokio::time::sleep_until(due.into()).await;
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let shared = shared.clone();
        let capability = capabilities[rand::random_range(0..capabilities.len())].clone();
        tokio::spawn(async move {
            let _permit = permit;
            let trace = Uuid::new_v4();
            let body = json!({
                "udc_version": "1.0", "trace_id": trace, "source": creator, "target": 10,
                "message_type": "command", "timestamp": crate::protocol::now_iso(),
                "payload": {"task_type": "simulated", "title": format!("simulated task {n}"),
                            "required_capability": capability, "payload": {"n": n}},
            });
            shared.mark(trace, |t| t.sent = Some(Instant::now()));
            let ok = match shared
                .http
                .post(format!("{}/tasks", shared.base))
                .bearer_auth(&shared.tokens[&creator])
                .json(&body)
                .send()
                .await
            {
                Ok(r) if r.status().as_u16() == 429 => {
                    shared.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
                    false
                }
                Ok(r) => r.status().is_success(),
                Err(_) => false,
            };
            if ok {
                shared.counters.created.fetch_add(1, Ordering::Relaxed);
            } else {
                shared
                    .counters
                    .create_errors
                    .fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let _ = permits.acquire_many(args.concurrency.max(1) as u32).await;
    let produced = started.elapsed();

    // Drain: wait for the last tasks to finish.
    let drain_until = Instant::now() + Duration::from_secs_f64(args.drain_seconds);
    while Instant::now() < drain_until {
        let c = &shared.counters;
        let done = c.completed.load(Ordering::Relaxed) + c.failed.load(Ordering::Relaxed);
        if done >= c.created.load(Ordering::Relaxed) && args.fail_rate == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    stop.cancel();
    if !args.quiet {
        eprintln!();
    }
    let limited = shared.counters.rate_limited.load(Ordering::Relaxed);
    if limited > 0 {
        eprintln!(
            "simulate: {limited} task creations were refused with 429: the server's RATE_LIMIT_PER_MINUTE \
             (per droplet) is below this load; start it with e.g. RATE_LIMIT_PER_MINUTE=1000000"
        );
    }

    let timings: Vec<Timing> = shared
        .timings
        .lock()
        .map(|t| t.values().copied().collect())
        .unwrap_or_default();
    let since = |f: fn(&Timing) -> Option<Instant>| -> Vec<f64> {
        timings
            .iter()
            .filter_map(|t| Some(f(t)?.saturating_duration_since(t.sent?).as_secs_f64() * 1000.0))
            .collect()
    };
    let c = &shared.counters;
    let completed = c.completed.load(Ordering::Relaxed);
    Ok(Summary {
        seconds: elapsed,
        created: c.created.load(Ordering::Relaxed),
        create_errors: c.create_errors.load(Ordering::Relaxed),
        completed,
        failed: c.failed.load(Ordering::Relaxed),
        retried: c.retried.load(Ordering::Relaxed),
        requeued: c.requeued.load(Ordering::Relaxed),
        events: c.events.load(Ordering::Relaxed),
        throughput_per_second: completed as f64 / produced.as_secs_f64().max(0.001),
        create_to_assigned_ms: Latency::of(since(|t| t.assigned)),
        create_to_dispatched_ms: Latency::of(since(|t| t.dispatched)),
        create_to_completed_ms: Latency::of(since(|t| t.finished)),
    })
}

#[cfg(test)]
mod tests {
    use super::Latency;

    #[test]
    fn percentiles_are_nearest_rank() {
        let l = Latency::of((1..=100).map(f64::from).collect());
        assert_eq!(
            (l.p50, l.p95, l.p99, l.max, l.count),
            (50.0, 95.0, 99.0, 100.0, 100)
        );
        assert_eq!(Latency::of(vec![]).count, 0);
    }
}
