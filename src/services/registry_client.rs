//! The Registry client: syncs the droplet directory from `REGISTRY_URL` into a cached table
//! and into `droplets`, fetches the Registry's public key, and keeps the status `/dependencies`
//! reports.

use std::collections::HashSet;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::protocol::now_iso;
use crate::services::contract_directory::ContractDirectory;
use crate::services::droplets::{MAX_CAPABILITIES, MAX_CAPABILITY_CHARS};
use crate::services::Core;

/// Largest directory (or key) body read from the Registry; more is treated as garbage.
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

pub use crate::services::registry_status::{RegistrySnapshot, RegistryStatus};

/// One droplet of the Registry's directory, as far as it could be read.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectoryEntry {
    pub droplet_id: i32,
    pub name: Option<String>,
    pub steward: Option<String>,
    /// Only a usable http(s) URL; anything else is left out.
    pub endpoint: Option<String>,
    pub capabilities: Option<Vec<String>>,
    pub raw: Value,
}

/// The directory's entries: a JSON array, `{"droplets": [...]}`, or a UDC envelope whose
/// payload is either. Entries without a usable id are counted as skipped.
pub fn parse_directory(body: &Value) -> Result<(Vec<DirectoryEntry>, usize), String> {
    fn list_of(body: &Value, depth: u8) -> Option<&Vec<Value>> {
        match body {
            Value::Array(a) => Some(a),
            Value::Object(m) => match m.get("droplets") {
                Some(Value::Array(a)) => Some(a),
                _ if depth == 0 => m.get("payload").and_then(|p| list_of(p, 1)),
                _ => None,
            },
            _ => None,
        }
    }
    let list = list_of(body, 0).ok_or_else(|| {
        "unexpected directory shape: expected a JSON array, {\"droplets\": [...]} or a UDC envelope around either".to_string()
    })?;
    let mut entries: Vec<DirectoryEntry> = Vec::with_capacity(list.len());
    let mut skipped = 0;
    for item in list {
        match item.as_object().and_then(entry_of) {
            Some(e) => entries.push(e),
            None => skipped += 1,
        }
    }
    // The same id twice: the later entry wins, where it stands (one row per droplet).
    let mut seen = HashSet::new();
    entries.reverse();
    entries.retain(|e| seen.insert(e.droplet_id));
    entries.reverse();
    Ok((entries, skipped))
}

fn id_of(value: &Value) -> Option<i32> {
    let n = match value {
        Value::Number(n) => n.as_i64()?,
        Value::String(s) => s.trim().trim_start_matches("droplet-").parse().ok()?,
        _ => return None,
    };
    i32::try_from(n).ok().filter(|n| *n >= 1)
}

fn text(m: &Map<String, Value>, key: &str, max: usize) -> Option<String> {
    let s = m.get(key)?.as_str()?.trim();
    (!s.is_empty()).then(|| s.chars().take(max).collect())
}

fn entry_of(m: &Map<String, Value>) -> Option<DirectoryEntry> {
    let droplet_id = m
        .get("droplet_id")
        .and_then(id_of)
        .or_else(|| m.get("id").and_then(id_of))?;
    let endpoint = text(m, "endpoint", 1000)
        .or_else(|| text(m, "url", 1000))
        .filter(|e| {
            e.chars().count() <= 255
                && url::Url::parse(e).is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
        });
    let capabilities = m
        .get("capabilities")
        .and_then(Value::as_array)
        .map(|a| capabilities_of(a));
    Some(DirectoryEntry {
        droplet_id,
        name: text(m, "name", 100),
        steward: text(m, "steward", 100),
        endpoint,
        capabilities,
        raw: Value::Object(m.clone()),
    })
}

/// A directory entry's capabilities under the bounds a registration has: each once, in the
/// order listed, at most [`MAX_CAPABILITIES`] of them; names that are empty or longer than
/// [`MAX_CAPABILITY_CHARS`] are left out. A directory listing thousands costs no more than
/// reading up to the limit.
fn capabilities_of(listed: &[Value]) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut caps = Vec::new();
    for c in listed {
        if caps.len() == MAX_CAPABILITIES {
            break;
        }
        // A capability is a name, or an object that has one.
        let name = c
            .as_str()
            .or_else(|| c.get("name").and_then(Value::as_str))
            .map(str::trim)
            .filter(|n| !n.is_empty() && n.chars().count() <= MAX_CAPABILITY_CHARS);
        if let Some(n) = name {
            if seen.insert(n) {
                caps.push(n.to_string());
            }
        }
    }
    caps
}

