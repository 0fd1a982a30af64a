//! The CounterSyncActor copies `{prefix}running` into `jobs.running_tasks`:
//! running/pending jobs only, negatives clamped to 0, bad fields skipped
//! with a warning naming them, an empty hash zeroes the counters, and no
//! transaction ever touches two jobs.

use crate::common;

use std::time::Duration;

use common::*;
use redis::AsyncCommands;
use uuid::Uuid;

async fn running_tasks(db: &TestDb, job: Uuid) -> i32 {
    db.client()
        .await
        .query_one(
            "SELECT running_tasks FROM jobs WHERE id::text = $1::uuid::text",
            &[&job],
        )
        .await
        .expect("job row")
        .get(0)
}

#[tokio::test]
async fn counters_follow_redis_by_the_rules() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let [a, b, c, d, e] = [(); 5].map(|_| Uuid::new_v4());
    let c_db = db.client().await;
    c_db.batch_execute(&format!(
        "INSERT INTO jobs (id, status, running_tasks) VALUES
           ('{a}', 'running', 0), ('{b}', 'pending', 9), ('{c}', 'completed', 2),
           ('{d}', 'running', 4), ('{e}', 'running', 1);
         CREATE TABLE job_update_log (job text, txid bigint);
         CREATE FUNCTION log_job_update() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO job_update_log VALUES (NEW.id, txid_current()); RETURN NEW; END $$;
         CREATE TRIGGER jobs_log AFTER UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION log_job_update();
         GRANT INSERT ON job_update_log TO PUBLIC;"
    ))
    .await
    .expect("jobs");
    let hash = format!("{}running", &*prefix);
    let mut conn = redis_conn(&redis_url).await;
    let _: () = conn
        .hset_multiple(
            &hash,
            &[
                (a.to_string(), "5".to_string()),
                (b.to_string(), "-3".to_string()),
                (c.to_string(), "7".to_string()),
                (e.to_string(), "abc".to_string()),
                ("not-a-uuid".to_string(), "1".to_string()),
            ],
        )
        .await
        .expect("HSET");

    // As the least-privilege role (deploy/postgres/roles.sql).
    let url = db.url_as("outbox_relay").await;
    let env = relay_env_as(
        &db,
        &url,
        &redis_url,
        &prefix,
        &[("OUTBOX_RELAY_COUNTER_SYNC__INTERVAL", "100ms")],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_until("running job synced", Duration::from_secs(30), || async {
        running_tasks(&db, a).await == 5 && running_tasks(&db, b).await == 0
    })
    .await;
    assert_eq!(running_tasks(&db, c).await, 2, "a completed job is left alone");
    assert_eq!(
        running_tasks(&db, d).await,
        4,
        "a job absent from the hash is left alone"
    );
    assert_eq!(running_tasks(&db, e).await, 1, "a non-numeric value is skipped");
    // Where jobs.id is TEXT (the Go schema) "not-a-uuid" is a job id like
    // any other, of a job that does not exist: left alone, not skipped.
    let text_ids = go_schema();
    wait_until("the bad fields are named in warnings", Duration::from_secs(10), || {
        let skipped = relay.records("running counter skipped");
        let named = (text_ids || skipped.iter().any(|r| r["field"] == "not-a-uuid"))
            && skipped.iter().any(|r| {
                r["field"] == e.to_string().as_str() && r["reason"].as_str().is_some_and(|x| x.contains("abc"))
            });
        async move { named }
    })
    .await;

    // Empty hash: every running/pending job with a counter goes to 0.
    let _: () = conn.del(&hash).await.expect("DEL");
    wait_until("counters zeroed", Duration::from_secs(30), || async {
        running_tasks(&db, a).await == 0 && running_tasks(&db, d).await == 0 && running_tasks(&db, e).await == 0
    })
    .await;
    assert_eq!(running_tasks(&db, c).await, 2, "completed jobs keep their counter");

    let (updates, txids): (i64, i64) = {
        let r = c_db
            .query_one("SELECT count(*), count(DISTINCT txid) FROM job_update_log", &[])
            .await
            .expect("log");
        (r.get(0), r.get(1))
    };
    assert!(updates >= 5, "{updates} updates");
    assert_eq!(updates, txids, "each job update was its own transaction");
    assert!(relay.is_running());
    relay.stop().await;
}

/// `jobs` is the platform's table, not ours: a `running_tasks` that is
/// NULL or `bigint` must be synced like any other, never panic the actor.
#[tokio::test]
async fn a_null_or_bigint_running_tasks_column_is_synced_not_a_panic() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let [a, b] = [(); 2].map(|_| Uuid::new_v4());
    db.client()
        .await
        .batch_execute(&format!(
            "ALTER TABLE jobs ALTER COLUMN running_tasks DROP NOT NULL,
                              ALTER COLUMN running_tasks TYPE bigint;
             INSERT INTO jobs (id, status, running_tasks) VALUES ('{a}', 'running', 1), ('{b}', 'running', NULL);"
        ))
        .await
        .expect("reshape jobs");
    let mut conn = redis_conn(&redis_url).await;
    let _: () = conn
        .hset_multiple(
            format!("{}running", &*prefix),
            &[(a.to_string(), "5"), (b.to_string(), "3")],
        )
        .await
        .expect("HSET");
    let env = relay_env(
        &db,
        &redis_url,
        &prefix,
        &[("OUTBOX_RELAY_COUNTER_SYNC__INTERVAL", "100ms")],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    let value = |job: Uuid| {
        let db = &db;
        async move {
            db.client()
                .await
                .query_one(
                    "SELECT running_tasks FROM jobs WHERE id::text = $1::uuid::text",
                    &[&job],
                )
                .await
                .expect("job row")
                .get::<_, Option<i64>>(0)
        }
    };
    wait_until("both jobs synced", Duration::from_secs(30), || async {
        value(a).await == Some(5) && value(b).await == Some(3)
    })
    .await;
    assert!(
        relay.records("actor failed").is_empty(),
        "counter sync must not panic or restart on the platform's column types:\n{}",
        relay.lines().join("\n")
    );
    relay.stop().await;
}
