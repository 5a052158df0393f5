//! The event log behind `/ws/tasks` and `/ws/droplets`: every event carries its `event_id`,
//! a client resumes with `?after=<event_id>` without gap or duplicate (or is told to resync),
//! events are written with the change that made them (durable with its commit, gone with its
//! rollback) and reach the clients of every replica once, in each task's order.

use std::collections::HashMap;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use orchestrator::services::events::{Event, TaskEventKind};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::postgres::PgListener;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

use crate::helpers::*;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const WAIT: Duration = Duration::from_secs(10);

fn feed_url(app: &TestApp, feed: &str, query: &str) -> String {
    let token = app.token(5, &["read"]);
    format!("ws://{}/ws/{feed}?token={token}{query}", app.addr)
}

/// A read-only client of `feed` (`query` starts with `&`).
async fn connect(app: &TestApp, feed: &str, query: &str) -> Ws {
    let (ws, response) = connect_async(feed_url(app, feed, query))
        .await
        .unwrap_or_else(|e| panic!("connect to /ws/{feed}{query}: {e}"));
    assert_eq!(response.status().as_u16(), 101);
    ws
}

async fn listening(app: &TestApp) {
    eventually(WAIT, "the event reader is connected", || async {
        (stats(app)["listener"]["connected"] == true).then_some(())
    })
    .await;
}

/// The next text frame as JSON, or None when none comes `within` (pings are answered by
/// tungstenite while reading; a close or an error fails the test).
async fn next_frame(ws: &mut Ws, within: Duration) -> Option<Value> {
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
    tokio::time::timeout(within, read).await.ok()
}

async fn next_event(ws: &mut Ws) -> Value {
    next_frame(ws, WAIT).await.expect("an event in time")
}

/// Every frame up to and including the first one `last` matches.
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

/// The frames that arrive within `d`.
async fn frames_within(ws: &mut Ws, d: Duration) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + d;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return seen;
        }
        match next_frame(ws, left).await {
            Some(f) => seen.push(f),
            None => return seen,
        }
    }
}

fn name(e: &Value) -> &str {
    e["payload"]["event"].as_str().unwrap_or("")
}

fn task_id(e: &Value) -> i64 {
    e["payload"]["task"]["id"].as_i64().unwrap_or(-1)
}

/// The frame's `payload.event_id`, which must be a positive integer.
fn event_id(e: &Value) -> i64 {
    e["payload"]["event_id"]
        .as_i64()
        .filter(|id| *id > 0)
        .unwrap_or_else(|| panic!("no integer payload.event_id in {e}"))
}

/// `(event_id, event, task id)` of each frame.
fn summary(events: &[Value]) -> Vec<(i64, String, i64)> {
    events
        .iter()
        .map(|e| (event_id(e), name(e).to_string(), task_id(e)))
        .collect()
}

fn assert_growing(events: &[Value], what: &str) {
    let ids: Vec<i64> = events.iter().map(event_id).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "{what}: event ids do not grow strictly: {ids:?}"
    );
}

fn is_created(id: i64) -> impl Fn(&Value) -> bool {
    move |e| name(e) == "task_created" && task_id(e) == id
}

/// The log of a feed after `after`, as `(event_id, event, task id)`.
async fn log_after(app: &TestApp, feed: &str, after: i64) -> Vec<(i64, String, i64)> {
    let rows: Vec<(i64, Value)> = sqlx::query_as(
        "SELECT event_id, envelope FROM events WHERE feed = $1 AND event_id > $2 ORDER BY event_id",
    )
    .bind(feed)
    .bind(after)
    .fetch_all(&app.db)
    .await
    .expect("events rows");
    rows.into_iter()
        .map(|(id, e)| {
            assert_eq!(
                e["payload"]["event_id"], id,
                "the stored envelope carries its own event_id"
            );
            (id, name(&e).to_string(), task_id(&e))
        })
        .collect()
}

/// A task no droplet can take (only `task_created`, and `task_cancelled` if cancelled).
async fn idle_task(app: &TestApp, title: &str) -> i64 {
    app.create_task(
        5,
        json!({"task_type": "verify", "title": title, "required_capability": "nobody-has-this"}),
    )
    .await as i64
}

async fn cancel(app: &TestApp, id: i64) {
    let (s, b) = app
        .delete(&format!("/tasks/{id}"), &app.token(5, &["read", "write"]))
        .await;
    assert_eq!(s, StatusCode::OK, "cancel {id}: {b}");
}

/// Creates a task over plain HTTP (for writers running in tasks of their own).
async fn create_over(client: &reqwest::Client, url: &str, token: &str, body: Value) -> i64 {
    let resp = client
        .post(url)
        .bearer_auth(token)
        .json(&envelope(body))
        .send()
        .await
        .expect("create sent");
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("json body");
    assert_eq!(status, 201, "create: {body}");
    body["payload"]["task_id"].as_i64().expect("task_id")
}

/// An envelope of a task event no app made, for rows written straight into the outbox.
fn foreign_task_event(id: i64, title: &str) -> Value {
    let event = Event::task(
        TaskEventKind::TaskCreated,
        None,
        json!({"id": id, "task_type": "verify", "title": title, "status": "pending"}),
        None,
    );
    serde_json::from_str(&event.envelope).expect("an event's JSON")
}

async fn insert_outbox(conn: &mut sqlx::PgConnection, envelope: &Value) {
    sqlx::query("INSERT INTO event_outbox (feed, envelope) VALUES ('tasks', $1)")
        .bind(envelope)
        .execute(conn)
        .await
        .expect("outbox row");
}

