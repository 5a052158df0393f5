//! The real mesh (issue 13), the security review's findings and fencing by attempt (issue 17),
//! over real HTTP against droplets that check what the original ones check: droplet-12
//! (python-jose, `sub`, string ids), droplet-2 (the Registry's token as bearer and signature),
//! and droplets that refuse, fail, redirect or never answer.

use std::time::{Duration, Instant};

use futures::StreamExt;
use orchestrator::services::registry_client;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

use crate::fixture_droplet::*;
use crate::helpers::*;

const SOON: Duration = Duration::from_secs(10);

pub(crate) fn task_for(capability: &str, extra: Value) -> Value {
    let mut t = json!({ "task_type": "work", "title": "work", "required_capability": capability, "payload": {} });
    if let (Some(t), Value::Object(extra)) = (t.as_object_mut(), extra) {
        t.extend(extra);
    }
    t
}

/// A request envelope whose `source` is written as the droplet writes it.
fn envelope_from(source: Value, payload: Value) -> Value {
    let mut e = envelope(payload);
    e["source"] = source;
    e
}

/// Registers droplet `id` with its envelope's `source` in the given form.
pub(crate) async fn register_from(
    app: &TestApp,
    id: i32,
    caps: &[&str],
    endpoint: &str,
    source: Value,
) {
    let (s, b) = app
        .request(
            Method::POST,
            "/droplets/register",
            Some(&app.token(id, &["read", "write"])),
            Some(envelope_from(
                source,
                json!({"droplet_id": id, "name": format!("droplet-{id}"), "endpoint": endpoint, "capabilities": caps}),
            )),
        )
        .await;
    assert!(s.is_success(), "register {id}: {s} {b}");
}

/// A request with a raw body (JSON or not); the answer's status, body and size in bytes.
async fn raw(
    app: &TestApp,
    method: Method,
    path: &str,
    token: &str,
    body: Option<String>,
) -> (StatusCode, Value, usize) {
    let mut req = app.client.request(method, app.url(path)).bearer_auth(token);
    if let Some(body) = body {
        req = req.header("content-type", "application/json").body(body);
    }
    let resp = req.send().await.expect("request sent");
    let status = resp.status();
    let bytes = resp.bytes().await.expect("body read");
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).to_string()));
    (status, value, bytes.len())
}

/// POSTs a message straight to a fixture droplet (not through the orchestrator).
async fn post_to(droplet: &FixtureDroplet, bearer: &str, body: Value) -> (StatusCode, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}/message", droplet.endpoint))
        .bearer_auth(bearer)
        .json(&body)
        .send()
        .await
        .expect("fixture answers");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// The first `execute_task` the droplet got for this task.
pub(crate) async fn execute_of(droplet: &FixtureDroplet, task: i32) -> Received {
    eventually(
        SOON,
        &format!("execute_task of task {task} reached {}", droplet.endpoint),
        || async move {
            droplet
                .commands("execute_task")
                .into_iter()
                .find(|r| r.body["payload"]["task"]["id"] == task)
        },
    )
    .await
}

/// (from, to, changed_by, reason, attempt) of each history row, oldest first.
async fn history_with_attempts(
    app: &TestApp,
    task: i32,
) -> Vec<(Option<String>, String, Option<String>, Option<String>, i32)> {
    sqlx::query_as(
        "SELECT from_status, to_status, changed_by, reason, attempt FROM task_state_history
         WHERE task_id = $1 ORDER BY id",
    )
    .bind(task)
    .fetch_all(&app.db)
    .await
    .expect("history rows")
}

pub(crate) async fn droplet_row(app: &TestApp, id: i32) -> (String, i32) {
    sqlx::query_as("SELECT status, refused_deliveries FROM droplets WHERE droplet_id = $1")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .expect("droplet row")
}

// ---------------------------------------------------------------------------
// WebSocket feeds.

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Connects to a feed once the replica's event listener is up (events committed before it
/// LISTENs cannot reach it).
pub(crate) async fn feed(app: &TestApp, feed: &str, filters: &str) -> Ws {
    eventually(SOON, "the event listener is connected", || async {
        let stats = serde_json::to_value(app.state.events.stats()).expect("stats");
        (stats["listener"]["connected"] == true).then_some(())
    })
    .await;
    let url = format!(
        "ws://{}/ws/{feed}?token={}{filters}",
        app.addr,
        app.token(1, &["read"])
    );
    let (ws, response) = connect_async(url).await.expect("feed connects");
    assert_eq!(response.status().as_u16(), 101);
    ws
}

/// Events until (and including) the first one `last` matches.
pub(crate) async fn events_until(ws: &mut Ws, last: impl Fn(&Value) -> bool) -> Vec<Value> {
    let read = async {
        let mut seen = Vec::new();
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let e: Value = serde_json::from_str(t.as_str()).expect("JSON frame");
                    if e["message_type"] != "event" {
                        continue;
                    }
                    let done = last(&e);
                    seen.push(e);
                    if done {
                        return seen;
                    }
                }
                Some(Ok(Message::Close(frame))) => panic!("socket closed: {frame:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("socket error: {e}"),
                None => panic!("socket ended"),
            }
        }
    };
    tokio::time::timeout(SOON, read)
        .await
        .expect("the event in time")
}

pub(crate) fn event_name(e: &Value) -> &str {
    e["payload"]["event"].as_str().unwrap_or("")
}

// ---------------------------------------------------------------------------
// Issue 13: the real mesh.

