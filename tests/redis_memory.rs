//! Redis memory back-pressure: against a private `redis-server --maxmemory`
//! that fills up, the relay stops writing once `used_memory` reaches
//! `redis.max_memory_ratio` of it (rows wait, no attempt counted), says so
//! once and in a metric, and writes again when Redis has room.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn a_nearly_full_redis_holds_writes_back_until_it_has_room() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let server = RedisServer::start_with_args(&["--maxmemory", "16mb", "--maxmemory-policy", "noeviction"]).await;
    let redis_url = server.url();
    seed(&db, 150_000, 20).await;
    let expected = expected_members(&db).await;

    let env = relay_env(
        &db,
        &redis_url,
        &prefix,
        &[
            ("OUTBOX_RELAY_REDIS__MAX_MEMORY_RATIO", "0.8"),
            ("OUTBOX_RELAY_SWEEP__BATCH_SIZE", "200"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_until("back-pressure engages", Duration::from_secs(120), || async {
        metric_value(&scrape(&relay).await, "outbox_relay_redis_backpressure", &[]) == Some(1.0)
    })
    .await;

    // Once the ticks in flight have ended, nothing more is written.
    let t0 = relay.ok_ticks().await;
    wait_until("ticks in flight ended", Duration::from_secs(30), || async {
        relay.ok_ticks().await >= t0 + 4.0
    })
    .await;
    let left = db.count("SELECT count(*) FROM task_outbox").await;
    assert!(left > 0, "Redis filled up before the outbox was drained");
    let t1 = relay.ok_ticks().await;
    wait_until("more ticks while held back", Duration::from_secs(30), || async {
        relay.ok_ticks().await >= t1 + 4.0
    })
    .await;
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox").await,
        left,
        "no row settled while held back"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox WHERE attempts > 0").await,
        0,
        "no attempt counted"
    );
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    let m = scrape(&relay).await;
    assert!(
        metric_value(&m, "outbox_relay_redis_memory_ratio", &[]).is_some_and(|r| r >= 0.8),
        "{m}"
    );
    assert_eq!(
        relay.count("redis memory is nearly full"),
        1,
        "one warning when writes stop, not one per tick"
    );
    assert_eq!(
        metric_value(&m, "outbox_relay_actor_healthy", &[("actor", "DispatchActor")]),
        Some(1.0),
        "holding back on purpose is healthy"
    );

    // Room again: the relay writes the rest.
    let mut conn = redis_conn(&redis_url).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("256mb")
        .query_async(&mut conn)
        .await
        .expect("CONFIG SET");
    wait_drained(&db, Duration::from_secs(120)).await;
    assert_all_delivered(&redis_url, &prefix, &expected).await;
    assert!(relay.count("redis memory back below the mark") >= 1);
    assert_eq!(
        metric_value(&scrape(&relay).await, "outbox_relay_redis_backpressure", &[]),
        Some(0.0)
    );
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    relay.stop().await;
}
