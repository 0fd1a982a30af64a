//! Where `bench` runs: the scratch database's URL, opening it (migrated)
//! with a Redis connection, and deleting the scratch key prefix.

use super::error::BenchError;
use crate::config::Config;
use crate::db;
use crate::deadline::STARTUP_TIMEOUT;
use crate::redis::keys::{keys_matching, per_key};
use crate::redis::DirectConn;

/// `database.url` with its database replaced by `name`.
pub(super) fn scratch_url(url: &str, name: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(mut c) => {
            c.dbname(name);
            // Rebuild a URL the subprocess can take: user, host, port, db.
            let user = c.get_user().unwrap_or("postgres");
            let host = c
                .get_hosts()
                .first()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    #[cfg(unix)]
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .unwrap_or_else(|| "127.0.0.1".into());
            let port = c.get_ports().first().copied().unwrap_or(5432);
            let password = c
                .get_password()
                .map(|p| format!(":{}", String::from_utf8_lossy(p)))
                .unwrap_or_default();
            format!("postgres://{user}{password}@{host}:{port}/{name}")
        }
        Err(_) => url.to_string(),
    }
}

/// Delete every key under `prefix` (on every master of a cluster), with
/// `UNLINK`: freeing sets of millions of members is Redis's background
/// work then, not a stall of the shared server (a `DEL` of a 5,000,000-row
/// run's schedules kept the next bench from connecting).
pub(super) async fn delete_prefix(conn: &mut DirectConn, prefix: &str) -> Result<(), ::redis::RedisError> {
    let keys = keys_matching(conn, &format!("{prefix}*")).await?;
    match conn {
        DirectConn::Standalone(c) => {
            for chunk in keys.chunks(1000) {
                let _: i64 = ::redis::cmd("UNLINK").arg(chunk).query_async(c).await?;
            }
        }
        // Keys on different slots cannot share an UNLINK.
        DirectConn::Cluster(_) => {
            for chunk in keys.chunks(1000) {
                for deleted in per_key::<i64>(conn, "UNLINK", chunk).await {
                    deleted?;
                }
            }
        }
    }
    Ok(())
}

/// Migrate the scratch database; connect to it and to Redis.
pub(super) async fn open_scratch(cfg: &Config, url: &str) -> Result<(tokio_postgres::Client, DirectConn), BenchError> {
    let log = crate::telemetry::logging::discard();
    db::migrate::migrate(url, STARTUP_TIMEOUT, &log).await?;
    let client = db::connect(url, STARTUP_TIMEOUT).await?;
    let conn = crate::redis::connect_config(&cfg.redis, STARTUP_TIMEOUT)
        .await
        .map_err(|e| BenchError::Redis(e.to_string()))?;
    Ok((client, conn))
}
