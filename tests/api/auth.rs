//! Bearer tokens: what is refused (401) and why, RS256 tokens from the Registry, permissions
//! (403), and `POST /token` in development and production.

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::*;

fn claims(droplet_id: i32, permissions: &[&str]) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({"droplet_id": droplet_id, "steward": "tests", "permissions": permissions, "iat": now, "exp": now + 3600})
}

fn rs256(private_pem: &str, claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::RS256),
        claims,
        &EncodingKey::from_rsa_pem(private_pem.as_bytes()).expect("RSA key"),
    )
    .expect("signed")
}

fn hs256(secret: &[u8], claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("signed")
}

/// base64url without padding, for hand-made tokens.
fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

async fn get_tasks(app: &TestApp, token: Option<&str>) -> (StatusCode, Value) {
    app.request(Method::GET, "/tasks", token, None).await
}

async fn assert_rejected(app: &TestApp, token: &str, what: &str) {
    let resp = app
        .client
        .get(app.url("/tasks"))
        .bearer_auth(token)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 401, "{what}");
    assert_eq!(
        resp.headers()
            .get("www-authenticate")
            .and_then(|h| h.to_str().ok()),
        Some("Bearer"),
        "{what}"
    );
    let body: Value = resp.json().await.expect("json");
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(
        detail.starts_with("Could not validate credentials: "),
        "{what}: {detail}"
    );
}

#[tokio::test]
async fn no_token_is_401_with_www_authenticate() {
    let app = TestApp::spawn().await;
    for (method, path) in [
        (Method::GET, "/tasks"),
        (Method::GET, "/tasks/1"),
        (Method::POST, "/tasks"),
        (Method::GET, "/droplets"),
        (Method::POST, "/droplets/register"),
        (Method::POST, "/droplets/1/heartbeat"),
    ] {
        let resp = app
            .client
            .request(method.clone(), app.url(path))
            .json(&envelope(json!({})))
            .send()
            .await
            .expect("sent");
        assert_eq!(resp.status().as_u16(), 401, "{method} {path}");
        assert_eq!(
            resp.headers()["www-authenticate"],
            "Bearer",
            "{method} {path}"
        );
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["detail"], "Not authenticated", "{method} {path}");
    }
    // A scheme other than Bearer is no token either.
    let resp = app
        .client
        .get(app.url("/tasks"))
        .header("authorization", format!("Basic {}", app.admin()))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 401);
}

#[tokio::test]
async fn garbage_tokens_are_401() {
    let app = TestApp::spawn().await;
    for garbage in [
        "garbage",
        "a.b.c",
        "eyJhbGciOiJIUzI1NiJ9.e30.",
        "....",
        "Bearer",
    ] {
        assert_rejected(&app, garbage, garbage).await;
    }
    // A token signed with another secret.
    assert_rejected(
        &app,
        &hs256(
            b"another-secret-0123456789abcdef0123",
            &claims(5, &["read"]),
        ),
        "wrong secret",
    )
    .await;
    // A valid token with its signature changed.
    let mut token = app.token(5, &["read"]);
    let last = token.pop().unwrap();
    token.push(if last == 'A' { 'B' } else { 'A' });
    assert_rejected(&app, &token, "tampered signature").await;
}

#[tokio::test]
async fn an_expired_token_is_401() {
    let app = TestApp::spawn().await;
    let now = chrono::Utc::now().timestamp();
    let token = sign(
        json!({"droplet_id": 5, "permissions": ["read"], "iat": now - 7200, "exp": now - 3600}),
    );
    assert_rejected(&app, &token, "expired").await;
}

#[tokio::test]
async fn a_string_exp_is_401() {
    let app = TestApp::spawn().await;
    let later = (chrono::Utc::now().timestamp() + 3600).to_string();
    let token = sign(json!({"droplet_id": 5, "permissions": ["read"], "exp": later}));
    assert_rejected(&app, &token, "string exp").await;
}

#[tokio::test]
async fn a_token_without_exp_is_401() {
    let app = TestApp::spawn().await;
    let token = sign(json!({"droplet_id": 5, "permissions": ["read"]}));
    assert_rejected(&app, &token, "no exp").await;
}

