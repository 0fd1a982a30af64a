//! A Redis that keeps nothing on disk (no AOF) with `redis.wait_replicas =
//! 0`, as many are run: a restart loses schedule entries whose outbox rows
//! are already deleted. The relay says so at start, in one warning line
//! naming the risk and the fix; against a Redis with an append-only file,
//! or with `wait_replicas` set, it says nothing.

use crate::common;

use common::*;

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
