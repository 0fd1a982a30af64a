//! A reconcile whose dependencies fail under it: Redis or Postgres frozen
//! (SIGSTOP) in the middle of one, Postgres stopped, and each refusing
//! (a revoked grant, a command the ACL takes away). The reconcile gives up
//! or fails, its loss stays pending, a lasting refusal is one warning and
//! tries further and further apart, and once the dependency is back every
//! lost entry is written back exactly once.

use crate::common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::{delivered, delivered_by, wait_for_marker, with};
use common::*;

/// `FLUSHALL`, once the watch has looked (and holds its marker key).
async fn flushall(redis_url: &str, prefix: &str) {
    wait_for_marker(redis_url, prefix).await;
    let mut conn = redis_conn(redis_url).await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.expect("FLUSHALL");
}

/// A relay that delivered and journaled 6,000 rows, Redis flushed under
/// it, and its reconcile (paced to 1,000 entries a second: about 6 s) under
/// way: it has written some entries back. With what Redis held before.
async fn mid_reconcile(db: &TestDb, redis_url: &str, prefix: &str) -> (RelayProcess, HashMap<String, f64>) {
    let slow = [("OUTBOX_RELAY_JOURNAL__RECONCILE_RATE", "1000")];
    let (relay, members) = delivered(db, redis_url, prefix, 6_000, &slow).await;
    flushall(redis_url, prefix).await;
    wait_until("the reconcile under way", Duration::from_secs(60), || async {
        !schedule_members(redis_url, prefix).await.is_empty()
    })
    .await;
    (relay, members)
}

/// Until the reconcile has failed `n` times; those lines.
async fn failures(relay: &RelayProcess, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
    wait_until(&format!("{n} failed reconciles"), timeout, || async {
        relay.records("journal reconcile failed").len() >= n
    })
    .await;
    relay.records("journal reconcile failed")
}

/// One warning among `tries`, whose error says `why`.
fn one_warning_saying(tries: &[serde_json::Value], why: &str) {
    let warnings: Vec<_> = tries.iter().filter(|v| v["level"] == "warn").collect();
    assert_eq!(warnings.len(), 1, "one warning for a lasting refusal: {tries:#?}");
    assert!(
        warnings[0]["error"].as_str().is_some_and(|e| e.contains(why)),
        "the warning says {why:?}: {tries:#?}"
    );
}

/// Every entry back as it was, after one loss, the relay still running.
async fn all_back_once(relay: &mut RelayProcess, redis_url: &str, prefix: &str, members: &HashMap<String, f64>) {
    wait_until("every entry back", Duration::from_secs(120), || async {
        schedule_members(redis_url, prefix).await.len() == members.len()
    })
    .await;
    assert_eq!(&schedule_members(redis_url, prefix).await, members);
    assert_eq!(relay.records("redis lost data").len(), 1);
    assert!(relay.is_running(), "{:#?}", relay.lines());
}

/// Redis frozen (SIGSTOP) in the middle of a reconcile for longer than a
/// page may take: the reconcile gives up, the relay neither exits nor
/// wedges, and once Redis thaws the next round writes back the rest.
#[tokio::test]
async fn a_redis_frozen_mid_reconcile_is_waited_out() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis = RedisServer::start().await;
    let (mut relay, members) = mid_reconcile(&db, &redis.url(), &prefix).await;
    redis.pause();
    let frozen = Instant::now();
    failures(&relay, 1, Duration::from_secs(120)).await;
    let gave_up = frozen.elapsed();
    redis.unpause();
    all_back_once(&mut relay, &redis.url(), &prefix, &members).await;
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
/// round writes back the rest, exactly once. (With the bound lifted the
/// reconcile waits for the thaw and this test fails.)
#[tokio::test]
async fn a_postgres_frozen_mid_reconcile_is_waited_out() {
    let pg = PrivatePostgres::start().await;
    let db = TestDb::new_on(&pg.url()).await;
    let prefix = key_prefix();
    let redis = RedisServer::start().await;
    let (mut relay, members) = mid_reconcile(&db, &redis.url(), &prefix).await;
    let frozen = pg.freeze();
    let at = Instant::now();
    failures(&relay, 1, Duration::from_secs(120)).await;
    let gave_up = at.elapsed();
    // Not all of it: the freeze caught it in the middle.
    let before_thaw = schedule_members(&redis.url(), &prefix).await.len();
    drop(frozen);
    assert!(before_thaw < members.len(), "the reconcile finished before the freeze");
    all_back_once(&mut relay, &redis.url(), &prefix, &members).await;
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
    let (mut relay, members) = mid_reconcile(&db, &redis.url(), &prefix).await;
    pg.stop();
    failures(&relay, 1, Duration::from_secs(60)).await;
    assert!(schedule_members(&redis.url(), &prefix).await.len() < members.len());
    pg.start_again().await;
    all_back_once(&mut relay, &redis.url(), &prefix, &members).await;
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
    let (mut relay, members) = delivered_by(&db, &env, &redis.url(), &prefix, 2_000).await;
    let admin = db.client().await;
    admin
        .batch_execute("REVOKE SELECT ON outbox_relay_journal FROM outbox_relay")
        .await
        .expect("REVOKE");
    flushall(&redis.url(), &prefix).await;
    // Three tries refused: at the loss, then 5 s and 10 s further on.
    let tries = failures(&relay, 3, Duration::from_secs(90)).await;
    one_warning_saying(&tries, "permission denied");
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
    all_back_once(&mut relay, &redis.url(), &prefix, &members).await;
    relay.wait_http("/readyz", 200, Duration::from_secs(30)).await;
    relay.stop().await;
}

/// Redis refusing the reconcile's writes (the relay's user lost `+zadd`,
/// as a stricter ACL or a proxy would do): one warning that says what Redis
/// answered, later tries further apart as info lines, and once the command
/// is back the next try writes everything back.
#[tokio::test]
async fn a_reconcile_redis_refuses_backs_off_quietly_until_it_takes_writes() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis = RedisServer::start().await;
    let (mut relay, members) = delivered(&db, &redis.url(), &prefix, 2_000, &[]).await;
    let acl = |change: &'static str| {
        let url = redis.url();
        async move {
            let mut conn = redis_conn(&url).await;
            let _: () = redis::cmd("ACL")
                .arg(&["SETUSER", "default", change])
                .query_async(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("ACL SETUSER default {change}: {e}"));
        }
    };
    acl("-zadd").await;
    flushall(&redis.url(), &prefix).await;
    let tries = failures(&relay, 2, Duration::from_secs(90)).await;
    one_warning_saying(&tries, "can't run this command");
    assert!(schedule_members(&redis.url(), &prefix).await.is_empty());
    acl("+zadd").await;
    all_back_once(&mut relay, &redis.url(), &prefix, &members).await;
    relay.stop().await;
}
