//! Limits per fairness key, set by an admin (`/management/limits`): kept in `key_limits`,
//! read by every replica's router each pass (`fair_pending.rs` enforces them), listed with
//! their live counts; the producers' push-back of `max_queued` at creation; the queue depth
//! per limited key for Prometheus; and what holds a waiting task for `explain`.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::services::error::{Error, Result};
use crate::services::fair_share::{Bucket, Limit, LimitCache};
use crate::services::router_trigger::RouterTrigger;
use crate::services::task_store;
use crate::services::transition::Transition;
use crate::services::Core;

/// What setting limits and admitting a creation use: the pool, this replica's limits in
/// force, and the router's trigger (a change of limits may free work).
#[derive(Clone)]
pub struct Limits {
    pub db: PgPool,
    pub cache: Arc<LimitCache>,
    pub router: Arc<RouterTrigger>,
}

impl Core {
    /// The parts the limits per key use ([`put`], [`delete`], [`admit`]).
    pub fn key_limits(&self) -> Limits {
        Limits {
            db: self.db.clone(),
            cache: self.limits.clone(),
            router: self.router.clone(),
        }
    }
}
use crate::validation::{length, FieldError, Validate};

/// The body of `PUT /management/limits/{key}`: every limit optional (absent: none), the
/// weight 1 when absent.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsUpdate {
    /// Most tasks of the key assigned or in progress at once, across replicas.
    #[serde(default)]
    pub max_in_flight: Option<i64>,
    /// Most tasks of the key assigned per second (a token bucket, one second of burst).
    #[serde(default)]
    pub max_per_second: Option<f64>,
    /// Most tasks of the key pending; a creation past it is answered 429.
    #[serde(default)]
    pub max_queued: Option<i64>,
    /// Its turns against other keys within one priority (1 to 1000; 1 when absent).
    #[serde(default)]
    pub weight: Option<i64>,
}

impl Validate for LimitsUpdate {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        crate::validation::range(
            "max_in_flight",
            self.max_in_flight,
            0,
            1_000_000,
            &mut errors,
        );
        crate::validation::range("max_queued", self.max_queued, 0, 100_000_000, &mut errors);
        crate::validation::range("weight", self.weight, 1, 1000, &mut errors);
        if let Some(r) = self.max_per_second {
            if !(r.is_finite() && r > 0.0 && r <= 1_000_000.0) {
                errors.push(FieldError::new(
                    &["max_per_second"],
                    "Input should be greater than 0 and at most 1000000",
                    "greater_than",
                ));
            }
        }
        errors
    }
}

/// A key's limits with its live counts (`GET /management/limits`, and the answer to a PUT).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct KeyLimits {
    pub key: String,
    pub max_in_flight: Option<i32>,
    pub max_per_second: Option<f64>,
    pub max_queued: Option<i32>,
    pub weight: i32,
    /// Its tasks assigned or in progress now.
    pub in_flight: i64,
    /// Its tasks pending now.
    pub queued: i64,
    /// `in_flight` has reached `max_in_flight`: its tasks wait.
    pub at_in_flight_limit: bool,
    /// `queued` has reached `max_queued`: creations are answered 429.
    pub at_queued_limit: bool,
    /// With `max_per_second`: when its next task may be assigned.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub next_slot: Option<String>,
}

/// `GET /management/limits`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct LimitsList {
    pub limits: Vec<KeyLimits>,
}

/// A key as a path gives it: 1 to 100 characters.
pub fn check_key(key: &str) -> Result<()> {
    let mut errors = Vec::new();
    length("key", key, 1, 100, &mut errors);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Error::Invalid(
            errors
                .into_iter()
                .map(|e| FieldError::new(&["path", "key"], e.msg, &e.kind))
                .collect(),
        ))
    }
}

/// Every key's limits, read in the routing pass's transaction and kept as this replica's
/// limits in force.
pub async fn refresh(
    t: &mut Transition<'_>,
    cache: &LimitCache,
) -> Result<Arc<HashMap<String, Limit>>, sqlx::Error> {
    let rows = sqlx::query_as!(
        Limit,
        "SELECT key, max_in_flight, max_per_second, max_queued, weight, spent_until FROM key_limits"
    )
    .fetch_all(t.conn())
    .await?;
    cache.set(rows);
    Ok(cache.all())
}

