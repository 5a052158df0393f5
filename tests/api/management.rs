//! The management API: admin only, live reload, emergency stop and its end, graceful
//! shutdown, cache clearing.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::*;

const ENDPOINTS: [(&str, &str); 8] = [
    ("GET", "/management/scheduler/jobs"),
    ("POST", "/management/scheduler/jobs/task_router/pause"),
    ("POST", "/management/scheduler/jobs/task_router/resume"),
    ("POST", "/management/reload-config"),
    ("POST", "/management/shutdown"),
    ("POST", "/management/emergency-stop"),
    ("POST", "/management/cache/clear"),
    ("POST", "/management/scheduler/jobs/nope/pause"),
];

async fn admin_post(app: &TestApp, path: &str) -> (StatusCode, Value) {
    app.post(path, &app.admin(), json!({})).await
}

async fn health_status(app: &TestApp) -> Value {
    let (s, body) = app.request(Method::GET, "/health", None, None).await;
    assert_eq!(s, StatusCode::OK);
    body
}

#[tokio::test]
async fn management_endpoints_are_for_admins_only() {
    let app = TestApp::spawn().await;
    let writer = app.token(5, &["read", "write"]);
    for (method, path) in ENDPOINTS {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let body = (method == Method::POST).then(|| envelope(json!({})));
        let (s, b) = app.request(method.clone(), path, None, body.clone()).await;
        assert_eq!(
            s,
            StatusCode::UNAUTHORIZED,
            "{method} {path} without a token: {b}"
        );
        let (s, b) = app.request(method.clone(), path, Some(&writer), body).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{method} {path} as a writer: {b}");
        assert!(b["detail"].as_str().unwrap().contains("admin"), "{b}");
    }
    // Nothing happened.
    assert!(!app.state.shutdown.is_cancelled());
    assert!(!app.state.emergency_stopped());
    assert!(!app.state.jobs.is_paused(JobId::TaskRouter));
    // The version stays public.
    let (s, b) = app
        .request(Method::GET, "/management/version", None, None)
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
}

#[tokio::test]
async fn reload_config_changes_the_router_interval_live() {
    let app = TestApp::spawn_with(&[("TASK_ROUTER_INTERVAL", "3600")]).await;
    let mut vars = app.env.clone();
    vars.insert("TASK_ROUTER_INTERVAL".into(), "1".into());
    vars.insert("LOG_LEVEL".into(), "ERROR".into());
    vars.insert("CORS_ORIGINS".into(), "https://dash.example".into());
    vars.insert("PORT".into(), "9999".into());
    app.state.config_source.set_fixed(Some(vars.clone()));

    // Without a body, and with an envelope.
    let (s, body) = app
        .request(
            Method::POST,
            "/management/reload-config",
            Some(&app.admin()),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let p = &body["payload"];
    let changed: Vec<&str> = p["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["setting"].as_str().unwrap())
        .collect();
    assert_eq!(
        changed,
        ["CORS_ORIGINS", "LOG_LEVEL", "PORT", "TASK_ROUTER_INTERVAL"]
    );
    let interval = p["changed"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["setting"] == "TASK_ROUTER_INTERVAL")
        .unwrap();
    assert_eq!(
        (interval["from"].as_str(), interval["to"].as_str()),
        (Some("3600"), Some("1"))
    );
    assert_eq!(
        p["applied"],
        json!(["CORS_ORIGINS", "LOG_LEVEL", "TASK_ROUTER_INTERVAL"])
    );
    assert_eq!(p["restart_required"], json!(["PORT"]));
    assert_eq!(p["rescheduled_jobs"], json!(["task_router"]));
    let config = app.state.config();
    assert_eq!(config.task_router_interval, 1);
    assert_eq!(config.port, 0, "the port waits for a restart");

    // The job now runs every second.
    app.wait_job_runs(JobId::TaskRouter, 2, Duration::from_secs(10))
        .await;
    let (s, body) = app.get("/management/scheduler/jobs", &app.admin()).await;
    assert_eq!(s, StatusCode::OK);
    let router = body["payload"]["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == "task_router")
        .unwrap()
        .clone();
    assert_eq!(router["interval_seconds"], 1);

    // The new CORS origin is allowed at once.
    let resp = app
        .client
        .request(Method::OPTIONS, app.url("/tasks"))
        .header("Origin", "https://dash.example")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap()),
        Some("https://dash.example")
    );

    // The same settings again: nothing new to apply; the port still waits for a restart.
    let (s, body) = admin_post(&app, "/management/reload-config").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["payload"]["applied"], json!([]));
    assert_eq!(body["payload"]["restart_required"], json!(["PORT"]));
    assert_eq!(body["payload"]["rescheduled_jobs"], json!([]));
}

#[tokio::test]
async fn an_invalid_reload_changes_nothing() {
    let app = TestApp::spawn_with(&[("TASK_ROUTER_INTERVAL", "3600")]).await;
    let mut vars = app.env.clone();
    vars.insert("TASK_ROUTER_INTERVAL".into(), "1".into());
    vars.insert("HEARTBEAT_TIMEOUT".into(), "soon".into());
    app.state.config_source.set_fixed(Some(vars));
    let (s, body) = admin_post(&app, "/management/reload-config").await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(
        body["detail"][0]["loc"],
        json!(["env", "HEARTBEAT_TIMEOUT"])
    );
    assert_eq!(app.state.config().task_router_interval, 3600);
    assert_eq!(
        app.state
            .jobs
            .get(JobId::TaskRouter)
            .unwrap()
            .interval_seconds,
        3600
    );
}

