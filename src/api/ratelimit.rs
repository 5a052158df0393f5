//! Request rate limits: `RATE_LIMIT_PER_MINUTE` per droplet (per client address without a
//! token) and `BROADCAST_RATE_LIMIT_PER_MINUTE` for `/broadcast`, as GCRA buckets (governor).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;
use crate::udc;

/// Whose bucket a request draws from. Droplets behind one address do not share a bucket;
/// requests without a usable token share their address's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RateKey {
    Droplet(i32),
    Address(IpAddr),
}

impl RateKey {
    /// IPv6 clients are keyed by their /64: one host usually owns a whole /64, and keying by
    /// the full address would hand it 2^64 fresh buckets.
    pub fn address(ip: IpAddr) -> RateKey {
        match ip {
            IpAddr::V4(_) => RateKey::Address(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => RateKey::Address(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    RateKey::Address(IpAddr::V6(Ipv6Addr::new(
                        s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                    )))
                }
            },
        }
    }
}

/// Keys kept per limiter before an early prune; past it (after pruning) the store is reset,
/// so memory stays bounded even under a flood from very many addresses.
const MAX_KEYS: usize = 100_000;
/// How often idle keys (whose bucket is full again) are dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// How often a request looks at the stores' size and age.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// `per_minute` requests a minute, all of them available at once (bursts up to the minute's
/// quota). The refill period is computed in nanoseconds so that no value in 1..=10,000,000
/// (or any u32) rounds down to a zero period.
pub fn quota(per_minute: u32) -> Quota {
    let burst = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
    let period_ns = (60_000_000_000u64 / u64::from(burst.get())).max(1);
    Quota::with_period(Duration::from_nanos(period_ns))
        .unwrap_or_else(|| Quota::per_minute(burst))
        .allow_burst(burst)
}

/// One keyed limiter at one rate.
pub struct Bucket<C: Clock = DefaultClock> {
    per_minute: u32,
    limiter: RateLimiter<RateKey, DashMapStateStore<RateKey>, C, NoOpMiddleware<C::Instant>>,
}

impl Bucket<DefaultClock> {
    pub fn new(per_minute: u32) -> Self {
        Bucket::with_clock(per_minute, DefaultClock::default())
    }
}

impl<C: Clock> Bucket<C> {
    pub fn with_clock(per_minute: u32, clock: C) -> Self {
        Bucket {
            per_minute,
            limiter: RateLimiter::dashmap_with_clock(quota(per_minute), clock),
        }
    }

    pub fn per_minute(&self) -> u32 {
        self.per_minute
    }

