//! Recovery: work of a lost droplet goes back to pending (assigned) or fails to be retried
//! (in progress); failed tasks retry after their backoff; deadlines and assignment timeouts.

use crate::services::dispatch::Refusal;
use crate::services::locks::Singleton;
use crate::services::state_machine::{Actor, Cause, Mode, Move, MoveError, Status};
use crate::services::transition::Transition;
use crate::services::Core;

const LIMIT: i64 = 1000;

/// Takes a lost droplet's tasks away, in a transaction of its own.
pub async fn recover_droplet(
    state: &Core,
    internal_id: i32,
    droplet_id: i32,
) -> Result<usize, sqlx::Error> {
    let mut t = Transition::begin(state).await?;
    let n = recover_in(&mut t, internal_id, droplet_id).await?;
    t.commit().await?;
    Ok(n)
}

/// Takes a lost droplet's tasks away within a transition: assigned ones to pending (not a
/// retry), running ones to failed (`droplet N lost`), to be retried elsewhere after their
/// backoff. Returns how many moved.
pub async fn recover_in(
    t: &mut Transition<'_>,
    internal_id: i32,
    droplet_id: i32,
) -> Result<usize, sqlx::Error> {
    let live: Vec<(i32, String)> = sqlx::query_as(
        "SELECT id, status FROM tasks WHERE assigned_droplet_id = $1 AND status IN ('assigned', 'in_progress')
         ORDER BY id FOR UPDATE",
    )
    .bind(internal_id)
    .fetch_all(t.conn())
    .await?;
    let moves: Vec<Move> = live
        .into_iter()
        .map(|(id, status)| {
            if status == "assigned" {
                let mut m = Move::new(id, Status::Pending, Actor::System, "system");
                m.cause = Cause::Requeue;
                m.reason = Some(format!(
                    "droplet {droplet_id} lost before starting the task; requeued (not a retry)"
                ));
                m.expect_droplet = Some(internal_id);
                m
            } else {
                let mut m = Move::new(id, Status::Failed, Actor::System, "system");
                m.cause = Cause::DropletLost;
                m.reason = Some(format!("droplet {droplet_id} lost"));
                m.error_message = Some(format!("droplet {droplet_id} lost"));
                m.expect_droplet = Some(internal_id);
                m
            }
        })
        .collect();
    apply_counted(t, &moves).await
}

