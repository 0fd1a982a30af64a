//! `SweepActor`: owns the tick — claim due rows, dispatch them, settle them,
//! all in one Postgres transaction.
//!
//! Messages: [`Tick`] (carries its deadline; sent to itself), [`Wake`] (new
//! rows were committed: skip the rest of the idle wait), [`Stop`] (answered
//! once the tick in flight has finished or rolled back).
//! Owns: its Postgres pool (built in `started`, so a restart reconnects).
//!
//! `sweep.concurrency` lanes each run one tick at a time (spawned on the
//! actor's context, each with its own connection and claimed batch; SKIP
//! LOCKED keeps them apart). A lane schedules its next tick when the current
//! one ends: at once after a full batch (drain mode), after `sweep.interval`
//! otherwise. `Stop` waits for every tick in flight.
//! The I/O is [`run_tick`], a plain async function.
//!
//! Failure: any error rolls the transaction back (nothing half-applied;
//! the rows stay in the outbox for a later tick). A lost Postgres
//! connection, a panic, or `supervisor.error_budget` consecutive failed
//! ticks make the actor fail: the supervisor restarts it, after a backoff,
//! with a fresh pool.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use slog::{debug, error, info, warn, Logger};

use super::dead_letter::RowsDeadLettered;
use super::dispatch::DispatchBatch;
use super::lifecycle::{
    contain, fail, fail_dependency, fault_point, guarded, interval, later, wedge_point, Core, Lifecycle,
};
use super::supervisor::Supervision;
use crate::db::listen::{Heard, Role, Snapshot};
use crate::db::outbox::ClaimCursor;
use crate::db::{self, Pg};
use crate::deadline::Deadline;
use crate::domain::ClaimLimit;
use crate::telemetry::health::ActorHealth;
use crate::telemetry::logging::Throttle;
use crate::telemetry::metrics::Metrics;

mod dispatched;
mod lanes;
mod pace;
mod refused;
mod report;
mod settings;
mod tick;

pub use report::{ClaimPlan, Kept, TickError, TickReport};
pub use settings::{ClaimFallback, Lane, SweepSettings, FRESH_BATCH};
pub use tick::run_tick;

/// Counters shared with the process (progress line, later metrics); they
/// outlive actor restarts.
#[derive(Debug, Default)]
pub struct SweepStats {
    pub dispatched: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub ticks_ok: AtomicU64,
    pub ticks_error: AtomicU64,
    pub ticks_deadline: AtomicU64,
    pub restarts: AtomicU64,
}

/// New rows were committed this recently: the relay is serving live
/// traffic, and while it does, at most `sweep.live_concurrency` drain
/// ticks run at once (see [`SweepSettings::live_concurrency`]).
const LIVE_WINDOW: Duration = Duration::from_secs(1);

/// How soon a drain lane held back by live traffic looks again.
const LIVE_RECHECK: Duration = Duration::from_millis(20);

/// Lanes resume their claim after the last key claimed, so they do not
/// re-walk the index entries of rows already delivered; at least this often
/// a claim starts from the beginning instead, so rows that appear behind the
/// cursor (a producer transaction that committed late with an old `now()`,
/// another relay's tick that rolled back) wait at most this long, while
/// such a claim is cheap.
pub const FULL_SCAN_EVERY: Duration = Duration::from_millis(250);

/// A claim from the beginning walks every index entry of the rows deleted
/// since vacuum last ran (with autovacuum off, or behind a snapshot held
/// open, that grows by the delivery rate: 1.2 million entries in two
/// minutes at 10,000 rows/s, tens of milliseconds a claim). So the next one
/// waits this many times as long as the last one took, between
/// [`FULL_SCAN_EVERY`] and [`FULL_SCAN_AT_MOST`]: at most 1 % of a lane's
/// time goes to them, and the other claims keep their time.
const FULL_SCAN_COST_FACTOR: u32 = 100;

/// The longest a row behind the cursor waits for a claim from the beginning.
pub const FULL_SCAN_AT_MOST: Duration = Duration::from_secs(10);

/// A tick still running this long past its deadline is wedged: every
/// stage of a tick ends at the deadline (a commit gets `COMMIT_GRACE`, a
/// cancel `CANCEL_WAIT`), so only a bug keeps one going. The watchdog sees
/// only the whole actor, which keeps showing work while another lane
/// drains; this catches the lane.
const LANE_WEDGE_GRACE: Duration = Duration::from_secs(5);

/// How often the sweep looks for a wedged lane.
const LANE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// When the next claim from the beginning is due after one that took
/// `claim_us`: [`FULL_SCAN_COST_FACTOR`] times as long, within
/// [`FULL_SCAN_EVERY`]..=[`FULL_SCAN_AT_MOST`].
pub fn full_scan_every(claim_us: u64) -> Duration {
    Duration::from_micros(claim_us.saturating_mul(u64::from(FULL_SCAN_COST_FACTOR)))
        .clamp(FULL_SCAN_EVERY, FULL_SCAN_AT_MOST)
}

