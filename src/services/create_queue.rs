//! Concurrent creations share a transaction: a creation waits here with its row, and one of a
//! few leaders takes every row waiting and inserts them in one statement and one commit
//! (`tasks::insert`). Each creation still answers only after its own row is committed.

use std::sync::{Arc, Mutex};

use chrono::NaiveDateTime;
use serde_json::Value;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use crate::services::task_store::Task;

/// Most rows one shared insert takes.
pub const MAX_BATCH: usize = 256;

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
    /// `changed_by` of the first history row.
    pub changed_by: String,
}

/// The task inserted, or `None` when the trace id was taken (a retry, or another creator's).
pub type Inserted = Result<Option<Task>, sqlx::Error>;

pub struct Waiting {
    pub row: NewRow,
    pub reply: oneshot::Sender<Inserted>,
}

pub struct CreateQueue {
    waiting: Mutex<Vec<Waiting>>,
    leaders: Arc<Semaphore>,
}

impl CreateQueue {
    /// `leaders`: how many shared inserts may run at once.
    pub fn new(leaders: usize) -> CreateQueue {
        CreateQueue {
            waiting: Mutex::new(Vec::new()),
            leaders: Arc::new(Semaphore::new(leaders.max(1))),
        }
    }

    pub fn push(&self, row: NewRow) -> oneshot::Receiver<Inserted> {
        let (reply, answer) = oneshot::channel();
        self.lock().push(Waiting { row, reply });
        answer
    }

    /// Up to [`MAX_BATCH`] rows, oldest first.
    pub fn take(&self) -> Vec<Waiting> {
        let mut waiting = self.lock();
        let n = waiting.len().min(MAX_BATCH);
        waiting.drain(..n).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// A leader's place, when one is free.
    pub fn try_lead(&self) -> Option<OwnedSemaphorePermit> {
        self.leaders.clone().try_acquire_owned().ok()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Waiting>> {
        match self.waiting.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}
