//! The reader of each replica: follows the `events` log from where it stands and hands each
//! event, with its `event_id`, to the local hub. The relay's NOTIFY wakes it; a short poll is
//! the safety net. A lost connection loses nothing: the reader goes on from its last id.

use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use super::{Feed, EVENTS_CHANNEL};
use sqlx::PgPool;

use super::hub::EventHub;

/// How often the reader looks without a wake-up.
const POLL: Duration = Duration::from_millis(250);
const BATCH: i64 = 2000;

/// The newest event id in the log (0 when empty).
pub async fn newest_event_id(db: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(r#"SELECT COALESCE(MAX(event_id), 0) AS "newest!" FROM events"#)
        .fetch_one(db)
        .await
}

/// This replica's reader of the event log: it needs only the pool and the hub it feeds.
pub async fn run_listener(db: PgPool, events: EventHub, stop: CancellationToken) {
    let mut last = loop {
        match newest_event_id(&db).await {
            Ok(id) => break id,
            Err(e) => {
                note_lost(&db, &events, &mut None, &e.to_string());
                if sleep_or_stop(&stop, Duration::from_secs(1)).await {
                    return;
                }
            }
        }
    };
    let mut lost_at: Option<Instant> = None;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let mut listener = match PgListener::connect_with(&db).await {
            Ok(l) => l,
            Err(e) => {
                note_lost(&db, &events, &mut lost_at, &e.to_string());
                if sleep_or_stop(&stop, Duration::from_secs(1)).await {
                    return;
                }
                continue;
            }
        };
        if let Err(e) = listener.listen(EVENTS_CHANNEL).await {
            note_lost(&db, &events, &mut lost_at, &e.to_string());
            if sleep_or_stop(&stop, Duration::from_secs(1)).await {
                return;
            }
            continue;
        }
        if let Some(since) = lost_at.take() {
            tracing::warn!(
                gap_ms = since.elapsed().as_millis() as u64,
                "event reader reconnected; it goes on from event {last}"
            );
            events.set_listener(|l| l.reconnects += 1);
        }
        events.set_listener(|l| {
            l.connected = true;
            l.last_error = None;
        });
        loop {
            // Read everything there is, then wait for a wake-up or the poll.
            match read_after(&db, &events, last).await {
                Ok(Some(newest)) => {
                    last = newest;
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    note_lost(&db, &events, &mut lost_at, &e.to_string());
                    break;
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(POLL) => {}
                received = listener.try_recv() => match received {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        note_lost(&db, &events, &mut lost_at, "connection closed");
                        break;
                    }
                    Err(e) => {
                        note_lost(&db, &events, &mut lost_at, &e.to_string());
                        break;
                    }
                }
            }
        }
        if sleep_or_stop(&stop, Duration::from_millis(200)).await {
            return;
        }
    }
}

/// Publishes the events after `last` to the local hub; the newest id read, or None when
/// there was nothing new.
async fn read_after(db: &PgPool, events: &EventHub, last: i64) -> Result<Option<i64>, sqlx::Error> {
    let rows: Vec<(i64, String, Value)> = sqlx::query!(
        "SELECT event_id, feed, envelope FROM events WHERE event_id > $1 ORDER BY event_id LIMIT $2",
        last,
        BATCH
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .map(|r| (r.event_id, r.feed, r.envelope))
    .collect();
    let Some(newest) = rows.last().map(|r| r.0) else {
        return Ok(None);
    };
    events.set_listener(|l| l.last_event_at = Some(crate::protocol::now_iso()));
    for (id, feed, envelope) in rows {
        if let Some(feed) = Feed::parse(&feed) {
            events.publish_event(feed, id, &envelope);
        }
    }
    Ok(Some(newest))
}

fn note_lost(db: &PgPool, events: &EventHub, lost_at: &mut Option<Instant>, error: &str) {
    // A pool closed for shutdown is not a lost database: the reader is about to stop.
    if lost_at.is_none() && !db.is_closed() {
        tracing::warn!(
            error,
            "event reader lost its database connection; reconnecting"
        );
        *lost_at = Some(Instant::now());
    }
    events.set_listener(|l| {
        l.connected = false;
        l.last_error = Some(error.to_string());
    });
}

async fn sleep_or_stop(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}
