//! The pipelined ZADD of one tick, with an outcome per entry.
//!
//! redis-rs fails a whole non-atomic pipeline when one command fails, although
//! the others were applied; `ignore_errors()` gives one reply per command
//! instead, which is exactly what per-row settlement needs (SPEC §3, incident
//! 1). Errors are sorted into three kinds:
//! - about the entry itself (`WRONGTYPE` on its key, the only one):
//!   [`EntryOutcome::Rejected`], an attempt counts;
//! - every other reply error (server state `OOM`, `READONLY`, `LOADING`, …;
//!   an unknown or renamed command; an ACL refusal `NOPERM`; a proxy's or a
//!   module's `ERR`; a code nobody has seen yet): [`EntryOutcome::Deferred`],
//!   re-sent later without counting an attempt, counted by code. A
//!   misconfigured Redis must never be able to dead-letter the outbox
//!   (SPEC §3), so an error is the entry's fault only when we know it is;
//! - no usable reply at all (refused, pool timeout, broken connection):
//!   [`DispatchError::Unavailable`], nothing is counted against any row.
//!
//! A deadline that runs out while the pipeline is in flight is
//! [`DispatchError::Deadline`]: the outcome is unknown, so the caller must
//! not settle anything on its strength.

use std::time::Duration;

use ::redis::Value;

use super::conn::{Redis, RedisConn, RedisPool};
use crate::deadline::{Deadline, Expired};
use crate::domain::{EntryOutcome, ScheduleEntry};

mod cluster;
mod fenced;
mod outcome;

use cluster::zadd_cluster;
use fenced::{apply_replies, build_pipeline, group_by_key};
pub use fenced::{key_slot, FENCED_ZADD};
pub use outcome::{classify, refusal_label, BatchOutcome, DispatchError};

/// Take a connection (PINGed by the pool) within half the time left, so a
/// Redis that is down is reported as such while the tick can still settle.
/// A refusal is [`DispatchError::Unavailable`] with its cause; no answer at
/// all (a stalled server) is [`DispatchError::Deadline`].
pub(crate) async fn checkout(redis: &Redis, deadline: Deadline) -> Result<RedisConn<'_>, DispatchError> {
    deadline.check("redis pool get")?;
    let by = Deadline::after(deadline.remaining() / 2);
    let get = async {
        match &redis.pool {
            RedisPool::Standalone(p) => p.get().await.map(RedisConn::Standalone),
            RedisPool::Cluster(p) => p.get().await.map(RedisConn::Cluster),
        }
    };
    match tokio::time::timeout_at(by.instant(), get).await {
        Ok(Ok(conn)) => {
            redis.last_error.clear();
            Ok(conn)
        }
        Ok(Err(bb8::RunError::User(e))) => Err(DispatchError::Unavailable(format!("pool get: {e}"))),
        Ok(Err(bb8::RunError::TimedOut)) | Err(_) => match redis.last_error.get() {
            Some(cause) if !cause.timeout => Err(DispatchError::Unavailable(format!("pool get: {}", cause.text))),
            _ => Err(DispatchError::Deadline(Expired {
                stage: "redis pool get",
            })),
        },
    }
}

/// Check that Redis answers before `deadline` (a checkout PINGs).
pub async fn ping(redis: &Redis, deadline: Deadline) -> Result<(), DispatchError> {
    let mut conn = checkout(redis, deadline).await?;
    conn.set_response_timeout(deadline.remaining().max(Duration::from_millis(1)));
    let answered = deadline
        .run("redis ping", ::redis::cmd("PING").query_async::<String>(&mut conn))
        .await;
    let Ok(answered) = answered else {
        conn.discard();
        return Err(DispatchError::Deadline(Expired { stage: "redis ping" }));
    };
    match answered {
        Ok(_) => Ok(()),
        Err(e) if e.is_timeout() => Err(DispatchError::Deadline(Expired { stage: "redis ping" })),
        Err(e) => Err(DispatchError::Unavailable(e.to_string())),
    }
}

