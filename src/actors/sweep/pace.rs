//! When a lane ticks: at once after a full batch, after `sweep.interval`
//! otherwise (longer while the listener hears), when a row comes due, when
//! new rows are announced; lanes that went missing are started again.

use super::*;

impl SweepActor {
    pub(super) fn schedule(&mut self, ctx: &mut Context<Self>, pace: Pace) {
        if self.stopping {
            return;
        }
        // A wake-up that came in while this tick ran may announce rows the
        // tick's claim did not see yet: go on at once.
        let pace = if std::mem::take(&mut self.woken) {
            Pace::Drain
        } else {
            pace
        };
        match pace {
            Pace::Drain if self.held_back_by_live_traffic() => {
                // Let the fresh lane have the CPU: look again shortly.
                later(ctx, LIVE_RECHECK, |act, ctx| act.schedule(ctx, Pace::Drain));
            }
            Pace::Drain => ctx.notify(Tick {
                deadline: Deadline::after(self.settings.tick_timeout),
                lane: Lane::Drain,
            }),
            Pace::Idle => self.wait(ctx, None),
            Pace::Quiet => self.wait(ctx, Some(std::time::Instant::now())),
        }
    }

    /// An idle lane waits `sweep.interval`, and then, when `quiet_since` is
    /// given and the listener still hears new rows, again, until
    /// `sweep.listen_poll_interval` has passed since then: a listener that
    /// goes deaf brings polling back within one `sweep.interval`.
    pub(super) fn wait(&mut self, ctx: &mut Context<Self>, quiet_since: Option<std::time::Instant>) {
        let slot = std::rc::Rc::new(std::cell::Cell::new(None::<SpawnHandle>));
        let me = slot.clone();
        let timer = later(ctx, self.settings.interval, move |act, ctx| {
            if let Some(h) = me.get() {
                act.idle_timers.retain(|t| *t != h);
            }
            let quiet = quiet_since.filter(|since| {
                act.heard.role() != Role::Deaf && since.elapsed() + act.settings.interval <= act.settings.listen_poll
            });
            if quiet.is_some() && !act.stopping {
                // On its cadence with nothing to claim: not stale.
                act.core.health.alive();
                return act.wait(ctx, quiet);
            }
            ctx.notify(Tick {
                deadline: Deadline::after(act.settings.tick_timeout),
                lane: Lane::Drain,
            })
        });
        slot.set(Some(timer));
        self.idle_timers.push(timer);
    }

    /// Run a drain tick at `at` (rows come due then), unless one is already
    /// set for earlier: an idle lane's wait is cut short, or, with every
    /// lane busy, one ticks again at once after its tick. Only while the
    /// listener hears (a polling relay finds them within `sweep.interval`).
    pub(super) fn due_at(&mut self, ctx: &mut Context<Self>, at: tokio::time::Instant) {
        if self.stopping || self.heard.role() == Role::Deaf {
            return;
        }
        if let Some((when, timer)) = self.due_timer {
            if when <= at {
                return;
            }
            ctx.cancel_future(timer);
        }
        let timer = later(
            ctx,
            at.saturating_duration_since(tokio::time::Instant::now()),
            |act, ctx| {
                act.due_timer = None;
                act.take_idle_lane(ctx);
            },
        );
        self.due_timer = Some((at, timer));
    }

    /// Start an idle lane now (its wait is cancelled); with none idle, a
    /// busy lane goes on at once after its tick.
    pub(super) fn take_idle_lane(&mut self, ctx: &mut Context<Self>) {
        if !self.stopping && !self.start_idle_lane(ctx) {
            self.woken = true;
        }
    }

    /// Cut an idle lane's wait short and tick it now; false when every lane
    /// is busy.
    pub(super) fn start_idle_lane(&mut self, ctx: &mut Context<Self>) -> bool {
        let Some(timer) = self.idle_timers.pop() else {
            return false;
        };
        ctx.cancel_future(timer);
        ctx.notify(Tick {
            deadline: Deadline::after(self.settings.tick_timeout),
            lane: Lane::Drain,
        });
        true
    }

    /// Whether the fresh lane must claim for what the listener announced
    /// (a wake-up that needs none is counted `seen`).
    pub(super) fn fresh_claim_needed(&self) -> bool {
        let announced = self.heard.take();
        let needed = announced.needs_claim(self.fresh_seen.as_ref());
        if !needed && !announced.xids.is_empty() {
            self.metrics.wakeups.with_label_values(&["seen"]).inc();
        }
        needed
    }

    /// As the listen lead, tell the other relays a backlog is arriving (at
    /// most once per `sweep.interval`): their drain lanes start now rather
    /// than at their next poll.
    pub(super) fn announce_backlog(&mut self, ctx: &mut Context<Self>) {
        if self.heard.role() != Role::Lead
            || self
                .last_backlog_notice
                .is_some_and(|t| t.elapsed() < self.settings.interval)
        {
            return;
        }
        let Some(pool) = self.pool.clone() else {
            return;
        };
        self.last_backlog_notice = Some(std::time::Instant::now());
        let deadline = Deadline::after(self.settings.tick_timeout);
        let log = self.core.log.clone();
        ctx.spawn(
            async move {
                if let Err(e) = db::listen::notify_backlog(&pool, deadline).await {
                    debug!(log, "could not tell the other relays about a backlog"; "error" => e);
                }
            }
            .into_actor(self),
        );
    }

    /// New rows keep arriving and enough drain ticks already run: on two
    /// cores, every drain tick in flight adds Postgres and Redis work that
    /// a new row's claim and ZADD queue behind (measured: backlog latency
    /// p99 ~12 ms with one drain tick in flight, ~20 ms with two).
    pub(super) fn held_back_by_live_traffic(&self) -> bool {
        self.drain_in_flight >= self.settings.live_concurrency.max(1)
            && self.last_wake.is_some_and(|t| t.elapsed() < LIVE_WINDOW)
    }

    /// Fail (an own fault: restart with fresh state) when a tick has run
    /// [`LANE_WEDGE_GRACE`] past its deadline and then kept running for
    /// another [`LANE_WEDGE_GRACE`] of checks on time (so a process that was
    /// paused, whose ticks all look overdue at once, gives them time to end).
    pub(super) fn check_lanes(&mut self, ctx: &mut Context<Self>) {
        let now = tokio::time::Instant::now();
        // Late by much: the whole process was paused (SIGSTOP, a frozen
        // container); start over.
        let late = now - self.last_lane_check > LANE_CHECK_EVERY * 3;
        self.last_lane_check = now;
        if late {
            self.lane_suspect = None;
            return;
        }
        let overdue = self
            .running
            .iter()
            .find(|(_, _, d)| now > d.instant() + LANE_WEDGE_GRACE)
            .map(|(n, lane, d)| (*n, *lane, now - d.instant()));
        let Some((number, lane, over)) = overdue else {
            self.lane_suspect = None;
            return;
        };
        match self.lane_suspect {
            Some((n, since)) if n == number && now - since >= LANE_WEDGE_GRACE => fail(
                self,
                ctx,
                format!(
                    "wedged lane: a {lane:?} tick is still running {}ms past its deadline",
                    over.as_millis()
                ),
            ),
            Some((n, _)) if n == number => {}
            _ => self.lane_suspect = Some((number, now)),
        }
    }
}
