//! `DispatchActor`: owns the Redis pool and runs the pipelined ZADD.
//!
//! Accepts [`DispatchBatch`] and answers with one [`EntryOutcome`] per entry
//! (or a [`DispatchError`] when Redis gave no usable reply). A batch whose
//! deadline has already passed when it is picked up is dropped unexecuted
//! and counted. When it has sent nothing for `health.interval` it pings
//! Redis, so its health tells the truth on an idle relay too.
//!
//! Runs on its own arbiter (thread) so pipeline I/O overlaps with the
//! sweep's Postgres work. Failure: a panic, or `supervisor.error_budget`
//! consecutive failures ending in a stall (no answer before the deadline),
//! make the actor fail; the supervisor restarts it after a backoff, and
//! `started` builds a new pool (new connections). A Redis that refuses
//! connections only makes it `degraded`: its pool reconnects by itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use slog::{info, warn, Logger};

use super::lifecycle::{
    contain, fail, fail_dependency, fault_point, guarded, interval, run_contained, wedge_point, Core, Lifecycle, Mode,
};
use super::supervisor::Supervision;
use crate::config::RedisConfig;
use crate::deadline::{Deadline, Expired};
use crate::domain::{EntryOutcome, NodeMark, ScheduleEntry};
use crate::redis::memory::{entry_cost, InfoError, MemoryGate, Transition};
use crate::redis::pipeline::{ping, zadd_batch, BatchOutcome, DispatchError};
use crate::redis::{self as rds, Redis};
use crate::telemetry::health::ActorHealth;
use crate::telemetry::metrics::Metrics;

/// Send these ZADDs in one pipeline before `deadline`; with `mark`, learn
/// which node acknowledged them (for the delivery journal).
#[derive(Message)]
#[rtype(result = "Result<Dispatched, DispatchError>")]
pub struct DispatchBatch {
    pub entries: Vec<ScheduleEntry>,
    pub deadline: Deadline,
    pub mark: bool,
}

/// A batch's answer: one outcome per entry, in order, and the node that
/// acknowledged them when it was asked and could be told.
#[derive(Debug, Clone, Default)]
pub struct Dispatched {
    pub outcomes: Vec<EntryOutcome>,
    pub node: Option<NodeMark>,
}

#[derive(Debug, Clone)]
pub struct DispatchSettings {
    pub redis: RedisConfig,
    /// Ping Redis when nothing was sent for this long.
    pub ping_interval: Duration,
    /// Upper bound of a pool checkout (each batch's deadline is usually shorter).
    pub checkout_timeout: Duration,
    pub error_budget: u32,
}

pub struct DispatchActor {
    settings: DispatchSettings,
    core: Core,
    metrics: Metrics,
    pool: Option<Redis>,
    last_activity: Instant,
    ping_in_flight: bool,
    /// A WAIT shortfall / an unreachable cluster node was reported and has not cleared.
    wait_short: bool,
    nodes_unreachable: bool,
    /// Memory back-pressure (survives restarts with the actor struct).
    memory: Arc<MemoryGate>,
}

impl DispatchActor {
    pub fn new(
        settings: DispatchSettings,
        health: Arc<ActorHealth>,
        supervision: Supervision,
        metrics: Metrics,
        log: &Logger,
    ) -> Self {
        let memory = Arc::new(MemoryGate::new(settings.redis.max_memory_ratio));
        DispatchActor {
            core: Core::new(health, supervision, settings.error_budget, log),
            settings,
            metrics,
            pool: None,
            last_activity: Instant::now(),
            ping_in_flight: false,
            wait_short: false,
            nodes_unreachable: false,
            memory,
        }
    }

    /// Record the outcome of one unit of work (a batch or a ping).
    fn record(&mut self, result: Result<(), &DispatchError>, ctx: &mut Context<Self>) {
        self.last_activity = Instant::now();
        if let Some(redis) = &self.pool {
            self.metrics.observe_pool("redis", redis.pool.state());
        }
        match result {
            Ok(()) => self.core.health.ok(),
            Err(e) => {
                let stalled = matches!(e, DispatchError::Deadline(_));
                let streak = self.core.failed(&e.to_string(), stalled);
                // A Redis that refuses connections makes the actor degraded,
                // not failed: the pool reconnects by itself, a restart could
                // not help, and a long outage must not become a crash loop
                // (the spec wants outages ridden out). A Redis that stalls
                // past deadlines does count: fresh connections can help.
                if stalled && self.core.budget_spent(streak) {
                    fail_dependency(self, ctx, format!("{streak} consecutive failures, last: {e}"));
                }
            }
        }
    }

