//! `GET /dashboard`: the operator's live page and its two assets, embedded in the binary.
//!
//! Public and bare: the page itself asks for a bearer token and keeps it in the tab's
//! `sessionStorage`; everything it shows comes from the authenticated REST and WebSocket
//! endpoints. No build step, no CDN, no framework: three files under `assets/dashboard/`.

use std::sync::OnceLock;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::state::AppState;

const INDEX: &str = include_str!("../../assets/dashboard/index.html");
const CSS: &str = include_str!("../../assets/dashboard/dashboard.css");
const JS: &str = include_str!("../../assets/dashboard/dashboard.js");

/// Same origin only. `connect-src 'self'` also admits `ws://`/`wss://` to this host (CSP
/// level 3), which the live feeds need; no inline script or style, no framing, and
/// `form-action 'none'` so the sign-in form can never be submitted natively (which could
/// put the token in a URL).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/dashboard", get(page))
        .route("/dashboard/", get(page))
        .route("/dashboard/dashboard.css", get(stylesheet))
        .route("/dashboard/dashboard.js", get(script))
}

/// The page, with the few settings it needs written into `<body data-*>`: whether
/// `/token` is open (development), and the heartbeat interval and timeout (to colour a
/// droplet's silence). Only numbers and fixed words are substituted, so nothing needs
/// escaping.
#[utoipa::path(get, path = "/dashboard", tag = "dashboard",
    responses((status = 200, description = "The live dashboard (HTML)", content_type = "text/html")))]
pub async fn page(State(state): State<AppState>) -> Response {
    let config = state.config();
    let html = INDEX
        .replace(
            "{{TOKEN_MINT}}",
            if config.token_endpoint_open() {
                "open"
            } else {
                "closed"
            },
        )
        .replace("{{ENVIRONMENT}}", config.environment.as_str())
        .replace(
            "{{HEARTBEAT_INTERVAL}}",
            &config.heartbeat_interval.to_string(),
        )
        .replace(
            "{{HEARTBEAT_TIMEOUT}}",
            &config.heartbeat_timeout.to_string(),
        )
        .replace("{{VERSION}}", env!("CARGO_PKG_VERSION"));
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // The settings above can change on a configuration reload.
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
        ],
        html,
    )
        .into_response()
}

#[utoipa::path(get, path = "/dashboard/dashboard.css", tag = "dashboard",
    responses((status = 200, description = "The dashboard's stylesheet", content_type = "text/css"), (status = 304, description = "Unchanged")))]
pub async fn stylesheet(headers: HeaderMap) -> Response {
    asset(&headers, CSS, "text/css; charset=utf-8", &CSS_TAG)
}

#[utoipa::path(get, path = "/dashboard/dashboard.js", tag = "dashboard",
    responses((status = 200, description = "The dashboard's script", content_type = "text/javascript"), (status = 304, description = "Unchanged")))]
pub async fn script(headers: HeaderMap) -> Response {
    asset(&headers, JS, "text/javascript; charset=utf-8", &JS_TAG)
}

static CSS_TAG: OnceLock<String> = OnceLock::new();
static JS_TAG: OnceLock<String> = OnceLock::new();

/// An embedded asset with an ETag of its content: browsers revalidate (`no-cache`) and get a
/// 304 until the binary changes, so an upgrade is never hidden behind a stale cache.
fn asset(
    headers: &HeaderMap,
    body: &'static str,
    content_type: &'static str,
    tag: &OnceLock<String>,
) -> Response {
    let etag = tag.get_or_init(|| format!("\"{:016x}\"", fnv1a(body.as_bytes())));
    let etag_value = HeaderValue::from_str(etag).unwrap_or(HeaderValue::from_static("\"0\""));
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag.as_str()));
    let common = [
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (header::ETAG, etag_value),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ),
    ];
    if fresh {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (
        common,
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response()
}

/// FNV-1a, 64 bits: a stable content hash for the ETag (not for anything secret).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_links_only_its_own_assets() {
        assert!(INDEX.contains("/dashboard/dashboard.css"));
        assert!(INDEX.contains("/dashboard/dashboard.js"));
        // No CDN and nothing inline that the CSP would block.
        assert!(!INDEX.contains("http://") && !INDEX.contains("https://"));
        assert!(!INDEX.contains("<script>") && !INDEX.contains("style="));
        let js = JS.replace("http://www.w3.org/2000/svg", "");
        assert!(!js.contains("http://") && !js.contains("https://"));
    }

    #[test]
    fn the_etag_follows_the_content() {
        assert_ne!(fnv1a(b"a"), fnv1a(b"b"));
        assert_eq!(fnv1a(b"dashboard"), fnv1a(b"dashboard"));
    }
}
