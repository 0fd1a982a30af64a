//! Redis memory back-pressure: against a private `redis-server --maxmemory`
//! that fills up, the relay stops writing once `used_memory` reaches
//! `redis.max_memory_ratio` of it (rows wait, no attempt counted), says so
//! once and in a metric, and writes again when Redis has room.

use crate::common;

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
    // The gate closed at 0.8 and stays closed down to 0.75 (the hysteresis):
    // used_memory moves a little while held back (CI once read 0.7976).
    let m = scrape(&relay).await;
    let held_down_to = 0.8 - outbox_relay::redis::memory::HYSTERESIS;
    assert!(
        metric_value(&m, "outbox_relay_redis_memory_ratio", &[]).is_some_and(|r| r >= held_down_to),
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

/// Fill the Redis at `url` to `share` of its `maxmemory`.
async fn fill_to(url: &str, share: f64) {
    fill_redis_to(&mut redis_conn(url).await, share, |_| true).await;
}

/// A first batch (its reading closes the gate: Redis is past the mark),
/// then 300 rows that wait. Returns every row's expected member.
async fn engage(db: &TestDb, relay: &RelayProcess) -> std::collections::HashMap<String, (String, String, f64)> {
    seed(db, 10, 1).await;
    let mut expected = expected_members(db).await;
    wait_until("back-pressure engages", Duration::from_secs(60), || async {
        metric_value(&scrape(relay).await, "outbox_relay_redis_backpressure", &[]) == Some(1.0)
    })
    .await;
    let before = db.count("SELECT count(*) FROM task_outbox").await;
    seed(db, 300, 3).await;
    expected.extend(expected_members(db).await);
    let t0 = relay.ok_ticks().await;
    wait_until("ticks while held back", Duration::from_secs(30), || async {
        relay.ok_ticks().await >= t0 + 4.0
    })
    .await;
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox").await,
        before + 300,
        "held back"
    );
    expected
}

/// Writes held back by a nearly full Redis, then the relay's user loses
/// `+info` (an ACL tightened): the gate cannot be read any more. It opens
/// with one warning instead of holding writes back forever, and the rows
/// are delivered.
#[tokio::test]
async fn a_redis_that_stops_answering_info_does_not_hold_writes_back_forever() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let server = RedisServer::start_with_args(&["--maxmemory", "16mb", "--maxmemory-policy", "noeviction"]).await;
    let mut admin = redis_conn(&server.url()).await;
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "relay", "on", ">relay-pw", "~*", "&*", "+@all"])
        .query_async(&mut admin)
        .await
        .expect("ACL SETUSER");
    fill_to(&server.url(), 0.85).await;
    let url = format!("redis://relay:relay-pw@127.0.0.1:{}/0", server.port);
    let env = relay_env(&db, &url, &prefix, &[("OUTBOX_RELAY_REDIS__MAX_MEMORY_RATIO", "0.8")]);
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    let expected = engage(&db, &relay).await;

    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "relay", "-info"])
        .query_async(&mut admin)
        .await
        .expect("ACL SETUSER -info");
    wait_drained(&db, Duration::from_secs(60)).await;
    assert_all_delivered(&server.url(), &prefix, &expected).await;
    assert_eq!(relay.count("cannot read redis INFO memory"), 1, "{:#?}", relay.lines());
    assert_eq!(
        metric_value(&scrape(&relay).await, "outbox_relay_redis_backpressure", &[]),
        Some(0.0)
    );
    relay.stop().await;
}

/// Writes held back by a nearly full Redis, then Redis stops answering
/// (frozen): that is an outage, not back-pressure. The dispatch actor
/// degrades and `/readyz` fails, as for any unreachable Redis, and the
/// relay writes again once Redis answers and has room.
#[tokio::test]
async fn an_outage_while_held_back_makes_the_relay_unready() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let server = RedisServer::start_with_args(&["--maxmemory", "16mb", "--maxmemory-policy", "noeviction"]).await;
    fill_to(&server.url(), 0.85).await;
    let env = relay_env(
        &db,
        &server.url(),
        &prefix,
        &[("OUTBOX_RELAY_REDIS__MAX_MEMORY_RATIO", "0.8")],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    let expected = engage(&db, &relay).await;
    relay.wait_http("/readyz", 200, Duration::from_secs(30)).await;

    server.pause();
    wait_until("the dispatch actor is not ready", Duration::from_secs(60), || async {
        relay.http_get("/readyz").await.is_some_and(|(status, body)| {
            status == 503
                && serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|v| {
                    v["unhealthy"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|x| x == "DispatchActor"))
                })
        })
    })
    .await;
    server.unpause();
    let mut conn = redis_conn(&server.url()).await;
    let fillers: Vec<String> = redis::cmd("KEYS")
        .arg("filler:*")
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    let _: () = redis::cmd("DEL")
        .arg(fillers)
        .query_async(&mut conn)
        .await
        .expect("DEL");
    wait_drained(&db, Duration::from_secs(60)).await;
    assert_all_delivered(&server.url(), &prefix, &expected).await;
    relay.wait_http("/readyz", 200, Duration::from_secs(60)).await;
    relay.stop().await;
}
