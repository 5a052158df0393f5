//! Events for dashboards: written to `event_outbox` inside the transaction that made the
//! change (durable with it, gone with a rollback, and nothing that serialises commits), moved
//! in order into the numbered `events` log by one relay per database, read by every replica
//! and fanned out to its WebSocket clients; clients resume from an `event_id`.

mod hub;
mod listener;
pub mod log;
mod relay;

pub use hub::{ClientFilter, ClientId, ClientRegistration, EventHub, EventMeta, Outbound, WsStats};
pub use listener::{newest_event_id, run_listener};
pub use relay::{publish_round, run_relay, RelayWake, EVENTS_CHANNEL};

use serde::Serialize;
use serde_json::Value;
use sqlx::PgConnection;

use crate::protocol::{Envelope, OutboxEvent, ORCHESTRATOR_SOURCE};

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

/// One event, ready to be written: its feed, its kind, what the clients' filters look at, and
/// its envelope as JSON text, serialised once by serde from the typed parts (the task or
/// droplet row borrowed, not copied into a `Value`). PostgreSQL keeps the text as it is
/// (`json`) and sends it to every client as it is.
#[derive(Debug, Clone)]
pub struct Event {
    pub feed: Feed,
    pub kind: &'static str,
    pub meta: EventMeta,
    pub envelope: String,
}

/// What an event's subject shows the clients' filters: its task type and status, and the
/// droplet it concerns (a task's assignee, or the droplet itself), written beside the
/// envelope so that neither the reader nor a replay looks inside it.
pub trait Subject: Serialize {
    fn meta(&self, feed: Feed) -> EventMeta;
}

impl<T: Subject + ?Sized> Subject for &T {
    fn meta(&self, feed: Feed) -> EventMeta {
        (**self).meta(feed)
    }
}

impl Subject for crate::services::task_store::Task {
    fn meta(&self, _feed: Feed) -> EventMeta {
        EventMeta {
            task_type: Some(self.task_type.clone()),
            status: Some(self.status.as_str().to_string()),
            droplet_id: self.assigned_droplet_id,
        }
    }
}

impl Subject for crate::services::droplet_row::Droplet {
    fn meta(&self, _feed: Feed) -> EventMeta {
        EventMeta {
            task_type: None,
            status: Some(self.status.as_str().to_string()),
            droplet_id: Some(self.droplet_id),
        }
    }
}

/// A subject given as JSON (tests, tools): read as the reader read parsed envelopes.
impl Subject for Value {
    fn meta(&self, feed: Feed) -> EventMeta {
        EventMeta::of_subject(feed, self)
    }
}

impl Event {
    /// `payload: {"event": kind, "task": {...}, ...extra}` in an event envelope; `task` is
    /// the task as it is shown (`&Task` on the service's paths).
    pub fn task(
        kind: TaskEventKind,
        trace_id: Option<String>,
        task: impl Subject,
        extra: Option<Value>,
    ) -> Event {
        Event {
            feed: Feed::Tasks,
            kind: kind.as_str(),
            meta: task.meta(Feed::Tasks),
            envelope: outbox_text(trace_id, Payload::new(kind.as_str(), "task", task, extra)),
        }
    }

    /// The event of a task's move: `payload: {"event": kind, "task": {...}, "previous_status":
    /// from, ...more}`, the fields of `more` (the move's own, e.g. why a droplet was chosen)
    /// borrowed, not copied.
    pub fn task_moved(
        kind: TaskEventKind,
        trace_id: Option<String>,
        task: impl Subject,
        previous_status: &'static str,
        more: Option<&Value>,
    ) -> Event {
        let mut payload = Payload::new(
            kind.as_str(),
            "task",
            task,
            Some(serde_json::json!({ "previous_status": previous_status })),
        );
        payload.more = more;
        Event {
            feed: Feed::Tasks,
            kind: kind.as_str(),
            meta: payload.subject.meta(Feed::Tasks),
            envelope: outbox_text(trace_id, payload),
        }
    }

