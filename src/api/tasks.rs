//! Task endpoints: create, list, read with history, PATCH by the assigned droplet, cancel.

use axum::extract::State;
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;
use serde_json::Value;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

use crate::auth::{Caller, Permission};
use crate::error::{ApiError, ApiResult};
use crate::services::explain::Explanation;
use crate::services::status::Status;
use crate::services::task_listing::{self, TaskFilter};
use crate::services::tasks::{self, HistoryRow, NewTask, Task, TaskUpdate};
use crate::state::AppState;
use crate::udc::{PathParam, QueryParams, RawBody, Udc};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/tasks", post(create).get(list))
        .route("/tasks/{task_id}", get(detail).patch(update).delete(cancel))
        .route("/tasks/{task_id}/explain", get(explain))
}

#[utoipa::path(post, path = "/tasks", tag = "tasks", request_body = NewTask, security(("bearer" = [])),
    responses((status = 201, description = "Created"), (status = 200, description = "Already created with this trace id by this creator"),
              (status = 409, description = "Trace id used by another creator"), (status = 422, description = "Validation")))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: RawBody,
) -> ApiResult<Udc<tasks::Created>> {
    caller.require(Permission::Write)?;
    let body = body.envelope::<NewTask>()?;
    let parts = state.tasks();
    let (task, new) = tasks::create(&parts, &caller, &body.meta.trace_id, body.payload).await?;
    let payload = tasks::Created::of(&parts, &task);
    Ok(if new {
        Udc::created(payload)
    } else {
        Udc::ok(payload)
    })
}

/// What `GET /tasks` answers.
#[derive(Serialize, ToSchema)]
pub struct Listing {
    /// Newest first, each a `Task` without `payload` and `result` unless asked for
    /// (`include=payload`), and then without them past the answer's budget
    /// (`payload_truncated: true` on the task).
    #[schema(value_type = Vec<ListedTask>)]
    pub tasks: Vec<Value>,
    pub payload_truncated: bool,
    /// Exact, or a lower bound when `total_exact` is false.
    pub total: i64,
    pub total_exact: bool,
    /// The cursor of the next page (`after_id`), when there is one.
    pub next_after_id: Option<i32>,
    pub limit: i64,
    pub offset: i64,
    pub has_more: bool,
}

/// A task as `GET /tasks` lists it: the `Task` schema, derived from it (so a field added to
/// `Task` is listed too), with `payload` and `result` optional and `payload_truncated`.
pub struct ListedTask;

impl PartialSchema for ListedTask {
    fn schema() -> RefOr<Schema> {
        let mut schema = Task::schema();
        if let RefOr::T(Schema::Object(task)) = &mut schema {
            task.required.retain(|r| r != "payload" && r != "result");
            task.properties.insert(
                "payload_truncated".into(),
                ObjectBuilder::new()
                    .schema_type(Type::Boolean)
                    .description(Some(
                        "Present (true) when `include=payload` was asked for and this task's \
                         payload and result were left out for the answer's size",
                    ))
                    .into(),
            );
            task.description = Some(
                "A task as `GET /tasks` lists it: `payload` and `result` only with `include=payload`."
                    .into(),
            );
        }
        schema
    }
}

impl ToSchema for ListedTask {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        <Task as ToSchema>::schemas(schemas);
    }
}

#[utoipa::path(get, path = "/tasks", tag = "tasks", operation_id = "tasks_list", params(TaskFilter), security(("bearer" = [])),
    responses((status = 200, description = "Tasks, newest first", body = Listing), (status = 422, description = "Bad filter")))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(filter): QueryParams<TaskFilter>,
) -> ApiResult<Udc<Listing>> {
    caller.require_task_read(filter.assigned_droplet_id)?;
    let page = task_listing::list(&state.db, &filter).await?;
    let (listed, truncated) = page.shown();
    Ok(Udc::ok(Listing {
        tasks: listed,
        payload_truncated: truncated,
        total: page.total,
        total_exact: page.total_exact,
        next_after_id: page.next_after_id(),
        limit: page.limit,
        offset: page.offset,
        has_more: page.has_more,
    }))
}

/// What `GET /tasks/{id}` answers.
#[derive(Serialize, ToSchema)]
pub struct TaskDetail {
    pub task: TaskWithHistory,
}

/// A task with its state history, oldest first.
#[derive(Serialize, ToSchema)]
pub struct TaskWithHistory {
    #[serde(flatten)]
    pub task: Task,
    pub state_history: Vec<HistoryRow>,
}

#[utoipa::path(get, path = "/tasks/{task_id}", tag = "tasks", operation_id = "tasks_detail", security(("bearer" = [])),
    params(("task_id" = i32, Path, description = "Task id")),
    responses((status = 200, description = "The task with its state history", body = TaskDetail), (status = 404, description = "Unknown task")))]
