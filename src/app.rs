//! The run loop of `outbox-relay run`: check both services, start the HTTP
//! endpoint and the actor tree, wait for a signal (or for the supervisor to
//! give up), then stop in order. Must run inside an actix `System`.
//!
//! `--progress` adds one line a second (rows left, rows/s, dead letters),
//! read from the sweep's shared counters and a count query of its own.

use std::sync::atomic::Ordering;
use std::time::Duration;

use slog::{info, warn, Logger};

use crate::config::Config;
use crate::deadline::STARTUP_TIMEOUT;
use crate::redact::redact_url;
use crate::{actors, db, http, telemetry};

/// Anything that stops `run` from starting or makes it end early.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Database(#[from] db::DbSetupError),
    #[error(transparent)]
    Redis(#[from] crate::redis::RedisSetupError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Http(#[from] http::HttpError),
    #[error(transparent)]
    Metrics(#[from] telemetry::metrics::MetricsError),
    #[error("{actor} kept failing (restart intensity exceeded); last error: {error}")]
    GaveUp { actor: &'static str, error: String },
    #[error(transparent)]
    Console(#[from] crate::console::ConsoleSetupError),
    #[error("{0}")]
    Usage(String),
}

/// Options of `outbox-relay run` that are not configuration.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Log a progress line every second (rows left, rows/s, dead letters).
    pub progress: bool,
}

/// Check both services, start the actors, run until SIGTERM/SIGINT, then
/// let the tick in flight finish and return. Must run inside an actix `System`.
pub async fn run(cfg: Config, log: Logger, opts: RunOptions) -> Result<(), RunError> {
    let mut sigterm =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(RunError::Signals)?;
    let schema = db::check_ready(&cfg.database.url, STARTUP_TIMEOUT).await?;
    for m in db::check_privileges(&cfg.database.url, db::privileges::RUN, STARTUP_TIMEOUT).await? {
        warn!(log, "missing a privilege"; "problem" => m.to_string());
    }
    if cfg.journal.on() {
        db::check_journal(&cfg.database.url, STARTUP_TIMEOUT).await?;
    }
    crate::redis::ping(&cfg.redis, STARTUP_TIMEOUT).await?;
    for m in crate::redis::check_permissions(&cfg.redis, STARTUP_TIMEOUT).await? {
        warn!(log, "missing a Redis permission"; "problem" => m.to_string());
    }
    if let Some(risk) = crate::redis::durability_risk(&cfg.redis, STARTUP_TIMEOUT).await {
        if cfg.journal.on() {
            info!(log, "redis may lose delivered entries on a restart; the delivery journal writes them again";
                "risk" => risk, "journal_keep" => crate::config::format_duration(cfg.journal.keep.0));
        } else {
            warn!(log, "redis may lose delivered entries on a restart; set journal.keep so the relay can write them again (docs/journal.md)";
                "risk" => risk);
        }
    }
    info!(log, "outbox-relay starting";
        "version" => env!("CARGO_PKG_VERSION"),
        "database" => redact_url(&cfg.database.url),
        "redis" => crate::redis::Redis::describe(&cfg.redis),
        "key_prefix" => &cfg.redis.key_prefix,
        "listen" => cfg.database.listen_target().map_or_else(|| "off".to_string(), redact_url),
        "batch_size" => cfg.sweep.batch_size,
        "schema" => schema.describe(),
        "tick_timeout_ms" => cfg.sweep.tick_timeout.0.as_millis() as u64);
    if let db::schema::ClaimMode::Lock(why) = &schema.claim {
        warn!(log, "claiming with SELECT … FOR UPDATE and a separate DELETE, at roughly half the Postgres throughput of the delete claim";
            "why" => why.as_str());
    }

    let healths = actors::tree::Healths::new(&cfg);
    let metrics = telemetry::metrics::Metrics::new(&cfg.metrics)?;
    let http = http::start(&cfg.http.listen, healths.all(), metrics.clone())?;
    let console = if cfg.console.listen.is_empty() {
        None
    } else {
        let c = crate::console::build(&cfg, metrics.registry(), &log).await?;
        Some(crate::console::start(&cfg.console.listen, c)?)
    };
    let (relay, mut fatal) = actors::tree::start(&cfg, &schema, &healths, &metrics, &log);
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
            if let Some(c) = console {
                c.stop(true).await;
            }
            info!(log, "outbox-relay stopped";
                "dispatched" => stats.dispatched.load(Ordering::Relaxed),
                "retried" => stats.retried.load(Ordering::Relaxed),
                "dead_lettered" => stats.dead_lettered.load(Ordering::Relaxed));
            Ok(())
        }
        Err(gave_up) => {
            relay.stop(&log).await;
            http.stop(false).await;
            if let Some(c) = console {
                c.stop(false).await;
            }
            Err(match gave_up {
                Some(g) => RunError::GaveUp {
                    actor: g.actor,
                    error: g.error,
                },
                None => RunError::GaveUp {
                    actor: "supervisor",
                    error: "supervision channel closed".into(),
                },
            })
        }
    }
}

/// `outbox-relay console`: the console and its API alone, with `/metrics`
/// (the console's counters) on `http.listen`, until SIGTERM or SIGINT.
pub async fn console_only(mut cfg: Config, log: Logger) -> Result<(), RunError> {
    let mut sigterm =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(RunError::Signals)?;
    if cfg.console.listen.is_empty() {
        cfg.console.listen = crate::config::DEFAULT_CONSOLE_LISTEN.to_string();
    }
    if cfg.console.listen == cfg.http.listen {
        return Err(RunError::Usage(format!(
            "console.listen and http.listen are both {}; give the console its own port",
            cfg.http.listen
        )));
    }
    let registry = prometheus::Registry::new();
    let console = crate::console::build(&cfg, &registry, &log).await?;
    let server = crate::console::start(&cfg.console.listen, console)?;
    let metrics_server = http::start_metrics_only(&cfg.http.listen, registry)?;
    info!(log, "outbox-relay console started (no sweeping)";
        "version" => env!("CARGO_PKG_VERSION"),
        "database" => redact_url(cfg.console.database_url(&cfg.database)),
        "listen" => &cfg.console.listen, "metrics" => &cfg.http.listen);
    let signal = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    };
    info!(log, "shutdown requested"; "signal" => signal);
    server.stop(true).await;
    metrics_server.stop(true).await;
    Ok(())
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
            Some(c) => tokio::time::timeout(
                Duration::from_secs(1),
                c.query_typed_one("SELECT count(*) FROM task_outbox WHERE run_at <= now()", &[]),
            )
            .await
            .ok()
            .and_then(Result::ok)
            .and_then(|r| db::column::<i64>(&r, "task_outbox", 0).ok()),
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
