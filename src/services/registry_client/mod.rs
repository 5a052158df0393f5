//! The Registry client: syncs the droplet directory from `REGISTRY_URL` into a cached table
//! and into `droplets`, fetches the Registry's public key, and keeps the status `/dependencies`
//! reports.

mod directory;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::identity::Keys;
use crate::protocol::now_iso;
use crate::services::contract_directory::ContractDirectory;
use crate::services::contracts::Contracts;
use crate::services::core::Settings;
use crate::services::router_trigger::RouterTrigger;
use crate::services::Core;

pub use directory::{parse_directory, parse_public_key, DirectoryEntry};

/// Largest directory (or key) body read from the Registry; more is treated as garbage.
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

pub use crate::services::registry_status::{RegistrySnapshot, RegistryStatus};

/// What the Registry client uses of the services' shared parts, and nothing else: the pool
/// (the cached directory, `droplets`), the settings, the keys (its bearer, the Registry's
/// public key), the status `/dependencies` reports, its two HTTP clients and the router's
/// trigger (new endpoints may let pending work go somewhere), and the contract directory it
/// reloads after a sync.
#[derive(Clone, Copy)]
pub struct Registry<'a> {
    db: &'a PgPool,
    settings: &'a Settings,
    keys: &'a Keys,
    status: &'a RegistryStatus,
    http: &'a reqwest::Client,
    key_http: &'a reqwest::Client,
    router: &'a RouterTrigger,
    directory: &'a Arc<ContractDirectory>,
    contracts: &'a Arc<Contracts>,
}

impl<'a> From<&'a Core> for Registry<'a> {
    fn from(core: &'a Core) -> Registry<'a> {
        Registry {
            db: &core.db,
            settings: &core.settings,
            keys: &core.keys,
            status: &core.registry,
            http: &core.http,
            key_http: &core.registry_key_http,
            router: &core.router,
            directory: &core.directory,
            contracts: &core.contracts,
        }
    }
}

/// What one sync changed in `droplets`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SyncChanges {
    pub inserted: u64,
    pub updated: u64,
}

