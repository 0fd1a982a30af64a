//! What Redis acknowledged stays delivered: the relay deletes an outbox
//! row only once its entry is as durable as it was told to make it.
//!
//! - `redis.wait_replicas = 1` against a real primary/replica pair: with
//!   the replica gone, the primary takes the writes but no row is deleted,
//!   dead-lettered or charged an attempt (WAIT falls short, the operator is
//!   told); the replica back, everything drains.
//! - A Redis that keeps nothing on disk (no AOF) with `redis.wait_replicas =
//!   0`, as many are run: a restart loses schedule entries whose outbox rows
//!   are already deleted. The relay says so at start, in one warning line
//!   naming the risk and the fix; against a Redis with an append-only file,
//!   or with `wait_replicas` set, it says nothing.
//!
//! A master killed mid-drain with `wait_replicas = 1` loses nothing after
//! the failover: `sentinel` and `cluster` check it under each topology's
//! own failover; `cancel_job` checks that cancel-job waits for replicas too.
use crate::common;

use std::time::Duration;

use common::*;
use redis::AsyncCommands;

const WARNING: &str = "redis may lose delivered entries on a restart";

async fn start_warnings(redis_url: &str, extra: &[(&str, &str)]) -> Vec<serde_json::Value> {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let mut env = shipped_env(&db.url, redis_url, &prefix);
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    let warned = relay.records(WARNING);
    relay.stop().await;
    warned
}

#[tokio::test]
async fn a_redis_without_an_append_only_file_is_named_at_start() {
    let volatile = RedisServer::start().await;
    let warned = start_warnings(&volatile.url(), &[]).await;
    assert_eq!(warned.len(), 1, "{warned:?}");
    let risk = warned[0]["risk"].as_str().unwrap_or_default();
    assert!(
        risk.contains("appendonly") && risk.contains("redis.wait_replicas"),
        "{risk}"
    );

    let durable = RedisServer::start_durable().await;
    assert!(start_warnings(&durable.url(), &[]).await.is_empty());

    // A replica must acknowledge every batch: losing the primary's memory
    // no longer loses an entry.
    let _replica = RedisServer::start_replica_of(volatile.port).await;
    let warned = start_warnings(&volatile.url(), &[("OUTBOX_RELAY_REDIS__WAIT_REPLICAS", "1")]).await;
    assert!(warned.is_empty(), "{warned:?}");
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
