//! A task producer: creations at a steady rate, each on its own task, a bounded number in
//! flight, until stopped or a total is sent. A careful producer creates a task again with
//! the same trace id until it is acknowledged, so a lost answer never loses or duplicates
//! a task.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::api::{Api, Patience};
use super::lock;
use super::report::Timeline;
use super::wire::Wire;

/// How long a careful producer keeps sending one creation.
const CREATE_GIVE_UP: Duration = Duration::from_secs(60);

/// Which capability each task requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// The n-th task the n-th capability (wrapping).
    RoundRobin,
    /// One at random.
    Random,
}

/// What a producer creates and how.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    pub wire: Wire,
    /// Creations per second.
    pub per_second: f64,
    /// Stop after this many (None: until stopped).
    pub total: Option<u64>,
    /// Who creates: the n-th creation is the n-th creator's (wrapping), `(id, token)`.
    pub creators: Vec<(i32, String)>,
    /// Each task requires one of these (none when empty).
    pub capabilities: Vec<String>,
    pub pick: Pick,
    /// Creations in flight at once.
    pub in_flight: usize,
    pub patience: Patience,
    pub task_type: String,
    /// The n-th task is titled `{title} {n}`.
    pub title: String,
    /// Where each creation is marked as sent.
    pub timeline: Option<Arc<Timeline>>,
}

/// What a producer created.
#[derive(Debug, Default)]
pub struct Produced {
    /// Tasks the API acknowledged (201, or 200 for a repeated trace id): trace id, task id.
    pub acked: Mutex<Vec<(Uuid, i32)>>,
    /// Creations that got no acknowledgement before giving up (trace id, last status).
    pub gave_up: Mutex<Vec<(Uuid, Option<u16>)>>,
    /// Creations started.
    pub sent: AtomicU64,
    /// Creations whose last answer was a 429.
    pub rate_limited: AtomicU64,
}

impl Produced {
    pub fn acked(&self) -> Vec<(Uuid, i32)> {
        lock(&self.acked).clone()
    }

    pub fn gave_up(&self) -> Vec<(Uuid, Option<u16>)> {
        lock(&self.gave_up).clone()
    }

    /// How many were acknowledged.
    pub fn created(&self) -> u64 {
        lock(&self.acked).len() as u64
    }

    /// How many were given up.
    pub fn errors(&self) -> u64 {
        lock(&self.gave_up).len() as u64
    }
}

/// Creates tasks at a steady rate until stopped (or `total` are sent).
pub struct Producer {
    pub produced: Arc<Produced>,
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl Producer {
    pub fn start(api: Arc<Api>, config: ProducerConfig) -> Producer {
        let produced = Arc::new(Produced::default());
        let stop = CancellationToken::new();
        let handle = tokio::spawn(produce(api, config, produced.clone(), stop.clone()));
        Producer {
            produced,
            stop,
            handle,
        }
    }

    /// Stops producing and waits for the creations in flight.
    pub async fn finish(self) -> Arc<Produced> {
        self.stop.cancel();
        let _ = self.handle.await;
        self.produced
    }

    /// Waits until `total` have been sent and answered.
    pub async fn join(self) -> Arc<Produced> {
        let _ = self.handle.await;
        self.produced
    }
}

async fn produce(
    api: Arc<Api>,
    config: ProducerConfig,
    produced: Arc<Produced>,
    stop: CancellationToken,
) {
    if config.creators.is_empty() {
        return;
    }
    let in_flight = config.in_flight.max(1);
    let permits = Arc::new(Semaphore::new(in_flight));
    let period = Duration::from_secs_f64(1.0 / config.per_second.max(0.001));
    let started = tokio::time::Instant::now();
    let config = Arc::new(config);
    let mut n = 0u64;
    while !stop.is_cancelled() && config.total.is_none_or(|t| n < t) {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(started + period.mul_f64(n as f64)) => {}
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let caps = &config.capabilities;
        let capability = match config.pick {
            _ if caps.is_empty() => None,
            Pick::RoundRobin => Some(caps[n as usize % caps.len()].clone()),
            Pick::Random => Some(caps[rand::random_range(0..caps.len())].clone()),
        };
        produced.sent.fetch_add(1, Ordering::Relaxed);
        let (api, config, produced) = (api.clone(), config.clone(), produced.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let (creator, token) = &config.creators[n as usize % config.creators.len()];
            let trace = Uuid::new_v4();
            let mut task = json!({"task_type": config.task_type,
                                  "title": format!("{} {n}", config.title),
                                  "payload": {"n": n}});
            if let Some(capability) = capability {
                task["required_capability"] = json!(capability);
            }
            let body = config
                .wire
                .envelope_traced(&trace.to_string(), *creator, "command", task);
            if let Some(timeline) = &config.timeline {
                timeline.sent(trace);
            }
            let answer = api
                .request(
                    config.patience,
                    Method::POST,
                    "/tasks",
                    token,
                    Some(&body),
                    CREATE_GIVE_UP,
                )
                .await;
            match answer {
                Some((201 | 200, v)) => {
                    let id = v["payload"]["task_id"].as_i64().unwrap_or(-1) as i32;
                    lock(&produced.acked).push((trace, id));
                }
                other => {
                    if matches!(other, Some((429, _))) {
                        produced.rate_limited.fetch_add(1, Ordering::Relaxed);
                    }
                    lock(&produced.gave_up).push((trace, other.map(|(s, _)| s)));
                }
            }
        });
        n += 1;
    }
    // Every creation in flight ends (acknowledged or given up) before this does.
    let _ = permits.acquire_many(in_flight as u32).await;
}
