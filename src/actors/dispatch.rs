//! `DispatchActor`: owns the Redis pool and runs the pipelined ZADD.
//!
//! Accepts [`DispatchBatch`] and answers with one [`EntryOutcome`] per entry
//! (or a [`DispatchError`] when Redis gave no usable reply). A batch whose
//! deadline has already passed when it is picked up is dropped unexecuted.
//! The pool is built in `started`, so a supervised restart gets fresh
//! connections. It runs on its own arbiter (thread) so that pipeline I/O and
//! reply parsing overlap with the sweep's Postgres work.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use slog::{debug, error, Logger};

use crate::config::RedisConfig;
use crate::deadline::{Deadline, Expired};
use crate::redis::pipeline::{zadd_batch, DispatchError, EntryOutcome, ScheduleEntry};
use crate::redis::{self as rds, Redis};

/// Send these ZADDs in one pipeline before `deadline`.
#[derive(Message)]
#[rtype(result = "Result<Vec<EntryOutcome>, DispatchError>")]
pub struct DispatchBatch {
    pub entries: Vec<ScheduleEntry>,
    pub deadline: Deadline,
}

pub struct DispatchActor {
    cfg: RedisConfig,
    /// How long a pool checkout may wait: shorter than the tick, so that an
    /// unreachable Redis is reported as such (with its cause) while the tick
    /// still has time to settle what it can.
    checkout_timeout: Duration,
    log: Logger,
    pool: Option<Redis>,
    /// Batches dropped because they arrived after their deadline.
    pub expired: Arc<AtomicU64>,
}

impl DispatchActor {
    pub fn new(cfg: RedisConfig, checkout_timeout: Duration, log: &Logger) -> Self {
        DispatchActor {
            cfg,
            checkout_timeout,
            log: log.new(slog::o!("actor" => "DispatchActor")),
            pool: None,
            expired: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Actor for DispatchActor {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Self::Context) {
        match rds::pool(&self.cfg, self.checkout_timeout) {
            Ok(pool) => self.pool = Some(pool),
            // The URL was validated at start-up; this only guards the impossible.
            Err(e) => error!(self.log, "cannot build the Redis pool"; "error" => %e),
        }
    }
}

impl Supervised for DispatchActor {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.pool = None;
    }
}

impl Handler<DispatchBatch> for DispatchActor {
    type Result = ResponseFuture<Result<Vec<EntryOutcome>, DispatchError>>;

    fn handle(&mut self, msg: DispatchBatch, _ctx: &mut Self::Context) -> Self::Result {
        if msg.deadline.expired() {
            self.expired.fetch_add(1, Ordering::Relaxed);
            debug!(self.log, "batch arrived after its deadline; dropped unexecuted"; "entries" => msg.entries.len());
            return Box::pin(async {
                Err(DispatchError::Deadline(Expired {
                    stage: "dispatch mailbox",
                }))
            });
        }
        let Some(pool) = self.pool.clone() else {
            return Box::pin(async { Err(DispatchError::Unavailable("no Redis pool".into())) });
        };
        let wait_replicas = self.cfg.wait_replicas;
        Box::pin(async move { zadd_batch(&pool, &msg.entries, wait_replicas, msg.deadline).await })
    }
}
