//! Several relays and concurrent ticks on one backlog, and WAIT before
//! delete against a real primary/replica pair.

use crate::common;

use std::time::Duration;

use common::*;
use redis::AsyncCommands;

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

async fn replication(port: u16) -> String {
    let mut conn = redis_conn(&format!("redis://127.0.0.1:{port}/0")).await;
    redis::cmd("INFO")
        .arg("replication")
        .query_async(&mut conn)
        .await
        .unwrap_or_default()
}

#[tokio::test]
async fn wait_replicas_keeps_rows_until_a_replica_has_them() {
    let primary = RedisServer::start().await;
    let mut replica = RedisServer::start_replica_of(primary.port).await;
    wait_until("replica in sync", Duration::from_secs(30), || async {
        replication(primary.port).await.contains("connected_slaves:1")
            && replication(replica.port).await.contains("master_link_status:up")
    })
    .await;

    let db = TestDb::new().await;
    create_ledger(&db).await;
    let prefix = key_prefix();
    let env = relay_env(
        &db,
        &primary.url(),
        &prefix,
        &[
            ("OUTBOX_RELAY_REDIS__WAIT_REPLICAS", "1"),
            ("OUTBOX_RELAY_SWEEP__TICK_TIMEOUT", "2s"),
            ("OUTBOX_RELAY_SWEEP__BASE_BACKOFF", "200ms"),
            // Were a shortfall counted as a failure, two would dead-letter.
            ("OUTBOX_RELAY_SWEEP__MAX_ATTEMPTS", "2"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    let js = new_jobs(20);
    let c = db.client().await;

    // With the replica up: delivered normally, and the replica has it all.
    produce(&c, &js, 2_000).await.expect("seed");
    wait_drained(&db, Duration::from_secs(60)).await;
    assert_eq!(schedule_members(&replica.url(), &prefix).await.len(), 2_000);

    // Replica gone: the ZADDs reach the primary, but no row is deleted.
    replica.stop();
    wait_until("primary sees no replica", Duration::from_secs(30), || async {
        replication(primary.port).await.contains("connected_slaves:0")
    })
    .await;
    produce(&c, &js, 1_000).await.expect("seed");
    wait_until("three WAIT shortfalls", Duration::from_secs(60), || async {
        let text = scrape(&relay).await;
        metric_value(&text, "outbox_relay_redis_wait_shortfall_total", &[]).is_some_and(|v| v >= 3.0)
    })
    .await;
    assert_eq!(
        db.count("SELECT count(*) FROM task_outbox").await,
        1_000,
        "nothing deleted"
    );
    assert_eq!(db.count("SELECT count(*) FROM task_outbox WHERE attempts > 0").await, 0);
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    assert!(
        relay.count("redis replicas did not acknowledge") >= 1,
        "the operator is told"
    );
    let mut p = redis_conn(&primary.url()).await;
    let on_primary: i64 = {
        let mut n = 0;
        for j in &js {
            n += p
                .zcard::<_, i64>(format!("{}sched:{j}", &*prefix))
                .await
                .expect("zcard");
        }
        n
    };
    assert_eq!(on_primary, 3_000, "the primary took the writes; only the deletes wait");

    // The replica returns: everything drains.
    replica.resume().await;
    wait_drained(&db, Duration::from_secs(120)).await;
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    let report = verify_ledger(&db, &primary.url(), &prefix).await;
    assert!(report.holds(), "invariant violated: {report:#?}");
    assert_eq!(report.delivered, 3_000);
    assert!(relay.count("redis replicas acknowledge again") >= 1);
    relay.stop().await;
}
