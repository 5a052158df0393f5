//! Heartbeats: the payload a droplet sends, concurrent heartbeats sharing one statement and
//! one commit (`heartbeat_queue.rs`, `shared_commit.rs`), and the recent ones a droplet's
//! details show.

use crate::services::events::RelayWake;
use std::sync::Arc;

use chrono::NaiveDateTime;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;

use crate::identity::Principal;
use crate::protocol;
use crate::services::droplet_row::droplet_of;
use crate::services::droplets::{require, Droplet, MAX_METRICS_BYTES};
use crate::services::error::{Error, Result};
use crate::services::heartbeat_queue::HeartbeatQueue;
use crate::services::heartbeat_queue::{Beat, BeatRow};
use crate::services::router_trigger::RouterTrigger;
use crate::services::shared_commit;
use crate::services::status::DropletStatus;
use crate::services::Core;
use crate::validation::FieldError;
use crate::validation::Validate;

/// The payload of a heartbeat.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct Heartbeat {
    #[serde(default = "active")]
    pub status: String,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metrics: Option<Value>,
}

fn active() -> String {
    "active".to_string()
}

impl Validate for Heartbeat {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let n = self.status.chars().count();
        if n == 0 || n > 20 {
            errors.push(FieldError::new(
                &["status"],
                "String should have 1 to 20 characters",
                "string_too_long",
            ));
        }
        if let Some(metrics) = &self.metrics {
            if metrics.to_string().len() > MAX_METRICS_BYTES {
                errors.push(FieldError::new(
                    &["metrics"],
                    format!("Metrics should be at most {MAX_METRICS_BYTES} bytes of JSON"),
                    "too_long",
                ));
            }
        }
        errors
    }
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            status: active(),
            metrics: None,
        }
    }
}

/// The droplet status a reported heartbeat status leads to: only `active` takes tasks.
fn droplet_status_for(reported: &str) -> &'static str {
    match reported.to_ascii_lowercase().as_str() {
        "active" | "healthy" | "ok" => "active",
        "error" => "error",
        _ => "inactive",
    }
}

/// Heartbeats in one round trip, many droplets at once (one heartbeat each): each droplet's
/// row (status unless an admin holds it) and its `heartbeats` row, rows locked in id order,
/// and the health event (`events::heartbeat_health_event!`). `$1` droplet ids, `$2` new droplet
/// statuses, `$3` reported statuses, `$4` metrics, `$5` the id forms the envelopes showed (or
/// NULL). `heartbeats_query!(args)` is `sqlx::query!` of it; the droplet columns come first
/// (`droplet_columns!` calls back with them), then the CTE is spliced in.
macro_rules! heartbeats_query {
    (columns $columns:literal $($args:tt)*) => {
        $crate::services::events::heartbeat_health_event!(sqlx::query {
            "WITH b AS (
        SELECT * FROM unnest($1::int[], $2::text[], $3::text[], $4::jsonb[], $5::text[])
            AS b(beat_droplet, new_status, reported, metrics, beat_id_form)
     ),
     old AS (
        SELECT d.id AS old_id, d.status AS old_status, b.*
        FROM droplets d JOIN b ON b.beat_droplet = d.droplet_id
        WHERE d.droplet_id = ANY($1::int[])
        ORDER BY d.id FOR NO KEY UPDATE OF d
     ),
     up AS (
        UPDATE droplets SET last_heartbeat = NOW(), updated_at = NOW(), refused_deliveries = 0,
            id_form = COALESCE(old.beat_id_form, droplets.id_form),
            -- An unreachable droplet stays as it is: its heartbeat shows it reaches us, not
            -- that we reach it (a successful probe or a registration brings it back).
            status = CASE WHEN droplets.admin_deactivated OR droplets.unreachable_since IS NOT NULL
                          THEN droplets.status ELSE old.new_status END
        FROM old WHERE droplets.id = old.old_id
        RETURNING droplets.*
     ),
     hb AS (
        INSERT INTO heartbeats (droplet_id, status, metrics)
        SELECT up.id, old.reported, old.metrics FROM up JOIN old ON old.old_id = up.id ORDER BY up.id
     ),
     " +
        } {
            + "
     SELECT " + $columns
            + r#", old.old_status AS "previous_status!: crate::services::status::DropletStatus" FROM up JOIN old ON old.old_id = up.id"#
            $($args)*
        })
    };
    ($($args:tt)*) => {
        $crate::services::droplet_row::droplet_columns!(heartbeats_query { columns } { , $($args)* })
    };
}

