//! The five scheduled jobs on tokio-cron-scheduler. Each run is a thin call to a service's
//! `run_once`; the board records every run and lets operators pause and resume.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_cron_scheduler::{Job, JobScheduler};
use uuid::Uuid;

use crate::config::Config;
use crate::services::{health_monitor, registry_client, task_router};
use crate::state::AppState;

/// A scheduled job. On the wire and in `/management/scheduler/jobs/{job_id}` paths, its
/// snake_case name (`task_router`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobId {
    HealthMonitor,
    TaskRouter,
    RegistrySync,
    HeartbeatCleanup,
    WebsocketPing,
}

impl JobId {
    /// The five jobs in their documented order.
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
    fn interval(self, config: &Config) -> u64 {
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
#[derive(Debug, Clone, Serialize)]
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
    scheduled: Option<Uuid>,
}

pub struct JobBoard {
    jobs: Mutex<BTreeMap<JobId, JobInfo>>,
    scheduler: tokio::sync::Mutex<Option<JobScheduler>>,
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

    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<JobId, JobInfo>) -> R) -> R {
        let mut guard = match self.jobs.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut guard)
    }

    /// The five jobs in their documented order.
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
    pub fn set_paused(&self, state: &AppState, id: JobId, paused: bool) -> Option<JobInfo> {
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
    pub fn emergency_stop(&self, state: &AppState) -> Vec<JobId> {
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
    pub fn end_emergency(&self, state: &AppState) -> Vec<JobId> {
        // The flag goes first: resuming task_router starts a pass that checks it.
        state.set_emergency_stop(false);
        let resumed = self.with_stopped(std::mem::take);
        for &id in &resumed {
            self.switch(state, id, false);
        }
        resumed
    }

    fn switch(&self, state: &AppState, id: JobId, paused: bool) -> Option<JobInfo> {
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
    fn begin(&self, id: JobId) -> bool {
        self.with(|m| match m.get_mut(&id) {
            Some(j) if !j.paused && !j.running => {
                j.running = true;
                true
            }
            _ => false,
        })
    }

    fn finish(&self, id: JobId, started: Instant, outcome: &Result<String, String>) {
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

/// One run of a job, as the scheduler and tests call it.
pub async fn run_once(state: &AppState, id: JobId) -> Result<String, String> {
    let text = |e: sqlx::Error| e.to_string();
    match id {
        JobId::HealthMonitor => health_monitor::run_once(state)
            .await
            .map(|r| {
                format!(
                    "{} marked inactive, {} tasks recovered",
                    r.marked_inactive.len(),
                    r.tasks_recovered
                )
            })
            .map_err(text),
        JobId::TaskRouter => task_router::run_once(state)
            .await
            .map(|r| {
                let m = r.maintenance;
                format!(
                    "{} assigned, {} retried, {} requeued after timeout, {} past deadline",
                    r.assigned, m.retried, m.assignments_timed_out, m.deadlines_failed
                )
            })
            .map_err(text),
        JobId::RegistrySync => registry_client::run_once(state)
            .await
            .map(|n| format!("{n} droplets synced")),
        JobId::HeartbeatCleanup => async {
            let beats = health_monitor::cleanup_old_heartbeats(state).await?;
            let tasks = health_monitor::cleanup_old_tasks(state).await?;
            Ok::<_, sqlx::Error>(format!(
                "{beats} heartbeats deleted, {tasks} finished tasks past their retention deleted"
            ))
        }
        .await
        .map_err(text),
        JobId::WebsocketPing => {
            let interval = state.config().ws_heartbeat_interval;
            Ok(format!(
                "{} clients pinged",
                state.events.ping_all(interval)
            ))
        }
    }
}

/// A scheduled tick: skipped when paused, stopped or still running; an error is logged and
/// the job runs again next time.
async fn tick(state: AppState, id: JobId) {
    if state.emergency_stopped() || state.shutdown.is_cancelled() || !state.jobs.begin(id) {
        return;
    }
    let started = Instant::now();
    let outcome = run_once(&state, id).await;
    let label = if outcome.is_ok() { "ok" } else { "error" };
    let name = id.as_str();
    state
        .metrics
        .job_runs
        .with_label_values(&[name, label])
        .inc();
    state
        .metrics
        .job_duration
        .with_label_values(&[name])
        .observe(started.elapsed().as_secs_f64());
    if let Err(e) = &outcome {
        tracing::warn!(job = name, error = %e, "job run failed; it runs again next interval");
    }
    state.jobs.finish(id, started, &outcome);
}

fn make_job(state: &AppState, id: JobId, every: u64) -> Result<Job, String> {
    let s = state.clone();
    Job::new_repeated_async(Duration::from_secs(every.max(1)), move |_uuid, _lock| {
        let s = s.clone();
        Box::pin(async move { tick(s, id).await })
    })
    .map_err(|e| e.to_string())
}

/// Starts the scheduler with the five jobs.
pub async fn start(state: &AppState) -> Result<(), String> {
    let scheduler = JobScheduler::new().await.map_err(|e| e.to_string())?;
    let config = state.config();
    for id in JobId::ALL {
        let every = id.interval(&config);
        let uuid = scheduler
            .add(make_job(state, id, every)?)
            .await
            .map_err(|e| e.to_string())?;
        state.jobs.with(|m| {
            if let Some(j) = m.get_mut(&id) {
                j.scheduled = Some(uuid);
                j.interval_seconds = every;
                j.next_run = Some(Utc::now() + chrono::Duration::seconds(every as i64));
            }
        });
    }
    scheduler.start().await.map_err(|e| e.to_string())?;
    *state.jobs.scheduler.lock().await = Some(scheduler);
    Ok(())
}

/// Applies new intervals live (reload-config): each changed job is rescheduled.
pub async fn reschedule(state: &AppState) -> Result<Vec<JobId>, String> {
    let config = state.config();
    let guard = state.jobs.scheduler.lock().await;
    let Some(scheduler) = guard.as_ref() else {
        return Ok(Vec::new());
    };
    let mut changed = Vec::new();
    for id in JobId::ALL {
        let every = id.interval(&config);
        let old = state
            .jobs
            .with(|m| m.get(&id).map(|j| (j.interval_seconds, j.scheduled)));
        let Some((current, uuid)) = old else {
            continue;
        };
        if current == every {
            continue;
        }
        // The old job goes first so the two never run side by side; a failure to add the
        // new one is reported and leaves the board saying the job is unscheduled.
        if let Some(uuid) = uuid {
            scheduler.remove(&uuid).await.map_err(|e| e.to_string())?;
        }
        let uuid = scheduler
            .add(make_job(state, id, every)?)
            .await
            .map_err(|e| e.to_string())?;
        state.jobs.with(|m| {
            if let Some(j) = m.get_mut(&id) {
                j.scheduled = Some(uuid);
                j.interval_seconds = every;
                j.next_run =
                    (!j.paused).then(|| Utc::now() + chrono::Duration::seconds(every as i64));
            }
        });
        changed.push(id);
    }
    Ok(changed)
}

/// Stops the scheduler (shutdown).
pub async fn stop(state: &AppState) {
    if let Some(mut scheduler) = state.jobs.scheduler.lock().await.take() {
        let _ = scheduler.shutdown().await;
    }
}
