//! What a simulation measured, and how it is printed.

use crate::report::Latency;

/// What a simulation measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    pub seconds: f64,
    pub created: u64,
    pub create_errors: u64,
    pub completed: u64,
    pub failed: u64,
    pub retried: u64,
    pub requeued: u64,
    pub events: u64,
    pub throughput_per_second: f64,
    pub create_to_assigned_ms: Latency,
    pub create_to_dispatched_ms: Latency,
    pub create_to_completed_ms: Latency,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "simulation: {:.1} s", self.seconds)?;
        writeln!(
            f,
            "tasks: created {} (errors {}), completed {}, failed {}, retried {}, requeued {}",
            self.created,
            self.create_errors,
            self.completed,
            self.failed,
            self.retried,
            self.requeued
        )?;
        writeln!(
            f,
            "throughput: {:.1} tasks/s completed; {} dashboard events",
            self.throughput_per_second, self.events
        )?;
        for (name, l) in [
            ("create -> assigned", self.create_to_assigned_ms),
            ("create -> dispatched", self.create_to_dispatched_ms),
            ("create -> completed", self.create_to_completed_ms),
        ] {
            writeln!(
                f,
                "{name:<22} p50 {:>8.2} ms  p95 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms  (n={})",
                l.p50, l.p95, l.p99, l.max, l.count
            )?;
        }
        Ok(())
    }
}
