//! The dashboard in a real browser: Debian's headless Chromium, driven over WebDriver by
//! chromedriver, against the real server. Signs in, then watches droplets and tasks change
//! through the API without a reload, opens a task's history, and cancels it as an admin.
//! Screenshots go to `target/dashboard.png`, `target/dashboard-task.png`,
//! `target/dashboard-explain.png` and `target/dashboard-signin.png`.
//!
//! These tests are `#[ignore]`d, so that `cargo test` passes on a machine without a browser:
//! `scripts/browser-test.sh` installs Chromium and ChromeDriver when they are missing and
//! runs them (`cargo test --test api dashboard -- --include-ignored`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::*;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const INSTALL: &str =
    "scripts/browser-test.sh (or apt-get update && apt-get install -y chromium chromium-driver)";
/// Generous: CI runs this beside the whole suite on two cores.
const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium and ChromeDriver: scripts/browser-test.sh"]
async fn the_dashboard_follows_the_mesh_live_in_a_browser() {
    let (browser, app) = tokio::join!(
        Browser::start(),
        TestApp::spawn_with(&[
            ("HEARTBEAT_TIMEOUT", "1"),
            ("HEARTBEAT_CHECK_INTERVAL", "1"),
            ("TASK_ROUTER_INTERVAL", "1"),
            ("RATE_LIMIT_PER_MINUTE", "100000"),
            // A droplet that misses one beat under load must not take the task away mid-test.
            ("ENABLE_AUTO_RECOVERY", "false"),
        ])
    );

    // The page is served, bare, with its own same-origin policy.
    let page = app
        .client
        .get(app.url("/dashboard"))
        .send()
        .await
        .expect("GET /dashboard");
    assert_eq!(page.status(), StatusCode::OK);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );

    browser.goto(&app.url("/dashboard")).await;
    browser
        .wait_js(
            "the sign-in form",
            "return !document.querySelector('#signin').hidden",
        )
        .await;
    browser.js("window.__sameDocument = 42", vec![]).await;

    // Bad tokens get a clear message, not a blank page.
    browser.type_into("#token-input", "not-a-token").await;
    browser.click("#signin-button").await;
    browser.wait_text("#signin-error", "three parts").await;
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"droplet_id": 1, "permissions": ["read", "admin"], "exp": chrono::Utc::now().timestamp() + 600}),
        &jsonwebtoken::EncodingKey::from_secret(b"some-other-key-0123456789abcdef0123"),
    )
    .expect("sign");
    browser.clear("#token-input").await;
    browser.type_into("#token-input", &forged).await;
    browser.click("#signin-button").await;
    browser
        .wait_text("#signin-error", "Could not validate credentials")
        .await;
    let expired = sign(
        json!({"droplet_id": 1, "permissions": ["read"], "exp": chrono::Utc::now().timestamp() - 60}),
    );
    browser.clear("#token-input").await;
    browser.type_into("#token-input", &expired).await;
    browser.click("#signin-button").await;
    browser.wait_text("#signin-error", "expired").await;
    browser.screenshot("dashboard-signin.png").await;

    // An admin signs in; the token is in sessionStorage, never in the page's URL.
    let admin = app.admin();
    browser.clear("#token-input").await;
    browser.type_into("#token-input", &admin).await;
    browser.click("#signin-button").await;
    browser.wait_live("the live feeds").await;
    let url = browser.js("return location.href", vec![]).await;
    assert!(
        !url.as_str().unwrap_or_default().contains(&admin),
        "token in the URL: {url}"
    );
    let stored = browser
        .js(
            "return sessionStorage.getItem('orchestrator.dashboard.token')",
            vec![],
        )
        .await;
    assert_eq!(stored, json!(admin));

    // A droplet registered through the API appears, active.
    app.register(21, &["watch"], &dead_endpoint()).await;
    let watcher = keep_beating(&app, 21);
    browser
        .wait_attr("#droplets tr[data-droplet-id='21']", "status", "active")
        .await;

    // A task created through the API appears pending (no droplet can take it yet)...
    let id = app
        .create_task(
            5,
            json!({"task_type": "render", "title": "Render the quarterly report", "priority": 2,
                   "required_capability": "render", "payload": {"pages": 12, "format": "pdf"}}),
        )
        .await;
    let row = format!("#tasks tr[data-task-id='{id}']");
    browser.wait_attr(&row, "status", "pending").await;

    // ...and turns assigned, in place, once a droplet with the capability registers.
    let worker = DropletServer::start(Behaviour::Ok).await;
    app.register(22, &["render"], &worker.endpoint).await;
    let _worker_beats = keep_beating(&app, 22);
    browser.wait_attr(&row, "status", "assigned").await;
    browser.wait_text(&format!("{row} td.droplet"), "#22").await;
    assert_eq!(app.task_status(id).await, "assigned");

    // A droplet that stops heartbeating is flagged inactive on the page.
    watcher.abort();
    browser
        .wait_attr("#droplets tr[data-droplet-id='21']", "status", "inactive")
        .await;
    let flagged = browser
        .js("return document.querySelector(\"#droplets tr[data-droplet-id='21']\").classList.contains('flagged')", vec![])
        .await;
    assert_eq!(flagged, json!(true));
    assert_eq!(
        browser
            .attr("#droplets tr[data-droplet-id='22']", "status")
            .await,
        Some("active".to_string())
    );

    // Some finished work for the counters and the chart (and a readable screenshot).
    let done = app
        .create_task(7, json!({"task_type": "render", "title": "Render the invoice batch", "required_capability": "render", "payload": {}}))
        .await;
    finish(
        &app,
        22,
        done,
        json!({"status": "completed", "result": {"pages": 3}}),
    )
    .await;
    let broken = app
        .create_task(
            7,
            json!({"task_type": "render", "title": "Render a corrupt file", "required_capability": "render", "max_retries": 0, "payload": {}}),
        )
        .await;
    finish(
        &app,
        22,
        broken,
        json!({"status": "failed", "error_message": "corrupt input"}),
    )
    .await;
    browser
        .wait_attr(
            &format!("#tasks tr[data-task-id='{done}']"),
            "status",
            "completed",
        )
        .await;
    browser
        .wait_attr(
            &format!("#tasks tr[data-task-id='{broken}']"),
            "status",
            "failed",
        )
        .await;
    browser.wait_text("#count-completed", "1").await;
    browser.wait_text("#count-failed", "1").await;
    browser.wait_text("#count-assigned", "1").await;
    browser.screenshot("dashboard.png").await;

    // The task's detail shows its history as a timeline.
    browser.click(&row).await;
    browser
        .wait_js(
            "the task's history",
            "const items = [...document.querySelectorAll('#detail-body .timeline li')].map(li => li.dataset.to);
             return items.length >= 2 && items[0] === 'pending' && items.includes('assigned');",
        )
        .await;
    browser
        .wait_text("#detail-body .timeline", "created → pending")
        .await;
    browser
        .wait_text("#detail-body .timeline", "pending → assigned")
        .await;
    browser
        .wait_text("#detail-body pre.payload", "\"format\": \"pdf\"")
        .await;
    browser.screenshot("dashboard-task.png").await;

    // An admin cancels it: a confirmation, then the API's answer on the page.
    browser.click("#detail-cancel").await;
    browser
        .wait_js(
            "the confirmation",
            "return document.querySelector('#confirm').open",
        )
        .await;
    browser.click("#confirm-yes").await;
    browser
        .wait_js(
            "the API's answer",
            "return !!document.querySelector('#action-log li[data-status=\"200\"]')",
        )
        .await;
    browser.wait_text("#toast", "200").await;
    browser.wait_attr(&row, "status", "cancelled").await;
    assert_eq!(app.task_status(id).await, "cancelled");
    browser
        .wait_text("#detail-body .timeline", "assigned → cancelled")
        .await;

    // All of it happened in one document, without a reload, and without a script error.
    assert_eq!(
        browser.js("return window.__sameDocument", vec![]).await,
        json!(42)
    );
    assert_eq!(
        browser
            .js(
                "return document.querySelector('#page-error').hidden",
                vec![]
            )
            .await,
        json!(true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium and ChromeDriver: scripts/browser-test.sh"]
async fn in_development_the_page_mints_a_read_token_that_cannot_act() {
    let (browser, app) = tokio::join!(
        Browser::start(),
        TestApp::spawn_with(&[("RATE_LIMIT_PER_MINUTE", "100000")])
    );
    app.register(31, &["watch"], &dead_endpoint()).await;
    browser.goto(&app.url("/dashboard")).await;
    browser
        .wait_js(
            "the mint button",
            "return !document.querySelector('#mint').hidden",
        )
        .await;
    browser.click("#mint-read").await;
    browser.wait_live("the live feeds").await;
    browser
        .wait_attr("#droplets tr[data-droplet-id='31']", "status", "active")
        .await;
    browser.wait_text("#whoami", "droplet 5 · read").await;
    // Operator controls are for admins only, and the jobs card says so.
    let boxes = browser
        .js("return document.querySelector(\"#droplets tr[data-droplet-id='31'] button\").getClientRects().length", vec![])
        .await;
    assert_eq!(
        boxes,
        json!(0),
        "a read token sees no Activate/Deactivate button"
    );
    browser.wait_text("#jobs-note", "admin").await;

    // The token survives a reload of the tab (sessionStorage), and signing out forgets it.
    browser.goto(&app.url("/dashboard")).await;
    browser.wait_live("the live feeds after a reload").await;

    // The server drops every feed: the page says so, reconnects by itself, and resyncs from
    // REST, so a task created while it was away shows up all the same.
    browser
        .wait_js(
            "the first sync",
            "return document.querySelector('#count-pending').textContent !== '–'",
        )
        .await;
    app.state.events.close_all(1001, "test: going away");
    browser
        .wait_js(
            "the page to notice the lost feeds",
            "return document.querySelector('#conn').dataset.state !== 'live'",
        )
        .await;
    let missed = app
        .create_task(
            7,
            json!({"task_type": "audit", "title": "Created while the page was away",
                   "required_capability": "nobody-has-this", "payload": {}}),
        )
        .await;
    browser
        .wait_js(
            "the feeds back",
            "return document.querySelector('#conn').dataset.state === 'live'",
        )
        .await;
    browser
        .wait_attr(
            &format!("#tasks tr[data-task-id='{missed}']"),
            "status",
            "pending",
        )
        .await;

    browser.click("#signout").await;
    browser
        .wait_js(
            "the sign-in form",
            "return !document.querySelector('#signin').hidden",
        )
        .await;
    let stored = browser
        .js(
            "return sessionStorage.getItem('orchestrator.dashboard.token')",
            vec![],
        )
        .await;
    assert_eq!(stored, Value::Null);
}

/// An opened task explains itself: a pending task that no droplet can take says why it
/// waits; a finished one shows its attempt (the droplet chosen, how it ended) and the time it
/// spent in each state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium and ChromeDriver: scripts/browser-test.sh"]
async fn an_opened_task_says_why_it_waits_or_how_its_attempts_went() {
    let (browser, app) = tokio::join!(
        Browser::start(),
        TestApp::spawn_with(&[
            ("RATE_LIMIT_PER_MINUTE", "100000"),
            ("ENABLE_AUTO_RECOVERY", "false"),
        ])
    );
    browser.goto(&app.url("/dashboard")).await;
    browser
        .wait_js(
            "the sign-in form",
            "return !document.querySelector('#signin').hidden",
        )
        .await;
    browser.type_into("#token-input", &app.admin()).await;
    browser.click("#signin-button").await;
    browser.wait_live("the live feeds").await;

    // Nobody has the capability: the page says so, and shows no attempt.
    let waiting = app
        .create_task(
            5,
            json!({"task_type": "render", "title": "Nobody can take this",
                   "required_capability": "nobody-has-it", "payload": {}}),
        )
        .await;
    let row = format!("#tasks tr[data-task-id='{waiting}']");
    browser.wait_attr(&row, "status", "pending").await;
    browser.click(&row).await;
    browser
        .wait_attr("#detail-body .why-waiting", "reason", "no_capable_droplet")
        .await;
    browser
        .wait_text(
            "#detail-body .why-waiting",
            "No registered droplet has the capability",
        )
        .await;
    assert_eq!(
        browser
            .js(
                "return document.querySelector('#detail-body .attempts') === null",
                vec![]
            )
            .await,
        json!(true),
        "a task never assigned has no attempts"
    );

    // A finished task: its one attempt on droplet 23, and where its time went.
    let worker = DropletServer::start(Behaviour::Ok).await;
    app.register(23, &["render"], &worker.endpoint).await;
    let _beats = keep_beating(&app, 23);
    let done = app
        .create_task(
            5,
            json!({"task_type": "render", "title": "Render and finish",
                   "required_capability": "render", "payload": {}}),
        )
        .await;
    finish(
        &app,
        23,
        done,
        json!({"status": "completed", "result": {"ok": true}}),
    )
    .await;
    let row = format!("#tasks tr[data-task-id='{done}']");
    browser.wait_attr(&row, "status", "completed").await;
    browser.click(&row).await;
    browser
        .wait_attr("#detail-body .attempts li", "chosen", "23")
        .await;
    browser
        .wait_text("#detail-body .attempts li", "Attempt 1 → droplet 23")
        .await;
    browser
        .wait_text("#detail-body .attempts li .ended", "ended completed")
        .await;
    browser
        .wait_js(
            "the time in each state",
            "const s = [...document.querySelectorAll('#detail-body .time-in-state dd')].map(d => d.dataset.state);
             return s.join() === 'pending,assigned,in_progress';",
        )
        .await;
    assert_eq!(
        browser
            .js(
                "return document.querySelector('#detail-body .why-waiting') === null",
                vec![]
            )
            .await,
        json!(true),
        "a finished task does not wait"
    );
    browser.screenshot("dashboard-explain.png").await;
    assert_eq!(
        browser
            .js(
                "return document.querySelector('#page-error').hidden",
                vec![]
            )
            .await,
        json!(true)
    );
}

/// Heartbeats for droplet `id` every 250 ms until aborted.
fn keep_beating(app: &TestApp, id: i32) -> tokio::task::JoinHandle<()> {
    let client = app.client.clone();
    let url = app.url(&format!("/droplets/{id}/heartbeat"));
    let token = app.token(id, &["read", "write"]);
    tokio::spawn(async move {
        loop {
            let mut beat = envelope(json!({"status": "active"}));
            beat["message_type"] = json!("heartbeat");
            let _ = client
                .post(&url)
                .bearer_auth(&token)
                .json(&beat)
                .send()
                .await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
}

/// Droplet `worker` starts task `id` once it is assigned to it, then reports `end`.
async fn finish(app: &TestApp, worker: i32, id: i32, end: Value) {
    let me = app.token(worker, &["read", "write"]);
    eventually(WAIT, "the task assigned to the worker", || async {
        (app.task_status(id).await == "assigned").then_some(())
    })
    .await;
    let (s, b) = app
        .patch(
            &format!("/tasks/{id}"),
            &me,
            json!({"status": "in_progress"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = app.patch(&format!("/tasks/{id}"), &me, end).await;
    assert_eq!(s, StatusCode::OK, "{b}");
}

/// Where screenshots go: the cargo target directory.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// Headless Chromium behind a chromedriver of our own, spoken to over plain WebDriver
/// (W3C JSON over HTTP) with the suite's HTTP client.
struct Browser {
    http: reqwest::Client,
    driver: Child,
    port: u16,
    session: String,
    profile: PathBuf,
}

impl Browser {
    /// Waits until the page says its feeds are live.
    async fn wait_live(&self, what: &str) {
        self.wait_js(
            what,
            "return document.querySelector('#conn').dataset.state === 'live'",
        )
        .await;
    }

    async fn start() -> Browser {
        for bin in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(bin).exists(),
                "{bin} is missing: the dashboard's browser test needs Debian's Chromium and ChromeDriver. Install them with: {INSTALL}"
            );
        }
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER}: {e} ({INSTALL})"));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        let base = format!("http://127.0.0.1:{port}");
        let ready = {
            let http = http.clone();
            let base = base.clone();
            eventually(WAIT, "chromedriver ready", move || {
                let http = http.clone();
                let base = base.clone();
                async move {
                    let r = http.get(format!("{base}/status")).send().await.ok()?;
                    let v: Value = r.json().await.ok()?;
                    (v["value"]["ready"] == true).then_some(())
                }
            })
        };
        ready.await;
        let profile =
            std::env::temp_dir().join(format!("orch-dashboard-{}", Uuid::new_v4().simple()));
        let args = json!([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1440,1200",
            format!("--user-data-dir={}", profile.display()),
        ]);
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }}});
        let mut browser = Browser {
            http,
            driver,
            port,
            session: String::new(),
            profile,
        };
        let created = browser
            .call(reqwest::Method::POST, "/session", Some(caps))
            .await;
        browser.session = created["sessionId"]
            .as_str()
            .expect("a WebDriver session id")
            .to_string();
        browser
    }

    /// One WebDriver command; panics with the driver's message if it fails.
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("http://127.0.0.1:{}{}", self.port, path);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        assert!(
            status.is_success(),
            "WebDriver {method} {path}: {status} {}",
            v["value"]
        );
        v["value"].clone()
    }

    fn at(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    async fn goto(&self, url: &str) {
        self.call(
            reqwest::Method::POST,
            &self.at("/url"),
            Some(json!({"url": url})),
        )
        .await;
    }

    /// Runs `script` (a function body) in the page and returns its value.
    async fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.call(
            reqwest::Method::POST,
            &self.at("/execute/sync"),
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    async fn element(&self, css: &str) -> String {
        let found = self
            .call(
                reqwest::Method::POST,
                &self.at("/element"),
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("no element id for {css}: {found}"))
            .to_string()
    }

    /// A real click (the element must be visible), once the element exists.
    async fn click(&self, css: &str) {
        self.wait_js(&format!("{css} to be shown"), &present(css))
            .await;
        let id = self.element(css).await;
        self.call(
            reqwest::Method::POST,
            &self.at(&format!("/element/{id}/click")),
            Some(json!({})),
        )
        .await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.call(
            reqwest::Method::POST,
            &self.at(&format!("/element/{id}/value")),
            Some(json!({"text": text})),
        )
        .await;
    }

    async fn clear(&self, css: &str) {
        let id = self.element(css).await;
        self.call(
            reqwest::Method::POST,
            &self.at(&format!("/element/{id}/clear")),
            Some(json!({})),
        )
        .await;
    }

    async fn attr(&self, css: &str, data: &str) -> Option<String> {
        let v = self
            .js("const e = document.querySelector(arguments[0]); return e ? e.dataset[arguments[1]] : null", vec![json!(css), json!(data)])
            .await;
        v.as_str().map(str::to_string)
    }

    /// Polls `script` until it returns true; on time-out saves `target/dashboard-failure.png`
    /// and fails with what the page showed.
    async fn wait_js(&self, what: &str, script: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if self.js(script, vec![]).await == json!(true) {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                self.screenshot("dashboard-failure.png").await;
                let text = self.js("return document.body.innerText", vec![]).await;
                panic!(
                    "timed out after {WAIT:?} waiting for {what}; screenshot in target/dashboard-failure.png; the page said:\n{}",
                    text.as_str().unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_attr(&self, css: &str, data: &str, value: &str) {
        let script = format!(
            "const e = document.querySelector({}); return !!e && e.dataset[{}] === {};",
            json!(css),
            json!(data),
            json!(value)
        );
        self.wait_js(&format!("{css} with data-{data}={value}"), &script)
            .await;
    }

    async fn wait_text(&self, css: &str, text: &str) {
        let script = format!(
            "const e = document.querySelector({}); return !!e && !e.closest('[hidden]') && e.textContent.includes({});",
            json!(css),
            json!(text)
        );
        self.wait_js(&format!("{css} to show {text:?}"), &script)
            .await;
    }

    async fn screenshot(&self, name: &str) {
        let data = self
            .call(reqwest::Method::GET, &self.at("/screenshot"), None)
            .await;
        let png = base64_decode(data.as_str().unwrap_or_default());
        let dir = target_dir();
        let _ = std::fs::create_dir_all(&dir);
        std::fs::write(dir.join(name), png).expect("screenshot written");
    }
}

/// A script that is true once `css` matches a shown element.
fn present(css: &str) -> String {
    format!(
        "const e = document.querySelector({}); return !!e && !e.closest('[hidden]') && e.getClientRects().length > 0;",
        json!(css)
    )
}

impl Drop for Browser {
    /// Ends the session (which closes Chromium) with a blocking request, since Drop cannot
    /// await, then stops our chromedriver and removes the profile.
    fn drop(&mut self) {
        if !self.session.is_empty() {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let request = format!(
                    "DELETE /session/{} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    self.session, self.port
                );
                // chromedriver answers once Chromium is closed; the status line is enough.
                if s.write_all(request.as_bytes()).is_ok() {
                    let mut answer = [0u8; 64];
                    let _ = s.read(&mut answer);
                }
            }
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Standard base64 (the screenshot), without a dependency for it.
fn base64_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => continue,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}
