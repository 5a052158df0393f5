//! The simulator (its own crate, `orchestrator-simulator`) against the real service.

use clap::Parser;
use orchestrator_simulator::simulate::{self, SimulateArgs};
use serde_json::json;

use crate::helpers::*;

/// The command line of `orchestrator-simulator` (its `main.rs` flattens the same flags).
#[derive(Parser)]
struct Command {
    #[command(flatten)]
    args: SimulateArgs,
}

/// The simulator's command (`orchestrator-simulator`, its flags as the command parses them)
/// against a live service: its droplets register, take the tasks its producer creates, and
/// finish them all; the summary counts them and the database holds what the simulated
/// droplets sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_pushes_every_task_through_a_live_service() {
    let app = TestApp::spawn().await;
    let url = app.base.clone();
    let mut args = Command::try_parse_from([
        "orchestrator-simulator",
        "--url",
        &url,
        "--droplets",
        "3",
        "--capabilities",
        "a,b",
        "--tasks-per-second",
        "20",
        "--duration",
        "1",
        "--work-ms",
        "5",
        "--drain-seconds",
        "20",
        "--first-droplet-id",
        "2000",
        "--quiet",
    ])
    .expect("the flags parse")
    .args;
    args.jwt_secret = Some(SECRET.into());
    let stdout = simulate::run(args)
        .await
        .expect("the simulation ran")
        .to_string();
    assert!(
        stdout.contains("tasks: created 20 (errors 0), completed 20, failed 0"),
        "{stdout}"
    );
    assert!(stdout.contains("create -> completed"), "{stdout}");

    let droplets: Vec<(i32, String, Option<String>, String, serde_json::Value)> = sqlx::query_as(
        "SELECT droplet_id, name, steward, endpoint, capabilities FROM droplets ORDER BY droplet_id",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(droplets.len(), 3, "{droplets:?}");
    for ((id, name, steward, endpoint, caps), (want_id, want_cap)) in
        droplets.iter().zip([(2000, "a"), (2001, "b"), (2002, "a")])
    {
        assert_eq!(*id, want_id);
        assert_eq!(name, &format!("sim-{id}"));
        assert_eq!(steward.as_deref(), Some("simulator"));
        assert!(endpoint.ends_with(&format!("/d/{id}")), "{endpoint}");
        assert_eq!(caps, &json!([want_cap]));
    }

    // assigned_droplet_id is the droplets row's id; the droplet's own id is droplet_id.
    type Row = (
        String,
        String,
        String,
        Option<i32>,
        Option<serde_json::Value>,
    );
    let tasks: Vec<Row> = sqlx::query_as(
        "SELECT t.task_type, t.status, t.required_capability, d.droplet_id, t.result
             FROM tasks t LEFT JOIN droplets d ON d.id = t.assigned_droplet_id ORDER BY t.id",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(tasks.len(), 20);
    for (task_type, status, capability, droplet, result) in tasks {
        assert_eq!(
            (task_type.as_str(), status.as_str()),
            ("simulated", "completed")
        );
        let droplet = droplet.expect("assigned");
        let want = if droplet == 2001 { "b" } else { "a" };
        assert_eq!(
            capability, want,
            "a task ran on a droplet without its capability"
        );
        assert_eq!(result, Some(json!({"simulated": true, "droplet": droplet})));
    }
}