#[tokio::test]
async fn alg_none_is_401() {
    let app = TestApp::spawn().await;
    let body = b64url(
        claims(5, &["read", "write", "admin"])
            .to_string()
            .as_bytes(),
    );
    for header in [
        r#"{"alg":"none","typ":"JWT"}"#,
        r#"{"alg":"None","typ":"JWT"}"#,
        r#"{"alg":"NONE"}"#,
    ] {
        let head = b64url(header.as_bytes());
        assert_rejected(&app, &format!("{head}.{body}."), header).await;
        assert_rejected(&app, &format!("{head}.{body}"), header).await;
    }
}

#[tokio::test]
async fn rs256_tokens_from_the_registry_are_accepted_and_hs256_with_the_public_key_is_not() {
    let (private, public) = rsa_pair();
    let app = TestApp::spawn_with(&[("REGISTRY_PUBLIC_KEY", &public)]).await;

    // A valid RS256 token acts as its droplet.
    let token = rs256(&private, &claims(8, &["read", "write"]));
    let (status, body) = get_tasks(&app, Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["target"], 8);
    let (status, body) = app
        .post("/tasks", &token, task_payload("by the registry's token"))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let created_by: Option<String> = sqlx::query_scalar("SELECT created_by FROM tasks")
        .fetch_one(&app.db)
        .await
        .expect("row");
    assert_eq!(created_by.as_deref(), Some("8"));

    // The algorithm-confusion attack: HS256 keyed with the public key's PEM text.
    let evil = claims(1, &["read", "write", "admin"]);
    assert_rejected(
        &app,
        &hs256(public.as_bytes(), &evil),
        "HS256 with the public PEM",
    )
    .await;
    assert_rejected(
        &app,
        &hs256(public.trim().as_bytes(), &evil),
        "HS256 with the trimmed PEM",
    )
    .await;

    // RS256 signed by another key, and an expired RS256 token.
    let (other_private, _) = rsa_pair();
    assert_rejected(
        &app,
        &rs256(&other_private, &claims(8, &["read"])),
        "another RSA key",
    )
    .await;
    let now = chrono::Utc::now().timestamp();
    let expired = json!({"droplet_id": 8, "permissions": ["read"], "exp": now - 3600});
    assert_rejected(&app, &rs256(&private, &expired), "expired RS256").await;
}

#[tokio::test]
async fn rs256_is_refused_when_no_registry_key_is_configured() {
    let (private, _) = rsa_pair();
    let app = TestApp::spawn().await;
    assert_rejected(
        &app,
        &rs256(&private, &claims(8, &["read"])),
        "no registry key",
    )
    .await;
}

