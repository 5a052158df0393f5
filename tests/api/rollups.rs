//! The per-minute rollups behind the metrics' windows (issue 26, item 4): after creations and
//! transitions across many minutes and hours, folded or not yet, they equal a count of the
//! tables, and `/metrics/summary` and the other windowed answers give what the full scans of
//! the tables gave.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;

/// 700 tasks over the last 22 hours, one every 113 s, in every status, written straight into
/// the table with past times, with a history row for each assignment. None near an hour ago: the rollups' windows are to the minute,
/// the scans' to the microsecond.
async fn history(app: &TestApp, droplet: i32) {
    sqlx::query(
        "INSERT INTO tasks (task_type, title, payload, status, assigned_droplet_id, created_at,
                            assigned_at, started_at, completed_at, retry_count)
         SELECT 'type' || (g % 3), 'old ' || g, '{}', s.status,
                CASE WHEN s.status NOT IN ('pending', 'cancelled') THEN $1 END, c,
                CASE WHEN s.status NOT IN ('pending', 'cancelled') THEN c + make_interval(secs => 0.2 + (g % 17) * 0.731) END,
                CASE WHEN s.status IN ('in_progress', 'completed', 'failed') THEN c + make_interval(secs => 3 + g % 5) END,
                CASE WHEN s.status IN ('completed', 'failed', 'cancelled') THEN c + make_interval(secs => 10 + (g % 23) * 3.17) END,
                g % 2
         FROM generate_series(1, 700) g,
              LATERAL (SELECT (ARRAY['pending', 'assigned', 'in_progress', 'completed', 'completed',
                                     'failed', 'cancelled'])[1 + g % 7] AS status) s,
              LATERAL (SELECT NOW()::timestamp - make_interval(secs => 120 + g * 113) AS c) t
         WHERE 120 + g * 113 NOT BETWEEN 3300 AND 3900",
    )
    .bind(droplet)
    .execute(&app.db)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO task_state_history (task_id, from_status, to_status, changed_by, changed_at)
         SELECT id, 'pending', 'assigned', 'task_router', assigned_at FROM tasks WHERE assigned_at IS NOT NULL",
    )
    .execute(&app.db)
    .await
    .unwrap();
}

type Figure = (String, String, String, i64, String);

/// Per key, minute (or hour, day) and metric, the count and seconds of the tasks and history
/// rows as they are, counted straight from the tables.
async fn counted(app: &TestApp, unit: &str) -> Vec<Figure> {
    sqlx::query_as(
        "SELECT dim, at::text, metric, n, trim_scale(secs)::text FROM (
            SELECT 's' AS dim, date_trunc($1, created_at) AS at, 'created' AS metric, COUNT(*) AS n,
                   0::numeric AS secs
            FROM tasks GROUP BY 2
            UNION ALL
            SELECT 's', date_trunc($1, completed_at), status, COUNT(*), 0 FROM tasks
            WHERE status IN ('completed', 'failed', 'cancelled') AND completed_at IS NOT NULL GROUP BY 2, 3
            UNION ALL
            SELECT 's', date_trunc($1, created_at), 'assign', COUNT(*), SUM(extract(epoch FROM assigned_at - created_at))
            FROM tasks WHERE assigned_at IS NOT NULL GROUP BY 2
            UNION ALL
            SELECT 's', date_trunc($1, completed_at), 'run', COUNT(*), SUM(extract(epoch FROM completed_at - started_at))
            FROM tasks WHERE status = 'completed' AND started_at IS NOT NULL AND completed_at IS NOT NULL GROUP BY 2
            UNION ALL
            SELECT 's', date_trunc($1, changed_at), 'assignments', COUNT(*), 0 FROM task_state_history
            WHERE to_status = 'assigned' GROUP BY 2
            UNION ALL
            SELECT k, date_trunc($1, created_at), 'now:' || status, COUNT(*), 0
            FROM tasks, LATERAL (VALUES ('c'), ('t:' || task_type)) v(k) GROUP BY 1, 2, 3
            UNION ALL
            SELECT k, date_trunc($1, created_at), 'retries', COUNT(*), SUM(retry_count)
            FROM tasks, LATERAL (VALUES ('c'), ('t:' || task_type)) v(k) WHERE retry_count > 0 GROUP BY 1, 2
            UNION ALL
            SELECT k, date_trunc($1, created_at), 'runc', COUNT(*), SUM(extract(epoch FROM completed_at - started_at))
            FROM tasks, LATERAL (VALUES ('c'), ('t:' || task_type)) v(k)
            WHERE status = 'completed' AND started_at IS NOT NULL AND completed_at IS NOT NULL GROUP BY 1, 2
            UNION ALL
            SELECT 'd:' || assigned_droplet_id, date_trunc($1, completed_at), status, COUNT(*), 0 FROM tasks
            WHERE assigned_droplet_id IS NOT NULL AND status IN ('completed', 'failed') AND completed_at IS NOT NULL
            GROUP BY 1, 2, 3
            UNION ALL
            SELECT 'd:' || assigned_droplet_id, date_trunc($1, completed_at), 'run', COUNT(*),
                   SUM(extract(epoch FROM completed_at - started_at))
            FROM tasks WHERE assigned_droplet_id IS NOT NULL AND status = 'completed' AND started_at IS NOT NULL
              AND completed_at IS NOT NULL GROUP BY 1, 2
         ) x ORDER BY 1, 2, 3",
    )
    .bind(unit)
    .fetch_all(&app.db)
    .await
    .unwrap()
}

