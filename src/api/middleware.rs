//! Cross-cutting HTTP layers: the request span and log line, metrics, security headers,
//! the body size limit and the request timeout.

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use crate::error::ApiError;
use crate::state::AppState;

/// One span per request (method, matched route, status, latency, trace id) and one log line.
/// The path is logged without its query string, so a `?token=` never reaches a log.
pub async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let span = tracing::info_span!(
        "request",
        method = %method,
        route = %route,
        status = tracing::field::Empty,
        latency_ms = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    let source = state.config().droplet_id;
    let response = crate::udc::trace_scope(source, request, next)
        .instrument(span.clone())
        .await;
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    span.record("status", status);
    span.record("latency_ms", elapsed.as_secs_f64() * 1000.0);
    let status_label = status.to_string();
    state
        .metrics
        .http_requests
        .with_label_values(&[method.as_str(), route.as_str(), status_label.as_str()])
        .inc();
    state
        .metrics
        .http_latency
        .with_label_values(&[method.as_str(), route.as_str()])
        .observe(elapsed.as_secs_f64());
    span.in_scope(|| {
        if status >= 500 {
            tracing::error!("request failed");
        } else if route != "/health" {
            tracing::debug!("request served");
        }
    });
    response
}

/// Headers suited to a JSON API.
pub async fn security_headers(request: Request, next: Next) -> Response {
    let is_docs =
        request.uri().path().starts_with("/docs") || request.uri().path().starts_with("/dashboard");
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if !is_docs {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
        );
        h.entry(header::CACHE_CONTROL)
            .or_insert(HeaderValue::from_static("no-store"));
    }
    response
}

/// A 413 in the contract's shape as soon as a declared `Content-Length` is over the limit,
/// before authentication or any handler runs. Bodies without a length (chunked) are cut
/// when read, by `DefaultBodyLimit`, with the same answer (see `udc::read_body`).
pub async fn body_limit(State(max): State<usize>, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        return ApiError::PayloadTooLarge.into_response();
    }
    next.run(request).await
}

/// `REQUEST_TIMEOUT_SECONDS` (read per request, so reload-config applies), answered as a 503
/// in the contract's shape. A WebSocket is not cut: its upgrade answers at once and the
/// socket lives on its own task.
pub async fn timeout(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let seconds = state.config().request_timeout_seconds;
    match tokio::time::timeout(Duration::from_secs(seconds), next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(timeout_seconds = seconds, "request timed out");
            ApiError::ServiceUnavailable(format!("Request timed out after {seconds} seconds"))
                .into_response()
        }
    }
}
