-- How many tasks a routing pass reads of one (capability, key, priority) group: the key's
-- weight's share of the capability's room among the keys waiting there, at least
-- `min_read` (less when so many groups wait that the floor alone would read over four
-- times the room), at most the room. The router's read of pending work computes it for
-- each group in the statement that reads the groups' tasks (`services/fair_pending.rs`),
-- so the groups and their tasks take one round trip. A plain SQL expression: PostgreSQL
-- inlines it into that statement.
CREATE FUNCTION fair_read_limit(room bigint, weight int, total_weight bigint, groups bigint,
                                min_read bigint)
RETURNS bigint LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT LEAST(
        GREATEST(
            (room * GREATEST(weight, 1) + GREATEST(total_weight, 1) - 1) / GREATEST(total_weight, 1),
            LEAST(GREATEST(4 * room / GREATEST(groups, 1), 1), min_read)),
        GREATEST(room, 0))
$$;
