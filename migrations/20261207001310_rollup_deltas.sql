-- A task's changes reach the rollups as a few grouped rows, expanded into their facts when
-- they are folded or read (issue 26, item 3: a task's life at a third less database work).
--
-- Before, every statement that wrote tasks appended one row per fact it changed to
-- task_rollup_changes: a task created, assigned, started and completed one statement at a
-- time appended about 23 rows over its life (a start 4, a completion 10). Now the trigger
-- appends its rows grouped by what decides their facts (type, droplet, status, retries, the
-- created and ended minutes, the buckets of the assignment latency and of the run time; the
-- net count, the sums and the largest durations added): one row for a creation batch, two
-- for a move, whatever the number of facts. The fold (`task_rollup_fold`) and the windows'
-- reads of what is not folded yet expand them with `task_rollup_delta_facts`, which gives
-- for a group exactly the rows the old appends gave for its tasks. task_rollup_changes
-- keeps the history rows' assignments (one row per statement, unchanged).
CREATE TABLE task_rollup_deltas (
    n BIGINT NOT NULL,
    -- Whether any task was added (not only removed): the largest durations are of those.
    added BOOLEAN NOT NULL,
    task_type VARCHAR(50) NOT NULL,
    droplet INTEGER,
    status VARCHAR(20) NOT NULL,
    retries INTEGER,
    created_min TIMESTAMP,
    ended_min TIMESTAMP,
    assign_bucket SMALLINT,
    assign_secs NUMERIC,
    assign_top NUMERIC,
    run_bucket SMALLINT,
    run_secs NUMERIC,
    run_top NUMERIC
);

-- The facts of a group, as task_rollup_facts gives them for one task, times its count.
CREATE FUNCTION task_rollup_delta_facts(cnt BIGINT, added BOOLEAN, task_type TEXT, droplet INTEGER,
                                        status TEXT, re INTEGER, c_at TIMESTAMP, e_at TIMESTAMP,
                                        ab SMALLINT, sa NUMERIC, ma NUMERIC,
                                        rb SMALLINT, sr NUMERIC, mr NUMERIC)
RETURNS TABLE (dim TEXT, at TIMESTAMP, metric TEXT, bucket SMALLINT, n BIGINT, seconds NUMERIC,
               top DOUBLE PRECISION)
LANGUAGE sql IMMUTABLE AS $$
    SELECT f.dim, f.at, f.metric, f.bucket, cnt, COALESCE(f.secs, 0), f.top::float8
    FROM (VALUES
        ('s', c_at, 'created', 0::smallint, NULL::numeric, NULL::numeric),
        ('s', e_at, status, 0::smallint, NULL, NULL),
        ('s', CASE WHEN ab IS NOT NULL THEN c_at END, 'assign', ab, sa, ma),
        ('s', CASE WHEN rb IS NOT NULL THEN e_at END, 'run', rb, sr, mr),
        ('c', c_at, 'now:' || status, 0::smallint, NULL, NULL),
        ('t:' || task_type, c_at, 'now:' || status, 0::smallint, NULL, NULL),
        ('c', CASE WHEN re IS NOT NULL THEN c_at END, 'retries', 0::smallint, (re * cnt)::numeric,
         CASE WHEN added THEN re::numeric END),
        ('t:' || task_type, CASE WHEN re IS NOT NULL THEN c_at END, 'retries', 0::smallint,
         (re * cnt)::numeric, CASE WHEN added THEN re::numeric END),
        ('c', CASE WHEN rb IS NOT NULL THEN c_at END, 'runc', rb, sr, mr),
        ('t:' || task_type, CASE WHEN rb IS NOT NULL THEN c_at END, 'runc', rb, sr, mr),
        ('d:' || droplet, CASE WHEN status IN ('completed', 'failed') THEN e_at END, status, 0::smallint, NULL, NULL),
        ('d:' || droplet, CASE WHEN rb IS NOT NULL THEN e_at END, 'run', rb, sr, mr)
    ) f(dim, at, metric, bucket, secs, top)
    WHERE f.at IS NOT NULL AND f.dim IS NOT NULL
$$;

-- task_counts' trigger function: task_counts as before, the rollups as grouped deltas.
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
            FROM (SELECT 1 AS d, * FROM new_rows) x
        ) y
        GROUP BY task_type, droplet, status, re, c_at, e_at, ab, rb
        HAVING SUM(d) <> 0 OR COALESCE(SUM(d * a), 0) <> 0 OR COALESCE(SUM(d * r), 0) <> 0;
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
            FROM (SELECT 1 AS d, * FROM new_rows UNION ALL SELECT -1, * FROM old_rows) x
        ) y
        GROUP BY task_type, droplet, status, re, c_at, e_at, ab, rb
        HAVING SUM(d) <> 0 OR COALESCE(SUM(d * a), 0) <> 0 OR COALESCE(SUM(d * r), 0) <> 0;
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
            FROM (SELECT -1 AS d, * FROM old_rows) x
        ) y
        GROUP BY task_type, droplet, status, re, c_at, e_at, ab, rb
        HAVING SUM(d) <> 0 OR COALESCE(SUM(d * a), 0) <> 0 OR COALESCE(SUM(d * r), 0) <> 0;
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION task_counts_clear() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM task_counts;
    DELETE FROM task_rollup_changes;
    DELETE FROM task_rollup_deltas;
    DELETE FROM task_rollups;
    RETURN NULL;
