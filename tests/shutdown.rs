//! SIGTERM and SIGINT under load: the tick in flight finishes (or rolls
//! back), the process exits 0 promptly, and nothing is lost: every row is
//! either in Redis or still in the outbox, and a restarted relay finishes.

use crate::common;

use std::time::{Duration, Instant};

use common::*;

async fn stop_under_load(signal: &str) {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    seed(&db, 60_000, 20).await;
    let expected = expected_members(&db).await;
    let env = relay_env(
        &db,
        &redis_url,
        &prefix,
        &[
            ("OUTBOX_RELAY_SWEEP__TICK_TIMEOUT", "2s"),
            ("OUTBOX_RELAY_LOG__LEVEL", "info"),
        ],
    );

    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    wait_until("the drain is under way", Duration::from_secs(60), || async {
        db.count("SELECT count(*) FROM task_outbox").await < 59_000
    })
    .await;
    let sent = Instant::now();
    relay.signal(signal);
    let status = relay.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "exit status {status}; log {:#?}", relay.lines());
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "exits within tick_timeout + 1s: {:?}",
        sent.elapsed()
    );
    assert_eq!(relay.count("outbox-relay stopped"), 1, "the last log line was flushed");

    // Nothing lost: a row is either still in the outbox or delivered.
    let left = db.count("SELECT count(*) FROM task_outbox").await;
    assert!(left > 0, "stopped mid-drain");
    let members = schedule_members(&redis_url, &prefix).await;
    assert!(
        members.len() as i64 + left >= 60_000,
        "{} delivered + {left} left",
        members.len()
    );

    let relay = RelayProcess::spawn(&env);
    wait_until(
        "the restarted relay finishes the drain",
        Duration::from_secs(120),
        || async { db.count("SELECT count(*) FROM task_outbox").await == 0 },
    )
    .await;
    assert_all_delivered(&redis_url, &prefix, &expected).await;
    relay.stop().await;
}

#[tokio::test]
async fn sigterm_under_load_exits_zero_and_loses_nothing() {
    stop_under_load("TERM").await;
}

#[tokio::test]
async fn sigint_under_load_exits_zero_and_loses_nothing() {
    stop_under_load("INT").await;
}
