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

use ::redis::{ServerError, Value};

use super::{Redis, RedisConn, RedisPool};
use crate::deadline::{Deadline, Expired};
use crate::domain::{cancel_fence_key, EntryOutcome, ScheduleEntry};

mod cluster;
mod fenced;

use cluster::zadd_cluster;
#[cfg(test)]
use fenced::calls;
use fenced::{apply_replies, build_pipeline, group_by_key, group_by_slot};
pub use fenced::{key_slot, FENCED_ZADD};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DispatchError {
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// Redis's memory is at `redis.max_memory_ratio` of its maxmemory: the
    /// batch was not sent (see `redis::memory`); its rows simply wait.
    #[error("redis memory back-pressure: {0}")]
    BackPressure(String),
    #[error(transparent)]
    Deadline(#[from] Expired),
}

/// Error codes that are about the entry itself: retrying the same entry
/// against the same key cannot help, so they count an attempt.
const ENTRY_CODES: &[&str] = &["WRONGTYPE"];

/// Codes reported under their own name in
/// `outbox_relay_redis_refused_entries_total{code}`; any other is `other`,
/// so a server (or proxy) inventing codes cannot grow the label set.
const KNOWN_CODES: &[&str] = &[
    "ERR",
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
    "EXECABORT",
    "CROSSSLOT",
];

/// The metric label of a refusal's code.
pub fn refusal_label(err: &ServerError) -> &'static str {
    KNOWN_CODES
        .iter()
        .find(|c| **c == err.code())
        .copied()
        .unwrap_or("other")
}

fn describe(err: &ServerError) -> String {
    match err.details() {
        Some(detail) => format!("{} {}", err.code(), detail),
        None => err.code().to_string(),
    }
}

/// Sort one server error into the row's fault or Redis's.
pub fn classify(err: &ServerError) -> EntryOutcome {
    let text = describe(err);
    if ENTRY_CODES.contains(&err.code()) {
        EntryOutcome::Rejected(text)
    } else {
        EntryOutcome::Deferred(text)
    }
}

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

/// What one batch did: an outcome per entry, and what the operator should
/// hear about (the dispatch actor logs and counts these).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchOutcome {
    /// One per entry, in order.
    pub outcomes: Vec<EntryOutcome>,
    /// `WAIT` came back with fewer replicas than asked (pipelines affected,
    /// and the reason of the last one).
    pub wait_shortfalls: u32,
    pub wait_shortfall: Option<String>,
    /// Cluster: entries whose node did not answer (down, failing over).
    pub unreachable: usize,
    pub unreachable_reason: Option<String>,
    /// Entries Redis refused for a reason that is not theirs, by code label.
    pub refused: std::collections::BTreeMap<&'static str, u64>,
}

