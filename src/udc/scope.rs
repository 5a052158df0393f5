//! The request scope: trace id and caller, visible to every extractor, handler and error.

use std::sync::{Arc, Mutex};

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use uuid::Uuid;

pub static TRACE_ID_HEADER: HeaderName = HeaderName::from_static("x-trace-id");

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
pub(super) fn set_trace_id(trace_id: &str) {
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

pub(super) fn current_caller() -> Option<i32> {
    SCOPE
        .try_with(|s| s.caller.lock().ok().and_then(|c| *c))
        .ok()
        .flatten()
}

pub(super) fn current_source() -> i32 {
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
