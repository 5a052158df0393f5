//! Refusals that say why (findings 9 and 10 of issue 24): `/message` addressed to another
//! droplet, a 401 naming the check that failed, a Registry-form token; and the heartbeat
//! answer giving `next_heartbeat_deadline` as registration does.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::fixture_droplet::*;
use crate::helpers::*;
use crate::real_mesh::{post_bare, Droplet2};

fn message_to(target: Value, message_type: &str, payload: Value) -> Value {
    let mut e = envelope(payload);
    e["target"] = target;
    e["message_type"] = json!(message_type);
    e
}

/// droplet-12 sends `{"target":"droplet-2","payload":{"action":"/getAll"}}`, or a
/// `cancel_task` meant for droplet-2: refused (422 on `target`, the original's words), and
/// nothing is done; addressed to 10 in any form, the same messages are handled.
#[tokio::test]
async fn a_message_for_another_droplet_is_refused_and_nothing_is_done() {
    let app = TestApp::spawn().await;
    let task = app
        .create_task(
            5,
            json!({"task_type": "t", "title": "t", "required_capability": "none"}),
        )
        .await;
    let token = app.token(12, &["read", "write"]);
    let attempts = [
        (json!("droplet-2"), "query", json!({"action": "/getAll"})),
        (
            json!("droplet-2"),
            "command",
            json!({"command": "cancel_task", "task_id": task}),
        ),
        (
            json!(2),
            "command",
            json!({"command": "cancel_task", "task_id": task}),
        ),
        (json!("2"), "heartbeat", json!({"status": "active"})),
    ];
    for (target, kind, payload) in attempts {
        let (s, b) = app
            .request(
                Method::POST,
                "/message",
                Some(&token),
                Some(message_to(target.clone(), kind, payload)),
            )
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{target}: {b}");
        assert_eq!(b["detail"][0]["loc"], json!(["body", "target"]), "{b}");
        assert!(
            b["detail"][0]["msg"]
                .as_str()
                .unwrap_or_default()
                .starts_with("Message target droplet-2 does not match this droplet"),
            "{b}"
        );
    }
    assert_eq!(app.task_status(task).await, "pending");
    for target in [json!(10), json!("droplet-10"), json!("10"), Value::Null] {
        let (s, b) = app
            .request(
                Method::POST,
                "/message",
                Some(&token),
                Some(message_to(
                    target.clone(),
                    "query",
                    json!({"query": "task_status", "task_id": task}),
                )),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{target}: {b}");
    }
}

/// Each 401 names the check that failed, and carries nothing of the token or the secret.
#[tokio::test]
async fn a_401_says_which_check_failed_without_the_token() {
    let Droplet2 { app, private, .. } = Droplet2::start().await;
    let now = chrono::Utc::now().timestamp();
    let good = app.token(5, &["read"]);
    let (other_private, _) = rsa_pair();
    let tampered = {
        let mut parts: Vec<&str> = good.split('.').collect();
        // Another first character: still base64url, another signature.
        let first = if parts[2].starts_with('A') { "B" } else { "A" };
        let signature = format!("{first}{}", &parts[2][1..]);
        parts[2] = &signature;
        parts.join(".")
    };
    let cases = [
        (
            "garbage",
            "not-a-token".to_string(),
            "malformed token (three base64url parts of JSON expected)",
        ),
        ("tampered", tampered, "signature does not verify"),
        (
            "another Registry key",
            rs256(
                &other_private,
                json!({"sub": "drop5.fullpotential.ai", "aud": "udc", "scope": ["tasks:read"], "iat": now, "exp": now + 600}),
            ),
            "signature does not verify",
        ),
        (
            "expired",
            sign(
                json!({"droplet_id": 5, "permissions": ["read"], "iat": now - 7200, "exp": now - 3600}),
            ),
            "the token has expired",
        ),
        (
            "no droplet",
            sign(json!({"permissions": ["read"], "iat": now, "exp": now + 600})),
            "the token names no droplet (droplet_id or sub)",
        ),
        (
            "a sub that is no droplet",
            sign(json!({"sub": "someone@example.com", "iat": now, "exp": now + 600})),
            "sub is not a droplet id",
        ),
        (
            "the orchestrator's id",
            sign(json!({"droplet_id": 10, "permissions": ["read"], "iat": now, "exp": now + 600})),
            "the token is the orchestrator's own; it is never accepted back",
        ),
    ];
    for (what, token, why) in cases {
        let (s, b) = app.get("/tasks?assigned_droplet_id=5", &token).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{what}: {b}");
        assert_eq!(
            b["detail"],
            format!("Could not validate credentials: {why}"),
            "{what}"
        );
        let text = b.to_string();
        assert!(
            !text.contains(&token) && !text.contains(SECRET),
            "{what}: {text}"
        );
    }

    // The Registry's documented form, signed by its key: droplet 5, no permissions claim.
    let registry_form = rs256(
        &private,
        json!({"sub": "drop5.fullpotential.ai", "aud": "udc", "scope": ["tasks:read"], "iat": now, "exp": now + 600}),
    );
    let (s, b) = app
        .get("/tasks?assigned_droplet_id=5", &registry_form)
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["target"], 5, "{b}");
}

/// The heartbeat answer gives `next_heartbeat_deadline` (its time plus the interval), by the
/// heartbeat endpoint and by a `/message` heartbeat, as registration does.
#[tokio::test]
async fn the_heartbeat_answer_gives_the_next_deadline() {
    let app = TestApp::spawn().await;
    let d = FixtureDroplet::start(Mode::Accept).await;
    let registered = app.register(7, &["x"], &d.endpoint).await;
    let interval = registered["payload"]["heartbeat_interval_seconds"]
        .as_f64()
        .expect("interval");
    let token = app.token(7, &["read", "write"]);
    let (s, by_endpoint) = post_bare(
        &app,
        "/droplets/7/heartbeat",
        &token,
        json!({"status": "active"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{by_endpoint}");
    let (s, by_message) = app
        .request(
            Method::POST,
            "/message",
            Some(&token),
            Some(message_to(
                json!(10),
                "heartbeat",
                json!({"status": "active"}),
            )),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{by_message}");
    for answer in [&registered, &by_endpoint, &by_message] {
        let now = chrono::Utc::now().timestamp() as f64;
        let deadline = answer["payload"]["next_heartbeat_deadline"]
            .as_f64()
            .unwrap_or_else(|| panic!("no deadline: {answer}"));
        assert!(
            (deadline - (now + interval)).abs() <= 5.0,
            "{deadline} vs {now} + {interval}: {answer}"
        );
    }
}
