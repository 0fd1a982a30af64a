-- outbox-relay schema, version 6: a notification names the transaction
-- whose rows it announces.
-- Safe to run by hand: psql -v ON_ERROR_STOP=1 -f migrations/0006_notify_xid.sql
--
-- The payload becomes the inserting transaction's id (txid_current()).
-- The relay that answers notifications (the listen lead) compares it with
-- the snapshot its last claim for new rows saw: a transaction that claim
-- already saw needs no claim of its own. Without this payload every
-- notification that arrives while a claim is in flight costs one more
-- claim, which at thousands of single-row commits a second mostly finds
-- nothing. Relays of earlier releases wake for any payload, as before.
-- Rows a relay puts back still notify nobody (migration 5).
CREATE OR REPLACE FUNCTION outbox_relay_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('outbox_relay.put_back', true) IS DISTINCT FROM 'on' THEN
        PERFORM pg_notify('outbox_relay', txid_current()::text);
    END IF;
    RETURN NULL;
END
$$;
