//! One probe round's I/O: the outbox count (a transaction under the
//! round's deadline), whether Postgres takes writes, and a Redis PING.

use std::time::Duration;

use crate::db::{column, pg_error_text, Pg};
use crate::deadline::Deadline;
use crate::redis::pipeline::{checkout, DispatchError};
use crate::redis::Redis;
use crate::telemetry::metrics::PROBE_SPACING_MAX;

/// What one probe round found; an `Err` is a probe that failed.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeReport {
    /// None: the outbox probe rested this round ([`probe_spacing`]).
    pub outbox: Option<Result<OutboxProbe, OutboxProbeError>>,
    /// How long the outbox probe took, checkout to COMMIT (or to its
    /// failure).
    pub outbox_took: Duration,
    pub redis_ping: Result<Duration, String>,
    /// Whether Postgres takes writes (`transaction_read_only` off), asked
    /// every round, also while the outbox probe rests; `Err`: no answer.
    pub postgres_writes: Result<bool, String>,
}

/// Why the outbox probe has no figures.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OutboxProbeError {
    /// Postgres answered, but cancelled the count at the probe's statement
    /// timeout: a lock on `task_outbox` (an `ALTER TABLE` waiting, a
    /// `LOCK TABLE`), or more rows than it can count in the round.
    #[error("postgres cancelled the outbox count at its statement timeout ({0}): a lock on task_outbox, or more rows than it can count in one probe round")]
    CutOff(String),
    /// No answer, or an error: Postgres is down, frozen, or takes no writes.
    #[error("{0}")]
    Failed(String),
}

/// How much of the time the outbox probe may keep a server core busy.
const PROBE_DUTY_FACTOR: u32 = 20;

/// How long after a probe that took `took` the next may start: at least
/// `interval`, at least `took` × [`PROBE_DUTY_FACTOR`] (so the count keeps
/// a server core busy at most 1/20 of the time, per relay), at most
/// [`PROBE_SPACING_MAX`] (or `interval`, when that is longer).
pub fn probe_spacing(took: Duration, interval: Duration) -> Duration {
    took.saturating_mul(PROBE_DUTY_FACTOR)
        .min(PROBE_SPACING_MAX)
        .max(interval)
}

/// What the outbox probe read.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct OutboxProbe {
    /// Rows due now.
    pub backlog: i64,
    /// Age in seconds of the oldest due row by `created_at` (0: none due).
    pub oldest_age: f64,
    /// Seconds the earliest due row has been due (`now() - min(run_at)`,
    /// over finite `run_at`s: Postgres cannot subtract `-infinity`, and a
    /// row due then is dead-lettered by the next claim); None: none due.
    pub oldest_due: Option<f64>,
    /// Rows due later (retries in backoff, delayed tasks), not set aside.
    pub delayed: i64,
    pub dead_letters: i64,
    /// Rows set aside (`run_at = 'infinity'`).
    pub set_aside: i64,
    /// Everything is paused (`outbox-relay pause`).
    pub paused_all: bool,
    /// Jobs paused one by one.
    pub paused_jobs: i64,
}

/// An outbox probe as the fleet's heartbeat carries it (`counters.outbox`,
/// read by the console's overview): what it counted, and how long before
/// the heartbeat it did.
pub(super) fn probe_json(p: &OutboxProbe, age: Duration) -> serde_json::Value {
    serde_json::json!({
        "due": p.backlog,
        "delayed": p.delayed,
        "set_aside": p.set_aside,
        "dead_letters": p.dead_letters,
        "oldest_due_seconds": p.oldest_due,
        "probed_seconds_ago": age.as_secs_f64(),
    })
}