/// The same, as kept: the folded rollups of `grain` and (for minutes) the changes not folded.
async fn kept(app: &TestApp, grain: &str) -> Vec<Figure> {
    sqlx::query_as(
        "SELECT dim::text, at::text, metric::text, SUM(n)::bigint, trim_scale(SUM(seconds))::text FROM (
            SELECT dim, at, metric, n, seconds FROM task_rollups WHERE grain = $1
            UNION ALL
            SELECT dim, at, metric, n, seconds FROM task_rollup_unfolded WHERE $1 = 'm'
         ) x GROUP BY 1, 2, 3 HAVING SUM(n) <> 0 OR SUM(seconds) <> 0 ORDER BY 1, 2, 3",
    )
    .bind(grain)
    .fetch_all(&app.db)
    .await
    .unwrap()
}

async fn unfolded(app: &TestApp) -> i64 {
    sqlx::query_scalar(
        "SELECT (SELECT COUNT(*) FROM task_rollup_changes) + (SELECT COUNT(*) FROM task_rollup_deltas)",
    )
        .fetch_one(&app.db)
        .await
        .unwrap()
}

/// `/metrics/summary`'s windows and latencies as the full scans of the table computed them
/// before the rollups.
async fn scanned(app: &TestApp) -> Value {
    let (c1, c24, d1, d24, f1, f24): (i64, i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT
            (SELECT COUNT(*) FROM tasks WHERE created_at >= NOW() - interval '1 hour'),
            (SELECT COUNT(*) FROM tasks WHERE created_at >= NOW() - interval '24 hours'),
            COUNT(*) FILTER (WHERE status = 'completed' AND completed_at >= NOW() - interval '1 hour'),
            COUNT(*) FILTER (WHERE status = 'completed'),
            COUNT(*) FILTER (WHERE status = 'failed' AND completed_at >= NOW() - interval '1 hour'),
            COUNT(*) FILTER (WHERE status = 'failed')
         FROM tasks WHERE completed_at >= NOW() - interval '24 hours'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    let durations = |sql: &'static str| async move {
        let (count, mean, p50, p95, max): (i64, f64, f64, f64, f64) =
            sqlx::query_as(sql).fetch_one(&app.db).await.unwrap();
        json!({"count": count, "mean_seconds": mean, "p50_seconds": p50, "p95_seconds": p95, "max_seconds": max})
    };
    let assignment = durations(
        "SELECT COUNT(d), AVG(d), percentile_cont(0.5) WITHIN GROUP (ORDER BY d),
                percentile_cont(0.95) WITHIN GROUP (ORDER BY d), MAX(d)
         FROM (SELECT date_part('epoch', assigned_at - created_at) AS d FROM tasks
               WHERE created_at >= NOW() - interval '24 hours' AND assigned_at IS NOT NULL) s",
    )
    .await;
    let execution = durations(
        "SELECT COUNT(d), AVG(d), percentile_cont(0.5) WITHIN GROUP (ORDER BY d),
                percentile_cont(0.95) WITHIN GROUP (ORDER BY d), MAX(d)
         FROM (SELECT date_part('epoch', completed_at - started_at) AS d FROM tasks
               WHERE completed_at >= NOW() - interval '24 hours' AND status = 'completed'
                 AND started_at IS NOT NULL) s",
    )
    .await;
    json!({
        "last_hour": {"created": c1, "completed": d1, "failed": f1},
        "last_24h": {"created": c24, "completed": d24, "failed": f24},
        "assignment_latency": assignment,
        "execution_time": execution,
    })
}