async fn reload(limits: &Limits) -> Result<()> {
    let rows = sqlx::query_as!(
        Limit,
        "SELECT key, max_in_flight, max_per_second, max_queued, weight, spent_until FROM key_limits"
    )
    .fetch_all(&limits.db)
    .await?;
    limits.cache.set(rows);
    Ok(())
}

/// Every key's limits with its live counts, by key.
pub async fn list(db: &PgPool) -> Result<Vec<KeyLimits>> {
    let rows = sqlx::query!(
        r#"SELECT l.key, l.max_in_flight, l.max_per_second, l.max_queued, l.weight, l.spent_until,
                (SELECT COUNT(*) FROM tasks t WHERE t.fairness_key = l.key
                   AND t.status IN ('assigned', 'in_progress')) AS "in_flight!",
                (SELECT COUNT(*) FROM tasks t WHERE t.fairness_key = l.key
                   AND t.status = 'pending') AS "queued!"
         FROM key_limits l ORDER BY l.key"#
    )
    .fetch_all(db)
    .await?;
    let now = Utc::now();
    Ok(rows
        .into_iter()
        .map(|r| KeyLimits {
            at_in_flight_limit: r.max_in_flight.is_some_and(|m| r.in_flight >= i64::from(m)),
            at_queued_limit: r.max_queued.is_some_and(|m| r.queued >= i64::from(m)),
            next_slot: r
                .max_per_second
                .map(|rate| crate::protocol::iso(&next_slot(rate, r.spent_until, now).naive_utc())),
            key: r.key,
            max_in_flight: r.max_in_flight,
            max_per_second: r.max_per_second,
            max_queued: r.max_queued,
            weight: r.weight,
            in_flight: r.in_flight,
            queued: r.queued,
        })
        .collect())
}

/// When a key's next task may be assigned under its rate: now when its bucket has a token.
pub fn next_slot(
    rate: f64,
    spent_until: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> DateTime<Utc> {
    let b = Bucket::at(rate, spent_until, now);
    if b.tokens > 0 {
        now
    } else {
        b.after(1)
    }
}

/// Sets a key's limits (replacing what it had), in force on this replica at once and on
/// the others at their next pass; routing is woken so a raised limit takes effect.
pub async fn put(limits: &Limits, key: &str, update: &LimitsUpdate) -> Result<KeyLimits> {
    check_key(key)?;
    sqlx::query!(
        "INSERT INTO key_limits (key, max_in_flight, max_per_second, max_queued, weight)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (key) DO UPDATE SET max_in_flight = $2, max_per_second = $3,
             max_queued = $4, weight = $5, updated_at = NOW()",
        key,
        update.max_in_flight.map(|v| v as i32),
        update.max_per_second,
        update.max_queued.map(|v| v as i32),
        update.weight.unwrap_or(1) as i32,
    )
    .execute(&limits.db)
    .await?;
    reload(limits).await?;
    limits.router.trigger();
    list(&limits.db)
        .await?
        .into_iter()
        .find(|l| l.key == key)
        .ok_or_else(|| Error::internal("limits written but not read back"))
}

/// Removes a key's limits; 404 when it had none.
pub async fn delete(limits: &Limits, key: &str) -> Result<()> {
    check_key(key)?;
    let n = sqlx::query!("DELETE FROM key_limits WHERE key = $1", key)
        .execute(&limits.db)
        .await?
        .rows_affected();
    reload(limits).await?;
    limits.router.trigger();
    if n == 0 {
        return Err(Error::not_found(format!("No limits set for key {key}")));
    }
    Ok(())
}

/// The push-back of `max_queued`: a creation for a key at it is refused (429) unless it
/// is a retry of a task already made (same trace id). A key without `max_queued` costs no
/// query here (the limits in force are this replica's cache).
pub async fn admit(limits: &Limits, key: &str, trace: Uuid) -> Result<()> {
    let in_force = limits.cache.all();
    let Some(limit) = in_force.get(key) else {
        return Ok(());
    };
    let Some(max) = limit.max_queued else {
        return Ok(());
    };
    let depth: i64 = sqlx::query_scalar!(
        r#"SELECT COUNT(*) AS "n!" FROM tasks WHERE fairness_key = $1 AND status = 'pending'"#,
        key
    )
    .fetch_one(&limits.db)
    .await?;
    if depth < i64::from(max)
        || task_store::load_by_trace(&limits.db, trace)
            .await?
            .is_some()
    {
        return Ok(());
    }
    // At its rate the excess drains in about this long; without a rate, a second.
    let excess = (depth - i64::from(max) + 1) as f64;
    let retry_after = limit
        .max_per_second
        .map_or(1.0, |r| (excess / r).ceil())
        .clamp(1.0, 3600.0) as u64;
    Err(Error::Backpressure {
        detail: format!(
            "Key {key} has {depth} tasks queued, at its max_queued of {max}; retry later"
        ),
        retry_after_seconds: retry_after,
    })
}

/// The pending tasks of each limited key, and of all other keys together (`other`), for
/// the `orchestrator_queue_depth{key}` gauge (a label per limited key, never per creator).
pub async fn queue_depths(db: &PgPool) -> Result<Vec<(String, i64)>> {
    let rows = sqlx::query!(
        r#"SELECT l.key AS "key!", (SELECT COUNT(*) FROM tasks t WHERE t.fairness_key = l.key
                   AND t.status = 'pending') AS "queued!"
         FROM key_limits l ORDER BY l.key"#
    )
    .fetch_all(db)
    .await?;
    let pending: i64 = sqlx::query_scalar!(
        r#"SELECT COALESCE(SUM(n), 0)::bigint AS "n!" FROM task_counts WHERE status = 'pending'"#
    )
    .fetch_one(db)
    .await?;
    let limited: i64 = rows.iter().map(|r| r.queued).sum();
    let mut out: Vec<(String, i64)> = rows.into_iter().map(|r| (r.key, r.queued)).collect();
    out.push(("other".to_string(), (pending - limited).max(0)));
    Ok(out)
}

