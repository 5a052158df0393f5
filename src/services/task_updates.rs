//! `PATCH /tasks/{id}`: the assigned droplet (or an admin) moves its task. Concurrent
//! PATCHes share one transaction (`shared_commit`), as creations and heartbeats do: one lock,
//! one statement updating the rows with their history, one events insert for all of them, and
//! one commit.
//! Each is answered on its own: a refusal (not found, not the caller's, a stale attempt, a
//! move that may not happen) is that PATCH's alone, and nothing is read before: whether the
//! task exists and is the caller's is checked under its row lock.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;
use sqlx::PgPool;

use crate::identity::Principal;
use crate::services::error::{Error, Result};
use crate::services::shared_commit;
use crate::services::state_machine::{Actor, Applied, Move, MoveError, Status};
use crate::services::task_parts::Tasks;
use crate::services::task_store::{load, Task};
use crate::services::transition::Transition;
use crate::validation::{FieldError, Validate};

/// The payload of `PATCH /tasks/{id}`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct TaskUpdate {
    pub status: String,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    #[serde(default)]
    pub error_message: Option<String>,
    /// When present, the update holds only if the task is still on this attempt.
    #[serde(default)]
    pub attempt: Option<i64>,
}

impl Validate for TaskUpdate {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if Status::parse(&self.status).is_none() {
            errors.push(FieldError::new(
                &["status"],
                "Input should be 'pending', 'assigned', 'in_progress', 'completed', 'failed' or 'cancelled'",
                "enum",
            ));
        }
        errors
    }
}

/// Whether `caller` may PATCH task `id`, in the contract's order: the task exists (404),
/// then, for a non-admin, it is assigned to the caller's droplet (403). The handler asks this
/// of a request whose body it could not read, so that its 422 comes only after both.
pub async fn may_update(db: &PgPool, caller: &Principal, id: i32) -> Result<Task> {
    let task = load(db, id)
        .await?
        .ok_or_else(|| Error::not_found(format!("Task {id} not found")))?;
    if !caller.is_admin() && task.assigned_droplet_id != Some(caller.droplet_id) {
        return Err(not_yours(caller, id));
    }
    Ok(task)
}

fn not_yours(caller: &Principal, id: i32) -> Error {
    Error::forbidden(format!(
        "Task {id} is not assigned to droplet {}",
        caller.droplet_id
    ))
}

/// `PATCH /tasks/{id}`: the assigned droplet (or an admin) moves its task. The checks, in
/// the contract's order, are made under the row lock: the task exists (404), it is the
/// caller's (403), `attempt` is its current one (409), the move may happen (409).
pub async fn update(
    state: &Tasks,
    caller: &Principal,
    id: i32,
    update: TaskUpdate,
) -> Result<Task> {
    let Some(to) = Status::parse(&update.status) else {
        // The body is checked before it comes here; should it not be, 404 and 403 first.
        may_update(&state.db, caller, id).await?;
        return Err(Error::invalid(
            &["body", "payload", "status"],
            "unknown status",
            "enum",
        ));
    };
    let mut m = Move::new(id, to, Actor::Admin, caller.actor_name());
    if !caller.is_admin() {
        m.actor = Actor::AssignedDroplet;
        m.expect_assignee = Some(caller.droplet_id);
    }
    m.reason = Some(match to {
        Status::InProgress => "started by droplet".into(),
        Status::Completed => "completed by droplet".into(),
        Status::Failed => update
            .error_message
            .clone()
            .unwrap_or_else(|| "failed by droplet".into()),
        other => format!("set to {} by {}", other.as_str(), caller.actor_name()),
    });
    m.result = update.result;
    m.error_message = update.error_message;
    m.expect_attempt = update
        .attempt
        .map(|a| a.clamp(-1, i64::from(i32::MAX)) as i32);

    let answer = state.updates.push(m);
    // Should the shared transaction fail (a deadlock with another writer of these tasks,
    // say), each PATCH is tried alone.
    shared_commit::lead_each(
        state,
        |c: &Tasks| &*c.updates,
        |m| m.task_id,
        |core, moves| Box::pin(write_moves(core, moves)),
    );
    match answer.await {
        Ok(Ok(Some(Ok(applied)))) => Ok(applied.task),
        Ok(Ok(Some(Err(MoveError::NotYours(_))))) => Err(not_yours(caller, id)),
        Ok(Ok(Some(Err(refused)))) => Err(refused.into()),
        Ok(Ok(None)) => Err(Error::internal("move applied without a row")),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(Error::internal("a shared update ended without an answer")),
    }
}

/// The moves of distinct tasks in one transaction; each move's outcome by task id.
async fn write_moves(
    core: &Tasks,
    moves: &[&Move],
) -> std::result::Result<HashMap<i32, std::result::Result<Applied, MoveError>>, sqlx::Error> {
    let mut t = Transition::begin(core).await?;
    let refused = t.apply_each(moves).await?;
    let applied = t.commit().await?;
    let mut outcomes: HashMap<i32, std::result::Result<Applied, MoveError>> =
        applied.into_iter().map(|a| (a.task.id, Ok(a))).collect();
    for (m, refusal) in moves.iter().zip(refused) {
        if let Some(e) = refusal {
            outcomes.insert(m.task_id, Err(e));
        }
    }
    Ok(outcomes)
}
