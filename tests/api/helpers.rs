//! What every integration test needs: the real app on a random port over its own fresh
//! database, tokens, envelopes, an HTTP client, and small droplet servers.
//!
//! PostgreSQL connections are budgeted so that the suite passes on a stock server
//! (`max_connections = 100`) at any `--test-threads`: a test first takes a [`Slot`] of
//! [`TEST_CONNECTIONS`] out of a process-wide [`CONNECTION_BUDGET`] of 64, and waits while
//! four tests already hold theirs. Every database a test makes is a [`TestDatabase`], dropped
//! `WITH (FORCE)` when the test lets go of it, on success and on panic alike, so a run
//! leaves no `orch_test_*` database behind. See [`CONNECTION_BUDGET`] for the figures.

#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use orchestrator::config::Config;
pub use orchestrator::jobs::JobId;
use orchestrator::state::AppState;
use reqwest::Method;
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::{OnceCell, Semaphore, SemaphorePermit};
use uuid::Uuid;

pub const SECRET: &str = "integration-test-secret-0123456789abcdef";

/// The server of the local PostgreSQL (override with TEST_DATABASE_URL, without a database name).
pub fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_string())
}

/// A fresh, unique database URL (nothing creates or drops it: tests that hand a database
/// to something other than a [`TestApp`] take a [`TestDatabase`], which drops it).
pub fn fresh_database_url() -> String {
    format!(
        "{}/orch_test_{}",
        server_url().trim_end_matches('/'),
        Uuid::new_v4().simple()
    )
}

// ---------------------------------------------------------------------------
// The connection budget and the databases tests own.

/// PostgreSQL connections the tests of one process may hold at once: 64 of the stock
/// `max_connections = 100`, leaving a third of the server (its 3 superuser-reserved
/// connections included) to whatever else uses it meanwhile: `psql`, a service started by
/// hand, another checkout's tests.
///
/// What one test holds, measured in `pg_stat_activity` while the suite ran: a [`TestApp`]
/// keeps at most 6 connections to its database, its pool of `DATABASE_POOL_SIZE = 4` (the
/// event LISTEN connection is one of those four) and the test's own pool of 2. A test runs
/// at most two apps at once (two replicas on one database, or a development and a
/// production app), 12 connections, and briefly needs more: the admin connection that
/// creates the database at an app's start and the one that drops it at the end, the
/// probe before the create, a `PgListener` of the test's own, or the binary that the CLI
/// tests start. Hence a [`Slot`] of [`TEST_CONNECTIONS`] = 16, and four tests with the
/// database at a time whatever `--test-threads` says; the other test threads wait for a
/// slot. The fault scenarios, whose servers have pools of 20, take the whole budget
/// ([`Slot::exclusive`]).
pub const CONNECTION_BUDGET: usize = 64;

/// One test's share of [`CONNECTION_BUDGET`] (see there).
pub const TEST_CONNECTIONS: usize = 16;

static BUDGET: Semaphore = Semaphore::const_new(CONNECTION_BUDGET);

thread_local! {
    /// The slot the test running on this thread holds, if it holds one.
    static CURRENT_SLOT: RefCell<Weak<Slot>> = const { RefCell::new(Weak::new()) };
}

/// A test's share of the connection budget, held while any of its apps or databases lives.
///
/// A test takes one slot for everything it opens: its second app (a replica, or an app after
/// an app) shares the first one's slot instead of waiting for another, so no test ever
/// waits for the budget while holding part of it, and the suite cannot deadlock however
/// many threads run it. The slot is found through the test's thread (libtest runs each test
/// on its own thread, and `#[tokio::test]` runs the test's body there); an app started
/// inside a `tokio::spawn`ed task of a multi-threaded runtime would take a slot of its own.
pub struct Slot {
    permits: OnceCell<SemaphorePermit<'static>>,
}

impl Slot {
    /// The slot of the test running on this thread, taken when it has none (waiting, if
    /// need be, until other tests give theirs back).
    pub async fn current() -> Arc<Slot> {
        Slot::take(TEST_CONNECTIONS).await
    }

    /// The whole budget, for a test that may open many connections (the fault scenarios).
    pub async fn exclusive() -> Arc<Slot> {
        Slot::take(CONNECTION_BUDGET).await
    }

