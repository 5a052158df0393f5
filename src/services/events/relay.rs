//! The relay: one per database (whichever replica holds the advisory lock at each round)
//! moves committed events from `event_outbox` into the numbered `events` log, in order, then
//! hands what it published to its own replica's reader ([`Round`]) and wakes every replica's
//! reader with one NOTIFY per round, sent after the round committed (never inside a writing
//! transaction: a notifying commit takes PostgreSQL's global notify lock, which would
//! serialise the relay's commits with every other notifier's). Its payload is the round's
//! newest event id, so a reader that already has it does not read the log again. It also
//! trims the log to `EVENT_RETENTION_SECONDS`.
//!
//! Order: each round publishes the committed outbox rows in outbox order. Changes of one task
//! or droplet are made under its row lock, so the later change's row is added after the
//! earlier change committed: it has a larger outbox id and is never visible without the
//! earlier one. A client sees each task's and droplet's events in the order they happened, on
//! every replica. (Events of different subjects may be numbered in another order than their
//! outbox ids: a transaction still running is simply published in a later round.) Waiting
//! for the oldest running transaction instead would let any open transaction on the server,
//! in any database, hold every event back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::services::core::Settings;
use crate::services::locks::Singleton;

/// The NOTIFY channel that wakes the readers; its payload is the round's newest event id.
pub const EVENTS_CHANNEL: &str = "orchestrator_events";
/// Most events one round publishes.
const BATCH: i64 = 5000;

/// An event as the log keeps it: its id, feed and text (the envelope, forwarded unparsed),
/// and the fields the clients' filters look at.
#[derive(Debug, Clone)]
pub struct LogRow {
    pub event_id: i64,
    pub feed: String,
    pub text: String,
    pub kind: Option<String>,
    pub task_type: Option<String>,
    pub status: Option<String>,
    pub droplet_id: Option<i32>,
}

/// What one round published, handed by the relay to its own replica's reader after the
/// commit: the rows, in order, and the newest event id in the log before them. The reader
/// hands the rows to its hub without reading the log when it already stands at `before` or
/// later; otherwise events it lacks came before them, and it reads the log.
#[derive(Debug)]
pub struct Round {
    pub before: i64,
    pub rows: Vec<LogRow>,
}

/// The wake-up of this replica's relay, shared by whoever commits events.
#[derive(Clone, Default)]
pub struct RelayWake(Arc<Notify>);

impl RelayWake {
    /// Called once a transaction that recorded events has committed: this replica's relay
    /// publishes them at once (a permit, should it be in a round right now). Woken before
    /// the commit, it would find them not yet visible and leave them to its next poll,
    /// `EVENT_RELAY_POLL_MS`. Another replica's relay finds them within that poll.
    pub fn committed(&self) {
        self.0.notify_one();
    }
}

/// One round: how many events were published (None: another replica holds the relay), each
/// stamped with `source`, the orchestrator's configured id. Wakes the readers as a round of
/// the relay does, and hands the rows to no one.
pub async fn publish_round(db: &PgPool, source: i32) -> Result<Option<u64>, sqlx::Error> {
    let round = publish(db, source).await?;
    if let Some(newest) = round.as_ref().and_then(|r| r.rows.last()) {
        notify(db, newest.event_id).await;
    }
    Ok(round.map(|r| r.rows.len() as u64))
}

/// The readers' wake-up, in its own statement after the round's commit, never in the writing
/// transaction (see the module's comment), with the newest event id published.
async fn notify(db: &PgPool, newest: i64) {
    let _ = sqlx::query!(
        "SELECT pg_notify($1, $2)",
        EVENTS_CHANNEL,
        newest.to_string()
    )
    .execute(db)
    .await;
}