#[tokio::test]
async fn a_read_only_token_on_a_write_route_is_403() {
    let app = TestApp::spawn().await;
    let read = app.token(5, &["read"]);
    let (status, body) = app.post("/tasks", &read, task_payload("nope")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["detail"].as_str().is_some_and(|d| d.contains("write")),
        "{body}"
    );
    let (status, _) = app
        .post(
            "/droplets/register",
            &read,
            json!({"droplet_id": 5, "name": "x", "endpoint": "http://localhost:1"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let count: i64 =
        sqlx::query_scalar("SELECT (SELECT COUNT(*) FROM tasks) + (SELECT COUNT(*) FROM droplets)")
            .fetch_one(&app.db)
            .await
            .expect("count");
    assert_eq!(count, 0);
    // Read is enough to read; a token without permissions cannot even read.
    assert_eq!(get_tasks(&app, Some(&read)).await.0, StatusCode::OK);
    let (status, body) = get_tasks(&app, Some(&app.token(5, &[]))).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["detail"].as_str().is_some_and(|d| d.contains("read")),
        "{body}"
    );
}

#[tokio::test]
async fn admin_routes_need_admin() {
    let app = TestApp::spawn().await;
    app.register(8, &[], &dead_endpoint()).await;
    let (status, body) = app
        .request(
            Method::POST,
            "/droplets/8/deactivate",
            Some(&app.token(8, &["read", "write"])),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["detail"].as_str().is_some_and(|d| d.contains("admin")),
        "{body}"
    );
}

#[tokio::test]
async fn permission_is_checked_before_existence() {
    let app = TestApp::spawn().await;
    let (status, _) = app
        .patch(
            "/tasks/424242",
            &app.token(5, &["read"]),
            json!({"status": "in_progress"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = app.request(Method::GET, "/tasks/424242", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

// ---------------------------------------------------------------------------
// POST /token

async fn mint(app: &TestApp, bearer: Option<&str>, body: Value) -> (StatusCode, Value) {
    app.request(Method::POST, "/token", bearer, Some(body))
        .await
}

#[tokio::test]
async fn token_is_open_in_development_and_its_tokens_work() {
    let app = TestApp::spawn().await;
    let (status, body) = mint(
        &app,
        None,
        json!({"droplet_id": 5, "steward": "YourName", "permissions": ["read", "write"]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["token_type"], "bearer");
    assert_eq!(body["expires_in"], 86400);
    let token = body["access_token"].as_str().expect("token").to_string();
    let (status, body) = app.post("/tasks", &token, task_payload("minted")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["target"], 5);
    // It grants only what was asked: no admin.
    let (status, _) = app
        .request(Method::POST, "/droplets/5/activate", Some(&token), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn token_validates_its_body() {
    let app = TestApp::spawn().await;
    let (status, body) = mint(
        &app,
        None,
        json!({"droplet_id": 5, "permissions": ["root"]}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["detail"][0]["loc"], json!(["body", "permissions", 0]));
    let (status, body) = mint(&app, None, json!({"droplet_id": "five"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["detail"][0]["loc"], json!(["body", "droplet_id"]));
    let (status, body) = mint(&app, None, json!({"steward": "x"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["detail"][0]["loc"], json!(["body", "droplet_id"]));
}

#[tokio::test]
async fn token_needs_an_admin_token_in_production() {
    let app = TestApp::spawn_with(&[("ENVIRONMENT", "production")]).await;
    let wanted = json!({"droplet_id": 5, "steward": "x", "permissions": ["read"]});
    let resp = app
        .client
        .post(app.url("/token"))
        .json(&wanted)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 401);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let (status, _) = mint(&app, Some("garbage"), wanted.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = mint(
        &app,
        Some(&app.token(5, &["read", "write"])),
        wanted.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = mint(&app, Some(&app.admin()), wanted).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let token = body["access_token"].as_str().expect("token");
    assert_eq!(get_tasks(&app, Some(token)).await.0, StatusCode::OK);
}

#[tokio::test]
async fn token_never_grants_more_than_the_caller_has() {
    // Development: an anonymous caller may mint anything, but a caller who shows a token is
    // held to what that token has.
    let app = TestApp::spawn().await;
    let reader = app.token(5, &["read"]);
    for wanted in [json!(["write"]), json!(["read", "admin"])] {
        let (status, body) = mint(
            &app,
            Some(&reader),
            json!({"droplet_id": 5, "permissions": wanted}),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{wanted}: {body}");
    }
    let (status, _) = mint(
        &app,
        Some(&reader),
        json!({"droplet_id": 5, "permissions": ["read"]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let writer = app.token(5, &["read", "write"]);
    let (status, _) = mint(
        &app,
        Some(&writer),
        json!({"droplet_id": 5, "permissions": ["admin"]}),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Production: only admins mint, and an admin's token may carry at most admin.
    let prod = TestApp::spawn_with(&[("ENVIRONMENT", "production")]).await;
    let (status, body) = mint(
        &prod,
        Some(&prod.admin()),
        json!({"droplet_id": 9, "permissions": ["read", "write", "admin"]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = mint(
        &prod,
        Some(&prod.token(5, &["read", "write"])),
        json!({"droplet_id": 5, "permissions": ["read"]}),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_token_accepted_before_the_registry_key_changed_is_refused_after() {
    let (private, public) = rsa_pair();
    let app = TestApp::spawn_with(&[("REGISTRY_PUBLIC_KEY", &public)]).await;
    let token = rs256(&private, &claims(8, &["read"]));
    // Accepted, twice (the second time from the tokens verified lately).
    for _ in 0..2 {
        let (status, body) = get_tasks(&app, Some(&token)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (_, other_public) = rsa_pair();
    app.state
        .keys
        .set_registry_key(other_public.as_bytes())
        .expect("key installed");
    assert_rejected(&app, &token, "signed with the Registry's old key").await;
}
