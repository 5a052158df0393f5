//! Tasks: creation (idempotent by trace id), reading, and the moves callers ask
//! for (PATCH, cancel), all through the state machine.

use std::collections::HashMap;

use chrono::NaiveDateTime;
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::identity::Principal;
use crate::protocol;
use crate::services::contracts;
use crate::services::create_queue::{NewRow, Stored};
use crate::services::error::{Error, Result};
use crate::services::events::{self, Event, TaskEventKind};
pub use crate::services::new_task::NewTask;
use crate::services::new_task::{DEFAULT_MAX_RETRIES, DEFAULT_PRIORITY};
use crate::services::shared_commit;
use crate::services::state_machine::{Actor, Mode, Move, Status};
use crate::services::task_parts::Tasks;
pub use crate::services::task_store::{history, load, load_by_trace, HistoryRow, Task};
use crate::services::task_store::{select_task, task_columns, task_of};
pub use crate::services::task_updates::{may_update, update, TaskUpdate};
use crate::services::transition::{self, Transition};
use crate::services::{fair_share, key_limits};
use crate::validation::FieldError;

/// What `POST /tasks` answers.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Created {
    pub task_id: i32,
    pub trace_id: Uuid,
    pub status: Status,
    #[serde(serialize_with = "protocol::ts")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: NaiveDateTime,
    pub estimated_assignment_seconds: u64,
}

impl Created {
    /// The answer to a creation: the task, and when it should be assigned: at once when a
    /// capable droplet had room at the last routing pass, else by the next `task_router` run.
    pub fn of(core: &Tasks, task: &Task) -> Created {
        let estimate = if core
            .router
            .has_room_for(task.required_capability.as_deref())
        {
            0
        } else {
            core.settings.current().task_router_interval
        };
        Created {
            task_id: task.id,
            trace_id: task.trace_id,
            status: task.status,
            created_at: task.created_at,
            estimated_assignment_seconds: estimate,
        }
    }
}

/// The schemas registered droplets with this capability declared for it (`None` for a droplet
/// without one).
pub async fn contracts_for(
    db: &PgPool,
    capability: &str,
) -> Result<Vec<Option<Value>>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT capability_schemas -> $1 AS "schema?" FROM droplets
         WHERE registered AND COALESCE(capabilities, '[]'::jsonb) ? $1"#,
        capability
    )
    .fetch_all(db)
    .await
}

/// A payload at least one capable droplet's contract accepts (or a droplet without one), else
/// 422 with one entry per violated rule, located in the payload. The contracts come from the
/// directory kept in memory (no query), or from the database while it is not known. They are
/// evaluated off the async workers, within [`contracts::BUDGET`]: over it, a 422 saying so.
async fn check_contracts(
    state: &Tasks,
    capability: &str,
    payload: &Value,
    payload_loc: &[&str],
) -> Result<()> {
    let check = match state.directory.capable(capability) {
        Some(capable) if capable.accepts_any() => return Ok(()),
        Some(capable) => {
            let (core, payload) = (state.clone(), payload.clone());
            tokio::task::spawn_blocking(move || {
                contracts::verdict_of(&core.contracts, capable.contracts.iter().cloned(), &payload)
            })
        }
        None => {
            let schemas = contracts_for(&state.db, capability).await?;
            if schemas.iter().all(Option::is_none) {
                return Ok(());
            }
            let (core, payload) = (state.clone(), payload.clone());
            tokio::task::spawn_blocking(move || {
                contracts::verdict(&core.contracts, &schemas, &payload)
            })
        }
    };
    // The budget is also kept inside (between evaluations); this bounds the wait for one.
    let verdict = match tokio::time::timeout(contracts::BUDGET * 2, check).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return Err(Error::Internal(format!("contract check: {e}"))),
        Err(_) => {
            tracing::warn!(capability, "contract check over its time budget");
            Err(vec![contracts::over_budget()])
        }
    };
    verdict.map_err(|violations| {
        Error::Invalid(
            violations
                .into_iter()
                .map(|v| {
                    let mut loc: Vec<&str> = payload_loc.to_vec();
                    loc.extend(v.path.iter().map(String::as_str));
                    FieldError::new(&loc, v.message, "contract_violation")
                })
                .collect(),
        )
    })
}

