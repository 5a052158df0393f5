//! The router's read of pending work: per capability with room, the keys with pending work
//! (a skip over the pending index, one probe per key and priority, never a scan of the
//! pending set), each key's oldest tasks per priority up to its share of the room, put in
//! the fair order (`fair_share.rs`: aged urgency, keys in turn by weight), cut to what the
//! limits of each key allow now. The tasks are locked by the pass's assignments
//! (`state_machine::Mode::SkipHeld`), not here.
//!
//! The limits hold across replicas: the `key_limits` row of each limited key in the read is
//! locked for the pass (`FOR UPDATE SKIP LOCKED`: a key another replica is routing is left
//! out of this pass, never waited for) before its tasks in flight are counted, and the
//! token bucket of `max_per_second` is the row's `spent_until`, moved in the same transaction.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, NaiveDateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::services::fair_share::{self, Bucket, Limit, LimitCache, Queued};
use crate::services::router_trigger::RouterTrigger;
use crate::services::transition::Transition;

/// Most (capability, key, priority) groups one pass reads; keys past them wait a pass.
const MAX_GROUPS: i64 = 20_000;

/// A pending task as the router plans it.
#[derive(Debug, Clone)]
pub struct PendingTask {
    pub id: i32,
    pub key: String,
    pub required_capability: Option<String>,
    pub last_droplet_id: Option<i32>,
    pub urgency: i32,
    pub created_at: NaiveDateTime,
}

impl Queued for PendingTask {
    fn key(&self) -> &str {
        &self.key
    }
    fn urgency(&self) -> i32 {
        self.urgency
    }
    fn created_at(&self) -> NaiveDateTime {
        self.created_at
    }
    fn id(&self) -> i32 {
        self.id
    }
}

/// What the read found.
#[derive(Debug, Default)]
pub struct Read {
    /// In the order the pass takes them (not locked: the assignments lock them).
    pub tasks: Vec<PendingTask>,
    /// Some key read as many as its share allowed: more may be waiting.
    pub more: bool,
    /// A limited key's row was locked by another replica: its tasks wait for the next pass.
    pub contended: bool,
    /// The buckets of the rate-limited keys in this pass (spent after the plan).
    pub buckets: HashMap<String, Bucket>,
    /// Keys with tasks left out for their rate: a pass is due when their next slot comes.
    pub rate_held: HashSet<String>,
}