    /// Takes one request from `key`'s bucket, or says how long until the next one fits.
    /// A refused request takes nothing, so a flooding client does not push its own wait out.
    pub fn check(&self, key: &RateKey) -> Result<(), Duration> {
        self.limiter
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(self.limiter.clock().now()))
    }

    /// Drops keys whose bucket is full again (indistinguishable from a new key).
    pub fn prune(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

/// A bucket that follows the configured rate: reload-config may change it, and a new rate
/// starts a new bucket.
struct Slot(RwLock<Arc<Bucket>>);

impl Slot {
    fn new(per_minute: u32) -> Self {
        Slot(RwLock::new(Arc::new(Bucket::new(per_minute))))
    }

    fn current(&self) -> Arc<Bucket> {
        match self.0.read() {
            Ok(b) => b.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn replace(&self, per_minute: u32) {
        let mut slot = match self.0.write() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        };
        *slot = Arc::new(Bucket::new(per_minute));
    }

    /// The bucket for `per_minute`, replacing the current one when the rate changed.
    fn at_rate(&self, per_minute: u32) -> Arc<Bucket> {
        let bucket = self.current();
        if bucket.per_minute() == per_minute {
            return bucket;
        }
        let mut slot = match self.0.write() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        };
        if slot.per_minute() != per_minute {
            *slot = Arc::new(Bucket::new(per_minute));
        }
        slot.clone()
    }
}

/// The service's limiters: every request, and `/broadcast` on top.
pub struct RateLimits {
    general: Slot,
    broadcast: Slot,
    started: Instant,
    last_prune_ms: AtomicU64,
    next_check_ms: AtomicU64,
}

impl RateLimits {
    pub fn new(per_minute: u32, broadcast_per_minute: u32) -> Self {
        RateLimits {
            general: Slot::new(per_minute),
            broadcast: Slot::new(broadcast_per_minute),
            started: Instant::now(),
            last_prune_ms: AtomicU64::new(0),
            next_check_ms: AtomicU64::new(0),
        }
    }

    /// Keys currently held (both limiters).
    pub fn keys(&self) -> usize {
        self.general.current().len() + self.broadcast.current().len()
    }

    /// Looks at the stores at most once a second (one request wins the race; the others pay
    /// one atomic load): prunes once a minute, or at once when a store is over `MAX_KEYS`.
    fn prune_if_due(&self) {
        let now_ms = self.started.elapsed().as_millis() as u64;
        let next = self.next_check_ms.load(Ordering::Relaxed);
        if now_ms < next
            || self
                .next_check_ms
                .compare_exchange(
                    next,
                    now_ms + CHECK_EVERY.as_millis() as u64,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return;
        }
        let since = now_ms.saturating_sub(self.last_prune_ms.load(Ordering::Relaxed));
        if since < PRUNE_EVERY.as_millis() as u64 && self.keys() <= MAX_KEYS {
            return;
        }
        self.last_prune_ms.store(now_ms, Ordering::Relaxed);
        self.prune(MAX_KEYS);
    }

    /// Drops idle keys; a store still over `max_keys` after that is reset.
    fn prune(&self, max_keys: usize) {
        for slot in [&self.general, &self.broadcast] {
            let bucket = slot.current();
            bucket.prune();
            if bucket.len() > max_keys {
                // More clients than MAX_KEYS active within a minute: forget them all rather
                // than grow without bound.
                tracing::warn!(
                    keys = bucket.len(),
                    "rate limiter key store full; resetting it"
                );
                slot.replace(bucket.per_minute());
            }
        }
    }
}

/// Public endpoints that stay cheap: no token check, no bucket.
pub fn is_exempt(path: &str) -> bool {
    matches!(
        path,
        "/health" | "/capabilities" | "/dependencies" | "/management/version" | "/openapi.json"
    ) || path == "/docs"
        || path.starts_with("/docs/")
        || path == "/dashboard"
        || path.starts_with("/dashboard/")
}

/// The paths that take a token in `?token=` (browsers cannot set headers on a WebSocket).
/// Every other path reads only the bearer header, so a `?token=` there authenticates nothing.
fn takes_query_token(path: &str) -> bool {
    matches!(path, "/ws/tasks" | "/ws/droplets")
}

/// The first non-empty `?token=` of a WebSocket URL, decoded as the feed decodes it.
fn query_token(request: &Request) -> Option<String> {
    url::form_urlencoded::parse(request.uri().query()?.as_bytes())
        .find(|(k, v)| k == "token" && !v.is_empty())
        .map(|(_, v)| v.into_owned())
}

fn bearer_token(request: &Request) -> Option<String> {
    request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// Who the request counts against. The token the endpoint will authenticate with (the bearer
/// header; on the WebSocket feeds `?token=` first, then the header, as the feed reads them)
/// keys by its droplet when it verifies, and a header token is handed to the `Caller`
/// extractor so it is not verified twice. Anything else, including every request the
/// endpoint will refuse with 401 (a forged, expired or outbound token, or a `?token=` on a
/// path that does not read it), keys by the client address: a refused request never draws
/// from the bucket of the droplet its token names. The signature is always checked: keying by
/// unverified claims would let anyone pick a fresh bucket per request, or drain another's.
fn key_for(state: &AppState, request: &mut Request) -> RateKey {
    let query = if takes_query_token(request.uri().path()) {
        query_token(request)
    } else {
        None
    };
    let (parts_token, from_header) = match query {
        Some(t) => (Some(t), false),
        None => (bearer_token(request), true),
    };
    if let Some(token) = parts_token {
        if let Ok(claims) = state.keys.verify(&token) {
            let caller = Caller::from_claims(&claims);
            let key = RateKey::Droplet(caller.droplet_id);
            if from_header {
                udc::set_caller(caller.droplet_id);
                request.extensions_mut().insert(caller);
            }
            return key;
        }
    }
    let ip = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    RateKey::address(ip)
}

fn too_many(wait: Duration) -> Response {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    ApiError::RateLimited {
        retry_after_seconds: seconds.max(1),
    }
    .into_response()
}

/// Middleware: a 429 with `Retry-After` when the caller's bucket is empty.
pub async fn enforce(
    State((state, limits)): State<(AppState, Arc<RateLimits>)>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    if is_exempt(path) {
        return next.run(request).await;
    }
    let is_broadcast = path == "/broadcast";
    let config = state.config();
    let key = key_for(&state, &mut request);
    limits.prune_if_due();
    if is_broadcast {
        let bucket = limits
            .broadcast
            .at_rate(config.broadcast_rate_limit_per_minute);
        if let Err(wait) = bucket.check(&key) {
            return too_many(wait);
        }
    }
    let bucket = limits.general.at_rate(config.rate_limit_per_minute);
    if let Err(wait) = bucket.check(&key) {
        return too_many(wait);
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    #[test]
    fn every_configurable_rate_has_a_nonzero_period_and_a_full_burst() {
        for per_minute in [1, 7, 59, 60, 61, 100, 1_000_000, 10_000_000, u32::MAX] {
            let q = quota(per_minute);
            assert!(q.replenish_interval() > Duration::ZERO, "{per_minute}");
            assert_eq!(q.burst_size().get(), per_minute);
        }
        assert_eq!(quota(100).replenish_interval(), Duration::from_millis(600));
        assert_eq!(
            quota(10_000_000).replenish_interval(),
            Duration::from_nanos(6_000)
        );
        assert_eq!(quota(0).burst_size().get(), 1);
    }

    #[test]
    fn the_101st_request_waits_and_other_droplets_do_not() {
        let clock = FakeRelativeClock::default();
        let bucket = Bucket::with_clock(100, clock.clone());
        let me = RateKey::Droplet(5);
        for i in 0..100 {
            assert!(bucket.check(&me).is_ok(), "request {i}");
        }
        let wait = bucket.check(&me).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(600),
            "{wait:?}"
        );
        assert!(bucket.check(&RateKey::Droplet(6)).is_ok());
        assert!(bucket
            .check(&RateKey::address([10, 0, 0, 1].into()))
            .is_ok());
        // Refused requests take nothing: one refill later, exactly one more fits.
        for _ in 0..50 {
            assert!(bucket.check(&me).is_err());
        }
        clock.advance(Duration::from_millis(600));
        assert!(bucket.check(&me).is_ok());
        assert!(bucket.check(&me).is_err());
    }

    #[test]
    fn pruning_forgets_idle_keys_only() {
        let clock = FakeRelativeClock::default();
        let bucket = Bucket::with_clock(10, clock.clone());
        for id in 0..1000 {
            let _ = bucket.check(&RateKey::Droplet(id));
        }
        for _ in 0..10 {
            let _ = bucket.check(&RateKey::Droplet(-1));
        }
        assert_eq!(bucket.len(), 1001);
        clock.advance(Duration::from_secs(13));
        bucket.prune();
        // Droplet -1 emptied its bucket and has not refilled; the one-request keys have.
        assert_eq!(bucket.len(), 1);
        assert!(bucket.check(&RateKey::Droplet(-1)).is_ok());
    }

    #[test]
    fn a_store_still_over_its_bound_after_pruning_is_reset() {
        let limits = RateLimits::new(2, 2);
        let general = limits.general.current();
        for id in 0..10 {
            // Emptied buckets: pruning keeps them.
            let _ = general.check(&RateKey::Droplet(id));
            let _ = general.check(&RateKey::Droplet(id));
        }
        limits.prune(100);
        assert_eq!(limits.keys(), 10);
        limits.prune(5);
        assert_eq!(limits.keys(), 0);
        assert_eq!(limits.general.current().per_minute(), 2);
    }

    #[test]
    fn a_changed_rate_takes_a_new_bucket_and_an_unchanged_one_keeps_it() {
        let limits = RateLimits::new(1, 1);
        let key = RateKey::Droplet(1);
        assert!(limits.general.at_rate(1).check(&key).is_ok());
        assert!(limits.general.at_rate(1).check(&key).is_err());
        assert!(limits.general.at_rate(2).check(&key).is_ok());
        assert_eq!(limits.general.current().per_minute(), 2);
    }

    #[test]
    fn ipv6_clients_share_their_slash_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(RateKey::address(a), RateKey::address(b));
        assert_ne!(RateKey::address(a), RateKey::address(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(
            RateKey::address(mapped),
            RateKey::Address([10, 0, 0, 1].into())
        );
    }

    #[test]
    fn only_the_websocket_feeds_read_a_query_token() {
        assert!(takes_query_token("/ws/tasks"));
        assert!(takes_query_token("/ws/droplets"));
        assert!(!takes_query_token("/ws/status"));
        assert!(!takes_query_token("/tasks"));
        let request = Request::builder()
            .uri("/ws/tasks?status=&token=&token=a%2Bb&token=c")
            .body(axum::body::Body::empty())
            .unwrap();
        assert_eq!(query_token(&request).as_deref(), Some("a+b"));
    }

    #[test]
    fn public_health_endpoints_are_exempt() {
        assert!(is_exempt("/health"));
        assert!(is_exempt("/docs/swagger-ui.css"));
        assert!(!is_exempt("/tasks"));
        assert!(!is_exempt("/broadcast"));
        assert!(!is_exempt("/docsx"));
    }
}