/// Send all `entries` and report each entry's outcome, in order.
///
/// Standalone: one pipeline. Cluster: a pipeline may not span hash slots, so
/// one pipeline per slot, all sent concurrently; a slot whose node does not
/// answer in time (down, failing over) makes only its own entries
/// `Deferred` (re-sent next tick, no attempt counted), while the other
/// slots are delivered in the same tick.
///
/// With `wait_replicas > 0`, `WAIT n <half the time left>` follows the
/// ZADDs (at the end of the standalone pipeline; once per master in a
/// cluster); entries whose WAIT saw fewer replicas are reported `Deferred`
/// so their rows are re-sent rather than deleted.
///
/// With `mark` (the delivery journal is on), `INFO server replication`
/// ends the standalone pipeline: the node that acknowledged the batch and
/// its replication offset after it ([`BatchOutcome::node`]). A cluster
/// batch spans nodes and carries no mark.
pub async fn zadd_batch(
    redis: &Redis,
    prefix: &str,
    entries: &[ScheduleEntry],
    (wait_replicas, mark): (u32, bool),
    deadline: Deadline,
) -> Result<BatchOutcome, DispatchError> {
    let mut batch = BatchOutcome {
        outcomes: vec![EntryOutcome::Delivered; entries.len()],
        ..BatchOutcome::default()
    };
    if entries.is_empty() {
        return Ok(batch);
    }
    let mut conn = checkout(redis, deadline).await?;
    // The multiplexed connection's own response timeout (500ms by default)
    // must not cut a large pipeline short: give it exactly the time left.
    conn.set_response_timeout(deadline.remaining().max(Duration::from_millis(1)));
    // WAIT must answer while the tick can still settle what it learnt.
    let wait_ms = (deadline.remaining() / 2).as_millis().max(1) as u64;
    // One ZADD per key with all of that key's members: far fewer commands
    // for Redis to run and for us to parse than one per entry. Per-entry
    // outcomes survive: the errors a ZADD can return for well-formed
    // arguments (WRONGTYPE, OOM, READONLY, ...) are about the key or the
    // server, so every entry of the command shares them.
    let groups = group_by_key(entries);
    let Some(cluster) = conn.cluster() else {
        let all: Vec<usize> = (0..groups.len()).collect();
        let mut pipe = build_pipeline(prefix, entries, &groups, &all, wait_replicas, wait_ms);
        if mark {
            pipe.add_command(super::node::info_cmd());
        }
        let answered = deadline.run("redis pipeline", pipe.query_async(&mut conn)).await;
        let Ok(answered) = answered else {
            // No reply before the deadline: the connection may be stuck.
            conn.discard();
            return Err(DispatchError::Deadline(Expired {
                stage: "redis pipeline",
            }));
        };
        let mut replies: Vec<Value> = match answered {
            Ok(v) => v,
            // No answer in time: the outcome is unknown (Redis may have applied it).
            Err(e) if e.is_timeout() => {
                return Err(DispatchError::Deadline(Expired {
                    stage: "redis pipeline",
                }))
            }
            Err(e) => return Err(DispatchError::Unavailable(e.to_string())),
        };
        if mark {
            batch.node = replies.pop().as_ref().and_then(super::node::mark_of);
        }
        apply_replies(&mut batch, &groups, &all, wait_replicas, &replies)?;
        if batch.refused.contains_key("READONLY") {
            // A replica now (a failover): a new connection asks the
            // sentinels again, or resolves the address again.
            conn.discard();
        }
        return Ok(batch);
    };
    let result = zadd_cluster(
        cluster,
        prefix,
        entries,
        &groups,
        wait_replicas,
        wait_ms,
        deadline,
        batch,
    )
    .await;
    if matches!(result, Err(DispatchError::Deadline(_) | DispatchError::Unavailable(_))) {
        // Not one slot answered on this connection. Whether the nodes are
        // down or the connection is wedged, a new one costs little and is
        // the only way out of the latter (other pooled connections may be
        // delivering meanwhile, so no error budget would ever run out).
        conn.discard();
    }
    result
}