/// Reads the pending work for `wanted`: (capability, or '' for tasks needing none; how
/// many the room takes), in the fair order and within the limits. The tasks are not locked:
/// the pass's assignments lock them, leaving out any held elsewhere.
pub async fn read_pending(
    t: &mut Transition<'_>,
    wanted: &[(String, i64)],
    limits: &HashMap<String, Limit>,
    aging_seconds: u64,
    batch: i64,
) -> Result<Read, sqlx::Error> {
    let (caps, rooms): (Vec<String>, Vec<i64>) = wanted.iter().cloned().unzip();
    let weight = |k: &str| limits.get(k).map_or(1, Limit::share_weight);
    let (keys, weights): (Vec<String>, Vec<i32>) = limits
        .iter()
        .map(|(k, l)| (k.clone(), l.share_weight()))
        .unzip();
    // One statement: the groups waiting (a skip over the pending index), each group's read
    // limit (`fair_read_limit`, in the migration that adds it: its key's weight's share of
    // its capability's room among the keys waiting there), and each group's oldest tasks up
    // to it. The arrays through `(SELECT $n)`: planned once per connection, not at each pass
    // (`state_machine::lock_rows!` says why). The tasks are ordered by the whole index key
    // (the group's columns are fixed only per outer row, and the planner sorts every pending
    // task of the group otherwise: 8 ms a group at 1,000).
    let rows = sqlx::query!(
        r#"WITH RECURSIVE g AS (
            SELECT c.cap, f.key, f.prio
            FROM unnest((SELECT $1::text[])) AS c(cap)
            CROSS JOIN LATERAL (
                SELECT fairness_key AS key, priority AS prio FROM tasks
                WHERE status = 'pending' AND COALESCE(required_capability, '') = c.cap
                ORDER BY COALESCE(required_capability, ''), fairness_key, priority LIMIT 1
            ) f
            UNION ALL
            SELECT g.cap, n.key, n.prio
            FROM g CROSS JOIN LATERAL (
                SELECT fairness_key AS key, priority AS prio FROM tasks
                WHERE status = 'pending' AND COALESCE(required_capability, '') = g.cap
                  AND (fairness_key, priority) > (g.key, g.prio)
                ORDER BY COALESCE(required_capability, ''), fairness_key, priority LIMIT 1
            ) n
         ), groups AS (
            SELECT g.cap, g.key, g.prio, COALESCE(w.weight, 1) AS weight
            FROM (SELECT * FROM g LIMIT $2) g
            LEFT JOIN unnest((SELECT $3::text[]), (SELECT $4::int[])) AS w(key, weight)
                   ON w.key = g.key
         ), per_cap AS (
            -- Per capability: its groups, and the weights of its keys (each key once).
            SELECT cap, SUM(n)::bigint AS n, SUM(weight)::bigint AS total
            FROM (SELECT cap, key, MAX(weight) AS weight, COUNT(*) AS n
                  FROM groups GROUP BY cap, key) k
            GROUP BY cap
         ), limited AS (
            SELECT gr.cap, gr.key, gr.prio,
                   fair_read_limit(r.room, gr.weight, pc.total, pc.n, $6) AS lim
            FROM groups gr
            JOIN per_cap pc ON pc.cap = gr.cap
            JOIN unnest((SELECT $1::text[]), (SELECT $5::bigint[])) AS r(cap, room)
              ON r.cap = gr.cap
         )
         SELECT p.id AS "id!", l.cap AS "cap!", l.key AS "key!", l.lim AS "lim!",
                p.required_capability AS "required_capability?",
                p.last_droplet_id AS "last_droplet_id?", l.prio AS "priority!",
                p.created AS "created_at!", p.waited AS "waited!"
         FROM limited l
         CROSS JOIN LATERAL (
            SELECT id, required_capability, last_droplet_id,
                   COALESCE(created_at, NOW()::timestamp) AS created,
                   EXTRACT(EPOCH FROM NOW()::timestamp - COALESCE(created_at, NOW()::timestamp))::float8 AS waited
            FROM tasks
            WHERE status = 'pending' AND COALESCE(required_capability, '') = l.cap
              AND fairness_key = l.key AND priority = l.prio
              AND (deadline IS NULL OR deadline > NOW())
            ORDER BY COALESCE(required_capability, ''), fairness_key, priority, created_at, id
            LIMIT l.lim
         ) p"#,
        &caps,
        MAX_GROUPS,
        &keys,
        &weights,
        &rooms,
        fair_share::MIN_READ,
    )
    .fetch_all(t.conn())
    .await?;
    // A group read up to its limit may have more waiting.
    let mut read: HashMap<(&str, &str, i32), (i64, i64)> = HashMap::new();
    for r in &rows {
        read.entry((r.cap.as_str(), r.key.as_str(), r.priority))
            .or_insert((0, r.lim))
            .0 += 1;
    }
    let full_keys: HashSet<String> = read
        .iter()
        .filter(|(_, (n, lim))| n >= lim)
        .map(|((_, key, _), _)| key.to_string())
        .collect();
    let mut tasks: Vec<PendingTask> = rows
        .into_iter()
        .map(|r| PendingTask {
            id: r.id,
            urgency: fair_share::urgency(r.priority, r.waited, aging_seconds),
            key: r.key,
            required_capability: r.required_capability,
            last_droplet_id: r.last_droplet_id,
            created_at: r.created_at,
        })
        .collect();
    fair_share::fair_order(&mut tasks, weight);

    let mut out = Read::default();
    let allowed = allowances(t, &tasks, limits, &mut out).await?;
    let mut taken: HashMap<&str, i64> = HashMap::new();
    let mut capped: HashSet<String> = HashSet::new();
    let mut kept: Vec<PendingTask> = Vec::with_capacity(tasks.len().min(batch as usize));
    for task in &tasks {
        if let Some(limit) = allowed.get(&task.key) {
            let n = taken.entry(task.key.as_str()).or_insert(0);
            if *n >= *limit {
                capped.insert(task.key.clone());
                if out.buckets.contains_key(&task.key) {
                    out.rate_held.insert(task.key.clone());
                }
                continue;
            }
            *n += 1;
        }
        kept.push(task.clone());
    }
    out.more = full_keys.iter().any(|k| !capped.contains(k)) || kept.len() as i64 > batch;
    kept.truncate(batch as usize);
    // Not locked here: the pass's assignments lock them (`Mode::SkipHeld`), and one held
    // elsewhere meanwhile (another replica's pass, a cancel or a start in flight) is left
    // out then, never waited for.
    out.tasks = kept;
    Ok(out)
}