/// Run one sweep tick before `deadline`.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Tick {
    pub deadline: Deadline,
    pub lane: Lane,
}

/// New rows were committed (LISTEN/NOTIFY): tick now instead of waiting
/// out `sweep.interval`.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Wake;

/// Finish (or roll back) the tick in flight and schedule no more.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Stop;

/// When the next tick starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pace {
    /// The last tick claimed a full batch: more is probably due, go on at once.
    Drain,
    /// Wait `sweep.interval`: something may be due now (a tick failed,
    /// Redis was unavailable or held back, rows were left due).
    Idle,
    /// Every claimed row was settled: while the listener hears new rows,
    /// wait `sweep.listen_poll_interval` (new rows are announced; rows put
    /// back and rows not yet due have timers of their own); otherwise as
    /// `Idle`.
    Quiet,
}

/// The longest a relay whose batches Redis refused holds its claims: well
/// inside the 2 m rate window of `OutboxRelayRedisRefusingWrites`, so a
/// lasting refusal keeps the alert's expression true, and a Redis that
/// takes writes again is written to within this.
pub const REFUSAL_HOLD_MAX: Duration = Duration::from_secs(30);

pub struct SweepActor {
    settings: SweepSettings,
    core: Core,
    dispatch: Recipient<DispatchBatch>,
    dead_letter: Recipient<RowsDeadLettered>,
    stats: Arc<SweepStats>,
    metrics: Metrics,
    pool: Option<Pg>,
    stopping: bool,
    /// Ticks running now (at most `sweep.concurrency`), published so that
    /// `Stop` can wait for all of them.
    in_flight: tokio::sync::watch::Sender<usize>,
    /// Rows the next claim may take (`sweep.batch_size`, fewer for large
    /// rows); starts slow after every (re)start.
    claim_limit: ClaimLimit,
    /// Pending `sweep.interval` waits, one per idle lane; a [`Wake`] cancels one.
    idle_timers: Vec<SpawnHandle>,
    /// A [`Wake`] arrived while every lane was busy.
    woken: bool,
    /// Ticks in a row whose every claimed row Redis refused (a node turned
    /// replica, NOPERM, MISCONF, a WAIT shortfall), and until when no lane
    /// claims because of them: the backoff of that many failures. A relay
    /// that cannot deliver would otherwise claim the rows again the moment
    /// they come due, ahead of the relays that can.
    refused_streak: i32,
    refusal_hold: Option<tokio::time::Instant>,
    /// Where the next oldest-first claim resumes while draining.
    cursor: Option<ClaimCursor>,
    /// When a claim last started from the beginning of the index.
    last_full_scan: std::time::Instant,
    /// How long after `last_full_scan` the next one runs (adapted to what
    /// the last one cost: [`FULL_SCAN_COST_FACTOR`]).
    full_scan_every: Duration,
    /// The last tick found something paused: claims skip paused jobs.
    pauses_seen: bool,
    /// Ticks running now: (number, lane, deadline), for the lane check.
    running: Vec<(u64, Lane, Deadline)>,
    /// Number of the next tick.
    next_tick: u64,
    /// When the lane check last ran.
    last_lane_check: tokio::time::Instant,
    /// The overdue tick the lane check is watching, and since when.
    lane_suspect: Option<(u64, tokio::time::Instant)>,
    /// A fresh-lane tick is queued or running (at most one at a time).
    fresh_in_flight: bool,
    /// Drain-lane ticks running now.
    drain_in_flight: u32,
    /// A [`Wake`] is in the mailbox (shared with the [`Waker`]).
    wake_pending: Arc<AtomicBool>,
    /// When the last wake-up (new rows committed) arrived.
    last_wake: Option<std::time::Instant>,
    /// Another wake-up came while it ran: run one more after it.
    fresh_again: bool,
    /// What the listener heard (shared with it): this relay's role, and
    /// the transactions announced since the sweep last looked.
    heard: Arc<Heard>,
    /// The snapshot of the last fresh claim that took every due row it
    /// could see: an announced transaction visible in it needs no claim.
    fresh_seen: Option<Snapshot>,
    /// When a drain tick is due for rows coming due (put back, or not yet
    /// due at a claim), and its timer.
    due_timer: Option<(tokio::time::Instant, SpawnHandle)>,
    /// When this relay (the listen lead) last told the others a backlog is
    /// arriving.
    last_backlog_notice: Option<std::time::Instant>,
    /// Per-tick warnings (Redis unavailable / refusing / row retries), at
    /// most one line per [`WARN_EVERY`] each.
    warn_throttles: [Throttle; 6],
}

