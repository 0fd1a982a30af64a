//! Redis side of the relay: the connection pool, the member encoding and the
//! pipelined ZADD that reports its outcome per entry.

pub mod member;
pub mod pipeline;

use std::time::Duration;

use bb8_redis::RedisConnectionManager;

use crate::config::{redact_url, RedisConfig};
use crate::pool::LastError;

pub type RedisPool = bb8::Pool<RedisConnectionManager>;

/// A pool and the latest reason its connections failed.
#[derive(Clone, Debug)]
pub struct Redis {
    pub pool: RedisPool,
    pub last_error: LastError,
}

/// Why Redis could not be reached at start-up.
#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    #[error("invalid Redis URL {url}: {source}")]
    Url { url: String, source: ::redis::RedisError },
    #[error("cannot reach Redis at {url}: {reason}")]
    Unreachable { url: String, reason: String },
}

/// A lazily connecting pool; connections are checked with PING on checkout
/// because bb8-redis cannot otherwise tell that a connection died.
pub fn pool(cfg: &RedisConfig, checkout_timeout: Duration) -> Result<Redis, RedisSetupError> {
    let manager = RedisConnectionManager::new(cfg.url.as_str()).map_err(|source| RedisSetupError::Url {
        url: redact_url(&cfg.url),
        source,
    })?;
    let last_error = LastError::default();
    let pool = bb8::Pool::builder()
        .max_size(cfg.pool_size)
        .connection_timeout(checkout_timeout)
        .test_on_check_out(true)
        .error_sink(Box::new(last_error.clone()))
        .build_unchecked(manager);
    Ok(Redis { pool, last_error })
}

/// One direct multiplexed connection (for the CLI and start-up checks),
/// failing with the real cause (refused, auth, DNS) instead of a pool timeout.
pub async fn connect(url: &str, timeout: Duration) -> Result<::redis::aio::MultiplexedConnection, RedisSetupError> {
    let shown = redact_url(url);
    let client = ::redis::Client::open(url).map_err(|source| RedisSetupError::Url {
        url: shown.clone(),
        source,
    })?;
    match tokio::time::timeout(timeout, client.get_multiplexed_async_connection()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(RedisSetupError::Unreachable {
            url: shown,
            reason: e.to_string(),
        }),
        Err(_) => Err(RedisSetupError::Unreachable {
            url: shown,
            reason: format!("no answer within {}ms", timeout.as_millis()),
        }),
    }
}

/// Connect once and PING; returns the round trip.
pub async fn ping(url: &str, timeout: Duration) -> Result<Duration, RedisSetupError> {
    let started = tokio::time::Instant::now();
    let mut conn = connect(url, timeout).await?;
    match tokio::time::timeout(timeout, ::redis::cmd("PING").query_async::<String>(&mut conn)).await {
        Ok(Ok(_)) => Ok(started.elapsed()),
        Ok(Err(e)) => Err(RedisSetupError::Unreachable {
            url: redact_url(url),
            reason: e.to_string(),
        }),
        Err(_) => Err(RedisSetupError::Unreachable {
            url: redact_url(url),
            reason: format!("no answer within {}ms", timeout.as_millis()),
        }),
    }
}