/// A droplet refused a delivery (a 4xx other than 408/429, or its endpoint is not allowed):
/// the task leaves it as a failed attempt, back to pending with its retry counted (the router
/// prefers another droplet), or failed for good when no retries are left. After
/// `DISPATCH_REFUSALS_BEFORE_ERROR` refusals in a row the droplet is marked `error`, out of
/// routing until it registers or heartbeats again, with a `droplet_health_changed` event (a
/// delivery it accepts resets the count: `dispatch::send`).
pub async fn refused(
    state: &Core,
    task_id: i32,
    internal_id: i32,
    droplet_id: i32,
    why: &str,
) -> Result<(), sqlx::Error> {
    let config = state.config();
    let mut t = Transition::begin(state).await?;
    let left: Option<bool> = sqlx::query_scalar(
        "SELECT COALESCE(retry_count, 0) < COALESCE(max_retries, 3) FROM tasks
         WHERE id = $1 AND status = 'assigned' AND assigned_droplet_id = $2 FOR UPDATE",
    )
    .bind(task_id)
    .bind(internal_id)
    .fetch_optional(t.conn())
    .await?;
    let Some(retries_left) = left else {
        // The task moved on meanwhile (started, cancelled, requeued): nothing to undo.
        return t.rollback().await;
    };
    let reason = format!("droplet {droplet_id} refused the task ({why})");
    let mut m = if retries_left {
        let mut m = Move::new(task_id, Status::Pending, Actor::System, "system");
        m.reason = Some(format!("{reason}; retried on another droplet"));
        m
    } else {
        let mut m = Move::new(task_id, Status::Failed, Actor::System, "system");
        m.reason = Some(format!("{reason}; no retries left"));
        m.error_message = Some(reason.clone());
        m
    };
    m.cause = Cause::Refused;
    m.expect_droplet = Some(internal_id);
    m.expect_status = Some(Status::Assigned);
    m.event_extra = Some(serde_json::json!({ "refused_by": droplet_id, "refusal": why }));
    apply(&mut t, &[m]).await?;

    // Count the refusal; the droplet that keeps refusing is put out of routing.
    #[derive(sqlx::FromRow)]
    struct Marked {
        #[sqlx(flatten)]
        droplet: crate::services::droplets::Droplet,
        previous_status: String,
    }
    let marked: Option<Marked> = sqlx::query_as(const_format::concatcp!(
        "WITH old AS (SELECT id AS old_id, status AS old_status FROM droplets WHERE id = $1 FOR NO KEY UPDATE),
         up AS (
            UPDATE droplets SET refused_deliveries = droplets.refused_deliveries + 1,
                status = CASE WHEN droplets.refused_deliveries + 1 >= $2 AND NOT droplets.admin_deactivated
                              THEN 'error' ELSE droplets.status END,
                updated_at = NOW()
            FROM old WHERE droplets.id = old.old_id RETURNING droplets.*
         ) SELECT ",
        crate::services::droplets::DROPLET_COLUMNS,
        ", old.old_status AS previous_status FROM up, old WHERE up.status = 'error' AND old.old_status <> 'error'"
    ))
    .bind(internal_id)
    .bind(config.dispatch_refusals_before_error as i32)
    .fetch_optional(t.conn())
    .await?;
    if let Some(m) = &marked {
        let event = crate::services::events::Event::droplet(
            crate::services::events::DropletEventKind::DropletHealthChanged,
            serde_json::to_value(&m.droplet).unwrap_or_default(),
            Some(serde_json::json!({
                "previous_status": m.previous_status,
                "reason": format!(
                    "refused {} deliveries in a row (last: {why}); out of routing until it registers or heartbeats again",
                    config.dispatch_refusals_before_error
                ),
            })),
        );
        crate::services::events::notify(t.conn(), &[event]).await?;
    }
    t.commit().await?;
    if marked.is_some() {
        tracing::warn!(
            droplet_id,
            refusals = config.dispatch_refusals_before_error,
            last = %why,
            "droplet marked error: it refused {} deliveries in a row (last: {why}); it rejoins when it registers or heartbeats",
            config.dispatch_refusals_before_error
        );
    }
    Ok(())
}

/// [`apply`], returning how many moves held.
async fn apply_counted(t: &mut Transition<'_>, moves: &[Move]) -> Result<usize, sqlx::Error> {
    match t.apply(moves, Mode::SkipInvalid).await {
        Ok(applied) => Ok(applied.len()),
        Err(MoveError::Database(e)) => Err(e),
        Err(e) => unreachable_in_skip_mode(e).map(|_| 0),
    }
}

/// Applies the jobs' moves, keeping those that are still valid (`SkipInvalid` fails only on
/// the database).
async fn apply(t: &mut Transition<'_>, moves: &[Move]) -> Result<(), sqlx::Error> {
    match t.apply(moves, Mode::SkipInvalid).await {
        Ok(_) => Ok(()),
        Err(MoveError::Database(e)) => Err(e),
        Err(e) => unreachable_in_skip_mode(e),
    }
}

/// `SkipInvalid` leaves invalid moves out instead of failing; should it ever report one,
/// the round is abandoned (rolled back) and logged, not answered as a database error.
fn unreachable_in_skip_mode(e: MoveError) -> Result<(), sqlx::Error> {
    tracing::error!(error = %e, "a skip-invalid transition reported an invalid move");
    Err(sqlx::Error::RowNotFound)
}

