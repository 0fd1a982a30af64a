//! Another session holds `ACCESS EXCLUSIVE` on task_outbox: ticks fail with
//! a statement timeout at their deadline instead of waiting forever, the
//! relay keeps running, and it drains once the lock is released.

use crate::common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn a_held_table_lock_times_ticks_out_and_the_relay_recovers() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    seed(&db, 500, 5).await;
    let expected = expected_members(&db).await;

    let mut locker = db.client().await;
    let lock = locker.transaction().await.expect("begin");
    lock.batch_execute("LOCK TABLE task_outbox IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");

    let env = relay_env(
        &db,
        &redis_url,
        &prefix,
        &[("OUTBOX_RELAY_SWEEP__TICK_TIMEOUT", "500ms")],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    // Hold the lock until several ticks have timed out (at least ~3 s).
    let held = std::time::Instant::now();
    wait_until("ticks time out on the lock", Duration::from_secs(60), || {
        let failed = relay.records("sweep tick failed");
        let timeouts = failed
            .iter()
            .filter(|r| {
                r["deadline"] == true
                    && r["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("timeout") || e.contains("deadline"))
            })
            .count();
        let enough = timeouts >= 3 && held.elapsed() >= Duration::from_secs(3);
        async move { enough }
    })
    .await;
    assert!(relay.is_running(), "the relay survives the wedge");
    lock.rollback().await.expect("release lock");

    wait_until(
        "outbox drains after the lock is released",
        Duration::from_secs(60),
        || async { db.count("SELECT count(*) FROM task_outbox").await == 0 },
    )
    .await;
    assert_all_delivered(&redis_url, &prefix, &expected).await;
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    relay.stop().await;
}

/// The relay's locks now: (any on task_outbox, any waiting on task_outbox
/// or task_outbox_dead).
async fn relay_locks(watcher: &tokio_postgres::Client) -> (bool, bool) {
    let row = watcher
        .query_one(
            "SELECT count(*) FILTER (WHERE l.relation = 'task_outbox'::regclass) > 0,
                    coalesce(bool_or(NOT l.granted), false)
               FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
              WHERE a.application_name = 'outbox-relay' AND a.datname = current_database()
                AND l.relation IN ('task_outbox'::regclass, 'task_outbox_dead'::regclass)
                AND l.mode IN ('RowShareLock', 'RowExclusiveLock')",
            &[],
        )
        .await
        .expect("pg_locks");
    (row.get(0), row.get(1))
}

/// A tick whose settle statement is blocked behind a lock the test holds,
/// and starts late: the rows' ZADDs fail (WRONGTYPE, `max_attempts` 1) so
/// they are put back and moved to the dead table; the put-back is slowed
/// by a row trigger of the test's (50 ms a row, 1 s in all), then the move
/// waits on the test's SHARE lock on `task_outbox_dead`. Its own statement
/// timeout, set from the time left when the settle began, would end a
/// second past the tick's deadline. At the deadline the tick cancels the
/// statement on the server, so the rows it claimed are free within
/// deadline + 200 ms.
#[tokio::test]
async fn a_statement_running_at_the_deadline_is_cancelled_and_its_locks_go() {
    const TICK: Duration = Duration::from_secs(2);
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let jobs = seed(&db, 20, 1).await;
    let mut conn = redis_conn(&redis_url).await;
    let _: () = redis::AsyncCommands::set(&mut conn, format!("{}sched:{}", &*prefix, jobs[0]), "not a sorted set")
        .await
        .expect("SET");
    db.client()
        .await
        .batch_execute(
            "CREATE FUNCTION slow_put_back() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN PERFORM pg_sleep(0.05); RETURN NEW; END $$;
             CREATE TRIGGER slow_put_back BEFORE INSERT ON task_outbox
               FOR EACH ROW EXECUTE FUNCTION slow_put_back();",
        )
        .await
        .expect("slow trigger");

    let mut locker = db.client().await;
    let lock = locker.transaction().await.expect("begin");
    lock.batch_execute("LOCK TABLE task_outbox_dead IN SHARE MODE")
        .await
        .expect("lock");
    let watcher = db.client().await;

    let env = relay_env(
        &db,
        &redis_url,
        &prefix,
        &[
            ("OUTBOX_RELAY_SWEEP__TICK_TIMEOUT", "2s"),
            ("OUTBOX_RELAY_SWEEP__MAX_ATTEMPTS", "1"),
            // After the failed tick, a long pause: the lock-free gap we measure.
            ("OUTBOX_RELAY_SWEEP__INTERVAL", "10s"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    let mut first_seen = None;
    let mut saw_waiting = false;
    let released_after = loop {
        let (any, waiting) = relay_locks(&watcher).await;
        saw_waiting |= waiting;
        match (any, first_seen) {
            (true, None) => first_seen = Some(std::time::Instant::now()),
            (false, Some(t)) => break t.elapsed(),
            _ => {}
        }
        assert!(
            first_seen.is_none_or(|t: std::time::Instant| t.elapsed() < Duration::from_secs(20)),
            "the relay's locks were never released"
        );
        assert!(relay.is_running(), "the relay exited");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    eprintln!("relay row locks released {released_after:?} after first seen");
    assert!(saw_waiting, "the tick never waited on the test's lock");
    assert!(
        released_after <= TICK + Duration::from_millis(200),
        "the relay held its row locks for {released_after:?}, past the {TICK:?} deadline + 200 ms"
    );

    lock.rollback().await.expect("release lock");
    wait_until(
        "the rows are dead-lettered after the lock is released",
        Duration::from_secs(60),
        || async { db.count("SELECT count(*) FROM task_outbox_dead").await == 20 },
    )
    .await;
    assert_eq!(db.count("SELECT count(*) FROM task_outbox").await, 0);
    relay.stop().await;
}
