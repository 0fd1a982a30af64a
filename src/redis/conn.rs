//! The connections the relay holds to Redis: the dispatch pool (one
//! server, the master Sentinel names, or a Redis Cluster) with its bb8
//! managers, a connection checked out of it, and a direct connection for
//! the CLI and the start-up checks.

use std::time::Duration;

use ::redis::aio::{ConnectionLike, MultiplexedConnection};
use ::redis::cluster::ClusterClient;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Cmd, Pipeline, RedisFuture, Value};
use bb8_redis::RedisConnectionManager;

use super::sentinel;
use crate::config::{RedisConfig, RedisMode};
use crate::pool::{FailureKind, LastError};
use crate::redact::redact_url;

impl FailureKind for ::redis::RedisError {
    fn is_timeout(&self) -> bool {
        ::redis::RedisError::is_timeout(self)
    }
}

/// The dispatch pool: one Redis server, or a Redis Cluster through
/// redis-rs's cluster client (bb8-redis has no cluster support).
#[derive(Clone, Debug)]
pub enum RedisPool {
    Standalone(bb8::Pool<StandaloneManager>),
    Cluster(bb8::Pool<ClusterManager>),
}

/// bb8 manager for one Redis server: bb8-redis's, except that a connection
/// on which a command failed at the transport level (I/O error, dropped,
/// no reply in time) is reported broken and dropped when it goes back to
/// the pool. bb8-redis's own manager never reports one broken, so a pool
/// would otherwise need a PING on every checkout to notice a dead
/// connection: one more round trip per batch, on the latency path.
///
/// In sentinel mode the one server is the master the sentinels name, asked
/// again for every new connection ([`sentinel::Sentinels`]).
#[derive(Clone, Debug)]
pub enum StandaloneManager {
    Fixed(RedisConnectionManager),
    Sentinel(sentinel::Sentinels),
}

/// A pooled connection and whether it must be thrown away when it goes
/// back to the pool (both managers' `has_broken`).
pub struct Discardable<C> {
    conn: C,
    broken: bool,
}

impl<C> Discardable<C> {
    fn new(conn: C) -> Self {
        Discardable { conn, broken: false }
    }
}

impl<C> std::ops::Deref for Discardable<C> {
    type Target = C;
    fn deref(&self) -> &C {
        &self.conn
    }
}

impl<C> std::ops::DerefMut for Discardable<C> {
    fn deref_mut(&mut self) -> &mut C {
        &mut self.conn
    }
}

/// A pooled standalone connection; it remembers a transport failure.
pub type StandaloneConn = Discardable<MultiplexedConnection>;

impl StandaloneConn {
    fn note(&mut self, e: &::redis::RedisError) {
        if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() || e.is_timeout() {
            self.broken = true;
        }
    }
}

impl ConnectionLike for StandaloneConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let r = self.conn.req_packed_command(cmd).await;
            if let Err(e) = &r {
                self.note(e);
            }
            r
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let r = self.conn.req_packed_commands(pipeline, offset, count).await;
            if let Err(e) = &r {
                self.note(e);
            }
            r
        })
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }
}

impl bb8::ManageConnection for StandaloneManager {
    type Connection = StandaloneConn;
    type Error = ::redis::RedisError;

    async fn connect(&self) -> Result<StandaloneConn, ::redis::RedisError> {
        let conn = match self {
            StandaloneManager::Fixed(m) => m.connect().await?,
            StandaloneManager::Sentinel(s) => s.connect().await?,
        };
        crate::pool::note_opened(crate::pool::REDIS);
        Ok(Discardable::new(conn))
    }

    async fn is_valid(&self, conn: &mut StandaloneConn) -> Result<(), ::redis::RedisError> {
        ::redis::cmd("PING").query_async::<()>(&mut conn.conn).await
    }

    fn has_broken(&self, conn: &mut StandaloneConn) -> bool {
        conn.broken
    }
}

/// bb8 manager for cluster connections. redis-rs's own (feature `bb8`)
/// never reports a connection broken; ours lets the dispatch path discard
/// one that stopped answering altogether (see [`RedisConn::discard`]).
#[derive(Clone, Debug)]
pub struct ClusterManager(pub(super) ClusterClient);

/// A pooled cluster connection.
pub type ClusterConn = Discardable<ClusterConnection>;

impl bb8::ManageConnection for ClusterManager {
    type Connection = ClusterConn;
    type Error = ::redis::RedisError;