/// Creates a task, or finds the one this creator already made with this trace id.
/// Returns the task and whether it is new.
pub async fn create(
    state: &Tasks,
    caller: &Principal,
    trace_id: &str,
    new: NewTask,
) -> Result<(Task, bool)> {
    create_at(
        state,
        caller,
        trace_id,
        new,
        &["body", "payload", "payload"],
    )
    .await
}

/// [`create`], with the location of the task's payload in the request for 422 entries
/// (`/message`'s `create_task` carries it under `task_data`).
pub async fn create_at(
    state: &Tasks,
    caller: &Principal,
    trace_id: &str,
    new: NewTask,
    payload_loc: &[&str],
) -> Result<(Task, bool)> {
    let trace = Uuid::parse_str(trace_id).map_err(|_| {
        Error::invalid(
            &["body", "trace_id"],
            "Input should be a valid UUID",
            "uuid_parsing",
        )
    })?;
    let created_by = caller.droplet_id.to_string();
    let new = new.settled();
    // A key at its max_queued pushes back (429) before anything is checked or written.
    let key = fair_share::fairness_key(new.concurrency_key.as_deref(), &created_by);
    key_limits::admit(&state.limits, &key, trace).await?;
    if let (Some(c), Some(payload)) = (new.required_capability.as_deref(), &new.payload) {
        if let Err(refused) = check_contracts(state, c, payload, payload_loc).await {
            // A retry of a creation (same trace id) gets its task back whatever the contracts
            // say now: only a refused payload costs this look-up.
            return match load_by_trace(&state.db, trace).await? {
                Some(existing) => repeat_of(existing, &created_by, trace),
                None => Err(refused),
            };
        }
    }
    let stored = insert(
        state,
        NewRow {
            trace_id: trace,
            created_by: created_by.clone(),
            changed_by: caller.actor_name(),
            task: new,
        },
    )
    .await?
    .ok_or_else(|| Error::conflict(format!("Trace id {trace} is in use")))?;
    if stored.new {
        return Ok((stored.task, true));
    }
    repeat_of(stored.task, &created_by, trace)
}

/// The answer to a creation whose trace id has a task already: that task for its creator
/// (a retry), 409 for anyone else.
fn repeat_of(existing: Task, created_by: &str, trace: Uuid) -> Result<(Task, bool)> {
    if existing.created_by.as_deref() == Some(created_by) {
        return Ok((existing, false));
    }
    Err(Error::conflict(format!(
        "Trace id {trace} was already used by another creator"
    )))
}

/// Inserts a task with its first history row and its `task_created` event, sharing one
/// transaction and one commit with the creations waiting at the same moment. Answers once
/// the row is committed: the task inserted, or the one that had the trace id already.
async fn insert(core: &Tasks, row: NewRow) -> Result<Option<Stored>> {
    let answer = core.creates.push(row);
    lead(core);
    match answer.await {
        Ok(inserted) => Ok(inserted?),
        Err(_) => Err(Error::internal("a shared insert ended without an answer")),
    }
}

/// Inserts rows as if their creations came at the same moment: they share one insert and
/// one commit, unless one of them fails it, when each is tried alone. A trace id given twice
/// waits for the next shared insert, which finds the first one's task.
pub async fn insert_all(core: &Tasks, rows: Vec<NewRow>) -> Vec<Result<Option<Stored>>> {
    let answers: Vec<_> = rows.into_iter().map(|row| core.creates.push(row)).collect();
    lead(core);
    let mut out = Vec::with_capacity(answers.len());
    for answer in answers {
        out.push(match answer.await {
            Ok(inserted) => inserted.map_err(Error::from),
            Err(_) => Err(Error::internal("a shared insert ended without an answer")),
        });
    }
    out
}

