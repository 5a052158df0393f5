//! A droplet counted for what it failed in a row (refused deliveries, assignments not started
//! in time, deliveries that could not connect) and marked `error` at the threshold, with its
//! `droplet_health_changed` event, in the caller's transition.

use crate::services::droplet_row::{droplet_columns, droplet_of, droplet_record};
use crate::services::transition::Transition;

/// What a droplet is counted for, in a row, before it is marked `error`.
#[derive(Clone, Copy)]
pub(super) enum Counter {
    /// Deliveries refused (`refused_deliveries`).
    Refusals,
    /// Assigned tasks not started in time (`timed_out_assignments`).
    AssignmentTimeouts,
    /// Deliveries that could not connect or timed out (`failed_deliveries`); reaching the
    /// threshold also marks the droplet unreachable (`unreachable_since`), and the droplets
    /// returned are those newly unreachable (whatever their status was).
    ConnectionFailures,
}

/// The statement of [`count_and_mark`] for a counter column: adds `$2` to the column of the
/// droplets `$1` (internal ids), marks `error` those reaching `$3` (all, with `$4`) unless an
/// admin holds them, and reads the droplets marked now with their status before.
macro_rules! marking {
    ($column:literal, $($arg:expr),+) => {
        droplet_columns!(sqlx::query {
            "WITH c AS (SELECT * FROM unnest($1::int[], $2::int[]) AS c(cid, n)),
             old AS (
                SELECT droplets.id AS old_id, droplets.status AS old_status, c.n
                FROM droplets JOIN c ON c.cid = droplets.id
                ORDER BY droplets.id FOR NO KEY UPDATE OF droplets
             ),
             up AS (
                UPDATE droplets SET " + $column + " = droplets." + $column + " + old.n,
                    status = CASE WHEN (droplets." + $column + " + old.n >= $3 OR $4)
                                       AND NOT droplets.admin_deactivated
                                  THEN 'error' ELSE droplets.status END,
                    updated_at = NOW()
                FROM old WHERE droplets.id = old.old_id RETURNING droplets.*
             ) SELECT " +
        } {
            + r#", old.old_status AS "previous_status!" FROM up JOIN old ON old.old_id = up.id
             WHERE up.status = 'error' AND old.old_status <> 'error'"#,
            $($arg),+
        })
    };
}

/// [`Counter::ConnectionFailures`]: as `marking!`, and `unreachable_since` set at the
/// threshold; the rows returned are the droplets that became unreachable now.
macro_rules! marking_unreachable {
    ($($arg:expr),+) => {
        droplet_record!(
            "WITH c AS (SELECT * FROM unnest($1::int[], $2::int[]) AS c(cid, n)),
             old AS (
                SELECT droplets.id AS old_id, droplets.status AS old_status,
                       droplets.unreachable_since AS old_unreachable, c.n
                FROM droplets JOIN c ON c.cid = droplets.id
                ORDER BY droplets.id FOR NO KEY UPDATE OF droplets
             ),
             up AS (
                UPDATE droplets SET failed_deliveries = droplets.failed_deliveries + old.n,
                    unreachable_since = CASE WHEN droplets.failed_deliveries + old.n >= $3 OR $4
                                             THEN COALESCE(droplets.unreachable_since, NOW())
                                             ELSE droplets.unreachable_since END,
                    status = CASE WHEN (droplets.failed_deliveries + old.n >= $3 OR $4)
                                       AND NOT droplets.admin_deactivated
                                  THEN 'error' ELSE droplets.status END,
                    updated_at = NOW()
                FROM old WHERE droplets.id = old.old_id RETURNING droplets.*
             ) SELECT ",
            r#", old.old_status AS "previous_status!" FROM up JOIN old ON old.old_id = up.id
             WHERE up.unreachable_since IS NOT NULL AND old.old_unreachable IS NULL"#,
            $($arg),+
        )
    };
}

/// A droplet just marked `error`, and why.
pub(super) struct Marked {
    /// Internal id.
    pub(super) id: i32,
    pub(super) droplet_id: i32,
    pub(super) reason: String,
}

/// Adds `counts` (droplet internal id, how many) to the droplets' `counter`; a droplet whose
/// count reaches `threshold` (or every one, with `force`) is marked `error` with a
/// `droplet_health_changed` event saying `why(droplet_id)`, in this transition. Returns the
/// droplets marked now, for the log line after the commit.
pub(super) async fn count_and_mark(
    t: &mut Transition<'_>,
    counter: Counter,
    counts: &[(i32, i32)],
    threshold: u32,
    force: bool,
    why: impl Fn(i32) -> String,
) -> Result<Vec<Marked>, sqlx::Error> {
    struct Row {
        droplet: crate::services::droplets::Droplet,
        previous_status: String,
    }
    let (ids, ns): (Vec<i32>, Vec<i32>) = counts.iter().copied().unzip();
    let threshold = i32::try_from(threshold).unwrap_or(i32::MAX);
    // Each statement reads its own record type: each is mapped to `Row` in its arm.
    macro_rules! rows {
        ($query:expr) => {
            $query
                .map(|r| Row {
                    previous_status: r.previous_status,
                    droplet: droplet_of!(r),
                })
                .fetch_all(t.conn())
                .await?
        };
    }
    let rows: Vec<Row> = match counter {
        Counter::Refusals => rows!(marking!("refused_deliveries", &ids, &ns, threshold, force)),
        Counter::AssignmentTimeouts => {
            rows!(marking!(
                "timed_out_assignments",
                &ids,
                &ns,
                threshold,
                force
            ))
        }
        Counter::ConnectionFailures => rows!(marking_unreachable!(&ids, &ns, threshold, force)),
    };
    let mut events = Vec::with_capacity(rows.len());
    let mut marked = Vec::with_capacity(rows.len());
    for r in rows {
        let reason = why(r.droplet.droplet_id);
        events.push(crate::services::events::Event::droplet(
            crate::services::events::DropletEventKind::DropletHealthChanged,
            &r.droplet,
            Some(serde_json::json!({
                "previous_status": r.previous_status,
                "reason": reason,
            })),
        ));
        marked.push(Marked {
            id: r.droplet.internal_id,
            droplet_id: r.droplet.droplet_id,
            reason,
        });
    }
    crate::services::events::record(t.conn(), &events).await?;
    Ok(marked)
}

pub(super) fn log_marked(marked: &[Marked]) {
    for m in marked {
        tracing::warn!(
            droplet_id = m.droplet_id,
            reason = %m.reason,
            "droplet marked error: it {}",
            m.reason
        );
    }
}
