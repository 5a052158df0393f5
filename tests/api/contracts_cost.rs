//! What a capability contract may cost (issue 24, finding 1): patterns the linear-time engine
//! cannot run and schemas over the caps are refused at registration; hostile patterns stored
//! before that rule stall neither `/health` nor explain; one routing pass evaluates each
//! contract once per task, droplets sharing a schema text sharing the evaluation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use orchestrator::services::contract_directory::ContractDirectory;
use orchestrator::services::task_router::route_pass;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;

async fn register_with(
    app: &TestApp,
    id: i32,
    endpoint: &str,
    schemas: Value,
) -> (StatusCode, Value) {
    app.post(
        "/droplets/register",
        &app.token(id, &["read", "write"]),
        json!({
            "droplet_id": id, "name": format!("droplet-{id}"), "steward": "tests",
            "endpoint": endpoint, "capabilities": ["verify", "ocr"], "capability_schemas": schemas,
        }),
    )
    .await
}

async fn post_task(app: &TestApp, payload: Value) -> (StatusCode, Value) {
    app.post(
        "/tasks",
        &app.token(5, &["read", "write"]),
        json!({"task_type": "verify", "title": "cost", "required_capability": "verify",
               "payload": payload}),
    )
    .await
}

/// `orchestrator_contract_evaluations_total` for a site, as `/metrics` shows it.
async fn evaluations(app: &TestApp, site: &str) -> u64 {
    let text = reqwest::get(app.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = format!("orchestrator_contract_evaluations_total{{site=\"{site}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// `GET url` every 10 ms, on a thread and runtime of its own, until `stop` (10 times at least):
/// each answer's latency.
fn measure_health(url: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<Duration>> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let client = reqwest::Client::new();
            let mut took = Vec::new();
            while !stop.load(Ordering::SeqCst) || took.len() < 10 {
                let started = Instant::now();
                let r = client.get(&url).send().await.expect("health answers");
                assert!(r.status().is_success(), "{}", r.status());
                took.push(started.elapsed());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            took
        })
    })
}

