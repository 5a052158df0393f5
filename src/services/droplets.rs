//! Droplets: registration (an upsert), listing, details with load, and an admin's
//! activation and deactivation. Heartbeats are in `heartbeats.rs`.

use crate::services::events::RelayWake;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::identity::{Keys, Principal};
use crate::services::contract_directory::{ContractDirectory, Listed};
use crate::services::contracts::Contracts;
use crate::services::dispatch::Dispatcher;
use crate::services::droplet_row::{droplet_of, droplet_query, droplet_record};
use crate::services::endpoints::EndpointPolicy;
use crate::services::error::{Error, Result};
use crate::services::events::{self, DropletEventKind, Event};
use crate::services::router_trigger::RouterTrigger;
use crate::services::status::DropletStatus;
use crate::services::Core;
use crate::validation::FieldError;
use crate::validation::Validate;

pub use crate::services::droplet_row::Droplet;
pub use crate::services::heartbeat_queue::{Beat, BeatRow, Beaten};

fn id_from_any<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(i64),
        Str(String),
    }
    Ok(match Option::<Raw>::deserialize(d)? {
        None => None,
        Some(Raw::Int(n)) => Some(n),
        Some(Raw::Str(s)) => Some(s.trim_start_matches("droplet-").parse().map_err(|_| {
            serde::de::Error::custom(format!("Input should be a valid integer, got {s:?}"))
        })?),
    })
}

/// Most capabilities one droplet may declare (each up to [`MAX_CAPABILITY_CHARS`]).
pub const MAX_CAPABILITIES: usize = 100;
/// Longest capability name, in characters.
pub const MAX_CAPABILITY_CHARS: usize = 100;
/// Largest `metrics` object one heartbeat may carry, as JSON text.
pub const MAX_METRICS_BYTES: usize = 16 * 1024;

/// The payload of `POST /droplets/register`: the spec's `droplet_id` or the API guide's `id`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct Registration {
    #[serde(default, deserialize_with = "id_from_any")]
    pub droplet_id: Option<i64>,
    #[serde(default, deserialize_with = "id_from_any")]
    pub id: Option<i64>,
    pub name: String,
    #[serde(default)]
    pub steward: Option<String>,
    pub endpoint: String,
    #[serde(default)]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub max_concurrent_tasks: Option<i64>,
    /// Per capability, a JSON Schema (draft 2020-12) of the task payloads accepted.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub capability_schemas: Option<serde_json::Map<String, Value>>,
}

impl Registration {
    pub fn external_id(&self) -> Option<i32> {
        self.droplet_id
            .or(self.id)
            .and_then(|v| i32::try_from(v).ok())
    }
}

impl Validate for Registration {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        match self.droplet_id.or(self.id) {
            None => errors.push(FieldError::missing(&["droplet_id"])),
            Some(v) if v < 1 || v > i64::from(i32::MAX) => errors.push(FieldError::new(
                &["droplet_id"],
                "Input should be a positive 32-bit integer",
                "greater_than_equal",
            )),
            Some(_) => {}
        }
        let n = self.name.chars().count();
        if n == 0 || n > 100 {
            errors.push(FieldError::new(
                &["name"],
                "String should have 1 to 100 characters",
                "string_too_long",
            ));
        }
        if self
            .steward
            .as_ref()
            .is_some_and(|s| s.chars().count() > 100)
        {
            errors.push(FieldError::new(
                &["steward"],
                "String should have at most 100 characters",
                "string_too_long",
            ));
        }
        let e = self.endpoint.chars().count();
        if e == 0 || e > 255 {
            errors.push(FieldError::new(
                &["endpoint"],
                "String should have 1 to 255 characters",
                "string_too_long",
            ));
        } else if let Err(why) = crate::services::endpoints::check_shape(&self.endpoint) {
            errors.push(FieldError::new(&["endpoint"], why, "url_parsing"));
        }
        if self.capabilities.len() > MAX_CAPABILITIES {
            errors.push(FieldError::new(
                &["capabilities"],
                format!("At most {MAX_CAPABILITIES} capabilities a droplet"),
                "too_long",
            ));
        }
        if self
            .capabilities
            .iter()
            .any(|c| c.is_empty() || c.chars().count() > MAX_CAPABILITY_CHARS)
        {
            errors.push(FieldError::new(
                &["capabilities"],
                format!("Capabilities should have 1 to {MAX_CAPABILITY_CHARS} characters"),
                "string_too_long",
            ));
        }
        if let Some(m) = self.max_concurrent_tasks {
            if !(1..=1_000_000).contains(&m) {
                errors.push(FieldError::new(
                    &["max_concurrent_tasks"],
                    "Input should be between 1 and 1000000",
                    "greater_than_equal",
                ));
            }
        }
        errors
    }
}

