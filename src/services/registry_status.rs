//! What `/dependencies` reports of the Registry: the last sync and the public key's origin.

use std::sync::Mutex;

use serde::Serialize;

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RegistrySnapshot {
    /// `connected`, `disconnected` or `unconfigured`.
    pub status: &'static str,
    /// When the last sync was attempted.
    pub last_check: Option<String>,
    /// When a sync last succeeded.
    pub last_success: Option<String>,
    pub last_error: Option<String>,
    /// Droplets in the directory: the last fetch, else the cached table.
    pub droplets_known: usize,
    /// Entries of the last fetch left out (no usable id).
    pub entries_skipped: usize,
    /// `configured` (REGISTRY_PUBLIC_KEY), `fetched` (from the Registry) or `none`.
    pub public_key: &'static str,
    pub public_key_error: Option<String>,
}

pub struct RegistryStatus {
    inner: Mutex<RegistrySnapshot>,
    /// One sync at a time per process (the start-up sync and the job may overlap).
    pub(crate) sync: tokio::sync::Mutex<()>,
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
                last_success: None,
                last_error: None,
                droplets_known: 0,
                entries_skipped: 0,
                public_key: "none",
                public_key_error: None,
            }),
            sync: tokio::sync::Mutex::new(()),
        }
    }

    pub fn snapshot(&self) -> RegistrySnapshot {
        match self.inner.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn update(&self, f: impl FnOnce(&mut RegistrySnapshot)) {
        match self.inner.lock() {
            Ok(mut s) => f(&mut s),
            Err(p) => f(&mut p.into_inner()),
        }
    }
}
