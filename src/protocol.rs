//! The UDC wire protocol as the orchestrator speaks it, free of any HTTP type: the version,
//! the message types, the one builder of every envelope it sends (responses, events,
//! deliveries, WebSocket replies, the simulator's requests) and the wire's times.

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

pub const UDC_VERSION: &str = "1.0";

/// The orchestrator's droplet id when `DROPLET_ID` is not set (what it publishes carries the
/// configured one: the relay stamps events, the request scope answers).
pub const ORCHESTRATOR_SOURCE: i32 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MessageType {
    Command,
    Query,
    Response,
    Event,
    Heartbeat,
}

impl MessageType {
    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "command" => MessageType::Command,
            "query" => MessageType::Query,
            "response" => MessageType::Response,
            "event" => MessageType::Event,
            "heartbeat" => MessageType::Heartbeat,
            _ => return None,
        })
    }
}

/// An envelope the orchestrator sends. `Envelope::new(..)` stamps a fresh trace id and the
/// time; `trace` and `signed` set the rest.
#[derive(Debug, Clone, Serialize)]
pub struct Envelope<'a, P: Serialize> {
    pub udc_version: &'static str,
    pub trace_id: String,
    pub source: Value,
    pub target: Value,
    pub message_type: &'a str,
    pub payload: P,
    pub timestamp: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<&'a str>,
}

impl<'a, P: Serialize> Envelope<'a, P> {
    pub fn new(
        message_type: &'a str,
        source: impl Into<Value>,
        target: impl Into<Value>,
        payload: P,
    ) -> Self {
        Envelope {
            udc_version: UDC_VERSION,
            trace_id: Uuid::new_v4().to_string(),
            source: source.into(),
            target: target.into(),
            message_type,
            payload,
            timestamp: now_iso(),
            signature: None,
        }
    }

    /// The trace id this message belongs to (a new one is kept when `None`).
    pub fn trace(mut self, trace_id: Option<String>) -> Self {
        if let Some(t) = trace_id {
            self.trace_id = t;
        }
        self
    }

    /// The time the message says it was sent, in a form of the sender's choosing.
    pub fn at(mut self, timestamp: String) -> Self {
        self.timestamp = timestamp;
        self
    }

    /// The sender's signature (a token the Registry issued), for droplets that require one.
    pub fn signed(mut self, signature: Option<&'a str>) -> Self {
        self.signature = signature;
        self
    }

    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

// ---------------------------------------------------------------------------
// Times: UTC out with a `Z`, in with `Z`, an offset, or none (naive = UTC).

/// An event envelope as it waits in the outbox: the payload first and no `source` nor
/// `event_id`, which the relay writes before this text as it publishes the event
/// (`{"source":<DROPLET_ID>,"payload":{"event_id":<id>,` then the rest, unparsed:
/// `services/events/relay.rs`), so that writers of events need not know either. Its text
/// starts with [`OUTBOX_EVENT_HEAD`] whenever the payload has a field.
#[derive(Debug, Serialize)]
pub struct OutboxEvent<P: Serialize> {
    pub payload: P,
    pub udc_version: &'static str,
    pub trace_id: String,
    pub target: Value,
    pub message_type: &'static str,
    pub timestamp: String,
}

/// What the relay looks for to publish an outbox event without parsing it (its SQL spells it
/// out: `left(text, 13) = '{"payload":{"'`).
pub const OUTBOX_EVENT_HEAD: &str = r#"{"payload":{""#;

impl<P: Serialize> OutboxEvent<P> {
    pub fn new(trace_id: Option<String>, payload: P) -> Self {
        OutboxEvent {
            payload,
            udc_version: UDC_VERSION,
            trace_id: trace_id.unwrap_or_else(|| Uuid::new_v4().to_string()),
            target: Value::Null,
            message_type: "event",
            timestamp: now_iso(),
        }
    }

