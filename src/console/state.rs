//! The console's shared state: [`Console`], what every request handler
//! reads (its pool, Redis connection, users, sessions, settings), its
//! counters ([`ConsoleMetrics`]), and [`build`], which makes it from the
//! configuration.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounterVec, Opts, Registry};
use slog::{warn, Logger};
use tokio_postgres::Client;

use super::auth;
use super::error::{ConsoleError, ConsoleSetupError};
use crate::config::{Config, RedisConfig};
use crate::db::schema::Schema;
use crate::db::{self, Pg};
use crate::deadline::{Deadline, STARTUP_TIMEOUT};
use crate::redis::DirectConn;
use crate::telemetry::catalogue::{find, Kind, CONSOLE_CATALOGUE};

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
        // Every console metric is a counter: its entry must say so.
        let def = |name: &str| match find(CONSOLE_CATALOGUE, name) {
            Some(d) if d.kind == Kind::Counter => Ok(d),
            _ => Err(prometheus::Error::Msg(format!(
                "{name} is not a counter in the console's metrics catalogue"
            ))),
        };
        let vec = |name: &str| {
            let d = def(name)?;
            IntCounterVec::new(Opts::new(d.name, d.help), d.labels)
        };
        let actions = vec("outbox_relay_console_actions_total")?;
        let logins = vec("outbox_relay_console_logins_total")?;
        let d = def("outbox_relay_console_login_delays_total")?;
        let login_delays = prometheus::IntCounter::new(d.name, d.help)?;
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
    /// `[journal]`: what the reconcile action runs with.
    pub(crate) journal: crate::config::JournalConfig,
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
        journal: cfg.journal.clone(),
        metrics: ConsoleMetrics::new(registry)?,
        log: log.new(slog::o!("component" => "console")),
    }))
}