/// Fact 1: droplet-12 reads the caller from `sub` with python-jose; the orchestrator's token
/// carries it, is short-lived, marked outbound, and has no `aud` that jose would refuse.
#[tokio::test]
async fn droplet_12_accepts_the_orchestrators_token_which_names_it_in_sub() {
    let app = TestApp::spawn_with(&[("TASK_ROUTER_INTERVAL", "1")]).await;
    let d12 = FixtureDroplet::start(Mode::Droplet12).await;
    // The fixture refuses what the real droplet refuses: a token without `sub` (what the
    // orchestrator used to send), a token carrying an `aud`.
    let strings = json!({"source": "droplet-10", "target": "droplet-12", "payload": {"ping": 1}});
    let (s, b) = post_to(&d12, &token(10, &["read", "write"]), strings.clone()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
    let now = chrono::Utc::now().timestamp();
    let with_aud = sign(
        json!({"sub": "droplet-10", "aud": "fullpotential.droplets", "iat": now, "exp": now + 300}),
    );
    let (s, b) = post_to(&d12, &with_aud, strings.clone()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
    let with_sub = sign(json!({"sub": "droplet-10", "iat": now, "exp": now + 300}));
    let (s, b) = post_to(&d12, &with_sub, strings).await;
    assert_eq!(s, StatusCode::OK, "{b}");

    register_from(&app, 12, &["audit"], &d12.endpoint, json!("droplet-12")).await;
    let id = app.create_task(5, task_for("audit", json!({}))).await;
    let got = execute_of(&d12, id).await;
    assert_eq!(
        got.answered, 200,
        "droplet-12 refused the delivery: {:?}",
        got.body
    );
    assert_eq!(got.method, "POST");
    assert_eq!(got.path, "/message");
    let claims = claims_of(&got.bearer().expect("a bearer token"));
    assert_eq!(claims["droplet_id"], 10, "{claims}");
    assert_eq!(claims["sub"], "droplet-10", "{claims}");
    assert_eq!(claims["token_use"], "outbound", "{claims}");
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        300,
        "{claims}"
    );
    assert!(claims.get("aud").is_none(), "{claims}");
    assert!(jose_hs256_claims(&got.bearer().unwrap()).is_ok());
    // Accepted: the task stays with droplet 12, not a retry.
    assert_eq!(app.holder(id).await, ("assigned".to_string(), Some(12)));
    assert_eq!(app.retry_count(id).await, 0);
}

/// Fact 2: droplet-12 requires string ids; droplets that write integers get integers, and
/// a droplet that changes its form (in a heartbeat) is answered in the new one.
#[tokio::test]
async fn envelope_ids_are_written_in_each_droplets_own_form() {
    let app = TestApp::spawn_with(&[("TASK_ROUTER_INTERVAL", "1")]).await;
    let d12 = FixtureDroplet::start(Mode::Droplet12).await;
    // The fixture refuses integer ids as droplet-12 does.
    let now = chrono::Utc::now().timestamp();
    let with_sub = sign(json!({"sub": "droplet-10", "iat": now, "exp": now + 300}));
    let (s, b) = post_to(&d12, &with_sub, json!({"source": 10, "target": 12})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(b["detail"][0]["loc"], json!(["body", "source"]), "{b}");
    assert_eq!(b["detail"][1]["loc"], json!(["body", "target"]), "{b}");

    register_from(&app, 12, &["strings"], &d12.endpoint, json!("droplet-12")).await;
    let ints = FixtureDroplet::start(Mode::Accept).await;
    register_from(&app, 13, &["ints"], &ints.endpoint, json!(13)).await;
    let switching = FixtureDroplet::start(Mode::Droplet12).await;
    register_from(&app, 14, &["switch"], &switching.endpoint, json!(14)).await;

    let a = app.create_task(5, task_for("strings", json!({}))).await;
    let got = execute_of(&d12, a).await;
    assert_eq!(got.answered, 200, "{:?}", got.body);
    assert_eq!(
        (&got.body["source"], &got.body["target"]),
        (&json!("droplet-10"), &json!("droplet-12"))
    );

    let b = app.create_task(5, task_for("ints", json!({}))).await;
    let got = execute_of(&ints, b).await;
    assert_eq!(
        (&got.body["source"], &got.body["target"]),
        (&json!(10), &json!(13))
    );

    // Registered with integers (droplet-12's fixture refuses them), then heartbeats with strings.
    let c = app
        .create_task(5, task_for("switch", json!({"max_retries": 0})))
        .await;
    let got = execute_of(&switching, c).await;
    assert_eq!(got.answered, 422, "{:?}", got.body);
    assert_eq!(got.body["source"], 10);
    eventually(SOON, "the refused task failed", || async {
        (app.task_status(c).await == "failed").then_some(())
    })
    .await;
    let (s, b) = app
        .request(
            Method::POST,
            "/droplets/14/heartbeat",
            Some(&app.token(14, &["read", "write"])),
            Some(envelope_from(
                json!("droplet-14"),
                json!({"status": "active"}),
            )),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = app
        .request(
            Method::POST,
            "/send?target_droplet_id=14",
            Some(&app.token(5, &["read", "write"])),
            Some(json!({"hello": "again"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let last = switching.received().pop().unwrap();
    assert_eq!(last.answered, 200, "{:?}", last.body);
    assert_eq!(
        (&last.body["source"], &last.body["target"]),
        (&json!("droplet-5"), &json!("droplet-14"))
    );
}

/// Fact 3: droplet-2 wants the Registry's token as the bearer and as the envelope's
/// `signature`; with REGISTRY_TOKEN set, the orchestrator sends both.
#[tokio::test]
async fn droplet_2_takes_deliveries_carrying_the_configured_registry_token() {
    let (private, public) = rsa_pair();
    let held = registry_token(&private, 10);
    let app = TestApp::spawn_with(&[
        ("TASK_ROUTER_INTERVAL", "1"),
        ("REGISTRY_PUBLIC_KEY", &public),
        ("REGISTRY_TOKEN", &held),
    ])
    .await;
    let d2 = FixtureDroplet::start(Mode::Droplet2 {
        registry_public_key: public.clone(),
    })
    .await;
    // The fixture asks for a signature, and for a Registry bearer.
    let (s, b) = post_to(&d2, &held, json!({"source": 10, "payload": {}})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert_eq!(b["detail"], "Message signature required");
    let (s, b) = post_to(
        &d2,
        &token(10, &["read"]),
        json!({"signature": held.clone()}),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
    let (s, b) = post_to(&d2, &held, json!({"signature": "not-a-token"})).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");

    app.register(2, &["a"], &d2.endpoint).await;
    let id = app.create_task(5, task_for("a", json!({}))).await;
    let got = execute_of(&d2, id).await;
    assert_eq!(
        got.answered, 200,
        "droplet-2 refused the delivery: {:?}",
        got.body
    );
    assert_eq!(got.bearer().as_deref(), Some(held.as_str()));
    assert_eq!(got.body["signature"], held.as_str());
    assert_eq!(app.holder(id).await, ("assigned".to_string(), Some(2)));
}

/// Fact 3 again: the orchestrator fetches its token from the Registry with REGISTRY_KEY
/// (`POST /auth/token?droplet_id=10`, `X-Registry-Key`) and signs deliveries with it.
#[tokio::test]
async fn droplet_2_takes_deliveries_carrying_a_token_fetched_from_the_registry() {
    let (private, public) = rsa_pair();
    let issued = registry_token(&private, 10);
    let registry = FakeRegistry::start("registry-key-of-10", &issued).await;
    let app = TestApp::spawn_with(&[
        ("TASK_ROUTER_INTERVAL", "1"),
        ("REGISTRY_URL", &registry.url),
        ("REGISTRY_SYNC_INTERVAL", "3600"),
        ("REGISTRY_KEY", "registry-key-of-10"),
        ("REGISTRY_PUBLIC_KEY", &public),
    ])
    .await;
    assert_eq!(
        registry_client::Registry::from(&app.state.core)
            .run_once()
            .await,
        Ok(0)
    );
    let requests = registry.token_requests.lock().unwrap().clone();
    assert!(!requests.is_empty(), "no token was asked for");
    for r in &requests {
        assert_eq!(
            r,
            &(
                "droplet_id=10".to_string(),
                "registry-key-of-10".to_string()
            )
        );
    }
    let left = app
        .state
        .keys
        .registry_token_remaining()
        .expect("a Registry token is held");
    assert!(left > 3000, "{left}");

    let d2 = FixtureDroplet::start(Mode::Droplet2 {
        registry_public_key: public,
    })
    .await;
    app.register(2, &["a"], &d2.endpoint).await;
    let id = app.create_task(5, task_for("a", json!({}))).await;
    let got = execute_of(&d2, id).await;
    assert_eq!(
        got.answered, 200,
        "droplet-2 refused the delivery: {:?}",
        got.body
    );
    assert_eq!(got.bearer().as_deref(), Some(issued.as_str()));
    assert_eq!(got.body["signature"], issued.as_str());
}

/// Fact 4: a refused delivery is not retried on the same droplet: the task goes back to
/// pending as a retry and on to another droplet.
#[tokio::test]
async fn a_refused_task_ends_on_another_droplet_with_one_retry_counted() {
    let app = TestApp::spawn_with(&[("TASK_ROUTER_INTERVAL", "1")]).await;
    let good = FixtureDroplet::start(Mode::Droplet12).await;
    let refusing = FixtureDroplet::start(Mode::Refuse).await;
    register_from(&app, 31, &["render"], &good.endpoint, json!("droplet-31")).await;
    // Registered last: the freshest heartbeat, so the router tries it first.
    app.register(32, &["render"], &refusing.endpoint).await;
    let mut tasks = feed(&app, "tasks", "").await;

    let id = app.create_task(5, task_for("render", json!({}))).await;
    let refused = execute_of(&refusing, id).await;
    assert_eq!(refused.answered, 422);
    let delivered = execute_of(&good, id).await;
    assert_eq!(delivered.answered, 200, "{:?}", delivered.body);
    assert_eq!(app.holder(id).await, ("assigned".to_string(), Some(31)));
    assert_eq!(app.retry_count(id).await, 1);
    assert_eq!(refusing.executed(), [id as i64], "asked once, never again");

    let history = history_with_attempts(&app, id).await;
    let steps: Vec<(Option<&str>, &str, Option<&str>)> = history
        .iter()
        .map(|h| (h.0.as_deref(), h.1.as_str(), h.2.as_deref()))
        .collect();
    assert_eq!(
        steps,
        [
            (None, "pending", Some("droplet-5")),
            (Some("pending"), "assigned", Some("task_router")),
            (Some("assigned"), "pending", Some("system")),
            (Some("pending"), "assigned", Some("task_router")),
        ]
    );
    let reason = history[2].3.clone().unwrap_or_default();
    assert!(
        reason.contains("refused") && reason.contains("HTTP 422"),
        "{reason}"
    );

    let events = events_until(&mut tasks, |e| event_name(e) == "task_requeued").await;
    let requeued = &events.last().unwrap()["payload"];
    assert_eq!(requeued["refused_by"], 32, "{requeued}");
    assert_eq!(requeued["task"]["id"], id);
    assert_eq!(requeued["task"]["retry_count"], 1, "{requeued}");
    // One refusal is not yet enough to put the droplet out.
    assert_eq!(droplet_row(&app, 32).await, ("active".to_string(), 1));
}

/// Fact 4: a droplet that refuses 3 deliveries in a row is marked `error` (an event says
/// why) and gets no tasks until it heartbeats again.
#[tokio::test]
async fn a_droplet_refusing_three_deliveries_in_a_row_is_marked_error_until_it_heartbeats() {
    let app = TestApp::spawn_with(&[("TASK_ROUTER_INTERVAL", "1")]).await;
    let refusing = FixtureDroplet::start(Mode::Refuse).await;
    app.register(33, &["paint"], &refusing.endpoint).await;
    let mut droplets = feed(&app, "droplets", "&droplet_id=33").await;

    let id = app
        .create_task(5, task_for("paint", json!({"max_retries": 5})))
        .await;
    let events = events_until(&mut droplets, |e| event_name(e) == "droplet_health_changed").await;
    let changed = &events.last().unwrap()["payload"];
    assert_eq!(changed["droplet"]["droplet_id"], 33, "{changed}");
    assert_eq!(changed["droplet"]["status"], "error", "{changed}");
    assert_eq!(changed["previous_status"], "active", "{changed}");
    let reason = changed["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("refused 3 deliveries in a row") && reason.contains("HTTP 422"),
        "{reason}"
    );
    assert_eq!(droplet_row(&app, 33).await, ("error".to_string(), 3));
    eventually(
        SOON,
        "the task back to pending after 3 refusals",
        || async { (app.holder(id).await == ("pending".to_string(), None)).then_some(()) },
    )
    .await;
    assert_eq!(app.retry_count(id).await, 3);
    assert_eq!(refusing.executed(), [id as i64; 3]);

    // Out of routing: the router runs and leaves the task pending.
    app.wait_job_runs(JobId::TaskRouter, 2, SOON).await;
    assert_eq!(app.holder(id).await, ("pending".to_string(), None));
    assert_eq!(refusing.executed().len(), 3);

    // It heartbeats (it was fixed): back in routing, its count reset.
    refusing.set(Mode::Accept);
    let (s, b) = app
        .post(
            "/droplets/33/heartbeat",
            &app.token(33, &["read", "write"]),
            json!({"status": "active"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    app.wait_assigned(id, 33, SOON).await;
    eventually(SOON, "the fourth delivery accepted", || async {
        refusing
            .commands("execute_task")
            .get(3)
            .map(|r| r.answered)
            .filter(|a| *a == 200)
    })
    .await;
    assert_eq!(droplet_row(&app, 33).await, ("active".to_string(), 0));
    assert_eq!(app.retry_count(id).await, 3);
}

/// droplet-2's side of the mesh: an orchestrator that trusts the Registry's key, an accepting
/// droplet, the Registry's key pair and the token the Registry issues droplet 42 (only
/// `droplet_id` and times: no `permissions` claim).
pub(crate) struct Droplet2 {
    pub app: TestApp,
    pub server: FixtureDroplet,
    pub private: String,
    pub registry: String,
}

impl Droplet2 {
    pub async fn start() -> Droplet2 {
        let (private, public) = rsa_pair();
        let app = TestApp::spawn_with(&[("REGISTRY_PUBLIC_KEY", &public)]).await;
        let server = FixtureDroplet::start(Mode::Accept).await;
        let now = chrono::Utc::now().timestamp();
        let registry = rs256(
            &private,
            json!({"droplet_id": 42, "iat": now, "exp": now + 3600}),
        );
        Droplet2 {
            app,
            server,
            private,
            registry,
        }
    }
}

/// Fact 5: droplet-2 registers and heartbeats with bare bodies and a Registry token that has
/// no `permissions` claim; a read-only token may not.
#[tokio::test]
async fn droplet_2_registers_and_heartbeats_with_bare_bodies_and_a_permissionless_token() {
    let Droplet2 {
        app,
        server,
        private,
        registry,
    } = Droplet2::start().await;
    let now = chrono::Utc::now().timestamp();
    let registration = json!({
        "droplet_id": 42, "name": "x", "endpoint": server.endpoint,
        "capabilities": ["a"], "version": "1.0.0", "status": "active"
    });
    let heartbeat = json!({
        "status": "active", "cpu_percent": 1.0, "memory_mb": 100,
        "requests_per_minute": 0, "errors_last_hour": 0
    });

    // A read-only token (permissions without write) may not.
    let reader = app.token(42, &["read"]);
    let (s, b) = post_bare(&app, "/droplets/register", &reader, registration.clone()).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");

    let (s, b) = post_bare(&app, "/droplets/register", &registry, registration.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["udc_version"], "1.0", "{b}");
    assert_eq!(b["message_type"], "response");
    assert_eq!(b["source"], 10);
    assert_eq!(b["target"], 42);
    assert_eq!(b["payload"]["registered"], true);
    assert_eq!(b["payload"]["droplet_id"], 42);
    assert_eq!(b["payload"]["status"], "active");

    let (s, b) = post_bare(&app, "/droplets/42/heartbeat", &registry, heartbeat.clone()).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["message_type"], "response");
    assert_eq!(b["payload"]["acknowledged"], true);
    assert_eq!(b["payload"]["droplet_id"], 42);
    let (status, metrics): (String, Value) = sqlx::query_as(
        "SELECT h.status, h.metrics FROM heartbeats h JOIN droplets d ON d.id = h.droplet_id
         WHERE d.droplet_id = 42 ORDER BY h.id DESC LIMIT 1",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(status, "active");
    assert_eq!(
        metrics,
        json!({"cpu_percent": 1.0, "memory_mb": 100, "requests_per_minute": 0, "errors_last_hour": 0})
    );
    let (s, b) = post_bare(&app, "/droplets/42/heartbeat", &reader, heartbeat.clone()).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");

    // The droplet named by `sub`, a float `exp` (Python's time.time() + 3600).
    let by_sub = rs256(
        &private,
        json!({"sub": "droplet-42", "iat": now, "exp": now as f64 + 3600.5}),
    );
    let (s, b) = post_bare(&app, "/droplets/42/heartbeat", &by_sub, heartbeat.clone()).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    // A permission-less token acts only as its own droplet.
    let other = rs256(
        &private,
        json!({"droplet_id": 43, "iat": now, "exp": now + 3600}),
    );
    let (s, b) = post_bare(&app, "/droplets/register", &other, registration).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    // A token not valid yet.
    let later = rs256(
        &private,
        json!({"droplet_id": 42, "nbf": now + 3600, "iat": now, "exp": now + 7200}),
    );
    let (s, b) = post_bare(&app, "/droplets/42/heartbeat", &later, heartbeat).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
}

/// Fact 6: `/send` and `/broadcast` take a bare JSON object body as the message.
#[tokio::test]
async fn send_and_broadcast_take_a_bare_json_body_as_the_message() {
    let app = TestApp::spawn().await;
    let d12 = FixtureDroplet::start(Mode::Droplet12).await;
    register_from(&app, 12, &["audit"], &d12.endpoint, json!("droplet-12")).await;
    let d13 = FixtureDroplet::start(Mode::Accept).await;
    app.register(13, &["audit"], &d13.endpoint).await;

    let (s, b) = app
        .request(
            Method::POST,
            "/send?target_droplet_id=12",
            Some(&app.token(5, &["read", "write"])),
            Some(json!({"kind": "hello", "n": 1})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["payload"]["delivered"], true, "{b}");
    let got = d12.received().pop().expect("droplet-12 got the message");
    assert_eq!(got.answered, 200, "{:?}", got.body);
    assert_eq!(got.path, "/message");
    assert_eq!(got.body["message_type"], "command");
    assert_eq!(
        got.body["payload"],
        json!({"kind": "hello", "n": 1, "relayed_by": 10})
    );
    assert_eq!(got.body["source"], "droplet-5");
    assert_eq!(got.body["target"], "droplet-12");

    let (s, b) = app
        .request(
            Method::POST,
            "/broadcast",
            Some(&app.admin()),
            Some(json!({"notice": "maintenance at noon"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["payload"]["total"], 2, "{b}");
    assert_eq!(b["payload"]["delivered"], 2, "{b}");
    let to12 = d12.received().pop().unwrap();
    assert_eq!(to12.answered, 200, "{:?}", to12.body);
    assert_eq!(
        to12.body["payload"],
        json!({"notice": "maintenance at noon", "relayed_by": 10})
    );
    assert_eq!(to12.body["source"], "droplet-1");
    let to13 = d13.received().pop().expect("droplet 13 got the broadcast");
    assert_eq!(
        to13.body["payload"],
        json!({"notice": "maintenance at noon", "relayed_by": 10})
    );
    assert_eq!(
        (&to13.body["source"], &to13.body["target"]),
        (&json!(1), &json!(13))
    );
}

// ---------------------------------------------------------------------------
// The security review.

/// A token the orchestrator sent is refused when shown back to it, as is any token naming the
/// orchestrator's own id (its Registry token included), and `/token` will not mint one.
#[tokio::test]
async fn tokens_the_orchestrator_sends_or_that_name_it_are_refused() {
    let (private, public) = rsa_pair();
    let app = TestApp::spawn_with(&[("REGISTRY_PUBLIC_KEY", &public)]).await;
    let d = FixtureDroplet::start(Mode::Accept).await;
    app.register(15, &["x"], &d.endpoint).await;
    let (s, b) = app
        .request(
            Method::POST,
            "/send?target_droplet_id=15",
            Some(&app.token(5, &["read", "write"])),
            Some(json!({"hello": 1})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let delivery = d.received().pop().unwrap().bearer().expect("bearer");
    assert_eq!(claims_of(&delivery)["token_use"], "outbound");

    let now = chrono::Utc::now().timestamp();
    let refused = [
        ("the delivery token", delivery),
        (
            "an admin token of droplet 10",
            app.token(10, &["read", "write", "admin"]),
        ),
        (
            "a token naming 10 by sub",
            sign(
                json!({"sub": "droplet-10", "permissions": ["read"], "iat": now, "exp": now + 600}),
            ),
        ),
        ("the Registry's token of 10", registry_token(&private, 10)),
    ];
    for (what, token) in refused {
        let (s, b) = app.get("/tasks", &token).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{what}: {b}");
        assert_eq!(
            b["detail"],
            "Could not validate credentials: the token is the orchestrator's own; it is never accepted back",
            "{what}"
        );
    }
    // The same kinds of token for another droplet work.
    let (s, b) = app.get("/tasks", &app.token(11, &["read"])).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let registry_reader = rs256(
        &private,
        json!({"droplet_id": 11, "permissions": ["read"], "iss": REGISTRY_ISS, "aud": REGISTRY_AUD, "iat": now, "exp": now + 600}),
    );
    let (s, b) = app.get("/tasks", &registry_reader).await;
    assert_eq!(s, StatusCode::OK, "{b}");

    let (s, b) = app
        .request(
            Method::POST,
            "/token",
            None,
            Some(json!({"droplet_id": 10, "permissions": ["read"]})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(b["detail"][0]["loc"], json!(["body", "droplet_id"]), "{b}");
    let (s, b) = app
        .request(
            Method::POST,
            "/token",
            None,
            Some(json!({"droplet_id": 11, "permissions": ["read"]})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
}

/// `execute_task` and `cancel_task` come only from the orchestrator: `/send` and
/// `/broadcast` refuse to relay them in any form; what they relay names the caller as its
/// source and the orchestrator as the relay.
#[tokio::test]
async fn relays_refuse_orchestrator_commands_and_name_the_caller_as_source() {
    let app = TestApp::spawn().await;
    let d = FixtureDroplet::start(Mode::Accept).await;
    app.register(16, &["x"], &d.endpoint).await;
    let writer = app.token(7, &["read", "write"]);
    let cancel = json!({"command": "cancel_task", "task_id": 1});
    let execute = json!({"command": "execute_task", "task": {"id": 1}});
    let attempts = [
        (
            "/send?target_droplet_id=16",
            writer.clone(),
            Some(cancel.clone()),
        ),
        (
            "/send?target_droplet_id=16",
            writer.clone(),
            Some(execute.clone()),
        ),
        (
            "/send?target_droplet_id=16",
            writer.clone(),
            Some(envelope(cancel.clone())),
        ),
        (
            "/send?target_droplet_id=16&payload=%7B%22command%22%3A%22execute_task%22%7D",
            writer.clone(),
            None,
        ),
        ("/broadcast", app.admin(), Some(cancel.clone())),
    ];
    for (path, token, body) in attempts {
        let (s, b) = app.request(Method::POST, path, Some(&token), body).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{path}: {b}");
        assert!(
            b["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("cannot be relayed"),
            "{b}"
        );
    }
    assert!(d.received().is_empty(), "{:?}", d.received());

    // A relayed message: from the caller, relayed by 10 (whatever the caller claimed).
    let (s, b) = app
        .request(
            Method::POST,
            "/send?target_droplet_id=16",
            Some(&writer),
            Some(json!({"command": "create_report", "relayed_by": 99})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let got = d.received().pop().unwrap();
    assert_eq!(got.body["source"], 7);
    assert_eq!(got.body["target"], 16);
    assert_eq!(
        got.body["payload"],
        json!({"command": "create_report", "relayed_by": 10})
    );
    // A broadcast too: from the admin who sent it (droplet 1), relayed by 10.
    let (s, b) = app
        .request(
            Method::POST,
            "/broadcast",
            Some(&app.admin()),
            Some(json!({"command": "announce", "relayed_by": 99})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let got = d.received().pop().unwrap();
    assert_eq!(got.body["source"], 1, "{}", got.body);
    assert_eq!(got.body["target"], 16, "{}", got.body);
    assert_eq!(
        got.body["payload"],
        json!({"command": "announce", "relayed_by": 10})
    );
}

/// A port that answers something other than HTTP, then closes.
async fn non_http_endpoint() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let _ = socket
                .write_all(b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n")
                .await;
            let _ = socket.shutdown().await;
        }
    });
    format!("http://{addr}")
}

/// Delivery failures say what happened in a word, never the transport's text: an open
/// non-HTTP port and a closed one look the same (`/send` is no port scanner).
#[tokio::test]
async fn delivery_failures_are_reported_without_the_transports_text() {
    let app = TestApp::spawn_with(&[("DISPATCH_TIMEOUT_SECONDS", "1")]).await;
    let failing = FixtureDroplet::start(Mode::Fail).await;
    let refusing = FixtureDroplet::start(Mode::Refuse).await;
    let silent = FixtureDroplet::silent().await;
    app.register(21, &["x"], &non_http_endpoint().await).await;
    app.register(22, &["x"], &dead_endpoint()).await;
    app.register(23, &["x"], &failing.endpoint).await;
    app.register(24, &["x"], &refusing.endpoint).await;
    app.register(25, &["x"], &silent.endpoint).await;
    let expected = [
        (21, "unreachable"),
        (22, "unreachable"),
        (23, "HTTP 503"),
        (24, "refused with HTTP 422"),
        (25, "no answer within 1 s"),
    ];
    for (id, why) in expected {
        send_fails(&app, id, why).await;
    }
    // The broadcast says the same, per droplet.
    let (s, b) = app
        .request(
            Method::POST,
            "/broadcast",
            Some(&app.admin()),
            Some(json!({"hello": "all"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let reasons: Vec<(i64, String)> = b["payload"]["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["droplet_id"].as_i64().unwrap(),
                r["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        expected
            .iter()
            .map(|(id, why)| (*id as i64, why.to_string()))
            .collect::<Vec<_>>()
    );
}

/// Endpoints are URLs of a plain shape: no credentials, query or fragment.
#[tokio::test]
async fn endpoints_of_the_wrong_shape_are_refused_at_registration() {
    let app = TestApp::spawn().await;
    for bad in [
        "ftp://127.0.0.1:21",
        "http://user:secret@127.0.0.1:8000",
        "http://127.0.0.1:8000/?next=http://evil",
        "http://127.0.0.1:8000/#fragment",
        "not a url",
    ] {
        let (s, b) = app
            .post(
                "/droplets/register",
                &app.token(17, &["read", "write"]),
                json!({"droplet_id": 17, "name": "shape", "endpoint": bad, "capabilities": []}),
            )
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {b}");
        assert_eq!(
            b["detail"][0]["loc"],
            json!(["body", "payload", "endpoint"]),
            "{bad}: {b}"
        );
    }
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM droplets")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(count, 0);
    // Development delivers to loopback (the tour and the simulator run there).
    app.register(17, &["x"], "http://127.0.0.1:8000/api").await;
}

/// In production the database port, the metadata service and the like are no endpoints:
/// literals are refused at registration, names at each delivery (handled as a refusal).
#[tokio::test]
async fn production_refuses_loopback_link_local_and_names_that_resolve_there() {
    let app =
        TestApp::spawn_with(&[("ENVIRONMENT", "production"), ("TASK_ROUTER_INTERVAL", "1")]).await;
    for bad in [
        "http://127.0.0.1:5432",
        "http://[::1]:8000",
        "http://169.254.169.254/latest/meta-data",
        "http://[fe80::1]:80",
        "http://0.0.0.0:8000",
        "http://224.0.0.1:80",
        // Loopback inside IPv6 (finding 5 of issue 24): NAT64, 6to4, IPv4-compatible, mapped.
        "http://[64:ff9b::7f00:1]:5432",
        "http://[2002:7f00:1::]:8000",
        "http://[::127.0.0.1]:8000",
        "http://[::ffff:127.0.0.1]:8000",
        "http://[64:ff9b::a9fe:a9fe]/latest/meta-data",
    ] {
        let (s, b) = app
            .post(
                "/droplets/register",
                &app.token(41, &["read", "write"]),
                json!({"droplet_id": 41, "name": "inside", "endpoint": bad, "capabilities": ["x"]}),
            )
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {b}");
        assert_eq!(
            b["detail"][0]["loc"],
            json!(["body", "payload", "endpoint"]),
            "{bad}: {b}"
        );
    }
    // A name is accepted, and refused at delivery when it resolves to loopback.
    let d = FixtureDroplet::start(Mode::Accept).await;
    app.register(41, &["x"], &format!("http://localhost:{}", d.port))
        .await;
    let id = app
        .create_task(5, task_for("x", json!({"max_retries": 0})))
        .await;
    eventually(SOON, "the blocked task failed", || async {
        (app.task_status(id).await == "failed").then_some(())
    })
    .await;
    let task = app.task(id).await;
    assert!(
        task["error_message"]
            .as_str()
            .is_some_and(|e| e.contains("endpoint not allowed")),
        "{task}"
    );
    send_fails(&app, 41, "endpoint not allowed").await;
    assert!(d.received().is_empty(), "{:?}", d.received());
}

/// ENDPOINT_ALLOWED_NETWORKS, when set, is the only set allowed (here: loopback in production).
#[tokio::test]
async fn production_delivers_only_into_the_allowed_networks_when_they_are_set() {
    let app = TestApp::spawn_with(&[
        ("ENVIRONMENT", "production"),
        ("ENDPOINT_ALLOWED_NETWORKS", "127.0.0.1/32"),
        ("TASK_ROUTER_INTERVAL", "1"),
    ])
    .await;
    let d = FixtureDroplet::start(Mode::Accept).await;
    let (s, b) = app
        .post(
            "/droplets/register",
            &app.token(43, &["read", "write"]),
            json!({"droplet_id": 43, "name": "v6", "endpoint": format!("http://[::1]:{}", d.port), "capabilities": ["x"]}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    app.register(43, &["x"], &d.endpoint).await;
    let id = app.create_task(5, task_for("x", json!({}))).await;
    let got = execute_of(&d, id).await;
    assert_eq!(got.answered, 200);
    assert_eq!(app.holder(id).await, ("assigned".to_string(), Some(43)));
}

/// A redirect is never followed (it would carry the orchestrator's token elsewhere): it is
/// a refusal.
#[tokio::test]
async fn a_redirecting_droplet_is_not_followed() {
    let app = TestApp::spawn_with(&[("TASK_ROUTER_INTERVAL", "1")]).await;
    a_redirect_is_refused(&app).await;
}

/// In production, with the redirect's target inside the allowed networks, still no redirect.
#[tokio::test]
async fn a_redirecting_droplet_is_not_followed_in_production() {
    let app = TestApp::spawn_with(&[
        ("ENVIRONMENT", "production"),
        ("ENDPOINT_ALLOWED_NETWORKS", "127.0.0.1/32"),
        ("TASK_ROUTER_INTERVAL", "1"),
    ])
    .await;
    a_redirect_is_refused(&app).await;
}

async fn a_redirect_is_refused(app: &TestApp) {
    let elsewhere = FixtureDroplet::start(Mode::Accept).await;
    let redirecting =
        FixtureDroplet::start(Mode::Redirect(format!("{}/message", elsewhere.endpoint))).await;
    app.register(44, &["x"], &redirecting.endpoint).await;
    let id = app
        .create_task(5, task_for("x", json!({"max_retries": 0})))
        .await;
    let got = execute_of(&redirecting, id).await;
    assert_eq!(got.answered, 307);
    eventually(SOON, "the refused task failed", || async {
        (app.task_status(id).await == "failed").then_some(())
    })
    .await;
    let history = history_with_attempts(app, id).await;
    let last = history.last().unwrap();
    assert_eq!(
        (last.1.as_str(), last.2.as_deref()),
        ("failed", Some("system"))
    );
    assert!(
        last.3
            .as_deref()
            .is_some_and(|r| r.contains("refused with HTTP 307")),
        "{last:?}"
    );
    send_fails(app, 44, "refused with HTTP 307").await;
    assert!(redirecting.received().iter().all(|r| r.answered == 307));
    assert!(
        elsewhere.received().is_empty(),
        "{:?}",
        elsewhere.received()
    );
}

/// A listing of 100 tasks whose payloads are 0.9 MB each stays small: payloads only on
/// request, and then at most 2 MiB of them.
#[tokio::test]
async fn a_listing_of_large_tasks_stays_under_five_megabytes() {
    let app = TestApp::spawn().await;
    let blob = "x".repeat(900_000);
    let first = app
        .create_task(
            5,
            json!({"task_type": "big", "title": "big", "payload": {"blob": blob}}),
        )
        .await;
    sqlx::query(
        "INSERT INTO tasks (task_type, title, payload, status, created_by)
         SELECT 'big', 'big ' || g, jsonb_build_object('blob', repeat('x', 900000)), 'pending', '5'
         FROM generate_series(1, 99) g",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let admin = app.admin();

    let (s, b, size) = raw(&app, Method::GET, "/tasks?limit=100", &admin, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(size < 5_000_000, "{size} bytes");
    let tasks = b["payload"]["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 100);
    assert!(tasks
        .iter()
        .all(|t| t.get("payload").is_none() && t.get("result").is_none()));
    assert_eq!(b["payload"]["payload_truncated"], false);

    let (s, b, size) = raw(
        &app,
        Method::GET,
        "/tasks?limit=100&include=payload",
        &admin,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(size < 5_000_000, "{size} bytes");
    assert_eq!(b["payload"]["payload_truncated"], true);
    let tasks = b["payload"]["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 100);
    let with: Vec<&Value> = tasks
        .iter()
        .filter(|t| t.get("payload").is_some())
        .collect();
    assert_eq!(with.len(), 2, "2 x 0.9 MB fit in 2 MiB");
    assert!(with
        .iter()
        .all(|t| t["payload"]["blob"].as_str().map(str::len) == Some(900_000)));
    let without = tasks
        .iter()
        .filter(|t| t.get("payload").is_none() && t["payload_truncated"] == true)
        .count();
    assert_eq!(without, 98);

    // The task itself still has all of it.
    let task = app.task(first).await;
    assert_eq!(
        task["payload"]["blob"].as_str().map(str::len),
        Some(900_000)
    );
}

/// A droplet that accepts connections and never answers holds at most its own slots: another
/// droplet's delivery is not delayed.
#[tokio::test]
async fn a_silent_droplet_does_not_delay_another_droplets_delivery() {
    // Deliveries to the silent droplet hang for the whole test (no timeout frees a slot).
    let app = TestApp::spawn_with(&[
        ("TASK_ROUTER_INTERVAL", "1"),
        ("DISPATCH_TIMEOUT_SECONDS", "30"),
    ])
    .await;
    let silent = FixtureDroplet::silent().await;
    let fast = FixtureDroplet::start(Mode::Accept).await;
    app.register_max(51, &["slow"], &silent.endpoint, 1000)
        .await;
    app.register(52, &["fast"], &fast.endpoint).await;
    app.insert_pending(200, Some("slow"), 5).await;
    eventually(
        SOON,
        "200 tasks assigned to the silent droplet, 4 deliveries hanging",
        || async {
            let assigned: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM tasks t JOIN droplets d ON d.id = t.assigned_droplet_id
             WHERE d.droplet_id = 51 AND t.status = 'assigned'",
            )
            .fetch_one(&app.db)
            .await
            .unwrap();
            (assigned == 200 && silent.open.load(std::sync::atomic::Ordering::SeqCst) == 4)
                .then_some(())
        },
    )
    .await;

    let started = Instant::now();
    let id = app.create_task(5, task_for("fast", json!({}))).await;
    // Well under the 30 s a delivery waiting behind the silent droplet's would take, with
    // room for a loaded machine.
    eventually(
        Duration::from_secs(10),
        "the other droplet's delivery within 10 s",
        || async { fast.executed().contains(&(id as i64)).then_some(()) },
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(10));
    let most = silent.most_open.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(most, 4, "DISPATCH_PER_DROPLET_CONCURRENCY is 4");
}

// ---------------------------------------------------------------------------
// The smaller items.

#[tokio::test]
async fn deadlines_out_of_range_are_422_and_offsets_without_colons_are_understood() {
    let app = TestApp::spawn().await;
    let writer = app.token(5, &["read", "write"]);
    let (s, b) = app
        .post(
            "/tasks",
            &writer,
            json!({"task_type": "t", "title": "t", "deadline": "-9999-01-01T00:00:00"}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(
        b["detail"][0]["loc"],
        json!(["body", "payload", "deadline"])
    );

    let id = app
        .create_task(
            5,
            json!({"task_type": "t", "title": "t", "deadline": "2030-01-01T12:00:00+0500"}),
        )
        .await;
    let stored: chrono::NaiveDateTime =
        sqlx::query_scalar("SELECT deadline FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(stored.to_string(), "2030-01-01 07:00:00");
    let shown = app.task(id).await["deadline"].as_str().unwrap().to_string();
    assert!(
        shown.starts_with("2030-01-01T07:00:00") && shown.ends_with('Z'),
        "{shown}"
    );
}

#[tokio::test]
async fn permission_is_checked_before_the_body_and_existence_before_ownership() {
    let app = TestApp::spawn().await;
    let id = app.create_task(5, task_payload("exists")).await;
    let reader = app.token(5, &["read"]);
    let writer = app.token(5, &["read", "write"]);
    // With the permission, a bad body is a 422 once the resource exists and the caller may
    // act on it; the task is assigned to no droplet, so its PATCH is 403 (contract_order.rs).
    for (method, path, with_write) in [
        (
            Method::POST,
            "/tasks".to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (Method::PATCH, format!("/tasks/{id}"), StatusCode::FORBIDDEN),
        (
            Method::POST,
            "/droplets/register".to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ] {
        let (s, b, _) = raw(
            &app,
            method.clone(),
            &path,
            &reader,
            Some("{not json".into()),
        )
        .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{method} {path}: {b}");
        let (s, b, _) = raw(
            &app,
            method.clone(),
            &path,
            &writer,
            Some("{not json".into()),
        )
        .await;
        assert_eq!(s, with_write, "{method} {path}: {b}");
    }
    // A heartbeat for an unknown droplet is 404 whoever sends it; for another's droplet, 403.
    let (s, b) = app
        .post(
            "/droplets/999/heartbeat",
            &writer,
            json!({"status": "active"}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert_eq!(b["detail"], "Droplet 999 not found");
    app.register(6, &["x"], "http://127.0.0.1:9").await;
    let (s, b) = app
        .post(
            "/droplets/6/heartbeat",
            &writer,
            json!({"status": "active"}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
}

#[tokio::test]
async fn heartbeat_metrics_and_capability_lists_are_bounded() {
    let app = TestApp::spawn().await;
    let me = app.token(8, &["read", "write"]);
    let many: Vec<String> = (0..101).map(|i| format!("cap-{i}")).collect();
    let (s, b) = app
        .post(
            "/droplets/register",
            &me,
            json!({"droplet_id": 8, "name": "n", "endpoint": "http://127.0.0.1:9", "capabilities": many}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(
        b["detail"][0]["loc"],
        json!(["body", "payload", "capabilities"])
    );
    // Each capability is up to 100 characters.
    let (s, b) = app
        .post(
            "/droplets/register",
            &me,
            json!({"droplet_id": 8, "name": "n", "endpoint": "http://127.0.0.1:9", "capabilities": ["x".repeat(101)]}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(
        b["detail"][0]["loc"],
        json!(["body", "payload", "capabilities"])
    );
    let mut hundred: Vec<String> = (0..99).map(|i| format!("cap-{i}")).collect();
    hundred.push("y".repeat(100));
    let (s, b) = app
        .post(
            "/droplets/register",
            &me,
            json!({"droplet_id": 8, "name": "n", "endpoint": "http://127.0.0.1:9", "capabilities": hundred}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");

    let (s, b) = app
        .post(
            "/droplets/8/heartbeat",
            &me,
            json!({"status": "active", "metrics": {"blob": "x".repeat(16 * 1024)}}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(b["detail"][0]["loc"], json!(["body", "payload", "metrics"]));
    let (s, b) = app
        .post(
            "/droplets/8/heartbeat",
            &me,
            json!({"status": "active", "metrics": {"blob": "x".repeat(16 * 1024 - 100)}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let beats: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM heartbeats")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(beats, 1, "the refused heartbeat wrote nothing");
}

// ---------------------------------------------------------------------------
// Issue 17: fencing by attempt.

/// Droplet A is assigned the task (attempt 1), does not start it in time, and gets it again
/// (attempt 2, the only droplet able to run it). Its late completion of attempt 1 is refused
/// and changes nothing; attempt 2 runs to completion. The assignment timeout (4 s) leaves a
/// stalled test runner time to start attempt 2 before a third attempt could begin.
#[tokio::test]
async fn a_late_update_for_an_earlier_attempt_on_the_same_droplet_is_refused() {
    let app = TestApp::spawn_with(&[
        ("ASSIGNMENT_TIMEOUT_SECONDS", "4"),
        ("TASK_ROUTER_INTERVAL", "1"),
        ("RETRY_BACKOFF_SECONDS", "0"),
    ])
    .await;
    let a = FixtureDroplet::start(Mode::Accept).await;
    app.register(61, &["fence"], &a.endpoint).await;
    let me = app.token(61, &["read", "write"]);
    let id = app.create_task(5, task_for("fence", json!({}))).await;

    let first = execute_of(&a, id).await;
    assert_eq!(first.body["payload"]["task"]["attempt"], 1);
    // Requeued after 4 s, on the next maintenance round (every second).
    let second = eventually(
        Duration::from_secs(20),
        "attempt 2 sent to the same droplet",
        || async {
            a.commands("execute_task").into_iter().find(|r| {
                r.body["payload"]["task"]["id"] == id && r.body["payload"]["task"]["attempt"] == 2
            })
        },
    )
    .await;
    assert_eq!(second.body["payload"]["task"]["assigned_droplet_id"], 61);
    // Started at once (within the 4 s before it would time out again).
    let (s, b) = app
        .patch(
            &format!("/tasks/{id}"),
            &me,
            json!({"status": "in_progress", "attempt": 2}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");

    let before = history_with_attempts(&app, id).await;
    let (s, b) = app
        .patch(
            &format!("/tasks/{id}"),
            &me,
            json!({"status": "completed", "attempt": 1, "result": {"late": true}}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    assert_eq!(
        b["detail"],
        format!("Task {id} is on attempt 2; this update is for attempt 1")
    );
    let task = app.task(id).await;
    assert_eq!(task["status"], "in_progress");
    assert_eq!(task["attempt"], 2);
    assert_eq!(task["result"], Value::Null);
    assert_eq!(history_with_attempts(&app, id).await, before);

    let (s, b) = app
        .patch(
            &format!("/tasks/{id}"),
            &me,
            json!({"status": "completed", "attempt": 2, "result": {"ok": true}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = app.get(&format!("/tasks/{id}"), &app.admin()).await;
    assert_eq!(s, StatusCode::OK);
    let task = &b["payload"]["task"];
    assert_eq!(task["status"], "completed");
    assert_eq!(task["attempt"], 2);
    assert_eq!(task["result"], json!({"ok": true}));
    let shown: Vec<i64> = task["state_history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            h["attempt"]
                .as_i64()
                .expect("each history row has its attempt")
        })
        .collect();
    assert_eq!(shown, [0, 1, 1, 2, 2, 2]);
    let history = history_with_attempts(&app, id).await;
    let steps: Vec<(Option<&str>, &str, i32)> = history
        .iter()
        .map(|h| (h.0.as_deref(), h.1.as_str(), h.4))
        .collect();
    assert_eq!(
        steps,
        [
            (None, "pending", 0),
            (Some("pending"), "assigned", 1),
            (Some("assigned"), "pending", 1),
            (Some("pending"), "assigned", 2),
            (Some("assigned"), "in_progress", 2),
            (Some("in_progress"), "completed", 2),
        ]
    );
    assert!(history[2]
        .3
        .as_deref()
        .is_some_and(|r| r.contains("not started within 4 s")));
    // The requeue told A to drop attempt 1.
    let cancels = eventually(SOON, "cancel_task of attempt 1", || async {
        Some(a.commands("cancel_task")).filter(|c| !c.is_empty())
    })
    .await;
    assert_eq!(cancels.len(), 1, "{cancels:?}");
    assert_eq!(
        (
            &cancels[0].body["payload"]["task_id"],
            &cancels[0].body["payload"]["attempt"]
        ),
        (&json!(id), &json!(1))
    );
    // Lists show the attempt too.
    let (_, b) = app.get("/tasks?limit=10", &app.admin()).await;
    assert_eq!(b["payload"]["tasks"][0]["attempt"], 2, "{b}");
    // Without an attempt the old rules hold: a finished task does not move.
    let (s, _) = app
        .patch(&format!("/tasks/{id}"), &me, json!({"status": "failed"}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
}

/// `/send` of a bare message to droplet `id` is a 502 that says why in a word.
async fn send_fails(app: &TestApp, id: i32, why: &str) {
    let (s, b) = app
        .request(
            Method::POST,
            &format!("/send?target_droplet_id={id}"),
            Some(&app.token(5, &["read", "write"])),
            Some(json!({"hello": id})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{id}: {b}");
    assert_eq!(
        b["detail"],
        format!("Delivery to droplet {id} failed: {why}"),
        "{id}"
    );
}

/// A POST with a bare JSON body (no envelope), as droplet-2 sends its registration and
/// heartbeats.
pub(crate) async fn post_bare(
    app: &TestApp,
    path: &str,
    token: &str,
    body: Value,
) -> (StatusCode, Value) {
    app.request(Method::POST, path, Some(token), Some(body))
        .await
}
