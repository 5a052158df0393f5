//! The live progress line on stderr, once a second.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::{Dashboard, Fleet, Produced};

/// Prints the progress line every second from `started` until `stop`.
pub(super) fn spawn(
    fleet: Arc<Fleet>,
    dashboard: Option<Arc<Dashboard>>,
    produced: Arc<Produced>,
    started: Instant,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let seen = |kind: &str| dashboard.as_ref().map_or(0, |d| d.count_of(kind));
        loop {
            tokio::select! { _ = stop.cancelled() => return, _ = tick.tick() => {} }
            let secs = started.elapsed().as_secs_f64().max(0.001);
            let completed = fleet.completed.load(Ordering::Relaxed);
            eprint!(
                "\r[{:>5.1}s] created {:>7}  assigned {:>7}  dispatched {:>7}  completed {:>7}  failed {:>5}  retried {:>5}  {:>7.1} done/s   ",
                secs,
                produced.created(),
                seen("task_assigned"),
                fleet.delivered.load(Ordering::Relaxed),
                completed,
                fleet.failed.load(Ordering::Relaxed),
                seen("task_retrying"),
                completed as f64 / secs,
            );
        }
    });
}
