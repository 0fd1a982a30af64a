//! Whether Redis keeps what the relay wrote: the outbox row of a delivered
//! entry is deleted at once, so a schedule entry Redis then loses (a
//! restart with nothing on disk, a failover before the replica had it) is
//! lost for good. At start the relay reads `INFO persistence` (every
//! master of a cluster) and, when an entry could be lost that way, says
//! so in one warning line naming the risk and the fix (docs/redis.md
//! "Durability").

use std::time::Duration;

use super::conn::{DirectConn, Redis};
use super::memory::{info_error, info_on_masters, InfoError};
use crate::config::RedisConfig;
use crate::deadline::Deadline;

/// What `INFO persistence` says of one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Persistence {
    /// `aof_enabled:1`. Without it a restart loses what came after the
    /// last RDB snapshot, if there is one.
    pub aof: bool,
}

impl Persistence {
    pub fn parse(info: &str) -> Option<Persistence> {
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.trim_end().strip_prefix(name)?.strip_prefix(':'))
        };
        Some(Persistence {
            aof: field("aof_enabled")? == "1",
        })
    }
}

/// The warning to log at start, if any: Redis keeps no append-only file
/// and no replica must acknowledge (`redis.wait_replicas = 0`).
pub async fn risk(conn: &mut DirectConn, cfg: &RedisConfig, timeout: Duration) -> Option<String> {
    if cfg.wait_replicas > 0 {
        return None;
    }
    let texts: Vec<(String, Result<String, InfoError>)> = match conn {
        DirectConn::Standalone(c) => {
            let text = tokio::time::timeout(
                timeout,
                ::redis::cmd("INFO").arg("persistence").query_async::<String>(c),
            )
            .await
            .ok()?
            .map_err(|e| info_error(&e));
            vec![(Redis::describe(cfg), text)]
        }
        DirectConn::Cluster(c) => info_on_masters(c, "persistence", Deadline::after(timeout)).await.ok()?,
    };
    let without_aof: Vec<String> = texts
        .into_iter()
        .filter_map(|(server, text)| {
            let p = Persistence::parse(&text.ok()?)?;
            (!p.aof).then_some(server)
        })
        .collect();
    (!without_aof.is_empty()).then(|| {
        format!(
            "Redis at {} keeps no append-only file and redis.wait_replicas is 0: a Redis restart loses the schedule entries written since its last snapshot (all of them without snapshots), and their outbox rows are already deleted; turn on appendonly (appendfsync everysec or always) or set redis.wait_replicas (docs/redis.md \"Durability: wait_replicas\")",
            without_aof.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_info_persistence() {
        let off = "# Persistence\r\nloading:0\r\nrdb_changes_since_last_save:12\r\nrdb_saves:0\r\naof_enabled:0\r\n";
        assert_eq!(Persistence::parse(off), Some(Persistence { aof: false }));
        assert_eq!(Persistence::parse("aof_enabled:1\r\n"), Some(Persistence { aof: true }));
        assert_eq!(Persistence::parse("loading:0\r\n"), None);
    }
}
