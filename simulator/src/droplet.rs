//! One simulated droplet: its state, how it takes deliveries ([`Behaviour`]), its
//! `/message` and the work it does for an `execute_task`: PATCH `in_progress`, work for the
//! fleet's work time, PATCH `completed` (or `failed`, at the fleet's fail rate).
//!
//! Droplets that misbehave on purpose (the chaos run) refuse deliveries, complete a task
//! twice, or send a result late for an attempt the task has left; every answer to their
//! PATCHes is tallied on the [`Fleet`] (applied, refused as stale, refused as not theirs).
//!
//! A frozen droplet neither heartbeats nor answers nor PATCHes until it thaws; a delivery
//! sent meanwhile is answered 503 once it thaws, and work that spanned a freeze PATCHes late
//! (recorded in [`Droplet::late`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::sync::watch;
use uuid::Uuid;

use super::api::Patience;
use super::fleet::{Accepted, Fleet};
use super::lock;

/// How long a careful droplet keeps sending a PATCH that gets no answer (or a 5xx).
const PATCH_GIVE_UP: Duration = Duration::from_secs(60);
/// How long a careful droplet tries to read a task back after a 409.
const READ_BACK_GIVE_UP: Duration = Duration::from_secs(30);
/// How long a droplet that answers late waits for its task to move on.
const LATE_GIVE_UP: Duration = Duration::from_secs(60);

/// How a droplet takes the deliveries it is sent, switched per droplet with
/// [`Droplet::set_behaviour`] (while a fault lasts). Freezing mid-task is not a behaviour:
/// it is [`Droplet::freeze`] / [`Droplet::thaw`], timed by the caller (see
/// [`Droplet::working`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Starts, works, completes (or fails, at the fleet's fail rate).
    Normal,
    /// Acknowledges every delivery and does nothing with it: a sink that only counts what
    /// the orchestrator dispatched (the load bench's route scenario).
    Acknowledge,
    /// Answers `execute_task` with a 400: it will not take the task
    /// ([`Fleet::refused_deliveries`]).
    Refuse,
    /// Works as usual, then sends its completion a second time
    /// ([`Fleet::second_completions`]).
    CompleteTwice,
    /// Acknowledges `execute_task`, sends nothing until the task has moved to another
    /// attempt (or finished; a minute at most), then sends its result for the attempt it was
    /// given ([`Fleet::late_taken`], [`Fleet::late_results`]).
    LateResult,
}

impl Behaviour {
    /// Whether the droplet does (or pretends to do) the work of a delivery it takes.
    fn works(self) -> bool {
        !matches!(self, Behaviour::Acknowledge | Behaviour::Refuse)
    }
}

/// What an `execute_task` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub task: i32,
    /// The task's attempt the delivery is for (0 when the delivery names none).
    pub attempt: i32,
    pub trace: Option<Uuid>,
}

