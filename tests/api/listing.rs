//! Listings and retention that stay fast as the history grows: `total` exact up to a bound
//! and a lower bound past it, keyset paging with `after_id`, payloads only on request, and
//! finished tasks past `TASK_RETENTION_DAYS` deleted with their history, nothing else.

use std::collections::HashSet;

use orchestrator::services::health_monitor;
use orchestrator::services::task_listing::{self as tasks, TaskFilter, TOTAL_BOUND};
use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::*;

/// Tasks written straight into the table (status, task type), newest last.
async fn insert(app: &TestApp, n: i64, status: &str, task_type: &str) -> Vec<i32> {
    sqlx::query_scalar(
        "INSERT INTO tasks (task_type, title, payload, status, created_by, created_at)
         SELECT $3, 'bulk ' || g, jsonb_build_object('n', g), $2, '5',
                NOW() - make_interval(secs => ($1 - g)::double precision / 1000)
         FROM generate_series(1, $1) g RETURNING id",
    )
    .bind(n)
    .bind(status)
    .bind(task_type)
    .fetch_all(&app.db)
    .await
    .expect("insert tasks")
}

fn ids(page: &Value) -> Vec<i64> {
    page["payload"]["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| t["id"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn total_is_exact_up_to_the_bound_and_a_lower_bound_past_it() {
    let app = TestApp::spawn_with(&[("TASK_ROUTER_INTERVAL", "3600")]).await;
    let token = app.token(5, &["read"]);
    insert(&app, 120, "completed", "small").await;
    insert(&app, TOTAL_BOUND + 30, "failed", "big").await;

    let (s, b) = app.get("/tasks?task_type=small&limit=50", &token).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["payload"]["total"], 120);
    assert_eq!(b["payload"]["total_exact"], true);
    assert_eq!(b["payload"]["has_more"], true);

    // Status and type alone (or no filter): exact at any size, from the kept counts.
    let (_, b) = app.get("/tasks?status=failed&limit=10", &token).await;
    assert_eq!(b["payload"]["total"], TOTAL_BOUND + 30);
    assert_eq!(b["payload"]["total_exact"], true);
    let (_, b) = app.get("/tasks?limit=10&offset=20", &token).await;
    assert_eq!(b["payload"]["total"], TOTAL_BOUND + 150);
    assert_eq!(b["payload"]["total_exact"], true);
    let (_, b) = app
        .get("/tasks?status=failed&task_type=small&limit=10", &token)
        .await;
    assert_eq!(b["payload"]["total"], 0);
    let (_, b) = app
        .get("/tasks?status=completed&task_type=small&limit=10", &token)
        .await;
    assert_eq!(b["payload"]["total"], 120);
    assert_eq!(b["payload"]["total_exact"], true);

    // Any other filter past the bound: counted up to it, and said to be a lower bound.
    let (_, b) = app
        .get("/tasks?status=failed&created_by=5&limit=10", &token)
        .await;
    assert_eq!(b["payload"]["total"], TOTAL_BOUND);
    assert_eq!(b["payload"]["total_exact"], false);
    let (_, b) = app
        .get("/tasks?created_by=5&limit=10&offset=20", &token)
        .await;
    assert_eq!(b["payload"]["total"], TOTAL_BOUND);
    assert_eq!(b["payload"]["total_exact"], false);

    // A short last page is exact without counting.
    let (_, b) = app
        .get("/tasks?task_type=small&limit=50&offset=100", &token)
        .await;
    assert_eq!(b["payload"]["total"], 120);
    assert_eq!(b["payload"]["total_exact"], true);
    assert_eq!(b["payload"]["has_more"], false);
    assert_eq!(ids(&b).len(), 20);
}

