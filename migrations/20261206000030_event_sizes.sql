-- The size of each event as clients receive it (its envelope as JSON text), computed once when
-- the relay writes the event: a resuming client's replay reads the log in pages bounded in
-- bytes, and sums these sizes without rendering or detoasting the events it will not send yet.
ALTER TABLE events
    ADD COLUMN IF NOT EXISTS size INT GENERATED ALWAYS AS (octet_length(envelope::text)) STORED;
