-- Per-minute rollups of tasks (issue 26, item 4): /metrics/summary's windows (the last hour
-- and day) read a few hundred kept rows instead of every task in them.
--
-- Kept by the same statement-level triggers as task_counts (20261129000006): every statement
-- that inserts, updates or deletes tasks appends its net change, one row per minute, metric
-- and bucket, to task_rollup_changes (a plain append: no key, no index, so concurrent
-- writers never wait for each other). A job folds those rows into task_rollups under an
-- advisory lock, at two grains: the minute ('m') and the hour ('h', the sum of its minutes).
-- A window is read as its whole hours, the minutes at its two ends, and the changes not yet
-- folded, in one statement (one snapshot: a change is either folded or not, never both).
--
-- What a task adds (task_rollup_facts), each at a minute (`at`):
--   created                      1 at its created_at
--   completed / failed / cancelled  1 at its completed_at, while it is in that status
--   assign   (bucket of assigned_at - created_at)  1 and the seconds at its created_at
--   run      (bucket of completed_at - started_at) 1 and the seconds at its completed_at,
--            completed tasks only
-- A change removes what the old row added and adds what the new one does, so the rollups
-- always equal the same aggregate over the table as it is (a task deleted by retention
-- leaves the minutes it was counted in). `top` is the largest duration ever added to a
-- bucket (never lowered: the reader bounds it by the bucket's upper edge).
LOCK TABLE tasks IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE task_rollup_changes (
    at TIMESTAMP NOT NULL,
    metric VARCHAR(12) NOT NULL,
    bucket SMALLINT NOT NULL,
    n BIGINT NOT NULL,
    seconds NUMERIC NOT NULL,
    top DOUBLE PRECISION
);

CREATE TABLE task_rollups (
    grain CHAR(1) NOT NULL CHECK (grain IN ('m', 'h')),
    at TIMESTAMP NOT NULL,
    metric VARCHAR(12) NOT NULL,
    bucket SMALLINT NOT NULL,
    n BIGINT NOT NULL,
    seconds NUMERIC NOT NULL,
    top DOUBLE PRECISION,
    PRIMARY KEY (grain, at, metric, bucket)
);

-- Durations in buckets eight to a doubling (each 9 % wide) from 1 ms: bucket b holds
-- [0.001 * 2^(b/8), 0.001 * 2^((b+1)/8)) seconds; -1 holds 1 ms and less.
CREATE FUNCTION task_rollup_bucket(secs NUMERIC) RETURNS SMALLINT LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN secs IS NULL THEN NULL
                WHEN secs <= 0.001 THEN -1
                ELSE LEAST(floor(8 * ln(secs::float8 / 0.001) / ln(2)), 32000)::smallint END
$$;

CREATE FUNCTION task_rollup_facts(status TEXT, created TIMESTAMP, assigned TIMESTAMP,
                                  started TIMESTAMP, completed TIMESTAMP)
RETURNS TABLE (at TIMESTAMP, metric TEXT, bucket SMALLINT, secs NUMERIC)
LANGUAGE sql IMMUTABLE AS $$
    SELECT f.at, f.metric, f.bucket, f.secs FROM (VALUES
        (date_trunc('minute', created), 'created', 0::smallint, NULL::numeric),
        (CASE WHEN status IN ('completed', 'failed', 'cancelled') THEN date_trunc('minute', completed) END,
         status, 0::smallint, NULL::numeric),
        (CASE WHEN assigned IS NOT NULL THEN date_trunc('minute', created) END,
         'assign', task_rollup_bucket(extract(epoch FROM assigned - created)),
         extract(epoch FROM assigned - created)),
        (CASE WHEN status = 'completed' AND started IS NOT NULL THEN date_trunc('minute', completed) END,
         'run', task_rollup_bucket(extract(epoch FROM completed - started)),
         extract(epoch FROM completed - started))
    ) f(at, metric, bucket, secs)
    WHERE f.at IS NOT NULL
$$;

-- The rollups of the tasks there are (31 days: the longest window is 30).
INSERT INTO task_rollups (grain, at, metric, bucket, n, seconds, top)
SELECT g.grain, CASE g.grain WHEN 'm' THEN f.at ELSE date_trunc('hour', f.at) END,
       f.metric, f.bucket, COUNT(*), COALESCE(SUM(f.secs), 0), MAX(f.secs)::float8
FROM tasks t
CROSS JOIN LATERAL task_rollup_facts(t.status, t.created_at, t.assigned_at, t.started_at, t.completed_at) f
CROSS JOIN (VALUES ('m'), ('h')) g(grain)
WHERE f.at >= NOW()::timestamp - interval '31 days'
GROUP BY 1, 2, 3, 4;

-- task_counts' trigger function, with the rollups' append after each of its three upserts.
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
        INSERT INTO task_rollup_changes (at, metric, bucket, n, seconds, top)
        SELECT f.at, f.metric, f.bucket, SUM(x.d), COALESCE(SUM(x.d * f.secs), 0),
               (MAX(f.secs) FILTER (WHERE x.d > 0))::float8
        FROM (SELECT 1 AS d, status, created_at, assigned_at, started_at, completed_at FROM new_rows) x
        CROSS JOIN LATERAL task_rollup_facts(x.status, x.created_at, x.assigned_at, x.started_at, x.completed_at) f
        GROUP BY f.at, f.metric, f.bucket
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
        INSERT INTO task_rollup_changes (at, metric, bucket, n, seconds, top)
        SELECT f.at, f.metric, f.bucket, SUM(x.d), COALESCE(SUM(x.d * f.secs), 0),
               (MAX(f.secs) FILTER (WHERE x.d > 0))::float8
        FROM (SELECT 1 AS d, status, created_at, assigned_at, started_at, completed_at FROM new_rows
              UNION ALL
              SELECT -1, status, created_at, assigned_at, started_at, completed_at FROM old_rows) x
        CROSS JOIN LATERAL task_rollup_facts(x.status, x.created_at, x.assigned_at, x.started_at, x.completed_at) f
        GROUP BY f.at, f.metric, f.bucket
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
        INSERT INTO task_rollup_changes (at, metric, bucket, n, seconds, top)
        SELECT f.at, f.metric, f.bucket, SUM(x.d), COALESCE(SUM(x.d * f.secs), 0), NULL
        FROM (SELECT -1 AS d, status, created_at, assigned_at, started_at, completed_at FROM old_rows) x
        CROSS JOIN LATERAL task_rollup_facts(x.status, x.created_at, x.assigned_at, x.started_at, x.completed_at) f
        GROUP BY f.at, f.metric, f.bucket
        HAVING SUM(x.d) <> 0 OR COALESCE(SUM(x.d * f.secs), 0) <> 0;
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION task_counts_clear() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM task_counts;
    DELETE FROM task_rollup_changes;
    DELETE FROM task_rollups;
    RETURN NULL;
END $$;

-- The rollups of a window of `secs` seconds ending now, to the minute: the minutes from the
-- one `secs` ago, read as whole hours where they fill one, plus the changes not yet folded.
-- One row per source, metric and bucket; the caller sums them.
CREATE FUNCTION task_rollup_window(secs DOUBLE PRECISION)
RETURNS TABLE (metric VARCHAR, bucket SMALLINT, n BIGINT, seconds NUMERIC, top DOUBLE PRECISION)
LANGUAGE sql STABLE AS $$
    WITH b AS (
        SELECT s, he, CASE WHEN date_trunc('hour', s) = s THEN s
                           ELSE date_trunc('hour', s) + interval '1 hour' END AS hs
        FROM (SELECT date_trunc('minute', NOW()::timestamp - make_interval(secs => secs)) AS s,
                     date_trunc('hour', NOW()::timestamp) AS he) x
    )
    SELECT r.metric, r.bucket, r.n, r.seconds, r.top FROM task_rollups r, b
    WHERE r.grain = 'h' AND r.at >= b.hs AND r.at < b.he
    UNION ALL
    SELECT r.metric, r.bucket, r.n, r.seconds, r.top FROM task_rollups r, b
    WHERE r.grain = 'm' AND r.at >= b.s AND r.at < LEAST(b.hs, b.he)
    UNION ALL
    SELECT r.metric, r.bucket, r.n, r.seconds, r.top FROM task_rollups r, b
    WHERE r.grain = 'm' AND r.at >= GREATEST(b.he, b.s)
    UNION ALL
    SELECT c.metric, c.bucket, c.n, c.seconds, c.top FROM task_rollup_changes c, b
    WHERE c.at >= b.s
$$;
