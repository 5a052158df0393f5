//! Tasks: creation (idempotent by trace id), reading, listing, and the moves callers ask
//! for (PATCH, cancel), all through the state machine.

use std::collections::{HashMap, HashSet};

use chrono::NaiveDateTime;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::identity::Principal;
use crate::protocol;
use crate::services::contracts;
use crate::services::create_queue::NewRow;
use crate::services::error::{Error, Result};
use crate::services::events::{self, Event, TaskEventKind};
use crate::services::shared_commit;
use crate::services::state_machine::{Actor, Mode, Move, Status};
use crate::services::task_store::{self, TASK_COLUMNS_CTE};
pub use crate::services::task_store::{history, load, load_by_trace, HistoryRow, Task};
use crate::services::transition::{self, Transition};
use crate::services::Core;
use crate::validation::FieldError;
use crate::validation::{length, range, Validate};

/// The payload of `POST /tasks` (and of `/message`'s `create_task`).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct NewTask {
    pub task_type: String,
    pub title: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub required_capability: Option<String>,
    #[serde(default)]
    pub priority: Option<i64>,
    #[serde(default)]
    pub max_retries: Option<i64>,
    #[serde(default)]
    pub deadline: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub payload: Option<Value>,
}

impl Validate for NewTask {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        length("task_type", &self.task_type, 1, 50, &mut errors);
        length("title", &self.title, 1, 255, &mut errors);
        if let Some(c) = &self.required_capability {
            length("required_capability", c, 0, 100, &mut errors);
        }
        range("priority", self.priority, 1, 10, &mut errors);
        range("max_retries", self.max_retries, 0, 100, &mut errors);
        if let Some(d) = &self.deadline {
            if protocol::parse_time(d).is_none() {
                errors.push(FieldError::new(
                    &["deadline"],
                    "Input should be a valid datetime (ISO-8601)",
                    "datetime_parsing",
                ));
            }
        }
        if let Some(p) = &self.payload {
            if !p.is_object() && !p.is_null() {
                errors.push(FieldError::new(
                    &["payload"],
                    "Input should be a valid dictionary",
                    "dict_type",
                ));
            }
        }
        errors
    }
}

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
    pub fn of(core: &Core, task: &Task) -> Created {
        let estimate = if core
            .router
            .has_room_for(task.required_capability.as_deref())
        {
            0
        } else {
            core.config().task_router_interval
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

/// The same columns for listings, without `payload` and `result`: a page of large payloads
/// costs neither the database's network nor this process their size. When they are asked
/// for, [`list`] reads their sizes and then only the ones that fit [`LIST_PAYLOAD_BYTES`].
const LIST_COLUMNS: &str = const_format::concatcp!(
    task_store::COLUMNS_HEAD,
    "'null'::jsonb AS payload",
    task_store::COLUMNS_MID,
    "NULL::jsonb AS result",
    task_store::COLUMNS_TAIL
);

/// Inserts a task and its first history row in one statement (public for the benchmark).
pub const INSERT_TASK: &str = const_format::concatcp!(
    "WITH t AS (
        INSERT INTO tasks (trace_id, task_type, title, description, payload, required_capability,
                           priority, max_retries, deadline, created_by, status)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'pending')
        ON CONFLICT (trace_id) DO NOTHING
        RETURNING *
     ), h AS (
        INSERT INTO task_state_history (task_id, from_status, to_status, changed_by, reason)
        SELECT id, NULL, 'pending', $11, 'created' FROM t
     )
     SELECT ",
    TASK_COLUMNS_CTE,
    " FROM t LEFT JOIN droplets d ON d.id = t.assigned_droplet_id"
);

/// The schemas registered droplets with this capability declared for it (`None` for a droplet
/// without one).
pub async fn contracts_for(
    db: &PgPool,
    capability: &str,
) -> Result<Vec<Option<Value>>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT capability_schemas -> $1 FROM droplets
         WHERE registered AND COALESCE(capabilities, '[]'::jsonb) ? $1",
    )
    .bind(capability)
    .fetch_all(db)
    .await
}