impl Delivery {
    /// The delivery in an `execute_task` envelope (None without a task id).
    pub fn of(envelope: &Value) -> Option<Delivery> {
        let task = &envelope["payload"]["task"];
        Some(Delivery {
            task: task["id"].as_i64()? as i32,
            attempt: task["attempt"].as_i64().unwrap_or(0) as i32,
            trace: task["trace_id"]
                .as_str()
                .and_then(|t| Uuid::parse_str(t).ok()),
        })
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
    behaviour: Mutex<Behaviour>,
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
    pub fn new(id: i32, token: String, behaviour: Behaviour) -> Droplet {
        Droplet {
            id,
            token,
            frozen: watch::channel(false).0,
            epoch: AtomicU64::new(0),
            behaviour: Mutex::new(behaviour),
            jitter_ms: AtomicU64::new(0),
            max_gap_ms: AtomicU64::new(0),
            last_beat: Mutex::new(None),
            late: Mutex::new(Vec::new()),
            executed: Mutex::new(Vec::new()),
            working: Mutex::new(Vec::new()),
        }
    }

    pub fn behaviour(&self) -> Behaviour {
        *lock(&self.behaviour)
    }

    /// How the droplet takes the deliveries that come from now on.
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *lock(&self.behaviour) = behaviour;
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

    pub(crate) async fn thawed(&self) {
        let mut rx = self.frozen.subscribe();
        let _ = rx.wait_for(|f| !*f).await;
    }

    /// A heartbeat reached the server now: the gap since the last one is noted.
    pub(crate) fn beat_arrived(&self) {
        let now = Instant::now();
        let mut last = lock(&self.last_beat);
        if let Some(prev) = *last {
            let gap = now.duration_since(prev).as_millis() as u64;
            self.max_gap_ms.fetch_max(gap, Ordering::Relaxed);
        }
        *last = Some(now);
    }
}

/// A droplet's `/message` (`/d/{id}/message` on the fleet's server): `execute_task` starts
/// the work as the droplet's behaviour says, `cancel_task` is counted; a frozen droplet
/// answers nothing until it thaws, and what it was sent meanwhile is lost.
pub(crate) async fn on_message(
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
            let Some(delivery) = Delivery::of(&body) else {
                return (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({})));
            };
            fleet.delivered.fetch_add(1, Ordering::Relaxed);
            let behaviour = d.behaviour();
            if behaviour == Behaviour::Refuse {
                fleet.refused_deliveries.fetch_add(1, Ordering::Relaxed);
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"detail": "not accepting work"})),
                );
            }
            let key = (id, delivery.task, delivery.attempt);
            if behaviour.works() && !lock(&fleet.running).insert(key) {
                // The same delivery again (its first answer was lost): already on it.
                fleet.duplicate_deliveries.fetch_add(1, Ordering::Relaxed);
                return (StatusCode::OK, Json(json!({"received": true})));
            }
            if let (Some(timeline), Some(trace)) = (&fleet.config().timeline, delivery.trace) {
                timeline.dispatched(trace);
            }
            lock(&fleet.executions)
                .entry(delivery.task)
                .or_default()
                .push(id);
            lock(&fleet.runs)
                .entry((delivery.task, delivery.attempt))
                .or_default()
                .push(id);
            lock(&d.executed).push(delivery.task);
            match behaviour {
                Behaviour::Normal | Behaviour::CompleteTwice => {
                    tokio::spawn(work(fleet.clone(), d.clone(), delivery));
                }
                Behaviour::LateResult => {
                    fleet.late_taken.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(late_result(fleet.clone(), d.clone(), delivery));
                }
                Behaviour::Acknowledge | Behaviour::Refuse => {}
            }
        }
        Some("cancel_task") => {
            fleet.cancels.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
    (StatusCode::OK, Json(json!({"received": true})))
}

/// Start, work, finish. A careful droplet sends a PATCH again while no answer (or a 5xx)
/// comes back; a 4xx ends the work (the task was taken away or already moved).
async fn work(fleet: Arc<Fleet>, d: Arc<Droplet>, delivery: Delivery) {
    work_once(&fleet, &d, delivery).await;
    lock(&fleet.running).remove(&(d.id, delivery.task, delivery.attempt));
}

async fn work_once(fleet: &Fleet, d: &Droplet, delivery: Delivery) {
    let task = delivery.task;
    let epoch = d.epoch.load(Ordering::SeqCst);
    let started = json!({"status": "in_progress"});
    let Some(200) = patch(fleet, d, &delivery, started, epoch).await else {
        return;
    };
    lock(&d.working).push(task);
    tokio::select! {
        _ = fleet.stopped() => return,
        _ = tokio::time::sleep(fleet.config().work) => {}
    }
    let fail_rate = fleet.config().fail_rate;
    let fail = fail_rate > 0.0 && rand::random::<f64>() < fail_rate;
    let outcome = if fail {
        json!({"status": "failed", "error_message": "simulated failure"})
    } else {
        json!({"status": "completed", "result": fleet.config().wire.result(d.id)})
    };
    let answer = patch(fleet, d, &delivery, outcome, epoch).await;
    lock(&d.working).retain(|t| *t != task);
    if answer == Some(200) {
        if fail {
            fleet.failed.fetch_add(1, Ordering::Relaxed);
        } else {
            *lock(&fleet.completions).entry(task).or_insert(0) += 1;
            fleet.completed.fetch_add(1, Ordering::Relaxed);
            if d.behaviour() == Behaviour::CompleteTwice {
                // The same completion again, as a droplet that lost track would send it.
                let second = send_result(fleet, d, &delivery).await;
                lock(&fleet.second_completions).push((task, delivery.attempt, second));
            }
        }
        if let (Some(timeline), Some(trace)) = (&fleet.config().timeline, delivery.trace) {
            timeline.finished(trace);
        }
    }
}