/// The PEM inside a public-key answer: PEM text, or `{"public_key": PEM}` (maybe enveloped).
pub fn parse_public_key(body: &str) -> Option<String> {
    let from_json = serde_json::from_str::<Value>(body).ok().and_then(|v| {
        let key = |v: &Value| {
            v.get("public_key")
                .or_else(|| v.get("key"))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        key(&v).or_else(|| v.get("payload").and_then(key))
    });
    let pem = from_json.unwrap_or_else(|| body.to_string());
    let pem = pem.replace("\\n", "\n");
    pem.contains("-----BEGIN").then(|| pem.trim().to_string())
}

/// How long one request to the Registry may take: short, so a slow Registry never holds a job.
fn timeout(state: &Core) -> Duration {
    Duration::from_secs(state.config().dispatch_timeout_seconds.clamp(1, 5))
}

/// GETs a URL with this client; the body, or why not (status, timeout, too big).
async fn fetch(state: &Core, client: &reqwest::Client, url: &str) -> Result<(u16, String), String> {
    let mut request = client.get(url).timeout(timeout(state));
    if let Ok(token) = state.keys.orchestrator_token() {
        request = request.bearer_auth(token);
    }
    let mut response = request.send().await.map_err(|e| {
        if e.is_timeout() {
            format!("GET {url}: timed out after {} s", timeout(state).as_secs())
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
                    timeout(state).as_secs()
                ))
            }
            Err(e) => return Err(format!("GET {url}: {e}")),
        }
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Fetches and parses the directory: `{url}/droplets`, or `{url}` itself when that is a 404.
async fn fetch_directory(state: &Core, base: &str) -> Result<(Vec<DirectoryEntry>, usize), String> {
    let mut url = format!("{base}/droplets");
    let (mut status, mut body) = fetch(state, &state.http, &url).await?;
    if status == 404 {
        url = base.to_string();
        (status, body) = fetch(state, &state.http, &url).await?;
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
async fn fetch_public_key(state: &Core, base: &str) {
    let config = state.config();
    if config.registry_public_key.is_some() {
        state.registry.update(|s| s.public_key = "configured");
        return;
    }
    if !config.registry_fetch_public_key {
        state.registry.update(|s| {
            s.public_key_error = Some(
                "no REGISTRY_PUBLIC_KEY; fetching it is off (REGISTRY_FETCH_PUBLIC_KEY=false)"
                    .into(),
            )
        });
        return;
    }
    if !base.starts_with("https://") {
        state.registry.update(|s| {
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
        match fetch(state, &state.registry_key_http, &url).await {
            Ok((200..=299, body)) => match parse_public_key(&body) {
                Some(pem) => match state.keys.set_registry_key(pem.as_bytes()) {
                    Ok(_) => {
                        state.registry.update(|s| {
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
    state.registry.update(|s| s.public_key_error = problem);
}

async fn cached_count(state: &Core) -> Option<usize> {
    sqlx::query_scalar!(r#"SELECT COUNT(*) AS "n!" FROM registry_directory"#)
        .fetch_one(&state.db)
        .await
        .ok()
        .map(|n| n as usize)
}

/// What one sync changed in `droplets`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SyncChanges {
    pub inserted: u64,
    pub updated: u64,
}

/// Writes the directory to the cache (replacing it) and fills in or refreshes `droplets`,
/// in one transaction. Never touches a droplet's status.
pub async fn apply_directory(
    state: &Core,
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
    let me = state.config().droplet_id;

    let mut tx = state.db.begin().await?;
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
    if state.directory.is_known() {
        if let Err(e) =
            ContractDirectory::reload(&state.directory, &state.db, &state.contracts).await
        {
            // The event reader loads it again; creations read the database meanwhile.
            tracing::warn!(error = %e, "contract directory not reloaded after the sync");
            state.directory.forget();
        }
    }
    Ok(SyncChanges { inserted, updated })
}

/// One round of the `registry_sync` job: how many directory entries were synced. A Registry
/// that is down, slow or answers garbage changes nothing; the error is the job's outcome and
/// the status says `disconnected` with it.
pub async fn run_once(state: &Core) -> Result<usize, String> {
    let _one_at_a_time = state.registry.sync.lock().await;
    let Some(base) = state.config().registry_url.clone() else {
        let known = cached_count(state).await;
        state.registry.update(|s| {
            s.status = "unconfigured";
            s.last_error = None;
            if let Some(n) = known {
                s.droplets_known = n;
            }
        });
        return Ok(0);
    };
    let base = base.trim_end_matches('/').to_string();
    refresh_token(state, &base).await;
    let fetched = fetch_directory(state, &base).await;
    let outcome = match fetched {
        Ok((entries, skipped)) => match apply_directory(state, &entries).await {
            Ok(changes) => Ok((entries.len(), skipped, changes)),
            Err(e) => Err(format!("cannot cache the directory: {e}")),
        },
        Err(e) => Err(e),
    };
    let now = now_iso();
    match outcome {
        Ok((count, skipped, changes)) => {
            state.registry.update(|s| {
                s.status = "connected";
                s.last_check = Some(now.clone());
                s.last_success = Some(now);
                s.last_error = None;
                s.droplets_known = count;
                s.entries_skipped = skipped;
            });
            if changes.updated > 0 {
                // New endpoints or capabilities may let pending work go somewhere.
                state.router.trigger();
            }
            fetch_public_key(state, &base).await;
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
            let known = cached_count(state).await;
            state.registry.update(|s| {
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
pub async fn refresh_token(state: &Core, base: &str) {
    let config = state.config();
    let Some(key) = config.registry_key.clone() else {
        return;
    };
    if state
        .keys
        .registry_token_remaining()
        .is_some_and(|left| left > 600)
    {
        return;
    }
    let url = format!("{base}/auth/token");
    let sent = state
        .http
        .post(&url)
        .query(&[("droplet_id", config.droplet_id)])
        .header("X-Registry-Key", key.expose())
        .timeout(timeout(state))
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
        state.keys.set_registry_token(token);
        tracing::info!("holding a Registry-issued token for deliveries");
    }
}

/// At start-up: what the cache knows counts at once, then a first sync (not waiting a whole
/// `REGISTRY_SYNC_INTERVAL`).
pub async fn run_at_startup(state: Core) {
    if let Some(n) = cached_count(&state).await {
        state.registry.update(|s| s.droplets_known = n);
    }
    if let Err(e) = run_once(&state).await {
        tracing::warn!(error = %e, "registry sync at start-up failed; using the cached directory");
    }
}

/// Empties the cached directory (`/management/cache/clear`); droplets stay as they are.
pub async fn clear_cache(state: &Core) -> Result<u64, sqlx::Error> {
    let n = sqlx::query!("DELETE FROM registry_directory")
        .execute(&state.db)
        .await?
        .rows_affected();
    state.registry.update(|s| s.droplets_known = 0);
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_accepted_shape_gives_the_same_entries() {
        let list = json!([
            {"id": 8, "name": "Verifier", "steward": "A", "endpoint": "http://v:1", "capabilities": ["verify"]},
            {"droplet_id": "droplet-9", "name": "Other", "url": "https://o", "capabilities": [{"name": "x"}]}
        ]);
        let shapes = [
            list.clone(),
            json!({"droplets": list}),
            json!({"trace_id": "t", "payload": list}),
            json!({"trace_id": "t", "payload": {"droplets": list}}),
        ];
        for shape in shapes {
            let (entries, skipped) = parse_directory(&shape).unwrap();
            assert_eq!(skipped, 0);
            assert_eq!(
                entries.iter().map(|e| e.droplet_id).collect::<Vec<_>>(),
                [8, 9]
            );
            assert_eq!(entries[1].endpoint.as_deref(), Some("https://o"));
            assert_eq!(entries[1].capabilities, Some(vec!["x".to_string()]));
        }
    }

    #[test]
    fn capabilities_are_bounded_and_each_kept_once_in_order() {
        let long = "c".repeat(MAX_CAPABILITY_CHARS + 1);
        let mut listed = vec![
            json!("b"),
            json!(long),
            json!({"name": "a"}),
            json!(""),
            json!("b"),
            json!(" a "),
            json!(5),
        ];
        listed.extend((0..80_000).map(|i| json!(format!("cap-{i}"))));
        let (entries, _) = parse_directory(&json!([{"id": 8, "capabilities": listed}])).unwrap();
        let caps = entries[0].capabilities.clone().unwrap();
        assert_eq!(caps.len(), MAX_CAPABILITIES);
        assert_eq!(caps[..4], ["b", "a", "cap-0", "cap-1"]);
        assert_eq!(caps.last().map(String::as_str), Some("cap-97"));
        assert!(caps
            .iter()
            .all(|c| c.chars().count() <= MAX_CAPABILITY_CHARS));
        let exactly = "d".repeat(MAX_CAPABILITY_CHARS);
        let (entries, _) =
            parse_directory(&json!([{"id": 8, "capabilities": [exactly, "d"]}])).unwrap();
        assert_eq!(entries[0].capabilities.as_ref().map(Vec::len), Some(2));
    }

    #[test]
    fn the_later_of_two_entries_for_one_id_wins_where_it_stands() {
        let (entries, _) = parse_directory(&json!([
            {"id": 8, "name": "first"}, {"id": 9}, {"id": 8, "name": "later"}, {"id": 7}
        ]))
        .unwrap();
        let ids: Vec<i32> = entries.iter().map(|e| e.droplet_id).collect();
        assert_eq!(ids, [9, 8, 7]);
        assert_eq!(entries[1].name.as_deref(), Some("later"));
    }

    #[test]
    fn garbage_shapes_and_entries_are_refused_or_skipped() {
        assert!(parse_directory(&json!({"items": []})).is_err());
        assert!(parse_directory(&json!("droplets")).is_err());
        let (entries, skipped) = parse_directory(&json!([
            {"name": "no id"}, 5, {"id": -3}, {"id": 4, "endpoint": "ftp://x"}
        ]))
        .unwrap();
        assert_eq!(skipped, 3);
        assert_eq!(entries[0].droplet_id, 4);
        assert_eq!(entries[0].endpoint, None);
    }

    #[test]
    fn public_keys_come_as_pem_or_json() {
        let pem = "-----BEGIN PUBLIC KEY-----\nabc\n-----END PUBLIC KEY-----";
        assert_eq!(parse_public_key(pem).as_deref(), Some(pem));
        assert_eq!(
            parse_public_key(&json!({"public_key": pem}).to_string()).as_deref(),
            Some(pem)
        );
        assert_eq!(parse_public_key("{\"public_key\": 5}"), None);
        assert_eq!(parse_public_key("<html>"), None);
    }
}
