//! Simulated droplets, a task producer and dashboards, over real HTTP and WebSocket, that
//! behave as careful clients do: a request that found no server (or a 5xx, or a 429) is
//! sent again, to another replica when there is one, and a task is created again with the
//! same trace id, so a lost answer never loses or duplicates a task. Every answer is counted
//! so a scenario can report its 5xx and its latencies.
//!
//! The simulator itself is its own crate (`orchestrator_simulator`, shared with the
//! `orchestrator-simulator` command and the load bench); this file sets it up as the scenarios use
//! it: the tests' envelopes and tokens, careful clients, dashboards that keep every event.
//! [`ResumingDashboard`] (the chaos run's) is a client only the scenarios need: a dashboard
//! that reconnects with `?after=<event_id>`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use orchestrator_simulator::{
    self as simulator, FleetConfig, Heartbeats, Patience, Pick, Watch, Wire,
};

// What the scenarios name (some only now and then).
#[allow(unused_imports)]
pub use orchestrator_simulator::{Accepted, Api, Behaviour, Droplet, Exchange, Produced};

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

/// One event a resuming dashboard received: its `event_id` (0 for a frame outside the log),
/// its kind and the task it is about.
#[derive(Debug, Clone)]
pub struct Seen {
    pub event_id: i64,
    pub event: String,
    pub task: Option<i64>,
}

/// A dashboard that stays on a feed of one replica: after every disconnect (the replica
/// killed, paused past `silence`, or the socket broken) it connects again with
/// `?after=<the last event_id it got>`, as the README tells dashboards to.
pub struct ResumingDashboard {
    pub base: String,
    pub seen: Mutex<Vec<Seen>>,
    pub last_event_id: AtomicI64,
    /// Connections made (the first one included).
    pub connections: AtomicU64,
    pub resyncs: AtomicU64,
    stop: CancellationToken,
}

impl ResumingDashboard {
    /// Starts following `feed` on `base` from the start of the log (`?after=0`).
    pub fn start(base: &str, feed: &str, silence: Duration) -> Arc<ResumingDashboard> {
        let d = Arc::new(ResumingDashboard {
            base: base.to_string(),
            seen: Mutex::new(Vec::new()),
            last_event_id: AtomicI64::new(0),
            connections: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            stop: CancellationToken::new(),
        });
        let (me, feed) = (d.clone(), feed.to_string());
        tokio::spawn(async move { me.follow(&feed, silence).await });
        d
    }

    async fn follow(self: Arc<Self>, feed: &str, silence: Duration) {
        use tokio_tungstenite::tungstenite::Message;
        let admin = token(1, &["read", "write", "admin"]);
        let ws = self.base.replacen("http", "ws", 1);
        while !self.stop.is_cancelled() {
            let after = self.last_event_id.load(Ordering::SeqCst);
            let url = format!("{ws}/ws/{feed}?token={admin}&after={after}");
            let connect = tokio::time::timeout(
                Duration::from_secs(5),
                tokio_tungstenite::connect_async(url.as_str()),
            );
            let mut socket = tokio::select! {
                _ = self.stop.cancelled() => return,
                c = connect => match c {
                    Ok(Ok((socket, _))) => socket,
                    _ => {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        continue;
                    }
                },
            };
            self.connections.fetch_add(1, Ordering::SeqCst);
            loop {
                let frame = tokio::select! {
                    _ = self.stop.cancelled() => return,
                    f = tokio::time::timeout(silence, socket.next()) => f,
                };
                match frame {
                    Ok(Some(Ok(Message::Text(t)))) => {
                        let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else {
                            continue;
                        };
                        let p = &v["payload"];
                        let event = p["event"].as_str().unwrap_or("").to_string();
                        if event == "resync_required" {
                            self.resyncs.fetch_add(1, Ordering::SeqCst);
                            continue;
                        }
                        let event_id = p["event_id"].as_i64().unwrap_or(0);
                        if event_id > 0 {
                            self.last_event_id.fetch_max(event_id, Ordering::SeqCst);
                        }
                        lock(&self.seen).push(Seen {
                            event_id,
                            event,
                            task: p["task"]["id"].as_i64(),
                        });
                    }
                    Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) => break,
                    Ok(Some(Ok(_))) => {}
                    // Nothing (not even a ping) for `silence`: the link is dead; go again.
                    Err(_) => break,
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How many times each event id was received.
    pub fn counts(&self) -> HashMap<i64, u32> {
        let mut m = HashMap::new();
        for s in lock(&self.seen).iter().filter(|s| s.event_id > 0) {
            *m.entry(s.event_id).or_insert(0) += 1;
        }
        m
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
