//! The pipelined ZADD of one tick, with an outcome per entry.
//!
//! redis-rs fails a whole non-atomic pipeline when one command fails, although
//! the others were applied; `ignore_errors()` gives one reply per command
//! instead, which is exactly what per-row settlement needs (SPEC §3, incident
//! 1). Errors are sorted into three kinds:
//! - the row's fault (`WRONGTYPE`, …): [`EntryOutcome::Rejected`], an attempt counts;
//! - Redis-wide trouble reported per command (`OOM`, `READONLY`, `LOADING`, …):
//!   [`EntryOutcome::Deferred`], re-sent later without counting an attempt;
//! - no usable reply at all (refused, pool timeout, broken connection):
//!   [`DispatchError::Unavailable`], nothing is counted against any row.
//!
//! A deadline that runs out while the pipeline is in flight is
//! [`DispatchError::Deadline`]: the outcome is unknown, so the caller must
//! not settle anything on its strength.

use std::time::Duration;

use ::redis::{ServerError, Value};

use super::Redis;
use crate::deadline::{Deadline, Expired};

/// One ZADD: `ZADD key score member`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleEntry {
    pub key: String,
    pub score: i64,
    pub member: String,
}

/// What happened to one entry of the pipeline.
#[derive(Debug, Clone, PartialEq)]
pub enum EntryOutcome {
    /// The member is in the sorted set.
    Delivered,
    /// Redis refused this entry for a reason that is the row's fault.
    Rejected(String),
    /// Redis refused for a reason that is not the row's fault; re-send later.
    Deferred(String),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DispatchError {
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Deadline(#[from] Expired),
}

/// Error codes that describe the server's state, not the entry.
const TRANSIENT_CODES: &[&str] = &[
    "LOADING",
    "BUSY",
    "MASTERDOWN",
    "READONLY",
    "OOM",
    "NOREPLICAS",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MOVED",
    "ASK",
    "MISCONF",
    "NOAUTH",
    "NOPERM",
];

fn describe(err: &ServerError) -> String {
    match err.details() {
        Some(detail) => format!("{} {}", err.code(), detail),
        None => err.code().to_string(),
    }
}

/// Sort one server error into the row's fault or Redis's.
pub fn classify(err: &ServerError) -> EntryOutcome {
    let text = describe(err);
    if TRANSIENT_CODES.contains(&err.code()) {
        EntryOutcome::Deferred(text)
    } else {
        EntryOutcome::Rejected(text)
    }
}

/// Take a connection (PINGed by the pool) within half the time left, so a
/// Redis that is down is reported as such while the tick can still settle.
/// A refusal is [`DispatchError::Unavailable`] with its cause; no answer at
/// all (a stalled server) is [`DispatchError::Deadline`].
pub(crate) async fn checkout(
    redis: &Redis,
    deadline: Deadline,
) -> Result<bb8::PooledConnection<'_, bb8_redis::RedisConnectionManager>, DispatchError> {
    deadline.check("redis pool get")?;
    let by = Deadline::after(deadline.remaining() / 2);
    match tokio::time::timeout_at(by.instant(), redis.pool.get()).await {
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
    match deadline
        .run("redis ping", ::redis::cmd("PING").query_async::<String>(&mut *conn))
        .await?
    {
        Ok(_) => Ok(()),
        Err(e) if e.is_timeout() => Err(DispatchError::Deadline(Expired { stage: "redis ping" })),
        Err(e) => Err(DispatchError::Unavailable(e.to_string())),
    }
}

/// Send all `entries` in one pipeline and report each entry's outcome, in order.
///
/// With `wait_replicas > 0` the pipeline ends with `WAIT n <time left>`; if
/// fewer replicas acknowledge, delivered entries are reported `Deferred` so
/// their rows are re-sent rather than deleted.
pub async fn zadd_batch(
    redis: &Redis,
    entries: &[ScheduleEntry],
    wait_replicas: u32,
    deadline: Deadline,
) -> Result<Vec<EntryOutcome>, DispatchError> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let mut conn = checkout(redis, deadline).await?;
    // The multiplexed connection's own response timeout (500ms by default)
    // must not cut a large pipeline short: give it exactly the time left.
    conn.set_response_timeout(deadline.remaining().max(Duration::from_millis(1)));
    // One ZADD per key with all of that key's members: far fewer commands
    // for Redis to run and for us to parse than one per entry. Per-entry
    // outcomes survive: the errors a ZADD can return for well-formed
    // arguments (WRONGTYPE, OOM, READONLY, ...) are about the key or the
    // server, so every entry of the command shares them.
    let groups = group_by_key(entries);
    let mut pipe = ::redis::pipe();
    pipe.ignore_errors();
    for (key, members) in &groups {
        let mut cmd = ::redis::cmd("ZADD");
        cmd.arg(*key);
        for &i in members {
            cmd.arg(entries[i].score).arg(&entries[i].member);
        }
        pipe.add_command(cmd);
    }
    if wait_replicas > 0 {
        let wait_ms = deadline.remaining().as_millis().max(1) as u64;
        pipe.cmd("WAIT").arg(wait_replicas).arg(wait_ms);
    }
    let replies: Vec<Value> = match deadline.run("redis pipeline", pipe.query_async(&mut *conn)).await? {
        Ok(v) => v,
        // No answer in time: the outcome is unknown (Redis may have applied it).
        Err(e) if e.is_timeout() => {
            return Err(DispatchError::Deadline(Expired {
                stage: "redis pipeline",
            }))
        }
        Err(e) => return Err(DispatchError::Unavailable(e.to_string())),
    };
    let expected = groups.len() + usize::from(wait_replicas > 0);
    if replies.len() != expected {
        return Err(DispatchError::Unavailable(format!(
            "pipeline returned {} replies for {} commands",
            replies.len(),
            expected
        )));
    }
    let mut outcomes = vec![EntryOutcome::Delivered; entries.len()];
    for ((_, members), reply) in groups.iter().zip(&replies) {
        if let Value::ServerError(err) = reply {
            let outcome = classify(err);
            for &i in members {
                outcomes[i] = outcome.clone();
            }
        }
    }
    if wait_replicas > 0 {
        let acked = match &replies[groups.len()] {
            Value::Int(n) => *n,
            _ => 0,
        };
        if acked < i64::from(wait_replicas) {
            let why = format!("WAIT: {acked} of {wait_replicas} replicas acknowledged the batch");
            for o in outcomes.iter_mut() {
                if *o == EntryOutcome::Delivered {
                    *o = EntryOutcome::Deferred(why.clone());
                }
            }
        }
    }
    Ok(outcomes)
}

/// Entry indexes grouped by key, keys in order of first appearance.
fn group_by_key(entries: &[ScheduleEntry]) -> Vec<(&str, Vec<usize>)> {
    let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        match index.get(e.key.as_str()) {
            Some(&g) => groups[g].1.push(i),
            None => {
                index.insert(e.key.as_str(), groups.len());
                groups.push((e.key.as_str(), vec![i]));
            }
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error(wire: &str) -> ServerError {
        match ::redis::parse_redis_value(wire.as_bytes()) {
            Ok(Value::ServerError(e)) => e,
            other => panic!("not a server error: {other:?}"),
        }
    }

    #[test]
    fn entries_group_by_key_in_first_seen_order() {
        let e = |k: &str| ScheduleEntry {
            key: k.into(),
            score: 1,
            member: "m".into(),
        };
        let entries = [e("b"), e("a"), e("b"), e("c"), e("a")];
        assert_eq!(
            group_by_key(&entries),
            vec![("b", vec![0, 2]), ("a", vec![1, 4]), ("c", vec![3])]
        );
    }

    #[test]
    fn wrongtype_is_the_rows_fault() {
        let e = server_error("-WRONGTYPE Operation against a key holding the wrong kind of value\r\n");
        assert_eq!(
            classify(&e),
            EntryOutcome::Rejected("WRONGTYPE Operation against a key holding the wrong kind of value".into())
        );
    }

    #[test]
    fn server_wide_conditions_are_deferred() {
        for wire in [
            "-OOM command not allowed when used memory > 'maxmemory'.\r\n",
            "-READONLY You can't write against a read only replica.\r\n",
            "-LOADING Redis is loading the dataset in memory\r\n",
            "-MASTERDOWN Link with MASTER is down\r\n",
        ] {
            assert!(
                matches!(classify(&server_error(wire)), EntryOutcome::Deferred(_)),
                "{wire}"
            );
        }
    }
}
