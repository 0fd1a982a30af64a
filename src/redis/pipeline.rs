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

/// The cluster half of [`zadd_batch`]: one ZADD pipeline per hash slot, all
/// at once; then, with `wait_replicas`, one `WAIT` per node that took
/// writes. WAIT is not put in the per-slot pipelines: a master runs a
/// connection's commands in order and WAIT blocks that connection, so a
/// shortfall would cost one WAIT timeout per slot instead of one per node.
///
/// The WAIT must reach the node that ran the ZADDs, not the node some slot
/// map says owns the slot: during a failover or a resharding the client's
/// map, ours and the cluster's disagree for a moment (a master that was
/// killed and restarted believes it still owns its slots until gossip
/// demotes it, and accepts writes it then throws away). So each slot
/// pipeline ends with `CLUSTER MYID`, answered by whichever node finally
/// ran it after the redirects the client followed, and the WAIT goes to
/// that node by address. One window remains: WAIT counts the writes of the
/// connection it arrives on, so if the client reconnected to that node
/// between the ZADDs and the WAIT, the WAIT is satisfied at once (it needs
/// a connection loss and then the node's death within one batch).
#[allow(clippy::too_many_arguments)]
async fn zadd_cluster(
    cluster: ::redis::cluster_async::ClusterConnection,
    prefix: &str,
    entries: &[ScheduleEntry],
    groups: &[(&str, Vec<usize>)],
    wait_replicas: u32,
    wait_ms: u64,
    deadline: Deadline,
    mut batch: BatchOutcome,
) -> Result<BatchOutcome, DispatchError> {
    // A slot that has not answered by three quarters of the time left is
    // given up on, so the tick can still settle the slots that did answer.
    let by = deadline.instant() - deadline.remaining() / 4;
    let durable = wait_replicas > 0;
    let slots = group_by_slot(groups);
    let sends = slots.iter().map(|members| {
        let mut pipe = build_pipeline(prefix, entries, groups, members, 0, 0);
        if durable {
            pipe.cmd("CLUSTER").arg("MYID");
        }
        // Routed by the slot explicitly: the client would take MYID for a key.
        let to = ::redis::cluster_routing::SingleNodeRoutingInfo::SpecificNode(::redis::cluster_routing::Route::new(
            key_slot(groups[members[0]].0),
            ::redis::cluster_routing::SlotAddr::Master,
        ));
        let count = pipe.len();
        let mut c = cluster.clone();
        async move { tokio::time::timeout_at(by, c.route_pipeline(pipe, 0, count, to)).await }
    });
    // Node ids to addresses, read while the ZADDs run (ids and addresses
    // do not change when slots move).
    let topology = async {
        if !durable {
            return None;
        }
        let mut c = cluster.clone();
        tokio::time::timeout_at(by, super::cluster_slots(&mut c))
            .await
            .ok()
            .and_then(Result::ok)
    };
    let (results, topology) = tokio::join!(futures_util::future::join_all(sends), topology);
    let mut failed_slots = 0;
    let mut stalled_slots = 0;
    // (the id of the node that ran the slot's pipeline, the slot's key groups)
    let mut answered: Vec<(Option<String>, &Vec<usize>)> = Vec::new();
    for (members, result) in slots.iter().zip(results) {
        let slot = key_slot(groups[members[0]].0);
        let mut unknown = false;
        let why = match result {
            Ok(Ok(mut replies)) => {
                let ran_on = if durable {
                    replies.pop().as_ref().and_then(super::reply_text)
                } else {
                    None
                };
                match apply_replies(&mut batch, groups, members, 0, &replies) {
                    Ok(()) => {
                        answered.push((ran_on, members));
                        continue;
                    }
                    Err(e) => e.to_string(),
                }
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => {
                stalled_slots += 1;
                unknown = true;
                "no answer before the tick deadline".to_string()
            }
        };
        failed_slots += 1;
        let why = format!("redis cluster node for slot {slot} unreachable: {why}");
        for &g in members {
            for &i in &groups[g].1 {
                // Sent and unanswered: it may have landed with its score.
                batch.outcomes[i] = if unknown {
                    EntryOutcome::Unknown(why.clone())
                } else {
                    EntryOutcome::Deferred(why.clone())
                };
                batch.unreachable += 1;
            }
        }
        batch.unreachable_reason = Some(why);
    }
    if stalled_slots == slots.len() {
        // Not one node answered in time: a stall, like a frozen standalone
        // server. It counts toward the dispatch actor's error budget, whose
        // restart builds a fresh cluster connection from the seed nodes.
        return Err(DispatchError::Deadline(Expired {
            stage: "redis cluster pipelines",
        }));
    }
    if failed_slots == slots.len() {
        // Nothing answered: the cluster as a whole is unreachable.
        return Err(DispatchError::Unavailable(
            batch
                .unreachable_reason
                .unwrap_or_else(|| "redis cluster unreachable".into()),
        ));
    }
    if !durable || answered.is_empty() {
        return Ok(batch);
    }

    let masters = topology.unwrap_or_default();
    let mut by_node: Vec<(Option<String>, Vec<&Vec<usize>>)> = Vec::new();
    for (ran_on, members) in answered {
        match by_node.iter_mut().find(|(id, _)| id.is_some() && *id == ran_on) {
            Some((_, list)) => list.push(members),
            None => by_node.push((ran_on, vec![members])),
        }
    }
    let waits = by_node.iter().map(|(id, _)| {
        let addr = id.as_ref().and_then(|id| {
            masters
                .iter()
                .find(|r| r.master_id.as_deref() == Some(id.as_str()))
                .map(|r| r.master.clone())
        });
        let mut c = cluster.clone();
        async move {
            let Some(addr) = addr else {
                let why = match id {
                    None => "the node that took the writes did not say which it was",
                    Some(_) => "the node that took the writes is not a master in the cluster's slot map",
                };
                return (None, Err(why.to_string()));
            };
            let Some((host, port)) = addr
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.to_string(), p.parse().ok()?)))
            else {
                return (Some(addr.clone()), Err(format!("unusable node address {addr}")));
            };
            let mut wait = ::redis::cmd("WAIT");
            wait.arg(wait_replicas).arg(wait_ms);
            let to = ::redis::cluster_routing::RoutingInfo::SingleNode(
                ::redis::cluster_routing::SingleNodeRoutingInfo::ByAddress { host, port },
            );
            let acked = match tokio::time::timeout_at(by, c.route_command(wait, to)).await {
                Ok(Ok(Value::Int(n))) => Ok(n),
                Ok(Ok(other)) => Err(format!("unexpected WAIT reply {other:?}")),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("no answer before the tick deadline".to_string()),
            };
            (Some(addr), acked)
        }
    });
    let acks = futures_util::future::join_all(waits).await;
    for ((_, members), (addr, acked)) in by_node.iter().zip(acks) {
        let on = addr.as_deref().unwrap_or("?");
        let why = match acked {
            Ok(n) if n >= i64::from(wait_replicas) => continue,
            Ok(n) => format!("WAIT: {n} of {wait_replicas} replicas acknowledged the batch on {on}"),
            Err(e) => format!("WAIT on {on} failed: {e}"),
        };
        for list in members {
            for &g in *list {
                for &i in &groups[g].1 {
                    if batch.outcomes[i] == EntryOutcome::Delivered {
                        batch.outcomes[i] = EntryOutcome::Deferred(why.clone());
                    }
                }
            }
        }
        batch.wait_shortfalls += 1;
        batch.wait_shortfall = Some(why);
    }
    Ok(batch)
}

