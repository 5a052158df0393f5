//! "Why is my task waiting?": `GET /tasks/{id}/explain` answers from the live state. For a
//! task waiting to be routed, the one reason it is not assigned now and every droplet that
//! could take it with why it does not; for any other task, the assignment decisions of each
//! attempt (as the router recorded them in the history) and the time spent in each state.

use std::collections::BTreeMap;

use chrono::{NaiveDateTime, Utc};
use serde_json::{json, Value};

use crate::protocol::iso;
use crate::services::contracts;
use crate::services::status::Status;
use crate::services::tasks::{self, HistoryRow, Task};
use crate::services::Core;

#[derive(sqlx::FromRow)]
struct Candidate {
    droplet_id: i32,
    status: String,
    admin_deactivated: bool,
    max_concurrent_tasks: Option<i32>,
    load: i64,
    schema: Option<Value>,
}

/// The explanation of one task, or None when there is no such task.
pub async fn explain(state: &Core, id: i32) -> Result<Option<Value>, sqlx::Error> {
    let Some(task) = tasks::load(&state.db, id).await? else {
        return Ok(None);
    };
    let history = tasks::history(&state.db, id).await?;
    let mut answer = json!({
        "task_id": task.id,
        "status": task.status,
        "attempt": task.attempt,
        "time_in_state_seconds": time_in_states(&task, &history),
        "attempts": attempts(&history),
    });
    let config = state.config();
    let retry_at = retry_at(
        &task,
        config.retry_backoff_seconds,
        config.retry_backoff_max_seconds,
    );
    if task.status == Status::Pending || retry_at.is_some() {
        let waiting = waiting(state, &task, retry_at).await?;
        if let (Some(obj), Value::Object(more)) = (answer.as_object_mut(), waiting) {
            obj.extend(more);
        }
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

/// The reason a waiting task is not assigned now, and every capable droplet with its state.
async fn waiting(
    state: &Core,
    task: &Task,
    retry_at: Option<NaiveDateTime>,
) -> Result<Value, sqlx::Error> {
    let capability = task.required_capability.clone().filter(|c| !c.is_empty());
    let rows: Vec<Candidate> = sqlx::query_as(
        "SELECT d.droplet_id, d.status, d.admin_deactivated, d.max_concurrent_tasks,
                (SELECT COUNT(*) FROM tasks t WHERE t.assigned_droplet_id = d.id
                   AND t.status IN ('assigned', 'in_progress')) AS load,
                CASE WHEN $1::text IS NULL THEN NULL ELSE d.capability_schemas -> $1 END AS schema
         FROM droplets d
         WHERE d.registered AND ($1::text IS NULL OR COALESCE(d.capabilities, '[]'::jsonb) ? $1)
         ORDER BY d.droplet_id",
    )
    .bind(&capability)
    .fetch_all(&state.db)
    .await?;

    let mut candidates = Vec::with_capacity(rows.len());
    let (mut active, mut with_room, mut accepting) = (0, 0, 0);
    for c in &rows {
        let full = c
            .max_concurrent_tasks
            .is_some_and(|m| c.load >= i64::from(m));
        let refuses = c
            .schema
            .as_ref()
            .is_some_and(|s| !state.contracts.accepts(s, &task.payload));
        let why_not = if c.status != "active" {
            Some(if c.admin_deactivated {
                "deactivated by an admin".to_string()
            } else {
                format!("droplet is {}", c.status)
            })
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
        if c.status == "active" {
            active += 1;
            if !full {
                with_room += 1;
                if !refuses {
                    accepting += 1;
                }
            }
        }
        let mut entry = json!({
            "droplet_id": c.droplet_id,
            "status": c.status,
            "load": c.load,
            "max_concurrent_tasks": c.max_concurrent_tasks,
        });
        if let Some(why) = why_not {
            entry["why_not"] = json!(why);
        }
        if let Some(schema) = &c.schema {
            if refuses {
                if let Ok(contract) = state.contracts.compile(schema) {
                    entry["violations"] = json!(contracts::violations(&contract, &task.payload)
                        .into_iter()
                        .map(|v| json!({"path": v.path, "message": v.message}))
                        .collect::<Vec<_>>());
                }
            }
        }
        candidates.push(entry);
    }

    let mut answer = json!({ "candidates": candidates });
    let reason = if let Some(at) = retry_at {
        answer["retry_at"] = json!(iso(&at));
        "waiting_for_retry"
    } else if state.emergency_stopped() {
        "emergency_stop"
    } else if state.router.is_paused() {
        "routing_paused"
    } else if rows.is_empty() {
        "no_capable_droplet"
    } else if active == 0 {
        "capable_droplets_inactive"
    } else if with_room == 0 {
        "capable_droplets_full"
    } else if accepting == 0 {
        "payload_rejected_by_contracts"
    } else {
        answer["position"] = json!(position(state, task).await?);
        "queued_behind"
    };
    answer["reason"] = json!(reason);
    Ok(answer)
}

/// How many pending tasks the router takes before this one (same capability, or any task
/// without one for a task without one), in its order: priority, then age.
async fn position(state: &Core, task: &Task) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM tasks
         WHERE status = 'pending' AND id <> $1
           AND required_capability IS NOT DISTINCT FROM $2
           AND (deadline IS NULL OR deadline > NOW())
           AND (COALESCE(priority, 5), COALESCE(created_at, NOW()::timestamp), id) < ($3, $4, $1)",
    )
    .bind(task.id)
    .bind(&task.required_capability)
    .bind(task.priority)
    .bind(task.created_at)
    .fetch_one(&state.db)
    .await
}

/// The assignment decisions of each attempt, as the router recorded them.
fn attempts(history: &[HistoryRow]) -> Vec<Value> {
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
                .and_then(|m| m.get("router"))
                .cloned();
            let last = rows.last();
            json!({
                "attempt": attempt,
                "assigned_at": assigned.map(|r| iso(&r.changed_at)),
                "chosen_droplet_id": router.as_ref().and_then(|r| r.get("chosen")).cloned(),
                "rule": router.as_ref().and_then(|r| r.get("rule")).cloned(),
                "candidates": router.as_ref().and_then(|r| r.get("candidates")).cloned(),
                "ended_as": last.map(|r| r.to_status.clone()),
                "ended_because": last.and_then(|r| r.reason.clone()),
            })
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
