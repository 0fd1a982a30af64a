//! The browser console's tests, beside their helpers: `web` (an HTTP client
//! that keeps cookies and follows forms, a relay serving the console) and
//! `browser` (Chromium through ChromeDriver). Real Postgres, real Redis,
//! the relay as a subprocess at the shipped defaults plus the console's
//! keys. One file per behaviour: who may do what (`access`), the filtered
//! dead-letter actions, the fleet, how it starts, hostile ids, confirmed
//! actions, audit lines, sessions, least privilege, load, and the whole
//! console in a real browser (`in_a_browser`).

use crate::common::TestDb;

pub mod browser;
pub mod web;

mod access;
mod audit;
mod confirmed_actions;
mod fleet;
mod hostile_ids;
mod in_a_browser;
mod load;
mod privileges;
mod reconcile;
mod requeue_and_purge;
mod sessions;
mod start;

/// Insert `n` dead letters of `job` with `error`.
pub async fn insert_dead(db: &TestDb, job: &str, n: i64, error: &str) {
    db.client()
        .await
        .execute(
            "INSERT INTO task_outbox_dead (original_id, task_id, job_id, page_id, host, path, priority,
                                           source_type, run_at, attempts, last_error)
             SELECT i, gen_random_uuid(), $1::text::uuid, i::int, 'example.com', '/dead/' || i, 0.5, 'sitemap',
                    now(), 5, $3
               FROM generate_series(1, $2::int8) AS i",
            &[&job, &n, &error],
        )
        .await
        .expect("dead letters");
}

pub async fn dead_of(db: &TestDb, job: &str) -> i64 {
    db.count(&format!(
        "SELECT count(*) FROM task_outbox_dead WHERE job_id::text = lower('{job}')"
    ))
    .await
}