/// How many tasks each limited key in the read may have assigned in this pass (keys
/// without limits are absent): its limits' rows locked for the pass, its tasks in flight
/// counted after the lock (so what another replica committed under it is seen), its bucket
/// read. A key whose row another pass holds gets 0 and marks the read contended.
async fn allowances(
    t: &mut Transition<'_>,
    tasks: &[PendingTask],
    limits: &HashMap<String, Limit>,
    out: &mut Read,
) -> Result<HashMap<String, i64>, sqlx::Error> {
    let limited: Vec<String> = tasks
        .iter()
        .map(|t| t.key.as_str())
        .collect::<HashSet<_>>()
        .into_iter()
        .filter(|k| limits.get(*k).is_some_and(Limit::holds_routing))
        .map(str::to_string)
        .collect();
    if limited.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = sqlx::query_as!(
        Limit,
        r#"SELECT key, max_in_flight, max_per_second, max_queued, weight, spent_until
         FROM key_limits WHERE key = ANY($1) ORDER BY key FOR UPDATE SKIP LOCKED"#,
        &limited,
    )
    .fetch_all(t.conn())
    .await?;
    let in_flight: HashMap<String, i64> = sqlx::query!(
        r#"SELECT fairness_key AS "key!", COUNT(*) AS "n!" FROM tasks
         WHERE fairness_key = ANY($1) AND status IN ('assigned', 'in_progress')
         GROUP BY fairness_key"#,
        &limited,
    )
    .fetch_all(t.conn())
    .await?
    .into_iter()
    .map(|r| (r.key, r.n))
    .collect();
    let now = Utc::now();
    let mut allowed: HashMap<String, i64> = limited.iter().map(|k| (k.clone(), 0)).collect();
    out.contended = rows.len() < limited.len();
    for row in rows {
        let mut n = i64::MAX;
        if let Some(max) = row.max_in_flight {
            n = n.min((i64::from(max) - in_flight.get(&row.key).copied().unwrap_or(0)).max(0));
        }
        if let Some(rate) = row.max_per_second {
            let bucket = Bucket::at(rate, row.spent_until, now);
            n = n.min(bucket.tokens);
            out.buckets.insert(row.key.clone(), bucket);
        }
        allowed.insert(row.key, n);
    }
    Ok(allowed)
}

/// Moves the buckets of the rate-limited keys past the tasks this pass assigned them, in
/// the pass's transaction (whose lock on their rows keeps other replicas out meanwhile).
pub async fn spend(
    t: &mut Transition<'_>,
    read: &Read,
    assigned: &HashMap<String, i64>,
) -> Result<(), sqlx::Error> {
    let (keys, slots): (Vec<String>, Vec<DateTime<Utc>>) = read
        .buckets
        .iter()
        .filter_map(|(key, bucket)| {
            let used = assigned.get(key).copied().unwrap_or(0);
            (used > 0).then(|| (key.clone(), bucket.after(used)))
        })
        .unzip();
    if !keys.is_empty() {
        sqlx::query!(
            "UPDATE key_limits SET spent_until = v.slot
             FROM unnest($1::text[], $2::timestamptz[]) AS v(key, slot)
             WHERE key_limits.key = v.key",
            &keys,
            &slots,
        )
        .execute(t.conn())
        .await?;
    }
    Ok(())
}

/// When the earliest key left waiting for its rate may have its next task.
pub fn due(read: &Read, assigned: &HashMap<String, i64>) -> Option<DateTime<Utc>> {
    read.rate_held
        .iter()
        .filter_map(|key| {
            let used = assigned.get(key).copied().unwrap_or(0).max(0);
            read.buckets.get(key).map(|b| b.after(used + 1))
        })
        .min()
}

/// A pass when a rate-limited key's next slot comes (unless one as early is scheduled).
pub fn wake_at(
    limits: &LimitCache,
    router: &Arc<RouterTrigger>,
    shutdown: &CancellationToken,
    at: DateTime<Utc>,
) {
    if !limits.claim_wake(at) {
        return;
    }
    let (router, shutdown) = (router.clone(), shutdown.clone());
    tokio::spawn(async move {
        let wait = (at - Utc::now()).to_std().unwrap_or_default();
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(wait) => router.trigger(),
        }
    });
}
