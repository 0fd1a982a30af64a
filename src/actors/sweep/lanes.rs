//! A lane's tick from start to finish: the checks before it runs (its
//! deadline, a refusal hold), the tick itself ([`run_tick`] on the
//! actor's context), and what its report changes (health, counters, the
//! claim limit, the hold, the next pace).

use super::*;

impl SweepActor {
    pub(super) fn finish_tick(
        &mut self,
        (number, lane): (u64, Lane),
        started: std::time::Instant,
        result: Result<Result<TickReport, TickError>, String>,
        ctx: &mut Context<Self>,
    ) {
        self.running.retain(|(n, _, _)| *n != number);
        self.in_flight.send_modify(|n| *n = n.saturating_sub(1));
        if lane == Lane::Drain {
            self.drain_in_flight = self.drain_in_flight.saturating_sub(1);
        }
        self.metrics.sweep_duration.observe(started.elapsed().as_secs_f64());
        if let Some(pg) = &self.pool {
            self.metrics.observe_pool("postgres", pg.pool.state());
        }
        let result = match result {
            Ok(r) => r,
            Err(panic) => {
                self.metrics.sweep_ticks.with_label_values(&["error"]).inc();
                return fail(self, ctx, format!("tick {panic}"));
            }
        };
        let (pace, fresh_full) = match result {
            Ok(report) => self.after_report(lane, report, ctx),
            Err(TickError::ClaimFallback(why)) => {
                // The rows are as they were (the tick rolled back; a re-send
                // of its ZADDs is harmless): claim them again, by locking.
                if self.settings.claim_fallback.set(why.clone()) {
                    warn!(self.core.log, "task_outbox changed under the relay; claiming by locking from now on (restart the relay to check again)";
                        "reason" => why);
                }
                (Pace::Drain, false)
            }
            Err(e) => match self.after_failure(e, ctx) {
                Some(pace) => (pace, false),
                None => return,
            },
        };
        self.next_for_lane(lane, pace, fresh_full, ctx);
    }

    /// What a tick's report changes (the hold, timers, the claim limit,
    /// health, counters, the cursor), and the lane's next pace; also
    /// whether a fresh-lane tick took a full batch.
    fn after_report(&mut self, lane: Lane, report: TickReport, ctx: &mut Context<Self>) -> (Pace, bool) {
        let fresh_full = lane == Lane::Fresh && report.claimed >= report.limit;
        let settled = report.redis_unavailable.is_none() && report.back_pressure.is_none() && !report.left_due;
        if lane == Lane::Fresh {
            // Complete: it took every due row its snapshot showed
            // (but those other ticks held).
            self.fresh_seen = report.snapshot.clone().filter(|_| settled && !fresh_full);
        }
        let now = tokio::time::Instant::now();
        self.hold_after(&report, now);
        if let Some(after) = report.put_back_in {
            self.due_at(ctx, now + after);
        }
        if let (Some(after), Role::Lead) = (report.next_due_in, self.heard.role()) {
            self.due_at(ctx, now + after);
        }
        if report.claimed >= report.limit {
            self.announce_backlog(ctx);
        }
        self.claim_limit
            .observe(report.claimed as u32, report.limit as u32, report.max_row_bytes);
        self.core.health.ok();
        self.stats.ticks_ok.fetch_add(1, Ordering::Relaxed);
        self.metrics.sweep_ticks.with_label_values(&["ok"]).inc();
        self.metrics
            .claim_duration
            .with_label_values(&[lane.label(), if report.claimed > 0 { "rows" } else { "none" }])
            .observe(report.claim_us as f64 / 1e6);
        self.record(lane, &report);
        if report.full_scan {
            self.full_scan_every = full_scan_every(report.claim_us);
        }
        if self.pauses_seen && !report.pauses_seen {
            // Every pause was lifted: the rows held back sit behind
            // the cursor; the next drain claim starts from the
            // beginning.
            self.full_scan_every = Duration::ZERO;
        }
        self.pauses_seen = report.pauses_seen;
        if lane == Lane::Drain {
            // Resume after this batch next time (a claim from the
            // start that found an older backlog moves the cursor
            // back to it); a claim from the start runs at least
            // every FULL_SCAN_EVERY anyway.
            self.cursor = report.cursor.or(self.cursor);
        }
        let pace = if report.claimed >= report.limit
            && report.redis_unavailable.is_none()
            && report.back_pressure.is_none()
            // Rows Redis refused are postponed; keep draining as
            // long as some of the batch could be settled.
            && report.deferred < report.claimed
        {
            Pace::Drain
        } else if settled {
            Pace::Quiet
        } else {
            Pace::Idle
        };
        (pace, fresh_full)
    }

