//! Postgres side of the relay: pools, start-up checks, migrations and the
//! outbox queries; TLS when the URL asks for it ([`tls`]).
//!
//! Every statement goes through the unnamed-statement APIs of tokio-postgres
//! (`query_typed*`, `execute_typed`, `batch_execute`, `simple_query`), never
//! `query`/`execute` with a `&str`, which PREPARE a named statement: behind
//! pgbouncer in transaction pooling mode, named statements collide across
//! processes (SQLSTATE 42P05, incident 5 of the spec).

pub mod dead_letter;
pub mod fleet;
pub mod hosts;
pub mod jobs;
pub mod listen;
pub mod migrate;
pub mod outbox;
pub mod pause;
pub mod privileges;
pub mod schema;
pub mod tls;

use std::str::FromStr;
use std::time::Duration;

use bb8_postgres::PostgresConnectionManager;
use tokio_postgres::error::SqlState;

use crate::deadline::{Deadline, Expired};
use crate::pool::{FailureKind, LastError};
use crate::redact::redact_url;

/// tokio-postgres does not tell a connect timeout apart; bb8 reports it
/// as its own timeout.
impl FailureKind for tokio_postgres::Error {
    fn is_timeout(&self) -> bool {
        false
    }

    /// With its cause: `error connecting to server: database does not
    /// allow writes` (a read-only server refused by `target_session_attrs`).
    fn text(&self) -> String {
        pg_error_text(self)
    }
}

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

/// Name the relay's sessions carry in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "outbox-relay";

/// Why Postgres could not be used at start-up.
#[derive(Debug, thiserror::Error)]
pub enum DbSetupError {
    #[error("invalid Postgres URL {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot reach Postgres at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("Postgres at {url} has no outbox schema (tables task_outbox and task_outbox_dead); run `outbox-relay migrate` first")]
    SchemaMissing { url: String },
    /// One line per thing in the tables the relay cannot work with.
    #[error("{}", .problems.iter().map(|p| format!("Postgres at {url}: {p}")).collect::<Vec<_>>().join("\n"))]
    Schema { url: String, problems: Vec<String> },
    /// One line per privilege the role lacks (README "Database roles").
    #[error("{}", .missing.iter().map(|m| format!("Postgres at {url}: {m}")).collect::<Vec<_>>().join("\n"))]
    Privileges { url: String, missing: Vec<String> },
}

/// Parse a URL into a connection config with the relay's defaults applied.
pub fn pg_config(url: &str, connect_timeout: Duration) -> Result<tokio_postgres::Config, DbSetupError> {
    let mut cfg = tokio_postgres::Config::from_str(url).map_err(|e| DbSetupError::Url {
        url: redact_url(url),
        reason: e.to_string(),
    })?;
    // TLS only where the URL asks for it (see `tls`): tokio-postgres's own
    // default would be `prefer`.
    if !crate::tls::names_sslmode(url) {
        cfg.ssl_mode(tokio_postgres::config::SslMode::Disable);
    }
    if cfg.get_application_name().is_none() {
        cfg.application_name(APPLICATION_NAME);
    }
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(connect_timeout);
    }
    // Keepalive settings the URL names win (libpq's parameter names).
    cfg.keepalives(true);
    if !url.contains("keepalives_idle") {
        cfg.keepalives_idle(crate::pool::tcp::KEEPALIVE_IDLE);
    }
    if !url.contains("keepalives_interval") {
        cfg.keepalives_interval(crate::pool::tcp::KEEPALIVE_INTERVAL);
    }
    if !url.contains("keepalives_retries") {
        cfg.keepalives_retries(crate::pool::tcp::KEEPALIVE_RETRIES);
    }
    if !url.contains("tcp_user_timeout") {
        cfg.tcp_user_timeout(crate::pool::tcp::USER_TIMEOUT);
    }
    Ok(cfg)
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

/// Open one direct connection (not pooled); the connection task runs on the
/// current runtime and ends when the client is dropped.
pub async fn connect(url: &str, timeout: Duration) -> Result<tokio_postgres::Client, DbSetupError> {
    let cfg = pg_config(url, timeout)?;
    let unreachable = |reason: String| DbSetupError::Unreachable {
        url: redact_url(url),
        reason,
    };
    // Each host bounded as a whole (see `hosts`): a frozen first host
    // does not keep a start-up from the next.
    let (client, connection) = hosts::connect(&cfg, tls::connector(), timeout)
        .await
        .map_err(unreachable)?;
    tokio::spawn(async move {
        // The connection ends with an error when the server goes away; the
        // client's next call reports it, so there is nothing to add here.
        let _ = connection.await;
    });
    Ok(client)
}

