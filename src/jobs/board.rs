//! The job board: the jobs' ids, their state (interval, paused, runs, last outcome)
//! and the switches an operator or an emergency stop flips. Below the scheduler (`jobs`),
//! which runs them.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_cron_scheduler::JobScheduler;
use uuid::Uuid;

use crate::config::Config;
use crate::services::Core;

/// A scheduled job. On the wire and in `/management/scheduler/jobs/{job_id}` paths, its
/// snake_case name (`task_router`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum JobId {
    HealthMonitor,
    TaskRouter,
    RegistrySync,
    HeartbeatCleanup,
    WebsocketPing,
}

impl JobId {
    /// Every scheduled job, in its documented order: the one list the scheduler, the board
    /// and the API take them from.
    pub const ALL: [JobId; 5] = [
        JobId::HealthMonitor,
        JobId::TaskRouter,
        JobId::RegistrySync,
        JobId::HeartbeatCleanup,
        JobId::WebsocketPing,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobId::HealthMonitor => "health_monitor",
            JobId::TaskRouter => "task_router",
            JobId::RegistrySync => "registry_sync",
            JobId::HeartbeatCleanup => "heartbeat_cleanup",
            JobId::WebsocketPing => "websocket_ping",
        }
    }

    /// The job of that name, if there is one.
    pub fn parse(name: &str) -> Option<JobId> {
        JobId::ALL.into_iter().find(|id| id.as_str() == name)
    }

    /// Seconds between runs under `config`.
    pub(super) fn interval(self, config: &Config) -> u64 {
        match self {
            JobId::HealthMonitor => config.heartbeat_check_interval,
            JobId::TaskRouter => config.task_router_interval,
            JobId::RegistrySync => config.registry_sync_interval,
            JobId::HeartbeatCleanup => config.heartbeat_cleanup_interval,
            JobId::WebsocketPing => config.ws_heartbeat_interval,
        }
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the board knows of one job.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct JobInfo {
    pub id: JobId,
    pub interval_seconds: u64,
    pub paused: bool,
    pub running: bool,
    pub runs: u64,
    pub failures: u64,
    pub last_run: Option<DateTime<Utc>>,
    pub last_duration_ms: Option<f64>,
    pub last_outcome: Option<String>,
    pub last_error: Option<String>,
    pub next_run: Option<DateTime<Utc>>,
    #[serde(skip)]
    pub(super) scheduled: Option<Uuid>,
}

pub struct JobBoard {
    jobs: Mutex<BTreeMap<JobId, JobInfo>>,
    pub(super) scheduler: tokio::sync::Mutex<Option<JobScheduler>>,
    /// The jobs an emergency stop paused, resumed when it ends (not those paused by hand).
    stopped: Mutex<Vec<JobId>>,
}

impl JobBoard {
    pub fn new(config: &Config) -> JobBoard {
        let jobs = JobId::ALL
            .into_iter()
            .map(|id| {
                (
                    id,
                    JobInfo {
                        id,
                        interval_seconds: id.interval(config),
                        paused: false,
                        running: false,
                        runs: 0,
                        failures: 0,
                        last_run: None,
                        last_duration_ms: None,
                        last_outcome: None,
                        last_error: None,
                        next_run: None,
                        scheduled: None,
                    },
                )
            })
            .collect();
        JobBoard {
            jobs: Mutex::new(jobs),
            scheduler: tokio::sync::Mutex::new(None),
            stopped: Mutex::new(Vec::new()),
        }
    }

    pub(super) fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<JobId, JobInfo>) -> R) -> R {
        let mut guard = match self.jobs.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut guard)
    }

    /// Every job ([`JobId::ALL`]) in its documented order.
    pub fn list(&self) -> Vec<JobInfo> {
        self.with(|m| {
            JobId::ALL
                .iter()
                .filter_map(|id| m.get(id).cloned())
                .collect()
        })
    }

    pub fn get(&self, id: JobId) -> Option<JobInfo> {
        self.with(|m| m.get(&id).cloned())
    }

    pub fn is_paused(&self, id: JobId) -> bool {
        self.with(|m| m.get(&id).is_some_and(|j| j.paused))
    }

    /// Pauses or resumes one job by an operator's hand; `task_router` also stops or restarts
    /// immediate routing. The operator's word holds over an emergency stop's: a job paused or
    /// resumed by hand during the stop is not touched when the stop ends.
    pub fn set_paused(&self, state: &Core, id: JobId, paused: bool) -> Option<JobInfo> {
        let info = self.switch(state, id, paused)?;
        self.with_stopped(|s| s.retain(|j| *j != id));
        Some(info)
    }

    fn with_stopped<R>(&self, f: impl FnOnce(&mut Vec<JobId>) -> R) -> R {
        let mut guard = match self.stopped.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut guard)
    }

    /// Emergency stop: routing and dispatch halt and every running job is paused. Returns
    /// the jobs this call paused.
    pub fn emergency_stop(&self, state: &Core) -> Vec<JobId> {
        state.set_emergency_stop(true);
        let mut paused = Vec::new();
        for id in JobId::ALL {
            if !self.is_paused(id) && self.switch(state, id, true).is_some() {
                paused.push(id);
            }
        }
        self.with_stopped(|s| s.extend(paused.iter().copied()));
        paused
    }

    /// Ends an emergency stop: the jobs it paused run again. Returns them.
    pub fn end_emergency(&self, state: &Core) -> Vec<JobId> {
        // The flag goes first: resuming task_router starts a pass that checks it.
        state.set_emergency_stop(false);
        let resumed = self.with_stopped(std::mem::take);
        for &id in &resumed {
            self.switch(state, id, false);
        }
        resumed
    }

    fn switch(&self, state: &Core, id: JobId, paused: bool) -> Option<JobInfo> {
        let info = self.with(|m| {
            let j = m.get_mut(&id)?;
            j.paused = paused;
            if !paused {
                j.next_run =
                    Some(Utc::now() + chrono::Duration::seconds(j.interval_seconds as i64));
            } else {
                j.next_run = None;
            }
            Some(j.clone())
        })?;
        if id == JobId::TaskRouter {
            state.router.set_paused(paused);
        }
        Some(info)
    }

    /// Claims a run: false when the job is paused or its previous run is still going.
    pub(super) fn begin(&self, id: JobId) -> bool {
        self.with(|m| match m.get_mut(&id) {
            Some(j) if !j.paused && !j.running => {
                j.running = true;
                true
            }
            _ => false,
        })
    }

    pub(super) fn finish(&self, id: JobId, started: Instant, outcome: &Result<String, String>) {
        self.with(|m| {
            if let Some(j) = m.get_mut(&id) {
                j.running = false;
                j.runs += 1;
                j.last_run = Some(Utc::now());
                j.last_duration_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
                match outcome {
                    Ok(summary) => {
                        j.last_outcome = Some(format!("ok: {summary}"));
                        j.last_error = None;
                    }
                    Err(e) => {
                        j.failures += 1;
                        j.last_outcome = Some("error".into());
                        j.last_error = Some(e.clone());
                    }
                }
                j.next_run = (!j.paused)
                    .then(|| Utc::now() + chrono::Duration::seconds(j.interval_seconds as i64));
            }
        });
    }
}
