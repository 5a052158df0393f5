//! The UDC envelope: the request extractor, the response wrapper, the request's trace id,
//! and the FastAPI-shaped validation errors droplets already parse.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::error::{ApiError, FieldError};

pub const UDC_VERSION: &str = "1.0";
pub static TRACE_ID_HEADER: HeaderName = HeaderName::from_static("x-trace-id");

// ---------------------------------------------------------------------------
// The request scope: trace id and caller, visible to every extractor, handler and error.

struct RequestScope {
    trace_id: Mutex<String>,
    caller: Mutex<Option<i32>>,
    source: i32,
}

tokio::task_local! {
    static SCOPE: Arc<RequestScope>;
}

/// The trace id of the request being served, if any.
pub fn current_trace_id() -> Option<String> {
    SCOPE
        .try_with(|s| s.trace_id.lock().map(|t| t.clone()).ok())
        .ok()
        .flatten()
}

/// The envelope's trace id wins over the header's once the body is read.
fn set_trace_id(trace_id: &str) {
    let _ = SCOPE.try_with(|s| {
        if let Ok(mut t) = s.trace_id.lock() {
            *t = trace_id.to_string();
        }
    });
}

/// Records who is calling, for the response envelope's `target`.
pub fn set_caller(droplet_id: i32) {
    let _ = SCOPE.try_with(|s| {
        if let Ok(mut c) = s.caller.lock() {
            *c = Some(droplet_id);
        }
    });
}

fn current_caller() -> Option<i32> {
    SCOPE
        .try_with(|s| s.caller.lock().ok().and_then(|c| *c))
        .ok()
        .flatten()
}

fn current_source() -> i32 {
    SCOPE.try_with(|s| s.source).unwrap_or(10)
}

/// A trace id from a client header, kept only when it is short and printable.
fn usable_trace_id(value: Option<&HeaderValue>) -> Option<String> {
    let v = value?.to_str().ok()?.trim();
    (!v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_graphic()))
        .then(|| v.to_string())
}

/// Middleware: opens the request scope and puts `X-Trace-Id` on every response.
pub async fn trace_scope(source: i32, request: Request, next: Next) -> Response {
    let trace_id = usable_trace_id(request.headers().get(&TRACE_ID_HEADER))
        .unwrap_or_else(|| Uuid::new_v4().to_string());
    let scope = Arc::new(RequestScope {
        trace_id: Mutex::new(trace_id),
        caller: Mutex::new(None),
        source,
    });
    let span = tracing::Span::current();
    let mut response = SCOPE.scope(scope.clone(), next.run(request)).await;
    let trace_id = scope.trace_id.lock().map(|t| t.clone()).unwrap_or_default();
    span.record("trace_id", trace_id.as_str());
    if let Ok(value) = HeaderValue::from_str(&trace_id) {
        response
            .headers_mut()
            .insert(TRACE_ID_HEADER.clone(), value);
    }
    response
}

// ---------------------------------------------------------------------------
// Times: UTC out with a `Z`, in with `Z`, an offset, or none (naive = UTC).

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

/// `#[serde(serialize_with = "udc::ts")]` for `NaiveDateTime` columns.
pub fn ts<S: serde::Serializer>(dt: &NaiveDateTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&iso(dt))
}

/// `#[serde(serialize_with = "udc::ts_opt")]` for nullable `NaiveDateTime` columns.
pub fn ts_opt<S: serde::Serializer>(dt: &Option<NaiveDateTime>, s: S) -> Result<S::Ok, S::Error> {
    match dt {
        Some(dt) => s.serialize_str(&iso(dt)),
        None => s.serialize_none(),
    }
}