/// Check that Postgres answers and that the outbox tables exist and have
/// a shape the relay can work with; returns that shape.
pub async fn check_ready(url: &str, timeout: Duration) -> Result<schema::Schema, DbSetupError> {
    connect_ready(url, timeout).await.map(|(_, schema)| schema)
}

/// A direct connection to a database that has the outbox schema, and the
/// shape of its tables (UUID or TEXT ids, see [`schema`]).
pub async fn connect_ready(
    url: &str,
    timeout: Duration,
) -> Result<(tokio_postgres::Client, schema::Schema), DbSetupError> {
    let client = connect(url, timeout).await?;
    let row = client
        .query_typed_one(
            "SELECT to_regclass('task_outbox') IS NOT NULL AND to_regclass('task_outbox_dead') IS NOT NULL",
            &[],
        )
        .await
        .map_err(|e| DbSetupError::Unreachable {
            url: redact_url(url),
            reason: pg_error_text(&e),
        })?;
    if !row.get::<_, bool>(0) {
        return Err(DbSetupError::SchemaMissing { url: redact_url(url) });
    }
    match schema::read(&client).await {
        Ok(schema) => Ok((client, schema)),
        Err(problems) => Err(DbSetupError::Schema {
            url: redact_url(url),
            problems,
        }),
    }
}

/// Check that the role of `url` holds every privilege in `needs`. Missing
/// required ones are an error listing each; missing optional ones are
/// returned for a warning.
pub async fn check_privileges(
    url: &str,
    needs: &[privileges::Need],
    timeout: Duration,
) -> Result<Vec<privileges::Missing>, DbSetupError> {
    let client = connect(url, timeout).await?;
    let missing = privileges::missing(&client, needs)
        .await
        .map_err(|e| DbSetupError::Unreachable {
            url: redact_url(url),
            reason: e.text(),
        })?;
    if missing.iter().any(|m| m.need.required) {
        return Err(DbSetupError::Privileges {
            url: redact_url(url),
            missing: missing.iter().map(ToString::to_string).collect(),
        });
    }
    Ok(missing)
}

/// A readable one-line description of a Postgres error: the server's message
/// and SQLSTATE when there is one, else the client error and its causes.
pub fn pg_error_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// The server takes no writes (SQLSTATE 25006): a standby, or a server
/// or role set `default_transaction_read_only` while the session was open.
/// The server's fault, never a row's: the session must be replaced.
pub fn is_read_only(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION)
}

/// The connection is gone: closed socket, or the server ended the session
/// (`pg_terminate_backend` 57P01, crash 57P02, restart 57P03).
pub fn is_connection_lost(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || matches!(
            e.code(),
            Some(c) if *c == SqlState::ADMIN_SHUTDOWN || *c == SqlState::CRASH_SHUTDOWN || *c == SqlState::CANNOT_CONNECT_NOW
        )
}

/// A column that did not hold what the relay reads from it (NULL where a
/// value is needed, another type than expected): the tables are the
/// producers' and the operators', so this is external data and an error
/// naming the table and column, never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{table}.{column}: {reason}")]
pub struct ColumnError {
    pub table: &'static str,
    pub column: String,
    pub reason: String,
}

/// Column `idx` of a row read from `table`, or why it cannot be read as `T`.
pub fn column<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    table: &'static str,
    idx: usize,
) -> Result<T, ColumnError> {
    row.try_get(idx).map_err(|e| ColumnError {
        table,
        column: row
            .columns()
            .get(idx)
            .map_or_else(|| format!("#{idx}"), |c| c.name().to_string()),
        // tokio-postgres says "error deserializing column N"; the cause
        // ("unexpected null", "cannot convert between …") is its source.
        reason: std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string()),
    })
}

/// A statement failed, or its result had a column the relay cannot read.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Pg(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Column(#[from] ColumnError),
}

impl QueryError {
    /// One line for a log or an error message.
    pub fn text(&self) -> String {
        match self {
            QueryError::Pg(e) => pg_error_text(e),
            QueryError::Column(e) => e.to_string(),
        }
    }
}

/// `statement_timeout` (or a cancel) ended the statement: SQLSTATE 57014.
pub fn is_statement_timeout(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::QUERY_CANCELED)
}