#[tokio::test]
async fn keyset_pages_walk_every_task_once_newest_first() {
    let app = TestApp::spawn_with(&[("TASK_ROUTER_INTERVAL", "3600")]).await;
    let token = app.token(5, &["read"]);
    let mut created = insert(&app, 95, "completed", "walk").await;
    insert(&app, 40, "cancelled", "walk").await;
    created.reverse(); // newest first

    let mut seen = Vec::new();
    let mut cursor: Option<i64> = None;
    let mut pages = 0;
    loop {
        let path = match cursor {
            None => "/tasks?status=completed&limit=20".to_string(),
            Some(c) => format!("/tasks?status=completed&limit=20&after_id={c}"),
        };
        let (s, b) = app.get(&path, &token).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        let page = ids(&b);
        assert!(page.len() <= 20);
        seen.extend(page.iter().copied());
        pages += 1;
        // The total is the filter's, whatever the cursor.
        assert_eq!(b["payload"]["total"], 95, "{path}");
        match b["payload"]["next_after_id"].as_i64() {
            Some(next) => {
                assert_eq!(
                    Some(&next),
                    page.last(),
                    "the cursor is the page's last task"
                );
                assert_eq!(b["payload"]["has_more"], true);
                cursor = Some(next);
            }
            None => {
                assert_eq!(b["payload"]["has_more"], false);
                break;
            }
        }
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(pages, 5);
    let expected: Vec<i64> = created.iter().map(|&i| i64::from(i)).collect();
    assert_eq!(seen, expected, "every completed task once, newest first");
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 95);

    // A bad cursor is a 422 naming it.
    let (s, b) = app.get("/tasks?after_id=0", &token).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(b["detail"][0]["loc"][1], "after_id", "{b}");
}

#[tokio::test]
async fn listings_carry_payloads_only_when_asked() {
    let app = TestApp::spawn_with(&[("TASK_ROUTER_INTERVAL", "3600")]).await;
    let token = app.token(5, &["read"]);
    insert(&app, 3, "completed", "p").await;
    let (_, b) = app.get("/tasks?limit=10", &token).await;
    for t in b["payload"]["tasks"].as_array().unwrap() {
        assert!(
            t.get("payload").is_none() && t.get("result").is_none(),
            "{t}"
        );
    }
    let (_, b) = app.get("/tasks?limit=10&include=payload", &token).await;
    for t in b["payload"]["tasks"].as_array().unwrap() {
        assert!(t["payload"]["n"].is_number(), "{t}");
    }
    assert_eq!(b["payload"]["payload_truncated"], false);
}

#[tokio::test]
async fn retention_deletes_finished_tasks_and_their_history_and_nothing_live() {
    let app = TestApp::spawn_with(&[
        ("TASK_ROUTER_INTERVAL", "3600"),
        ("TASK_RETENTION_DAYS", "1"),
    ])
    .await;
    // (status, retry_count, max_retries, finished days ago, should go)
    let cases = [
        ("completed", 0, 3, Some(2), true),
        ("cancelled", 0, 3, Some(2), true),
        ("failed", 3, 3, Some(2), true),
        ("failed", 1, 3, Some(2), false),    // a retry is still due
        ("completed", 0, 3, Some(0), false), // within the retention
        ("in_progress", 0, 3, None, false),
        ("pending", 0, 3, None, false),
        ("assigned", 0, 3, None, false),
    ];
    let mut made = Vec::new();
    for (status, retries, max, days, goes) in cases {
        let id: i32 = sqlx::query_scalar(
            "INSERT INTO tasks (task_type, title, payload, status, retry_count, max_retries, created_by,
                                created_at, completed_at)
             VALUES ('old', $1, '{}'::jsonb, $1, $2, $3, '5', NOW() - interval '10 days',
                     CASE WHEN $4::int IS NULL THEN NULL ELSE NOW() - make_interval(days => $4::int) END)
             RETURNING id",
        )
        .bind(status)
        .bind(retries)
        .bind(max)
        .bind(days)
        .fetch_one(&app.db)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO task_state_history (task_id, from_status, to_status, changed_by, reason)
             VALUES ($1, NULL, 'pending', 'droplet-5', 'created'), ($1, 'pending', $2, 'system', 'moved')",
        )
        .bind(id)
        .bind(status)
        .execute(&app.db)
        .await
        .unwrap();
        made.push((id, goes));
    }
    let deleted = health_monitor::cleanup_old_tasks(&app.state.db, &app.state.config())
        .await
        .unwrap();
    assert_eq!(deleted, 3);
    for (id, goes) in made {
        let task: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_one(&app.db)
            .await
            .unwrap();
        let history: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM task_state_history WHERE task_id = $1")
                .bind(id)
                .fetch_one(&app.db)
                .await
                .unwrap();
        if goes {
            assert_eq!((task, history), (0, 0), "task {id} and its history go");
        } else {
            assert_eq!((task, history), (1, 2), "task {id} and its history stay");
        }
    }
    // Nothing left to delete: a second round deletes nothing.
    assert_eq!(
        health_monitor::cleanup_old_tasks(&app.state.db, &app.state.config())
            .await
            .unwrap(),
        0
    );

    // Metrics over a window longer than the retention say so.
    let admin = app.admin();
    let (s, b) = app
        .get("/metrics/tasks/performance?time_range=7d", &admin)
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["payload"]["retention_days"], 1);
    assert_eq!(b["payload"]["window_exceeds_retention"], true);
    let (_, b) = app
        .get("/metrics/tasks/performance?time_range=1h", &admin)
        .await;
    assert_eq!(b["payload"]["window_exceeds_retention"], false);
}

