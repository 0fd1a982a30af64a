//! The two ways a tick claims (`db::schema::ClaimMode`). By default the
//! claim deletes the rows and puts back those that stay; when a row could
//! not be put back exactly — a column the relay does not know, a role
//! without INSERT — the relay claims with `SELECT … FOR UPDATE` instead,
//! says so at start and in `check-config`, and loses nothing.

use crate::common;

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

/// A column added while the relay runs (expand-then-deploy): the relay
/// notices at its next tick, claims by locking from then on with one
/// warning, and no retried row has its value replaced by the column's
/// DEFAULT. Before, every put-back wrote the DEFAULT.
#[tokio::test]
async fn a_column_added_while_running_is_kept_by_falling_back_to_locking_claims() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let env = relay_env(
        &db,
        &redis_url,
        &prefix,
        &[("OUTBOX_RELAY_SWEEP__BASE_BACKOFF", "100ms")],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    let c = db.client().await;
    c.batch_execute("ALTER TABLE task_outbox ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default'")
        .await
        .expect("add a column");
    // Poisoned before its rows exist: the running relay cannot deliver them first.
    let jobs = new_jobs(5);
    poison_job(&redis_url, &prefix, &jobs[2]).await;
    seed_for(&db, 200, &jobs).await;
    c.batch_execute("UPDATE task_outbox SET tenant = 'mine'")
        .await
        .expect("set tenants");
    wait_until(
        "healthy rows delivered, poisoned ones retried twice",
        Duration::from_secs(60),
        || async {
            db.count("SELECT count(*) FROM task_outbox").await == 40
                && db.count("SELECT count(*) FROM task_outbox WHERE attempts >= 2").await == 40
        },
    )
    .await;
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox WHERE tenant = 'mine'").await,
        40,
        "a retried row keeps its value of the new column"
    );
    let warned = relay.records("task_outbox changed under the relay");
    assert_eq!(warned.len(), 1, "one warning: {:#?}", relay.lines());
    assert!(
        warned[0]["reason"].as_str().is_some_and(|r| r.contains("tenant")),
        "{}",
        warned[0]
    );
    relay.stop().await;
}

/// INSERT revoked while the relay runs (docs/settlement.md's advice when a trigger must
/// not fire): a tick with rows that must stay cannot put them back. The
/// relay falls back to locking claims with one warning instead of failing
/// every such tick after its ZADDs and re-sending the batch forever, and
/// the failing rows count their attempts again.
#[tokio::test]
async fn insert_revoked_while_running_falls_back_instead_of_looping() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let relay_url = db.url_as("outbox_relay").await;
    let env = relay_env_as(
        &db,
        &relay_url,
        &redis_url,
        &prefix,
        &[("OUTBOX_RELAY_SWEEP__BASE_BACKOFF", "100ms")],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    let c = db.client().await;
    c.batch_execute("REVOKE INSERT ON task_outbox FROM outbox_relay")
        .await
        .expect("revoke");
    // Poisoned before its rows exist: the running relay cannot deliver them first.
    let jobs = new_jobs(5);
    poison_job(&redis_url, &prefix, &jobs[2]).await;
    seed_for(&db, 200, &jobs).await;
    wait_until("poisoned rows count attempts", Duration::from_secs(60), || async {
        db.count("SELECT count(*) FROM task_outbox").await == 40
            && db.count("SELECT count(*) FROM task_outbox WHERE attempts >= 2").await == 40
    })
    .await;
    assert_eq!(
        relay.records("task_outbox changed under the relay").len(),
        1,
        "{:#?}",
        relay.lines()
    );
    relay.stop().await;
}

/// `timestamp without time zone` columns could not be put back exactly
/// (the session's time zone, DST gaps): such a table is claimed by locking.
#[tokio::test]
async fn zoneless_timestamps_are_claimed_by_locking() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    db.client()
        .await
        .batch_execute("ALTER TABLE task_outbox ALTER COLUMN run_at TYPE timestamp")
        .await
        .expect("alter run_at");
    let env = relay_env(&db, &shared_redis_url(), &prefix, &[]);
    let config = check_config(&env);
    assert!(
        config.contains("claim: lock (task_outbox.run_at is timestamp without time zone"),
        "{config}"
    );
}

/// A row due at `-infinity` cannot be a score: it is dead-lettered at once
/// with a reason that names run_at, never written to Redis with a score
/// of about -9.2e15, and the other rows are delivered.
#[tokio::test]
async fn a_row_due_at_minus_infinity_is_dead_lettered_with_its_reason() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    seed(&db, 50, 2).await;
    db.set_first_row("run_at = '-infinity'").await;
    let mut relay = RelayProcess::spawn(&relay_env(&db, &redis_url, &prefix, &[]));
    relay.wait_started().await;
    wait_drained(&db, Duration::from_secs(30)).await;
    let c = db.client().await;
    let dead = c
        .query("SELECT last_error, run_at = '-infinity' FROM task_outbox_dead", &[])
        .await
        .expect("dead letters");
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].get::<_, String>(0).contains("run_at is -infinity"),
        "{}",
        dead[0].get::<_, String>(0)
    );
    assert!(dead[0].get::<_, bool>(1), "kept as it was");
    let members = schedule_members(&redis_url, &prefix).await;
    assert_eq!(members.len(), 49);
    assert!(members.values().all(|s| *s > 0.0), "no member scored before 1970");
    relay.stop().await;
}

/// Rows a delete claim puts back (retries) wake no relay: migration 5's
/// trigger sends no NOTIFY for them, so a retry-heavy incident is not
/// taken for live traffic (which halves the drain lanes). Before, every
/// put-back commit woke every listening relay.
#[tokio::test]
async fn rows_put_back_wake_no_relay() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let jobs = seed(&db, 50, 1).await;
    poison_job(&redis_url, &prefix, &jobs[0]).await;
    let env = relay_env(
        &db,
        &redis_url,
        &prefix,
        &[
            ("OUTBOX_RELAY_SWEEP__BASE_BACKOFF", "50ms"),
            ("OUTBOX_RELAY_SWEEP__MAX_BACKOFF", "50ms"),
            ("OUTBOX_RELAY_SWEEP__MAX_ATTEMPTS", "1000"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    let woken = |text: &str| {
        ["sent", "coalesced"]
            .iter()
            .map(|r| metric_value(text, "outbox_relay_wakeups_total", &[("result", r)]).unwrap_or(0.0))
            .sum::<f64>()
    };
    wait_until("the rows are retried", Duration::from_secs(30), || async {
        db.count("SELECT count(*) FROM task_outbox WHERE attempts >= 1").await == 50
    })
    .await;
    // Taking the lead wakes the sweep once (rows committed while nobody
    // answered); rows can be retried by polling before that, so count from
    // the moment the relay leads.
    wait_until("the relay leads the listeners", Duration::from_secs(30), || async {
        !relay.records("this relay answers new-row notifications").is_empty()
    })
    .await;
    let before = woken(&scrape(&relay).await);
    wait_until("ten more put-backs", Duration::from_secs(60), || async {
        db.count("SELECT count(*) FROM task_outbox WHERE attempts >= 11").await == 50
    })
    .await;
    let after = woken(&scrape(&relay).await);
    assert_eq!(after, before, "put-backs woke the relay {} times", after - before);
    relay.stop().await;
}
