//! The dispatch to a Redis Cluster: entries grouped by slot, one pipeline
//! per master at once, then (with `wait_replicas`) one `WAIT` per node that
//! took writes.

use ::redis::cluster_async::ClusterConnection;
use ::redis::Value;
use tokio::time::Instant;

use super::fenced::{apply_replies, build_pipeline, group_by_slot, key_slot};
use super::outcome::{BatchOutcome, DispatchError};
use crate::deadline::{Deadline, Expired};
use crate::domain::{EntryOutcome, ScheduleEntry};
use crate::redis::reply::reply_text;
use crate::redis::slots::{cluster_slots, SlotRange};

/// A slot pipeline's replies, or `Err` when it did not answer in time.
type SlotReply = Result<::redis::RedisResult<Vec<Value>>, tokio::time::error::Elapsed>;

/// A slot that answered: the id of the node that ran its pipeline (when it
/// said), and the slot's key groups.
type Answered<'a> = (Option<String>, &'a Vec<usize>);

/// A node (by id, when it said) and the key groups of the slots it ran.
type NodeSlots<'a> = (Option<String>, Vec<&'a Vec<usize>>);

/// A node's `WAIT`: the node's address (when known), and the replicas that
/// acknowledged or why there is no count.
type WaitReply = (Option<String>, Result<i64, String>);

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
///
/// [`zadd_batch`]: super::zadd_batch
#[allow(clippy::too_many_arguments)]
pub(super) async fn zadd_cluster(
    cluster: ClusterConnection,
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
    let (results, topology) = send_slot_pipelines(&cluster, prefix, entries, groups, &slots, durable, by).await;
    let (answered, failed_slots, stalled_slots) = settle_slot_replies(&mut batch, groups, &slots, results, durable);
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
    let by_node = group_by_node(answered);
    let acks = wait_on_nodes(&cluster, &by_node, &masters, wait_replicas, wait_ms, by).await;
    settle_waits(&mut batch, groups, &by_node, acks, wait_replicas);
    Ok(batch)
}

/// Send the pipeline of each slot (key groups of `groups`), all at once,
/// each given up on at `by`; `durable`, each ends with `CLUSTER MYID`, and
/// the cluster's slot map is read meanwhile. The replies in the order of
/// `slots`, and the slot map if it was read.
async fn send_slot_pipelines(
    cluster: &ClusterConnection,
    prefix: &str,
    entries: &[ScheduleEntry],
    groups: &[(&str, Vec<usize>)],
    slots: &[Vec<usize>],
    durable: bool,
    by: Instant,
) -> (Vec<SlotReply>, Option<Vec<SlotRange>>) {
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
        tokio::time::timeout_at(by, cluster_slots(&mut c))
            .await
            .ok()
            .and_then(Result::ok)
    };
    tokio::join!(futures_util::future::join_all(sends), topology)
}

/// Record each slot's replies in `batch`; the entries of a slot that
/// failed or did not answer are marked unreachable. The slots that
/// answered, how many failed, and how many of those did not answer at all.
fn settle_slot_replies<'s>(
    batch: &mut BatchOutcome,
    groups: &[(&str, Vec<usize>)],
    slots: &'s [Vec<usize>],
    results: Vec<SlotReply>,
    durable: bool,
) -> (Vec<Answered<'s>>, usize, usize) {
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
                    replies.pop().as_ref().and_then(reply_text)
                } else {
                    None
                };
                match apply_replies(batch, groups, members, 0, &replies) {
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
    (answered, failed_slots, stalled_slots)
}

/// The slots that answered, by the node that ran them (one WAIT each); a
/// slot whose node did not say which it was stays on its own.
fn group_by_node(answered: Vec<Answered<'_>>) -> Vec<NodeSlots<'_>> {
    let mut by_node: Vec<(Option<String>, Vec<&Vec<usize>>)> = Vec::new();
    for (ran_on, members) in answered {
        match by_node.iter_mut().find(|(id, _)| id.is_some() && *id == ran_on) {
            Some((_, list)) => list.push(members),
            None => by_node.push((ran_on, vec![members])),
        }
    }
    by_node
}

/// `WAIT` on each node of `by_node`, all at once, sent by the address
/// `masters` (the slot map) gives its id, each given up on at `by`. One
/// reply per node, in order.
async fn wait_on_nodes(
    cluster: &ClusterConnection,
    by_node: &[NodeSlots<'_>],
    masters: &[SlotRange],
    wait_replicas: u32,
    wait_ms: u64,
    by: Instant,
) -> Vec<WaitReply> {
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
    futures_util::future::join_all(waits).await
}

/// Each node's `WAIT` reply (`acks`, in the order of `by_node`): below
/// `wait_replicas`, or failed, the delivered entries of its slots are
/// `Deferred` and the shortfall is counted.
fn settle_waits(
    batch: &mut BatchOutcome,
    groups: &[(&str, Vec<usize>)],
    by_node: &[NodeSlots<'_>],
    acks: Vec<WaitReply>,
    wait_replicas: u32,
) {
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
}