#[tokio::test]
async fn without_a_retention_nothing_is_deleted() {
    let app = TestApp::spawn_with(&[("TASK_ROUTER_INTERVAL", "3600")]).await;
    insert(&app, 5, "completed", "keep").await;
    sqlx::query("UPDATE tasks SET completed_at = NOW() - interval '400 days'")
        .execute(&app.db)
        .await
        .unwrap();
    assert_eq!(
        health_monitor::cleanup_old_tasks(&app.state.db, &app.state.config())
            .await
            .unwrap(),
        0
    );
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tasks")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(n, 5);
}

/// `?include=payload` over large payloads reads only the ones that fit the listing's budget
/// into this process (their sizes first, then those bodies), in order, passing over one too
/// large for what is left and still taking the smaller ones after it.
#[tokio::test]
async fn a_listing_with_payloads_reads_only_what_fits_its_budget() {
    let app = TestApp::spawn().await;
    // Oldest first: 20 small, then 50 of 0.9 MB, then one of 3 MB (newest). Newest first in
    // the listing: the 3 MB one (past the budget alone), two of 0.9 MB (1.8 MB), 48 passed
    // over, then the 20 small ones (a few bytes each) still fit.
    for (n, size) in [(20, 10), (50, 900_000), (1, 3_000_000)] {
        sqlx::query(
            "INSERT INTO tasks (task_type, title, payload, status, created_by, created_at)
             SELECT 'big', 'big', jsonb_build_object('blob', repeat('x', $2)), 'pending', '5',
                    clock_timestamp()
             FROM generate_series(1, $1) g",
        )
        .bind(n)
        .bind(size)
        .execute(&app.db)
        .await
        .unwrap();
    }
    let filter = TaskFilter {
        limit: Some(100),
        include: Some("payload".into()),
        ..TaskFilter::default()
    };
    let page = tasks::list(&app.db, &filter).await.unwrap();
    assert_eq!(page.tasks.len(), 71);
    let held: usize = page.tasks.iter().map(|t| t.payload.to_string().len()).sum();
    assert!(held < 2_200_000, "{held} bytes of payloads held");
    let read: Vec<bool> = page.payload_read.clone();
    assert!(!read[0], "the 3 MB payload is past the budget alone");
    assert_eq!(read[1..51].iter().filter(|r| **r).count(), 2);
    assert!(
        read[51..].iter().all(|r| *r),
        "the small ones after still fit"
    );
    assert!(page
        .tasks
        .iter()
        .zip(&read)
        .all(|(t, r)| *r == (t.payload != Value::Null)));

    let (shown, truncated) = page.shown();
    assert!(truncated);
    assert_eq!(
        shown.iter().filter(|t| t.get("payload").is_some()).count(),
        22
    );
    assert_eq!(
        shown
            .iter()
            .filter(|t| t["payload_truncated"] == true)
            .count(),
        49
    );

    // Without the asking, nothing is read and nothing is said to be truncated.
    let page = tasks::list(&app.db, &TaskFilter::default()).await.unwrap();
    assert!(page.tasks.iter().all(|t| t.payload == Value::Null));
    let (shown, truncated) = page.shown();
    assert!(!truncated);
    assert!(shown.iter().all(|t| t.get("payload").is_none()));
}

