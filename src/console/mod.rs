//! The browser console: the fleet, the backlog, the lag and the dead
//! letters, and the actions an on-call operator takes on them (README
//! "Console", SECURITY.md).
//!
//! Served by `run` when `console.listen` is set, or alone by `outbox-relay
//! console`. Pages are rendered on the server (maud, checked at compile
//! time) and work with JavaScript off; there is no script at all, and the
//! one stylesheet is embedded in the binary. Every page's data is also a
//! JSON endpoint under `/api/v1/` with the same roles.
//!
//! Safety:
//! - No action without a signed-in operator (`auth`); viewers see every
//!   page and no action, and get 403 on a forged one. `console.read_only`
//!   hides and refuses every action. Without users the console only
//!   listens on a loopback address, read-only (config validation).
//! - A state-changing form must carry the session's CSRF token and come
//!   from the same origin (`Origin`, else `Referer`); the API takes a
//!   session with `X-CSRF-Token`, or HTTP Basic with a JSON body (which a
//!   cross-site form cannot send).
//! - Headers on every answer: a CSP without inline script,
//!   `frame-ancestors 'none'`, `nosniff`, referrers only to itself, no
//!   caching, and HSTS with `secure_cookie`. An anonymous console answers
//!   only requests whose `Host` is a loopback name (DNS rebinding).
//! - No link or form action is built from data (`paths`); bodies are read
//!   under a deadline and parsed strictly (`body`); bulk actions carry
//!   what was confirmed, and every action is audited before and after it
//!   runs (`actions`). SECURITY.md has the threat table.
//!
//! Layout: `routes` → `pages`, `api`, `signin` → `actions`, `load`,
//! `identity` → `views`, `respond`, `body`, `paths`, `auth`, `data`; each
//! file imports only from those after it.
//! - Its own small Postgres pool; every read under
//!   `console.statement_timeout` (cancelled on the server when it passes);
//!   no read scans `task_outbox` (`data`).

mod actions;
mod api;
pub mod auth;
mod body;
pub mod chart;
pub mod data;
mod identity;
mod load;
mod pages;
pub mod paths;
mod respond;
mod routes;
mod signin;
mod views;

use std::sync::Arc;
use std::time::Duration;

use actix_web::{middleware::DefaultHeaders, web, App, HttpServer};
use prometheus::{IntCounterVec, Opts, Registry};
use slog::{info, warn, Logger};
use tokio_postgres::Client;

use crate::config::{Config, RedisConfig};
use crate::db::schema::Schema;
use crate::db::{self, Pg, QueryError};
use crate::deadline::{Deadline, STARTUP_TIMEOUT};
use crate::redis::DirectConn;

/// Why the console could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleSetupError {
    #[error("cannot listen on console.listen {listen}: {source}")]
    Listen { listen: String, source: std::io::Error },
    #[error("console.users_file: {0}")]
    Users(#[from] auth::UsersError),
    #[error(transparent)]
    Database(#[from] db::DbSetupError),
    #[error("console metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("console.trusted_proxies: {0}")]
    Proxies(String),
}

/// Why one request could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("postgres: {0}")]
    Postgres(String),
    #[error("redis: {0}")]
    Redis(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// What was confirmed no longer holds (409; nothing changed).
    #[error("{0}")]
    Conflict(String),
}

impl From<QueryError> for ConsoleError {
    fn from(e: QueryError) -> Self {
        ConsoleError::Postgres(e.text())
    }
}

impl From<db::dead_letter::DeadLetterError> for ConsoleError {
    fn from(e: db::dead_letter::DeadLetterError) -> Self {
        ConsoleError::Postgres(e.to_string())
    }
}

/// The console's counters.
#[derive(Clone)]
pub struct ConsoleMetrics {
    /// Actions by name and result (`ok`, `error`, `forbidden`).
    pub actions: IntCounterVec,
    /// Sign-ins by result (`ok`, `failed`, `limited`, `busy`).
    pub logins: IntCounterVec,
    /// Sign-ins held back because their name had many failures.
    pub login_delays: prometheus::IntCounter,
}

impl ConsoleMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let actions = IntCounterVec::new(
            Opts::new(
                "outbox_relay_console_actions_total",
                "Console actions (pause, resume, cancel, requeue, purge, requeue_set_aside), by result: ok, error (failed, or ended, while acting), forbidden (refused for the role, read_only, CSRF or origin).",
            ),
            &["action", "result"],
        )?;
        let logins = IntCounterVec::new(
            Opts::new(
                "outbox_relay_console_logins_total",
                "Console sign-ins by result: ok, failed (wrong name or password), limited (refused by the failed-login limit of the client's address), busy (no password check could start within 10 s).",
            ),
            &["result"],
        )?;
        let login_delays = prometheus::IntCounter::new(
            "outbox_relay_console_login_delays_total",
            "Console sign-ins held back (up to 4 s) because their user name had many recent failures; they are also counted by result.",
        )?;
        registry.register(Box::new(actions.clone()))?;
        registry.register(Box::new(logins.clone()))?;
        registry.register(Box::new(login_delays.clone()))?;
        Ok(ConsoleMetrics {
            actions,
            logins,
            login_delays,
        })
    }
}

