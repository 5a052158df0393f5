//! The one TCP proxy of the tests, between a service under test and the shared PostgreSQL,
//! so the database link can fail without the server being touched. Included by both test
//! crates (`#[path = "../common/proxy.rs"] mod proxy;`); it needs their `helpers::server_url`.
//!
//! - `cut()`: every connection is closed at once and new ones are closed as they arrive
//!   (the database is down or restarting);
//! - `stall()`: connections stay open and nothing passes either way, new ones included
//!   (a partition: the peer looks alive and never answers);
//! - `delay(min, max)`: each chunk is forwarded that much later (uniform, per chunk, in
//!   order: a slow link, not a slower one per byte);
//! - `restore()`: connections pass again; the ones a stall held are closed, as TCP would
//!   close them in the end.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::helpers::server_url;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Open,
    /// Connections are closed at once and new ones refused.
    Cut,
    /// Connections stay open but nothing passes.
    Stall,
}

/// Latency added to each chunk, in milliseconds (uniform in `[min, max]`); `(0, 0)`: none.
type Latency = (u64, u64);

pub struct Proxy {
    pub port: u16,
    mode: watch::Sender<Mode>,
    latency: watch::Sender<Latency>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// `host:port` of the server `helpers::server_url()` names.
fn upstream() -> String {
    server_url()
        .rsplit('@')
        .next()
        .unwrap_or("127.0.0.1:5432")
        .trim_start_matches("postgres://")
        .trim_end_matches('/')
        .to_string()
}

impl Proxy {
    /// A proxy to the tests' PostgreSQL, open.
    pub async fn start() -> Proxy {
        Proxy::start_to(upstream()).await
    }

    /// A proxy to `upstream` (`host:port`), open.
    pub async fn start_to(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let (mode, _) = watch::channel(Mode::Open);
        let (latency, _) = watch::channel((0, 0));
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = {
            let (mode, latency, links) = (mode.clone(), latency.clone(), links.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let link = tokio::spawn(link(
                        client,
                        upstream.clone(),
                        mode.subscribe(),
                        latency.subscribe(),
                    ));
                    let mut l = lock(&links);
                    l.retain(|h| !h.is_finished());
                    l.push(link);
                }
            })
        };
        Proxy {
            port,
            mode,
            latency,
            links,
            accept,
        }
    }

    /// The URL of database `name` through this proxy.
    pub fn database_url(&self, name: &str) -> String {
        let server = server_url();
        let (scheme_user, _) = server
            .rsplit_once('@')
            .unwrap_or(("postgres://postgres", ""));
        format!("{scheme_user}@127.0.0.1:{}/{name}", self.port)
    }

    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    /// Every connection is closed and new ones are refused until `restore`.
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    /// Nothing passes on any connection, old or new, until `restore`.
    pub fn stall(&self) {
        self.mode.send_replace(Mode::Stall);
    }

    /// Each chunk from now on (either way) is forwarded `min..=max` later; `delay(0, 0)`
    /// takes the latency away. Independent of the mode.
    pub fn delay(&self, min: Duration, max: Duration) {
        let min = min.as_millis() as u64;
        let max = (max.as_millis() as u64).max(min);
        self.latency.send_replace((min, max));
    }

    /// Connections pass again; those a cut or a stall left are closed.
    pub fn restore(&self) {
        if self.mode() != Mode::Open {
            for link in std::mem::take(&mut *lock(&self.links)) {
                link.abort();
            }
        }
        self.mode.send_replace(Mode::Open);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for link in lock(&self.links).drain(..) {
            link.abort();
        }
    }
}

/// One client connection: forwarded while the proxy is open, then closed (cut) or held
/// open with nothing passing (stall) until the proxy restores and aborts it.
async fn link(
    client: TcpStream,
    upstream: String,
    mut mode: watch::Receiver<Mode>,
    latency: watch::Receiver<Latency>,
) {
    let current = *mode.borrow_and_update();
    if current == Mode::Cut {
        return;
    }
    if current == Mode::Stall {
        let _held = client;
        return std::future::pending::<()>().await;
    }
    let Ok(server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let forward = async {
        tokio::select! {
            _ = pipe(client_read, server_write, latency.clone()) => {}
            _ = pipe(server_read, client_write, latency.clone()) => {}
        }
    };
    tokio::pin!(forward);
    let next = tokio::select! {
        _ = &mut forward => return,
        m = mode.wait_for(|m| *m != Mode::Open) => m.map(|m| *m).unwrap_or(Mode::Cut),
    };
    if next == Mode::Stall {
        // The sockets stay open inside `forward`, which is no longer polled: the peers see
        // a live link on which nothing arrives.
        let _held = forward;
        std::future::pending::<()>().await;
    }
}

/// Copies one direction, each chunk released at its read time plus the latency (never
/// before the previous chunk: order is kept and delays do not add up).
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    latency: watch::Receiver<Latency>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        let mut last = tokio::time::Instant::now();
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let (min, max) = *latency.borrow();
            let extra = if max == 0 {
                Duration::ZERO
            } else {
                Duration::from_millis(rand::random_range(min..=max))
            };
            let release = (tokio::time::Instant::now() + extra).max(last);
            last = release;
            if tx.send((release, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((release, bytes)) = rx.recv().await {
            tokio::time::sleep_until(release).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    // The reader ends first on EOF; the writer then drains what is queued and shuts down.
    let (_, _) = tokio::join!(reader, writer);
}
