//! The invariants every scenario checks in the database afterwards: every acknowledged task
//! exists; every task is in exactly one valid state with the columns that state requires;
//! its history is one unbroken chain of allowed moves ending at the row's status; no task
//! was assigned twice without a recovery move in between, nor completed twice.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};

use chrono::NaiveDateTime;
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TaskRow {
    pub id: i32,
    pub trace_id: Uuid,
    pub status: String,
    pub assigned_droplet_id: Option<i32>,
    pub assigned_at: Option<NaiveDateTime>,
    pub started_at: Option<NaiveDateTime>,
    pub completed_at: Option<NaiveDateTime>,
    pub retry_count: Option<i32>,
    pub max_retries: Option<i32>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct HistoryRow {
    pub id: i32,
    pub task_id: i32,
    pub from_status: Option<String>,
    pub to_status: String,
}

/// The moves the contract allows (any actor).
const MOVES: [(&str, &str); 10] = [
    ("pending", "assigned"),
    ("pending", "cancelled"),
    ("pending", "failed"),
    ("assigned", "in_progress"),
    ("assigned", "cancelled"),
    ("assigned", "pending"),
    ("assigned", "failed"),
    ("in_progress", "completed"),
    ("in_progress", "failed"),
    ("failed", "pending"),
];

/// What the check found.
#[derive(Debug, Default, Clone)]
pub struct Findings {
    pub tasks: usize,
    /// Acknowledged trace ids with no task.
    pub missing: Vec<Uuid>,
    /// Tasks with two `pending -> assigned` and no recovery move between them.
    pub double_assigned: Vec<i32>,
    /// Tasks with two moves to `completed`.
    pub completed_twice: Vec<i32>,
    /// Everything else that is wrong, one line each.
    pub violations: Vec<String>,
    /// Tasks per status.
    pub by_status: HashMap<String, usize>,
}

impl Findings {
    /// Tasks lost: acknowledged and missing.
    pub fn lost(&self) -> usize {
        self.missing.len()
    }

    /// Tasks duplicated: assigned twice without recovery, or completed twice.
    pub fn duplicated(&self) -> usize {
        self.double_assigned
            .iter()
            .chain(&self.completed_twice)
            .collect::<HashSet<_>>()
            .len()
    }

    pub fn is_clean(&self) -> bool {
        self.missing.is_empty()
            && self.double_assigned.is_empty()
            && self.completed_twice.is_empty()
            && self.violations.is_empty()
    }

    /// Panics with every finding when anything is wrong.
    pub fn assert_clean(&self) {
        assert!(
            self.is_clean(),
            "invariants broken: missing {:?}, double assigned {:?}, completed twice {:?}, violations (first 20 of {}): {:#?}",
            self.missing,
            self.double_assigned,
            self.completed_twice,
            self.violations.len(),
            self.violations.iter().take(20).collect::<Vec<_>>()
        );
    }
}

/// Checks the invariants over the rows (pure, so it is itself tested below).
pub fn check(tasks: &[TaskRow], history: &[HistoryRow], acked: &[Uuid]) -> Findings {
    let mut f = Findings {
        tasks: tasks.len(),
        ..Default::default()
    };
    let traces: HashSet<Uuid> = tasks.iter().map(|t| t.trace_id).collect();
    f.missing = acked
        .iter()
        .filter(|t| !traces.contains(t))
        .copied()
        .collect();
    if traces.len() != tasks.len() {
        f.violations
            .push("two task rows share a trace id".to_string());
    }

    let mut rows: HashMap<i32, Vec<&HistoryRow>> = HashMap::new();
    for h in history {
        rows.entry(h.task_id).or_default().push(h);
    }
    for list in rows.values_mut() {
        list.sort_by_key(|h| h.id);
    }
    let known: HashSet<i32> = tasks.iter().map(|t| t.id).collect();
    for id in rows.keys().filter(|id| !known.contains(id)) {
        f.violations
            .push(format!("history rows for task {id}, which does not exist"));
    }

    for t in tasks {
        *f.by_status.entry(t.status.clone()).or_insert(0) += 1;
        let mut bad = |what: String| f.violations.push(format!("task {}: {what}", t.id));
        check_row(t, &mut bad);
        let h = rows.get(&t.id).map(Vec::as_slice).unwrap_or(&[]);
        let Some(first) = h.first() else {
            bad("no history".into());
            continue;
        };
        if first.from_status.is_some() || first.to_status != "pending" {
            bad(format!(
                "history starts {:?} -> {}, not the creation (none -> pending)",
                first.from_status, first.to_status
            ));
        }
        let mut assigned_since_recovery = 0;
        let mut completions = 0;
        for pair in h.windows(2) {
            let (prev, row) = (pair[0], pair[1]);
            let from = row.from_status.as_deref().unwrap_or("none");
            if from != prev.to_status {
                bad(format!(
                    "history row {} moves from {from} but the task was {}",
                    row.id, prev.to_status
                ));
            }
            if !MOVES.contains(&(from, row.to_status.as_str())) {
                bad(format!(
                    "history row {}: {from} -> {} is not a move the contract allows",
                    row.id, row.to_status
                ));
            }
        }
        for row in h {
            let from = row.from_status.as_deref();
            match (from, row.to_status.as_str()) {
                (Some("pending"), "assigned") => assigned_since_recovery += 1,
                (Some("assigned" | "failed"), "pending") => assigned_since_recovery = 0,
                _ => {}
            }
            if assigned_since_recovery > 1 {
                f.double_assigned.push(t.id);
                assigned_since_recovery = 1;
            }
            if row.to_status == "completed" {
                completions += 1;
            }
        }
        if completions > 1 {
            f.completed_twice.push(t.id);
        }
        if let Some(last) = h.last() {
            if last.to_status != t.status {
                f.violations.push(format!(
                    "task {}: the last history row says {} but the task is {}",
                    t.id, last.to_status, t.status
                ));
            }
        }
    }
    f.double_assigned.sort_unstable();
    f.double_assigned.dedup();
    f
}

/// Whether a state requires (true), forbids (false) or leaves (None) the holder, then
/// `assigned_at`, `started_at` and `completed_at`.
type Required = (Option<bool>, Option<bool>, Option<bool>, Option<bool>);

/// The columns each state requires (and forbids).
fn check_row(t: &TaskRow, bad: &mut impl FnMut(String)) {
    let some = |v: &Option<NaiveDateTime>| v.is_some();
    let (holder, assigned, started, completed) = (
        t.assigned_droplet_id.is_some(),
        some(&t.assigned_at),
        some(&t.started_at),
        some(&t.completed_at),
    );
    let expected: Option<Required> = match t.status.as_str() {
        "pending" => Some((Some(false), Some(false), Some(false), Some(false))),
        "assigned" => Some((Some(true), Some(true), Some(false), Some(false))),
        "in_progress" => Some((Some(true), Some(true), Some(true), Some(false))),
        "completed" => Some((Some(true), Some(true), Some(true), Some(true))),
        "failed" | "cancelled" => Some((None, None, None, Some(true))),
        _ => None,
    };
    let Some((h, a, s, c)) = expected else {
        bad(format!("unknown status {:?}", t.status));
        return;
    };
    for (name, want, got) in [
        ("assigned_droplet_id", h, holder),
        ("assigned_at", a, assigned),
        ("started_at", s, started),
        ("completed_at", c, completed),
    ] {
        if want.is_some_and(|w| w != got) {
            bad(format!(
                "{} with {name} {}",
                t.status,
                if got { "set" } else { "unset" }
            ));
        }
    }
    if let (Some(r), Some(m)) = (t.retry_count, t.max_retries) {
        if r > m {
            bad(format!("retry_count {r} over max_retries {m}"));
        }
    }
}

pub async fn load(pool: &PgPool) -> (Vec<TaskRow>, Vec<HistoryRow>) {
    let tasks = sqlx::query_as(
        "SELECT id, trace_id, status, assigned_droplet_id, assigned_at, started_at, completed_at,
                retry_count, max_retries FROM tasks ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .expect("read tasks");
    let history = sqlx::query_as(
        "SELECT id, task_id, from_status, to_status FROM task_state_history ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .expect("read history");
    (tasks, history)
}

/// Loads the rows and checks them.
pub async fn check_database(pool: &PgPool, acked: &[Uuid]) -> Findings {
    let (tasks, history) = load(pool).await;
    check(&tasks, &history, acked)
}

/// How many of these tasks are not finished (completed, failed or cancelled).
pub async fn unfinished(pool: &PgPool, ids: &[i32]) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT id FROM tasks WHERE id = ANY($1) AND status NOT IN ('completed', 'failed', 'cancelled') ORDER BY id",
    )
    .bind(ids)
    .fetch_all(pool)
    .await
    .expect("read unfinished")
}

/// How many of these tasks are completed.
pub async fn completed(pool: &PgPool, ids: &[i32]) -> usize {
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM tasks WHERE id = ANY($1) AND status = 'completed'",
    )
    .bind(ids)
    .fetch_one(pool)
    .await
    .expect("count completed");
    n as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at() -> Option<NaiveDateTime> {
        Some(chrono::Utc::now().naive_utc())
    }

    fn task(id: i32, status: &str) -> TaskRow {
        let (holder, a, s, c) = match status {
            "pending" => (None, None, None, None),
            "assigned" => (Some(1), at(), None, None),
            "in_progress" => (Some(1), at(), at(), None),
            _ => (Some(1), at(), at(), at()),
        };
        TaskRow {
            id,
            trace_id: Uuid::new_v4(),
            status: status.into(),
            assigned_droplet_id: holder,
            assigned_at: a,
            started_at: s,
            completed_at: c,
            retry_count: Some(0),
            max_retries: Some(3),
        }
    }

    fn history(task: i32, moves: &[(Option<&str>, &str)]) -> Vec<HistoryRow> {
        moves
            .iter()
            .enumerate()
            .map(|(i, (from, to))| HistoryRow {
                id: task * 100 + i as i32,
                task_id: task,
                from_status: from.map(str::to_string),
                to_status: to.to_string(),
            })
            .collect()
    }

    const LIFE: [(Option<&str>, &str); 4] = [
        (None, "pending"),
        (Some("pending"), "assigned"),
        (Some("assigned"), "in_progress"),
        (Some("in_progress"), "completed"),
    ];

    #[test]
    fn a_whole_life_with_a_requeue_and_a_retry_is_clean() {
        let t = task(1, "completed");
        let h = history(
            1,
            &[
                (None, "pending"),
                (Some("pending"), "assigned"),
                (Some("assigned"), "pending"),
                (Some("pending"), "assigned"),
                (Some("assigned"), "in_progress"),
                (Some("in_progress"), "failed"),
                (Some("failed"), "pending"),
                (Some("pending"), "assigned"),
                (Some("assigned"), "in_progress"),
                (Some("in_progress"), "completed"),
            ],
        );
        let f = check(std::slice::from_ref(&t), &h, &[t.trace_id]);
        assert!(f.is_clean(), "{f:?}");
        assert_eq!((f.lost(), f.duplicated()), (0, 0));
    }

    #[test]
    fn a_second_assignment_without_recovery_is_a_duplicate() {
        let t = task(1, "assigned");
        let h = history(
            1,
            &[
                (None, "pending"),
                (Some("pending"), "assigned"),
                (Some("pending"), "assigned"),
            ],
        );
        let f = check(&[t], &h, &[]);
        assert_eq!(f.double_assigned, vec![1]);
        assert_eq!(f.duplicated(), 1);
        assert!(!f.is_clean());
    }

    #[test]
    fn a_second_completion_is_a_duplicate() {
        let t = task(2, "completed");
        let mut moves = LIFE.to_vec();
        moves.push((Some("in_progress"), "completed"));
        let f = check(&[t], &history(2, &moves), &[]);
        assert_eq!(f.completed_twice, vec![2]);
        assert!(!f.is_clean());
    }

    #[test]
    fn an_acknowledged_task_that_is_missing_is_lost() {
        let t = task(3, "completed");
        let ghost = Uuid::new_v4();
        let f = check(
            std::slice::from_ref(&t),
            &history(3, &LIFE),
            &[t.trace_id, ghost],
        );
        assert_eq!(f.missing, vec![ghost]);
        assert_eq!(f.lost(), 1);
    }

    #[test]
    fn history_that_disagrees_with_the_row_is_caught() {
        let t = task(4, "in_progress");
        let f = check(&[t], &history(4, &LIFE), &[]);
        assert!(
            f.violations.iter().any(|v| v.contains("last history row")),
            "{f:?}"
        );
    }

    #[test]
    fn a_half_changed_row_is_caught() {
        let mut t = task(5, "completed");
        t.completed_at = None;
        let f = check(&[t], &history(5, &LIFE), &[]);
        assert!(
            f.violations
                .iter()
                .any(|v| v.contains("completed_at unset")),
            "{f:?}"
        );
        let mut t = task(6, "pending");
        t.assigned_droplet_id = Some(3);
        let f = check(&[t], &history(6, &[(None, "pending")]), &[]);
        assert!(
            f.violations
                .iter()
                .any(|v| v.contains("assigned_droplet_id set")),
            "{f:?}"
        );
    }

    #[test]
    fn a_forbidden_move_or_a_broken_chain_is_caught() {
        let t = task(7, "completed");
        let h = history(
            7,
            &[
                (None, "pending"),
                (Some("pending"), "assigned"),
                (Some("assigned"), "completed"),
            ],
        );
        let f = check(&[t], &h, &[]);
        assert!(
            f.violations.iter().any(|v| v.contains("not a move")),
            "{f:?}"
        );
        let t = task(8, "completed");
        let h = history(
            8,
            &[
                (None, "pending"),
                (Some("assigned"), "in_progress"),
                (Some("in_progress"), "completed"),
            ],
        );
        let f = check(&[t], &h, &[]);
        assert!(
            f.violations.iter().any(|v| v.contains("but the task was")),
            "{f:?}"
        );
        let f = check(&[task(9, "pending")], &[], &[]);
        assert!(
            f.violations.iter().any(|v| v.contains("no history")),
            "{f:?}"
        );
    }
}
