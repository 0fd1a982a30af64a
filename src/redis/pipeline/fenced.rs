//! The fenced write: the script that checks a job's cancel fence and adds
//! its entries in one atomic step, how entries are grouped into its calls,
//! and how its replies become entry outcomes.

use ::redis::Value;

use super::outcome::{classify, refusal_label, BatchOutcome, DispatchError};
use crate::domain::{cancel_fence_key, EntryOutcome, ScheduleEntry};

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
pub(super) const FENCED: i64 = -1;

/// Entries per schedule-script call, at most (a key with more is one call
/// of its own). A script runs atomically, so one call for a whole large
/// batch would make a live row's write wait behind all of it (measured:
/// backlog p99 13–23 ms with one call per 1,000-row batch against 8–12 ms
/// with plain ZADDs); calls of this size interleave with other connections'
/// while costing few script invocations per batch.
pub(super) const ENTRIES_PER_CALL: usize = 200;

/// `members` cut into the key groups of each script call, in order.
pub(super) fn calls(groups: &[(&str, Vec<usize>)], members: &[usize]) -> Vec<Vec<usize>> {
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
pub(super) fn build_pipeline(
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
pub(super) fn apply_replies(
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
pub(super) fn group_by_slot(groups: &[(&str, Vec<usize>)]) -> Vec<Vec<usize>> {
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
pub(super) fn group_by_key(entries: &[ScheduleEntry]) -> Vec<(&str, Vec<usize>)> {
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
}
