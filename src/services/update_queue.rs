//! What concurrent PATCHes of tasks share a transaction with (`shared_commit`): the move a
//! PATCH waits with, and its answer (`task_updates::update`), as `create_queue.rs` is for
//! creations.

use crate::services::shared_commit::SharedCommit;
use crate::services::state_machine::{Applied, Move, MoveError};

/// A PATCH's answer: its move applied, or why not (`None` only if the shared write lost it).
pub type Moved = Result<Option<Result<Applied, MoveError>>, sqlx::Error>;
/// PATCHes waiting to share a transaction (one move per task in a batch).
pub type UpdateQueue = SharedCommit<Move, Moved>;
