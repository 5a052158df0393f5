//! Task rows as every answer and event shows them: the columns (droplet ids external), one
//! task by id or trace id, and its history. Read by creation, moves, dispatch and explain;
//! writes go through the transition path (`transition.rs`).

use chrono::NaiveDateTime;
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::protocol;
use crate::services::status::Status;

/// The task columns as the API shows them, from a row aliased `t` joined with droplets `d`,
/// declared once (see `sql_columns.rs`): calls `$m!` (a path: `sqlx::query_as`) with
/// `$before`, the columns as `+`-joined literals carrying the query macros' overrides, then
/// `$after`. `payload` and `result` are the task's unless given as `("<sql> AS payload",
/// "<sql> AS result")` (the listing reads them apart). For a plain `SELECT` see
/// [`select_task!`]; a statement of its own (a CTE aliased `t`) writes, for example,
/// `task_columns!(sqlx::query_as { Task, "WITH t AS (...) SELECT " + } { + " FROM t LEFT JOIN
/// droplets d ON d.id = t.assigned_droplet_id", args })` (the transition's `UPDATE`), and one
/// that reads more than the task calls `sqlx::query` the same way and takes the task out of
/// each record with [`task_of!`] (the shared creation insert). Arguments go through as tokens,
/// so `&v as _` reaches the query macro as written.
macro_rules! task_columns {
    ($($m:ident)::+ { $($before:tt)* } { $($after:tt)* }) => {
        $crate::services::task_store::task_columns!($($m)::+ { $($before)* }
            ("t.payload AS \"payload!\"", "t.result") { $($after)* })
    };
    ($($m:ident)::+ { $($before:tt)* } ($payload:literal, $result:literal) { $($after:tt)* }) => {
        $($m)::+!($($before)*
            "t.id AS \"id!\", t.trace_id AS \"trace_id!\", t.task_type AS \"task_type!\", \
             t.title AS \"title!\", t.description, "
            + $payload
            + ", t.required_capability, d.droplet_id AS \"assigned_droplet_id?\", \
             d.name AS \"assigned_droplet_name?\", d.endpoint AS \"assigned_droplet_endpoint?\", \
             t.assigned_droplet_id AS assigned_droplet_internal, \
             d.id_form AS \"assigned_droplet_id_form?\", \
             COALESCE(d.refused_deliveries > 0 OR d.failed_deliveries > 0, FALSE) \
                 AS \"assigned_droplet_refusing!\", \
             t.last_droplet_id, t.status AS \"status!: crate::services::status::Status\", \
             COALESCE(t.priority, 5) AS \"priority!\", \
             COALESCE(t.created_at, NOW()::timestamp) AS \"created_at!\", t.assigned_at, \
             t.started_at, t.completed_at, t.deadline, "
            + $result
            + ", t.error_message, COALESCE(t.retry_count, 0) AS \"retry_count!\", \
             COALESCE(t.max_retries, 3) AS \"max_retries!\", t.created_by, t.concurrency_key, \
             t.fairness_key AS \"fairness_key!\", t.attempt AS \"attempt!\", \
             COALESCE(t.updated_at, t.created_at, NOW()::timestamp) AS \"updated_at!\""
            $($after)*)
    };
}
pub(crate) use task_columns;

/// `sqlx::query_as!(Task, "SELECT <task columns> FROM tasks t LEFT JOIN droplets d ON
/// d.id = t.assigned_droplet_id" + $tail, args...)`: a task read by a condition on `t`.
macro_rules! select_task {
    ($tail:literal $(, $arg:expr)* $(,)?) => {
        $crate::services::task_store::task_columns!(sqlx::query_as {
            crate::services::task_store::Task, "SELECT " +
        } {
            + " FROM tasks t LEFT JOIN droplets d ON d.id = t.assigned_droplet_id" + $tail
            $(, $arg)*
        })
    };
}
pub(crate) use select_task;

