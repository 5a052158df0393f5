//! "Why is my task waiting?": `GET /tasks/{id}/explain` answers from the live state. For a
//! task waiting to be routed, the one reason it is not assigned now and every droplet that
//! could take it with why it does not; for any other task, the assignment decisions of each
//! attempt (as the router recorded them in the history) and the time spent in each state.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{NaiveDateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;

use crate::protocol::iso;
use crate::services::contracts::{self, Contracts};
use crate::services::core::{EmergencyStop, Settings};
use crate::services::key_limits::{self, KeyState};
use crate::services::router_trigger::RouterTrigger;
use crate::services::status::Status;
use crate::services::tasks::{self, HistoryRow, Task};
use crate::services::Core;

struct CandidateRow {
    droplet_id: i32,
    status: String,
    admin_deactivated: bool,
    max_concurrent_tasks: Option<i32>,
    load: i64,
    schema: Option<Value>,
    /// Pushed back (`Retry-After`) until then.
    deferred_until: Option<NaiveDateTime>,
    draining: bool,
}

/// Why a waiting task is not assigned now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    NoCapableDroplet,
    CapableDropletsInactive,
    CapableDropletsFull,
    PayloadRejectedByContracts,
    WaitingForRetry,
    RoutingPaused,
    EmergencyStop,
    QueuedBehind,
    /// Every capable droplet that could take it pushed back (`Retry-After`) or is drained,
    /// some pushed back; for an assigned task, its droplet pushed back and the delivery waits.
    DropletDeferred,
    /// Every capable droplet that could take it is being drained.
    DropletDraining,
    /// Its key has `max_in_flight` tasks assigned or running (see `key`).
    KeyAtLimit,
    /// Its key's `max_per_second` has no slot free until `key.next_slot`.
    KeyRateLimited,
}

/// What `GET /tasks/{id}/explain` answers. `reason` and `candidates` (with `retry_at` for
/// `waiting_for_retry`, `position` for `queued_behind`) only for a task waiting to be routed.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Explanation {
    pub task_id: i32,
    pub status: Status,
    pub attempt: i32,
    /// Per state, the seconds the task spent in it (the current state up to now, unless the
    /// task is finished).
    pub time_in_state_seconds: BTreeMap<String, f64>,
    /// The assignment decisions of each attempt, oldest first.
    pub attempts: Vec<AttemptDecision>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// With `queued_behind`: how many pending tasks the router takes before this one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<i64>,
    /// With `waiting_for_retry`: when the task goes back to pending.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub retry_at: Option<String>,
    /// With `droplet_deferred`: when the (first) droplet that pushed back takes work again.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub deferred_until: Option<String>,
    /// With `droplet_deferred`: the seconds left of its `Retry-After`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<f64>,
    /// Every registered droplet with the capability.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidates: Option<Vec<Candidate>>,
    /// For a pending task: its fairness key, its place in that key's queue, and the key's
    /// limits and tasks in flight.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<KeyState>,
}

/// A droplet with the capability a waiting task needs, and why it does not take it now.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Candidate {
    pub droplet_id: i32,
    /// `active`, `inactive` or `error`.
    pub status: String,
    /// Its tasks assigned or in progress.
    pub load: i64,
    pub max_concurrent_tasks: Option<i32>,
    /// Absent when it could take the task now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why_not: Option<String>,
    /// When its contract refuses the payload: each rule the payload breaks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub violations: Option<Vec<Violation>>,
}

/// A rule of a contract the payload breaks, at its place in the payload.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Violation {
    pub path: Vec<String>,
    pub message: String,
}

/// One attempt: the router's decision, as the history recorded it, and how it ended.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AttemptDecision {
    pub attempt: i32,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub assigned_at: Option<String>,
    pub chosen_droplet_id: Option<i64>,
    /// How the router chose.
    pub rule: Option<String>,
    /// The droplets it chose among, each with `droplet_id`, `load`, `max_concurrent_tasks`.
    #[schema(value_type = Option<Vec<Object>>)]
    pub candidates: Option<Value>,
    /// The state the attempt is in, or ended in (`pending` when the task was requeued).
    pub ended_as: Option<String>,
    pub ended_because: Option<String>,
}

