//! The scheduled jobs ([`JobId::ALL`]) on tokio-cron-scheduler. Each run is a thin call to a service's
//! `run_once`; the board records every run and lets operators pause and resume.

use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_cron_scheduler::{Job, JobScheduler};

use crate::services::analytics::rollups;
use crate::services::{health_monitor, registry_client, task_router};
use crate::state::AppState;

mod board;
pub use board::{JobBoard, JobId, JobInfo};

/// One run of a job, as the scheduler and tests call it.
pub async fn run_once(state: &AppState, id: JobId) -> Result<String, String> {
    let text = |e: sqlx::Error| e.to_string();
    match id {
        // The round also folds the tasks' rollup changes (the summary's windows read them).
        JobId::HealthMonitor => async {
            let r = health_monitor::run_once(&state.changes()).await?;
            let folded = rollups::fold(&state.db).await?;
            Ok::<_, sqlx::Error>(format!(
                "{} marked inactive, {} tasks recovered, {} rollup changes folded",
                r.marked_inactive.len(),
                r.tasks_recovered,
                folded.changes
            ))
        }
        .await
        .map_err(text),
        JobId::TaskRouter => task_router::run_once(&state.routing())
            .await
            .map(|r| {
                let m = r.maintenance;
                format!(
                    "{} assigned, {} retried, {} requeued after timeout, {} past deadline",
                    r.assigned, m.retried, m.assignments_timed_out, m.deadlines_failed
                )
            })
            .map_err(text),
        JobId::RegistrySync => registry_client::Registry::from(&state.core)
            .run_once()
            .await
            .map(|n| format!("{n} droplets synced")),
        JobId::HeartbeatCleanup => async {
            let beats = health_monitor::cleanup_old_heartbeats(&state.db, &state.config()).await?;
            let tasks = health_monitor::cleanup_old_tasks(&state.db, &state.config()).await?;
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

/// Adds a job to the scheduler every `every` seconds and records it on the board (its
/// next run, unless it is paused).
async fn add_job(
    state: &AppState,
    scheduler: &JobScheduler,
    id: JobId,
    every: u64,
) -> Result<(), String> {
    let uuid = scheduler
        .add(make_job(state, id, every)?)
        .await
        .map_err(|e| e.to_string())?;
    state.jobs.with(|m| {
        if let Some(j) = m.get_mut(&id) {
            j.scheduled = Some(uuid);
            j.interval_seconds = every;
            j.next_run = (!j.paused).then(|| Utc::now() + chrono::Duration::seconds(every as i64));
        }
    });
    Ok(())
}

/// Starts the scheduler with every job of [`JobId::ALL`].
pub async fn start(state: &AppState) -> Result<(), String> {
    let scheduler = JobScheduler::new().await.map_err(|e| e.to_string())?;
    let config = state.config();
    for id in JobId::ALL {
        let every = id.interval(&config);
        add_job(state, &scheduler, id, every).await?;
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
        add_job(state, scheduler, id, every).await?;
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
