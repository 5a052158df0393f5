//! The task state machine: which moves exist and who may make them (a pure function), and
//! the one database function that applies moves under row locks with their history rows and
//! events in the same transaction. Nothing else writes `tasks.status`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::Value;
use sqlx::PgConnection;

use crate::services::events::{self, Event, TaskEventKind};
use crate::services::task_store::{task_columns, Task};

pub use crate::services::status::{Status, ALL_STATUSES};

/// Who asks for a move, as the state machine sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Actor {
    /// The router, recovery, retries, timeouts and deadlines.
    System,
    /// The droplet the task is assigned to.
    AssignedDroplet,
    /// The droplet that created the task.
    Creator,
    Admin,
    /// Any other droplet.
    Other,
}

/// Why a move happens, which decides the event and whether it counts as a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Normal,
    /// assigned -> pending: droplet lost or not started in time (not a retry).
    Requeue,
    /// failed -> pending: another attempt (retry_count + 1).
    Retry,
    /// -> failed because the deadline passed (final).
    Deadline,
    /// in_progress -> failed because the droplet was lost.
    DropletLost,
    /// assigned -> pending (retry_count + 1) or, with no retries left, -> failed: the droplet
    /// refused the delivery.
    Refused,
    /// assigned -> pending (not a retry): the droplet refused the orchestrator's credentials
    /// (HTTP 401/403), a configuration fault rather than the task's.
    RefusedCredentials,
    /// assigned -> failed: not started in time once more than `MAX_REQUEUES` allow (the
    /// retry rules then apply as for any failure).
    NeverStarted,
    /// assigned or in_progress -> pending (not a retry): the droplet's drain reached its
    /// deadline, and what it still held goes to another droplet on a new attempt.
    Drained,
}

/// The contract's table: may `actor` move a task from `from` to `to` (for `cause`)?
pub fn allowed(from: Status, to: Status, actor: Actor, cause: Cause) -> bool {
    use Actor::*;
    use Status::*;
    let droplet_or_admin = matches!(actor, AssignedDroplet | Admin);
    match (from, to) {
        (Pending, Assigned) => actor == System && cause == Cause::Normal,
        (Pending, Cancelled) | (Assigned, Cancelled) => matches!(actor, Creator | Admin),
        (Assigned, InProgress) => droplet_or_admin && cause == Cause::Normal,
        (InProgress, Completed) => droplet_or_admin && cause == Cause::Normal,
        (InProgress, Failed) => match cause {
            Cause::Normal => droplet_or_admin,
            Cause::DropletLost | Cause::Deadline => actor == System,
            _ => false,
        },
        (Assigned, Pending) => {
            actor == System
                && matches!(
                    cause,
                    Cause::Requeue | Cause::Refused | Cause::RefusedCredentials | Cause::Drained
                )
        }
        (InProgress, Pending) => actor == System && cause == Cause::Drained,
        (Failed, Pending) => actor == System && cause == Cause::Retry,
        (Pending, Failed) => actor == System && cause == Cause::Deadline,
        (Assigned, Failed) => {
            actor == System
                && matches!(
                    cause,
                    Cause::Deadline | Cause::Refused | Cause::NeverStarted
                )
        }
        _ => false,
    }
}

/// The event a move emits.
pub fn event_for(from: Option<Status>, to: Status) -> TaskEventKind {
    match (from, to) {
        (None, _) => TaskEventKind::TaskCreated,
        (Some(Status::Assigned | Status::InProgress), Status::Pending) => {
            TaskEventKind::TaskRequeued
        }
        (Some(_), Status::Pending) => TaskEventKind::TaskRetrying,
        (_, Status::Assigned) => TaskEventKind::TaskAssigned,
        (_, Status::InProgress) => TaskEventKind::TaskStarted,
        (_, Status::Completed) => TaskEventKind::TaskCompleted,
        (_, Status::Failed) => TaskEventKind::TaskFailed,
        (_, Status::Cancelled) => TaskEventKind::TaskCancelled,
    }
}

