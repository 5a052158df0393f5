//! A fixture droplet that behaves like the real mesh's droplets, one mode per test: droplet-12
//! (python-jose over HS256 with the shared secret; string ids), droplet-2 (RS256 bearer and
//! envelope signature by the Registry's key), and droplets that refuse, fail, redirect or never
//! answer. It records every request it gets. Also a fake Registry that issues the orchestrator
//! its token.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

use crate::helpers::SECRET;

/// The Registry's issuer and audience, as droplet-2 checks them.
pub const REGISTRY_ISS: &str = "registry.fullpotential.ai";
pub const REGISTRY_AUD: &str = "fullpotential.droplets";

/// How the fixture answers.
#[derive(Clone, Debug)]
pub enum Mode {
    /// 200 `{"received": true}` to anything.
    Accept,
    /// droplet-12: the bearer is HS256 with the shared secret, checked as python-jose does
    /// (no `aud` unless one is expected; the caller is read from `sub`); `source` and
    /// `target` of the body must be strings.
    Droplet12,
    /// droplet-2: an RS256 bearer and the envelope's `signature`, both by the Registry's key
    /// (PEM) with its issuer and audience.
    Droplet2 { registry_public_key: String },
    /// 422 to everything: the droplet will not take the task (as droplet-12 answers an
    /// envelope with integer ids).
    Refuse,
    /// 401 "Could not validate credentials" to everything: it refuses the orchestrator's
    /// credentials.
    Unauthorized,
    /// 401 to everything, echoing the bearer and the envelope it was sent (as a careless
    /// droplet's error page might).
    RefuseEchoing,
    /// 503 to everything.
    Fail,
    /// 307 to this URL.
    Redirect(String),
    /// Accepts the TCP connection and never answers (only at start: see [`FixtureDroplet::silent`]).
    Silent,
    /// The n-th `execute_task` since the mode was set gets the n-th of these statuses (the
    /// last one for every one after): `[408, 429, 200]`, `[422, 422, 200]`. Other requests
    /// (`cancel_task`) get 200.
    Statuses(Vec<u16>),
    /// As `Statuses`, each answer with its `Retry-After` header when it has one: `[(429,
    /// Some("2")), (200, None)]` pushes back once.
    Answers(Vec<(u16, Option<String>)>),
}

/// One request the fixture got, and what it answered.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
    /// The body as JSON (a string when it was not JSON).
    pub body: Value,
    pub answered: u16,
    /// When it arrived.
    pub at: std::time::Instant,
}

impl Received {
    pub fn bearer(&self) -> Option<String> {
        self.headers
            .get("authorization")
            .and_then(|v| v.strip_prefix("Bearer ").map(str::to_string))
    }

    pub fn command(&self) -> Option<&str> {
        self.body["payload"]["command"].as_str()
    }
}

#[derive(Clone)]
struct Shared {
    mode: Arc<Mutex<Mode>>,
    received: Arc<Mutex<Vec<Received>>>,
    /// How many requests had been received when the mode was set.
    since: Arc<AtomicUsize>,
}

/// A droplet server the test controls.
#[derive(Clone)]
pub struct FixtureDroplet {
    pub endpoint: String,
    pub port: u16,
    shared: Shared,
    /// Silent mode: connections accepted so far, open now, and the most open at once.
    pub accepted: Arc<AtomicUsize>,
    pub open: Arc<AtomicUsize>,
    pub most_open: Arc<AtomicUsize>,
}

impl FixtureDroplet {
    pub async fn start(mode: Mode) -> FixtureDroplet {
        FixtureDroplet::start_on(0, mode).await
    }

    /// A fixture on this port of 127.0.0.1 (0: any free one).
    pub async fn start_on(port: u16, mode: Mode) -> FixtureDroplet {
        if matches!(mode, Mode::Silent) {
            return FixtureDroplet::silent().await;
        }
        let shared = Shared {
            mode: Arc::new(Mutex::new(mode)),
            received: Arc::new(Mutex::new(Vec::new())),
            since: Arc::default(),
        };
        let app = Router::new().fallback(answer).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind fixture droplet");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FixtureDroplet {
            endpoint: format!("http://{addr}"),
            port: addr.port(),
            shared,
            accepted: Arc::default(),
            open: Arc::default(),
            most_open: Arc::default(),
        }
    }

    /// A droplet that accepts connections, reads what it is sent and never answers; it
    /// counts the connections open at once.
    pub async fn silent() -> FixtureDroplet {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind silent droplet");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let most_open = Arc::new(AtomicUsize::new(0));
        let (a, o, m) = (accepted.clone(), open.clone(), most_open.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let now = o.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                let o = o.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    // Until the client gives up and closes (EOF or error).
                    while let Ok(n) = socket.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        FixtureDroplet {
            endpoint: format!("http://{addr}"),
            port: addr.port(),
            shared: Shared {
                mode: Arc::new(Mutex::new(Mode::Silent)),
                received: Arc::new(Mutex::new(Vec::new())),
                since: Arc::default(),
            },
            accepted,
            open,
            most_open,
        }
    }

    pub fn set(&self, mode: Mode) {
        let received = self.shared.received.lock().unwrap();
        self.shared.since.store(received.len(), Ordering::SeqCst);
        *self.shared.mode.lock().unwrap() = mode;
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    /// The requests that carried this command (`execute_task`, `cancel_task`).
    pub fn commands(&self, command: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.command() == Some(command))
            .collect()
    }

    /// The ids of the tasks sent with `execute_task`.
    pub fn executed(&self) -> Vec<i64> {
        self.commands("execute_task")
            .iter()
            .filter_map(|r| r.body["payload"]["task"]["id"].as_i64())
            .collect()
    }
}

