//! `cancel_task`: work taken from a droplet is announced to it, off the transition that took
//! it (queued there, sent here by a loop of the dispatch workers).

use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::services::dispatch::{post_message, Cancel, Courier, Dispatcher, Outgoing};
use crate::services::task_store::Task;

/// Tells a droplet (internal id) that a task was taken from it or cancelled: queued for the
/// dispatch workers' loop ([`send_cancels`]), which sends each at once on its own task.
/// Sent during an emergency stop too: it only ever takes work away from a droplet.
pub fn cancel(dispatch: &Dispatcher, internal_droplet: i32, task: &Task) {
    dispatch.announce_cancel(Cancel {
        internal_droplet,
        task_id: task.id,
        trace_id: task.trace_id,
        attempt: task.attempt,
    });
}

/// Sends the queued cancellations, each on its own task (a slow droplet delays only its
/// own), until shutdown.
pub(super) async fn send_cancels(state: Courier, stop: CancellationToken) {
    let Some(mut cancels) = state.dispatch.take_cancels() else {
        return;
    };
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return,
            next = cancels.recv() => next,
        };
        let Some(cancel) = next else { return };
        tokio::spawn(send_cancel(state.clone(), cancel));
    }
}

async fn send_cancel(state: Courier, cancel: Cancel) {
    let Cancel {
        internal_droplet,
        task_id,
        trace_id,
        attempt,
    } = cancel;
    let Ok(Some(droplet)) =
        crate::services::droplets::load_internal(&state.db, internal_droplet).await
    else {
        return;
    };
    let message = Outgoing {
        trace_id: trace_id.to_string(),
        source: state.keys.orchestrator_id(),
        target: droplet.droplet_id,
        id_form: droplet.id_form.clone(),
        message_type: "command".into(),
        payload: json!({ "command": "cancel_task", "task_id": task_id, "attempt": attempt }),
    };
    let timeout = Duration::from_secs(state.settings.current().dispatch_timeout_seconds);
    let Some(_slot) = state.dispatch.slot(internal_droplet).await else {
        return;
    };
    let outcome = post_message(state.outbound(), &droplet.endpoint, &message, timeout).await;
    state
        .metrics
        .dispatch
        .with_label_values(&[outcome.label()])
        .inc();
}
