//! The envelopes the simulated clients send. Three callers grew three dialects of the same
//! UDC envelope (who is named as `source`, how `timestamp` is written, which `message_type`
//! a heartbeat has, how a droplet names itself); each keeps its own, so merging the
//! simulators changed nothing on the wire.

use serde_json::{json, Value};
use uuid::Uuid;

use orchestrator::protocol::{now_iso, Envelope};

/// The id every envelope names as its `target`: the orchestrator, droplet #10.
pub const ORCHESTRATOR: i32 = 10;

/// Who an envelope names as its `source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The droplet (or task creator) that sends it.
    Sender,
    /// Always this id (the tests' and the bench's 42).
    Fixed(i32),
}

/// How an envelope's `timestamp` is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stamp {
    /// As the service writes its own: microseconds and `Z` ([`orchestrator::protocol::now_iso`]).
    Micros,
    /// chrono's `to_rfc3339`: nanoseconds and `+00:00`.
    Rfc3339,
}

/// One caller's dialect of the envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wire {
    pub source: Source,
    pub timestamp: Stamp,
    /// `message_type` of a heartbeat (every other message is a `command`).
    pub heartbeat_type: &'static str,
    /// A droplet registers as `{name_prefix}{id}`.
    pub name_prefix: &'static str,
    /// The `steward` a droplet registers with, if any.
    pub steward: Option<&'static str>,
    /// A completed task's result says `"simulated": true` besides the droplet.
    pub result_says_simulated: bool,
}

impl Wire {
    /// `orchestrator-simulator`.
    pub const SIMULATE: Wire = Wire {
        source: Source::Sender,
        timestamp: Stamp::Micros,
        heartbeat_type: "heartbeat",
        name_prefix: "sim-",
        steward: Some("simulator"),
        result_says_simulated: true,
    };

    /// The fault scenarios (the integration tests' `envelope`).
    pub const TESTS: Wire = Wire {
        source: Source::Fixed(42),
        timestamp: Stamp::Rfc3339,
        heartbeat_type: "command",
        name_prefix: "sim-",
        steward: Some("faults"),
        result_says_simulated: false,
    };

    /// The load bench.
    pub const BENCH: Wire = Wire {
        source: Source::Fixed(42),
        timestamp: Stamp::Rfc3339,
        heartbeat_type: "command",
        name_prefix: "bench-",
        steward: None,
        result_says_simulated: false,
    };

    /// An envelope from `sender` around `payload`, with a new trace id.
    pub fn envelope(&self, sender: i32, message_type: &str, payload: Value) -> Value {
        self.envelope_traced(&Uuid::new_v4().to_string(), sender, message_type, payload)
    }

    /// An envelope from `sender` around `payload`, with this trace id.
    pub fn envelope_traced(
        &self,
        trace_id: &str,
        sender: i32,
        message_type: &str,
        payload: Value,
    ) -> Value {
        let source = match self.source {
            Source::Sender => sender,
            Source::Fixed(id) => id,
        };
        let timestamp = match self.timestamp {
            Stamp::Micros => now_iso(),
            Stamp::Rfc3339 => chrono::Utc::now().to_rfc3339(),
        };
        Envelope::new(message_type, source, ORCHESTRATOR, payload)
            .trace(Some(trace_id.to_string()))
            .at(timestamp)
            .to_value()
    }

    /// `POST /droplets/register`'s envelope for droplet `id` at `endpoint`.
    pub fn registration(&self, id: i32, endpoint: &str, capabilities: &[String]) -> Value {
        let mut payload = json!({
            "droplet_id": id,
            "name": format!("{}{id}", self.name_prefix),
            "endpoint": endpoint,
            "capabilities": capabilities,
        });
        if let Some(steward) = self.steward {
            payload["steward"] = json!(steward);
        }
        self.envelope(id, "command", payload)
    }

    /// A heartbeat's envelope from droplet `id`.
    pub fn heartbeat(&self, id: i32) -> Value {
        self.envelope(
            id,
            self.heartbeat_type,
            json!({"status": "active", "metrics": {"simulated": true}}),
        )
    }

    /// The result a droplet reports with a completion.
    pub fn result(&self, id: i32) -> Value {
        if self.result_says_simulated {
            json!({"simulated": true, "droplet": id})
        } else {
            json!({"droplet": id})
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The envelope without what changes at each call.
    fn fixed(mut v: Value) -> Value {
        let trace = v["trace_id"].as_str().unwrap_or("").to_string();
        assert!(Uuid::parse_str(&trace).is_ok(), "trace id {trace}");
        let o = v.as_object_mut().unwrap();
        o.remove("trace_id");
        o.remove("timestamp");
        v
    }

    #[test]
    fn each_caller_keeps_its_envelope() {
        // `orchestrator-simulator`: the sender as source, heartbeats typed as such.
        let v = Wire::SIMULATE.registration(1000, "http://h/d/1000", &["a".into()]);
        assert_eq!(
            fixed(v),
            json!({"udc_version": "1.0", "source": 1000, "target": 10, "message_type": "command",
                   "payload": {"droplet_id": 1000, "name": "sim-1000", "steward": "simulator",
                               "endpoint": "http://h/d/1000", "capabilities": ["a"]}})
        );
        assert_eq!(
            fixed(Wire::SIMULATE.heartbeat(1001)),
            json!({"udc_version": "1.0", "source": 1001, "target": 10, "message_type": "heartbeat",
                   "payload": {"status": "active", "metrics": {"simulated": true}}})
        );
        assert_eq!(
            Wire::SIMULATE.result(3),
            json!({"simulated": true, "droplet": 3})
        );
        // The fault scenarios: the tests' envelope (source 42, every message a command).
        let v = Wire::TESTS.registration(1101, "http://h/d/1101", &["b".into()]);
        assert_eq!(
            fixed(v),
            json!({"udc_version": "1.0", "source": 42, "target": 10, "message_type": "command",
                   "payload": {"droplet_id": 1101, "name": "sim-1101", "steward": "faults",
                               "endpoint": "http://h/d/1101", "capabilities": ["b"]}})
        );
        assert_eq!(
            fixed(Wire::TESTS.heartbeat(1101)),
            json!({"udc_version": "1.0", "source": 42, "target": 10, "message_type": "command",
                   "payload": {"status": "active", "metrics": {"simulated": true}}})
        );
        assert_eq!(Wire::TESTS.result(3), json!({"droplet": 3}));
        // The bench: no steward.
        let v = Wire::BENCH.registration(7, "http://h/d/7", &["cap7".into()]);
        assert_eq!(
            fixed(v),
            json!({"udc_version": "1.0", "source": 42, "target": 10, "message_type": "command",
                   "payload": {"droplet_id": 7, "name": "bench-7",
                               "endpoint": "http://h/d/7", "capabilities": ["cap7"]}})
        );
    }

    #[test]
    fn timestamps_keep_their_form() {
        let micros = Wire::SIMULATE.envelope(1, "command", json!({}));
        let t = micros["timestamp"].as_str().unwrap();
        assert!(
            t.ends_with('Z') && t.split('.').nth(1).unwrap().len() == 7,
            "{t}"
        );
        let rfc = Wire::TESTS.envelope(1, "command", json!({}));
        let t = rfc["timestamp"].as_str().unwrap();
        assert!(t.ends_with("+00:00"), "{t}");
        let traced = Wire::TESTS.envelope_traced("abc", 1, "command", json!({}));
        assert_eq!(traced["trace_id"], "abc");
    }
}
