//! `GET /tasks`: the filters, each declared once and turned into SQL in one place, the page,
//! its total, and the payloads read within a byte budget.

use serde::Deserialize;
use serde_json::Value;
use sqlx::{PgPool, Postgres, QueryBuilder};

use crate::services::sql_columns::{concat_plus, plain_columns};
use crate::services::state_machine::Status;
use crate::services::task_store::{self, Task};
use crate::validation::{range, FieldError, Validate};

/// Filters of `GET /tasks`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TaskFilter {
    pub status: Option<String>,
    pub task_type: Option<String>,
    pub priority_min: Option<i32>,
    pub priority_max: Option<i32>,
    pub assigned_droplet_id: Option<i32>,
    pub required_capability: Option<String>,
    pub created_by: Option<String>,
    pub limit: Option<i64>,
    pub offset: Option<i64>,
    /// Keyset paging: the tasks after this one (the previous page's `next_after_id`).
    pub after_id: Option<i32>,
    /// `payload` to include each task's `payload` and `result` (left out by default).
    pub include: Option<String>,
}

/// A filter's value, bound into the statement.
#[derive(Debug, Clone, Copy)]
enum Bound<'a> {
    Text(&'a str),
    Int(i32),
}

/// One condition a field of [`TaskFilter`] sets: its SQL over `tasks t`, and over
/// `task_counts` when the kept counts can answer it (they are kept per status and type);
/// `$` stands for its value.
#[derive(Debug, Clone, Copy)]
struct Condition<'a> {
    value: Bound<'a>,
    sql: &'static str,
    kept: Option<&'static str>,
}

/// `AND <sql>` with `$` bound to `value`.
fn push_condition(q: &mut QueryBuilder<Postgres>, sql: &str, value: Bound<'_>) {
    let (before, after) = sql.split_once('$').unwrap_or((sql, ""));
    q.push(" AND ").push(before);
    match value {
        Bound::Text(s) => q.push_bind(s),
        Bound::Int(i) => q.push_bind(i),
    };
    q.push(after);
}

impl TaskFilter {
    pub fn include_payload(&self) -> bool {
        self.include.as_deref().is_some_and(|i| {
            i.split(',')
                .any(|p| matches!(p.trim(), "payload" | "result"))
        })
    }

    /// The conditions this filter sets, one line each: the value, its SQL over `tasks t`, its
    /// SQL over the kept counts if they can answer it. Every field is named here (a new one
    /// fails to compile until it is placed): a condition, or paging and presentation.
    fn conditions<'a>(&'a self) -> Vec<Condition<'a>> {
        let TaskFilter {
            status,
            task_type,
            priority_min,
            priority_max,
            assigned_droplet_id,
            required_capability,
            created_by,
            limit: _,
            offset: _,
            after_id: _,
            include: _,
        } = self;
        let text = |v: &'a Option<String>| v.as_deref().map(Bound::Text);
        let int = |v: &Option<i32>| v.map(Bound::Int);
        [
            (text(status), "t.status = $", Some("status = $")),
            (text(task_type), "t.task_type = $", Some("task_type = $")),
            (int(priority_min), "t.priority >= $", None),
            (int(priority_max), "t.priority <= $", None),
            (
                int(assigned_droplet_id),
                "t.assigned_droplet_id = (SELECT id FROM droplets WHERE droplet_id = $)",
                None,
            ),
            (text(required_capability), "t.required_capability = $", None),
            (text(created_by), "t.created_by = $", None),
        ]
        .into_iter()
        .filter_map(|(value, sql, kept)| {
            Some(Condition {
                value: value?,
                sql,
                kept,
            })
        })
        .collect()
    }

    /// ` WHERE TRUE AND ...` over `tasks t`.
    fn push_where(&self, q: &mut QueryBuilder<Postgres>) {
        q.push(" WHERE TRUE");
        for c in self.conditions() {
            push_condition(q, c.sql, c.value);
        }
    }

    /// The count of the kept totals that answers this filter exactly, when they can (every
    /// condition has its SQL over them).
    fn kept_total(&self) -> Option<QueryBuilder<Postgres>> {
        let mut q =
            QueryBuilder::new("SELECT COALESCE(SUM(n), 0)::bigint FROM task_counts WHERE TRUE");
        for c in self.conditions() {
            push_condition(&mut q, c.kept?, c.value);
        }
        Some(q)
    }
}

