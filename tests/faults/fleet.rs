//! Simulated droplets, a task producer and dashboards, over real HTTP and WebSocket, that
//! behave as careful clients do: a request that found no server (or a 5xx, or a 429) is
//! sent again, to another replica when there is one, and a task is created again with the
//! same trace id, so a lost answer never loses or duplicates a task. Every answer is counted
//! so a scenario can report its 5xx and its latencies.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use futures::StreamExt;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::{envelope, envelope_with_trace, token};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// One answer (or failure) as the clients saw it.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub at: Instant,
    pub took: Duration,
    /// None: no answer (connection refused or reset, timeout).
    pub status: Option<u16>,
    pub what: String,
}

/// The orchestrator's API as every simulated client reaches it: one or more replicas.
pub struct Api {
    http: reqwest::Client,
    bases: RwLock<Vec<String>>,
    next: AtomicUsize,
    pub log: Mutex<Vec<Exchange>>,
}

impl Api {
    pub fn new(bases: Vec<String>) -> Arc<Api> {
        Arc::new(Api {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(25))
                .pool_max_idle_per_host(64)
                .build()
                .expect("client"),
            bases: RwLock::new(bases),
            next: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
        })
    }

    pub fn set_bases(&self, bases: &[String]) {
        if let Ok(mut b) = self.bases.write() {
            *b = bases.to_vec();
        }
    }

    pub fn base(&self) -> String {
        self.bases.read().map(|b| b[0].clone()).unwrap_or_default()
    }

    fn pick(&self) -> String {
        let bases = self.bases.read().map(|b| b.clone()).unwrap_or_default();
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        bases[i % bases.len()].clone()
    }

    /// One attempt on one replica (round robin).
    pub async fn once(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> Option<(u16, Value)> {
        let base = self.pick();
        let started = Instant::now();
        let mut req = self
            .http
            .request(method.clone(), format!("{base}{path}"))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let what = format!("{method} {}", route_of(path));
        let answer = match req.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                let text = r.text().await.unwrap_or_default();
                Some((
                    status,
                    serde_json::from_str(&text).unwrap_or(Value::String(text)),
                ))
            }
            Err(_) => None,
        };
        lock(&self.log).push(Exchange {
            at: started,
            took: started.elapsed(),
            status: answer.as_ref().map(|(s, _)| *s),
            what,
        });
        answer
    }

    /// Sends until an answer that is neither a 5xx nor a 429 comes, for at most `give_up`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<&Value>,
        give_up: Duration,
    ) -> Option<(u16, Value)> {
        // Exponential backoff with full jitter (100 ms doubling up to 2 s), so clients
        // that all failed together do not all come back together.
        let deadline = Instant::now() + give_up;
        let mut ceiling = Duration::from_millis(100);
        loop {
            match self.once(method.clone(), path, token, body).await {
                Some((s, v)) if s < 500 && s != 429 => return Some((s, v)),
                last => {
                    if Instant::now() + ceiling > deadline {
                        return last;
                    }
                }
            }
            let pause = ceiling.mul_f64(rand::random_range(0.1..=1.0));
            tokio::time::sleep(pause).await;
            ceiling = (ceiling * 2).min(Duration::from_secs(2));
        }
    }

    /// The exchanges so far.
    pub fn exchanges(&self) -> Vec<Exchange> {
        lock(&self.log).clone()
    }

    /// 5xx answers in `[from, to)` (all of them with `None`).
    pub fn server_errors(&self, window: Option<(Instant, Instant)>) -> Vec<Exchange> {
        lock(&self.log)
            .iter()
            .filter(|e| e.status.is_some_and(|s| s >= 500))
            .filter(|e| window.is_none_or(|(from, to)| e.at >= from && e.at < to))
            .cloned()
            .collect()
    }

    /// Answers by status (`none` for no answer).
    pub fn by_status(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for e in lock(&self.log).iter() {
            let k = e.status.map_or("none".to_string(), |s| s.to_string());
            *m.entry(k).or_insert(0) += 1;
        }
        m
    }
}

