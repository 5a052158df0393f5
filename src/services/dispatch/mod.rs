//! Dispatch: after an assignment commits, the task goes to its droplet's `/message` as an
//! `execute_task` command; work taken away is announced with `cancel_task`. Off the request
//! path, with bounded concurrency (in all, and per droplet, so a silent droplet cannot hold
//! every slot), retried with backoff while the task stays assigned. A droplet that refuses a
//! delivery (a 4xx other than 408/429) is not asked again: the task goes back to the router;
//! a delivery it accepts ends its run of refusals. Deliveries that cannot connect or time
//! out are counted in a row too: at `DISPATCH_FAILURES_BEFORE_UNREACHABLE` the droplet is
//! marked unreachable (`task_recovery::unreachable`) and probed (`probe`). A droplet that
//! answers 429 (or 503) with `Retry-After` pushes back (`pushback`): the task stays assigned
//! and is delivered again once that time has passed, nothing else goes to that droplet
//! meanwhile, and its in-flight allowance halves.

use std::time::Duration;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::identity::Keys;
use crate::protocol::Envelope;
use crate::services::core::{EmergencyStop, Settings};
use crate::services::endpoints::{self, EndpointPolicy, NoAllowedAddress};
use crate::services::task_store::Task;
use crate::services::Core;

mod cancels;
mod courier;
mod excerpt;
pub mod holds;
pub mod probe;
pub mod pushback;
pub mod queue;
pub mod slots;
pub use cancels::cancel;
use cancels::send_cancels;
pub use courier::Courier;
use excerpt::answer_excerpt;
use queue::{Tries, Waiting};
pub use slots::{Cancel, Dispatcher, Refusal, Report, Unreachable};

/// `Delivery::Failed`'s reason when the droplet could not be connected to.
const UNREACHABLE: &str = "unreachable";

/// The outcome of one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Delivered,
    /// No answer in time (transient: retried).
    Timeout,
    /// Unreachable or a server error, in a word (transient: retried). Never the transport's
    /// own text, which would make `/send` a port scanner.
    Failed(String),
    /// The droplet answered a 3xx or a 4xx other than 408/429: it will not take this message.
    /// With the start of its answer, for the operator's log only.
    Refused(u16, String),
    /// The endpoint is not one the orchestrator delivers to (its shape or its address).
    Blocked,
    /// The droplet answered 429 or 503 with `Retry-After`: try again after this long (capped
    /// at `pushback::MAX_RETRY_AFTER`). Not a failure.
    Deferred(Duration),
}

impl Delivery {
    pub fn label(&self) -> &'static str {
        match self {
            Delivery::Delivered => "delivered",
            Delivery::Timeout => "timeout",
            Delivery::Failed(_) => "failed",
            Delivery::Refused(..) => "refused",
            Delivery::Blocked => "blocked",
            Delivery::Deferred(_) => "deferred",
        }
    }

    /// Whether trying again later may help.
    pub fn is_transient(&self) -> bool {
        matches!(self, Delivery::Timeout | Delivery::Failed(_))
    }

    /// Whether the droplet could not be reached: no connection, or no answer in time (an
    /// HTTP answer of any kind, a 5xx included, shows it is there).
    pub fn is_unreachable(&self) -> bool {
        match self {
            Delivery::Timeout => true,
            Delivery::Failed(reason) => reason == UNREACHABLE,
            _ => false,
        }
    }

    /// The outcome in words, for a caller or a log line.
    pub fn reason(&self, timeout: Duration) -> String {
        match self {
            Delivery::Delivered => "delivered".into(),
            Delivery::Timeout => format!("no answer within {} s", timeout.as_secs()),
            Delivery::Failed(reason) => reason.clone(),
            Delivery::Refused(code, _) => format!("refused with HTTP {code}"),
            Delivery::Blocked => "endpoint not allowed".into(),
            Delivery::Deferred(wait) => format!(
                "the droplet asked to retry after {} s (Retry-After)",
                wait.as_secs()
            ),
        }
    }
}

/// A droplet id as that droplet writes ids in its own envelopes: `12`, or `"droplet-12"`
/// (`id_form` = `string`, what the original droplets require). Integers when unknown.
pub fn id_value(id: i32, id_form: Option<&str>) -> Value {
    match id_form {
        Some("string") => json!(format!("droplet-{id}")),
        _ => json!(id),
    }
}

/// How a droplet writes ids, from the `source` of an envelope it sent.
pub fn id_form_of(source: &Value) -> Option<&'static str> {
    match source {
        Value::String(_) => Some("string"),
        Value::Number(_) => Some("int"),
        _ => None,
    }
}

