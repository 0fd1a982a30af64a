//! The two ways a tick claims (`db::schema::ClaimMode`). By default the
//! claim deletes the rows and puts back those that stay; when a row could
//! not be put back exactly — a column the relay does not know, a role
//! without INSERT — the relay claims with `SELECT … FOR UPDATE` instead,
//! says so at start and in `check-config`, and loses nothing.

mod common;

use std::time::Duration;

use common::*;
use redis::AsyncCommands;

/// `check-config`'s output as `env` sees the database.
fn check_config(env: &[(String, String)]) -> String {
    let out = relay_command(&["check-config"], env).output().expect("check-config");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn a_column_the_relay_does_not_know_survives_retries_by_locking_claims() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let c = db.client().await;
    c.batch_execute("ALTER TABLE task_outbox ADD COLUMN note TEXT NOT NULL DEFAULT 'unset'")
        .await
        .expect("add a column");
    let jobs = seed(&db, 200, 5).await;
    c.batch_execute("UPDATE task_outbox SET note = 'kept-' || id")
        .await
        .expect("set notes");
    let poisoned = jobs[2];
    let mut conn = redis_conn(&redis_url).await;
    let _: () = conn
        .set(format!("{}sched:{poisoned}", &*prefix), "not a sorted set")
        .await
        .expect("SET");

    let env = relay_env(&db, &redis_url, &prefix, &[("OUTBOX_RELAY_SWEEP__MAX_ATTEMPTS", "5")]);
    let config = check_config(&env);
    assert!(
        config.contains("claim: lock (task_outbox has columns the relay does not know: note)"),
        "{config}"
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_until(
        "healthy rows delivered, poisoned ones retried",
        Duration::from_secs(30),
        || async {
            db.count("SELECT count(*) FROM task_outbox").await == 40
                && db.count("SELECT count(*) FROM task_outbox WHERE attempts >= 1").await == 40
        },
    )
    .await;
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox WHERE note = 'kept-' || id")
            .await,
        40,
        "a retried row keeps the value of a column the relay does not know"
    );
    let warned = relay.records("claiming with SELECT … FOR UPDATE");
    assert_eq!(warned.len(), 1, "one warning at start: {:?}", relay.lines());
    assert!(
        warned[0]["why"].as_str().is_some_and(|w| w.contains("note")),
        "{}",
        warned[0]
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_relay_role_without_insert_claims_by_locking_and_drains() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let relay_url = db.url_as("outbox_relay").await;
    db.client()
        .await
        .batch_execute("REVOKE INSERT ON task_outbox FROM outbox_relay")
        .await
        .expect("revoke");
    seed(&db, 300, 3).await;
    let expected = expected_members(&db).await;

    let env = relay_env_as(&db, &relay_url, &redis_url, &prefix, &[]);
    let config = check_config(&env);
    assert!(
        config.contains("claim: lock (the role lacks INSERT on task_outbox"),
        "{config}"
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_drained(&db, Duration::from_secs(30)).await;
    assert_all_delivered(&redis_url, &prefix, &expected).await;
    assert_eq!(relay.records("claiming with SELECT … FOR UPDATE").len(), 1);
    relay.stop().await;
}

#[tokio::test]
async fn the_shipped_roles_claim_by_deleting() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let relay_url = db.url_as("outbox_relay").await;
    let env = relay_env_as(&db, &relay_url, &shared_redis_url(), &prefix, &[]);
    let config = check_config(&env);
    assert!(config.contains("; claim: delete"), "{config}");
}