    async fn take(connections: usize) -> Arc<Slot> {
        // Registered before the wait, so that two apps started at once by one test share it.
        let slot = CURRENT_SLOT.with(|current| {
            let existing = current.borrow().upgrade();
            existing.unwrap_or_else(|| {
                let slot = Arc::new(Slot {
                    permits: OnceCell::new(),
                });
                *current.borrow_mut() = Arc::downgrade(&slot);
                slot
            })
        });
        slot.permits
            .get_or_init(|| async {
                BUDGET
                    .acquire_many(connections as u32)
                    .await
                    .expect("the connection budget is never closed")
            })
            .await;
        slot
    }
}

/// Every live [`TestDatabase`] by name, so that apps on one database share its owner.
static DATABASES: LazyLock<Mutex<HashMap<String, Weak<TestDatabase>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// A database a test owns, on the test's [`Slot`]. It need not exist yet (the app or the
/// binary given its URL creates it); it is dropped `WITH (FORCE)`, its connections cut,
/// when the last holder lets go: the last [`TestApp`] on it, or the test itself, whether it
/// passed or panicked. The slot goes back to the budget only after that.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
    slot: Arc<Slot>,
}

impl TestDatabase {
    /// A new database of this test's (created by whoever first connects to `url`).
    pub async fn fresh() -> Arc<TestDatabase> {
        TestDatabase::owning(&fresh_database_url()).await
    }

    /// [`TestDatabase::fresh`], for tests without a runtime.
    pub fn fresh_blocking() -> Arc<TestDatabase> {
        futures::executor::block_on(TestDatabase::fresh())
    }

    /// A new database of a fault scenario's, which takes the whole connection budget.
    pub async fn exclusive() -> Arc<TestDatabase> {
        let slot = Slot::exclusive().await;
        TestDatabase::register(&fresh_database_url(), slot)
    }

    /// The owner of the database at `url` (any host: a proxy's URL names the same database
    /// as the server's), made when no app or test holds it yet.
    pub async fn owning(url: &str) -> Arc<TestDatabase> {
        if let Some(existing) = TestDatabase::find(url) {
            return existing;
        }
        let slot = Slot::current().await;
        TestDatabase::register(url, slot)
    }

    fn find(url: &str) -> Option<Arc<TestDatabase>> {
        let databases = DATABASES.lock().unwrap_or_else(|e| e.into_inner());
        databases.get(&database_name(url)).and_then(Weak::upgrade)
    }

    fn register(url: &str, slot: Arc<Slot>) -> Arc<TestDatabase> {
        let name = database_name(url);
        let mut databases = DATABASES.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = databases.get(&name).and_then(Weak::upgrade) {
            return existing;
        }
        let database = Arc::new(TestDatabase {
            name: name.clone(),
            url: url.to_string(),
            slot,
        });
        databases.insert(name, Arc::downgrade(&database));
        database
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        {
            let mut databases = DATABASES.lock().unwrap_or_else(|e| e.into_inner());
            if databases
                .get(&self.name)
                .is_some_and(|w| w.upgrade().is_none())
            {
                databases.remove(&self.name);
            }
        }
        drop_database(&self.name);
    }
}

/// The database a URL names (its path, without the query).
fn database_name(url: &str) -> String {
    let path = url.split('?').next().unwrap_or(url);
    path.rsplit('/').next().unwrap_or(path).to_string()
}

/// Drops a test database `WITH (FORCE)` (cutting whatever is still connected to it), from
/// any context: a destructor, a finished or a panicking test, inside a runtime or not. The
/// work runs on a thread of its own with its own small runtime, since the test's runtime
/// may be going away; this waits for it up to a minute. Only `orch_test_*` names are
/// dropped; failures are printed, never raised.
pub fn drop_database(name: &str) {
    if !name.starts_with("orch_test_") {
        return;
    }
    let owned = name.to_string();
    let (done, finished) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("drop-test-database".into())
        .spawn(move || {
            let outcome = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
                .and_then(|runtime| runtime.block_on(drop_database_now(&owned)));
            let _ = done.send(outcome);
        });
    let outcome = match spawned {
        Err(e) => Err(format!("cannot start a thread: {e}")),
        Ok(_) => finished
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| Err("no answer within 60 s".to_string())),
    };
    if let Err(e) = outcome {
        eprintln!("warning: test database {name} was not dropped: {e}");
    }
}

