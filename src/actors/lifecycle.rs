//! The one lifecycle every actor of the relay follows; read this file to
//! learn the protocol, then each actor's file for its own concern.
//!
//! 1. **Start.** actix calls `started`; [`started`] runs the actor's
//!    [`Lifecycle::begin`] at once on the first start, or after the restart
//!    backoff the supervisor chose when it failed. `begin` builds what the
//!    actor owns (pools) and schedules its first unit of work; it returns
//!    `Err` when it cannot, which fails the actor like any other failure.
//!    Nothing starts once the process is giving up or the actor is stopping.
//! 2. **Work.** Units of work (a tick, a batch, a probe) arrive as messages
//!    carrying an absolute [`Deadline`]. One that arrives after it is
//!    dropped unexecuted and counted ([`Core::expired`]). The I/O runs in
//!    plain async functions, on the actor's context through
//!    [`run_contained`], so a panic inside (or in the callback that takes
//!    its result) becomes a failure of the actor. The synchronous part of a
//!    handler goes through [`guarded`], timers through [`every`], [`later`]
//!    and [`interval`], for the same reason: actix never restarts an actor
//!    that panicked, it only loses it.
//! 3. **Outcome.** Successes and failures go to the actor's
//!    [`ActorHealth`] (what health lines, `/healthz` and the health gauges
//!    show). [`Core::failed`] returns the failure streak; each actor decides
//!    which failures count toward `supervisor.error_budget`
//!    ([`Core::budget_spent`]).
//! 4. **Fail.** [`fail`] (the relay's own fault: a panic) or
//!    [`fail_dependency`] (Postgres or Redis kept failing the work) asks the
//!    supervision for a restart delay (only own faults can make the
//!    process give up, see [`super::supervisor`]) and stops the
//!    context; actix's `Supervisor` then calls `restarting` (the actor's
//!    [`Lifecycle::reset`]: drop pools, timers, cursors; in-flight futures
//!    are dropped by actix, so an open transaction rolls back) and
//!    `started` again, which is step 1.
//!
//! [`crate::supervised_actor!`] writes the two actix impls (`Actor`,
//! `Supervised`) that route into this protocol.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::FutureExt;
use slog::{debug, Logger};

use super::supervisor::{Cause, Supervision};
use crate::deadline::Deadline;
use crate::telemetry::health::ActorHealth;

/// What every actor carries for its lifecycle: its logger (with the
/// `actor` field), its health record, where it reports failures, and the
/// delay before its next start.
pub struct Core {
    pub log: Logger,
    pub health: Arc<ActorHealth>,
    pub supervision: Supervision,
    /// Consecutive failed units of work that fail the actor.
    pub error_budget: u32,
    restart_delay: Option<Duration>,
}

impl Core {
    pub fn new(health: Arc<ActorHealth>, supervision: Supervision, error_budget: u32, log: &Logger) -> Self {
        Core {
            log: log.new(slog::o!("actor" => health.name)),
            health,
            supervision,
            error_budget,
            restart_delay: None,
        }
    }

    /// Work that arrives after its deadline is dropped unexecuted: counted
    /// as `deadline_exceeded`, logged at debug. True when it was dropped.
    pub fn expired(&self, deadline: Deadline, what: &str) -> bool {
        if !deadline.expired() {
            return false;
        }
        self.health.deadline_exceeded();
        debug!(self.log, "{} arrived after its deadline; dropped unexecuted", what);
        true
    }

    /// A unit of work failed (`deadline`: because it ran out of time).
    /// Returns the failure streak.
    pub fn failed(&self, error: &str, deadline: bool) -> u64 {
        if deadline {
            self.health.deadline_exceeded();
        }
        self.health.failed(error)
    }

    /// Whether a failure streak has spent `supervisor.error_budget`.
    pub fn budget_spent(&self, streak: u64) -> bool {
        streak >= u64::from(self.error_budget)
    }
}

/// An actor under the relay's supervision. Implement it, then write
/// `supervised_actor!(MyActor);` for the actix impls.
pub trait Lifecycle: Actor<Context = Context<Self>> + Supervised {
    fn core(&mut self) -> &mut Core;

