-- Droplets push back and are drained (issue 27, items 4 and 6), in the database so every
-- replica honours them.
-- A delivery answered 429 (or 503) with Retry-After defers the droplet: nothing is routed or
-- delivered to it before `deferred_until`, and its in-flight allowance halves
-- (`in_flight_allowance`, NULL when its `max_concurrent_tasks` is in force), growing back by
-- one per accepted delivery up to `in_flight_allowance_ceiling` (its max_concurrent_tasks, or
-- for a droplet without one the tasks it held when it first pushed back), where it is cleared.
ALTER TABLE droplets ADD COLUMN IF NOT EXISTS deferred_until TIMESTAMP;
ALTER TABLE droplets ADD COLUMN IF NOT EXISTS in_flight_allowance INTEGER;
ALTER TABLE droplets ADD COLUMN IF NOT EXISTS in_flight_allowance_ceiling INTEGER;
-- An admin's drain: no new assignments from `drain_requested_at`; at `drain_deadline` (if
-- any) what it still holds goes back to pending; `drained_at` when it held nothing more (the
-- `droplet_drained` event). A registration ends the drain.
ALTER TABLE droplets ADD COLUMN IF NOT EXISTS drain_requested_at TIMESTAMP;
ALTER TABLE droplets ADD COLUMN IF NOT EXISTS drain_deadline TIMESTAMP;
ALTER TABLE droplets ADD COLUMN IF NOT EXISTS drained_at TIMESTAMP;
