-- The Go sweeper's production schema, as ../shared/SPEC.md §3 and issue
-- #19 describe it: the tables the relay must work on unchanged when its
-- users point it at the database the Go sweeper already uses.
--   * task_outbox.task_id / job_id are TEXT (widened from UUID later);
--   * task_outbox_dead.task_id / job_id are still UUID;
--   * jobs.id is TEXT;
--   * task_outbox_dead.attempts and created_at are NOT NULL without default;
--   * task_type is checked (crawl | lighthouse), lighthouse_run_id has a
--     foreign key to lighthouse_runs and a routing check;
--   * the indexes carry the Go migrations' names.
-- Used by the tests' fixture (OUTBOX_TEST_SCHEMA=go) before `migrate`.

CREATE TABLE jobs (
    id            TEXT PRIMARY KEY,
    status        TEXT NOT NULL,
    running_tasks INTEGER NOT NULL DEFAULT 0 CHECK (running_tasks >= 0),
    completed_at  TIMESTAMPTZ NULL
);

CREATE TABLE lighthouse_runs (
    id         BIGSERIAL PRIMARY KEY,
    job_id     TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE task_outbox (
    id                BIGSERIAL PRIMARY KEY,
    task_id           TEXT NOT NULL,
    job_id            TEXT NOT NULL,
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
    lighthouse_run_id BIGINT NULL REFERENCES lighthouse_runs(id) ON DELETE CASCADE,
    CONSTRAINT task_outbox_task_type_check CHECK (task_type IN ('crawl', 'lighthouse')),
    CONSTRAINT task_outbox_lighthouse_routing_check CHECK (
        (task_type = 'crawl' AND lighthouse_run_id IS NULL)
        OR (task_type = 'lighthouse' AND lighthouse_run_id IS NOT NULL))
);
CREATE INDEX idx_task_outbox_run_at ON task_outbox (run_at);
CREATE UNIQUE INDEX idx_task_outbox_task_id_unique ON task_outbox (task_id);

CREATE TABLE task_outbox_dead (
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
    attempts          INT NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL,
    task_type         TEXT NOT NULL DEFAULT 'crawl',
    lighthouse_run_id BIGINT NULL REFERENCES lighthouse_runs(id) ON DELETE SET NULL,
    dead_lettered_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error        TEXT NOT NULL DEFAULT '',
    CONSTRAINT task_outbox_dead_task_type_check CHECK (task_type IN ('crawl', 'lighthouse'))
);
CREATE INDEX idx_task_outbox_dead_job_id ON task_outbox_dead (job_id);
CREATE INDEX idx_task_outbox_dead_dead_lettered_at ON task_outbox_dead (dead_lettered_at DESC);