// ---------------------------------------------------------------------------
// The request envelope.

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
    fn parse(raw: &str) -> Option<Self> {
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

/// What the envelope says besides its payload. `source` is recorded, never trusted.
#[derive(Debug, Clone, Serialize)]
pub struct EnvelopeMeta {
    pub udc_version: String,
    pub trace_id: String,
    pub source: Value,
    pub target: Option<Value>,
    pub message_type: MessageType,
    pub timestamp: DateTime<Utc>,
}

/// Business rules a payload checks after it deserialized; locations are relative to the payload.
pub trait Validate {
    fn validate(&self) -> Vec<FieldError> {
        Vec::new()
    }
}

impl Validate for Value {}
impl Validate for Map<String, Value> {}

/// The extractor for enveloped bodies: the typed payload and the envelope's metadata.
#[derive(Debug, Clone)]
pub struct Envelope<T> {
    pub meta: EnvelopeMeta,
    pub payload: T,
}

impl<S, T> FromRequest<S> for Envelope<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Validate,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req, state).await?;
        let object = parse_object(&bytes)?;
        let (meta, payload) = split_envelope(object).map_err(ApiError::Validation)?;
        set_trace_id(&meta.trace_id);
        let payload = deserialize_payload::<T>(payload, &["body", "payload"])
            .map_err(ApiError::Validation)?;
        Ok(Envelope { meta, payload })
    }
}

/// A bare JSON body (for the public `/token`), with the same error shapes.
#[derive(Debug, Clone)]
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Validate,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req, state).await?;
        let object = parse_object(&bytes)?;
        deserialize_payload::<T>(Value::Object(object), &["body"])
            .map(JsonBody)
            .map_err(ApiError::Validation)
    }
}

/// An enveloped body when there is one (for `/send` and `/broadcast`, whose message may
/// come from the query string instead).
#[derive(Debug, Clone)]
pub struct OptionalEnvelope(pub Option<Envelope<Value>>);

impl<S: Send + Sync> FromRequest<S> for OptionalEnvelope {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req, state).await?;
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(OptionalEnvelope(None));
        }
        let object = parse_object(&bytes)?;
        let (meta, payload) = split_envelope(object).map_err(ApiError::Validation)?;
        set_trace_id(&meta.trace_id);
        Ok(OptionalEnvelope(Some(Envelope { meta, payload })))
    }
}

/// The body as it came, parsed by the handler after it checked who is asking, so that a
/// caller without the permission gets 403 before any 422 about its body (the contract's
/// order: 401, 403, 404, 403, 409/422).
#[derive(Debug, Clone)]
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        read_body(req, state).await.map(RawBody)
    }
}

/// Whether an object is an envelope (either form) rather than a bare payload.
fn looks_enveloped(object: &Map<String, Value>) -> bool {
    ["payload", "trace_id", "message_type"]
        .iter()
        .any(|k| object.contains_key(*k))
}

impl RawBody {
    fn is_blank(&self) -> bool {
        self.0.iter().all(|b| b.is_ascii_whitespace())
    }

    /// The strict envelope with its typed payload.
    pub fn envelope<T: DeserializeOwned + Validate>(&self) -> Result<Envelope<T>, ApiError> {
        let object = parse_object(&self.0)?;
        let (meta, payload) = split_envelope(object).map_err(ApiError::Validation)?;
        set_trace_id(&meta.trace_id);
        let payload = deserialize_payload::<T>(payload, &["body", "payload"])
            .map_err(ApiError::Validation)?;
        Ok(Envelope { meta, payload })
    }

    /// An envelope, or a bare payload with no envelope at all (what droplet-2 sends to
    /// register and heartbeat): the metadata is `None` then, and `bare` may reshape the
    /// object first. Errors point into the body itself for a bare payload.
    pub fn envelope_or_bare<T: DeserializeOwned + Validate>(
        &self,
        bare: impl FnOnce(Map<String, Value>) -> Map<String, Value>,
    ) -> Result<(Option<EnvelopeMeta>, T), ApiError> {
        let object = parse_object(&self.0)?;
        if looks_enveloped(&object) {
            let envelope = self.envelope::<T>()?;
            return Ok((Some(envelope.meta), envelope.payload));
        }
        let payload = deserialize_payload::<T>(Value::Object(bare(object)), &["body"])
            .map_err(ApiError::Validation)?;
        Ok((None, payload))
    }

