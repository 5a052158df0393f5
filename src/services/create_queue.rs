//! What concurrent creations share a transaction with (`shared_commit`): the row a creation
//! waits with, and its answer (`tasks::insert`).

use uuid::Uuid;

use crate::services::new_task::NewTask;
use crate::services::shared_commit::SharedCommit;
use crate::services::task_store::Task;

/// A task to insert, as `POST /tasks` (or `/message`'s `create_task`) gave it, with what the
/// creation adds (its trace id, its creator, the first history row's `changed_by`).
#[derive(Debug, Clone)]
pub struct NewRow {
    pub trace_id: Uuid,
    pub created_by: String,
    /// `changed_by` of the first history row.
    pub changed_by: String,
    /// The creator's task, checked and [settled](NewTask::settled).
    pub task: NewTask,
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
