//! Request bodies: the envelope (either form) or a bare body, split into metadata and a
//! typed payload, with FastAPI-shaped 422s located in the request.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::scope::set_trace_id;
use crate::error::{ApiError, FieldError};
use crate::protocol::{parse_time, MessageType, UDC_VERSION};
use crate::validation::Validate;

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
        envelope_of(parse_object(&bytes)?)
    }
}

/// The strict envelope of a parsed body, with its typed payload.
fn envelope_of<T: DeserializeOwned + Validate>(
    object: Map<String, Value>,
) -> Result<Envelope<T>, ApiError> {
    let (meta, payload) = split_envelope(object).map_err(ApiError::Validation)?;
    set_trace_id(&meta.trace_id);
    let payload =
        deserialize_payload::<T>(payload, &["body", "payload"]).map_err(ApiError::Validation)?;
    Ok(Envelope { meta, payload })
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
        envelope_of(parse_object(&self.0)?)
    }

    /// Nothing, or an envelope with any object as its payload (`DELETE /tasks/{id}`'s reason).
    pub fn optional_envelope(&self) -> Result<Option<Envelope<Value>>, ApiError> {
        if self.is_blank() {
            return Ok(None);
        }
        let object = parse_object(&self.0)?;
        let (meta, payload) = split_envelope(object).map_err(ApiError::Validation)?;
        set_trace_id(&meta.trace_id);
        Ok(Some(Envelope { meta, payload }))
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
            // The object parsed above, not the bytes again.
            let envelope = envelope_of::<T>(object)?;
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
    // Taken out first, so that the fields are the body itself, not a copy of it (payload and all).
    let raw_payload = body.remove("payload");

    let (fields, prefix): (Map<String, Value>, &str) = if legacy {
        match body.remove("metadata") {
            Some(Value::Object(m)) => (m, "metadata"),
            _ => (Map::new(), "metadata"),
        }
    } else {
        (body, "")
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

    let payload = match raw_payload {
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

pub(super) fn serde_error_entry(mut loc: Vec<Value>, message: &str) -> FieldError {
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

#[cfg(test)]
mod tests {
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
