-- Droplets that cannot be reached: deliveries that could not connect or timed out, in a row
-- (reset by an accepted delivery, a successful probe or a registration), and since when the
-- droplet is marked unreachable (status 'error', probed with backoff until it answers; a
-- heartbeat alone does not bring it back: it shows the droplet reaches us, not we it).
ALTER TABLE droplets ADD COLUMN IF NOT EXISTS failed_deliveries INTEGER NOT NULL DEFAULT 0;
ALTER TABLE droplets ADD COLUMN IF NOT EXISTS unreachable_since TIMESTAMPTZ;
CREATE INDEX IF NOT EXISTS idx_droplets_unreachable ON droplets (id) WHERE unreachable_since IS NOT NULL;
