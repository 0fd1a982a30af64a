//! Redis memory back-pressure: stop writing before Redis refuses writes.
//!
//! A Redis with `maxmemory` and a `noeviction` policy answers `OOM` once
//! full; one that evicts would drop schedule entries. Either way the relay
//! should not be what fills it. [`MemoryGate`] reads `INFO memory` at most
//! every [`CHECK_EVERY`] and closes at `redis.max_memory_ratio` of
//! `maxmemory`, opening again [`HYSTERESIS`] below, so a Redis hovering at
//! the mark does not flap. While it is closed, batches are not sent: the
//! sweep leaves their rows in the outbox without counting an attempt.
//! No `maxmemory` (0) means no limit: the gate stays open.
//!
//! Far from the mark a reading is taken beside the batches (no batch waits
//! for it); within [`NEAR`] of the mark, or while closed, every batch reads
//! first: 250 ms of a fast drain is megabytes, enough to run a small Redis
//! past the mark into `OOM` between two readings.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::pipeline::{checkout, DispatchError};
use super::Redis;
use crate::deadline::Deadline;

/// How often `INFO memory` is asked at most.
pub const CHECK_EVERY: Duration = Duration::from_millis(250);
/// The gate opens again this far (a share of maxmemory) below the mark.
pub const HYSTERESIS: f64 = 0.05;
/// Within this share of maxmemory below the mark, every batch reads first.
pub const NEAR: f64 = 0.1;

/// Redis's memory figures, from `INFO memory`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Memory {
    pub used: u64,
    /// 0: no limit.
    pub max: u64,
}

impl Memory {
    /// Parse `used_memory` and `maxmemory` out of an `INFO memory` reply.
    pub fn parse(info: &str) -> Option<Memory> {
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.trim_end().strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.parse::<u64>().ok())
        };
        Some(Memory {
            used: field("used_memory")?,
            max: field("maxmemory")?,
        })
    }

    /// used / max, or None without a limit.
    pub fn ratio(&self) -> Option<f64> {
        (self.max > 0).then(|| self.used as f64 / self.max as f64)
    }
}

/// A change of the gate worth one log line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transition {
    Closed { ratio: f64 },
    Opened { ratio: f64 },
}

#[derive(Debug, Default)]
struct State {
    closed: bool,
    last_check: Option<Instant>,
    ratio: Option<f64>,
}

/// Whether batches may be written now (see the module docs).
#[derive(Debug)]
pub struct MemoryGate {
    high: f64,
    state: Mutex<State>,
}

impl MemoryGate {
    pub fn new(max_memory_ratio: f64) -> MemoryGate {
        MemoryGate {
            high: max_memory_ratio,
            state: Mutex::new(State::default()),
        }
    }

    /// The share at which the gate closes (`redis.max_memory_ratio`).
    pub fn high(&self) -> f64 {
        self.high
    }

    /// The share below which a closed gate opens again.
    pub fn low(&self) -> f64 {
        (self.high - HYSTERESIS).max(0.0)
    }