    /// Log a back-pressure change once, and keep its gauges current.
    fn memory_changed(&mut self, reading: Option<Result<Option<Transition>, InfoError>>) {
        self.metrics.redis_backpressure.set(i64::from(self.memory.is_closed()));
        if let Some(r) = self.memory.ratio() {
            self.metrics.redis_memory_ratio.set(r);
        }
        // An unreachable Redis is reported by the batches themselves.
        let transition = reading.and_then(Result::ok).flatten();
        match transition {
            Some(Transition::Blind { why }) => {
                warn!(self.core.log, "cannot read redis INFO memory; memory back-pressure is off until it can (grant +info)";
                    "error" => why);
            }
            Some(Transition::Sighted) => {
                info!(
                    self.core.log,
                    "redis INFO memory can be read again; memory back-pressure is on"
                );
            }
            Some(Transition::Closed { ratio }) => {
                warn!(self.core.log, "redis memory is nearly full; writes stop until it drains (rows wait in the outbox, no attempt counted)";
                    "used_share" => format!("{:.3}", ratio), "stop_at" => self.settings.redis.max_memory_ratio,
                    "resume_below" => format!("{:.3}", self.memory.low()));
            }
            Some(Transition::Opened { ratio }) => {
                info!(self.core.log, "redis memory back below the mark; writing again";
                    "used_share" => format!("{:.3}", ratio));
            }
            None => {}
        }
    }

    /// Count and log what the operator must hear about a batch; the
    /// outcomes go back to the sweep.
    fn report(&mut self, batch: BatchOutcome) -> Dispatched {
        if batch.wait_shortfalls > 0 {
            self.metrics
                .redis_wait_shortfall
                .inc_by(u64::from(batch.wait_shortfalls));
        }
        for (code, n) in &batch.refused {
            self.metrics.redis_refused_entries.with_label_values(&[code]).inc_by(*n);
        }
        if batch.unreachable > 0 {
            self.metrics.redis_unreachable_entries.inc_by(batch.unreachable as u64);
        }
        // One line when a condition starts and one when it ends, not one per tick.
        match (&batch.wait_shortfall, self.wait_short) {
            (Some(why), false) => {
                warn!(self.core.log, "redis replicas did not acknowledge; rows are kept in the outbox and re-sent";
                    "reason" => why, "wait_replicas" => self.settings.redis.wait_replicas);
                self.wait_short = true;
            }
            (None, true) if batch.outcomes.contains(&EntryOutcome::Delivered) => {
                info!(self.core.log, "redis replicas acknowledge again"; "wait_replicas" => self.settings.redis.wait_replicas);
                self.wait_short = false;
            }
            _ => {}
        }
        match (&batch.unreachable_reason, self.nodes_unreachable) {
            (Some(why), false) => {
                warn!(self.core.log, "redis cluster node unreachable; its entries are re-sent, the other nodes' delivered";
                    "reason" => why, "entries" => batch.unreachable);
                self.nodes_unreachable = true;
            }
            (None, true) => {
                info!(self.core.log, "every redis cluster node answers again");
                self.nodes_unreachable = false;
            }
            _ => {}
        }
        Dispatched {
            outcomes: batch.outcomes,
            node: batch.node,
        }
    }

    fn ping_if_idle(&mut self, ctx: &mut Context<Self>) {
        if self.ping_in_flight || self.last_activity.elapsed() < self.settings.ping_interval {
            return;
        }
        let Some(redis) = self.pool.clone() else {
            return;
        };
        self.ping_in_flight = true;
        let deadline = Deadline::after(self.settings.ping_interval);
        let work = async move { ping(&redis, deadline).await };
        run_contained(self, ctx, "ping", Mode::Spawn, work, |act, r, ctx| {
            act.ping_in_flight = false;
            act.record(r.as_ref().map(|_| ()), ctx);
        });
    }
}

impl Lifecycle for DispatchActor {
    fn core(&mut self) -> &mut Core {
        &mut self.core
    }

    fn begin(&mut self, ctx: &mut Context<Self>) -> Result<(), String> {
        let pool = rds::pool(&self.settings.redis, self.settings.checkout_timeout)
            .map_err(|e| format!("cannot build the Redis pool: {e}"))?;
        self.pool = Some(pool);
        self.last_activity = Instant::now();
        interval(ctx, self.settings.ping_interval, |act, ctx| act.ping_if_idle(ctx));
        Ok(())
    }

    fn reset(&mut self) {
        self.pool = None;
        self.ping_in_flight = false;
    }
}

