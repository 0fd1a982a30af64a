-- The three roles of outbox-relay and exactly the privileges each needs
-- (docs/postgres.md "Database roles"; `outbox-relay check-config` names anything
-- missing for `run`). Run as a superuser or the database owner, after the
-- tables exist (`outbox-relay migrate`, as outbox_migrator).
--
-- Create the roles once per cluster (passwords are yours to set):
--   CREATE ROLE outbox_migrator LOGIN PASSWORD '…';
--   CREATE ROLE outbox_relay    LOGIN PASSWORD '…';
--   CREATE ROLE outbox_triage   LOGIN PASSWORD '…';
-- and let the migrator create tables in the schema (Postgres 15 no longer
-- grants CREATE on public to everyone):
--   GRANT CREATE, USAGE ON SCHEMA public TO outbox_migrator;
-- The migrator then owns task_outbox, task_outbox_dead and
-- outbox_relay_migrations; run this file afterwards, as it or a superuser.

-- `run`: claim (DELETE … RETURNING; SELECT … FOR UPDATE needs UPDATE),
-- put back the claimed rows that stay (INSERT with their own ids: no
-- sequence privilege), reschedule, move to the dead table (DELETE …
-- RETURNING, INSERT), purge
-- dead letters past dead_letter.retention, read task_outbox's sequence
-- (the fresh lane's pg_sequence_last_value), probe counts, and counter
-- sync on jobs (SELECT … FOR UPDATE, UPDATE).
GRANT SELECT, INSERT, UPDATE, DELETE ON task_outbox TO outbox_relay;
GRANT SELECT, INSERT, DELETE ON task_outbox_dead TO outbox_relay;
GRANT USAGE ON SEQUENCE task_outbox_dead_id_seq TO outbox_relay;
GRANT SELECT ON SEQUENCE task_outbox_id_seq TO outbox_relay;
GRANT SELECT, UPDATE ON jobs TO outbox_relay;
-- The claim skips paused jobs (`outbox-relay pause`).
GRANT SELECT ON outbox_relay_pause TO outbox_relay;
-- The heartbeat the console reads (migration 7): a relay upserts its own
-- row and minute, and forgets rows a day old.
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_relay_instances, outbox_relay_minutes TO outbox_relay;
-- The delivery journal (migration 8): a tick inserts what it delivered;
-- retention empties one partition at a time (TRUNCATE is checked on the
-- partition itself); the watch and `reconcile` read it back.
GRANT SELECT, INSERT ON outbox_relay_journal TO outbox_relay;
GRANT SELECT, TRUNCATE ON outbox_relay_journal_0, outbox_relay_journal_1, outbox_relay_journal_2, outbox_relay_journal_3, outbox_relay_journal_4, outbox_relay_journal_5, outbox_relay_journal_6, outbox_relay_journal_7, outbox_relay_journal_8, outbox_relay_journal_9, outbox_relay_journal_10, outbox_relay_journal_11, outbox_relay_journal_12, outbox_relay_journal_13, outbox_relay_journal_14, outbox_relay_journal_15 TO outbox_relay;

-- Triage: `dead-letter list|requeue|purge`, `cancel-job`, `status`,
-- `pause`, `resume`.
-- requeue locks dead letters (UPDATE) and inserts outbox rows (sequence
-- USAGE); cancel-job locks and updates the job and deletes its rows.
GRANT SELECT, INSERT, DELETE ON task_outbox TO outbox_triage;
GRANT USAGE ON SEQUENCE task_outbox_id_seq TO outbox_triage;
GRANT SELECT, UPDATE, DELETE ON task_outbox_dead TO outbox_triage;
GRANT SELECT, UPDATE ON jobs TO outbox_triage;
-- `pause` and `resume` write the control table.
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_relay_pause TO outbox_triage;
-- The console (`outbox-relay console`, or console.listen on `run`) runs as
-- this role too: everything above, and the fleet it shows.
GRANT SELECT ON outbox_relay_instances, outbox_relay_minutes TO outbox_triage;
-- `reconcile` and `status` read the delivery journal.
GRANT SELECT ON outbox_relay_journal TO outbox_triage;
-- Its set-aside requeue makes rows due again (UPDATE … SET run_at = now(),
-- attempts = 0, on rows it locks FOR UPDATE): those two columns only.
GRANT UPDATE (run_at, attempts) ON task_outbox TO outbox_triage;
