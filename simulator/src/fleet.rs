//! Simulated droplets behind one HTTP server (`/d/{id}/message`): registered one capability
//! each (round robin), heartbeating, doing what their [`Behaviour`] says with every
//! delivery, and counting what happened.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::post;
use axum::Router;
use reqwest::Method;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::api::{Api, Patience};
use super::droplet::{self, Behaviour, Droplet};
use super::lock;
use super::report::Timeline;
use super::wire::Wire;

/// How long a careful droplet keeps trying to register.
const REGISTER_GIVE_UP: Duration = Duration::from_secs(20);

/// When the droplets heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heartbeats {
    /// Never (a run shorter than the server's heartbeat timeout).
    Off,
    /// Every this long (plus each droplet's jitter).
    Every(Duration),
    /// As often as the server asks at registration (`heartbeat_interval_seconds`), and at
    /// least this often.
    AsServerAsks { at_most: Duration },
}

/// What a fleet is and how its droplets behave.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub wire: Wire,
    /// One per droplet, round robin in droplet id order.
    pub capabilities: Vec<String>,
    /// How long a droplet works on a task.
    pub work: Duration,
    /// Share of tasks a droplet fails (0.0-1.0).
    pub fail_rate: f64,
    /// Every droplet's behaviour at the start.
    pub behaviour: Behaviour,
    pub heartbeats: Heartbeats,
    /// For registrations and PATCHes.
    pub patience: Patience,
    /// Where the droplets mark when each task was dispatched and finished.
    pub timeline: Option<Arc<Timeline>>,
}

impl FleetConfig {
    /// Normal droplets that work 20 ms, never fail, never heartbeat, send each request once.
    pub fn new(wire: Wire, capabilities: &[&str]) -> FleetConfig {
        FleetConfig {
            wire,
            capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
            work: Duration::from_millis(20),
            fail_rate: 0.0,
            behaviour: Behaviour::Normal,
            heartbeats: Heartbeats::Off,
            patience: Patience::Once,
            timeline: None,
        }
    }
}

/// Simulated droplets behind one HTTP server, and what they saw.
pub struct Fleet {
    pub api: Arc<Api>,
    pub droplets: BTreeMap<i32, Arc<Droplet>>,
    pub addr: SocketAddr,
    config: FleetConfig,
    /// `execute_task` deliveries received.
    pub delivered: AtomicU64,
    /// task -> droplets that were told to execute it, in order.
    pub executions: Mutex<HashMap<i32, Vec<i32>>>,
    /// task -> completion PATCHes the server accepted.
    pub completions: Mutex<HashMap<i32, u32>>,
    pub completed: AtomicU64,
    /// Failures (`fail_rate`) the server accepted.
    pub failed: AtomicU64,
    pub cancels: AtomicU64,
    /// PATCHes answered 409 whose first attempt had in fact been applied (answer lost).
    pub already_done: AtomicU64,
    /// PATCHes that did not end in a 200.
    pub patch_errors: AtomicU64,
    pub paused: AtomicBool,
    /// PATCHes name the attempt of the delivery they answer (off: the wire as it always was).
    pub fenced: AtomicBool,
    /// (task, attempt) -> droplets that were told to execute it.
    pub runs: Mutex<HashMap<(i32, i32), Vec<i32>>>,
    /// (droplet, task, attempt) being worked on: a second delivery of it is acknowledged
    /// and not run again.
    pub(crate) running: Mutex<HashSet<(i32, i32, i32)>>,
    /// Deliveries acknowledged and not run again (a droplet already on that attempt).
    pub duplicate_deliveries: AtomicU64,
    /// PATCHes the server applied (answered 200 at once, not read back after a 409).
    pub accepted: Mutex<Vec<Accepted>>,
    /// PATCHes refused because they named an attempt the task is no longer on (409).
    pub stale_refused: AtomicU64,
    /// PATCHes refused because the task is no longer the droplet's (403).
    pub not_yours_refused: AtomicU64,
    /// Deliveries a droplet refused ([`Behaviour::Refuse`]).
    pub refused_deliveries: AtomicU64,
    /// Second completions ([`Behaviour::CompleteTwice`]): task, attempt, answer.
    pub second_completions: Mutex<Vec<(i32, i32, Option<u16>)>>,
    /// Results sent after the task moved on ([`Behaviour::LateResult`]).
    pub late_results: Mutex<Vec<LateResult>>,
    /// Deliveries taken by a droplet that answers late (each ends in `late_results`).
    pub late_taken: AtomicU64,
    stop: CancellationToken,
}

