//! The pool of Postgres connections: one bb8 manager per URL that tries
//! each host in turn, connections that can be discarded, checkout within a
//! deadline, and the cancel of a statement left running after one.

use std::str::FromStr;
use std::time::Duration;

use bb8_postgres::PostgresConnectionManager;

use super::error::DbSetupError;
use super::url::pg_config;
use super::{hosts, tls};
use crate::deadline::{Deadline, Expired};
use crate::pool::LastError;

pub type PgPool = bb8::Pool<PgManager>;

/// A pooled Postgres connection that can be marked for discarding: one
/// whose state is unknown after a deadline (a statement or its ROLLBACK
/// still queued, a cancel that may land on whatever runs next) never goes
/// back to the pool, so the next user cannot inherit an aborted
/// transaction (SQLSTATE 25P02) or a stalled socket.
pub struct PgConn {
    /// None once [`Pg::cancel_statement`] took it: the connection is then
    /// discarded, and nothing uses it again.
    client: Option<tokio_postgres::Client>,
    discard: bool,
}

const TAKEN: &str = "a connection is not used after Pg::cancel_statement took its client";

impl PgConn {
    /// Close this connection when it is returned instead of reusing it.
    pub fn discard(&mut self) {
        self.discard = true;
    }
}

impl std::ops::Deref for PgConn {
    type Target = tokio_postgres::Client;
    fn deref(&self) -> &tokio_postgres::Client {
        self.client.as_ref().expect(TAKEN)
    }
}

impl std::ops::DerefMut for PgConn {
    fn deref_mut(&mut self) -> &mut tokio_postgres::Client {
        self.client.as_mut().expect(TAKEN)
    }
}

/// bb8-postgres's manager, one per host of the URL, with
/// [`PgConn::discard`] honoured and each host's whole connection bounded
/// as libpq bounds it ([`hosts`]): tokio-postgres bounds only the TCP
/// connect, not the start-up, authentication and the read-write check
/// after it, and bb8 keeps a pool slot for a connect in progress. A server
/// that accepts the socket and then answers nothing (a frozen server;
/// pgbouncer queueing the check behind busy server connections, up to its
/// `query_wait_timeout`) would otherwise hold the slots of the whole pool,
/// and the next host of the URL would never be tried.
pub struct PgManager {
    /// One config per host of the URL ([`hosts::each_host`]).
    hosts: Vec<tokio_postgres::Config>,
    random: bool,
    per_host: Duration,
}

impl bb8::ManageConnection for PgManager {
    type Connection = PgConn;
    type Error = tokio_postgres::Error;

    async fn connect(&self) -> Result<PgConn, tokio_postgres::Error> {
        let mut last = None;
        for one in hosts::attempts(&self.hosts, self.random, self.per_host).await {
            let host = PostgresConnectionManager::new(one, tls::connector());
            match tokio::time::timeout(self.per_host, host.connect()).await {
                Ok(Ok(client)) => {
                    crate::pool::note_opened(crate::pool::POSTGRES);
                    return Ok(PgConn {
                        client: Some(client),
                        discard: false,
                    });
                }
                Ok(Err(e)) => last = Some(e),
                // tokio-postgres's own timeout error ("timeout waiting for
                // server"), the one its connect_timeout returns; it has no
                // public constructor.
                Err(_) => last = Some(tokio_postgres::Error::__private_api_timeout()),
            }
        }
        Err(last.unwrap_or_else(tokio_postgres::Error::__private_api_timeout))
    }

    async fn is_valid(&self, conn: &mut PgConn) -> Result<(), tokio_postgres::Error> {
        match conn.client.as_mut() {
            Some(client) => client.simple_query("").await.map(|_| ()),
            None => Err(tokio_postgres::Error::__private_api_timeout()),
        }
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        conn.discard || conn.client.as_ref().is_none_or(|c| c.is_closed())
    }
}

/// A pool and the latest reason its connections failed.
#[derive(Clone, Debug)]
pub struct Pg {
    pub pool: PgPool,
    pub last_error: LastError,
    /// See [`cancel_route`].
    cancel_to: Option<(String, u16)>,
}

/// Why a connection could not be taken from a [`Pg`] pool.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error(transparent)]
    Deadline(#[from] Expired),
    /// The pool could not connect; the text says why (refused, auth, …).
    #[error("postgres pool: {0}")]
    Pool(String),
}

/// How long a tick waits for the cancel of its statement (after its
/// deadline) before going on: a server that does not answer the cancel
/// (frozen, partitioned) is not waited for. The cancel itself goes on in
/// the background, up to [`CANCEL_LINGER`].
pub const CANCEL_WAIT: Duration = Duration::from_secs(1);

/// How long a cancel request, and the connection whose statement it
/// cancels, are kept open at most waiting for the other side to finish
/// with the cancel. pgbouncer 1.18 (Debian bookworm's) dies (`FATAL …
/// disconnect_client(): bad client state`, or `disconnect_server(): bad
/// server state` when the cancelled client goes first) if either closes
/// before it has forwarded the cancel, which takes as long as its new
/// server connection does: `tests/pgbouncer.rs` shows both with a server
/// slow to accept.
pub const CANCEL_LINGER: Duration = Duration::from_secs(30);

