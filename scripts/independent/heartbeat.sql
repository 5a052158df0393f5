-- The spec's heartbeat SQL as one statement (one round trip): the droplet's row and one
-- `heartbeats` row. pgbench script; the load bench runs the same file.
\set d random(1, 1000)
WITH d AS (
  UPDATE droplets SET last_heartbeat = NOW(), updated_at = NOW(), status = 'active'
  WHERE droplet_id = (:d)::int RETURNING id
)
INSERT INTO heartbeats (droplet_id, status, metrics)
SELECT id, 'active', '{"cpu_percent": 12.5, "memory_mb": 256}' FROM d;
