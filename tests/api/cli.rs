//! The command line of the real binary: `token`, `check-config`, `migrate`, `--help`.

use std::process::{Command, Output};

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;

/// Runs the orchestrator binary with exactly these variables (no inherited environment, and
/// a working directory without a `.env`).
pub(crate) fn orchestrator(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_orchestrator"));
    cmd.args(args).env_clear().current_dir(std::env::temp_dir());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run the orchestrator binary")
}

pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn token_output_is_accepted_by_the_api() {
    let out = orchestrator(
        &[
            "token",
            "--droplet-id",
            "5",
            "--steward",
            "Name",
            "--permissions",
            "read,write",
            "--expires-in",
            "3600",
        ],
        &[("JWT_SECRET_KEY", SECRET)],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = text(&out.stdout).trim().to_string();
    assert_eq!(token.split('.').count(), 3, "not a JWT: {token}");

    let app = TestApp::spawn().await;
    let (status, body) = app.get("/tasks", &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["target"], 5, "{body}");
    let (status, body) = app
        .post("/tasks", &token, task_payload("from the CLI token"))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["payload"]["task_id"].as_i64().unwrap() as i32;
    let created_by = app.task(id).await["created_by"].clone();
    assert!(
        created_by == 5 || created_by == "5",
        "created_by {created_by}"
    );
    // It carries what was asked, and no more.
    let (status, _) = app.post("/droplets/6/activate", &token, json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[test]
fn token_refuses_an_unknown_permission_and_a_missing_secret() {
    let out = orchestrator(
        &["token", "--droplet-id", "5", "--permissions", "read,root"],
        &[("JWT_SECRET_KEY", SECRET)],
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("root"), "{}", text(&out.stderr));
    let out = orchestrator(&["token", "--droplet-id", "5"], &[]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("JWT_SECRET_KEY"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn check_config_rejects_port_abc_naming_the_variable() {
    let out = orchestrator(&["check-config"], &[("PORT", "abc")]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("PORT"), "{stderr}");
    assert!(stderr.contains("abc"), "{stderr}");
    assert!(
        text(&out.stdout).is_empty(),
        "printed a configuration for an invalid one"
    );
}

#[test]
fn check_config_rejects_a_key_that_does_not_parse() {
    let out = orchestrator(
        &["check-config"],
        &[(
            "REGISTRY_PUBLIC_KEY",
            "-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----",
        )],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("REGISTRY_PUBLIC_KEY"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn check_config_prints_the_effective_configuration_with_secrets_masked() {
    let out = orchestrator(
        &["check-config"],
        &[
            ("JWT_SECRET_KEY", SECRET),
            (
                "DATABASE_URL",
                "postgres://app:hunter2@db:5432/orchestrator",
            ),
            ("RATE_LIMIT_PER_MINUTE", "250"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.lines().any(|l| l == "PORT=8000"), "{stdout}");
    assert!(
        stdout.lines().any(|l| l == "RATE_LIMIT_PER_MINUTE=250"),
        "{stdout}"
    );
    assert!(
        stdout.lines().any(|l| l == "JWT_SECRET_KEY=********"),
        "{stdout}"
    );
    assert!(
        !stdout.contains(SECRET) && !stdout.contains("hunter2"),
        "a secret was printed: {stdout}"
    );
    for name in orchestrator::config::SETTINGS.iter().map(|s| s.name) {
        if name != "RELOAD" {
            assert!(
                stdout.lines().any(|l| l.starts_with(&format!("{name}="))),
                "{name} not printed"
            );
        }
    }
}

#[test]
fn every_subcommand_has_help() {
    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["migrate", "--help"],
        &["token", "--help"],
        &["check-config", "--help"],
    ] {
        let out = orchestrator(args, &[]);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert!(stdout.contains("Usage: orchestrator"), "{args:?}: {stdout}");
    }
    let top = text(&orchestrator(&["--help"], &[]).stdout);
    for sub in ["serve", "migrate", "token", "check-config"] {
        assert!(top.contains(sub), "{sub} not listed: {top}");
    }
    let token = text(&orchestrator(&["token", "--help"], &[]).stdout);
    for flag in ["--droplet-id", "--steward", "--permissions", "--expires-in"] {
        assert!(token.contains(flag), "{flag} not documented: {token}");
    }
}

#[tokio::test]
async fn migrate_creates_the_database_and_applies_the_migrations() {
    let db = TestDatabase::fresh().await;
    let url = db.url.clone();
    let out = orchestrator(
        &["migrate"],
        &[("DATABASE_URL", url.as_str()), ("LOG_LEVEL", "WARNING")],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .expect("database exists");
    let (applied,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&pool)
        .await
        .expect("migrations table");
    assert!(applied >= 2, "{applied} migrations applied");
    let (tasks,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM tasks")
        .fetch_one(&pool)
        .await
        .expect("tasks table");
    assert_eq!(tasks, 0);
}

#[test]
fn serve_reports_an_unreachable_database_and_exits() {
    let out = orchestrator(
        &["serve"],
        &[
            (
                "DATABASE_URL",
                "postgres://postgres@127.0.0.1:1/orchestrator",
            ),
            ("DATABASE_ACQUIRE_TIMEOUT_SECONDS", "1"),
            ("PORT", "0"),
            ("LOG_LEVEL", "ERROR"),
        ],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("database"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn healthcheck_passes_against_a_live_service_and_fails_without_one() {
    let app = TestApp::spawn().await;
    let port = app.addr.port().to_string();
    // The container's form: no URL, the service's own PORT on loopback.
    let cli = tokio::task::spawn_blocking(move || {
        orchestrator(
            &["healthcheck"],
            &[("PORT", port.as_str()), ("HOST", "0.0.0.0")],
        )
    })
    .await
    .unwrap();
    assert!(cli.status.success(), "{}", text(&cli.stderr));
    let dead = format!("{}/health", dead_endpoint());
    let out =
        tokio::task::spawn_blocking(move || orchestrator(&["healthcheck", "--url", &dead], &[]))
            .await
            .unwrap();
    assert!(!out.status.success());
}

/// Every uncommented line of `.env.example`, as the service would read it.
fn env_example() -> (String, std::collections::HashMap<String, String>) {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.env.example"))
        .expect(".env.example");
    let values = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not NAME=value: {l}"));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    (text, values)
}

#[test]
fn env_example_lists_every_variable_with_its_default() {
    let (text, values) = env_example();
    for name in orchestrator::config::SETTINGS.iter().map(|s| s.name) {
        let listed = text.lines().any(|l| {
            let l = l.trim_start_matches('#').trim_start();
            l.starts_with(&format!("{name}="))
        });
        assert!(listed, "{name} is not in .env.example");
    }
    for name in values.keys() {
        assert!(
            orchestrator::config::setting(name).is_some(),
            ".env.example sets {name}, which the service does not read"
        );
    }
    // Copied to .env as it is, it changes nothing: every value set is the default.
    let from_example =
        orchestrator::config::Config::from_lookup(&|k| values.get(k).cloned()).expect("valid");
    let defaults = orchestrator::config::Config::from_lookup(&|_| None).expect("valid");
    assert_eq!(from_example.describe(), defaults.describe());
}
