//! The reader of each replica: follows the `events` log from where it stands and hands each
//! event, with its `event_id`, to the local hub. The relay's NOTIFY wakes it; a short poll is
//! the safety net. A lost connection loses nothing: the reader goes on from its last id.
//!
//! It also keeps the contract directory (`contract_directory.rs`) current: loaded whole once
//! the reader stands at the log's end (at start, and again after a lost connection, when it
//! was forgotten), then changed by each `droplet_registered` event it reads.

use std::time::{Duration, Instant};

use bytes::Bytes;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use sqlx::PgPool;

use super::hub::{EventHub, EventMeta};
use super::{DropletEventKind, Feed, EVENTS_CHANNEL};
use crate::services::contract_directory::{ContractDirectory, Listed};
use crate::services::contracts::Contracts;
use crate::services::Core;

/// What the reader uses of the services' shared parts: the pool, the hub it feeds, and the
/// contract directory it keeps (with the compiled contracts).
#[derive(Clone)]
pub struct Reader {
    db: PgPool,
    events: EventHub,
    directory: Arc<ContractDirectory>,
    contracts: Arc<Contracts>,
}

impl From<&Core> for Reader {
    fn from(core: &Core) -> Reader {
        Reader {
            db: core.db.clone(),
            events: core.events.clone(),
            directory: core.directory.clone(),
            contracts: core.contracts.clone(),
        }
    }
}

/// How often the reader looks without a wake-up.
const POLL: Duration = Duration::from_millis(250);
const BATCH: i64 = 2000;

/// The newest event id in the log (0 when empty).
pub async fn newest_event_id(db: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(r#"SELECT COALESCE(MAX(event_id), 0) AS "newest!" FROM events"#)
        .fetch_one(db)
        .await
}

pub async fn run_listener(state: Reader, stop: CancellationToken) {
    let mut last = loop {
        match newest_event_id(&state.db).await {
            Ok(id) => break id,
            Err(e) => {
                note_lost(&state, &mut None, &e.to_string());
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
        let mut listener = match PgListener::connect_with(&state.db).await {
            Ok(l) => l,
            Err(e) => {
                note_lost(&state, &mut lost_at, &e.to_string());
                if sleep_or_stop(&stop, Duration::from_secs(1)).await {
                    return;
                }
                continue;
            }
        };
        if let Err(e) = listener.listen(EVENTS_CHANNEL).await {
            note_lost(&state, &mut lost_at, &e.to_string());
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
            state.events.set_listener(|l| l.reconnects += 1);
        }
        state.events.set_listener(|l| {
            l.connected = true;
            l.last_error = None;
        });
        loop {
            // The contract directory, when forgotten (at start, after a lost connection or a
            // failed reload): the events from `last` on are read next, so it misses none.
            if !state.directory.is_known() {
                if let Err(e) =
                    ContractDirectory::reload(&state.directory, &state.db, &state.contracts).await
                {
                    note_lost(&state, &mut lost_at, &e.to_string());
                    break;
                }
            }
            // Read everything there is, then wait for a wake-up or the poll. A read short of
            // a full batch has reached the log's end: the next round's NOTIFY (queued while
            // this one read, if it came meanwhile) wakes the reader, so it does not read again
            // only to find nothing (a transaction per round saved).
            match read_after(&state, last).await {
                Ok(Some((newest, full))) => {
                    last = newest;
                    if full {
                        continue;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    note_lost(&state, &mut lost_at, &e.to_string());
                    break;
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(POLL) => {}
                received = listener.try_recv() => match received {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        note_lost(&state, &mut lost_at, "connection closed");
                        break;
                    }
                    Err(e) => {
                        note_lost(&state, &mut lost_at, &e.to_string());
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

/// Publishes the events after `last` to the local hub; the newest id read and whether the
/// read was a full batch (more may follow at once), or None when there was nothing new.
///
/// The reader forwards each envelope without parsing it: PostgreSQL keeps it as the text the
/// relay wrote (`json`), the same text a resuming client's replay sends, so a client sees one
/// text per event id on either path. The fields the clients' filters look at (`EventMeta`)
/// were written beside it; only a `droplet_registered` event is parsed, for the contract
/// directory.
async fn read_after(state: &Reader, last: i64) -> Result<Option<(i64, bool)>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT event_id AS "event_id!", feed AS "feed!", envelope::text AS "text!",
                  kind, task_type, status, droplet_id
           FROM events WHERE event_id > $1 ORDER BY event_id LIMIT $2"#,
        last,
        BATCH,
    )
    .fetch_all(&state.db)
    .await?;
    let Some(newest) = rows.last().map(|r| r.event_id) else {
        return Ok(None);
    };
    let full = rows.len() as i64 >= BATCH;
    state
        .events
        .set_listener(|l| l.last_event_at = Some(crate::protocol::now_iso()));
    let mut registered = Vec::new();
    for row in rows {
        let Some(feed) = Feed::parse(&row.feed) else {
            continue;
        };
        if feed == Feed::Droplets
            && row.kind.as_deref() == Some(DropletEventKind::DropletRegistered.as_str())
        {
            let envelope = serde_json::from_str::<serde_json::Value>(&row.text);
            if let Some(droplet) = envelope
                .ok()
                .and_then(|e| Listed::from_event(&e["payload"]["droplet"]))
            {
                registered.push(droplet);
            }
        }
        let meta = EventMeta {
            task_type: row.task_type,
            status: row.status,
            droplet_id: row.droplet_id,
        };
        state
            .events
            .publish(feed, row.event_id, Bytes::from(row.text), &meta);
    }
    ContractDirectory::apply_off_workers(&state.directory, registered, &state.contracts).await;
    Ok(Some((newest, full)))
}

/// The reader lost the log: until it reads it again, the contract directory may miss a
/// registration, so creations read the database instead.
fn note_lost(state: &Reader, lost_at: &mut Option<Instant>, error: &str) {
    state.directory.forget();
    // A pool closed for shutdown is not a lost database: the reader is about to stop.
    if lost_at.is_none() && !state.db.is_closed() {
        tracing::warn!(
            error,
            "event reader lost its database connection; reconnecting"
        );
        *lost_at = Some(Instant::now());
    }
    state.events.set_listener(|l| {
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