    /// Hold this relay's claims while Redis refuses every row of its
    /// batches (or Postgres the settle of rows that stay); lift the hold
    /// at a delivery.
    fn hold_after(&mut self, report: &TickReport, now: tokio::time::Instant) {
        let refused =
            report.deferred_reason.is_some() && report.redis_unavailable.is_none() && report.back_pressure.is_none();
        // Rows left due by a settle Postgres refused twice over
        // (the put-off refused too) would be claimed and sent
        // again at every tick: when they were all the tick had,
        // held off the same way (with rows delivered beside them
        // the relay is making progress, and keeps it).
        let stuck = matches!(report.settle_refused, Some((_, _, _, Kept::Due))) && report.delivered == 0;
        if stuck || (refused && report.claimed > 0 && report.deferred >= report.claimed) {
            let hold = self.settings.retry.backoff(self.refused_streak).min(REFUSAL_HOLD_MAX);
            self.refused_streak = self.refused_streak.saturating_add(1);
            self.refusal_hold = Some(now + hold);
            self.heard.set_holding(true);
            let why = if stuck {
                "postgres refused the settle and the put-off of rows that stay"
            } else {
                "redis refused every row of the batch"
            };
            warn!(self.core.log, "{}; this relay claims nothing until the hold ends, so relays that can deliver take the rows", why;
                "rows" => report.claimed, "hold_ms" => hold.as_millis() as u64, "refused_batches_in_a_row" => self.refused_streak);
        } else if report.deferred < report.claimed {
            // A delivery: the Redis path works again (an empty
            // claim shows nothing; the listen lead waits for this).
            self.refused_streak = 0;
            self.refusal_hold = None;
            self.heard.set_holding(false);
        }
    }

    /// A failed tick: counted, logged, and the actor failed when its
    /// connection is lost or its error budget is spent (`None`).
    fn after_failure(&mut self, e: TickError, ctx: &mut Context<Self>) -> Option<Pace> {
        let streak = self.core.failed(&e.to_string(), e.is_deadline());
        if e.is_deadline() {
            self.stats.ticks_deadline.fetch_add(1, Ordering::Relaxed);
            self.metrics.sweep_ticks.with_label_values(&["deadline"]).inc();
        } else {
            self.stats.ticks_error.fetch_add(1, Ordering::Relaxed);
            self.metrics.sweep_ticks.with_label_values(&["error"]).inc();
        }
        warn!(self.core.log, "sweep tick failed and was rolled back; its rows stay in the outbox";
            "error" => %e, "deadline" => e.is_deadline(), "consecutive_failures" => streak);
        if e.is_connection_lost() {
            fail_dependency(self, ctx, e.to_string());
            return None;
        }
        if self.core.budget_spent(streak) {
            fail_dependency(self, ctx, format!("{streak} consecutive failed ticks, last: {e}"));
            return None;
        }
        Some(Pace::Idle)
    }

    /// Schedule the lane's next tick: a drain lane at its pace; the fresh
    /// lane does not reschedule itself, it runs again only for a wake-up
    /// that came while it ran.
    fn next_for_lane(&mut self, lane: Lane, pace: Pace, fresh_full: bool, ctx: &mut Context<Self>) {
        match lane {
            Lane::Drain => self.schedule(ctx, pace),
            // The fresh lane does not reschedule itself; it runs again only
            // for a wake-up that came while it ran.
            Lane::Fresh => {
                // More new rows than one fresh batch: an idle lane takes over now.
                if fresh_full && !self.stopping {
                    self.start_idle_lane(ctx);
                }
                if std::mem::take(&mut self.fresh_again) && !self.stopping && self.fresh_claim_needed() {
                    ctx.notify(Tick {
                        deadline: Deadline::after(self.settings.tick_timeout),
                        lane: Lane::Fresh,
                    });
                } else {
                    self.fresh_in_flight = false;
                }
            }
        }
    }