#[track_caller]
fn within(got: &Value, want: &Value, relative: f64, what: &str) {
    let (g, w) = (got.as_f64().unwrap(), want.as_f64().unwrap());
    assert!(
        (g - w).abs() <= relative * w.abs() + 1e-9,
        "{what}: {g} against the scan's {w}"
    );
}

/// The summary against the scans: the windows' counts and the latencies' counts and means
/// equal, the percentiles and maxima within their histogram bucket (9 %).
async fn summary_matches_the_scans(app: &TestApp) {
    let (status, body) = app.get("/metrics/summary", &app.token(5, &["read"])).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let got = &body["payload"];
    let want = scanned(app).await;
    for w in ["last_hour", "last_24h"] {
        for k in ["created", "completed", "failed"] {
            assert_eq!(got[w][k], want[w][k], "{w}.{k}: {got}");
        }
    }
    for d in ["assignment_latency", "execution_time"] {
        assert_eq!(got[d]["count"], want[d]["count"], "{d}: {got}");
        within(&got[d]["mean_seconds"], &want[d]["mean_seconds"], 1e-9, d);
        for k in ["p50_seconds", "p95_seconds", "max_seconds"] {
            within(&got[d][k], &want[d][k], 0.09, &format!("{d}.{k}"));
        }
    }
}

