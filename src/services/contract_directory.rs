//! The registered droplets' capabilities and contracts, kept in memory so that a creation
//! checks its payload without a query of its own (issue 26): loaded whole when the event
//! reader starts or comes back after a gap, kept current from the `droplet_registered`
//! events every replica reads (a registration on another replica is in force here within the
//! event delay; one on this replica at once), and reloaded after each Registry sync (the one
//! other writer of a registered droplet's capabilities, which runs on every replica).
//!
//! While it is not known (before the first load, while the event reader is cut off) the
//! creations read the droplets from the database instead, as they did before.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use chrono::NaiveDateTime;
use serde_json::Value;
use sqlx::PgPool;

use crate::protocol;
use crate::services::contracts::{Contract, Contracts, SchemaError};

/// What the directory keeps of one registered droplet.
#[derive(Debug, Clone, PartialEq)]
pub struct Listed {
    pub droplet_id: i32,
    /// The row's `updated_at`: an event older than what is kept changes nothing (a reload
    /// may read a row newer than events the reader has not applied yet).
    pub updated_at: Option<NaiveDateTime>,
    /// Whether it is registered (a droplet known only from the Registry has no say).
    pub registered: bool,
    pub capabilities: Vec<String>,
    /// Per capability, its schema (as stored).
    pub schemas: serde_json::Map<String, Value>,
}

impl Listed {
    /// The droplet of a `droplet_registered` event's payload (`payload.droplet`).
    pub fn from_event(droplet: &Value) -> Option<Listed> {
        let droplet_id = i32::try_from(droplet.get("droplet_id")?.as_i64()?).ok()?;
        Some(Listed {
            droplet_id,
            updated_at: droplet
                .get("updated_at")
                .and_then(Value::as_str)
                .and_then(protocol::parse_time)
                .map(|t| t.naive_utc()),
            registered: droplet
                .get("registered")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            capabilities: strings(droplet.get("capabilities")),
            schemas: match droplet.get("capability_schemas") {
                Some(Value::Object(m)) => m.clone(),
                _ => serde_json::Map::new(),
            },
        })
    }
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|c| c.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The registered droplets with one capability, as a creation needs them.
#[derive(Debug, Clone, Default)]
pub struct Capable {
    /// How many registered droplets have it (none: any payload is accepted).
    pub droplets: usize,
    /// Some droplet with it has no contract for it: any payload is accepted.
    pub open: bool,
    /// The distinct contracts (one per schema text), or why a stored schema is refused.
    pub contracts: Vec<Result<Contract, SchemaError>>,
}

impl Capable {
    /// Whether the payload is accepted without evaluating anything.
    pub fn accepts_any(&self) -> bool {
        self.droplets == 0 || self.open
    }
}

/// One state of the directory: the droplets, and by capability what a creation checks.
#[derive(Default)]
struct Snapshot {
    droplets: HashMap<i32, Listed>,
    by_capability: HashMap<String, Arc<Capable>>,
}

impl Snapshot {
    /// Indexes the droplets by capability, compiling each schema text once (the compiler's
    /// cache keeps the contracts; the same text gives the same one).
    fn build(droplets: HashMap<i32, Listed>, contracts: &Contracts) -> Snapshot {
        let mut by_capability: HashMap<String, Capable> = HashMap::new();
        let mut texts: HashMap<String, Result<Contract, SchemaError>> = HashMap::new();
        for d in droplets.values().filter(|d| d.registered) {
            for capability in &d.capabilities {
                let entry = by_capability.entry(capability.clone()).or_default();
                entry.droplets += 1;
                let Some(schema) = d.schemas.get(capability).filter(|s| !s.is_null()) else {
                    entry.open = true;
                    continue;
                };
                let text = schema.to_string();
                if texts.contains_key(&text) {
                    // Another droplet shares this text: its contract is listed already (or
                    // will be, for this capability, below).
                    if let Some(c) = texts.get(&text).cloned() {
                        if !entry.contracts.iter().any(|e| same(e, &c)) {
                            entry.contracts.push(c);
                        }
                    }
                    continue;
                }
                let compiled = contracts.compile(schema);
                texts.insert(text, compiled.clone());
                entry.contracts.push(compiled);
            }
        }
        Snapshot {
            droplets,
            by_capability: by_capability
                .into_iter()
                .map(|(k, v)| (k, Arc::new(v)))
                .collect(),
        }
    }
}

/// Two compiled contracts (or refusals) are the same one.
fn same(a: &Result<Contract, SchemaError>, b: &Result<Contract, SchemaError>) -> bool {
    match (a, b) {
        (Ok(a), Ok(b)) => Arc::ptr_eq(a, b),
        (Err(a), Err(b)) => a == b,
        _ => false,
    }
}

/// The directory: `None` while it is not known.
#[derive(Default)]
pub struct ContractDirectory {
    snapshot: RwLock<Option<Arc<Snapshot>>>,
}

impl ContractDirectory {
    pub fn new() -> ContractDirectory {
        ContractDirectory::default()
    }