impl Pg {
    /// Cancel the statement running on `conn` and discard the connection.
    /// After a deadline the wait for the statement was dropped, but the
    /// statement itself (and the locks it holds) lives on until its own
    /// `statement_timeout` unless cancelled. The request is sent as libpq
    /// sends it: then a wait for the other side to close (see
    /// [`NoShutdown`]); the connection is closed only after that, so a
    /// pgbouncer never sees a client leave while its cancel is on the way.
    /// Waits at most [`CANCEL_WAIT`]; the rest goes on in the background.
    pub async fn cancel_statement(&self, conn: &mut PgConn) {
        conn.discard = true;
        let Some(client) = conn.client.take() else {
            return;
        };
        let token = client.cancel_token();
        let route = self.cancel_to.clone();
        let linger = tokio::spawn(async move {
            let _ = tokio::time::timeout(CANCEL_LINGER, send_cancel(route, token)).await;
            drop(client);
        });
        let _ = tokio::time::timeout(CANCEL_WAIT, linger).await;
    }

    /// A connection before `deadline`; a failure names its cause.
    pub async fn checkout(&self, deadline: Deadline) -> Result<bb8::PooledConnection<'_, PgManager>, CheckoutError> {
        match deadline.run("postgres pool get", self.pool.get()).await? {
            Ok(conn) => {
                self.last_error.clear();
                Ok(conn)
            }
            Err(e) => Err(CheckoutError::Pool(self.last_error.describe(&e))),
        }
    }
}

/// Send a cancel request for `token`'s statement and wait for the other
/// side to close the request's connection (`route`: see [`cancel_route`]).
async fn send_cancel(route: Option<(String, u16)>, token: tokio_postgres::CancelToken) -> Option<()> {
    match route {
        Some((host, port)) => {
            use tokio::io::AsyncReadExt;
            let mut sock = tokio::net::TcpStream::connect((host.as_str(), port)).await.ok()?;
            token
                .cancel_query_raw(NoShutdown(&mut sock), tokio_postgres::NoTls)
                .await
                .ok()?;
            let mut buf = [0u8; 64];
            while sock.read(&mut buf).await.ok()? > 0 {}
            Some(())
        }
        None => token.cancel_query(tls::connector()).await.ok(),
    }
}

/// Where a pool's cancel requests go when they can be sent the way libpq
/// sends them (see [`Pg::cancel_statement`]): the one TCP host of a URL without TLS.
/// None: a URL with several hosts, a socket path or `sslmode`, whose
/// cancels go through tokio-postgres's own `cancel_query`.
fn cancel_route(url: &str) -> Option<(String, u16)> {
    if crate::tls::names_sslmode(url) {
        return None;
    }
    let cfg = tokio_postgres::Config::from_str(url).ok()?;
    match (cfg.get_hosts(), cfg.get_ports()) {
        ([tokio_postgres::config::Host::Tcp(host)], ports) if ports.len() <= 1 => {
            Some((host.clone(), ports.first().copied().unwrap_or(5432)))
        }
        _ => None,
    }
}

/// A stream whose shutdown does nothing: tokio-postgres half-closes a
/// cancel request's connection right after sending it, and pgbouncer 1.18
/// (Debian bookworm's) takes a client gone before it has forwarded the
/// cancel for an error and dies (`FATAL … disconnect_client(): bad client
/// state`, seen in `tests/pgbouncer.rs`), taking every client with it.
/// libpq instead waits for the other side to close; so do we.
struct NoShutdown<'a>(&'a mut tokio::net::TcpStream);

impl tokio::io::AsyncRead for NoShutdown<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for NoShutdown<'_> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// A lazily connecting pool. Broken connections are detected by
/// `Client::is_closed` on return, so no round trip is spent testing
/// a connection on every checkout.
///
/// Every pool connection is to a server that takes writes: unless the URL
/// names `target_session_attrs`, it is `read-write` (the server is asked
/// `SHOW transaction_read_only` once per new connection), so a session that
/// lands on a standby or a server set read-only is refused at connect and
/// a multi-host URL moves on to its next host.
pub fn pool(url: &str, size: u32, checkout_timeout: Duration) -> Result<Pg, DbSetupError> {
    let mut cfg = pg_config(url, checkout_timeout)?;
    if !url.contains("target_session_attrs") {
        cfg.target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
    }
    let manager = PgManager {
        per_host: hosts::per_host_timeout(&cfg, checkout_timeout),
        random: hosts::random(&cfg),
        hosts: hosts::each_host(&cfg),
    };
    let last_error = LastError::default();
    let pool = bb8::Pool::builder()
        .max_size(size)
        .connection_timeout(checkout_timeout)
        .test_on_check_out(false)
        .error_sink(Box::new(last_error.clone()))
        .build_unchecked(manager);
    Ok(Pg {
        pool,
        last_error,
        cancel_to: cancel_route(url),
    })
}
