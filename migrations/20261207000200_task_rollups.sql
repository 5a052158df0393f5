-- Per-minute rollups of tasks (issue 26, item 4): the metrics' windows (the last hour, day,
-- week, month) read a few hundred kept rows instead of every task in them.
--
-- Kept by the same statement-level triggers as task_counts (20261129000006): every statement
-- that inserts, updates or deletes tasks appends its net change, one row per key, minute,
-- metric and bucket, to task_rollup_changes (a plain append: no key, no index, so concurrent
-- writers never wait for each other); history rows of assignments add theirs the same way.
-- A job folds those rows into task_rollups under an advisory lock, at three grains: the
-- minute ('m', kept 25 hours), the hour ('h') and the day ('d'). A window is read as its
-- whole days, the hours and minutes at its two ends, and the changes not yet folded, in one
-- statement (one snapshot: a change is either folded or not, never both).
--
-- What a task adds (task_rollup_facts), under a key (`dim`) and at a minute (`at`):
--   's' (the summary and routing):
--     created                          1 at its created_at
--     completed / failed / cancelled   1 at its completed_at, while it is in that status
--     assign (bucket of assigned_at - created_at)   1 and the seconds, at its created_at
--     run    (bucket of completed_at - started_at)  1 and the seconds, at its completed_at
--            (completed tasks only)
--     assignments                      1 per history row to 'assigned', at its changed_at
--   'c' (every task, by creation) and 't:<task_type>' (the tasks of one type, by creation):
--     now:<status>                     1 at its created_at, while it is in that status
--     retries                          1 and its retry_count, at its created_at, when > 0
--     runc   (bucket of completed_at - started_at)  1 and the seconds, at its created_at
--   'd:<assigned_droplet_id>' (a droplet's finished work):
--     completed / failed               1 at its completed_at
--     run                              1 and the seconds, at its completed_at
-- A change removes what the old row added and adds what the new one does, so the rollups
-- always equal the same aggregate over the tables as they are (a task deleted by retention
-- leaves the minutes it was counted in). `top` is the largest duration ever added to a
-- bucket (never lowered: the reader bounds it by the bucket's upper edge).
LOCK TABLE tasks IN SHARE ROW EXCLUSIVE MODE;
LOCK TABLE task_state_history IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE task_rollup_changes (
    dim VARCHAR(64) NOT NULL,
    at TIMESTAMP NOT NULL,
    metric VARCHAR(24) NOT NULL,
    bucket SMALLINT NOT NULL,
    n BIGINT NOT NULL,
    seconds NUMERIC NOT NULL,
    top DOUBLE PRECISION
);

CREATE TABLE task_rollups (
    grain CHAR(1) NOT NULL CHECK (grain IN ('m', 'h', 'd')),
    dim VARCHAR(64) NOT NULL,
    at TIMESTAMP NOT NULL,
    metric VARCHAR(24) NOT NULL,
    bucket SMALLINT NOT NULL,
    n BIGINT NOT NULL,
    seconds NUMERIC NOT NULL,
    top DOUBLE PRECISION,
    PRIMARY KEY (grain, dim, at, metric, bucket)
);
-- The fold's retention deletes by age, whatever the key.
CREATE INDEX task_rollups_age ON task_rollups (grain, at);

-- Durations in buckets eight to a doubling (each 9 % wide) from 1 ms: bucket b holds
-- [0.001 * 2^(b/8), 0.001 * 2^((b+1)/8)) seconds; -1 holds 1 ms and less.
CREATE FUNCTION task_rollup_bucket(secs NUMERIC) RETURNS SMALLINT LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN secs IS NULL THEN NULL
                WHEN secs <= 0.001 THEN -1
                ELSE LEAST(floor(8 * ln(secs::float8 / 0.001) / ln(2)), 32000)::smallint END
$$;

CREATE FUNCTION task_rollup_facts(task_type TEXT, droplet INTEGER, status TEXT, retries INTEGER,
                                  created TIMESTAMP, assigned TIMESTAMP, started TIMESTAMP,
                                  completed TIMESTAMP)
RETURNS TABLE (dim TEXT, at TIMESTAMP, metric TEXT, bucket SMALLINT, secs NUMERIC)
LANGUAGE sql IMMUTABLE AS $$
    SELECT f.dim, f.at, f.metric, f.bucket, f.secs
    FROM (SELECT date_trunc('minute', created) AS c_at,
                 CASE WHEN status IN ('completed', 'failed', 'cancelled') THEN date_trunc('minute', completed) END AS e_at,
                 extract(epoch FROM assigned - created) AS a,
                 CASE WHEN status = 'completed' THEN extract(epoch FROM completed - started) END AS r,
                 NULLIF(COALESCE(retries, 0), 0) AS re,
                 't:' || task_type AS t,
                 'd:' || droplet AS d) x
    CROSS JOIN LATERAL (VALUES
        ('s', x.c_at, 'created', 0::smallint, NULL::numeric),
        ('s', x.e_at, status, 0::smallint, NULL::numeric),
        ('s', CASE WHEN x.a IS NOT NULL THEN x.c_at END, 'assign', task_rollup_bucket(x.a), x.a),
        ('s', CASE WHEN x.r IS NOT NULL THEN x.e_at END, 'run', task_rollup_bucket(x.r), x.r),
        ('c', x.c_at, 'now:' || status, 0::smallint, NULL::numeric),
        (x.t, x.c_at, 'now:' || status, 0::smallint, NULL::numeric),
        ('c', CASE WHEN x.re IS NOT NULL THEN x.c_at END, 'retries', 0::smallint, x.re::numeric),
        (x.t, CASE WHEN x.re IS NOT NULL THEN x.c_at END, 'retries', 0::smallint, x.re::numeric),
        ('c', CASE WHEN x.r IS NOT NULL THEN x.c_at END, 'runc', task_rollup_bucket(x.r), x.r),
        (x.t, CASE WHEN x.r IS NOT NULL THEN x.c_at END, 'runc', task_rollup_bucket(x.r), x.r),
        (x.d, CASE WHEN status IN ('completed', 'failed') THEN x.e_at END, status, 0::smallint, NULL::numeric),
        (x.d, CASE WHEN x.r IS NOT NULL THEN x.e_at END, 'run', task_rollup_bucket(x.r), x.r)
    ) f(dim, at, metric, bucket, secs)
    WHERE f.at IS NOT NULL AND f.dim IS NOT NULL
$$;

-- The rollups of the tasks and assignments there are (31 days: the longest window is 30;
-- minutes 25 hours).
WITH facts AS (
    SELECT f.dim, f.at, f.metric, f.bucket, f.secs
    FROM tasks t
    CROSS JOIN LATERAL task_rollup_facts(t.task_type, t.assigned_droplet_id, t.status, t.retry_count,
                                         t.created_at, t.assigned_at, t.started_at, t.completed_at) f
    UNION ALL
    SELECT 's', date_trunc('minute', changed_at), 'assignments', 0, NULL
    FROM task_state_history WHERE to_status = 'assigned' AND changed_at IS NOT NULL
)
INSERT INTO task_rollups (grain, dim, at, metric, bucket, n, seconds, top)
SELECT g.grain, f.dim, date_trunc(g.unit, f.at), f.metric, f.bucket, COUNT(*), COALESCE(SUM(f.secs), 0),
       MAX(f.secs)::float8
FROM facts f
CROSS JOIN (VALUES ('m', 'minute', interval '25 hours'), ('h', 'hour', interval '31 days'),
                   ('d', 'day', interval '32 days')) g(grain, unit, kept)
WHERE f.at >= NOW()::timestamp - g.kept
GROUP BY 1, 2, 3, 4, 5;

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

CREATE OR REPLACE FUNCTION task_counts_clear() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM task_counts;
    DELETE FROM task_rollup_changes;
    DELETE FROM task_rollups;
    RETURN NULL;
END $$;

-- History rows of assignments, counted per minute the same way ('s', 'assignments').
CREATE FUNCTION task_history_rollup() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO task_rollup_changes (dim, at, metric, bucket, n, seconds, top)
        SELECT 's', date_trunc('minute', changed_at), 'assignments', 0, COUNT(*), 0, NULL
        FROM new_rows WHERE to_status = 'assigned' AND changed_at IS NOT NULL
        GROUP BY 2;
    ELSE
        INSERT INTO task_rollup_changes (dim, at, metric, bucket, n, seconds, top)
        SELECT 's', date_trunc('minute', changed_at), 'assignments', 0, -COUNT(*), 0, NULL
        FROM old_rows WHERE to_status = 'assigned' AND changed_at IS NOT NULL
        GROUP BY 2;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER task_history_rollup_insert AFTER INSERT ON task_state_history
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION task_history_rollup();
CREATE TRIGGER task_history_rollup_delete AFTER DELETE ON task_state_history
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION task_history_rollup();

-- The rollups under `wanted` of a window of `secs` seconds ending now: from the start of the
-- minute `secs` ago (of the hour, past 24 hours: minutes are kept 25 hours), read as whole
-- days, the hours and minutes at both ends, and the changes not yet folded. One row per
-- source, metric and bucket; the caller sums them.
CREATE FUNCTION task_rollup_window(secs DOUBLE PRECISION, wanted TEXT)
RETURNS TABLE (metric VARCHAR, bucket SMALLINT, n BIGINT, seconds NUMERIC, top DOUBLE PRECISION)
LANGUAGE sql STABLE AS $$
    WITH e AS (
        SELECT date_trunc(CASE WHEN secs <= 86400 THEN 'minute' ELSE 'hour' END,
                          NOW()::timestamp - make_interval(secs => secs)) AS s,
               date_trunc('hour', NOW()::timestamp) AS eh,
               date_trunc('day', NOW()::timestamp) AS ed
    ), b AS (
        SELECT s, eh, ed,
               CASE WHEN date_trunc('hour', s) = s THEN s ELSE date_trunc('hour', s) + interval '1 hour' END AS sh,
               CASE WHEN date_trunc('day', s) = s THEN s ELSE date_trunc('day', s) + interval '1 day' END AS sd
        FROM e
    )
    SELECT r.metric, r.bucket, r.n, r.seconds, r.top FROM task_rollups r, b
    WHERE r.grain = 'd' AND r.dim = wanted AND r.at >= b.sd AND r.at < b.ed
    UNION ALL
    SELECT r.metric, r.bucket, r.n, r.seconds, r.top FROM task_rollups r, b
    WHERE r.grain = 'h' AND r.dim = wanted AND r.at >= b.sh AND r.at < LEAST(b.sd, b.ed)
    UNION ALL
    SELECT r.metric, r.bucket, r.n, r.seconds, r.top FROM task_rollups r, b
    WHERE r.grain = 'h' AND r.dim = wanted AND r.at >= GREATEST(b.ed, b.sh) AND r.at < b.eh
    UNION ALL
    SELECT r.metric, r.bucket, r.n, r.seconds, r.top FROM task_rollups r, b
    WHERE r.grain = 'm' AND r.dim = wanted AND r.at >= b.s AND r.at < LEAST(b.sh, b.eh)
    UNION ALL
    SELECT r.metric, r.bucket, r.n, r.seconds, r.top FROM task_rollups r, b
    WHERE r.grain = 'm' AND r.dim = wanted AND r.at >= GREATEST(b.eh, b.s)
    UNION ALL
    SELECT c.metric, c.bucket, c.n, c.seconds, c.top FROM task_rollup_changes c, b
    WHERE c.dim = wanted AND c.at >= b.s
$$;