impl Validate for TaskFilter {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if let Some(s) = &self.status {
            if Status::parse(s).is_none() {
                errors.push(FieldError::new(
                    &["status"],
                    "Input should be 'pending', 'assigned', 'in_progress', 'completed', 'failed' or 'cancelled'",
                    "enum",
                ));
            }
        }
        range(
            "priority_min",
            self.priority_min.map(i64::from),
            1,
            10,
            &mut errors,
        );
        range(
            "priority_max",
            self.priority_max.map(i64::from),
            1,
            10,
            &mut errors,
        );
        range("limit", self.limit, 1, 500, &mut errors);
        range("offset", self.offset, 0, i64::MAX, &mut errors);
        range(
            "after_id",
            self.after_id.map(i64::from),
            1,
            i64::from(i32::MAX),
            &mut errors,
        );
        errors
    }
}

pub struct Page {
    pub tasks: Vec<Task>,
    /// The tasks that match the filters: exact for status and type alone, else exact up to
    /// [`TOTAL_BOUND`] and a lower bound past it.
    pub total: i64,
    pub total_exact: bool,
    pub limit: i64,
    pub offset: i64,
    /// Whether more tasks match past this page.
    pub has_more: bool,
    /// With `?include=payload`: for each task, whether its payload and result were read
    /// (false for those past [`LIST_PAYLOAD_BYTES`]). Empty otherwise.
    pub payload_read: Vec<bool>,
}

/// Most bytes of payloads and results one listing carries (`?include=payload`).
pub const LIST_PAYLOAD_BYTES: usize = 2 * 1024 * 1024;

/// The task columns for listings, without `payload` and `result`: a page of large payloads
/// costs neither the database's network nor this process their size. When they are asked
/// for, [`list`] reads their sizes and then only the ones that fit [`LIST_PAYLOAD_BYTES`].
const LIST_COLUMNS: &str = plain_columns!(task_store::task_columns!(concat_plus {}
    ("'null'::jsonb AS payload", "NULL::jsonb AS result") {}));

impl Page {
    /// The tasks as a listing shows them: without `payload` and `result` unless asked for,
    /// and then only those read within [`LIST_PAYLOAD_BYTES`] (the others say
    /// `payload_truncated`). Also whether any was truncated.
    pub fn shown(&self) -> (Vec<Value>, bool) {
        let asked = !self.payload_read.is_empty();
        let mut truncated = false;
        let shown = self
            .tasks
            .iter()
            .enumerate()
            .map(|(i, task)| {
                let mut v = serde_json::to_value(task).unwrap_or_default();
                if let Value::Object(map) = &mut v {
                    if !self.payload_read.get(i).copied().unwrap_or(false) {
                        map.remove("payload");
                        map.remove("result");
                        if asked {
                            truncated = true;
                            map.insert("payload_truncated".into(), Value::Bool(true));
                        }
                    }
                }
                v
            })
            .collect();
        (shown, truncated)
    }

    /// The cursor of the next page (`after_id`), when there is one.
    pub fn next_after_id(&self) -> Option<i32> {
        self.tasks.last().map(|t| t.id).filter(|_| self.has_more)
    }

    /// Reads the payloads and results of the page's tasks, in order, while they fit
    /// [`LIST_PAYLOAD_BYTES`] (a task too large is passed over and the next ones still
    /// tried): first their sizes as the database writes them, then only the chosen ones.
    async fn read_payloads(&mut self, db: &PgPool) -> Result<(), sqlx::Error> {
        let ids: Vec<i32> = self.tasks.iter().map(|t| t.id).collect();
        let sizes = sqlx::query!(
            r#"SELECT id, (octet_length(payload::text)
                         + COALESCE(octet_length(result::text), 0))::bigint AS "size!"
               FROM tasks WHERE id = ANY($1)"#,
            &ids
        )
        .fetch_all(db)
        .await?;
        let size_of: std::collections::HashMap<i32, i64> =
            sizes.into_iter().map(|r| (r.id, r.size)).collect();
        let mut budget = LIST_PAYLOAD_BYTES as i64;
        let mut chosen = Vec::new();
        for id in &ids {
            match size_of.get(id) {
                Some(&size) if size <= budget => {
                    budget -= size;
                    chosen.push(*id);
                }
                _ => {}
            }
        }
        let bodies = sqlx::query!(
            "SELECT id, payload, result FROM tasks WHERE id = ANY($1)",
            &chosen
        )
        .fetch_all(db)
        .await?;
        let mut body_of: std::collections::HashMap<i32, (Value, Option<Value>)> = bodies
            .into_iter()
            .map(|r| (r.id, (r.payload, r.result)))
            .collect();
        self.payload_read = self
            .tasks
            .iter_mut()
            .map(|task| match body_of.remove(&task.id) {
                Some((payload, result)) => {
                    task.payload = payload;
                    task.result = result;
                    true
                }
                None => false,
            })
            .collect();
        Ok(())
    }
}