/// `/tasks/17` -> `/tasks/{id}`, so figures group by route.
fn route_of(path: &str) -> String {
    path.split('?')
        .next()
        .unwrap_or("")
        .split('/')
        .map(|seg| {
            if !seg.is_empty() && seg.chars().all(|c| c.is_ascii_digit()) {
                "{id}"
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// One simulated droplet.
pub struct Droplet {
    pub id: i32,
    pub token: String,
    /// While true the droplet neither heartbeats nor answers nor PATCHes.
    frozen: watch::Sender<bool>,
    /// Bumped at each freeze; work that spans a freeze PATCHes late.
    epoch: AtomicU64,
    /// Heartbeats arrive up to this late (uniformly), in milliseconds.
    pub jitter_ms: AtomicU64,
    /// The longest time between two heartbeats that reached the server, in milliseconds.
    pub max_gap_ms: AtomicU64,
    pub last_beat: Mutex<Option<Instant>>,
    /// Tasks whose work spanned a freeze: (task, status asked for, answer).
    pub late: Mutex<Vec<(i32, String, Option<u16>)>>,
    /// Tasks this droplet was told to execute.
    pub executed: Mutex<Vec<i32>>,
    /// Tasks being worked on right now (PATCHed in_progress, not yet finished).
    pub working: Mutex<Vec<i32>>,
}

impl Droplet {
    fn new(id: i32) -> Droplet {
        Droplet {
            id,
            token: token(id, &["read", "write"]),
            frozen: watch::channel(false).0,
            epoch: AtomicU64::new(0),
            jitter_ms: AtomicU64::new(0),
            max_gap_ms: AtomicU64::new(0),
            last_beat: Mutex::new(None),
            late: Mutex::new(Vec::new()),
            executed: Mutex::new(Vec::new()),
            working: Mutex::new(Vec::new()),
        }
    }

    pub fn freeze(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.frozen.send_replace(true);
    }

    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    pub fn is_frozen(&self) -> bool {
        *self.frozen.borrow()
    }

    async fn thawed(&self) {
        let mut rx = self.frozen.subscribe();
        let _ = rx.wait_for(|f| !*f).await;
    }
}

/// Simulated droplets behind one HTTP server (`/d/{id}/message`).
pub struct Fleet {
    pub api: Arc<Api>,
    pub droplets: BTreeMap<i32, Arc<Droplet>>,
    pub addr: SocketAddr,
    work: Duration,
    /// task -> droplets that were told to execute it, in order.
    pub executions: Mutex<HashMap<i32, Vec<i32>>>,
    /// task -> completion PATCHes the server accepted.
    pub completions: Mutex<HashMap<i32, u32>>,
    pub completed: AtomicU64,
    pub cancels: AtomicU64,
    /// PATCHes answered 409 whose first attempt had in fact been applied (answer lost).
    pub already_done: AtomicU64,
    pub paused: AtomicBool,
    stop: CancellationToken,
}

impl Fleet {
    /// Starts the droplets' server, registers every droplet (one capability each, round
    /// robin) and starts their heartbeats (every `beat`, plus each droplet's jitter).
    pub async fn start(
        api: Arc<Api>,
        ids: &[i32],
        capabilities: &[&str],
        work: Duration,
        beat: Duration,
    ) -> Arc<Fleet> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind droplets");
        let addr = listener.local_addr().expect("addr");
        let fleet = Arc::new(Fleet {
            api,
            droplets: ids
                .iter()
                .map(|id| (*id, Arc::new(Droplet::new(*id))))
                .collect(),
            addr,
            work,
            executions: Mutex::new(HashMap::new()),
            completions: Mutex::new(HashMap::new()),
            completed: AtomicU64::new(0),
            cancels: AtomicU64::new(0),
            already_done: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            stop: CancellationToken::new(),
        });
        let app = Router::new()
            .route("/d/{id}/message", post(on_message))
            .with_state(fleet.clone());
        let stop = fleet.stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
        for (i, d) in fleet.droplets.values().enumerate() {
            let cap = capabilities[i % capabilities.len()];
            let body = envelope(json!({
                "droplet_id": d.id,
                "name": format!("sim-{}", d.id),
                "steward": "faults",
                "endpoint": format!("http://{addr}/d/{}", d.id),
                "capabilities": [cap],
            }));
            let answer = fleet
                .api
                .call(
                    Method::POST,
                    "/droplets/register",
                    &d.token,
                    Some(&body),
                    Duration::from_secs(20),
                )
                .await;
            assert!(
                answer.as_ref().is_some_and(|(s, _)| *s < 300),
                "register droplet {}: {answer:?}",
                d.id
            );
            tokio::spawn(beat_loop(fleet.clone(), d.clone(), beat));
        }
        fleet
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

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

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
            _ = fleet.stop.cancelled() => return,
            _ = tokio::time::sleep_until(due + late) => {}
        }
        if d.is_frozen() {
            continue;
        }
        // Each heartbeat on its own task: a slow answer never delays the next one.
        let (fleet, d) = (fleet.clone(), d.clone());
        tokio::spawn(async move {
            let body = envelope(json!({"status": "active", "metrics": {"simulated": true}}));
            let path = format!("/droplets/{}/heartbeat", d.id);
            if let Some((200, _)) = fleet
                .api
                .once(Method::POST, &path, &d.token, Some(&body))
                .await
            {
                let now = Instant::now();
                let mut last = lock(&d.last_beat);
                if let Some(prev) = *last {
                    let gap = now.duration_since(prev).as_millis() as u64;
                    d.max_gap_ms.fetch_max(gap, Ordering::Relaxed);
                }
                *last = Some(now);
            }
        });
    }
}

/// A droplet's `/message`: `execute_task` starts the work; a frozen droplet answers nothing
/// until it thaws, and what it was sent meanwhile is lost.
async fn on_message(
    State(fleet): State<Arc<Fleet>>,
    Path(id): Path<i32>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let Some(d) = fleet.droplets.get(&id).cloned() else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"detail": "no such droplet"})),
        );
    };
    if d.is_frozen() {
        d.thawed().await;
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"detail": "was frozen"})),
        );
    }
    match body["payload"]["command"].as_str() {
        Some("execute_task") => {
            let Some(task) = body["payload"]["task"]["id"].as_i64() else {
                return (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({})));
            };
            let task = task as i32;
            lock(&fleet.executions).entry(task).or_default().push(id);
            lock(&d.executed).push(task);
            tokio::spawn(work(fleet.clone(), d.clone(), task));
        }
        Some("cancel_task") => {
            fleet.cancels.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
    (StatusCode::OK, Json(json!({"received": true})))
}

