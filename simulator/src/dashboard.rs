//! A dashboard on a `/ws/{feed}`: counts the events it is sent (by kind), keeps them if
//! asked, marks when each task was assigned, and keeps the close code it was sent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::lock;
use super::report::Timeline;

/// What a dashboard keeps of what it sees.
#[derive(Debug, Clone, Default)]
pub struct Watch {
    /// Every event (a long simulation would grow without bound; counts are always kept).
    pub keep_events: bool,
    /// Where `task_assigned` events are marked.
    pub timeline: Option<Arc<Timeline>>,
}

/// A dashboard on a feed.
pub struct Dashboard {
    /// The events received (only with [`Watch::keep_events`]).
    pub events: Arc<Mutex<Vec<Value>>>,
    pub close: Arc<Mutex<Option<u16>>>,
    pub ended: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    kinds: Arc<Mutex<HashMap<String, u64>>>,
    stop: CancellationToken,
}

impl Dashboard {
    /// Connects to `/ws/{feed}` on `base` with `token` and follows it until the server
    /// closes it or [`Dashboard::stop`].
    pub async fn connect(
        base: &str,
        feed: &str,
        token: &str,
        watch: Watch,
    ) -> Result<Dashboard, String> {
        let url = format!(
            "{}/ws/{feed}?token={token}",
            base.trim_end_matches('/').replacen("http", "ws", 1)
        );
        let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .map_err(|e| e.to_string())?;
        let dashboard = Dashboard {
            events: Arc::default(),
            close: Arc::default(),
            ended: Arc::new(AtomicBool::new(false)),
            received: Arc::default(),
            kinds: Arc::default(),
            stop: CancellationToken::new(),
        };
        let (events, close, ended, received, kinds, stop) = (
            dashboard.events.clone(),
            dashboard.close.clone(),
            dashboard.ended.clone(),
            dashboard.received.clone(),
            dashboard.kinds.clone(),
            dashboard.stop.clone(),
        );
        tokio::spawn(async move {
            use tokio_tungstenite::tungstenite::Message;
            loop {
                let frame = tokio::select! {
                    _ = stop.cancelled() => break,
                    f = socket.next() => f,
                };
                let Some(frame) = frame else { break };
                match frame {
                    Ok(Message::Text(t)) => {
                        let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else {
                            continue;
                        };
                        received.fetch_add(1, Ordering::Relaxed);
                        let kind = v["payload"]["event"].as_str().unwrap_or("").to_string();
                        if let (Some(timeline), "task_assigned") = (&watch.timeline, kind.as_str())
                        {
                            if let Some(trace) = v["payload"]["task"]["trace_id"]
                                .as_str()
                                .and_then(|t| Uuid::parse_str(t).ok())
                            {
                                timeline.assigned(trace);
                            }
                        }
                        *lock(&kinds).entry(kind).or_insert(0) += 1;
                        if watch.keep_events {
                            lock(&events).push(v);
                        }
                    }
                    Ok(Message::Close(frame)) => {
                        *lock(&close) = Some(frame.map_or(1005, |f| u16::from(f.code)));
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            ended.store(true, Ordering::SeqCst);
        });
        Ok(dashboard)
    }

    /// Events received.
    pub fn count(&self) -> usize {
        self.received.load(Ordering::Relaxed) as usize
    }

    /// Events received whose `payload.event` is `kind`.
    pub fn count_of(&self, kind: &str) -> u64 {
        lock(&self.kinds).get(kind).copied().unwrap_or(0)
    }

    /// The events kept whose `payload.event` is `kind`.
    pub fn of_kind(&self, kind: &str) -> Vec<Value> {
        lock(&self.events)
            .iter()
            .filter(|e| e["payload"]["event"] == kind)
            .cloned()
            .collect()
    }

    pub fn close_code(&self) -> Option<u16> {
        *lock(&self.close)
    }

    /// Stops following the feed.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}
