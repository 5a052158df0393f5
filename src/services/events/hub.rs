//! The in-process fan-out: one registry of clients per feed, a bounded queue per client,
//! and a client that cannot keep up is dropped instead of slowing anyone else.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Feed;
use crate::config::Config;

pub type ClientId = u64;

/// What a client asked to receive; `None` matches everything.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, Serialize)]
pub struct ClientFilter {
    pub task_type: Option<String>,
    pub status: Option<String>,
    pub droplet_id: Option<i32>,
}

/// The fields filters look at, read once per event (by the reader's query for the log's events).
#[derive(Debug, Clone, Default)]
pub struct EventMeta {
    pub task_type: Option<String>,
    pub status: Option<String>,
    pub droplet_id: Option<i32>,
}

impl EventMeta {
    pub fn of(feed: Feed, envelope: &Value) -> EventMeta {
        let subject = match feed {
            Feed::Tasks => &envelope["payload"]["task"],
            Feed::Droplets => &envelope["payload"]["droplet"],
        };
        EventMeta::of_subject(feed, subject)
    }

    /// The same, from the subject alone (`payload.task` or `payload.droplet`).
    pub fn of_subject(feed: Feed, subject: &Value) -> EventMeta {
        match feed {
            Feed::Tasks => EventMeta {
                task_type: subject["task_type"].as_str().map(str::to_string),
                status: subject["status"].as_str().map(str::to_string),
                droplet_id: subject["assigned_droplet_id"]
                    .as_i64()
                    .and_then(|d| i32::try_from(d).ok()),
            },
            Feed::Droplets => EventMeta {
                task_type: None,
                status: subject["status"].as_str().map(str::to_string),
                droplet_id: subject["droplet_id"]
                    .as_i64()
                    .and_then(|d| i32::try_from(d).ok()),
            },
        }
    }
}

impl ClientFilter {
    fn matches(&self, feed: Feed, meta: &EventMeta) -> bool {
        let task_type_ok =
            self.task_type.is_none() || feed == Feed::Droplets || self.task_type == meta.task_type;
        let status_ok =
            self.status.is_none() || feed == Feed::Droplets || self.status == meta.status;
        let droplet_ok = self.droplet_id.is_none() || self.droplet_id == meta.droplet_id;
        task_type_ok && status_ok && droplet_ok
    }
}

/// What the socket task sends next.
#[derive(Debug)]
pub enum Outbound {
    /// An event and its `event_id` (0 for one outside the log).
    /// An event id and its envelope as UTF-8 JSON text, shared by every client it goes to.
    Event(i64, Bytes),
    Ping,
}

/// Why the hub ended a client; the socket sends this close frame.
#[derive(Debug, Clone, Copy)]
pub struct Kick {
    pub code: u16,
    pub reason: &'static str,
}

struct Client {
    droplet_id: i32,
    tx: mpsc::Sender<Outbound>,
    filter: RwLock<ClientFilter>,
    last_pong_ms: AtomicI64,
    kicked: CancellationToken,
    kick: Mutex<Option<Kick>>,
}

impl Client {
    fn kick(&self, kick: Kick) {
        if let Ok(mut k) = self.kick.lock() {
            k.get_or_insert(kick);
        }
        self.kicked.cancel();
    }
}

/// What the WebSocket handler holds for one connection; dropping it unregisters the client
/// and frees its per-droplet slot, however the socket ended.
pub struct ClientRegistration {
    pub id: ClientId,
    pub feed: Feed,
    pub rx: mpsc::Receiver<Outbound>,
    client: Arc<Client>,
    hub: Arc<Inner>,
}

impl ClientRegistration {
    pub fn kicked(&self) -> CancellationToken {
        self.client.kicked.clone()
    }

    pub fn kick_reason(&self) -> Option<Kick> {
        self.client.kick.lock().ok().and_then(|k| *k)
    }

    pub fn set_filter(&self, filter: ClientFilter) {
        if let Ok(mut f) = self.client.filter.write() {
            *f = filter;
        }
    }

    /// The client's filter now (a resuming client's replay reads it per page).
    pub fn filter(&self) -> ClientFilter {
        self.client
            .filter
            .read()
            .map(|f| f.clone())
            .unwrap_or_default()
    }

    /// A client dropped because a frame waited too long for it to read.
    pub fn count_dropped_slow(&self) {
        self.hub.dropped_slow.fetch_add(1, Ordering::Relaxed);
    }

