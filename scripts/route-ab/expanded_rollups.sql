-- A/B (benches/load.rs: BENCH_ROUTE_SQL / BENCH_E2E_SQL): the rollups' appends as
-- 20261207000200 made them, every row expanded into its facts before grouping (before
-- 20261207001310).
CREATE OR REPLACE FUNCTION task_counts_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO task_counts AS c (task_type, status, shard, n, retries, run_seconds, runs)
        SELECT task_type, status, pg_backend_pid(), SUM(d), SUM(d * r),
               COALESCE(SUM(d * run), 0), COALESCE(SUM(d) FILTER (WHERE run IS NOT NULL), 0)
        FROM (
            SELECT task_type, status, 1 AS d, COALESCE(retry_count, 0) AS r,
                   task_counts_row_run(status, started_at, completed_at) AS run
            FROM new_rows
        ) x
        GROUP BY task_type, status
        HAVING SUM(d) <> 0 OR SUM(d * r) <> 0 OR COALESCE(SUM(d * run), 0) <> 0
        ORDER BY task_type, status
        ON CONFLICT (task_type, status, shard) DO UPDATE
            SET n = c.n + EXCLUDED.n, retries = c.retries + EXCLUDED.retries,
                run_seconds = c.run_seconds + EXCLUDED.run_seconds, runs = c.runs + EXCLUDED.runs;
        INSERT INTO task_rollup_changes (dim, at, metric, bucket, n, seconds, top)
        SELECT f.dim, f.at, f.metric, f.bucket, SUM(x.d), COALESCE(SUM(x.d * f.secs), 0),
               (MAX(f.secs) FILTER (WHERE x.d > 0))::float8
        FROM (SELECT 1 AS d, * FROM new_rows) x
        CROSS JOIN LATERAL task_rollup_facts(x.task_type, x.assigned_droplet_id, x.status, x.retry_count,
                                             x.created_at, x.assigned_at, x.started_at, x.completed_at) f
        GROUP BY f.dim, f.at, f.metric, f.bucket
        HAVING SUM(x.d) <> 0 OR COALESCE(SUM(x.d * f.secs), 0) <> 0;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO task_counts AS c (task_type, status, shard, n, retries, run_seconds, runs)
        SELECT task_type, status, pg_backend_pid(), SUM(d), SUM(d * r),
               COALESCE(SUM(d * run), 0), COALESCE(SUM(d) FILTER (WHERE run IS NOT NULL), 0)
        FROM (
            SELECT task_type, status, 1 AS d, COALESCE(retry_count, 0) AS r,
                   task_counts_row_run(status, started_at, completed_at) AS run
            FROM new_rows
            UNION ALL
            SELECT task_type, status, -1, COALESCE(retry_count, 0),
                   task_counts_row_run(status, started_at, completed_at)
            FROM old_rows
        ) x
        GROUP BY task_type, status
        HAVING SUM(d) <> 0 OR SUM(d * r) <> 0 OR COALESCE(SUM(d * run), 0) <> 0
        ORDER BY task_type, status
        ON CONFLICT (task_type, status, shard) DO UPDATE
            SET n = c.n + EXCLUDED.n, retries = c.retries + EXCLUDED.retries,
                run_seconds = c.run_seconds + EXCLUDED.run_seconds, runs = c.runs + EXCLUDED.runs;
        INSERT INTO task_rollup_changes (dim, at, metric, bucket, n, seconds, top)
        SELECT f.dim, f.at, f.metric, f.bucket, SUM(x.d), COALESCE(SUM(x.d * f.secs), 0),
               (MAX(f.secs) FILTER (WHERE x.d > 0))::float8
        FROM (SELECT 1 AS d, * FROM new_rows UNION ALL SELECT -1, * FROM old_rows) x
        CROSS JOIN LATERAL task_rollup_facts(x.task_type, x.assigned_droplet_id, x.status, x.retry_count,
                                             x.created_at, x.assigned_at, x.started_at, x.completed_at) f
        GROUP BY f.dim, f.at, f.metric, f.bucket
        HAVING SUM(x.d) <> 0 OR COALESCE(SUM(x.d * f.secs), 0) <> 0;
    ELSE
        INSERT INTO task_counts AS c (task_type, status, shard, n, retries, run_seconds, runs)
        SELECT task_type, status, pg_backend_pid(), SUM(d), SUM(d * r),
               COALESCE(SUM(d * run), 0), COALESCE(SUM(d) FILTER (WHERE run IS NOT NULL), 0)
        FROM (
            SELECT task_type, status, -1 AS d, COALESCE(retry_count, 0) AS r,
                   task_counts_row_run(status, started_at, completed_at) AS run
            FROM old_rows
        ) x
        GROUP BY task_type, status
        HAVING SUM(d) <> 0 OR SUM(d * r) <> 0 OR COALESCE(SUM(d * run), 0) <> 0
        ORDER BY task_type, status
        ON CONFLICT (task_type, status, shard) DO UPDATE
            SET n = c.n + EXCLUDED.n, retries = c.retries + EXCLUDED.retries,
                run_seconds = c.run_seconds + EXCLUDED.run_seconds, runs = c.runs + EXCLUDED.runs;
        INSERT INTO task_rollup_changes (dim, at, metric, bucket, n, seconds, top)
        SELECT f.dim, f.at, f.metric, f.bucket, SUM(x.d), COALESCE(SUM(x.d * f.secs), 0), NULL
        FROM (SELECT -1 AS d, * FROM old_rows) x
        CROSS JOIN LATERAL task_rollup_facts(x.task_type, x.assigned_droplet_id, x.status, x.retry_count,
                                             x.created_at, x.assigned_at, x.started_at, x.completed_at) f
        GROUP BY f.dim, f.at, f.metric, f.bucket
        HAVING SUM(x.d) <> 0 OR COALESCE(SUM(x.d * f.secs), 0) <> 0;
    END IF;
    RETURN NULL;
END $$;