/// `total` of a filter on more than status and type is counted exactly up to this many
/// matching tasks; past it, it says "at least" (`total_exact: false`), so a listing costs the
/// same at a million tasks as at a thousand. Filters on status and type alone (and none) are
/// exact at any size: their totals are the counts kept in `task_counts`.
pub const TOTAL_BOUND: i64 = 10_000;

/// Newest first, with the total that matches the filters. With `after_id` (keyset paging),
/// the tasks after that one in the same order, whatever its depth.
pub async fn list(db: &PgPool, f: &TaskFilter) -> Result<Page, sqlx::Error> {
    let limit = f.limit.unwrap_or(50);
    let offset = if f.after_id.is_some() {
        0
    } else {
        f.offset.unwrap_or(0)
    };
    let mut q = QueryBuilder::new(const_format::concatcp!(
        "SELECT ",
        LIST_COLUMNS,
        " FROM tasks t LEFT JOIN droplets d ON d.id = t.assigned_droplet_id"
    ));
    f.push_where(&mut q);
    if let Some(after) = f.after_id {
        q.push(" AND (t.created_at, t.id) < (SELECT a.created_at, a.id FROM tasks a WHERE a.id = ")
            .push_bind(after)
            .push(")");
    }
    q.push(" ORDER BY t.created_at DESC, t.id DESC LIMIT ")
        .push_bind(limit + 1)
        .push(" OFFSET ")
        .push_bind(offset);
    let mut tasks: Vec<Task> = q.build_query_as().fetch_all(db).await?;
    let has_more = tasks.len() as i64 > limit;
    tasks.truncate(limit as usize);
    // The total of the whole filter (not of what follows a cursor): this page when it is the
    // whole of it, else the counts kept as changes happen when they answer the filter, else
    // counted up to a bound.
    let (total, total_exact) = if f.after_id.is_none() && offset == 0 && !has_more {
        (tasks.len() as i64, true)
    } else if let Some(mut kept) = f.kept_total() {
        (kept.build_query_scalar().fetch_one(db).await?, true)
    } else {
        let mut q = QueryBuilder::new("SELECT COUNT(*) FROM (SELECT 1 FROM tasks t");
        f.push_where(&mut q);
        q.push(" LIMIT ")
            .push_bind(TOTAL_BOUND + 1)
            .push(") bounded");
        let counted: i64 = q.build_query_scalar().fetch_one(db).await?;
        if counted > TOTAL_BOUND {
            (TOTAL_BOUND, false)
        } else {
            (counted, true)
        }
    };
    let mut page = Page {
        tasks,
        total,
        total_exact,
        limit,
        offset,
        has_more,
        payload_read: Vec::new(),
    };
    if f.include_payload() {
        page.read_payloads(db).await?;
    }
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every condition's SQL, over the table and over the kept counts, has one place for its
    /// value.
    #[test]
    fn every_condition_binds_its_value_once() {
        let all = TaskFilter {
            status: Some("pending".into()),
            task_type: Some("t".into()),
            priority_min: Some(1),
            priority_max: Some(9),
            assigned_droplet_id: Some(3),
            required_capability: Some("c".into()),
            created_by: Some("5".into()),
            ..TaskFilter::default()
        };
        for c in all.conditions() {
            for sql in std::iter::once(c.sql).chain(c.kept) {
                assert_eq!(sql.matches('$').count(), 1, "{sql}");
            }
        }
    }
}
