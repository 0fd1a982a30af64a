//! Long dependency outages with the **default** `[supervisor]` settings
//! (5 restarts in 60 s): a 3-minute Redis freeze, a 2-minute Postgres stop
//! and a 150-second Postgres freeze (longer than two watchdog windows)
//! leave the process running, not ready (`/readyz` 503) and degraded
//! meanwhile, and it delivers everything afterwards. Restart intensity is
//! for the relay's own faults, never for a dependency's outage (SPEC §2);
//! before, about a minute of either made the process exit 1.

use crate::common;

use std::time::{Duration, Instant};

use common::*;

/// Watch the relay for `outage`: it must stay up, and `/readyz` must say
/// 503 at some point (and `/healthz` too). Returns the actors that were
/// reported not healthy.
async fn ride_out(relay: &mut RelayProcess, outage: Duration) -> Vec<String> {
    let until = Instant::now() + outage;
    let mut saw_unready = false;
    let mut saw_unhealthy = false;
    let mut unhealthy = Vec::new();
    while Instant::now() < until {
        assert!(
            relay.is_running(),
            "the process exited during the outage: {:#?}",
            relay.lines()
        );
        if let Some((503, body)) = relay.http_get("/readyz").await {
            saw_unready = true;
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) {
                for a in v["unhealthy"].as_array().into_iter().flatten() {
                    if let Some(a) = a.as_str() {
                        if !unhealthy.iter().any(|u| u == a) {
                            unhealthy.push(a.to_string());
                        }
                    }
                }
            }
        }
        saw_unhealthy |= relay.http_get("/healthz").await.is_some_and(|(s, _)| s == 503);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(saw_unready, "/readyz never said 503 during the outage");
    assert!(saw_unhealthy, "/healthz never said 503 during the outage");
    assert!(
        relay.records("restart intensity exceeded").is_empty(),
        "{:#?}",
        relay.lines()
    );
    unhealthy
}

#[tokio::test]
async fn a_three_minute_redis_freeze_with_default_supervision_is_ridden_out() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis = RedisServer::start().await;
    // The shipped defaults: nothing tuned for the test.
    let mut relay = RelayProcess::spawn(&shipped_env(&db.url, &redis.url(), &prefix));
    relay.wait_started().await;
    relay.wait_http("/readyz", 200, Duration::from_secs(30)).await;

    redis.pause();
    seed(&db, 2_000, 10).await;
    let expected = expected_members(&db).await;
    let unhealthy = ride_out(&mut relay, Duration::from_secs(180)).await;
    assert!(unhealthy.iter().any(|a| a == "DispatchActor"), "{unhealthy:?}");
    redis.unpause();

    wait_drained(&db, Duration::from_secs(120)).await;
    assert_all_delivered(&redis.url(), &prefix, &expected).await;
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    relay.wait_http("/readyz", 200, Duration::from_secs(60)).await;
    relay.stop().await;
}

#[tokio::test]
async fn a_two_minute_postgres_stop_with_default_supervision_is_ridden_out() {
    let pg = PrivatePostgres::start().await;
    let db = TestDb::new_on(&pg.url()).await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let mut relay = RelayProcess::spawn(&relay_env(
        &db,
        &redis_url,
        &prefix,
        &[("OUTBOX_RELAY_LOG__LEVEL", "info")],
    ));
    relay.wait_started().await;
    relay.wait_http("/readyz", 200, Duration::from_secs(30)).await;
    seed(&db, 1_000, 10).await;
    let mut expected = expected_members(&db).await;

    pg.stop();
    let unhealthy = ride_out(&mut relay, Duration::from_secs(120)).await;
    assert!(unhealthy.iter().any(|a| a == "SweepActor"), "{unhealthy:?}");
    pg.start_again().await;
    // Rows committed once Postgres is back are delivered by the same process.
    seed(&db, 1_000, 10).await;
    expected.extend(expected_members(&db).await);

    wait_drained(&db, Duration::from_secs(120)).await;
    assert_all_delivered(&redis_url, &prefix, &expected).await;
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    relay.wait_http("/readyz", 200, Duration::from_secs(60)).await;
    relay.stop().await;
}

/// Every Postgres process frozen (SIGSTOP: no socket closes, nothing
/// answers, as with a paused VM or a network black hole) for longer than
/// two watchdog windows, at the shipped defaults: the process stays up and
/// unready, says which actor waits on Postgres, and delivers again once
/// the server thaws. Before, the metrics probe waited without a deadline
/// and the watchdog exited the process after about 100 s.
#[tokio::test]
async fn a_postgres_frozen_for_150_seconds_at_the_shipped_defaults_is_ridden_out() {
    let pg = PrivatePostgres::start().await;
    let db = TestDb::new_on(&pg.url()).await;
    create_ledger(&db).await;
    let jobs = new_jobs(10);
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let mut relay = RelayProcess::spawn(&shipped_env(&db.url, &redis_url, &prefix));
    relay.wait_started().await;
    relay.wait_http("/readyz", 200, Duration::from_secs(30)).await;
    produce(&db.client().await, &jobs, 1_000).await.expect("produce");
    wait_drained(&db, Duration::from_secs(60)).await;

    let frozen = pg.freeze();
    let unhealthy = ride_out(&mut relay, Duration::from_secs(150)).await;
    drop(frozen);
    assert!(unhealthy.iter().any(|a| a == "SweepActor"), "{unhealthy:?}");
    // The health lines name what the waiting actors wait on.
    let waiting: Vec<_> = relay
        .records("actor health")
        .into_iter()
        .filter(|v| v["status"] == "degraded" && v["last_error"].as_str().is_some_and(|e| e.contains("postgres")))
        .collect();
    assert!(
        !waiting.is_empty(),
        "no health line names postgres: {:#?}",
        relay.lines()
    );

    produce(&db.client().await, &jobs, 1_000).await.expect("produce");
    wait_drained(&db, Duration::from_secs(120)).await;
    let report = verify_ledger(&db, &redis_url, &prefix).await;
    assert!(report.holds(), "invariant violated: {report:#?}");
    assert_eq!((report.delivered, report.dead_lettered), (2_000, 0));
    relay.wait_http("/readyz", 200, Duration::from_secs(60)).await;
    relay.stop().await;
}