impl BatchOutcome {
    /// Why nothing of the batch was written, when Redis refused (or a WAIT
    /// shortfall kept back) every entry for a reason that is not theirs:
    /// the batch "succeeded" as a round trip and delivered nothing.
    pub fn refused_every_entry(&self) -> Option<&str> {
        let mut why = None;
        for o in &self.outcomes {
            match o {
                EntryOutcome::Deferred(w) => why = Some(w.as_str()),
                _ => return None,
            }
        }
        why
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
pub async fn zadd_batch(
    redis: &Redis,
    prefix: &str,
    entries: &[ScheduleEntry],
    wait_replicas: u32,
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
        let pipe = build_pipeline(prefix, entries, &groups, &all, wait_replicas, wait_ms);
        let answered = deadline.run("redis pipeline", pipe.query_async(&mut conn)).await;
        let Ok(answered) = answered else {
            // No reply before the deadline: the connection may be stuck.
            conn.discard();
            return Err(DispatchError::Deadline(Expired {
                stage: "redis pipeline",
            }));
        };
        let replies: Vec<Value> = match answered {
            Ok(v) => v,
            // No answer in time: the outcome is unknown (Redis may have applied it).
            Err(e) if e.is_timeout() => {
                return Err(DispatchError::Deadline(Expired {
                    stage: "redis pipeline",
                }))
            }
            Err(e) => return Err(DispatchError::Unavailable(e.to_string())),
        };
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
    fn key_slots_match_redis_cluster() {
        // Values from `CLUSTER KEYSLOT` (and the redis-rs router).
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("bar"), 5061);
        assert_eq!(key_slot("{user1000}.following"), key_slot("user1000"));
        assert_eq!(key_slot("foo{}{bar}"), key_slot("foo{}{bar}"));
        assert_ne!(key_slot("foo{}{bar}"), key_slot("bar"));
        for key in [
            "hover:sched:9f1c1ad6-1a4b-4c43-a8f2-2f7d4a9a0c11",
            "a",
            "",
            "{x}y",
            "x{y",
        ] {
            assert_eq!(
                ::redis::cluster_routing::Slot::new(key_slot(key)),
                Some(::redis::cluster_routing::Slot::for_key(key)),
                "{key}"
            );
        }
    }

    #[test]
    fn a_cancel_fence_shares_its_schedule_keys_slot_and_names_one_job() {
        // Job ids chosen to meet: ids with tags of their own, braces that
        // make no tag, the same tag twice, and ids spelling another form's
        // fence (`{hover:sched:j}` is form 2's tag of job `j`).
        let jobs = [
            "9f1c1ad6-1a4b-4c43-a8f2-2f7d4a9a0c11",
            "2b0f7f5e-0c7e-4d38-9d55-5b1a3f0e9e42",
            "job{1}",
            "job{1}x",
            "{1}",
            "job{",
            "{}",
            "job}1",
            "job}2",
            "j",
            "{hover:sched:j}",
            "j:cancelled:j:x",
            "s0}:hover:sched:j",
            "{s0}:hover:sched:job}1",
        ];
        for prefix in ["hover:", "", "{hover}:", "{t1}:", "a{b}c:", "x"] {
            let mut seen = std::collections::HashMap::new();
            for job in jobs {
                let sched = crate::domain::schedule_key(prefix, job);
                let fence = cancel_fence_key(prefix, &sched);
                assert_ne!(fence, sched);
                assert!(fence.starts_with(&format!("{prefix}cancelled:")), "{fence}");
                assert_eq!(key_slot(&fence), key_slot(&sched), "{prefix:?} {job:?}: {fence}");
                if let Some(other) = seen.insert(fence.clone(), job) {
                    panic!("{prefix:?}: jobs {other:?} and {job:?} share the fence {fence}");
                }
                // No fence is any job's schedule key.
                assert!(!jobs.iter().any(|j| crate::domain::schedule_key(prefix, j) == fence));
            }
        }
        // The default prefix with UUID ids keeps the fence of earlier
        // releases, so a cancel made before an upgrade still holds.
        assert_eq!(
            cancel_fence_key("hover:", "hover:sched:9f1c1ad6-1a4b-4c43-a8f2-2f7d4a9a0c11"),
            "hover:cancelled:{hover:sched:9f1c1ad6-1a4b-4c43-a8f2-2f7d4a9a0c11}"
        );
    }

    #[test]
    fn script_calls_hold_up_to_their_size_and_big_keys_alone() {
        let g = |n: usize| ("k", (0..n).collect::<Vec<usize>>());
        let groups = vec![g(150), g(40), g(20), g(500), g(10), g(199)];
        let all: Vec<usize> = (0..groups.len()).collect();
        assert_eq!(
            calls(&groups, &all),
            vec![vec![0, 1], vec![2], vec![3], vec![4], vec![5]]
        );
        assert_eq!(calls(&groups, &[]), Vec::<Vec<usize>>::new());
    }

    #[test]
    fn key_groups_split_by_slot() {
        let groups = vec![
            ("foo", vec![0]),
            ("bar", vec![1]),
            ("{foo}x", vec![2]),
            ("{bar}", vec![3]),
        ];
        assert_eq!(group_by_slot(&groups), vec![vec![0, 2], vec![1, 3]]);
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
    fn every_other_error_is_deferred_and_labelled_boundedly() {
        for (wire, label) in [
            ("-OOM command not allowed when used memory > 'maxmemory'.\r\n", "OOM"),
            ("-READONLY You can't write against a read only replica.\r\n", "READONLY"),
            ("-LOADING Redis is loading the dataset in memory\r\n", "LOADING"),
            ("-MASTERDOWN Link with MASTER is down\r\n", "MASTERDOWN"),
            ("-ERR unknown command 'ZADD', with args beginning with: \r\n", "ERR"),
            (
                "-NOPERM User relay has no permissions to run the 'zadd' command\r\n",
                "NOPERM",
            ),
            ("-ERR proxy refused\r\n", "ERR"),
            ("-WEIRDNEWCODE something a module says\r\n", "other"),
        ] {
            let e = server_error(wire);
            assert!(matches!(classify(&e), EntryOutcome::Deferred(_)), "{wire}");
            assert_eq!(refusal_label(&e), label, "{wire}");
        }
    }
}
