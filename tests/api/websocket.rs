//! The real-time feeds: what reaches `/ws/tasks` and `/ws/droplets`, in which order, to whom,
//! and who is refused or dropped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use orchestrator::services::events::{Event, Feed, TaskEventKind};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

use crate::helpers::*;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const WAIT: Duration = Duration::from_secs(10);

fn feed_url(app: &TestApp, feed: &str, token: &str, filters: &str) -> String {
    format!("ws://{}/ws/{feed}?token={token}{filters}", app.addr)
}

async fn connect(app: &TestApp, feed: &str, token: &str, filters: &str) -> Ws {
    let (ws, response) = connect_async(feed_url(app, feed, token, filters))
        .await
        .unwrap_or_else(|e| panic!("connect to /ws/{feed}{filters}: {e}"));
    assert_eq!(response.status().as_u16(), 101);
    ws
}

async fn ws_status(app: &TestApp) -> Value {
    let (status, body) = app.get("/ws/status", &app.token(1, &["read"])).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["payload"].clone()
}

/// Events committed before the replica LISTENs cannot reach it: wait for the listener.
async fn listening(app: &TestApp) {
    eventually(WAIT, "the event listener is connected", || async {
        (stats(app)["listener"]["connected"] == true).then_some(())
    })
    .await;
}

/// The next text frame as JSON (pings are answered by tungstenite while reading).
async fn next_json(ws: &mut Ws) -> Value {
    let read = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    return serde_json::from_str::<Value>(t.as_str())
                        .unwrap_or(Value::String(t.to_string()))
                }
                Some(Ok(Message::Close(frame))) => panic!("socket closed: {frame:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("socket error: {e}"),
                None => panic!("socket ended"),
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("a frame in time")
}

async fn next_event(ws: &mut Ws) -> Value {
    loop {
        let frame = next_json(ws).await;
        if frame["message_type"] == "event" {
            return frame;
        }
    }
}

/// Every event up to and including the first one `last` matches.
async fn events_until(ws: &mut Ws, last: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let e = next_event(ws).await;
        let done = last(&e);
        seen.push(e);
        if done {
            return seen;
        }
    }
}

fn name(e: &Value) -> &str {
    e["payload"]["event"].as_str().unwrap_or("")
}

/// `(task id, event)` of task events.
fn task_events(events: &[Value]) -> Vec<(i64, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["payload"]["task"]["id"].as_i64().unwrap_or(-1),
                name(e).to_string(),
            )
        })
        .collect()
}

fn is_created(id: i32) -> impl Fn(&Value) -> bool {
    move |e| name(e) == "task_created" && e["payload"]["task"]["id"] == id
}

fn is_registered(droplet: i32) -> impl Fn(&Value) -> bool {
    move |e| name(e) == "droplet_registered" && e["payload"]["droplet"]["droplet_id"] == droplet
}