async fn drop_database_now(name: &str) -> Result<(), String> {
    let admin = format!("{}/postgres", server_url().trim_end_matches('/'));
    let sql = format!(
        "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
        name.replace('"', "\"\"")
    );
    let mut last = String::new();
    // A few tries: the server may be full for a moment, or a client reconnecting.
    for attempt in 0..5u64 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(250 * attempt)).await;
        }
        let mut conn = match tokio::time::timeout(
            Duration::from_secs(10),
            PgConnection::connect(&admin),
        )
        .await
        {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                last = e.to_string();
                continue;
            }
            Err(_) => {
                last = "timed out connecting".to_string();
                continue;
            }
        };
        let dropped = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&mut conn)
            .await;
        let _ = conn.close().await;
        match dropped {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// The settings every test app starts from; tests override what they need.
pub fn base_env(database_url: &str) -> HashMap<String, String> {
    let mut env = HashMap::new();
    for (k, v) in [
        ("ENVIRONMENT", "development"),
        ("JWT_SECRET_KEY", SECRET),
        ("DATABASE_POOL_SIZE", "4"),
        ("DATABASE_MAX_OVERFLOW", "0"),
        ("LOG_LEVEL", "WARNING"),
        ("HOST", "127.0.0.1"),
        ("PORT", "0"),
        // Tests that exercise the limiter set their own quota; the rest must never hit it.
        ("RATE_LIMIT_PER_MINUTE", "1000000"),
        // Tests of unreachable droplets (`unreachable.rs`) set their own threshold; the rest
        // register `dead_endpoint()`s as droplets nobody needs to reach, whose tasks must
        // stay where the test put them.
        ("DISPATCH_FAILURES_BEFORE_UNREACHABLE", "1000"),
    ] {
        env.insert(k.to_string(), v.to_string());
    }
    env.insert("DATABASE_URL".into(), database_url.to_string());
    env
}

pub fn config_from(env: &HashMap<String, String>) -> Config {
    let env = env.clone();
    Config::from_lookup(&move |k| env.get(k).cloned()).expect("valid test configuration")
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub base: String,
    pub state: AppState,
    /// The test's own pool on the app's database, to check what was written.
    pub db: PgPool,
    pub database_url: String,
    pub client: reqwest::Client,
    pub env: HashMap<String, String>,
    /// The app's share in its database (dropped with the last app on it).
    database: Option<Arc<TestDatabase>>,
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        TestApp::spawn_with(&[]).await
    }

    /// A new app over a new database, with these settings on top of the defaults.
    pub async fn spawn_with(overrides: &[(&str, &str)]) -> TestApp {
        TestApp::spawn_on(&fresh_database_url(), overrides).await
    }

    /// A new app over the given database (two apps on one database are two replicas).
    pub async fn spawn_on(database_url: &str, overrides: &[(&str, &str)]) -> TestApp {
        // The budget first: nothing connects before the test holds its slot.
        let database = TestDatabase::owning(database_url).await;
        let mut env = base_env(database_url);
        for (k, v) in overrides {
            env.insert(k.to_string(), v.to_string());
        }
        let config = config_from(&env);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let running =
            orchestrator::spawn(config, listener, orchestrator::telemetry::LogHandle::none())
                .await
                .expect("app starts");
        let db = PgPoolOptions::new()
            .max_connections(2)
            .connect(database_url)
            .await
            .expect("test pool");
        TestApp {
            addr: running.addr,
            base: format!("http://{}", running.addr),
            state: running.state,
            db,
            database_url: database_url.to_string(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            env,
            database: Some(database),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// An HS256 token for `droplet_id` with these permissions, valid for an hour.
    pub fn token(&self, droplet_id: i32, permissions: &[&str]) -> String {
        token(droplet_id, permissions)
    }

    pub fn admin(&self) -> String {
        token(1, &["read", "write", "admin"])
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.client.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request sent");
        let status = StatusCode::from_u16(resp.status().as_u16()).expect("status");
        let text = resp.text().await.unwrap_or_default();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.request(Method::GET, path, Some(token), None).await
    }

    /// POSTs `payload` wrapped in a fresh request envelope.
    pub async fn post(&self, path: &str, token: &str, payload: Value) -> (StatusCode, Value) {
        self.request(Method::POST, path, Some(token), Some(envelope(payload)))
            .await
    }

    pub async fn patch(&self, path: &str, token: &str, payload: Value) -> (StatusCode, Value) {
        self.request(Method::PATCH, path, Some(token), Some(envelope(payload)))
            .await
    }

    pub async fn delete(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.request(Method::DELETE, path, Some(token), None).await
    }

    /// Registers droplet `id` (as itself) with these capabilities at `endpoint`.
    pub async fn register(&self, id: i32, capabilities: &[&str], endpoint: &str) -> Value {
        let (status, body) = self
            .post(
                "/droplets/register",
                &self.token(id, &["read", "write"]),
                json!({
                    "droplet_id": id,
                    "name": format!("droplet-{id}"),
                    "steward": "tests",
                    "endpoint": endpoint,
                    "capabilities": capabilities,
                }),
            )
            .await;
        assert!(status.is_success(), "register {id}: {status} {body}");
        body
    }

    /// Creates a task as droplet `creator`; returns its id.
    pub async fn create_task(&self, creator: i32, payload: Value) -> i32 {
        let (status, body) = self
            .post("/tasks", &self.token(creator, &["read", "write"]), payload)
            .await;
        assert_eq!(status, StatusCode::CREATED, "create task: {body}");
        body["payload"]["task_id"].as_i64().expect("task_id") as i32
    }

    pub async fn task(&self, id: i32) -> Value {
        let (status, body) = self.get(&format!("/tasks/{id}"), &self.admin()).await;
        assert_eq!(status, StatusCode::OK, "get task {id}: {body}");
        body["payload"]["task"].clone()
    }

    pub async fn task_status(&self, id: i32) -> String {
        sqlx::query_scalar("SELECT status FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_one(&self.db)
            .await
            .expect("task row")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.state.shutdown.cancel();
        // The test's runtime ends with the test, before the app's own shutdown could close
        // its pool: close both pools now (no connection is opened from here on; `close`
        // marks a pool closed at once, its future only waits for the connections to go).
        #[allow(clippy::let_underscore_future)]
        {
            let _ = self.state.db.close();
            let _ = self.db.close();
        }
        // The last app on a database drops it, cutting the connections still open.
        drop(self.database.take());
    }
}

pub fn token(droplet_id: i32, permissions: &[&str]) -> String {
    let now = chrono::Utc::now().timestamp();
    sign(json!({
        "droplet_id": droplet_id,
        "steward": "tests",
        "permissions": permissions,
        "iat": now,
        "exp": now + 3600,
    }))
}

/// Signs any claims with the test secret (HS256).
pub fn sign(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

/// A request envelope around `payload`, with a new trace id.
pub fn envelope(payload: Value) -> Value {
    envelope_with_trace(&Uuid::new_v4().to_string(), payload)
}

pub fn envelope_with_trace(trace_id: &str, payload: Value) -> Value {
    json!({
        "udc_version": "1.0",
        "trace_id": trace_id,
        "source": 42,
        "target": 10,
        "message_type": "command",
        "payload": payload,
        "timestamp": chrono::Utc::now().to_rfc3339(),
    })
}

pub fn task_payload(title: &str) -> Value {
    json!({ "task_type": "verify", "title": title, "payload": {} })
}

/// Polls `check` until it returns `Some` or `timeout` passes (then panics with `what`).
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How a test droplet answers the orchestrator's messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    Ok,
    Error500,
    Hang,
}

/// What a test droplet keeps: the envelopes it received and how it answers.
type DropletShared = (Arc<Mutex<Vec<Value>>>, Arc<Mutex<Behaviour>>);

/// A small droplet HTTP server that records every envelope POSTed to its `/message`.
#[derive(Clone)]
pub struct DropletServer {
    pub endpoint: String,
    pub received: Arc<Mutex<Vec<Value>>>,
    behaviour: Arc<Mutex<Behaviour>>,
}

impl DropletServer {
    pub async fn start(behaviour: Behaviour) -> DropletServer {
        DropletServer::start_at("http://127.0.0.1:0", behaviour).await
    }

    /// A droplet server on the host and port of `endpoint` (e.g. one from
    /// [`dead_endpoint`], to bring an endpoint that refused connections up).
    pub async fn start_at(endpoint: &str, behaviour: Behaviour) -> DropletServer {
        let received = Arc::new(Mutex::new(Vec::new()));
        let behaviour = Arc::new(Mutex::new(behaviour));
        let shared = (received.clone(), behaviour.clone());
        let app = Router::new()
            .route(
                "/message",
                post(
                    |State((received, behaviour)): State<DropletShared>,
                     Json(body): Json<Value>| async move {
                        received.lock().unwrap().push(body);
                        let b = *behaviour.lock().unwrap();
                        match b {
                            Behaviour::Ok => (StatusCode::OK, Json(json!({"received": true}))),
                            Behaviour::Error500 => (
                                StatusCode::INTERNAL_SERVER_ERROR,
                                Json(json!({"detail": "boom"})),
                            ),
                            Behaviour::Hang => {
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                                (StatusCode::OK, Json(json!({})))
                            }
                        }
                    },
                ),
            )
            .with_state(shared);
        let listener = tokio::net::TcpListener::bind(endpoint.trim_start_matches("http://"))
            .await
            .expect("bind droplet");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        DropletServer {
            endpoint: format!("http://{addr}"),
            received,
            behaviour,
        }
    }

    pub fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().unwrap() = behaviour;
    }

    pub fn messages(&self) -> Vec<Value> {
        self.received.lock().unwrap().clone()
    }

    /// The `execute_task` commands received, as task ids.
    pub fn executed(&self) -> Vec<i64> {
        self.messages()
            .iter()
            .filter(|m| m["payload"]["command"] == "execute_task")
            .filter_map(|m| m["payload"]["task"]["id"].as_i64())
            .collect()
    }
}

/// An endpoint where nothing listens (connections are refused).
pub fn dead_endpoint() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    format!("http://{addr}")
}

// ---------------------------------------------------------------------------
// Routing, recovery and jobs.

/// One row of a task's history: (from, to, changed_by, reason).
pub type HistoryEntry = (Option<String>, String, Option<String>, Option<String>);

impl TestApp {
    /// Pauses the router and waits until its loop is still: the app's start-up pass (or a
    /// pass a trigger began) may be running when the pause lands, and would otherwise move
    /// rows a test is about to seed.
    pub async fn pause_routing(&self) {
        self.state
            .jobs
            .set_paused(&self.state, JobId::TaskRouter, true);
        eventually(
            Duration::from_secs(10),
            "the routing loop still",
            || async { (!self.state.router.is_passing()).then_some(()) },
        )
        .await;
    }

    /// Registers droplet `id` that holds at most `max` tasks at once.
    pub async fn register_max(&self, id: i32, capabilities: &[&str], endpoint: &str, max: i64) {
        let (status, body) = self
            .post(
                "/droplets/register",
                &self.token(id, &["read", "write"]),
                json!({
                    "droplet_id": id, "name": format!("droplet-{id}"), "steward": "tests",
                    "endpoint": endpoint, "capabilities": capabilities, "max_concurrent_tasks": max,
                }),
            )
            .await;
        assert!(status.is_success(), "register {id}: {status} {body}");
    }

    /// PATCHes task `task` to `status` as droplet `droplet`.
    pub async fn move_task(&self, droplet: i32, task: i32, status: &str) -> (StatusCode, Value) {
        self.patch(
            &format!("/tasks/{task}"),
            &self.token(droplet, &["read", "write"]),
            json!({ "status": status }),
        )
        .await
    }

    /// The external id of the droplet the task is assigned to, with the task's status.
    pub async fn holder(&self, task: i32) -> (String, Option<i32>) {
        sqlx::query_as(
            "SELECT t.status, d.droplet_id FROM tasks t LEFT JOIN droplets d ON d.id = t.assigned_droplet_id WHERE t.id = $1",
        )
        .bind(task)
        .fetch_one(&self.db)
        .await
        .expect("task row")
    }

    /// Waits until the task is assigned to droplet `droplet`.
    pub async fn wait_assigned(&self, task: i32, droplet: i32, within: Duration) {
        eventually(
            within,
            &format!("task {task} assigned to droplet {droplet}"),
            || async move {
                (self.holder(task).await == ("assigned".to_string(), Some(droplet))).then_some(())
            },
        )
        .await
    }

    pub async fn history(&self, task: i32) -> Vec<HistoryEntry> {
        sqlx::query_as("SELECT from_status, to_status, changed_by, reason FROM task_state_history WHERE task_id = $1 ORDER BY id")
            .bind(task)
            .fetch_all(&self.db)
            .await
            .expect("history rows")
    }

    pub async fn retry_count(&self, task: i32) -> i32 {
        sqlx::query_scalar("SELECT retry_count FROM tasks WHERE id = $1")
            .bind(task)
            .fetch_one(&self.db)
            .await
            .expect("task row")
    }

    /// Inserts `n` pending tasks straight into the table (set-up at scale); returns their ids.
    pub async fn insert_pending(
        &self,
        n: i64,
        capability: Option<&str>,
        priority: i32,
    ) -> Vec<i32> {
        sqlx::query_scalar(
            "INSERT INTO tasks (task_type, title, payload, required_capability, priority, status, created_by)
             SELECT 'bulk', 'bulk ' || g, '{}'::jsonb, $2, $3, 'pending', '5' FROM generate_series(1, $1) g
             RETURNING id",
        )
        .bind(n)
        .bind(capability)
        .bind(priority)
        .fetch_all(&self.db)
        .await
        .expect("insert tasks")
    }

    /// How many times a scheduled job has run so far.
    pub fn job_runs(&self, id: JobId) -> u64 {
        self.state.jobs.get(id).map(|j| j.runs).unwrap_or(0)
    }

    /// Waits until the scheduled job `id` has run `n` more times (a clock made of job runs,
    /// so a test can wait "at least one interval" without sleeping a fixed time).
    pub async fn wait_job_runs(&self, id: JobId, n: u64, within: Duration) {
        let target = self.job_runs(id) + n;
        eventually(within, &format!("{id} ran {n} more times"), || async move {
            (self.job_runs(id) >= target).then_some(())
        })
        .await
    }
}

/// Sends a heartbeat for droplet `id` every 200 ms until the handle is aborted.
pub fn keep_beating(app: &TestApp, id: i32) -> tokio::task::JoinHandle<()> {
    let client = app.client.clone();
    let url = app.url(&format!("/droplets/{id}/heartbeat"));
    let token = token(id, &["read", "write"]);
    tokio::spawn(async move {
        loop {
            let _ = client
                .post(&url)
                .bearer_auth(&token)
                .json(&envelope(json!({ "status": "active" })))
                .send()
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

/// The events of a feed (`tasks` or `droplets`) in the event log after `after`, in order:
/// `(event_id, envelope)`.
pub async fn logged_events(db: &PgPool, feed: &str, after: i64) -> Vec<(i64, Value)> {
    sqlx::query_as(
        "SELECT event_id, envelope FROM events WHERE feed = $1 AND event_id > $2 ORDER BY event_id",
    )
    .bind(feed)
    .bind(after)
    .fetch_all(db)
    .await
    .expect("read the event log")
}

/// A fresh RSA key pair as PEM text (private, public), made with the machine's openssl.
pub fn rsa_pair() -> (String, String) {
    let private = std::process::Command::new("openssl")
        .args(["genrsa", "2048"])
        .stderr(std::process::Stdio::null())
        .output()
        .expect("openssl genrsa runs");
    assert!(private.status.success(), "openssl genrsa failed");
    let mut child = std::process::Command::new("openssl")
        .args(["rsa", "-pubout"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl rsa runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&private.stdout)
        .expect("key written");
    let public = child.wait_with_output().expect("openssl rsa ends");
    assert!(public.status.success(), "openssl rsa -pubout failed");
    (
        String::from_utf8(private.stdout).expect("PEM"),
        String::from_utf8(public.stdout).expect("PEM"),
    )
}

/// The HTTP status a refused WebSocket connection got.
pub async fn refused(url: String) -> u16 {
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("the connection was accepted"),
    }
}

/// The hub's figures, read in process (polling `/ws/status` would meet the rate limit).
pub fn stats(app: &TestApp) -> Value {
    serde_json::to_value(app.state.events.stats()).expect("stats")
}

/// Every log line written while it lives, at the levels of `filter`, from the test's thread
/// and the runtime's (the server runs in the test's process).
pub struct LogCapture {
    lines: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
    _second: tracing::Dispatch,
}

#[derive(Clone)]
struct CapturedLog(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    pub fn start(filter: &str) -> LogCapture {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let writer = CapturedLog(lines.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        // With a single scoped subscriber in the process, tracing caches a callsite's interest
        // from whichever thread reaches it first; other tests' threads have no subscriber and
        // would switch our callsites off. A second live dispatcher makes it ask every one.
        let second = tracing::Dispatch::new(tracing_subscriber::registry());
        LogCapture {
            lines,
            _guard: guard,
            _second: second,
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.lines.lock().unwrap()).to_string()
    }
}