    /// The registered droplets with `capability`, or `None` when the directory is not known
    /// (the caller reads the database).
    pub fn capable(&self, capability: &str) -> Option<Arc<Capable>> {
        let snapshot = self.current()?;
        Some(
            snapshot
                .by_capability
                .get(capability)
                .cloned()
                .unwrap_or_default(),
        )
    }

    /// Whether the directory is known (loaded, and its event reader connected).
    pub fn is_known(&self) -> bool {
        self.current().is_some()
    }

    /// Forgets the directory (its event reader lost the log): creations read the database
    /// until it is loaded again.
    pub fn forget(&self) {
        *self.write() = None;
    }

    /// Replaces the directory with every registered droplet. Compiles the schemas it has not
    /// seen: call it off the async workers, or through [`ContractDirectory::reload`].
    pub fn replace(&self, droplets: Vec<Listed>, contracts: &Contracts) {
        let droplets = droplets.into_iter().map(|d| (d.droplet_id, d)).collect();
        *self.write() = Some(Arc::new(Snapshot::build(droplets, contracts)));
    }

    /// Applies droplets as events or this replica's own registrations show them, in order;
    /// one not newer than the directory's (by `updated_at`) changes nothing: the event of a
    /// registration applied already, or one a reload read a later row than. Nothing while the directory is not
    /// known (the next load reads them). Compiles: off the async workers.
    pub fn apply(&self, changed: Vec<Listed>, contracts: &Contracts) {
        if changed.is_empty() {
            return;
        }
        let mut slot = self.write();
        let Some(current) = slot.as_ref() else {
            return;
        };
        let mut droplets = current.droplets.clone();
        let mut any = false;
        for d in changed {
            let newer = droplets
                .get(&d.droplet_id)
                .is_none_or(|kept| kept.updated_at < d.updated_at || d.updated_at.is_none());
            if newer && droplets.get(&d.droplet_id) != Some(&d) {
                droplets.insert(d.droplet_id, d);
                any = true;
            }
        }
        if any {
            *slot = Some(Arc::new(Snapshot::build(droplets, contracts)));
        }
    }

    /// Loads the directory whole from the database (off the async workers for the compiles).
    pub async fn reload(
        directory: &Arc<ContractDirectory>,
        db: &PgPool,
        contracts: &Arc<Contracts>,
    ) -> Result<(), sqlx::Error> {
        let droplets = load(db).await?;
        let (directory, contracts) = (directory.clone(), contracts.clone());
        let _ = tokio::task::spawn_blocking(move || directory.replace(droplets, &contracts)).await;
        Ok(())
    }

    /// [`ContractDirectory::apply`] off the async workers.
    pub async fn apply_off_workers(
        directory: &Arc<ContractDirectory>,
        changed: Vec<Listed>,
        contracts: &Arc<Contracts>,
    ) {
        if changed.is_empty() {
            return;
        }
        let (directory, contracts) = (directory.clone(), contracts.clone());
        let _ = tokio::task::spawn_blocking(move || directory.apply(changed, &contracts)).await;
    }