/// What an explanation reads of the shared parts: the pool, the settings, the emergency
/// stop and the router's trigger (whether routing runs), and the compiled contracts.
#[derive(Clone, Copy)]
pub struct Explainer<'a> {
    db: &'a PgPool,
    settings: &'a Settings,
    stop: &'a EmergencyStop,
    router: &'a RouterTrigger,
    contracts: &'a Arc<Contracts>,
}

impl Core {
    /// The parts an explanation reads ([`explain`]).
    pub fn explainer(&self) -> Explainer<'_> {
        Explainer {
            db: &self.db,
            settings: &self.settings,
            stop: &self.emergency_stop,
            router: &self.router,
            contracts: &self.contracts,
        }
    }
}

/// The explanation of one task, or None when there is no such task.
pub async fn explain(state: Explainer<'_>, id: i32) -> Result<Option<Explanation>, sqlx::Error> {
    let Some(task) = tasks::load(state.db, id).await? else {
        return Ok(None);
    };
    let history = tasks::history(state.db, id).await?;
    let mut answer = Explanation {
        task_id: task.id,
        status: task.status,
        attempt: task.attempt,
        time_in_state_seconds: time_in_states(&task, &history),
        attempts: attempts(&history),
        reason: None,
        position: None,
        retry_at: None,
        deferred_until: None,
        retry_after_seconds: None,
        candidates: None,
        key: None,
    };
    let config = state.settings.current();
    let retry_at = retry_at(
        &task,
        config.retry_backoff_seconds,
        config.retry_backoff_max_seconds,
    );
    if task.status == Status::Pending || retry_at.is_some() {
        waiting(state, &task, retry_at, &mut answer).await?;
    } else if task.status == Status::Assigned {
        delivery_deferred(state, &task, &mut answer).await?;
    }
    Ok(Some(answer))
}

/// When a failed task with retries left goes back to pending (its backoff from the failure).
fn retry_at(task: &Task, backoff: u64, max: u64) -> Option<NaiveDateTime> {
    if task.status != Status::Failed || task.retry_count >= task.max_retries {
        return None;
    }
    if task.deadline.is_some_and(|d| d <= Utc::now().naive_utc()) {
        return None;
    }
    let delay = (backoff as f64 * 2f64.powi(task.retry_count)).min(max as f64);
    let failed = task.completed_at.unwrap_or(task.updated_at);
    Some(failed + chrono::Duration::milliseconds((delay * 1000.0) as i64))
}

/// An assigned task whose droplet pushed back: its delivery waits for the `Retry-After`.
async fn delivery_deferred(
    state: Explainer<'_>,
    task: &Task,
    answer: &mut Explanation,
) -> Result<(), sqlx::Error> {
    let Some(internal) = task.assigned_droplet_internal else {
        return Ok(());
    };
    let until: Option<NaiveDateTime> = sqlx::query_scalar!(
        r#"SELECT deferred_until AS "until!" FROM droplets WHERE id = $1 AND deferred_until > NOW()"#,
        internal
    )
    .fetch_optional(state.db)
    .await?;
    if let Some(until) = until {
        set_deferred(answer, until);
    }
    Ok(())
}

/// `droplet_deferred` with when the wait ends and the seconds left.
fn set_deferred(answer: &mut Explanation, until: NaiveDateTime) {
    let left = (until - Utc::now().naive_utc()).num_milliseconds().max(0) as f64 / 1000.0;
    answer.reason = Some(Reason::DropletDeferred);
    answer.deferred_until = Some(iso(&until));
    answer.retry_after_seconds = Some(left);
}

