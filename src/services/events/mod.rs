//! Events for dashboards: written to `event_outbox` inside the transaction that made the
//! change (durable with it, gone with a rollback, and nothing that serialises commits), moved
//! in order into the numbered `events` log by one relay per database, read by every replica
//! and fanned out to its WebSocket clients; clients resume from an `event_id`.

mod hub;
mod listener;
pub mod log;
mod relay;

pub use hub::{ClientFilter, ClientId, ClientRegistration, EventHub, Outbound, WsStats};
pub use listener::{newest_event_id, run_listener};
pub use relay::{run_relay, EVENTS_CHANNEL};

use serde::Serialize;
use serde_json::{json, Value};
use sqlx::PgConnection;

use crate::protocol::{Envelope, ORCHESTRATOR_SOURCE};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Feed {
    Tasks,
    Droplets,
}

impl Feed {
    pub const ALL: [Feed; 2] = [Feed::Tasks, Feed::Droplets];

    pub fn parse(name: &str) -> Option<Feed> {
        match name {
            "tasks" => Some(Feed::Tasks),
            "droplets" => Some(Feed::Droplets),
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
    /// A drained droplet holds no more tasks (issue 27: a deploy may proceed).
    DropletDrained,
}

impl DropletEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DropletEventKind::DropletRegistered => "droplet_registered",
            DropletEventKind::DropletHealthChanged => "droplet_health_changed",
            DropletEventKind::DropletHeartbeatMissed => "droplet_heartbeat_missed",
            DropletEventKind::DropletDrained => "droplet_drained",
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

/// An event's envelope as the outbox keeps it: without `source`, which the relay sets to this
/// orchestrator's configured `DROPLET_ID` as it publishes the event (writers of events, the
/// state machine and SQL among them, need not know it).
fn event_envelope(trace_id: Option<String>, payload: Value) -> Value {
    let mut envelope = Envelope::new("event", ORCHESTRATOR_SOURCE, Value::Null, payload)
        .trace(trace_id)
        .to_value();
    if let Some(fields) = envelope.as_object_mut() {
        fields.remove("source");
    }
    envelope
}

/// A CTE for a statement that changes a droplet's status in one round trip (the heartbeat):
/// given the changed rows as `up` and the rows before as `old` (`old_id`, `old_status`), it adds a
/// `droplet_health_changed` event to the outbox in that same statement's transaction when the
/// status changed (PostgreSQL runs a data-modifying CTE whether or not the query reads it).
/// Declared once, as a literal that calls `$m!` with `$before`, the CTE, then `$after` (as
/// the column lists do, see `sql_columns.rs`), so that a checked statement can splice it.
macro_rules! heartbeat_health_event {
    ($($m:ident)::+ { $($before:tt)* } { $($after:tt)* }) => {
        $($m)::+!($($before)* "health_event AS (
    INSERT INTO event_outbox (feed, envelope)
    SELECT 'droplets', jsonb_build_object(
        'udc_version', '1.0',
        'trace_id', gen_random_uuid()::text,
        'target', NULL,
        'message_type', 'event',
        'timestamp', to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
        'payload', jsonb_build_object(
            'event', 'droplet_health_changed', 'previous_status', old.old_status, 'reason', 'heartbeat',
            'droplet', jsonb_build_object(
                'id', up.droplet_id, 'droplet_id', up.droplet_id, 'name', up.name,
                'steward', up.steward, 'endpoint', up.endpoint,
                'capabilities', COALESCE(up.capabilities, '[]'::jsonb), 'status', up.status,
                'last_heartbeat', to_char(up.last_heartbeat, 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                'registered_at', to_char(up.registered_at, 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                'updated_at', to_char(up.updated_at, 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                'max_concurrent_tasks', up.max_concurrent_tasks,
                'admin_deactivated', up.admin_deactivated, 'registered', up.registered)))
    FROM up JOIN old ON old.old_id = up.id WHERE up.status IS DISTINCT FROM old.old_status
    ORDER BY up.id
    RETURNING 1
)" $($after)*)
    };
}
pub(crate) use heartbeat_health_event;

/// Adds the events to the outbox in the caller's transaction: they are published once it
/// commits, in order, to every replica, and never if it rolls back. A plain insert: no
/// NOTIFY, so concurrent writers still share PostgreSQL's group commit.
pub async fn record(conn: &mut PgConnection, events: &[Event]) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let feeds: Vec<&str> = events.iter().map(|e| e.feed.as_str()).collect();
    let envelopes: Vec<&Value> = events.iter().map(|e| &e.envelope).collect();
    sqlx::query!(
        "INSERT INTO event_outbox (feed, envelope)
         SELECT f, e FROM unnest($1::text[], $2::jsonb[]) WITH ORDINALITY AS x(f, e, n) ORDER BY n",
        &feeds as &[&str],
        &envelopes as &[&Value],
    )
    .execute(conn)
    .await?;
    relay::wake();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heartbeat_event_goes_to_the_droplets_feed() {
        const HEARTBEAT_HEALTH_EVENT_CTE: &str =
            heartbeat_health_event!(crate::services::sql_columns::concat_plus {} {});
        assert!(HEARTBEAT_HEALTH_EVENT_CTE.contains(&format!("'{}'", Feed::Droplets.as_str())));
        assert!(
            HEARTBEAT_HEALTH_EVENT_CTE.contains(DropletEventKind::DropletHealthChanged.as_str())
        );
    }
}
