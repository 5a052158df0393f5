//! Fair share between keys, as pure rules: a task's urgency (its priority, aged), the order
//! a pass takes tasks in (within one urgency, keys in turn by weight, oldest first within a
//! key), the token bucket of `max_per_second`, and the limits in force as this replica last
//! read them. (How many tasks of a key a pass reads is `fair_read_limit`, in SQL, computed
//! by the statement that reads them: `fair_pending.rs`.) No database and no `Core` here: the
//! router's read (`fair_pending.rs`) and the admin's limits (`key_limits.rs`) use them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Duration, NaiveDateTime, Utc};
use serde::Serialize;

/// The prefix of a creator's own key; refused in a `concurrency_key` so no creator can use
/// (and fill) another's.
pub const CREATOR_PREFIX: &str = "creator:";

/// The fairness key of a task: the `concurrency_key` its creator gave, else the creator's.
pub fn fairness_key(concurrency_key: Option<&str>, created_by: &str) -> String {
    match concurrency_key {
        Some(k) => k.to_string(),
        None => format!("{CREATOR_PREFIX}{created_by}"),
    }
}

/// The fewest tasks a pass reads of one key at one priority (`fair_read_limit`'s
/// `min_read`): a key's share of a pass may be small, and reading a few more keeps the pass
/// full when other keys have less to do.
pub const MIN_READ: i64 = 16;

/// The limits an admin set for one key (`key_limits` row).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, Serialize)]
pub struct Limit {
    pub key: String,
    pub max_in_flight: Option<i32>,
    pub max_per_second: Option<f64>,
    pub max_queued: Option<i32>,
    pub weight: i32,
    /// The token bucket of `max_per_second`: the time its tasks are taken up to.
    pub spent_until: Option<DateTime<Utc>>,
}

impl Limit {
    /// The weight its key shares by: at least 1 (a weight of 0 or less shares as 1).
    pub fn share_weight(&self) -> i32 {
        self.weight.max(1)
    }

    /// Whether routing must lock and count this key (a weight alone costs nothing).
    pub fn holds_routing(&self) -> bool {
        self.max_in_flight.is_some() || self.max_per_second.is_some()
    }
}

/// The limits in force as this replica last read them (each routing pass reads the table,
/// and an admin's change here replaces them at once), so a creation of a key without
/// limits asks the database nothing more; and the earliest delayed pass already asked for.
#[derive(Debug, Default)]
pub struct LimitCache {
    limits: RwLock<Arc<HashMap<String, Limit>>>,
    /// Unix milliseconds of the delayed pass already scheduled (0: none).
    wake_at_ms: AtomicI64,
}

impl LimitCache {
    pub fn new() -> LimitCache {
        LimitCache::default()
    }