    /// `payload: {"event": kind, "droplet": {...}, ...extra}` in an event envelope.
    pub fn droplet(kind: DropletEventKind, droplet: impl Subject, extra: Option<Value>) -> Event {
        Event {
            feed: Feed::Droplets,
            kind: kind.as_str(),
            meta: droplet.meta(Feed::Droplets),
            envelope: outbox_text(None, Payload::new(kind.as_str(), "droplet", droplet, extra)),
        }
    }
}

/// An event's payload: its kind, its subject under `key` (`task` or `droplet`), then the
/// extra fields of an object `extra`, then those of a borrowed object `more` (which win over
/// `extra`'s of the same name); none replaces the kind, the subject or the `event_id` the
/// relay gives it.
struct Payload<'a, S> {
    event: &'static str,
    key: &'static str,
    subject: S,
    extra: Option<Value>,
    more: Option<&'a Value>,
}

impl<S: Serialize> Payload<'_, S> {
    fn new(event: &'static str, key: &'static str, subject: S, extra: Option<Value>) -> Self {
        Payload {
            event,
            key,
            subject,
            extra,
            more: None,
        }
    }
}

impl<S: Serialize> Serialize for Payload<'_, S> {
    fn serialize<Z: serde::Serializer>(&self, serializer: Z) -> Result<Z::Ok, Z::Error> {
        use serde::ser::SerializeMap;
        let extra = self.extra.as_ref().and_then(Value::as_object);
        let more = self.more.and_then(Value::as_object);
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("event", self.event)?;
        map.serialize_entry(self.key, &self.subject)?;
        let reserved = |k: &str| k == "event" || k == self.key || k == "event_id";
        for (k, v) in extra.into_iter().flatten() {
            if !reserved(k) && !more.is_some_and(|m| m.contains_key(k)) {
                map.serialize_entry(k, v)?;
            }
        }
        for (k, v) in more.into_iter().flatten() {
            if !reserved(k) {
                map.serialize_entry(k, v)?;
            }
        }
        map.end()
    }
}

/// The outbox's text of an event envelope ([`OutboxEvent`], completed by the relay). A
/// subject serde cannot write (a map with keys that are not strings: none of ours) is written
/// as null, as `to_value` did.
fn outbox_text<S: Serialize>(trace_id: Option<String>, payload: Payload<S>) -> String {
    let envelope = OutboxEvent::new(trace_id, payload);
    serde_json::to_string(&envelope).unwrap_or_else(|e| {
        tracing::error!(error = %e, event = envelope.payload.event, "an event's subject could not be serialised");
        let payload = Payload::new(
            envelope.payload.event,
            envelope.payload.key,
            Value::Null,
            None,
        );
        serde_json::to_string(&envelope.with_payload(payload)).unwrap_or_default()
    })
}

