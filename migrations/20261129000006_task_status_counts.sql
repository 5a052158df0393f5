-- Tasks by status, kept as changes happen (issue 19): /metrics reads a handful of rows
-- instead of counting a million. Every statement that inserts, updates or deletes tasks
-- adds its net change per status to the row of its own backend (`shard` = the backend's
-- pid), so concurrent writers never wait for each other here; the rows of backends that
-- are gone are folded into shard 0 by the cleanup job. The count of a status is the sum of
-- its rows, exact on every replica.
LOCK TABLE tasks IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE task_status_counts (
    status VARCHAR(20) NOT NULL,
    shard INTEGER NOT NULL,
    n BIGINT NOT NULL,
    PRIMARY KEY (status, shard)
);

INSERT INTO task_status_counts (status, shard, n)
SELECT status, 0, COUNT(*) FROM tasks GROUP BY status;

CREATE FUNCTION task_status_counts_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO task_status_counts AS c (status, shard, n)
        SELECT status, pg_backend_pid(), COUNT(*) FROM new_rows GROUP BY status ORDER BY status
        ON CONFLICT (status, shard) DO UPDATE SET n = c.n + EXCLUDED.n;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO task_status_counts AS c (status, shard, n)
        SELECT status, pg_backend_pid(), SUM(d) FROM (
            SELECT status, 1 AS d FROM new_rows
            UNION ALL
            SELECT status, -1 AS d FROM old_rows
        ) x GROUP BY status HAVING SUM(d) <> 0 ORDER BY status
        ON CONFLICT (status, shard) DO UPDATE SET n = c.n + EXCLUDED.n;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO task_status_counts AS c (status, shard, n)
        SELECT status, pg_backend_pid(), -COUNT(*) FROM old_rows GROUP BY status ORDER BY status
        ON CONFLICT (status, shard) DO UPDATE SET n = c.n + EXCLUDED.n;
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION task_status_counts_clear() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM task_status_counts;
    RETURN NULL;
END $$;

CREATE TRIGGER task_status_counts_insert AFTER INSERT ON tasks
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION task_status_counts_add();
CREATE TRIGGER task_status_counts_update AFTER UPDATE ON tasks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION task_status_counts_add();
CREATE TRIGGER task_status_counts_delete AFTER DELETE ON tasks
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION task_status_counts_add();
CREATE TRIGGER task_status_counts_truncate AFTER TRUNCATE ON tasks
    FOR EACH STATEMENT EXECUTE FUNCTION task_status_counts_clear();
