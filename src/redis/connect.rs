//! Reaching Redis as the configuration says (standalone, Sentinel,
//! Cluster; TLS; keepalives): the pools' clients, direct connections for
//! the commands, and the start-up checks.

use std::time::Duration;

use ::redis::cluster::ClusterClient;
use ::redis::{Client, ConnectionInfo, IntoConnectionInfo, TlsCertificates};
use bb8_redis::RedisConnectionManager;

use super::conn::{ClusterManager, DirectConn, Redis, RedisPool, StandaloneManager};
use super::{durability, permissions, sentinel};
use crate::config::{RedisConfig, RedisMode};
use crate::pool::LastError;
use crate::redact::redact_url;

/// Why Redis could not be reached at start-up.
#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    /// One line per command the user may not run (docs/redis.md "Redis ACL").
    #[error("{}", .missing.iter().map(|m| format!("Redis at {url}: {m}")).collect::<Vec<_>>().join("\n"))]
    Permissions {
        url: String,
        missing: Vec<permissions::Missing>,
    },
    #[error("invalid Redis URL {url}: {source}")]
    Url { url: String, source: ::redis::RedisError },
    #[error("cannot reach Redis at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("cannot read redis.tls_ca_file {path}: {reason}")]
    CaFile { path: String, reason: String },
}

/// `redis.tls_ca_file`'s CAs for `rediss://` connections; None = the
/// system's roots (or plain TCP for `redis://`).
fn tls_certificates(cfg: &RedisConfig) -> Result<Option<TlsCertificates>, RedisSetupError> {
    if cfg.tls_ca_file.is_empty() {
        return Ok(None);
    }
    let pem = std::fs::read(&cfg.tls_ca_file).map_err(|e| RedisSetupError::CaFile {
        path: cfg.tls_ca_file.clone(),
        reason: e.to_string(),
    })?;
    Ok(Some(TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    }))
}

/// Where and how to reach the one server of standalone mode: `redis.url`,
/// with `redis.tls_ca_file`'s CAs trusted when it is `rediss://`.
fn standalone_info(cfg: &RedisConfig) -> Result<ConnectionInfo, RedisSetupError> {
    node_info(cfg, &cfg.url)
}

/// How to reach the server at `url` (`redis.tls_ca_file`'s CAs trusted
/// for `rediss://`, TCP keepalive on).
fn node_info(cfg: &RedisConfig, url: &str) -> Result<ConnectionInfo, RedisSetupError> {
    let url_error = |source| RedisSetupError::Url {
        url: redact_url(url),
        source,
    };
    // The CA file is for `rediss://` URLs; a plain one beside them (a
    // sentinel without TLS, the master with it) is plain.
    let certs = if url.starts_with("rediss://") {
        tls_certificates(cfg)?
    } else {
        None
    };
    let info = match certs {
        None => url.into_connection_info().map_err(url_error)?,
        Some(certs) => Client::build_with_tls(url, certs)
            .map(|c| c.get_connection_info().clone())
            .map_err(url_error)?,
    };
    let tcp = with_keepalive(info.tcp_settings().clone());
    Ok(info.set_tcp_settings(tcp))
}

