//! One error type for every handler, mapped to the contract's status codes and bodies.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::udc;

pub use crate::validation::FieldError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Not authenticated")]
    Unauthenticated,
    /// A token that fails a check; the text says which (never the token or a key).
    #[error("Could not validate credentials: {0}")]
    InvalidCredentials(&'static str),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("Request body too large")]
    PayloadTooLarge,
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    #[error("Rate limit exceeded")]
    RateLimited { retry_after_seconds: u64 },
    /// Pushed back (a key past its `max_queued`): 429 with this detail and `Retry-After`.
    #[error("{detail}")]
    Backpressure {
        detail: String,
        retry_after_seconds: u64,
    },
    #[error("Service unavailable")]
    Unavailable,
    #[error("{0}")]
    ServiceUnavailable(String),
    #[error("{0}")]
    BadGateway(String),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn forbidden(msg: impl Into<String>) -> Self {
        ApiError::Forbidden(msg.into())
    }
    pub fn not_found(msg: impl Into<String>) -> Self {
        ApiError::NotFound(msg.into())
    }
    pub fn conflict(msg: impl Into<String>) -> Self {
        ApiError::Conflict(msg.into())
    }
    pub fn internal(msg: impl std::fmt::Display) -> Self {
        ApiError::Internal(msg.to_string())
    }
    /// A single-field 422.
    pub fn invalid(loc: &[&str], msg: impl Into<String>, kind: &str) -> Self {
        ApiError::Validation(vec![FieldError::new(loc, msg, kind)])
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthenticated | ApiError::InvalidCredentials(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::RateLimited { .. } | ApiError::Backpressure { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::Unavailable | ApiError::ServiceUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Whether a database error means "the database is not reachable" rather than a bug.
pub fn is_unavailable(err: &sqlx::Error) -> bool {
    matches!(
        err,
        sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
    ) || matches!(err, sqlx::Error::Protocol(_))
        || matches!(err, sqlx::Error::Database(db) if db.code().is_some_and(|c| {
            // admin_shutdown, crash_shutdown, cannot_connect_now, too_many_connections
            matches!(c.as_ref(), "57P01" | "57P02" | "57P03" | "53300")
        }))
}

/// Whether PostgreSQL refused a value the client sent because text cannot hold it: a NUL
/// character (`\u0000`) in a string, a query parameter or a JSON value. JSON allows it,
/// PostgreSQL's text and jsonb do not (22021 invalid byte sequence, 22P05 unsupported
/// escape), so it is the client's bad input, not a bug.
pub fn is_unstorable_text(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db)
        if db.code().is_some_and(|c| matches!(c.as_ref(), "22021" | "22P05")))
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        if is_unavailable(&err) {
            tracing::warn!(error = %err, "database unavailable");
            ApiError::Unavailable
        } else if is_unstorable_text(&err) {
            // Which field held it is not known here; any field of the request may have.
            ApiError::Validation(vec![FieldError::new(
                &["request"],
                "Text must not contain NUL (\\u0000) characters",
                "string_nul",
            )])
        } else {
            ApiError::Internal(format!("database: {err}"))
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let trace_id = udc::current_trace_id();
        let body = match &self {
            ApiError::Validation(errors) => json!({ "detail": errors, "trace_id": trace_id }),
            ApiError::Internal(detail) => {
                // The only place internal details go: the log, once.
                tracing::error!(error = %detail, trace_id = trace_id.as_deref().unwrap_or("-"), "internal error");
                json!({ "detail": "Internal server error", "trace_id": trace_id })
            }
            other => json!({ "detail": other.to_string(), "trace_id": trace_id }),
        };
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        match &self {
            ApiError::Unauthenticated | ApiError::InvalidCredentials(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::RateLimited {
                retry_after_seconds,
            }
            | ApiError::Backpressure {
                retry_after_seconds,
                ..
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_seconds));
            }
            _ => {}
        }
        response
    }
}

impl From<crate::identity::TokenError> for ApiError {
    fn from(e: crate::identity::TokenError) -> Self {
        match e {
            crate::identity::TokenError::Invalid(why) => ApiError::InvalidCredentials(why),
            crate::identity::TokenError::Signing(m) => ApiError::Internal(m),
        }
    }
}

impl From<crate::services::error::Error> for ApiError {
    fn from(e: crate::services::error::Error) -> Self {
        use crate::services::error::Error;
        match e {
            Error::NotFound(m) => ApiError::NotFound(m),
            Error::Forbidden(m) => ApiError::Forbidden(m),
            Error::Conflict(m) => ApiError::Conflict(m),
            Error::Invalid(errors) => ApiError::Validation(errors),
            Error::Unavailable(m) => ApiError::ServiceUnavailable(m),
            Error::Upstream(m) => ApiError::BadGateway(m),
            Error::Backpressure {
                detail,
                retry_after_seconds,
            } => ApiError::Backpressure {
                detail,
                retry_after_seconds,
            },
            Error::Database(e) => ApiError::from(e),
            Error::Internal(m) => ApiError::Internal(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use axum::body::Body;
    use axum::extract::Request;
    use axum::middleware::{from_fn, Next};
    use axum::routing::get;
    use axum::Router;
    use tower::ServiceExt;
    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    /// Everything the subscriber writes, kept for the test to read.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    #[tokio::test]
    async fn the_internal_error_log_line_carries_the_trace_id() {
        let log = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(log.clone())
            .with_ansi(false)
            .finish();
        // A current-thread runtime: the subscriber set here sees the whole request.
        let _default = tracing::subscriber::set_default(subscriber);
        let app = Router::new()
            .route(
                "/boom",
                get(|| async { Err::<(), _>(ApiError::internal("the disk is on fire")) }),
            )
            .layer(from_fn(|request: Request, next: Next| {
                udc::trace_scope(10, request, next)
            }));

        let response = app
            .oneshot(
                Request::get("/boom")
                    .header("x-trace-id", "trace-5f2c-internal")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();

        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body,
            json!({"detail": "Internal server error", "trace_id": "trace-5f2c-internal"})
        );
        let log = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        let line = log
            .lines()
            .find(|l| l.contains("internal error"))
            .unwrap_or_else(|| panic!("no internal error line in: {log}"));
        assert!(line.contains("trace-5f2c-internal"), "{line}");
        assert!(line.contains("the disk is on fire"), "{line}");
    }
}
