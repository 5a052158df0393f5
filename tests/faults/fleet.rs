//! Simulated droplets, a task producer and dashboards, over real HTTP and WebSocket, that
//! behave as careful clients do: a request that found no server (or a 5xx, or a 429) is
//! sent again, to another replica when there is one, and a task is created again with the
//! same trace id, so a lost answer never loses or duplicates a task. Every answer is counted
//! so a scenario can report its 5xx and its latencies.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, AtomicUsize, Ordering};
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
        Api::with_timeout(bases, Duration::from_secs(25))
    }

    /// Clients that give up on one answer after `timeout` (and send again): a replica that
    /// is paused holds a request until then.
    pub fn with_timeout(bases: Vec<String>, timeout: Duration) -> Arc<Api> {
        Arc::new(Api {
            http: reqwest::Client::builder()
                .timeout(timeout)
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

/// How a droplet takes the deliveries it is sent (set while a fault lasts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Starts, works, completes.
    Normal = 0,
    /// Answers `execute_task` with a 400: it will not take the task.
    Refuse = 1,
    /// Works as usual, then sends its completion a second time.
    CompleteTwice = 2,
    /// Acknowledges `execute_task`, sends nothing until the task has moved to another
    /// attempt, then sends its result for the attempt it was given.
    LateResult = 3,
}

impl Behaviour {
    fn from_u8(v: u8) -> Behaviour {
        match v {
            1 => Behaviour::Refuse,
            2 => Behaviour::CompleteTwice,
            3 => Behaviour::LateResult,
            _ => Behaviour::Normal,
        }
    }
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
    behaviour: AtomicU8,
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
            behaviour: AtomicU8::new(Behaviour::Normal as u8),
        }
    }

    pub fn set_behaviour(&self, b: Behaviour) {
        self.behaviour.store(b as u8, Ordering::SeqCst);
    }

    pub fn behaviour(&self) -> Behaviour {
        Behaviour::from_u8(self.behaviour.load(Ordering::SeqCst))
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
    /// PATCHes carry the attempt of the delivery they answer (fencing).
    pub fenced: AtomicBool,
    /// (task, attempt) -> droplets that were told to execute it.
    pub runs: Mutex<HashMap<(i32, i32), Vec<i32>>>,
    /// (droplet, task, attempt) being worked on: a second delivery of it is acknowledged
    /// and not run again.
    running: Mutex<HashSet<(i32, i32, i32)>>,
    pub duplicate_deliveries: AtomicU64,
    /// PATCHes the server applied (answered 200 at once, not read back after a 409).
    pub accepted: Mutex<Vec<Accepted>>,
    /// PATCHes refused because they named an attempt the task is no longer on (409).
    pub stale_refused: AtomicU64,
    /// PATCHes refused because the task is no longer the droplet's (403).
    pub not_yours_refused: AtomicU64,
    /// Deliveries a droplet refused (`Behaviour::Refuse`).
    pub refused_deliveries: AtomicU64,
    /// Second completions (`Behaviour::CompleteTwice`): task, attempt, answer.
    pub second_completions: Mutex<Vec<(i32, i32, Option<u16>)>>,
    /// Results sent after the task moved on (`Behaviour::LateResult`): task, attempt,
    /// attempt the task was on then, answer.
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

    /// (task, attempt) pairs that were told to more than one droplet.
    pub fn attempts_on_two_droplets(&self) -> Vec<(i32, i32, Vec<i32>)> {
        lock(&self.runs)
            .iter()
            .filter_map(|((t, a), ds)| {
                let distinct: std::collections::BTreeSet<i32> = ds.iter().copied().collect();
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
            let mut answer = fleet
                .api
                .once(Method::POST, &path, &d.token, Some(&body))
                .await;
            // No answer or a 5xx: once more at once (to the other replica when there is one).
            if answer.as_ref().is_none_or(|(s, _)| *s >= 500) {
                answer = fleet
                    .api
                    .once(Method::POST, &path, &d.token, Some(&body))
                    .await;
            }
            if let Some((200, _)) = answer {
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
            let attempt = body["payload"]["task"]["attempt"].as_i64().unwrap_or(0) as i32;
            let behaviour = d.behaviour();
            if behaviour == Behaviour::Refuse {
                fleet.refused_deliveries.fetch_add(1, Ordering::Relaxed);
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"detail": "not accepting work"})),
                );
            }
            if !lock(&fleet.running).insert((id, task, attempt)) {
                // The same delivery again (its first answer was lost): already on it.
                fleet.duplicate_deliveries.fetch_add(1, Ordering::Relaxed);
                return (StatusCode::OK, Json(json!({"received": true})));
            }
            lock(&fleet.executions).entry(task).or_default().push(id);
            lock(&fleet.runs)
                .entry((task, attempt))
                .or_default()
                .push(id);
            lock(&d.executed).push(task);
            if behaviour == Behaviour::LateResult {
                fleet.late_taken.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(late_result(fleet.clone(), d.clone(), task, attempt));
            } else {
                tokio::spawn(work(fleet.clone(), d.clone(), task, attempt));
            }
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
async fn work(fleet: Arc<Fleet>, d: Arc<Droplet>, task: i32, attempt: i32) {
    work_once(&fleet, &d, task, attempt).await;
    lock(&fleet.running).remove(&(d.id, task, attempt));
}

async fn work_once(fleet: &Arc<Fleet>, d: &Arc<Droplet>, task: i32, attempt: i32) {
    let epoch = d.epoch.load(Ordering::SeqCst);
    let Some(200) = patch(fleet, d, task, "in_progress", epoch, attempt).await else {
        return;
    };
    lock(&d.working).push(task);
    tokio::select! {
        _ = fleet.stop.cancelled() => return,
        _ = tokio::time::sleep(fleet.work) => {}
    }
    let answer = patch(fleet, d, task, "completed", epoch, attempt).await;
    lock(&d.working).retain(|t| *t != task);
    if answer == Some(200) {
        *lock(&fleet.completions).entry(task).or_insert(0) += 1;
        fleet.completed.fetch_add(1, Ordering::Relaxed);
        if d.behaviour() == Behaviour::CompleteTwice {
            // The same completion again, as a droplet that lost track would send it.
            let second = send_result(fleet, d, task, attempt).await;
            lock(&fleet.second_completions).push((task, attempt, second));
        }
    }
}

/// `Behaviour::LateResult`: waits (up to a minute) until the task is on another attempt or
/// finished, then sends its completion for the attempt it was given.
async fn late_result(fleet: Arc<Fleet>, d: Arc<Droplet>, task: i32, attempt: i32) {
    let path = format!("/tasks/{task}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut now_on = i64::from(attempt);
    while Instant::now() < deadline && !fleet.stop.is_cancelled() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Some((200, v)) = fleet
            .api
            .call(Method::GET, &path, &d.token, None, Duration::from_secs(20))
            .await
        {
            let t = &v["payload"]["task"];
            now_on = t["attempt"].as_i64().unwrap_or(now_on);
            let finished = matches!(
                t["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            );
            if now_on > i64::from(attempt) || finished {
                break;
            }
        }
    }
    let answer = send_result(&fleet, &d, task, attempt).await;
    lock(&fleet.late_results).push((task, attempt, now_on, answer));
    lock(&fleet.running).remove(&(d.id, task, attempt));
}

/// `PATCH completed` for `attempt`, retried only while no answer or a 5xx comes; counted
/// like any other PATCH, never read back.
async fn send_result(fleet: &Fleet, d: &Droplet, task: i32, attempt: i32) -> Option<u16> {
    let body = envelope(json!({
        "status": "completed", "attempt": attempt, "result": {"droplet": d.id, "late": true}
    }));
    let answer = fleet
        .api
        .call(
            Method::PATCH,
            &format!("/tasks/{task}"),
            &d.token,
            Some(&body),
            Duration::from_secs(60),
        )
        .await;
    note_answer(fleet, d, task, "completed", Some(attempt), answer.as_ref());
    answer.map(|(s, _)| s)
}

/// Counts an answer to a PATCH: applied, refused as stale (another attempt), refused as
/// not the droplet's any more.
fn note_answer(
    fleet: &Fleet,
    d: &Droplet,
    task: i32,
    status: &str,
    attempt_sent: Option<i32>,
    answer: Option<&(u16, Value)>,
) {
    match answer {
        Some((200, v)) => lock(&fleet.accepted).push(Accepted {
            task,
            droplet: d.id,
            status: status.to_string(),
            attempt_sent,
            attempt_after: v["payload"]["attempt"].as_i64(),
        }),
        Some((409, v)) if is_stale(v) => {
            fleet.stale_refused.fetch_add(1, Ordering::Relaxed);
        }
        Some((403, _)) => {
            fleet.not_yours_refused.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
}

/// A 409 that says the update named another attempt than the task's.
fn is_stale(v: &Value) -> bool {
    v["detail"]
        .as_str()
        .is_some_and(|d| d.contains("this update is for attempt"))
}

async fn patch(
    fleet: &Fleet,
    d: &Droplet,
    task: i32,
    status: &str,
    epoch: u64,
    attempt: i32,
) -> Option<u16> {
    // A frozen droplet sends nothing; it goes on where it stopped once it thaws. A PATCH
    // sent after a freeze that began during the work is a late one.
    d.thawed().await;
    let late = d.epoch.load(Ordering::SeqCst) != epoch;
    let mut payload = json!({ "status": status });
    if status == "completed" {
        payload["result"] = json!({"droplet": d.id});
    }
    let fenced = fleet.fenced.load(Ordering::Relaxed);
    if fenced {
        payload["attempt"] = json!(attempt);
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
        .await;
    note_answer(
        fleet,
        d,
        task,
        status,
        fenced.then_some(attempt),
        answer.as_ref(),
    );
    // A stale attempt is refused for good: nothing to read back.
    let answer = match answer {
        Some((409, v)) if is_stale(&v) => return Some(409),
        other => other.map(|(s, _)| s),
    };
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
                        && v["payload"]["task"]["assigned_droplet_id"] == d.id
                        && (!fenced || v["payload"]["task"]["attempt"] == attempt) =>
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

/// One event a resuming dashboard received: its `event_id` (0 for a frame outside the log),
/// its kind and the task it is about.
#[derive(Debug, Clone)]
pub struct Seen {
    pub event_id: i64,
    pub event: String,
    pub task: Option<i64>,
}

/// A dashboard that stays on a feed of one replica: after every disconnect (the replica
/// killed, paused past `silence`, or the socket broken) it connects again with
/// `?after=<the last event_id it got>`, as the README tells dashboards to.
pub struct ResumingDashboard {
    pub base: String,
    pub seen: Mutex<Vec<Seen>>,
    pub last_event_id: AtomicI64,
    /// Connections made (the first one included).
    pub connections: AtomicU64,
    pub resyncs: AtomicU64,
    stop: CancellationToken,
}

impl ResumingDashboard {
    /// Starts following `feed` on `base` from the start of the log (`?after=0`).
    pub fn start(base: &str, feed: &str, silence: Duration) -> Arc<ResumingDashboard> {
        let d = Arc::new(ResumingDashboard {
            base: base.to_string(),
            seen: Mutex::new(Vec::new()),
            last_event_id: AtomicI64::new(0),
            connections: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            stop: CancellationToken::new(),
        });
        let (me, feed) = (d.clone(), feed.to_string());
        tokio::spawn(async move { me.follow(&feed, silence).await });
        d
    }

    async fn follow(self: Arc<Self>, feed: &str, silence: Duration) {
        use tokio_tungstenite::tungstenite::Message;
        let admin = token(1, &["read", "write", "admin"]);
        let ws = self.base.replacen("http", "ws", 1);
        while !self.stop.is_cancelled() {
            let after = self.last_event_id.load(Ordering::SeqCst);
            let url = format!("{ws}/ws/{feed}?token={admin}&after={after}");
            let connect = tokio::time::timeout(
                Duration::from_secs(5),
                tokio_tungstenite::connect_async(url.as_str()),
            );
            let mut socket = tokio::select! {
                _ = self.stop.cancelled() => return,
                c = connect => match c {
                    Ok(Ok((socket, _))) => socket,
                    _ => {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        continue;
                    }
                },
            };
            self.connections.fetch_add(1, Ordering::SeqCst);
            loop {
                let frame = tokio::select! {
                    _ = self.stop.cancelled() => return,
                    f = tokio::time::timeout(silence, socket.next()) => f,
                };
                match frame {
                    Ok(Some(Ok(Message::Text(t)))) => {
                        let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else {
                            continue;
                        };
                        let p = &v["payload"];
                        let event = p["event"].as_str().unwrap_or("").to_string();
                        if event == "resync_required" {
                            self.resyncs.fetch_add(1, Ordering::SeqCst);
                            continue;
                        }
                        let event_id = p["event_id"].as_i64().unwrap_or(0);
                        if event_id > 0 {
                            self.last_event_id.fetch_max(event_id, Ordering::SeqCst);
                        }
                        lock(&self.seen).push(Seen {
                            event_id,
                            event,
                            task: p["task"]["id"].as_i64(),
                        });
                    }
                    Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) => break,
                    Ok(Some(Ok(_))) => {}
                    // Nothing (not even a ping) for `silence`: the link is dead; go again.
                    Err(_) => break,
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How many times each event id was received.
    pub fn counts(&self) -> HashMap<i64, u32> {
        let mut m = HashMap::new();
        for s in lock(&self.seen).iter().filter(|s| s.event_id > 0) {
            *m.entry(s.event_id).or_insert(0) += 1;
        }
        m
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}