/// One message the orchestrator sends to a droplet.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub trace_id: String,
    /// Who the message is from: the orchestrator, or the droplet a `/send` relays for.
    pub source: i32,
    pub target: i32,
    /// How the target droplet writes ids (`int`, `string`, or unknown).
    pub id_form: Option<String>,
    pub message_type: String,
    pub payload: Value,
}

impl Outgoing {
    /// The UDC envelope, ids in the target's own form, with the signature when there is one.
    pub fn envelope(&self, signature: Option<&str>) -> Value {
        let form = self.id_form.as_deref();
        Envelope::new(
            &self.message_type,
            id_value(self.source, form),
            id_value(self.target, form),
            &self.payload,
        )
        .trace(Some(self.trace_id.clone()))
        .signed(signature)
        .to_value()
    }
}

fn blocked_by_policy(error: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.downcast_ref::<NoAllowedAddress>().is_some() {
            return true;
        }
        source = e.source();
    }
    false
}

/// What sending one message to a droplet uses of the shared parts: the endpoint policy, the
/// keys that sign it and the delivery client (no redirects, the policy at each resolution).
#[derive(Clone, Copy)]
pub struct Outbound<'a> {
    policy: &'a EndpointPolicy,
    keys: &'a Keys,
    client: &'a reqwest::Client,
}

impl<'a> From<&'a Core> for Outbound<'a> {
    fn from(core: &'a Core) -> Outbound<'a> {
        Outbound {
            policy: &core.endpoint_policy,
            keys: &core.keys,
            client: &core.delivery,
        }
    }
}

/// POSTs a message to `{endpoint}/message` with the orchestrator's credentials, after
/// checking the endpoint (its shape, and every address it resolves to).
pub async fn post_message(
    out: Outbound<'_>,
    endpoint: &str,
    message: &Outgoing,
    timeout: Duration,
) -> Delivery {
    if endpoints::check_delivery(endpoint, out.policy).is_err() {
        return Delivery::Blocked;
    }
    let credentials = match out.keys.outbound() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot sign the orchestrator's token");
            return Delivery::Failed("internal error".into());
        }
    };
    let body = message.envelope(credentials.signature.as_deref());
    let url = format!("{}/message", endpoint.trim_end_matches('/'));
    let sent = out
        .client
        .post(&url)
        .bearer_auth(&credentials.bearer)
        .timeout(timeout)
        .json(&body)
        .send()
        .await;
    match sent {
        Ok(r) if r.status().is_success() => Delivery::Delivered,
        Ok(r) => {
            let code = r.status().as_u16();
            let pushes_back = code == 429 || code == 503;
            if let Some(wait) = pushes_back
                .then(|| pushback::retry_after(r.headers()))
                .flatten()
            {
                Delivery::Deferred(wait)
            } else if code == 408 || code == 429 || r.status().is_server_error() {
                Delivery::Failed(format!("HTTP {code}"))
            } else {
                let sent = [
                    credentials.bearer.as_str(),
                    credentials.signature.as_deref().unwrap_or(""),
                ];
                Delivery::Refused(code, answer_excerpt(r, &sent).await)
            }
        }
        Err(e) if e.is_timeout() => Delivery::Timeout,
        Err(e) if blocked_by_policy(&e) => Delivery::Blocked,
        Err(_) => Delivery::Failed(UNREACHABLE.into()),
    }
}

/// Queues `execute_task` to the task's droplet; a worker sends it, retrying with backoff
/// while the task is still assigned to it (the assignment timeout ends the attempts). A
/// refusal ends them at once and hands the task back to the router.
pub fn execute(dispatch: &Dispatcher, stop: &EmergencyStop, settings: &Settings, task: &Task) {
    if stop.is_on() {
        return;
    }
    let Some(droplet) = task.assigned_droplet_internal else {
        return;
    };
    let config = settings.current();
    dispatch.queue.push(Waiting {
        task_id: task.id,
        attempt: task.attempt,
        droplet,
        body: Some(Box::new(task.clone())),
        tries: Tries {
            backoff: Duration::from_millis(250),
            give_up: tokio::time::Instant::now()
                + Duration::from_secs(config.assignment_timeout_seconds),
        },
    });
}

/// The workers that send queued deliveries (`DISPATCH_CONCURRENCY` of them), and the loop
/// that sends the cancellations, until shutdown.
pub async fn run_workers(state: Courier, stop: CancellationToken) {
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..state.dispatch.workers.max(1) {
        workers.spawn(work(state.clone(), stop.clone()));
    }
    workers.spawn(send_cancels(state, stop));
    while workers.join_next().await.is_some() {}
}

async fn work(state: Courier, stop: CancellationToken) {
    loop {
        let taken = state.dispatch.queue.take(|d| state.dispatch.try_own(d));
        let Some((waiting, own)) = taken else {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = state.dispatch.queue.ready() => continue,
            }
        };
        let Some(waiting) = with_body(&state, waiting).await else {
            drop(own);
            state.dispatch.queue.slot_freed();
            continue;
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = send(&state, waiting, own) => {}
        }
        state.dispatch.queue.slot_freed();
    }
}