/// An event envelope as a `Value`, without `source` (the `resync_required` frame, which is
/// no event of the log).
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
    INSERT INTO event_outbox (feed, kind, status, droplet_id, envelope)
    SELECT 'droplets', 'droplet_health_changed', up.status, up.droplet_id, (
      '{\"payload\":' || jsonb_build_object(
            'event', 'droplet_health_changed', 'previous_status', old.old_status, 'reason', 'heartbeat',
            'droplet', jsonb_build_object(
                'id', up.droplet_id, 'droplet_id', up.droplet_id, 'name', up.name,
                'steward', up.steward, 'endpoint', up.endpoint,
                'capabilities', COALESCE(up.capabilities, '[]'::jsonb), 'status', up.status,
                'last_heartbeat', to_char(up.last_heartbeat, 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                'registered_at', to_char(up.registered_at, 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                'updated_at', to_char(up.updated_at, 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                'max_concurrent_tasks', up.max_concurrent_tasks,
                'admin_deactivated', up.admin_deactivated, 'registered', up.registered))::text
      || ',' || substr(jsonb_build_object(
        'udc_version', '1.0',
        'trace_id', gen_random_uuid()::text,
        'target', NULL,
        'message_type', 'event',
        'timestamp', to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'))::text, 2)
    )::json
    FROM up JOIN old ON old.old_id = up.id WHERE up.status IS DISTINCT FROM old.old_status
    ORDER BY up.id
    RETURNING 1
)" $($after)*)
    };
}
pub(crate) use heartbeat_health_event;

/// Adds the events to the outbox in the caller's transaction: they are published once it
/// commits, in order, to every replica, and never if it rolls back. A plain insert: no
/// NOTIFY, so concurrent writers still share PostgreSQL's group commit. Whoever commits the
/// transaction calls [`committed`] after it.
pub async fn record(conn: &mut PgConnection, events: &[Event]) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let feeds: Vec<&str> = events.iter().map(|e| e.feed.as_str()).collect();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind).collect();
    let task_types: Vec<Option<&str>> =
        events.iter().map(|e| e.meta.task_type.as_deref()).collect();
    let statuses: Vec<Option<&str>> = events.iter().map(|e| e.meta.status.as_deref()).collect();
    let droplets: Vec<Option<i32>> = events.iter().map(|e| e.meta.droplet_id).collect();
    let envelopes: Vec<&str> = events.iter().map(|e| e.envelope.as_str()).collect();
    // The envelopes go as text and PostgreSQL keeps them as text (`json` checks the syntax).
    sqlx::query!(
        "INSERT INTO event_outbox (feed, kind, task_type, status, droplet_id, envelope)
         SELECT f, k, tt, st, d, e::json
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::text[])
              WITH ORDINALITY AS x(f, k, tt, st, d, e, n)
         ORDER BY n",
        &feeds as &[&str],
        &kinds as &[&str],
        &task_types as _,
        &statuses as _,
        &droplets as _,
        &envelopes as &[&str],
    )
    .execute(conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_events_text_has_its_kind_subject_and_extra_fields_and_no_extra_replaces_them() {
        let event = Event::task(
            TaskEventKind::TaskRequeued,
            Some("t-1".into()),
            json!({"id": 7, "status": "pending"}),
            Some(
                json!({"previous_status": "assigned", "event": "other", "task": null, "event_id": 9}),
            ),
        );
        // The outbox's form, which the relay completes without parsing it (relay.rs).
        assert!(
            event
                .envelope
                .starts_with(crate::protocol::OUTBOX_EVENT_HEAD)
                && event
                    .envelope
                    .starts_with(r#"{"payload":{"event":"task_requeued","task":{"#),
            "{}",
            event.envelope
        );
        assert_eq!(event.kind, "task_requeued");
        assert_eq!(event.meta.status.as_deref(), Some("pending"));
        let e: Value = serde_json::from_str(&event.envelope).expect("JSON text");
        assert!(e.get("source").is_none());
        assert_eq!(event.feed, Feed::Tasks);
        assert_eq!(e["message_type"], "event");
        assert_eq!(e["trace_id"], "t-1");
        assert_eq!(e["payload"]["event"], "task_requeued");
        assert_eq!(e["payload"]["task"], json!({"id": 7, "status": "pending"}));
        assert_eq!(e["payload"]["previous_status"], "assigned");
        assert!(e["payload"].get("event_id").is_none(), "the relay gives it");
        let droplet = Event::droplet(
            DropletEventKind::DropletDrained,
            json!({"droplet_id": 3}),
            Some(json!({"droplet": 0})),
        );
        let d: Value = serde_json::from_str(&droplet.envelope).expect("JSON text");
        assert_eq!(droplet.feed, Feed::Droplets);
        assert_eq!(d["payload"]["droplet"], json!({"droplet_id": 3}));
    }

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
