//! The LISTEN side: one dedicated connection per replica receives every feed's NOTIFY
//! messages and hands them to the local hub; a lost connection is re-established and the
//! gap logged.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use super::{subject_key, Feed};
use crate::services::{droplets, tasks};
use crate::state::AppState;

pub async fn run_listener(state: AppState, stop: CancellationToken) {
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
        if let Err(e) = listener
            .listen_all([Feed::Tasks.channel(), Feed::Droplets.channel()])
            .await
        {
            note_lost(&state, &mut lost_at, &e.to_string());
            if sleep_or_stop(&stop, Duration::from_secs(1)).await {
                return;
            }
            continue;
        }
        if let Some(since) = lost_at.take() {
            tracing::warn!(
                gap_ms = since.elapsed().as_millis() as u64,
                "event listener reconnected; events committed during the gap were not delivered"
            );
            state.events.set_listener(|l| l.reconnects += 1);
        }
        state.events.set_listener(|l| {
            l.connected = true;
            l.last_error = None;
        });
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                received = listener.try_recv() => match received {
                    Ok(Some(notification)) => {
                        if let Some(feed) = Feed::from_channel(notification.channel()) {
                            deliver(&state, feed, notification.payload()).await;
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
                }
            }
        }
        if sleep_or_stop(&stop, Duration::from_millis(200)).await {
            return;
        }
    }
}

fn note_lost(state: &AppState, lost_at: &mut Option<Instant>, error: &str) {
    if lost_at.is_none() {
        tracing::warn!(
            error,
            "event listener lost its database connection; reconnecting"
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

async fn deliver(state: &AppState, feed: Feed, payload: &str) {
    // Nobody to tell on this replica: skip the parsing (routing bursts send thousands).
    if state.events.connection_count() == 0 {
        state
            .events
            .set_listener(|l| l.last_event_at = Some(crate::udc::now_iso()));
        return;
    }
    let events: Vec<Value> = match serde_json::from_str(payload) {
        Ok(Value::Array(items)) => items,
        Ok(other) => vec![other],
        Err(e) => {
            tracing::warn!(error = %e, "unreadable event notification");
            return;
        }
    };
    state
        .events
        .set_listener(|l| l.last_event_at = Some(crate::udc::now_iso()));
    for event in events {
        let envelope = if event.get("ref").and_then(Value::as_bool) == Some(true) {
            resolve(state, feed, &event).await
        } else {
            event
        };
        state.events.publish_envelope(feed, &envelope);
    }
}

/// Rebuilds an event that was too large for NOTIFY: the fields the sender left out are read
/// from the database. When the row cannot be read the event still goes out without them,
/// because a dashboard missing an event is worse than one missing a task's payload.
async fn resolve(state: &AppState, feed: Feed, r: &Value) -> Value {
    let key = subject_key(feed);
    let mut payload = r["payload"].clone();
    let loaded = match feed {
        Feed::Tasks => match payload[key]["id"]
            .as_i64()
            .and_then(|id| i32::try_from(id).ok())
        {
            Some(id) => tasks::load(&state.db, id)
                .await
                .ok()
                .flatten()
                .and_then(|t| serde_json::to_value(t).ok()),
            None => None,
        },
        Feed::Droplets => match payload[key]["droplet_id"]
            .as_i64()
            .and_then(|id| i32::try_from(id).ok())
        {
            Some(id) => droplets::load(&state.db, id)
                .await
                .ok()
                .flatten()
                .and_then(|d| serde_json::to_value(d).ok()),
            None => None,
        },
    };
    match (loaded, &r["omitted"]) {
        (Some(row), Value::Array(fields)) => {
            if let Some(subject) = payload.get_mut(key).and_then(Value::as_object_mut) {
                for field in fields.iter().filter_map(Value::as_str) {
                    if let Some(v) = row.get(field) {
                        subject.insert(field.to_string(), v.clone());
                    }
                }
            }
        }
        (Some(mut row), _) => {
            // What the reference says about the moment of the change wins over the row's
            // current values.
            if let (Some(now), Some(then)) = (row.as_object_mut(), payload[key].as_object()) {
                for (k, v) in then.iter().filter(|(_, v)| !v.is_null()) {
                    now.insert(k.clone(), v.clone());
                }
            }
            payload[key] = row;
        }
        (None, _) => tracing::warn!(
            feed = feed.as_str(),
            "event too large for NOTIFY and its row could not be loaded; sent without its bulky fields"
        ),
    }
    json!({
        "udc_version": crate::udc::UDC_VERSION,
        "trace_id": r["trace_id"],
        "source": 10,
        "target": null,
        "message_type": "event",
        "payload": payload,
        "timestamp": r["timestamp"],
    })
}
