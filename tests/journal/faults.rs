//! A reconcile whose dependencies fail under it: Redis or Postgres frozen
//! (SIGSTOP) in the middle of one, Postgres stopped, and each refusing
//! (a revoked grant, a command the ACL takes away). The reconcile gives up
//! or fails, its loss stays pending, a lasting refusal is one warning and
//! tries further and further apart, and once the dependency is back every
//! lost entry is written back exactly once.

use crate::common;

use std::time::{Duration, Instant};

use super::{delivered, delivered_by, wait_for_marker, with};
use common::*;

/// Redis frozen (SIGSTOP) in the middle of a reconcile for longer than a
/// page may take: the reconcile gives up, the relay neither exits nor
/// wedges, and once Redis thaws the next round writes back the rest.
#[tokio::test]
async fn a_redis_frozen_mid_reconcile_is_waited_out() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis = RedisServer::start().await;
    let slow = [("OUTBOX_RELAY_JOURNAL__RECONCILE_RATE", "1000")];
    let (mut relay, members) = delivered(&db, &redis.url(), &prefix, 6_000, &slow).await;
    wait_for_marker(&redis.url(), &prefix).await;
    let mut conn = redis_conn(&redis.url()).await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.expect("FLUSHALL");
    wait_until("the reconcile under way", Duration::from_secs(60), || async {
        !schedule_members(&redis.url(), &prefix).await.is_empty()
    })
    .await;
    redis.pause();
    let frozen = Instant::now();
    wait_until("the reconcile gives up", Duration::from_secs(120), || async {
        !relay.records("journal reconcile failed").is_empty()
    })
    .await;
    let gave_up = frozen.elapsed();
    redis.unpause();
    assert!(relay.is_running(), "{:#?}", relay.lines());
    wait_until("every entry back", Duration::from_secs(120), || async {
        schedule_members(&redis.url(), &prefix).await.len() == members.len()
    })
    .await;
    assert_eq!(schedule_members(&redis.url(), &prefix).await, members);
    assert_eq!(relay.records("redis lost data").len(), 1);
    wait_until("the reconcile's summary", Duration::from_secs(30), || async {
        !relay.records("journal reconciled").is_empty()
    })
    .await;
    eprintln!("the reconcile gave up {:.1}s into the freeze", gave_up.as_secs_f64());
    relay.stop().await;
}

/// Postgres frozen (SIGSTOP: every backend, nothing answers, no socket
/// closes) in the middle of a reconcile: the page read it waits on is
/// bounded, so the reconcile gives up instead of holding the journal actor;
/// the relay neither exits nor wedges, and once Postgres thaws the next
/// round writes back the rest, exactly once.
#[tokio::test]
async fn a_postgres_frozen_mid_reconcile_is_waited_out() {
    let pg = PrivatePostgres::start().await;
    let db = TestDb::new_on(&pg.url()).await;
    let prefix = key_prefix();
    let redis = RedisServer::start().await;
    let slow = [("OUTBOX_RELAY_JOURNAL__RECONCILE_RATE", "1000")];
    let (mut relay, members) = delivered(&db, &redis.url(), &prefix, 6_000, &slow).await;
    wait_for_marker(&redis.url(), &prefix).await;
    let mut conn = redis_conn(&redis.url()).await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.expect("FLUSHALL");
    wait_until("the reconcile under way", Duration::from_secs(60), || async {
        !schedule_members(&redis.url(), &prefix).await.is_empty()
    })
    .await;
    let frozen = pg.freeze();
    let at = Instant::now();
    wait_until("the reconcile gives up", Duration::from_secs(120), || async {
        !relay.records("journal reconcile failed").is_empty()
    })
    .await;
    let gave_up = at.elapsed();
    // Not all of it: the freeze caught it in the middle.
    let before_thaw = schedule_members(&redis.url(), &prefix).await.len();
    drop(frozen);
    assert!(relay.is_running(), "{:#?}", relay.lines());
    assert!(before_thaw < members.len(), "the reconcile finished before the freeze");
    wait_until("every entry back", Duration::from_secs(120), || async {
        schedule_members(&redis.url(), &prefix).await.len() == members.len()
    })
    .await;
    assert_eq!(schedule_members(&redis.url(), &prefix).await, members);
    assert_eq!(relay.records("redis lost data").len(), 1);
    wait_until("the reconcile's summary", Duration::from_secs(60), || async {
        !relay.records("journal reconciled").is_empty()
    })
    .await;
    eprintln!("the reconcile gave up {:.1}s into the freeze", gave_up.as_secs_f64());
    relay.stop().await;
}

