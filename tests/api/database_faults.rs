//! The database going away while the service runs: a TCP proxy the test controls sits
//! between the app and PostgreSQL. Cut or silenced, requests answer 503 within a few
//! seconds; restored, they succeed again without anyone restarting anything.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::*;
use crate::proxy::Proxy;

async fn spawn_behind(proxy: &Proxy) -> TestApp {
    TestApp::spawn_on(
        &proxy.database_url(&format!("orch_test_{}", Uuid::new_v4().simple())),
        &[
            ("DATABASE_ACQUIRE_TIMEOUT_SECONDS", "1"),
            ("REQUEST_TIMEOUT_SECONDS", "10"),
        ],
    )
    .await
}

/// A request that needs the database, timed.
async fn list_tasks(app: &TestApp) -> (StatusCode, Value, Duration) {
    let started = Instant::now();
    let (status, body) = app
        .request(Method::GET, "/tasks", Some(&app.token(5, &["read"])), None)
        .await;
    (status, body, started.elapsed())
}

async fn assert_unavailable_quickly(app: &TestApp) {
    // More requests at once than the pool has connections: none may hang.
    let started = Instant::now();
    let write = app.token(5, &["write"]);
    let reads = (0..6).map(|_| list_tasks(app));
    let state = app.request(Method::GET, "/state", None, None);
    let create = app.post("/tasks", &write, task_payload("while down"));
    let (reads, state, create) = tokio::join!(futures::future::join_all(reads), state, create);
    for (status, body, took) in reads {
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["detail"], "Service unavailable", "{body}");
        assert!(took < Duration::from_secs(5), "took {took:?}");
    }
    assert_eq!(
        state.0,
        StatusCode::SERVICE_UNAVAILABLE,
        "/state: {}",
        state.1
    );
    assert_eq!(
        create.0,
        StatusCode::SERVICE_UNAVAILABLE,
        "POST /tasks: {}",
        create.1
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    // /health never needs the database.
    let (status, _) = app.request(Method::GET, "/health", None, None).await;
    assert_eq!(status, StatusCode::OK);
}

/// After the restore every request succeeds: no broken connection is handed out.
async fn assert_recovered(app: &TestApp) {
    let deadline = Instant::now() + Duration::from_secs(5);
    for i in 0..10 {
        let (status, body, _) = list_tasks(app).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "request {i} after the restore: {body}"
        );
        assert!(Instant::now() < deadline, "recovery took too long");
    }
    let (status, body) = app
        .post(
            "/tasks",
            &app.token(5, &["write"]),
            task_payload("after the restore"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

/// Uses several pool connections at once so the pool holds more than one when the cut comes.
async fn warm_up(app: &TestApp) {
    let token = app.token(5, &["read", "write"]);
    let reqs = (0..4).map(|i| app.post("/tasks", &token, task_payload(&format!("warm {i}"))));
    for (status, body) in futures::future::join_all(reqs).await {
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_database_is_503_within_seconds_and_recovers_by_itself() {
    let proxy = Proxy::start().await;
    let app = spawn_behind(&proxy).await;
    warm_up(&app).await;

    proxy.cut();
    assert_unavailable_quickly(&app).await;

    proxy.restore();
    assert_recovered(&app).await;
    let count = list_tasks(&app).await.1["payload"]["total"].clone();
    assert_eq!(
        count,
        json!(5),
        "nothing written while down, everything after"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_database_is_503_within_seconds_and_recovers_by_itself() {
    let proxy = Proxy::start().await;
    let app = spawn_behind(&proxy).await;
    warm_up(&app).await;

    proxy.stall();
    assert_unavailable_quickly(&app).await;

    proxy.restore();
    assert_recovered(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_outages_are_survived() {
    let proxy = Proxy::start().await;
    let app = spawn_behind(&proxy).await;
    for _ in 0..3 {
        warm_up(&app).await;
        proxy.cut();
        let (status, _, took) = list_tasks(&app).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(took < Duration::from_secs(5), "took {took:?}");
        proxy.restore();
        assert_recovered(&app).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_waiting_while_the_database_is_away_is_sent_once_it_is_back() {
    // The assignment timeout is an hour: only the delivery's own retries can bring it.
    let proxy = Proxy::start().await;
    let app = TestApp::spawn_on(
        &proxy.database_url(&format!("orch_test_{}", Uuid::new_v4().simple())),
        &[
            ("DATABASE_ACQUIRE_TIMEOUT_SECONDS", "1"),
            ("ASSIGNMENT_TIMEOUT_SECONDS", "3600"),
        ],
    )
    .await;
    let droplet = DropletServer::start(Behaviour::Error500).await;
    app.register(51, &["away"], &droplet.endpoint).await;
    let task = app
        .create_task(
            5,
            json!({"task_type": "t", "title": "waits", "required_capability": "away"}),
        )
        .await;
    eventually(Duration::from_secs(10), "a failed delivery", || async {
        (!droplet.executed().is_empty()).then_some(())
    })
    .await;
    // Its retry is read back from the database, which is away now: it waits, not dropped.
    proxy.cut();
    droplet.set(Behaviour::Ok);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let tries_while_away = droplet.executed().len();
    proxy.restore();
    eventually(
        Duration::from_secs(20),
        "the delivery after the outage",
        || async { (droplet.executed().len() > tries_while_away).then_some(()) },
    )
    .await;
    assert_eq!(droplet.executed().last(), Some(&(task as i64)));
}
