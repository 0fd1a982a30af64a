//! Redis down for many ticks is not the rows' fault: with `max_attempts = 2`
//! an outage across at least five ticks must end with zero dead letters and
//! every row delivered once Redis is back.

use crate::common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn outage_costs_no_attempts_and_everything_drains_after() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let mut redis = RedisServer::start().await;
    let env = relay_env(
        &db,
        &redis.url(),
        &prefix,
        &[
            ("OUTBOX_RELAY_SWEEP__MAX_ATTEMPTS", "2"),
            ("OUTBOX_RELAY_SWEEP__BASE_BACKOFF", "100ms"),
            ("OUTBOX_RELAY_SWEEP__MAX_BACKOFF", "200ms"),
            ("OUTBOX_RELAY_SWEEP__TICK_TIMEOUT", "1s"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;

    redis.stop();
    seed(&db, 1_000, 5).await;
    let expected = expected_members(&db).await;
    // Ticks, not log lines: the warning is throttled to one per 10 s.
    wait_until("at least 5 ticks hit the outage", Duration::from_secs(60), || async {
        let scrape = relay.http_get("/metrics").await.map(|(_, b)| b).unwrap_or_default();
        metric_value(&scrape, "outbox_relay_redis_unavailable_ticks_total", &[]).is_some_and(|n| n >= 5.0)
    })
    .await;
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox WHERE attempts > 0").await,
        0,
        "no attempt was charged"
    );
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    let why = relay.records("redis unavailable")[0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!why.is_empty(), "the warning says why Redis is unavailable");

    redis.resume().await;
    wait_until(
        "backlog drains after Redis returns",
        Duration::from_secs(60),
        || async { db.count("SELECT count(*) FROM task_outbox").await == 0 },
    )
    .await;
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox_dead").await,
        0,
        "zero dead letters"
    );
    assert_all_delivered(&redis.url(), &prefix, &expected).await;
    assert!(relay.is_running());
    relay.stop().await;
}