/// How often a warning that every tick could repeat is logged.
const WARN_EVERY: Duration = Duration::from_secs(10);

impl SweepActor {
    pub fn new(
        settings: SweepSettings,
        (dispatch, dead_letter): (Recipient<DispatchBatch>, Recipient<RowsDeadLettered>),
        stats: Arc<SweepStats>,
        health: Arc<ActorHealth>,
        supervision: Supervision,
        (metrics, wake_pending, heard): (Metrics, Arc<AtomicBool>, Arc<Heard>),
        log: &Logger,
    ) -> Self {
        SweepActor {
            wake_pending,
            heard,
            fresh_seen: None,
            due_timer: None,
            last_backlog_notice: None,
            claim_limit: ClaimLimit::new(settings.batch_size, settings.max_batch_bytes),
            core: Core::new(health, supervision, settings.error_budget, log),
            settings,
            dispatch,
            dead_letter,
            stats,
            metrics,
            pool: None,
            stopping: false,
            in_flight: tokio::sync::watch::channel(0).0,
            idle_timers: Vec::new(),
            woken: false,
            refused_streak: 0,
            refusal_hold: None,
            cursor: None,
            last_full_scan: std::time::Instant::now(),
            full_scan_every: FULL_SCAN_EVERY,
            pauses_seen: false,
            running: Vec::new(),
            next_tick: 0,
            last_lane_check: tokio::time::Instant::now(),
            lane_suspect: None,
            fresh_in_flight: false,
            drain_in_flight: 0,
            last_wake: None,
            fresh_again: false,
            warn_throttles: std::array::from_fn(|_| Throttle::new(WARN_EVERY)),
        }
    }
}

impl Lifecycle for SweepActor {
    fn core(&mut self) -> &mut Core {
        &mut self.core
    }

    /// Build the pool and start one lane per concurrent tick; each lane
    /// reschedules itself.
    fn begin(&mut self, ctx: &mut Context<Self>) -> Result<(), String> {
        // Half the tick for a checkout: an unreachable Postgres is then
        // reported with its cause instead of as a bare deadline.
        let checkout = (self.settings.tick_timeout / 2).max(Duration::from_millis(5));
        let pool = db::pool(&self.settings.database_url, self.settings.pool_size, checkout)
            .map_err(|e| format!("cannot build the Postgres pool: {e}"))?;
        self.pool = Some(pool);
        for _ in 0..self.settings.concurrency.max(1) {
            self.schedule(ctx, Pace::Drain);
        }
        self.last_lane_check = tokio::time::Instant::now();
        interval(ctx, LANE_CHECK_EVERY, |act, ctx| act.check_lanes(ctx));
        Ok(())
    }

    fn reset(&mut self) {
        // Fresh state: the old pool (and its connections) is dropped; the
        // tick that was in flight was dropped with its transaction, which
        // rolls it back.
        self.pool = None;
        self.claim_limit = ClaimLimit::new(self.settings.batch_size, self.settings.max_batch_bytes);
        self.idle_timers.clear();
        self.woken = false;
        self.fresh_in_flight = false;
        self.drain_in_flight = 0;
        self.fresh_again = false;
        self.fresh_seen = None;
        self.due_timer = None;
        self.cursor = None;
        self.full_scan_every = FULL_SCAN_EVERY;
        self.refused_streak = 0;
        self.refusal_hold = None;
        self.heard.set_holding(false);
        self.running.clear();
        self.lane_suspect = None;
        // A wake-up lost with the failed actor must not block the next ones.
        self.wake_pending.store(false, Ordering::Release);
        self.in_flight.send_replace(0);
        self.stats.restarts.fetch_add(1, Ordering::Relaxed);
    }

    fn shutting_down(&self) -> bool {
        self.stopping
    }
}

crate::supervised_actor!(SweepActor);

impl Handler<Tick> for SweepActor {
    type Result = ();

    fn handle(&mut self, msg: Tick, ctx: &mut Self::Context) {
        if self.stopping {
            return;
        }
        guarded(self, ctx, "tick handler", |act, ctx| act.start_tick(msg, ctx));
    }
}

/// Sends [`Wake`] to the sweep, at most one at a time: while one is in
/// the mailbox, further wake-ups are folded into it (counted as
/// `coalesced`). A storm of notifications therefore costs an atomic swap
/// each, and the mailbox never holds more than one wake-up.
#[derive(Clone)]
pub struct Waker {
    sweep: Recipient<Wake>,
    pending: Arc<AtomicBool>,
    metrics: Metrics,
}