    fn current(&self) -> Option<Arc<Snapshot>> {
        match self.snapshot.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Option<Arc<Snapshot>>> {
        match self.snapshot.write() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }
}

/// Every registered droplet's capabilities and contracts.
async fn load(db: &PgPool) -> Result<Vec<Listed>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT droplet_id, updated_at, COALESCE(capabilities, '[]'::jsonb) AS "capabilities!",
                  capability_schemas
           FROM droplets WHERE registered"#
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Listed {
            droplet_id: r.droplet_id,
            updated_at: r.updated_at,
            registered: true,
            capabilities: strings(Some(&r.capabilities)),
            schemas: match r.capability_schemas {
                Some(Value::Object(m)) => m,
                _ => serde_json::Map::new(),
            },
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn contracts() -> Contracts {
        Contracts::new(
            prometheus::IntCounterVec::new(prometheus::Opts::new("e", "e"), &["site"])
                .expect("metric"),
        )
    }

    fn listed(id: i32, at: i64, caps: &[&str], schemas: Value) -> Listed {
        Listed {
            droplet_id: id,
            updated_at: chrono::DateTime::from_timestamp(at, 0).map(|t| t.naive_utc()),
            registered: true,
            capabilities: caps.iter().map(|c| c.to_string()).collect(),
            schemas: schemas.as_object().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn unknown_until_loaded_then_indexed_by_capability_one_contract_per_text() {
        let c = contracts();
        let d = ContractDirectory::new();
        assert!(d.capable("verify").is_none());
        let strict = json!({"verify": {"type": "object", "required": ["a"]}});
        d.replace(
            vec![
                listed(1, 10, &["verify"], strict.clone()),
                listed(2, 10, &["verify", "ocr"], strict),
                listed(3, 10, &["ocr"], json!({})),
            ],
            &c,
        );
        let verify = d.capable("verify").expect("known");
        assert_eq!((verify.droplets, verify.open), (2, false));
        assert_eq!(verify.contracts.len(), 1, "one text, one contract");
        let ocr = d.capable("ocr").expect("known");
        assert!(ocr.open && ocr.accepts_any());
        assert!(d.capable("none").expect("known").accepts_any());
    }

    #[test]
    fn a_newer_registration_replaces_the_contract_an_older_event_does_not() {
        let c = contracts();
        let d = ContractDirectory::new();
        d.replace(
            vec![listed(
                1,
                20,
                &["verify"],
                json!({"verify": {"type": "object"}}),
            )],
            &c,
        );
        // An event older than the row loaded changes nothing.
        d.apply(vec![listed(1, 10, &["verify"], json!({}))], &c);
        assert!(!d.capable("verify").expect("known").open);
        // A newer registration without the contract: it no longer validates.
        d.apply(vec![listed(1, 30, &["verify"], json!({}))], &c);
        assert!(d.capable("verify").expect("known").open);
        // A newer registration without the capability: nobody has it.
        d.apply(vec![listed(1, 40, &["ocr"], json!({}))], &c);
        assert_eq!(d.capable("verify").expect("known").droplets, 0);
        d.forget();
        assert!(d.capable("ocr").is_none());
        d.apply(vec![listed(2, 50, &["ocr"], json!({}))], &c);
        assert!(d.capable("ocr").is_none(), "nothing applied while unknown");
    }

    #[test]
    fn a_registered_event_reads_as_the_droplet_it_shows() {
        let e = json!({"droplet_id": 14, "updated_at": "2026-12-06T10:00:00.123456Z",
                       "registered": true, "capabilities": ["verify"],
                       "capability_schemas": {"verify": {"type": "object"}}});
        let l = Listed::from_event(&e).expect("a droplet");
        assert_eq!(l.droplet_id, 14);
        assert_eq!(l.capabilities, vec!["verify".to_string()]);
        assert!(l.schemas.contains_key("verify"));
        assert_eq!(
            l.updated_at.map(|t| t.and_utc().timestamp_subsec_micros()),
            Some(123_456)
        );
    }
}
