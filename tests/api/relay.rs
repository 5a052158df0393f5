//! What `/send` and `/broadcast` relay: every name a droplet could read as a command or an
//! event passes the allow-list after normalising (finding 4 of issue 24); what passes is
//! relayed as written.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::fixture_droplet::{FixtureDroplet, Mode};
use crate::helpers::*;

/// Every spelling of finding 4 and a few more: case, whitespace, control and invisible
/// characters, separators, other fields (`action`, `type`, `event`), other keys' case, nested
/// objects, the message type; by `/send` and `/broadcast`, as a body or the `payload` query.
#[tokio::test]
async fn every_spelling_of_an_orchestrator_command_or_event_is_refused() {
    let app = TestApp::spawn_with(&[("BROADCAST_RATE_LIMIT_PER_MINUTE", "1000")]).await;
    let d = FixtureDroplet::start(Mode::Accept).await;
    app.register(16, &["x"], &d.endpoint).await;
    let writer = app.token(7, &["read", "write"]);
    let refused: Vec<Value> = vec![
        json!({"command": "EXECUTE_TASK", "task": {"id": 1}}),
        json!({"command": " execute_task"}),
        json!({"command": "execute_task\u{0000}"}),
        json!({"command": "execute_task\n"}),
        json!({"command": "exe\u{200b}cute_task"}),
        json!({"command": "Execute-Task"}),
        json!({"command": "execute task"}),
        json!({"command": "executeTask"}),
        json!({"action": "execute_task"}),
        json!({"type": "cancel_task", "task_id": 1}),
        json!({"event": "task_assigned", "task": {"id": 1}}),
        json!({"Command": "cancel_task"}),
        json!({" action ": "cancel_task"}),
        json!({"data": {"command": "cancel_task", "task_id": 1}}),
        json!({"messages": [{"event": "task_cancelled"}]}),
        json!({"command": "ping\u{0007}x y"}),
    ];
    for payload in &refused {
        for (path, token) in [
            ("/send?target_droplet_id=16", &writer),
            ("/broadcast", &app.admin()),
        ] {
            let (s, b) = app
                .request(Method::POST, path, Some(token), Some(payload.clone()))
                .await;
            assert_eq!(s, StatusCode::FORBIDDEN, "{path} {payload}: {b}");
            assert!(
                b["detail"].as_str().unwrap_or_default().contains("relayed"),
                "{b}"
            );
        }
        // As the payload query parameter and inside an envelope body.
        let query = format!(
            "/send?target_droplet_id=16&payload={}",
            urlencoding(&payload.to_string())
        );
        let (s, b) = app.request(Method::POST, &query, Some(&writer), None).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{payload}: {b}");
        let (s, b) = app
            .request(
                Method::POST,
                "/send?target_droplet_id=16",
                Some(&writer),
                Some(envelope(payload.clone())),
            )
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{payload}: {b}");
    }
    // The message type is one of the five UDC types (422 otherwise).
    for message_type in ["execute_task", "Cancel_Task%00"] {
        let path = format!("/send?target_droplet_id=16&message_type={message_type}");
        let (s, b) = app
            .request(Method::POST, &path, Some(&writer), Some(json!({"n": 1})))
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{message_type}: {b}");
    }
    assert!(d.received().is_empty(), "{:?}", d.received());

    // The mesh's own names pass, as written: droplet-12's `/getAll`, an event, a nested
    // `type` that is no command.
    for payload in [
        json!({"action": "/getAll"}),
        json!({"event": "Report_Ready", "report": {"type": "PDF summary"}}),
        json!({"command": "ping", "n": 1}),
    ] {
        let (s, b) = app
            .request(
                Method::POST,
                "/send?target_droplet_id=16",
                Some(&writer),
                Some(payload.clone()),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{payload}: {b}");
        let mut relayed = payload.clone();
        relayed["relayed_by"] = json!(10);
        let got = d.received().last().map(|r| r.body["payload"].clone());
        assert_eq!(got, Some(relayed));
    }
}

fn urlencoding(raw: &str) -> String {
    url::form_urlencoded::byte_serialize(raw.as_bytes()).collect()
}

/// With `RELAY_ALLOWED_NAMES`, only the listed names are relayed (compared after normalising);
/// the orchestrator's own names stay refused even when an operator lists them.
#[tokio::test]
async fn an_operators_allow_list_relays_only_the_names_it_lists() {
    let app =
        TestApp::spawn_with(&[("RELAY_ALLOWED_NAMES", " Report_Ready,/getall, execute_task")])
            .await;
    let d = FixtureDroplet::start(Mode::Accept).await;
    app.register(16, &["x"], &d.endpoint).await;
    let writer = app.token(7, &["read", "write"]);
    let send = |payload: Value| {
        app.request(
            Method::POST,
            "/send?target_droplet_id=16",
            Some(&writer),
            Some(payload),
        )
    };
    for listed in [
        json!({"event": "report_ready"}),
        json!({"query": "/getAll"}),
    ] {
        let (s, b) = send(listed.clone()).await;
        assert_eq!(s, StatusCode::OK, "{listed}: {b}");
    }
    let (s, b) = send(json!({"event": "report_done"})).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert!(
        b["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("RELAY_ALLOWED_NAMES"),
        "{b}"
    );
    let (s, b) = send(json!({"command": "execute_task"})).await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "listed or not, the orchestrator's own: {b}"
    );
    // A payload without any name field is data, not a command: it passes.
    let (s, b) = send(json!({"report_id": 7})).await;
    assert_eq!(s, StatusCode::OK, "{b}");
}