/// A payload at least one capable droplet's contract accepts (or a droplet without one), else
/// 422 with one entry per violated rule, located in the payload. The contracts are evaluated
/// off the async workers, within [`contracts::BUDGET`]: over it, a 422 saying so.
async fn check_contracts(
    state: &Core,
    capability: &str,
    payload: &Value,
    payload_loc: &[&str],
) -> Result<()> {
    let schemas = contracts_for(&state.db, capability).await?;
    if schemas.iter().all(Option::is_none) {
        return Ok(());
    }
    let (core, payload) = (state.clone(), payload.clone());
    let check = tokio::task::spawn_blocking(move || {
        contracts::verdict(&core.contracts, &schemas, &payload)
    });
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
    state: &Core,
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
    state: &Core,
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
    let deadline = new
        .deadline
        .as_deref()
        .and_then(protocol::parse_time)
        .map(|d| d.naive_utc());
    let payload = match new.payload {
        Some(Value::Object(m)) => Value::Object(m),
        _ => Value::Object(Default::default()),
    };
    // A retry of a creation (same trace id) gets its task back whatever the contracts say
    // now; only a task that would be new is checked.
    if let Some(capability) = new.required_capability.as_deref().filter(|c| !c.is_empty()) {
        if load_by_trace(&state.db, trace).await?.is_none() {
            check_contracts(state, capability, &payload, payload_loc).await?;
        }
    }
    let inserted = insert(
        state,
        NewRow {
            trace_id: trace,
            task_type: new.task_type,
            title: new.title,
            description: new.description,
            payload,
            required_capability: new.required_capability.filter(|c| !c.is_empty()),
            priority: new.priority.unwrap_or(5) as i32,
            max_retries: new.max_retries.unwrap_or(3) as i32,
            deadline,
            created_by: created_by.clone(),
            changed_by: caller.actor_name(),
        },
    )
    .await?;
    let Some(task) = inserted else {
        let existing = load_by_trace(&state.db, trace)
            .await?
            .ok_or_else(|| Error::conflict(format!("Trace id {trace} is in use")))?;
        if existing.created_by.as_deref() == Some(created_by.as_str()) {
            return Ok((existing, false));
        }
        return Err(Error::conflict(format!(
            "Trace id {trace} was already used by another creator"
        )));
    };
    Ok((task, true))
}

/// Inserts many tasks in one statement, each with its first history row (public for the
/// benchmark). Rows are given as arrays, one element per task; a taken trace id is skipped.
pub const INSERT_TASKS: &str = const_format::concatcp!(
    "WITH input AS (
        SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[],
                             $6::text[], $7::int[], $8::int[], $9::timestamp[], $10::text[],
                             $11::text[])
            WITH ORDINALITY AS i(trace_id, task_type, title, description, payload,
                                 required_capability, priority, max_retries, deadline,
                                 created_by, changed_by, n)
     ), t AS (
        INSERT INTO tasks (trace_id, task_type, title, description, payload, required_capability,
                           priority, max_retries, deadline, created_by, status)
        SELECT trace_id, task_type, title, description, payload, required_capability,
               priority, max_retries, deadline, created_by, 'pending'
        FROM input ORDER BY n
        ON CONFLICT (trace_id) DO NOTHING
        RETURNING *
     ), h AS (
        INSERT INTO task_state_history (task_id, from_status, to_status, changed_by, reason)
        SELECT t.id, NULL, 'pending', input.changed_by, 'created'
        FROM t JOIN input ON input.trace_id = t.trace_id ORDER BY t.id
     )
     SELECT ",
    TASK_COLUMNS_CTE,
    " FROM t LEFT JOIN droplets d ON d.id = t.assigned_droplet_id ORDER BY t.id"
);

/// Inserts a task with its first history row and its `task_created` event, sharing one
/// transaction and one commit with the creations waiting at the same moment. Answers once
/// the row is committed: the task, or `None` when its trace id was taken.
async fn insert(core: &Core, row: NewRow) -> Result<Option<Task>> {
    let answer = core.creates.push(row);
    lead(core);
    match answer.await {
        Ok(inserted) => Ok(inserted?),
        Err(_) => Err(Error::internal("a shared insert ended without an answer")),
    }
}

