//! The composition root: builds the services' [`Core`] and adds what only the HTTP edge and
//! the scheduler use (the job board, process figures, the log handle). Handlers and jobs
//! take `AppState` and hand each service the parts it uses, built from the `Core` (an
//! `&AppState` derefs to it): `state.changes()`, `state.tasks()`, `state.routing()`...

use std::ops::Deref;
use std::sync::Arc;
use std::time::Instant;

use sqlx::PgPool;

use crate::config::Config;
use crate::identity::Keys;
use crate::jobs::JobBoard;
use crate::services::http_client::ClientBuildError;
use crate::services::Core;
use crate::system::ProcessStats;
use crate::telemetry::LogHandle;

#[derive(Clone)]
pub struct AppState(Arc<App>);

pub struct App {
    pub core: Core,
    pub jobs: JobBoard,
    pub process: Arc<ProcessStats>,
    pub log: LogHandle,
    pub started_at: Instant,
}

impl Deref for AppState {
    type Target = App;
    fn deref(&self) -> &App {
        &self.0
    }
}

impl Deref for App {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.core
    }
}

impl AppState {
    pub fn new(
        db: PgPool,
        config: Config,
        keys: Keys,
        log: LogHandle,
    ) -> Result<AppState, ClientBuildError> {
        let jobs = JobBoard::new(&config);
        Ok(AppState(Arc::new(App {
            core: Core::new(db, config, keys)?,
            jobs,
            process: Arc::new(ProcessStats::new()),
            log,
            started_at: Instant::now(),
        })))
    }
}