#[tokio::test]
async fn patterns_the_linear_engine_cannot_run_and_schemas_over_the_caps_are_refused() {
    let app = TestApp::spawn().await;
    let server = DropletServer::start(Behaviour::Ok).await;
    // The pattern, and a look-around hidden in `patternProperties`.
    let (s, b) = register_with(
        &app,
        21,
        &server.endpoint,
        json!({
            "verify": {"type": "object", "properties": {"s": {"type": "string", "pattern": "(a*)*\\1b"}}},
            "ocr": {"type": "object", "patternProperties": {"^(?!x)": {"type": "string"}}},
        }),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    let detail = b["detail"].as_array().unwrap_or_else(|| panic!("{b}"));
    assert_eq!(detail.len(), 2, "{b}");
    for (capability, pointer, why) in [
        ("verify", "/properties/s/pattern", "backreferences"),
        ("ocr", "/patternProperties/^(?!x)", "look-around"),
    ] {
        let e = detail
            .iter()
            .find(|e| e["loc"][3] == capability)
            .unwrap_or_else(|| panic!("{capability}: {b}"));
        assert_eq!(e["type"], "schema_invalid", "{b}");
        let msg = e["msg"].as_str().unwrap();
        for part in [capability, pointer, why] {
            assert!(msg.contains(part), "{part:?} named: {msg}");
        }
    }
    // The caps: patterns per schema and nesting, each its own clear 422.
    let many: serde_json::Map<String, Value> = (0..=32)
        .map(|i| (format!("p{i}"), json!({"pattern": "^a"})))
        .collect();
    let mut deep = json!({"type": "string"});
    for _ in 0..32 {
        deep = json!({ "items": deep });
    }
    for (schema, why) in [
        (
            json!({"properties": many}),
            "more than 32 regular expressions",
        ),
        (deep, "nests deeper than 32 levels"),
    ] {
        let (s, b) = register_with(&app, 21, &server.endpoint, json!({ "verify": schema })).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
        assert!(b["detail"][0]["msg"].as_str().unwrap().contains(why), "{b}");
    }
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM droplets")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(rows, 0, "nothing registered");

    // A pattern the dialect runs registers and is enforced, on long payloads too.
    let (s, b) = register_with(
        &app,
        21,
        &server.endpoint,
        json!({"verify": {"type": "object", "additionalProperties": {"type": "string", "pattern": "^(a*)*b$"}}}),
    )
    .await;
    assert!(s.is_success(), "{b}");
    app.pause_routing().await;
    let matching: serde_json::Map<String, Value> = (0..600)
        .map(|i| (format!("k{i}"), json!(format!("{}b", "a".repeat(34)))))
        .collect();
    let (s, b) = post_task(&app, Value::Object(matching.clone())).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let mut failing = matching;
    failing.insert("bad".into(), json!("a".repeat(34)));
    let (s, b) = post_task(&app, Value::Object(failing)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(
        b["detail"][0]["loc"],
        json!(["body", "payload", "payload", "bad"]),
        "{b}"
    );
}

/// Contracts stored before patterns were refused (a droplet registered by an older version):
/// they no longer compile, so they refuse every payload without running a regex, and the
/// work is off the async workers anyway. The old code ran `(.*)*\1#` by backtracking to its
/// limit on every string, on the async workers: explain took seconds and `/health` waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_hostile_patterns_stall_neither_health_nor_explain() {
    let app = TestApp::spawn().await;
    let server = DropletServer::start(Behaviour::Ok).await;
    app.pause_routing().await;
    let strings: serde_json::Map<String, Value> = (0..100)
        .map(|i| (format!("k{i}"), json!("x".repeat(30))))
        .collect();
    let (s, b) = post_task(&app, Value::Object(strings.clone())).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let task = b["payload"]["task_id"].as_i64().unwrap();
    for id in 31..=33 {
        let (s, b) = register_with(
            &app,
            id,
            &server.endpoint,
            json!({"verify": {"type": "object"}}),
        )
        .await;
        assert!(s.is_success(), "{b}");
        let hostile = json!({"verify": {"type": "object",
            "additionalProperties": {"type": "string", "pattern": format!("(.*)*\\1#{id}")}}});
        sqlx::query("UPDATE droplets SET capability_schemas = $1 WHERE droplet_id = $2")
            .bind(&hostile)
            .bind(id)
            .execute(&app.db)
            .await
            .unwrap();
    }
    // Written behind the service's back: loaded as a start (or a reconnect) would load them.
    ContractDirectory::reload(&app.state.directory, &app.state.db, &app.state.contracts)
        .await
        .expect("directory loaded");
    // `/health` timed from a thread of its own: a client on the app's runtime would only
    // start its clock once a stalled worker let it run.
    let stop = Arc::new(AtomicBool::new(false));
    let health = measure_health(app.url("/health"), stop.clone());
    let (url, token) = (
        app.url(&format!("/tasks/{task}/explain")),
        app.token(7, &["read"]),
    );
    let explained = futures::future::join_all((0..3).map(|_| async {
        let started = Instant::now();
        let r = app
            .client
            .get(&url)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        (status, body, started.elapsed())
    }))
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut health = health.join().expect("health thread");
    // Loose for a shared machine: one scheduling hiccup is forgiven, a stall is not.
    health.sort();
    assert!(
        health[health.len() - 2] < Duration::from_millis(50),
        "{health:?}"
    );
    assert!(
        health[health.len() - 1] < Duration::from_millis(500),
        "{health:?}"
    );
    for (status, body, took) in explained {
        assert_eq!(status, StatusCode::OK, "{body}");
        let e = &body["payload"];
        assert_eq!(e["reason"], "routing_paused", "{e}");
        for c in e["candidates"].as_array().unwrap() {
            assert!(c["why_not"].as_str().unwrap().contains("contract"), "{e}");
        }
        // Loose: the old code took seconds per call; this one milliseconds.
        assert!(took < Duration::from_secs(1), "explain took {took:?}");
    }
    // Creation and routing refuse them as quickly.
    let started = Instant::now();
    let (s, b) = post_task(&app, Value::Object(strings)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert!(
        b["detail"][0]["msg"]
            .as_str()
            .unwrap()
            .contains("does not compile"),
        "{b}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(route_pass(&app.state.routing()).await.unwrap(), 0);
}

#[tokio::test]
async fn each_contract_is_evaluated_once_per_task_droplets_sharing_its_text_included() {
    let app = TestApp::spawn().await;
    let server = DropletServer::start(Behaviour::Ok).await;
    let shared = json!({"verify": {"type": "object", "required": ["language"]}});
    let other = json!({"verify": {"type": "object", "required": ["code_url"]}});
    for (id, schemas) in [(11, &shared), (12, &shared), (13, &shared), (14, &other)] {
        let (s, b) = register_with(&app, id, &server.endpoint, schemas.clone()).await;
        assert!(s.is_success(), "{b}");
    }
    app.pause_routing().await;
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (s, b) = post_task(&app, json!({"language": "rust"})).await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        tasks.push(b["payload"]["task_id"].as_i64().unwrap());
    }
    // Creation stops at the first accepting contract: one or two of the two texts a task.
    let created = evaluations(&app, "creation").await;
    assert!((2..=4).contains(&created), "creation evaluated {created}");
    // Explain: four candidates, two schema texts, two evaluations.
    let (s, b) = app
        .get(
            &format!("/tasks/{}/explain", tasks[0]),
            &app.token(7, &["read"]),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(
        b["payload"]["candidates"].as_array().map(Vec::len),
        Some(4),
        "{b}"
    );
    assert_eq!(evaluations(&app, "explain").await, 2);
    // One pass: two tasks, each against the two texts once, though four droplets are
    // considered for each task, twice (the choice and the record of the candidates).
    assert_eq!(evaluations(&app, "routing").await, 0);
    assert_eq!(route_pass(&app.state.routing()).await.unwrap(), 2);
    assert_eq!(evaluations(&app, "routing").await, 4);
    for task in tasks {
        let (status, droplet) = app.holder(task as i32).await;
        assert_eq!(status, "assigned");
        assert!(matches!(droplet, Some(11..=13)), "{droplet:?}");
    }
}
