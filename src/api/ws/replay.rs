//! What every frame of a socket watches (the server's shutdown, a kick from the hub, the
//! token's expiry, and a client that does not read), and the replay of a resuming client:
//! the retained events after its `event_id`, read a page at a time, each page bounded in
//! events and bytes and filtered by the database, every send under those same watches.

use std::time::Duration;

use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use futures::FutureExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{answer, drain, too_long, Reply, TOKEN_EXPIRED};
use crate::services::events::log::{self, PageLimit};
use crate::services::events::ClientRegistration;
use crate::state::AppState;

/// The most a resuming client's replay reads from the log at once: 100 events, and past the
/// first no more than 256 KiB of envelope text. With one frame in flight, a replaying
/// client holds about one page, whatever the size of the log (README, WebSocket section).
pub const REPLAY_PAGE: PageLimit = PageLimit {
    events: 100,
    bytes: 256 * 1024,
};

/// How a socket ends: the close frame to send (code, reason), or `None` when the connection
/// is gone or is just dropped.
pub type Close = Option<(u16, &'static str)>;

/// The close frame of a client whose frame waited longer than `WS_SEND_TIMEOUT_SECONDS`.
pub const SEND_TIMED_OUT: (u16, &str) = (1013, "client too slow: send timed out");

/// What ends a socket whatever it is doing, checked around every frame it sends.
pub struct Watch {
    pub kicked: CancellationToken,
    pub shutdown: CancellationToken,
    /// When the token expires (close 4001).
    pub expires: Instant,
    /// How long one frame may wait for the client to read.
    pub send_timeout: Duration,
    /// The orchestrator's `DROPLET_ID`: the `source` of its replies to the client.
    pub source: i32,
}

impl Watch {
    pub fn new(
        state: &AppState,
        registration: &ClientRegistration,
        until_expiry: Duration,
    ) -> Watch {
        Watch {
            kicked: registration.kicked(),
            shutdown: state.shutdown.clone(),
            expires: Instant::now() + until_expiry,
            send_timeout: state.config().ws_send_timeout,
            source: state.keys.orchestrator_id(),
        }
    }

    /// The close frame of a kicked client: the hub's reason (queue full, no answer to pings).
    pub fn kick_close(registration: &ClientRegistration) -> (u16, &'static str) {
        registration
            .kick_reason()
            .map_or((1000, "closed"), |k| (k.code, k.reason))
    }

    /// Sends one frame, unless the server stops, the client is kicked or its token expires
    /// first; a client that has not taken the frame within the send timeout is dropped (a
    /// client that stopped reading must not hold its task and its buffers).
    pub async fn send(
        &self,
        socket: &mut WebSocket,
        message: Message,
        registration: &ClientRegistration,
    ) -> Result<(), Close> {
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => Err(Some((1001, "server shutting down"))),
            _ = self.kicked.cancelled() => Err(Some(Self::kick_close(registration))),
            _ = tokio::time::sleep_until(self.expires) => Err(Some((TOKEN_EXPIRED, "token expired"))),
            sent = tokio::time::timeout(self.send_timeout, socket.send(message)) => match sent {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(None),
                Err(_) => {
                    registration.count_dropped_slow();
                    Err(Some(SEND_TIMED_OUT))
                }
            },
        }
    }
}

/// Sends the retained events after `after` that the client's filter takes, in order, after a
/// `resync_required` frame when the client's id is older than what is kept, one bounded page
/// at a time (`REPLAY_PAGE`). Between pages it answers what the client sent (its pongs, so a
/// long replay to a reading client passes the ping check) and pings it when one is due.
/// Returns the id of the last event sent, or of the point it resumed from: live events up to
/// it are duplicates, and none the filter takes lies between it and the live ones.
pub async fn resume(
    state: &AppState,
    socket: &mut WebSocket,
    registration: &ClientRegistration,
    after: i64,
    watch: &Watch,
) -> Result<i64, Close> {
    const LOG_UNAVAILABLE: Close = Some((1011, "event log unavailable"));
    let feed = registration.feed;
    let bounds = log::bounds(&state.db).await.map_err(|_| LOG_UNAVAILABLE)?;
    let mut last = after;
    if bounds.must_resync(after) {
        let frame = bounds.resync_frame(after).to_string();
        watch
            .send(socket, Message::Text(Utf8Bytes::from(frame)), registration)
            .await?;
        last = after.min(bounds.newest_id());
    }
    let ping_every = Duration::from_secs(state.config().ws_heartbeat_interval);
    let mut next_ping = Instant::now() + ping_every;
    loop {
        let filter = registration.filter();
        let page = log::page_after(&state.db, feed, last, &filter, REPLAY_PAGE)
            .await
            .map_err(|_| LOG_UNAVAILABLE)?;
        if page.is_empty() {
            return Ok(last);
        }
        for (event_id, text) in page {
            watch
                .send(socket, Message::Text(Utf8Bytes::from(text)), registration)
                .await?;
            registration.count_sent();
            last = event_id;
        }
        read_ready(socket, registration, watch).await?;
        if Instant::now() >= next_ping {
            next_ping = Instant::now() + ping_every;
            watch
                .send(socket, Message::Ping(Default::default()), registration)
                .await?;
        }
    }
}

/// Handles the frames the client has already sent, without waiting for more.
async fn read_ready(
    socket: &mut WebSocket,
    registration: &ClientRegistration,
    watch: &Watch,
) -> Result<(), Close> {
    // `recv` is `StreamExt::next`: polling it once and dropping it loses nothing.
    while let Some(incoming) = socket.recv().now_or_never() {
        let message = match incoming {
            Some(Ok(message)) => message,
            Some(Err(e)) => return Err(too_long(&e).then_some((1009, "message too big"))),
            None => return Err(None),
        };
        match answer(registration, message, watch.source) {
            Reply::Nothing => {}
            Reply::Frame(reply) => watch.send(socket, reply, registration).await?,
            Reply::Closed => {
                drain(socket).await;
                return Err(None);
            }
        }
    }
    Ok(())
}