struct Upserted {
    droplet: Droplet,
    was_new: bool,
    previous_status: Option<String>,
}

/// What a registration uses of the shared parts: the pool, the keys (the orchestrator's own
/// id is not a droplet's), the endpoint policy, the delivery holds (a registration ends a
/// push-back), the contract directory and the compiled contracts, and the router's trigger.
#[derive(Clone)]
pub struct Droplets {
    pub db: PgPool,
    pub keys: Arc<Keys>,
    pub policy: Arc<EndpointPolicy>,
    pub dispatch: Arc<Dispatcher>,
    pub directory: Arc<ContractDirectory>,
    pub contracts: Arc<Contracts>,
    pub router: Arc<RouterTrigger>,
    pub relay: RelayWake,
}

impl Core {
    /// The parts a registration uses ([`register`]).
    pub fn droplets(&self) -> Droplets {
        Droplets {
            db: self.db.clone(),
            keys: self.keys.clone(),
            policy: self.endpoint_policy.clone(),
            dispatch: self.dispatch.clone(),
            directory: self.directory.clone(),
            contracts: self.contracts.clone(),
            router: self.router.clone(),
            relay: self.relay.clone(),
        }
    }
}

/// Registers or re-registers a droplet; returns it and whether it is new to the mesh.
/// `id_form` is how the droplet wrote its envelope's `source` (None for a bare body: the
/// form it showed before is kept).
pub async fn register(
    state: &Droplets,
    caller: &Principal,
    reg: Registration,
    id_form: Option<&str>,
) -> Result<(Droplet, bool)> {
    let id = reg.external_id().ok_or_else(|| {
        Error::Invalid(vec![FieldError::missing(&[
            "body",
            "payload",
            "droplet_id",
        ])])
    })?;
    if !caller.may_act_as(id) {
        return Err(Error::Forbidden(caller.not_as(id)));
    }
    // No one registers the orchestrator, not even an admin: deliveries and routing would go
    // to whatever endpoint was given for it.
    if id == state.keys.orchestrator_id() {
        return Err(Error::invalid(
            &["body", "payload", "droplet_id"],
            format!("droplet_id {id} is the orchestrator's own id; no droplet may register as it"),
            "value_error",
        ));
    }
    if let Err(why) = crate::services::endpoints::check_registration(&reg.endpoint, &state.policy) {
        return Err(Error::invalid(
            &["body", "payload", "endpoint"],
            why,
            "url_not_allowed",
        ));
    }
    // Contracts: each names a declared capability and compiles, or nothing is registered.
    // Compiling may take milliseconds a schema: off the async workers.
    if let Some(schemas) = reg.capability_schemas.clone() {
        let contracts = state.contracts.clone();
        let compiled: Vec<_> = tokio::task::spawn_blocking(move || {
            schemas
                .into_iter()
                .map(|(capability, schema)| {
                    let result = contracts.compile(&schema).map(|_| ());
                    (capability, result)
                })
                .collect()
        })
        .await
        .map_err(|e| Error::Internal(format!("contract compile: {e}")))?;
        let mut errors = Vec::new();
        for (capability, result) in compiled {
            let loc = ["body", "payload", "capability_schemas", capability.as_str()];
            if !reg.capabilities.contains(&capability) {
                errors.push(FieldError::new(
                    &loc,
                    format!("{capability:?} is not one of the droplet's capabilities"),
                    "value_error",
                ));
            } else if let Err(why) = result {
                // The message names the keyword refused by its JSON pointer in the schema.
                errors.push(FieldError::new(
                    &loc,
                    format!("The schema for capability {capability:?} does not compile: {why}"),
                    "schema_invalid",
                ));
            }
        }
        if !errors.is_empty() {
            return Err(Error::Invalid(errors));
        }
    }
    // Each capability once, in the order the droplet declared them (`dedup` alone would
    // keep repeats that are not next to each other).
    let mut seen = std::collections::HashSet::new();
    let mut capabilities = reg.capabilities.clone();
    capabilities.retain(|c| seen.insert(c.clone()));
    let mut tx = state.db.begin().await?;
    let r = droplet_record!(
        "WITH old AS (SELECT status, registered FROM droplets WHERE droplet_id = $1),
         up AS (
            INSERT INTO droplets (droplet_id, name, steward, endpoint, capabilities, status, last_heartbeat,
                                  max_concurrent_tasks, registered, id_form, capability_schemas)
            VALUES ($1, $2, $3, $4, $5, 'active', NOW(), $6, TRUE, $7, $8)
            ON CONFLICT (droplet_id) DO UPDATE SET
                name = EXCLUDED.name, steward = EXCLUDED.steward, endpoint = EXCLUDED.endpoint,
                capabilities = EXCLUDED.capabilities, max_concurrent_tasks = EXCLUDED.max_concurrent_tasks,
                id_form = COALESCE(EXCLUDED.id_form, droplets.id_form), refused_deliveries = 0,
                timed_out_assignments = 0, failed_deliveries = 0, unreachable_since = NULL,
                capability_schemas = EXCLUDED.capability_schemas,
                -- A new process: its push-back and an admin's drain of the old one are over.
                deferred_until = NULL, in_flight_allowance = NULL, in_flight_allowance_ceiling = NULL,
                drain_requested_at = NULL, drain_deadline = NULL, drained_at = NULL,
                status = CASE WHEN droplets.admin_deactivated THEN droplets.status ELSE 'active' END,
                last_heartbeat = NOW(), updated_at = NOW(), registered = TRUE
            RETURNING *
         )
         SELECT ",
        r#", (NOT EXISTS (SELECT 1 FROM old WHERE registered)) AS "was_new!",
            (SELECT status FROM old) AS "previous_status?"
         FROM up"#,
        id,
        &reg.name,
        reg.steward.as_deref(),
        &reg.endpoint,
        json!(capabilities),
        reg.max_concurrent_tasks.map(|m| m as i32),
        id_form,
        reg.capability_schemas.clone().map(Value::Object),
    )
    .fetch_one(&mut *tx)
    .await?;
    let row = Upserted {
        was_new: r.was_new,
        previous_status: r.previous_status,
        droplet: droplet_of!(r),
    };
    let event = Event::droplet(
        DropletEventKind::DropletRegistered,
        &row.droplet,
        Some(json!({ "previous_status": row.previous_status, "new": row.was_new })),
    );
    events::record(&mut tx, &[event]).await?;
    tx.commit().await?;
    state.relay.committed();
    state.dispatch.holds.forget(row.droplet.internal_id);
    // In force here at once; the other replicas apply the event as they read it.
    let listed = Listed::from_event(&row.droplet.to_json());
    ContractDirectory::apply_off_workers(
        &state.directory,
        listed.into_iter().collect(),
        &state.contracts,
    )
    .await;
    state.router.trigger();
    Ok((row.droplet, row.was_new))
}

