//! The numbered event log clients resume from: its bounds, the events after an id, and the
//! `resync_required` frame for a client whose events are no longer all there.

use serde_json::{json, Value};
use sqlx::PgPool;

use super::{event_envelope, Feed};

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
    sqlx::query_as(
        "SELECT (SELECT trimmed_through FROM event_log_state) AS trimmed_through,
                (SELECT MIN(event_id) FROM events) AS oldest,
                (SELECT MAX(event_id) FROM events) AS newest",
    )
    .fetch_one(db)
    .await
}

/// At most `limit` events of a feed after `after`, in order: `(event_id, envelope)`.
pub async fn after(
    db: &PgPool,
    feed: Feed,
    after: i64,
    limit: i64,
) -> Result<Vec<(i64, Value)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT event_id, envelope FROM events WHERE feed = $1 AND event_id > $2
         ORDER BY event_id LIMIT $3",
    )
    .bind(feed.as_str())
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await
}
