//! The orchestrator's API as every simulated client reaches it: one or more replicas, taken
//! in turn; a request sent once, or again (with backoff) while no answer, a 5xx or a 429
//! comes back, as a careful client does; every answer logged so a run can report its 5xx
//! and latencies.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;

use super::lock;

/// How a simulated client treats a request that found no server, a 5xx or a 429.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Patience {
    /// Sends it once and takes what comes (`orchestrator-simulator`, the bench).
    Once,
    /// Sends it again, to another replica when there is one, until a real answer comes or
    /// its time is up; a task is created again with the same trace id, and a 409 to a PATCH
    /// whose earlier answer was lost is read back (the fault scenarios).
    Careful,
}

/// One answer (or failure) as the clients saw it.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub at: Instant,
    pub took: Duration,
    /// None: no answer (connection refused or reset, timeout).
    pub status: Option<u16>,
    pub what: String,
}

/// How the API's HTTP client is built.
#[derive(Debug, Clone, Copy)]
pub struct ApiOptions {
    /// How long one answer may take.
    pub timeout: Duration,
    pub idle_per_host: usize,
    /// Keep every [`Exchange`] (a long simulation would grow without bound).
    pub keep_log: bool,
}

impl Default for ApiOptions {
    fn default() -> ApiOptions {
        ApiOptions {
            timeout: Duration::from_secs(25),
            idle_per_host: 64,
            keep_log: true,
        }
    }
}

/// The orchestrator's API: one or more replicas.
pub struct Api {
    http: reqwest::Client,
    bases: RwLock<Vec<String>>,
    next: AtomicUsize,
    keep_log: bool,
    pub log: Mutex<Vec<Exchange>>,
}

impl Api {
    /// Answers within 25 s, every exchange logged.
    pub fn new(bases: Vec<String>) -> Arc<Api> {
        Api::with_options(bases, ApiOptions::default())
    }

    /// Clients that give up on one answer after `timeout` (and, careful, send again).
    pub fn with_timeout(bases: Vec<String>, timeout: Duration) -> Arc<Api> {
        Api::with_options(
            bases,
            ApiOptions {
                timeout,
                ..ApiOptions::default()
            },
        )
    }

    pub fn with_options(bases: Vec<String>, options: ApiOptions) -> Arc<Api> {
        Arc::new(Api {
            http: reqwest::Client::builder()
                .timeout(options.timeout)
                .pool_max_idle_per_host(options.idle_per_host)
                .build()
                .expect("an HTTP client"),
            bases: RwLock::new(
                bases
                    .into_iter()
                    .map(|b| b.trim_end_matches('/').to_string())
                    .collect(),
            ),
            next: AtomicUsize::new(0),
            keep_log: options.keep_log,
            log: Mutex::new(Vec::new()),
        })
    }

    /// The HTTP client every request goes through.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub fn set_bases(&self, bases: &[String]) {
        if let Ok(mut b) = self.bases.write() {
            *b = bases
                .iter()
                .map(|b| b.trim_end_matches('/').to_string())
                .collect();
        }
    }

    /// The first replica.
    pub fn base(&self) -> String {
        self.bases.read().map(|b| b[0].clone()).unwrap_or_default()
    }

    fn pick(&self) -> String {
        let bases = self.bases.read().map(|b| b.clone()).unwrap_or_default();
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        bases[i % bases.len()].clone()
    }

    /// One attempt on one replica (round robin): the status and the body (JSON, or the text
    /// as a string), or why no answer came.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), String> {
        let base = self.pick();
        let started = Instant::now();
        let mut req = self
            .http
            .request(method.clone(), format!("{base}{path}"))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let answer = match req.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                let text = r.text().await.unwrap_or_default();
                Ok((
                    status,
                    serde_json::from_str(&text).unwrap_or(Value::String(text)),
                ))
            }
            Err(e) => Err(e.to_string()),
        };
        if self.keep_log {
            lock(&self.log).push(Exchange {
                at: started,
                took: started.elapsed(),
                status: answer.as_ref().ok().map(|(s, _)| *s),
                what: format!("{method} {}", route_of(path)),
            });
        }
        answer
    }

    /// One attempt on one replica (round robin).
    pub async fn once(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> Option<(u16, Value)> {
        self.send(method, path, token, body).await.ok()
    }

    /// Sends until an answer that is neither a 5xx nor a 429 comes, for at most `give_up`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<&Value>,
        give_up: Duration,
    ) -> Option<(u16, Value)> {
        // Exponential backoff with full jitter (100 ms doubling up to 2 s), so clients
        // that all failed together do not all come back together.
        let deadline = Instant::now() + give_up;
        let mut ceiling = Duration::from_millis(100);
        loop {
            match self.once(method.clone(), path, token, body).await {
                Some((s, v)) if s < 500 && s != 429 => return Some((s, v)),
                last => {
                    if Instant::now() + ceiling > deadline {
                        return last;
                    }
                }
            }
            let pause = ceiling.mul_f64(rand::random_range(0.1..=1.0));
            tokio::time::sleep(pause).await;
            ceiling = (ceiling * 2).min(Duration::from_secs(2));
        }
    }

    /// [`Api::once`] or [`Api::call`] (for at most `give_up`), as `patience` says.
    pub async fn request(
        &self,
        patience: Patience,
        method: Method,
        path: &str,
        token: &str,
        body: Option<&Value>,
        give_up: Duration,
    ) -> Option<(u16, Value)> {
        match patience {
            Patience::Once => self.once(method, path, token, body).await,
            Patience::Careful => self.call(method, path, token, body, give_up).await,
        }
    }

    /// The exchanges so far.
    pub fn exchanges(&self) -> Vec<Exchange> {
        lock(&self.log).clone()
    }

    /// 5xx answers in `[from, to)` (all of them with `None`).
    pub fn server_errors(&self, window: Option<(Instant, Instant)>) -> Vec<Exchange> {
        lock(&self.log)
            .iter()
            .filter(|e| e.status.is_some_and(|s| s >= 500))
            .filter(|e| window.is_none_or(|(from, to)| e.at >= from && e.at < to))
            .cloned()
            .collect()
    }

    /// Answers by status (`none` for no answer).
    pub fn by_status(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for e in lock(&self.log).iter() {
            let k = e.status.map_or("none".to_string(), |s| s.to_string());
            *m.entry(k).or_insert(0) += 1;
        }
        m
    }
}

/// `/tasks/17` -> `/tasks/{id}`, so figures group by route.
fn route_of(path: &str) -> String {
    path.split('?')
        .next()
        .unwrap_or("")
        .split('/')
        .map(|seg| {
            if !seg.is_empty() && seg.chars().all(|c| c.is_ascii_digit()) {
                "{id}"
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::route_of;

    #[test]
    fn routes_group_by_shape() {
        assert_eq!(route_of("/tasks/17?x=1"), "/tasks/{id}");
        assert_eq!(
            route_of("/droplets/3/heartbeat"),
            "/droplets/{id}/heartbeat"
        );
        assert_eq!(route_of("/tasks"), "/tasks");
    }
}
