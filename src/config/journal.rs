//! `[journal]`: the delivery journal (what was written to Redis, kept a
//! while so entries Redis loses can be written again), with its check.

use serde::{Deserialize, Serialize};

use super::duration::Dur;

/// The shortest `journal.keep` (besides `"0s"`, off): retention empties
/// one of 16 slots at a time, each `keep / 13` wide (3s at this least), a
/// whole slice before it is written again, and its TRUNCATE gives up
/// after a lock wait of 1s.
pub const MIN_KEEP_SECS: u64 = 30;
/// The longest `journal.keep`.
pub const MAX_KEEP_SECS: u64 = 30 * 24 * 3600;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JournalConfig {
    /// how long each delivered row is kept in `outbox_relay_journal` (member, key,
    /// score, the Redis node that acknowledged it), so entries Redis loses can be
    /// written again; `"0s"` turns the journal off (at least `30s`, at most `30d`)
    pub keep: Dur,
    /// SQL run before lost entries are written again, with `$1` the candidates' task
    /// ids as `text[]`: it returns (as its first column) the task ids the application
    /// still considers waiting; `""` writes every lost entry again
    pub still_pending: String,
    /// how often each Redis node is checked for lost data (a restart, a failover, a
    /// marker key gone)
    pub watch_interval: Dur,
    /// journaled entries examined per second at most while lost entries are written
    /// again, so a reconcile does not starve the drain
    pub reconcile_rate: u32,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            keep: Dur::secs(0),
            still_pending: String::new(),
            watch_interval: Dur::secs(5),
            reconcile_rate: 20_000,
        }
    }
}

impl JournalConfig {
    /// Whether delivered rows are journaled.
    pub fn on(&self) -> bool {
        !self.keep.0.is_zero()
    }

    /// `journal.*`.
    pub(super) fn check(&self, bad: &mut impl FnMut(&str, String)) {
        let keep = self.keep.0.as_secs();
        if self.on() && !(MIN_KEEP_SECS..=MAX_KEEP_SECS).contains(&keep) {
            bad("journal.keep", "must be \"0s\" (off) or between 30s and 30d".into());
        }
        if self.watch_interval.0.is_zero() || self.watch_interval.0.as_secs() > 30 {
            bad(
                "journal.watch_interval",
                "must be greater than 0 and at most 30s (a loss is repaired within 30s of Redis answering again)"
                    .into(),
            );
        }
        // Retention empties each slot in the two slices before it is
        // written (`domain::journal::slots_ahead`): a round at least every
        // two slices.
        let slice = self.keep.0.as_secs().div_ceil(13).max(1);
        if self.on() && self.watch_interval.0 >= std::time::Duration::from_secs(2 * slice) {
            bad(
                "journal.watch_interval",
                format!(
                    "must be under {}s with journal.keep = {keep}s: retention runs in the watch's rounds, at least one in every two slices of keep/13",
                    2 * slice
                ),
            );
        }
        if self.reconcile_rate == 0 {
            bad("journal.reconcile_rate", "must be greater than 0".into());
        }
        let sql = self.still_pending.trim();
        if !sql.is_empty() && !sql.contains("$1") {
            bad(
                "journal.still_pending",
                "must use $1 (the candidates' task ids, text[]), or be \"\"".into(),
            );
        }
        if !sql.is_empty() && !self.on() {
            bad(
                "journal.still_pending",
                "is set but journal.keep is \"0s\": nothing is journaled to check".into(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(c: &JournalConfig) -> Vec<(String, String)> {
        let mut out = Vec::new();
        c.check(&mut |k: &str, m: String| out.push((k.to_string(), m)));
        out
    }

    #[test]
    fn off_by_default_and_valid() {
        let c = JournalConfig::default();
        assert!(!c.on());
        assert!(problems(&c).is_empty());
    }

    #[test]
    fn keep_is_off_or_between_30s_and_30d() {
        for (secs, ok) in [
            (0, true),
            (29, false),
            (30, true),
            (3600, true),
            (MAX_KEEP_SECS, true),
            (MAX_KEEP_SECS + 1, false),
        ] {
            let c = JournalConfig {
                keep: Dur::secs(secs),
                ..JournalConfig::default()
            };
            assert_eq!(problems(&c).is_empty(), ok, "keep {secs}s: {:?}", problems(&c));
        }
    }

    #[test]
    fn still_pending_needs_its_parameter_and_the_journal() {
        let on = |sql: &str| JournalConfig {
            keep: Dur::secs(3600),
            still_pending: sql.into(),
            ..JournalConfig::default()
        };
        assert!(problems(&on("SELECT id::text FROM tasks WHERE id::text = ANY($1)")).is_empty());
        let p = problems(&on("SELECT id::text FROM tasks"));
        assert_eq!(p[0].0, "journal.still_pending");
        let off = JournalConfig {
            still_pending: "SELECT unnest($1::text[])".into(),
            ..JournalConfig::default()
        };
        assert!(problems(&off)[0].1.contains("journal.keep"), "{:?}", problems(&off));
    }

    #[test]
    fn the_watch_comes_often_enough_for_retention() {
        let c = JournalConfig {
            keep: Dur::secs(30),
            watch_interval: Dur::secs(7),
            ..JournalConfig::default()
        };
        assert_eq!(problems(&c)[0].0, "journal.watch_interval");
        let c = JournalConfig {
            keep: Dur::secs(30),
            ..JournalConfig::default()
        };
        assert!(problems(&c).is_empty(), "the shipped 5s fits the shortest keep");
    }

    #[test]
    fn the_watch_repairs_within_30s() {
        let c = JournalConfig {
            watch_interval: Dur::secs(31),
            ..JournalConfig::default()
        };
        assert_eq!(problems(&c)[0].0, "journal.watch_interval");
    }
}