    /// The same envelope (trace id, time) around another payload.
    pub fn with_payload<Q: Serialize>(&self, payload: Q) -> OutboxEvent<Q> {
        OutboxEvent {
            payload,
            udc_version: self.udc_version,
            trace_id: self.trace_id.clone(),
            target: Value::Null,
            message_type: self.message_type,
            timestamp: self.timestamp.clone(),
        }
    }
}

pub fn iso(dt: &NaiveDateTime) -> String {
    dt.and_utc().to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub fn now_iso() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// An ISO-8601 time: `Z`, an offset with or without its colon (`+05:00`, `+0500`), or none
/// (naive = UTC). Years outside 1-9999 are refused (the database could not store them).
pub fn parse_time(raw: &str) -> Option<DateTime<Utc>> {
    let raw = raw.trim();
    let with_offset = DateTime::parse_from_rfc3339(raw).ok().or_else(|| {
        ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f%z"]
            .iter()
            .find_map(|f| DateTime::parse_from_str(raw, f).ok())
    });
    let parsed = match with_offset {
        Some(dt) => Some(dt.with_timezone(&Utc)),
        None => ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d"]
            .iter()
            .find_map(|f| {
                NaiveDateTime::parse_from_str(raw, f).ok().or_else(|| {
                    chrono::NaiveDate::parse_from_str(raw, f)
                        .ok()
                        .and_then(|d| d.and_hms_opt(0, 0, 0))
                })
            })
            .map(|n| n.and_utc()),
    };
    parsed.filter(|t| (1..=9999).contains(&chrono::Datelike::year(t)))
}

/// `#[serde(serialize_with = "protocol::ts")]` for `NaiveDateTime` columns.
pub fn ts<S: serde::Serializer>(dt: &NaiveDateTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&iso(dt))
}

/// `#[serde(serialize_with = "protocol::ts_opt")]` for nullable `NaiveDateTime` columns.
pub fn ts_opt<S: serde::Serializer>(dt: &Option<NaiveDateTime>, s: S) -> Result<S::Ok, S::Error> {
    match dt {
        Some(dt) => s.serialize_str(&iso(dt)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_with_or_without_colon_and_sane_years() {
        let t = parse_time("2026-01-01T12:00:00+0500").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-01-01T07:00:00+00:00");
        let t = parse_time("2026-01-01T12:00:00+05:00").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-01-01T07:00:00+00:00");
        let t = parse_time("2026-01-01T12:00:00").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-01-01T12:00:00+00:00");
        assert!(parse_time("-9999-01-01T00:00:00").is_none());
        assert!(parse_time("+20000-01-01T00:00:00Z").is_none());
    }

    #[test]
    fn times_accept_z_offsets_and_naive() {
        assert!(parse_time("2025-11-15T10:30:00Z").is_some());
        assert!(parse_time("2025-11-15T10:30:00+02:00").is_some());
        assert_eq!(
            parse_time("2025-11-15T10:30:00").unwrap(),
            parse_time("2025-11-15T10:30:00Z").unwrap()
        );
        assert!(parse_time("not a time").is_none());
    }

    #[test]
    fn an_envelope_carries_every_field_and_a_signature_only_when_given() {
        let e = Envelope::new(
            "event",
            ORCHESTRATOR_SOURCE,
            Value::Null,
            serde_json::json!({"a": 1}),
        )
        .to_value();
        assert_eq!(e["udc_version"], "1.0");
        assert_eq!(e["source"], 10);
        assert!(e["target"].is_null() && e.get("signature").is_none());
        assert!(Uuid::parse_str(e["trace_id"].as_str().unwrap()).is_ok());
        let e = Envelope::new("command", 10, "droplet-12", ())
            .trace(Some("t".into()))
            .signed(Some("s"))
            .to_value();
        assert_eq!(
            (
                e["trace_id"].as_str(),
                e["signature"].as_str(),
                e["target"].as_str()
            ),
            (Some("t"), Some("s"), Some("droplet-12"))
        );
    }
}
