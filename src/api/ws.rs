//! The real-time feeds `/ws/tasks` and `/ws/droplets` (token in `?token=`, filters, a limit per
//! droplet and one in all), one task per socket, and `GET /ws/status`. A socket is closed with
//! 4001 when its token expires: a client reconnects with a fresh token. A resuming client's
//! replay (`?after=`) is in `replay`, under the same watch as the live feed.

use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::auth::{Caller, Permission};
use crate::error::{ApiError, ApiResult, FieldError};
use crate::protocol::Envelope;
use crate::services::events::{ClientFilter, ClientRegistration, Feed, Outbound};
use crate::services::state_machine::Status;
use crate::state::AppState;
use crate::udc;

mod replay;
pub mod status;
use replay::{Close, Watch};

/// How long a close frame may take to leave; a client that does not read gets its
/// connection dropped instead.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/ws/tasks", get(tasks_feed))
        .route("/ws/droplets", get(droplets_feed))
        .route("/ws/status", get(status::status))
}

/// Task events (`task_created` ... `task_retrying`) as UDC event envelopes, one per text frame.
#[utoipa::path(get, path = "/ws/tasks", tag = "websocket",
    params(
        ("token" = String, Query, description = "JWT with the read permission (an `Authorization: Bearer` header also works)"),
        ("task_type" = Option<String>, Query, description = "Only tasks of this type"),
        ("status" = Option<String>, Query, description = "Only events that leave the task in this status"),
        ("droplet_id" = Option<i32>, Query, description = "Only tasks assigned to this droplet"),
        ("after" = Option<i64>, Query, description = "Resume: first the retained events after this event_id (a resync_required frame first when it is older than what is kept), then live ones"),
    ),
    responses((status = 101, description = "Switching to the WebSocket protocol"),
              (status = 401, description = "Missing or invalid token"), (status = 403, description = "Token without read"),
              (status = 422, description = "Bad filter"), (status = 429, description = "Too many sockets for this droplet, or in all (WS_MAX_CONNECTIONS)")))]
pub async fn tasks_feed(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    open(state, Feed::Tasks, query, &headers, ws)
}

/// Droplet events (`droplet_registered`, `droplet_health_changed`, `droplet_heartbeat_missed`, `droplet_drained`).
#[utoipa::path(get, path = "/ws/droplets", tag = "websocket",
    params(
        ("token" = String, Query, description = "JWT with the read permission (an `Authorization: Bearer` header also works)"),
        ("droplet_id" = Option<i32>, Query, description = "Only events of this droplet"),
        ("after" = Option<i64>, Query, description = "Resume: first the retained events after this event_id (a resync_required frame first when it is older than what is kept), then live ones"),
    ),
    responses((status = 101, description = "Switching to the WebSocket protocol"),
              (status = 401, description = "Missing or invalid token"), (status = 403, description = "Token without read"),
              (status = 422, description = "Bad filter"), (status = 429, description = "Too many sockets for this droplet, or in all (WS_MAX_CONNECTIONS)")))]
pub async fn droplets_feed(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    open(state, Feed::Droplets, query, &headers, ws)
}

/// The query of a feed: `token` and the filters. Unknown parameters are ignored.
#[derive(Debug, Default)]
struct FeedQuery {
    token: Option<String>,
    task_type: Option<String>,
    status: Option<String>,
    droplet_id: Option<String>,
    /// Resume: the last `event_id` the client saw.
    after: Option<String>,
}

impl FeedQuery {
    fn parse(raw: Option<&str>) -> FeedQuery {
        let mut q = FeedQuery::default();
        for (k, v) in url::form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            let slot = match k.as_ref() {
                "token" => &mut q.token,
                "task_type" => &mut q.task_type,
                "status" => &mut q.status,
                "droplet_id" => &mut q.droplet_id,
                "after" => &mut q.after,
                _ => continue,
            };
            // An empty value means "no filter", as dashboards build URLs with empty fields.
            if slot.is_none() && !v.is_empty() {
                *slot = Some(v.into_owned());
            }
        }
        q
    }
}

