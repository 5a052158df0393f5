//! What a simulation measures: when each task was sent, assigned, dispatched and finished
//! ([`Timeline`]), and latency percentiles ([`Latency`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use uuid::Uuid;

use super::lock;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Latency {
    pub count: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Latency {
    /// Nearest-rank percentiles of `samples`.
    pub fn of(mut samples: Vec<f64>) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| {
            samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1]
        };
        Latency {
            count: samples.len(),
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
            max: samples[samples.len() - 1],
        }
    }
}

/// When one task (by trace id) reached each step, as the simulated clients saw it.
#[derive(Debug, Default, Clone, Copy)]
pub struct Marks {
    /// The producer sent its creation.
    pub sent: Option<Instant>,
    /// A dashboard saw `task_assigned` (the first one).
    pub assigned: Option<Instant>,
    /// A droplet received `execute_task` (the first one).
    pub dispatched: Option<Instant>,
    /// A droplet's final PATCH was accepted (the last one).
    pub finished: Option<Instant>,
}

/// Every task's [`Marks`], shared by the producer, the dashboard and the droplets of a run.
#[derive(Debug, Default)]
pub struct Timeline {
    marks: Mutex<HashMap<Uuid, Marks>>,
}

impl Timeline {
    fn mark(&self, trace: Uuid, f: impl FnOnce(&mut Marks)) {
        f(lock(&self.marks).entry(trace).or_default());
    }

    pub fn sent(&self, trace: Uuid) {
        self.mark(trace, |m| m.sent = Some(Instant::now()));
    }

    pub fn assigned(&self, trace: Uuid) {
        self.mark(trace, |m| {
            m.assigned.get_or_insert(Instant::now());
        });
    }

    pub fn dispatched(&self, trace: Uuid) {
        self.mark(trace, |m| {
            m.dispatched.get_or_insert(Instant::now());
        });
    }

    pub fn finished(&self, trace: Uuid) {
        self.mark(trace, |m| m.finished = Some(Instant::now()));
    }

    /// Milliseconds from `sent` to the step `step` picks, over the tasks that reached both.
    pub fn since_sent(&self, step: fn(&Marks) -> Option<Instant>) -> Latency {
        let samples = lock(&self.marks)
            .values()
            .filter_map(|m| {
                Some(step(m)?.saturating_duration_since(m.sent?).as_secs_f64() * 1000.0)
            })
            .collect();
        Latency::of(samples)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let l = Latency::of((1..=100).map(f64::from).collect());
        assert_eq!(
            (l.p50, l.p95, l.p99, l.max, l.count),
            (50.0, 95.0, 99.0, 100.0, 100)
        );
        assert_eq!(Latency::of(vec![]).count, 0);
    }

    #[test]
    fn a_timeline_counts_tasks_that_reached_both_steps() {
        let t = Timeline::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        t.sent(a);
        t.sent(b);
        t.dispatched(a);
        t.dispatched(a);
        t.finished(a);
        assert_eq!(t.since_sent(|m| m.dispatched).count, 1);
        assert_eq!(t.since_sent(|m| m.finished).count, 1);
        assert_eq!(t.since_sent(|m| m.assigned).count, 0);
    }
}
