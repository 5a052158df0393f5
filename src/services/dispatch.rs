//! Dispatch: after an assignment commits, the task goes to its droplet's `/message` as an
//! `execute_task` command; work taken away is announced with `cancel_task`. Off the request
//! path, with bounded concurrency, retried with backoff while the task stays assigned.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::config::Config;
use crate::services::tasks::Task;
use crate::state::AppState;
use crate::udc::{now_iso, UDC_VERSION};

pub struct Dispatcher {
    permits: Arc<Semaphore>,
}

/// The outcome of one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Delivered,
    Timeout,
    Failed(String),
}

impl Delivery {
    pub fn label(&self) -> &'static str {
        match self {
            Delivery::Delivered => "delivered",
            Delivery::Timeout => "timeout",
            Delivery::Failed(_) => "failed",
        }
    }
}

/// A UDC command envelope from the orchestrator to a droplet.
pub fn envelope(trace_id: String, target: i32, message_type: &str, payload: Value) -> Value {
    json!({
        "udc_version": UDC_VERSION,
        "trace_id": trace_id,
        "source": 10,
        "target": target,
        "message_type": message_type,
        "payload": payload,
        "timestamp": now_iso(),
    })
}

/// POSTs an envelope to `{endpoint}/message` with the orchestrator's token.
pub async fn post_message(
    state: &AppState,
    endpoint: &str,
    body: &Value,
    timeout: Duration,
) -> Delivery {
    let token = match state.keys.orchestrator_token() {
        Ok(t) => t,
        Err(e) => return Delivery::Failed(e.to_string()),
    };
    let url = format!("{}/message", endpoint.trim_end_matches('/'));
    let sent = state
        .http
        .post(&url)
        .bearer_auth(token)
        .timeout(timeout)
        .json(body)
        .send()
        .await;
    match sent {
        Ok(r) if r.status().is_success() => Delivery::Delivered,
        Ok(r) => Delivery::Failed(format!("HTTP {}", r.status().as_u16())),
        Err(e) if e.is_timeout() => Delivery::Timeout,
        Err(e) if e.is_connect() => Delivery::Failed("connection refused or unreachable".into()),
        Err(e) => Delivery::Failed(e.to_string()),
    }
}

impl Dispatcher {
    pub fn new(config: &Config) -> Dispatcher {
        Dispatcher {
            permits: Arc::new(Semaphore::new(config.dispatch_concurrency)),
        }
    }

    /// Sends `execute_task` to the task's droplet, retrying with backoff while the task is
    /// still assigned to it (the assignment timeout ends the attempts).
    pub fn execute(&self, state: &AppState, task: &Task) {
        if state.emergency_stopped() {
            return;
        }
        let (Some(endpoint), Some(droplet), Some(internal)) = (
            task.assigned_droplet_endpoint.clone(),
            task.assigned_droplet_id,
            task.assigned_droplet_internal,
        ) else {
            return;
        };
        let body = envelope(
            task.trace_id.to_string(),
            droplet,
            "command",
            json!({ "command": "execute_task", "task": task }),
        );
        let state = state.clone();
        let permits = self.permits.clone();
        let task_id = task.id;
        tokio::spawn(async move {
            let config = state.config();
            let timeout = Duration::from_secs(config.dispatch_timeout_seconds);
            let give_up = tokio::time::Instant::now()
                + Duration::from_secs(config.assignment_timeout_seconds);
            let mut backoff = Duration::from_millis(250);
            loop {
                let outcome = {
                    let Ok(_permit) = permits.acquire().await else {
                        return;
                    };
                    post_message(&state, &endpoint, &body, timeout).await
                };
                state
                    .metrics
                    .dispatch
                    .with_label_values(&[outcome.label()])
                    .inc();
                if outcome == Delivery::Delivered {
                    return;
                }
                tracing::debug!(task_id, droplet, outcome = ?outcome, "dispatch failed; will retry");
                // An emergency stop halts dispatch at once; the assignment timeout requeues
                // the task once the stop is over.
                if tokio::time::Instant::now() + backoff > give_up
                    || state.shutdown.is_cancelled()
                    || state.emergency_stopped()
                {
                    return;
                }
                tokio::select! {
                    _ = state.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                let still_assigned: Result<Option<bool>, _> = sqlx::query_scalar(
                    "SELECT status = 'assigned' AND assigned_droplet_id = $2 FROM tasks WHERE id = $1",
                )
                .bind(task_id)
                .bind(internal)
                .fetch_optional(&state.db)
                .await;
                match still_assigned {
                    Ok(Some(true)) | Err(_) => continue,
                    Ok(_) => return,
                }
            }
        });
    }

    /// Tells a droplet (internal id) that a task was taken from it or cancelled.
    /// Sent during an emergency stop too: it only ever takes work away from a droplet.
    pub fn cancel(&self, state: &AppState, internal_droplet: i32, task_id: i32, trace_id: Uuid) {
        let state = state.clone();
        let permits = self.permits.clone();
        tokio::spawn(async move {
            let Ok(Some(droplet)) =
                crate::services::droplets::load_internal(&state.db, internal_droplet).await
            else {
                return;
            };
            let body = envelope(
                trace_id.to_string(),
                droplet.droplet_id,
                "command",
                json!({ "command": "cancel_task", "task_id": task_id }),
            );
            let timeout = Duration::from_secs(state.config().dispatch_timeout_seconds);
            let Ok(_permit) = permits.acquire().await else {
                return;
            };
            let outcome = post_message(&state, &droplet.endpoint, &body, timeout).await;
            state
                .metrics
                .dispatch
                .with_label_values(&[outcome.label()])
                .inc();
        });
    }
}