/// One round, committed: what it published (None: another replica holds the relay).
async fn publish(db: &PgPool, source: i32) -> Result<Option<Round>, sqlx::Error> {
    let mut tx = db.begin().await?;
    // The relay's lock (`Singleton::EventRelay`: a round another replica holds is skipped,
    // never waited for) and, in the same round trip, no sequential scan of the outbox. It is
    // a queue: its deleted rows stay in its pages until a vacuum, so its size swings, and a
    // plan kept from the nearly empty outbox of the first rounds deleted through a sequential
    // scan of every page, dead rows included (a 24 MB outbox scanned at each of ~70 rounds a
    // second at 300 tasks/s). For this transaction only; the statement's plan is still kept.
    let locked = sqlx::query!(
        r#"SELECT pg_try_advisory_xact_lock($1) AS "locked!",
                  set_config('enable_seqscan', 'off', true) AS "seqscan!""#,
        Singleton::EventRelay.id()
    )
    .fetch_one(&mut *tx)
    .await?
    .locked;
    if !locked {
        tx.rollback().await?;
        return Ok(None);
    }
    // An envelope in the outbox's form (`protocol::OutboxEvent`, `OUTBOX_EVENT_HEAD`) is
    // published by writing its source and event id before the rest of its text, without
    // parsing it; any other (a row written by hand) through jsonb. A row that came without
    // what the filters look at (written by hand, or by a replica older than the migration that
    // added it) gets it read from its envelope (`event_meta`, in that migration).
    // The published rows come back with the newest event id before them: the outer `SELECT`
    // reads `events` as it was before this statement's insert (a statement does not see its
    // own `WITH` parts' changes), and after every earlier round's commit (the relay's lock is
    // released only once its round is visible).
    let published = sqlx::query!(
        r#"WITH ready AS (
            SELECT id, feed, kind, task_type, status, droplet_id, envelope
            FROM event_outbox ORDER BY id LIMIT $1
         ),
         gone AS (DELETE FROM event_outbox WHERE id IN (SELECT id FROM ready)),
         numbered AS (
            SELECT nextval('event_ids') AS event_id, feed, kind, task_type, status, droplet_id,
                   envelope::text AS text
            FROM (SELECT * FROM ready ORDER BY id) r
         ),
         added AS (
            INSERT INTO events (event_id, feed, kind, task_type, status, droplet_id, envelope)
            SELECT event_id, n.feed,
                   CASE WHEN n.kind IS NULL THEN m.kind ELSE n.kind END,
                   CASE WHEN n.kind IS NULL THEN m.task_type ELSE n.task_type END,
                   CASE WHEN n.kind IS NULL THEN m.status ELSE n.status END,
                   CASE WHEN n.kind IS NULL THEN m.droplet_id ELSE n.droplet_id END,
                   CASE WHEN left(text, 13) = '{"payload":{"'
                        THEN ('{"source":' || $2::int || ',"payload":{"event_id":' || event_id
                              || ',' || substr(text, 13))::json
                        ELSE jsonb_set(jsonb_set(text::jsonb, '{payload,event_id}', to_jsonb(event_id)),
                                       '{source}', to_jsonb($2::int))::json
                   END
            FROM numbered n
            LEFT JOIN LATERAL event_meta(n.feed, CASE WHEN n.kind IS NULL THEN n.text::jsonb END) m ON true
            ORDER BY event_id
            RETURNING event_id, feed, envelope, kind, task_type, status, droplet_id
         )
         SELECT (SELECT COALESCE(MAX(event_id), 0) FROM events) AS "before!",
                event_id AS "event_id!", feed AS "feed!", envelope::text AS "text!",
                kind, task_type, status, droplet_id
         FROM added ORDER BY event_id"#,
        BATCH,
        source
    )
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let before = published.first().map_or(0, |r| r.before);
    let rows = published
        .into_iter()
        .map(|r| LogRow {
            event_id: r.event_id,
            feed: r.feed,
            text: r.text,
            kind: r.kind,
            task_type: r.task_type,
            status: r.status,
            droplet_id: r.droplet_id,
        })
        .collect();
    Ok(Some(Round { before, rows }))
}

/// Deletes the events older than the retention (in batches), and records the newest id
/// deleted in the same statement.
pub async fn trim(db: &PgPool, retention_seconds: u64) -> Result<u64, sqlx::Error> {
    let keep = retention_seconds as f64;
    let mut deleted = 0;
    loop {
        let n: i64 = sqlx::query_scalar!(
            r#"WITH gone AS (
                DELETE FROM events WHERE event_id IN (
                    SELECT event_id FROM events
                    WHERE published_at < NOW() - make_interval(secs => $1::double precision)
                    ORDER BY event_id LIMIT 5000)
                RETURNING event_id
             ), noted AS (
                UPDATE event_log_state
                SET trimmed_through = GREATEST(trimmed_through, (SELECT MAX(event_id) FROM gone))
                WHERE EXISTS (SELECT 1 FROM gone)
                RETURNING 1
             )
             SELECT COUNT(*) AS "n!" FROM gone"#,
            keep
        )
        .fetch_one(db)
        .await?;
        let n = n as u64;
        deleted += n;
        if n < 5000 {
            return Ok(deleted);
        }
    }
}

/// The relay loop of this replica: a round at each local commit that wrote events and every
/// `EVENT_RELAY_POLL_MS`; rounds run back to back while there is a backlog. It uses the pool,
/// the orchestrator's id (the source of what it publishes) and the settings (the retention),
/// and hands each round to this replica's reader through `reader` before the NOTIFY.
pub async fn run_relay(
    db: PgPool,
    source: i32,
    settings: Settings,
    wake: RelayWake,
    reader: mpsc::Sender<Round>,
    stop: CancellationToken,
) {
    let mut last_trim = Instant::now();
    let mut failing = false;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let round = publish(&db, source).await;
        let more = match round {
            Ok(Some(round)) => {
                failing = false;
                let n = round.rows.len();
                if let Some(newest) = round.rows.last().map(|r| r.event_id) {
                    // The local reader has the rows at once. Should it lag (the channel full),
                    // the NOTIFY's newest id tells it to read the log.
                    let _ = reader.try_send(round);
                    notify(&db, newest).await;
                }
                n as i64 >= BATCH
            }
            Ok(None) => false,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "event relay round failed; retrying");
                }
                failing = true;
                false
            }
        };
        if last_trim.elapsed() > Duration::from_secs(10) {
            last_trim = Instant::now();
            if let Err(e) = trim(&db, settings.current().event_retention_seconds).await {
                tracing::debug!(error = %e, "event log trim failed");
            }
        }
        if more {
            continue;
        }
        let wait = if failing {
            Duration::from_secs(1)
        } else {
            settings.current().event_relay_poll
        };
        // The writer woke it after its commit: its events are visible now.
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = wake.0.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