fn detail(status: StatusCode, detail: Value) -> (StatusCode, Value) {
    (status, json!({ "detail": detail }))
}

async fn answer(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let text = String::from_utf8_lossy(&body).to_string();
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    let mode = shared.mode.lock().unwrap().clone();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let mut location = None;
    let mut retry_after: Option<String> = None;
    let mut received = shared.received.lock().unwrap();
    let (status, reply) = match &mode {
        Mode::Accept | Mode::Silent => (StatusCode::OK, json!({"received": true})),
        Mode::Droplet12 => droplet_12(bearer.as_deref(), &body),
        Mode::Droplet2 {
            registry_public_key,
        } => droplet_2(bearer.as_deref(), &body, registry_public_key),
        Mode::Refuse => detail(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!([{"loc": ["body", "source"], "msg": "str type expected"}]),
        ),
        Mode::Unauthorized => detail(
            StatusCode::UNAUTHORIZED,
            json!("Could not validate credentials"),
        ),
        Mode::RefuseEchoing => detail(
            StatusCode::UNAUTHORIZED,
            json!({"bad_token": bearer, "signature": body["signature"], "body": body}),
        ),
        Mode::Fail => detail(StatusCode::SERVICE_UNAVAILABLE, json!("overloaded")),
        Mode::Redirect(to) => {
            location = Some(to.clone());
            (StatusCode::TEMPORARY_REDIRECT, json!({}))
        }
        Mode::Statuses(_) | Mode::Answers(_) => {
            let answers: Vec<(u16, Option<String>)> = match &mode {
                Mode::Statuses(codes) => codes.iter().map(|c| (*c, None)).collect(),
                Mode::Answers(answers) => answers.clone(),
                _ => Vec::new(),
            };
            let executes = |b: &Value| b["payload"]["command"] == "execute_task";
            let n = received[shared.since.load(Ordering::SeqCst)..]
                .iter()
                .filter(|r| executes(&r.body))
                .count();
            let (code, after) = if executes(&body) {
                answers
                    .get(n)
                    .or(answers.last())
                    .cloned()
                    .unwrap_or((200, None))
            } else {
                (200, None)
            };
            retry_after = after;
            let status = StatusCode::from_u16(code).expect("an HTTP status");
            if status.is_success() {
                (status, json!({"received": true}))
            } else {
                detail(status, json!(format!("scripted answer {code}")))
            }
        }
    };
    received.push(Received {
        method: method.to_string(),
        path: uri.path().to_string(),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    v.to_str().unwrap_or_default().to_string(),
                )
            })
            .collect(),
        body,
        answered: status.as_u16(),
        at: std::time::Instant::now(),
    });
    drop(received);
    let mut response = (status, Json(reply)).into_response();
    if let Some(after) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, after.parse().expect("a header value"));
    }
    if let Some(to) = location {
        response
            .headers_mut()
            .insert(header::LOCATION, to.parse().expect("a header value"));
    }
    response
}

/// The claims of an HS256 token as python-jose's `jwt.decode(token, SECRET,
/// algorithms=["HS256"])` reads them: exp checked, an `aud` refused (none was expected).
pub fn jose_hs256_claims(token: &str) -> Result<Value, String> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.validate_aud = false;
    validation.leeway = 0;
    let data = jsonwebtoken::decode::<Value>(
        token,
        &DecodingKey::from_secret(SECRET.as_bytes()),
        &validation,
    )
    .map_err(|e| e.to_string())?;
    if data.claims.get("aud").is_some() {
        return Err("Invalid audience".into());
    }
    Ok(data.claims)
}