/// Checks a filter for `feed`; fields that do not apply to the feed are left out.
fn check_filter(
    feed: Feed,
    task_type: Option<&str>,
    status: Option<&str>,
    droplet_id: Option<&Value>,
) -> Result<ClientFilter, Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut filter = ClientFilter::default();
    if feed == Feed::Tasks {
        if let Some(t) = task_type {
            let n = t.chars().count();
            if n == 0 || n > 50 {
                errors.push(FieldError::new(
                    &["task_type"],
                    "String should have 1 to 50 characters",
                    "string_too_long",
                ));
            }
            filter.task_type = Some(t.to_string());
        }
        if let Some(s) = status {
            match Status::parse(s) {
                Some(s) => filter.status = Some(s.as_str().to_string()),
                None => errors.push(FieldError::new(
                    &["status"],
                    "Input should be 'pending', 'assigned', 'in_progress', 'completed', 'failed' or 'cancelled'",
                    "enum",
                )),
            }
        }
    }
    if let Some(d) = droplet_id {
        let parsed = match d {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.trim_start_matches("droplet-").parse::<i64>().ok(),
            _ => None,
        };
        match parsed
            .and_then(|n| i32::try_from(n).ok())
            .filter(|n| *n > 0)
        {
            Some(n) => filter.droplet_id = Some(n),
            None => errors.push(FieldError::new(
                &["droplet_id"],
                "Input should be a valid integer",
                "int_parsing",
            )),
        }
    }
    if errors.is_empty() {
        Ok(filter)
    } else {
        Err(errors)
    }
}

/// Everything that can refuse a socket, in the contract's order, before the upgrade:
/// authentication (401), permission (403), filters (422), the per-droplet limit and the
/// global `WS_MAX_CONNECTIONS` (429).
fn open(
    state: AppState,
    feed: Feed,
    raw_query: Option<String>,
    headers: &HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let query = FeedQuery::parse(raw_query.as_deref());
    let caller = match authenticate(&state, &query, headers) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let droplet_id = query.droplet_id.clone().map(Value::String);
    let filter = match check_filter(
        feed,
        query.task_type.as_deref(),
        query.status.as_deref(),
        droplet_id.as_ref(),
    ) {
        Ok(f) => f,
        Err(errors) => {
            return ApiError::Validation(
                errors
                    .into_iter()
                    .map(|mut e| {
                        e.loc.insert(0, json!("query"));
                        e
                    })
                    .collect(),
            )
            .into_response()
        }
    };
    let after = match query.after.as_deref().map(str::parse::<i64>) {
        None => None,
        Some(Ok(n)) if n >= 0 => Some(n),
        Some(_) => {
            return ApiError::invalid(
                &["query", "after"],
                "Input should be a non-negative integer (an event_id)",
                "int_parsing",
            )
            .into_response()
        }
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    let config = state.config();
    let Some(registration) = state.events.register(feed, caller.droplet_id, filter) else {
        return too_many(caller.droplet_id, config.ws_max_connections_per_droplet);
    };
    // The global cap is checked after registering, so two upgrades racing for the last slot
    // both count each other: the hub never holds more than `ws_max_connections` sockets.
    if state.events.connection_count() > config.ws_max_connections {
        drop(registration);
        return refuse(format!(
            "The server already has {} WebSocket connections open",
            config.ws_max_connections
        ));
    }
    let expires_at = caller.expires_at;
    // Frames and messages both: a client has nothing to say that needs more than a few KiB.
    // Small socket buffers: tungstenite's defaults (128 KiB each way) would cost about a
    // quarter of a megabyte per dashboard, 2.5 GB at 10,000 clients; events are small.
    ws.max_message_size(config.ws_max_message_bytes)
        .max_frame_size(config.ws_max_message_bytes)
        .read_buffer_size(8 * 1024)
        .write_buffer_size(8 * 1024)
        .on_failed_upgrade(|e| tracing::debug!(error = %e, "websocket upgrade failed"))
        .on_upgrade(move |socket| serve_socket(state, socket, registration, expires_at, after))
}

/// The token comes in `?token=` (browsers cannot set headers on a WebSocket), or as a bearer
/// header for clients that can.
fn authenticate(state: &AppState, query: &FeedQuery, headers: &HeaderMap) -> ApiResult<Caller> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().to_string())
        .filter(|t| !t.is_empty());
    let token = query
        .token
        .clone()
        .or(bearer)
        .ok_or(ApiError::Unauthenticated)?;
    let claims = state.keys.verify(&token)?;
    let caller = Caller::from_claims(&claims);
    udc::set_caller(caller.droplet_id);
    caller.require(Permission::Read)?;
    Ok(caller)
}

fn too_many(droplet_id: i32, max: usize) -> Response {
    refuse(format!(
        "Droplet {droplet_id} already has {max} WebSocket connections open"
    ))
}

/// A 429 with `Retry-After: 1`, before the upgrade.
fn refuse(detail: String) -> Response {
    let mut response = (
        StatusCode::TOO_MANY_REQUESTS,
        Json(json!({
            "detail": detail,
            "trace_id": udc::current_trace_id(),
        })),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from(1));
    response
}

/// What the socket does about a frame from the client.
enum Reply {
    Nothing,
    Frame(Message),
    Closed,
}

/// The close code of a socket whose token expired (`exp` passed).
pub const TOKEN_EXPIRED: u16 = 4001;