/// One requested move.
#[derive(Debug, Clone)]
pub struct Move {
    pub task_id: i32,
    pub to: Status,
    pub actor: Actor,
    pub cause: Cause,
    /// `changed_by` in the history: `task_router`, `system`, `droplet-8`, `admin-1`.
    pub changed_by: String,
    pub reason: Option<String>,
    /// The history row's metadata; shared, as the router gives the same "why" to the event.
    pub metadata: Option<Arc<Value>>,
    /// For `-> assigned`: the droplet (internal id).
    pub assign_to: Option<i32>,
    pub result: Option<Value>,
    pub error_message: Option<String>,
    /// The move holds only if the task is still assigned to this droplet (internal id),
    /// checked under the row lock: a droplet's late PATCH after its task moved away is a 403.
    pub expect_droplet: Option<i32>,
    /// The move holds only if the task is assigned to this droplet, given by its own (external)
    /// id, checked under the row lock: a droplet's PATCH, which needs no read before it.
    pub expect_assignee: Option<i32>,
    /// The move holds only if the task is still in this state (checked under the lock).
    pub expect_status: Option<Status>,
    /// The move holds only if the task is still on this attempt (fencing; checked under the lock).
    pub expect_attempt: Option<i32>,
    /// Extra fields for the event's payload (e.g. why a droplet was chosen).
    pub event_extra: Option<Arc<Value>>,
}

impl Move {
    pub fn new(task_id: i32, to: Status, actor: Actor, changed_by: impl Into<String>) -> Move {
        Move {
            task_id,
            to,
            actor,
            cause: Cause::Normal,
            changed_by: changed_by.into(),
            reason: None,
            metadata: None,
            assign_to: None,
            result: None,
            error_message: None,
            expect_droplet: None,
            expect_assignee: None,
            expect_status: None,
            expect_attempt: None,
            event_extra: None,
        }
    }
}

/// A move that was applied: the task as it is now, and where it came from.
#[derive(Debug, Clone)]
pub struct Applied {
    pub task: Task,
    pub from: Status,
    pub to: Status,
    /// The droplet (internal id) that held the task before, when the move took it away.
    pub previous_droplet: Option<i32>,
    /// The droplet (internal id) the task was assigned to before the move, whatever the move.
    pub held_droplet: Option<i32>,
}

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("Task {0} not found")]
    NotFound(i32),
    #[error("Task {0} is not assigned to this droplet")]
    NotYours(i32),
    #[error("Invalid transition {0} -> {1}")]
    Invalid(&'static str, &'static str),
    #[error("Task {task} is on attempt {current}; this update is for attempt {given}")]
    StaleAttempt { task: i32, current: i32, given: i32 },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// All-or-nothing (an API call), keep-what-is-valid (the jobs), or keep what is valid and
/// free (a routing pass).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Strict,
    SkipInvalid,
    /// As `SkipInvalid`, and a row another transaction holds (another replica's pass, a
    /// cancel or a start in flight) is left out, never waited for (`FOR UPDATE SKIP LOCKED`):
    /// its move is refused as not found. Moves that expect their task pending and nothing
    /// else (a routing pass's) are locked by the update's statement itself, and one whose
    /// task is no longer pending is refused as not found too.
    SkipHeld,
}

/// The lock of the moves' rows, with what their checks read; `$lock` is the locking clause.
/// The arrays are read through `(SELECT $n)`: PostgreSQL then plans the statement once per
/// connection (a generic plan) instead of at every execution. Given as constants, an array
/// of one id looks cheaper than the generic plan's guess of ten, so PostgreSQL kept planning
/// the lock again for each move (8,948 of 9,612 executions in a 300 tasks/s run,
/// `pg_prepared_statements`); through the subquery the plan guesses ten and the generic one
/// is kept after five. The plan is the same: the primary key's index for the listed ids.
macro_rules! lock_rows {
    ($lock:literal, $ids:expr) => {
        sqlx::query_as!(
            Locked,
            "SELECT id, status, assigned_droplet_id, attempt,
                    CASE WHEN assigned_droplet_id IS NOT NULL
                         THEN (SELECT d.droplet_id FROM droplets d WHERE d.id = tasks.assigned_droplet_id)
                    END AS assignee
             FROM tasks
             WHERE id = ANY((SELECT $1::int[])::int[]) ORDER BY id "
                + $lock,
            $ids
        )
    };
}

struct Locked {
    id: i32,
    status: String,
    assigned_droplet_id: Option<i32>,
    /// The assigned droplet's own (external) id.
    assignee: Option<i32>,
    attempt: i32,
}

/// A move that passed its checks: the state it leaves and the droplet that held the task.
type Checked = Result<(Status, Option<i32>), MoveError>;

