//! 5,000 due rows across 20 jobs, drained by the least-privilege relay
//! role: every member lands in its job's schedule with the right score, the
//! outbox empties, nothing is dead-lettered.

use crate::common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn drains_every_row_with_the_right_member_and_score() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    seed(&db, 5_000, 20).await;
    let expected = expected_members(&db).await;
    assert_eq!(expected.len(), 5_000);

    // As the least-privilege role (deploy/postgres/roles.sql), not a superuser.
    let url = db.url_as("outbox_relay").await;
    let env = relay_env_as(&db, &url, &redis_url, &prefix, &[]);
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_drained(&db, Duration::from_secs(60)).await;

    assert_all_delivered(&redis_url, &prefix, &expected).await;
    let members = schedule_members(&redis_url, &prefix).await;
    assert_eq!(members.len(), 5_000, "no extra or corrupted members");
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    relay.stop().await;
}

#[tokio::test]
async fn future_rows_wait_for_their_time() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let c = db.client().await;
    c.batch_execute(
        "INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at)
         VALUES (gen_random_uuid(), gen_random_uuid(), 1, 'h', '/due', 1, 's', now()),
                (gen_random_uuid(), gen_random_uuid(), 2, 'h', '/later', 1, 's', now() + interval '1 hour')",
    )
    .await
    .expect("insert");
    let mut relay = RelayProcess::spawn(&relay_env(&db, &redis_url, &prefix, &[]));
    relay.wait_started().await;
    wait_until("due row delivered", Duration::from_secs(30), || async {
        db.count("SELECT count(*) FROM task_outbox WHERE path = '/due'").await == 0
    })
    .await;
    // A later tick delivers a second due row: the future row was passed over again.
    c.batch_execute(
        "INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at)
         VALUES (gen_random_uuid(), gen_random_uuid(), 3, 'h', '/due', 1, 's', now())",
    )
    .await
    .expect("insert");
    wait_until("second due row delivered", Duration::from_secs(30), || async {
        db.count("SELECT count(*) FROM task_outbox WHERE path = '/due'").await == 0
    })
    .await;
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox WHERE path = '/later'").await,
        1
    );
    let members = schedule_members(&redis_url, &prefix).await;
    assert_eq!(members.len(), 2);
    assert!(members.keys().all(|m| m.contains("|/due|")));
    relay.stop().await;
}

/// One job, batches of 3,000: a key's 6,000 score/member values go to
/// Redis through the schedule script in chunks (Lua's `unpack` limit), and
/// every one of them lands.
#[tokio::test]
async fn a_large_batch_for_one_job_lands_whole() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    seed(&db, 9_000, 1).await;
    let expected = expected_members(&db).await;
    let env = relay_env(&db, &redis_url, &prefix, &[("OUTBOX_RELAY_SWEEP__BATCH_SIZE", "3000")]);
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_drained(&db, Duration::from_secs(60)).await;
    assert_all_delivered(&redis_url, &prefix, &expected).await;
    assert_eq!(schedule_members(&redis_url, &prefix).await.len(), 9_000);
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    relay.stop().await;
}