impl Registry<'_> {
    /// How long one request to the Registry may take: short, so a slow Registry never holds a job.
    fn timeout(self) -> Duration {
        Duration::from_secs(self.settings.current().dispatch_timeout_seconds.clamp(1, 5))
    }

    /// GETs a URL with this client; the body, or why not (status, timeout, too big).
    async fn fetch(self, client: &reqwest::Client, url: &str) -> Result<(u16, String), String> {
        let mut request = client.get(url).timeout(self.timeout());
        if let Ok(token) = self.keys.orchestrator_token() {
            request = request.bearer_auth(token);
        }
        let mut response = request.send().await.map_err(|e| {
            if e.is_timeout() {
                format!("GET {url}: timed out after {} s", self.timeout().as_secs())
            } else if e.is_connect() {
                format!("GET {url}: connection refused or unreachable")
            } else {
                format!("GET {url}: {e}")
            }
        })?;
        let status = response.status().as_u16();
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_BODY_BYTES {
                        return Err(format!(
                            "GET {url}: answer larger than {MAX_BODY_BYTES} bytes"
                        ));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) if e.is_timeout() => {
                    return Err(format!(
                        "GET {url}: timed out after {} s",
                        self.timeout().as_secs()
                    ))
                }
                Err(e) => return Err(format!("GET {url}: {e}")),
            }
        }
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// Fetches and parses the directory: `{url}/droplets`, or `{url}` itself when that is a 404.
    async fn fetch_directory(self, base: &str) -> Result<(Vec<DirectoryEntry>, usize), String> {
        let mut url = format!("{base}/droplets");
        let (mut status, mut body) = self.fetch(self.http, &url).await?;
        if status == 404 {
            url = base.to_string();
            (status, body) = self.fetch(self.http, &url).await?;
        }
        if !(200..300).contains(&status) {
            return Err(format!("GET {url}: HTTP {status}"));
        }
        let value: Value = serde_json::from_str(&body)
            .map_err(|e| format!("GET {url}: the answer is not JSON ({e})"))?;
        parse_directory(&value).map_err(|e| format!("GET {url}: {e}"))
    }

    /// Installs the Registry's public key when none is configured; the outcome goes to the status.
    /// The key is never trusted on first use from whatever answers `REGISTRY_URL`: only with
    /// `REGISTRY_FETCH_PUBLIC_KEY=true` and over https.
    async fn fetch_public_key(self, base: &str) {
        let config = self.settings.current();
        if config.registry_public_key.is_some() {
            self.status.update(|s| s.public_key = "configured");
            return;
        }
        if !config.registry_fetch_public_key {
            self.status.update(|s| {
                s.public_key_error = Some(
                    "no REGISTRY_PUBLIC_KEY; fetching it is off (REGISTRY_FETCH_PUBLIC_KEY=false)"
                        .into(),
                )
            });
            return;
        }
        if !base.starts_with("https://") {
            self.status.update(|s| {
                s.public_key_error = Some(
                    "REGISTRY_FETCH_PUBLIC_KEY needs an https REGISTRY_URL; key not fetched".into(),
                )
            });
            return;
        }
        let mut problem = None;
        for path in [
            "/public-key",
            "/.well-known/public-key",
            "/.well-known/jwks.json",
        ] {
            let url = format!("{base}{path}");
            // Its own client: https only and no redirects, whatever the shared one does.
            match self.fetch(self.key_http, &url).await {
                Ok((200..=299, body)) => match parse_public_key(&body) {
                    Some(pem) => match self.keys.set_registry_key(pem.as_bytes()) {
                        Ok(_) => {
                            self.status.update(|s| {
                                s.public_key = "fetched";
                                s.public_key_error = None;
                            });
                            return;
                        }
                        Err(e) => problem = Some(format!("GET {url}: not an RSA public key: {e}")),
                    },
                    None => problem = Some(format!("GET {url}: no PEM public key in the answer")),
                },
                Ok((status, _)) => {
                    problem.get_or_insert(format!("GET {url}: HTTP {status}"));
                }
                Err(e) => problem = Some(e),
            }
        }
        // A key fetched before stays installed; the status says what went wrong this time.
        self.status.update(|s| s.public_key_error = problem);
    }

    async fn cached_count(self) -> Option<usize> {
        sqlx::query_scalar!(r#"SELECT COUNT(*) AS "n!" FROM registry_directory"#)
            .fetch_one(self.db)
            .await
            .ok()
            .map(|n| n as usize)
    }

    /// Writes the directory to the cache (replacing it) and fills in or refreshes `droplets`,
    /// in one transaction. Never touches a droplet's status.
    pub async fn apply_directory(
        self,
        entries: &[DirectoryEntry],
    ) -> Result<SyncChanges, sqlx::Error> {
        let ids: Vec<i32> = entries.iter().map(|e| e.droplet_id).collect();
        let names: Vec<Option<String>> = entries.iter().map(|e| e.name.clone()).collect();
        let stewards: Vec<Option<String>> = entries.iter().map(|e| e.steward.clone()).collect();
        let endpoints: Vec<Option<String>> = entries.iter().map(|e| e.endpoint.clone()).collect();
        let caps: Vec<Option<Value>> = entries
            .iter()
            .map(|e| e.capabilities.as_ref().map(|c| json!(c)))
            .collect();
        let raws: Vec<Value> = entries.iter().map(|e| e.raw.clone()).collect();
        let me = self.settings.current().droplet_id;

        let mut tx = self.db.begin().await?;
        sqlx::query!(
            "INSERT INTO registry_directory (droplet_id, name, steward, endpoint, capabilities, raw, fetched_at)
         SELECT e.id, e.name, e.steward, e.endpoint, COALESCE(e.caps, '[]'::jsonb), e.raw, NOW()
         FROM unnest($1::int[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::jsonb[])
              AS e(id, name, steward, endpoint, caps, raw)
         ON CONFLICT (droplet_id) DO UPDATE SET
             name = EXCLUDED.name, steward = EXCLUDED.steward, endpoint = EXCLUDED.endpoint,
             capabilities = EXCLUDED.capabilities, raw = EXCLUDED.raw, fetched_at = NOW()",
            &ids,
            &names as &[Option<String>],
            &stewards as &[Option<String>],
            &endpoints as &[Option<String>],
            &caps as &[Option<Value>],
            &raws,
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query!(
            "DELETE FROM registry_directory WHERE NOT (droplet_id = ANY($1))",
            &ids
        )
        .execute(&mut *tx)
        .await?;

        // Present fields refresh the droplet; an empty capability list never wipes a non-empty
        // one (a directory that does not track capabilities must not stop routing). The
        // orchestrator's own entry is cached but never becomes a droplet to route to.
        let updated = sqlx::query!(
            "WITH e AS (
            SELECT * FROM unnest($1::int[], $2::text[], $3::text[], $4::text[], $5::jsonb[])
                AS e(id, name, steward, endpoint, caps)
            WHERE e.id <> $6
         ), n AS (
            SELECT d.id, COALESCE(e.name, d.name) AS name, COALESCE(e.steward, d.steward) AS steward,
                   COALESCE(e.endpoint, d.endpoint) AS endpoint,
                   CASE WHEN e.caps IS NULL
                          OR (e.caps = '[]'::jsonb AND COALESCE(d.capabilities, '[]'::jsonb) <> '[]'::jsonb)
                        THEN d.capabilities ELSE e.caps END AS capabilities
            FROM droplets d JOIN e ON e.id = d.droplet_id
         )
         UPDATE droplets d SET name = n.name, steward = n.steward, endpoint = n.endpoint,
                capabilities = n.capabilities, updated_at = NOW()
         FROM n
         WHERE d.id = n.id
           AND (d.name, d.steward, d.endpoint, d.capabilities)
               IS DISTINCT FROM (n.name, n.steward, n.endpoint, n.capabilities)",
            &ids,
            &names as &[Option<String>],
            &stewards as &[Option<String>],
            &endpoints as &[Option<String>],
            &caps as &[Option<Value>],
            me,
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();

        // Known only from the Registry: inactive and unregistered until it registers or
        // heartbeats itself. Without an endpoint there is nothing to list.
        let inserted = sqlx::query!(
            "INSERT INTO droplets (droplet_id, name, steward, endpoint, capabilities, status,
                               last_heartbeat, registered)
         SELECT e.id, COALESCE(e.name, 'droplet-' || e.id), e.steward, e.endpoint,
                COALESCE(e.caps, '[]'::jsonb), 'inactive', NULL, FALSE
         FROM unnest($1::int[], $2::text[], $3::text[], $4::text[], $5::jsonb[])
              AS e(id, name, steward, endpoint, caps)
         WHERE e.endpoint IS NOT NULL AND e.id <> $6
         ON CONFLICT (droplet_id) DO NOTHING",
            &ids,
            &names as &[Option<String>],
            &stewards as &[Option<String>],
            &endpoints as &[Option<String>],
            &caps as &[Option<Value>],
            me,
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        // The Registry may change a registered droplet's capabilities, with no event: every
        // replica runs this sync and reloads its contract directory after it (the first to
        // sync changed the rows; the others find nothing to change but read what it wrote).
        if self.directory.is_known() {
            if let Err(e) = ContractDirectory::reload(self.directory, self.db, self.contracts).await
            {
                // The event reader loads it again; creations read the database meanwhile.
                tracing::warn!(error = %e, "contract directory not reloaded after the sync");
                self.directory.forget();
            }
        }
        Ok(SyncChanges { inserted, updated })
    }

    /// One round of the `registry_sync` job: how many directory entries were synced. A Registry
    /// that is down, slow or answers garbage changes nothing; the error is the job's outcome and
    /// the status says `disconnected` with it.
    pub async fn run_once(self) -> Result<usize, String> {
        let _one_at_a_time = self.status.sync.lock().await;
        let Some(base) = self.settings.current().registry_url.clone() else {
            let known = self.cached_count().await;
            self.status.update(|s| {
                s.status = "unconfigured";
                s.last_error = None;
                if let Some(n) = known {
                    s.droplets_known = n;
                }
            });
            return Ok(0);
        };
        let base = base.trim_end_matches('/').to_string();
        self.refresh_token(&base).await;
        let fetched = self.fetch_directory(&base).await;
        let outcome = match fetched {
            Ok((entries, skipped)) => match self.apply_directory(&entries).await {
                Ok(changes) => Ok((entries.len(), skipped, changes)),
                Err(e) => Err(format!("cannot cache the directory: {e}")),
            },
            Err(e) => Err(e),
        };
        let now = now_iso();
        match outcome {
            Ok((count, skipped, changes)) => {
                self.status.update(|s| {
                    s.status = "connected";
                    s.last_check = Some(now.clone());
                    s.last_success = Some(now);
                    s.last_error = None;
                    s.droplets_known = count;
                    s.entries_skipped = skipped;
                });
                if changes.updated > 0 {
                    // New endpoints or capabilities may let pending work go somewhere.
                    self.router.trigger();
                }
                self.fetch_public_key(&base).await;
                tracing::debug!(
                    count,
                    skipped,
                    inserted = changes.inserted,
                    updated = changes.updated,
                    "registry directory synced"
                );
                Ok(count)
            }
            Err(e) => {
                let known = self.cached_count().await;
                self.status.update(|s| {
                    s.status = "disconnected";
                    s.last_check = Some(now);
                    s.last_error = Some(e.clone());
                    if let Some(n) = known {
                        s.droplets_known = n;
                    }
                });
                Err(e)
            }
        }
    }

    /// Fetches a token for the orchestrator from the Registry (`POST {url}/auth/token?droplet_id=10`
    /// with `X-Registry-Key: REGISTRY_KEY`, as the mesh's droplets get theirs) when a key is
    /// configured and the token held expires within ten minutes. Deliveries then carry it as
    /// their bearer and their envelope's `signature`.
    pub async fn refresh_token(self, base: &str) {
        let config = self.settings.current();
        let Some(key) = config.registry_key.clone() else {
            return;
        };
        if self
            .keys
            .registry_token_remaining()
            .is_some_and(|left| left > 600)
        {
            return;
        }
        let url = format!("{base}/auth/token");
        let sent = self
            .http
            .post(&url)
            .query(&[("droplet_id", config.droplet_id)])
            .header("X-Registry-Key", key.expose())
            .timeout(self.timeout())
            .send()
            .await;
        let answer = match sent {
            Ok(r) if r.status().is_success() => r.json::<Value>().await.ok(),
            Ok(r) => {
                tracing::warn!(
                    status = r.status().as_u16(),
                    "the Registry refused the orchestrator a token"
                );
                None
            }
            Err(_) => {
                tracing::warn!("cannot reach the Registry for the orchestrator's token");
                None
            }
        };
        let token = answer.as_ref().and_then(|v| {
            v.get("token")
                .or_else(|| v.get("access_token"))
                .or_else(|| v.get("payload").and_then(|p| p.get("token")))
                .and_then(Value::as_str)
                .map(str::to_string)
        });
        if let Some(token) = token {
            self.keys.set_registry_token(token);
            tracing::info!("holding a Registry-issued token for deliveries");
        }
    }

    /// Empties the cached directory (`/management/cache/clear`); droplets stay as they are.
    pub async fn clear_cache(self) -> Result<u64, sqlx::Error> {
        let n = sqlx::query!("DELETE FROM registry_directory")
            .execute(self.db)
            .await?
            .rows_affected();
        self.status.update(|s| s.droplets_known = 0);
        Ok(n)
    }
}

/// At start-up: what the cache knows counts at once, then a first sync (not waiting a whole
/// `REGISTRY_SYNC_INTERVAL`).
pub async fn run_at_startup(registry: Registry<'_>) {
    if let Some(n) = registry.cached_count().await {
        registry.status.update(|s| s.droplets_known = n);
    }
    if let Err(e) = registry.run_once().await {
        tracing::warn!(error = %e, "registry sync at start-up failed; using the cached directory");
    }
}
