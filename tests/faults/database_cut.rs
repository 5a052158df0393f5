//! Scenario 3: PostgreSQL unreachable for 10 s under load, through a TCP proxy the test
//! controls (the shared server is never stopped): the API answers 503 quickly during the
//! cut, nothing hangs, the jobs log and go on, and everything works again within seconds
//! of the restore; nothing is lost.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use reqwest::Method;

use crate::fleet::{Api, Dashboard, Fleet, Producer};
use crate::harness::*;
use crate::helpers::token;
use crate::invariants;
use crate::proxy::Proxy;

const CUT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "slow fault scenario: cargo test --test faults -- --include-ignored --test-threads 1"]
async fn a_database_cut_of_ten_seconds_is_503_then_everything_recovers() {
    let proxy = Proxy::start().await;
    let (db, direct_url) = fresh_database().await;
    let mut env = base_env(&proxy.database_url(&db.name), free_port());
    // Longer than the cut, as the defaults (90 s, 300 s) are: droplets whose heartbeats and
    // starts failed during it are not declared lost nor their tasks requeued.
    env.push(("HEARTBEAT_TIMEOUT".into(), "30".into()));
    env.push(("ASSIGNMENT_TIMEOUT_SECONDS".into(), "30".into()));
    let server = Server::start("s3-database-cut", &env).await;
    let pool = pool(&direct_url).await;
    let api = Api::new(vec![server.base.clone()]);
    let ids: Vec<i32> = (1301..=1306).collect();
    let fleet = Fleet::start(
        api.clone(),
        &ids,
        &["a", "b"],
        Duration::from_millis(50),
        Duration::from_secs(1),
    )
    .await;
    let dashboard = Dashboard::connect(&server.base, "tasks").await;
    let producer = Producer::start(api.clone(), 1301, rate(), &["a", "b"], None);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        fleet.completed.load(Ordering::Relaxed) > 0,
        "no task completed before the cut"
    );

    let jobs_before = job_runs(&api).await;
    proxy.cut();
    let cut = Instant::now();
    // A reader probes the API through the cut, one request at a time.
    let admin = token(1, &["read", "write", "admin"]);
    let mut probes = Vec::new();
    while cut.elapsed() < CUT {
        let started = Instant::now();
        let answer = api.once(Method::GET, "/tasks?limit=1", &admin, None).await;
        probes.push((answer.map(|(s, _)| s), started.elapsed()));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    proxy.restore();
    let restored = Instant::now();
    let events_at_restore = dashboard.count();
    let assigned_at_restore = assignments(&pool).await;

    // Back: the first request that works, and routing.
    let first_ok = wait_for(Duration::from_secs(30), || async {
        let r = api.once(Method::GET, "/tasks?limit=1", &admin, None).await;
        matches!(r, Some((200, _))).then(Instant::now)
    })
    .await
    .expect("the API answers again after the restore");
    let routed = wait_for(Duration::from_secs(30), || async {
        (assignments(&pool).await > assigned_at_restore).then(Instant::now)
    })
    .await
    .expect("routing resumes after the restore");

    tokio::time::sleep(Duration::from_secs(4)).await;
    let produced = producer.finish().await;
    let acked = produced.acked();
    let task_ids: Vec<i32> = acked.iter().map(|(_, id)| *id).collect();
    let unfinished = drain(&pool, &task_ids, Duration::from_secs(60)).await;
    let jobs_after = job_runs(&api).await;
    let events_after = wait_for(Duration::from_secs(10), || async {
        (dashboard.count() > events_at_restore).then(|| dashboard.count())
    })
    .await
    .unwrap_or(events_at_restore);

    let traces: Vec<_> = acked.iter().map(|(t, _)| *t).collect();
    let findings = invariants::check_database(&pool, &traces).await;
    let completed = invariants::completed(&pool, &task_ids).await;
    // Answers of requests sent during the cut (and up to 2 s after, for those in flight).
    let during = api.server_errors(Some((cut, restored + Duration::from_secs(2))));
    let outside: Vec<_> = api
        .server_errors(None)
        .into_iter()
        .filter(|e| e.at < cut || e.at >= restored + Duration::from_secs(2))
        .collect();
    let exchanges = api.exchanges();
    let in_cut: Vec<_> = exchanges
        .iter()
        .filter(|e| e.at >= cut && e.at < restored)
        .collect();
    let slowest = in_cut.iter().map(|e| e.took).max().unwrap_or_default();
    let probe_statuses: Vec<Option<u16>> = probes.iter().map(|(s, _)| *s).collect();
    let job_failures = server.log_lines("job run failed").len();
    let routing_failures = server.log_lines("routing pass failed").len();

    let mut figures = Figures::new("s3_database_unreachable_10s");
    figures.tasks_created = acked.len();
    figures.tasks_lost = findings.lost() + unfinished.len();
    figures.tasks_duplicated = findings.duplicated() + fleet.completed_twice().len();
    figures.recover_seconds = Some(secs(first_ok - restored));
    figures.server_errors_5xx = during.len() as u64 + outside.len() as u64;
    figures.note("rate_asked_per_second", rate());
    figures.note("cut_seconds", CUT.as_secs());
    figures.note("requests_during_cut", in_cut.len());
    figures.note(
        "answers_503_during_cut",
        during.iter().filter(|e| e.status == Some(503)).count(),
    );
    figures.note(
        "other_5xx_during_cut",
        during.iter().filter(|e| e.status != Some(503)).count(),
    );
    figures.note("5xx_outside_cut", outside.len());
    figures.note("slowest_answer_during_cut_seconds", secs(slowest));
    figures.note(
        "last_503_after_restore_seconds",
        api.server_errors(None)
            .iter()
            .filter(|e| e.at >= restored)
            .map(|e| secs((e.at + e.took) - restored))
            .fold(0.0, f64::max),
    );
    figures.note(
        "restore_to_first_assignment_seconds",
        secs(routed - restored),
    );
    figures.note("job_runs_failed_logged", job_failures);
    figures.note("routing_passes_failed_logged", routing_failures);
    figures.note("job_runs_before_and_after", (&jobs_before, &jobs_after));
    figures.note(
        "dashboard_events_after_restore",
        events_after - events_at_restore,
    );
    figures.note("completed", completed);
    figures.note("answers_by_status", api.by_status());
    figures.note("panics", server.panics());
    figures.report();

    findings.assert_clean();
    assert!(
        unfinished.is_empty(),
        "tasks never finished: {unfinished:?}"
    );
    assert_eq!(completed, task_ids.len(), "every task completed");
    assert!(produced.gave_up().is_empty(), "{:?}", produced.gave_up());
    // During the cut: 503, never another 5xx, never a hang.
    assert!(
        probe_statuses.iter().all(|s| *s == Some(503)),
        "probes during the cut: {probe_statuses:?}"
    );
    assert!(during.iter().all(|e| e.status == Some(503)), "{during:?}");
    assert!(
        slowest < Duration::from_secs(5),
        "an answer took {slowest:?} during the cut"
    );
    // The jobs said so in the log, and ran again after the restore.
    assert!(
        job_failures + routing_failures > 0,
        "no job logged the outage"
    );
    for (job, runs, outcome) in &jobs_after {
        let before = jobs_before
            .iter()
            .find(|(j, _, _)| j == job)
            .map_or(0, |(_, r, _)| *r);
        if job == "health_monitor" || job == "task_router" {
            assert!(
                *runs > before + 2,
                "{job} did not go on: {before} -> {runs}"
            );
            assert!(
                outcome.starts_with("ok"),
                "{job} after the restore: {outcome}"
            );
        }
    }
    // Everything works again within a few seconds, dashboards included.
    assert!(
        first_ok - restored < Duration::from_secs(5),
        "{:?}",
        first_ok - restored
    );
    assert!(
        events_after > events_at_restore,
        "the dashboard got nothing after the restore"
    );
    assert!(outside.iter().all(|e| e.status == Some(503)), "{outside:?}");
    assert_eq!(server.panics(), 0, "{}", server.stderr_text());
    fleet.stop();
    drop(server);
    pool.close().await;
    drop(db);
}

/// Runs per job and the last outcome, from the job board.
async fn job_runs(api: &Api) -> Vec<(String, u64, String)> {
    let admin = token(1, &["read", "write", "admin"]);
    let Some((200, v)) = api
        .call(
            Method::GET,
            "/management/scheduler/jobs",
            &admin,
            None,
            Duration::from_secs(20),
        )
        .await
    else {
        return Vec::new();
    };
    v["payload"]["jobs"]
        .as_array()
        .map(|jobs| {
            jobs.iter()
                .map(|j| {
                    (
                        j["id"].as_str().unwrap_or("").to_string(),
                        j["runs"].as_u64().unwrap_or(0),
                        j["last_outcome"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}