    /// Build what the actor owns and schedule its first work. Called on
    /// every start; an `Err` fails the actor (restart after a backoff).
    fn begin(&mut self, ctx: &mut Context<Self>) -> Result<(), String>;

    /// Forget the failed incarnation: pools, timers, cursors, in-flight
    /// bookkeeping. State that must survive restarts (counters shared with
    /// the process) stays.
    fn reset(&mut self);

    /// The actor is shutting down on purpose: no start, no failure.
    fn shutting_down(&self) -> bool {
        false
    }
}

/// Write `Actor` and `Supervised` for a [`Lifecycle`] actor.
#[macro_export]
macro_rules! supervised_actor {
    ($actor:ty) => {
        impl ::actix::Actor for $actor {
            type Context = ::actix::Context<Self>;

            fn started(&mut self, ctx: &mut Self::Context) {
                $crate::actors::lifecycle::started(self, ctx);
            }
        }

        impl ::actix::Supervised for $actor {
            fn restarting(&mut self, _ctx: &mut Self::Context) {
                $crate::actors::lifecycle::Lifecycle::reset(self);
            }
        }

        impl ::actix::Handler<$crate::actors::lifecycle::Wedged> for $actor {
            type Result = ();

            fn handle(&mut self, msg: $crate::actors::lifecycle::Wedged, ctx: &mut Self::Context) {
                $crate::actors::lifecycle::fail(
                    self,
                    ctx,
                    format!("wedged: no sign of work for {}ms", msg.silent_for.as_millis()),
                );
            }
        }
    };
}

/// `Actor::started`: begin now on a first start, after the restart backoff
/// on a restart.
pub fn started<A: Lifecycle>(act: &mut A, ctx: &mut Context<A>) {
    match act.core().restart_delay.take() {
        Some(delay) => {
            ctx.run_later(delay, begin::<A>);
        }
        None => begin(act, ctx),
    }
}

fn begin<A: Lifecycle>(act: &mut A, ctx: &mut Context<A>) {
    if act.shutting_down() || act.core().supervision.given_up() {
        return;
    }
    match act.begin(ctx) {
        Ok(()) => act.core().health.set_running(),
        Err(e) => fail(act, ctx, e),
    }
}

/// Give up on this incarnation for a fault of the relay's own (a panic, an
/// actor that cannot start): the supervision decides the restart delay (or
/// that the process exits), and stopping the context makes actix restart
/// the actor.
pub fn fail<A: Lifecycle>(act: &mut A, ctx: &mut Context<A>, error: String) {
    fail_with(act, ctx, error, Cause::Own);
}

/// Restart with fresh connections because a dependency keeps failing the
/// actor's work (error budget spent, connection lost). Backs off like any
/// restart, but never counts toward the restart intensity.
pub fn fail_dependency<A: Lifecycle>(act: &mut A, ctx: &mut Context<A>, error: String) {
    fail_with(act, ctx, error, Cause::Dependency);
}

fn fail_with<A: Lifecycle>(act: &mut A, ctx: &mut Context<A>, error: String, cause: Cause) {
    if act.shutting_down() {
        return;
    }
    let core = act.core();
    core.restart_delay = core.supervision.actor_failed(&core.health, &error, cause);
    ctx.stop();
}

/// Run the synchronous part of a handler; a panic in it fails the actor
/// instead of killing it for good (actix does not restart a panicked actor).
pub fn guarded<A: Lifecycle, R>(
    act: &mut A,
    ctx: &mut Context<A>,
    what: &str,
    f: impl FnOnce(&mut A, &mut Context<A>) -> R,
) -> Option<R> {
    match contain_sync(|| f(act, ctx)) {
        Ok(r) => Some(r),
        Err(panic) => {
            fail(act, ctx, format!("{what} {panic}"));
            None
        }
    }
}

/// How a contained future shares the actor's mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The mailbox waits for it: one round at a time (`ctx.wait`).
    Wait,
    /// It runs alongside other messages (`ctx.spawn`): concurrent ticks.
    Spawn,
}

