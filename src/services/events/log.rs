//! The numbered event log clients resume from: its bounds, the events after an id, and the
//! `resync_required` frame for a client whose events are no longer all there.

use serde_json::{json, Value};
use sqlx::PgPool;

use super::{event_envelope, ClientFilter, Feed};

/// What the log holds now: the newest id the retention deleted, and the oldest and newest
/// ids kept.
#[derive(Debug, Clone, Copy, sqlx::FromRow)]
pub struct LogBounds {
    pub trimmed_through: i64,
    pub oldest: Option<i64>,
    pub newest: Option<i64>,
}

impl LogBounds {
    /// Whether a client that saw events up to `after` has missed some the log no longer
    /// holds (deleted by the retention), or comes from another log (an id beyond the newest:
    /// a restored database). Ids may have gaps, so only the trim point tells.
    pub fn must_resync(&self, after: i64) -> bool {
        after < self.trimmed_through || after > self.newest_id()
    }

    /// The newest id in the log, or the trim point when the log is empty.
    pub fn newest_id(&self) -> i64 {
        self.newest.unwrap_or(self.trimmed_through)
    }

    /// The frame a client resuming after `after` gets first when it must reload.
    pub fn resync_frame(&self, after: i64) -> Value {
        event_envelope(
            None,
            json!({
                "event": "resync_required",
                "oldest_event_id": self.oldest.unwrap_or(self.trimmed_through + 1),
                "after": after,
            }),
        )
    }
}

pub async fn bounds(db: &PgPool) -> Result<LogBounds, sqlx::Error> {
    sqlx::query_as!(
        LogBounds,
        r#"SELECT (SELECT trimmed_through FROM event_log_state) AS "trimmed_through!",
                (SELECT MIN(event_id) FROM events) AS "oldest?",
                (SELECT MAX(event_id) FROM events) AS "newest?""#,
    )
    .fetch_one(db)
    .await
}

/// How much of the log one read of a resuming client may hold: at most `events` events and,
/// past the first, no more than `bytes` of envelope text.
#[derive(Debug, Clone, Copy)]
pub struct PageLimit {
    pub events: i64,
    pub bytes: i64,
}

/// The next page of a feed's events after `after` that `filter` takes, in order, as
/// `(event_id, envelope as JSON text)`. The filter is applied here, by the database, as
/// `ClientFilter::matches` applies it to live events: rows the client would not get are never
/// read into memory. The page always holds the first matching event, however big. Sizes are
/// the `size` column (the envelope's text, computed once as the event was written): only the
/// events returned are rendered as text.
pub async fn page_after(
    db: &PgPool,
    feed: Feed,
    after: i64,
    filter: &ClientFilter,
    limit: PageLimit,
) -> Result<Vec<(i64, String)>, sqlx::Error> {
    // Task and status filters look at the task, and apply to the tasks feed only; the droplet
    // filter looks at the task's assignee or at the droplet itself (the columns the writer
    // filled beside the envelope, `events::EventMeta`).
    let (task_type, status) = match feed {
        Feed::Tasks => (filter.task_type.as_deref(), filter.status.as_deref()),
        Feed::Droplets => (None, None),
    };
    let rows = sqlx::query!(
        r#"SELECT event_id AS "event_id!", envelope::text AS "envelope!" FROM (
             SELECT event_id, envelope, size, SUM(size) OVER (ORDER BY event_id) AS through
             FROM events
             WHERE feed = $1 AND event_id > $2
               AND ($3::text IS NULL OR task_type = $3)
               AND ($4::text IS NULL OR status = $4)
               AND ($5::int IS NULL OR droplet_id = $5)
             ORDER BY event_id
             LIMIT $6
         ) page
         WHERE through - size < $7
         ORDER BY event_id"#,
        feed.as_str(),
        after,
        task_type,
        status,
        filter.droplet_id,
        limit.events,
        limit.bytes,
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| (r.event_id, r.envelope)).collect())
}
