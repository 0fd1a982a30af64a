//! Two relay processes on one backlog partition it through SKIP LOCKED:
//! every row delivered once settled, nothing lost, no deadlock, no errors.

use crate::common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn two_relays_share_one_backlog() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    seed(&db, 20_000, 40).await;
    let expected = expected_members(&db).await;

    let env = relay_env(&db, &redis_url, &prefix, &[("OUTBOX_RELAY_SWEEP__BATCH_SIZE", "200")]);
    let mut a = RelayProcess::spawn(&env);
    let mut b = RelayProcess::spawn(&env);
    a.wait_started().await;
    b.wait_started().await;
    wait_drained(&db, Duration::from_secs(120)).await;

    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    assert_all_delivered(&redis_url, &prefix, &expected).await;
    assert_eq!(schedule_members(&redis_url, &prefix).await.len(), 20_000);
    for relay in [&a, &b] {
        let problems: Vec<String> = relay
            .lines()
            .into_iter()
            .filter(|l| l.contains("\"level\":\"warn\"") || l.contains("\"level\":\"error\""))
            // The shared Redis of the test machine keeps nothing on disk:
            // that start-up warning is true, and not this test's subject.
            .filter(|l| !l.contains("redis may lose delivered entries on a restart"))
            .collect();
        assert!(problems.is_empty(), "unexpected warnings: {problems:#?}");
        assert!(relay.count("sweep tick settled") > 0, "both relays took part");
    }
    a.stop().await;
    b.stop().await;
}