END $$;

-- The fold (services/analytics/rollups.rs, scripts/bench-summary.sh): every change and delta
-- not folded yet moved into the minute, hour and day rollups within their keeping. Returns
-- how many rows it moved.
CREATE FUNCTION task_rollup_fold(minutes_kept_hours INTEGER, hours_kept_days INTEGER,
                                 days_kept_days INTEGER)
RETURNS BIGINT LANGUAGE sql AS $$
    WITH moved_changes AS (
        DELETE FROM task_rollup_changes RETURNING dim, at, metric, bucket, n, seconds, top
    ), moved_deltas AS (
        DELETE FROM task_rollup_deltas RETURNING *
    ), moved AS (
        SELECT dim::text AS dim, at, metric::text AS metric, bucket, n, seconds, top FROM moved_changes
        UNION ALL
        SELECT f.dim, f.at, f.metric, f.bucket, f.n, f.seconds, f.top
        FROM moved_deltas x
        CROSS JOIN LATERAL task_rollup_delta_facts(x.n, x.added, x.task_type, x.droplet, x.status,
            x.retries, x.created_min, x.ended_min, x.assign_bucket, x.assign_secs, x.assign_top,
            x.run_bucket, x.run_secs, x.run_top) f
    ), grains AS (
        SELECT * FROM (VALUES
            ('m', 'minute', make_interval(hours => minutes_kept_hours)),
            ('h', 'hour', make_interval(days => hours_kept_days)),
            ('d', 'day', make_interval(days => days_kept_days))) g(grain, unit, kept)
    ), folded AS (
        INSERT INTO task_rollups AS r (grain, dim, at, metric, bucket, n, seconds, top)
        SELECT g.grain, m.dim, date_trunc(g.unit, m.at), m.metric, m.bucket,
               SUM(m.n), SUM(m.seconds), MAX(m.top)
        FROM moved m JOIN grains g ON m.at >= NOW()::timestamp - g.kept
        GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
        ON CONFLICT (grain, dim, at, metric, bucket) DO UPDATE
           SET n = r.n + EXCLUDED.n, seconds = r.seconds + EXCLUDED.seconds,
               top = GREATEST(r.top, EXCLUDED.top)
    )
    SELECT (SELECT COUNT(*) FROM moved_changes) + (SELECT COUNT(*) FROM moved_deltas)
$$;

-- What is not folded yet, as fact rows (the tests compare it with a count of the tables).
CREATE VIEW task_rollup_unfolded AS
    SELECT dim::text AS dim, at, metric::text AS metric, bucket, n, seconds, top FROM task_rollup_changes
    UNION ALL
    SELECT f.dim, f.at, f.metric, f.bucket, f.n, f.seconds, f.top
    FROM task_rollup_deltas x
    CROSS JOIN LATERAL task_rollup_delta_facts(x.n, x.added, x.task_type, x.droplet, x.status,
        x.retries, x.created_min, x.ended_min, x.assign_bucket, x.assign_secs, x.assign_top,
        x.run_bucket, x.run_secs, x.run_top) f;

CREATE OR REPLACE FUNCTION task_rollup_window(secs DOUBLE PRECISION, wanted TEXT)
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
    UNION ALL
    -- The deltas not folded yet: only those that can give a fact under `wanted` in the window
    -- are expanded (every fact is at the task's created or ended minute).
    SELECT f.metric::varchar, f.bucket, f.n, f.seconds, f.top
    FROM task_rollup_deltas x CROSS JOIN b
    CROSS JOIN LATERAL task_rollup_delta_facts(x.n, x.added, x.task_type, x.droplet, x.status,
        x.retries, x.created_min, x.ended_min, x.assign_bucket, x.assign_secs, x.assign_top,
        x.run_bucket, x.run_secs, x.run_top) f
    WHERE (x.created_min >= b.s OR x.ended_min >= b.s)
      AND (wanted IN ('s', 'c') OR wanted = 't:' || x.task_type OR wanted = 'd:' || x.droplet)
      AND f.dim = wanted AND f.at >= b.s
$$;
