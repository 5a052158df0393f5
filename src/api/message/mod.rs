//! Inter-droplet messaging: `POST /message` (commands, queries, events and heartbeats from
//! droplets), `POST /send` to one droplet and `POST /broadcast` to many.

use axum::extract::State;
use axum::routing::post;
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::api::droplets::{next_heartbeat_deadline, HeartbeatAck};
use crate::auth::{Caller, Permission};
use crate::error::{ApiError, ApiResult, FieldError};
use crate::services::dispatch::id_form_of;
use crate::services::droplets::{self, DropletFilter};
use crate::services::heartbeats::{self, Heartbeat};
use crate::services::messaging::{self, Relayed};
use crate::services::system_status;
use crate::services::tasks::{self, NewTask};
use crate::state::AppState;
use crate::udc::{self, Envelope, MessageType, QueryParams, RawBody, Udc, Validate};

mod answers;
pub use answers::*;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/message", post(receive))
        .route("/send", post(send))
        .route("/broadcast", post(broadcast))
}

pub const COMMANDS: [&str; 2] = ["create_task", "cancel_task"];
pub const QUERIES: [&str; 3] = ["task_status", "droplet_list", "system_status"];

/// Receives a UDC message: commands and queries are answered, events and heartbeats
/// acknowledged (a heartbeat also counts as the sender's heartbeat).
#[utoipa::path(post, path = "/message", tag = "messages", security(("bearer" = [])),
    request_body(content = Object, description = "A full UDC envelope; payload {\"command\":\"create_task\",\"task_data\":{...}}, {\"command\":\"cancel_task\",\"task_id\":1}, {\"query\":\"task_status\",\"task_id\":1}, {\"query\":\"droplet_list\"}, {\"query\":\"system_status\"}"),
    responses((status = 200, description = "The answer, in a response envelope echoing the trace id: one shape per command, query and message type", body = MessageAnswer),
              (status = 403, description = "No write permission (a heartbeat: as POST /droplets/{id}/heartbeat, a token without a permissions claim may send its own)"), (status = 404, description = "Unknown task or droplet"),
              (status = 409, description = "Invalid transition"), (status = 422, description = "Bad envelope, an unknown command or query, or a `target` naming another droplet (`Message target droplet-2 does not match this droplet (droplet-10)`)")))]
pub async fn receive(
    State(state): State<AppState>,
    caller: Caller,
    body: RawBody,
) -> ApiResult<Udc<MessageAnswer>> {
    // A heartbeat follows the rule of `POST /droplets/{id}/heartbeat` (a token with no
    // `permissions` claim may send its own); everything else needs `write`. A token allowed
    // neither is refused before its body is read.
    caller.require_droplet_write()?;
    let Envelope { meta, payload } = body.envelope::<Value>()?;
    ensure_for_us(&state, meta.target.as_ref())?;
    if meta.message_type != MessageType::Heartbeat {
        caller.require(Permission::Write)?;
    }
    let payload = match payload {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    let answer = match meta.message_type {
        MessageType::Command => command(&state, &caller, &meta.trace_id, &payload).await?,
        MessageType::Query => query(&state, &payload).await?,
        MessageType::Heartbeat => {
            heartbeat(&state, &caller, payload, id_form_of(&meta.source)).await?
        }
        MessageType::Event | MessageType::Response => MessageAnswer::Received(Received {
            received: true,
            message_type: meta.message_type,
        }),
    };
    Ok(Udc::ok(answer))
}

/// A message addressed to another droplet is not this orchestrator's to act on: 422, with the
/// original service's words, and nothing done. (Relaying is `/send`'s job, under its checks.)
/// A target that names no droplet id (`"orchestrator"`) is taken as this one.
fn ensure_for_us(state: &AppState, target: Option<&Value>) -> ApiResult<()> {
    let ours = state.keys.orchestrator_id();
    match target.and_then(crate::auth::parse_droplet_id) {
        Some(id) if id != ours => Err(ApiError::Validation(vec![FieldError::new(
            &["body", "target"],
            format!("Message target droplet-{id} does not match this droplet (droplet-{ours}); send it to that droplet, or relay it with POST /send"),
            "target_mismatch",
        )])),
        _ => Ok(()),
    }
}

/// The name a command or query payload gives under `key`, or a 422 naming the supported ones.
fn name_of<'a>(
    payload: &'a Map<String, Value>,
    key: &'static str,
    supported: &[&str],
) -> ApiResult<&'a str> {
    let kind = if key == "command" {
        "commands"
    } else {
        "queries"
    };
    match payload.get(key) {
        Some(Value::String(s)) if supported.contains(&s.as_str()) => Ok(s),
        Some(Value::String(s)) => Err(ApiError::invalid(
            &["body", "payload", key],
            format!(
                "Unknown {key} '{s}'; supported {kind}: {}",
                supported.join(", ")
            ),
            "enum",
        )),
        None | Some(Value::Null) => Err(ApiError::invalid(
            &["body", "payload", key],
            format!("Field required; supported {kind}: {}", supported.join(", ")),
            "missing",
        )),
        Some(_) => Err(ApiError::invalid(
            &["body", "payload", key],
            format!(
                "Input should be a string; supported {kind}: {}",
                supported.join(", ")
            ),
            "string_type",
        )),
    }
}

