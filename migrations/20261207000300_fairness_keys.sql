-- Fair share between keys, limits per key, producers pushed back (issue 27).
--
-- Every task has a fairness key: the `concurrency_key` its creator gave, else `creator:<id>`
-- (a prefix POST /tasks refuses in a concurrency_key, so no creator can pose as another).
-- It is generated so the creation statement writes only the one new column.
ALTER TABLE tasks ADD COLUMN concurrency_key VARCHAR(100);
ALTER TABLE tasks ADD COLUMN fairness_key TEXT
    GENERATED ALWAYS AS (COALESCE(concurrency_key, 'creator:' || created_by, '')) STORED;

-- The router reads, per capability ('' for tasks needing none), the keys with pending work
-- and each key's oldest tasks per priority; this replaces the index of the priority-then-age
-- read (same leading column, so what grouped pending tasks by capability still can use it).
-- A pending task always has a priority from now on (the skip over keys compares it).
UPDATE tasks SET priority = 5 WHERE priority IS NULL AND status = 'pending';
DROP INDEX IF EXISTS idx_tasks_pending_route;
CREATE INDEX idx_tasks_pending_fair
    ON tasks (COALESCE(required_capability, ''), fairness_key, priority, created_at, id)
    WHERE status = 'pending';
-- Live counts per key (queued, in flight) for the limits, the 429 and the gauge.
CREATE INDEX idx_tasks_live_key ON tasks (fairness_key, status)
    WHERE status IN ('pending', 'assigned', 'in_progress');

-- Limits per key, set by an admin; read by every replica's router each pass.
CREATE TABLE key_limits (
    key VARCHAR(100) PRIMARY KEY,
    max_in_flight INTEGER CHECK (max_in_flight >= 0),
    max_per_second DOUBLE PRECISION CHECK (max_per_second > 0),
    max_queued INTEGER CHECK (max_queued >= 0),
    weight INTEGER NOT NULL DEFAULT 1 CHECK (weight >= 1),
    -- The token bucket of max_per_second: the time it is spent up to (one task per interval
    -- after it; a replica moves it in the routing pass that locks this row).
    spent_until TIMESTAMPTZ,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