/// Becomes a leader of the creations when a place is free (`shared_commit::lead_each`). A batch
/// holds one creation per trace id; a repeat waits for the next one.
fn lead(core: &Tasks) {
    shared_commit::lead_each(
        core,
        |c: &Tasks| &*c.creates,
        |r| r.trace_id,
        |core, rows| Box::pin(insert_rows(core, rows)),
    );
}

/// Inserts the rows (one per trace id) with their history rows and the events of the new
/// tasks, in one transaction through the transition path. Returns every trace id's task.
///
/// One statement inserts them all, each with its first history row, and answers every trace
/// id given with its task: `fresh` when inserted now, else the task that holds it. Rows are
/// given as arrays, one element per task and one array per column (`NewRow`'s settled task:
/// a column added to the input takes its array here). One JSON array of rows read with
/// `jsonb_populate_record` was tried: PostgreSQL spent ~16 % more CPU per creation
/// (BENCHMARKS.md). The repeat of a trace id is found by the insert itself (`ON CONFLICT`),
/// with no look-up before it.
///
/// Rows go in by trace id, not in their order of arrival: two shared inserts running at
/// once with the same trace ids then wait for each other in one order, never in a circle
/// (a deadlock, which PostgreSQL breaks after `deadlock_timeout`, 1 s, stalled repeats). A
/// trace id another transaction inserted while this statement ran is neither inserted nor
/// seen by it (its snapshot is older): it is read afterwards.
async fn insert_rows(
    core: &Tasks,
    rows: &[&NewRow],
) -> std::result::Result<HashMap<Uuid, Stored>, sqlx::Error> {
    let mut t = Transition::begin(core).await?;
    // The arrays through `(SELECT $n)`: planned once per connection, not at each batch
    // (`state_machine::apply` says why).
    let found = task_columns!(sqlx::query {
        "WITH input AS (
        SELECT * FROM unnest((SELECT $1::uuid[]), (SELECT $2::text[]), (SELECT $3::text[]),
                             (SELECT $4::text[]), (SELECT $5::jsonb[]), (SELECT $6::text[]),
                             (SELECT $7::int[]), (SELECT $8::int[]), (SELECT $9::text[]),
                             (SELECT $10::text[]), (SELECT $11::text[]), (SELECT $12::text[]))
            AS i(trace_id, task_type, title, description, payload,
                 required_capability, priority, max_retries, deadline, created_by, changed_by,
                 concurrency_key)
     ), t AS (
        INSERT INTO tasks (trace_id, task_type, title, description, payload, required_capability,
                           priority, max_retries, deadline, created_by, concurrency_key, status)
        SELECT trace_id, task_type, title, description, payload, required_capability,
               priority, max_retries, deadline::timestamp, created_by, concurrency_key, 'pending'
        FROM input ORDER BY trace_id
        ON CONFLICT (trace_id) DO NOTHING
        RETURNING *
     ), h AS (
        INSERT INTO task_state_history (task_id, from_status, to_status, changed_by, reason)
        SELECT t.id, NULL, 'pending', input.changed_by, 'created'
        FROM t JOIN input ON input.trace_id = t.trace_id ORDER BY t.id
     ), taken AS (
        SELECT trace_id FROM input EXCEPT SELECT trace_id FROM t
     ), found AS (
        SELECT TRUE AS fresh, t.* FROM t
        UNION ALL
        SELECT FALSE, e.* FROM taken JOIN tasks e ON e.trace_id = taken.trace_id
     )
     SELECT t.fresh AS \"fresh!\", " +
    } {
        + " FROM found t LEFT JOIN droplets d ON d.id = t.assigned_droplet_id ORDER BY t.id",
        // Checked as the arrays the statement casts them to by PostgreSQL; the macros'
        // element check knows neither &str nor Option in an array.
        &rows.iter().map(|r| r.trace_id).collect::<Vec<_>>(),
        &rows.iter().map(|r| r.task.task_type.as_str()).collect::<Vec<_>>() as _,
        &rows.iter().map(|r| r.task.title.as_str()).collect::<Vec<_>>() as _,
        &rows.iter().map(|r| r.task.description.as_deref()).collect::<Vec<_>>() as _,
        &rows.iter().map(|r| r.task.payload.as_ref()).collect::<Vec<_>>() as _,
        &rows.iter().map(|r| r.task.required_capability.as_deref()).collect::<Vec<_>>() as _,
        &rows.iter().map(|r| r.task.priority.unwrap_or(DEFAULT_PRIORITY) as i32).collect::<Vec<_>>(),
        &rows.iter().map(|r| r.task.max_retries.unwrap_or(DEFAULT_MAX_RETRIES) as i32).collect::<Vec<_>>(),
        &rows.iter().map(|r| r.task.deadline.as_deref()).collect::<Vec<_>>() as _,
        &rows.iter().map(|r| r.created_by.as_str()).collect::<Vec<_>>() as _,
        &rows.iter().map(|r| r.changed_by.as_str()).collect::<Vec<_>>() as _,
        &rows.iter().map(|r| r.task.concurrency_key.as_deref()).collect::<Vec<_>>() as _
    })
    .fetch_all(t.conn())
    .await?;
    let mut stored: HashMap<Uuid, Stored> = found
        .into_iter()
        .map(|r| {
            let new = r.fresh;
            (
                r.trace_id,
                Stored {
                    task: task_of!(r),
                    new,
                },
            )
        })
        .collect();
    // Trace ids a concurrent creation committed while the insert ran: this statement sees them.
    let unseen: Vec<Uuid> = rows
        .iter()
        .map(|r| r.trace_id)
        .filter(|id| !stored.contains_key(id))
        .collect();
    if !unseen.is_empty() {
        let tasks: Vec<Task> = select_task!(" WHERE t.trace_id = ANY($1)", &unseen)
            .fetch_all(t.conn())
            .await?;
        for task in tasks {
            stored.insert(task.trace_id, Stored { task, new: false });
        }
    }
    let mut new: Vec<&Task> = stored.values().filter(|s| s.new).map(|s| &s.task).collect();
    new.sort_by_key(|task| task.id);
    let events: Vec<Event> = new
        .iter()
        .map(|task| {
            Event::task(
                TaskEventKind::TaskCreated,
                Some(task.trace_id.to_string()),
                task,
                None,
            )
        })
        .collect();
    events::record(t.conn(), &events).await?;
    for task in new {
        t.created(task);
    }
    t.commit().await?;
    Ok(stored)
}