    /// For `/send` and `/broadcast`: nothing, an envelope, or a bare JSON object (the
    /// message itself).
    pub fn optional_message(&self) -> Result<Option<(Option<EnvelopeMeta>, Value)>, ApiError> {
        if self.is_blank() {
            return Ok(None);
        }
        let object = parse_object(&self.0)?;
        if looks_enveloped(&object) {
            let (meta, payload) = split_envelope(object).map_err(ApiError::Validation)?;
            set_trace_id(&meta.trace_id);
            return Ok(Some((Some(meta), payload)));
        }
        Ok(Some((None, Value::Object(object))))
    }
}

async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge
        } else {
            ApiError::invalid(&["body"], rejection.body_text(), "body_read_error")
        }
    })
}

fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::Validation(vec![FieldError::missing(&["body"])]));
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::invalid(
            &["body"],
            "Input should be a valid dictionary or object to extract fields from",
            "model_attributes_type",
        )),
        Err(e) => Err(ApiError::Validation(vec![FieldError {
            loc: vec![json!("body"), json!(e.column())],
            msg: format!("JSON decode error: {e}"),
            kind: "json_invalid".into(),
        }])),
    }
}

fn id_like(value: &Value) -> bool {
    match value {
        Value::Number(n) => n.is_i64() || n.is_u64(),
        Value::String(s) => !s.is_empty() && s.len() <= 100,
        _ => false,
    }
}

/// Splits an envelope (either form) into its metadata and its payload, or every problem found.
fn split_envelope(mut body: Map<String, Value>) -> Result<(EnvelopeMeta, Value), Vec<FieldError>> {
    let legacy = !body.contains_key("trace_id")
        && !body.contains_key("message_type")
        && matches!(body.get("metadata"), Some(Value::Object(_)));
    let mut errors = Vec::new();

    let (fields, prefix): (Map<String, Value>, &str) = if legacy {
        match body.remove("metadata") {
            Some(Value::Object(m)) => (m, "metadata"),
            _ => (Map::new(), "metadata"),
        }
    } else {
        (body.clone(), "")
    };
    let loc = |field: &'static str| -> Vec<&'static str> {
        if prefix.is_empty() {
            vec!["body", field]
        } else {
            vec!["body", "metadata", field]
        }
    };

    let trace_id = match fields.get("trace_id") {
        Some(Value::String(s)) if !s.trim().is_empty() && s.len() <= 128 => {
            Some(s.trim().to_string())
        }
        Some(Value::Null) | None => {
            errors.push(FieldError::missing(&loc("trace_id")));
            None
        }
        Some(_) => {
            errors.push(FieldError::new(
                &loc("trace_id"),
                "Input should be a valid string (1-128 characters)",
                "string_type",
            ));
            None
        }
    };

    let source_key = if legacy && fields.contains_key("source_droplet_id") {
        "source_droplet_id"
    } else {
        "source"
    };
    let source = match fields.get(source_key) {
        Some(v) if id_like(v) => Some(v.clone()),
        Some(Value::Null) | None => {
            errors.push(FieldError::missing(&loc(if legacy {
                "source_droplet_id"
            } else {
                "source"
            })));
            None
        }
        Some(_) => {
            errors.push(FieldError::new(
                &loc("source"),
                "Input should be a valid integer or string",
                "int_or_string_type",
            ));
            None
        }
    };

    let target = match fields.get("target") {
        None | Some(Value::Null) => None,
        Some(v) if id_like(v) => Some(v.clone()),
        Some(_) => {
            errors.push(FieldError::new(
                &loc("target"),
                "Input should be a valid integer or string",
                "int_or_string_type",
            ));
            None
        }
    };

    let message_type = match fields.get("message_type") {
        None | Some(Value::Null) if legacy => Some(MessageType::Command),
        None | Some(Value::Null) => {
            errors.push(FieldError::missing(&loc("message_type")));
            None
        }
        Some(Value::String(s)) if MessageType::parse(s).is_some() => MessageType::parse(s),
        Some(_) => {
            errors.push(FieldError::new(
                &loc("message_type"),
                "Input should be 'command', 'query', 'response', 'event' or 'heartbeat'",
                "enum",
            ));
            None
        }
    };

    let timestamp = match fields.get("timestamp") {
        None | Some(Value::Null) if legacy => Some(Utc::now()),
        None | Some(Value::Null) => {
            errors.push(FieldError::missing(&loc("timestamp")));
            None
        }
        Some(Value::String(s)) => match parse_time(s) {
            Some(t) => Some(t),
            None => {
                errors.push(FieldError::new(
                    &loc("timestamp"),
                    "Input should be a valid datetime (ISO-8601)",
                    "datetime_from_date_parsing",
                ));
                None
            }
        },
        Some(_) => {
            errors.push(FieldError::new(
                &loc("timestamp"),
                "Input should be a valid datetime (ISO-8601)",
                "datetime_type",
            ));
            None
        }
    };

    let udc_version = match fields.get("udc_version") {
        None | Some(Value::Null) => UDC_VERSION.to_string(),
        Some(Value::String(s)) if s.len() <= 20 => s.clone(),
        Some(_) => {
            errors.push(FieldError::new(
                &loc("udc_version"),
                "Input should be a valid string",
                "string_type",
            ));
            UDC_VERSION.to_string()
        }
    };

    let payload = match body.remove("payload") {
        Some(Value::Object(p)) => Some(Value::Object(p)),
        None | Some(Value::Null) => {
            errors.push(FieldError::missing(&["body", "payload"]));
            None
        }
        Some(_) => {
            errors.push(FieldError::new(
                &["body", "payload"],
                "Input should be a valid dictionary",
                "dict_type",
            ));
            None
        }
    };

    match (trace_id, source, message_type, timestamp, payload) {
        (Some(trace_id), Some(source), Some(message_type), Some(timestamp), Some(payload))
            if errors.is_empty() =>
        {
            Ok((
                EnvelopeMeta {
                    udc_version,
                    trace_id,
                    source,
                    target,
                    message_type,
                    timestamp,
                },
                payload,
            ))
        }
        _ => Err(errors),
    }
}