/// A result sent late: task, attempt it was for, attempt the task was on then, answer.
pub type LateResult = (i32, i32, i64, Option<u16>);

/// A PATCH the server applied, with the attempt it named and the one the task is on after.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub task: i32,
    pub droplet: i32,
    pub status: String,
    pub attempt_sent: Option<i32>,
    pub attempt_after: Option<i64>,
}

impl Fleet {
    /// Starts the droplets' server, registers every droplet (`(id, token)`, in id order) and
    /// starts their heartbeats. A registration that fails stops the fleet.
    pub async fn start(
        api: Arc<Api>,
        droplets: Vec<(i32, String)>,
        config: FleetConfig,
    ) -> Result<Arc<Fleet>, String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("cannot listen for the droplets: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let fleet = Arc::new(Fleet {
            api,
            droplets: droplets
                .into_iter()
                .map(|(id, token)| (id, Arc::new(Droplet::new(id, token, config.behaviour))))
                .collect(),
            addr,
            config,
            delivered: AtomicU64::new(0),
            executions: Mutex::new(HashMap::new()),
            completions: Mutex::new(HashMap::new()),
            completed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            cancels: AtomicU64::new(0),
            already_done: AtomicU64::new(0),
            patch_errors: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
            runs: Mutex::new(HashMap::new()),
            running: Mutex::new(HashSet::new()),
            duplicate_deliveries: AtomicU64::new(0),
            accepted: Mutex::new(Vec::new()),
            stale_refused: AtomicU64::new(0),
            not_yours_refused: AtomicU64::new(0),
            refused_deliveries: AtomicU64::new(0),
            second_completions: Mutex::new(Vec::new()),
            late_results: Mutex::new(Vec::new()),
            late_taken: AtomicU64::new(0),
            stop: CancellationToken::new(),
        });
        let app = Router::new()
            .route("/d/{id}/message", post(droplet::on_message))
            .with_state(fleet.clone());
        let stop = fleet.stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });

        let config = &fleet.config;
        let mut asked: Option<u64> = None;
        for (i, d) in fleet.droplets.values().enumerate() {
            let capabilities: Vec<String> = config
                .capabilities
                .get(i % config.capabilities.len().max(1))
                .cloned()
                .into_iter()
                .collect();
            let answer = register(
                &fleet.api,
                &config.wire,
                d.id,
                &d.token,
                &fleet.endpoint(d.id),
                &capabilities,
                config.patience,
            )
            .await;
            match answer {
                Ok(v) => {
                    if let Some(n) = v["payload"]["heartbeat_interval_seconds"].as_u64() {
                        asked = Some(asked.unwrap_or(u64::MAX).min(n.max(1)));
                    }
                }
                Err(e) => {
                    fleet.stop();
                    return Err(e);
                }
            }
        }
        let every = match config.heartbeats {
            Heartbeats::Off => None,
            Heartbeats::Every(every) => Some(every),
            Heartbeats::AsServerAsks { at_most } => {
                Some(asked.map_or(at_most, |n| at_most.min(Duration::from_secs(n))))
            }
        };
        if let Some(every) = every {
            for d in fleet.droplets.values() {
                tokio::spawn(beat_loop(fleet.clone(), d.clone(), every));
            }
        }
        Ok(fleet)
    }

    pub fn config(&self) -> &FleetConfig {
        &self.config
    }

    /// The endpoint droplet `id` registered.
    pub fn endpoint(&self, id: i32) -> String {
        format!("http://{}/d/{id}", self.addr)
    }

    pub fn droplet(&self, id: i32) -> Arc<Droplet> {
        self.droplets[&id].clone()
    }

    /// Tasks told to more than one droplet (at-least-once delivery after a requeue).
    pub fn executed_more_than_once(&self) -> usize {
        lock(&self.executions)
            .values()
            .filter(|v| v.len() > 1)
            .count()
    }

    /// Tasks whose completion the server accepted twice (must never happen).
    pub fn completed_twice(&self) -> Vec<i32> {
        lock(&self.completions)
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(t, _)| *t)
            .collect()
    }

    /// (task, attempt) pairs that were told to more than one droplet: the droplets.
    pub fn attempts_on_two_droplets(&self) -> Vec<(i32, i32, Vec<i32>)> {
        lock(&self.runs)
            .iter()
            .filter_map(|((t, a), ds)| {
                let distinct: BTreeSet<i32> = ds.iter().copied().collect();
                (distinct.len() > 1).then(|| (*t, *a, distinct.into_iter().collect()))
            })
            .collect()
    }

    /// Applied PATCHes that named an attempt other than the one the task was on.
    pub fn applied_for_another_attempt(&self) -> Vec<Accepted> {
        lock(&self.accepted)
            .iter()
            .filter(|a| {
                a.attempt_sent
                    .is_some_and(|s| a.attempt_after != Some(i64::from(s)))
            })
            .cloned()
            .collect()
    }

    /// Stops the server, the heartbeats and the work in hand.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Resolves once the fleet is stopped.
    pub async fn stopped(&self) {
        self.stop.cancelled().await;
    }

    pub fn is_stopped(&self) -> bool {
        self.stop.is_cancelled()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Registers droplet `id` at `endpoint` (`POST /droplets/register`): the server's answer, or
/// why it could not be had.
pub async fn register(
    api: &Api,
    wire: &Wire,
    id: i32,
    token: &str,
    endpoint: &str,
    capabilities: &[String],
    patience: Patience,
) -> Result<Value, String> {
    let body = wire.registration(id, endpoint, capabilities);
    let path = "/droplets/register";
    match patience {
        Patience::Once => match api.send(Method::POST, path, token, Some(&body)).await {
            Err(e) => Err(format!("cannot reach {}: {e}", api.base())),
            Ok((status, v)) if (200..300).contains(&status) => Ok(v),
            Ok((status, v)) => Err(format!(
                "registering droplet {id}: HTTP {} {}",
                axum::http::StatusCode::from_u16(status)
                    .map_or_else(|_| status.to_string(), |s| s.to_string()),
                match v {
                    Value::String(text) => text,
                    other => other.to_string(),
                }
            )),
        },
        Patience::Careful => {
            match api
                .call(Method::POST, path, token, Some(&body), REGISTER_GIVE_UP)
                .await
            {
                Some((status, v)) if status < 300 => Ok(v),
                answer => Err(format!("register droplet {id}: {answer:?}")),
            }
        }
    }
}

/// One droplet's heartbeats: every `every`, up to its jitter late, none while it is frozen;
/// a careful droplet sends one that got no answer (or a 5xx) once more at once.
async fn beat_loop(fleet: Arc<Fleet>, d: Arc<Droplet>, every: Duration) {
    let mut due = tokio::time::Instant::now();
    loop {
        due += every;
        let jitter = d.jitter_ms.load(Ordering::Relaxed);
        let late = if jitter == 0 {
            Duration::ZERO
        } else {
            Duration::from_millis(rand::random_range(0..=jitter))
        };
        tokio::select! {
            _ = fleet.stopped() => return,
            _ = tokio::time::sleep_until(due + late) => {}
        }
        if d.is_frozen() {
            continue;
        }
        // Each heartbeat on its own task: a slow answer never delays the next one.
        let (fleet, d) = (fleet.clone(), d.clone());
        tokio::spawn(async move {
            let body = fleet.config.wire.heartbeat(d.id);
            let path = format!("/droplets/{}/heartbeat", d.id);
            let mut answer = fleet
                .api
                .once(Method::POST, &path, &d.token, Some(&body))
                .await;
            // A careful droplet: no answer or a 5xx, once more at once (to the other replica
            // when there is one).
            if fleet.config.patience == Patience::Careful
                && answer.as_ref().is_none_or(|(s, _)| *s >= 500)
            {
                answer = fleet
                    .api
                    .once(Method::POST, &path, &d.token, Some(&body))
                    .await;
            }
            if let Some((200, _)) = answer {
                d.beat_arrived();
            }
        });
    }
}
