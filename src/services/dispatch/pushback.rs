//! A droplet pushes back: a delivery answered 429 (or 503) with `Retry-After` is a deferral,
//! not a failure. The task keeps its assignment and its attempt (no retry counted: the droplet
//! said "later", not "no", and handing it back to pending would make its next assignment a new
//! attempt); nothing is routed or delivered to that droplet before the time it gave; its
//! in-flight allowance (the room the router sees) halves, and grows back by one per delivery
//! it accepts, up to its `max_concurrent_tasks`, where it is cleared (AIMD). The state is in
//! the droplet's row, so every replica honours it; `holds.rs` is this replica's view of it.

use std::time::Duration;

use reqwest::header::{HeaderMap, RETRY_AFTER};
use sqlx::PgPool;

use crate::services::dispatch::holds::{Holds, Snapshot};

/// The longest deferral a droplet may ask for: a longer `Retry-After` (a misconfigured
/// droplet's day, a date years ahead) counts as this, so one answer cannot park a droplet and
/// its assigned tasks for good.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// The wait a 429 or 503 asks for: `Retry-After` in seconds or as an HTTP-date (IMF-fixdate),
/// capped at [`MAX_RETRY_AFTER`]; a date in the past is no wait. None without a readable
/// header (the answer is then a plain failure, as before).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = if let Ok(seconds) = value.parse::<u64>() {
        Duration::from_secs(seconds)
    } else {
        let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
        (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// What a deferral left in the droplet's row.
#[derive(Debug, Clone, Copy)]
pub struct Deferral {
    pub droplet_id: i32,
    /// The in-flight allowance now in force.
    pub allowance: Option<i32>,
}

/// Records that a droplet (internal id) asked to wait `wait`: deferred until then (a later
/// deferral already recorded holds), and its allowance halved (at least 1) unless it was
/// deferred already (one halving per push-back, however many deliveries were answered 429
/// at once). Its halving starts from the allowance in force, or from the tasks it holds for a
/// droplet without `max_concurrent_tasks`.
pub async fn defer(db: &PgPool, internal: i32, wait: Duration) -> Result<Deferral, sqlx::Error> {
    let row = sqlx::query!(
        r#"WITH held AS (
              SELECT COUNT(*)::int AS n FROM tasks
              WHERE assigned_droplet_id = $1 AND status IN ('assigned', 'in_progress')
           )
           UPDATE droplets SET
              in_flight_allowance = CASE WHEN deferred_until > NOW() THEN in_flight_allowance
                  ELSE GREATEST(1, COALESCE(LEAST(in_flight_allowance, max_concurrent_tasks),
                                            (SELECT n FROM held)) / 2) END,
              in_flight_allowance_ceiling = COALESCE(in_flight_allowance_ceiling, max_concurrent_tasks,
                                                     GREATEST((SELECT n FROM held), 1)),
              deferred_until = GREATEST(deferred_until,
                                        NOW() + make_interval(secs => $2::double precision)),
              updated_at = NOW()
           WHERE id = $1
           RETURNING droplet_id, LEAST(in_flight_allowance, max_concurrent_tasks) AS "allowance?""#,
        internal,
        wait.as_secs_f64(),
    )
    .fetch_one(db)
    .await?;
    Ok(Deferral {
        droplet_id: row.droplet_id,
        allowance: row.allowance,
    })
}

/// A delivery the droplet (internal id) accepted grows its reduced allowance by one; at its
/// ceiling the reduction is over (cleared). Whether it is still reduced.
pub async fn grow(db: &PgPool, internal: i32) -> Result<bool, sqlx::Error> {
    let row = sqlx::query_scalar!(
        r#"UPDATE droplets SET
              in_flight_allowance = CASE
                  WHEN in_flight_allowance + 1 >= LEAST(in_flight_allowance_ceiling, max_concurrent_tasks)
                  THEN NULL ELSE in_flight_allowance + 1 END,
              in_flight_allowance_ceiling = CASE
                  WHEN in_flight_allowance + 1 >= LEAST(in_flight_allowance_ceiling, max_concurrent_tasks)
                  THEN NULL ELSE in_flight_allowance_ceiling END
           WHERE id = $1 AND in_flight_allowance IS NOT NULL
           RETURNING in_flight_allowance"#,
        internal,
    )
    .fetch_optional(db)
    .await?;
    Ok(matches!(row, Some(Some(_))))
}

/// The held droplets as the database shows them.
pub async fn snapshot(db: &PgPool) -> Result<Snapshot, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT id,
              CASE WHEN deferred_until > NOW()
                   THEN EXTRACT(EPOCH FROM (deferred_until - NOW()::timestamp))::float8 END AS "left?",
              in_flight_allowance IS NOT NULL AS "throttled!",
              (drain_requested_at IS NOT NULL AND drained_at IS NULL) AS "draining!"
           FROM droplets
           WHERE deferred_until > NOW() OR in_flight_allowance IS NOT NULL
              OR (drain_requested_at IS NOT NULL AND drained_at IS NULL)"#,
    )
    .fetch_all(db)
    .await?;
    let mut snapshot = Snapshot::default();
    for r in rows {
        if let Some(left) = r.left.filter(|l| *l > 0.0) {
            snapshot
                .deferred
                .push((r.id, Duration::from_secs_f64(left.min(1e6))));
        }
        if r.throttled {
            snapshot.throttled.push(r.id);
        }
        snapshot.draining |= r.draining;
    }
    Ok(snapshot)
}

/// Refreshes this replica's view of held droplets from the database (the `task_router`
/// job's round), so what another replica learned is honoured here too.
pub async fn refresh(db: &PgPool, holds: &Holds) -> Result<(), sqlx::Error> {
    let snapshot = snapshot(db).await?;
    holds.refresh(&snapshot);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, value.parse().unwrap());
        h
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date_capped() {
        assert_eq!(retry_after(&with("2")), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(&with(" 0 ")), Some(Duration::ZERO));
        assert_eq!(retry_after(&with("86400")), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after(&HeaderMap::new()), None);
        assert_eq!(retry_after(&with("soon")), None);
        assert_eq!(retry_after(&with("-3")), None);
        // An HTTP-date: in the past is no wait; ahead is the time left, capped.
        assert_eq!(
            retry_after(&with("Wed, 21 Oct 2015 07:28:00 GMT")),
            Some(Duration::ZERO)
        );
        let ahead = (chrono::Utc::now() + chrono::Duration::seconds(60))
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        let wait = retry_after(&with(&ahead)).unwrap();
        assert!(
            wait > Duration::from_secs(55) && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
        let far = (chrono::Utc::now() + chrono::Duration::days(365))
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        assert_eq!(retry_after(&with(&far)), Some(MAX_RETRY_AFTER));
    }
}
