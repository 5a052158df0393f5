//! Messages relayed to droplets on a caller's behalf: `/send` to one active droplet and
//! `/broadcast` to every active one (or those with a capability). The caller is the
//! message's `source`; the payload says the orchestrator relayed it (`relayed_by`); the
//! orchestrator's own commands cannot be relayed; nothing is sent during an emergency stop.

use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;

use sqlx::PgPool;

use crate::identity::{Keys, Principal};
use crate::instruments::Metrics;
use crate::services::core::Settings;
use crate::services::dispatch::slots::Dispatcher;
use crate::services::dispatch::{self, Delivery, Outbound};
use crate::services::droplets::{self, Droplet, DropletFilter};
use crate::services::error::{Error, Result};
use crate::services::status::DropletStatus;
use crate::services::Core;

/// The names a droplet may read as coming from the orchestrator itself: its commands and the
/// events it publishes. None can be relayed, in any spelling.
const ORCHESTRATOR_NAMES: [&str; 14] = [
    "execute_task",
    "cancel_task",
    "task_created",
    "task_assigned",
    "task_started",
    "task_completed",
    "task_failed",
    "task_cancelled",
    "task_requeued",
    "task_retrying",
    "droplet_registered",
    "droplet_health_changed",
    "droplet_heartbeat_missed",
    "droplet_drained",
];

/// The fields a droplet may read as a command or an event name, at any depth of the payload
/// (compared after [`normalise`]: `Command`, ` action` count).
const NAME_FIELDS: [&str; 12] = [
    "command",
    "cmd",
    "action",
    "type",
    "event",
    "event_type",
    "kind",
    "op",
    "operation",
    "method",
    "query",
    "intent",
];

/// The longest command or event name relayed.
const MAX_NAME_CHARS: usize = 64;

/// A name as a droplet might read it: without control and invisible characters (`\u0000`,
/// zero-width spaces, soft hyphens), trimmed, lower case.
pub fn normalise(raw: &str) -> String {
    raw.chars()
        .filter(|c| !c.is_control() && !is_invisible(*c))
        .collect::<String>()
        .trim()
        .to_lowercase()
}

fn is_invisible(c: char) -> bool {
    matches!(c, '\u{00ad}' | '\u{034f}' | '\u{180e}' | '\u{200b}'..='\u{200f}'
        | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{206f}' | '\u{feff}')
}

/// The allow-list a relayed name must pass: none of the orchestrator's own names, compared
/// after [`normalise`] on letters and digits alone (`Execute-Task`, `execute task`,
/// `EXECUTE_TASK\u0000` are `execute_task`); and at the payload's top level, where droplets
/// read their command, 1 to 64 of `a-z 0-9 _ . : / -` (the shape of every command and event
/// name in the mesh, `/getAll` included).
fn check_name(field: &str, raw: &str, top_level: bool, allowed_names: &[String]) -> Result<()> {
    let name = normalise(raw);
    let letters: String = name.chars().filter(char::is_ascii_alphanumeric).collect();
    if ORCHESTRATOR_NAMES
        .iter()
        .any(|own| own.replace('_', "") == letters)
    {
        return Err(Error::forbidden(format!(
            "{field} {name:?} comes only from the orchestrator itself; it cannot be relayed"
        )));
    }
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.:/-".contains(c);
    if !top_level {
        return Ok(());
    }
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS || !name.chars().all(allowed) {
        return Err(Error::forbidden(format!(
            "{field} is not a name that can be relayed: 1 to {MAX_NAME_CHARS} of a-z, 0-9, _ . : / -"
        )));
    }
    if !allowed_names.is_empty() && !allowed_names.contains(&name) {
        return Err(Error::forbidden(format!(
            "{field} {name:?} is not one of the names this orchestrator relays (RELAY_ALLOWED_NAMES)"
        )));
    }
    Ok(())
}

/// Checks every field of the payload a droplet could read as a command or event name, at
/// every depth (the message type is one of the five UDC types, checked at the edge).
fn check_relayable(payload: &Value, allowed_names: &[String]) -> Result<()> {
    let mut stack = vec![(payload, true)];
    while let Some((value, top_level)) = stack.pop() {
        match value {
            Value::Object(map) => {
                for (key, inner) in map {
                    if NAME_FIELDS.contains(&normalise(key).as_str()) {
                        if let Value::String(name) = inner {
                            check_name(key.trim(), name, top_level, allowed_names)?;
                        }
                    }
                    stack.push((inner, false));
                }
            }
            Value::Array(items) => stack.extend(items.iter().map(|v| (v, false))),
            _ => {}
        }
    }
    Ok(())
}

/// What relaying messages uses of the services' shared parts: the pool (the targets), the
/// settings (timeouts, the allow-list), the keys (`relayed_by`), the delivery slots, the
/// outbound sender and the counter of outcomes; whether an emergency stop is in effect is
/// read when the handle is made (once per request).
#[derive(Clone, Copy)]
pub struct Messenger<'a> {
    db: &'a PgPool,
    settings: &'a Settings,
    keys: &'a Keys,
    slots: &'a Dispatcher,
    outbound: Outbound<'a>,
    metrics: &'a Metrics,
    stopped: bool,
}

impl<'a> From<&'a Core> for Messenger<'a> {
    fn from(core: &'a Core) -> Messenger<'a> {
        Messenger {
            db: &core.db,
            settings: &core.settings,
            keys: &core.keys,
            slots: &core.dispatch,
            outbound: core.into(),
            metrics: &core.metrics,
            stopped: core.emergency_stopped(),
        }
    }
}