/// A task id given as a number or a numeric string.
fn task_id_of(payload: &Map<String, Value>) -> ApiResult<Option<i32>> {
    let bad = || {
        ApiError::invalid(
            &["body", "payload", "task_id"],
            "Input should be a valid integer",
            "int_parsing",
        )
    };
    match payload.get("task_id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .map(Some)
            .ok_or_else(bad),
        Some(Value::String(s)) => s.trim().parse().map(Some).map_err(|_| bad()),
        Some(_) => Err(bad()),
    }
}

async fn command(
    state: &AppState,
    caller: &Caller,
    trace_id: &str,
    payload: &Map<String, Value>,
) -> ApiResult<MessageAnswer> {
    match name_of(payload, "command", &COMMANDS)? {
        "create_task" => {
            let data = match payload.get("task_data") {
                Some(Value::Object(m)) => Value::Object(m.clone()),
                None | Some(Value::Null) => {
                    return Err(ApiError::Validation(vec![FieldError::missing(&[
                        "body",
                        "payload",
                        "task_data",
                    ])]))
                }
                Some(_) => {
                    return Err(ApiError::invalid(
                        &["body", "payload", "task_data"],
                        "Input should be a valid dictionary",
                        "dict_type",
                    ))
                }
            };
            let new: NewTask = udc::deserialize_payload(data, &["body", "payload", "task_data"])
                .map_err(ApiError::Validation)?;
            let (task, created) = tasks::create_at(
                &state.tasks(),
                caller,
                trace_id,
                new,
                &["body", "payload", "task_data", "payload"],
            )
            .await?;
            Ok(MessageAnswer::TaskCreated(TaskCreated {
                command: CreateTaskName::Name,
                created,
                task_id: task.id,
                trace_id: task.trace_id,
                status: task.status,
                created_at: udc::iso(&task.created_at),
            }))
        }
        _ => {
            let id = task_id_of(payload)?.ok_or_else(|| {
                ApiError::Validation(vec![FieldError::missing(&["body", "payload", "task_id"])])
            })?;
            let reason = payload
                .get("reason")
                .and_then(Value::as_str)
                .map(str::to_string);
            let task = tasks::cancel(&state.tasks(), caller, id, reason).await?;
            Ok(MessageAnswer::TaskCancelled(TaskCancelled {
                command: CancelTaskName::Name,
                task_id: task.id,
                status: task.status,
                cancelled_at: task.completed_at.map(|t| udc::iso(&t)),
            }))
        }
    }
}

