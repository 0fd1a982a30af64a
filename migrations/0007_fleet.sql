-- outbox-relay schema, version 7: the fleet, for the console.
-- Safe to run by hand: psql -v ON_ERROR_STOP=1 -f migrations/0007_fleet.sql
--
-- Every running relay writes one statement every `health.interval`: its
-- row in outbox_relay_instances (who it is, its settings that matter, its
-- counters since start, its actors' health, what is paused or held back)
-- and what it did in the current minute in outbox_relay_minutes (rows
-- delivered, retried, dead-lettered, and its delivery lag as counts per
-- bucket of outbox_relay_delivery_lag_seconds). The same statement forgets
-- relays not seen for a day and minutes older than a day. The console
-- (`console.listen`, `outbox-relay console`) reads both; nothing else
-- does, and a relay whose statement fails (this migration not applied,
-- a missing grant) says so once and delivers as before.
CREATE TABLE IF NOT EXISTS outbox_relay_instances (
    instance_id TEXT PRIMARY KEY,
    host        TEXT NOT NULL,
    version     TEXT NOT NULL,
    started_at  TIMESTAMPTZ NOT NULL,
    last_seen   TIMESTAMPTZ NOT NULL DEFAULT now(),
    settings    JSONB NOT NULL DEFAULT '{}',
    counters    JSONB NOT NULL DEFAULT '{}',
    health      JSONB NOT NULL DEFAULT '{}'
);

CREATE TABLE IF NOT EXISTS outbox_relay_minutes (
    minute        TIMESTAMPTZ NOT NULL,
    instance_id   TEXT NOT NULL,
    delivered     BIGINT NOT NULL DEFAULT 0,
    retried       BIGINT NOT NULL DEFAULT 0,
    dead_lettered BIGINT NOT NULL DEFAULT 0,
    lag_buckets   BIGINT[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (minute, instance_id)
);
