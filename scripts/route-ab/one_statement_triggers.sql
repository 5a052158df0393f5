-- A/B: task_counts_add as one statement per branch (the counts' upsert a part of the deltas' insert).
CREATE OR REPLACE FUNCTION task_counts_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- One statement per branch: the counts' upsert is a part of the deltas' insert, both
    -- reading the rows once (x).
    IF TG_OP = 'INSERT' THEN
        WITH x AS MATERIALIZED (SELECT 1 AS d, * FROM new_rows),
        counted AS (
            INSERT INTO task_counts AS c (task_type, status, shard, n, retries, run_seconds, runs)
            SELECT task_type, status, pg_backend_pid(), SUM(d), SUM(d * r),
                   COALESCE(SUM(d * run), 0), COALESCE(SUM(d) FILTER (WHERE run IS NOT NULL), 0)
            FROM (
                SELECT task_type, status, d, COALESCE(retry_count, 0) AS r,
                       task_counts_row_run(status, started_at, completed_at) AS run
                FROM x
            ) y
            GROUP BY task_type, status
            HAVING SUM(d) <> 0 OR SUM(d * r) <> 0 OR COALESCE(SUM(d * run), 0) <> 0
            ORDER BY task_type, status
            ON CONFLICT (task_type, status, shard) DO UPDATE
                SET n = c.n + EXCLUDED.n, retries = c.retries + EXCLUDED.retries,
                    run_seconds = c.run_seconds + EXCLUDED.run_seconds, runs = c.runs + EXCLUDED.runs
        )
        INSERT INTO task_rollup_deltas (n, added, task_type, droplet, status, retries, created_min,
                                            ended_min, assign_bucket, assign_secs, assign_top,
                                            run_bucket, run_secs, run_top)
            SELECT SUM(d), bool_or(d > 0), task_type, droplet, status, re, c_at, e_at,
                   ab, SUM(d * a), MAX(a) FILTER (WHERE d > 0), rb, SUM(d * r), MAX(r) FILTER (WHERE d > 0)
            FROM (
                SELECT x.d, x.task_type, x.assigned_droplet_id AS droplet, x.status,
                       NULLIF(COALESCE(x.retry_count, 0), 0) AS re,
                       date_trunc('minute', x.created_at) AS c_at,
                       CASE WHEN x.status IN ('completed', 'failed', 'cancelled')
                            THEN date_trunc('minute', x.completed_at) END AS e_at,
                       extract(epoch FROM x.assigned_at - x.created_at) AS a,
                       task_rollup_bucket(extract(epoch FROM x.assigned_at - x.created_at)) AS ab,
                       CASE WHEN x.status = 'completed' THEN extract(epoch FROM x.completed_at - x.started_at) END AS r,
                       CASE WHEN x.status = 'completed'
                            THEN task_rollup_bucket(extract(epoch FROM x.completed_at - x.started_at)) END AS rb
                FROM x
            ) y
            GROUP BY task_type, droplet, status, re, c_at, e_at, ab, rb
            HAVING SUM(d) <> 0 OR COALESCE(SUM(d * a), 0) <> 0 OR COALESCE(SUM(d * r), 0) <> 0;
    ELSIF TG_OP = 'UPDATE' THEN
        WITH x AS MATERIALIZED (SELECT 1 AS d, * FROM new_rows UNION ALL SELECT -1, * FROM old_rows),
        counted AS (
            INSERT INTO task_counts AS c (task_type, status, shard, n, retries, run_seconds, runs)
            SELECT task_type, status, pg_backend_pid(), SUM(d), SUM(d * r),
                   COALESCE(SUM(d * run), 0), COALESCE(SUM(d) FILTER (WHERE run IS NOT NULL), 0)
            FROM (
                SELECT task_type, status, d, COALESCE(retry_count, 0) AS r,
                       task_counts_row_run(status, started_at, completed_at) AS run
                FROM x
            ) y
            GROUP BY task_type, status
            HAVING SUM(d) <> 0 OR SUM(d * r) <> 0 OR COALESCE(SUM(d * run), 0) <> 0
            ORDER BY task_type, status
            ON CONFLICT (task_type, status, shard) DO UPDATE
                SET n = c.n + EXCLUDED.n, retries = c.retries + EXCLUDED.retries,
                    run_seconds = c.run_seconds + EXCLUDED.run_seconds, runs = c.runs + EXCLUDED.runs
        )
        INSERT INTO task_rollup_deltas (n, added, task_type, droplet, status, retries, created_min,
                                            ended_min, assign_bucket, assign_secs, assign_top,
                                            run_bucket, run_secs, run_top)
            SELECT SUM(d), bool_or(d > 0), task_type, droplet, status, re, c_at, e_at,
                   ab, SUM(d * a), MAX(a) FILTER (WHERE d > 0), rb, SUM(d * r), MAX(r) FILTER (WHERE d > 0)
            FROM (
                SELECT x.d, x.task_type, x.assigned_droplet_id AS droplet, x.status,
                       NULLIF(COALESCE(x.retry_count, 0), 0) AS re,
                       date_trunc('minute', x.created_at) AS c_at,
                       CASE WHEN x.status IN ('completed', 'failed', 'cancelled')
                            THEN date_trunc('minute', x.completed_at) END AS e_at,
                       extract(epoch FROM x.assigned_at - x.created_at) AS a,
                       task_rollup_bucket(extract(epoch FROM x.assigned_at - x.created_at)) AS ab,
                       CASE WHEN x.status = 'completed' THEN extract(epoch FROM x.completed_at - x.started_at) END AS r,
                       CASE WHEN x.status = 'completed'
                            THEN task_rollup_bucket(extract(epoch FROM x.completed_at - x.started_at)) END AS rb
                FROM x
            ) y
            GROUP BY task_type, droplet, status, re, c_at, e_at, ab, rb
            HAVING SUM(d) <> 0 OR COALESCE(SUM(d * a), 0) <> 0 OR COALESCE(SUM(d * r), 0) <> 0;
    ELSE
        WITH x AS MATERIALIZED (SELECT -1 AS d, * FROM old_rows),
        counted AS (
            INSERT INTO task_counts AS c (task_type, status, shard, n, retries, run_seconds, runs)
            SELECT task_type, status, pg_backend_pid(), SUM(d), SUM(d * r),
                   COALESCE(SUM(d * run), 0), COALESCE(SUM(d) FILTER (WHERE run IS NOT NULL), 0)
            FROM (
                SELECT task_type, status, d, COALESCE(retry_count, 0) AS r,
                       task_counts_row_run(status, started_at, completed_at) AS run
                FROM x
            ) y
            GROUP BY task_type, status
            HAVING SUM(d) <> 0 OR SUM(d * r) <> 0 OR COALESCE(SUM(d * run), 0) <> 0
            ORDER BY task_type, status
            ON CONFLICT (task_type, status, shard) DO UPDATE
                SET n = c.n + EXCLUDED.n, retries = c.retries + EXCLUDED.retries,
                    run_seconds = c.run_seconds + EXCLUDED.run_seconds, runs = c.runs + EXCLUDED.runs
        )
        INSERT INTO task_rollup_deltas (n, added, task_type, droplet, status, retries, created_min,
                                            ended_min, assign_bucket, assign_secs, assign_top,
                                            run_bucket, run_secs, run_top)
            SELECT SUM(d), bool_or(d > 0), task_type, droplet, status, re, c_at, e_at,
                   ab, SUM(d * a), MAX(a) FILTER (WHERE d > 0), rb, SUM(d * r), MAX(r) FILTER (WHERE d > 0)
            FROM (
                SELECT x.d, x.task_type, x.assigned_droplet_id AS droplet, x.status,
                       NULLIF(COALESCE(x.retry_count, 0), 0) AS re,
                       date_trunc('minute', x.created_at) AS c_at,
                       CASE WHEN x.status IN ('completed', 'failed', 'cancelled')
                            THEN date_trunc('minute', x.completed_at) END AS e_at,
                       extract(epoch FROM x.assigned_at - x.created_at) AS a,
                       task_rollup_bucket(extract(epoch FROM x.assigned_at - x.created_at)) AS ab,
                       CASE WHEN x.status = 'completed' THEN extract(epoch FROM x.completed_at - x.started_at) END AS r,
                       CASE WHEN x.status = 'completed'
                            THEN task_rollup_bucket(extract(epoch FROM x.completed_at - x.started_at)) END AS rb
                FROM x
            ) y
            GROUP BY task_type, droplet, status, re, c_at, e_at, ab, rb
            HAVING SUM(d) <> 0 OR COALESCE(SUM(d * a), 0) <> 0 OR COALESCE(SUM(d * r), 0) <> 0;
    END IF;
    RETURN NULL;
END
$$;
