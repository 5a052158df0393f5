-- Assignment timeouts (assigned, never started within ASSIGNMENT_TIMEOUT_SECONDS) counted:
-- per task over its whole life (past MAX_REQUEUES the task fails), and per droplet in a row
-- (at ASSIGNMENT_TIMEOUTS_BEFORE_ERROR it is marked 'error'; reset when a task it holds
-- starts, or when it registers again).
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS assignment_timeouts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE droplets ADD COLUMN IF NOT EXISTS timed_out_assignments INTEGER NOT NULL DEFAULT 0;
