//! The SQL behind `/metrics/*`, one file per endpoint family. Counts, rates and duration
//! percentiles are computed in PostgreSQL over indexed columns (`created_at`, `completed_at`,
//! `status`, the partial pending index, `heartbeats (droplet_id, received_at)`), and the
//! windows from the kept per-minute rollups (`rollups.rs`), so they cost the same at any
//! history size. This file holds what they share: the windows, their parameters, durations.

use std::collections::BTreeMap;

use crate::validation::FieldError;
use crate::validation::Validate;
use serde::Serialize;
use sqlx::{PgPool, Postgres, Transaction};

mod droplet;
pub mod rollups;
mod routing;
mod summary;
mod tasks;

pub use droplet::{droplet_performance, DropletWorkReport, UptimeReport};
pub use routing::{routing, PendingByCapability, RoutingReport};
pub use summary::{summary, ByStatus, Summary, Window};
pub use tasks::{
    by_type, performance, ByType, Outcomes, Performance, RetentionNote, Retries, TaskPerformance,
    TypeRow,
};

/// The windows the metrics endpoints accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeRange {
    Hour,
    Day,
    Week,
    Month,
}

impl TimeRange {
    pub const ALLOWED: &'static str = "'1h', '24h', '7d' or '30d'";

    /// How long the window is, in days.
    pub fn days(self) -> f64 {
        match self {
            TimeRange::Hour => 1.0 / 24.0,
            TimeRange::Day => 1.0,
            TimeRange::Week => 7.0,
            TimeRange::Month => 30.0,
        }
    }

    pub fn parse(raw: &str) -> Option<TimeRange> {
        Some(match raw {
            "1h" => TimeRange::Hour,
            "24h" => TimeRange::Day,
            "7d" => TimeRange::Week,
            "30d" => TimeRange::Month,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TimeRange::Hour => "1h",
            TimeRange::Day => "24h",
            TimeRange::Week => "7d",
            TimeRange::Month => "30d",
        }
    }

    pub fn seconds(self) -> f64 {
        match self {
            TimeRange::Hour => 3600.0,
            TimeRange::Day => 86_400.0,
            TimeRange::Week => 7.0 * 86_400.0,
            TimeRange::Month => 30.0 * 86_400.0,
        }
    }
}

/// `time_range` (and for task metrics `task_type`) of a metrics request.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RangeParams {
    /// 1h, 24h, 7d or 30d.
    pub time_range: Option<String>,
    /// Only tasks of this type.
    pub task_type: Option<String>,
}

impl RangeParams {
    /// The range asked for, or `default` (validation already refused anything else).
    pub fn range_or(&self, default: TimeRange) -> TimeRange {
        self.time_range
            .as_deref()
            .and_then(TimeRange::parse)
            .unwrap_or(default)
    }
}

impl Validate for RangeParams {
    fn validate(&self) -> Vec<FieldError> {
        match self.time_range.as_deref() {
            Some(r) if TimeRange::parse(r).is_none() => vec![FieldError::new(
                &["time_range"],
                format!("Input should be {}, got {r:?}", TimeRange::ALLOWED),
                "enum",
            )],
            _ => Vec::new(),
        }
    }
}

/// Count, mean, median, 95th percentile and maximum of a duration, in seconds.
#[derive(Debug, Clone, Default, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Durations {
    pub count: i64,
    pub mean_seconds: Option<f64>,
    pub p50_seconds: Option<f64>,
    pub p95_seconds: Option<f64>,
    pub max_seconds: Option<f64>,
}

fn rate(part: i64, whole: i64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

/// Every status with its count (zeros included), from `(status, count)` rows.
fn by_status(rows: Vec<(String, i64)>, statuses: &[&str]) -> BTreeMap<String, i64> {
    let mut map: BTreeMap<String, i64> = statuses.iter().map(|s| (s.to_string(), 0)).collect();
    for (status, n) in rows {
        *map.entry(status).or_insert(0) += n;
    }
    map
}

/// A transaction with room to sort in memory: a percentile over a month of tasks sorts up
/// to a million durations, which at PostgreSQL's default 4 MB spills to disk (2-3x slower).
async fn reading(db: &PgPool) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = db.begin().await?;
    sqlx::query("SET LOCAL work_mem = '64MB'")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}