/// The delivery with its task: as queued, or read back with the deliveries waiting behind it
/// for the same droplet (those go back to the head of the lane). None when its task is no
/// longer assigned to that droplet on that attempt (nothing to send), or it cannot be read
/// now (the assignment timeout requeues the task).
async fn with_body(state: &Courier, waiting: Waiting) -> Option<Waiting> {
    if waiting.body.is_some() {
        return Some(waiting);
    }
    let mut batch = vec![waiting];
    batch.extend(
        state
            .dispatch
            .queue
            .take_bodiless(batch[0].droplet, queue::READ_BACK - 1),
    );
    let ids: Vec<i32> = batch.iter().map(|w| w.task_id).collect();
    let rows: Vec<Task> = match crate::services::task_store::select_task!(
        " WHERE t.id = ANY($1) AND t.status = 'assigned' AND t.assigned_droplet_id = $2",
        &ids,
        batch[0].droplet
    )
    .fetch_all(&state.db)
    .await
    {
        Ok(rows) => rows,
        Err(e) => {
            // The database is away: the deliveries wait and are read back again (each until
            // its own give-up time, after which the assignment timeout requeues its task).
            tracing::warn!(error = %e, deliveries = batch.len(), "could not read queued deliveries back; trying again shortly");
            let now = tokio::time::Instant::now();
            batch.retain(|w| w.tries.give_up > now);
            later(state, batch, READ_BACK_PAUSE);
            return None;
        }
    };
    let mut rows: std::collections::HashMap<i32, Task> =
        rows.into_iter().map(|t| (t.id, t)).collect();
    let mut ready: Vec<Waiting> = batch
        .into_iter()
        .filter_map(|mut w| {
            let task = rows.remove(&w.task_id)?;
            (task.attempt == w.attempt).then(|| {
                w.body = Some(Box::new(task));
                w
            })
        })
        .collect();
    if ready.is_empty() {
        return None;
    }
    let first = ready.remove(0);
    state.dispatch.queue.push_front(ready);
    Some(first)
}

/// Sends one delivery holding its droplet's own slot, then acts on the outcome.
async fn send(state: &Courier, waiting: Waiting, own: tokio::sync::OwnedSemaphorePermit) {
    let Waiting {
        task_id,
        attempt,
        droplet: internal,
        body,
        tries,
    } = waiting;
    let Some(task) = body else { return };
    // An emergency stop halts dispatch at once; the assignment timeout requeues the task
    // once the stop is over.
    if state.stop.is_on() {
        return;
    }
    let (Some(endpoint), Some(droplet)) = (
        task.assigned_droplet_endpoint.clone(),
        task.assigned_droplet_id,
    ) else {
        return;
    };
    let message = Outgoing {
        trace_id: task.trace_id.to_string(),
        source: state.keys.orchestrator_id(),
        target: droplet,
        id_form: task.assigned_droplet_id_form.clone(),
        message_type: "command".into(),
        payload: json!({ "command": "execute_task", "task": task }),
    };
    let counted_refusals = task.assigned_droplet_refusing;
    drop(task);
    let timeout = Duration::from_secs(state.settings.current().dispatch_timeout_seconds);
    let outcome = {
        let Some(_shared) = state.dispatch.shared().await else {
            return;
        };
        let outcome = post_message(state.outbound(), &endpoint, &message, timeout).await;
        drop(own);
        outcome
    };
    state
        .metrics
        .dispatch
        .with_label_values(&[outcome.label()])
        .inc();
    if outcome == Delivery::Delivered {
        // Refusals and connection failures count "in a row": an accepted delivery resets
        // them. Only for a droplet known to have some (counted here lately, or when its task
        // was read), so the deliveries of droplets that always answer write nothing.
        if state.dispatch.take_refused_lately(internal) || counted_refusals {
            reset_refusals(state, internal).await;
        }
        if state.dispatch.holds.is_throttled(internal) {
            grow_allowance(state, internal).await;
        }
        return;
    }
    if let Delivery::Deferred(wait) = outcome {
        let again = Waiting {
            task_id,
            attempt,
            droplet: internal,
            body: None,
            tries,
        };
        deferred(state, again, droplet, wait).await;
        return;
    }
    if !outcome.is_transient() {
        let reason = outcome.reason(timeout);
        let answer = match &outcome {
            Delivery::Refused(_, answer) => answer.as_str(),
            _ => "",
        };
        tracing::warn!(task_id, droplet, %reason, answer, "droplet refused the task; it goes back to the router");
        // Recovery takes the task back (`task_recovery::run_refusals`); should that fail, the
        // assignment timeout requeues it.
        state.dispatch.report_refusal(Refusal {
            task_id,
            internal_droplet: internal,
            droplet_id: droplet,
            reason,
            credentials: matches!(outcome, Delivery::Refused(401 | 403, _)),
        });
        return;
    }
    tracing::debug!(task_id, droplet, outcome = ?outcome, "dispatch failed; will retry");
    if outcome.is_unreachable() {
        // Counted by recovery; at `DISPATCH_FAILURES_BEFORE_UNREACHABLE` in a row the
        // droplet's assigned tasks are taken back, and this retry finds nothing to send.
        state.dispatch.report_unreachable(Unreachable {
            internal_droplet: internal,
            droplet_id: droplet,
            reason: outcome.reason(timeout),
        });
    }
    if tokio::time::Instant::now() + tries.backoff > tries.give_up
        || state.shutdown.is_cancelled()
        || state.stop.is_on()
    {
        return;
    }
    // The retry waits holding only ids; its task is read back (and sent only if still
    // assigned to this droplet on this attempt) when its turn comes.
    let retry = Waiting {
        task_id,
        attempt,
        droplet: internal,
        body: None,
        tries: Tries {
            backoff: (tries.backoff * 2).min(Duration::from_secs(10)),
            give_up: tries.give_up,
        },
    };
    later(state, vec![retry], tries.backoff);
}

