-- outbox-relay schema, version 1.
-- Safe to run by hand: psql -v ON_ERROR_STOP=1 -f migrations/0001_outbox.sql
-- (every statement is idempotent; `outbox-relay migrate` records it as applied).

-- Rows producers write in the same transaction as their task; the relay
-- moves them to Redis and deletes them.
CREATE TABLE IF NOT EXISTS task_outbox (
    id                BIGSERIAL PRIMARY KEY,
    task_id           UUID NOT NULL UNIQUE,
    job_id            UUID NOT NULL,
    page_id           INT NOT NULL,
    host              TEXT NOT NULL,
    path              TEXT NOT NULL,
    priority          DOUBLE PRECISION NOT NULL,
    retry_count       INT NOT NULL DEFAULT 0,
    source_type       TEXT NOT NULL,
    source_url        TEXT NOT NULL DEFAULT '',
    run_at            TIMESTAMPTZ NOT NULL,
    attempts          INT NOT NULL DEFAULT 0,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    task_type         TEXT NOT NULL DEFAULT 'crawl',
    lighthouse_run_id BIGINT NULL
);
CREATE INDEX IF NOT EXISTS task_outbox_run_at_idx ON task_outbox (run_at);

-- Rows that could not be delivered: the forensic trail. No foreign keys, so
-- it outlives the job. `original_id` is the id the row had in task_outbox.
CREATE TABLE IF NOT EXISTS task_outbox_dead (
    id                BIGSERIAL PRIMARY KEY,
    original_id       BIGINT NOT NULL,
    task_id           UUID NOT NULL,
    job_id            UUID NOT NULL,
    page_id           INT NOT NULL,
    host              TEXT NOT NULL,
    path              TEXT NOT NULL,
    priority          DOUBLE PRECISION NOT NULL,
    retry_count       INT NOT NULL DEFAULT 0,
    source_type       TEXT NOT NULL,
    source_url        TEXT NOT NULL DEFAULT '',
    run_at            TIMESTAMPTZ NOT NULL,
    attempts          INT NOT NULL DEFAULT 0,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    task_type         TEXT NOT NULL DEFAULT 'crawl',
    lighthouse_run_id BIGINT NULL,
    dead_lettered_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error        TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS task_outbox_dead_job_id_idx ON task_outbox_dead (job_id);
CREATE INDEX IF NOT EXISTS task_outbox_dead_dead_lettered_at_idx ON task_outbox_dead (dead_lettered_at DESC);

-- Minimal jobs table; real deployments already have one (then this is a no-op).
CREATE TABLE IF NOT EXISTS jobs (
    id            UUID PRIMARY KEY,
    status        TEXT NOT NULL,
    running_tasks INT NOT NULL DEFAULT 0 CHECK (running_tasks >= 0),
    completed_at  TIMESTAMPTZ NULL
);