/// `Behaviour::LateResult`: waits (up to a minute) until the task is on another attempt or
/// finished, then sends its completion for the attempt it was given.
async fn late_result(fleet: Arc<Fleet>, d: Arc<Droplet>, delivery: Delivery) {
    let (task, attempt) = (delivery.task, delivery.attempt);
    let path = format!("/tasks/{task}");
    let deadline = Instant::now() + LATE_GIVE_UP;
    let mut now_on = i64::from(attempt);
    while Instant::now() < deadline && !fleet.is_stopped() {
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
    let answer = send_result(&fleet, &d, &delivery).await;
    lock(&fleet.late_results).push((task, attempt, now_on, answer));
    lock(&fleet.running).remove(&(d.id, task, attempt));
}

/// `PATCH completed` naming the delivery's attempt, sent again only while no answer or a
/// 5xx comes; tallied like any other PATCH, never read back.
async fn send_result(fleet: &Fleet, d: &Droplet, delivery: &Delivery) -> Option<u16> {
    let config = fleet.config();
    let mut result = config.wire.result(d.id);
    result["late"] = json!(true);
    let payload = json!({"status": "completed", "attempt": delivery.attempt, "result": result});
    let body = config.wire.envelope(d.id, "command", payload);
    let answer = fleet
        .api
        .call(
            Method::PATCH,
            &format!("/tasks/{}", delivery.task),
            &d.token,
            Some(&body),
            PATCH_GIVE_UP,
        )
        .await;
    note_answer(
        fleet,
        d,
        delivery.task,
        "completed",
        Some(delivery.attempt),
        answer.as_ref(),
    );
    answer.map(|(s, _)| s)
}

/// Tallies an answer to a PATCH: applied, refused as stale (another attempt), refused as
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

/// `PATCH /tasks/{id}` with `payload` (its `status`), as the droplet; the attempt is named
/// when the fleet is fenced. The answer's status: 200 when the move holds.
async fn patch(
    fleet: &Fleet,
    d: &Droplet,
    delivery: &Delivery,
    mut payload: Value,
    epoch: u64,
) -> Option<u16> {
    // A frozen droplet sends nothing; it goes on where it stopped once it thaws. A PATCH
    // sent after a freeze that began during the work is a late one.
    d.thawed().await;
    let late = d.epoch.load(Ordering::SeqCst) != epoch;
    let status = payload["status"].as_str().unwrap_or("").to_string();
    let fenced = fleet.fenced.load(Ordering::Relaxed);
    if fenced {
        payload["attempt"] = json!(delivery.attempt);
    }
    let config = fleet.config();
    let body = config.wire.envelope(d.id, "command", payload);
    let path = format!("/tasks/{}", delivery.task);
    let answer = fleet
        .api
        .request(
            config.patience,
            Method::PATCH,
            &path,
            &d.token,
            Some(&body),
            PATCH_GIVE_UP,
        )
        .await;
    note_answer(
        fleet,
        d,
        delivery.task,
        &status,
        fenced.then_some(delivery.attempt),
        answer.as_ref(),
    );
    // A stale attempt is refused for good: nothing to read back.
    let stale = matches!(&answer, Some((409, v)) if is_stale(v));
    let answer = answer.map(|(s, _)| s);
    // A 409 after an answer that never came: the first attempt may have won. A careful
    // droplet reads the task and takes "already there, and mine" as done.
    let answer = match answer {
        Some(409) if config.patience == Patience::Careful && !stale => {
            match fleet
                .api
                .call(Method::GET, &path, &d.token, None, READ_BACK_GIVE_UP)
                .await
            {
                Some((200, v))
                    if v["payload"]["task"]["status"] == status.as_str()
                        && v["payload"]["task"]["assigned_droplet_id"] == d.id
                        && (!fenced || v["payload"]["task"]["attempt"] == delivery.attempt) =>
                {
                    fleet.already_done.fetch_add(1, Ordering::Relaxed);
                    Some(200)
                }
                _ => Some(409),
            }
        }
        other => other,
    };
    if answer != Some(200) {
        fleet.patch_errors.fetch_add(1, Ordering::Relaxed);
    }
    if late {
        lock(&d.late).push((delivery.task, status, answer));
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_names_its_task_attempt_and_trace() {
        let trace = Uuid::new_v4();
        let d = Delivery::of(&json!({"payload": {"command": "execute_task",
            "task": {"id": 7, "attempt": 2, "trace_id": trace.to_string()}}}));
        assert_eq!(
            d,
            Some(Delivery {
                task: 7,
                attempt: 2,
                trace: Some(trace)
            })
        );
        let bare = Delivery::of(&json!({"payload": {"task": {"id": 8}}})).unwrap();
        assert_eq!((bare.attempt, bare.trace), (0, None));
        assert_eq!(Delivery::of(&json!({"payload": {"task": {}}})), None);
    }

    #[test]
    fn a_droplet_switches_behaviour_and_freezes() {
        let d = Droplet::new(3, "t".into(), Behaviour::Normal);
        d.set_behaviour(Behaviour::Acknowledge);
        assert_eq!(d.behaviour(), Behaviour::Acknowledge);
        d.freeze();
        assert!(d.is_frozen());
        d.thaw();
        assert!(!d.is_frozen());
    }
}
