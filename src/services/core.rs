//! What the services share: the pool, the settings in force, the event hub, the router's
//! trigger, the dispatcher and the other parts they are built from. Built once by the
//! composition root (`state.rs`), which adds the HTTP edge's own parts on top; no service
//! sees those.

use crate::services::events::RelayWake;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::identity::Keys;
use crate::instruments::Metrics;
use crate::services::config_source::ConfigSource;
use crate::services::contract_directory::ContractDirectory;
use crate::services::contracts::Contracts;
use crate::services::create_queue::CreateQueue;
use crate::services::dispatch::slots::Dispatcher;
use crate::services::endpoints::{self, EndpointPolicy};
use crate::services::events::EventHub;
use crate::services::fair_share::LimitCache;
use crate::services::heartbeat_queue::HeartbeatQueue;
use crate::services::http_client::{build_client, ClientBuildError};
use crate::services::registry_status::RegistryStatus;
use crate::services::router_trigger::RouterTrigger;
use crate::services::table_statistics::Growth;
use crate::services::update_queue::UpdateQueue;

/// The services' shared parts, cheap to clone (one `Arc`). No service takes it whole: each
/// takes a handle to the parts it uses, built here by a method of its own file
/// (`core.changes()`, `core.routing()`...). Parts a handle may own are shared (`Arc`s,
/// pools, clients), so a handle that goes with a spawned task clones only those.
#[derive(Clone)]
pub struct Core(Arc<Parts>);

pub struct Parts {
    pub db: PgPool,
    /// The settings in force (reload-config may replace them).
    pub settings: Settings,
    /// Verifies tokens and signs the orchestrator's own.
    pub keys: Arc<Keys>,
    pub events: EventHub,
    /// Wakes this replica's event relay after a commit that recorded events.
    pub relay: RelayWake,
    pub router: Arc<RouterTrigger>,
    pub dispatch: Arc<Dispatcher>,
    pub metrics: Arc<Metrics>,
    pub registry: RegistryStatus,
    /// Requests to the Registry.
    pub http: reqwest::Client,
    /// Fetches of the Registry's public key: https only, no redirects (a key is trusted only
    /// from the https `REGISTRY_URL` itself).
    pub registry_key_http: reqwest::Client,
    /// Deliveries to droplets: endpoint policy at each resolution, no redirects.
    pub delivery: reqwest::Client,
    pub endpoint_policy: Arc<EndpointPolicy>,
    /// Compiled capability contracts (JSON Schemas), shared by creation and routing.
    pub contracts: Arc<Contracts>,
    /// The registered droplets' contracts by capability, kept from the droplet events: what
    /// a creation checks its payload against without a query.
    pub directory: Arc<ContractDirectory>,
    /// Creations waiting to share an insert and a commit.
    pub creates: Arc<CreateQueue>,
    /// The limits per key in force, as this replica last read them.
    pub limits: Arc<LimitCache>,
    /// Heartbeats waiting to share a statement and a commit.
    pub heartbeats: Arc<HeartbeatQueue>,
    /// PATCHes of tasks waiting to share a transaction and a commit.
    pub updates: Arc<UpdateQueue>,
    /// Creations counted, for fresh statistics of the young task tables.
    pub growth: Arc<Growth>,
    /// Cancelled when the process shuts down (SIGTERM, /management/shutdown).
    pub shutdown: CancellationToken,
    pub emergency_stop: EmergencyStop,
    /// Where a reload reads the settings (tests fix it to a map).
    pub config_source: ConfigSource,
}

/// The settings in force: read often, replaced by a reload. Services that need only the
/// settings take this, not the whole [`Core`]; a clone reads the same settings.
#[derive(Clone)]
pub struct Settings(Arc<RwLock<Arc<Config>>>);

impl Settings {
    pub fn new(config: Config) -> Settings {
        Settings(Arc::new(RwLock::new(Arc::new(config))))
    }

    /// The settings in force now.
    pub fn current(&self) -> Arc<Config> {
        match self.0.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn replace(&self, config: Config) {
        let mut slot = match self.0.write() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        *slot = Arc::new(config);
    }
}

/// Set by /management/emergency-stop until the jobs are resumed; a clone reads the same flag.
#[derive(Clone, Default)]
pub struct EmergencyStop(Arc<AtomicBool>);

impl EmergencyStop {
    pub fn is_on(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    pub fn set(&self, on: bool) {
        self.0.store(on, Ordering::SeqCst);
    }
}

impl Deref for Core {
    type Target = Parts;
    fn deref(&self) -> &Parts {
        &self.0
    }
}

impl Core {
    /// Fails when an outbound HTTP client cannot be built: start-up stops with the reason
    /// rather than going on with a default client (which would follow redirects, with no
    /// timeouts and no address policy).
    pub fn new(db: PgPool, config: Config, keys: Keys) -> Result<Core, ClientBuildError> {
        let timeout = std::time::Duration::from_secs(config.dispatch_timeout_seconds);
        let connect_timeout = timeout.min(std::time::Duration::from_secs(5));
        // The Registry's token and directory requests carry `X-Registry-Key`: a redirect
        // would carry it elsewhere, so none is followed.
        let http = build_client(
            "Registry requests",
            reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(timeout)
                .connect_timeout(connect_timeout)
                .pool_max_idle_per_host(16),
        )?;
        let registry_key_http = build_client(
            "the Registry's public key",
            reqwest::Client::builder()
                .https_only(true)
                .redirect(reqwest::redirect::Policy::none())
                .timeout(timeout)
                .connect_timeout(connect_timeout),
        )?;
        let delivery = endpoints::delivery_client(&config)?;
        let endpoint_policy = EndpointPolicy::from_config(&config);
        let metrics = Metrics::new();
        Ok(Core(Arc::new(Parts {
            delivery,
            endpoint_policy: Arc::new(endpoint_policy),
            contracts: Arc::new(Contracts::new(metrics.contract_evaluations.clone())),
            directory: Arc::new(ContractDirectory::new()),
            creates: Arc::new(CreateQueue::new(
                (config.pool_max_connections() as usize / 4).clamp(1, 8),
            )),
            growth: Arc::new(Growth::new()),
            limits: Arc::new(LimitCache::new()),
            heartbeats: Arc::new(HeartbeatQueue::new(
                (config.pool_max_connections() as usize / 4).clamp(1, 8),
            )),
            updates: Arc::new(UpdateQueue::new(
                (config.pool_max_connections() as usize / 4).clamp(1, 8),
            )),
            db,
            keys: Arc::new(keys),
            events: EventHub::new(&config),
            relay: RelayWake::default(),
            router: Arc::new(RouterTrigger::new()),
            dispatch: Arc::new(Dispatcher::new(&config)),
            metrics: Arc::new(metrics),
            registry: RegistryStatus::new(config.registry_url.is_some()),
            http,
            registry_key_http,
            shutdown: CancellationToken::new(),
            emergency_stop: EmergencyStop::default(),
            config_source: ConfigSource::new(),
            settings: Settings::new(config),
        })))
    }
}

impl Parts {
    /// The settings in force now (reload-config may replace them).
    pub fn config(&self) -> Arc<Config> {
        self.settings.current()
    }

    pub fn replace_config(&self, config: Config) {
        self.settings.replace(config);
    }

    pub fn emergency_stopped(&self) -> bool {
        self.emergency_stop.is_on()
    }

    pub fn set_emergency_stop(&self, on: bool) {
        self.emergency_stop.set(on);
    }
}