/// What a heartbeat uses of the shared parts: the pool, the heartbeats' queue (they share a
/// statement), and the router's trigger (a droplet back to `active` takes work). Each part
/// is shared, so a clone is cheap: a heartbeats' leader takes one.
#[derive(Clone)]
pub struct Beats {
    pub db: PgPool,
    pub queue: Arc<HeartbeatQueue>,
    pub router: Arc<RouterTrigger>,
    pub relay: RelayWake,
}

impl Core {
    /// The parts a heartbeat uses ([`heartbeat`]).
    pub fn beats(&self) -> Beats {
        Beats {
            db: self.db.clone(),
            queue: self.heartbeats.clone(),
            router: self.router.clone(),
            relay: self.relay.clone(),
        }
    }
}

/// Records a heartbeat: the droplet's row and one `heartbeats` row, in one statement shared
/// with the heartbeats of other droplets arriving at the same moment (`shared_commit`).
/// An admin's deactivation holds: the heartbeat is recorded but the status stays.
pub async fn heartbeat(
    state: &Beats,
    caller: &Principal,
    droplet_id: i32,
    beat: Heartbeat,
    id_form: Option<&str>,
) -> Result<Droplet> {
    // The contract's order: the droplet exists (404) before the caller may act on it (403).
    if !caller.may_act_as(droplet_id) {
        require(&state.db, droplet_id).await?;
        return Err(Error::Forbidden(caller.not_as(droplet_id)));
    }
    let answer = state.queue.push(BeatRow {
        droplet_id,
        new_status: droplet_status_for(&beat.status).to_string(),
        reported: beat.status.clone(),
        metrics: beat.metrics.clone(),
        id_form: id_form.map(str::to_string),
    });
    // Should the shared statement fail (a deadlock with another writer of several droplets,
    // say), each heartbeat is tried alone.
    shared_commit::lead_each(
        state,
        |c: &Beats| &*c.queue,
        |b| b.droplet_id,
        |core, rows| Box::pin(beat_rows(core, rows)),
    );
    let row = match answer.await {
        Ok(beaten) => beaten?,
        Err(_) => {
            return Err(Error::internal(
                "a shared heartbeat ended without an answer",
            ))
        }
    };
    let row = row.ok_or_else(|| Error::not_found(format!("Droplet {droplet_id} not found")))?;
    // The statement itself sent the health event (in its own transaction, so in commit order
    // with every other change of this droplet).
    if row.previous_status != row.droplet.status && row.droplet.status == DropletStatus::Active {
        state.router.trigger();
    }
    Ok(row.droplet)
}

/// The heartbeats of distinct droplets in one statement; the droplets after them by id.
async fn beat_rows(
    core: &Beats,
    rows: &[&BeatRow],
) -> std::result::Result<std::collections::HashMap<i32, Beat>, sqlx::Error> {
    // Checked as the arrays the statement casts them to by PostgreSQL; the macros' element
    // check knows neither &str nor Option in an array.
    let beats = heartbeats_query!(
        &rows.iter().map(|r| r.droplet_id).collect::<Vec<_>>(),
        &rows
            .iter()
            .map(|r| r.new_status.as_str())
            .collect::<Vec<_>>() as _,
        &rows.iter().map(|r| r.reported.as_str()).collect::<Vec<_>>() as _,
        &rows.iter().map(|r| &r.metrics).collect::<Vec<_>>() as _,
        &rows
            .iter()
            .map(|r| r.id_form.as_deref())
            .collect::<Vec<_>>() as _
    )
    .fetch_all(&core.db)
    .await?;
    // The statement wrote a health event for each droplet whose status changed, and has
    // committed: the local relay publishes them now.
    if beats.iter().any(|r| r.previous_status != r.status) {
        core.relay.committed();
    }
    Ok(beats
        .into_iter()
        .map(|r| {
            let beat = Beat {
                previous_status: r.previous_status,
                droplet: droplet_of!(r),
            };
            (beat.droplet.droplet_id, beat)
        })
        .collect())
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct HeartbeatRow {
    pub status: String,
    #[schema(value_type = Option<Object>)]
    pub metrics: Option<Value>,
    #[serde(serialize_with = "protocol::ts_opt")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub received_at: Option<NaiveDateTime>,
}

pub async fn recent_heartbeats(
    db: &PgPool,
    internal_id: i32,
    limit: i64,
) -> Result<Vec<HeartbeatRow>, sqlx::Error> {
    sqlx::query_as!(
        HeartbeatRow,
        r#"SELECT status AS "status!", metrics AS "metrics?", received_at AS "received_at?" FROM heartbeats WHERE droplet_id = $1 ORDER BY received_at DESC, id DESC LIMIT $2"#,
        internal_id,
        limit,
    )
    .fetch_all(db)
    .await
}
