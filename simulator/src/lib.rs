//! Simulated droplets and the clients around them, over real HTTP and WebSocket, against a
//! running orchestrator. Its own crate, outside the service: the service's library knows
//! nothing of it; it uses the service's `protocol` (the wire's envelope and times) and
//! `identity` (local token signing). One implementation serves the `orchestrator-simulator`
//! command ([`simulate`]), the fault scenarios (`tests/faults/fleet.rs`) and the load bench
//! (`benches/load.rs`), which dev-depend on this crate; each
//! picks its [`Wire`] (the envelopes it has always sent), its [`Patience`] (one attempt, or
//! retries as a careful client makes them) and its droplets' [`Behaviour`].
//!
//! - [`api`]: the orchestrator as a client reaches it: replicas, retries, a log of answers.
//! - [`wire`]: the envelopes, per caller.
//! - [`droplet`]: one droplet: its state (frozen, heartbeat gaps, tasks in hand), its
//!   behaviour, its `/message` and the work it does for a delivery.
//! - [`fleet`]: droplets behind one HTTP server, registered and heartbeating, with tallies
//!   (what was delivered, run, applied, refused as stale or not theirs, sent twice or late).
//! - [`producer`]: tasks created at a steady rate.
//! - [`dashboard`]: a client on a `/ws/...` feed.
//! - [`report`]: per-task timelines and latency percentiles.
//! - [`simulate`]: the command: all of the above wired for a run, its flags and summary.

pub mod api;
pub mod dashboard;
pub mod droplet;
pub mod fleet;
pub mod producer;
pub mod report;
pub mod simulate;
pub mod wire;

use std::sync::{Mutex, MutexGuard};

pub use api::{Api, ApiOptions, Exchange, Patience};
pub use dashboard::{Dashboard, Watch};
pub use droplet::{Behaviour, Delivery, Droplet};
pub use fleet::{Accepted, Fleet, FleetConfig, Heartbeats, LateResult};
pub use producer::{Pick, Produced, Producer, ProducerConfig};
pub use report::{Latency, Marks, Timeline};
pub use wire::Wire;

/// A lock whose holder panicked is still read: the figures it guards stay usable.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}