    /// Fold in a reading; returns the transition it caused, if any.
    pub fn observe(&self, m: Memory) -> Option<Transition> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.ratio = m.ratio();
        let Some(ratio) = s.ratio else {
            let was = std::mem::take(&mut s.closed);
            return was.then_some(Transition::Opened { ratio: 0.0 });
        };
        if !s.closed && ratio >= self.high {
            s.closed = true;
            Some(Transition::Closed { ratio })
        } else if s.closed && ratio < self.low() {
            s.closed = false;
            Some(Transition::Opened { ratio })
        } else {
            None
        }
    }

    pub fn is_closed(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).closed
    }

    /// The last used/max share read (None: no limit, or not read yet).
    pub fn ratio(&self) -> Option<f64> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).ratio
    }

    /// Close enough to the mark (or closed) that a batch must read before
    /// it writes.
    pub fn near_mark(&self) -> bool {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.closed || s.ratio.is_some_and(|r| r >= self.high - NEAR)
    }

    /// Whether a new reading is due (at most one per [`CHECK_EVERY`], or
    /// every time near the mark); marks it taken.
    pub fn due(&self, now: Instant) -> bool {
        let near = self.near_mark();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if near {
            s.last_check = Some(now);
            return true;
        }
        match s.last_check {
            Some(t) if now.duration_since(t) < CHECK_EVERY => false,
            _ => {
                s.last_check = Some(now);
                true
            }
        }
    }

    /// Read `INFO memory` and fold it in (callers ask [`MemoryGate::due`]
    /// first). A failed read changes nothing: the batches' own writes
    /// report an unreachable Redis.
    pub async fn refresh(&self, redis: &Redis, deadline: Deadline) -> Option<Transition> {
        let info = read_info(redis, deadline).await.ok()?;
        self.observe(Memory::parse(&info)?)
    }
}

async fn read_info(redis: &Redis, deadline: Deadline) -> Result<String, DispatchError> {
    let mut conn = checkout(redis, deadline).await?;
    if conn.cluster().is_some() {
        // Per-master memory in a cluster is not watched yet.
        return Err(DispatchError::Unavailable("cluster: memory not watched".into()));
    }
    conn.set_response_timeout(deadline.remaining().max(Duration::from_millis(1)));
    deadline
        .run(
            "redis INFO memory",
            ::redis::cmd("INFO").arg("memory").query_async::<String>(&mut conn),
        )
        .await?
        .map_err(|e| DispatchError::Unavailable(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_info_memory() {
        let info = "# Memory\r\nused_memory:1048576\r\nused_memory_human:1.00M\r\nmaxmemory:2097152\r\nmaxmemory_human:2.00M\r\n";
        assert_eq!(
            Memory::parse(info),
            Some(Memory {
                used: 1_048_576,
                max: 2_097_152
            })
        );
        assert_eq!(Memory::parse("used_memory:1\r\n"), None);
        assert_eq!(Memory { used: 5, max: 0 }.ratio(), None);
    }

    #[test]
    fn closes_at_the_mark_and_opens_below_it_with_hysteresis() {
        let g = MemoryGate::new(0.9);
        let at = |used| Memory { used, max: 1000 };
        assert_eq!(g.observe(at(500)), None);
        assert!(!g.is_closed());
        assert_eq!(g.observe(at(900)), Some(Transition::Closed { ratio: 0.9 }));
        assert!(g.is_closed());
        assert_eq!(g.observe(at(870)), None, "between the marks: still closed");
        assert!(g.is_closed());
        assert_eq!(g.observe(at(849)), Some(Transition::Opened { ratio: 0.849 }));
        assert!(!g.is_closed());
        assert_eq!(g.observe(at(880)), None, "below the mark: open");
        g.observe(at(950));
        assert!(g.is_closed());
        assert_eq!(
            g.observe(Memory { used: 950, max: 0 }),
            Some(Transition::Opened { ratio: 0.0 }),
            "the limit removed: open"
        );
    }

    #[test]
    fn readings_are_rate_limited() {
        let g = MemoryGate::new(0.9);
        let t = Instant::now();
        assert!(g.due(t));
        assert!(!g.due(t + Duration::from_millis(100)));
        assert!(g.due(t + CHECK_EVERY));
    }

    #[test]
    fn near_the_mark_every_batch_reads() {
        let g = MemoryGate::new(0.9);
        let t = Instant::now();
        g.observe(Memory { used: 700, max: 1000 });
        assert!(!g.near_mark());
        assert!(g.due(t));
        assert!(!g.due(t + Duration::from_millis(1)));
        g.observe(Memory { used: 810, max: 1000 });
        assert!(g.near_mark());
        assert!(g.due(t + Duration::from_millis(2)));
        assert!(g.due(t + Duration::from_millis(3)));
    }
}
