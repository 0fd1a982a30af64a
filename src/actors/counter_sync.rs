//! `CounterSyncActor`: copies the running-task counters from the Redis hash
//! `{prefix}running` (job id → in-flight count) to `jobs.running_tasks`.
//!
//! Messages: [`SyncCounters`] (sent to itself every `counter_sync.interval`,
//! carrying its deadline). Owns: a one-connection Postgres pool and a
//! one-connection Redis pool, built in `started`.
//!
//! Rules: an empty hash zeroes every `running`/`pending` job with a non-zero
//! counter; otherwise each job in the hash gets `GREATEST(0, count)` if it is
//! `running` or `pending` (others are left alone). Each job is its own
//! autocommit statement, so no transaction holds several jobs' row locks.
//! Job ids are compared as the type of `jobs.id` (UUID in our schema, TEXT
//! in the Go sweeper's, read at start): fields a UUID column cannot hold
//! and values that are not integers are skipped with a warning naming the
//! field. The skew |redis − previous db value| of
//! each job is logged at debug.
//!
//! Failure: `supervisor.error_budget` failed syncs in a row, or a panic,
//! fail the actor (restart with fresh pools); a Redis that refuses
//! connections only makes it `degraded` (its pool reconnects by itself). A sync past its deadline
//! cancels its statement on the server and counts as `deadline_exceeded`.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use slog::{debug, warn, Logger};

use super::lifecycle::{every, fail_dependency, fault_point, guarded, run_contained, Core, Lifecycle, Mode};
use super::small_pools;
use super::supervisor::Supervision;
use crate::config::RedisConfig;
use crate::db::schema::IdType;
use crate::db::{jobs, CheckoutError, Pg};
use crate::deadline::{Deadline, Expired};
use crate::redis::pipeline::{checkout, DispatchError};
use crate::redis::Redis;
use crate::telemetry::health::ActorHealth;

/// Job updates in flight at once on the one connection (pipelined; each is
/// still its own transaction).
const IN_FLIGHT: usize = 16;

/// Copy the counters before `deadline`.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct SyncCounters {
    pub deadline: Deadline,
}

/// A hash field that was not synced, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    pub field: String,
    pub reason: String,
}