/// Start, work, complete. A PATCH is sent again while no answer (or a 5xx) comes back; a 4xx
/// ends the work (the task was taken away or already moved).
async fn work(fleet: Arc<Fleet>, d: Arc<Droplet>, task: i32) {
    let epoch = d.epoch.load(Ordering::SeqCst);
    let Some(200) = patch(&fleet, &d, task, "in_progress", epoch).await else {
        return;
    };
    lock(&d.working).push(task);
    tokio::select! {
        _ = fleet.stop.cancelled() => return,
        _ = tokio::time::sleep(fleet.work) => {}
    }
    let answer = patch(&fleet, &d, task, "completed", epoch).await;
    lock(&d.working).retain(|t| *t != task);
    if answer == Some(200) {
        *lock(&fleet.completions).entry(task).or_insert(0) += 1;
        fleet.completed.fetch_add(1, Ordering::Relaxed);
    }
}

async fn patch(fleet: &Fleet, d: &Droplet, task: i32, status: &str, epoch: u64) -> Option<u16> {
    // A frozen droplet sends nothing; it goes on where it stopped once it thaws. A PATCH
    // sent after a freeze that began during the work is a late one.
    d.thawed().await;
    let late = d.epoch.load(Ordering::SeqCst) != epoch;
    let mut payload = json!({ "status": status });
    if status == "completed" {
        payload["result"] = json!({"droplet": d.id});
    }
    let body = envelope(payload);
    let answer = fleet
        .api
        .call(
            Method::PATCH,
            &format!("/tasks/{task}"),
            &d.token,
            Some(&body),
            Duration::from_secs(60),
        )
        .await
        .map(|(s, _)| s);
    // A 409 after an answer that never came: the first attempt may have won. A careful
    // droplet reads the task and takes "already there, and mine" as done.
    let answer = match answer {
        Some(409) => {
            let path = format!("/tasks/{task}");
            match fleet
                .api
                .call(Method::GET, &path, &d.token, None, Duration::from_secs(30))
                .await
            {
                Some((200, v))
                    if v["payload"]["task"]["status"] == status
                        && v["payload"]["task"]["assigned_droplet_id"] == d.id =>
                {
                    fleet.already_done.fetch_add(1, Ordering::Relaxed);
                    Some(200)
                }
                _ => Some(409),
            }
        }
        other => other,
    };
    if late {
        lock(&d.late).push((task, status.to_string(), answer));
    }
    answer
}

/// What a producer created.
#[derive(Default)]
pub struct Produced {
    /// Tasks the API acknowledged (201, or 200 for a repeated trace id): trace id, task id.
    pub acked: Mutex<Vec<(Uuid, i32)>>,
    /// Creations that got no acknowledgement before giving up (trace id, last status).
    pub gave_up: Mutex<Vec<(Uuid, Option<u16>)>>,
    pub sent: AtomicU64,
}