/// Resets a droplet's (internal id) counts of refusals and connection failures in a row
/// after it accepted a delivery.
async fn reset_refusals(state: &Courier, internal: i32) {
    let reset = sqlx::query!(
        "UPDATE droplets SET refused_deliveries = 0, failed_deliveries = 0
         WHERE id = $1 AND (refused_deliveries > 0 OR failed_deliveries > 0)",
        internal,
    )
    .execute(&state.db)
    .await;
    if let Err(e) = reset {
        // Tried again at its next accepted delivery.
        tracing::warn!(droplet = internal, error = %e, "could not reset a droplet's refusal count");
        state.dispatch.note_refused(internal);
    }
}

/// The droplet (`again.droplet`, internal; `droplet` external) pushed back: nothing goes to
/// it before `wait` has passed (here at once; on other replicas through its row), its
/// allowance halves, and this delivery is tried again then, the task still assigned on the
/// same attempt (no retry counted). Its give-up time moves past the wait, as the assignment
/// timeout does (`task_recovery::maintain`).
async fn deferred(state: &Courier, mut again: Waiting, droplet: i32, wait: Duration) {
    let internal = again.droplet;
    let now = tokio::time::Instant::now();
    state.dispatch.holds.defer(internal, now + wait);
    match pushback::defer(&state.db, internal, wait).await {
        Ok(d) => {
            state.dispatch.holds.throttle(internal);
            tracing::info!(task_id = again.task_id, droplet, wait_s = wait.as_secs_f64(), allowance = ?d.allowance,
                "droplet pushed back (Retry-After); the task stays assigned and is delivered again after the wait");
        }
        // This replica still holds off; the droplet's next push-back records it.
        Err(e) => {
            tracing::warn!(droplet, error = %e, "could not record a droplet's push-back")
        }
    }
    if state.shutdown.is_cancelled() || state.stop.is_on() {
        return;
    }
    let timeout = Duration::from_secs(state.settings.current().assignment_timeout_seconds);
    again.tries.give_up = again.tries.give_up.max(now + wait + timeout);
    later(state, vec![again], wait);
    // Pending work the droplet could take is routed as soon as the wait is over.
    let (shutdown, router) = (state.shutdown.clone(), state.router.clone());
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(wait) => router.trigger(),
        }
    });
}

/// A delivery a droplet with a reduced allowance accepted grows it by one.
async fn grow_allowance(state: &Courier, internal: i32) {
    match pushback::grow(&state.db, internal).await {
        Ok(true) => {}
        Ok(false) => state.dispatch.holds.unthrottle(internal),
        // The next accepted delivery grows it.
        Err(e) => {
            tracing::warn!(droplet = internal, error = %e, "could not grow a droplet's allowance")
        }
    }
}

/// How long deliveries that could not be read back wait before the next try.
const READ_BACK_PAUSE: Duration = Duration::from_secs(1);

/// Puts deliveries back in the queue after a pause (none at shutdown), holding only ids.
fn later(state: &Courier, waiting: Vec<Waiting>, pause: Duration) {
    if waiting.is_empty() {
        return;
    }
    let (shutdown, dispatch) = (state.shutdown.clone(), state.dispatch.clone());
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(pause) => {
                for mut w in waiting {
                    w.body = None;
                    dispatch.queue.push(w);
                }
            }
        }
    });
}

/// A trace id for a message that has none of its own.
pub fn new_trace_id() -> String {
    Uuid::new_v4().to_string()
}
