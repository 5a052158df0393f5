-- Fencing by attempt: every assignment of a task starts a new attempt (0 while never
-- assigned). An update that names another attempt than the current one is refused, so a
-- droplet's late result for an attempt that was taken from it never lands.
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS attempt INTEGER NOT NULL DEFAULT 0;
-- Which attempt each history row belongs to (the attempt the task is on after the change).
ALTER TABLE task_state_history ADD COLUMN IF NOT EXISTS attempt INTEGER NOT NULL DEFAULT 0;