/// Parse the hash into (job, count) pairs, clamping counts to `0..=i32::MAX`
/// (a negative Redis counter must never violate the CHECK constraint). A
/// job id becomes the form `jobs.id` (of type `jobs_id`) holds it in; a
/// field that column cannot hold is skipped.
pub fn parse_counts(fields: Vec<(String, String)>, jobs_id: IdType) -> (Vec<(String, i32)>, Vec<Skip>) {
    let mut counts = Vec::with_capacity(fields.len());
    let mut skipped = Vec::new();
    for (field, value) in fields {
        let candidate = match jobs_id {
            IdType::Uuid => field.trim(),
            IdType::Text => field.as_str(),
        };
        let Some(job) = jobs_id.stored_form(candidate) else {
            skipped.push(Skip {
                reason: format!("field is not a job id jobs.id ({jobs_id}) can hold"),
                field,
            });
            continue;
        };
        match value.trim().parse::<i64>() {
            Ok(n) => counts.push((job, n.clamp(0, i64::from(i32::MAX)) as i32)),
            Err(_) => skipped.push(Skip {
                reason: format!("value {value:?} is not an integer"),
                field,
            }),
        }
    }
    (counts, skipped)
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct SyncReport {
    /// Jobs whose counter was compared (and written when it differed).
    pub synced: usize,
    /// Jobs in the hash that are absent or not running/pending.
    pub left_alone: usize,
    pub skipped: Vec<Skip>,
    /// |redis − previous db value| per synced job.
    pub skews: Vec<(String, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("redis: {0}")]
    Redis(#[from] DispatchError),
    #[error("postgres pool: {0}")]
    Pool(String),
    #[error("postgres: {0}")]
    Query(String),
    #[error(transparent)]
    Deadline(#[from] Expired),
}

/// One sync round (see the module docs for the rules).
pub async fn sync_counters(
    pg: &Pg,
    redis: &Redis,
    hash_key: &str,
    jobs_id: IdType,
    deadline: Deadline,
) -> Result<SyncReport, SyncError> {
    let raw: Vec<(Vec<u8>, Vec<u8>)> = {
        let mut conn = checkout(redis, deadline).await?;
        conn.set_response_timeout(deadline.remaining().max(Duration::from_millis(1)));
        deadline
            .run(
                "redis HGETALL",
                ::redis::cmd("HGETALL").arg(hash_key).query_async(&mut conn),
            )
            .await?
            .map_err(|e| SyncError::Redis(DispatchError::Unavailable(e.to_string())))?
    };
    let fields = raw
        .into_iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(&k).into_owned(),
                String::from_utf8_lossy(&v).into_owned(),
            )
        })
        .collect::<Vec<_>>();
    let hash_empty = fields.is_empty();
    let (mut counts, skipped) = parse_counts(fields, jobs_id);

    let mut conn = pg.checkout(deadline).await.map_err(|e| match e {
        CheckoutError::Deadline(e) => SyncError::Deadline(e),
        CheckoutError::Pool(why) => SyncError::Pool(why),
    })?;
    let work = async {
        if hash_empty {
            let ids = jobs::jobs_with_running_tasks(&**conn).await?;
            counts = ids.into_iter().map(|id| (id, 0)).collect();
        }
        let client: &tokio_postgres::Client = &conn;
        stream::iter(counts.iter())
            .map(|(job, count)| async move {
                jobs::set_running_tasks(client, jobs_id, job, *count)
                    .await
                    .map(|prev| (job.clone(), *count, prev))
            })
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<Vec<_>>()
            .await
    };
    let results = match deadline.run("postgres counter updates", work).await {
        Ok(r) => r.map_err(|e| SyncError::Query(e.text()))?,
        Err(expired) => {
            // Stop the statement on the server too, not just our wait for it.
            pg.cancel_statement(&mut conn).await;
            return Err(expired.into());
        }
    };
    let mut report = SyncReport {
        skipped,
        ..SyncReport::default()
    };
    for (job, count, prev) in results {
        match prev {
            Some(prev) => {
                report.synced += 1;
                report
                    .skews
                    .push((job, (i64::from(count) - prev.unwrap_or(0)).unsigned_abs()));
            }
            None => report.left_alone += 1,
        }
    }
    Ok(report)
}

#[derive(Debug, Clone)]
pub struct CounterSyncSettings {
    pub database_url: String,
    pub redis: RedisConfig,
    pub interval: Duration,
    /// The type of `jobs.id` (read at start).
    pub jobs_id: IdType,
    pub round_timeout: Duration,
    pub error_budget: u32,
}

pub struct CounterSyncActor {
    settings: CounterSyncSettings,
    core: Core,
    pools: Option<(Pg, Redis)>,
    /// Observes each job's skew (the metrics histogram, when wired).
    on_skew: Option<Arc<dyn Fn(u64) + Send + Sync>>,
}

impl CounterSyncActor {
    pub fn new(
        settings: CounterSyncSettings,
        health: Arc<ActorHealth>,
        supervision: Supervision,
        on_skew: Option<Arc<dyn Fn(u64) + Send + Sync>>,
        log: &Logger,
    ) -> Self {
        CounterSyncActor {
            core: Core::new(health, supervision, settings.error_budget, log),
            settings,
            pools: None,
            on_skew,
        }
    }

