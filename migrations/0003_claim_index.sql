-- outbox-relay schema, version 3: the claim walks (run_at, id).
-- Safe to run by hand: psql -v ON_ERROR_STOP=1 -f migrations/0003_claim_index.sql
--
-- The sweep claims ORDER BY run_at, id and, while draining, resumes from
-- the key where its previous batch started, so it does not re-walk the
-- index entries of rows it already deleted (dead tuples at the head of a
-- queue index are what makes a long drain slow down). The composite index
-- replaces the plain run_at index.
-- On a large, busy outbox, build it first without blocking producers:
--   CREATE INDEX CONCURRENTLY IF NOT EXISTS task_outbox_run_at_id_idx ON task_outbox (run_at, id);
CREATE INDEX IF NOT EXISTS task_outbox_run_at_id_idx ON task_outbox (run_at, id);
DROP INDEX IF EXISTS task_outbox_run_at_idx;
