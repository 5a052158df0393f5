//! The LISTEN side: one dedicated connection per replica receives every feed's NOTIFY
//! messages and hands them to the local hub; a lost connection is re-established and the
//! gap logged.

use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use serde_json::{json, Value};
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use super::hub::EventMeta;
use super::Feed;
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
            match resolve(state, feed, &event).await {
                Some(e) => e,
                None => continue,
            }
        } else {
            event
        };
        let meta = EventMeta::of(feed, &envelope);
        state
            .events
            .publish(feed, Utf8Bytes::from(envelope.to_string()), &meta);
    }
}

/// Rebuilds an event that was too large for NOTIFY from the database.
async fn resolve(state: &AppState, feed: Feed, r: &Value) -> Option<Value> {
    let mut payload = json!({ "event": r["event"] });
    match feed {
        Feed::Tasks => {
            let id = r["task_id"].as_i64()? as i32;
            let task = tasks::load(&state.db, id).await.ok()??;
            payload["task"] = serde_json::to_value(task).ok()?;
        }
        Feed::Droplets => {
            let id = r["droplet_id"].as_i64()? as i32;
            let droplet = droplets::load(&state.db, id).await.ok()??;
            payload["droplet"] = serde_json::to_value(droplet).ok()?;
            if !r["previous_status"].is_null() {
                payload["previous_status"] = r["previous_status"].clone();
            }
        }
    }
    Some(json!({
        "udc_version": crate::udc::UDC_VERSION,
        "trace_id": r["trace_id"],
        "source": 10,
        "target": null,
        "message_type": "event",
        "payload": payload,
        "timestamp": r["timestamp"],
    }))
}
