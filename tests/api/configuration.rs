//! Start-up as an operator sees it: the real binary with bad settings stops with one clear
//! line naming what is wrong (never a panic), and a good one serves and stops on SIGTERM.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::*;

/// The binary with exactly these variables (nothing inherited, no `.env` in its directory).
fn orchestrator(vars: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_orchestrator"));
    cmd.env_clear()
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Ok(path) = std::env::var("PATH") {
        cmd.env("PATH", path);
    }
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd
}

/// Waits for `child` to exit within `limit`, killing it (and failing) if it does not.
fn wait_for_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the orchestrator did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs the binary to its end (it must stop by itself within 20 s).
fn run(vars: &[(&str, &str)]) -> Outcome {
    let mut child = orchestrator(vars).spawn().expect("the binary starts");
    let status = wait_for_exit(&mut child, Duration::from_secs(20));
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut stdout);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    Outcome {
        status,
        stdout,
        stderr,
    }
}

fn assert_refused(outcome: &Outcome, names: &str) {
    assert!(
        !outcome.status.success(),
        "should not start; stdout: {} stderr: {}",
        outcome.stdout,
        outcome.stderr
    );
    assert!(
        outcome.stderr.contains(names),
        "stderr should name {names}: {}",
        outcome.stderr
    );
    assert!(
        !outcome.stderr.contains("panicked") && !outcome.stderr.contains("RUST_BACKTRACE"),
        "a panic instead of a message: {}",
        outcome.stderr
    );
}

/// The settings of a binary that would start, on a fresh database and a free port.
fn good_vars(database_url: &str, port: &str) -> Vec<(String, String)> {
    [
        ("DATABASE_URL", database_url),
        ("JWT_SECRET_KEY", SECRET),
        ("HOST", "127.0.0.1"),
        ("PORT", port),
        ("DATABASE_POOL_SIZE", "2"),
        ("DATABASE_MAX_OVERFLOW", "0"),
        ("LOG_LEVEL", "WARNING"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn with(base: &[(String, String)], extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = base
        .iter()
        .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
        .cloned()
        .collect();
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    vars
}

fn refs(vars: &[(String, String)]) -> Vec<(&str, &str)> {
    vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

#[test]
fn a_non_numeric_port_stops_start_up_naming_port() {
    let db = TestDatabase::fresh_blocking();
    let vars = good_vars(&db.url, "0");
    let outcome = run(&refs(&with(&vars, &[("PORT", "abc")])));
    assert_refused(&outcome, "PORT");
}

#[test]
fn a_negative_interval_stops_start_up_naming_it() {
    let db = TestDatabase::fresh_blocking();
    let vars = good_vars(&db.url, "0");
    let outcome = run(&refs(&with(&vars, &[("HEARTBEAT_TIMEOUT", "-1")])));
    assert_refused(&outcome, "HEARTBEAT_TIMEOUT");
}

#[test]
fn production_without_a_secret_refuses_to_start() {
    let db = TestDatabase::fresh_blocking();
    let vars: Vec<(String, String)> = good_vars(&db.url, "0")
        .into_iter()
        .filter(|(k, _)| k != "JWT_SECRET_KEY")
        .collect();
    let outcome = run(&refs(&with(&vars, &[("ENVIRONMENT", "production")])));
    assert_refused(&outcome, "JWT_SECRET_KEY");
}

#[test]
fn production_with_a_short_secret_refuses_to_start() {
    let db = TestDatabase::fresh_blocking();
    let vars = good_vars(&db.url, "0");
    let outcome = run(&refs(&with(
        &vars,
        &[
            ("ENVIRONMENT", "production"),
            ("JWT_SECRET_KEY", "too-short"),
        ],
    )));
    assert_refused(&outcome, "JWT_SECRET_KEY");
}

#[test]
fn an_unreachable_database_ends_start_up_with_one_line_hiding_the_password() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let url = format!("postgres://orch:hunter2@127.0.0.1:{port}/orchestrator");
    let vars = good_vars(&url, "0");
    let started = Instant::now();
    let outcome = run(&refs(&vars));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert_refused(&outcome, &format!("127.0.0.1:{port}"));
    let all = format!("{}{}", outcome.stdout, outcome.stderr);
    assert!(!all.contains("hunter2"), "the password leaked: {all}");
    let lines: Vec<&str> = outcome
        .stderr
        .lines()
        .filter(|l| l.contains(&format!("127.0.0.1:{port}")))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "one line names the database: {}",
        outcome.stderr
    );
    assert!(
        lines[0].contains("orch:****@"),
        "password masked: {}",
        lines[0]
    );
    assert!(
        lines[0].contains("refused"),
        "the reason is given: {}",
        lines[0]
    );

    // A password given as a query parameter is hidden too.
    let url = format!("postgres://orch@127.0.0.1:{port}/orchestrator?password=hunter2");
    let outcome = run(&refs(&good_vars(&url, "0")));
    assert_refused(&outcome, &format!("127.0.0.1:{port}"));
    let all = format!("{}{}", outcome.stdout, outcome.stderr);
    assert!(!all.contains("hunter2"), "the password leaked: {all}");
}

#[test]
fn an_unparseable_database_url_is_named_without_its_password() {
    let vars = good_vars("postgres://orch:hunter2@127.0.0.1:notaport/x", "0");
    let outcome = run(&refs(&vars));
    assert_refused(&outcome, "orch:****@127.0.0.1:notaport");
    let all = format!("{}{}", outcome.stdout, outcome.stderr);
    assert!(!all.contains("hunter2"), "the password leaked: {all}");
}

#[test]
fn a_database_url_that_is_not_postgres_names_database_url() {
    let vars = good_vars("mysql://root@127.0.0.1/x", "0");
    let outcome = run(&refs(&vars));
    assert_refused(&outcome, "DATABASE_URL");
}

#[test]
fn a_good_configuration_serves_and_stops_cleanly_on_sigterm() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let db = TestDatabase::fresh_blocking();
    let vars = good_vars(&db.url, &port.to_string());
    let mut child = orchestrator(&refs(&vars)).spawn().expect("starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    let healthy = loop {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("exited early with {status}: {err}");
        }
        let answered = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok_and(|mut s| {
            use std::io::Write;
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out.starts_with("HTTP/1.1 200") && out.contains("\"status\":\"active\"")
        });
        if answered {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let status = wait_for_exit(&mut child, Duration::from_secs(15));
    assert!(healthy, "the service never answered /health");
    assert!(status.success(), "exit after SIGTERM: {status}");
}