/// The outbox probe's count: one transaction under `deadline`.
async fn outbox_counts(pg: &Pg, deadline: Deadline) -> Result<OutboxProbe, OutboxProbeError> {
    // Every step under the deadline, BEGIN and COMMIT too: a frozen server
    // (SIGSTOP, a paused VM, a black-holed network) answers nothing, and a
    // probe that waited for it would hold this actor's mailbox for good.
    let mut conn = pg
        .checkout(deadline)
        .await
        .map_err(|e| OutboxProbeError::Failed(e.to_string()))?;
    let q = |e: tokio_postgres::Error| {
        if e.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) {
            OutboxProbeError::CutOff(pg_error_text(&e))
        } else {
            OutboxProbeError::Failed(pg_error_text(&e))
        }
    };
    let read = async {
        let tx = conn.transaction().await.map_err(q)?;
        // Four fifths of the time left, so a server that answers
        // cancels the count itself (CutOff) before the round's own
        // deadline gives up on it (Failed: no answer at all).
        let statement_ms = (deadline.remaining().as_millis() * 4 / 5).max(1);
        tx.batch_execute(&format!("SET LOCAL statement_timeout = '{statement_ms}ms'"))
            .await
            .map_err(q)?;
        let row = tx
            .query_typed_one(
                "SELECT count(*) FILTER (WHERE run_at <= now()),
                        COALESCE(extract(epoch FROM now() - min(created_at) FILTER (WHERE run_at <= now()
                                                                                 AND isfinite(created_at))), 0)::float8,
                        (SELECT count(*) FROM task_outbox_dead),
                        count(*) FILTER (WHERE run_at = 'infinity'),
                        (SELECT count(*) FILTER (WHERE scope = '*') FROM outbox_relay_pause),
                        (SELECT count(*) FILTER (WHERE scope <> '*') FROM outbox_relay_pause),
                        extract(epoch FROM now() - min(run_at) FILTER (WHERE run_at <= now()
                                                                        AND run_at > '-infinity'))::float8,
                        count(*) FILTER (WHERE run_at > now() AND run_at < 'infinity')
                   FROM task_outbox",
                &[],
            )
            .await
            .map_err(q)?;
        tx.commit().await.map_err(q)?;
        Ok::<_, OutboxProbeError>(row)
    };
    let row = match deadline.run("postgres backlog probe", read).await {
        Ok(r) => r?,
        Err(expired) => {
            pg.cancel_statement(&mut conn).await;
            return Err(OutboxProbeError::Failed(expired.to_string()));
        }
    };
    let failed = |e: crate::db::ColumnError| OutboxProbeError::Failed(e.to_string());
    let col = |i| column::<Option<i64>>(&row, "task_outbox", i).map_err(failed);
    let age = column::<Option<f64>>(&row, "task_outbox", 1).map_err(failed)?;
    Ok::<_, OutboxProbeError>(OutboxProbe {
        backlog: col(0)?.unwrap_or(0),
        oldest_age: age.unwrap_or(0.0).max(0.0),
        dead_letters: col(2)?.unwrap_or(0),
        set_aside: col(3)?.unwrap_or(0),
        paused_all: col(4)?.unwrap_or(0) > 0,
        paused_jobs: col(5)?.unwrap_or(0),
        oldest_due: column::<Option<f64>>(&row, "task_outbox", 6)
            .map_err(failed)?
            .map(|s| s.max(0.0)),
        delayed: col(7)?.unwrap_or(0),
    })
}

/// Probe Postgres (when `count_outbox`) and Redis concurrently, each
/// bounded by `deadline`.
pub async fn probe(pg: &Pg, redis: &Redis, deadline: Deadline, count_outbox: bool) -> ProbeReport {
    let outbox = async {
        if !count_outbox {
            return (None, Duration::ZERO);
        }
        let started = tokio::time::Instant::now();
        let result = outbox_counts(pg, deadline).await;
        (Some(result), started.elapsed())
    };
    let ping = async {
        let started = tokio::time::Instant::now();
        let mut conn = checkout(redis, deadline)
            .await
            .map_err(|e: DispatchError| e.to_string())?;
        conn.set_response_timeout(deadline.remaining().max(Duration::from_millis(1)));
        deadline
            .run("redis ping", ::redis::cmd("PING").query_async::<String>(&mut conn))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(started.elapsed())
    };
    // After the count: the probe pool has one connection.
    let outbox = async {
        let counted = outbox.await;
        (counted, takes_writes(pg, deadline).await)
    };
    let (((outbox, outbox_took), postgres_writes), redis_ping) = tokio::join!(outbox, ping);
    ProbeReport {
        outbox,
        outbox_took,
        redis_ping,
        postgres_writes,
    }
}

/// Whether Postgres takes writes, asked on the probe's connection: a
/// server set read-only behind the same address (or a standby the
/// connection landed on before a failover) still answers every read. A
/// connection to such a server is discarded, so the next round connects
/// again (with a multi-host URL, to the server that takes writes now).
async fn takes_writes(pg: &Pg, deadline: Deadline) -> Result<bool, String> {
    let mut conn = pg.checkout(deadline).await.map_err(|e| e.to_string())?;
    let answer = match deadline
        .run(
            "postgres read-only check",
            conn.simple_query("SHOW transaction_read_only"),
        )
        .await
    {
        Ok(answer) => answer.map_err(|e| pg_error_text(&e))?,
        Err(expired) => {
            pg.cancel_statement(&mut conn).await;
            return Err(expired.to_string());
        }
    };
    let read_only = answer.iter().any(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0) == Some("on"),
        _ => false,
    });
    if read_only {
        conn.discard();
    }
    Ok(!read_only)
}
