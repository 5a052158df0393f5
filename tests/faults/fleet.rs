//! Simulated droplets, a task producer and dashboards, over real HTTP and WebSocket, that
//! behave as careful clients do: a request that found no server (or a 5xx, or a 429) is
//! sent again, to another replica when there is one, and a task is created again with the
//! same trace id, so a lost answer never loses or duplicates a task. Every answer is counted
//! so a scenario can report its 5xx and its latencies.
//!
//! The simulator itself is the service's own (`orchestrator::simulator`, shared with
//! `orchestrator simulate` and the load bench); this file sets it up as the scenarios use
//! it: the tests' envelopes and tokens, careful clients, dashboards that keep every event.

#![allow(dead_code)]

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use orchestrator::simulator::{self, FleetConfig, Heartbeats, Patience, Pick, Watch, Wire};

// What the scenarios name (some only now and then).
#[allow(unused_imports)]
pub use orchestrator::simulator::{Api, Behaviour, Droplet, Exchange, Produced};

use crate::helpers::token;

/// Simulated droplets behind one HTTP server (`/d/{id}/message`): the shared
/// [`simulator::Fleet`], started the scenarios' way.
pub struct Fleet(Arc<simulator::Fleet>);

impl Fleet {
    /// Starts the droplets' server, registers every droplet (one capability each, round
    /// robin) and starts their heartbeats (every `beat`, plus each droplet's jitter).
    pub async fn start(
        api: Arc<Api>,
        ids: &[i32],
        capabilities: &[&str],
        work: Duration,
        beat: Duration,
    ) -> Arc<Fleet> {
        let droplets = ids
            .iter()
            .map(|id| (*id, token(*id, &["read", "write"])))
            .collect();
        let config = FleetConfig {
            work,
            heartbeats: Heartbeats::Every(beat),
            patience: Patience::Careful,
            ..FleetConfig::new(Wire::TESTS, capabilities)
        };
        let fleet = simulator::Fleet::start(api, droplets, config)
            .await
            .unwrap_or_else(|e| panic!("the fleet starts: {e}"));
        Arc::new(Fleet(fleet))
    }

    /// The shared fleet itself (to hand to what takes an `Arc<simulator::Fleet>`).
    pub fn shared(&self) -> &Arc<simulator::Fleet> {
        &self.0
    }
}

impl Deref for Fleet {
    type Target = simulator::Fleet;
    fn deref(&self) -> &simulator::Fleet {
        &self.0
    }
}

/// Creates tasks at a steady rate until stopped (or `total` are sent), as a careful client.
pub struct Producer(simulator::Producer);

impl Producer {
    pub fn start(
        api: Arc<Api>,
        creator: i32,
        per_second: f64,
        capabilities: &[&str],
        total: Option<u64>,
    ) -> Producer {
        Producer(simulator::Producer::start(
            api,
            simulator::ProducerConfig {
                wire: Wire::TESTS,
                per_second,
                total,
                creators: vec![(creator, token(creator, &["read", "write"]))],
                capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
                pick: Pick::RoundRobin,
                in_flight: 256,
                patience: Patience::Careful,
                task_type: "faults".into(),
                title: "fault task".into(),
                timeline: None,
            },
        ))
    }

    /// Stops producing and waits for the creations in flight.
    pub async fn finish(self) -> Arc<Produced> {
        self.0.finish().await
    }

    /// Waits until `total` have been sent and answered.
    pub async fn join(self) -> Arc<Produced> {
        self.0.join().await
    }
}

impl Deref for Producer {
    type Target = simulator::Producer;
    fn deref(&self) -> &simulator::Producer {
        &self.0
    }
}

/// A dashboard on a feed, as the admin: keeps every event and the close code it was sent.
pub struct Dashboard(simulator::Dashboard);

impl Dashboard {
    pub async fn connect(base: &str, feed: &str) -> Dashboard {
        let admin = token(1, &["read", "write", "admin"]);
        let watch = Watch {
            keep_events: true,
            timeline: None,
        };
        Dashboard(
            simulator::Dashboard::connect(base, feed, &admin, watch)
                .await
                .expect("dashboard connects"),
        )
    }
}

impl Deref for Dashboard {
    type Target = simulator::Dashboard;
    fn deref(&self) -> &simulator::Dashboard {
        &self.0
    }
}