/// Applies moves inside the caller's transaction: locks the rows (`FOR UPDATE`), checks each
/// move, updates the rows, writes one history row and one event per move. In `Strict` mode
/// the first bad move fails the call before anything is written (the caller rolls back); in
/// `SkipInvalid` mode bad moves are left out.
pub async fn apply(
    conn: &mut PgConnection,
    moves: &[Move],
    mode: Mode,
) -> Result<Vec<Applied>, MoveError> {
    let moves: Vec<&Move> = moves.iter().collect();
    // A routing pass's moves (each from pending, expecting nothing else of its row) are
    // checked here and locked by the update's own statement, which leaves out a row held
    // elsewhere or no longer pending: one statement and round trip fewer per pass.
    let from_pending = mode == Mode::SkipHeld && moves.iter().all(|m| from_pending_only(m));
    let mut checks = if from_pending {
        check_from_pending(&moves)
    } else {
        lock_and_check(conn, &moves, mode == Mode::SkipHeld).await?
    };
    if mode == Mode::Strict {
        // The first refusal fails the call, before anything is written.
        checks = checks
            .into_iter()
            .collect::<Result<Vec<_>, MoveError>>()?
            .into_iter()
            .map(Ok)
            .collect();
    }
    let outcomes = write(conn, &moves, checks, from_pending).await?;
    Ok(outcomes.into_iter().filter_map(Result::ok).collect())
}

/// Applies every move that may happen, as [`apply`] in `SkipInvalid` mode, and says of each
/// move, in their order, whether it was applied or why not: moves of unrelated callers
/// sharing one transaction (`task_updates`), each answered on its own. Only the database's
/// failure fails the call.
pub async fn apply_each(
    conn: &mut PgConnection,
    moves: &[&Move],
) -> Result<Vec<Result<Applied, MoveError>>, sqlx::Error> {
    let checks = lock_and_check(conn, moves, false).await?;
    write(conn, moves, checks, false).await
}

/// Whether a move expects its task pending and nothing else of its row (a routing pass's):
/// its check needs no read, and a pending task holds no droplet.
fn from_pending_only(m: &Move) -> bool {
    m.expect_status == Some(Status::Pending)
        && m.expect_droplet.is_none()
        && m.expect_assignee.is_none()
        && m.expect_attempt.is_none()
}

/// The checks of moves from pending, made without their rows (`from_pending_only`): the
/// update's statement applies each only to a row it locks still pending.
fn check_from_pending(moves: &[&Move]) -> Vec<Checked> {
    let mut seen = HashSet::new();
    moves
        .iter()
        .map(|m| {
            check_move(m, Status::Pending, &mut seen)?;
            Ok((Status::Pending, None))
        })
        .collect()
}

/// A move's own rule, from the state `from`: the table allows it, a move to assigned names
/// its droplet, and a task moves once per call (a second move would be checked against a
/// stale state). `seen` holds the tasks already moved in this call.
fn check_move(m: &Move, from: Status, seen: &mut HashSet<i32>) -> Result<(), MoveError> {
    let valid = m.expect_status.is_none_or(|s| s == from)
        && allowed(from, m.to, m.actor, m.cause)
        && (m.to != Status::Assigned || m.assign_to.is_some())
        && seen.insert(m.task_id);
    if valid {
        Ok(())
    } else {
        Err(MoveError::Invalid(from.as_str(), m.to.as_str()))
    }
}