    async fn connect(&self) -> Result<ClusterConn, ::redis::RedisError> {
        let conn = self.0.get_async_connection().await?;
        crate::pool::note_opened(crate::pool::REDIS);
        Ok(Discardable::new(conn))
    }

    async fn is_valid(&self, conn: &mut ClusterConn) -> Result<(), ::redis::RedisError> {
        ::redis::cmd("PING").query_async::<()>(&mut conn.conn).await
    }

    fn has_broken(&self, conn: &mut ClusterConn) -> bool {
        conn.broken
    }
}

impl RedisPool {
    pub fn state(&self) -> bb8::State {
        match self {
            RedisPool::Standalone(p) => p.state(),
            RedisPool::Cluster(p) => p.state(),
        }
    }
}

/// A connection checked out of a [`RedisPool`]; a `ConnectionLike`, so any
/// command runs on it. In cluster mode each command is routed by its key's
/// hash slot, and MOVED/ASK redirects are followed by the client.
pub enum RedisConn<'a> {
    Standalone(bb8::PooledConnection<'a, StandaloneManager>),
    Cluster(bb8::PooledConnection<'a, ClusterManager>),
}

impl RedisConn<'_> {
    /// Bound the wait for each reply (standalone; the cluster client's
    /// replies are bounded by its own response timeout and our deadlines).
    pub fn set_response_timeout(&mut self, timeout: Duration) {
        if let RedisConn::Standalone(c) = self {
            c.set_response_timeout(timeout);
        }
    }

    /// The cluster handle, to send per-slot pipelines concurrently.
    pub fn cluster(&self) -> Option<ClusterConnection> {
        match self {
            RedisConn::Cluster(c) => Some(c.conn.clone()),
            RedisConn::Standalone(_) => None,
        }
    }

    /// Do not return this connection to the pool: bb8 drops it and builds a
    /// new one. For a standalone connection that gave no reply before a
    /// deadline (transport errors mark it by themselves), and for a
    /// cluster connection that answered nothing on any node while it was
    /// used. redis-rs's cluster connection can deadlock
    /// for good (a slot refresh waiting on a lock that a request it no
    /// longer polls holds), seen after a master died and during a
    /// resharding; only a new connection recovers. Standalone connections
    /// are checked with PING on checkout instead.
    pub fn discard(&mut self) {
        match self {
            RedisConn::Standalone(c) => c.broken = true,
            RedisConn::Cluster(c) => c.broken = true,
        }
    }
}

/// `ConnectionLike` for an enum whose two variants (`Standalone`,
/// `Cluster`) each hold a connection (or a pool guard that derefs to one).
macro_rules! delegate_connection_like {
    ($ty:ty, $name:ident) => {
        impl ConnectionLike for $ty {
            fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
                match self {
                    $name::Standalone(c) => c.req_packed_command(cmd),
                    $name::Cluster(c) => c.req_packed_command(cmd),
                }
            }

            fn req_packed_commands<'a>(
                &'a mut self,
                pipeline: &'a Pipeline,
                offset: usize,
                count: usize,
            ) -> RedisFuture<'a, Vec<Value>> {
                match self {
                    $name::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
                    $name::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
                }
            }

            fn get_db(&self) -> i64 {
                match self {
                    $name::Standalone(c) => c.get_db(),
                    $name::Cluster(c) => c.get_db(),
                }
            }
        }
    };
}

delegate_connection_like!(RedisConn<'_>, RedisConn);

/// A direct connection for the CLI and start-up checks: one server, or the
/// cluster through its seed nodes.
#[derive(Clone)]
pub enum DirectConn {
    Standalone(MultiplexedConnection),
    Cluster(ClusterConnection),
}

delegate_connection_like!(DirectConn, DirectConn);

/// A pool and the latest reason its connections failed.
#[derive(Clone, Debug)]
pub struct Redis {
    pub pool: RedisPool,
    pub last_error: LastError,
}

impl Redis {
    /// Where this pool connects, for messages (passwords redacted).
    pub fn describe(cfg: &RedisConfig) -> String {
        match cfg.mode {
            RedisMode::Standalone => redact_url(&cfg.url),
            RedisMode::Sentinel => sentinel::Sentinels::describe(&cfg.sentinel_master, &cfg.sentinel_urls),
            RedisMode::Cluster => format!(
                "cluster {}",
                cfg.cluster_urls
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }
}
