//! How many rows the next claim may take: `sweep.batch_size`, unless the
//! rows are large. A tick holds its rows several times over (the
//! database's reply, the members, the pipeline), so a batch of 1000 rows
//! with 50 KB paths is hundreds of megabytes: an OOM-killed container in a
//! crash loop. [`ClaimLimit`] keeps `limit × largest recent row` within
//! `sweep.max_batch_bytes`, without a cost on the claim itself (a byte
//! bound in SQL, a window over the claimed rows, measured 11–25 % slower
//! per claim; docs/BENCHMARKS.md).
//!
//! After a start or restart the limit is not known ([`ClaimLimit::rows`]
//! is 0): the first tick measures the rows at the head of the queue and
//! sizes itself by them ([`ClaimLimit::first`]). When there are none yet,
//! a slow start follows: [`START`] rows, doubling with each full batch that
//! fits, so a relay that meets a backlog of large rows right after its
//! start never claims a full batch of them. The largest row seen decays by an eighth per tick, so a few large
//! rows among small ones keep the limit down for a while. One tick can
//! still meet large rows right after a run of small ones; it claims at most
//! `batch_size` of them, and the limit is down from the next tick on.

/// The first limit after a start.
pub const START: u32 = 64;

#[derive(Debug, Clone, PartialEq)]
pub struct ClaimLimit {
    batch_size: u32,
    budget: u64,
    current: u32,
    /// The largest row of recent claims, decaying by an eighth per claim.
    largest: u64,
}

impl ClaimLimit {
    pub fn new(batch_size: u32, budget: u64) -> ClaimLimit {
        ClaimLimit {
            batch_size: batch_size.max(1),
            budget: budget.max(1),
            current: 0,
            largest: 0,
        }
    }

    /// Rows the next claim may take; 0 until the first tick has measured
    /// the rows due ([`ClaimLimit::first`]).
    pub fn rows(&self) -> u32 {
        self.current
    }

    /// The first claim's limit, from the largest of the rows at the head
    /// of the queue (0: none due): what fits, or the slow start.
    pub fn first(batch_size: u32, budget: u64, largest: u64) -> u32 {
        if largest == 0 {
            return START.min(batch_size.max(1));
        }
        u32::try_from(budget / largest)
            .unwrap_or(u32::MAX)
            .clamp(1, batch_size.max(1))
    }

    /// Fold in a claim of `claimed` rows under a limit of `limit`, whose
    /// largest row (or the largest due row measured before it) weighed
    /// `largest` bytes.
    pub fn observe(&mut self, claimed: u32, limit: u32, largest: u64) {
        if self.current == 0 {
            // The first tick measured what was due (whatever its lane took).
            self.largest = largest;
            self.current = Self::first(self.batch_size, self.budget, largest);
            return;
        }
        if claimed == 0 {
            return;
        }
        self.largest = (self.largest - self.largest / 8).max(largest);
        let fits = u32::try_from(self.budget / self.largest.max(1))
            .unwrap_or(u32::MAX)
            .max(1);
        let grown = if claimed >= limit {
            self.current.saturating_mul(2)
        } else {
            self.current
        };
        self.current = grown.min(fits).min(self.batch_size).max(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    /// A limit after a first tick that found no row due (the slow start).
    fn started(batch_size: u32, budget: u64) -> ClaimLimit {
        let mut l = ClaimLimit::new(batch_size, budget);
        assert_eq!(l.rows(), 0, "unknown before the first tick");
        l.observe(0, ClaimLimit::first(batch_size, budget, 0), 0);
        l
    }

    #[test]
    fn the_first_tick_sizes_itself_by_the_rows_due() {
        assert_eq!(ClaimLimit::first(1000, 2 * MIB, 300), 1000);
        assert_eq!(ClaimLimit::first(1000, 2 * MIB, 51_400), 40);
        assert_eq!(ClaimLimit::first(1000, 2 * MIB, 10 * MIB), 1);
        assert_eq!(ClaimLimit::first(1000, 2 * MIB, 0), START);
        let mut l = ClaimLimit::new(1000, 2 * MIB);
        l.observe(1000, ClaimLimit::first(1000, 2 * MIB, 300), 300);
        assert_eq!(l.rows(), 1000, "small rows due at start: no slow start");
    }

    #[test]
    fn small_rows_reach_the_batch_size_after_a_slow_start() {
        let mut l = started(1000, 2 * MIB);
        let mut seen = vec![l.rows()];
        for _ in 0..6 {
            let n = l.rows();
            l.observe(n, n, 300);
            seen.push(l.rows());
        }
        assert_eq!(seen, [64, 128, 256, 512, 1000, 1000, 1000]);
    }

    #[test]
    fn large_rows_keep_the_claim_within_the_budget() {
        let mut l = started(1000, 2 * MIB);
        for _ in 0..10 {
            let n = l.rows();
            assert!(u64::from(n) * 51_400 <= 2 * MIB + 64 * 51_400, "{n}");
            l.observe(n, n, 51_400);
        }
        assert_eq!(l.rows(), 40);
        // A row larger than the budget is still claimed, alone.
        l.observe(40, 40, 10 * MIB);
        assert_eq!(l.rows(), 1);
    }

    #[test]
    fn large_rows_after_small_ones_bring_the_limit_down_at_once_and_up_slowly() {
        let mut l = started(1000, 2 * MIB);
        for _ in 0..6 {
            let n = l.rows();
            l.observe(n, n, 300);
        }
        assert_eq!(l.rows(), 1000);
        l.observe(1000, 1000, 51_400);
        assert_eq!(l.rows(), 40);
        // Small rows again: the large one fades by an eighth a tick.
        let mut ticks = 0;
        while l.rows() < 1000 {
            let n = l.rows();
            l.observe(n, n, 300);
            ticks += 1;
        }
        assert!((20..60).contains(&ticks), "{ticks} ticks to recover");
    }

    #[test]
    fn a_claim_that_found_less_than_its_limit_does_not_grow_it() {
        let mut l = started(1000, 2 * MIB);
        l.observe(10, 64, 300);
        assert_eq!(l.rows(), 64);
        l.observe(0, 64, 0);
        assert_eq!(l.rows(), 64);
    }
}
