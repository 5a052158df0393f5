//! Per-minute rollups of tasks (`migrations/20261207000200_task_rollups.sql`): counts by
//! status and histograms of durations, for every task, per type and per droplet, kept by the
//! triggers on `tasks` (grouped deltas since `20261207001310`) and `task_state_history` as
//! changes happen and folded here by the health monitor's job. A window reads its whole days,
//! and the hours and minutes at its ends (a bounded number of rows at any history size)
//! instead of every task in it.

use sqlx::{PgConnection, PgPool};

use super::Durations;
use crate::services::locks::Singleton;

/// How long minutes are kept (hours: a window longer than a day starts on the hour).
pub const MINUTES_KEPT_HOURS: i32 = 25;
/// How long hours and days are kept: the longest window is 30 days, plus its edges.
pub const HOURS_KEPT_DAYS: i32 = 31;
pub const DAYS_KEPT_DAYS: i32 = 32;

/// The key of every task's figures for the summary and routing (created, ended, assignment
/// latency and run time by when they happened; assignments from the history).
pub const SUMMARY: &str = "s";
/// The key of every task's figures by creation (status now, retries, run time).
pub const CREATED: &str = "c";

/// The key of one task type's figures by creation.
pub fn of_type(task_type: &str) -> String {
    format!("t:{task_type}")
}

/// The key of one droplet's finished work (by its internal id).
pub fn of_droplet(internal_id: i32) -> String {
    format!("d:{internal_id}")
}

/// Below this many tasks in a window, its percentiles are computed from the tasks themselves
/// (exact, and as cheap as the histogram at that size); above, from the kept histogram.
pub const EXACT_BELOW: i64 = 500;

/// What one fold did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Folded {
    /// Change and delta rows moved into the rollups.
    pub changes: u64,
    /// Rollup rows past their grain's keeping deleted.
    pub expired: u64,
    /// Another replica held the fold's lock; nothing was done.
    pub skipped: bool,
}

/// Moves the changes and grouped deltas the triggers appended into the minute, hour and day
/// rollups (each within its keeping), and deletes rollups past it. One replica at a time (an
/// advisory lock; another skips). Changes committed while it runs are not in its snapshot and wait for the
/// next fold.
pub async fn fold(db: &PgPool) -> Result<Folded, sqlx::Error> {
    let mut tx = db.begin().await?;
    if !Singleton::RollupFold.try_for_transaction(&mut tx).await? {
        tx.rollback().await?;
        return Ok(Folded {
            skipped: true,
            ..Default::default()
        });
    }
    // The SQL is the migration's (`task_rollup_fold`), shared with scripts/bench-summary.sh.
    let changes = sqlx::query_scalar!(
        r#"SELECT task_rollup_fold($1, $2, $3) AS "n!""#,
        MINUTES_KEPT_HOURS,
        HOURS_KEPT_DAYS,
        DAYS_KEPT_DAYS
    )
    .fetch_one(&mut *tx)
    .await?;
    let expired = sqlx::query!(
        "DELETE FROM task_rollups
         WHERE (grain = 'm' AND at < NOW()::timestamp - make_interval(hours => $1))
            OR (grain = 'h' AND at < NOW()::timestamp - make_interval(days => $2))
            OR (grain = 'd' AND at < NOW()::timestamp - make_interval(days => $3))",
        MINUTES_KEPT_HOURS,
        HOURS_KEPT_DAYS,
        DAYS_KEPT_DAYS
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(Folded {
        changes: changes as u64,
        expired,
        skipped: false,
    })
}

/// One metric and bucket of a window, summed over its sources.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub metric: String,
    pub bucket: i16,
    pub n: i64,
    pub seconds: f64,
    pub top: Option<f64>,
}

/// The rollups under one key of the window of `seconds` ending now. It starts at the
/// beginning of the minute `seconds` ago (of the hour, for windows longer than a day).
#[derive(Debug, Clone, Default)]
pub struct Rollup {
    cells: Vec<Cell>,
}

