//! The database going away while the service runs: a TCP proxy the test controls sits
//! between the app and PostgreSQL. Cut or silenced, requests answer 503 within a few
//! seconds; restored, they succeed again without anyone restarting anything.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::helpers::*;

const OPEN: u8 = 0;
/// Connections are closed at once (the database is down or restarting).
const CUT: u8 = 1;
/// Connections stay open but nothing passes (a network partition).
const SILENT: u8 = 2;

/// A TCP proxy to the local PostgreSQL.
struct Proxy {
    port: u16,
    mode: watch::Sender<u8>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let (mode, _) = watch::channel(OPEN);
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let upstream = server_url()
            .rsplit('@')
            .next()
            .unwrap_or("127.0.0.1:5432")
            .trim_start_matches("postgres://")
            .trim_end_matches('/')
            .to_string();
        let accept = {
            let (mode, links) = (mode.clone(), links.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let link = tokio::spawn(link(client, upstream.clone(), mode.subscribe()));
                    links.lock().unwrap().push(link);
                }
            })
        };
        Proxy {
            port,
            mode,
            links,
            accept,
        }
    }

    /// The app's database URL through this proxy.
    fn database_url(&self) -> String {
        let server = server_url();
        let (scheme_user, _) = server
            .rsplit_once('@')
            .unwrap_or(("postgres://postgres", ""));
        format!(
            "{scheme_user}@127.0.0.1:{}/orch_test_{}",
            self.port,
            Uuid::new_v4().simple()
        )
    }

    /// From now on connections fail as `mode` says, the open ones included.
    fn fail(&self, mode: u8) {
        self.mode.send_replace(mode);
    }

    /// Connections pass again; the ones held silent are closed, as TCP would in the end.
    fn restore(&self) {
        for link in std::mem::take(&mut *self.links.lock().unwrap()) {
            link.abort();
        }
        self.mode.send_replace(OPEN);
    }
}

/// One client connection: forwarded while the proxy is open, then closed or held silent.
async fn link(mut client: TcpStream, upstream: String, mut mode: watch::Receiver<u8>) {
    let current = *mode.borrow_and_update();
    if current == CUT {
        return;
    }
    if current == OPEN {
        let Ok(mut server) = TcpStream::connect(&upstream).await else {
            return;
        };
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
            _ = mode.wait_for(|m| *m != OPEN) => {}
        }
        if *mode.borrow() == CUT {
            return;
        }
        // Silent: both sockets stay open and nothing more is forwarded.
        let _held = (client, server);
        return std::future::pending::<()>().await;
    }
    let _held = client;
    std::future::pending::<()>().await;
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }
}

async fn spawn_behind(proxy: &Proxy) -> TestApp {
    TestApp::spawn_on(
        &proxy.database_url(),
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

    proxy.fail(CUT);
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

    proxy.fail(SILENT);
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
        proxy.fail(CUT);
        let (status, _, took) = list_tasks(&app).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(took < Duration::from_secs(5), "took {took:?}");
        proxy.restore();
        assert_recovered(&app).await;
    }
}
