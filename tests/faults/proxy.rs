//! A TCP proxy the test controls between the orchestrator and the shared PostgreSQL, so the
//! database can be made unreachable without stopping it (as tests/api/database_faults.rs).

#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::helpers::server_url;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Open,
    /// Connections are closed at once and new ones refused (the database is down).
    Cut,
}

pub struct Proxy {
    pub port: u16,
    mode: watch::Sender<Mode>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let (mode, _) = watch::channel(Mode::Open);
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let upstream = server_url()
            .rsplit('@')
            .next()
            .unwrap_or("127.0.0.1:5432")
            .trim_start_matches("postgres://")
            .trim_end_matches('/')
            .to_string();
        let accept = {
            let (mode, links) = (mode.clone(), links.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let link = tokio::spawn(link(client, upstream.clone(), mode.subscribe()));
                    if let Ok(mut l) = links.lock() {
                        l.retain(|h| !h.is_finished());
                        l.push(link);
                    }
                }
            })
        };
        Proxy {
            port,
            mode,
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

    /// Every connection is closed and new ones are refused until `restore`.
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    pub fn restore(&self) {
        self.mode.send_replace(Mode::Open);
    }
}

async fn link(mut client: TcpStream, upstream: String, mut mode: watch::Receiver<Mode>) {
    if *mode.borrow_and_update() == Mode::Cut {
        return;
    }
    let Ok(mut server) = TcpStream::connect(&upstream).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = mode.wait_for(|m| *m == Mode::Cut) => {}
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        if let Ok(mut l) = self.links.lock() {
            for link in l.drain(..) {
                link.abort();
            }
        }
    }
}
