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

/// The fields of a task or droplet that can make an event too large for NOTIFY; a replica
/// reads them back from the database.
pub(crate) fn bulky_fields(feed: Feed) -> &'static [&'static str] {
    match feed {
        Feed::Tasks => &["payload", "result", "description", "error_message"],
        Feed::Droplets => &["capabilities"],
    }
}

pub(crate) fn subject_key(feed: Feed) -> &'static str {
    match feed {
        Feed::Tasks => "task",
        Feed::Droplets => "droplet",
    }
}

/// A NOTIFY message for an event too large to carry whole. It keeps everything the event
/// says about the moment of the change (status, droplet, timestamps, extras) and leaves out
/// only the bulky fields, which the replicas load by id; a replica that loaded the whole row
/// instead would show a later state than the event's (and filter on it).
fn reference(event: &Event) -> Value {
    let key = subject_key(event.feed);
    let mut payload = event.envelope["payload"].clone();
    if let Some(subject) = payload.get_mut(key).and_then(Value::as_object_mut) {
        for field in bulky_fields(event.feed) {
            subject.remove(*field);
        }
    }
    let slim = json!({
        "ref": true,
        "omitted": bulky_fields(event.feed),
        "trace_id": event.envelope["trace_id"],
        "timestamp": event.envelope["timestamp"],
        "payload": payload,
    });
    if slim.to_string().len() + 2 <= NOTIFY_LIMIT {
        return slim;
    }
    // Still too large (huge extras): only the kind and the ids; the row is loaded whole.
    let original = &event.envelope["payload"];
    let mut payload = json!({
        "event": original["event"],
        key: { "id": original[key]["id"], "droplet_id": original[key]["droplet_id"] },
    });
    if let Some(previous) = original.get("previous_status").filter(|p| p.is_string()) {
        payload["previous_status"] = previous.clone();
    }
    json!({
        "ref": true,
        "omitted": "all",
        "trace_id": event.envelope["trace_id"],
        "timestamp": event.envelope["timestamp"],
        "payload": payload,
    })
}

/// A CTE for a statement that changes a droplet's status in one round trip (the heartbeat):
/// given the changed row as `up` and the row before as `old`, it queues a
/// `droplet_health_changed` reference in that same statement's transaction when the status
/// changed; each listener completes it from the row. Reference the CTE (`SELECT COUNT(*)
/// FROM health_event`) or PostgreSQL skips it.
pub const HEARTBEAT_HEALTH_EVENT_CTE: &str = "health_event AS (
    SELECT pg_notify('orchestrator_droplets', json_build_array(json_build_object(
        'ref', true, 'omitted', 'all',
        'trace_id', gen_random_uuid()::text,
        'timestamp', to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
        'payload', json_build_object(
            'event', 'droplet_health_changed', 'previous_status', old.status, 'reason', 'heartbeat',
            'droplet', json_build_object('id', up.droplet_id, 'droplet_id', up.droplet_id, 'status', up.status))
    ))::text)
    FROM up, old WHERE up.status IS DISTINCT FROM old.status
)";

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_task_event_travels_as_a_reference_that_keeps_the_moment_of_the_change() {
        let task = json!({"id": 7, "status": "assigned", "assigned_droplet_id": 8, "task_type": "verify",
                          "payload": {"blob": "x".repeat(20_000)}, "result": null});
        let event = Event::task(
            TaskEventKind::TaskAssigned,
            Some("t".into()),
            task,
            Some(json!({"previous_status": "pending"})),
        );
        let r = reference(&event);
        assert!(r.to_string().len() < NOTIFY_LIMIT);
        assert_eq!(r["payload"]["task"]["status"], "assigned");
        assert_eq!(r["payload"]["task"]["assigned_droplet_id"], 8);
        assert_eq!(r["payload"]["previous_status"], "pending");
        assert!(r["payload"]["task"].get("payload").is_none());
        assert_eq!(r["omitted"][0], "payload");
    }

    #[test]
    fn huge_extras_fall_back_to_ids_only() {
        let event = Event::droplet(
            DropletEventKind::DropletRegistered,
            json!({"id": 8, "droplet_id": 8, "status": "active"}),
            Some(json!({"note": "n".repeat(10_000)})),
        );
        let r = reference(&event);
        assert!(r.to_string().len() < NOTIFY_LIMIT);
        assert_eq!(r["omitted"], "all");
        assert_eq!(r["payload"]["droplet"]["droplet_id"], 8);
        assert!(r["payload"].get("previous_status").is_none());
    }

    #[test]
    fn the_heartbeat_event_goes_to_the_droplets_channel() {
        assert!(HEARTBEAT_HEALTH_EVENT_CTE.contains(&format!("'{}'", Feed::Droplets.channel())));
        assert!(
            HEARTBEAT_HEALTH_EVENT_CTE.contains(DropletEventKind::DropletHealthChanged.as_str())
        );
    }
}
