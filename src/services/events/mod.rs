//! Events for dashboards: built and sent through PostgreSQL NOTIFY inside the transaction
//! that made the change (so they go out once, after commit, in commit order), received by
//! every replica's listener and fanned out to its WebSocket clients.

mod hub;
mod listener;

pub use hub::{ClientFilter, ClientId, ClientRegistration, EventHub, Outbound, WsStats};
pub use listener::run_listener;

use serde::Serialize;
use serde_json::{json, Value};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::udc::{now_iso, UDC_VERSION};

/// NOTIFY payloads must stay under 8000 bytes.
const NOTIFY_LIMIT: usize = 7800;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Feed {
    Tasks,
    Droplets,
}

impl Feed {
    pub fn channel(self) -> &'static str {
        match self {
            Feed::Tasks => "orchestrator_tasks",
            Feed::Droplets => "orchestrator_droplets",
        }
    }

    pub fn from_channel(channel: &str) -> Option<Feed> {
        match channel {
            "orchestrator_tasks" => Some(Feed::Tasks),
            "orchestrator_droplets" => Some(Feed::Droplets),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Feed::Tasks => "tasks",
            Feed::Droplets => "droplets",
        }
    }
}

/// The task events of the contract, and no others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskEventKind {
    TaskCreated,
    TaskAssigned,
    TaskStarted,
    TaskCompleted,
    TaskFailed,
    TaskCancelled,
    TaskRequeued,
    TaskRetrying,
}

impl TaskEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskEventKind::TaskCreated => "task_created",
            TaskEventKind::TaskAssigned => "task_assigned",
            TaskEventKind::TaskStarted => "task_started",
            TaskEventKind::TaskCompleted => "task_completed",
            TaskEventKind::TaskFailed => "task_failed",
            TaskEventKind::TaskCancelled => "task_cancelled",
            TaskEventKind::TaskRequeued => "task_requeued",
            TaskEventKind::TaskRetrying => "task_retrying",
        }
    }
}

/// The droplet events of the contract, and no others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropletEventKind {
    DropletRegistered,
    DropletHealthChanged,
    DropletHeartbeatMissed,
}

impl DropletEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DropletEventKind::DropletRegistered => "droplet_registered",
            DropletEventKind::DropletHealthChanged => "droplet_health_changed",
            DropletEventKind::DropletHeartbeatMissed => "droplet_heartbeat_missed",
        }
    }
}

/// One event, ready to be sent: its feed, its envelope, and what filters look at.
#[derive(Debug, Clone)]
pub struct Event {
    pub feed: Feed,
    pub envelope: Value,
}

impl Event {
    /// `payload: {"event": kind, "task": {...}, ...extra}` in an event envelope.
    pub fn task(
        kind: TaskEventKind,
        trace_id: Option<String>,
        task: Value,
        extra: Option<Value>,
    ) -> Event {
        let mut payload = json!({ "event": kind.as_str(), "task": task });
        merge(&mut payload, extra);
        Event {
            feed: Feed::Tasks,
            envelope: event_envelope(trace_id, payload),
        }
    }

    /// `payload: {"event": kind, "droplet": {...}, ...extra}` in an event envelope.
    pub fn droplet(kind: DropletEventKind, droplet: Value, extra: Option<Value>) -> Event {
        let mut payload = json!({ "event": kind.as_str(), "droplet": droplet });
        merge(&mut payload, extra);
        Event {
            feed: Feed::Droplets,
            envelope: event_envelope(None, payload),
        }
    }
}

fn merge(payload: &mut Value, extra: Option<Value>) {
    if let (Some(obj), Some(Value::Object(extra))) = (payload.as_object_mut(), extra) {
        for (k, v) in extra {
            obj.entry(k).or_insert(v);
        }
    }
}

fn event_envelope(trace_id: Option<String>, payload: Value) -> Value {
    json!({
        "udc_version": UDC_VERSION,
        "trace_id": trace_id.unwrap_or_else(|| Uuid::new_v4().to_string()),
        "source": 10,
        "target": null,
        "message_type": "event",
        "payload": payload,
        "timestamp": now_iso(),
    })
}

/// A NOTIFY message too large to carry its events: the replicas load them by id.
fn reference(event: &Event) -> Value {
    let payload = &event.envelope["payload"];
    json!({
        "ref": true,
        "trace_id": event.envelope["trace_id"],
        "timestamp": event.envelope["timestamp"],
        "event": payload["event"],
        "task_id": payload["task"]["id"],
        "droplet_id": payload["droplet"]["droplet_id"],
        "previous_status": payload.get("previous_status"),
    })
}

/// Queues the events in the caller's transaction: PostgreSQL sends them at commit, in commit
/// order, to every replica's listener (this one included), and never if it rolls back.
pub async fn notify(conn: &mut PgConnection, events: &[Event]) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let mut channels: Vec<&'static str> = Vec::new();
    let mut payloads: Vec<String> = Vec::new();
    for feed in [Feed::Tasks, Feed::Droplets] {
        let mut batch = String::from("[");
        for event in events.iter().filter(|e| e.feed == feed) {
            let mut text = event.envelope.to_string();
            if text.len() + 2 > NOTIFY_LIMIT {
                text = reference(event).to_string();
            }
            if batch.len() + text.len() + 2 > NOTIFY_LIMIT && batch.len() > 1 {
                batch.push(']');
                channels.push(feed.channel());
                payloads.push(std::mem::replace(&mut batch, String::from("[")));
            }
            if batch.len() > 1 {
                batch.push(',');
            }
            batch.push_str(&text);
        }
        if batch.len() > 1 {
            batch.push(']');
            channels.push(feed.channel());
            payloads.push(batch);
        }
    }
    sqlx::query("SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS x(c, p, n) ORDER BY n")
        .bind(&channels)
        .bind(&payloads)
        .execute(conn)
        .await?;
    Ok(())
}
