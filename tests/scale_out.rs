//! Several relays and concurrent ticks on one backlog. (WAIT before delete
//! against a real primary/replica pair is in `redis_durability`.)

use crate::common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn three_relays_with_two_ticks_each_settle_every_row_once() {
    let db = TestDb::new().await;
    create_ledger(&db).await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let env = relay_env(
        &db,
        &redis_url,
        &prefix,
        &[
            ("OUTBOX_RELAY_SWEEP__CONCURRENCY", "2"),
            ("OUTBOX_RELAY_SWEEP__BATCH_SIZE", "250"),
            ("OUTBOX_RELAY_LOG__LEVEL", "info"),
        ],
    );
    let mut relays = vec![
        RelayProcess::spawn(&env),
        RelayProcess::spawn(&env),
        RelayProcess::spawn(&env),
    ];
    for r in &mut relays {
        r.wait_started().await;
    }
    // The backlog appears while all three are up (LISTEN wakes them all).
    produce(&db.client().await, &new_jobs(100), 100_000)
        .await
        .expect("seed");
    wait_drained(&db, Duration::from_secs(240)).await;

    // Each relay counts what it settled; a row settled by two relays would
    // make the sum exceed the rows produced.
    let mut total = 0.0;
    for r in &relays {
        let text = scrape(r).await;
        let mine = metric_value(&text, "outbox_relay_sweep_rows_total", &[("outcome", "dispatched")]).unwrap_or(0.0);
        assert!(mine > 0.0, "every relay took part");
        assert_eq!(
            metric_value(&text, "outbox_relay_sweep_rows_total", &[("outcome", "retried")]),
            Some(0.0)
        );
        total += mine;
    }
    assert_eq!(total, 100_000.0, "settled once each");
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    let report = verify_ledger(&db, &redis_url, &prefix).await;
    assert!(report.holds(), "invariant violated: {report:#?}");
    assert_eq!(report.delivered, 100_000);
    for r in relays {
        let mut problems = r.at_level("error");
        problems.extend(r.at_level("critical"));
        assert!(problems.is_empty(), "{problems:#?}");
        r.stop().await;
    }
}