async fn query(state: &AppState, payload: &Map<String, Value>) -> ApiResult<MessageAnswer> {
    match name_of(payload, "query", &QUERIES)? {
        "task_status" => {
            let task = if let Some(id) = task_id_of(payload)? {
                tasks::load(&state.db, id)
                    .await?
                    .ok_or_else(|| ApiError::not_found(format!("Task {id} not found")))?
            } else {
                let raw = match payload.get("trace_id") {
                    Some(Value::String(s)) => s.trim(),
                    _ => {
                        return Err(ApiError::invalid(
                            &["body", "payload", "task_id"],
                            "Field required: task_id or trace_id",
                            "missing",
                        ))
                    }
                };
                let trace = Uuid::parse_str(raw).map_err(|_| {
                    ApiError::invalid(
                        &["body", "payload", "trace_id"],
                        "Input should be a valid UUID",
                        "uuid_parsing",
                    )
                })?;
                tasks::load_by_trace(&state.db, trace)
                    .await?
                    .ok_or_else(|| {
                        ApiError::not_found(format!("Task with trace id {trace} not found"))
                    })?
            };
            Ok(MessageAnswer::TaskStatus(Box::new(TaskStatusAnswer {
                query: TaskStatusName::Name,
                task_id: task.id,
                trace_id: task.trace_id,
                status: task.status,
                task,
            })))
        }
        "droplet_list" => {
            let text = |key: &str| payload.get(key).and_then(Value::as_str).map(str::to_string);
            let filter = DropletFilter {
                status: text("status"),
                capability: text("capability"),
            };
            if let Some(mut e) = filter.validate().into_iter().next() {
                e.loc = vec![json!("body"), json!("payload"), json!("status")];
                return Err(ApiError::Validation(vec![e]));
            }
            let list = droplets::list(&state.db, &filter).await?;
            Ok(MessageAnswer::DropletList(DropletListAnswer {
                query: DropletListName::Name,
                total: list.len(),
                droplets: list,
            }))
        }
        _ => {
            let sample = state.process.latest();
            Ok(MessageAnswer::SystemStatus(Box::new(SystemStatusAnswer {
                query: SystemStatusName::Name,
                status: if state.emergency_stopped() {
                    "maintenance"
                } else {
                    "active"
                },
                cpu_percent: (sample.cpu_percent * 10.0).round() / 10.0,
                memory_mb: (sample.memory_mb * 10.0).round() / 10.0,
                uptime_seconds: state.started_at.elapsed().as_secs(),
                custom_metrics: CustomMetrics {
                    counts: system_status::counts(&state.db).await?,
                    websocket_connections: state.events.connection_count(),
                },
                scheduler: SchedulerState {
                    running: !state.shutdown.is_cancelled(),
                    emergency_stopped: state.emergency_stopped(),
                    jobs: state.jobs.list(),
                },
                registry: state.registry.snapshot(),
            })))
        }
    }
}

/// A heartbeat sent as a message: the sender's own droplet (or, for an admin, the one the
/// payload names), exactly as `POST /droplets/{id}/heartbeat`.
async fn heartbeat(
    state: &AppState,
    caller: &Caller,
    payload: Map<String, Value>,
    id_form: Option<&str>,
) -> ApiResult<MessageAnswer> {
    let named = payload
        .get("droplet_id")
        .or_else(|| payload.get("id"))
        .and_then(|v| match v {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.trim_start_matches("droplet-").parse().ok(),
            _ => None,
        })
        .and_then(|n| i32::try_from(n).ok());
    let droplet_id = named.unwrap_or(caller.droplet_id);
    let beat: Heartbeat = udc::deserialize_payload(Value::Object(payload), &["body", "payload"])
        .map_err(ApiError::Validation)?;
    let droplet = heartbeats::heartbeat(&state.beats(), caller, droplet_id, beat, id_form).await?;
    let interval = state.config().heartbeat_interval;
    Ok(MessageAnswer::Heartbeat(HeartbeatReceived {
        received: true,
        ack: HeartbeatAck {
            acknowledged: true,
            droplet_id: droplet.droplet_id,
            status: droplet.status,
            next_heartbeat_in: interval,
            next_heartbeat_deadline: next_heartbeat_deadline(&droplet, interval),
        },
    }))
}

/// Query parameters of `/send` and `/broadcast`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SendParams {
    /// `/send`: the droplet to deliver to.
    pub target_droplet_id: Option<i32>,
    /// command, query, response, event or heartbeat (default: the body envelope's, else command).
    pub message_type: Option<String>,
    /// `/broadcast`: only droplets with this capability.
    pub capability_filter: Option<String>,
    /// The message: a JSON object, as a string (or send an envelope body instead).
    pub payload: Option<String>,
}

