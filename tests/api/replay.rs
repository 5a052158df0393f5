//! A resuming client (`?after=<event_id>`) costs bounded memory and time: its replay reads
//! the log a bounded page at a time, filtered by the database, and stops as the live feed
//! does (token expiry, a kick, a missed ping, shutdown, a client that does not read).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use orchestrator::services::events::log::{page_after, PageLimit};
use orchestrator::services::events::{ClientFilter, DropletEventKind, Event, Feed, TaskEventKind};
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

use crate::helpers::*;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const WAIT: Duration = Duration::from_secs(20);

/// The task events' payload size in the tests of memory and of stopping (as in the finding).
const BIG: usize = 100 * 1024;

/// The most the server's RSS may grow while ten clients that never read resume over 250
/// events of 100 KB (25 MB of log each): stated in README's WebSocket section.
const RSS_BOUND_MIB: u64 = 64;

/// A `task_created` event whose task is of this type and status, assigned to `droplet`,
/// with a payload of `size` bytes.
fn task_event(task_type: &str, status: &str, droplet: Option<i32>, size: usize) -> Event {
    let task = json!({
        "id": 1, "task_type": task_type, "status": status, "assigned_droplet_id": droplet,
        "payload": {"blob": "x".repeat(size)},
    });
    Event::task(TaskEventKind::TaskCreated, None, task, None)
}

fn droplet_event(droplet: i32) -> Event {
    let droplet = json!({"id": droplet, "droplet_id": droplet, "status": "active"});
    Event::droplet(DropletEventKind::DropletRegistered, droplet, None)
}

/// Appends `n` copies of `event` to the log of its feed, each with its own `event_id` and
/// with what the filters look at beside it, as the relay writes them; returns their ids.
async fn append(db: &PgPool, event: &Event, n: i64) -> Vec<i64> {
    sqlx::query_scalar(
        "INSERT INTO events (event_id, feed, kind, task_type, status, droplet_id, envelope)
         SELECT id, $2, $4, $5, $6, $7,
                jsonb_set($1::jsonb, '{payload,event_id}', to_jsonb(id))::json
         FROM (SELECT nextval('event_ids') AS id FROM generate_series(1, $3::bigint)) s
         RETURNING event_id",
    )
    .bind(&event.envelope)
    .bind(event.feed.as_str())
    .bind(n)
    .bind(event.kind)
    .bind(event.meta.task_type.as_deref())
    .bind(event.meta.status.as_deref())
    .bind(event.meta.droplet_id)
    .fetch_all(db)
    .await
    .expect("events appended")
}

/// Appends `n` big task events and waits until the app's reader has passed them, so they
/// reach the clients that connect next only by their replay.
async fn big_log(app: &TestApp, n: i64) {
    let published = stats(app)["events_published"].as_u64().unwrap_or(0);
    append(&app.db, &task_event("verify", "pending", None, BIG), n).await;
    eventually(
        WAIT,
        "the reader has passed the appended events",
        || async {
            (stats(app)["events_published"].as_u64().unwrap_or(0) >= published + n as u64)
                .then_some(())
        },
    )
    .await;
}

/// A read-only token of droplet `id` that expires `in_seconds` from now.
fn token_expiring(id: i32, in_seconds: i64) -> String {
    let now = chrono::Utc::now().timestamp();
    sign(json!({
        "droplet_id": id, "steward": "tests", "permissions": ["read"],
        "iat": now, "exp": now + in_seconds,
    }))
}

/// A client of `/ws/tasks` resuming from the start of the log; the test decides whether it
/// ever reads.
async fn resumer(addr: &str, token: &str, query: &str) -> Ws {
    let url = format!("ws://{addr}/ws/tasks?token={token}&after=0{query}");
    let (ws, response) = connect_async(url).await.expect("resuming client connects");
    assert_eq!(response.status().as_u16(), 101);
    ws
}

