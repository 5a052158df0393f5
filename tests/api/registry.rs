//! The Registry client against a small Registry the test runs: every accepted directory
//! shape, droplets filled in without touching their status, the cache surviving a restart
//! with the Registry gone, garbage and slow answers changing nothing, and the public key.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{header, StatusCode as AxumStatus};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use orchestrator::services::registry_client;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::helpers::*;

/// What the test Registry answers at `/droplets`.
#[derive(Clone)]
struct Answer {
    status: u16,
    body: String,
    delay: Duration,
}

impl Answer {
    fn json(v: Value) -> Answer {
        Answer {
            status: 200,
            body: v.to_string(),
            delay: Duration::ZERO,
        }
    }
}

struct RegistryServer {
    url: String,
    directory: Arc<Mutex<Answer>>,
    public_key: Arc<Mutex<Option<String>>>,
    /// How many times the public key was asked for.
    key_requests: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl RegistryServer {
    async fn start(answer: Answer) -> RegistryServer {
        let directory = Arc::new(Mutex::new(answer));
        let public_key: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let key_requests = Arc::new(AtomicUsize::new(0));
        let (d, k, asked) = (directory.clone(), public_key.clone(), key_requests.clone());
        let app = Router::new()
            .route(
                "/droplets",
                get(move || {
                    let d = d.clone();
                    async move {
                        let a = d.lock().unwrap().clone();
                        tokio::time::sleep(a.delay).await;
                        (
                            AxumStatus::from_u16(a.status).unwrap(),
                            [(header::CONTENT_TYPE, "application/json")],
                            a.body,
                        )
                            .into_response()
                    }
                }),
            )
            .route(
                "/public-key",
                get(move || {
                    let k = k.clone();
                    asked.fetch_add(1, Ordering::SeqCst);
                    async move {
                        match k.lock().unwrap().clone() {
                            Some(pem) => (AxumStatus::OK, axum::Json(json!({"public_key": pem})))
                                .into_response(),
                            None => AxumStatus::NOT_FOUND.into_response(),
                        }
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        RegistryServer {
            url,
            directory,
            public_key,
            key_requests,
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    fn answer(&self, answer: Answer) {
        *self.directory.lock().unwrap() = answer;
    }

    /// Stops the server and waits until its port refuses connections.
    async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
        }
    }
}

fn directory() -> Value {
    json!([
        {"id": 8, "name": "Verifier (registry)", "steward": "Registry", "endpoint": "http://127.0.0.1:9/verifier", "capabilities": ["verify", "audit"]},
        {"droplet_id": "droplet-21", "name": "Registry only", "steward": "R", "url": "http://127.0.0.1:9/twenty-one", "capabilities": ["translate"]},
        {"droplet_id": 22, "name": "No endpoint"},
        {"name": "no id at all"}
    ])
}

async fn app_with(registry: &RegistryServer) -> TestApp {
    TestApp::spawn_with(&[
        ("REGISTRY_URL", &registry.url),
        ("REGISTRY_SYNC_INTERVAL", "3600"),
        ("DISPATCH_TIMEOUT_SECONDS", "1"),
    ])
    .await
}

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct Row {
    droplet_id: i32,
    name: String,
    steward: Option<String>,
    endpoint: String,
    capabilities: Value,
    status: String,
    registered: bool,
}

async fn droplet_rows(app: &TestApp) -> Vec<Row> {
    sqlx::query_as(
        "SELECT droplet_id, name, steward, endpoint, capabilities, status, registered
         FROM droplets ORDER BY droplet_id",
    )
    .fetch_all(&app.db)
    .await
    .unwrap()
}

async fn cached_ids(app: &TestApp) -> Vec<i32> {
    sqlx::query_scalar("SELECT droplet_id FROM registry_directory ORDER BY droplet_id")
        .fetch_all(&app.db)
        .await
        .unwrap()
}

async fn registry_dependency(app: &TestApp) -> Value {
    let (s, b) = app.request(Method::GET, "/dependencies", None, None).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b["required"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == 3)
        .cloned()
        .expect("the Registry is listed")
}

#[tokio::test]
async fn every_directory_shape_fills_in_droplets_without_touching_their_status() {
    let registry = RegistryServer::start(Answer::json(directory())).await;
    let app = app_with(&registry).await;
    // Droplet 8 registered itself and is live.
    app.register(8, &["verify"], "http://127.0.0.1:9/self-declared")
        .await;

    let list = directory();
    let shapes = [
        ("array", list.clone()),
        ("droplets object", json!({"droplets": list})),
        (
            "envelope around an array",
            json!({"udc_version": "1.0", "trace_id": "t", "source": 3, "message_type": "response", "payload": list}),
        ),
        (
            "envelope around a droplets object",
            json!({"udc_version": "1.0", "trace_id": "t", "source": 3, "message_type": "response", "payload": {"droplets": list}}),
        ),
    ];
    for (i, (shape, body)) in shapes.into_iter().enumerate() {
        // Each shape renames droplet 21, so each sync is seen to have read its answer.
        let mut body = body.to_string();
        body = body.replace("Registry only", &format!("Registry only {i}"));
        registry.answer(Answer {
            status: 200,
            body,
            delay: Duration::ZERO,
        });
        let synced = registry_client::Registry::from(&app.state.core)
            .run_once()
            .await;
        assert_eq!(synced, Ok(3), "{shape}");
        let rows = droplet_rows(&app).await;
        assert_eq!(
            rows,
            vec![
                Row {
                    droplet_id: 8,
                    name: "Verifier (registry)".into(),
                    steward: Some("Registry".into()),
                    endpoint: "http://127.0.0.1:9/verifier".into(),
                    capabilities: json!(["verify", "audit"]),
                    status: "active".into(),
                    registered: true,
                },
                Row {
                    droplet_id: 21,
                    name: format!("Registry only {i}"),
                    steward: Some("R".into()),
                    endpoint: "http://127.0.0.1:9/twenty-one".into(),
                    capabilities: json!(["translate"]),
                    status: "inactive".into(),
                    registered: false,
                },
            ],
            "{shape}"
        );
        assert_eq!(cached_ids(&app).await, [8, 21, 22], "{shape}");
    }
    let snapshot = app.state.registry.snapshot();
    assert_eq!(snapshot.status, "connected");
    assert_eq!(snapshot.droplets_known, 3);
    assert_eq!(snapshot.entries_skipped, 1);
    let dep = registry_dependency(&app).await;
    assert_eq!(dep["status"], "connected");
    assert!(dep["last_check"].is_string(), "{dep}");

    // Listed as inactive until it registers; then it is a live droplet of its own.
    let (_, b) = app.get("/droplets?status=inactive", &app.admin()).await;
    assert_eq!(b["payload"]["droplets"][0]["droplet_id"], 21);
    app.register(21, &["translate"], "http://127.0.0.1:9/own")
        .await;
    let rows = droplet_rows(&app).await;
    assert_eq!(
        (rows[1].status.as_str(), rows[1].registered),
        ("active", true)
    );
    // A later sync refreshes its details but never its status.
    registry_client::Registry::from(&app.state.core)
        .run_once()
        .await
        .unwrap();
    let rows = droplet_rows(&app).await;
    assert_eq!(rows[1].status, "active");
    assert_eq!(rows[1].endpoint, "http://127.0.0.1:9/twenty-one");
}

#[tokio::test]
async fn the_cached_directory_survives_a_restart_with_the_registry_down() {
    let mut registry = RegistryServer::start(Answer::json(json!({"droplets": directory()}))).await;
    let app = app_with(&registry).await;
    assert_eq!(
        registry_client::Registry::from(&app.state.core)
            .run_once()
            .await,
        Ok(3)
    );
    let before = droplet_rows(&app).await;
    registry.stop().await;

    let failed = registry_client::Registry::from(&app.state.core)
        .run_once()
        .await;
    assert!(failed.is_err(), "{failed:?}");
    let dep = registry_dependency(&app).await;
    assert_eq!(dep["status"], "disconnected");
    assert!(
        dep["last_error"].as_str().unwrap().contains("refused"),
        "{dep}"
    );
    assert_eq!(
        droplet_rows(&app).await,
        before,
        "a dead Registry changes nothing"
    );

    // A new orchestrator on the same database, the Registry still down.
    let again = TestApp::spawn_on(
        &app.database_url,
        &[
            ("REGISTRY_URL", &registry.url),
            ("REGISTRY_SYNC_INTERVAL", "3600"),
            ("DISPATCH_TIMEOUT_SECONDS", "1"),
        ],
    )
    .await;
    drop(app);
    let snapshot = eventually(Duration::from_secs(10), "start-up sync attempted", || {
        let s = again.state.registry.snapshot();
        async move { s.last_check.is_some().then_some(s) }
    })
    .await;
    assert_eq!(snapshot.status, "disconnected");
    assert_eq!(snapshot.droplets_known, 3, "known from the cache");
    assert_eq!(cached_ids(&again).await, [8, 21, 22]);
    let dep = registry_dependency(&again).await;
    assert_eq!(dep["status"], "disconnected");
    assert!(dep["last_check"].is_string());
    assert!(dep["last_error"].is_string());
    let (_, b) = again.get("/droplets", &again.admin()).await;
    let ids: Vec<i64> = b["payload"]["droplets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["droplet_id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [8, 21]);
}

#[tokio::test]
async fn a_garbage_failing_or_slow_registry_changes_nothing_and_is_reported() {
    let registry = RegistryServer::start(Answer::json(directory())).await;
    let app = app_with(&registry).await;
    assert_eq!(
        registry_client::Registry::from(&app.state.core)
            .run_once()
            .await,
        Ok(3)
    );
    let before = droplet_rows(&app).await;
    let answers = [
        (
            "not JSON",
            Answer {
                status: 200,
                body: "<html>oops</html>".into(),
                delay: Duration::ZERO,
            },
            "not JSON",
        ),
        (
            "wrong shape",
            Answer::json(json!({"items": [1, 2]})),
            "unexpected directory shape",
        ),
        (
            "an error",
            Answer {
                status: 500,
                body: "{}".into(),
                delay: Duration::ZERO,
            },
            "HTTP 500",
        ),
        (
            "slow",
            Answer {
                status: 200,
                body: directory().to_string(),
                delay: Duration::from_secs(4),
            },
            "timed out",
        ),
    ];
    for (what, answer, says) in answers {
        registry.answer(answer);
        let outcome = registry_client::Registry::from(&app.state.core)
            .run_once()
            .await;
        let error = outcome.expect_err(what);
        assert!(error.contains(says), "{what}: {error}");
        let snapshot = app.state.registry.snapshot();
        assert_eq!(snapshot.status, "disconnected", "{what}");
        assert_eq!(snapshot.last_error.as_deref(), Some(error.as_str()));
        assert_eq!(snapshot.droplets_known, 3, "{what}");
        assert_eq!(droplet_rows(&app).await, before, "{what}");
        assert_eq!(cached_ids(&app).await, [8, 21, 22], "{what}");
    }
    // The job records the failure and the service keeps answering.
    let (s, _) = app.get("/droplets", &app.admin()).await;
    assert_eq!(s, StatusCode::OK);
    // Back to a good answer: connected again.
    registry.answer(Answer::json(directory()));
    assert_eq!(
        registry_client::Registry::from(&app.state.core)
            .run_once()
            .await,
        Ok(3)
    );
    assert_eq!(registry_dependency(&app).await["status"], "connected");
}

#[tokio::test]
async fn without_a_registry_url_the_registry_is_unconfigured() {
    let app = TestApp::spawn().await;
    assert_eq!(
        registry_client::Registry::from(&app.state.core)
            .run_once()
            .await,
        Ok(0)
    );
    let dep = registry_dependency(&app).await;
    assert_eq!(dep["status"], "unconfigured");
}

/// The key that verifies Registry tokens is never trusted on first use from whatever answers
/// REGISTRY_URL: a (fake) Registry serving a PEM over http gets nothing installed, with
/// REGISTRY_FETCH_PUBLIC_KEY off (the default) or on; the status says why.
#[tokio::test]
async fn a_public_key_served_over_http_is_not_installed_with_or_without_the_fetch_flag() {
    let (private, public) = rsa_pair();
    let registry = RegistryServer::start(Answer::json(json!([]))).await;
    *registry.public_key.lock().unwrap() = Some(public);
    let now = chrono::Utc::now().timestamp();
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &json!({"droplet_id": 14, "permissions": ["read"], "iat": now, "exp": now + 600}),
        &jsonwebtoken::EncodingKey::from_rsa_pem(private.as_bytes()).unwrap(),
    )
    .unwrap();
    let cases = [
        (
            None,
            "no REGISTRY_PUBLIC_KEY; fetching it is off (REGISTRY_FETCH_PUBLIC_KEY=false)",
        ),
        (
            Some("true"),
            "REGISTRY_FETCH_PUBLIC_KEY needs an https REGISTRY_URL; key not fetched",
        ),
    ];
    for (flag, why) in cases {
        let mut env = vec![
            ("REGISTRY_URL", registry.url.as_str()),
            ("REGISTRY_SYNC_INTERVAL", "3600"),
            ("DISPATCH_TIMEOUT_SECONDS", "1"),
        ];
        if let Some(flag) = flag {
            env.push(("REGISTRY_FETCH_PUBLIC_KEY", flag));
        }
        let app = TestApp::spawn_with(&env).await;
        assert_eq!(
            registry_client::Registry::from(&app.state.core)
                .run_once()
                .await,
            Ok(0)
        );
        let snapshot = app.state.registry.snapshot();
        assert_eq!(snapshot.status, "connected", "{flag:?}");
        assert_eq!(snapshot.public_key, "none", "{flag:?}");
        assert_eq!(snapshot.public_key_error.as_deref(), Some(why), "{flag:?}");
        assert!(!app.state.keys.has_registry_key(), "{flag:?}");
        let (s, b) = app.get("/droplets", &token).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{flag:?}: {b}");
    }
    assert_eq!(
        registry.key_requests.load(Ordering::SeqCst),
        0,
        "the key was not even asked for"
    );
}

/// A server that records every request it gets: method, path and whether it carried
/// `X-Registry-Key` or a bearer.
async fn recording_server() -> (String, Arc<Mutex<Vec<String>>>) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let app = Router::new().fallback(move |req: axum::extract::Request| {
        let log = log.clone();
        async move {
            let h = req.headers();
            log.lock().unwrap().push(format!(
                "{} {} key={:?} bearer={}",
                req.method(),
                req.uri(),
                h.get("x-registry-key"),
                h.contains_key(header::AUTHORIZATION)
            ));
            axum::Json(json!({"token": "stolen", "droplets": []}))
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, seen)
}

/// Finding 3 of issue 24: a Registry answering every request (the token's POST and the
/// directory's GET) with `307 Location: http://elsewhere/steal` never gets the orchestrator to
/// send `X-Registry-Key` (or its bearer) there: Registry requests follow no redirect.
#[tokio::test]
async fn a_redirecting_registry_never_gets_the_key_sent_elsewhere() {
    let (elsewhere, seen) = recording_server().await;
    // The Registry itself: every request answered 307 to the other server.
    let target = format!("{elsewhere}/steal");
    let registry = Router::new().fallback(move || {
        let target = target.clone();
        async move { (AxumStatus::TEMPORARY_REDIRECT, [(header::LOCATION, target)]) }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let redirecting = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, registry).await;
    });
    let app = TestApp::spawn_with(&[
        ("REGISTRY_URL", &redirecting),
        ("REGISTRY_SYNC_INTERVAL", "3600"),
        ("REGISTRY_KEY", "registry-key-of-10"),
        ("DISPATCH_TIMEOUT_SECONDS", "1"),
    ])
    .await;

    let outcome = registry_client::Registry::from(&app.state.core)
        .run_once()
        .await;
    let error = outcome.expect_err("a 307 is not a directory");
    assert!(error.contains("HTTP 307"), "{error}");
    assert!(
        seen.lock().unwrap().is_empty(),
        "followed the redirect: {:?}",
        seen.lock().unwrap()
    );
    assert!(
        app.state.keys.registry_token_remaining().is_none(),
        "no token is taken from a redirect"
    );
    assert_eq!(registry_dependency(&app).await["status"], "disconnected");
}
