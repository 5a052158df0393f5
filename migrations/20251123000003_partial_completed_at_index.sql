-- Routing rewrites every task row it assigns (a non-HOT update: status is indexed), and each
-- rewrite adds an entry to every full index. Only finished tasks have a completed_at, and the
-- metrics read only ranges of it, so a partial index serves them at no cost to assignment.
DROP INDEX IF EXISTS idx_tasks_completed_at;
CREATE INDEX idx_tasks_completed_at ON tasks (completed_at) WHERE completed_at IS NOT NULL;
