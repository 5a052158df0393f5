//! Recovery: work of a lost droplet goes back to pending (assigned) or fails to be retried
//! (in progress); failed tasks retry after their backoff; deadlines and assignment timeouts.

use crate::services::dispatch::{Refusal, Report, Unreachable};
use crate::services::locks::Singleton;
use crate::services::state_machine::{Actor, Cause, Mode, Move, MoveError, Status};
use crate::services::transition::{Changes, Transition};
use crate::services::{drain_state, droplet_drain};

mod marking;

use marking::{count_and_mark, log_marked, Counter};

const LIMIT: i64 = 1000;

/// Takes a lost droplet's tasks away, in a transaction of its own.
pub async fn recover_droplet(
    state: &Changes,
    internal_id: i32,
    droplet_id: i32,
) -> Result<usize, sqlx::Error> {
    let mut t = Transition::begin(state).await?;
    let n = recover_in(&mut t, internal_id, droplet_id, false).await?;
    t.commit().await?;
    Ok(n)
}

/// Takes a lost droplet's tasks away within a transition: assigned ones to pending (not a
/// retry), running ones to failed (`droplet N lost`), to be retried elsewhere after their
/// backoff. With `assigned_only` (a droplet we cannot reach, which may still finish what it
/// started), only the assigned ones. Returns how many moved.
pub async fn recover_in(
    t: &mut Transition<'_>,
    internal_id: i32,
    droplet_id: i32,
    assigned_only: bool,
) -> Result<usize, sqlx::Error> {
    let live: Vec<(i32, String)> = sqlx::query!(
        r#"SELECT id, status AS "status!" FROM tasks WHERE assigned_droplet_id = $1
           AND (status = 'assigned' OR (status = 'in_progress' AND NOT $2))
         ORDER BY id FOR UPDATE"#,
        internal_id,
        assigned_only,
    )
    .fetch_all(t.conn())
    .await?
    .into_iter()
    .map(|r| (r.id, r.status))
    .collect();
    let moves: Vec<Move> = live
        .into_iter()
        .map(|(id, status)| {
            if status == "assigned" {
                let mut m = Move::new(id, Status::Pending, Actor::System, "system");
                m.cause = Cause::Requeue;
                m.reason = Some(if assigned_only {
                    format!("droplet {droplet_id} unreachable; requeued (not a retry)")
                } else {
                    format!(
                        "droplet {droplet_id} lost before starting the task; requeued (not a retry)"
                    )
                });
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
/// delivery it accepts resets the count: `dispatch::send`). A refusal of the orchestrator's
/// own credentials (401/403) is a configuration fault, not the task's: the task goes back to
/// pending without a retry counted and the droplet is marked `error` at once, so a bad token
/// costs one refused delivery per droplet per registration or heartbeat, never the tasks'
/// retries. The droplet is sent no `cancel_task` for a task it refused.
pub async fn refused(state: &Changes, refusal: &Refusal) -> Result<(), sqlx::Error> {
    let config = state.settings.current();
    let Refusal {
        task_id,
        internal_droplet: internal_id,
        droplet_id,
        reason: why,
        credentials,
    } = refusal;
    let (task_id, internal_id, droplet_id, credentials) =
        (*task_id, *internal_id, *droplet_id, *credentials);
    let mut t = Transition::begin(state).await?;
    let left: Option<bool> = sqlx::query_scalar!(
        r#"SELECT COALESCE(retry_count, 0) < COALESCE(max_retries, 3) AS "left!" FROM tasks
         WHERE id = $1 AND status = 'assigned' AND assigned_droplet_id = $2 FOR UPDATE"#,
        task_id,
        internal_id,
    )
    .fetch_optional(t.conn())
    .await?;
    let Some(retries_left) = left else {
        // The task moved on meanwhile (started, cancelled, requeued): nothing to undo.
        return t.rollback().await;
    };
    let reason = format!("droplet {droplet_id} refused the task ({why})");
    let mut m = if credentials {
        let mut m = Move::new(task_id, Status::Pending, Actor::System, "system");
        m.reason = Some(format!(
            "{reason}: the orchestrator's credentials, a configuration fault; requeued (not a retry)"
        ));
        m.cause = Cause::RefusedCredentials;
        m
    } else if retries_left {
        let mut m = Move::new(task_id, Status::Pending, Actor::System, "system");
        m.reason = Some(format!("{reason}; retried on another droplet"));
        m.cause = Cause::Refused;
        m
    } else {
        let mut m = Move::new(task_id, Status::Failed, Actor::System, "system");
        m.reason = Some(format!("{reason}; no retries left"));
        m.error_message = Some(reason.clone());
        m.cause = Cause::Refused;
        m
    };
    m.expect_droplet = Some(internal_id);
    m.expect_status = Some(Status::Assigned);
    m.event_extra = Some(std::sync::Arc::new(
        serde_json::json!({ "refused_by": droplet_id, "refusal": why }),
    ));
    apply(&mut t, &[m]).await?;

    // Count the refusal; the droplet that keeps refusing (or refuses our credentials) is put
    // out of routing.
    let why_marked = if credentials {
        format!(
            "refused the orchestrator's credentials ({why}); out of routing until it registers or heartbeats again"
        )
    } else {
        format!(
            "refused {} deliveries in a row (last: {why}); out of routing until it registers or heartbeats again",
            config.dispatch_refusals_before_error
        )
    };
    let marked = count_and_mark(
        &mut t,
        Counter::Refusals,
        &[(internal_id, 1)],
        config.dispatch_refusals_before_error,
        credentials,
        |_| why_marked.clone(),
    )
    .await?;
    t.commit().await?;
    log_marked(&marked);
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
pub async fn run_refusals(core: Changes, stop: tokio_util::sync::CancellationToken) {
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
        let failure = match refusal {
            Report::Refused(refusal) => {
                if let Err(e) = refused(&core, &refusal).await {
                    // The assignment timeout requeues the task if this could not.
                    tracing::warn!(task_id = refusal.task_id, error = %e, "could not requeue a refused task");
                }
                continue;
            }
            Report::Unreachable(failure) => failure,
        };
        // Failures come in bursts (every delivery in flight to a droplet that went away):
        // those waiting now are counted in one statement; refusals among them wait their turn.
        let mut failures = vec![failure];
        let mut refusals_after = Vec::new();
        while let Ok(next) = refusals.try_recv() {
            match next {
                Report::Unreachable(f) => failures.push(f),
                Report::Refused(r) => refusals_after.push(r),
            }
            if failures.len() + refusals_after.len() >= LIMIT as usize {
                break;
            }
        }
        if let Err(e) = unreachable(&core, &failures).await {
            // The next failures count again; the assignment timeout requeues meanwhile.
            tracing::warn!(error = %e, "could not count failed deliveries");
        }
        for refusal in refusals_after {
            if let Err(e) = refused(&core, &refusal).await {
                tracing::warn!(task_id = refusal.task_id, error = %e, "could not requeue a refused task");
            }
        }
    }
}

/// Counts deliveries that could not connect or timed out. A droplet that reaches
/// `DISPATCH_FAILURES_BEFORE_UNREACHABLE` in a row is marked unreachable: status `error`
/// with a `droplet_health_changed` event and a log line, out of routing, its assigned tasks
/// back to pending (not a retry; the router prefers another droplet), in one transaction.
/// A heartbeat does not bring it back; a successful probe (`dispatch::probe`), an accepted
/// delivery's reset or a registration does.
pub async fn unreachable(state: &Changes, failures: &[Unreachable]) -> Result<(), sqlx::Error> {
    let n = state
        .settings
        .current()
        .dispatch_failures_before_unreachable;
    let mut per_droplet: std::collections::BTreeMap<i32, i32> = Default::default();
    for f in failures {
        *per_droplet.entry(f.internal_droplet).or_insert(0) += 1;
    }
    let counts: Vec<(i32, i32)> = per_droplet.into_iter().collect();
    let last: std::collections::HashMap<i32, &str> = failures
        .iter()
        .map(|f| (f.droplet_id, f.reason.as_str()))
        .collect();
    let mut t = Transition::begin(state).await?;
    let marked = count_and_mark(
        &mut t,
        Counter::ConnectionFailures,
        &counts,
        n,
        false,
        |droplet| {
            format!(
                "could not be reached: {n} deliveries in a row failed to connect or had no answer (last: {}); unreachable, its assigned tasks back to pending, probed until it answers or registers again",
                last.get(&droplet).copied().unwrap_or("unreachable")
            )
        },
    )
    .await?;
    let mut requeued = 0;
    for m in &marked {
        requeued += recover_in(&mut t, m.id, m.droplet_id, true).await?;
    }
    t.commit().await?;
    log_marked(&marked);
    if requeued > 0 {
        state.router.trigger();
    }
    Ok(())
}

/// What one maintenance round did.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Maintenance {
    pub deadlines_failed: usize,
    pub assignments_timed_out: usize,
    pub retried: usize,
    /// Tasks sent back to pending because their droplet's drain deadline passed.
    pub drains_requeued: usize,
    /// Droplets whose drain ended (they hold nothing more) in this round.
    pub drains_finished: usize,
    pub skipped: bool,
}

/// Deadlines, assignment timeouts and due retries, once across replicas.
pub async fn maintain(state: &Changes) -> Result<Maintenance, sqlx::Error> {
    let config = state.settings.current();
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
    let overdue: Vec<i32> = sqlx::query_scalar!(
        "SELECT id FROM tasks WHERE deadline IS NOT NULL AND deadline <= NOW()
           AND status IN ('pending', 'assigned', 'in_progress')
         ORDER BY deadline LIMIT $1 FOR UPDATE SKIP LOCKED",
        LIMIT,
    )
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

    // Assigned but never started: back to pending for another droplet (not a retry), or
    // failed once the task was requeued `MAX_REQUEUES` times already (the retry rules then
    // apply). Each droplet counts the tasks it let time out in a row. A droplet that pushed
    // back (`Retry-After`) has the timeout counted from the end of its wait, by at most
    // `MAX_RETRY_AFTER` in all: one that keeps pushing back loses its tasks in the end.
    let stale: Vec<(i32, Option<i32>, i32)> = sqlx::query!(
        "SELECT id, assigned_droplet_id, assignment_timeouts FROM tasks WHERE status = 'assigned'
           AND assigned_at <= NOW() - make_interval(secs => $1::double precision)
           AND (deadline IS NULL OR deadline > NOW())
           AND NOT EXISTS (
              SELECT 1 FROM droplets d WHERE d.id = tasks.assigned_droplet_id
                AND d.deferred_until IS NOT NULL
                AND LEAST(d.deferred_until, tasks.assigned_at + make_interval(secs => $3::double precision))
                    > NOW() - make_interval(secs => $1::double precision))
         ORDER BY assigned_at LIMIT $2 FOR UPDATE OF tasks SKIP LOCKED",
        config.assignment_timeout_seconds as f64,
        LIMIT,
        crate::services::dispatch::pushback::MAX_RETRY_AFTER.as_secs_f64(),
    )
    .fetch_all(t.conn())
    .await?
    .into_iter()
    .map(|r| (r.id, r.assigned_droplet_id, r.assignment_timeouts))
    .collect();
    let timed_out = stale.len();
    let mut per_droplet: std::collections::BTreeMap<i32, i32> = Default::default();
    for &(id, droplet, before) in &stale {
        if let Some(droplet) = droplet {
            *per_droplet.entry(droplet).or_insert(0) += 1;
        }
        let timeouts = before + 1;
        let waited = config.assignment_timeout_seconds;
        let m = if i64::from(before) < i64::from(config.max_requeues) {
            let mut m = Move::new(id, Status::Pending, Actor::System, "system");
            m.cause = Cause::Requeue;
            m.reason = Some(format!(
                "not started within {waited} s of assignment; requeued (not a retry; requeue {timeouts} of at most {})",
                config.max_requeues
            ));
            m
        } else {
            let mut m = Move::new(id, Status::Failed, Actor::System, "system");
            m.cause = Cause::NeverStarted;
            let why = format!(
                "not started within {waited} s of assignment {timeouts} times (MAX_REQUEUES is {})",
                config.max_requeues
            );
            m.reason = Some(format!("{why}; failed"));
            m.error_message = Some(why);
            m
        };
        let mut m = m;
        m.expect_status = Some(Status::Assigned);
        m.expect_droplet = droplet;
        moves.push(m);
    }
    let mut marked = Vec::new();
    if !stale.is_empty() {
        let ids: Vec<i32> = stale.iter().map(|s| s.0).collect();
        sqlx::query!(
            "UPDATE tasks SET assignment_timeouts = assignment_timeouts + 1 WHERE id = ANY($1)",
            &ids,
        )
        .execute(t.conn())
        .await?;
        let counts: Vec<(i32, i32)> = per_droplet.into_iter().collect();
        let n = config.assignment_timeouts_before_error;
        let waited = config.assignment_timeout_seconds;
        marked = count_and_mark(&mut t, Counter::AssignmentTimeouts, &counts, n, false, |_| {
            format!(
                "let {n} assigned tasks in a row go unstarted for {waited} s; out of routing until it registers or heartbeats again (a task it starts resets the count)"
            )
        })
        .await?;
    }

    // Failed tasks with retries left, once their backoff has passed.
    let due: Vec<(i32, i32)> = sqlx::query!(
        r#"SELECT id, COALESCE(retry_count, 0) AS "retry_count!" FROM tasks
         WHERE status = 'failed' AND COALESCE(retry_count, 0) < COALESCE(max_retries, 3)
           AND (deadline IS NULL OR deadline > NOW())
           AND COALESCE(completed_at, updated_at) + make_interval(secs =>
                 LEAST($1::double precision * power(2, COALESCE(retry_count, 0)), $2::double precision)) <= NOW()
         ORDER BY completed_at LIMIT $3 FOR UPDATE SKIP LOCKED"#,
        config.retry_backoff_seconds as f64,
        config.retry_backoff_max_seconds as f64,
        LIMIT,
    )
    .fetch_all(t.conn())
    .await?
    .into_iter()
    .map(|r| (r.id, r.retry_count))
    .collect();
    let retried = due.len();
    for (id, count) in due {
        let mut m = Move::new(id, Status::Pending, Actor::System, "system");
        m.cause = Cause::Retry;
        m.reason = Some(format!("retry {} after failure", count + 1));
        m.expect_status = Some(Status::Failed);
        moves.push(m);
    }

    // What droplets past their drain deadline still hold goes back to pending (a new attempt
    // elsewhere); then every drain whose droplet holds nothing more ends, with its event.
    let drained = droplet_drain::past_deadline_moves(t.conn(), None, LIMIT).await?;
    let drains_requeued = drained.len();
    moves.extend(drained);

    apply(&mut t, &moves).await?;
    let drains_finished = drain_state::finish_drains(t.conn(), None).await?;
    t.commit().await?;
    log_marked(&marked);
    Ok(Maintenance {
        deadlines_failed: deadlines,
        assignments_timed_out: timed_out,
        retried,
        drains_requeued,
        drains_finished,
        skipped: false,
    })
}
