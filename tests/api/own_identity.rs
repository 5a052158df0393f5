//! The orchestrator's own identity: no one registers it or gets a
//! token for it, `check-config` names settings that do nothing or let one droplet take all
//! of dispatch, and the RS256 token it sends carries the Registry's issuer and audience and
//! is refused when sent back.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::cli::{orchestrator, text};
use crate::fixture_droplet::*;
use crate::helpers::*;

async fn droplet_rows(app: &TestApp, id: i32) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM droplets WHERE droplet_id = $1")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .expect("count droplets")
}

#[tokio::test]
async fn an_admin_cannot_register_the_orchestrators_own_id() {
    let app = TestApp::spawn().await;
    let d = FixtureDroplet::start(Mode::Accept).await;
    let registration = |id: Value| json!({"droplet_id": id, "name": "impostor", "endpoint": d.endpoint, "capabilities": ["x"]});
    let bodies = [
        ("an envelope", envelope(registration(json!(10)))),
        (
            "an envelope, id as text",
            envelope(registration(json!("droplet-10"))),
        ),
        ("a bare body", registration(json!(10))),
    ];
    for (what, body) in bodies {
        let (s, b) = app
            .request(
                Method::POST,
                "/droplets/register",
                Some(&app.admin()),
                Some(body),
            )
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{what}: {b}");
        assert_eq!(
            b["detail"][0]["loc"],
            json!(["body", "payload", "droplet_id"]),
            "{what}: {b}"
        );
        assert!(
            b["detail"][0]["msg"]
                .as_str()
                .is_some_and(|m| m.contains("orchestrator's own id")),
            "{what}: {b}"
        );
    }
    assert_eq!(droplet_rows(&app, 10).await, 0);
    // Any other id registers as before.
    let (s, b) = app
        .post("/droplets/register", &app.admin(), registration(json!(11)))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(droplet_rows(&app, 11).await, 1);
}

#[test]
fn the_cli_refuses_a_token_for_the_orchestrators_own_id() {
    for (own, env) in [
        ("10", vec![("JWT_SECRET_KEY", SECRET)]),
        ("12", vec![("JWT_SECRET_KEY", SECRET), ("DROPLET_ID", "12")]),
    ] {
        let out = orchestrator(
            &["token", "--droplet-id", own, "--permissions", "read,admin"],
            &env,
        );
        assert!(!out.status.success(), "minted {}", text(&out.stdout));
        assert!(text(&out.stdout).is_empty(), "{}", text(&out.stdout));
        let stderr = text(&out.stderr);
        assert!(stderr.contains("orchestrator's own"), "{stderr}");
    }
    let out = orchestrator(
        &["token", "--droplet-id", "10"],
        &[("JWT_SECRET_KEY", SECRET), ("DROPLET_ID", "12")],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn check_config_warns_of_rs256_and_of_a_dispatch_pool_one_droplet_can_fill() {
    let out = orchestrator(
        &["check-config"],
        &[("JWT_SECRET_KEY", SECRET), ("JWT_ALGORITHM", "RS256")],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("JWT_ALGORITHM"), "{stderr}");
    assert!(
        text(&out.stdout)
            .lines()
            .any(|l| l == "JWT_ALGORITHM=RS256"),
        "{}",
        text(&out.stdout)
    );

    let out = orchestrator(
        &["check-config"],
        &[
            ("JWT_SECRET_KEY", SECRET),
            ("DISPATCH_CONCURRENCY", "4"),
            ("DISPATCH_PER_DROPLET_CONCURRENCY", "4"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("DISPATCH_PER_DROPLET_CONCURRENCY"),
        "{stderr}"
    );
    assert!(!stderr.contains("JWT_ALGORITHM"), "{stderr}");

    let out = orchestrator(&["check-config"], &[("JWT_SECRET_KEY", SECRET)]);
    assert!(out.status.success());
    assert!(
        !text(&out.stderr).contains("warning"),
        "{}",
        text(&out.stderr)
    );
}

/// With `ORCHESTRATOR_PRIVATE_KEY` the delivery's bearer is RS256 with the Registry's `iss`
/// and `aud`, names the orchestrator in `sub`, is marked outbound and lives
/// `OUTBOUND_TOKEN_SECONDS`; sent back to the orchestrator, which could verify its signature
/// (the same key as the Registry's here), it is refused.
#[tokio::test]
async fn rs256_outbound_tokens_carry_the_registrys_claims_and_are_refused_back() {
    let (private, public) = rsa_pair();
    let app = TestApp::spawn_with(&[
        ("ORCHESTRATOR_PRIVATE_KEY", &private),
        ("REGISTRY_PUBLIC_KEY", &public),
        ("REGISTRY_ISSUER", REGISTRY_ISS),
        ("REGISTRY_AUDIENCE", REGISTRY_AUD),
        ("OUTBOUND_TOKEN_SECONDS", "120"),
        ("TASK_ROUTER_INTERVAL", "1"),
    ])
    .await;
    let d = FixtureDroplet::start(Mode::Accept).await;
    app.register(21, &["sign"], &d.endpoint).await;
    let id = app
        .create_task(
            5,
            json!({"task_type": "work", "title": "signed", "required_capability": "sign", "payload": {}}),
        )
        .await;
    let delivery = eventually(
        Duration::from_secs(10),
        "the execute_task delivery",
        || async {
            d.commands("execute_task")
                .into_iter()
                .find(|r| r.body["payload"]["task"]["id"] == id)
        },
    )
    .await;
    let bearer = delivery.bearer().expect("a bearer token");

    let header = jsonwebtoken::decode_header(&bearer).expect("a JWT header");
    assert_eq!(header.alg, Algorithm::RS256);
    // Signed with the orchestrator's key, for the Registry's issuer and audience.
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_issuer(&[REGISTRY_ISS]);
    validation.set_audience(&[REGISTRY_AUD]);
    let claims = jsonwebtoken::decode::<Value>(
        &bearer,
        &DecodingKey::from_rsa_pem(public.as_bytes()).expect("public key"),
        &validation,
    )
    .expect("an RS256 token of the orchestrator's key")
    .claims;
    assert_eq!(claims["iss"], REGISTRY_ISS, "{claims}");
    assert_eq!(claims["aud"], REGISTRY_AUD, "{claims}");
    assert_eq!(claims["sub"], "droplet-10", "{claims}");
    assert_eq!(claims["token_use"], "outbound", "{claims}");
    assert_eq!(
        claims["exp"].as_i64().expect("exp") - claims["iat"].as_i64().expect("iat"),
        120,
        "{claims}"
    );

    let (s, b) = app.get("/tasks", &bearer).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
    assert_eq!(
        b["detail"],
        "Could not validate credentials: the token is the orchestrator's own; it is never accepted back"
    );
    // A token of the same key for another droplet is accepted: the refusal is the token's.
    let now = chrono::Utc::now().timestamp();
    let other = rs256(
        &private,
        json!({"droplet_id": 11, "permissions": ["read"], "iss": REGISTRY_ISS, "aud": REGISTRY_AUD, "iat": now, "exp": now + 600}),
    );
    let (s, b) = app.get("/tasks", &other).await;
    assert_eq!(s, StatusCode::OK, "{b}");
}