/// The schedule writes of one pipeline, in one script call: for each key
/// (KEYS holds schedule key, fence key pairs; ARGV holds, per key, the
/// number of score/member values and then those values) the ZADD of all
/// of its members, unless the job's cancel fence exists (same slot), which
/// answers `-1` for that key. Checked by Redis in the same atomic step as
/// the write, so a ZADD sent before a `cancel-job` and executed after it (a
/// stalled server, a black-holed network) cannot recreate the cancelled
/// schedule. The answer is one element per key, in order: the ZADD's count,
/// `-1`, or the ZADD's own error (WRONGTYPE, OOM, …, code kept), so
/// classification is the same as for plain ZADDs. ZADDs go in chunks (Lua's
/// `unpack` is limited to a few thousand values). Several keys per call,
/// not one: a script call costs Redis 2–3 times a ZADD (measured,
/// docs/BENCHMARKS.md).
pub const FENCED_ZADD: &str = "local out = {}
local a = 1
for k = 1, #KEYS, 2 do
  local n = tonumber(ARGV[a])
  a = a + 1
  if redis.call('EXISTS', KEYS[k + 1]) == 1 then
    out[#out + 1] = -1
  else
    local added, failed = 0, nil
    for i = a, a + n - 1, 1000 do
      local r = redis.pcall('ZADD', KEYS[k], unpack(ARGV, i, math.min(i + 999, a + n - 1)))
      if type(r) == 'table' and r.err then
        failed = r
        break
      end
      added = added + r
    end
    out[#out + 1] = failed or added
  end
  a = a + n
end
return out";

/// What [`FENCED_ZADD`] answers for a key whose job is cancelled.
const FENCED: i64 = -1;

/// Entries per schedule-script call, at most (a key with more is one call
/// of its own). A script runs atomically, so one call for a whole large
/// batch would make a live row's write wait behind all of it (measured:
/// backlog p99 13–23 ms with one call per 1,000-row batch against 8–12 ms
/// with plain ZADDs); calls of this size interleave with other connections'
/// while costing few script invocations per batch.
const ENTRIES_PER_CALL: usize = 200;

/// `members` cut into the key groups of each script call, in order.
fn calls(groups: &[(&str, Vec<usize>)], members: &[usize]) -> Vec<Vec<usize>> {
    let mut calls: Vec<Vec<usize>> = Vec::new();
    let mut size = 0;
    for &g in members {
        let n = groups[g].1.len();
        if calls.is_empty() || size + n > ENTRIES_PER_CALL {
            calls.push(Vec::new());
            size = 0;
        }
        if let Some(last) = calls.last_mut() {
            last.push(g);
        }
        size += n;
    }
    calls
}

/// The pipeline for the key groups `members` (indexes into `groups`):
/// [`FENCED_ZADD`] calls of up to [`ENTRIES_PER_CALL`] entries, then
/// `WAIT` if asked.
fn build_pipeline(
    prefix: &str,
    entries: &[ScheduleEntry],
    groups: &[(&str, Vec<usize>)],
    members: &[usize],
    wait_replicas: u32,
    wait_ms: u64,
) -> ::redis::Pipeline {
    let mut pipe = ::redis::pipe();
    pipe.ignore_errors();
    for call in calls(groups, members) {
        let mut cmd = ::redis::cmd("EVAL");
        cmd.arg(FENCED_ZADD).arg(call.len() * 2);
        for &g in &call {
            let key = groups[g].0;
            cmd.arg(key).arg(cancel_fence_key(prefix, key));
        }
        for &g in &call {
            let idx = &groups[g].1;
            cmd.arg(idx.len() * 2);
            for &i in idx {
                cmd.arg(entries[i].score).arg(&entries[i].member);
            }
        }
        pipe.add_command(cmd);
    }
    if wait_replicas > 0 {
        pipe.cmd("WAIT").arg(wait_replicas).arg(wait_ms);
    }
    pipe
}

/// Record the replies of one pipeline built by [`build_pipeline`].
fn apply_replies(
    batch: &mut BatchOutcome,
    groups: &[(&str, Vec<usize>)],
    members: &[usize],
    wait_replicas: u32,
    replies: &[Value],
) -> Result<(), DispatchError> {
    let calls = calls(groups, members);
    let expected = calls.len() + usize::from(wait_replicas > 0);
    if replies.len() != expected {
        return Err(DispatchError::Unavailable(format!(
            "pipeline returned {} replies for {} commands",
            replies.len(),
            expected
        )));
    }
    // One element per key group of each call; an error for a whole call
    // (the script refused before it ran: OOM, NOPERM on EVAL, a proxy's)
    // is each of its groups'.
    let mut per_group: Vec<&Value> = Vec::with_capacity(members.len());
    for (call, reply) in calls.iter().zip(replies) {
        match reply {
            Value::Array(items) if items.len() == call.len() => per_group.extend(items.iter()),
            whole @ Value::ServerError(_) => per_group.extend(std::iter::repeat_n(whole, call.len())),
            other => {
                return Err(DispatchError::Unavailable(format!(
                    "unexpected reply to the schedule script: {other:?}"
                )))
            }
        }
    }
    for (&g, reply) in members.iter().zip(per_group) {
        if let Value::Int(FENCED) = reply {
            for &i in &groups[g].1 {
                batch.outcomes[i] = EntryOutcome::Cancelled;
            }
        } else if let Value::ServerError(err) = reply {
            let outcome = classify(err);
            if matches!(outcome, EntryOutcome::Deferred(_)) {
                *batch.refused.entry(refusal_label(err)).or_default() += groups[g].1.len() as u64;
            }
            for &i in &groups[g].1 {
                batch.outcomes[i] = outcome.clone();
            }
        }
    }
    if wait_replicas > 0 {
        let acked = match &replies[calls.len()] {
            Value::Int(n) => *n,
            _ => 0,
        };
        if acked < i64::from(wait_replicas) {
            let why = format!("WAIT: {acked} of {wait_replicas} replicas acknowledged the batch");
            for &g in members {
                for &i in &groups[g].1 {
                    if batch.outcomes[i] == EntryOutcome::Delivered {
                        batch.outcomes[i] = EntryOutcome::Deferred(why.clone());
                    }
                }
            }
            batch.wait_shortfalls += 1;
            batch.wait_shortfall = Some(why);
        }
    }
    Ok(())
}

/// Key groups (indexes into `groups`) that share a hash slot, in order of
/// first appearance: one cluster pipeline each.
fn group_by_slot(groups: &[(&str, Vec<usize>)]) -> Vec<Vec<usize>> {
    let mut index: std::collections::HashMap<u16, usize> = std::collections::HashMap::new();
    let mut slots: Vec<Vec<usize>> = Vec::new();
    for (g, (key, _)) in groups.iter().enumerate() {
        let slot = key_slot(key);
        match index.get(&slot) {
            Some(&s) => slots[s].push(g),
            None => {
                index.insert(slot, slots.len());
                slots.push(vec![g]);
            }
        }
    }
    slots
}

/// The Redis Cluster hash slot of `key` (see [`crate::domain::hash_slot`]).
pub use crate::domain::hash_slot as key_slot;

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
