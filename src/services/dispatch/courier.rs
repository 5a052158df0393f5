//! What dispatch's own loops (the workers, the cancellations, the probes) use of the shared
//! parts, owned so that the work spawned off them may take a clone.

use crate::services::events::RelayWake;
use std::sync::Arc;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::identity::Keys;
use crate::instruments::Metrics;
use crate::services::core::{EmergencyStop, Settings};
use crate::services::dispatch::{Dispatcher, Outbound};
use crate::services::endpoints::EndpointPolicy;
use crate::services::router_trigger::RouterTrigger;
use crate::services::Core;

/// What the dispatch workers and the probes use of the shared parts: the pool, the settings,
/// the keys, the delivery queue and slots, the counters, the router's trigger, the shutdown
/// and the emergency stop, and what a delivery goes through (the endpoint policy and the
/// delivery client). Each part is shared, so a clone is cheap: the work spawned off a worker
/// (a retry after a pause, a cancellation's delivery) takes one.
#[derive(Clone)]
pub struct Courier {
    pub db: PgPool,
    pub settings: Settings,
    pub keys: Arc<Keys>,
    pub dispatch: Arc<Dispatcher>,
    pub metrics: Arc<Metrics>,
    pub router: Arc<RouterTrigger>,
    pub relay: RelayWake,
    pub shutdown: CancellationToken,
    pub stop: EmergencyStop,
    pub policy: Arc<EndpointPolicy>,
    pub delivery: reqwest::Client,
}

impl Core {
    /// The parts the dispatch workers and probes use ([`super::run_workers`], [`super::probe::run`]).
    pub fn courier(&self) -> Courier {
        Courier {
            db: self.db.clone(),
            settings: self.settings.clone(),
            keys: self.keys.clone(),
            dispatch: self.dispatch.clone(),
            metrics: self.metrics.clone(),
            router: self.router.clone(),
            relay: self.relay.clone(),
            shutdown: self.shutdown.clone(),
            stop: self.emergency_stop.clone(),
            policy: self.endpoint_policy.clone(),
            delivery: self.delivery.clone(),
        }
    }
}

impl Courier {
    pub(super) fn outbound(&self) -> Outbound<'_> {
        Outbound {
            policy: &self.policy,
            keys: &self.keys,
            client: &self.delivery,
        }
    }
}
