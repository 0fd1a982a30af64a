//! Key-space helpers for the commands that look at Redis as a whole
//! (`status`, `bench`, tests' clean-up): find keys by pattern on every
//! master, and run one command per key where keys live on different nodes.
//! Not on the relay's hot path.

use ::redis::cluster_async::ClusterConnection;

use super::conn::DirectConn;
use super::slots::cluster_slots;

/// `cmd key` for each of `keys`, all at once: in a cluster the keys live on
/// different nodes, so they cannot share a pipeline; the cluster client
/// sends each to its key's node.
pub async fn per_key<T: ::redis::FromRedisValue>(
    conn: &DirectConn,
    cmd: &str,
    keys: &[String],
) -> Vec<::redis::RedisResult<T>> {
    futures_util::future::join_all(keys.iter().map(|k| {
        let mut c = conn.clone();
        let cmd = ::redis::cmd(cmd).arg(k).to_owned();
        async move { cmd.query_async::<T>(&mut c).await }
    }))
    .await
}

/// Every key matching `pattern`, on the one server or on every cluster
/// master (SCAN walks one node's keyspace only).
pub async fn keys_matching(conn: &mut DirectConn, pattern: &str) -> Result<Vec<String>, ::redis::RedisError> {
    match &mut *conn {
        DirectConn::Standalone(_) => scan(conn, pattern, None).await,
        DirectConn::Cluster(c) => {
            let slots = one_slot_per_master(c).await?;
            let mut keys = Vec::new();
            for slot in slots {
                keys.extend(scan(conn, pattern, Some(slot)).await?);
            }
            Ok(keys)
        }
    }
}

/// Every key matching `pattern`: on one server (`slot` None) or on the
/// cluster master that owns `slot` (SCAN has no key to route by).
async fn scan(conn: &mut DirectConn, pattern: &str, slot: Option<u16>) -> Result<Vec<String>, ::redis::RedisError> {
    use ::redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let mut cmd = ::redis::cmd("SCAN");
        cmd.arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000);
        let reply = match (&mut *conn, slot) {
            (DirectConn::Cluster(c), Some(slot)) => {
                let to =
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master)));
                c.route_command(cmd, to).await?
            }
            (c, _) => cmd.query_async::<::redis::Value>(c).await?,
        };
        let (next, batch): (u64, Vec<String>) = ::redis::from_redis_value(reply)?;
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            return Ok(keys);
        }
    }
}

/// The first slot of every master's ranges (CLUSTER SLOTS), one per master.
async fn one_slot_per_master(conn: &mut ClusterConnection) -> Result<Vec<u16>, ::redis::RedisError> {
    let mut seen = std::collections::HashSet::new();
    Ok(cluster_slots(conn)
        .await?
        .into_iter()
        .filter(|r| seen.insert(r.master.clone()))
        .map(|r| r.start)
        .collect())
}