pub async fn load(db: &PgPool, droplet_id: i32) -> Result<Option<Droplet>, sqlx::Error> {
    droplet_query!(
        "SELECT ",
        " FROM droplets WHERE droplet_id = $1",
        droplet_id
    )
    .fetch_optional(db)
    .await
}

pub async fn load_internal(db: &PgPool, internal_id: i32) -> Result<Option<Droplet>, sqlx::Error> {
    droplet_query!("SELECT ", " FROM droplets WHERE id = $1", internal_id)
        .fetch_optional(db)
        .await
}

/// Whether `caller` may heartbeat droplet `droplet_id`, in the contract's order: the droplet
/// exists (404), then the caller may act as it (403). The handler asks this of a heartbeat
/// whose body it could not read, so that its 422 comes only after both.
pub async fn may_heartbeat(db: &PgPool, caller: &Principal, droplet_id: i32) -> Result<Droplet> {
    let droplet = require(db, droplet_id).await?;
    if !caller.may_act_as(droplet_id) {
        return Err(Error::Forbidden(caller.not_as(droplet_id)));
    }
    Ok(droplet)
}

pub async fn require(db: &PgPool, droplet_id: i32) -> Result<Droplet> {
    load(db, droplet_id)
        .await?
        .ok_or_else(|| Error::not_found(format!("Droplet {droplet_id} not found")))
}

