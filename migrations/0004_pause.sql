-- outbox-relay schema, version 4: pause and resume.
-- Safe to run by hand: psql -v ON_ERROR_STOP=1 -f migrations/0004_pause.sql
--
-- `outbox-relay pause [--job ID]` writes a row here and `resume` deletes
-- it. Every relay's claim skips what is paused (scope '*': everything; a
-- job id, as task_outbox.job_id::text spells it: that job's rows), so all
-- relays on the database obey from their next tick, with no restart. A
-- paused row is simply not claimed: its attempts and run_at are untouched.
CREATE TABLE IF NOT EXISTS outbox_relay_pause (
    scope     TEXT PRIMARY KEY,
    paused_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    paused_by TEXT NOT NULL DEFAULT current_user,
    reason    TEXT NOT NULL DEFAULT ''
);
