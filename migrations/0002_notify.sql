-- outbox-relay schema, version 2: wake the relay when rows are inserted.
-- Safe to run by hand: psql -v ON_ERROR_STOP=1 -f migrations/0002_notify.sql
--
-- A STATEMENT-level trigger: a bulk INSERT of a million rows sends one
-- notification, not a million. Relays that LISTEN (database.listen_url) run
-- a tick at once instead of waiting for sweep.interval; relays that poll
-- ignore it. NOTIFY is delivered at commit, so a woken relay sees the rows.
CREATE OR REPLACE FUNCTION outbox_relay_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_relay', '');
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS task_outbox_notify ON task_outbox;
CREATE TRIGGER task_outbox_notify
    AFTER INSERT ON task_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_relay_notify();