/// Filters of `GET /droplets`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DropletFilter {
    pub status: Option<String>,
    pub capability: Option<String>,
}

impl Validate for DropletFilter {
    fn validate(&self) -> Vec<FieldError> {
        match self.status.as_deref() {
            None | Some("active" | "inactive" | "error" | "maintenance") => Vec::new(),
            Some(_) => vec![FieldError::new(
                &["status"],
                "Input should be 'active', 'inactive', 'error' or 'maintenance'",
                "enum",
            )],
        }
    }
}

pub async fn list(db: &PgPool, f: &DropletFilter) -> Result<Vec<Droplet>, sqlx::Error> {
    droplet_query!(
        "SELECT ",
        " FROM droplets
          WHERE ($1::text IS NULL OR status = $1)
            AND ($2::text IS NULL OR capabilities @> jsonb_build_array($2::text))
          ORDER BY droplet_id",
        f.status.as_deref(),
        f.capability.as_deref()
    )
    .fetch_all(db)
    .await
}

/// Tasks a droplet holds now.
#[derive(Debug, Clone, Copy, Default, Serialize, utoipa::ToSchema)]
pub struct Load {
    pub assigned: i64,
    pub in_progress: i64,
    pub total: i64,
}

pub async fn load_of(db: &PgPool, internal_id: i32) -> Result<Load, sqlx::Error> {
    let row = sqlx::query!(
        r#"SELECT COUNT(*) FILTER (WHERE status = 'assigned') AS "assigned!", COUNT(*) FILTER (WHERE status = 'in_progress') AS "in_progress!"
         FROM tasks WHERE assigned_droplet_id = $1 AND status IN ('assigned', 'in_progress')"#,
        internal_id,
    )
    .fetch_one(db)
    .await?;
    let (assigned, in_progress) = (row.assigned, row.in_progress);
    Ok(Load {
        assigned,
        in_progress,
        total: assigned + in_progress,
    })
}

/// Sets a droplet's status by an admin's hand (and holds or releases it), with its event,
/// in the caller's transaction.
pub async fn set_admin_status(
    conn: &mut sqlx::PgConnection,
    caller: &Principal,
    droplet_id: i32,
    activate: bool,
) -> Result<(Droplet, DropletStatus)> {
    let row = droplet_record!(
        "WITH old AS (SELECT id, status FROM droplets WHERE droplet_id = $1 FOR NO KEY UPDATE),
         up AS (
            UPDATE droplets SET
                status = CASE WHEN $2 THEN 'active' ELSE 'inactive' END,
                admin_deactivated = NOT $2,
                last_heartbeat = CASE WHEN $2 THEN NOW() ELSE droplets.last_heartbeat END,
                updated_at = NOW()
            FROM old WHERE droplets.id = old.id
            RETURNING droplets.*
         )
         SELECT ",
        r#", (SELECT status FROM old) AS "previous_status!: crate::services::status::DropletStatus" FROM up"#,
        droplet_id,
        activate
    )
    .fetch_optional(&mut *conn)
    .await?
    .map(|r| Beat {
        previous_status: r.previous_status,
        droplet: droplet_of!(r),
    });
    let row = row.ok_or_else(|| Error::not_found(format!("Droplet {droplet_id} not found")))?;
    if row.previous_status != row.droplet.status {
        let event = Event::droplet(
            DropletEventKind::DropletHealthChanged,
            &row.droplet,
            Some(json!({
                "previous_status": row.previous_status,
                "reason": if activate { format!("activated by {}", caller.actor_name()) } else { format!("deactivated by {}", caller.actor_name()) },
            })),
        );
        events::record(conn, &[event]).await?;
    }
    Ok((row.droplet, row.previous_status))
}
