//! Another session holds `ACCESS EXCLUSIVE` on task_outbox: ticks fail with
//! a statement timeout at their deadline instead of waiting forever, the
//! relay keeps running, and it drains once the lock is released.

mod common;

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
