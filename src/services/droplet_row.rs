//! The droplet row as every answer and event shows it, and the columns that read it. Reads
//! and writes are in `droplets.rs`.

use chrono::NaiveDateTime;
use serde::Serialize;
use serde_json::Value;

use crate::protocol;
use crate::services::status::DropletStatus;

/// A droplet as the API shows it: `id` and `droplet_id` are both the external id.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Droplet {
    #[serde(skip)]
    pub internal_id: i32,
    pub id: i32,
    pub droplet_id: i32,
    pub name: String,
    pub steward: Option<String>,
    pub endpoint: String,
    #[schema(value_type = Vec<String>)]
    pub capabilities: Value,
    pub status: DropletStatus,
    #[serde(serialize_with = "protocol::ts_opt")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_heartbeat: Option<NaiveDateTime>,
    #[serde(serialize_with = "protocol::ts_opt")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub registered_at: Option<NaiveDateTime>,
    #[serde(serialize_with = "protocol::ts_opt")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub updated_at: Option<NaiveDateTime>,
    pub max_concurrent_tasks: Option<i32>,
    pub admin_deactivated: bool,
    pub registered: bool,
    /// How the droplet writes ids in its own envelopes (`int`, `string`), to answer in kind.
    #[serde(skip)]
    pub id_form: Option<String>,
    /// Per capability, the JSON Schema of the payloads the droplet accepts.
    #[schema(value_type = Option<Object>)]
    pub capability_schemas: Option<Value>,
    /// The most tasks the router lets it hold now: its `max_concurrent_tasks`, or less after
    /// it pushed back (halved at each push-back, growing back by one per accepted delivery).
    /// Absent: no limit.
    pub in_flight_allowance: Option<i32>,
    /// While it pushed back (a 429 or 503 with `Retry-After`): nothing is routed or delivered
    /// to it before this time.
    #[serde(serialize_with = "protocol::ts_opt")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub deferred_until: Option<NaiveDateTime>,
    /// Being drained by an admin: no new work until it registers again.
    pub draining: bool,
    /// When what it still holds goes back to pending (a drain with `deadline_seconds`).
    #[serde(serialize_with = "protocol::ts_opt")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub drain_deadline: Option<NaiveDateTime>,
    /// When its drain ended: it held no more tasks (the `droplet_drained` event).
    #[serde(serialize_with = "protocol::ts_opt")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub drained_at: Option<NaiveDateTime>,
}

/// The columns that read a [`Droplet`] (`SELECT {DROPLET_COLUMNS} FROM droplets`).
pub const DROPLET_COLUMNS: &str = "id AS internal_id, droplet_id AS id, droplet_id, name, steward, endpoint, \
    COALESCE(capabilities, '[]'::jsonb) AS capabilities, status, last_heartbeat, registered_at, updated_at, \
    max_concurrent_tasks, admin_deactivated, registered, id_form, capability_schemas, \
    LEAST(in_flight_allowance, max_concurrent_tasks) AS in_flight_allowance, \
    CASE WHEN deferred_until > NOW() THEN deferred_until END AS deferred_until, \
    drain_requested_at IS NOT NULL AS draining, drain_deadline, drained_at";

impl Droplet {
    pub fn capability_list(&self) -> Vec<String> {
        self.capabilities
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(crate) fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}
