-- A/B: the rollups' appends grouped before their facts are expanded, still appended as facts
-- to task_rollup_changes: the intermediate step measured on the way to 20261207001310's deltas
-- (it was a migration of its own on the w-lifecost branch, 9bd3094; it never shipped).

-- The rollups' appends of task_counts_add (20261207000200), same rows, less work: a routing
-- pass that assigns 5,000 tasks spent 330-350 ms of its write in this trigger (psql EXPLAIN
-- ANALYZE of the pass's UPDATE on 100,000 pending tasks: the trigger 347 / 327 ms with the
-- rollups, 5 ms with task_counts alone), because every old and new row was expanded into its
-- twelve facts (120,000 rows) before being grouped. The rows are now grouped first by what
-- decides their facts (type, droplet, status, retries, the two minutes and the two duration
-- buckets, with the count, sum and largest of each duration), and each group is expanded
-- once: a pass's 10,000 rows are a few dozen groups. The rollups are the same figures: a
-- group adds its count times what one row adds, the sums of its durations, and its largest.
CREATE OR REPLACE FUNCTION task_rollup_group_facts(sign INTEGER, cnt BIGINT, task_type TEXT, droplet INTEGER,
                                        status TEXT, re INTEGER, c_at TIMESTAMP, e_at TIMESTAMP,
                                        ab SMALLINT, sa NUMERIC, ma NUMERIC,
                                        rb SMALLINT, sr NUMERIC, mr NUMERIC)
RETURNS TABLE (dim TEXT, at TIMESTAMP, metric TEXT, bucket SMALLINT, n BIGINT, seconds NUMERIC,
               top DOUBLE PRECISION)
LANGUAGE sql IMMUTABLE AS $$
    SELECT f.dim, f.at, f.metric, f.bucket, sign * cnt, sign * f.secs,
           CASE WHEN sign > 0 THEN f.top::float8 END
    FROM (VALUES
        ('s', c_at, 'created', 0::smallint, NULL::numeric, NULL::numeric),
        ('s', e_at, status, 0::smallint, NULL, NULL),
        ('s', CASE WHEN ab IS NOT NULL THEN c_at END, 'assign', ab, sa, ma),
        ('s', CASE WHEN rb IS NOT NULL THEN e_at END, 'run', rb, sr, mr),
        ('c', c_at, 'now:' || status, 0::smallint, NULL, NULL),
        ('t:' || task_type, c_at, 'now:' || status, 0::smallint, NULL, NULL),
        ('c', CASE WHEN re IS NOT NULL THEN c_at END, 'retries', 0::smallint, (re * cnt)::numeric, re::numeric),
        ('t:' || task_type, CASE WHEN re IS NOT NULL THEN c_at END, 'retries', 0::smallint, (re * cnt)::numeric, re::numeric),
        ('c', CASE WHEN rb IS NOT NULL THEN c_at END, 'runc', rb, sr, mr),
        ('t:' || task_type, CASE WHEN rb IS NOT NULL THEN c_at END, 'runc', rb, sr, mr),
        ('d:' || droplet, CASE WHEN status IN ('completed', 'failed') THEN e_at END, status, 0::smallint, NULL, NULL),
        ('d:' || droplet, CASE WHEN rb IS NOT NULL THEN e_at END, 'run', rb, sr, mr)
    ) f(dim, at, metric, bucket, secs, top)
    WHERE f.at IS NOT NULL AND f.dim IS NOT NULL
$$;

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
        SELECT f.dim, f.at, f.metric, f.bucket, SUM(f.n), COALESCE(SUM(f.seconds), 0), MAX(f.top)
        FROM (
            SELECT d, task_type, droplet, status, re, c_at, e_at, ab, rb, COUNT(*) AS n,
                   SUM(a) AS sa, MAX(a) AS ma, SUM(r) AS sr, MAX(r) AS mr
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
                FROM (SELECT 1 AS d, * FROM new_rows) x
            ) y
            GROUP BY d, task_type, droplet, status, re, c_at, e_at, ab, rb
        ) g
        CROSS JOIN LATERAL task_rollup_group_facts(g.d, g.n, g.task_type, g.droplet, g.status, g.re,
                                                   g.c_at, g.e_at, g.ab, g.sa, g.ma, g.rb, g.sr, g.mr) f
        GROUP BY f.dim, f.at, f.metric, f.bucket
        HAVING SUM(f.n) <> 0 OR COALESCE(SUM(f.seconds), 0) <> 0;
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
        SELECT f.dim, f.at, f.metric, f.bucket, SUM(f.n), COALESCE(SUM(f.seconds), 0), MAX(f.top)
        FROM (
            SELECT d, task_type, droplet, status, re, c_at, e_at, ab, rb, COUNT(*) AS n,
                   SUM(a) AS sa, MAX(a) AS ma, SUM(r) AS sr, MAX(r) AS mr
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
                FROM (SELECT 1 AS d, * FROM new_rows UNION ALL SELECT -1, * FROM old_rows) x
            ) y
            GROUP BY d, task_type, droplet, status, re, c_at, e_at, ab, rb
        ) g
        CROSS JOIN LATERAL task_rollup_group_facts(g.d, g.n, g.task_type, g.droplet, g.status, g.re,
                                                   g.c_at, g.e_at, g.ab, g.sa, g.ma, g.rb, g.sr, g.mr) f
        GROUP BY f.dim, f.at, f.metric, f.bucket
        HAVING SUM(f.n) <> 0 OR COALESCE(SUM(f.seconds), 0) <> 0;
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
        SELECT f.dim, f.at, f.metric, f.bucket, SUM(f.n), COALESCE(SUM(f.seconds), 0), MAX(f.top)
        FROM (
            SELECT d, task_type, droplet, status, re, c_at, e_at, ab, rb, COUNT(*) AS n,
                   SUM(a) AS sa, MAX(a) AS ma, SUM(r) AS sr, MAX(r) AS mr
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
                FROM (SELECT -1 AS d, * FROM old_rows) x
            ) y
            GROUP BY d, task_type, droplet, status, re, c_at, e_at, ab, rb
        ) g
        CROSS JOIN LATERAL task_rollup_group_facts(g.d, g.n, g.task_type, g.droplet, g.status, g.re,
                                                   g.c_at, g.e_at, g.ab, g.sa, g.ma, g.rb, g.sr, g.mr) f
        GROUP BY f.dim, f.at, f.metric, f.bucket
        HAVING SUM(f.n) <> 0 OR COALESCE(SUM(f.seconds), 0) <> 0;
    END IF;
    RETURN NULL;
END $$;