impl Produced {
    pub fn acked(&self) -> Vec<(Uuid, i32)> {
        lock(&self.acked).clone()
    }
    pub fn gave_up(&self) -> Vec<(Uuid, Option<u16>)> {
        lock(&self.gave_up).clone()
    }
}

/// Creates tasks at a steady rate until stopped (or `total` are sent).
pub struct Producer {
    pub produced: Arc<Produced>,
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl Producer {
    pub fn start(
        api: Arc<Api>,
        creator: i32,
        per_second: f64,
        capabilities: &[&str],
        total: Option<u64>,
    ) -> Producer {
        let produced = Arc::new(Produced::default());
        let stop = CancellationToken::new();
        let capabilities: Vec<String> = capabilities.iter().map(|c| c.to_string()).collect();
        let handle = {
            let (produced, stop) = (produced.clone(), stop.clone());
            tokio::spawn(async move {
                let token = token(creator, &["read", "write"]);
                let permits = Arc::new(Semaphore::new(256));
                let period = Duration::from_secs_f64(1.0 / per_second);
                let started = tokio::time::Instant::now();
                let mut n = 0u64;
                while !stop.is_cancelled() && total.is_none_or(|t| n < t) {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep_until(started + period.mul_f64(n as f64)) => {}
                    }
                    let Ok(permit) = permits.clone().acquire_owned().await else {
                        break;
                    };
                    let (api, produced, token) = (api.clone(), produced.clone(), token.clone());
                    let capability = capabilities[n as usize % capabilities.len()].clone();
                    produced.sent.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(async move {
                        let _permit = permit;
                        let trace = Uuid::new_v4();
                        let body = envelope_with_trace(
                            &trace.to_string(),
                            json!({"task_type": "faults", "title": format!("fault task {n}"),
                                   "required_capability": capability, "payload": {"n": n}}),
                        );
                        let answer = api
                            .call(
                                Method::POST,
                                "/tasks",
                                &token,
                                Some(&body),
                                Duration::from_secs(60),
                            )
                            .await;
                        match answer {
                            Some((201 | 200, v)) => {
                                let id = v["payload"]["task_id"].as_i64().unwrap_or(-1) as i32;
                                lock(&produced.acked).push((trace, id));
                            }
                            other => lock(&produced.gave_up).push((trace, other.map(|(s, _)| s))),
                        }
                    });
                    n += 1;
                }
                // Every creation in flight ends (acknowledged or given up) before this does.
                let _ = permits.acquire_many(256).await;
            })
        };
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

/// A dashboard on a feed: counts events and keeps the close code it was sent.
pub struct Dashboard {
    pub events: Arc<Mutex<Vec<Value>>>,
    pub close: Arc<Mutex<Option<u16>>>,
    pub ended: Arc<AtomicBool>,
}

impl Dashboard {
    pub async fn connect(base: &str, feed: &str) -> Dashboard {
        let admin = token(1, &["read", "write", "admin"]);
        let url = format!("{}/ws/{feed}?token={admin}", base.replacen("http", "ws", 1));
        let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("dashboard connects");
        let events: Arc<Mutex<Vec<Value>>> = Arc::default();
        let close: Arc<Mutex<Option<u16>>> = Arc::default();
        let ended = Arc::new(AtomicBool::new(false));
        {
            let (events, close, ended) = (events.clone(), close.clone(), ended.clone());
            tokio::spawn(async move {
                use tokio_tungstenite::tungstenite::Message;
                while let Some(frame) = socket.next().await {
                    match frame {
                        Ok(Message::Text(t)) => {
                            if let Ok(v) = serde_json::from_str::<Value>(t.as_str()) {
                                lock(&events).push(v);
                            }
                        }
                        Ok(Message::Close(frame)) => {
                            *lock(&close) = Some(frame.map_or(1005, |f| u16::from(f.code)));
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                ended.store(true, Ordering::SeqCst);
            });
        }
        Dashboard {
            events,
            close,
            ended,
        }
    }

    pub fn count(&self) -> usize {
        lock(&self.events).len()
    }

    /// Events whose `payload.event` is `kind`.
    pub fn of_kind(&self, kind: &str) -> Vec<Value> {
        lock(&self.events)
            .iter()
            .filter(|e| e["payload"]["event"] == kind)
            .cloned()
            .collect()
    }

    pub fn close_code(&self) -> Option<u16> {
        *lock(&self.close)
    }
}