fn droplet_12(bearer: Option<&str>, body: &Value) -> (StatusCode, Value) {
    let Some(token) = bearer else {
        return detail(StatusCode::UNAUTHORIZED, json!("Not authenticated"));
    };
    let claims = match jose_hs256_claims(token) {
        Ok(c) => c,
        Err(e) => {
            return detail(
                StatusCode::UNAUTHORIZED,
                json!(format!("Could not validate credentials: {e}")),
            )
        }
    };
    if !claims["sub"].is_string() {
        return detail(
            StatusCode::UNAUTHORIZED,
            json!("Could not validate credentials: no sub"),
        );
    }
    let mut errors = Vec::new();
    for field in ["source", "target"] {
        if !body[field].is_string() {
            errors.push(json!({
                "loc": ["body", field],
                "msg": "Input should be a valid string",
                "type": "string_type",
            }));
        }
    }
    if !errors.is_empty() {
        return detail(StatusCode::UNPROCESSABLE_ENTITY, Value::Array(errors));
    }
    (StatusCode::OK, json!({"received": true}))
}

/// Verifies an RS256 token of the Registry: its key, issuer and audience.
pub fn registry_claims(token: &str, public_pem: &str) -> Result<Value, String> {
    let key = DecodingKey::from_rsa_pem(public_pem.as_bytes()).map_err(|e| e.to_string())?;
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_issuer(&[REGISTRY_ISS]);
    validation.set_audience(&[REGISTRY_AUD]);
    jsonwebtoken::decode::<Value>(token, &key, &validation)
        .map(|d| d.claims)
        .map_err(|e| e.to_string())
}

fn droplet_2(bearer: Option<&str>, body: &Value, public_pem: &str) -> (StatusCode, Value) {
    let Some(token) = bearer else {
        return detail(StatusCode::UNAUTHORIZED, json!("Not authenticated"));
    };
    if let Err(e) = registry_claims(token, public_pem) {
        return detail(
            StatusCode::UNAUTHORIZED,
            json!(format!("Could not validate credentials: {e}")),
        );
    }
    let Some(signature) = body.get("signature").and_then(Value::as_str) else {
        return detail(StatusCode::BAD_REQUEST, json!("Message signature required"));
    };
    if let Err(e) = registry_claims(signature, public_pem) {
        return detail(
            StatusCode::UNAUTHORIZED,
            json!(format!("Invalid message signature: {e}")),
        );
    }
    (StatusCode::OK, json!({"received": true}))
}

/// An RS256 token signed with `private_pem` (the Registry's key).
pub fn rs256(private_pem: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(private_pem.as_bytes()).expect("RSA private key"),
    )
    .expect("sign RS256")
}

/// A token the Registry issues to droplet `droplet_id`, valid for an hour.
pub fn registry_token(private_pem: &str, droplet_id: i32) -> String {
    let now = chrono::Utc::now().timestamp();
    rs256(
        private_pem,
        json!({
            "droplet_id": droplet_id,
            "sub": format!("droplet-{droplet_id}"),
            "iss": REGISTRY_ISS,
            "aud": REGISTRY_AUD,
            "iat": now,
            "exp": now + 3600,
        }),
    )
}

/// The claims of a token, without checking its signature.
pub fn claims_of(token: &str) -> Value {
    use base64::Engine;
    let segment = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(segment.trim_end_matches('='))
        .expect("base64url claims");
    serde_json::from_slice(&bytes).expect("JSON claims")
}

/// A fake Registry: `POST /auth/token?droplet_id=N` with `X-Registry-Key: <key>` answers
/// `{"token": ..., "expires_in": 3600}`; `GET /droplets` an empty directory.
pub struct FakeRegistry {
    pub url: String,
    /// (query string, X-Registry-Key) of each token request.
    pub token_requests: Arc<Mutex<Vec<(String, String)>>>,
}

impl FakeRegistry {
    pub async fn start(key: &str, token: &str) -> FakeRegistry {
        let token_requests: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let (requests, key, token) = (token_requests.clone(), key.to_string(), token.to_string());
        let app = Router::new()
            .route(
                "/auth/token",
                post(move |RawQuery(query): RawQuery, headers: HeaderMap| {
                    let (requests, key, token) = (requests.clone(), key.clone(), token.clone());
                    async move {
                        let given = headers
                            .get("x-registry-key")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string();
                        let query = query.unwrap_or_default();
                        requests
                            .lock()
                            .unwrap()
                            .push((query.clone(), given.clone()));
                        if given != key || query != "droplet_id=10" {
                            return (
                                StatusCode::UNAUTHORIZED,
                                Json(json!({"detail": "Invalid registry key"})),
                            );
                        }
                        (
                            StatusCode::OK,
                            Json(json!({"token": token, "expires_in": 3600})),
                        )
                    }
                }),
            )
            .route("/droplets", get(|| async { Json(json!([])) }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake registry");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeRegistry {
            url,
            token_requests,
        }
    }
}