/// The [`Task`] of a record read by `task_columns!(sqlx::query { ... } { ... })`, a statement
/// that reads more than the task (its fields moved out; its other fields stay), as
/// `droplet_of!` does for a droplet.
macro_rules! task_of {
    ($r:ident) => {
        $crate::services::task_store::Task {
            id: $r.id,
            trace_id: $r.trace_id,
            task_type: $r.task_type,
            title: $r.title,
            description: $r.description,
            payload: $r.payload,
            required_capability: $r.required_capability,
            assigned_droplet_id: $r.assigned_droplet_id,
            assigned_droplet_name: $r.assigned_droplet_name,
            assigned_droplet_endpoint: $r.assigned_droplet_endpoint,
            assigned_droplet_internal: $r.assigned_droplet_internal,
            assigned_droplet_id_form: $r.assigned_droplet_id_form,
            assigned_droplet_refusing: $r.assigned_droplet_refusing,
            last_droplet_id: $r.last_droplet_id,
            status: $r.status,
            priority: $r.priority,
            created_at: $r.created_at,
            assigned_at: $r.assigned_at,
            started_at: $r.started_at,
            completed_at: $r.completed_at,
            deadline: $r.deadline,
            result: $r.result,
            error_message: $r.error_message,
            retry_count: $r.retry_count,
            max_retries: $r.max_retries,
            created_by: $r.created_by,
            concurrency_key: $r.concurrency_key,
            fairness_key: $r.fairness_key,
            attempt: $r.attempt,
            updated_at: $r.updated_at,
        }
    };
}
pub(crate) use task_of;

/// A task as every API answer and event shows it; droplet ids are the external ones.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Task {
    pub id: i32,
    pub trace_id: Uuid,
    pub task_type: String,
    pub title: String,
    pub description: Option<String>,
    #[schema(value_type = Object)]
    pub payload: Value,
    pub required_capability: Option<String>,
    pub assigned_droplet_id: Option<i32>,
    pub assigned_droplet_name: Option<String>,
    #[serde(skip)]
    pub assigned_droplet_endpoint: Option<String>,
    #[serde(skip)]
    pub assigned_droplet_internal: Option<i32>,
    /// How the assigned droplet writes ids in its envelopes (`int`, `string`, unknown).
    #[serde(skip)]
    pub assigned_droplet_id_form: Option<String>,
    /// Whether the assigned droplet had refusals counted when the row was read: its next
    /// accepted delivery resets the count (dispatch).
    #[serde(skip)]
    #[sqlx(default)]
    pub assigned_droplet_refusing: bool,
    #[serde(skip)]
    pub last_droplet_id: Option<i32>,
    pub status: Status,
    pub priority: i32,
    #[serde(serialize_with = "protocol::ts")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: NaiveDateTime,
    #[serde(serialize_with = "protocol::ts_opt")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub assigned_at: Option<NaiveDateTime>,
    #[serde(serialize_with = "protocol::ts_opt")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub started_at: Option<NaiveDateTime>,
    #[serde(serialize_with = "protocol::ts_opt")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub completed_at: Option<NaiveDateTime>,
    #[serde(serialize_with = "protocol::ts_opt")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub deadline: Option<NaiveDateTime>,
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    pub error_message: Option<String>,
    pub retry_count: i32,
    pub max_retries: i32,
    pub created_by: Option<String>,
    /// The key its creator gave for fair share and limits (`POST /tasks`), if any.
    pub concurrency_key: Option<String>,
    /// The key the router shares by: `concurrency_key`, else `creator:<created_by>`.
    pub fairness_key: String,
    /// Which assignment the task is on: 0 while never assigned, then 1, 2, ...
    pub attempt: i32,
    #[serde(serialize_with = "protocol::ts")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: NaiveDateTime,
}

impl Task {
    pub fn status(&self) -> Option<Status> {
        Some(self.status)
    }
}

/// One row of a task's history, oldest first.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct HistoryRow {
    pub from_status: Option<String>,
    pub to_status: String,
    pub changed_by: Option<String>,
    pub reason: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    /// The attempt the task was on after this change.
    pub attempt: i32,
    #[serde(serialize_with = "protocol::ts")]
    #[schema(value_type = String, format = DateTime)]
    pub changed_at: NaiveDateTime,
}

pub async fn load(db: &PgPool, id: i32) -> Result<Option<Task>, sqlx::Error> {
    select_task!(" WHERE t.id = $1", id)
        .fetch_optional(db)
        .await
}

pub async fn load_by_trace(db: &PgPool, trace_id: Uuid) -> Result<Option<Task>, sqlx::Error> {
    select_task!(" WHERE t.trace_id = $1", trace_id)
        .fetch_optional(db)
        .await
}

pub async fn history(db: &PgPool, id: i32) -> Result<Vec<HistoryRow>, sqlx::Error> {
    sqlx::query_as!(
        HistoryRow,
        r#"SELECT from_status, to_status, changed_by, reason, metadata, attempt,
                COALESCE(changed_at, NOW()::timestamp) AS "changed_at!"
         FROM task_state_history WHERE task_id = $1 ORDER BY id"#,
        id
    )
    .fetch_all(db)
    .await
}
