//! The delivery journal's rules, pure: which Redis node acknowledged a
//! write ([`NodeMark`]), what one look at a node shows ([`Observation`]),
//! and what two looks in a row say was lost ([`Loss::between`]): a
//! restart, a failover (the promoted replica's `second_repl_offset` says
//! which writes it had), or data that vanished with the node unchanged (the
//! marker key gone: a `FLUSHALL`, an eviction).
//!
//! The retention slots are here too ([`slot_width`]): the journal is 16
//! list partitions, one per time slice of `keep / 13`.

use std::time::Duration;

/// Partitions of `outbox_relay_journal` (migration 8).
pub const SLOTS: u64 = 16;
/// Slices a `keep` spans: 13 of 16, so the slice being written, the 13
/// before it (which hold everything younger than `keep`) and two empty
/// ones ahead (one being emptied) make the 16.
pub const SLICES_PER_KEEP: u64 = 13;

/// How wide one slot's time slice is, in whole seconds (at least 1),
/// rounded up: the 14 slices kept (the one written and 13 before it) must
/// span at least `keep`.
pub fn slot_width(keep: Duration) -> u64 {
    keep.as_secs().div_ceil(SLICES_PER_KEEP).max(1)
}

/// The slots retention empties while slice `now_slice` is written: the
/// next two, so each is empty before anything is written to it.
pub fn slots_ahead(now_slice: u64) -> [u64; 2] {
    [(now_slice + 1) % SLOTS, (now_slice + 2) % SLOTS]
}

/// Whether `slot` is one of [`slots_ahead`] of `now_slice`: not the slot
/// written now, nor one of the 13 before it that hold what `keep` keeps.
pub fn is_ahead(slot: u64, now_slice: u64) -> bool {
    let ahead = (slot + SLOTS - now_slice % SLOTS) % SLOTS;
    ahead == 1 || ahead == 2
}

/// The node that acknowledged a write: its run id (new at every start),
/// its replication id and its replication offset just after the write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeMark {
    pub run_id: String,
    pub replid: String,
    pub offset: i64,
}

/// One look at the Redis node the relay writes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub mark: NodeMark,
    /// `master_replid2`: the replication id this node continued from, when
    /// it was promoted (all zeros otherwise).
    pub replid2: String,
    /// `second_repl_offset`: the first offset of `replid2`'s history this
    /// node did not receive (-1 when not promoted).
    pub second_offset: i64,
    /// Whether the marker key the relay keeps beside the schedules is there.
    pub marker: bool,
}

impl Observation {
    /// The look to compare the next one with: the marker is there now
    /// (the look wrote it when it was missing).
    pub fn after_marking(mut self) -> Observation {
        self.marker = true;
        self
    }
}

/// What was lost, as narrowly as the relay can know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Window {
    /// Every journaled entry (the data set is gone, or when it went is not
    /// known).
    All,
    /// Entries acknowledged under replication id `replid` at `offset` or
    /// later (a promoted replica received everything before `offset`), and
    /// entries whose node is not known.
    After { replid: String, offset: i64 },
    /// Entries journaled in the last `secs` seconds before the loss was
    /// noticed (a restart that kept its data on disk: the writes since the
    /// last fsync), and entries whose node is not known.
    Recent { secs: u64 },
}

/// A loss the relay noticed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loss {
    /// `restart`, `failover` or `vanished`: the label of
    /// `outbox_relay_redis_data_loss_total`.
    pub cause: &'static str,
    pub window: Window,
    /// One sentence for the log line.
    pub detail: String,
}

/// Every cause, for the counter's labels.
pub const CAUSES: &[&str] = &["restart", "failover", "vanished"];

