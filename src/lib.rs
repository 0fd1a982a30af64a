//! outbox-relay: drains a Postgres transactional outbox (`task_outbox`) into
//! Redis schedules (`{prefix}sched:{job_id}`), settling every row on its own:
//! delivered rows are deleted, failed rows retried with backoff, hopeless
//! rows moved to `task_outbox_dead`. See `README.md` and the spec.
//!
//! `main.rs` only parses the command line; everything else lives here:
//! [`config`], [`db`] (Postgres), [`redis`] (Redis), [`settle`] (the pure
//! settlement rules), [`actors`] (the actor layer), [`telemetry`] and
//! [`cli`] (one function per subcommand).

pub mod actors;
pub mod cli;
pub mod config;
pub mod db;
pub mod deadline;
pub mod domain;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod http;
pub mod pool;
pub mod redact;
pub mod redis;
pub mod telemetry;
pub mod tls;
pub mod verify;

use std::sync::atomic::Ordering;
use std::time::Duration;

use slog::{info, warn, Logger};

use crate::config::Config;
use crate::redact::redact_url;

/// Anything that stops the relay from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Database(#[from] db::DbSetupError),
    #[error(transparent)]
    Redis(#[from] crate::redis::RedisSetupError),
    #[error(transparent)]
    Migrate(#[from] db::migrate::MigrateError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Http(#[from] http::HttpError),
    #[error(transparent)]
    Metrics(#[from] telemetry::metrics::MetricsError),
    #[error(transparent)]
    Triage(#[from] cli::dead_letter::TriageError),
    #[error(transparent)]
    Jobs(#[from] cli::jobs::JobsError),
    #[error(transparent)]
    Verify(#[from] verify::VerifyError),
    #[error(transparent)]
    Bench(#[from] cli::bench::BenchError),
    #[error("invariant violated: {0}")]
    Invariant(String),
    #[error("{actor} kept failing (restart intensity exceeded); last error: {error}")]
    GaveUp { actor: &'static str, error: String },
}

/// How long start-up checks may wait for a service.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Options of `outbox-relay run` that are not configuration.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Log a progress line every second (rows left, rows/s, dead letters).
    pub progress: bool,
}

/// Check both services, start the actors, run until SIGTERM/SIGINT, then
/// let the tick in flight finish and return. Must run inside an actix `System`.
pub async fn run(cfg: Config, log: Logger, opts: RunOptions) -> Result<(), RelayError> {
    let mut sigterm =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(RelayError::Signals)?;
    db::check_ready(&cfg.database.url, STARTUP_TIMEOUT).await?;
    crate::redis::ping(&cfg.redis, STARTUP_TIMEOUT).await?;
    info!(log, "outbox-relay starting";
        "version" => env!("CARGO_PKG_VERSION"),
        "database" => redact_url(&cfg.database.url),
        "redis" => redact_url(&cfg.redis.url),
        "key_prefix" => &cfg.redis.key_prefix,
        "batch_size" => cfg.sweep.batch_size,
        "tick_timeout_ms" => cfg.sweep.tick_timeout.0.as_millis() as u64);

    let healths = actors::supervisor::Healths::new(&cfg);
    let metrics = telemetry::metrics::Metrics::new(&cfg.metrics)?;
    let http = http::start(&cfg.http.listen, healths.all(), metrics.clone())?;
    let (relay, mut fatal) = actors::supervisor::start(&cfg, &healths, &metrics, &log);
    let progress = if opts.progress {
        Some(actix_rt::spawn(progress_lines(
            cfg.database.url.clone(),
            relay.stats.clone(),
            relay.dead_lettered_total.clone(),
            log.clone(),
        )))
    } else {
        None
    };

    let outcome = tokio::select! {
        _ = sigterm.recv() => Ok("SIGTERM"),
        _ = tokio::signal::ctrl_c() => Ok("SIGINT"),
        gave_up = fatal.recv() => Err(gave_up),
    };
    if let Some(p) = progress {
        p.abort();
    }
    let stats = relay.stats.clone();
    match outcome {
        Ok(signal) => {
            info!(log, "shutdown requested; finishing the tick in flight"; "signal" => signal);
            relay.stop(&log).await;
            http.stop(true).await;
            info!(log, "outbox-relay stopped";
                "dispatched" => stats.dispatched.load(Ordering::Relaxed),
                "retried" => stats.retried.load(Ordering::Relaxed),
                "dead_lettered" => stats.dead_lettered.load(Ordering::Relaxed));
            Ok(())
        }
        Err(gave_up) => {
            relay.stop(&log).await;
            http.stop(false).await;
            Err(match gave_up {
                Some(g) => RelayError::GaveUp {
                    actor: g.actor,
                    error: g.error,
                },
                None => RelayError::GaveUp {
                    actor: "supervisor",
                    error: "supervision channel closed".into(),
                },
            })
        }
    }
}

/// One line a second: rows still due, delivery rate, dead letters.
async fn progress_lines(
    url: String,
    stats: std::sync::Arc<actors::sweep::SweepStats>,
    dead: std::sync::Arc<std::sync::atomic::AtomicU64>,
    log: Logger,
) {
    let mut client = None;
    let mut last = stats.dispatched.load(Ordering::Relaxed);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    loop {
        ticker.tick().await;
        if client.as_ref().is_none_or(|c: &tokio_postgres::Client| c.is_closed()) {
            client = db::connect(&url, STARTUP_TIMEOUT).await.ok();
        }
        let now = stats.dispatched.load(Ordering::Relaxed);
        let rate = now - last;
        last = now;
        let left = match &client {
            Some(c) => c
                .query_typed_one("SELECT count(*) FROM task_outbox WHERE run_at <= now()", &[])
                .await
                .map(|r| r.get::<_, i64>(0))
                .ok(),
            None => None,
        };
        match left {
            Some(left) => info!(log, "progress";
                "rows_left" => left, "rows_per_sec" => rate, "dispatched" => now,
                "dead_letters" => dead.load(Ordering::Relaxed)),
            None => warn!(log, "progress: cannot count the outbox";
                "rows_per_sec" => rate, "dispatched" => now),
        }
    }
}
