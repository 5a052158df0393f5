//! What holds deliveries back, as this replica knows it: droplets that pushed back (a 429 or
//! 503 with `Retry-After`) until when, droplets whose in-flight allowance is reduced (their
//! accepted deliveries grow it back), and whether any droplet is being drained. The database
//! is the truth (`droplets.deferred_until`, `in_flight_allowance`, `drain_requested_at`): this
//! replica sets its own view when it learns something, and the `task_router` job's round
//! refreshes it from the database, so what another replica learned is honoured here within
//! one round. Every check on the hot path is one atomic load while nothing is held.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tokio::time::Instant;

#[derive(Default)]
pub struct Holds {
    deferred: Mutex<HashMap<i32, Instant>>,
    any_deferred: AtomicBool,
    throttled: Mutex<HashSet<i32>>,
    any_throttled: AtomicBool,
    draining: AtomicBool,
}

/// The held droplets as the database shows them (the job's refresh).
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Droplets (internal ids) deferred, and for how long from now.
    pub deferred: Vec<(i32, std::time::Duration)>,
    /// Droplets (internal ids) with a reduced in-flight allowance.
    pub throttled: Vec<i32>,
    /// Whether some droplet is being drained and not drained yet.
    pub draining: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl Holds {
    /// Nothing is delivered to this droplet (internal id) before `until` (a later deferral
    /// known wins).
    pub fn defer(&self, droplet: i32, until: Instant) {
        let mut deferred = lock(&self.deferred);
        let at = deferred.entry(droplet).or_insert(until);
        *at = (*at).max(until);
        self.any_deferred.store(true, Ordering::Release);
    }

    /// Whether deliveries to this droplet wait now.
    pub fn is_deferred(&self, droplet: i32) -> bool {
        if !self.any_deferred.load(Ordering::Acquire) {
            return false;
        }
        let mut deferred = lock(&self.deferred);
        let now = Instant::now();
        match deferred.get(&droplet) {
            Some(until) if *until > now => true,
            Some(_) => {
                deferred.remove(&droplet);
                self.any_deferred
                    .store(!deferred.is_empty(), Ordering::Release);
                false
            }
            None => false,
        }
    }

    /// The droplet's allowance was reduced: its accepted deliveries grow it back.
    pub fn throttle(&self, droplet: i32) {
        lock(&self.throttled).insert(droplet);
        self.any_throttled.store(true, Ordering::Release);
    }

    /// Whether this droplet's allowance may be reduced (its accepted delivery grows it).
    pub fn is_throttled(&self, droplet: i32) -> bool {
        self.any_throttled.load(Ordering::Acquire) && lock(&self.throttled).contains(&droplet)
    }

    /// The droplet's allowance is back to its maximum (or it registered again).
    pub fn unthrottle(&self, droplet: i32) {
        let mut throttled = lock(&self.throttled);
        throttled.remove(&droplet);
        self.any_throttled
            .store(!throttled.is_empty(), Ordering::Release);
    }

    /// A droplet registered again: what held it is over.
    pub fn forget(&self, droplet: i32) {
        self.unthrottle(droplet);
        let mut deferred = lock(&self.deferred);
        deferred.remove(&droplet);
        self.any_deferred
            .store(!deferred.is_empty(), Ordering::Release);
    }

    /// Some droplet is being drained: transitions that end a task look for drains completed.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn any_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Replaces this replica's view with the database's.
    pub fn refresh(&self, snapshot: &Snapshot) {
        let now = Instant::now();
        {
            let mut deferred = lock(&self.deferred);
            deferred.clear();
            deferred.extend(snapshot.deferred.iter().map(|(d, left)| (*d, now + *left)));
            self.any_deferred
                .store(!deferred.is_empty(), Ordering::Release);
        }
        {
            let mut throttled = lock(&self.throttled);
            throttled.clear();
            throttled.extend(snapshot.throttled.iter().copied());
            self.any_throttled
                .store(!throttled.is_empty(), Ordering::Release);
        }
        self.draining.store(snapshot.draining, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_deferral_ends_by_itself_and_the_later_one_wins() {
        let holds = Holds::default();
        assert!(!holds.is_deferred(1));
        holds.defer(1, Instant::now() + Duration::from_millis(30));
        holds.defer(1, Instant::now() + Duration::from_millis(10));
        assert!(holds.is_deferred(1));
        assert!(!holds.is_deferred(2));
        tokio::time::sleep(Duration::from_millis(15)).await;
        assert!(holds.is_deferred(1), "the later deferral holds");
        tokio::time::sleep(Duration::from_millis(25)).await;
        assert!(!holds.is_deferred(1));
        holds.throttle(3);
        assert!(holds.is_throttled(3));
        holds.refresh(&Snapshot::default());
        assert!(!holds.is_throttled(3));
    }
}