    pub fn all(&self) -> Arc<HashMap<String, Limit>> {
        match self.limits.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn set(&self, limits: Vec<Limit>) {
        let map: HashMap<String, Limit> = limits.into_iter().map(|l| (l.key.clone(), l)).collect();
        match self.limits.write() {
            Ok(mut g) => *g = Arc::new(map),
            Err(p) => *p.into_inner() = Arc::new(map),
        }
    }

    /// The weight of a key (1 without one).
    pub fn weight(&self, key: &str) -> i32 {
        self.all().get(key).map_or(1, Limit::share_weight)
    }

    /// Claims the delayed pass at `at` unless one as early is already scheduled; true when
    /// the caller should schedule it.
    pub fn claim_wake(&self, at: DateTime<Utc>) -> bool {
        let at_ms = at.timestamp_millis();
        let now_ms = Utc::now().timestamp_millis();
        let current = self.wake_at_ms.load(Ordering::SeqCst);
        if current > now_ms && current <= at_ms {
            return false;
        }
        self.wake_at_ms
            .compare_exchange(current, at_ms, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }
}

/// A task's urgency: its priority (1 the most urgent), one more urgent per `aging_seconds`
/// it has waited, never past 1 (nor past its own priority); `aging_seconds` 0 turns it off.
pub fn urgency(priority: i32, waited_seconds: f64, aging_seconds: u64) -> i32 {
    if aging_seconds == 0 || !waited_seconds.is_finite() || waited_seconds <= 0.0 {
        return priority;
    }
    let steps = (waited_seconds / aging_seconds as f64)
        .floor()
        .min(f64::from(i32::MAX)) as i64;
    let floor = i64::from(priority.min(1));
    (i64::from(priority) - steps).max(floor) as i32
}

/// What the fair order needs of a task.
pub trait Queued {
    fn key(&self) -> &str;
    fn urgency(&self) -> i32;
    fn created_at(&self) -> NaiveDateTime;
    fn id(&self) -> i32;
}

/// Sorts tasks in the order a pass takes them: most urgent first; within one urgency the
/// keys in turn, a key of weight `w` taking `w` turns for another's one (stride: the `n`th
/// task of a key comes at `n / w`), the older task first on equal turns; oldest first within
/// a key.
pub fn fair_order<T: Queued>(tasks: &mut Vec<T>, weight: impl Fn(&str) -> i32) {
    tasks.sort_by(|a, b| {
        (a.urgency(), a.key(), a.created_at(), a.id()).cmp(&(
            b.urgency(),
            b.key(),
            b.created_at(),
            b.id(),
        ))
    });
    let mut turns: Vec<f64> = Vec::with_capacity(tasks.len());
    let mut rank = 0u32;
    for (i, t) in tasks.iter().enumerate() {
        let same = i > 0 && {
            let p = &tasks[i - 1];
            p.urgency() == t.urgency() && p.key() == t.key()
        };
        rank = if same { rank + 1 } else { 1 };
        turns.push(f64::from(rank) / f64::from(weight(t.key()).max(1)));
    }
    let mut keyed: Vec<(f64, T)> = turns.into_iter().zip(tasks.drain(..)).collect();
    keyed.sort_by(|(ta, a), (tb, b)| {
        a.urgency()
            .cmp(&b.urgency())
            .then(ta.total_cmp(tb))
            .then(a.created_at().cmp(&b.created_at()))
            .then(a.id().cmp(&b.id()))
    });
    tasks.extend(keyed.into_iter().map(|(_, t)| t));
}

/// The token bucket of `max_per_second`, kept as the time it is spent up to: one task per
/// interval after it, and at most one second's worth (at least one task) at once after a
/// quiet spell.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    /// Where spending starts: the time spent up to, or a second (one interval if longer) ago.
    pub base: DateTime<Utc>,
    pub interval: Duration,
    /// Tasks that may be assigned now.
    pub tokens: i64,
}

impl Bucket {
    pub fn at(rate: f64, spent_until: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Bucket {
        let micros = if rate.is_finite() && rate > 0.0 {
            (1e6 / rate).round().clamp(1.0, 86_400e6) as i64
        } else {
            86_400_000_000
        };
        let interval = Duration::microseconds(micros);
        let window = interval.max(Duration::seconds(1));
        let earliest = now - window;
        let base = spent_until.map_or(earliest, |s| s.max(earliest));
        let elapsed = (now - base).num_microseconds().unwrap_or(0).max(0);
        Bucket {
            base,
            interval,
            tokens: elapsed / micros,
        }
    }

    /// The time spent up to once `used` tasks are taken (the next task's slot is one
    /// interval later).
    pub fn after(&self, used: i64) -> DateTime<Utc> {
        self.base + self.interval * (used.clamp(0, i64::from(i32::MAX)) as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct T(&'static str, i32, i64, i32);
    impl Queued for T {
        fn key(&self) -> &str {
            self.0
        }
        fn urgency(&self) -> i32 {
            self.1
        }
        fn created_at(&self) -> NaiveDateTime {
            DateTime::from_timestamp(self.2, 0).unwrap().naive_utc()
        }
        fn id(&self) -> i32 {
            self.3
        }
    }

    #[test]
    fn keys_take_turns_within_an_urgency_oldest_first_within_a_key() {
        let mut tasks: Vec<T> = (0..5).map(|i| T("a", 5, i, i as i32)).collect();
        tasks.push(T("b", 5, 100, 100));
        tasks.push(T("c", 1, 200, 200));
        fair_order(&mut tasks, |_| 1);
        let ids: Vec<i32> = tasks.iter().map(|t| t.3).collect();
        assert_eq!(ids, vec![200, 0, 100, 1, 2, 3, 4]);
    }

    #[test]
    fn a_heavier_key_takes_more_turns() {
        let mut tasks: Vec<T> = (0..6).map(|i| T("a", 5, i, i as i32)).collect();
        tasks.extend((0..6).map(|i| T("b", 5, 10 + i, 10 + i as i32)));
        fair_order(&mut tasks, |k| if k == "b" { 2 } else { 1 });
        let first: Vec<&str> = tasks.iter().take(6).map(|t| t.0).collect();
        assert_eq!(first.iter().filter(|k| **k == "b").count(), 4);
    }

    #[test]
    fn urgency_grows_one_per_interval_up_to_the_most_urgent() {
        assert_eq!(urgency(10, 0.0, 300), 10);
        assert_eq!(urgency(10, 299.0, 300), 10);
        assert_eq!(urgency(10, 300.0, 300), 9);
        assert_eq!(urgency(10, 10_000.0, 300), 1);
        assert_eq!(urgency(10, 10_000.0, 0), 10);
        assert_eq!(urgency(1, 10_000.0, 1), 1);
    }

    #[test]
    fn the_bucket_allows_a_second_of_work_then_one_per_interval() {
        let now = Utc::now();
        let b = Bucket::at(5.0, None, now);
        assert_eq!(b.tokens, 5);
        let next = b.after(5);
        assert_eq!(Bucket::at(5.0, Some(next), now).tokens, 0);
        let later = now + Duration::milliseconds(450);
        assert_eq!(Bucket::at(5.0, Some(next), later).tokens, 2);
        assert_eq!(Bucket::at(0.5, None, now).tokens, 1);
    }
}