impl Loss {
    /// What changed between `before` (the last look, `None` at start) and
    /// `now`, `since` after it. `None`: nothing was lost.
    ///
    /// - The replication history continues `before`'s (`replid2` is the old
    ///   `replid`): a replica was promoted; it lacks whatever came at or
    ///   after `second_repl_offset`.
    /// - A new run id otherwise: the node restarted. With the marker gone
    ///   it came back empty (no persistence): all of it. With the marker
    ///   there it reloaded its files, which may lack the last second or
    ///   so of writes (`appendfsync everysec`): what was journaled since
    ///   the look before, and a margin.
    /// - Same node, marker gone: the data vanished (`FLUSHALL`,
    ///   `FLUSHDB`, an eviction): all of it.
    /// - At start (no look before): a missing marker is a loss of unknown
    ///   cause when anything was journaled (`journaled`), all of it.
    pub fn between(before: Option<&Observation>, now: &Observation, since: Duration, journaled: bool) -> Option<Loss> {
        let Some(before) = before else {
            return (!now.marker && journaled).then(|| Loss {
                cause: "vanished",
                window: Window::All,
                detail: "the marker key is missing at start while the journal holds deliveries".into(),
            });
        };
        let promoted = !before.mark.replid.is_empty()
            && now.replid2 == before.mark.replid
            && now.mark.replid != before.mark.replid;
        if promoted {
            return Some(Loss {
                cause: "failover",
                window: Window::After {
                    replid: before.mark.replid.clone(),
                    offset: now.second_offset.max(0),
                },
                detail: format!(
                    "a replica was promoted (run id {} → {}); it has replication {} up to offset {}, the old master had reached {}",
                    before.mark.run_id,
                    now.mark.run_id,
                    before.mark.replid,
                    now.second_offset - 1,
                    before.mark.offset
                ),
            });
        }
        // The same node under a new replication history it did not
        // continue from the one seen before (failed over and back between
        // two looks, or a chain of failovers): what it holds is not known.
        if now.mark.run_id == before.mark.run_id
            && !before.mark.replid.is_empty()
            && now.mark.replid != before.mark.replid
        {
            return Some(Loss {
                cause: "failover",
                window: Window::All,
                detail: format!(
                    "the node (run id {}) took a new replication history {} that does not continue {}: failed over and back, or over twice, between two looks",
                    now.mark.run_id, now.mark.replid, before.mark.replid
                ),
            });
        }
        if now.mark.run_id != before.mark.run_id {
            if !now.marker {
                return Some(Loss {
                    cause: "restart",
                    window: Window::All,
                    detail: format!(
                        "redis restarted (run id {} → {}) without its data",
                        before.mark.run_id, now.mark.run_id
                    ),
                });
            }
            return Some(Loss {
                cause: "restart",
                window: Window::Recent {
                    secs: since.as_secs() + RESTART_MARGIN_SECS,
                },
                detail: format!(
                    "redis restarted (run id {} → {}) and reloaded its data; writes since its last fsync may be missing",
                    before.mark.run_id, now.mark.run_id
                ),
            });
        }
        if !now.marker && before.marker {
            return Some(Loss {
                cause: "vanished",
                window: Window::All,
                detail: format!(
                    "the marker key vanished with the node unchanged (run id {}): FLUSHALL, FLUSHDB, DEL or an eviction",
                    now.mark.run_id
                ),
            });
        }
        None
    }
}

/// Seconds before the last look that a restart's window reaches back too
/// (`appendfsync everysec` loses up to about a second; clocks and the
/// look's own round trip the rest).
pub const RESTART_MARGIN_SECS: u64 = 5;

/// The longest a failed reconcile waits before it tries again.
pub const RETRY_CAP: Duration = Duration::from_secs(60);

