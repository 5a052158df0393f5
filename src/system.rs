//! This process's CPU, memory and threads for `/state`, sampled off the runtime's threads.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ProcessSample {
    pub cpu_percent: f32,
    pub memory_mb: f64,
    pub num_threads: usize,
}

/// The latest sample; `refresh` runs on a blocking thread so no request ever waits on /proc.
pub struct ProcessStats {
    latest: Mutex<ProcessSample>,
    system: Mutex<System>,
}

impl ProcessStats {
    pub fn new() -> Self {
        ProcessStats {
            latest: Mutex::new(ProcessSample::default()),
            system: Mutex::new(System::new()),
        }
    }

    pub fn latest(&self) -> ProcessSample {
        self.latest.lock().map(|s| *s).unwrap_or_default()
    }

    fn sample(&self) -> ProcessSample {
        let pid = Pid::from_u32(std::process::id());
        let Ok(mut system) = self.system.lock() else {
            return ProcessSample::default();
        };
        system.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[pid]),
            true,
            ProcessRefreshKind::nothing().with_cpu().with_memory(),
        );
        let Some(process) = system.process(pid) else {
            return ProcessSample::default();
        };
        ProcessSample {
            cpu_percent: process.cpu_usage(),
            memory_mb: process.memory() as f64 / (1024.0 * 1024.0),
            num_threads: thread_count(),
        }
    }
}

impl Default for ProcessStats {
    fn default() -> Self {
        Self::new()
    }
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Samples every few seconds until `stop` is cancelled.
pub async fn run_sampler(stats: Arc<ProcessStats>, stop: tokio_util::sync::CancellationToken) {
    loop {
        let s = stats.clone();
        if let Ok(sample) = tokio::task::spawn_blocking(move || s.sample()).await {
            if let Ok(mut latest) = stats.latest.lock() {
                *latest = sample;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
