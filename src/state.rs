//! AppState: what every handler, service and job shares.

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::auth::Keys;
use crate::config::Config;
use crate::jobs::JobBoard;
use crate::metrics::Metrics;
use crate::services::config_reload::ConfigSource;
use crate::services::dispatch::Dispatcher;
use crate::services::events::EventHub;
use crate::services::registry_client::RegistryStatus;
use crate::services::task_router::RouterTrigger;
use crate::system::ProcessStats;
use crate::telemetry::LogHandle;

#[derive(Clone)]
pub struct AppState(Arc<App>);

pub struct App {
    pub db: PgPool,
    config: RwLock<Arc<Config>>,
    pub keys: Keys,
    pub events: EventHub,
    pub router: RouterTrigger,
    pub dispatch: Dispatcher,
    pub jobs: JobBoard,
    pub metrics: Metrics,
    pub registry: RegistryStatus,
    pub process: ProcessStats,
    pub http: reqwest::Client,
    /// Deliveries to droplets: endpoint policy at each resolution, no redirects.
    pub delivery: reqwest::Client,
    pub endpoint_policy: crate::services::endpoints::EndpointPolicy,
    /// Compiled capability contracts (JSON Schemas), shared by creation and routing.
    pub contracts: crate::services::contracts::Contracts,
    pub log: LogHandle,
    pub started_at: Instant,
    /// Cancelled when the process shuts down (SIGTERM, /management/shutdown).
    pub shutdown: CancellationToken,
    /// Set by /management/emergency-stop until the jobs are resumed.
    emergency_stop: AtomicBool,
    /// Where /management/reload-config reads the settings (tests fix it to a map).
    pub config_source: ConfigSource,
}

impl Deref for AppState {
    type Target = App;
    fn deref(&self) -> &App {
        &self.0
    }
}

impl AppState {
    pub fn new(db: PgPool, config: Config, keys: Keys, log: LogHandle) -> AppState {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(
                config.dispatch_timeout_seconds,
            ))
            .connect_timeout(std::time::Duration::from_secs(
                config.dispatch_timeout_seconds.min(5),
            ))
            .pool_max_idle_per_host(16)
            .build()
            .unwrap_or_default();
        let delivery = crate::services::endpoints::delivery_client(&config);
        let endpoint_policy = crate::services::endpoints::EndpointPolicy::from_config(&config);
        let config = Arc::new(config);
        AppState(Arc::new(App {
            delivery,
            endpoint_policy,
            contracts: crate::services::contracts::Contracts::new(),
            db,
            keys,
            events: EventHub::new(&config),
            router: RouterTrigger::new(),
            dispatch: Dispatcher::new(&config),
            jobs: JobBoard::new(&config),
            metrics: Metrics::new(),
            registry: RegistryStatus::new(config.registry_url.is_some()),
            process: ProcessStats::new(),
            http,
            log,
            started_at: Instant::now(),
            shutdown: CancellationToken::new(),
            emergency_stop: AtomicBool::new(false),
            config_source: ConfigSource::new(),
            config: RwLock::new(config),
        }))
    }
}

impl App {
    /// The settings in force now (reload-config may replace them).
    pub fn config(&self) -> Arc<Config> {
        match self.config.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn replace_config(&self, config: Config) {
        let mut slot = match self.config.write() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        *slot = Arc::new(config);
    }

    pub fn emergency_stopped(&self) -> bool {
        self.emergency_stop.load(Ordering::SeqCst)
    }

    pub fn set_emergency_stop(&self, on: bool) {
        self.emergency_stop.store(on, Ordering::SeqCst);
    }
}
