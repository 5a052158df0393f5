//! Operations: rate limits, body limit, CORS, trace ids and security headers, Prometheus.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::future::join_all;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::*;

/// One request's status, headers and JSON body.
async fn call(
    app: &TestApp,
    method: Method,
    path: &str,
    token: Option<&str>,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let mut req = app.client.request(method, app.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("request sent");
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn assert_rate_limited(status: StatusCode, headers: &reqwest::header::HeaderMap, body: &Value) {
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let retry: u64 = headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(body["detail"], "Rate limit exceeded", "{body}");
    assert!(headers.contains_key("x-trace-id"), "429 without X-Trace-Id");
}

#[tokio::test]
async fn the_101st_request_of_a_droplet_in_a_minute_is_429_while_another_droplet_is_served() {
    // The spec's quota (the test harness raises it for every other test).
    let app = TestApp::spawn_with(&[("RATE_LIMIT_PER_MINUTE", "100")]).await;
    let me = app.token(5, &["read"]);
    let started = Instant::now();
    // The whole minute's quota is available at once: 100 requests in a burst all pass.
    for chunk in 0..5 {
        let calls = (0..20).map(|_| call(&app, Method::GET, "/tasks?limit=1", Some(&me)));
        for (i, (status, _, body)) in join_all(calls).await.into_iter().enumerate() {
            assert_eq!(
                status,
                StatusCode::OK,
                "request {}: {body}",
                chunk * 20 + i + 1
            );
        }
    }
    // The quota refills one request per 600 ms; whatever refilled while the burst ran may
    // pass, and no more.
    let refilled = (started.elapsed().as_millis() / 600) as usize;
    let mut extra = 0;
    let (status, headers, body) = loop {
        let (status, headers, body) = call(&app, Method::GET, "/tasks?limit=1", Some(&me)).await;
        if status != StatusCode::OK {
            break (status, headers, body);
        }
        extra += 1;
        assert!(
            extra <= refilled + 1,
            "{extra} requests past the quota were served"
        );
    };
    assert_rate_limited(status, &headers, &body);

    // Another droplet, from the same address, is served at once; so is an anonymous client.
    let (status, _, body) = call(
        &app,
        Method::GET,
        "/tasks?limit=1",
        Some(&app.token(6, &["read"])),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, body) = call(&app, Method::GET, "/state", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // And the flooding droplet stays refused.
    let (status, headers, body) = call(&app, Method::GET, "/tasks?limit=1", Some(&me)).await;
    if status != StatusCode::OK {
        assert_rate_limited(status, &headers, &body);
    }
}

#[tokio::test]
async fn requests_without_a_token_are_limited_by_address_and_health_stays_free() {
    let app = TestApp::spawn_with(&[("RATE_LIMIT_PER_MINUTE", "5")]).await;
    for i in 0..5 {
        let (status, _, body) = call(&app, Method::GET, "/state", None).await;
        assert_eq!(status, StatusCode::OK, "request {i}: {body}");
    }
    let (status, headers, body) = call(&app, Method::GET, "/state", None).await;
    assert_rate_limited(status, &headers, &body);
    // A bad token counts against the address too (it cannot pick a fresh bucket).
    let (status, headers, body) = call(&app, Method::GET, "/tasks", Some("not-a-token")).await;
    assert_rate_limited(status, &headers, &body);
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"droplet_id": 77, "permissions": ["read"], "exp": chrono::Utc::now().timestamp() + 60}),
        &jsonwebtoken::EncodingKey::from_secret(b"some other secret"),
    )
    .unwrap();
    let (status, _, _) = call(&app, Method::GET, "/tasks", Some(&forged)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // A droplet with a valid token has its own bucket.
    let (status, _, body) = call(&app, Method::GET, "/tasks", Some(&app.token(5, &["read"]))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for _ in 0..20 {
        let (status, _, _) = call(&app, Method::GET, "/health", None).await;
        assert_eq!(status, StatusCode::OK);
    }
}

#[tokio::test]
async fn a_reloaded_rate_limit_applies_to_the_next_request() {
    let app = TestApp::spawn().await;
    let me = app.token(5, &["read"]);
    let mut env = app.env.clone();
    env.insert("RATE_LIMIT_PER_MINUTE".into(), "3".into());
    app.state.replace_config(config_from(&env));
    for i in 0..3 {
        let (status, _, body) = call(&app, Method::GET, "/tasks", Some(&me)).await;
        assert_eq!(status, StatusCode::OK, "request {i}: {body}");
    }
    let (status, headers, body) = call(&app, Method::GET, "/tasks", Some(&me)).await;
    assert_rate_limited(status, &headers, &body);
}

#[tokio::test]
async fn the_11th_broadcast_in_a_minute_is_429() {
    let app = TestApp::spawn_with(&[("RATE_LIMIT_PER_MINUTE", "1000")]).await;
    let admin = app.admin();
    let broadcast = |token: String| {
        let app = &app;
        async move {
            let resp = app
                .client
                .post(app.url("/broadcast?message_type=event"))
                .bearer_auth(token)
                .json(&envelope(json!({"notice": "hello"})))
                .send()
                .await
                .expect("request sent");
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = resp.json::<Value>().await.unwrap_or(Value::Null);
            (status, headers, body)
        }
    };
    for i in 0..10 {
        let (status, _, body) = broadcast(admin.clone()).await;
        assert_ne!(
            status,
            StatusCode::TOO_MANY_REQUESTS,
            "broadcast {}: {body}",
            i + 1
        );
    }
    let (status, headers, body) = broadcast(admin.clone()).await;
    assert_rate_limited(status, &headers, &body);
    // The broadcast limit is per caller too, and other endpoints are unaffected.
    let other_admin = token(2, &["read", "write", "admin"]);
    let (status, _, body) = broadcast(other_admin).await;
    assert_ne!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let (status, _, body) = call(&app, Method::GET, "/tasks", Some(&admin)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn a_2_mib_body_is_413_in_the_contract_shape() {
    let app = TestApp::spawn().await;
    let big = "x".repeat(2 * 1024 * 1024);
    let body = envelope(json!({"task_type": "verify", "title": "big", "payload": {"blob": big}}));
    for token in [Some(app.token(5, &["read", "write"])), None] {
        let mut req = app.client.post(app.url("/tasks")).json(&body);
        if let Some(t) = &token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("request sent");
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(resp.headers().contains_key("x-trace-id"));
        let body: Value = resp.json().await.expect("json body");
        assert_eq!(body["detail"], "Request body too large", "{body}");
    }
    let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM tasks")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(count, 0);
}

#[tokio::test]
async fn a_2_mib_chunked_body_without_a_length_is_413_too() {
    let app = TestApp::spawn().await;
    let mut stream = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /tasks HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        app.addr,
        app.token(5, &["read", "write"])
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b' '; 64 * 1024];
    for _ in 0..32 {
        let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
        frame.extend_from_slice(&chunk);
        frame.extend_from_slice(b"\r\n");
        // The server may answer and close before the whole body is sent.
        if stream.write_all(&frame).await.is_err() {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("Request body too large"), "{text}");
}

async fn preflight(app: &TestApp, origin: &str) -> reqwest::Response {
    app.client
        .request(Method::OPTIONS, app.url("/tasks"))
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization,content-type",
        )
        .send()
        .await
        .expect("preflight sent")
}

#[tokio::test]
async fn cors_preflight_from_an_allowed_origin_passes_and_from_another_is_refused() {
    let app = TestApp::spawn_with(&[("CORS_ORIGINS", "https://dash.example")]).await;
    let ok = preflight(&app, "https://dash.example").await;
    assert!(ok.status().is_success(), "{}", ok.status());
    let h = ok.headers();
    assert_eq!(h["access-control-allow-origin"], "https://dash.example");
    let methods = h["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_ascii_uppercase();
    assert!(methods.contains("POST"), "{methods}");
    let allowed_headers = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        allowed_headers.contains("authorization"),
        "{allowed_headers}"
    );
    assert!(h.contains_key("x-trace-id"), "preflight without X-Trace-Id");
    assert!(!h.contains_key("access-control-allow-credentials"));

    let refused = preflight(&app, "https://evil.example").await;
    assert!(
        !refused
            .headers()
            .contains_key("access-control-allow-origin"),
        "{:?}",
        refused.headers()
    );

    // An actual request from the allowed origin can read the response and its trace id.
    let resp = app
        .client
        .get(app.url("/health"))
        .header("Origin", "https://dash.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://dash.example"
    );
    let exposed = resp.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(exposed.contains("x-trace-id"), "{exposed}");
}

#[tokio::test]
async fn cors_allows_nothing_when_unset_and_never_a_wildcard_with_credentials() {
    let app = TestApp::spawn().await;
    let resp = preflight(&app, "https://dash.example").await;
    assert!(!resp.headers().contains_key("access-control-allow-origin"));
    drop(app);

    let app = TestApp::spawn_with(&[
        ("CORS_ORIGINS", r#"["https://dash.example"]"#),
        ("CORS_ALLOW_CREDENTIALS", "true"),
    ])
    .await;
    let resp = preflight(&app, "https://dash.example").await;
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://dash.example"
    );
    assert_eq!(resp.headers()["access-control-allow-credentials"], "true");
    let resp = preflight(&app, "https://evil.example").await;
    assert!(!resp.headers().contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn every_response_carries_a_trace_id_and_the_security_headers() {
    let app = TestApp::spawn_with(&[("RATE_LIMIT_PER_MINUTE", "2")]).await;
    let resp = app
        .client
        .get(app.url("/no/such/route"))
        .header("X-Trace-Id", "trace-abc")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(resp.headers()["x-trace-id"], "trace-abc");
    let h = resp.headers().clone();
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["x-frame-options"], "DENY");
    assert!(h.contains_key("content-security-policy"));
    assert_eq!(resp.json::<Value>().await.unwrap()["detail"], "Not found");

    let me = app.token(5, &["read"]);
    for path in ["/tasks", "/tasks", "/tasks"] {
        let (_, headers, _) = call(&app, Method::GET, path, Some(&me)).await;
        assert!(headers.contains_key("x-trace-id"));
    }
    let (status, headers, _) = call(&app, Method::GET, "/tasks", Some(&me)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(headers.contains_key("x-trace-id"));
    assert_eq!(headers["x-content-type-options"], "nosniff");
}

/// A Prometheus sample line `name{label="value",...} value [timestamp]`, parsed strictly.
fn parse_sample(line: &str) -> Result<(String, HashMap<String, String>, f64), String> {
    let is_name = |s: &str, colon: bool| {
        !s.is_empty()
            && s.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic()
                    || c == '_'
                    || (colon && c == ':')
                    || (i > 0 && c.is_ascii_digit())
            })
    };
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    if !is_name(name, true) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut labels = HashMap::new();
    let mut rest = &line[name_end..];
    if let Some(mut inner) = rest.strip_prefix('{') {
        loop {
            if let Some(after) = inner.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = inner.find('=').ok_or("label without =")?;
            let key = &inner[..eq];
            if !is_name(key, false) {
                return Err(format!("bad label name {key:?}"));
            }
            let quoted = inner[eq + 1..]
                .strip_prefix('"')
                .ok_or("label value not quoted")?;
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let end = loop {
                match chars.next() {
                    None => return Err("unterminated label value".into()),
                    Some((_, '\\')) => value.push(chars.next().ok_or("bad escape")?.1),
                    Some((i, '"')) => break i,
                    Some((_, c)) => value.push(c),
                }
            };
            labels.insert(key.to_string(), value);
            inner = &quoted[end + 1..];
            if let Some(after) = inner.strip_prefix(',') {
                inner = after;
            } else if !inner.starts_with('}') {
                return Err("expected , or } after a label".into());
            }
        }
    }
    let mut fields = rest
        .strip_prefix(' ')
        .ok_or("no space before the value")?
        .split(' ');
    let value = fields.next().unwrap_or_default();
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".into());
    }
    let number = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse::<f64>().map_err(|_| format!("bad value {v:?}"))?,
    };
    Ok((name.to_string(), labels, number))
}

async fn scrape(app: &TestApp) -> Vec<(String, HashMap<String, String>, f64)> {
    let resp = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain"), "{ct}");
    let text = resp.text().await.unwrap();
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| parse_sample(l).unwrap_or_else(|e| panic!("not Prometheus text: {l:?}: {e}")))
        .collect()
}

