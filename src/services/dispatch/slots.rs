//! The dispatcher's shared parts: delivery slots (in all, and per droplet, so a silent
//! droplet cannot hold every slot) and the queue of refusals and connection failures that
//! recovery acts on, and the cancellations to announce.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Config;
use crate::services::dispatch::holds::Holds;
use crate::services::dispatch::queue::DeliveryQueue;

pub struct Dispatcher {
    /// The task deliveries waiting for a worker.
    pub queue: DeliveryQueue,
    /// How many workers send them (`DISPATCH_CONCURRENCY`).
    pub workers: usize,
    /// Droplets that pushed back, have a reduced allowance, or are drained (this replica's
    /// view of their rows).
    pub holds: Holds,
    permits: Arc<Semaphore>,
    per_droplet: Mutex<HashMap<i32, Arc<Semaphore>>>,
    per_droplet_limit: usize,
    refusals: UnboundedSender<Report>,
    refusals_out: Mutex<Option<UnboundedReceiver<Report>>>,
    cancels: UnboundedSender<Cancel>,
    cancels_out: Mutex<Option<UnboundedReceiver<Cancel>>>,
    /// Droplets (internal ids) that refused a delivery, or could not be reached, here since
    /// their last accepted one: only their next accepted delivery resets the counts in the
    /// database, so the hot path of droplets that always answer issues no write.
    refused_lately: Mutex<HashSet<i32>>,
    /// Whether `refused_lately` may hold any droplet: accepted deliveries skip its lock
    /// while no droplet refuses.
    any_refused_lately: AtomicBool,
}

/// A droplet refused a delivery of a task it was assigned (its attempt ends there).
#[derive(Debug, Clone)]
pub struct Refusal {
    pub task_id: i32,
    pub internal_droplet: i32,
    pub droplet_id: i32,
    pub reason: String,
    /// It refused the orchestrator's credentials (HTTP 401 or 403): a configuration fault,
    /// not the task's.
    pub credentials: bool,
}

/// A delivery that could not connect to its droplet or had no answer in time (the task
/// stays assigned and is retried; the droplet's count of such failures in a row grows).
#[derive(Debug, Clone)]
pub struct Unreachable {
    pub internal_droplet: i32,
    pub droplet_id: i32,
    /// What happened, in words (`unreachable`, `no answer within 5 s`).
    pub reason: String,
}

/// Work taken from a droplet (internal id) or cancelled, to announce with `cancel_task`.
#[derive(Debug, Clone)]
pub struct Cancel {
    pub internal_droplet: i32,
    pub task_id: i32,
    pub trace_id: uuid::Uuid,
    pub attempt: i32,
}

/// What dispatch reports to recovery.
#[derive(Debug, Clone)]
pub enum Report {
    Refused(Refusal),
    Unreachable(Unreachable),
}

impl Dispatcher {
    pub fn new(config: &Config) -> Dispatcher {
        let (refusals, refusals_out) = mpsc::unbounded_channel();
        let (cancels, cancels_out) = mpsc::unbounded_channel();
        Dispatcher {
            queue: DeliveryQueue::new(config.dispatch_queue_bodies),
            workers: config.dispatch_concurrency,
            holds: Holds::default(),
            permits: Arc::new(Semaphore::new(config.dispatch_concurrency)),
            per_droplet: Mutex::new(HashMap::new()),
            per_droplet_limit: config.dispatch_per_droplet_concurrency.max(1),
            refusals,
            refusals_out: Mutex::new(Some(refusals_out)),
            cancels,
            cancels_out: Mutex::new(Some(cancels_out)),
            refused_lately: Mutex::new(HashSet::new()),
            any_refused_lately: AtomicBool::new(false),
        }
    }

    fn own(&self, droplet: i32) -> Option<Arc<Semaphore>> {
        let mut map = self.per_droplet.lock().ok()?;
        Some(
            map.entry(droplet)
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_droplet_limit)))
                .clone(),
        )
    }

    /// One of this droplet's own delivery slots if one is free now and the droplet has not
    /// asked to wait (`Retry-After`).
    pub fn try_own(&self, droplet: i32) -> Option<OwnedSemaphorePermit> {
        if self.holds.is_deferred(droplet) {
            return None;
        }
        self.own(droplet)?.try_acquire_owned().ok()
    }

    /// One of the shared delivery slots (None once closed).
    pub async fn shared(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().acquire_owned().await.ok()
    }

    /// A delivery slot to this droplet (internal id): one of its own first, then one of the
    /// shared ones, so one droplet holds at most `DISPATCH_PER_DROPLET_CONCURRENCY` shared
    /// slots however slow it is.
    pub async fn slot(&self, droplet: i32) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        let own = self.own(droplet)?.acquire_owned().await.ok()?;
        let shared = self.permits.clone().acquire_owned().await.ok()?;
        Some((own, shared))
    }

    /// Hands a refusal to recovery, and remembers that its droplet has refusals counted.
    pub fn report_refusal(&self, refusal: Refusal) {
        self.note_refused(refusal.internal_droplet);
        let _ = self.refusals.send(Report::Refused(refusal));
    }

    /// Hands a connection failure or timeout to recovery (it counts them in a row), and
    /// remembers that its droplet has failures counted.
    pub fn report_unreachable(&self, failure: Unreachable) {
        self.note_refused(failure.internal_droplet);
        let _ = self.refusals.send(Report::Unreachable(failure));
    }

    /// Whether this droplet refused a delivery here since its last accepted one; forgets it
    /// (the caller resets the count, or calls [`Dispatcher::note_refused`] when it cannot).
    pub fn take_refused_lately(&self, droplet: i32) -> bool {
        if !self.any_refused_lately.load(Ordering::Acquire) {
            return false;
        }
        let Ok(mut lately) = self.refused_lately.lock() else {
            return false;
        };
        let was = lately.remove(&droplet);
        self.any_refused_lately
            .store(!lately.is_empty(), Ordering::Release);
        was
    }

    /// Remembers that this droplet has refusals or connection failures counted.
    pub fn note_refused(&self, droplet: i32) {
        if let Ok(mut lately) = self.refused_lately.lock() {
            lately.insert(droplet);
            self.any_refused_lately.store(true, Ordering::Release);
        }
    }

    /// The refusals and failures reported, for the one loop that acts on them (`None` once
    /// taken).
    pub fn take_refusals(&self) -> Option<UnboundedReceiver<Report>> {
        self.refusals_out.lock().ok()?.take()
    }

    /// Queues a `cancel_task` for the dispatch workers to send (`dispatch::run_workers`).
    pub fn announce_cancel(&self, cancel: Cancel) {
        let _ = self.cancels.send(cancel);
    }

    /// The cancellations queued, for the one loop that sends them (`None` once taken).
    pub fn take_cancels(&self) -> Option<UnboundedReceiver<Cancel>> {
        self.cancels_out.lock().ok()?.take()
    }
}
