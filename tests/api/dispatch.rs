//! The delivery queue: bounded memory (deliveries past `DISPATCH_QUEUE_BODIES` wait as ids
//! and are read back), retries that read the task back, and no delivery of a task that is no
//! longer assigned.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;

/// Every `execute_task` the droplet got: task id -> the task as delivered, and how many.
fn deliveries(droplet: &DropletServer) -> (HashMap<i64, Value>, usize) {
    let mut by_task = HashMap::new();
    let mut n = 0;
    for m in droplet.messages() {
        if m["payload"]["command"] == "execute_task" {
            n += 1;
            let task = m["payload"]["task"].clone();
            by_task.insert(task["id"].as_i64().unwrap(), task);
        }
    }
    (by_task, n)
}

#[tokio::test]
async fn a_burst_past_the_kept_bodies_is_delivered_once_each_with_its_task_read_back() {
    // Five deliveries keep their task; the other 295 wait as ids and are read back.
    let app = TestApp::spawn_with(&[
        ("DISPATCH_QUEUE_BODIES", "5"),
        ("DISPATCH_PER_DROPLET_CONCURRENCY", "2"),
    ])
    .await;
    let droplet = DropletServer::start(Behaviour::Ok).await;
    app.pause_routing().await;
    let ids = app.insert_pending(300, Some("burst"), 5).await;
    app.register(31, &["burst"], &droplet.endpoint).await;
    app.state
        .jobs
        .set_paused(&app.state, orchestrator::jobs::JobId::TaskRouter, false);
    app.state.router.trigger();
    eventually(Duration::from_secs(30), "300 deliveries", || async {
        (deliveries(&droplet).1 >= 300).then_some(())
    })
    .await;
    // A moment for any duplicate to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (by_task, n) = deliveries(&droplet);
    assert_eq!(n, 300, "each task delivered exactly once");
    assert_eq!(by_task.len(), 300);
    for id in ids {
        let task = &by_task[&(id as i64)];
        // Read back or kept, the body is the task as assigned.
        assert_eq!(task["status"], "assigned", "{task}");
        assert_eq!(task["assigned_droplet_id"], 31, "{task}");
        assert_eq!(task["attempt"], 1, "{task}");
        assert_eq!(
            task["title"].as_str().unwrap().split(' ').next(),
            Some("bulk")
        );
    }
    assert!(app.state.dispatch.queue.is_empty());
}

#[tokio::test]
async fn a_failed_delivery_is_retried_with_its_task_read_back_until_the_droplet_takes_it() {
    let app = TestApp::spawn().await;
    let droplet = DropletServer::start(Behaviour::Error500).await;
    app.register(32, &["r"], &droplet.endpoint).await;
    let task = app
        .create_task(
            5,
            serde_json::json!({"task_type": "t", "title": "retried", "required_capability": "r"}),
        )
        .await;
    eventually(Duration::from_secs(10), "two failed deliveries", || async {
        (deliveries(&droplet).1 >= 2).then_some(())
    })
    .await;
    droplet.set(Behaviour::Ok);
    // 0.25 s, 0.5 s, 1 s, ... apart: the next try after the switch is taken.
    let before = deliveries(&droplet).1;
    eventually(Duration::from_secs(10), "a delivery taken", || async {
        (deliveries(&droplet).1 > before).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (by_task, n) = deliveries(&droplet);
    assert_eq!(n, before + 1, "no try after the one taken");
    assert_eq!(by_task[&(task as i64)]["status"], "assigned");
    assert_eq!(app.task_status(task).await, "assigned");
}

#[tokio::test]
async fn retries_stop_once_the_task_is_no_longer_assigned_to_the_droplet() {
    let app = TestApp::spawn().await;
    let droplet = DropletServer::start(Behaviour::Error500).await;
    app.register(33, &["c"], &droplet.endpoint).await;
    let task = app
        .create_task(
            5,
            serde_json::json!({"task_type": "t", "title": "cancelled", "required_capability": "c"}),
        )
        .await;
    eventually(Duration::from_secs(10), "a failed delivery", || async {
        (deliveries(&droplet).1 >= 1).then_some(())
    })
    .await;
    let (status, body) = app.delete(&format!("/tasks/{task}"), &app.admin()).await;
    assert!(status.is_success(), "{status} {body}");
    let after_cancel = deliveries(&droplet).1;
    // The tries that were due are read back, find the task cancelled, and stop.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        deliveries(&droplet).1 <= after_cancel + 1,
        "tries went on after the cancel: {} then {}",
        after_cancel,
        deliveries(&droplet).1
    );
    assert!(app.state.dispatch.queue.is_empty());
}