/// Deserializes a payload into `T`, turning serde's complaints into located 422 entries.
pub fn deserialize_payload<T: DeserializeOwned + Validate>(
    payload: Value,
    prefix: &[&str],
) -> Result<T, Vec<FieldError>> {
    let value: T = serde_path_to_error::deserialize(payload).map_err(|err| {
        let mut loc: Vec<Value> = prefix.iter().map(|p| json!(p)).collect();
        for segment in err.path().iter() {
            match segment {
                serde_path_to_error::Segment::Seq { index } => loc.push(json!(index)),
                serde_path_to_error::Segment::Map { key } => loc.push(json!(key)),
                serde_path_to_error::Segment::Enum { variant } => loc.push(json!(variant)),
                serde_path_to_error::Segment::Unknown => {}
            }
        }
        vec![serde_error_entry(loc, &err.inner().to_string())]
    })?;
    let problems = value.validate();
    if problems.is_empty() {
        Ok(value)
    } else {
        Err(problems
            .into_iter()
            .map(|mut p| {
                let mut loc: Vec<Value> = prefix.iter().map(|s| json!(s)).collect();
                loc.append(&mut p.loc);
                p.loc = loc;
                p
            })
            .collect())
    }
}

fn serde_error_entry(mut loc: Vec<Value>, message: &str) -> FieldError {
    // serde says "missing field `name`" at the parent's path.
    if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.trim_end_matches('`');
        loc.push(json!(field));
        return FieldError {
            loc,
            msg: "Field required".into(),
            kind: "missing".into(),
        };
    }
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        return FieldError {
            loc,
            msg: format!("Input should be one of the allowed values (got `{rest}"),
            kind: "enum".into(),
        };
    }
    let kind = if message.starts_with("invalid type") {
        "type_error"
    } else {
        "value_error"
    };
    FieldError {
        loc,
        msg: message.to_string(),
        kind: kind.into(),
    }
}

// ---------------------------------------------------------------------------
// Query strings and paths, with 422s that name the parameter.

/// Query parameters; a bad one is a 422 at `["query", name]`.
#[derive(Debug, Clone)]
pub struct QueryParams<T>(pub T);

