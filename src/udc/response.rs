//! The response envelope every authenticated answer is wrapped in.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;

use super::scope::{current_caller, current_source, current_trace_id};
use crate::protocol::Envelope;

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
    envelope(payload).to_value()
}

/// The response envelope of the request being served: its trace id, this orchestrator as
/// the source, the caller as the target.
fn envelope<T: Serialize>(payload: &T) -> Envelope<'static, &T> {
    Envelope::new("response", current_source(), current_caller(), payload).trace(current_trace_id())
}

impl<T: Serialize> IntoResponse for Udc<T> {
    fn into_response(self) -> Response {
        (self.status, axum::Json(envelope(&self.payload))).into_response()
    }
}