/// Inserts rows as if their creations came at the same moment: they share one insert and
/// one commit, unless one of them fails it, when each is tried alone. In the order given.
pub async fn insert_all(core: &Core, rows: Vec<NewRow>) -> Vec<Result<Option<Task>>> {
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

/// Becomes a leader of the creations when a place is free (`shared_commit::lead`).
fn lead(core: &Core) {
    shared_commit::lead(
        core,
        |c: &Core| &c.creates,
        |q| q.take(),
        |core, batch| async move {
            shared_commit::write_each(
                &core,
                batch,
                |r| r.trace_id,
                |core, rows| Box::pin(insert_rows(core, rows)),
            )
            .await
        },
    );
}

/// Inserts the rows (the first of each trace id) with their history rows and events, in
/// one transaction through the transition path. Returns the tasks inserted by trace id.
async fn insert_rows(
    core: &Core,
    rows: &[&NewRow],
) -> std::result::Result<HashMap<Uuid, Task>, sqlx::Error> {
    let mut seen = HashSet::with_capacity(rows.len());
    let rows: Vec<&NewRow> = rows
        .iter()
        .copied()
        .filter(|r| seen.insert(r.trace_id))
        .collect();
    let mut t = Transition::begin(core).await?;
    let tasks: Vec<Task> = sqlx::query_as(INSERT_TASKS)
        .bind(rows.iter().map(|r| r.trace_id).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|r| r.task_type.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|r| r.title.as_str()).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|r| r.description.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|r| &r.payload).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|r| r.required_capability.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|r| r.priority).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.max_retries).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.deadline).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|r| r.created_by.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|r| r.changed_by.as_str())
                .collect::<Vec<_>>(),
        )
        .fetch_all(t.conn())
        .await?;
    let events: Vec<Event> = tasks
        .iter()
        .map(|task| {
            Event::task(
                TaskEventKind::TaskCreated,
                Some(task.trace_id.to_string()),
                serde_json::to_value(task).unwrap_or(Value::Null),
                None,
            )
        })
        .collect();
    events::notify(t.conn(), &events).await?;
    for task in &tasks {
        t.created(task);
    }
    t.commit().await?;
    Ok(tasks
        .into_iter()
        .map(|task| (task.trace_id, task))
        .collect())
}

/// Filters of `GET /tasks`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
pub struct TaskFilter {
    pub status: Option<String>,
    pub task_type: Option<String>,
    pub priority_min: Option<i32>,
    pub priority_max: Option<i32>,
    pub assigned_droplet_id: Option<i32>,
    pub required_capability: Option<String>,
    pub created_by: Option<String>,
    pub limit: Option<i64>,
    pub offset: Option<i64>,
    /// Keyset paging: the tasks after this one (the previous page's `next_after_id`).
    pub after_id: Option<i32>,
    /// `payload` to include each task's `payload` and `result` (left out by default).
    pub include: Option<String>,
}

impl TaskFilter {
    pub fn include_payload(&self) -> bool {
        self.include.as_deref().is_some_and(|i| {
            i.split(',')
                .any(|p| matches!(p.trim(), "payload" | "result"))
        })
    }
}

impl Validate for TaskFilter {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if let Some(s) = &self.status {
            if Status::parse(s).is_none() {
                errors.push(FieldError::new(
                    &["status"],
                    "Input should be 'pending', 'assigned', 'in_progress', 'completed', 'failed' or 'cancelled'",
                    "enum",
                ));
            }
        }
        range(
            "priority_min",
            self.priority_min.map(i64::from),
            1,
            10,
            &mut errors,
        );
        range(
            "priority_max",
            self.priority_max.map(i64::from),
            1,
            10,
            &mut errors,
        );
        range("limit", self.limit, 1, 500, &mut errors);
        range("offset", self.offset, 0, i64::MAX, &mut errors);
        range(
            "after_id",
            self.after_id.map(i64::from),
            1,
            i64::from(i32::MAX),
            &mut errors,
        );
        errors
    }
}

pub struct Page {
    pub tasks: Vec<Task>,
    /// The tasks that match the filters: exact for status and type alone, else exact up to
    /// [`TOTAL_BOUND`] and a lower bound past it.
    pub total: i64,
    pub total_exact: bool,
    pub limit: i64,
    pub offset: i64,
    /// Whether more tasks match past this page.
    pub has_more: bool,
    /// With `?include=payload`: for each task, whether its payload and result were read
    /// (false for those past [`LIST_PAYLOAD_BYTES`]). Empty otherwise.
    pub payload_read: Vec<bool>,
}

/// Most bytes of payloads and results one listing carries (`?include=payload`).
pub const LIST_PAYLOAD_BYTES: usize = 2 * 1024 * 1024;