crate::supervised_actor!(DispatchActor);

impl Handler<DispatchBatch> for DispatchActor {
    type Result = ResponseActFuture<Self, Result<Dispatched, DispatchError>>;

    fn handle(&mut self, msg: DispatchBatch, ctx: &mut Self::Context) -> Self::Result {
        let ready = |r| -> Self::Result { Box::pin(fut::ready(r)) };
        let start = guarded(self, ctx, "batch handler", |act, _| {
            fault_point("dispatch.batch");
            // `block` sticks the dispatch thread (test-only); `hang` has no
            // meaning here: a batch is bounded by the sweep's deadline.
            let _ = wedge_point("dispatch.batch");
            if act.core.expired(msg.deadline, "batch") {
                return Err(DispatchError::Deadline(Expired {
                    stage: "dispatch mailbox",
                }));
            }
            match act.pool.clone() {
                Some(redis) => Ok((
                    redis,
                    act.settings.redis.wait_replicas,
                    act.settings.redis.key_prefix.clone(),
                )),
                None => Err(DispatchError::Unavailable("dispatch actor is restarting".into())),
            }
        });
        let (redis, wait_replicas, prefix) = match start {
            Some(Ok(go)) => go,
            Some(Err(e)) => return ready(Err(e)),
            None => {
                return ready(Err(DispatchError::Unavailable(
                    "dispatch batch handler panicked".into(),
                )))
            }
        };
        // Redis's memory is read beside the batches far from the mark (no
        // batch waits for it; this one goes by the last reading, at most
        // CHECK_EVERY plus a round trip old), and by the batch itself before
        // it writes near the mark (see `redis::memory`).
        let gate = self.memory.clone();
        let inline = gate.near_mark();
        let read = gate.due(std::time::Instant::now());
        if read && !inline {
            let (gate, redis) = (gate.clone(), redis.clone());
            let read = async move { gate.refresh(&redis, msg.deadline).await };
            ctx.spawn(
                read.into_actor(self)
                    .map(|reading, act, _| act.memory_changed(Some(reading))),
            );
        }
        // The reply goes back to the sweep, so this one is not
        // `run_contained`: a panic must still answer the sender.
        let work = contain(async move {
            let transition = if read && inline {
                Some(gate.refresh(&redis, msg.deadline).await)
            } else {
                None
            };
            if gate.is_closed() {
                // Held back, and this batch's reading found no Redis at
                // all: that is an outage, not back-pressure; the actor
                // must degrade (and `/readyz` fail) as for any batch.
                if let Some(Err(InfoError::Unreachable(why))) = &transition {
                    let why = format!("redis unreachable while writes were held back: {why}");
                    return (transition, Err(DispatchError::Unavailable(why)));
                }
                let why = format!(
                    "used_memory at {:.0}% of maxmemory (redis.max_memory_ratio {:.2}); writing again below {:.0}%",
                    gate.ratio().unwrap_or(0.0) * 100.0,
                    gate.high(),
                    gate.low() * 100.0
                );
                return (transition, Err(DispatchError::BackPressure(why)));
            }
            gate.wrote(msg.entries.iter().map(|e| entry_cost(e.member.len())).sum());
            (
                transition,
                zadd_batch(&redis, &prefix, &msg.entries, (wait_replicas, msg.mark), msg.deadline).await,
            )
        });
        Box::pin(work.into_actor(self).map(|res, act, ctx| match res {
            Ok((transition, result)) => {
                act.memory_changed(transition);
                // A Redis that refuses every write (a replica, MISCONF, an
                // ACL change, a WAIT that never reaches wait_replicas) answers
                // each batch: a round trip that delivered nothing is a
                // failure of the actor, so it turns degraded and `/readyz`
                // says so (the rows are postponed, out of the backlog gauges).
                let refused = match &result {
                    Ok(batch) => batch.refused_every_entry().map(|why| {
                        DispatchError::Unavailable(format!("redis refused every write of the batch: {why}"))
                    }),
                    Err(_) => None,
                };
                // Holding back on purpose is not a failure of the actor.
                let recorded = match (&result, &refused) {
                    (_, Some(refusal)) => Err(refusal),
                    (Err(DispatchError::BackPressure(_)), _) => Ok(()),
                    (r, None) => r.as_ref().map(|_| ()),
                };
                act.record(recorded, ctx);
                result.map(|batch| act.report(batch))
            }
            Err(panic) => {
                fail(act, ctx, format!("pipeline {panic}"));
                Err(DispatchError::Unavailable(format!("dispatch {panic}")))
            }
        }))
    }
}