/// Everything a request handler reads.
pub struct Console {
    pub(crate) pg: Pg,
    pub(crate) pg_url: String,
    pub(crate) schema: Schema,
    pub(crate) redis_cfg: RedisConfig,
    redis: tokio::sync::Mutex<Option<DirectConn>>,
    pub(crate) users: Vec<auth::User>,
    pub(crate) sessions: auth::Sessions,
    pub(crate) limiter: auth::Limiter,
    pub(crate) hasher: auth::Hasher,
    pub(crate) credentials: auth::CredentialCache,
    pub(crate) trusted_proxies: Vec<crate::netaddr::IpRange>,
    pub(crate) read_only: bool,
    pub(crate) secure_cookie: bool,
    pub(crate) timeout: Duration,
    /// A relay unseen for this long is shown stale (3 heartbeats).
    pub(crate) stale_after: Duration,
    pub(crate) metrics: ConsoleMetrics,
    pub(crate) log: Logger,
}

/// How long an action may go without a batch answered before it is ended
/// as failed: a Postgres that hangs (frozen, partitioned) answers nothing
/// and enforces no statement timeout. A batch (500 rows) is not limited
/// otherwise: a slow one (triggers, locks) is no fault.
pub(crate) const ACTION_STALL: std::time::Duration = std::time::Duration::from_secs(60);

impl Console {
    /// Without users nobody signs in: everyone is a viewer (loopback only).
    pub(crate) fn anonymous(&self) -> bool {
        self.users.is_empty()
    }

    /// Run `f` on a pooled connection under `console.statement_timeout`;
    /// past it the statement is cancelled on the server and the
    /// connection dropped.
    pub(crate) async fn read<T>(
        &self,
        f: impl AsyncFnOnce(&Client) -> Result<T, ConsoleError>,
    ) -> Result<T, ConsoleError> {
        let deadline = Deadline::after(self.timeout);
        let mut conn = self
            .pg
            .checkout(deadline)
            .await
            .map_err(|e| ConsoleError::Postgres(e.to_string()))?;
        let outcome = deadline.run("console query", f(&conn)).await;
        match outcome {
            Ok(r) => r,
            Err(expired) => {
                self.pg.cancel_statement(&mut conn).await;
                Err(ConsoleError::Postgres(format!(
                    "{expired} (console.statement_timeout {:?})",
                    self.timeout
                )))
            }
        }
    }

    /// A connection of its own for an action (they may run many batches,
    /// each as long as it needs: see [`ACTION_STALL`] for a server that
    /// answers nothing).
    pub(crate) async fn action_client(&self) -> Result<Client, ConsoleError> {
        db::connect(&self.pg_url, STARTUP_TIMEOUT)
            .await
            .map_err(|e| ConsoleError::Postgres(e.to_string()))
    }