/// The contract's event envelope.
fn assert_envelope(e: &Value) {
    assert_eq!(e["udc_version"], "1.0", "{e}");
    assert_eq!(e["source"], 10, "{e}");
    assert_eq!(e["message_type"], "event", "{e}");
    assert!(
        e["trace_id"]
            .as_str()
            .is_some_and(|t| uuid::Uuid::parse_str(t).is_ok()),
        "{e}"
    );
    assert!(
        e["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{e}"
    );
    assert!(e["payload"].is_object(), "{e}");
}

async fn patch_as(app: &TestApp, droplet: i32, task: i32, status: &str) {
    let (s, b) = app
        .patch(
            &format!("/tasks/{task}"),
            &app.token(droplet, &["read", "write"]),
            json!({"status": status}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
}

/// A task that no droplet can take, to mark the end of what a test waits for.
async fn marker(app: &TestApp, task_type: &str) -> i32 {
    app.create_task(
        5,
        json!({"task_type": task_type, "title": "marker", "required_capability": "nobody-has-this"}),
    )
    .await
}

#[tokio::test]
async fn a_tasks_client_sees_a_whole_task_life_in_order_once_and_no_droplet_events() {
    let app = TestApp::spawn_with(&[("TASK_ROUTER_INTERVAL", "1")]).await;
    listening(&app).await;
    let reader = app.token(5, &["read"]);
    let mut tasks = connect(&app, "tasks", &reader, "").await;
    let mut droplets = connect(&app, "droplets", &reader, "").await;
    let droplet = DropletServer::start(Behaviour::Ok).await;
    app.register(8, &["code_verification"], &droplet.endpoint)
        .await;

    let id = app
        .create_task(5, json!({"task_type": "verify", "title": "Verify", "required_capability": "code_verification"}))
        .await;
    eventually(WAIT, "the task is dispatched to droplet 8", || {
        let d = droplet.clone();
        async move { d.executed().contains(&(id as i64)).then_some(()) }
    })
    .await;
    patch_as(&app, 8, id, "in_progress").await;
    patch_as(&app, 8, id, "completed").await;
    let last = marker(&app, "marker").await;

    let seen = events_until(&mut tasks, is_created(last)).await;
    let id = id as i64;
    assert_eq!(
        task_events(&seen),
        vec![
            (id, "task_created".to_string()),
            (id, "task_assigned".to_string()),
            (id, "task_started".to_string()),
            (id, "task_completed".to_string()),
            (last as i64, "task_created".to_string()),
        ]
    );
    let trace_id = app.task(id as i32).await["trace_id"].clone();
    for (e, status) in seen
        .iter()
        .zip(["pending", "assigned", "in_progress", "completed"])
    {
        assert_envelope(e);
        assert_eq!(
            e["trace_id"], trace_id,
            "a task event carries the task's trace id"
        );
        assert_eq!(e["payload"]["task"]["status"], status, "{e}");
    }
    assert_eq!(
        seen[1]["payload"]["task"]["assigned_droplet_id"], 8,
        "external droplet id"
    );
    assert_eq!(seen[1]["payload"]["previous_status"], "pending");

    // The droplets feed got the registrations and nothing of the task.
    app.register(9, &[], &dead_endpoint()).await;
    let seen = events_until(&mut droplets, is_registered(9)).await;
    let names: Vec<(Value, &str)> = seen
        .iter()
        .map(|e| (e["payload"]["droplet"]["droplet_id"].clone(), name(e)))
        .collect();
    assert_eq!(
        names,
        vec![
            (json!(8), "droplet_registered"),
            (json!(9), "droplet_registered")
        ]
    );
    seen.iter().for_each(assert_envelope);
}

#[tokio::test]
async fn a_droplets_client_sees_registration_missed_heartbeat_and_health_change_once() {
    let app = TestApp::spawn_with(&[
        ("HEARTBEAT_TIMEOUT", "1"),
        ("HEARTBEAT_CHECK_INTERVAL", "1"),
    ])
    .await;
    listening(&app).await;
    let mut droplets = connect(&app, "droplets", &app.token(5, &["read"]), "").await;
    let mut tasks = connect(&app, "tasks", &app.token(5, &["read"]), "").await;

    app.register(8, &["code_verification"], &dead_endpoint())
        .await;
    eventually(WAIT, "droplet 8 marked inactive", || async {
        let s: String = sqlx::query_scalar("SELECT status FROM droplets WHERE droplet_id = 8")
            .fetch_one(&app.db)
            .await
            .ok()?;
        (s == "inactive").then_some(())
    })
    .await;
    app.register(9, &[], &dead_endpoint()).await;

    let seen = events_until(&mut droplets, is_registered(9)).await;
    let of_8: Vec<&str> = seen
        .iter()
        .filter(|e| e["payload"]["droplet"]["droplet_id"] == 8)
        .map(name)
        .collect();
    assert_eq!(
        of_8,
        vec![
            "droplet_registered",
            "droplet_heartbeat_missed",
            "droplet_health_changed"
        ]
    );
    assert_eq!(
        seen.len(),
        4,
        "nothing else before droplet 9's registration: {seen:?}"
    );
    seen.iter().for_each(assert_envelope);
    let changed = &seen[2];
    assert_eq!(changed["payload"]["previous_status"], "active");
    assert_eq!(changed["payload"]["droplet"]["status"], "inactive");

    // The tasks feed got none of it.
    let last = marker(&app, "marker").await;
    let seen = events_until(&mut tasks, is_created(last)).await;
    assert_eq!(seen.len(), 1, "only the marker's creation: {seen:?}");
}

#[tokio::test]
async fn heartbeats_that_change_a_droplets_health_are_announced_once_each() {
    let app = TestApp::spawn().await;
    listening(&app).await;
    let mut droplets = connect(&app, "droplets", &app.token(5, &["read"]), "").await;
    app.register(8, &[], &dead_endpoint()).await;
    let me = app.token(8, &["read", "write"]);
    for status in ["maintenance", "maintenance", "active", "active"] {
        let (s, b) = app
            .post("/droplets/8/heartbeat", &me, json!({"status": status}))
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
    }
    app.register(9, &[], &dead_endpoint()).await;

    let seen = events_until(&mut droplets, is_registered(9)).await;
    let summary: Vec<(&str, Value, Value)> = seen
        .iter()
        .map(|e| {
            (
                name(e),
                e["payload"]["previous_status"].clone(),
                e["payload"]["droplet"]["status"].clone(),
            )
        })
        .collect();
    assert_eq!(
        summary[1..3],
        [
            ("droplet_health_changed", json!("active"), json!("inactive")),
            ("droplet_health_changed", json!("inactive"), json!("active")),
        ]
    );
    assert_eq!(seen.len(), 4, "{summary:?}");
    seen.iter().for_each(assert_envelope);
    assert_eq!(
        seen[1]["payload"]["droplet"]["name"], "droplet-8",
        "the droplet is complete"
    );
}

#[tokio::test]
async fn two_clients_get_every_event_and_filtered_clients_only_their_matches() {
    let app = TestApp::spawn().await;
    listening(&app).await;
    let token = app.token(5, &["read"]);
    let mut a = connect(&app, "tasks", &token, "").await;
    let mut b = connect(&app, "tasks", &token, "").await;
    let mut reports = connect(&app, "tasks", &token, "&task_type=report").await;
    let mut cancelled = connect(&app, "tasks", &token, "&status=cancelled").await;
    let mut of_droplet = connect(&app, "tasks", &token, "&droplet_id=8").await;

    let creator = app.token(5, &["read", "write"]);
    let v1 = app
        .create_task(
            5,
            json!({"task_type": "verify", "title": "v1", "required_capability": "x"}),
        )
        .await;
    let r1 = app
        .create_task(
            5,
            json!({"task_type": "report", "title": "r1", "required_capability": "x"}),
        )
        .await;
    let v2 = app
        .create_task(
            5,
            json!({"task_type": "verify", "title": "v2", "required_capability": "x"}),
        )
        .await;
    for id in [v1, r1] {
        let (s, body) = app.delete(&format!("/tasks/{id}"), &creator).await;
        assert_eq!(s, StatusCode::OK, "{body}");
    }
    let r2 = app
        .create_task(
            5,
            json!({"task_type": "report", "title": "r2", "required_capability": "x"}),
        )
        .await;
    let (s, body) = app.delete(&format!("/tasks/{v2}"), &creator).await;
    assert_eq!(s, StatusCode::OK, "{body}");

    let (v1, r1, v2, r2) = (v1 as i64, r1 as i64, v2 as i64, r2 as i64);
    let c = |id: i64, e: &str| (id, e.to_string());
    let everything = vec![
        c(v1, "task_created"),
        c(r1, "task_created"),
        c(v2, "task_created"),
        c(v1, "task_cancelled"),
        c(r1, "task_cancelled"),
        c(r2, "task_created"),
        c(v2, "task_cancelled"),
    ];
    let last = |e: &Value| name(e) == "task_cancelled" && e["payload"]["task"]["id"] == v2;
    assert_eq!(task_events(&events_until(&mut a, last).await), everything);
    assert_eq!(task_events(&events_until(&mut b, last).await), everything);
    assert_eq!(
        task_events(&events_until(&mut reports, is_created(r2 as i32)).await),
        vec![
            c(r1, "task_created"),
            c(r1, "task_cancelled"),
            c(r2, "task_created")
        ]
    );
    assert_eq!(
        task_events(&events_until(&mut cancelled, last).await),
        vec![
            c(v1, "task_cancelled"),
            c(r1, "task_cancelled"),
            c(v2, "task_cancelled")
        ]
    );

    // The droplet filter: only tasks assigned to droplet 8.
    let droplet = DropletServer::start(Behaviour::Ok).await;
    app.register(8, &["eight"], &droplet.endpoint).await;
    let mine = app
        .create_task(
            5,
            json!({"task_type": "verify", "title": "for 8", "required_capability": "eight"}),
        )
        .await;
    eventually(WAIT, "the task is assigned to 8", || async {
        (app.task_status(mine).await == "assigned").then_some(())
    })
    .await;
    patch_as(&app, 8, mine, "in_progress").await;
    let seen = events_until(&mut of_droplet, |e| name(e) == "task_started").await;
    assert_eq!(
        task_events(&seen),
        vec![
            c(mine as i64, "task_assigned"),
            c(mine as i64, "task_started")
        ]
    );
}

#[tokio::test]
async fn clients_may_subscribe_ping_and_send_junk_without_harm() {
    let app = TestApp::spawn().await;
    listening(&app).await;
    let token = app.token(5, &["read"]);
    let mut ws = connect(&app, "tasks", &token, "").await;

    ws.send(Message::text(r#"{"subscribe": {"task_type": "report"}}"#))
        .await
        .unwrap();
    let ack = next_json(&mut ws).await;
    assert_eq!(ack["message_type"], "response", "{ack}");
    assert_eq!(ack["payload"]["subscribed"]["task_type"], "report", "{ack}");

    for junk in [
        Message::text("hello"),
        Message::text(r#"{"subscribe": {"status": "done"}}"#),
        Message::text(r#"{"subscribe": 3}"#),
        Message::text(r#"[1, 2]"#),
        Message::binary(vec![0u8, 1, 2]),
    ] {
        ws.send(junk.clone()).await.unwrap();
        let answer = next_json(&mut ws).await;
        assert!(
            answer["payload"]["error"].is_string(),
            "{junk:?} -> {answer}"
        );
    }
    ws.send(Message::text("ping")).await.unwrap();
    assert_eq!(next_json(&mut ws).await, json!("pong"));
    ws.send(Message::Ping(vec![7u8].into())).await.unwrap();

    // The rejected subscription left the filter as it was: only reports arrive.
    app.create_task(5, task_payload("a verify task")).await;
    let report = app
        .create_task(
            5,
            json!({"task_type": "report", "title": "r", "required_capability": "x"}),
        )
        .await;
    let e = next_event(&mut ws).await;
    assert_eq!(
        (name(&e), e["payload"]["task"]["id"].clone()),
        ("task_created", json!(report))
    );

    // A message over the limit closes the socket with 1009; the server goes on serving.
    ws.send(Message::text("x".repeat(64 * 1024))).await.unwrap();
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("closed in time");
    assert_eq!(closed, Some(1009));
    let mut again = connect(&app, "tasks", &token, "").await;
    let id = marker(&app, "after").await;
    assert_eq!(next_event(&mut again).await["payload"]["task"]["id"], id);
}

#[tokio::test]
async fn bad_missing_and_read_less_tokens_and_bad_filters_are_refused_before_the_upgrade() {
    let app = TestApp::spawn().await;
    let base = format!("ws://{}", app.addr);
    assert_eq!(refused(format!("{base}/ws/tasks")).await, 401);
    assert_eq!(refused(format!("{base}/ws/droplets?token=")).await, 401);
    assert_eq!(
        refused(format!("{base}/ws/tasks?token=not.a.jwt")).await,
        401
    );
    let now = chrono::Utc::now().timestamp();
    let expired = sign(
        json!({"droplet_id": 5, "permissions": ["read"], "iat": now - 7200, "exp": now - 3600}),
    );
    assert_eq!(refused(feed_url(&app, "tasks", &expired, "")).await, 401);
    let other_secret = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"droplet_id": 5, "permissions": ["read"], "exp": now + 3600}),
        &jsonwebtoken::EncodingKey::from_secret(b"some-other-secret-0123456789abcdef"),
    )
    .unwrap();
    assert_eq!(
        refused(feed_url(&app, "droplets", &other_secret, "")).await,
        401
    );
    assert_eq!(
        refused(feed_url(&app, "tasks", &app.token(5, &[]), "")).await,
        403
    );
    assert_eq!(
        refused(feed_url(&app, "droplets", &app.token(5, &["fly"]), "")).await,
        403
    );
    let reader = app.token(5, &["read"]);
    assert_eq!(
        refused(feed_url(&app, "tasks", &reader, "&status=done")).await,
        422
    );
    assert_eq!(
        refused(feed_url(&app, "droplets", &reader, "&droplet_id=eight")).await,
        422
    );

    // The same checks answer plain HTTP, with the contract's bodies.
    let (s, body) = app
        .request(reqwest::Method::GET, "/ws/tasks", None, None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(body["detail"], "Not authenticated");
    let (s, _) = app
        .request(reqwest::Method::GET, "/ws/status", None, None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // A valid token without a WebSocket handshake is not an upgrade.
    let (s, _) = app
        .request(
            reqwest::Method::GET,
            &format!("/ws/tasks?token={reader}"),
            None,
            None,
        )
        .await;
    assert!(s.is_client_error(), "{s}");
    assert_eq!(ws_status(&app).await["total_connections"], 0);
}

#[tokio::test]
async fn the_eleventh_socket_of_a_droplet_is_refused_until_one_closes() {
    let app = TestApp::spawn().await;
    let token = app.token(5, &["read"]);
    let mut open = Vec::new();
    for i in 0..10 {
        open.push(
            connect(
                &app,
                if i % 2 == 0 { "tasks" } else { "droplets" },
                &token,
                "",
            )
            .await,
        );
    }
    assert_eq!(refused(feed_url(&app, "tasks", &token, "")).await, 429);
    assert_eq!(refused(feed_url(&app, "droplets", &token, "")).await, 429);
    let _other = connect(&app, "tasks", &app.token(6, &["read"]), "").await;
    let status = ws_status(&app).await;
    assert_eq!(status["connections_per_droplet"]["5"], 10, "{status}");
    assert_eq!(status["connections"]["tasks"], 6, "{status}");

    // A clean close frees the slot ...
    let mut first = open.remove(0);
    first.close(None).await.unwrap();
    let mut replacement = eventually(WAIT, "a new socket is accepted", || async {
        connect_async(feed_url(&app, "tasks", &token, ""))
            .await
            .ok()
            .map(|(ws, _)| ws)
    })
    .await;
    assert_eq!(refused(feed_url(&app, "tasks", &token, "")).await, 429);
    // ... and so does a client that just goes away.
    drop(open.remove(0));
    let _another = eventually(
        WAIT,
        "a socket is accepted after a client vanished",
        || async {
            connect_async(feed_url(&app, "droplets", &token, ""))
                .await
                .ok()
                .map(|(ws, _)| ws)
        },
    )
    .await;
    replacement.close(None).await.unwrap();
}

#[tokio::test]
async fn a_client_that_never_reads_is_dropped_while_another_gets_every_event() {
    const EVENTS: usize = 10_000;
    const QUEUE: usize = 64;
    let app = TestApp::spawn_with(&[("WS_CLIENT_QUEUE", "64")]).await;
    let token = app.token(5, &["read"]);
    let _stalled = connect(&app, "tasks", &token, "").await;
    let reader = connect(&app, "tasks", &token, "").await;

    // The reader counts and checks every event; the publisher never lets it fall more than a
    // few events behind, so only the stalled client can fill its queue.
    let received = Arc::new(AtomicUsize::new(0));
    let (progress, mut watch) = tokio::sync::watch::channel(0usize);
    let reading = {
        let received = received.clone();
        tokio::spawn(async move {
            let mut reader = reader;
            while received.load(Ordering::SeqCst) < EVENTS {
                let Some(Ok(message)) = reader.next().await else {
                    return reader;
                };
                if let Message::Text(t) = message {
                    let e: Value = serde_json::from_str(t.as_str()).expect("json event");
                    let n = received.load(Ordering::SeqCst);
                    assert_eq!(
                        e["payload"]["task"]["id"], n,
                        "events arrive in order, none missing"
                    );
                    received.store(n + 1, Ordering::SeqCst);
                    let _ = progress.send(n + 1);
                }
            }
            reader
        })
    };
    let padding = "p".repeat(1024);
    for i in 0..EVENTS {
        let event = Event::task(
            TaskEventKind::TaskCreated,
            None,
            json!({"id": i, "task_type": "load", "status": "pending", "padding": padding}),
            None,
        );
        app.state
            .events
            .publish_envelope(Feed::Tasks, &event.envelope);
        if i % 16 == 15 {
            let target = i + 1 - 16;
            tokio::time::timeout(WAIT, watch.wait_for(|n| *n >= target))
                .await
                .expect("the reading client keeps up")
                .expect("reader alive");
        }
    }
    let mut reader = tokio::time::timeout(WAIT, reading)
        .await
        .expect("reader done")
        .expect("reader task");
    assert_eq!(received.load(Ordering::SeqCst), EVENTS);

    eventually(WAIT, "the stalled client is dropped", || async {
        (stats(&app)["connections"]["tasks"] == 1).then_some(())
    })
    .await;
    let status = ws_status(&app).await;
    assert_eq!(status["clients_dropped_slow"], 1, "{status}");
    assert_eq!(status["client_queue"], QUEUE, "{status}");
    assert_eq!(
        status["max_queue_depth"], QUEUE,
        "the stalled queue filled to its bound and no further: {status}"
    );
    assert!(
        status["messages_sent"].as_u64().unwrap() >= EVENTS as u64,
        "{status}"
    );
    // The reader is still connected and still served.
    let one_more = Event::task(
        TaskEventKind::TaskCreated,
        None,
        json!({"id": EVENTS}),
        None,
    );
    app.state
        .events
        .publish_envelope(Feed::Tasks, &one_more.envelope);
    assert_eq!(
        next_event(&mut reader).await["payload"]["task"]["id"],
        EVENTS
    );
}

#[tokio::test]
async fn a_client_on_one_replica_sees_what_another_replica_did() {
    let settings = [("TASK_ROUTER_INTERVAL", "1")];
    let a = TestApp::spawn_with(&settings).await;
    let b = TestApp::spawn_on(&a.database_url, &settings).await;
    listening(&a).await;
    listening(&b).await;
    let token = a.token(5, &["read"]);
    let mut tasks = connect(&a, "tasks", &token, "").await;
    let mut droplets = connect(&a, "droplets", &token, "").await;

    let droplet = DropletServer::start(Behaviour::Ok).await;
    b.register(8, &["code_verification"], &droplet.endpoint)
        .await;
    // Large enough that NOTIFY carries a reference and replica A reads the payload back.
    let blob = "b".repeat(20_000);
    let id = b
        .create_task(
            5,
            json!({"task_type": "verify", "title": "big", "required_capability": "code_verification", "payload": {"blob": blob}}),
        )
        .await;
    eventually(WAIT, "the task is dispatched", || {
        let d = droplet.clone();
        async move { d.executed().contains(&(id as i64)).then_some(()) }
    })
    .await;
    patch_as(&b, 8, id, "in_progress").await;
    patch_as(&b, 8, id, "completed").await;
    let last = marker(&b, "marker").await;

    let seen = events_until(&mut tasks, is_created(last)).await;
    let names: Vec<&str> = seen.iter().map(name).collect();
    assert_eq!(
        names,
        [
            "task_created",
            "task_assigned",
            "task_started",
            "task_completed",
            "task_created"
        ]
    );
    for (e, status) in seen
        .iter()
        .zip(["pending", "assigned", "in_progress", "completed"])
    {
        assert_envelope(e);
        assert_eq!(e["payload"]["task"]["id"], id);
        assert_eq!(
            e["payload"]["task"]["status"], status,
            "the status at the event, not the row's now"
        );
        assert_eq!(
            e["payload"]["task"]["payload"]["blob"],
            json!(blob),
            "the full task"
        );
    }
    let registered = next_event(&mut droplets).await;
    assert_eq!(
        (
            name(&registered),
            registered["payload"]["droplet"]["droplet_id"].clone()
        ),
        ("droplet_registered", json!(8))
    );
}

#[tokio::test]
async fn a_client_that_does_not_answer_pings_is_dropped_after_two_intervals() {
    let app = TestApp::spawn_with(&[("WS_HEARTBEAT_INTERVAL", "1")]).await;
    let token = app.token(5, &["read"]);
    // Reading makes tungstenite answer the pings.
    let live = connect(&app, "droplets", &token, "").await;
    let answering = tokio::spawn(async move {
        let mut live = live;
        while let Some(Ok(_)) = live.next().await {}
    });
    let started = Instant::now();
    let mut silent = connect(&app, "tasks", &token, "").await;

    eventually(WAIT, "the silent client is dropped", || async {
        (stats(&app)["clients_dropped_unresponsive"] == 1).then_some(())
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "not before two intervals"
    );
    let code = tokio::time::timeout(WAIT, async {
        loop {
            match silent.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("close in time");
    assert_eq!(code, Some(CloseCode::Policy));
    eventually(WAIT, "the silent client's socket is gone", || async {
        (stats(&app)["total_connections"] == 1).then_some(())
    })
    .await;
    let status = ws_status(&app).await;
    assert_eq!(
        status["connections"]["droplets"], 1,
        "the answering client stays: {status}"
    );
    assert_eq!(status["clients_dropped_unresponsive"], 1, "{status}");
    answering.abort();
}

#[tokio::test]
async fn shutdown_closes_every_socket_with_1001() {
    let app = TestApp::spawn().await;
    let mut ws = connect(&app, "tasks", &app.token(5, &["read"]), "").await;
    app.state.shutdown.cancel();
    let code = tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("close in time");
    assert_eq!(code, Some(CloseCode::Away));
}

#[tokio::test]
async fn tokens_in_websocket_urls_never_reach_a_log_line() {
    // Everything the server side says, at every level; the test's own clients stay quiet
    // (they know the URL they were given).
    let log = LogCapture::start(
        "trace,tungstenite=off,tokio_tungstenite=off,reqwest=off,hyper_util::client=off",
    );

    let app = TestApp::spawn().await;
    let reader = app.token(5, &["read"]);
    let read_less = app.token(6, &[]);
    let mut ws = connect(&app, "tasks", &reader, "&status=pending").await;
    assert_eq!(
        refused(feed_url(&app, "droplets", &read_less, "")).await,
        403
    );
    assert_eq!(
        refused(feed_url(&app, "tasks", &reader, "&status=nope")).await,
        422
    );
    let (s, _) = app
        .request(
            reqwest::Method::GET,
            &format!("/ws/droplets?token={reader}"),
            None,
            None,
        )
        .await;
    assert!(s.is_client_error());
    ws.send(Message::text("junk")).await.unwrap();
    next_json(&mut ws).await;
    ws.close(None).await.unwrap();
    eventually(WAIT, "the socket is gone", || async {
        (stats(&app)["total_connections"] == 0).then_some(())
    })
    .await;

    let text = log.text();
    assert!(
        text.contains("route=/ws/tasks"),
        "the capture works: {text}"
    );
    for token in [&reader, &read_less] {
        let signature = token.rsplit('.').next().unwrap();
        assert!(!text.contains(signature), "a token reached the log");
    }
    assert!(!text.contains("token="), "a query string reached the log");
}