/// The other windowed answers against the scans they replace: counts equal.
async fn windowed_answers_match_the_scans(app: &TestApp, droplet: i32) {
    let read = app.token(5, &["read"]);
    let get = |path: &'static str| {
        let read = read.clone();
        async move {
            let (status, body) = app.get(path, &read).await;
            assert_eq!(status, StatusCode::OK, "{path}: {body}");
            body["payload"].clone()
        }
    };
    let p = get("/metrics/tasks/performance?time_range=24h").await;
    let (total, completed, failed, pending, retries, retried): (i64, i64, i64, i64, i64, i64) =
        sqlx::query_as(
            "SELECT COUNT(*), COUNT(*) FILTER (WHERE status = 'completed'),
                    COUNT(*) FILTER (WHERE status = 'failed'), COUNT(*) FILTER (WHERE status = 'pending'),
                    COALESCE(SUM(retry_count), 0)::bigint, COUNT(*) FILTER (WHERE retry_count > 0)
             FROM tasks WHERE created_at >= NOW() - interval '24 hours'",
        )
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(total >= 500, "the histogram's side: {total}");
    assert_eq!(
        (
            &p["total"],
            &p["by_outcome"]["completed"],
            &p["by_outcome"]["failed"],
            &p["by_outcome"]["pending"],
            &p["retries"]["total"],
            &p["retries"]["tasks_retried"]
        ),
        (
            &json!(total),
            &json!(completed),
            &json!(failed),
            &json!(pending),
            &json!(retries),
            &json!(retried)
        ),
        "{p}"
    );
    let by_type = get("/metrics/tasks/by-type?time_range=7d").await;
    let types: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT task_type::text, COUNT(*), COUNT(*) FILTER (WHERE status = 'cancelled') FROM tasks
         WHERE created_at >= NOW() - interval '7 days' GROUP BY 1 ORDER BY 2 DESC, 1",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    let kept: Vec<(String, i64, i64)> = by_type["types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["task_type"].as_str().unwrap().to_string(),
                t["total"].as_i64().unwrap(),
                t["cancelled"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(kept, types);
    let routing = get("/metrics/routing?time_range=24h").await;
    let assignments: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM task_state_history
         WHERE to_status = 'assigned' AND changed_at >= NOW() - interval '24 hours'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(routing["assignments"], assignments);
    let work = get("/metrics/droplets/8/performance?time_range=30d").await;
    let (done, failed, mean): (i64, i64, f64) = sqlx::query_as(
        "SELECT COUNT(*) FILTER (WHERE status = 'completed'), COUNT(*) FILTER (WHERE status = 'failed'),
                AVG(date_part('epoch', completed_at - started_at)) FILTER (WHERE status = 'completed')
         FROM tasks WHERE assigned_droplet_id = $1 AND completed_at >= NOW() - interval '30 days'",
    )
    .bind(droplet)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(
        (&work["tasks_completed"], &work["tasks_failed"]),
        (&json!(done), &json!(failed))
    );
    within(
        &work["mean_duration_seconds"],
        &json!(mean),
        1e-9,
        "droplet mean",
    );
}

#[tokio::test]
async fn rollups_equal_a_count_of_the_table_and_the_summary_the_full_scan() {
    let app = TestApp::spawn().await;
    app.pause_routing().await;
    app.state
        .jobs
        .set_paused(&app.state, JobId::HealthMonitor, true);
    app.register(8, &[], &dead_endpoint()).await;
    let d8: i32 = sqlx::query_scalar("SELECT id FROM droplets WHERE droplet_id = 8")
        .fetch_one(&app.db)
        .await
        .unwrap();
    history(&app, d8).await;
    assert_eq!(kept(&app, "m").await, counted(&app, "minute").await);
    // Half of it folded, then creations and the transitions of a task's life through the
    // service, on top of the history.
    let folded = orchestrator::services::analytics::rollups::fold(&app.db)
        .await
        .unwrap();
    assert!(folded.changes > 0 && !folded.skipped, "{folded:?}");
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(app.create_task(5, task_payload(&format!("live {i}"))).await);
    }
    for id in &ids[..2] {
        let (s, b) = app.delete(&format!("/tasks/{id}"), &app.admin()).await;
        assert_eq!(s, StatusCode::OK, "cancel {id}: {b}");
    }
    sqlx::query(
        "UPDATE tasks SET status = 'assigned', assigned_droplet_id = $1, assigned_at = NOW()
         WHERE id = ANY($2)",
    )
    .bind(d8)
    .bind(&ids[2..])
    .execute(&app.db)
    .await
    .unwrap();
    for (i, id) in ids[2..].iter().enumerate() {
        let (s, b) = app.move_task(8, *id, "in_progress").await;
        assert_eq!(s, StatusCode::OK, "{b}");
        let end = match i % 3 {
            0 => json!({"status": "completed", "result": {"ok": true}}),
            1 => json!({"status": "failed", "error_message": "boom"}),
            _ => continue,
        };
        let (s, b) = app
            .patch(&format!("/tasks/{id}"), &app.token(8, &["write"]), end)
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
    }
    // Several writers at once, and deletions (as retention makes them).
    let old: Vec<i32> = sqlx::query_scalar(
        "SELECT id FROM tasks WHERE status = 'pending' AND title LIKE 'old %' ORDER BY id LIMIT 20",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    let cancels = old.iter().map(|id| {
        let db = app.db.clone();
        async move {
            sqlx::query(
                "UPDATE tasks SET status = 'cancelled', completed_at = NOW() - interval '3 hours' WHERE id = $1",
            )
            .bind(id)
            .execute(&db)
            .await
            .unwrap();
        }
    });
    futures::future::join_all(cancels).await;
    sqlx::query("DELETE FROM tasks WHERE title LIKE 'old %' AND id % 10 = 0")
        .execute(&app.db)
        .await
        .unwrap();
    assert!(unfolded(&app).await > 0);
    assert_eq!(kept(&app, "m").await, counted(&app, "minute").await);
    summary_matches_the_scans(&app).await;
    windowed_answers_match_the_scans(&app, d8).await;
    // The health monitor's round folds the rest: minutes and hours equal the table.
    orchestrator::jobs::run_once(&app.state, JobId::HealthMonitor)
        .await
        .unwrap();
    assert_eq!(unfolded(&app).await, 0);
    assert_eq!(kept(&app, "m").await, counted(&app, "minute").await);
    assert_eq!(kept(&app, "h").await, counted(&app, "hour").await);
    assert_eq!(kept(&app, "d").await, counted(&app, "day").await);
    summary_matches_the_scans(&app).await;
    windowed_answers_match_the_scans(&app, d8).await;
}

