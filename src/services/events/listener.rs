//! The reader of each replica: follows the `events` log from where it stands and hands each
//! event, with its `event_id`, to the local hub. The rounds of its own replica's relay come
//! to it with their rows (`relay::Round`), handed on without reading the log when nothing
//! came before them that it lacks; another replica's rounds wake it by their NOTIFY (whose
//! newest id it compares with its own); a short poll is the safety net. A lost connection
//! loses nothing: the reader goes on from its last id.
//!
//! It also keeps the contract directory (`contract_directory.rs`) current: loaded whole once
//! the reader stands at the log's end (at start, and again after a lost connection, when it
//! was forgotten), then changed by each `droplet_registered` event it reads.

use std::time::{Duration, Instant};

use bytes::Bytes;
use sqlx::postgres::PgListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use sqlx::PgPool;

use super::hub::{EventHub, EventMeta};
use super::relay::{LogRow, Round};
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

/// Follows the log until `stop`; `relayed` brings this replica's relay's rounds.
pub async fn run_listener(
    state: Reader,
    mut relayed: mpsc::Receiver<Round>,
    stop: CancellationToken,
) {
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
        // Whether the log may hold events after `last` that the reader has not read.
        let mut behind = true;
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
                behind = true;
            }
            // Read everything there is, then wait. A read short of a full batch has reached
            // the log's end: the next round (handed over, or its NOTIFY, queued while this one
            // read if it came meanwhile) wakes the reader, so it does not read again only to
            // find nothing (a transaction per round saved).
            if behind {
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
                behind = false;
            }
            // `biased`: a round handed over is taken before its own NOTIFY, which then finds
            // the reader at its newest id.
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                Some(round) = relayed.recv() => match take_round(&state, last, round).await {
                    Some(newest) => last = newest,
                    None => behind = true,
                },
                received = listener.try_recv() => match received {
                    Ok(Some(n)) => {
                        // A round the reader already has (its own relay's, handed over) is
                        // not read again; a payload that is no id is read for.
                        if n.payload().parse::<i64>().map_or(true, |newest| newest > last) {
                            behind = true;
                        }
                    }
                    Ok(None) => {
                        note_lost(&state, &mut lost_at, "connection closed");
                        break;
                    }
                    Err(e) => {
                        note_lost(&state, &mut lost_at, &e.to_string());
                        break;
                    }
                },
                _ = tokio::time::sleep(POLL) => behind = true,
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
    let rows = sqlx::query_as!(
        LogRow,
        r#"SELECT event_id AS "event_id!", feed AS "feed!", envelope::text AS "text!",
                  kind, task_type, status, droplet_id
           FROM events WHERE event_id > $1 ORDER BY event_id LIMIT $2"#,
        last,
        BATCH,
    )
    .fetch_all(&state.db)
    .await?;
    state.events.set_listener(|l| l.log_reads += 1);
    let full = rows.len() as i64 >= BATCH;
    Ok(hand_to_hub(state, rows).await.map(|newest| (newest, full)))
}

/// A round of this replica's relay: its rows after `last` go to the hub, unless the log may
/// hold events between `last` and them (another replica's round, or one this reader has not
/// read yet), which are read from the log instead (None). The newest id the reader has.
async fn take_round(state: &Reader, last: i64, round: Round) -> Option<i64> {
    if round.before > last {
        return None;
    }
    state.events.set_listener(|l| l.rounds_handed += 1);
    let rows: Vec<LogRow> = round
        .rows
        .into_iter()
        .filter(|r| r.event_id > last)
        .collect();
    Some(hand_to_hub(state, rows).await.unwrap_or(last))
}

/// Hands the rows to the local hub, in order, and the `droplet_registered` ones to the
/// contract directory; the newest id, or None when there were none.
async fn hand_to_hub(state: &Reader, rows: Vec<LogRow>) -> Option<i64> {
    let newest = rows.last()?.event_id;
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
    Some(newest)
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