/// Reads the window of `seconds` ending now under `key` ([`SUMMARY`], [`CREATED`],
/// [`of_type`], [`of_droplet`]): its days, the hours and minutes at its ends and the changes
/// not folded yet, in one statement.
pub async fn window(
    conn: &mut PgConnection,
    seconds: f64,
    key: &str,
) -> Result<Rollup, sqlx::Error> {
    let cells = sqlx::query!(
        r#"SELECT metric AS "metric!", bucket AS "bucket!", SUM(n)::bigint AS "n!",
                  COALESCE(SUM(seconds), 0)::float8 AS "seconds!", MAX(top) AS top
           FROM task_rollup_window($1, $2) GROUP BY metric, bucket ORDER BY metric, bucket"#,
        seconds,
        key
    )
    .fetch_all(conn)
    .await?
    .into_iter()
    .map(|r| Cell {
        metric: r.metric,
        bucket: r.bucket,
        n: r.n,
        seconds: r.seconds,
        top: r.top,
    })
    .collect();
    Ok(Rollup { cells })
}

impl Rollup {
    pub fn of(cells: Vec<Cell>) -> Rollup {
        Rollup { cells }
    }

    /// How many of `metric` (created, completed, failed, cancelled, assign, run, now:<status>,
    /// retries, runc, assignments).
    pub fn count(&self, metric: &str) -> i64 {
        self.cells
            .iter()
            .filter(|c| c.metric == metric)
            .map(|c| c.n)
            .sum()
    }

    /// The seconds (for `retries`, the retries) summed over `metric`.
    pub fn sum(&self, metric: &str) -> f64 {
        self.cells
            .iter()
            .filter(|c| c.metric == metric)
            .map(|c| c.seconds)
            .sum()
    }

    /// The tasks in `status` now (of those the window's key counts by creation).
    pub fn now_in(&self, status: &str) -> i64 {
        self.count(&format!("now:{status}"))
    }

    /// The tasks in any status now (of those the window's key counts by creation).
    pub fn now_total(&self) -> i64 {
        self.cells
            .iter()
            .filter(|c| c.metric.starts_with("now:"))
            .map(|c| c.n)
            .sum()
    }

    /// The mean of a duration metric, exact; none when there is none.
    pub fn mean(&self, metric: &str) -> Option<f64> {
        let n = self.count(metric);
        (n > 0).then(|| self.sum(metric) / n as f64)
    }

    /// Count, mean, percentiles and maximum of a duration metric (`assign`, `run`). Count
    /// and mean are exact; p50, p95 and the maximum are estimated within their bucket (9 %
    /// wide), spreading a bucket's values evenly over it, as `percentile_cont` interpolates.
    pub fn durations(&self, metric: &str) -> Durations {
        let buckets: Vec<&Cell> = self
            .cells
            .iter()
            .filter(|c| c.metric == metric && c.n > 0)
            .collect();
        let count: i64 = buckets.iter().map(|c| c.n).sum();
        if count == 0 {
            return Durations::default();
        }
        let seconds: f64 = buckets.iter().map(|c| c.seconds).sum();
        let max = buckets.last().map(|c| {
            let (lo, hi) = edges(c.bucket);
            c.top.unwrap_or(hi).clamp(lo, hi)
        });
        let at = |p: f64| percentile(&buckets, count, p, max.unwrap_or(0.0));
        Durations {
            count,
            mean_seconds: Some(seconds / count as f64),
            p50_seconds: Some(at(0.5)),
            p95_seconds: Some(at(0.95)),
            max_seconds: max,
        }
    }
}

/// The lower and upper edge of a bucket, in seconds (see the migration's `task_rollup_bucket`).
pub fn edges(bucket: i16) -> (f64, f64) {
    if bucket < 0 {
        return (0.0, 0.001);
    }
    let at = |b: f64| 0.001 * (b / 8.0).exp2();
    (at(f64::from(bucket)), at(f64::from(bucket) + 1.0))
}

