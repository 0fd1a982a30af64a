//! One job's schedule key holds a plain string (WRONGTYPE). Only that job's
//! rows fail: they retry with the backoff formula and, at `max_attempts`,
//! move to `task_outbox_dead`; every other row is delivered in the same tick.

use crate::common;

use std::time::Duration;

use common::*;
use redis::AsyncCommands;

#[tokio::test]
async fn wrongtype_fails_only_its_rows_and_backs_off_then_dead_letters() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let jobs = seed(&db, 400, 10).await;
    let poisoned = jobs[3];
    let poisoned_rows = db
        .count(&format!("SELECT count(*) FROM task_outbox WHERE job_id = '{poisoned}'"))
        .await;
    assert_eq!(poisoned_rows, 40);
    let expected = expected_members(&db).await;
    // What a failed row must keep through its retries and into the dead
    // table: every column but attempts and run_at (the relay claims by
    // deleting and puts such rows back).
    let before = fingerprint(&db, "task_outbox", "id", &poisoned).await;
    let mut conn = redis_conn(&redis_url).await;
    let _: () = conn
        .set(format!("{}sched:{poisoned}", &*prefix), "not a sorted set")
        .await
        .expect("SET");

    // One tick covers the whole backlog (batch 1000 > 400 rows); backoff
    // 2s then 4s capped at 3s; the third failure dead-letters.
    let env = relay_env(
        &db,
        &redis_url,
        &prefix,
        &[
            ("OUTBOX_RELAY_SWEEP__BATCH_SIZE", "1000"),
            ("OUTBOX_RELAY_SWEEP__BASE_BACKOFF", "2s"),
            ("OUTBOX_RELAY_SWEEP__MAX_BACKOFF", "3s"),
            ("OUTBOX_RELAY_SWEEP__MAX_ATTEMPTS", "3"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;

    // First failure: the other 360 rows are gone in that same tick, the
    // poisoned rows carry attempts = 1 and run_at = now + 2s.
    wait_until("first failure recorded", Duration::from_secs(30), || async {
        db.count("SELECT count(*) FROM task_outbox WHERE attempts = 1").await == 40
    })
    .await;
    let c = db.client().await;
    let row = c
        .query_one(
            "SELECT count(*) FILTER (WHERE job_id::text <> $1::uuid::text), count(*),
                    extract(epoch FROM max(run_at) - now())::float8, extract(epoch FROM min(run_at) - now())::float8
               FROM task_outbox",
            &[&poisoned],
        )
        .await
        .expect("inspect");
    assert_eq!(
        row.get::<_, i64>(0),
        0,
        "healthy rows were delivered in the failing tick"
    );
    assert_eq!(row.get::<_, i64>(1), 40);
    let (max_left, min_left) = (row.get::<_, f64>(2), row.get::<_, f64>(3));
    assert!(
        max_left <= 2.05 && min_left > 0.5,
        "first backoff is base (2s): {min_left}..{max_left}"
    );
    assert_eq!(
        fingerprint(&db, "task_outbox", "id", &poisoned).await,
        before,
        "a retried row keeps its id and every other column"
    );
    let healthy: std::collections::HashMap<_, _> = expected
        .iter()
        .filter(|(_, (job, _, _))| *job != poisoned.to_string())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(healthy.len(), 360);
    assert_all_delivered(&redis_url, &prefix, &healthy).await;

    // Second failure: delay min(2s * 2, 3s) = 3s.
    wait_until("second failure recorded", Duration::from_secs(30), || async {
        db.count("SELECT count(*) FROM task_outbox WHERE attempts = 2").await == 40
    })
    .await;
    let left: f64 = c
        .query_one(
            "SELECT extract(epoch FROM max(run_at) - now())::float8 FROM task_outbox",
            &[],
        )
        .await
        .expect("inspect")
        .get(0);
    assert!(left <= 3.05 && left > 2.05, "second backoff is capped at 3s: {left}");

    // Third failure: the rows move to task_outbox_dead with attempts = 3.
    wait_until("poisoned rows dead-lettered", Duration::from_secs(30), || async {
        db.count("SELECT count(*) FROM task_outbox_dead").await == 40
    })
    .await;
    assert_eq!(db.count("SELECT count(*) FROM task_outbox").await, 0);
    assert_eq!(
        fingerprint(&db, "task_outbox_dead", "original_id", &poisoned).await,
        before,
        "a dead letter keeps its original id and every other column"
    );
    let dead = c
        .query("SELECT attempts, last_error, job_id FROM task_outbox_dead", &[])
        .await
        .expect("dead rows");
    for r in &dead {
        assert_eq!(r.get::<_, i32>(0), 3);
        assert!(r.get::<_, String>(1).contains("WRONGTYPE"), "{}", r.get::<_, String>(1));
        assert_eq!(r.get::<_, uuid::Uuid>(2), poisoned);
    }
    // One warning per tick that moved rows: with two lanes (the default
    // concurrency) the 40 rows may come due in one tick or be split between
    // the lanes' claims, so the warnings' counts add up to 40.
    wait_until("warnings name the dead-letter moves", Duration::from_secs(10), || {
        let warned: i64 = relay
            .records("rows moved to the dead-letter table")
            .iter()
            .filter(|r| r["level"] == "warn" && r["last_error"].as_str().is_some_and(|e| e.contains("WRONGTYPE")))
            .filter_map(|r| r["count"].as_i64())
            .sum();
        async move { warned == 40 }
    })
    .await;
    relay.stop().await;
}

/// One hash over `job`'s rows in `table`: every column the relay carries
/// but `attempts` and `run_at`, ordered by `id_column` (the outbox id).
async fn fingerprint(db: &TestDb, table: &str, id_column: &str, job: &uuid::Uuid) -> String {
    db.client()
        .await
        .query_one(
            &format!(
                "SELECT md5(string_agg(concat_ws('|', {id_column}, task_id::text, job_id::text, page_id, host, path,
                                                 priority, retry_count, source_type, source_url, created_at,
                                                 task_type, lighthouse_run_id), ',' ORDER BY {id_column}))
                   FROM {table} WHERE job_id::text = $1"
            ),
            &[&job.to_string()],
        )
        .await
        .expect("fingerprint")
        .get(0)
}