/// An emergency stop halts everything the orchestrator sends to droplets, messages included.
pub fn ensure_sending(m: Messenger<'_>) -> Result<()> {
    if m.stopped {
        return Err(Error::Unavailable(
            "Emergency stop: messages to droplets are halted until the jobs are resumed".into(),
        ));
    }
    Ok(())
}

/// A message to relay: its type and payload, marked as relayed. Every name a droplet could
/// read as a command or event must pass the allow-list ([`check_name`]): the orchestrator's
/// own commands and events cannot come from anyone else, in any spelling.
#[derive(Debug, Clone)]
pub struct Relayed {
    pub message_type: String,
    pub payload: Value,
}

impl Relayed {
    pub fn new(m: Messenger<'_>, message_type: String, mut payload: Value) -> Result<Relayed> {
        check_relayable(&payload, &m.settings.current().relay_allowed_names)?;
        if let Value::Object(map) = &mut payload {
            map.insert("relayed_by".into(), json!(m.keys.orchestrator_id()));
        }
        Ok(Relayed {
            message_type,
            payload,
        })
    }
}

/// What `/send` answers when the droplet took the message.
#[derive(Debug, Clone, Serialize)]
pub struct Sent {
    pub delivered: bool,
    pub status: &'static str,
    pub target_droplet_id: i32,
    pub message_type: String,
    pub trace_id: String,
}

/// Sends a message to one active droplet; a failed delivery is an upstream error with the
/// reason in a word (never the transport's own text).
pub async fn send(
    m: Messenger<'_>,
    sender: &Principal,
    target: i32,
    message: Relayed,
) -> Result<Sent> {
    let droplet = droplets::require(m.db, target).await?;
    if droplet.status != DropletStatus::Active {
        return Err(Error::conflict(format!(
            "Droplet {target} is {}; messages are sent only to active droplets",
            droplet.status
        )));
    }
    let timeout = Duration::from_secs(m.settings.current().dispatch_timeout_seconds);
    let trace_id = Uuid::new_v4().to_string();
    match deliver(m, sender, &droplet, &trace_id, &message, timeout).await {
        Delivery::Delivered => Ok(Sent {
            delivered: true,
            status: "delivered",
            target_droplet_id: target,
            message_type: message.message_type,
            trace_id,
        }),
        other => Err(Error::Upstream(format!(
            "Delivery to droplet {target} failed: {}",
            other.reason(timeout)
        ))),
    }
}

/// What `/broadcast` answers: the outcome per droplet, in droplet order, and the counts.
#[derive(Debug, Clone, Serialize)]
pub struct Broadcast {
    pub trace_id: String,
    pub message_type: String,
    pub capability_filter: Option<String>,
    pub total: usize,
    pub delivered: usize,
    pub failed: usize,
    pub timeout: usize,
    pub results: Vec<Value>,
}

/// Sends a message to every active droplet (or those with a capability), in parallel.
pub async fn broadcast(
    m: Messenger<'_>,
    sender: &Principal,
    capability_filter: Option<String>,
    message: Relayed,
) -> Result<Broadcast> {
    let targets = droplets::list(
        m.db,
        &DropletFilter {
            status: Some("active".into()),
            capability: capability_filter.clone(),
        },
    )
    .await?;
    let config = m.settings.current();
    let timeout = Duration::from_secs(config.dispatch_timeout_seconds);
    let trace_id = Uuid::new_v4().to_string();
    let mut results: Vec<(i32, Value)> = futures::stream::iter(targets)
        .map(|droplet| {
            let (trace_id, message) = (&trace_id, &message);
            async move {
                let outcome = deliver(m, sender, &droplet, trace_id, message, timeout).await;
                (
                    droplet.droplet_id,
                    outcome_json(&droplet, &outcome, timeout),
                )
            }
        })
        .buffer_unordered(config.dispatch_concurrency.max(1))
        .collect()
        .await;
    results.sort_by_key(|(id, _)| *id);
    let count = |label: &str| results.iter().filter(|(_, r)| r["status"] == label).count();
    let (delivered, timed_out) = (count("delivered"), count("timeout"));
    Ok(Broadcast {
        trace_id,
        message_type: message.message_type,
        capability_filter,
        total: results.len(),
        delivered,
        failed: results.len() - delivered - timed_out,
        timeout: timed_out,
        results: results.into_iter().map(|(_, r)| r).collect(),
    })
}

/// One droplet's delivery outcome, as `/send` and `/broadcast` report it.
fn outcome_json(droplet: &Droplet, outcome: &Delivery, timeout: Duration) -> Value {
    let mut v = json!({
        "droplet_id": droplet.droplet_id,
        "name": droplet.name,
        "status": outcome.label(),
    });
    if *outcome != Delivery::Delivered {
        v["reason"] = json!(outcome.reason(timeout));
    }
    v
}

/// Delivers a relayed message: from the sender (`source`), in the target's id form.
async fn deliver(
    m: Messenger<'_>,
    sender: &Principal,
    droplet: &Droplet,
    trace_id: &str,
    message: &Relayed,
    timeout: Duration,
) -> Delivery {
    let outgoing = dispatch::Outgoing {
        trace_id: trace_id.to_string(),
        source: sender.droplet_id,
        target: droplet.droplet_id,
        id_form: droplet.id_form.clone(),
        message_type: message.message_type.clone(),
        payload: message.payload.clone(),
    };
    let outcome = {
        let Some(_slot) = m.slots.slot(droplet.internal_id).await else {
            return Delivery::Failed("shutting down".into());
        };
        dispatch::post_message(m.outbound, &droplet.endpoint, &outgoing, timeout).await
    };
    m.metrics
        .dispatch
        .with_label_values(&[outcome.label()])
        .inc();
    outcome
}