/// Sentinel mode's sentinels, and the master's settings from `redis.url`.
fn sentinels(cfg: &RedisConfig, timeout: Duration) -> Result<sentinel::Sentinels, RedisSetupError> {
    let nodes = cfg
        .sentinel_urls
        .iter()
        .map(|u| node_info(cfg, u).map(|info| (redact_url(u), info)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(sentinel::Sentinels::new(
        nodes,
        cfg.sentinel_master.clone(),
        standalone_info(cfg)?,
        (timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(2)),
    ))
}

/// `base` with TCP keepalive and user timeout (see [`crate::pool::tcp`]): a
/// Redis that vanished is noticed by the socket, not only by the next
/// command's timeout.
fn with_keepalive(base: ::redis::io::tcp::TcpSettings) -> ::redis::io::tcp::TcpSettings {
    use crate::pool::tcp;
    let keepalive = ::redis::io::tcp::socket2::TcpKeepalive::new()
        .with_time(tcp::KEEPALIVE_IDLE)
        .with_interval(tcp::KEEPALIVE_INTERVAL)
        .with_retries(tcp::KEEPALIVE_RETRIES);
    base.set_keepalive(keepalive).set_user_timeout(tcp::USER_TIMEOUT)
}

/// A client for the one server of standalone mode (see `standalone_info`).
pub fn standalone_client(cfg: &RedisConfig) -> Result<Client, RedisSetupError> {
    Client::open(standalone_info(cfg)?).map_err(|source| RedisSetupError::Url {
        url: redact_url(&cfg.url),
        source,
    })
}

/// The cluster client: few, quick retries (a tick has one deadline, and
/// entries for a node that stays down are re-sent next tick anyway) and a
/// bounded connect per node.
fn cluster_client(cfg: &RedisConfig, checkout_timeout: Duration) -> Result<ClusterClient, RedisSetupError> {
    let mut builder = ClusterClient::builder(cfg.cluster_urls.clone());
    if let Some(certs) = tls_certificates(cfg)? {
        builder = builder.certs(certs);
    }
    builder
        .tcp_settings(with_keepalive(::redis::io::tcp::TcpSettings::default()))
        .retries(4)
        .min_retry_wait(10)
        .max_retry_wait(200)
        .connection_timeout((checkout_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(2)))
        // Bound every reply inside the client too (slot refreshes included):
        // a node that died mid-request must not hold up the others.
        .response_timeout((checkout_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(2)))
        .build()
        .map_err(|source| RedisSetupError::Url {
            url: Redis::describe(cfg),
            source,
        })
}

/// A lazily connecting pool. Connections are not tested on checkout: a
/// standalone connection whose command failed at the transport level is
/// dropped when it returns to the pool ([`StandaloneManager`]); a cluster
/// connection repairs itself per node (one dead node must not make the
/// whole connection look broken) and is dropped only when nothing answered
/// on it ([`RedisConn::discard`]).
///
/// [`RedisConn::discard`]: super::conn::RedisConn::discard
pub fn pool(cfg: &RedisConfig, checkout_timeout: Duration) -> Result<Redis, RedisSetupError> {
    let last_error = LastError::default();
    let standalone = |manager| {
        RedisPool::Standalone(
            bb8::Pool::builder()
                .max_size(cfg.pool_size)
                .connection_timeout(checkout_timeout)
                .test_on_check_out(false)
                .error_sink(Box::new(last_error.clone()))
                .build_unchecked(manager),
        )
    };
    let pool = match cfg.mode {
        RedisMode::Standalone => {
            let manager =
                RedisConnectionManager::new(standalone_info(cfg)?).map_err(|source| RedisSetupError::Url {
                    url: redact_url(&cfg.url),
                    source,
                })?;
            standalone(StandaloneManager::Fixed(manager))
        }
        RedisMode::Sentinel => standalone(StandaloneManager::Sentinel(sentinels(cfg, checkout_timeout)?)),
        RedisMode::Cluster => RedisPool::Cluster(
            bb8::Pool::builder()
                .max_size(cfg.pool_size)
                .connection_timeout(checkout_timeout)
                .test_on_check_out(false)
                .error_sink(Box::new(last_error.clone()))
                .build_unchecked(ClusterManager(cluster_client(cfg, checkout_timeout)?)),
        ),
    };
    Ok(Redis { pool, last_error })
}

/// Connect as the config says (standalone `url` or the cluster's seeds),
/// failing with the real cause instead of a pool timeout.
pub async fn connect_config(cfg: &RedisConfig, timeout: Duration) -> Result<DirectConn, RedisSetupError> {
    match cfg.mode {
        RedisMode::Standalone => connect_client(standalone_client(cfg)?, &redact_url(&cfg.url), timeout)
            .await
            .map(DirectConn::Standalone),
        RedisMode::Sentinel => {
            let unreachable = |reason: String| RedisSetupError::Unreachable {
                url: Redis::describe(cfg),
                reason,
            };
            match tokio::time::timeout(timeout, sentinels(cfg, timeout)?.connect()).await {
                Ok(Ok(conn)) => Ok(DirectConn::Standalone(conn)),
                Ok(Err(e)) => Err(unreachable(e.to_string())),
                Err(_) => Err(unreachable(format!("no answer within {}ms", timeout.as_millis()))),
            }
        }
        RedisMode::Cluster => {
            let shown = Redis::describe(cfg);
            let client = cluster_client(cfg, timeout)?;
            match tokio::time::timeout(timeout, client.get_async_connection()).await {
                Ok(Ok(conn)) => Ok(DirectConn::Cluster(conn)),
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
    }
}

/// Connect `client` (shown as `shown` in errors) within `timeout`, failing
/// with the real cause (refused, auth, DNS, TLS) instead of a pool timeout.
async fn connect_client(
    client: Client,
    shown: &str,
    timeout: Duration,
) -> Result<::redis::aio::MultiplexedConnection, RedisSetupError> {
    let shown = shown.to_string();
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

/// Check that the Redis user may run every command `run` sends. Missing
/// required ones are an error listing each; missing optional ones are
/// returned for a warning.
pub async fn check_permissions(
    cfg: &RedisConfig,
    timeout: Duration,
) -> Result<Vec<permissions::Missing>, RedisSetupError> {
    let mut conn = connect_config(cfg, timeout).await?;
    let shown = Redis::describe(cfg);
    let missing = tokio::time::timeout(timeout, permissions::missing(&mut conn, cfg))
        .await
        .map_err(|_| RedisSetupError::Unreachable {
            url: shown.clone(),
            reason: format!("no answer within {}ms", timeout.as_millis()),
        })?;
    if missing.iter().any(|m| m.required) {
        return Err(RedisSetupError::Permissions { url: shown, missing });
    }
    Ok(missing)
}

/// The durability warning for `run`'s start, if any (see [`durability`]).
pub async fn durability_risk(cfg: &RedisConfig, timeout: Duration) -> Option<String> {
    let mut conn = connect_config(cfg, timeout).await.ok()?;
    durability::risk(&mut conn, cfg, timeout).await
}

/// Connect once (as the config says) and PING; returns the round trip.
pub async fn ping(cfg: &RedisConfig, timeout: Duration) -> Result<Duration, RedisSetupError> {
    let started = tokio::time::Instant::now();
    let mut conn = connect_config(cfg, timeout).await?;
    let unreachable = |reason: String| RedisSetupError::Unreachable {
        url: Redis::describe(cfg),
        reason,
    };
    match tokio::time::timeout(timeout, ::redis::cmd("PING").query_async::<String>(&mut conn)).await {
        Ok(Ok(_)) => Ok(started.elapsed()),
        Ok(Err(e)) => Err(unreachable(e.to_string())),
        Err(_) => Err(unreachable(format!("no answer within {}ms", timeout.as_millis()))),
    }
}
