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

use crate::common;

use std::time::Duration;

use common::*;

/// Calls of the commands that write schedule entries, from Redis's own
/// statistics (EVAL/EVALSHA of the fence script, one per pipelined entry
/// group; ZADD).
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
    guard_dead_table(&db).await;
    // 990 rows of three jobs, ten of them unparseable (`|` in the path:
    // dead-lettered at once, never sent); ten of a fourth job whose
    // schedule is not a sorted set (WRONGTYPE: with max_attempts 1,
    // dead-lettered at their first try, and sent to Redis at every try).
    let jobs = new_jobs(4);
    poison_job(&redis.url(), &prefix, &jobs[3]).await;
    seed_for(&db, 990, &jobs[..3]).await;
    db.client()
        .await
        .batch_execute(
            "UPDATE task_outbox SET path = '/bad|' || id
              WHERE id IN (SELECT id FROM task_outbox ORDER BY id LIMIT 10)",
        )
        .await
        .expect("ten undeliverable rows");
    seed_for(&db, 10, &jobs[3..]).await;
    let env = relay_env(
        &db,
        &redis.url(),
        &prefix,
        &[
            ("OUTBOX_RELAY_SWEEP__MAX_ATTEMPTS", "1"),
            ("OUTBOX_RELAY_SWEEP__BASE_BACKOFF", "10s"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_until("the 980 good rows delivered", Duration::from_secs(60), || async {
        db.count("SELECT count(*) FROM task_outbox").await == 20
    })
    .await;
    let refused = || {
        relay.metric(
            "outbox_relay_settle_refused_rows_total",
            &[("stage", "move to dead letters")],
        )
    };
    let (written, kept) = (schedule_writes(&redis.url()).await, refused().await.unwrap_or(0.0));
    assert!(kept >= 20.0, "settle_refused_rows_total {kept}");
    // Twenty more ticks (with nothing due, a listening relay ticks about
    // once a second): before, each sent the whole batch again, and a
    // put-off that did not hold would send the stuck rows at every tick.
    let (ticks, started) = (relay.ok_ticks().await, std::time::Instant::now());
    wait_until("twenty more ticks", Duration::from_secs(90), || async {
        relay.ok_ticks().await >= ticks + 20.0
    })
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    let resent = schedule_writes(&redis.url()).await - written;
    let rekept = refused().await.unwrap_or(0.0) - kept;
    // The stuck rows are tried once per base_backoff (10 s here): at most
    // two schedule writes for the WRONGTYPE rows (a script load and its
    // call), and twenty rows kept, each time; a fifth more, and two tries
    // of slack. Far fewer than one try per tick.
    let tries = 2.0 + 0.12 * elapsed;
    assert!(
        (resent as f64) <= 2.0 * tries && rekept <= 20.0 * tries,
        "in {elapsed:.1} s ({} ticks): {resent} schedule writes, {rekept} rows kept again",
        20
    );
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox WHERE attempts = 0").await,
        20,
        "the rows that cannot move stay in the outbox, no attempt charged"
    );
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    let warned = relay.records("postgres refused a write of the tick's settle");
    assert!(
        warned
            .iter()
            .any(|l| l["write"] == "move to dead letters"
                && l["error"].as_str().is_some_and(|e| e.contains("maintenance"))),
        "{warned:#?}"
    );
    assert_eq!(
        schedule_members(&redis.url(), &prefix).await.len(),
        980,
        "every good row is in Redis"
    );

    // The guard lifted: the twenty go where they belong.
    db.client()
        .await
        .batch_execute("DROP TRIGGER maintenance ON task_outbox_dead")
        .await
        .expect("lift the guard");
    wait_until("the twenty rows dead-lettered", Duration::from_secs(60), || async {
        db.count("SELECT count(*) FROM task_outbox_dead").await == 20
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

/// A retried row's next try is counted from when the tick settles, not
/// from when its transaction began: `run_at = now() + backoff` used the
/// transaction's start, so a tick that waited on Redis (here 4 s, a
/// delayed pipeline; the same for a WAIT on replicas) put rows off by the
/// backoff minus the wait, already due when they were written (#38
/// code-read item 5). The row's `run_at` must lie about `base_backoff`
/// past the moment the delayed write was answered (1.5 s of the 3 s: the
/// test reads that moment a little after it; counted from the tick's start
/// it lies about 1 s before it).
#[tokio::test]
async fn a_retry_is_put_off_from_the_settle_not_from_the_tick_start() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let server = RedisServer::start().await;
    let proxy = common::proxy::RespProxy::start(server.port).await;
    let jobs = new_jobs(1);
    poison_job(&server.url(), &prefix, &jobs[0]).await;
    proxy.delay_when(&jobs[0].to_string(), Duration::from_secs(4));
    seed_for(&db, 1, &jobs).await;
    let env = relay_env(
        &db,
        &proxy.url(),
        &prefix,
        &[
            ("OUTBOX_RELAY_SWEEP__TICK_TIMEOUT", "20s"),
            ("OUTBOX_RELAY_SWEEP__BASE_BACKOFF", "3s"),
            ("OUTBOX_RELAY_SWEEP__MAX_BACKOFF", "3s"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_until("the delayed write is answered", Duration::from_secs(60), || async {
        proxy.held_answered() >= 1
    })
    .await;
    // Postgres's clock, read just after the write was answered: the settle
    // comes after this.
    let answered: std::time::SystemTime = db
        .client()
        .await
        .query_one("SELECT clock_timestamp()", &[])
        .await
        .expect("clock")
        .get(0);
    wait_until("the row's first retry is settled", Duration::from_secs(30), || async {
        db.count("SELECT count(*) FROM task_outbox WHERE attempts >= 1").await == 1
    })
    .await;
    let run_at: std::time::SystemTime = db
        .client()
        .await
        .query_one("SELECT run_at FROM task_outbox", &[])
        .await
        .expect("run_at")
        .get(0);
    let put_off = run_at.duration_since(answered).unwrap_or_default();
    assert!(
        put_off >= Duration::from_millis(1_500),
        "the retry is due {put_off:?} after the write was answered, less than base_backoff (3 s): counted from the tick's start"
    );
    relay.stop().await;
}

/// A put-back that fails for a moment (a deadlock with a producer, a lock
/// timeout: SQLSTATE class 40 or 55P03) is contention, tried again: it
/// once switched the relay to the locking claim for good, as if the table
/// had changed (#38 code-read item 4). Here a trigger refuses the first
/// three put-backs with 40P01 (a sequence counts them: it is not rolled
/// back with the tick).
#[tokio::test]
async fn a_put_back_that_fails_for_a_moment_keeps_the_delete_claim() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let jobs = new_jobs(3);
    poison_job(&redis_url, &prefix, &jobs[1]).await;
    seed_for(&db, 60, &jobs).await;
    db.client()
        .await
        .batch_execute(
            "CREATE SEQUENCE put_backs;
             CREATE FUNCTION deadlock_at_first() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF current_setting('outbox_relay.put_back', true) = 'on' AND nextval('put_backs') <= 3 THEN
                 RAISE EXCEPTION 'deadlock detected (test)' USING ERRCODE = '40P01';
               END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER deadlock_at_first BEFORE INSERT ON task_outbox
                FOR EACH ROW EXECUTE FUNCTION deadlock_at_first();",
        )
        .await
        .expect("the trigger");
    let poisoned = db
        .count(&format!(
            "SELECT count(*) FROM task_outbox WHERE job_id = '{}'",
            jobs[1]
        ))
        .await;
    assert!(poisoned > 0);
    let env = relay_env(
        &db,
        &redis_url,
        &prefix,
        &[("OUTBOX_RELAY_SWEEP__BASE_BACKOFF", "100ms")],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_until(
        "the healthy rows delivered, the poisoned ones retried twice",
        Duration::from_secs(60),
        || async {
            db.count("SELECT count(*) FROM task_outbox").await == poisoned
                && db.count("SELECT count(*) FROM task_outbox WHERE attempts >= 2").await == poisoned
        },
    )
    .await;
    assert!(
        db.count("SELECT last_value FROM put_backs").await >= 3,
        "the put-backs were refused: {:#?}",
        relay.lines()
    );
    assert!(
        relay.records("claiming by locking from now on").is_empty(),
        "a moment's deadlock is not a changed table: {:#?}",
        relay.lines()
    );
    assert!(
        relay
            .lines()
            .iter()
            .any(|l| l.contains("40P01") && l.contains("contention")),
        "the deadlock is reported as contention: {:#?}",
        relay.lines()
    );
    relay.stop().await;
}

/// The dead table refuses and so does the put-off (an UPDATE trigger on
/// `task_outbox`): the rows that cannot move are left due, and were
/// claimed and tried again at every tick, without end. Now the relay holds
/// its claims for a growing backoff (2 s, 4 s, 8 s, … at most 30 s), so
/// the re-claims are bounded.
#[tokio::test]
async fn a_settle_refused_twice_over_is_held_off_not_looped() {
    let redis = RedisServer::start().await;
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let jobs = new_jobs(2);
    seed_for(&db, 200, &jobs).await;
    guard_dead_table(&db).await;
    db.client()
        .await
        .batch_execute(
            "UPDATE task_outbox SET path = '/bad|' || id
               WHERE id IN (SELECT id FROM task_outbox ORDER BY id LIMIT 10);
             CREATE TRIGGER frozen_rows BEFORE UPDATE ON task_outbox
                FOR EACH ROW EXECUTE FUNCTION maintenance();",
        )
        .await
        .expect("ten undeliverable rows, and the put-off refused");
    let env = relay_env(&db, &redis.url(), &prefix, &[]);
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_until("the good rows delivered", Duration::from_secs(60), || async {
        db.count("SELECT count(*) FROM task_outbox").await == 10
    })
    .await;
    let holding = "postgres refused the settle and the put-off of rows that stay";
    wait_until("the hold has grown to 8 s", Duration::from_secs(60), || async {
        relay
            .records(holding)
            .iter()
            .any(|l| l["hold_ms"].as_u64().is_some_and(|ms| ms >= 8_000))
    })
    .await;
    // 2 + 4 + 8 s of holds: the stuck rows were claimed about four times
    // (a fifth of slack), not at every tick for 14 s.
    let kept = relay
        .metric(
            "outbox_relay_settle_refused_rows_total",
            &[("stage", "move to dead letters")],
        )
        .await
        .unwrap_or(0.0);
    assert!(kept <= 10.0 * 5.0, "the ten stuck rows were kept {kept} times");
    assert_eq!(db.count("SELECT count(*) FROM task_outbox").await, 10);
    relay.stop().await;
}
