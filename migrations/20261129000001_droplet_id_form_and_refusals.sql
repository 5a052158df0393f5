-- How each droplet writes ids in its own envelopes ('int': 12, 'string': "droplet-12"),
-- so that the orchestrator speaks to it in the same form (NULL: not known yet -> integers).
ALTER TABLE droplets ADD COLUMN IF NOT EXISTS id_form TEXT
    CHECK (id_form IS NULL OR id_form IN ('int', 'string'));

-- Deliveries the droplet refused in a row (a 4xx other than 408/429); reset by its next
-- registration or heartbeat. At DISPATCH_REFUSALS_BEFORE_ERROR it is marked 'error'.
ALTER TABLE droplets ADD COLUMN IF NOT EXISTS refused_deliveries INTEGER NOT NULL DEFAULT 0;
