-- Events off the commit path. A writing transaction adds its events to `event_outbox` (a
-- plain insert: nothing that serialises commits, unlike NOTIFY, whose global lock is held
-- across the WAL flush). One relay per database (an advisory lock) moves them, in order, into
-- `events`, numbering them (`event_id`) once every transaction that could still add an
-- earlier one has ended (`xid` below the snapshot's xmin). Every replica reads `events` and
-- fans them out; clients resume with `?after=<event_id>` from what is kept there.
CREATE TABLE IF NOT EXISTS event_outbox (
    id BIGSERIAL PRIMARY KEY,
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    feed TEXT NOT NULL CHECK (feed IN ('tasks', 'droplets')),
    envelope JSONB NOT NULL
);

CREATE TABLE IF NOT EXISTS events (
    event_id BIGINT PRIMARY KEY,
    feed TEXT NOT NULL CHECK (feed IN ('tasks', 'droplets')),
    envelope JSONB NOT NULL,
    published_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
CREATE INDEX IF NOT EXISTS idx_events_feed_id ON events (feed, event_id);
CREATE INDEX IF NOT EXISTS idx_events_published_at ON events (published_at);

CREATE SEQUENCE IF NOT EXISTS event_ids;

-- The newest event_id the retention has deleted: a client resuming after an older id has
-- missed events and must reload (ids may have gaps, so the oldest kept id cannot tell).
CREATE TABLE IF NOT EXISTS event_log_state (
    only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
    trimmed_through BIGINT NOT NULL DEFAULT 0
);
INSERT INTO event_log_state (only_row, trimmed_through) VALUES (TRUE, 0) ON CONFLICT DO NOTHING;
