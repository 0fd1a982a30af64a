//! Starts every actor under actix's `Supervisor` and stops them in order.
//!
//! Supervision tree (one level, one-for-one):
//! - `DispatchActor` on its own arbiter (thread): the Redis pool and pipeline;
//! - `DeadLetterActor`: dead-letter reporting;
//! - `SweepActor`: the tick, talking to the two others only through messages.
//!
//! actix's `Supervisor` restarts an actor that stops itself (error budget
//! exhausted); `restarting()` resets its state, `started()` rebuilds its pool.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use actix::prelude::*;
use slog::Logger;

use super::dead_letter::DeadLetterActor;
use super::dispatch::DispatchActor;
use super::sweep::{Stop, SweepActor, SweepSettings, SweepStats};
use crate::config::Config;
use crate::settle::RetryPolicy;

/// Handles on the running actors.
pub struct Relay {
    pub sweep: Addr<SweepActor>,
    pub dispatch: Addr<DispatchActor>,
    pub dead_letter: Addr<DeadLetterActor>,
    pub stats: Arc<SweepStats>,
    pub dead_lettered_total: Arc<AtomicU64>,
    dispatch_arbiter: Arbiter,
}

/// Start all actors. Must be called inside a running actix `System`.
pub fn start(cfg: &Config, log: &Logger) -> Relay {
    let dispatch_arbiter = Arbiter::new();
    let redis_cfg = cfg.redis.clone();
    let checkout = (cfg.sweep.tick_timeout.0 / 2).max(std::time::Duration::from_millis(5));
    let dlog = log.clone();
    let dispatch = Supervisor::start_in_arbiter(&dispatch_arbiter.handle(), move |_| {
        DispatchActor::new(redis_cfg, checkout, &dlog)
    });

    let dead_lettered_total = Arc::new(AtomicU64::new(0));
    let moved = dead_lettered_total.clone();
    let dl_log = log.clone();
    let dead_letter = Supervisor::start(move |_| DeadLetterActor::new(&dl_log, moved));

    let stats = Arc::new(SweepStats::default());
    let settings = SweepSettings {
        database_url: cfg.database.url.clone(),
        pool_size: cfg.database.pool_size,
        batch_size: cfg.sweep.batch_size,
        interval: cfg.sweep.interval.0,
        tick_timeout: cfg.sweep.tick_timeout.0,
        key_prefix: cfg.redis.key_prefix.clone(),
        retry: RetryPolicy {
            base_backoff: cfg.sweep.base_backoff.0,
            max_backoff: cfg.sweep.max_backoff.0,
            max_attempts: cfg.sweep.max_attempts,
        },
    };
    let (d, dl, st, slog_) = (
        dispatch.clone().recipient(),
        dead_letter.clone().recipient(),
        stats.clone(),
        log.clone(),
    );
    let sweep = Supervisor::start(move |_| SweepActor::new(settings, d, dl, st, &slog_));

    Relay {
        sweep,
        dispatch,
        dead_letter,
        stats,
        dead_lettered_total,
        dispatch_arbiter,
    }
}

impl Relay {
    /// Let the tick in flight finish (or roll back at its deadline), then
    /// stop the dispatch arbiter.
    pub async fn stop(self) {
        // An error means the sweep actor is already gone: nothing in flight.
        let _ = self.sweep.send(Stop).await;
        self.dispatch_arbiter.stop();
    }
}