#[tokio::test]
async fn an_emergency_stop_halts_routing_until_the_router_is_resumed() {
    let app = TestApp::spawn().await;
    let server = DropletServer::start(Behaviour::Ok).await;
    app.register(60, &["e"], &server.endpoint).await;
    // The registration's own pass is over before the router stops.
    eventually(
        Duration::from_secs(3),
        "the registration's pass",
        || async { app.state.router.has_room_for(Some("e")).then_some(()) },
    )
    .await;
    // Paused by hand before the stop: stays paused after it.
    let (s, _) = admin_post(&app, "/management/scheduler/jobs/heartbeat_cleanup/pause").await;
    assert_eq!(s, StatusCode::OK);

    let (s, body) = admin_post(&app, "/management/emergency-stop").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["payload"]["emergency_stop"], true);
    assert_eq!(
        body["payload"]["paused_jobs"],
        json!([
            "health_monitor",
            "task_router",
            "registry_sync",
            "websocket_ping"
        ])
    );
    let health = health_status(&app).await;
    assert_eq!(health["status"], "maintenance");
    assert!(health["message"]
        .as_str()
        .unwrap()
        .contains("Emergency stop"));
    let (s, body) = app.get("/management/scheduler/jobs", &app.admin()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["payload"]["emergency_stop"], true);
    assert!(body["payload"]["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|j| j["paused"] == true));

    // A round that began before the stop may still finish; none starts after it.
    eventually(
        Duration::from_secs(2),
        "no router round in flight",
        || async { (!app.state.jobs.get(JobId::TaskRouter).unwrap().running).then_some(()) },
    )
    .await;
    // Tasks are still recorded, and reads work; nothing is routed or dispatched.
    let id = app
        .create_task(
            5,
            json!({"task_type": "t", "title": "t", "required_capability": "e"}),
        )
        .await;
    assert_eq!(app.task(id).await["status"], "pending");
    let (s, _) = app.get("/droplets", &app.admin()).await;
    assert_eq!(s, StatusCode::OK);
    orchestrator::jobs::run_once(&app.state, JobId::TaskRouter)
        .await
        .unwrap();
    app.state.router.trigger();
    assert_eq!(app.holder(id).await.0, "pending");
    // Resuming another job does not end the stop.
    let (s, body) = admin_post(&app, "/management/scheduler/jobs/websocket_ping/resume").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["payload"]["emergency_stop"], true);
    assert_eq!(health_status(&app).await["status"], "maintenance");
    assert!(server.executed().is_empty());

    // Resuming the router ends it: the jobs the stop paused run again, the task moves.
    let (s, body) = admin_post(&app, "/management/scheduler/jobs/task_router/resume").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["payload"]["emergency_stop"], false);
    assert_eq!(body["payload"]["emergency_stop_ended"], true);
    assert_eq!(health_status(&app).await["status"], "active");
    app.wait_assigned(id, 60, Duration::from_secs(10)).await;
    eventually(
        Duration::from_secs(10),
        "execute_task delivered",
        || async { server.executed().contains(&(id as i64)).then_some(()) },
    )
    .await;
    for job in [
        JobId::HealthMonitor,
        JobId::TaskRouter,
        JobId::RegistrySync,
        JobId::WebsocketPing,
    ] {
        assert!(!app.state.jobs.is_paused(job), "{job} still paused");
    }
    assert!(app.state.jobs.is_paused(JobId::HeartbeatCleanup));
}

#[tokio::test]
async fn shutdown_answers_then_stops_the_server() {
    let app = TestApp::spawn().await;
    let (s, body) = admin_post(&app, "/management/shutdown").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["payload"]["shutting_down"], true);
    eventually(Duration::from_secs(10), "the server stopped", || async {
        let fresh = reqwest::Client::new();
        let gone = fresh.get(app.url("/health")).send().await.is_err();
        (app.state.shutdown.is_cancelled() && gone).then_some(())
    })
    .await;
}

#[tokio::test]
async fn cache_clear_empties_the_registry_cache_and_the_router_snapshot() {
    let app = TestApp::spawn().await;
    let server = DropletServer::start(Behaviour::Ok).await;
    app.register(61, &["c"], &server.endpoint).await;
    eventually(Duration::from_secs(10), "a room snapshot", || async {
        app.state.router.has_room_for(Some("c")).then_some(())
    })
    .await;
    sqlx::query(
        "INSERT INTO registry_directory (droplet_id, name, endpoint, raw)
         VALUES (8, 'Verifier', 'http://v', '{}'), (9, 'Other', 'http://o', '{}')",
    )
    .execute(&app.db)
    .await
    .unwrap();

    let (s, body) = admin_post(&app, "/management/cache/clear").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["payload"]["cleared"]["registry_directory"], 2);
    assert_eq!(body["payload"]["cleared"]["router_room_snapshot"], true);
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM registry_directory")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(left, 0);
    // The snapshot is rebuilt by the next pass.
    eventually(Duration::from_secs(10), "the snapshot rebuilt", || async {
        app.state.router.has_room_for(Some("c")).then_some(())
    })
    .await;
}
