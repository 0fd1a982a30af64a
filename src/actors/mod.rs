//! The actors of the relay, one concern each (SPEC §2):
//! - [`lifecycle`]: the protocol every actor follows (start, work under a
//!   deadline, fail, restart), written once;
//! - [`supervisor`]: restart intensity and backoff, when the process gives up;
//! - [`tree`]: which actors run, wired together;
//! - one file per actor, holding its messages, settings, handlers and the
//!   plain async function that does its I/O.

pub mod counter_sync;
pub mod dead_letter;
pub mod dispatch;
pub mod journal;
pub mod lifecycle;
pub mod metrics;
pub mod supervisor;
pub mod sweep;
pub mod tree;
pub mod watchdog;

/// One Postgres and one Redis connection, for the actors that work on a
/// cadence (counter sync, probes) rather than on the hot path.
pub fn small_pools(
    database_url: &str,
    redis: &crate::config::RedisConfig,
    checkout: std::time::Duration,
) -> Result<(crate::db::Pg, crate::redis::Redis), String> {
    let pg = crate::db::pool(database_url, 1, checkout).map_err(|e| format!("cannot build the Postgres pool: {e}"))?;
    let one = crate::config::RedisConfig {
        pool_size: 1,
        ..redis.clone()
    };
    let redis = crate::redis::pool(&one, checkout).map_err(|e| format!("cannot build the Redis pool: {e}"))?;
    Ok((pg, redis))
}