/// Each filter, alone and with others, lists the tasks a plain reading of it selects, and its
/// `total` is theirs: whether the total comes from the kept counts (status and type alone) or
/// from a bounded count (any other filter). Pages of 2, so the totals are never the page.
#[tokio::test]
async fn every_filter_alone_and_combined_lists_and_counts_what_it_selects() {
    let app = TestApp::spawn().await;
    app.pause_routing().await;
    app.register(8, &["ocr"], &dead_endpoint()).await;
    // 48 tasks over every filtered field: status, type, priority, holder, capability, creator.
    sqlx::query(
        "INSERT INTO tasks (task_type, title, payload, status, priority, required_capability,
                            created_by, assigned_droplet_id, created_at)
         SELECT (ARRAY['a','b'])[1 + g % 2], 'seeded ' || g, '{}'::jsonb,
                (ARRAY['pending','assigned','failed'])[1 + g % 3], 1 + g % 10,
                (ARRAY['ocr', NULL])[1 + (g / 2) % 2], (ARRAY['5','6','7'])[1 + (g / 3) % 3],
                CASE WHEN g % 4 = 1 THEN (SELECT id FROM droplets WHERE droplet_id = 8) END,
                NOW() - make_interval(secs => g)
         FROM generate_series(1, 48) g",
    )
    .execute(&app.db)
    .await
    .unwrap();
    type Row = (String, String, i32, Option<String>, String, Option<i32>);
    type Selects = fn(&Row) -> bool;
    let rows: Vec<(i32, Row)> = sqlx::query_as::<_, (i32, String, String, i32, Option<String>, String, Option<i32>)>(
        "SELECT t.id, t.status, t.task_type, t.priority, t.required_capability, t.created_by, d.droplet_id
         FROM tasks t LEFT JOIN droplets d ON d.id = t.assigned_droplet_id",
    )
    .fetch_all(&app.db)
    .await
    .unwrap()
    .into_iter()
    .map(|(id, s, ty, p, c, by, d)| (id, (s, ty, p, c, by, d)))
    .collect();
    let filters: [(&str, Selects); 12] = [
        ("status=failed", |r| r.0 == "failed"),
        ("task_type=b", |r| r.1 == "b"),
        ("status=assigned&task_type=a", |r| {
            r.0 == "assigned" && r.1 == "a"
        }),
        ("priority_min=4", |r| r.2 >= 4),
        ("priority_max=6", |r| r.2 <= 6),
        ("priority_min=3&priority_max=3", |r| r.2 == 3),
        ("assigned_droplet_id=8", |r| r.5 == Some(8)),
        ("required_capability=ocr", |r| r.3.as_deref() == Some("ocr")),
        ("created_by=6", |r| r.4 == "6"),
        ("status=pending&created_by=7", |r| {
            r.0 == "pending" && r.4 == "7"
        }),
        ("task_type=a&required_capability=ocr&priority_min=5", |r| {
            r.1 == "a" && r.3.as_deref() == Some("ocr") && r.2 >= 5
        }),
        ("status=failed&assigned_droplet_id=8", |r| {
            r.0 == "failed" && r.5 == Some(8)
        }),
    ];
    let reader = app.token(5, &["read"]);
    for (query, selects) in filters {
        let want: HashSet<i64> = rows
            .iter()
            .filter(|(_, r)| selects(r))
            .map(|(id, _)| i64::from(*id))
            .collect();
        assert!(want.len() > 2, "{query} selects too few to page");
        let mut got = HashSet::new();
        let mut after = String::new();
        loop {
            let (s, page) = app
                .get(&format!("/tasks?{query}&limit=2{after}"), &reader)
                .await;
            assert_eq!(s, StatusCode::OK, "{query}: {page}");
            if after.is_empty() {
                assert_eq!(page["payload"]["total"], want.len(), "{query}: total");
            }
            got.extend(ids(&page));
            match page["payload"]["next_after_id"].as_i64() {
                Some(next) => after = format!("&after_id={next}"),
                None => break,
            }
        }
        assert_eq!(got, want, "{query}: the tasks listed");
    }
}