    fn finish(&mut self, result: Result<SyncReport, SyncError>, ctx: &mut Context<Self>) {
        match result {
            Ok(report) => {
                self.core.health.ok();
                for s in &report.skipped {
                    warn!(self.core.log, "running counter skipped"; "field" => &s.field, "reason" => &s.reason);
                }
                for (job, skew) in &report.skews {
                    if let Some(observe) = &self.on_skew {
                        observe(*skew);
                    }
                    if *skew > 0 {
                        debug!(self.core.log, "running counter corrected"; "job_id" => %job, "skew" => skew);
                    }
                }
                debug!(self.core.log, "counters synced"; "synced" => report.synced, "left_alone" => report.left_alone,
                    "skipped" => report.skipped.len());
            }
            Err(e) => {
                let streak = self.core.failed(&e.to_string(), matches!(e, SyncError::Deadline(_)));
                warn!(self.core.log, "counter sync failed; it runs again next interval";
                    "error" => %e, "consecutive_failures" => streak);
                // Redis refusing connections: degraded, not failed (see DispatchActor).
                let redis_down = matches!(e, SyncError::Redis(DispatchError::Unavailable(_)));
                if !redis_down && self.core.budget_spent(streak) {
                    fail_dependency(self, ctx, format!("{streak} consecutive failed syncs, last: {e}"));
                }
            }
        }
    }
}

impl Lifecycle for CounterSyncActor {
    fn core(&mut self) -> &mut Core {
        &mut self.core
    }

    fn begin(&mut self, ctx: &mut Context<Self>) -> Result<(), String> {
        let s = &self.settings;
        self.pools = Some(small_pools(&s.database_url, &s.redis, s.round_timeout)?);
        every(self, ctx, self.settings.interval, true, |act| SyncCounters {
            deadline: Deadline::after(act.settings.round_timeout),
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.pools = None;
    }
}

crate::supervised_actor!(CounterSyncActor);

impl Handler<SyncCounters> for CounterSyncActor {
    type Result = ();

    fn handle(&mut self, msg: SyncCounters, ctx: &mut Self::Context) {
        guarded(self, ctx, "counter sync handler", |act, ctx| {
            fault_point("counter_sync.round");
            if act.core.expired(msg.deadline, "counter sync") {
                return;
            }
            let Some((pg, redis)) = act.pools.clone() else {
                return;
            };
            let key = format!("{}running", act.settings.redis.key_prefix);
            let jobs_id = act.settings.jobs_id;
            let round = async move { sync_counters(&pg, &redis, &key, jobs_id, msg.deadline).await };
            run_contained(act, ctx, "counter sync", Mode::Wait, round, Self::finish);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_counts_clamps_and_skips_with_reasons() {
        let a = "0b7e5e8a-1c2d-4e3f-8a9b-0c1d2e3f4a5b";
        let b = "6f1c2a52-4a8e-4d8e-9a43-2b1f3c9d7e01";
        let c = "11111111-2222-3333-4444-555555555555";
        let (counts, skipped) = parse_counts(
            vec![
                (a.into(), "7".into()),
                (b.to_uppercase(), "-3".into()),
                (c.into(), "99999999999".into()),
                ("not-a-job".into(), "1".into()),
                (a.to_uppercase(), "lots".into()),
            ],
            IdType::Uuid,
        );
        let own = |v: &[(&str, i32)]| v.iter().map(|(j, n)| (j.to_string(), *n)).collect::<Vec<_>>();
        assert_eq!(counts, own(&[(a, 7), (b, 0), (c, i32::MAX)]));
        assert_eq!(skipped.len(), 2);
        assert_eq!(skipped[0].field, "not-a-job");
        assert!(skipped[0].reason.contains("jobs.id (uuid)"), "{}", skipped[0].reason);
        assert!(skipped[1].reason.contains("\"lots\""));
    }

    #[test]
    fn text_job_ids_are_taken_as_they_are() {
        let (counts, skipped) = parse_counts(
            vec![("job-7".into(), "3".into()), ("Job-7".into(), "4".into())],
            IdType::Text,
        );
        assert_eq!(counts, [("job-7".to_string(), 3), ("Job-7".to_string(), 4)]);
        assert!(skipped.is_empty());
    }
}