/// What a waiting task's key says about it (`explain`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct KeyState {
    /// Its fairness key: its `concurrency_key`, else `creator:<id>`.
    pub key: String,
    /// Pending tasks of its key the router takes before it (more urgent, or as urgent and
    /// older).
    pub position_in_key: i64,
    pub in_flight: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_per_second: Option<f64>,
    /// With `max_per_second`: when its key's next task may be assigned.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub next_slot: Option<String>,
    #[serde(skip)]
    pub at_limit: bool,
    #[serde(skip)]
    pub rate_limited: bool,
}

/// The state of a pending task's key, read live.
pub async fn key_state(
    db: &PgPool,
    task_id: i32,
    key: &str,
    priority: i32,
    created_at: NaiveDateTime,
) -> Result<KeyState, sqlx::Error> {
    let limit = sqlx::query_as!(
        Limit,
        "SELECT key, max_in_flight, max_per_second, max_queued, weight, spent_until
         FROM key_limits WHERE key = $1",
        key
    )
    .fetch_optional(db)
    .await?;
    let counts = sqlx::query!(
        r#"SELECT COUNT(*) FILTER (WHERE status IN ('assigned', 'in_progress')) AS "in_flight!",
                COUNT(*) FILTER (WHERE status = 'pending' AND id <> $2
                    AND (COALESCE(priority, 5), COALESCE(created_at, NOW()::timestamp), id)
                        < ($3, $4, $2)) AS "ahead!"
         FROM tasks WHERE fairness_key = $1 AND status IN ('pending', 'assigned', 'in_progress')"#,
        key,
        task_id,
        priority,
        created_at
    )
    .fetch_one(db)
    .await?;
    let now = Utc::now();
    let slot = limit
        .as_ref()
        .and_then(|l| l.max_per_second.map(|r| next_slot(r, l.spent_until, now)));
    Ok(KeyState {
        key: key.to_string(),
        position_in_key: counts.ahead,
        in_flight: counts.in_flight,
        max_in_flight: limit.as_ref().and_then(|l| l.max_in_flight),
        max_per_second: limit.as_ref().and_then(|l| l.max_per_second),
        next_slot: slot.map(|s| crate::protocol::iso(&s.naive_utc())),
        at_limit: limit
            .as_ref()
            .and_then(|l| l.max_in_flight)
            .is_some_and(|m| counts.in_flight >= i64::from(m)),
        rate_limited: slot.is_some_and(|s| s > now),
    })
}
