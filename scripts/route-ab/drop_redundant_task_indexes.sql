-- A/B only: the spec's two task indexes that another index already serves.
DROP INDEX IF EXISTS idx_tasks_trace_id;
DROP INDEX IF EXISTS idx_tasks_status;