impl Waker {
    pub fn new(sweep: Recipient<Wake>, pending: Arc<AtomicBool>, metrics: Metrics) -> Self {
        Waker {
            sweep,
            pending,
            metrics,
        }
    }

    pub fn wake(&self) {
        if self.pending.swap(true, Ordering::AcqRel) {
            self.metrics.wakeups.with_label_values(&["coalesced"]).inc();
        } else {
            self.metrics.wakeups.with_label_values(&["sent"]).inc();
            self.sweep.do_send(Wake);
        }
    }
}

impl Handler<Wake> for SweepActor {
    type Result = ();

    fn handle(&mut self, _msg: Wake, ctx: &mut Self::Context) {
        // Taken: the next wake-up is sent again. Cleared before the work,
        // so rows committed from now on wake the sweep once more.
        self.wake_pending.store(false, Ordering::Release);
        guarded(self, ctx, "wake handler", |act, ctx| {
            if act.stopping || act.pool.is_none() {
                return;
            }
            act.last_wake = Some(std::time::Instant::now());
            if act.idle_timers.is_empty() {
                // Every lane is busy (draining a backlog, say): make sure a lane
                // ticks again after its current tick.
                act.woken = true;
            }
            // The new rows go out now on the fresh lane, newest first: they wait
            // neither behind a backlog nor behind a drain lane's claim from the
            // start of the index (which, after a big drain and until vacuum,
            // walks every dead entry the drain left). Idle lanes keep their
            // cadence; a fresh tick that finds a full batch wakes one of them.
            if act.fresh_in_flight {
                act.fresh_again = true;
            } else if act.fresh_claim_needed() {
                act.fresh_in_flight = true;
                ctx.notify(Tick {
                    deadline: Deadline::after(act.settings.tick_timeout),
                    lane: Lane::Fresh,
                });
            }
        });
    }
}

impl Handler<Stop> for SweepActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _msg: Stop, ctx: &mut Self::Context) -> Self::Result {
        // No new ticks; answer once the ones in flight have committed or
        // rolled back (each is bounded by its deadline).
        self.stopping = true;
        for t in self.idle_timers.drain(..) {
            ctx.cancel_future(t);
        }
        if let Some((_, t)) = self.due_timer.take() {
            ctx.cancel_future(t);
        }
        let mut in_flight = self.in_flight.subscribe();
        Box::pin(async move {
            let _ = in_flight.wait_for(|n| *n == 0).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MetricsConfig;

    #[test]
    fn claims_from_the_beginning_space_out_as_they_grow_dear() {
        // A cheap one (a 2 ms claim of a full batch): every 250 ms.
        assert_eq!(full_scan_every(2_000), FULL_SCAN_EVERY);
        // Walking a million dead index entries (8 ms): every 800 ms.
        assert_eq!(full_scan_every(8_000), Duration::from_millis(800));
        // Behind a held snapshot (50 ms): every 5 s; never rarer than 10 s.
        assert_eq!(full_scan_every(50_000), Duration::from_secs(5));
        assert_eq!(full_scan_every(3_000_000), FULL_SCAN_AT_MOST);
        assert_eq!(full_scan_every(u64::MAX), FULL_SCAN_AT_MOST);
    }

    /// Stands in for the sweep: counts the wake-ups that reach its mailbox
    /// and takes them the way the sweep does.
    struct Sink {
        pending: Arc<AtomicBool>,
        seen: Arc<AtomicU64>,
    }

    impl Actor for Sink {
        type Context = Context<Self>;
    }

    impl Handler<Wake> for Sink {
        type Result = ();
        fn handle(&mut self, _: Wake, _: &mut Context<Self>) {
            self.pending.store(false, Ordering::Release);
            self.seen.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[actix_rt::test]
    async fn a_notification_storm_queues_one_wake_up_at_a_time() {
        let pending = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(AtomicU64::new(0));
        let sink = Sink {
            pending: pending.clone(),
            seen: seen.clone(),
        }
        .start();
        let metrics = Metrics::new(&MetricsConfig::default()).expect("metrics");
        let waker = Waker::new(sink.recipient(), pending, metrics.clone());
        // The actor cannot run between these calls (same thread): without
        // coalescing, each would be one more message in its mailbox.
        for _ in 0..100_000 {
            waker.wake();
        }
        let wakeups = |r: &str| metrics.wakeups.with_label_values(&[r]).get();
        assert_eq!((wakeups("sent"), wakeups("coalesced")), (1, 99_999));
        // Taken: the next notification wakes the sweep again.
        for _ in 0..1000 {
            if seen.load(Ordering::Relaxed) == 1 {
                break;
            }
            actix_rt::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(seen.load(Ordering::Relaxed), 1);
        waker.wake();
        assert_eq!(wakeups("sent"), 2);
    }
}