fn sample(
    samples: &[(String, HashMap<String, String>, f64)],
    name: &str,
    labels: &[(&str, &str)],
) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
        .sum()
}

#[test]
fn the_sample_parser_rejects_what_is_not_prometheus_text() {
    assert!(parse_sample(r#"a_total{route="/x",status="200"} 3"#).is_ok());
    assert!(parse_sample(r#"a{q="a \"b\" c"} 1.5e-3"#).is_ok());
    assert!(parse_sample("up 1").is_ok());
    assert!(parse_sample(r#"b_bucket{le="+Inf"} +Inf"#).is_ok());
    for bad in [
        "{x=\"1\"} 1",
        "a{x=1} 1",
        "a{x=\"1\" 1",
        "a 1x",
        "a",
        "1a 2",
        "a{x=\"1\"}1",
        "{\"detail\":\"x\"}",
    ] {
        assert!(parse_sample(bad).is_err(), "accepted {bad:?}");
    }
    let (name, labels, value) = parse_sample(r#"a{x="1",y="two"} 4"#).unwrap();
    assert_eq!(
        (name.as_str(), labels["y"].as_str(), value),
        ("a", "two", 4.0)
    );
}

#[tokio::test]
async fn metrics_is_prometheus_text_and_moves_when_a_task_is_created() {
    let app = TestApp::spawn().await;
    let before = scrape(&app).await;
    assert!(before
        .iter()
        .any(|(n, _, _)| n == "orchestrator_db_pool_connections"));
    app.create_task(5, task_payload("counted")).await;
    let after = scrape(&app).await;
    let created = |s: &[_]| sample(s, "orchestrator_tasks_created_total", &[]);
    assert_eq!(created(&after), created(&before) + 1.0);
    assert_eq!(
        sample(&after, "orchestrator_tasks", &[("status", "pending")]),
        sample(&before, "orchestrator_tasks", &[("status", "pending")]) + 1.0
    );
    assert!(
        sample(
            &after,
            "orchestrator_http_requests_total",
            &[("route", "/tasks"), ("method", "POST"), ("status", "201")]
        ) >= 1.0,
        "request counter by route and status"
    );
    assert!(
        sample(
            &after,
            "orchestrator_http_request_duration_seconds_count",
            &[("route", "/tasks"), ("method", "POST")]
        ) >= 1.0
    );
    assert_eq!(
        sample(
            &after,
            "orchestrator_db_pool_connections",
            &[("state", "max")]
        ),
        4.0
    );
}

#[tokio::test]
async fn metrics_is_404_when_disabled() {
    let app = TestApp::spawn_with(&[("ENABLE_METRICS", "false")]).await;
    let (status, _, body) = call(&app, Method::GET, "/metrics", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}
