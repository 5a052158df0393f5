-- Listings are newest first ((created_at, id) DESC), with keyset paging on the same key:
-- one index serves the unfiltered listing and its cursors, one the status filter (the
-- dashboard's and droplets' most common one), without sorting the matching rows.
DROP INDEX IF EXISTS idx_tasks_created_at;
CREATE INDEX IF NOT EXISTS idx_tasks_created_id ON tasks (created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS idx_tasks_status_created_id ON tasks (status, created_at DESC, id DESC);
