//! The Registry client: its connection status for `/dependencies` (the directory sync comes
//! with the mesh work).

use std::sync::Mutex;

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct RegistrySnapshot {
    /// `connected`, `disconnected` or `unconfigured`.
    pub status: &'static str,
    pub last_check: Option<String>,
    pub last_error: Option<String>,
    pub droplets_known: usize,
}

pub struct RegistryStatus {
    inner: Mutex<RegistrySnapshot>,
}

impl RegistryStatus {
    pub fn new(configured: bool) -> Self {
        RegistryStatus {
            inner: Mutex::new(RegistrySnapshot {
                status: if configured {
                    "disconnected"
                } else {
                    "unconfigured"
                },
                last_check: None,
                last_error: None,
                droplets_known: 0,
            }),
        }
    }

    pub fn snapshot(&self) -> RegistrySnapshot {
        match self.inner.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn update(&self, f: impl FnOnce(&mut RegistrySnapshot)) {
        if let Ok(mut s) = self.inner.lock() {
            f(&mut s);
        }
    }
}

/// One round of the `registry_sync` job.
pub async fn run_once(state: &crate::state::AppState) -> Result<usize, String> {
    if state.config().registry_url.is_none() {
        state.registry.update(|s| s.status = "unconfigured");
    }
    Ok(0)
}