#[tokio::test]
async fn every_event_carries_an_event_id_that_grows_within_its_feed() {
    let app = TestApp::spawn().await;
    listening(&app).await;
    let mut tasks = connect(&app, "tasks", "").await;
    let mut droplets = connect(&app, "droplets", "").await;
    let mut cancelled = connect(&app, "tasks", "&status=cancelled").await;

    app.register(8, &["eight"], &dead_endpoint()).await;
    let t1 = idle_task(&app, "t1").await;
    app.register(9, &["nine"], &dead_endpoint()).await;
    let t2 = idle_task(&app, "t2").await;
    cancel(&app, t1).await;
    let t3 = idle_task(&app, "t3").await;
    cancel(&app, t3).await;
    let last = idle_task(&app, "last").await;

    let seen = events_until(&mut tasks, is_created(last)).await;
    assert_growing(&seen, "tasks feed");
    let names: Vec<(String, i64)> = summary(&seen).into_iter().map(|(_, n, t)| (n, t)).collect();
    let c = |n: &str, t: i64| (n.to_string(), t);
    assert_eq!(
        names,
        vec![
            c("task_created", t1),
            c("task_created", t2),
            c("task_cancelled", t1),
            c("task_created", t3),
            c("task_cancelled", t3),
            c("task_created", last),
        ]
    );
    assert_eq!(
        summary(&seen),
        log_after(&app, "tasks", 0).await,
        "the client saw the log of its feed, ids included"
    );

    let seen = events_until(&mut droplets, |e| {
        name(e) == "droplet_registered" && e["payload"]["droplet"]["droplet_id"] == 9
    })
    .await;
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_growing(&seen, "droplets feed");
    let logged: Vec<i64> = log_after(&app, "droplets", 0)
        .await
        .into_iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(seen.iter().map(event_id).collect::<Vec<_>>(), logged);

    let seen = events_until(&mut cancelled, |e| task_id(e) == t3).await;
    assert_growing(&seen, "a filtered client");
    assert_eq!(
        seen.iter()
            .map(|e| (name(e).to_string(), task_id(e)))
            .collect::<Vec<_>>(),
        vec![c("task_cancelled", t1), c("task_cancelled", t3)]
    );
}