impl Page {
    /// The tasks as a listing shows them: without `payload` and `result` unless asked for,
    /// and then only those read within [`LIST_PAYLOAD_BYTES`] (the others say
    /// `payload_truncated`). Also whether any was truncated.
    pub fn shown(&self) -> (Vec<Value>, bool) {
        let asked = !self.payload_read.is_empty();
        let mut truncated = false;
        let shown = self
            .tasks
            .iter()
            .enumerate()
            .map(|(i, task)| {
                let mut v = serde_json::to_value(task).unwrap_or_default();
                if let Value::Object(map) = &mut v {
                    if !self.payload_read.get(i).copied().unwrap_or(false) {
                        map.remove("payload");
                        map.remove("result");
                        if asked {
                            truncated = true;
                            map.insert("payload_truncated".into(), Value::Bool(true));
                        }
                    }
                }
                v
            })
            .collect();
        (shown, truncated)
    }

    /// The cursor of the next page (`after_id`), when there is one.
    pub fn next_after_id(&self) -> Option<i32> {
        self.tasks.last().map(|t| t.id).filter(|_| self.has_more)
    }

    /// Reads the payloads and results of the page's tasks, in order, while they fit
    /// [`LIST_PAYLOAD_BYTES`] (a task too large is passed over and the next ones still
    /// tried): first their sizes as the database writes them, then only the chosen ones.
    async fn read_payloads(&mut self, db: &PgPool) -> Result<(), sqlx::Error> {
        let ids: Vec<i32> = self.tasks.iter().map(|t| t.id).collect();
        let sizes: Vec<(i32, i64)> = sqlx::query_as(
            "SELECT id, (octet_length(payload::text)
                         + COALESCE(octet_length(result::text), 0))::bigint
               FROM tasks WHERE id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(db)
        .await?;
        let size_of: std::collections::HashMap<i32, i64> = sizes.into_iter().collect();
        let mut budget = LIST_PAYLOAD_BYTES as i64;
        let mut chosen = Vec::new();
        for id in &ids {
            match size_of.get(id) {
                Some(&size) if size <= budget => {
                    budget -= size;
                    chosen.push(*id);
                }
                _ => {}
            }
        }
        let bodies: Vec<(i32, Value, Option<Value>)> =
            sqlx::query_as("SELECT id, payload, result FROM tasks WHERE id = ANY($1)")
                .bind(&chosen)
                .fetch_all(db)
                .await?;
        let mut body_of: std::collections::HashMap<i32, (Value, Option<Value>)> = bodies
            .into_iter()
            .map(|(id, payload, result)| (id, (payload, result)))
            .collect();
        self.payload_read = self
            .tasks
            .iter_mut()
            .map(|task| match body_of.remove(&task.id) {
                Some((payload, result)) => {
                    task.payload = payload;
                    task.result = result;
                    true
                }
                None => false,
            })
            .collect();
        Ok(())
    }
}

/// `total` of a filter on more than status and type is counted exactly up to this many
/// matching tasks; past it, it says "at least" (`total_exact: false`), so a listing costs the
/// same at a million tasks as at a thousand. Filters on status and type alone (and none) are
/// exact at any size: their totals are the counts kept in `task_counts`.
pub const TOTAL_BOUND: i64 = 10_000;

const TASK_FILTER: &str = " WHERE ($1::text IS NULL OR t.status = $1)
      AND ($2::text IS NULL OR t.task_type = $2)
      AND ($3::int IS NULL OR t.priority >= $3)
      AND ($4::int IS NULL OR t.priority <= $4)
      AND ($5::int IS NULL OR t.assigned_droplet_id = (SELECT id FROM droplets WHERE droplet_id = $5))
      AND ($6::text IS NULL OR t.required_capability = $6)
      AND ($7::text IS NULL OR t.created_by = $7)";