/// The reason a waiting task is not assigned now, and every capable droplet with its state.
async fn waiting(
    state: Explainer<'_>,
    task: &Task,
    retry_at: Option<NaiveDateTime>,
    answer: &mut Explanation,
) -> Result<(), sqlx::Error> {
    let capability = task.required_capability.clone().filter(|c| !c.is_empty());
    let mut rows = sqlx::query_as!(
        CandidateRow,
        r#"SELECT d.droplet_id, d.status, d.admin_deactivated,
                LEAST(d.max_concurrent_tasks, d.in_flight_allowance) AS max_concurrent_tasks,
                (SELECT COUNT(*) FROM tasks t WHERE t.assigned_droplet_id = d.id
                   AND t.status IN ('assigned', 'in_progress')) AS "load!",
                CASE WHEN $1::text IS NULL THEN NULL ELSE d.capability_schemas -> $1 END AS "schema?",
                CASE WHEN d.deferred_until > NOW() THEN d.deferred_until END AS deferred_until,
                d.drain_requested_at IS NOT NULL AS "draining!"
         FROM droplets d
         WHERE d.registered AND ($1::text IS NULL OR COALESCE(d.capabilities, '[]'::jsonb) ? $1)
         ORDER BY d.droplet_id"#,
        capability
    )
    .fetch_all(state.db)
    .await?;

    let verdicts = contract_verdicts(state, &mut rows, &task.payload).await;
    let mut candidates = Vec::with_capacity(rows.len());
    let (mut active, mut with_room, mut accepting) = (0, 0, 0);
    // Active droplets held back (pushed back or drained), and the first to take work again.
    let (mut held, mut draining, mut first_back) = (0, 0, None::<NaiveDateTime>);
    for (c, verdict) in rows.iter().zip(verdicts) {
        let full = c
            .max_concurrent_tasks
            .is_some_and(|m| c.load >= i64::from(m));
        let refuses = verdict.as_ref().is_none_or(|v| !v.is_empty());
        let why_not = if c.status != "active" {
            Some(if c.admin_deactivated {
                "deactivated by an admin".to_string()
            } else {
                format!("droplet is {}", c.status)
            })
        } else if c.draining {
            Some("being drained: no new work until it registers again".to_string())
        } else if let Some(until) = c.deferred_until {
            Some(format!(
                "pushed back (Retry-After): no new work until {}",
                iso(&until)
            ))
        } else if full {
            Some(format!(
                "full: {} of {} tasks",
                c.load,
                c.max_concurrent_tasks.unwrap_or_default()
            ))
        } else if refuses {
            Some("its capability contract refuses the payload".to_string())
        } else {
            None
        };
        if c.status == "active" && (c.draining || c.deferred_until.is_some()) {
            held += 1;
            if c.draining {
                draining += 1;
            } else {
                first_back = first_back.min(c.deferred_until).or(c.deferred_until);
            }
        } else if c.status == "active" {
            active += 1;
            if !full {
                with_room += 1;
                if !refuses {
                    accepting += 1;
                }
            }
        }
        let violations = verdict.filter(|_| refuses).map(|found| {
            found
                .into_iter()
                .map(|v| Violation {
                    path: v.path,
                    message: v.message,
                })
                .collect()
        });
        candidates.push(Candidate {
            droplet_id: c.droplet_id,
            status: c.status.clone(),
            load: c.load,
            max_concurrent_tasks: c.max_concurrent_tasks,
            why_not,
            violations,
        });
    }

    answer.candidates = Some(candidates);
    if task.status == Status::Pending {
        answer.key = Some(
            key_limits::key_state(
                state.db,
                task.id,
                &task.fairness_key,
                task.priority,
                task.created_at,
            )
            .await?,
        );
    }
    let key = answer.key.as_ref();
    let reason = if let Some(at) = retry_at {
        answer.retry_at = Some(iso(&at));
        Reason::WaitingForRetry
    } else if state.stop.is_on() {
        Reason::EmergencyStop
    } else if state.router.is_paused() {
        Reason::RoutingPaused
    } else if rows.is_empty() {
        Reason::NoCapableDroplet
    } else if active == 0 && held > draining {
        if let Some(until) = first_back {
            set_deferred(answer, until);
        }
        Reason::DropletDeferred
    } else if active == 0 && held > 0 {
        Reason::DropletDraining
    } else if active == 0 {
        Reason::CapableDropletsInactive
    } else if key.is_some_and(|k| k.at_limit) {
        Reason::KeyAtLimit
    } else if key.is_some_and(|k| k.rate_limited) {
        Reason::KeyRateLimited
    } else if with_room == 0 {
        Reason::CapableDropletsFull
    } else if accepting == 0 {
        Reason::PayloadRejectedByContracts
    } else {
        answer.position = Some(position(state, task).await?);
        Reason::QueuedBehind
    };
    answer.reason = Some(reason);
    Ok(())
}