pub async fn detail(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(task_id): PathParam<i32>,
) -> ApiResult<Udc<TaskDetail>> {
    // Before the task is read, a token that may read no task at all is refused.
    caller.require_task_read(Some(caller.droplet_id))?;
    let task = tasks::load(&state.db, task_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Task {task_id} not found")))?;
    caller.require_task_read(task.assigned_droplet_id)?;
    let state_history = tasks::history(&state.db, task_id).await?;
    Ok(Udc::ok(TaskDetail {
        task: TaskWithHistory {
            task,
            state_history,
        },
    }))
}

/// Why a task is waiting (a pending task's reason and every capable droplet's state) or, for
/// any other task, the assignment decisions of each attempt and the time in each state.
#[utoipa::path(get, path = "/tasks/{task_id}/explain", tag = "tasks", security(("bearer" = [])),
    params(("task_id" = i32, Path, description = "Task id")),
    responses((status = 200, description = "For a waiting task: reason (no_capable_droplet, capable_droplets_inactive, capable_droplets_full, payload_rejected_by_contracts, waiting_for_retry with retry_at, routing_paused, emergency_stop, queued_behind with position) and candidates with why_not; always: attempts and time_in_state_seconds", body = Explanation),
               (status = 404, description = "Unknown task")))]
pub async fn explain(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(task_id): PathParam<i32>,
) -> ApiResult<Udc<Explanation>> {
    caller.require(Permission::Read)?;
    let answer = crate::services::explain::explain(state.explainer(), task_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Task {task_id} not found")))?;
    Ok(Udc::ok(answer))
}

/// What `PATCH /tasks/{task_id}` answers: the task's state after the update.
#[derive(Debug, Serialize, ToSchema)]
pub struct Updated {
    pub task_id: i32,
    pub status: Status,
    pub attempt: i32,
    #[schema(format = DateTime)]
    pub started_at: Option<String>,
    #[schema(format = DateTime)]
    pub completed_at: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    pub error_message: Option<String>,
    #[schema(format = DateTime)]
    pub updated_at: String,
}

/// What `DELETE /tasks/{task_id}` answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct Cancelled {
    pub task_id: i32,
    pub status: Status,
    #[schema(format = DateTime)]
    pub cancelled_at: Option<String>,
}

#[utoipa::path(patch, path = "/tasks/{task_id}", tag = "tasks", request_body = TaskUpdate, security(("bearer" = [])),
    params(("task_id" = i32, Path, description = "Task id")),
    responses((status = 200, description = "Updated", body = Updated), (status = 403, description = "Not the assigned droplet, or a read-only token (a token with no `permissions` claim may PATCH its own tasks)"), (status = 404, description = "Unknown task"), (status = 409, description = "Invalid transition, or `attempt` is not the task's current attempt: `Task 7 is on attempt 3; this update is for attempt 2` (nothing changes)")))]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(task_id): PathParam<i32>,
    body: RawBody,
) -> ApiResult<Udc<Updated>> {
    // The assigned droplet's own token may have no `permissions` claim (as the Registry
    // issues them); `may_update` confines it to its own tasks. A read-only token may not.
    caller.require_droplet_write()?;
    let body = match body.envelope::<TaskUpdate>() {
        Ok(body) => body,
        // The contract's order: an unknown task (404) or another's (403) before a bad body.
        Err(invalid) => {
            tasks::may_update(&state.db, &caller, task_id).await?;
            return Err(invalid);
        }
    };
    let task = tasks::update(&state.tasks(), &caller, task_id, body.payload).await?;
    Ok(Udc::ok(Updated {
        task_id: task.id,
        status: task.status,
        attempt: task.attempt,
        started_at: task.started_at.map(|t| crate::udc::iso(&t)),
        completed_at: task.completed_at.map(|t| crate::udc::iso(&t)),
        updated_at: crate::udc::iso(&task.updated_at),
        result: task.result,
        error_message: task.error_message,
    }))
}

#[utoipa::path(delete, path = "/tasks/{task_id}", tag = "tasks", security(("bearer" = [])),
    params(("task_id" = i32, Path, description = "Task id")),
    responses((status = 200, description = "Cancelled", body = Cancelled), (status = 403, description = "Not the creator"), (status = 404, description = "Unknown task"), (status = 409, description = "Already finished or running")))]
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(task_id): PathParam<i32>,
    body: RawBody,
) -> ApiResult<Udc<Cancelled>> {
    caller.require(Permission::Write)?;
    let body = match body.optional_envelope() {
        Ok(body) => body,
        // The contract's order: an unknown task (404) or another's (403) before a bad body.
        Err(invalid) => {
            tasks::may_cancel(&state.db, &caller, task_id).await?;
            return Err(invalid);
        }
    };
    let reason = body.and_then(|e| {
        e.payload
            .get("reason")
            .and_then(|r| r.as_str())
            .map(str::to_string)
    });
    let task = tasks::cancel(&state.tasks(), &caller, task_id, reason).await?;
    Ok(Udc::ok(Cancelled {
        task_id: task.id,
        status: task.status,
        cancelled_at: task.completed_at.map(|t| crate::udc::iso(&t)),
    }))
}