/// Newest first, with the total that matches the filters. With `after_id` (keyset paging),
/// the tasks after that one in the same order, whatever its depth.
pub async fn list(db: &PgPool, f: &TaskFilter) -> Result<Page, sqlx::Error> {
    let limit = f.limit.unwrap_or(50);
    let offset = if f.after_id.is_some() {
        0
    } else {
        f.offset.unwrap_or(0)
    };
    let mut tasks: Vec<Task> = sqlx::query_as(const_format::concatcp!(
        "SELECT ",
        LIST_COLUMNS,
        " FROM tasks t LEFT JOIN droplets d ON d.id = t.assigned_droplet_id",
        TASK_FILTER,
        " AND ($10::int IS NULL OR (t.created_at, t.id) <
                (SELECT a.created_at, a.id FROM tasks a WHERE a.id = $10))
         ORDER BY t.created_at DESC, t.id DESC LIMIT $8 + 1 OFFSET $9"
    ))
    .bind(&f.status)
    .bind(&f.task_type)
    .bind(f.priority_min)
    .bind(f.priority_max)
    .bind(f.assigned_droplet_id)
    .bind(&f.required_capability)
    .bind(&f.created_by)
    .bind(limit)
    .bind(offset)
    .bind(f.after_id)
    .fetch_all(db)
    .await?;
    let has_more = tasks.len() as i64 > limit;
    tasks.truncate(limit as usize);
    // The total of the whole filter (not of what follows a cursor): from the counts kept as
    // changes happen when the filter is only status and type, else counted up to a bound.
    let (total, total_exact) = if f.after_id.is_none() && offset == 0 && !has_more {
        (tasks.len() as i64, true)
    } else if f.priority_min.is_none()
        && f.priority_max.is_none()
        && f.assigned_droplet_id.is_none()
        && f.required_capability.is_none()
        && f.created_by.is_none()
    {
        let kept: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(n), 0)::bigint FROM task_counts
             WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR task_type = $2)",
        )
        .bind(&f.status)
        .bind(&f.task_type)
        .fetch_one(db)
        .await?;
        (kept, true)
    } else {
        let counted: i64 = sqlx::query_scalar(const_format::concatcp!(
            "SELECT COUNT(*) FROM (SELECT 1 FROM tasks t",
            TASK_FILTER,
            " LIMIT $8) bounded"
        ))
        .bind(&f.status)
        .bind(&f.task_type)
        .bind(f.priority_min)
        .bind(f.priority_max)
        .bind(f.assigned_droplet_id)
        .bind(&f.required_capability)
        .bind(&f.created_by)
        .bind(TOTAL_BOUND + 1)
        .fetch_one(db)
        .await?;
        if counted > TOTAL_BOUND {
            (TOTAL_BOUND, false)
        } else {
            (counted, true)
        }
    };
    let mut page = Page {
        tasks,
        total,
        total_exact,
        limit,
        offset,
        has_more,
        payload_read: Vec::new(),
    };
    if f.include_payload() {
        page.read_payloads(db).await?;
    }
    Ok(page)
}

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
pub async fn may_update(state: &Core, caller: &Principal, id: i32) -> Result<Task> {
    let task = load(&state.db, id)
        .await?
        .ok_or_else(|| Error::not_found(format!("Task {id} not found")))?;
    if !caller.is_admin() && task.assigned_droplet_id != Some(caller.droplet_id) {
        return Err(Error::forbidden(format!(
            "Task {id} is not assigned to droplet {}",
            caller.droplet_id
        )));
    }
    Ok(task)
}

/// `PATCH /tasks/{id}`: the assigned droplet (or an admin) moves its task.
pub async fn update(state: &Core, caller: &Principal, id: i32, update: TaskUpdate) -> Result<Task> {
    let task = may_update(state, caller, id).await?;
    let to = Status::parse(&update.status)
        .ok_or_else(|| Error::invalid(&["body", "payload", "status"], "unknown status", "enum"))?;
    let mut m = Move::new(id, to, Actor::Admin, caller.actor_name());
    if !caller.is_admin() {
        m.actor = Actor::AssignedDroplet;
        m.expect_droplet = task.assigned_droplet_internal;
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
    let applied = transition::run(state, &[m], Mode::Strict).await?;
    applied
        .into_iter()
        .next()
        .map(|a| a.task)
        .ok_or_else(|| Error::internal("move applied without a row"))
}

/// Whether `caller` may cancel task `id`, in the contract's order: the task exists (404),
/// then the caller is its creator or an admin (403); the actor it cancels as.
pub async fn may_cancel(state: &Core, caller: &Principal, id: i32) -> Result<Actor> {
    let task = load(&state.db, id)
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
    state: &Core,
    caller: &Principal,
    id: i32,
    reason: Option<String>,
) -> Result<Task> {
    let actor = may_cancel(state, caller, id).await?;
    let mut m = Move::new(id, Status::Cancelled, actor, caller.actor_name());
    m.reason = Some(reason.unwrap_or_else(|| format!("cancelled by {}", caller.actor_name())));
    let applied = transition::run(state, &[m], Mode::Strict).await?;
    applied
        .into_iter()
        .next()
        .map(|a| a.task)
        .ok_or_else(|| Error::internal("move applied without a row"))
}