/// How long until `expires_at` (epoch seconds); zero when it has passed.
fn until_expiry(expires_at: i64) -> Duration {
    let left_ms = expires_at
        .saturating_mul(1000)
        .saturating_sub(chrono::Utc::now().timestamp_millis());
    // A century is as good as never, and keeps the timer's arithmetic far from overflow.
    Duration::from_millis(
        u64::try_from(left_ms)
            .unwrap_or(0)
            .min(100 * 365 * 86_400_000),
    )
}

/// The one task of a socket: the replay of a resuming client, then events from the client's
/// queue, pings, the client's frames, kicks from the hub, the token's expiry and the server's
/// shutdown, every frame sent under the same `Watch`. Dropping `registration` at the end
/// frees the client's slot however the socket ended.
async fn serve_socket(
    state: AppState,
    mut socket: WebSocket,
    mut registration: ClientRegistration,
    expires_at: i64,
    after: Option<i64>,
) {
    let watch = Watch::new(&state, &registration, until_expiry(expires_at));
    let gauge = state
        .metrics
        .ws_connections
        .with_label_values(&[registration.feed.as_str()]);
    gauge.inc();
    let close = serve(&state, &mut socket, &mut registration, &watch, after).await;
    if let Some((code, reason)) = close {
        tracing::debug!(
            code,
            reason,
            feed = registration.feed.as_str(),
            "websocket closed by the server"
        );
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        }));
        if let Ok(Ok(())) = tokio::time::timeout(CLOSE_GRACE, socket.send(frame)).await {
            // Wait briefly for the client's closing reply: closing the connection at once could
            // make the client fail on a write before it reads our close frame.
            drain(&mut socket).await;
        }
    }
    gauge.dec();
    drop(registration);
}

/// Reads the client's frames until its stream ends, for at most `CLOSE_GRACE`: the reply to
/// a close frame goes out as the stream is read.
async fn drain(socket: &mut WebSocket) {
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(Ok(_)) = socket.recv().await {}
    })
    .await;
}

/// The socket's life until it must end; returns the close frame to send, if any.
async fn serve(
    state: &AppState,
    socket: &mut WebSocket,
    registration: &mut ClientRegistration,
    watch: &Watch,
    after: Option<i64>,
) -> Close {
    // Resuming: the events after the client's last one, from the log, then live ones with no
    // gap (the client was registered before the log was read) and no duplicate (live events
    // up to the last one sent from the log are skipped).
    let last_sent = match after {
        Some(after) => match replay::resume(state, socket, registration, after, watch).await {
            Ok(last) => last,
            Err(close) => return close,
        },
        None => 0,
    };
    loop {
        tokio::select! {
            biased;
            _ = watch.shutdown.cancelled() => return Some((1001, "server shutting down")),
            _ = watch.kicked.cancelled() => return Some(Watch::kick_close(registration)),
            _ = tokio::time::sleep_until(watch.expires) => return Some((TOKEN_EXPIRED, "token expired")),
            outbound = registration.rx.recv() => {
                let (message, is_event) = match outbound {
                    Some(Outbound::Event(id, _)) if id > 0 && id <= last_sent => continue,
                    Some(Outbound::Event(_, text)) => match Utf8Bytes::try_from(text) {
                        Ok(text) => (Message::Text(text), true),
                        Err(_) => continue,
                    },
                    Some(Outbound::Ping) => (Message::Ping(Default::default()), false),
                    None => return Some((1011, "event hub closed")),
                };
                if let Err(close) = watch.send(socket, message, registration).await {
                    return close;
                }
                if is_event {
                    registration.count_sent();
                }
            }
            incoming = socket.recv() => {
                let message = match incoming {
                    Some(Ok(message)) => message,
                    Some(Err(e)) => return too_long(&e).then_some((1009, "message too big")),
                    None => return None,
                };
                match answer(registration, message, watch.source) {
                    Reply::Nothing => {}
                    Reply::Frame(reply) => {
                        if let Err(close) = watch.send(socket, reply, registration).await {
                            return close;
                        }
                    }
                    Reply::Closed => {
                        drain(socket).await;
                        return None;
                    }
                }
            }
        }
    }
}

/// Whether a read failed because the client sent more than the limit. axum hides the
/// tungstenite error type, so its text is what there is to go by.
fn too_long(e: &axum::Error) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    text.contains("too long") || text.contains("space limit")
}