/// The text frames a client reads until its socket ends, or nothing comes for `quiet`.
async fn read_all(ws: &mut Ws, quiet: Duration) -> Vec<Value> {
    let mut frames = Vec::new();
    while let Ok(Some(Ok(message))) = tokio::time::timeout(quiet, ws.next()).await {
        if let Message::Text(t) = message {
            frames.push(serde_json::from_str(t.as_str()).expect("a JSON frame"));
        }
    }
    frames
}

async fn gone(app: &TestApp, what: &str) {
    eventually(WAIT, what, || async {
        (stats(app)["total_connections"] == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_database_applies_the_clients_filter_and_bounds_each_page() {
    let app = TestApp::spawn().await;
    let db = &app.db;
    let mut verify_pending = append(db, &task_event("verify", "pending", None, 10), 3).await;
    let report_7 = append(db, &task_event("report", "assigned", Some(7), 10), 3).await;
    let verify_done_7 = append(db, &task_event("verify", "completed", Some(7), 10), 3).await;
    verify_pending.extend(append(db, &task_event("verify", "pending", None, 10), 2).await);
    let droplet_7 = append(db, &droplet_event(7), 2).await;
    let droplet_8 = append(db, &droplet_event(8), 2).await;
    let all = PageLimit {
        events: 1000,
        bytes: 1 << 30,
    };
    let page = |feed, filter: ClientFilter, limit| async move {
        page_after(db, feed, 0, &filter, limit)
            .await
            .expect("page read")
            .into_iter()
            .map(|(id, text)| {
                let e: Value = serde_json::from_str(&text).expect("JSON text");
                assert_eq!(e["payload"]["event_id"], id);
                id
            })
            .collect::<Vec<i64>>()
    };
    let filter = |t: Option<&str>, s: Option<&str>, d: Option<i32>| ClientFilter {
        task_type: t.map(str::to_string),
        status: s.map(str::to_string),
        droplet_id: d,
    };
    let sorted = |mut v: Vec<i64>| {
        v.sort();
        v
    };

    let verify = sorted([verify_pending.clone(), verify_done_7.clone()].concat());
    assert_eq!(
        page(Feed::Tasks, filter(Some("verify"), None, None), all).await,
        verify
    );
    assert_eq!(
        page(Feed::Tasks, filter(None, Some("completed"), None), all).await,
        verify_done_7
    );
    let of_7 = sorted([report_7.clone(), verify_done_7.clone()].concat());
    assert_eq!(
        page(Feed::Tasks, filter(None, None, Some(7)), all).await,
        of_7
    );
    assert_eq!(
        page(
            Feed::Tasks,
            filter(Some("report"), Some("assigned"), Some(7)),
            all
        )
        .await,
        report_7
    );
    assert!(
        page(Feed::Tasks, filter(Some("report"), None, Some(8)), all)
            .await
            .is_empty()
    );
    // On the droplets feed only the droplet filter applies, as for live events.
    assert_eq!(
        page(
            Feed::Droplets,
            filter(Some("verify"), Some("pending"), Some(8)),
            all
        )
        .await,
        droplet_8
    );
    assert_eq!(
        page(Feed::Droplets, filter(None, None, None), all).await,
        [droplet_7, droplet_8.clone()].concat()
    );

    // Pages: at most `events`, and past the first no more than `bytes` of envelope text.
    let big = append(db, &task_event("big", "pending", None, BIG), 5).await;
    let only_big = || filter(Some("big"), None, None);
    let by_bytes = PageLimit {
        events: 100,
        bytes: 250 * 1024,
    };
    assert_eq!(page(Feed::Tasks, only_big(), by_bytes).await, big[..3]);
    let one = PageLimit {
        events: 100,
        bytes: 1,
    };
    assert_eq!(page(Feed::Tasks, only_big(), one).await, big[..1]);
    let two = PageLimit {
        events: 2,
        bytes: 1 << 30,
    };
    assert_eq!(page(Feed::Tasks, only_big(), two).await, big[..2]);

    // Over the socket: a resuming client with a filter gets the matching events only.
    let mut ws = resumer(
        &app.addr.to_string(),
        &app.token(5, &["read"]),
        "&task_type=report",
    )
    .await;
    let frames = read_all(&mut ws, Duration::from_secs(2)).await;
    let ids: Vec<i64> = frames
        .iter()
        .filter_map(|f| f["payload"]["event_id"].as_i64())
        .collect();
    assert_eq!(ids, report_7, "{frames:?}");
}

#[tokio::test]
async fn a_replay_stops_when_the_token_expires() {
    let log = LogCapture::start("orchestrator=debug");
    // A send timeout far off: only the expiry can end this replay in time.
    let app = TestApp::spawn_with(&[("WS_SEND_TIMEOUT_SECONDS", "120")]).await;
    big_log(&app, 200).await;
    let started = Instant::now();
    let mut ws = resumer(&app.addr.to_string(), &token_expiring(5, 3), "").await;
    gone(&app, "the replaying socket closed at its token's expiry").await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "closed after {took:?}"
    );
    assert!(log.text().contains("token expired"), "{}", log.text());
    let frames = read_all(&mut ws, Duration::from_secs(2)).await;
    assert!(
        frames.len() < 200,
        "the whole replay was sent: {}",
        frames.len()
    );
}

#[tokio::test]
async fn a_replay_stops_when_the_client_is_kicked_or_misses_pings() {
    let log = LogCapture::start("orchestrator=debug");
    // Kicked: live events overflow the queue of a client stuck in its replay.
    let app =
        TestApp::spawn_with(&[("WS_SEND_TIMEOUT_SECONDS", "120"), ("WS_CLIENT_QUEUE", "2")]).await;
    big_log(&app, 200).await;
    let _ws = resumer(&app.addr.to_string(), &app.token(5, &["read"]), "").await;
    eventually(WAIT, "the replay is under way", || async {
        (stats(&app)["messages_sent"].as_u64().unwrap_or(0) > 0).then_some(())
    })
    .await;
    for i in 0..4 {
        app.create_task(5, task_payload(&format!("live {i}"))).await;
    }
    gone(&app, "the kicked client's replay ended").await;
    assert_eq!(stats(&app)["clients_dropped_slow"], 1);
    assert!(log.text().contains("event queue full"), "{}", log.text());
    drop(app);

    // Silent: a client stuck in its replay answers no ping.
    let app = TestApp::spawn_with(&[
        ("WS_SEND_TIMEOUT_SECONDS", "120"),
        ("WS_HEARTBEAT_INTERVAL", "1"),
    ])
    .await;
    big_log(&app, 200).await;
    let _ws = resumer(&app.addr.to_string(), &app.token(5, &["read"]), "").await;
    gone(&app, "the silent client's replay ended").await;
    assert_eq!(stats(&app)["clients_dropped_unresponsive"], 1);
    assert!(log.text().contains("no answer to pings"), "{}", log.text());
}

/// The real binary, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A figure of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"))
}

#[tokio::test]
async fn ten_resumers_that_never_read_keep_the_servers_memory_bounded_and_are_dropped() {
    let db = TestDatabase::fresh().await;
    let url = db.url.as_str();
    let out = crate::cli::orchestrator(
        &["migrate"],
        &[("DATABASE_URL", url), ("LOG_LEVEL", "WARNING")],
    );
    assert!(out.status.success(), "{}", crate::cli::text(&out.stderr));
    {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .expect("pool");
        // Written before the server starts: its reader begins after them, so only the
        // replays send them.
        append(&pool, &task_event("verify", "pending", None, BIG), 250).await;
        pool.close().await;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
        .to_string();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_orchestrator"));
    cmd.env_clear()
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in [
        ("DATABASE_URL", url),
        ("JWT_SECRET_KEY", SECRET),
        ("ENVIRONMENT", "development"),
        ("HOST", "127.0.0.1"),
        ("PORT", port.as_str()),
        ("DATABASE_POOL_SIZE", "4"),
        ("DATABASE_MAX_OVERFLOW", "0"),
        ("LOG_LEVEL", "WARNING"),
        ("RATE_LIMIT_PER_MINUTE", "1000000"),
        ("WS_SEND_TIMEOUT_SECONDS", "3"),
    ] {
        cmd.env(k, v);
    }
    let server = Server(cmd.spawn().expect("the binary starts"));
    let pid = server.0.id();
    let addr = format!("127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let admin = token(1, &["read", "write", "admin"]);
    let ws_status = || async {
        let r = client
            .get(format!("http://{addr}/ws/status"))
            .bearer_auth(&admin)
            .send()
            .await
            .ok()?;
        r.json::<Value>().await.ok().map(|b| b["payload"].clone())
    };
    eventually(WAIT, "the binary serves", || async { ws_status().await }).await;

    let before = proc_kib(pid, "VmRSS");
    // Peak RSS from here on (writing 5 to clear_refs resets VmHWM to the current RSS).
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    let started = Instant::now();
    let mut sockets = Vec::new();
    for id in 0..10 {
        sockets.push(resumer(&addr, &token(100 + id, &["read"]), "").await);
    }
    let mut sampled = before;
    let stats = loop {
        sampled = sampled.max(proc_kib(pid, "VmRSS"));
        if let Some(s) = ws_status().await.filter(|s| s["total_connections"] == 0) {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the clients are still held; RSS from {} MiB to {} MiB",
            before / 1024,
            sampled / 1024
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let dropped_after = started.elapsed();
    let peak = proc_kib(pid, "VmHWM").max(sampled);
    let growth_mib = peak.saturating_sub(before) / 1024;
    eprintln!(
        "RSS before {} MiB, peak {} MiB (+{growth_mib} MiB) for ten resumers; dropped after {dropped_after:?}",
        before / 1024,
        peak / 1024
    );
    assert!(growth_mib < RSS_BOUND_MIB, "RSS grew by {growth_mib} MiB");
    assert_eq!(stats["clients_dropped_slow"], 10, "{stats}");
    assert!(dropped_after < Duration::from_secs(20), "{dropped_after:?}");
    drop(sockets);
}

/// The next text frame of `ws` as it came, byte for byte.
async fn next_text(ws: &mut Ws) -> String {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return t.as_str().to_string(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("a text frame: {other:?}"),
        }
    }
}

/// The id of the event a frame carries.
fn event_id(text: &str) -> i64 {
    let e: Value = serde_json::from_str(text).expect("a JSON frame");
    e["payload"]["event_id"].as_i64().expect("an event_id")
}

#[tokio::test]
async fn a_resuming_client_gets_each_event_as_the_same_text_a_live_client_got() {
    let app = TestApp::spawn().await;
    let token = app.token(5, &["read"]);
    let live = |feed: &'static str| {
        let url = format!("ws://{}/ws/{feed}?token={token}", app.addr);
        async move { connect_async(url).await.expect("live client connects").0 }
    };
    let mut tasks = live("tasks").await;
    let mut droplets = live("droplets").await;
    eventually(WAIT, "both live clients are registered", || async {
        (stats(&app)["total_connections"] == 2).then_some(())
    })
    .await;

    // A registration (read back by the reader for the contract directory too) and a creation.
    app.register(7, &["verify"], &dead_endpoint()).await;
    app.create_task(5, task_payload("one text per event id"))
        .await;
    let registered = next_text(&mut droplets).await;
    let created = next_text(&mut tasks).await;

    for (feed, live_text) in [("droplets", registered), ("tasks", created)] {
        let id = event_id(&live_text);
        // The relay wrote the source and the event id before the writer's text, untouched.
        let head = format!(",\"payload\":{{\"event_id\":{id},\"event\":\"");
        assert!(
            live_text.starts_with("{\"source\":") && live_text.contains(&head),
            "{live_text}"
        );
        let url = format!("ws://{}/ws/{feed}?token={token}&after={}", app.addr, id - 1);
        let (mut resumed, _) = connect_async(url).await.expect("resuming client connects");
        assert_eq!(
            next_text(&mut resumed).await,
            live_text,
            "event {id} of {feed}: the replay's text is the live text"
        );
    }
}
