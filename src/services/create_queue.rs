//! What concurrent creations share a transaction with (`shared_commit`): the row a creation
//! waits with, and its answer (`tasks::insert`).

use chrono::NaiveDateTime;
use serde_json::Value;
use uuid::Uuid;

use crate::services::shared_commit::SharedCommit;
use crate::services::task_store::Task;

/// A task to insert, as `POST /tasks` (or `/message`'s `create_task`) gave it.
#[derive(Debug, Clone)]
pub struct NewRow {
    pub trace_id: Uuid,
    pub task_type: String,
    pub title: String,
    pub description: Option<String>,
    pub payload: Value,
    pub required_capability: Option<String>,
    pub priority: i32,
    pub max_retries: i32,
    pub deadline: Option<NaiveDateTime>,
    pub created_by: String,
    /// The key for fair share and limits, when the creator gave one.
    pub concurrency_key: Option<String>,
    /// `changed_by` of the first history row.
    pub changed_by: String,
}

/// The task of a creation's trace id: inserted by it, or found (a retry, or another
/// creator's trace id).
#[derive(Debug, Clone)]
pub struct Stored {
    pub task: Task,
    /// Whether this creation inserted it.
    pub new: bool,
}

/// The task of the trace id (`None` only if it could be neither inserted nor found).
pub type Inserted = Result<Option<Stored>, sqlx::Error>;

/// Creations waiting to share an insert.
pub type CreateQueue = SharedCommit<NewRow, Inserted>;