/// The value of rank `i` (0-based) among `count` values in `buckets` (ascending), each
/// bucket's values spread evenly over it; never above `max`.
fn value_at(buckets: &[&Cell], i: i64, max: f64) -> f64 {
    let mut before = 0;
    for c in buckets {
        if i < before + c.n {
            let (lo, hi) = edges(c.bucket);
            let within = (i - before) as f64 + 0.5;
            return (lo + (hi - lo) * within / c.n as f64).min(max);
        }
        before += c.n;
    }
    max
}

/// `percentile_cont(p)` over the histogram: the ranks around `p * (count - 1)`, interpolated.
fn percentile(buckets: &[&Cell], count: i64, p: f64, max: f64) -> f64 {
    let rank = p * (count - 1) as f64;
    let low = rank.floor();
    let a = value_at(buckets, low as i64, max);
    let b = value_at(buckets, rank.ceil() as i64, max);
    a + (b - a) * (rank - low)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(metric: &str, bucket: i16, n: i64, seconds: f64, top: Option<f64>) -> Cell {
        Cell {
            metric: metric.to_string(),
            bucket,
            n,
            seconds,
            top,
        }
    }

    /// The bucket of `secs`, as the migration's `task_rollup_bucket` computes it.
    fn bucket_of(secs: f64) -> i16 {
        if secs <= 0.001 {
            -1
        } else {
            (8.0 * (secs / 0.001).ln() / 2f64.ln()).floor() as i16
        }
    }

    #[test]
    fn edges_hold_the_values_of_their_bucket() {
        for secs in [0.0015, 0.05, 1.0, 2.5, 17.0, 3600.0, 86_400.0] {
            let (lo, hi) = edges(bucket_of(secs));
            assert!(lo <= secs && secs < hi, "{secs} not in [{lo}, {hi})");
            assert!(hi / lo < 1.091, "bucket wider than 9 %");
        }
        assert_eq!(edges(-1), (0.0, 0.001));
    }

    #[test]
    fn counts_and_means_are_exact_percentiles_within_a_bucket() {
        // 1000 durations, 10 ms apart: 0.01 s to 10 s.
        let values: Vec<f64> = (1..=1000).map(|k| k as f64 * 0.01).collect();
        let mut cells: Vec<Cell> = Vec::new();
        for v in &values {
            let b = bucket_of(*v);
            match cells.iter_mut().find(|c| c.bucket == b) {
                Some(c) => {
                    c.n += 1;
                    c.seconds += v;
                    c.top = c.top.map(|t| t.max(*v));
                }
                None => cells.push(cell("run", b, 1, *v, Some(*v))),
            }
        }
        cells.push(cell("created", 0, 7, 0.0, None));
        let rollup = Rollup::of(cells);
        assert_eq!(rollup.count("created"), 7);
        let d = rollup.durations("run");
        assert_eq!(d.count, 1000);
        let mean = values.iter().sum::<f64>() / 1000.0;
        assert!((d.mean_seconds.unwrap() - mean).abs() < 1e-9);
        assert_eq!(d.max_seconds, Some(10.0));
        // percentile_cont: p50 = 5.005, p95 = 9.5005.
        for (got, exact) in [(d.p50_seconds, 5.005), (d.p95_seconds, 9.5005)] {
            let got = got.unwrap();
            assert!((got - exact).abs() / exact < 0.09, "{got} vs {exact}");
        }
    }

    #[test]
    fn a_maximum_kept_from_a_removed_task_is_bounded_by_its_bucket() {
        // The largest value once kept was 100 s, but the bucket left holds around 1 s.
        let b = bucket_of(1.0);
        let rollup = Rollup::of(vec![cell("assign", b, 2, 2.0, Some(100.0))]);
        let d = rollup.durations("assign");
        assert_eq!(d.max_seconds, Some(edges(b).1));
        assert!(d.p95_seconds.unwrap() <= d.max_seconds.unwrap());
    }

    #[test]
    fn an_empty_window_has_no_durations() {
        let d = Rollup::default().durations("assign");
        assert_eq!(d.count, 0);
        assert_eq!(d.mean_seconds, None);
    }
}