/// Run `work` on the actor's context; `done` gets its output back on the
/// actor. A panic inside `work` fails the actor (and `done` is not called).
pub fn run_contained<A, F, D>(act: &mut A, ctx: &mut Context<A>, what: &'static str, mode: Mode, work: F, done: D)
where
    A: Lifecycle,
    F: Future + 'static,
    D: FnOnce(&mut A, F::Output, &mut Context<A>) + 'static,
{
    let fut = contain(work).into_actor(act).map(move |res, act, ctx| match res {
        Ok(out) => {
            guarded(act, ctx, what, |act, ctx| done(act, out, ctx));
        }
        Err(panic) => fail(act, ctx, format!("{what} {panic}")),
    });
    match mode {
        Mode::Wait => ctx.wait(fut),
        Mode::Spawn => {
            ctx.spawn(fut);
        }
    }
}

/// Send `make()` to the actor itself every `interval` (and once at once
/// when `now`): the cadence of the actors that work on a timer.
pub fn every<A, M>(act: &A, ctx: &mut Context<A>, interval: Duration, now: bool, make: fn(&A) -> M)
where
    A: Lifecycle + Handler<M>,
    M: Message + Send + 'static,
    M::Result: Send,
{
    if now {
        ctx.notify(make(act));
    }
    ctx.run_interval(interval, move |act, ctx| {
        guarded(act, ctx, "timer", |act, ctx| ctx.notify(make(act)));
    });
}

/// `ctx.run_later`, with a panic in `f` failing the actor.
pub fn later<A: Lifecycle>(
    ctx: &mut Context<A>,
    delay: Duration,
    f: impl FnOnce(&mut A, &mut Context<A>) + 'static,
) -> SpawnHandle {
    ctx.run_later(delay, move |act, ctx| {
        guarded(act, ctx, "timer", f);
    })
}

/// `ctx.run_interval`, with a panic in `f` failing the actor.
pub fn interval<A: Lifecycle>(
    ctx: &mut Context<A>,
    every: Duration,
    mut f: impl FnMut(&mut A, &mut Context<A>) + 'static,
) -> SpawnHandle {
    ctx.run_interval(every, move |act, ctx| {
        guarded(act, ctx, "timer", &mut f);
    })
}

/// A test-only fault point: with the `fault-injection` feature,
/// `OUTBOX_FAULT_INJECT=<name>:<n>` panics here the first `n` times (see
/// `crate::fault`); without it, nothing. Every actor has one, so a test can
/// prove each one restarts.
#[inline]
pub fn fault_point(_name: &str) {
    #[cfg(feature = "fault-injection")]
    crate::fault::maybe_panic(_name);
}

/// A test-only wedge (feature `fault-injection`, see `crate::fault::wedge`):
/// `block` sticks the calling thread here for good; `hang` returns true,
/// and the caller then awaits forever. Without the feature, nothing.
#[inline]
pub fn wedge_point(_name: &str) -> bool {
    #[cfg(feature = "fault-injection")]
    match crate::fault::wedge(_name) {
        Some(crate::fault::Wedge::Block) => loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
        Some(crate::fault::Wedge::Hang) => return true,
        None => {}
    }
    false
}

/// The watchdog found the actor wedged (no sign of work for
/// `health::WEDGE_CADENCES` cadences): a fault of the relay's own, so the
/// actor fails and the restart counts toward the restart intensity.
#[derive(Debug, Clone, Copy)]
pub struct Wedged {
    pub silent_for: std::time::Duration,
}

impl actix::Message for Wedged {
    type Result = ();
}

/// Text of a panic payload.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        format!("panic: {s}")
    } else if let Some(s) = payload.downcast_ref::<String>() {
        format!("panic: {s}")
    } else {
        "panic".to_string()
    }
}

/// Run a future, turning a panic inside it into `Err(message)`.
pub async fn contain<F: Future>(fut: F) -> Result<F::Output, String> {
    AssertUnwindSafe(fut)
        .catch_unwind()
        .await
        .map_err(|p| panic_message(p.as_ref()))
}

/// Run a closure, turning a panic inside it into `Err(message)`.
pub fn contain_sync<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_message(p.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_errors() {
        assert_eq!(contain_sync(|| 7), Ok(7));
        let r: Result<(), String> = contain_sync(|| panic!("boom"));
        assert_eq!(r, Err("panic: boom".to_string()));
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let r = rt.block_on(contain(async { panic!("async {}", 1) }));
        assert_eq!(r, Err::<(), _>("panic: async 1".to_string()));
    }
}