/// Acts on the refusals dispatch reports, one at a time, until shutdown.
pub async fn run_refusals(core: Core, stop: tokio_util::sync::CancellationToken) {
    let Some(mut refusals) = core.dispatch.take_refusals() else {
        return;
    };
    loop {
        let refusal = tokio::select! {
            _ = stop.cancelled() => return,
            r = refusals.recv() => match r {
                Some(r) => r,
                None => return,
            },
        };
        let Refusal {
            task_id,
            internal_droplet,
            droplet_id,
            reason,
        } = refusal;
        if let Err(e) = refused(&core, task_id, internal_droplet, droplet_id, &reason).await {
            // The assignment timeout requeues the task if this could not.
            tracing::warn!(task_id, error = %e, "could not requeue a refused task");
        }
    }
}

/// What one maintenance round did.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Maintenance {
    pub deadlines_failed: usize,
    pub assignments_timed_out: usize,
    pub retried: usize,
    pub skipped: bool,
}

/// Deadlines, assignment timeouts and due retries, once across replicas.
pub async fn maintain(state: &Core) -> Result<Maintenance, sqlx::Error> {
    let config = state.config();
    let mut t = Transition::begin(state).await?;
    if !Singleton::Maintenance.try_for_transaction(t.conn()).await? {
        t.rollback().await?;
        return Ok(Maintenance {
            skipped: true,
            ..Default::default()
        });
    }
    let mut moves = Vec::new();

    // A task whose deadline passed fails for good, whatever its state.
    let overdue: Vec<i32> = sqlx::query_scalar(
        "SELECT id FROM tasks WHERE deadline IS NOT NULL AND deadline <= NOW()
           AND status IN ('pending', 'assigned', 'in_progress')
         ORDER BY deadline LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(LIMIT)
    .fetch_all(t.conn())
    .await?;
    let deadlines = overdue.len();
    for id in overdue {
        let mut m = Move::new(id, Status::Failed, Actor::System, "system");
        m.cause = Cause::Deadline;
        m.reason = Some("deadline passed; not retried".into());
        m.error_message = Some("deadline exceeded".into());
        moves.push(m);
    }

    // Assigned but never started: back to pending for another droplet (not a retry).
    let stale: Vec<i32> = sqlx::query_scalar(
        "SELECT id FROM tasks WHERE status = 'assigned'
           AND assigned_at <= NOW() - make_interval(secs => $1::double precision)
           AND (deadline IS NULL OR deadline > NOW())
         ORDER BY assigned_at LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(config.assignment_timeout_seconds as f64)
    .bind(LIMIT)
    .fetch_all(t.conn())
    .await?;
    let timed_out = stale.len();
    for id in stale {
        let mut m = Move::new(id, Status::Pending, Actor::System, "system");
        m.cause = Cause::Requeue;
        m.reason = Some(format!(
            "not started within {} s of assignment; requeued (not a retry)",
            config.assignment_timeout_seconds
        ));
        m.expect_status = Some(Status::Assigned);
        moves.push(m);
    }

    // Failed tasks with retries left, once their backoff has passed.
    let due: Vec<(i32, i32)> = sqlx::query_as(
        "SELECT id, COALESCE(retry_count, 0) FROM tasks
         WHERE status = 'failed' AND COALESCE(retry_count, 0) < COALESCE(max_retries, 3)
           AND (deadline IS NULL OR deadline > NOW())
           AND COALESCE(completed_at, updated_at) + make_interval(secs =>
                 LEAST($1::double precision * power(2, COALESCE(retry_count, 0)), $2::double precision)) <= NOW()
         ORDER BY completed_at LIMIT $3 FOR UPDATE SKIP LOCKED",
    )
    .bind(config.retry_backoff_seconds as f64)
    .bind(config.retry_backoff_max_seconds as f64)
    .bind(LIMIT)
    .fetch_all(t.conn())
    .await?;
    let retried = due.len();
    for (id, count) in due {
        let mut m = Move::new(id, Status::Pending, Actor::System, "system");
        m.cause = Cause::Retry;
        m.reason = Some(format!("retry {} after failure", count + 1));
        m.expect_status = Some(Status::Failed);
        moves.push(m);
    }

    apply(&mut t, &moves).await?;
    t.commit().await?;
    Ok(Maintenance {
        deadlines_failed: deadlines,
        assignments_timed_out: timed_out,
        retried,
        skipped: false,
    })
}