impl<S, T> FromRequestParts<S> for QueryParams<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Validate,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        let de = serde_urlencoded::Deserializer::new(form_urlencoded_parse(query));
        let value: T = serde_path_to_error::deserialize(de).map_err(|err| {
            let mut loc = vec![json!("query")];
            let path = err.path().to_string();
            if path != "." {
                loc.push(json!(path));
            }
            ApiError::Validation(vec![serde_error_entry(loc, &err.inner().to_string())])
        })?;
        let problems = value.validate();
        if !problems.is_empty() {
            return Err(ApiError::Validation(
                problems
                    .into_iter()
                    .map(|mut p| {
                        p.loc.insert(0, json!("query"));
                        p
                    })
                    .collect(),
            ));
        }
        Ok(QueryParams(value))
    }
}

fn form_urlencoded_parse(query: &str) -> url::form_urlencoded::Parse<'_> {
    url::form_urlencoded::parse(query.as_bytes())
}

/// A path parameter; a bad one is a 422 at `["path", name]`.
#[derive(Debug, Clone, Copy)]
pub struct PathParam<T>(pub T);

impl<S, T> FromRequestParts<S> for PathParam<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::path::ErrorKind;
        use axum::extract::rejection::PathRejection;
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(PathParam(v)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => {
                // A single value's error carries no key: name the route's own parameter
                // (`task_id`, `droplet_id`), as FastAPI does.
                let route_key = axum::extract::RawPathParams::from_request_parts(parts, state)
                    .await
                    .ok()
                    .and_then(|raw| raw.iter().next().map(|(k, _)| k.to_string()))
                    .unwrap_or_else(|| "id".to_string());
                let (key, msg) = match e.kind() {
                    ErrorKind::ParseErrorAtKey {
                        key,
                        value,
                        expected_type,
                    } => (
                        key.clone(),
                        format!(
                            "Input should be a valid {}, got {value:?}",
                            type_word(expected_type)
                        ),
                    ),
                    ErrorKind::ParseError {
                        value,
                        expected_type,
                    } => (
                        route_key,
                        format!(
                            "Input should be a valid {}, got {value:?}",
                            type_word(expected_type)
                        ),
                    ),
                    other => (route_key, other.to_string()),
                };
                Err(ApiError::Validation(vec![FieldError {
                    loc: vec![json!("path"), json!(key)],
                    msg,
                    kind: "int_parsing".into(),
                }]))
            }
            Err(other) => Err(ApiError::invalid(
                &["path"],
                other.body_text(),
                "value_error",
            )),
        }
    }
}

/// FastAPI's word for a Rust type in a message: `integer` for `i32`, not the Rust name.
fn type_word(rust_type: &str) -> &str {
    let numeric = rust_type
        .get(1..)
        .is_some_and(|bits| !bits.is_empty() && bits.chars().all(|c| c.is_ascii_digit()));
    match rust_type.chars().next() {
        Some('i' | 'u') if numeric => "integer",
        Some('f') if numeric => "number",
        _ => rust_type,
    }
}

// ---------------------------------------------------------------------------
// The response envelope.

#[derive(Serialize)]
struct ResponseEnvelope<'a, T: Serialize> {
    udc_version: &'static str,
    trace_id: String,
    source: i32,
    target: Option<i32>,
    message_type: &'static str,
    payload: &'a T,
    timestamp: String,
}

/// Every authenticated answer: the payload wrapped in the response envelope.
#[derive(Debug, Clone)]
pub struct Udc<T> {
    pub status: StatusCode,
    pub payload: T,
}

impl<T: Serialize> Udc<T> {
    pub fn ok(payload: T) -> Self {
        Udc {
            status: StatusCode::OK,
            payload,
        }
    }
    pub fn created(payload: T) -> Self {
        Udc {
            status: StatusCode::CREATED,
            payload,
        }
    }
    pub fn with_status(status: StatusCode, payload: T) -> Self {
        Udc { status, payload }
    }
}

