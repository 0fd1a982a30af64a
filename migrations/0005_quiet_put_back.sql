-- outbox-relay schema, version 5: no wake-up for rows a relay puts back.
-- Safe to run by hand: psql -v ON_ERROR_STOP=1 -f migrations/0005_quiet_put_back.sql
--
-- A relay that claims by deleting puts back the rows that must stay (a
-- retry, a postponed write) with an INSERT, inside its tick's transaction,
-- after `SET LOCAL outbox_relay.put_back = on`. Those rows are not new
-- work: waking every listening relay for them made each treat the
-- incident's retries as live traffic (fewer drain lanes). Producers'
-- inserts notify as before.
CREATE OR REPLACE FUNCTION outbox_relay_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('outbox_relay.put_back', true) IS DISTINCT FROM 'on' THEN
        PERFORM pg_notify('outbox_relay', '');
    END IF;
    RETURN NULL;
END
$$;