/// Per candidate (its schema taken), the rules its contract finds the payload violates (empty:
/// it accepts; no schema: it accepts anything), or `None` when it refuses without them (the
/// schema no longer compiles, or the budget ran out). Each distinct schema is evaluated once,
/// off the async workers.
async fn contract_verdicts(
    state: Explainer<'_>,
    rows: &mut [CandidateRow],
    payload: &Value,
) -> Vec<Option<Vec<contracts::Violation>>> {
    let schemas: Vec<Option<Value>> = rows.iter_mut().map(|r| r.schema.take()).collect();
    let refused = schemas
        .iter()
        .map(|s| s.is_none().then(Vec::new))
        .collect::<Vec<_>>();
    if schemas.iter().all(Option::is_none) {
        return refused;
    }
    let (compiled, payload) = (state.contracts.clone(), payload.clone());
    let work = tokio::task::spawn_blocking(move || {
        let mut memo = compiled.memo::<()>(contracts::Site::Explain);
        schemas
            .iter()
            .map(|schema| match schema {
                None => Some(Vec::new()),
                Some(schema) => compiled
                    .compile(schema)
                    .ok()
                    .and_then(|c| memo.violations(&c, (), &payload)),
            })
            .collect::<Vec<_>>()
    });
    match tokio::time::timeout(contracts::BUDGET * 2, work).await {
        Ok(Ok(verdicts)) => verdicts,
        _ => {
            tracing::warn!("explain: contract evaluation over its time budget");
            refused
        }
    }
}

/// How many pending tasks of the same capability (or none) come before this one by
/// priority, then age (the router also takes keys in turn: `key.position_in_key` is its
/// place within its own key).
async fn position(state: Explainer<'_>, task: &Task) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT COUNT(*) AS "n!" FROM tasks
         WHERE status = 'pending' AND id <> $1
           AND COALESCE(required_capability, '') = COALESCE($2, '')
           AND (deadline IS NULL OR deadline > NOW())
           AND (COALESCE(priority, 5), COALESCE(created_at, NOW()::timestamp), id) < ($3, $4, $1)"#,
        task.id,
        task.required_capability.as_deref(),
        task.priority,
        task.created_at
    )
    .fetch_one(state.db)
    .await
}

/// The assignment decisions of each attempt, as the router recorded them.
fn attempts(history: &[HistoryRow]) -> Vec<AttemptDecision> {
    let mut by_attempt: BTreeMap<i32, Vec<&HistoryRow>> = BTreeMap::new();
    for row in history.iter().filter(|r| r.attempt > 0) {
        by_attempt.entry(row.attempt).or_default().push(row);
    }
    by_attempt
        .into_iter()
        .map(|(attempt, rows)| {
            let assigned = rows.iter().find(|r| r.to_status == "assigned");
            let router = assigned
                .and_then(|r| r.metadata.as_ref())
                .and_then(|m| m.get("router"));
            let last = rows.last();
            AttemptDecision {
                attempt,
                assigned_at: assigned.map(|r| iso(&r.changed_at)),
                chosen_droplet_id: router.and_then(|r| r.get("chosen")).and_then(Value::as_i64),
                rule: router
                    .and_then(|r| r.get("rule"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                candidates: router
                    .and_then(|r| r.get("candidates"))
                    .filter(|c| c.is_array())
                    .cloned(),
                ended_as: last.map(|r| r.to_status.clone()),
                ended_because: last.and_then(|r| r.reason.clone()),
            }
        })
        .collect()
}

/// Seconds spent in each state over the task's life (the current state up to now).
fn time_in_states(task: &Task, history: &[HistoryRow]) -> BTreeMap<String, f64> {
    let mut spent: BTreeMap<String, f64> = BTreeMap::new();
    let now = Utc::now().naive_utc();
    for (i, row) in history.iter().enumerate() {
        let until = history.get(i + 1).map(|n| n.changed_at).unwrap_or(now);
        let finished = matches!(row.to_status.as_str(), "completed" | "cancelled")
            || (row.to_status == "failed"
                && i + 1 == history.len()
                && task.retry_count >= task.max_retries);
        if finished && i + 1 == history.len() {
            continue;
        }
        let seconds = (until - row.changed_at).num_milliseconds().max(0) as f64 / 1000.0;
        *spent.entry(row.to_status.clone()).or_insert(0.0) += seconds;
    }
    spent
}