/// Whether `caller` may cancel task `id`, in the contract's order: the task exists (404),
/// then the caller is its creator or an admin (403); the actor it cancels as.
pub async fn may_cancel(db: &PgPool, caller: &Principal, id: i32) -> Result<Actor> {
    let task = load(db, id)
        .await?
        .ok_or_else(|| Error::not_found(format!("Task {id} not found")))?;
    if caller.is_admin() {
        Ok(Actor::Admin)
    } else if task.created_by.as_deref() == Some(caller.droplet_id.to_string().as_str()) {
        Ok(Actor::Creator)
    } else {
        Err(Error::forbidden(format!(
            "Only the creator of task {id} or an admin may cancel it"
        )))
    }
}

/// `DELETE /tasks/{id}`: the creator (or an admin) cancels a task that has not started.
pub async fn cancel(
    state: &Tasks,
    caller: &Principal,
    id: i32,
    reason: Option<String>,
) -> Result<Task> {
    let actor = may_cancel(&state.db, caller, id).await?;
    let mut m = Move::new(id, Status::Cancelled, actor, caller.actor_name());
    m.reason = Some(reason.unwrap_or_else(|| format!("cancelled by {}", caller.actor_name())));
    let applied = transition::run(state, &[m], Mode::Strict).await?;
    applied
        .into_iter()
        .next()
        .map(|a| a.task)
        .ok_or_else(|| Error::internal("move applied without a row"))
}