    pub(super) fn record(&mut self, lane: Lane, r: &TickReport) {
        let rows = &self.metrics.sweep_rows;
        rows.with_label_values(&["dispatched"]).inc_by(r.delivered as u64);
        rows.with_label_values(&["retried"]).inc_by(r.retried as u64);
        rows.with_label_values(&["dead_lettered"])
            .inc_by(r.dead_lettered as u64);
        rows.with_label_values(&["cancelled"]).inc_by(r.cancelled as u64);
        rows.with_label_values(&["set_aside"]).inc_by(r.set_aside.len() as u64);
        let (from_created, from_due) = (
            self.metrics.delivery_lag.with_label_values(&["created"]),
            self.metrics.delivery_lag.with_label_values(&["due"]),
        );
        for (created, due) in &r.delivery_lags {
            from_created.observe(*created);
            from_due.observe(*due);
        }
        for (id, why) in &r.set_aside {
            // One line per row: rare, and each needs an operator's hand.
            error!(self.core.log, "row cannot be dead-lettered and is set aside in the outbox (run_at = infinity); fix or delete it";
                "outbox_id" => id, "reason" => why);
        }
        self.stats.dispatched.fetch_add(r.delivered as u64, Ordering::Relaxed);
        self.stats.retried.fetch_add(r.retried as u64, Ordering::Relaxed);
        self.stats
            .dead_lettered
            .fetch_add(r.dead_lettered as u64, Ordering::Relaxed);
        if r.claimed > 0 {
            debug!(self.core.log, "sweep tick settled"; "lane" => ?lane,
                "claimed" => r.claimed, "delivered" => r.delivered, "retried" => r.retried,
                "dead_lettered" => r.dead_lettered, "deferred" => r.deferred,
                "claim_us" => r.stage_us[0], "dispatch_us" => r.stage_us[1],
                "settle_us" => r.stage_us[2], "commit_us" => r.stage_us[3]);
        }
        // `rows` is this tick's; `suppressed` counts the ticks since the
        // last line that had the same news.
        let now = std::time::Instant::now();
        if let Some(why) = &r.redis_unavailable {
            self.metrics.redis_unavailable_ticks.inc();
            if let Some(held) = self.warn_throttles[0].pass(now) {
                warn!(self.core.log, "redis unavailable; rows left in the outbox without counting an attempt";
                    "rows" => r.deferred, "error" => why, "suppressed" => held);
            }
        } else if let Some(why) = &r.deferred_reason {
            if let Some(held) = self.warn_throttles[1].pass(now) {
                warn!(self.core.log, "redis refused writes for a reason that is not the rows'; rows will be re-sent after base_backoff without counting an attempt";
                    "rows" => r.deferred, "error" => why, "suppressed" => held);
            }
        }
        if let Some((stage, why, rows, kept)) = &r.settle_refused {
            self.metrics
                .settle_refused_rows
                .with_label_values(&[stage])
                .inc_by(*rows as u64);
            if let Some(held) = self.warn_throttles[4].pass(now) {
                warn!(self.core.log, "postgres refused a write of the tick's settle; the rows stay in the outbox";
                    "write" => *stage, "error" => why, "rows_kept" => rows, "kept" => kept.as_str(),
                    "delivered" => r.delivered, "suppressed" => held);
            }
        }
        if let Some((rows, why)) = &r.journal_refused {
            self.metrics
                .settle_refused_rows
                .with_label_values(&["journal deliveries"])
                .inc_by(*rows as u64);
            if let Some(held) = self.warn_throttles[5].pass(now) {
                warn!(self.core.log, "postgres refused the delivery journal; the rows are delivered but not journaled, and a loss of redis data would not bring them back";
                    "error" => why, "rows" => rows, "suppressed" => held);
            }
        }
        if r.cancelled > 0 {
            if let Some(held) = self.warn_throttles[3].pass(now) {
                info!(self.core.log, "rows of cancelled jobs deleted without being scheduled (their cancel fence is set)";
                    "rows" => r.cancelled, "suppressed" => held);
            }
        }
        if let Some(err) = &r.last_retry_error {
            if let Some(held) = self.warn_throttles[2].pass(now) {
                warn!(self.core.log, "rows failed in redis and will be retried with backoff";
                    "count" => r.retried, "last_error" => err, "suppressed" => held);
            }
        }
        if r.dead_lettered > 0 {
            self.dead_letter.do_send(RowsDeadLettered {
                count: r.dead_lettered,
                last_error: r.last_dead_error.clone().unwrap_or_default(),
            });
        }
    }