/// Postgres stopped (`pg_ctl stop -m fast`: every session cut) in the
/// middle of a reconcile: it fails at once, the loss stays pending, and
/// once Postgres is back a later try writes back the rest, exactly once.
#[tokio::test]
async fn a_postgres_stopped_mid_reconcile_is_waited_out() {
    let pg = PrivatePostgres::start().await;
    let db = TestDb::new_on(&pg.url()).await;
    let prefix = key_prefix();
    let redis = RedisServer::start().await;
    let slow = [("OUTBOX_RELAY_JOURNAL__RECONCILE_RATE", "1000")];
    let (mut relay, members) = delivered(&db, &redis.url(), &prefix, 6_000, &slow).await;
    wait_for_marker(&redis.url(), &prefix).await;
    let mut conn = redis_conn(&redis.url()).await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.expect("FLUSHALL");
    wait_until("the reconcile under way", Duration::from_secs(60), || async {
        !schedule_members(&redis.url(), &prefix).await.is_empty()
    })
    .await;
    pg.stop();
    wait_until("the reconcile fails", Duration::from_secs(60), || async {
        !relay.records("journal reconcile failed").is_empty()
    })
    .await;
    assert!(schedule_members(&redis.url(), &prefix).await.len() < members.len());
    pg.start_again().await;
    wait_until("every entry back", Duration::from_secs(120), || async {
        schedule_members(&redis.url(), &prefix).await.len() == members.len()
    })
    .await;
    assert_eq!(schedule_members(&redis.url(), &prefix).await, members);
    assert_eq!(relay.records("redis lost data").len(), 1);
    assert!(relay.is_running(), "{:#?}", relay.lines());
    relay.stop().await;
}

/// Postgres refusing the reconcile's reads (the relay's role lost SELECT
/// on the journal) for as long as it lasts: one warning that names the
/// error, then retries further and further apart (each an info line, not a
/// warning every round), and once the grant is back the next try writes
/// everything back.
#[tokio::test]
async fn a_reconcile_postgres_refuses_backs_off_quietly_until_the_grant() {
    let db = TestDb::new().await;
    let relay_url = db.url_as("outbox_relay").await;
    let prefix = key_prefix();
    let redis = RedisServer::start().await;
    let env = relay_env_as(&db, &relay_url, &redis.url(), &prefix, &with(&[]));
    let (relay, members) = delivered_by(&db, &env, &redis.url(), &prefix, 2_000).await;
    wait_for_marker(&redis.url(), &prefix).await;
    let admin = db.client().await;
    admin
        .batch_execute("REVOKE SELECT ON outbox_relay_journal FROM outbox_relay")
        .await
        .expect("REVOKE");
    let mut conn = redis_conn(&redis.url()).await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.expect("FLUSHALL");
    // Three tries refused: at the loss, then 5 s and 10 s further on.
    wait_until("three refused tries", Duration::from_secs(90), || async {
        relay.records("journal reconcile failed").len() >= 3
    })
    .await;
    let tries = relay.records("journal reconcile failed");
    let warnings: Vec<_> = tries.iter().filter(|v| v["level"] == "warn").collect();
    assert_eq!(warnings.len(), 1, "one warning for a lasting refusal: {tries:#?}");
    assert!(
        warnings[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("permission denied")),
        "{tries:#?}"
    );
    let waits: Vec<u64> = tries.iter().filter_map(|v| v["retry_in_s"].as_u64()).collect();
    assert!(
        waits.len() >= 3 && waits.windows(2).all(|w| w[1] > w[0]),
        "each try waits longer than the last: {waits:?}"
    );
    assert!(schedule_members(&redis.url(), &prefix).await.is_empty());
    admin
        .batch_execute("GRANT SELECT ON outbox_relay_journal TO outbox_relay")
        .await
        .expect("GRANT");
    wait_until("every entry back", Duration::from_secs(120), || async {
        schedule_members(&redis.url(), &prefix).await.len() == members.len()
    })
    .await;
    assert_eq!(schedule_members(&redis.url(), &prefix).await, members);
    assert_eq!(relay.records("redis lost data").len(), 1);
    relay.wait_http("/readyz", 200, Duration::from_secs(30)).await;
    relay.stop().await;
}

/// Redis refusing the reconcile's writes (the relay's user lost `+zadd`,
/// as a stricter ACL or a proxy would do): one warning naming the refusal,
/// later tries further apart as info lines, and once the command is back
/// the next try writes everything back.
#[tokio::test]
async fn a_reconcile_redis_refuses_backs_off_quietly_until_it_takes_writes() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis = RedisServer::start().await;
    let (mut relay, members) = delivered(&db, &redis.url(), &prefix, 2_000, &[]).await;
    wait_for_marker(&redis.url(), &prefix).await;
    let mut conn = redis_conn(&redis.url()).await;
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "default", "-zadd"])
        .query_async(&mut conn)
        .await
        .expect("ACL SETUSER -zadd");
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.expect("FLUSHALL");
    wait_until("two refused tries", Duration::from_secs(90), || async {
        relay.records("journal reconcile failed").len() >= 2
    })
    .await;
    let tries = relay.records("journal reconcile failed");
    let warnings: Vec<_> = tries.iter().filter(|v| v["level"] == "warn").collect();
    assert_eq!(warnings.len(), 1, "one warning for a lasting refusal: {tries:#?}");
    assert!(
        warnings[0]["error"].as_str().is_some_and(|e| e.contains("can't run this command")),
        "the warning says why Redis refused: {tries:#?}"
    );
    assert!(schedule_members(&redis.url(), &prefix).await.is_empty());
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "default", "+zadd"])
        .query_async(&mut conn)
        .await
        .expect("ACL SETUSER +zadd");
    wait_until("every entry back", Duration::from_secs(120), || async {
        schedule_members(&redis.url(), &prefix).await.len() == members.len()
    })
    .await;
    assert_eq!(schedule_members(&redis.url(), &prefix).await, members);
    assert_eq!(relay.records("redis lost data").len(), 1);
    assert!(relay.is_running(), "{:#?}", relay.lines());
    relay.stop().await;
}
