-- The specification's schema (section 4), exactly.

CREATE TABLE droplets (
    id SERIAL PRIMARY KEY,
    droplet_id INTEGER UNIQUE NOT NULL,
    name VARCHAR(100) NOT NULL,
    steward VARCHAR(100),
    endpoint VARCHAR(255) NOT NULL,
    capabilities JSONB DEFAULT '[]',
    status VARCHAR(20) NOT NULL CHECK (status IN ('active', 'inactive', 'error')),
    last_heartbeat TIMESTAMP,
    registered_at TIMESTAMP DEFAULT NOW(),
    updated_at TIMESTAMP DEFAULT NOW()
);

CREATE INDEX idx_droplets_status ON droplets(status);
CREATE INDEX idx_droplets_heartbeat ON droplets(last_heartbeat);
CREATE INDEX idx_droplets_capabilities ON droplets USING GIN(capabilities);

CREATE TABLE tasks (
    id SERIAL PRIMARY KEY,
    trace_id UUID UNIQUE NOT NULL DEFAULT gen_random_uuid(),
    task_type VARCHAR(50) NOT NULL,
    title VARCHAR(255) NOT NULL,
    description TEXT,
    payload JSONB NOT NULL,

    -- Routing
    required_capability VARCHAR(100),
    assigned_droplet_id INTEGER REFERENCES droplets(id),

    -- State machine
    status VARCHAR(20) NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'assigned', 'in_progress', 'completed', 'failed', 'cancelled')),

    -- Priority & timing
    priority INTEGER DEFAULT 5 CHECK (priority BETWEEN 1 AND 10),
    created_at TIMESTAMP DEFAULT NOW(),
    assigned_at TIMESTAMP,
    started_at TIMESTAMP,
    completed_at TIMESTAMP,
    deadline TIMESTAMP,

    -- Results
    result JSONB,
    error_message TEXT,
    retry_count INTEGER DEFAULT 0,
    max_retries INTEGER DEFAULT 3,

    -- Metadata
    created_by VARCHAR(100),
    updated_at TIMESTAMP DEFAULT NOW()
);

CREATE INDEX idx_tasks_status ON tasks(status);
CREATE INDEX idx_tasks_trace_id ON tasks(trace_id);
CREATE INDEX idx_tasks_priority ON tasks(priority);
CREATE INDEX idx_tasks_assigned_droplet ON tasks(assigned_droplet_id);
CREATE INDEX idx_tasks_created_at ON tasks(created_at DESC);
CREATE INDEX idx_tasks_capability ON tasks(required_capability);

CREATE TABLE task_state_history (
    id SERIAL PRIMARY KEY,
    task_id INTEGER NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
    from_status VARCHAR(20),
    to_status VARCHAR(20) NOT NULL,
    changed_by VARCHAR(100),
    reason TEXT,
    metadata JSONB,
    changed_at TIMESTAMP DEFAULT NOW()
);

CREATE INDEX idx_task_history_task_id ON task_state_history(task_id);
CREATE INDEX idx_task_history_changed_at ON task_state_history(changed_at);

CREATE TABLE heartbeats (
    id SERIAL PRIMARY KEY,
    droplet_id INTEGER NOT NULL REFERENCES droplets(id) ON DELETE CASCADE,
    status VARCHAR(20) NOT NULL,
    metrics JSONB,
    received_at TIMESTAMP DEFAULT NOW()
);

CREATE INDEX idx_heartbeats_droplet_id ON heartbeats(droplet_id);
CREATE INDEX idx_heartbeats_received_at ON heartbeats(received_at DESC);
