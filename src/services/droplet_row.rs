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

/// The columns that read a [`Droplet`] from the `droplets` row (unqualified), declared once
/// (see `sql_columns.rs`): calls `$m!` (a path: `sqlx::query_as`) with `$before`, the columns
/// as one literal carrying the query macros' overrides, then `$after`. See [`droplet_query!`]
/// for a statement that reads droplets alone and [`droplet_record!`] for one that reads more.
macro_rules! droplet_columns {
    ($($m:ident)::+ { $($before:tt)* } { $($after:tt)* }) => {
        $($m)::+!($($before)*
            "id AS \"internal_id!\", droplet_id AS \"id!\", droplet_id AS \"droplet_id!\", \
             name AS \"name!\", steward, endpoint AS \"endpoint!\", \
             COALESCE(capabilities, '[]'::jsonb) AS \"capabilities!\", \
             status AS \"status!: crate::services::status::DropletStatus\", last_heartbeat, \
             registered_at, updated_at, max_concurrent_tasks, \
             admin_deactivated AS \"admin_deactivated!\", registered AS \"registered!\", \
             id_form, capability_schemas, \
             LEAST(in_flight_allowance, max_concurrent_tasks) AS in_flight_allowance, \
             CASE WHEN deferred_until > NOW() THEN deferred_until END AS deferred_until, \
             drain_requested_at IS NOT NULL AS \"draining!\", drain_deadline, drained_at"
            $($after)*)
    };
}
pub(crate) use droplet_columns;

/// `sqlx::query_as!(Droplet, $head + "<droplet columns>" + $tail, args...)`.
macro_rules! droplet_query {
    ($head:literal, $tail:literal $(, $arg:expr)* $(,)?) => {
        $crate::services::droplet_row::droplet_columns!(sqlx::query_as {
            crate::services::droplet_row::Droplet, $head +
        } { + $tail $(, $arg)* })
    };
}
pub(crate) use droplet_query;

/// `sqlx::query!($head + "<droplet columns>" + $tail, args...)`, for a statement that reads
/// more than the droplet (`$tail` adds columns): [`droplet_of!`] takes the droplet out of
/// each record, and its other fields stay.
macro_rules! droplet_record {
    ($head:literal, $tail:literal $(, $arg:expr)* $(,)?) => {
        $crate::services::droplet_row::droplet_columns!(sqlx::query { $head + } { + $tail $(, $arg)* })
    };
}
pub(crate) use droplet_record;

/// The [`Droplet`] of a record read by [`droplet_record!`] (its fields moved out).
macro_rules! droplet_of {
    ($r:ident) => {
        $crate::services::droplet_row::Droplet {
            internal_id: $r.internal_id,
            id: $r.id,
            droplet_id: $r.droplet_id,
            name: $r.name,
            steward: $r.steward,
            endpoint: $r.endpoint,
            capabilities: $r.capabilities,
            status: $r.status,
            last_heartbeat: $r.last_heartbeat,
            registered_at: $r.registered_at,
            updated_at: $r.updated_at,
            max_concurrent_tasks: $r.max_concurrent_tasks,
            admin_deactivated: $r.admin_deactivated,
            registered: $r.registered,
            id_form: $r.id_form,
            capability_schemas: $r.capability_schemas,
            in_flight_allowance: $r.in_flight_allowance,
            deferred_until: $r.deferred_until,
            draining: $r.draining,
            drain_deadline: $r.drain_deadline,
            drained_at: $r.drained_at,
        }
    };
}
pub(crate) use droplet_of;

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
