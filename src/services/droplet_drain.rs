//! Draining a droplet (`POST /management/droplets/{id}/drain`, admin): it takes no new work
//! (the router leaves out a droplet whose `drain_requested_at` is set), what it runs finishes,
//! and when it holds nothing more it is drained, with a `droplet_drained` event
//! (`drain_state.rs`). With a deadline, what it still holds then goes back to pending (a new
//! attempt elsewhere, not a retry) through the transition path, in the `task_router` job's
//! round: the deadline is a column, so it holds even if the replica that took the drain is
//! gone. A registration of the droplet (a new process) ends the drain.

use chrono::NaiveDateTime;
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;

use crate::identity::Principal;
use crate::protocol;
use crate::services::drain_state;
use crate::services::error::{Error, Result};
use crate::services::state_machine::{Actor, Cause, Mode, Move, MoveError, Status};
use crate::services::transition::{Changes, Transition};
use crate::validation::{FieldError, Validate};

/// The longest deadline a drain may be given (a week).
pub const MAX_DEADLINE_SECONDS: u64 = 7 * 24 * 3600;

/// The query of a drain.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DrainParams {
    /// Seconds from now after which what the droplet still holds goes back to pending (0: at
    /// once). Absent: its tasks finish however long they take.
    pub deadline_seconds: Option<u64>,
}

impl Validate for DrainParams {
    fn validate(&self) -> Vec<FieldError> {
        match self.deadline_seconds {
            Some(s) if s > MAX_DEADLINE_SECONDS => vec![FieldError::new(
                &["deadline_seconds"],
                format!("Input should be between 0 and {MAX_DEADLINE_SECONDS}"),
                "less_than_equal",
            )],
            _ => Vec::new(),
        }
    }
}

/// What a drain answers.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Drain {
    pub droplet_id: i32,
    pub draining: bool,
    /// When what it still holds goes back to pending; absent without a deadline.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub drain_deadline: Option<String>,
    /// Tasks it holds now (assigned or in progress), after any requeued at once.
    pub in_flight: i64,
    /// Tasks sent back to pending by this call (a deadline of 0).
    pub requeued: usize,
    /// Whether it holds nothing now (the `droplet_drained` event was sent).
    pub drained: bool,
    pub message: String,
}

/// Starts (or restarts, with the deadline given now) the drain of a droplet (external id).
pub async fn drain(
    core: &Changes,
    caller: &Principal,
    droplet_id: i32,
    params: &DrainParams,
) -> Result<Drain> {
    let mut t = Transition::begin(core).await?;
    let row = sqlx::query!(
        r#"UPDATE droplets SET drain_requested_at = COALESCE(drain_requested_at, NOW()),
              drain_deadline = NOW() + make_interval(secs => $2::double precision),
              updated_at = NOW()
           WHERE droplet_id = $1
           RETURNING id, drain_deadline"#,
        droplet_id,
        params.deadline_seconds.map(|s| s as f64),
    )
    .fetch_optional(t.conn())
    .await?
    .ok_or_else(|| Error::not_found(format!("Droplet {droplet_id} not found")))?;
    let requeued = if params.deadline_seconds == Some(0) {
        let moves = past_deadline_moves(t.conn(), Some(row.id), i64::MAX).await?;
        match t.apply(&moves, Mode::SkipInvalid).await {
            Ok(applied) => applied.len(),
            Err(MoveError::Database(e)) => return Err(e.into()),
            Err(e) => return Err(Error::internal(e)),
        }
    } else {
        0
    };
    let drained = drain_state::finish_drains(t.conn(), Some(&[row.id])).await? > 0;
    let in_flight: i64 = sqlx::query_scalar!(
        r#"SELECT COUNT(*) AS "n!" FROM tasks
           WHERE assigned_droplet_id = $1 AND status IN ('assigned', 'in_progress')"#,
        row.id,
    )
    .fetch_one(t.conn())
    .await?;
    t.commit().await?;
    core.dispatch.holds.set_draining();
    tracing::warn!(droplet_id, by = %caller.actor_name(), deadline_s = ?params.deadline_seconds, in_flight, "droplet drain started");
    Ok(Drain {
        droplet_id,
        draining: true,
        drain_deadline: row.drain_deadline.map(|d| protocol::iso(&d)),
        in_flight,
        requeued,
        drained: drained || in_flight == 0,
        message: message(in_flight, row.drain_deadline),
    })
}

fn message(in_flight: i64, deadline: Option<NaiveDateTime>) -> String {
    match (in_flight, deadline) {
        (0, _) => {
            "Drained: the droplet holds no task; it takes no new work until it registers again"
                .into()
        }
        (n, None) => {
            format!("Draining: no new work; its {n} task(s) finish, then a droplet_drained event")
        }
        (n, Some(at)) => format!(
            "Draining: no new work; its {n} task(s) finish, or go back to pending at {}",
            protocol::iso(&at)
        ),
    }
}

/// The moves that send back to pending what droplets past their drain deadline still hold
/// (one droplet, or every one), at most `limit`, rows locked (those locked elsewhere skipped:
/// the next round takes them).
pub async fn past_deadline_moves(
    conn: &mut PgConnection,
    droplet: Option<i32>,
    limit: i64,
) -> std::result::Result<Vec<Move>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT t.id, t.assigned_droplet_id AS "droplet!", d.droplet_id AS "external!"
           FROM tasks t JOIN droplets d ON d.id = t.assigned_droplet_id
           WHERE t.status IN ('assigned', 'in_progress')
             AND d.drain_deadline <= NOW() AND d.drain_requested_at IS NOT NULL
             AND ($1::int IS NULL OR d.id = $1)
           ORDER BY t.id LIMIT $2 FOR UPDATE OF t SKIP LOCKED"#,
        droplet,
        limit,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let mut m = Move::new(r.id, Status::Pending, Actor::System, "system");
            m.cause = Cause::Drained;
            m.reason = Some(format!(
                "droplet {} drained and its deadline passed; requeued for another droplet (not a retry)",
                r.external
            ));
            m.expect_droplet = Some(r.droplet);
            m
        })
        .collect())
}