/// Wraps a payload in the response envelope as JSON (also used for events and dispatch).
pub fn response_envelope<T: Serialize>(payload: &T) -> Value {
    serde_json::to_value(ResponseEnvelope {
        udc_version: UDC_VERSION,
        trace_id: current_trace_id().unwrap_or_else(|| Uuid::new_v4().to_string()),
        source: current_source(),
        target: current_caller(),
        message_type: "response",
        payload,
        timestamp: now_iso(),
    })
    .unwrap_or(Value::Null)
}

impl<T: Serialize> IntoResponse for Udc<T> {
    fn into_response(self) -> Response {
        let envelope = ResponseEnvelope {
            udc_version: UDC_VERSION,
            trace_id: current_trace_id().unwrap_or_else(|| Uuid::new_v4().to_string()),
            source: current_source(),
            target: current_caller(),
            message_type: "response",
            payload: &self.payload,
            timestamp: now_iso(),
        };
        (self.status, axum::Json(envelope)).into_response()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn offsets_with_or_without_colon_and_sane_years() {
        let t = super::parse_time("2026-01-01T12:00:00+0500").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-01-01T07:00:00+00:00");
        let t = super::parse_time("2026-01-01T12:00:00+05:00").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-01-01T07:00:00+00:00");
        let t = super::parse_time("2026-01-01T12:00:00").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-01-01T12:00:00+00:00");
        assert!(super::parse_time("-9999-01-01T00:00:00").is_none());
        assert!(super::parse_time("+20000-01-01T00:00:00Z").is_none());
    }

    use super::*;

    fn envelope(v: Value) -> Result<(EnvelopeMeta, Value), Vec<FieldError>> {
        match v {
            Value::Object(m) => split_envelope(m),
            _ => unreachable!(),
        }
    }

    #[test]
    fn the_api_guide_envelope_is_accepted() {
        let (meta, payload) = envelope(json!({
            "trace_id": "550e8400-e29b-41d4-a716-446655440000", "source": 42, "target": 10,
            "message_type": "command", "payload": {"id": 42}, "timestamp": "2025-01-18T10:00:00Z"
        }))
        .unwrap();
        assert_eq!(meta.message_type, MessageType::Command);
        assert_eq!(meta.source, json!(42));
        assert_eq!(payload, json!({"id": 42}));
    }

    #[test]
    fn the_legacy_metadata_form_is_accepted() {
        let (meta, _) = envelope(json!({
            "metadata": {"source_droplet_id": 5, "trace_id": "t-1", "timestamp": "2025-01-18T10:00:00"},
            "payload": {}
        }))
        .unwrap();
        assert_eq!(meta.message_type, MessageType::Command);
        assert_eq!(meta.trace_id, "t-1");
        assert_eq!(meta.source, json!(5));
    }

    #[test]
    fn every_missing_field_is_named() {
        let errs = envelope(json!({})).unwrap_err();
        let locs: Vec<String> = errs
            .iter()
            .map(|e| e.loc[1].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            locs,
            ["trace_id", "source", "message_type", "timestamp", "payload"]
        );
        assert!(errs
            .iter()
            .all(|e| e.kind == "missing" && e.msg == "Field required"));
    }

    #[test]
    fn mistyped_fields_are_named() {
        let errs = envelope(json!({
            "trace_id": 5, "source": [1], "message_type": "shout", "payload": [], "timestamp": "yesterday"
        }))
        .unwrap_err();
        assert_eq!(errs.len(), 5);
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
    fn payload_errors_point_into_the_payload() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct P {
            title: String,
            priority: i32,
        }
        impl Validate for P {}
        let errs = deserialize_payload::<P>(
            json!({"priority": "high", "title": "x"}),
            &["body", "payload"],
        )
        .unwrap_err();
        assert_eq!(
            errs[0].loc,
            vec![json!("body"), json!("payload"), json!("priority")]
        );
        let errs =
            deserialize_payload::<P>(json!({"priority": 1}), &["body", "payload"]).unwrap_err();
        assert_eq!(
            errs[0].loc,
            vec![json!("body"), json!("payload"), json!("title")]
        );
        assert_eq!(errs[0].kind, "missing");
    }
}
