-- A/B: task_counts alone (20261129000006), no rollup appends at all: what routing cost
-- before the rollups (the rollups are then wrong: for measuring only).
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
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER task_history_rollup_insert ON task_state_history;