/// Locks the moves' rows and checks each move against its row, in the moves' order: whether
/// it may happen, and from which state. A second move of one task is refused (it would be
/// checked against a stale state). With `skip_held`, a row another transaction holds is not
/// waited for: its move is refused as not found.
async fn lock_and_check(
    conn: &mut PgConnection,
    moves: &[&Move],
    skip_held: bool,
) -> Result<Vec<Checked>, sqlx::Error> {
    if moves.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids: Vec<i32> = moves.iter().map(|m| m.task_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let locked = if skip_held {
        lock_rows!("FOR UPDATE SKIP LOCKED", &ids)
            .fetch_all(&mut *conn)
            .await?
    } else {
        lock_rows!("FOR UPDATE", &ids).fetch_all(&mut *conn).await?
    };
    let rows: HashMap<i32, &Locked> = locked.iter().map(|l| (l.id, l)).collect();

    let mut seen = HashSet::new();
    let checks = moves
        .iter()
        .map(|m| {
            let row = rows.get(&m.task_id).ok_or(MoveError::NotFound(m.task_id))?;
            let from = Status::parse(&row.status).ok_or(MoveError::NotFound(m.task_id))?;
            // Whose task it is before which attempt: a droplet's late PATCH after its task
            // went to another droplet is refused as not its own (403), as the contract
            // orders it.
            let not_held = |d: Option<i32>, held: Option<i32>| d.is_some() && held != d;
            if not_held(m.expect_droplet, row.assigned_droplet_id)
                || not_held(m.expect_assignee, row.assignee)
            {
                return Err(MoveError::NotYours(m.task_id));
            }
            if let Some(given) = m.expect_attempt {
                if given != row.attempt {
                    return Err(MoveError::StaleAttempt {
                        task: m.task_id,
                        current: row.attempt,
                        given,
                    });
                }
            }
            check_move(m, from, &mut seen)?;
            Ok((from, row.assigned_droplet_id))
        })
        .collect();
    Ok(checks)
}

/// Writes the moves whose check passed (one statement updating the rows and adding their
/// history, one events insert, for them all) and gives each move's outcome, in their order.
/// With `lock_pending`, the statement locks the rows itself, skipping those held elsewhere or
/// no longer in their move's starting state: their moves are refused as not found.
async fn write(
    conn: &mut PgConnection,
    moves: &[&Move],
    checks: Vec<Checked>,
    lock_pending: bool,
) -> Result<Vec<Result<Applied, MoveError>>, sqlx::Error> {
    let accepted: Vec<(&Move, Status, Option<i32>)> = moves
        .iter()
        .zip(&checks)
        .filter_map(|(&m, c)| c.as_ref().ok().map(|&(from, held)| (m, from, held)))
        .collect();
    let mut by_id = write_rows(conn, &accepted, lock_pending).await?;
    let mut outcomes = Vec::with_capacity(moves.len());
    let mut to_notify = Vec::with_capacity(accepted.len());
    for (&m, check) in moves.iter().zip(checks) {
        let (from, held) = match check {
            Ok(checked) => checked,
            Err(e) => {
                outcomes.push(Err(e));
                continue;
            }
        };
        let Some(task) = by_id.remove(&m.task_id) else {
            outcomes.push(Err(MoveError::NotFound(m.task_id)));
            continue;
        };
        let kind = event_for(Some(from), m.to);
        to_notify.push(Event::task_moved(
            kind,
            Some(task.trace_id.to_string()),
            &task,
            from.as_str(),
            m.event_extra.as_deref(),
        ));
        // The droplet is told when work is taken from it, not when it failed the task itself,
        // nor when it refused the task (it never took it), nor again at a retry (it failed
        // the task itself or was told when the system failed it).
        let previous_droplet = match m.to {
            _ if matches!(m.cause, Cause::Refused | Cause::RefusedCredentials) => None,
            _ if from == Status::Failed => None,
            Status::Pending | Status::Cancelled => held,
            Status::Failed if m.actor == Actor::System => held,
            _ => None,
        };
        outcomes.push(Ok(Applied {
            task,
            from,
            to: m.to,
            previous_droplet,
            held_droplet: held,
        }));
    }
    if !to_notify.is_empty() {
        events::record(conn, &to_notify).await?;
    }
    Ok(outcomes)
}

/// The rows' `UPDATE` and their history rows (one statement), for the moves that passed their
/// checks; the tasks as they are now, by id. With `lock`, the statement first locks the rows
/// still in their move's starting state (`FOR UPDATE SKIP LOCKED`) and updates only those.
async fn write_rows(
    conn: &mut PgConnection,
    accepted: &[(&Move, Status, Option<i32>)],
    lock: bool,
) -> Result<HashMap<i32, Task>, sqlx::Error> {
    if accepted.is_empty() {
        return Ok(HashMap::new());
    }
    let n = accepted.len();
    let mut a_ids = Vec::with_capacity(n);
    let mut a_to = Vec::with_capacity(n);
    let mut a_droplet: Vec<Option<i32>> = Vec::with_capacity(n);
    let mut a_result: Vec<Option<Value>> = Vec::with_capacity(n);
    let mut a_error: Vec<Option<String>> = Vec::with_capacity(n);
    let mut a_retry = Vec::with_capacity(n);
    let mut h_from = Vec::with_capacity(n);
    let mut h_by = Vec::with_capacity(n);
    let mut h_reason: Vec<Option<String>> = Vec::with_capacity(n);
    let mut h_meta: Vec<Option<&Value>> = Vec::with_capacity(n);
    for (m, from, _) in accepted {
        a_ids.push(m.task_id);
        a_to.push(m.to.as_str());
        a_droplet.push(m.assign_to);
        a_result.push(m.result.clone());
        a_error.push(m.error_message.clone());
        a_retry.push(i32::from(
            m.cause == Cause::Retry || (m.cause == Cause::Refused && m.to == Status::Pending),
        ));
        h_from.push(from.as_str());
        h_by.push(m.changed_by.as_str());
        h_reason.push(m.reason.clone());
        h_meta.push(m.metadata.as_deref());
    }

    // One statement for a whole batch: the rows' UPDATE, each row's columns following its new
    // status, and their history rows.
    let updated: Vec<Task> = task_columns!(sqlx::query_as {
        Task,
        "WITH m AS (
        SELECT * FROM unnest((SELECT $1::int[]), (SELECT $2::text[]), (SELECT $3::int[]),
                             (SELECT $4::jsonb[]), (SELECT $5::text[]), (SELECT $6::int[]),
                             (SELECT $7::text[]), (SELECT $8::text[]), (SELECT $9::text[]),
                             (SELECT $10::jsonb[]))
            WITH ORDINALITY
            AS m(id, to_status, droplet, result, error, retry_inc,
                 from_status, changed_by, reason, metadata, n)
     ), l AS (
        -- Only with $11 (a routing pass's moves, not locked before): the rows still in their
        -- move's starting state, each locked or, when held elsewhere, left out. A row
        -- changed by a transaction that committed meanwhile is checked as it is now.
        SELECT tasks.id FROM tasks JOIN m ON m.id = tasks.id
        WHERE (SELECT $11::bool) AND tasks.id = ANY((SELECT $1::int[])::int[])
          AND tasks.status = m.from_status
        FOR UPDATE OF tasks SKIP LOCKED
     ), t AS (
        UPDATE tasks SET
            status = m.to_status,
            assigned_droplet_id = CASE WHEN m.to_status = 'assigned' THEN m.droplet
                                       WHEN m.to_status = 'pending' THEN NULL
                                       ELSE tasks.assigned_droplet_id END,
            last_droplet_id = CASE WHEN m.to_status = 'pending'
                                   THEN COALESCE(tasks.assigned_droplet_id, tasks.last_droplet_id)
                                   ELSE tasks.last_droplet_id END,
            assigned_at = CASE WHEN m.to_status = 'assigned' THEN NOW()
                               WHEN m.to_status = 'pending' THEN NULL
                               ELSE tasks.assigned_at END,
            started_at = CASE WHEN m.to_status = 'in_progress' THEN NOW()
                              WHEN m.to_status = 'pending' THEN NULL
                              ELSE tasks.started_at END,
            completed_at = CASE WHEN m.to_status IN ('completed', 'failed', 'cancelled') THEN NOW()
                                WHEN m.to_status = 'pending' THEN NULL
                                ELSE tasks.completed_at END,
            result = CASE WHEN m.to_status = 'pending' THEN NULL
                          ELSE COALESCE(m.result, tasks.result) END,
            error_message = CASE WHEN m.to_status IN ('failed', 'completed', 'cancelled')
                                 THEN COALESCE(m.error, tasks.error_message)
                                 ELSE tasks.error_message END,
            retry_count = COALESCE(tasks.retry_count, 0) + m.retry_inc,
            attempt = CASE WHEN m.to_status = 'assigned' THEN tasks.attempt + 1 ELSE tasks.attempt END,
            updated_at = NOW()
        -- `= ANY` as well as the join: the rows are found by primary key whatever the
        -- planner thinks of the unnest's size (a hash join over a scan of the whole table
        -- was its choice while the table was young: 1,200 scans a second at 300 tasks/s).
        FROM m WHERE tasks.id = m.id AND tasks.id = ANY((SELECT $1::int[])::int[])
          AND (NOT (SELECT $11::bool) OR tasks.id IN (SELECT id FROM l))
        RETURNING tasks.*
     ), started AS (
        -- A task that starts ends its droplet's run of assignment timeouts (a write only for
        -- a droplet that has one).
        UPDATE droplets SET timed_out_assignments = 0
        FROM t WHERE t.status = 'in_progress' AND droplets.id = t.assigned_droplet_id
          AND droplets.timed_out_assignments > 0
     ), history AS (
        -- Each move's history row, on the attempt the move left the task on.
        INSERT INTO task_state_history
            (task_id, from_status, to_status, changed_by, reason, metadata, attempt)
        SELECT m.id, m.from_status, m.to_status, m.changed_by, m.reason, m.metadata, t.attempt
        FROM m JOIN t ON t.id = m.id ORDER BY m.n
     )
     SELECT " +
    } {
        + " FROM t LEFT JOIN droplets d ON d.id = t.assigned_droplet_id",
        &a_ids,
        // Checked as int[], text[] and jsonb[] by PostgreSQL (the casts in the statement);
        // the macros' element check knows neither &str nor Option in an array.
        &a_to as _,
        &a_droplet as _,
        &a_result as _,
        &a_error as _,
        &a_retry,
        &h_from as _,
        &h_by as _,
        &h_reason as _,
        &h_meta as _,
        lock
    })
    .fetch_all(&mut *conn)
    .await?;

    Ok(updated.into_iter().map(|t| (t.id, t)).collect())
}

#[cfg(test)]
mod tests;
