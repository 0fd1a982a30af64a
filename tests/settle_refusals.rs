//! What a tick does when Postgres refuses part of its settle (#38): a
//! table that will not take a write is met, not looped on.
//!
//! - A dead table that refuses its INSERT (a maintenance trigger that
//!   raises; the same path serves a revoked INSERT, a check, a lock past
//!   the timeout) once made every tick roll back after its ZADDs: the whole
//!   batch was re-sent about six times a second for as long as it lasted.
//!   Now the rows Redis accepted are deleted, the rows that cannot move
//!   stay in the outbox, put off by `base_backoff`, with a warning and
//!   `outbox_relay_settle_refused_rows_total`; Redis's own command counts
//!   prove nothing is re-sent.
//! - A producer's de-duplication trigger (`BEFORE INSERT … RETURN NULL` for
//!   a task id produced before) once swallowed the rows a delete claim put
//!   back: retried rows vanished, in neither Redis nor either table. Now a
//!   put-back that writes fewer rows than it was given rolls the tick back
//!   and the relay claims by locking from then on.

mod common;

use std::time::Duration;

use common::*;

/// Calls of the commands that write a schedule entry, from Redis's own
/// statistics (EVAL/EVALSHA of the fence script; ZADD).
async fn schedule_writes(url: &str) -> u64 {
    let mut conn = redis_conn(url).await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .expect("INFO commandstats");
    info.lines()
        .filter(|l| {
            l.starts_with("cmdstat_eval:") || l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_zadd:")
        })
        .filter_map(|l| l.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_table_that_refuses_does_not_make_the_batch_go_round() {
    let redis = RedisServer::start().await;
    let db = TestDb::new().await;
    let prefix = key_prefix();
    db.client()
        .await
        .batch_execute(
            "CREATE FUNCTION maintenance() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'task_outbox_dead is under maintenance'; END $$;
             CREATE TRIGGER maintenance BEFORE INSERT ON task_outbox_dead
                FOR EACH ROW EXECUTE FUNCTION maintenance();",
        )
        .await
        .expect("the maintenance guard");
    let jobs = new_jobs(4);
    seed_for(&db, 1000, &jobs).await;
    // Ten rows no consumer could parse: dead-lettered at once, if the
    // dead table took them.
    db.client()
        .await
        .batch_execute(
            "UPDATE task_outbox SET path = '/bad|' || id
              WHERE id IN (SELECT id FROM task_outbox ORDER BY id LIMIT 10)",
        )
        .await
        .expect("ten undeliverable rows");
    let env = relay_env(&db, &redis.url(), &prefix, &[]);
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_until("the 990 good rows delivered", Duration::from_secs(60), || async {
        db.count("SELECT count(*) FROM task_outbox").await == 10
    })
    .await;
    let written = schedule_writes(&redis.url()).await;
    // Forty more ticks (two seconds at the test's 50 ms interval, about
    // one base_backoff): before, each re-sent the batch.
    let ticks = relay.ok_ticks().await;
    wait_until("forty more ticks", Duration::from_secs(60), || async {
        relay.ok_ticks().await >= ticks + 40.0
    })
    .await;
    let resent = schedule_writes(&redis.url()).await - written;
    assert!(
        written <= 1000 + 100 && resent == 0,
        "{written} schedule writes for 990 rows, {resent} more in 40 ticks"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox WHERE path LIKE '/bad|%'")
            .await,
        10,
        "the rows that cannot move stay in the outbox"
    );
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    assert!(
        !relay
            .records("postgres refused a write of the tick's settle")
            .is_empty(),
        "{:#?}",
        relay.lines()
    );
    let kept = relay
        .metric(
            "outbox_relay_settle_refused_rows_total",
            &[("stage", "move to dead letters")],
        )
        .await
        .unwrap_or(0.0);
    assert!(kept >= 10.0, "settle_refused_rows_total {kept}");
    assert_eq!(
        schedule_members(&redis.url(), &prefix).await.len(),
        990,
        "every good row is in Redis once"
    );

    // The guard lifted: the ten go where they belong.
    db.client()
        .await
        .batch_execute("DROP TRIGGER maintenance ON task_outbox_dead")
        .await
        .expect("lift the guard");
    wait_until("the ten rows dead-lettered", Duration::from_secs(60), || async {
        db.count("SELECT count(*) FROM task_outbox_dead").await == 10
            && db.count("SELECT count(*) FROM task_outbox").await == 0
    })
    .await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producers_dedup_trigger_cannot_make_retried_rows_vanish() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    // A common producer-side guard once an outbox is delete-claimed (ON
    // CONFLICT cannot see rows gone from the table): a task id produced
    // before is dropped.
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE produced (task_id text PRIMARY KEY);
             CREATE FUNCTION produce_once() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF EXISTS (SELECT 1 FROM produced WHERE task_id = NEW.task_id::text) THEN
                 RETURN NULL;
               END IF;
               INSERT INTO produced VALUES (NEW.task_id::text);
               RETURN NEW;
             END $$;
             CREATE TRIGGER produce_once BEFORE INSERT ON task_outbox
                FOR EACH ROW EXECUTE FUNCTION produce_once();",
        )
        .await
        .expect("the producer's trigger");
    let jobs = new_jobs(5);
    poison_job(&redis_url, &prefix, &jobs[2]).await;
    seed_for(&db, 200, &jobs).await;
    let sql_outbox = format!("SELECT count(*) FROM task_outbox WHERE job_id = '{}'", jobs[2]);
    let sql_dead = format!("SELECT count(*) FROM task_outbox_dead WHERE job_id = '{}'", jobs[2]);
    let poisoned = || async { (db.count(&sql_outbox).await, db.count(&sql_dead).await) };
    assert_eq!(poisoned().await, (40, 0));
    let env = relay_env(
        &db,
        &redis_url,
        &prefix,
        &[("OUTBOX_RELAY_SWEEP__BASE_BACKOFF", "100ms")],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_until(
        "the healthy rows delivered, the poisoned ones retried",
        Duration::from_secs(60),
        || async {
            db.count("SELECT count(*) FROM task_outbox").await == 40
                && db.count("SELECT count(*) FROM task_outbox WHERE attempts >= 2").await == 40
        },
    )
    .await;
    let (outbox, dead) = poisoned().await;
    assert_eq!(outbox + dead, 40, "every poisoned row is somewhere");
    assert_eq!(schedule_members(&redis_url, &prefix).await.len(), 160);
    let fell_back = relay.records("task_outbox changed under the relay");
    assert!(
        fell_back.iter().any(|l| l.to_string().contains("wrote 0 of")),
        "{:#?}",
        relay.lines()
    );
    relay.stop().await;
}