/// Clients may send pings, pongs, `{"subscribe": {...filters}}` and close frames; anything
/// else gets an error frame and changes nothing.
fn answer(registration: &ClientRegistration, message: Message, source: i32) -> Reply {
    let error_frame = |detail: &str| error_frame(source, detail);
    match message {
        Message::Pong(_) => {
            registration.pong();
            Reply::Nothing
        }
        // The WebSocket layer answers pings by itself.
        Message::Ping(_) => Reply::Nothing,
        Message::Close(_) => Reply::Closed,
        Message::Binary(_) => error_frame("binary frames are not accepted; send JSON text"),
        Message::Text(text) => {
            let text = text.as_str().trim();
            if text.eq_ignore_ascii_case("ping") {
                return Reply::Frame(Message::Text(Utf8Bytes::from_static("pong")));
            }
            let Ok(Value::Object(body)) = serde_json::from_str::<Value>(text) else {
                return error_frame(
                    r#"expected {"subscribe": {...filters}}, "ping", or a WebSocket ping/pong"#,
                );
            };
            match body.get("subscribe") {
                Some(Value::Object(f)) => subscribe(registration, f, source),
                Some(Value::Null) => subscribe(registration, &Default::default(), source),
                Some(_) => error_frame("subscribe takes an object of filters"),
                None if body.get("type").and_then(Value::as_str) == Some("ping") => {
                    Reply::Frame(response_frame(source, json!({ "type": "pong" })))
                }
                None => error_frame(r#"unknown message; send {"subscribe": {...filters}}"#),
            }
        }
    }
}

/// Replaces the client's filter (an empty object receives everything) and acknowledges it.
fn subscribe(
    registration: &ClientRegistration,
    f: &serde_json::Map<String, Value>,
    source: i32,
) -> Reply {
    let error_frame = |detail: &str| error_frame(source, detail);
    let text = |k: &str| f.get(k).filter(|v| !v.is_null());
    let mut problems = Vec::new();
    let task_type = match text("task_type") {
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => {
            problems.push("task_type should be a string".to_string());
            None
        }
        None => None,
    };
    let status = match text("status") {
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => {
            problems.push("status should be a string".to_string());
            None
        }
        None => None,
    };
    if !problems.is_empty() {
        return error_frame(&problems.join("; "));
    }
    match check_filter(registration.feed, task_type, status, text("droplet_id")) {
        Ok(filter) => {
            let ack = json!({ "subscribed": filter, "feed": registration.feed.as_str() });
            registration.set_filter(filter);
            Reply::Frame(response_frame(source, ack))
        }
        Err(errors) => error_frame(
            &errors
                .iter()
                .map(|e| {
                    format!(
                        "{}: {}",
                        e.loc.first().and_then(Value::as_str).unwrap_or(""),
                        e.msg
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
        ),
    }
}

fn error_frame(source: i32, detail: &str) -> Reply {
    Reply::Frame(response_frame(source, json!({ "error": detail })))
}

/// Answers to a client's own messages are UDC `response` envelopes, so a dashboard tells
/// them from events by `message_type`.
fn response_frame(source: i32, payload: Value) -> Message {
    let envelope = Envelope::new("response", source, Value::Null, payload).to_value();
    Message::Text(Utf8Bytes::from(envelope.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_measured_from_now_and_never_negative_or_unbounded() {
        let now = chrono::Utc::now().timestamp();
        assert_eq!(until_expiry(now - 10), Duration::ZERO);
        assert_eq!(until_expiry(i64::MIN), Duration::ZERO);
        let soon = until_expiry(now + 2);
        assert!(
            soon >= Duration::from_millis(900) && soon <= Duration::from_secs(2),
            "{soon:?}"
        );
        assert!(until_expiry(i64::MAX) <= Duration::from_secs(100 * 365 * 86_400));
    }

    #[test]
    fn query_keeps_the_first_non_empty_value_and_ignores_unknown_keys() {
        let q = FeedQuery::parse(Some("token=a%2Bb&status=&status=pending&x=1&status=failed"));
        assert_eq!(q.token.as_deref(), Some("a+b"));
        assert_eq!(q.status.as_deref(), Some("pending"));
        assert_eq!(q.task_type, None);
    }

    #[test]
    fn filters_are_checked_and_droplet_feed_keeps_only_the_droplet() {
        let f = check_filter(
            Feed::Tasks,
            Some("verify"),
            Some("assigned"),
            Some(&json!("8")),
        )
        .unwrap();
        assert_eq!(f.task_type.as_deref(), Some("verify"));
        assert_eq!(f.status.as_deref(), Some("assigned"));
        assert_eq!(f.droplet_id, Some(8));
        let f = check_filter(
            Feed::Droplets,
            Some("verify"),
            Some("nope"),
            Some(&json!(8)),
        )
        .unwrap();
        assert_eq!(
            f,
            ClientFilter {
                droplet_id: Some(8),
                ..Default::default()
            }
        );
        assert!(check_filter(Feed::Tasks, None, Some("done"), None).is_err());
        assert!(check_filter(Feed::Tasks, None, None, Some(&json!("x"))).is_err());
        assert!(check_filter(Feed::Tasks, Some(""), None, None).is_err());
    }
}
