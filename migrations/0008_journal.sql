-- outbox-relay schema, version 8: the delivery journal.
-- Safe to run by hand: psql -v ON_ERROR_STOP=1 -f migrations/0008_journal.sql
--
-- With journal.keep set, every tick that delivered rows writes one row
-- here, in the tick's own transaction: for each row it delivered, the
-- outbox id, task and job ids, and the exact schedule key, score and
-- member it wrote (arrays, in the same order), and the Redis node that
-- acknowledged the batch (run id, replication id, replication offset
-- after the write). One row per batch, its arrays compressed by TOAST,
-- costs the drain far less than one row per delivery. When Redis loses
-- data (a restart without persistence, a failover before the replica had
-- the writes, a FLUSHALL), the relay writes the missing entries again from
-- here (`outbox-relay reconcile`; docs/journal.md).
--
-- Retention leaves no dead rows behind: the table is 16 list partitions
-- by `slot`, the time slice the row was written in (keep / 13 wide, by the
-- database's clock, modulo 16); the relay empties a slot with TRUNCATE
-- one slice before it is written again. Nothing is ever DELETEd or
-- UPDATEd here, so the table needs no vacuum to stay its size.
CREATE TABLE IF NOT EXISTS outbox_relay_journal (
    slot          SMALLINT NOT NULL,
    delivered_at  TIMESTAMPTZ NOT NULL,
    first_id      BIGINT NOT NULL,
    outbox_ids    BIGINT[] NOT NULL,
    task_ids      TEXT[] NOT NULL,
    job_ids       TEXT[] NOT NULL,
    schedule_keys TEXT[] NOT NULL,
    scores        BIGINT[] NOT NULL,
    members       TEXT[] NOT NULL,
    node_run_id   TEXT NOT NULL DEFAULT '',
    node_replid   TEXT NOT NULL DEFAULT '',
    node_offset   BIGINT NOT NULL DEFAULT 0
) PARTITION BY LIST (slot);

CREATE TABLE IF NOT EXISTS outbox_relay_journal_0 PARTITION OF outbox_relay_journal FOR VALUES IN (0);
CREATE TABLE IF NOT EXISTS outbox_relay_journal_1 PARTITION OF outbox_relay_journal FOR VALUES IN (1);
CREATE TABLE IF NOT EXISTS outbox_relay_journal_2 PARTITION OF outbox_relay_journal FOR VALUES IN (2);
CREATE TABLE IF NOT EXISTS outbox_relay_journal_3 PARTITION OF outbox_relay_journal FOR VALUES IN (3);
CREATE TABLE IF NOT EXISTS outbox_relay_journal_4 PARTITION OF outbox_relay_journal FOR VALUES IN (4);
CREATE TABLE IF NOT EXISTS outbox_relay_journal_5 PARTITION OF outbox_relay_journal FOR VALUES IN (5);
CREATE TABLE IF NOT EXISTS outbox_relay_journal_6 PARTITION OF outbox_relay_journal FOR VALUES IN (6);
CREATE TABLE IF NOT EXISTS outbox_relay_journal_7 PARTITION OF outbox_relay_journal FOR VALUES IN (7);
CREATE TABLE IF NOT EXISTS outbox_relay_journal_8 PARTITION OF outbox_relay_journal FOR VALUES IN (8);
CREATE TABLE IF NOT EXISTS outbox_relay_journal_9 PARTITION OF outbox_relay_journal FOR VALUES IN (9);
CREATE TABLE IF NOT EXISTS outbox_relay_journal_10 PARTITION OF outbox_relay_journal FOR VALUES IN (10);
CREATE TABLE IF NOT EXISTS outbox_relay_journal_11 PARTITION OF outbox_relay_journal FOR VALUES IN (11);
CREATE TABLE IF NOT EXISTS outbox_relay_journal_12 PARTITION OF outbox_relay_journal FOR VALUES IN (12);
CREATE TABLE IF NOT EXISTS outbox_relay_journal_13 PARTITION OF outbox_relay_journal FOR VALUES IN (13);
CREATE TABLE IF NOT EXISTS outbox_relay_journal_14 PARTITION OF outbox_relay_journal FOR VALUES IN (14);
CREATE TABLE IF NOT EXISTS outbox_relay_journal_15 PARTITION OF outbox_relay_journal FOR VALUES IN (15);

-- The arrays compress with lz4 where the server has it (Postgres 14 and
-- later, built with lz4, as Debian's and the official images are): about
-- a third of pglz's cost at the same size (docs/BENCHMARKS.md, session
-- 20). Elsewhere they keep the default, pglz.
DO $$
DECLARE
    t TEXT;
BEGIN
    FOR t IN SELECT 'outbox_relay_journal' UNION ALL
             SELECT 'outbox_relay_journal_' || n FROM generate_series(0, 15) AS n
    LOOP
        EXECUTE format('ALTER TABLE %I
            ALTER COLUMN outbox_ids SET COMPRESSION lz4,
            ALTER COLUMN task_ids SET COMPRESSION lz4,
            ALTER COLUMN job_ids SET COMPRESSION lz4,
            ALTER COLUMN schedule_keys SET COMPRESSION lz4,
            ALTER COLUMN scores SET COMPRESSION lz4,
            ALTER COLUMN members SET COMPRESSION lz4', t);
    END LOOP;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value OR syntax_error THEN
    RAISE NOTICE 'lz4 is not available: the journal compresses with pglz';
END
$$;

-- Reconcile pages through the journal by each batch's first outbox id.
CREATE INDEX IF NOT EXISTS outbox_relay_journal_first_id ON outbox_relay_journal (first_id);