/// How long a reconcile waits after its `failures`-th failure in a row
/// (1 for the first): one watch interval, doubled per failure, at most
/// [`RETRY_CAP`]. A refusal that lasts (a revoked grant, a Redis out of
/// memory) is tried a minute apart, not every round.
pub fn retry_after(interval: Duration, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    interval.saturating_mul(1 << doublings).min(RETRY_CAP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_from_the_interval_up_to_a_minute() {
        let five = Duration::from_secs(5);
        let waits: Vec<u64> = (1..=7).map(|n| retry_after(five, n).as_secs()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 60, 60, 60]);
        assert_eq!(retry_after(five, 0), five);
        assert_eq!(retry_after(five, u32::MAX), RETRY_CAP);
        assert_eq!(retry_after(Duration::from_millis(250), 2), Duration::from_millis(500));
        assert_eq!(retry_after(Duration::from_secs(600), 1), RETRY_CAP);
    }

    fn look(run_id: &str, replid: &str, offset: i64, marker: bool) -> Observation {
        Observation {
            mark: NodeMark {
                run_id: run_id.into(),
                replid: replid.into(),
                offset,
            },
            replid2: "0000".into(),
            second_offset: -1,
            marker,
        }
    }

    const S: Duration = Duration::from_secs(5);

    #[test]
    fn an_unchanged_node_lost_nothing() {
        let a = look("r1", "x", 100, true);
        let b = look("r1", "x", 900, true);
        assert_eq!(Loss::between(Some(&a), &b, S, true), None);
        // A marker that was never there (written just now) is no loss.
        let first = look("r1", "x", 100, false);
        assert_eq!(Loss::between(Some(&first), &look("r1", "x", 200, false), S, true), None);
    }

    #[test]
    fn a_restart_without_data_loses_everything() {
        let loss = Loss::between(Some(&look("r1", "x", 100, true)), &look("r2", "y", 0, false), S, true).unwrap();
        assert_eq!((loss.cause, loss.window), ("restart", Window::All));
    }

    #[test]
    fn a_restart_that_reloaded_loses_only_recent_writes() {
        let loss = Loss::between(Some(&look("r1", "x", 100, true)), &look("r2", "x", 100, true), S, true).unwrap();
        assert_eq!(loss.cause, "restart");
        assert_eq!(
            loss.window,
            Window::Recent {
                secs: 5 + RESTART_MARGIN_SECS
            }
        );
    }

    #[test]
    fn a_promoted_replica_lost_what_came_after_its_second_offset() {
        let before = look("r1", "old", 5000, true);
        let mut now = look("r9", "new", 4200, true);
        now.replid2 = "old".into();
        now.second_offset = 4001;
        let loss = Loss::between(Some(&before), &now, S, true).unwrap();
        assert_eq!(loss.cause, "failover");
        assert_eq!(
            loss.window,
            Window::After {
                replid: "old".into(),
                offset: 4001
            }
        );
        assert!(loss.detail.contains("up to offset 4000"), "{}", loss.detail);
    }

    #[test]
    fn a_new_history_that_does_not_continue_the_old_one_is_a_failover() {
        let loss = Loss::between(Some(&look("r1", "x", 100, true)), &look("r1", "y", 40, true), S, true).unwrap();
        assert_eq!((loss.cause, loss.window), ("failover", Window::All));
    }

    #[test]
    fn a_flush_is_noticed_by_the_marker() {
        let loss = Loss::between(Some(&look("r1", "x", 100, true)), &look("r1", "x", 120, false), S, true).unwrap();
        assert_eq!((loss.cause, loss.window), ("vanished", Window::All));
    }

    #[test]
    fn at_start_a_missing_marker_counts_only_with_deliveries_journaled() {
        assert_eq!(Loss::between(None, &look("r1", "x", 1, false), S, false), None);
        assert_eq!(Loss::between(None, &look("r1", "x", 1, true), S, true), None);
        let loss = Loss::between(None, &look("r1", "x", 1, false), S, true).unwrap();
        assert_eq!((loss.cause, loss.window), ("vanished", Window::All));
    }

    #[test]
    fn the_counter_knows_every_cause() {
        assert_eq!(CAUSES, crate::telemetry::metrics::LOSS_CAUSES);
    }

    #[test]
    fn slots_cycle_and_only_the_two_ahead_are_emptied() {
        assert_eq!(slot_width(Duration::from_secs(3600)), 277);
        assert_eq!(slot_width(Duration::from_secs(30)), 3);
        for keep in [30, 60, 61, 3600, 86_400, 30 * 86_400] {
            assert!(
                slot_width(Duration::from_secs(keep)) * SLICES_PER_KEEP >= keep,
                "{keep}"
            );
        }
        assert_eq!(slot_width(Duration::from_secs(5)), 1);
        assert_eq!(slots_ahead(0), [1, 2]);
        assert_eq!(slots_ahead(14), [15, 0]);
        assert_eq!(slots_ahead(31), [0, 1]);
        for slice in 0..40 {
            for slot in 0..SLOTS {
                let written_or_kept = (0..=SLICES_PER_KEEP).any(|back| (slice + SLOTS * 4 - back) % SLOTS == slot);
                assert_eq!(is_ahead(slot, slice), !written_or_kept, "slot {slot} at slice {slice}");
            }
        }
    }
}