impl Validate for SendParams {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if let Some(t) = &self.message_type {
            if !matches!(
                t.as_str(),
                "command" | "query" | "response" | "event" | "heartbeat"
            ) {
                errors.push(FieldError::new(
                    &["message_type"],
                    "Input should be 'command', 'query', 'response', 'event' or 'heartbeat'",
                    "enum",
                ));
            }
        }
        if let Some(p) = &self.payload {
            match serde_json::from_str::<Value>(p) {
                Ok(Value::Object(_)) => {}
                Ok(_) => errors.push(FieldError::new(
                    &["payload"],
                    "Input should be a JSON object",
                    "dict_type",
                )),
                Err(e) => errors.push(FieldError::new(
                    &["payload"],
                    format!("Invalid JSON: {e}"),
                    "json_invalid",
                )),
            }
        }
        errors
    }
}

/// The message to send: its type and payload, from the query, an envelope body, or a bare
/// JSON object body; relayed on the caller's behalf (see `messaging::Relayed`).
fn message_of(state: &AppState, params: &SendParams, body: RawBody) -> ApiResult<Relayed> {
    let from_body = body.optional_message()?;
    let message_type = params
        .message_type
        .clone()
        .or_else(|| {
            from_body.as_ref().and_then(|(meta, _)| {
                meta.as_ref().and_then(|m| {
                    serde_json::to_value(m.message_type)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                })
            })
        })
        .unwrap_or_else(|| "command".to_string());
    let payload = match (&params.payload, from_body) {
        (_, Some((_, payload))) => payload,
        (Some(raw), None) => serde_json::from_str(raw).unwrap_or_default(),
        (None, None) => {
            return Err(ApiError::invalid(
                &["query", "payload"],
                "Field required: the payload query parameter (a JSON object), an envelope body or a JSON object body",
                "missing",
            ))
        }
    };
    Ok(Relayed::new((&state.core).into(), message_type, payload)?)
}

/// Sends a message to one active droplet's `/message`, in a new envelope from the orchestrator.
#[utoipa::path(post, path = "/send", tag = "messages", params(SendParams), security(("bearer" = [])),
    request_body(content = Object, description = "Optional: an envelope whose payload is the message"),
    responses((status = 200, description = "Delivered"), (status = 403, description = "No write permission"),
              (status = 404, description = "Unknown droplet"), (status = 409, description = "Droplet not active"),
              (status = 422, description = "Missing target or payload, bad JSON"), (status = 502, description = "The droplet failed or timed out"),
              (status = 503, description = "Emergency stop in effect")))]
pub async fn send(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(params): QueryParams<SendParams>,
    body: RawBody,
) -> ApiResult<Udc<messaging::Sent>> {
    caller.require(Permission::Write)?;
    messaging::ensure_sending((&state.core).into())?;
    let target = params.target_droplet_id.ok_or_else(|| {
        ApiError::Validation(vec![FieldError::missing(&["query", "target_droplet_id"])])
    })?;
    let message = message_of(&state, &params, body)?;
    Ok(Udc::ok(
        messaging::send((&state.core).into(), &caller, target, message).await?,
    ))
}

/// Sends a message to every active droplet (or those with a capability), in parallel.
#[utoipa::path(post, path = "/broadcast", tag = "messages", params(SendParams), security(("bearer" = [])),
    request_body(content = Object, description = "Optional: an envelope whose payload is the message"),
    responses((status = 200, description = "Per droplet: delivered, failed with the reason, or timeout"),
              (status = 403, description = "Admin only"), (status = 422, description = "Missing payload, bad JSON"),
              (status = 429, description = "More than 10 broadcasts a minute"), (status = 503, description = "Emergency stop in effect")))]
pub async fn broadcast(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(params): QueryParams<SendParams>,
    body: RawBody,
) -> ApiResult<Udc<messaging::Broadcast>> {
    caller.require(Permission::Admin)?;
    messaging::ensure_sending((&state.core).into())?;
    let message = message_of(&state, &params, body)?;
    Ok(Udc::ok(
        messaging::broadcast(
            (&state.core).into(),
            &caller,
            params.capability_filter.clone(),
            message,
        )
        .await?,
    ))
}