    pub fn pong(&self) {
        self.client.last_pong_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub fn count_sent(&self) {
        self.hub.sent.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for ClientRegistration {
    fn drop(&mut self) {
        self.hub.remove(self.feed, self.id, self.client.droplet_id);
    }
}

#[derive(Default)]
struct Inner {
    next_id: AtomicU64,
    tasks: RwLock<HashMap<ClientId, Arc<Client>>>,
    droplets: RwLock<HashMap<ClientId, Arc<Client>>>,
    per_droplet: Mutex<HashMap<i32, usize>>,
    sent: AtomicU64,
    published: AtomicU64,
    dropped_slow: AtomicU64,
    dropped_unresponsive: AtomicU64,
    /// The most events ever waiting in one client's queue (never above the bound).
    max_queue_depth: AtomicUsize,
    listener: Mutex<ListenerState>,
}

impl Inner {
    fn feed(&self, feed: Feed) -> &RwLock<HashMap<ClientId, Arc<Client>>> {
        match feed {
            Feed::Tasks => &self.tasks,
            Feed::Droplets => &self.droplets,
        }
    }

    fn remove(&self, feed: Feed, id: ClientId, droplet_id: i32) {
        let removed = self
            .feed(feed)
            .write()
            .map(|mut m| m.remove(&id).is_some())
            .unwrap_or(false);
        if removed {
            if let Ok(mut counts) = self.per_droplet.lock() {
                if let Some(n) = counts.get_mut(&droplet_id) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        counts.remove(&droplet_id);
                    }
                }
            }
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct ListenerState {
    pub connected: bool,
    pub reconnects: u64,
    pub last_error: Option<String>,
    pub last_event_at: Option<String>,
    /// Reads of the log (woken by another replica's round, the poll, or a round of this
    /// replica's relay that came after events the reader had not read).
    pub log_reads: u64,
    /// Rounds of this replica's relay handed to the hub as the relay gave them, the log not
    /// read.
    pub rounds_handed: u64,
}

/// Figures for `GET /ws/status` and `/metrics`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct WsStats {
    /// Per feed (`tasks`, `droplets`).
    #[schema(value_type = HashMap<String, usize>)]
    pub connections: HashMap<&'static str, usize>,
    pub connections_per_droplet: HashMap<String, usize>,
    pub total_connections: usize,
    pub events_published: u64,
    pub messages_sent: u64,
    pub clients_dropped_slow: u64,
    pub clients_dropped_unresponsive: u64,
    /// Each client's queue bound (`WS_CLIENT_QUEUE`) and the deepest any queue has been.
    pub client_queue: usize,
    pub max_queue_depth: usize,
    pub max_connections_per_droplet: u64,
    pub listener: ListenerState,
}

/// The fan-out for both feeds.
#[derive(Clone)]
pub struct EventHub {
    inner: Arc<Inner>,
    queue: usize,
    max_per_droplet: Arc<AtomicU64>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl EventHub {
    pub fn new(config: &Config) -> EventHub {
        EventHub {
            inner: Arc::new(Inner::default()),
            queue: config.ws_client_queue,
            max_per_droplet: Arc::new(AtomicU64::new(config.ws_max_connections_per_droplet as u64)),
        }
    }

    pub fn set_max_per_droplet(&self, n: usize) {
        self.max_per_droplet.store(n as u64, Ordering::Relaxed);
    }

    /// Registers a client, or `None` when its droplet already holds the maximum of sockets.
    pub fn register(
        &self,
        feed: Feed,
        droplet_id: i32,
        filter: ClientFilter,
    ) -> Option<ClientRegistration> {
        {
            let mut counts = self.inner.per_droplet.lock().ok()?;
            let n = counts.entry(droplet_id).or_insert(0);
            if *n as u64 >= self.max_per_droplet.load(Ordering::Relaxed) {
                return None;
            }
            *n += 1;
        }
        let (tx, rx) = mpsc::channel(self.queue);
        let client = Arc::new(Client {
            droplet_id,
            tx,
            filter: RwLock::new(filter),
            last_pong_ms: AtomicI64::new(now_ms()),
            kicked: CancellationToken::new(),
            kick: Mutex::new(None),
        });
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        if let Ok(mut m) = self.inner.feed(feed).write() {
            m.insert(id, client.clone());
        }
        Some(ClientRegistration {
            id,
            feed,
            rx,
            client,
            hub: self.inner.clone(),
        })
    }

    /// Sends one event to every matching client of its feed without ever waiting:
    /// a client whose queue is full is dropped (close 1013).
    pub fn publish(&self, feed: Feed, event_id: i64, text: Bytes, meta: &EventMeta) {
        self.inner.published.fetch_add(1, Ordering::Relaxed);
        let Ok(clients) = self.inner.feed(feed).read() else {
            return;
        };
        for client in clients.values() {
            if client.kicked.is_cancelled() {
                continue;
            }
            let wanted = client
                .filter
                .read()
                .map(|f| f.matches(feed, meta))
                .unwrap_or(true);
            if !wanted {
                continue;
            }
            match client.tx.try_send(Outbound::Event(event_id, text.clone())) {
                Ok(()) => {
                    let depth = self.queue.saturating_sub(client.tx.capacity());
                    self.inner
                        .max_queue_depth
                        .fetch_max(depth, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.inner.dropped_slow.fetch_add(1, Ordering::Relaxed);
                    client.kick(Kick {
                        code: 1013,
                        reason: "client too slow: event queue full",
                    });
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }

    /// Publishes an event that is not in the log, given as its envelope's JSON text (tests):
    /// sent as it is, its filter fields read from it.
    pub fn publish_envelope(&self, feed: Feed, envelope: &str) {
        let meta = serde_json::from_str::<Value>(envelope)
            .map(|e| EventMeta::of(feed, &e))
            .unwrap_or_default();
        self.publish(feed, 0, Bytes::copy_from_slice(envelope.as_bytes()), &meta);
    }

    /// The `websocket_ping` job: pings every client and drops those that have not answered
    /// within two intervals.
    pub fn ping_all(&self, interval_seconds: u64) -> usize {
        let deadline = now_ms() - (2 * interval_seconds as i64 * 1000);
        let mut pinged = 0;
        for feed in Feed::ALL {
            let Ok(clients) = self.inner.feed(feed).read() else {
                continue;
            };
            for client in clients.values() {
                if client.kicked.is_cancelled() {
                    continue;
                }
                if client.last_pong_ms.load(Ordering::Relaxed) < deadline {
                    self.inner
                        .dropped_unresponsive
                        .fetch_add(1, Ordering::Relaxed);
                    client.kick(Kick {
                        code: 1008,
                        reason: "no answer to pings",
                    });
                    continue;
                }
                if client.tx.try_send(Outbound::Ping).is_ok() {
                    pinged += 1;
                }
            }
        }
        pinged
    }

    /// Closes every socket (shutdown: close code 1001).
    pub fn close_all(&self, code: u16, reason: &'static str) {
        for feed in Feed::ALL {
            if let Ok(clients) = self.inner.feed(feed).read() {
                for client in clients.values() {
                    client.kick(Kick { code, reason });
                }
            }
        }
    }

    /// Waits (at most `limit`) until every socket has ended, so close frames are sent
    /// before the process exits.
    pub async fn wait_closed(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.connection_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn connection_count(&self) -> usize {
        Feed::ALL
            .iter()
            .map(|f| self.inner.feed(*f).read().map(|m| m.len()).unwrap_or(0))
            .sum()
    }

    pub fn set_listener(&self, update: impl FnOnce(&mut ListenerState)) {
        if let Ok(mut l) = self.inner.listener.lock() {
            update(&mut l);
        }
    }

    pub fn stats(&self) -> WsStats {
        let mut connections = HashMap::new();
        for feed in Feed::ALL {
            connections.insert(
                feed.as_str(),
                self.inner.feed(feed).read().map(|m| m.len()).unwrap_or(0),
            );
        }
        let per = self
            .inner
            .per_droplet
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.to_string(), *v)).collect())
            .unwrap_or_default();
        WsStats {
            total_connections: connections.values().sum(),
            connections,
            connections_per_droplet: per,
            events_published: self.inner.published.load(Ordering::Relaxed),
            messages_sent: self.inner.sent.load(Ordering::Relaxed),
            clients_dropped_slow: self.inner.dropped_slow.load(Ordering::Relaxed),
            clients_dropped_unresponsive: self.inner.dropped_unresponsive.load(Ordering::Relaxed),
            client_queue: self.queue,
            max_queue_depth: self.inner.max_queue_depth.load(Ordering::Relaxed),
            max_connections_per_droplet: self.max_per_droplet.load(Ordering::Relaxed),
            listener: self
                .inner
                .listener
                .lock()
                .map(|l| l.clone())
                .unwrap_or_default(),
        }
    }
}