/// A statement that moves tasks appends its rows to the rollups grouped by what decides
/// their facts (issue 26, item 3): two rows for a move, one group before and one after,
/// whether it moves 1,000 tasks of a routing pass or completes one task (which changes ten
/// facts); the fold and the windows expand them, and the rollups equal the table.
#[tokio::test]
async fn a_move_appends_two_grouped_rows_whatever_its_tasks_and_facts() {
    let app = TestApp::spawn().await;
    app.pause_routing().await;
    app.state
        .jobs
        .set_paused(&app.state, JobId::HealthMonitor, true);
    app.register(8, &[], &dead_endpoint()).await;
    let d8: i32 = sqlx::query_scalar("SELECT id FROM droplets WHERE droplet_id = 8")
        .fetch_one(&app.db)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO tasks (task_type, title, payload, status, created_at)
         SELECT 'bulk', 'bulk ' || g, '{}', 'pending', date_trunc('minute', NOW()::timestamp) - interval '3 minutes'
         FROM generate_series(1, 1000) g",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let before = unfolded(&app).await;
    // As a routing pass does: one statement, every task assigned 1.5 s after its creation.
    sqlx::query(
        "UPDATE tasks SET status = 'assigned', assigned_droplet_id = $1,
                          assigned_at = created_at + interval '1.5 seconds'
         WHERE task_type = 'bulk'",
    )
    .bind(d8)
    .execute(&app.db)
    .await
    .unwrap();
    let assigned = unfolded(&app).await - before;
    assert_eq!(
        assigned, 2,
        "rows appended for 1,000 tasks assigned at once"
    );
    let one: i32 = sqlx::query_scalar("SELECT MIN(id) FROM tasks WHERE task_type = 'bulk'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let before = unfolded(&app).await;
    sqlx::query(
        "UPDATE tasks SET status = 'completed', started_at = assigned_at + interval '2 seconds',
                          completed_at = NOW(), retry_count = 1
         WHERE id = $1",
    )
    .bind(one)
    .execute(&app.db)
    .await
    .unwrap();
    let completed = unfolded(&app).await - before;
    assert_eq!(completed, 2, "rows appended for one task completed");
    assert_eq!(kept(&app, "m").await, counted(&app, "minute").await);
    orchestrator::services::analytics::rollups::fold(&app.db)
        .await
        .unwrap();
    assert_eq!(unfolded(&app).await, 0);
    assert_eq!(kept(&app, "m").await, counted(&app, "minute").await);
    assert_eq!(kept(&app, "h").await, counted(&app, "hour").await);
}
