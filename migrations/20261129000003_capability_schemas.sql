-- Capability contracts: per capability, a JSON Schema (draft 2020-12) for the task payloads
-- a droplet accepts, as it declared at registration ({"verify": {...schema...}}).
ALTER TABLE droplets ADD COLUMN IF NOT EXISTS capability_schemas JSONB;