    /// The synchronous part of the Tick handler (panics here are contained
    /// by the caller).
    pub(super) fn start_tick(&mut self, msg: Tick, ctx: &mut Context<Self>) {
        fault_point("sweep.tick");
        if msg.lane == Lane::Drain {
            // This tick's claim sees every row committed before now.
            self.woken = false;
        }
        if self.core.expired(msg.deadline, "tick") {
            self.stats.ticks_deadline.fetch_add(1, Ordering::Relaxed);
            self.metrics.sweep_ticks.with_label_values(&["deadline"]).inc();
            match msg.lane {
                Lane::Drain => self.schedule(ctx, Pace::Idle),
                Lane::Fresh => self.fresh_in_flight = false,
            }
            return;
        }
        if let Some(until) = self.refusal_hold.filter(|u| *u > tokio::time::Instant::now()) {
            // On its cadence, holding on purpose: alive, not wedged (the
            // watchdog restarts a sweep silent for five cadences).
            self.core.health.alive();
            match msg.lane {
                Lane::Drain => {
                    let wait = until
                        .saturating_duration_since(tokio::time::Instant::now())
                        .min(self.settings.interval);
                    later(ctx, wait, |act, ctx| act.schedule(ctx, Pace::Drain));
                }
                Lane::Fresh => self.fresh_in_flight = false,
            }
            return;
        }
        let Some(pool) = self.pool.clone() else {
            return;
        };
        let dispatch = self.dispatch.clone();
        let settings = self.settings.clone();
        let started = std::time::Instant::now();
        self.in_flight.send_modify(|n| *n += 1);
        if msg.lane == Lane::Drain {
            self.drain_in_flight += 1;
        }
        let lane = msg.lane;
        let number = self.next_tick;
        self.next_tick += 1;
        self.running.push((number, lane, msg.deadline));
        let skip_paused = self.pauses_seen;
        let rows = self.claim_limit.rows();
        // Only the lead's claims for new rows: their snapshot decides which
        // notifications need a claim, and rows announced but not yet due
        // are found there (rows put back have timers of their own).
        let horizon = lane == Lane::Fresh && self.heard.role() == Role::Lead;
        let from = match (lane, self.cursor) {
            (Lane::Fresh, _) => None,
            (Lane::Drain, Some(c)) if self.last_full_scan.elapsed() < self.full_scan_every => Some(c),
            (Lane::Drain, _) => {
                self.last_full_scan = std::time::Instant::now();
                None
            }
        };
        let tick = async move {
            if wedge_point("sweep.tick") {
                // A tick that never ends (test-only): the watchdog's case.
                std::future::pending::<()>().await;
            }
            run_tick(
                &pool,
                &dispatch,
                &settings,
                lane,
                ClaimPlan {
                    from,
                    skip_paused,
                    rows,
                    horizon,
                },
                msg.deadline,
            )
            .await
        };
        // Spawned, not awaited: other lanes, wake-ups and Stop are handled
        // while this tick runs.
        // Not `run_contained`: the lane's bookkeeping in `finish_tick` must
        // run even when the tick panicked (Stop waits for it).
        ctx.spawn(contain(tick).into_actor(self).map(move |result, act, ctx| {
            guarded(act, ctx, "tick callback", |act, ctx| {
                fault_point("sweep.settled");
                act.finish_tick((number, lane), started, result, ctx)
            });
        }));
    }
}