    /// The shared Redis connection, opened on first use and after an error.
    pub(crate) async fn redis(&self) -> Result<DirectConn, ConsoleError> {
        let mut slot = self.redis.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = crate::redis::connect_config(&self.redis_cfg, self.timeout)
            .await
            .map_err(|e| ConsoleError::Redis(e.to_string()))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Forget the Redis connection after an error (the next use reconnects).
    pub(crate) async fn redis_failed(&self) {
        *self.redis.lock().await = None;
    }
}

/// Build the console from the configuration: users, its own pool, the
/// schema (read once), its counters in `registry`.
pub async fn build(cfg: &Config, registry: &Registry, log: &Logger) -> Result<Arc<Console>, ConsoleSetupError> {
    let users = auth::read_users(&cfg.console.users_file)?;
    let url = cfg.console.database_url(&cfg.database).to_string();
    let schema = db::check_ready(&url, STARTUP_TIMEOUT).await?;
    let pg = db::pool(&url, cfg.console.pool_size, cfg.console.statement_timeout.0)?;
    if users.is_empty() {
        warn!(log, "console has no users (console.users_file): every visitor is a viewer and no action is possible; it listens on loopback only");
    }
    let trusted_proxies = cfg
        .console
        .trusted_proxies
        .iter()
        .map(|p| crate::netaddr::IpRange::parse(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(ConsoleSetupError::Proxies)?;
    Ok(Arc::new(Console {
        pg,
        pg_url: url,
        schema,
        redis_cfg: cfg.console.redis(&cfg.redis),
        redis: tokio::sync::Mutex::new(None),
        users,
        sessions: auth::Sessions::new(cfg.console.session_ttl.0, cfg.console.idle_timeout.0),
        limiter: auth::Limiter::default(),
        hasher: auth::Hasher::default(),
        credentials: auth::CredentialCache::default(),
        trusted_proxies,
        read_only: cfg.console.read_only,
        secure_cookie: cfg.console.secure_cookie,
        timeout: cfg.console.statement_timeout.0,
        stale_after: cfg.health.interval.0 * 3,
        metrics: ConsoleMetrics::new(registry)?,
        log: log.new(slog::o!("component" => "console")),
    }))
}

/// The headers every answer carries; HSTS when the console is served
/// over TLS (`secure_cookie`).
fn security_headers(secure: bool) -> DefaultHeaders {
    let headers = if secure {
        DefaultHeaders::new().add(("Strict-Transport-Security", "max-age=31536000"))
    } else {
        DefaultHeaders::new()
    };
    headers
        .add((
            "Content-Security-Policy",
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ))
        .add(("X-Content-Type-Options", "nosniff"))
        .add(("X-Frame-Options", "DENY"))
        // Not `no-referrer`: with it a browser sends `Origin: null` on a
        // form POST, and the same-origin check could not tell.
        .add(("Referrer-Policy", "same-origin"))
        .add(("Cache-Control", "no-store"))
        .add(("Cross-Origin-Opener-Policy", "same-origin"))
}

/// An anonymous console (no users, loopback only) answers a request only
/// when its `Host` names a loopback address or `localhost`: a web page
/// whose DNS name was re-pointed at 127.0.0.1 (DNS rebinding) sends its
/// own name, and is refused before any page is read.
fn host_refused(anonymous: bool, req: &actix_web::dev::ServiceRequest) -> bool {
    anonymous
        && !req
            .headers()
            .get(actix_web::http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .is_some_and(crate::netaddr::loopback_host)
}

/// Serve the console on `listen` in the background; the handle stops it.
pub fn start(listen: &str, console: Arc<Console>) -> Result<actix_web::dev::ServerHandle, ConsoleSetupError> {
    use actix_web::dev::Service;
    use futures_util::future::{ready, Either, FutureExt};
    let log = console.log.clone();
    let (anonymous, secure) = (console.anonymous(), console.secure_cookie);
    let data = web::Data::from(console);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .wrap(security_headers(secure))
            .wrap_fn(move |req, srv| {
                if host_refused(anonymous, &req) {
                    let refused = actix_web::HttpResponse::MisdirectedRequest()
                        .content_type("text/plain; charset=utf-8")
                        .body(
                            "this console without users answers only to a loopback Host (localhost, 127.0.0.1, [::1])",
                        );
                    Either::Left(ready(Ok(req.into_response(refused).map_into_right_body())))
                } else {
                    Either::Right(srv.call(req).map(|r| r.map(|r| r.map_into_left_body())))
                }
            })
            .configure(routes::routes)
    });
    let handle = crate::http::serve(server, listen, 256).map_err(|source| ConsoleSetupError::Listen {
        listen: listen.to_string(),
        source,
    })?;
    info!(log, "console listening"; "listen" => listen);
    Ok(handle)
}
