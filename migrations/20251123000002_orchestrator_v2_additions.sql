-- Additions of the Rust service, beside the specification's schema.

-- A droplet may cap how many tasks it holds at once (assigned + in progress).
ALTER TABLE droplets ADD COLUMN max_concurrent_tasks INTEGER
    CHECK (max_concurrent_tasks IS NULL OR max_concurrent_tasks > 0);
-- An admin's /deactivate holds until /activate: heartbeats do not bring it back.
ALTER TABLE droplets ADD COLUMN admin_deactivated BOOLEAN NOT NULL DEFAULT FALSE;
-- Droplets known only from the Registry until they register themselves.
ALTER TABLE droplets ADD COLUMN registered BOOLEAN NOT NULL DEFAULT TRUE;

-- The droplet a task last ran on, so a requeued or retried task prefers another one.
ALTER TABLE tasks ADD COLUMN last_droplet_id INTEGER REFERENCES droplets(id) ON DELETE SET NULL;

-- The router reads pending tasks per capability in priority, then age, order.
CREATE INDEX idx_tasks_pending_route ON tasks (required_capability, priority, created_at, id)
    WHERE status = 'pending';
-- Recovery, timeouts and per-droplet load look at live tasks only.
CREATE INDEX idx_tasks_live_by_droplet ON tasks (assigned_droplet_id, status)
    WHERE status IN ('assigned', 'in_progress');
-- Retries and deadlines scan few rows.
CREATE INDEX idx_tasks_failed ON tasks (completed_at) WHERE status = 'failed';
CREATE INDEX idx_tasks_deadline ON tasks (deadline)
    WHERE deadline IS NOT NULL AND status IN ('pending', 'assigned', 'in_progress');
-- Metrics over time ranges and listings by type.
CREATE INDEX idx_tasks_type_created ON tasks (task_type, created_at DESC);
CREATE INDEX idx_tasks_completed_at ON tasks (completed_at);
CREATE INDEX idx_heartbeats_droplet_received ON heartbeats (droplet_id, received_at DESC);

-- The Registry's directory, cached so a restarted orchestrator knows the mesh
-- while the Registry is down.
CREATE TABLE registry_directory (
    droplet_id INTEGER PRIMARY KEY,
    name VARCHAR(100),
    steward VARCHAR(100),
    endpoint VARCHAR(255),
    capabilities JSONB NOT NULL DEFAULT '[]',
    raw JSONB NOT NULL,
    fetched_at TIMESTAMP NOT NULL DEFAULT NOW()
);