#[tokio::test]
async fn a_resumed_client_gets_exactly_what_it_missed_then_live_events() {
    let app = TestApp::spawn().await;
    listening(&app).await;
    let mut stayed = connect(&app, "tasks", "").await;
    let mut leaver = connect(&app, "tasks", "").await;

    let t1 = idle_task(&app, "t1").await;
    let t2 = idle_task(&app, "t2").await;
    cancel(&app, t1).await;
    let before = events_until(&mut leaver, |e| {
        name(e) == "task_cancelled" && task_id(e) == t1
    })
    .await;
    assert_eq!(before.len(), 3, "{before:?}");
    let last_seen = event_id(&before[2]);
    leaver.close(None).await.expect("close");
    drop(leaver);

    // What happens while the client is away.
    let t3 = idle_task(&app, "t3").await;
    cancel(&app, t2).await;
    let t4 = idle_task(&app, "t4").await;
    cancel(&app, t3).await;
    let m1 = idle_task(&app, "m1").await;

    let mut back = connect(&app, "tasks", &format!("&after={last_seen}")).await;
    let missed = events_until(&mut back, is_created(m1)).await;
    let c = |n: &str, t: i64| (n.to_string(), t);
    assert_eq!(
        missed
            .iter()
            .map(|e| (name(e).to_string(), task_id(e)))
            .collect::<Vec<_>>(),
        vec![
            c("task_created", t3),
            c("task_cancelled", t2),
            c("task_created", t4),
            c("task_cancelled", t3),
            c("task_created", m1),
        ],
        "exactly the missed events, in order"
    );
    assert!(event_id(&missed[0]) > last_seen);
    assert_growing(&missed, "resumed client");
    let stayed_seen = events_until(&mut stayed, is_created(m1)).await;
    let stayed_after: Vec<_> = summary(&stayed_seen)
        .into_iter()
        .filter(|r| r.0 > last_seen)
        .collect();
    assert_eq!(
        summary(&missed),
        stayed_after,
        "the same as a client that stayed connected"
    );
    assert_eq!(summary(&missed), log_after(&app, "tasks", last_seen).await);

    // Then live events, without a duplicate of the replayed ones.
    let m2 = idle_task(&app, "m2").await;
    let live = next_event(&mut back).await;
    assert_eq!(
        (name(&live), task_id(&live)),
        ("task_created", m2),
        "{live}"
    );
    assert!(event_id(&live) > event_id(missed.last().unwrap()));
    assert_eq!(
        event_id(&next_event(&mut stayed).await),
        event_id(&live),
        "the same id on every client"
    );
    let extra = frames_within(&mut back, Duration::from_millis(700)).await;
    assert!(extra.is_empty(), "nothing more: {extra:?}");

    // Two clients resuming from one id get the same events, ids and order.
    let mut r1 = connect(&app, "tasks", &format!("&after={last_seen}")).await;
    let mut r2 = connect(&app, "tasks", &format!("&after={last_seen}")).await;
    let s1 = summary(&events_until(&mut r1, is_created(m2)).await);
    let s2 = summary(&events_until(&mut r2, is_created(m2)).await);
    assert_eq!(s1, s2);
    let mut expected = summary(&missed);
    expected.push((event_id(&live), "task_created".into(), m2));
    assert_eq!(s1, expected);

    // A filtered client resuming gets only its matches, from the log then live.
    let mut only_cancelled = connect(
        &app,
        "tasks",
        &format!("&status=cancelled&after={last_seen}"),
    )
    .await;
    let t5 = idle_task(&app, "t5").await;
    cancel(&app, t5).await;
    let got = events_until(&mut only_cancelled, |e| task_id(e) == t5).await;
    assert_growing(&got, "filtered resumed client");
    assert_eq!(
        got.iter()
            .map(|e| (name(e).to_string(), task_id(e)))
            .collect::<Vec<_>>(),
        vec![
            c("task_cancelled", t2),
            c("task_cancelled", t3),
            c("task_cancelled", t5)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resuming_while_writers_are_busy_leaves_no_gap_and_no_duplicate_at_the_seam() {
    let app = TestApp::spawn().await;
    listening(&app).await;
    for i in 0..3 {
        idle_task(&app, &format!("before {i}")).await;
    }
    let start: i64 = eventually(WAIT, "three events in the log", || async {
        let (n, max): (i64, Option<i64>) =
            sqlx::query_as("SELECT COUNT(*), MAX(event_id) FROM events WHERE feed = 'tasks'")
                .fetch_one(&app.db)
                .await
                .ok()?;
        max.filter(|_| n == 3)
    })
    .await;

    // Four writers create tasks while clients resume from `start` at different moments.
    let mut writers = Vec::new();
    for w in 0..4 {
        let client = app.client.clone();
        let url = app.url("/tasks");
        let token = app.token(5, &["read", "write"]);
        writers.push(tokio::spawn(async move {
            for i in 0..25 {
                create_over(
                    &client,
                    &url,
                    &token,
                    json!({"task_type": "verify", "title": format!("w{w} {i}"), "required_capability": "nobody-has-this"}),
                )
                .await;
            }
        }));
    }
    let mut resumed = Vec::new();
    for _ in 0..4 {
        resumed.push(connect(&app, "tasks", &format!("&after={start}")).await);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    for w in writers {
        tokio::time::timeout(Duration::from_secs(60), w)
            .await
            .expect("writers done in time")
            .expect("writer");
    }
    let end = idle_task(&app, "end").await;
    let log = eventually(WAIT, "the end marker in the log", || async {
        let log = log_after(&app, "tasks", start).await;
        (log.last().map(|r| r.2) == Some(end)).then_some(log)
    })
    .await;
    assert_eq!(log.len(), 101, "100 creations and the end marker");
    for (i, ws) in resumed.iter_mut().enumerate() {
        let seen = events_until(ws, is_created(end)).await;
        assert_eq!(
            summary(&seen),
            log,
            "resumed client {i}: every event after {start} once, in order"
        );
    }
}

#[tokio::test]
async fn resuming_from_before_the_kept_log_starts_with_resync_required() {
    let app = TestApp::spawn_with(&[("EVENT_RETENTION_SECONDS", "10")]).await;
    listening(&app).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(idle_task(&app, &format!("t{i}")).await);
    }
    let log = eventually(WAIT, "five events in the log", || async {
        let log = log_after(&app, "tasks", 0).await;
        (log.len() == 5).then_some(log)
    })
    .await;
    let e: Vec<i64> = log.iter().map(|r| r.0).collect();
    trim_through(&app, e[2]).await;

    let status = {
        let (s, body) = app.get("/ws/status", &app.token(5, &["read"])).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        body["payload"]["retained_events"].clone()
    };
    assert_eq!(status["oldest_event_id"], e[3], "{status}");
    assert_eq!(status["newest_event_id"], e[4], "{status}");
    assert_eq!(status["retention_seconds"], 10, "{status}");

    for after in [e[0], e[1]] {
        let mut ws = connect(&app, "tasks", &format!("&after={after}")).await;
        let first = next_event(&mut ws).await;
        assert_eq!(name(&first), "resync_required", "after={after}: {first}");
        assert_eq!(first["payload"]["oldest_event_id"], e[3], "{first}");
        assert_eq!(first["message_type"], "event", "{first}");
        let kept = vec![next_event(&mut ws).await, next_event(&mut ws).await];
        assert_eq!(
            summary(&kept),
            log[3..].to_vec(),
            "then the retained events"
        );
    }
    // Resuming right before the oldest kept event is no gap.
    let mut ws = connect(&app, "tasks", &format!("&after={}", e[2])).await;
    let first = next_event(&mut ws).await;
    assert_eq!(event_id(&first), e[3], "{first}");
    assert_eq!(event_id(&next_event(&mut ws).await), e[4]);
    let t = idle_task(&app, "live").await;
    let live = next_event(&mut ws).await;
    assert_eq!((name(&live), task_id(&live)), ("task_created", t));
    assert!(event_id(&live) > e[4]);

    // The droplets feed is told too.
    let mut ws = connect(&app, "droplets", &format!("&after={}", e[0])).await;
    let first = next_event(&mut ws).await;
    assert_eq!(name(&first), "resync_required", "{first}");

    // A bad `after` is refused before the upgrade.
    for bad in ["-1", "x", "1.5", "99999999999999999999999"] {
        for feed in ["tasks", "droplets"] {
            assert_eq!(
                refused(feed_url(&app, feed, &format!("&after={bad}"))).await,
                422,
                "/ws/{feed}?after={bad}"
            );
        }
    }
    let (s, body) = app
        .request(
            reqwest::Method::GET,
            &format!("/ws/tasks?token={}&after=x", app.token(5, &["read"])),
            None,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body.to_string().contains("after"), "{body}");
}

#[tokio::test]
async fn a_log_trimmed_empty_still_tells_a_resuming_client_to_resync() {
    let app = TestApp::spawn_with(&[("EVENT_RETENTION_SECONDS", "10")]).await;
    listening(&app).await;
    let mut ws = connect(&app, "tasks", "").await;
    let t1 = idle_task(&app, "seen").await;
    let seen = next_event(&mut ws).await;
    assert_eq!(task_id(&seen), t1);
    let last_seen = event_id(&seen);
    drop(ws);
    // Missed by the client, then trimmed away with everything else.
    idle_task(&app, "missed 1").await;
    idle_task(&app, "missed 2").await;
    eventually(
        Duration::from_secs(40),
        "the relay trims the log",
        || async {
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events")
                .fetch_one(&app.db)
                .await
                .ok()?;
            (n == 0).then_some(())
        },
    )
    .await;

    let mut back = connect(&app, "tasks", &format!("&after={last_seen}")).await;
    let first = next_frame(&mut back, Duration::from_secs(3)).await;
    assert!(
        first.as_ref().is_some_and(|f| name(f) == "resync_required"),
        "two events after {last_seen} were trimmed: the client must be told to resync, got {first:?}"
    );
}

#[tokio::test]
async fn a_resume_id_beyond_the_newest_event_does_not_silence_the_client() {
    let app = TestApp::spawn().await;
    listening(&app).await;
    idle_task(&app, "one").await;
    let newest: i64 = eventually(WAIT, "an event in the log", || async {
        sqlx::query_scalar::<_, Option<i64>>("SELECT MAX(event_id) FROM events")
            .fetch_one(&app.db)
            .await
            .ok()
            .flatten()
    })
    .await;
    // An id this log never issued (a dashboard that kept it across a restore of the database).
    let mut ws = connect(&app, "tasks", &format!("&after={}", newest + 1000)).await;
    let t = idle_task(&app, "after the resume").await;
    let frames = frames_within(&mut ws, Duration::from_secs(3)).await;
    assert!(
        frames
            .iter()
            .any(|f| name(f) == "resync_required" || is_created(t)(f)),
        "a client resuming from an unknown id got neither resync_required nor the live event: {frames:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_tasks_events_arrive_in_its_order_once_under_eight_concurrent_writers() {
    let app = TestApp::spawn_with(&[("TASK_ROUTER_INTERVAL", "1")]).await;
    listening(&app).await;
    let droplet = DropletServer::start(Behaviour::Ok).await;
    app.register_max(8, &["busy"], &droplet.endpoint, 100).await;
    let mut ws = connect(&app, "tasks", "").await;
    let first_id: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(event_id), 0) FROM events")
        .fetch_one(&app.db)
        .await
        .expect("newest id");

    // Eight writers create routed tasks while eight others create and cancel tasks.
    let routed_writers = (0..8).map(|i| {
        let app = &app;
        async move {
            app.create_task(
                5,
                json!({"task_type": "verify", "title": format!("routed {i}"), "required_capability": "busy"}),
            )
            .await as i64
        }
    });
    let cancel_writers = (0..8).map(|i| {
        let app = &app;
        async move {
            let mut ids = Vec::new();
            for j in 0..4 {
                let id = idle_task(app, &format!("cancelled {i}.{j}")).await;
                cancel(app, id).await;
                ids.push(id);
            }
            ids
        }
    });
    let (routed, cancelled) = tokio::join!(
        futures::future::join_all(routed_writers),
        futures::future::join_all(cancel_writers)
    );
    let cancelled: Vec<i64> = cancelled.into_iter().flatten().collect();
    for &id in &routed {
        app.wait_assigned(id as i32, 8, Duration::from_secs(20))
            .await;
    }
    // Eight concurrent PATCH sequences in_progress -> completed.
    futures::future::join_all(routed.iter().map(|&id| {
        let app = &app;
        async move {
            for status in ["in_progress", "completed"] {
                let (s, b) = app.move_task(8, id as i32, status).await;
                assert_eq!(s, StatusCode::OK, "task {id} -> {status}: {b}");
            }
        }
    }))
    .await;
    let end = idle_task(&app, "end").await;

    let seen = events_until(&mut ws, is_created(end)).await;
    assert_growing(&seen, "tasks feed under concurrent writers");
    let mut per_task: HashMap<i64, Vec<String>> = HashMap::new();
    for e in &seen {
        per_task
            .entry(task_id(e))
            .or_default()
            .push(name(e).to_string());
    }
    for id in &routed {
        assert_eq!(
            per_task.remove(id).unwrap_or_default(),
            [
                "task_created",
                "task_assigned",
                "task_started",
                "task_completed"
            ],
            "routed task {id}"
        );
    }
    for id in &cancelled {
        assert_eq!(
            per_task.remove(id).unwrap_or_default(),
            ["task_created", "task_cancelled"],
            "cancelled task {id}"
        );
    }
    assert_eq!(per_task.remove(&end).unwrap_or_default(), ["task_created"]);
    assert!(per_task.is_empty(), "nothing else: {per_task:?}");
    assert_eq!(
        summary(&seen),
        log_after(&app, "tasks", first_id).await,
        "the live client saw the log"
    );

    // A filtered client resuming from before all of it gets the eight completions only.
    let mut completed = connect(
        &app,
        "tasks",
        &format!("&status=completed&after={first_id}"),
    )
    .await;
    let mut got = Vec::new();
    for _ in 0..8 {
        got.push(next_event(&mut completed).await);
    }
    assert_growing(&got, "filtered resumed client");
    assert!(got.iter().all(|e| name(e) == "task_completed"), "{got:?}");
    let mut ids: Vec<i64> = got.iter().map(task_id).collect();
    ids.sort_unstable();
    let mut expected = routed.clone();
    expected.sort_unstable();
    assert_eq!(ids, expected);
    let extra = frames_within(&mut completed, Duration::from_millis(700)).await;
    assert!(extra.is_empty(), "only the completions: {extra:?}");
}

#[tokio::test]
async fn an_event_committed_by_a_replica_that_died_reaches_another_replicas_clients_once() {
    let a = TestApp::spawn().await;
    let b = TestApp::spawn_on(&a.database_url, &[]).await;
    listening(&a).await;
    listening(&b).await;
    let mut on_b = connect(&b, "tasks", "").await;
    let mut verify_on_b = connect(&b, "tasks", "&task_type=verify&status=pending").await;

    // A real event, whose shape the orphan copies.
    let real_task = idle_task(&b, "real").await;
    let real = next_event(&mut on_b).await;
    assert_eq!(task_id(&real), real_task);

    // A writer that committed its change and outbox row, then died before any relay ran: no
    // app process made the row.
    let mut orphan = real.clone();
    orphan["payload"]
        .as_object_mut()
        .unwrap()
        .remove("event_id");
    orphan["payload"]["task"]["id"] = json!(990_001);
    orphan["payload"]["task"]["title"] = json!("committed by a replica that died");
    orphan["trace_id"] = json!(uuid::Uuid::new_v4().to_string());
    let mut tx = b.db.begin().await.expect("begin");
    insert_outbox(&mut tx, &orphan).await;
    tx.commit().await.expect("commit");

    let got = next_event(&mut on_b).await;
    assert_eq!(task_id(&got), 990_001, "{got}");
    assert_eq!(name(&got), "task_created");
    assert!(event_id(&got) > event_id(&real), "{got}");
    assert_eq!(got["trace_id"], orphan["trace_id"]);
    // The row came without what the filters look at (its writer predates them, or wrote it by
    // hand): the relay read it from the envelope, so a filtered client gets it too.
    let filtered = events_until(&mut verify_on_b, is_created(990_001)).await;
    assert_eq!(
        filtered.iter().map(task_id).collect::<Vec<_>>(),
        vec![real_task, 990_001]
    );

    // A task created through replica A, which stops right after its commit.
    let from_a = idle_task(&a, "from A").await;
    a.state.shutdown.cancel();
    let end = idle_task(&b, "end").await;
    let seen = events_until(&mut on_b, is_created(end)).await;
    assert_growing(&seen, "client on B");
    assert_eq!(
        seen.iter()
            .map(|e| (name(e).to_string(), task_id(e)))
            .collect::<Vec<_>>(),
        vec![
            ("task_created".to_string(), from_a),
            ("task_created".to_string(), end)
        ],
        "A's event once, the orphan not again"
    );
    assert!(event_id(&seen[0]) > event_id(&got));

    // A client resuming on B from the real event gets each of them once.
    let mut resumed = connect(&b, "tasks", &format!("&after={}", event_id(&real))).await;
    let replay = events_until(&mut resumed, is_created(end)).await;
    assert_eq!(
        replay.iter().map(task_id).collect::<Vec<_>>(),
        vec![990_001, from_a, end]
    );
    let outbox: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM event_outbox")
        .fetch_one(&b.db)
        .await
        .expect("outbox count");
    assert_eq!(outbox, 0, "everything committed was published");
}

#[tokio::test]
async fn a_rolled_back_change_sends_nothing_and_a_later_commit_does() {
    let app = TestApp::spawn().await;
    listening(&app).await;
    let mut ws = connect(&app, "tasks", "").await;

    let mut tx = app.db.begin().await.expect("begin");
    insert_outbox(&mut tx, &foreign_task_event(770_001, "rolled back")).await;
    tx.rollback().await.expect("rollback");
    let frames = frames_within(&mut ws, Duration::from_secs(1)).await;
    assert!(
        frames.is_empty(),
        "a rolled-back event was sent: {frames:?}"
    );

    // A change still open when a later one commits, then rolled back: only the commit shows.
    let mut open = app.db.begin().await.expect("begin");
    insert_outbox(&mut open, &foreign_task_event(770_002, "rolled back later")).await;
    let mut committed = app.db.begin().await.expect("begin");
    insert_outbox(&mut committed, &foreign_task_event(880_001, "committed")).await;
    committed.commit().await.expect("commit");
    tokio::time::sleep(Duration::from_millis(300)).await;
    open.rollback().await.expect("rollback");

    let got = next_event(&mut ws).await;
    assert_eq!(task_id(&got), 880_001, "{got}");
    event_id(&got);
    let frames = frames_within(&mut ws, Duration::from_secs(1)).await;
    assert!(
        frames.is_empty(),
        "a rolled-back event was sent: {frames:?}"
    );
    let logged: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM events WHERE (envelope->'payload'->'task'->>'id')::bigint IN (770001, 770002)",
    )
    .fetch_one(&app.db)
    .await
    .expect("count");
    assert_eq!(logged, 0);
}

#[tokio::test]
async fn a_change_and_its_event_commit_together_and_the_wake_up_comes_after() {
    let app = TestApp::spawn().await;
    listening(&app).await;
    let mut wake_ups = PgListener::connect(&app.database_url)
        .await
        .expect("listener");
    wake_ups
        .listen("orchestrator_events")
        .await
        .expect("listen");

    let id = idle_task(&app, "durable").await;
    // The moment the write answered, its event is committed with it (in the outbox or
    // already in the log; one statement, one snapshot).
    let durable: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (
            SELECT envelope FROM event_outbox UNION ALL SELECT envelope FROM events
         ) x WHERE envelope->'payload'->>'event' = 'task_created'
             AND (envelope->'payload'->'task'->>'id')::bigint = $1",
    )
    .bind(id)
    .fetch_one(&app.db)
    .await
    .expect("count");
    assert_eq!(durable, 1, "the event is committed with the task");

    // The wake-up is sent after the relay's commit: when it arrives the event is in the log.
    let note = tokio::time::timeout(WAIT, wake_ups.recv())
        .await
        .expect("a wake-up in time")
        .expect("notification");
    let newest: i64 = note
        .payload()
        .parse()
        .expect("the wake-up carries the round's newest event id");
    let logged: Option<(i64, Value)> = sqlx::query_as(
        "SELECT event_id, envelope FROM events
         WHERE envelope->'payload'->>'event' = 'task_created'
           AND (envelope->'payload'->'task'->>'id')::bigint = $1",
    )
    .bind(id)
    .fetch_optional(&app.db)
    .await
    .expect("events row");
    let (event_id, envelope) = logged.expect("the event is in the log when the wake-up arrives");
    assert_eq!(envelope["payload"]["event_id"], event_id);
    assert!(
        newest >= event_id,
        "the wake-up's newest id {newest} is before {event_id}"
    );
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM event_outbox")
        .fetch_one(&app.db)
        .await
        .expect("outbox count");
    assert_eq!(left, 0, "the relay moved it out of the outbox");
}

#[tokio::test]
async fn an_unrelated_open_transaction_does_not_hold_events_back() {
    let app = TestApp::spawn().await;
    listening(&app).await;
    let mut ws = connect(&app, "tasks", "").await;

    // A writing transaction that has nothing to do with events stays open (a slow batch, an
    // operator's psql, a replica frozen mid-transaction) ...
    let mut open = app.db.begin().await.expect("begin");
    let _: (i64,) = sqlx::query_as("SELECT pg_current_xact_id()::text::bigint")
        .fetch_one(&mut *open)
        .await
        .expect("an xid");
    // ... while a task is created and committed.
    let id = idle_task(&app, "while another transaction is open").await;
    let during = next_frame(&mut ws, Duration::from_secs(2)).await;
    open.rollback().await.expect("rollback");
    let after = match &during {
        Some(_) => None,
        None => next_frame(&mut ws, WAIT)
            .await
            .map(|e| name(&e).to_string()),
    };
    assert!(
        during.as_ref().is_some_and(|e| is_created(id)(e)),
        "task_created did not arrive within 2 s while an unrelated transaction was open; \
         it came after that transaction ended: {after:?}"
    );
    let _ = ws.send(Message::Close(None)).await;
}

#[tokio::test]
async fn an_open_transaction_in_another_database_does_not_hold_events_back() {
    use sqlx::Connection;
    let app = TestApp::spawn().await;
    listening(&app).await;
    let mut ws = connect(&app, "tasks", "").await;

    // Another application's database on the same server, with a transaction open there.
    let mut elsewhere =
        sqlx::PgConnection::connect(&format!("{}/postgres", server_url().trim_end_matches('/')))
            .await
            .expect("connect to the postgres database");
    let mut open = elsewhere.begin().await.expect("begin");
    let _: (i64,) = sqlx::query_as("SELECT pg_current_xact_id()::text::bigint")
        .fetch_one(&mut *open)
        .await
        .expect("an xid");
    let id = idle_task(&app, "while another database has a transaction open").await;
    let during = next_frame(&mut ws, Duration::from_secs(2)).await;
    open.rollback().await.expect("rollback");
    let _ = elsewhere.close().await;
    let after = match &during {
        Some(_) => None,
        None => next_frame(&mut ws, WAIT)
            .await
            .map(|e| name(&e).to_string()),
    };
    assert!(
        during.as_ref().is_some_and(|e| is_created(id)(e)),
        "task_created did not arrive within 2 s while a transaction was open in another \
         database; after it ended the client got: {after:?}"
    );
}

#[tokio::test]
async fn a_gap_in_the_event_ids_is_not_mistaken_for_trimmed_events() {
    let app = TestApp::spawn().await;
    listening(&app).await;
    let mut ws = connect(&app, "tasks", "").await;
    let t1 = idle_task(&app, "seen").await;
    let seen = next_event(&mut ws).await;
    assert_eq!(task_id(&seen), t1);
    let last_seen = event_id(&seen);
    drop(ws);

    // What a relay round that rolled back (or a server crash) leaves behind: an id never used.
    let _: i64 = sqlx::query_scalar("SELECT nextval('event_ids')")
        .fetch_one(&app.db)
        .await
        .expect("nextval");
    let t2 = idle_task(&app, "next").await;
    eventually(WAIT, "the next event in the log", || async {
        let log = log_after(&app, "tasks", last_seen).await;
        (log.len() == 1).then_some(())
    })
    .await;
    // The retention trims the event the client had already seen; nothing it missed is gone.
    trim_through(&app, last_seen).await;

    let mut back = connect(&app, "tasks", &format!("&after={last_seen}")).await;
    let first = next_event(&mut back).await;
    assert_eq!(
        (name(&first), task_id(&first)),
        ("task_created", t2),
        "nothing after {last_seen} was trimmed, so no resync_required: {first}"
    );
}

/// What the retention does, at once: the events up to `id` deleted and the trim point noted.
async fn trim_through(app: &TestApp, id: i64) {
    let mut tx = app.db.begin().await.expect("begin");
    sqlx::query("DELETE FROM events WHERE event_id <= $1")
        .bind(id)
        .execute(&mut *tx)
        .await
        .expect("delete old events");
    sqlx::query("UPDATE event_log_state SET trimmed_through = GREATEST(trimmed_through, $1)")
        .bind(id)
        .execute(&mut *tx)
        .await
        .expect("note the trim point");
    tx.commit().await.expect("commit");
}

/// Events carry the orchestrator's configured `DROPLET_ID` as their `source`, like its HTTP
/// answers: those written by the services and the one the heartbeat's SQL writes.
#[tokio::test]
async fn events_carry_the_configured_droplet_id_as_source() {
    let app = TestApp::spawn_with(&[("DROPLET_ID", "11")]).await;
    app.register(7, &["analysis"], &dead_endpoint()).await;
    // Back from inactive by a heartbeat: the event the heartbeat's own SQL writes.
    sqlx::query("UPDATE droplets SET status = 'inactive' WHERE droplet_id = 7")
        .execute(&app.db)
        .await
        .unwrap();
    let (s, answer) = app
        .post(
            "/droplets/7/heartbeat",
            &app.token(7, &["write"]),
            json!({ "status": "active" }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{answer}");
    assert_eq!(answer["source"], 11);
    let task = app.create_task(7, task_payload("sourced")).await;

    let events = eventually(WAIT, "the task and both droplet events", || async {
        let droplets = logged_events(&app.db, "droplets", 0).await;
        let tasks = logged_events(&app.db, "tasks", 0).await;
        let kinds: Vec<&str> = droplets
            .iter()
            .filter_map(|(_, e)| e["payload"]["event"].as_str())
            .collect();
        let created = tasks
            .iter()
            .any(|(_, e)| e["payload"]["task"]["id"] == task);
        (created
            && kinds.contains(&"droplet_registered")
            && kinds.contains(&"droplet_health_changed"))
        .then(|| droplets.into_iter().chain(tasks).collect::<Vec<_>>())
    })
    .await;
    for (_, e) in &events {
        assert_eq!(e["source"], 11, "{e}");
    }

    // The feed's answers to the client's own messages too.
    let mut ws = connect(&app, "tasks", "").await;
    for ask in [r#"{"type": "ping"}"#, r#"{"subscribe": {}}"#, "not json"] {
        ws.send(Message::Text(ask.into())).await.unwrap();
        let reply = loop {
            let frame = next_frame(&mut ws, WAIT).await.expect("a reply");
            if frame["message_type"] == "response" {
                break frame;
            }
        };
        assert_eq!(reply["source"], 11, "{ask}: {reply}");
    }
}

/// Rows written to `event_outbox` by hand, in the form an older replica writes (no columns
/// beside the envelope).
async fn outbox_rows(db: &sqlx::PgPool, n: i64, filler: usize) {
    sqlx::query(
        "INSERT INTO event_outbox (feed, envelope)
         SELECT 'tasks', json_build_object('type', 'task_created', 'payload',
                                           json_build_object('filler', repeat('x', $2)))
         FROM generate_series(1, $1)",
    )
    .bind(n)
    .bind(filler as i32)
    .execute(db)
    .await
    .expect("outbox rows");
}

/// Sequential scans of `event_outbox` so far, with this connection's counts flushed.
async fn outbox_scans(db: &sqlx::PgPool) -> i64 {
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(db)
        .await
        .unwrap();
    sqlx::query_scalar("SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'event_outbox'")
        .fetch_one(db)
        .await
        .unwrap()
}

/// The outbox is a queue: its deleted rows stay in its pages until a vacuum. A relay round
/// finds its rows by the outbox's key however much it grew since the relay started (a plan
/// kept from the nearly empty outbox of the first rounds scanned every page of it at every
/// round: 6 % of the machine at 300 tasks/s).
#[tokio::test]
async fn a_relay_round_reads_the_outbox_by_its_key_however_much_it_has_grown() {
    use orchestrator::services::events::publish_round;
    use sqlx::Connection;
    let db = TestDatabase::fresh().await;
    let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", server_url()))
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {}", db.name)))
        .execute(&mut admin)
        .await
        .unwrap();
    admin.close().await.unwrap();
    // One connection: every round and every count on the same session, no relay but ours.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.url)
        .await
        .unwrap();
    orchestrator::db::MIGRATOR.run(&pool).await.unwrap();
    // The first rounds, on a nearly empty outbox, as after a start.
    for _ in 0..8 {
        outbox_rows(&pool, 2, 10).await;
        assert_eq!(publish_round(&pool, 1).await.unwrap(), Some(2));
    }
    // Grown: 30,000 events of 1 kB written and gone, their rows dead until a vacuum.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO event_outbox (feed, envelope)
         SELECT 'tasks', json_build_object('filler', repeat('x', 1000))
         FROM generate_series(1, 30000)",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query("DELETE FROM event_outbox")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let before = outbox_scans(&pool).await;
    outbox_rows(&pool, 3, 10).await;
    assert_eq!(publish_round(&pool, 1).await.unwrap(), Some(3));
    let after = outbox_scans(&pool).await;
    assert_eq!(after, before, "a relay round scanned the whole outbox");
    let published: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(published, 19);
    pool.close().await;
}

/// A change's events reach the clients when its transaction commits, however long after they
/// were written: the writer wakes the relay after its commit. Woken when the events were
/// written (before this fix), the relay looked before they were visible and left them to its
/// next poll, here a minute, far past this test's wait; nothing else in this quiet app wakes
/// it meanwhile.
#[tokio::test]
async fn a_changes_events_are_published_at_its_commit_not_at_the_relays_next_poll() {
    use orchestrator::services::state_machine::{Actor, Mode, Move, Status};
    use orchestrator::services::transition::Transition;

    let app = TestApp::spawn_with(&[("EVENT_RELAY_POLL_MS", "60000")]).await;
    listening(&app).await;
    let mut ws = connect(&app, "tasks", "").await;
    let task = app.create_task(3, task_payload("cancelled late")).await;
    let created = events_until(&mut ws, |e| name(e) == "task_created").await;
    assert_eq!(task_id(created.last().unwrap()), i64::from(task));

    let changes = app.state.changes();
    let mut t = Transition::begin(&changes).await.unwrap();
    let cancel = Move::new(task, Status::Cancelled, Actor::Admin, "admin");
    t.apply(&[cancel], Mode::Strict).await.unwrap();
    // The event is in the outbox, its transaction still open.
    tokio::time::sleep(Duration::from_millis(300)).await;
    t.commit().await.unwrap();

    let cancelled = next_frame(&mut ws, Duration::from_secs(5))
        .await
        .expect("task_cancelled within 5 s of its commit (the relay's poll is a minute)");
    assert_eq!(
        (name(&cancelled), task_id(&cancelled)),
        ("task_cancelled", i64::from(task)),
        "{cancelled}"
    );
}

/// A droplet's health event written by the shared heartbeat statement reaches the clients
/// when that statement commits (it wakes the relay), as does its registration's: not at the
/// relay's next poll, here a minute.
#[tokio::test]
async fn a_heartbeats_health_event_is_published_at_its_commit_not_at_the_relays_next_poll() {
    let app = TestApp::spawn_with(&[("EVENT_RELAY_POLL_MS", "60000")]).await;
    listening(&app).await;
    let mut ws = connect(&app, "droplets", "").await;
    app.register(61, &["x"], "http://127.0.0.1:9").await;
    events_until(&mut ws, |e| name(e) == "droplet_registered").await;
    sqlx::query("UPDATE droplets SET status = 'inactive' WHERE droplet_id = 61")
        .execute(&app.db)
        .await
        .expect("inactive");

    let (status, body) = app
        .post(
            "/droplets/61/heartbeat",
            &app.token(61, &["read", "write"]),
            envelope(json!({"status": "active"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let changed = next_frame(&mut ws, Duration::from_secs(5)).await.expect(
        "droplet_health_changed within 5 s of the heartbeat (the relay's poll is a minute)",
    );
    assert_eq!(name(&changed), "droplet_health_changed", "{changed}");
    assert_eq!(
        changed["payload"]["previous_status"], "inactive",
        "{changed}"
    );
    assert_eq!(changed["payload"]["droplet"]["droplet_id"], 61, "{changed}");
}

/// The health monitor wakes the relay after its round commits: a droplet marked inactive
/// for its silence is on the dashboards within seconds, not at the relay's next poll (here a
/// minute).
#[tokio::test]
async fn a_health_rounds_events_are_published_at_its_commit_not_at_the_relays_next_poll() {
    let app = TestApp::spawn_with(&[
        ("EVENT_RELAY_POLL_MS", "60000"),
        ("HEARTBEAT_TIMEOUT", "1"),
        ("HEARTBEAT_CHECK_INTERVAL", "1"),
        // The silent droplet holds nothing: its marking is the only change.
        ("ENABLE_AUTO_RECOVERY", "false"),
    ])
    .await;
    listening(&app).await;
    let mut ws = connect(&app, "droplets", "").await;
    app.register(64, &["x"], "http://127.0.0.1:9").await;
    events_until(&mut ws, |e| name(e) == "droplet_registered").await;

    // No heartbeat: within a second or two a health round marks it, and wakes the relay.
    let marked = eventually(WAIT, "droplet 64 marked inactive", || async {
        let status: String =
            sqlx::query_scalar("SELECT status FROM droplets WHERE droplet_id = 64")
                .fetch_one(&app.db)
                .await
                .expect("droplet 64");
        (status == "inactive").then_some(std::time::Instant::now())
    })
    .await;
    let mut names = Vec::new();
    while names.len() < 2 {
        let left = Duration::from_secs(5).saturating_sub(marked.elapsed());
        let e = next_frame(&mut ws, left).await.unwrap_or_else(|| {
            panic!("the health round's two events within 5 s of its commit (the relay's poll is a minute); got {names:?}")
        });
        assert_eq!(e["payload"]["droplet"]["droplet_id"], 64, "{e}");
        names.push(name(&e).to_string());
    }
    assert_eq!(
        names,
        ["droplet_heartbeat_missed", "droplet_health_changed"],
        "in the order the round recorded them"
    );
}

/// Whether droplet `id` is marked unreachable.
async fn unreachable(app: &TestApp, id: i32) -> bool {
    sqlx::query_scalar("SELECT unreachable_since IS NOT NULL FROM droplets WHERE droplet_id = $1")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .expect("droplet row")
}

/// A probe that brings an unreachable droplet back wakes the relay after its commit: the
/// droplet's return is on the dashboards within seconds, not at the relay's next poll.
#[tokio::test]
async fn a_probes_event_is_published_at_its_commit_not_at_the_relays_next_poll() {
    let app = TestApp::spawn_with(&[
        ("EVENT_RELAY_POLL_MS", "60000"),
        ("DISPATCH_FAILURES_BEFORE_UNREACHABLE", "1"),
    ])
    .await;
    listening(&app).await;
    let dead = dead_endpoint();
    app.register(65, &["probe-wake"], &dead).await;
    let task = app
        .create_task(5, crate::real_mesh::task_for("probe-wake", json!({})))
        .await;
    eventually(WAIT, "droplet 65 marked unreachable", || async {
        let unreachable = unreachable(&app, 65).await;
        unreachable.then_some(())
    })
    .await;
    // The task is cancelled: once the droplet is back, no routing pass (whose commit would
    // wake the relay too) has anything to do. Everything up to now is published (the marking
    // and the cancel woke the relay); then the endpoint comes up and the next probe, at most
    // 2 s later, brings the droplet back.
    let (status, body) = app.delete(&format!("/tasks/{task}"), &app.admin()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut ws = connect(&app, "droplets", "").await;
    let _up = DropletServer::start_at(&dead, Behaviour::Ok).await;
    let back = eventually(
        Duration::from_secs(20),
        "droplet 65 back after a probe",
        || async {
            let unreachable = unreachable(&app, 65).await;
            (!unreachable).then_some(std::time::Instant::now())
        },
    )
    .await;
    loop {
        let left = Duration::from_secs(5).saturating_sub(back.elapsed());
        let e = next_frame(&mut ws, left).await.expect(
            "the probe's droplet_health_changed within 5 s of its commit (the relay's poll is a minute)",
        );
        let reason = e["payload"]["reason"].as_str().unwrap_or_default();
        if name(&e) == "droplet_health_changed" && reason.contains("answered a probe") {
            assert_eq!(e["payload"]["droplet"]["droplet_id"], 65, "{e}");
            break;
        }
    }
}

/// The relay hands its rounds to its own replica's reader, which forwards them without
/// reading the log.
#[tokio::test]
async fn a_replicas_reader_forwards_its_relays_rounds_without_reading_the_log() {
    let app = TestApp::spawn().await;
    listening(&app).await;
    let mut ws = connect(&app, "tasks", "").await;
    let listener = |app: &TestApp, field: &str| stats(app)["listener"][field].as_u64().unwrap();
    let (handed, reads) = (listener(&app, "rounds_handed"), listener(&app, "log_reads"));
    let started = std::time::Instant::now();
    for k in 0..20 {
        let task = app
            .create_task(3, task_payload(&format!("handed {k}")))
            .await;
        let created = events_until(&mut ws, |e| name(e) == "task_created").await;
        assert_eq!(task_id(created.last().unwrap()), i64::from(task));
    }
    let handed = listener(&app, "rounds_handed") - handed;
    let reads = listener(&app, "log_reads") - reads;
    assert!(
        handed >= 20,
        "{handed} rounds handed over for 20 creations, each waited for"
    );
    // The round's own NOTIFY, carrying its newest id, makes no read: the reads are the poll's
    // (one per 250 ms) and at most one more. Reading at each NOTIFY would be 20 or more.
    let polls = started.elapsed().as_millis() as u64 / 250;
    assert!(
        reads <= polls + 1 && reads < 20,
        "{reads} reads of the log in {polls} polls' time for 20 rounds handed over"
    );
}

/// A round of this replica's relay that comes after events the reader has not read yet
/// (another replica's round, its NOTIFY still on the way) is not forwarded ahead of them: the
/// reader reads the log, and the clients get both, in order.
#[tokio::test]
async fn a_round_handed_over_after_events_the_reader_lacks_waits_for_them() {
    let app = TestApp::spawn().await;
    listening(&app).await;
    let mut ws = connect(&app, "tasks", "").await;
    let first = app.create_task(3, task_payload("first")).await;
    let created = events_until(&mut ws, |e| name(e) == "task_created").await;
    assert_eq!(task_id(created.last().unwrap()), i64::from(first));

    // Another replica's round: in the log, committed, no NOTIFY.
    let other = Event::task(
        TaskEventKind::TaskCreated,
        None,
        json!({"id": 424242, "task_type": "other", "status": "pending"}),
        None,
    );
    sqlx::query(
        "INSERT INTO events (event_id, feed, kind, task_type, status, envelope)
         SELECT nextval('event_ids'), 'tasks', $2, 'other', 'pending',
                jsonb_set($1::jsonb, '{payload,event_id}', to_jsonb(currval('event_ids')))::json",
    )
    .bind(&other.envelope)
    .bind(other.kind)
    .execute(&app.db)
    .await
    .expect("another replica's event");
    let second = app.create_task(3, task_payload("second")).await;

    let first_frame = next_event(&mut ws).await;
    assert_eq!(task_id(&first_frame), 424242, "{first_frame}");
    let then = next_event(&mut ws).await;
    assert_eq!(
        (name(&then), task_id(&then)),
        ("task_created", i64::from(second)),
        "{then}"
    );
    assert!(event_id(&then) > event_id(&first_frame));
}
