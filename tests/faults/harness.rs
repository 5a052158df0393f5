//! The orchestrator as a child process: a fresh database, a free port, its output in files
//! under the target directory, readiness, SIGKILL, SIGTERM, and the figures a scenario prints.

#![allow(dead_code)]

use std::fs::File;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::process::{Child, Command};

use crate::helpers::{TestDatabase, SECRET};

pub const BIN: &str = env!("CARGO_BIN_EXE_orchestrator");

/// Where the children's logs and the scenarios' figures go.
pub fn out_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("faults");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// A fresh database for a scenario, which takes the whole connection budget (its servers
/// have pools of 20): the server creates the database when it starts; it is dropped
/// `WITH (FORCE)` when the scenario drops the owner returned here, or panics.
pub async fn fresh_database() -> (Arc<TestDatabase>, String) {
    let db = TestDatabase::exclusive().await;
    let url = db.url.clone();
    (db, url)
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// The test's own pool on a scenario's database (to check what was written).
pub async fn pool(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(3)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .expect("test pool on the scenario's database")
}

/// The settings every child starts with; scenarios add theirs on top.
pub fn base_env(database_url: &str, port: u16) -> Vec<(String, String)> {
    [
        ("ENVIRONMENT", "development"),
        ("JWT_SECRET_KEY", SECRET),
        ("HOST", "127.0.0.1"),
        ("LOG_LEVEL", "INFO"),
        ("DATABASE_POOL_SIZE", "20"),
        ("DATABASE_MAX_OVERFLOW", "0"),
        ("DATABASE_ACQUIRE_TIMEOUT_SECONDS", "2"),
        ("RATE_LIMIT_PER_MINUTE", "10000000"),
        ("HEARTBEAT_INTERVAL", "1"),
        ("HEARTBEAT_TIMEOUT", "5"),
        ("HEARTBEAT_CHECK_INTERVAL", "1"),
        ("TASK_ROUTER_INTERVAL", "1"),
        ("ASSIGNMENT_TIMEOUT_SECONDS", "5"),
        ("RETRY_BACKOFF_SECONDS", "1"),
        ("RETRY_BACKOFF_MAX_SECONDS", "2"),
        ("DISPATCH_TIMEOUT_SECONDS", "2"),
        ("WS_HEARTBEAT_INTERVAL", "5"),
        ("REQUEST_TIMEOUT_SECONDS", "20"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .chain([
        ("DATABASE_URL".to_string(), database_url.to_string()),
        ("PORT".to_string(), port.to_string()),
    ])
    .collect()
}

/// `FAULTS_ENV="K=V,K=V"`: settings on top of every scenario's (to explore a fault under
/// other settings); they override the scenario's own.
fn extra_env() -> Vec<(String, String)> {
    std::env::var("FAULTS_ENV")
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// One `orchestrator serve` process.
pub struct Server {
    pub label: String,
    pub port: u16,
    pub base: String,
    child: Option<Child>,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    pub started: Instant,
}

impl Server {
    /// Starts the binary with `env` (the whole environment, PATH aside) and waits until
    /// `/health` answers.
    pub async fn start(label: &str, env: &[(String, String)]) -> Server {
        match Server::try_start(label, env, Duration::from_secs(60)).await {
            Ok(server) => server,
            Err(why) => panic!("{why}"),
        }
    }

    /// As `start`, but a process that exits or is not ready `within` is an error (it is
    /// killed), so a caller may try again (say, once the database is back).
    pub async fn try_start(
        label: &str,
        env: &[(String, String)],
        within: Duration,
    ) -> Result<Server, String> {
        let port: u16 = env
            .iter()
            .find(|(k, _)| k == "PORT")
            .and_then(|(_, v)| v.parse().ok())
            .expect("PORT in the environment");
        let dir = out_dir();
        let stdout = dir.join(format!("{label}.out.log"));
        let stderr = dir.join(format!("{label}.err.log"));
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_BACKTRACE", "1")
            // No `.env` of the developer's is read.
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(File::create(&stdout).expect("stdout file")))
            .stderr(Stdio::from(File::create(&stderr).expect("stderr file")))
            .kill_on_drop(true);
        for (k, v) in env.iter().cloned().chain(extra_env()) {
            cmd.env(k, v);
        }
        let started = Instant::now();
        let child = cmd.spawn().expect("spawn the orchestrator");
        let mut server = Server {
            label: label.to_string(),
            port,
            base: format!("http://127.0.0.1:{port}"),
            child: Some(child),
            stdout,
            stderr,
            started,
        };
        server.wait_ready(within).await?;
        Ok(server)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    async fn wait_ready(&mut self, within: Duration) -> Result<(), String> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("client");
        let deadline = Instant::now() + within;
        loop {
            if let Ok(r) = http.get(format!("{}/health", self.base)).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "{} exited before it was ready ({status}): {}",
                        self.label,
                        self.stderr_text()
                    ));
                }
            }
            if Instant::now() >= deadline {
                self.kill9().await;
                return Err(format!(
                    "{} not ready within {within:?}: {}",
                    self.label,
                    self.stderr_text()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, and the process is reaped.
    pub async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// SIGSTOP: the process is paused with everything it holds (connections, locks,
    /// requests and deliveries in flight) until `sigcont`.
    pub fn sigstop(&self) {
        self.signal("-STOP");
    }

    pub fn sigcont(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let _ = std::process::Command::new("kill")
                .args([sig, &pid.to_string()])
                .status();
        }
    }

    /// Resident memory of the process in MB (VmRSS), when it runs.
    pub fn rss_mb(&self) -> Option<f64> {
        let pid = self.pid()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kb: f64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(kb / 1024.0)
    }

    /// Sends SIGTERM; the process is left to exit on its own.
    pub fn sigterm(&self) {
        if let Some(pid) = self.pid() {
            let status = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .expect("run kill");
            assert!(status.success(), "kill -TERM {pid}");
        }
    }

    /// Waits for the process to exit; its status, or None when it is still running.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        match tokio::time::timeout(within, child.wait()).await {
            Ok(Ok(status)) => {
                self.child = None;
                Some(status)
            }
            _ => None,
        }
    }

    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Panics in the process's output (stderr, and stdout for a panic logged by a layer).
    pub fn panics(&self) -> usize {
        self.stderr_text().matches("panicked").count()
            + self.stdout_text().matches("panicked").count()
    }

    /// Lines of the log (stdout or stderr) that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        let text = self.stdout_text() + &self.stderr_text();
        text.lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// What a scenario measured, printed as one line and written to `target/tmp/faults/`.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Figures {
    pub scenario: String,
    pub tasks_created: usize,
    pub tasks_lost: usize,
    pub tasks_duplicated: usize,
    pub recover_seconds: Option<f64>,
    pub server_errors_5xx: u64,
    pub extra: serde_json::Map<String, Value>,
}

impl Figures {
    pub fn new(scenario: &str) -> Figures {
        Figures {
            scenario: scenario.to_string(),
            ..Default::default()
        }
    }

    pub fn note(&mut self, key: &str, value: impl serde::Serialize) {
        self.extra.insert(
            key.to_string(),
            serde_json::to_value(value).unwrap_or(Value::Null),
        );
    }

    /// Prints the figures and stores them with the commit they were measured on.
    pub fn report(&self) {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        v["commit"] = json!(commit());
        println!("FIGURES {}", v);
        let _ = std::fs::write(
            out_dir().join(format!("{}.json", self.scenario)),
            serde_json::to_string_pretty(&v).unwrap_or_default(),
        );
    }
}

/// `git rev-parse --short HEAD`, with "with uncommitted changes" when the tree is dirty.
pub fn commit() -> String {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let head = run(&["rev-parse", "--short", "HEAD"]);
    if run(&["status", "--porcelain"]).is_empty() {
        head
    } else {
        format!("{head} with uncommitted changes")
    }
}

/// Polls `check` every 50 ms until it gives `Some` or `within` passes.
pub async fn wait_for<T, F, Fut>(within: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until none of `ids` is left unfinished (or `within` passes); the unfinished ones.
pub async fn drain(pool: &PgPool, ids: &[i32], within: Duration) -> Vec<i32> {
    wait_for(within, || async {
        crate::invariants::unfinished(pool, ids)
            .await
            .is_empty()
            .then_some(())
    })
    .await;
    crate::invariants::unfinished(pool, ids).await
}

/// Tasks per second a scenario produces (`FAULTS_RATE`, default 50: what a debug build
/// sustains with room to spare on a shared two-core machine).
pub fn rate() -> f64 {
    std::env::var("FAULTS_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|r: &f64| *r > 0.0)
        .unwrap_or(50.0)
}

/// How many `pending -> assigned` moves the database holds.
pub async fn assignments(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM task_state_history WHERE from_status = 'pending' AND to_status = 'assigned'",
    )
    .fetch_one(pool)
    .await
    .unwrap_or(0)
}

pub fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}
