//! The edge's bounds (issue 14): half-open connections are closed after
//! `HEADER_READ_TIMEOUT_SECONDS`, at most `MAX_CONNECTIONS` are open at once, at most
//! `WS_MAX_CONNECTIONS` WebSockets, a socket closes with 4001 when its token expires,
//! `/openapi.json` stays private in production, and requests refused with 401 are never
//! charged to the bucket of the droplet their token names.

use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::helpers::*;

/// Half-open connections one client holds in the slowloris test (the figure). The
/// test process holds both ends, 6,000 descriptors, and leaves room for the other tests
/// running beside it.
const HALF_OPEN: usize = 3_000;
const SPARE_DESCRIPTORS: u64 = 4_000;
/// Set (to anything) to let the slowloris test hold fewer connections when the hard limit on
/// open files is too low for 3,000, rather than fail.
const ALLOW_FEWER: &str = "HALF_OPEN_ALLOW_FEWER";

/// Raises this process's soft limit on open files to its hard limit (or, when the kernel
/// refuses that, as an unlimited hard limit, to what the test needs); the soft limit after.
fn raise_open_files_limit() -> u64 {
    let needed = 2 * HALF_OPEN as u64 + SPARE_DESCRIPTORS;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            panic!("getrlimit: {}", std::io::Error::last_os_error());
        }
        for wanted in [limit.rlim_max, needed.min(limit.rlim_max)] {
            if limit.rlim_cur >= wanted {
                break;
            }
            let raised = libc::rlimit {
                rlim_cur: wanted,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

/// How many half-open connections the test holds: the 3,000, or it fails, unless
/// `HALF_OPEN_ALLOW_FEWER` is set (then as many as the limit allows, at least 100).
fn half_open_count() -> usize {
    let limit = raise_open_files_limit();
    let room = (limit.saturating_sub(SPARE_DESCRIPTORS) / 2) as usize;
    if room >= HALF_OPEN {
        return HALF_OPEN;
    }
    if std::env::var_os(ALLOW_FEWER).is_none() {
        panic!(
            "open-files limit {limit} (raised as far as the hard limit allows) leaves room for {room} half-open connections, not \
             {HALF_OPEN}: raise `ulimit -Hn` to {} or set {ALLOW_FEWER}=1",
            2 * HALF_OPEN as u64 + SPARE_DESCRIPTORS
        );
    }
    let n = room.max(100);
    eprintln!("open-files limit {limit}: holding {n} half-open connections, not {HALF_OPEN}");
    n
}

/// Reads until the server closes the connection (end of stream, or an error such as a reset);
/// `false` if it is still open after `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
    .is_ok()
}

/// `GET /health` on a new connection, within `within`.
async fn health(app: &TestApp, within: Duration) -> Result<StatusCode, String> {
    let client = reqwest::Client::builder()
        .timeout(within)
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    client
        .get(app.url("/health"))
        .send()
        .await
        .map(|r| StatusCode::from_u16(r.status().as_u16()).expect("status"))
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn half_open_connections_are_closed_after_the_header_timeout() {
    // Before the app starts (its process sampler, sysinfo, raises the limit too, as a side
    // effect this test does not count on).
    let half_open = half_open_count();
    let app = TestApp::spawn_with(&[("HEADER_READ_TIMEOUT_SECONDS", "2")]).await;
    let opened = Instant::now();
    let mut held = Vec::with_capacity(half_open);
    for i in 0..half_open {
        let mut stream = TcpStream::connect(app.addr)
            .await
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        // A partial request line, and then nothing.
        stream.write_all(b"GET /hea").await.expect("partial write");
        held.push(stream);
    }
    let open_for = opened.elapsed();

    // While they are held, the service answers.
    assert_eq!(
        health(&app, Duration::from_secs(5)).await,
        Ok(StatusCode::OK),
        "health while {half_open} half-open connections are held"
    );
    // They are not cut at once: the timeout is what closes them.
    if open_for < Duration::from_millis(1500) {
        assert!(
            !closed_within(&mut held[half_open - 1], Duration::from_millis(200)).await,
            "the newest half-open connection was closed before its timeout"
        );
    }

    // Within a few seconds of the timeout, the server has closed every one of them.
    let deadline = Duration::from_secs(2 + 8);
    let results =
        futures::future::join_all(held.iter_mut().map(|s| closed_within(s, deadline))).await;
    let still_open = results.iter().filter(|closed| !**closed).count();
    assert_eq!(
        still_open,
        0,
        "{still_open} of {half_open} half-open connections still open {:?} after they were opened",
        opened.elapsed()
    );
    drop(held);

    assert_eq!(
        health(&app, Duration::from_secs(5)).await,
        Ok(StatusCode::OK),
        "health after the half-open connections were shed"
    );
}

/// A raw `GET /health` written whole on a new connection.
async fn raw_health_request(app: &TestApp) -> TcpStream {
    let mut stream = TcpStream::connect(app.addr).await.expect("connect");
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("request written");
    stream
}

/// The first line of the answer on `stream`, or `None` if none comes within `within`.
async fn status_line(stream: &mut TcpStream, within: Duration) -> Option<String> {
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        while !answer.windows(2).any(|w| w == b"\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()?;
    let text = String::from_utf8_lossy(&answer);
    text.lines()
        .next()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
}

#[tokio::test]
async fn a_full_server_makes_the_next_connection_wait_until_one_closes() {
    let app = TestApp::spawn_with(&[
        ("MAX_CONNECTIONS", "5"),
        ("HEADER_READ_TIMEOUT_SECONDS", "60"),
    ])
    .await;
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(TcpStream::connect(app.addr).await.expect("connect"));
    }
    // The sixth connects (the kernel's backlog takes it) but is not served while five are open.
    let mut sixth = raw_health_request(&app).await;
    assert_eq!(
        status_line(&mut sixth, Duration::from_millis(1500)).await,
        None,
        "the sixth connection was served while five were open"
    );
    // One goes away: the waiting one is accepted and served.
    drop(idle.pop());
    let line = status_line(&mut sixth, Duration::from_secs(5)).await;
    assert_eq!(line.as_deref(), Some("HTTP/1.1 200 OK"));
}

#[tokio::test]
async fn a_full_server_serves_the_next_connection_once_an_idle_one_is_shed() {
    let app = TestApp::spawn_with(&[
        ("MAX_CONNECTIONS", "5"),
        ("HEADER_READ_TIMEOUT_SECONDS", "1"),
    ])
    .await;
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(TcpStream::connect(app.addr).await.expect("connect"));
    }
    let started = Instant::now();
    let mut sixth = raw_health_request(&app).await;
    let line = status_line(&mut sixth, Duration::from_secs(6)).await;
    let waited = started.elapsed();
    assert_eq!(
        line.as_deref(),
        Some("HTTP/1.1 200 OK"),
        "the sixth connection after {waited:?}"
    );
    // It waited for a slot: the idle ones were shed by their header timeout, not before.
    assert!(
        waited >= Duration::from_millis(700),
        "answered after {waited:?}, before any idle connection timed out"
    );
    for mut stream in idle {
        assert!(
            closed_within(&mut stream, Duration::from_secs(3)).await,
            "an idle connection was kept"
        );
    }
}

fn feed_url(app: &TestApp, feed: &str, token: &str) -> String {
    format!("ws://{}/ws/{feed}?token={token}", app.addr)
}

#[tokio::test]
async fn a_socket_is_closed_with_4001_when_its_token_expires() {
    let app = TestApp::spawn().await;
    let now = chrono::Utc::now().timestamp();
    let short = sign(json!({
        "droplet_id": 5, "steward": "tests", "permissions": ["read"], "iat": now, "exp": now + 2,
    }));
    let (mut ws, response) = connect_async(feed_url(&app, "tasks", &short))
        .await
        .expect("the socket opens while the token is valid");
    assert_eq!(response.status().as_u16(), 101);
    // One socket with an hour-long token stays open throughout.
    let (mut long, _) = connect_async(feed_url(&app, "droplets", &app.token(6, &["read"])))
        .await
        .expect("second socket");
    let opened = Instant::now();
    let close = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                other => panic!("the socket ended without a close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("a close frame in time")
    .expect("a close code");
    let after = opened.elapsed();
    assert_eq!(u16::from(close.code), 4001, "{close:?}");
    assert_eq!(close.reason.as_str(), "token expired");
    assert!(
        after >= Duration::from_millis(500) && after <= Duration::from_secs(4),
        "closed {after:?} after opening, for a token valid ~2 s"
    );
    // The other socket is untouched; the closed one's slot is free.
    let still_open = tokio::time::timeout(Duration::from_millis(300), long.next())
        .await
        .is_err();
    assert!(still_open, "the socket with a valid token was closed too");
    eventually(
        Duration::from_secs(5),
        "the expired socket is released",
        || async { (app.state.events.connection_count() == 1).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn the_socket_past_ws_max_connections_is_refused_with_429() {
    let app = TestApp::spawn_with(&[("WS_MAX_CONNECTIONS", "3")]).await;
    let mut open = Vec::new();
    for (i, droplet) in [21, 22, 23].into_iter().enumerate() {
        let feed = if i % 2 == 0 { "tasks" } else { "droplets" };
        let (ws, _) = connect_async(feed_url(&app, feed, &app.token(droplet, &["read"])))
            .await
            .unwrap_or_else(|e| panic!("socket {i}: {e}"));
        open.push(ws);
    }
    // A fourth droplet (well under its own per-droplet limit) is refused before the upgrade.
    match connect_async(feed_url(&app, "tasks", &app.token(24, &["read"]))).await {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status().as_u16(), 429);
            assert!(response.headers().contains_key("retry-after"));
            let body = response
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).to_string())
                .unwrap_or_default();
            assert!(body.contains("WebSocket connections"), "{body}");
        }
        Err(e) => panic!("expected a 429 refusal, got {e}"),
        Ok(_) => panic!("the fourth socket was accepted past WS_MAX_CONNECTIONS=3"),
    }
    assert_eq!(app.state.events.connection_count(), 3);
    // A closed socket frees its place.
    let mut first = open.remove(0);
    first.close(None).await.expect("close");
    let _replacement = eventually(Duration::from_secs(10), "a socket is accepted", || async {
        connect_async(feed_url(&app, "tasks", &app.token(24, &["read"])))
            .await
            .ok()
            .map(|(ws, _)| ws)
    })
    .await;
    assert_eq!(app.state.events.connection_count(), 3);
}

async fn openapi_status(app: &TestApp) -> StatusCode {
    let resp = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .expect("request");
    StatusCode::from_u16(resp.status().as_u16()).expect("status")
}

#[tokio::test]
async fn openapi_json_is_private_in_production_unless_swagger_is_on() {
    let prod = TestApp::spawn_with(&[("ENVIRONMENT", "production")]).await;
    assert_eq!(openapi_status(&prod).await, StatusCode::NOT_FOUND);
    drop(prod);
    let prod_swagger =
        TestApp::spawn_with(&[("ENVIRONMENT", "production"), ("ENABLE_SWAGGER", "true")]).await;
    assert_eq!(openapi_status(&prod_swagger).await, StatusCode::OK);
    drop(prod_swagger);
    let dev = TestApp::spawn().await;
    assert_eq!(openapi_status(&dev).await, StatusCode::OK);
    drop(dev);
    let dev_no_swagger = TestApp::spawn_with(&[("ENABLE_SWAGGER", "false")]).await;
    assert_eq!(openapi_status(&dev_no_swagger).await, StatusCode::OK);
}

#[tokio::test]
async fn requests_refused_with_401_are_not_charged_to_the_droplet_their_token_names() {
    const LIMIT: usize = 5;
    let app = TestApp::spawn_with(&[("RATE_LIMIT_PER_MINUTE", "5")]).await;
    let now = chrono::Utc::now().timestamp();
    let claims = json!({"droplet_id": 7, "steward": "tests", "permissions": ["read", "write"], "iat": now, "exp": now + 3600});
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-orchestrator-secret-0123456789"),
    )
    .expect("sign");
    let expired = sign(
        json!({"droplet_id": 7, "permissions": ["read"], "iat": now - 7200, "exp": now - 3600}),
    );
    let real = app.token(7, &["read", "write"]);

    let client = reqwest::Client::new();
    let mut statuses = Vec::new();
    for round in 0..4 {
        // A forged and an expired bearer token naming droplet 7.
        for bad in [&forged, &expired] {
            let r = client
                .get(app.url("/tasks"))
                .bearer_auth(bad)
                .send()
                .await
                .unwrap();
            statuses.push((round, "bearer", r.status().as_u16()));
        }
        // Droplet 7's real token in `?token=` on a REST path, which reads only the header.
        let r = client
            .get(app.url(&format!("/tasks?token={real}")))
            .send()
            .await
            .unwrap();
        statuses.push((round, "query on REST", r.status().as_u16()));
        // A forged `?token=` on a WebSocket feed (a plain GET: refused before any upgrade).
        let r = client
            .get(app.url(&format!("/ws/tasks?token={forged}")))
            .send()
            .await
            .unwrap();
        statuses.push((round, "query on /ws", r.status().as_u16()));
    }
    assert!(
        statuses.iter().all(|(_, _, s)| *s == 401 || *s == 429),
        "{statuses:?}"
    );
    assert!(
        statuses[..LIMIT].iter().all(|(_, _, s)| *s == 401),
        "the first refusals are 401s: {statuses:?}"
    );
    assert!(
        statuses.iter().any(|(_, _, s)| *s == 429),
        "the refused requests drew from the client address's bucket: {statuses:?}"
    );

    // Droplet 7's own bucket is whole: LIMIT requests pass, the next one waits.
    for i in 0..LIMIT {
        let (s, body) = app.get("/tasks", &real).await;
        assert_eq!(s, StatusCode::OK, "droplet 7's request {i}: {body}");
    }
    let (s, _) = app.get("/tasks", &real).await;
    assert_eq!(
        s,
        StatusCode::TOO_MANY_REQUESTS,
        "droplet 7's bucket holds {LIMIT}"
    );
}
