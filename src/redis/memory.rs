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
//!
//! In a cluster every master is read (`CLUSTER SLOTS`, then `INFO memory`
//! on each) and the fullest one decides: a master at the mark holds back
//! every write, the others' too (simple and safe; a master that cannot be
//! read is left to its own writes' errors).
//!
//! Back-pressure never hides an outage and never sticks: while the gate is
//! closed each batch's reading is also its check that Redis answers (a
//! Redis that went down fails the batch as unavailable, so the dispatch
//! actor degrades and `/readyz` fails), and a Redis that refuses `INFO`
//! (an ACL without `+info`) opens the gate with one warning: back-pressure
//! is then off, and re-checked every [`CHECK_EVERY`].

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::conn::Redis;
use super::pipeline::{checkout, DispatchError};
use super::reply::reply_text;
use super::slots::cluster_slots;
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

/// What one sorted-set entry of `member_len` bytes may take in Redis, on
/// the high side: the member twice (skiplist and dict) and the nodes.
pub fn entry_cost(member_len: usize) -> u64 {
    2 * member_len as u64 + 64
}

/// A change of the gate worth one log line.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    Closed {
        ratio: f64,
    },
    Opened {
        ratio: f64,
    },
    /// Redis refuses `INFO memory` (or its reply has no figures): the gate
    /// is open and back-pressure off until a reading succeeds.
    Blind {
        why: String,
    },
    /// `INFO memory` can be read again.
    Sighted,
}

/// Why `INFO memory` could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InfoError {
    /// Redis answered with an error (an ACL without `+info`, a renamed
    /// command, a proxy): Redis is up, its memory cannot be watched.
    #[error("redis refused INFO memory: {0}")]
    Refused(String),
    /// No answer: Redis (or every master) is unreachable.
    #[error("redis INFO memory: {0}")]
    Unreachable(String),
}

#[derive(Debug, Default)]
struct State {
    /// Bytes left below the mark at the last reading (None: no limit, or
    /// not read yet), and an estimate of what was written since.
    room: Option<u64>,
    written: u64,
    closed: bool,
    /// The last reading was refused (see [`Transition::Blind`]).
    blind: bool,
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
        if std::mem::take(&mut s.blind) {
            s.ratio = m.ratio();
            // Seen again: the next batches fold further readings in.
            return Some(Transition::Sighted);
        }
        s.ratio = m.ratio();
        s.written = 0;
        s.room = (m.max > 0).then(|| ((m.max as f64 * self.high) as u64).saturating_sub(m.used));
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

    /// A reading was refused: open, and say so once.
    pub fn refused(&self, why: &str) -> Option<Transition> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.closed = false;
        s.ratio = None;
        (!std::mem::replace(&mut s.blind, true)).then(|| Transition::Blind { why: why.to_string() })
    }

    /// Count a batch about to be written: roughly what its entries take
    /// in Redis ([`entry_cost`] each).
    pub fn wrote(&self, bytes: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.written = s.written.saturating_add(bytes);
    }

    /// Close enough to the mark (or closed) that a batch must read before
    /// it writes: within [`NEAR`] of it at the last reading, or having
    /// written half the room that reading left (a fast drain into a small
    /// Redis covers a lot of it between two timed readings).
    pub fn near_mark(&self) -> bool {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        !s.blind
            && (s.closed
                || s.ratio.is_some_and(|r| r >= self.high - NEAR)
                || s.room.is_some_and(|room| s.written.saturating_mul(2) >= room))
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
    /// first). A refusal opens the gate ([`MemoryGate::refused`]); an
    /// unreachable Redis changes nothing and is returned, so a batch held
    /// back by a closed gate can report the outage instead.
    pub async fn refresh(&self, redis: &Redis, deadline: Deadline) -> Result<Option<Transition>, InfoError> {
        match read_memory(redis, deadline).await {
            Ok(m) => Ok(self.observe(m)),
            Err(InfoError::Refused(why)) => Ok(self.refused(&why)),
            Err(e) => Err(e),
        }
    }
}

/// A Redis error as an [`InfoError`]: no answer, or an answer that is an error.
pub fn info_error(e: &::redis::RedisError) -> InfoError {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        InfoError::Unreachable(e.to_string())
    } else {
        InfoError::Refused(e.to_string())
    }
}

fn parsed(info: &str) -> Result<Memory, InfoError> {
    Memory::parse(info).ok_or_else(|| InfoError::Refused("the reply has no used_memory and maxmemory".into()))
}

/// `INFO section` of every master of the cluster `cluster` is connected
/// to (`CLUSTER SLOTS`, then each master by address), each under
/// `deadline`: (`host:port`, its reply text or why there is none).
pub async fn info_on_masters(
    cluster: &::redis::cluster_async::ClusterConnection,
    section: &'static str,
    deadline: Deadline,
) -> Result<Vec<(String, Result<String, InfoError>)>, InfoError> {
    let mut c = cluster.clone();
    let slots = deadline
        .run("redis CLUSTER SLOTS", cluster_slots(&mut c))
        .await
        .map_err(|e| InfoError::Unreachable(e.to_string()))?
        .map_err(|e| info_error(&e))?;
    let mut masters: Vec<String> = slots.into_iter().map(|r| r.master).collect();
    masters.sort();
    masters.dedup();
    let reads = masters.into_iter().map(|addr| {
        let mut c = cluster.clone();
        async move {
            let read = async {
                let (host, port) = addr
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
                    .ok_or_else(|| InfoError::Refused(format!("unusable node address {addr}")))?;
                let to = ::redis::cluster_routing::RoutingInfo::SingleNode(
                    ::redis::cluster_routing::SingleNodeRoutingInfo::ByAddress { host, port },
                );
                let mut cmd = ::redis::cmd("INFO");
                cmd.arg(section);
                let reply = deadline
                    .run("redis INFO", c.route_command(cmd, to))
                    .await
                    .map_err(|e| InfoError::Unreachable(format!("{addr}: {e}")))?
                    .map_err(|e| info_error(&e))?;
                reply_text(&reply).ok_or_else(|| InfoError::Refused(format!("{addr}: INFO {section} gave {reply:?}")))
            };
            let text = read.await;
            (addr, text)
        }
    });
    Ok(futures_util::future::join_all(reads).await)
}

/// The memory figures of the one server, or of the fullest cluster master.
async fn read_memory(redis: &Redis, deadline: Deadline) -> Result<Memory, InfoError> {
    let unreachable = |e: String| InfoError::Unreachable(e);
    let mut conn = checkout(redis, deadline)
        .await
        .map_err(|e: DispatchError| unreachable(e.to_string()))?;
    let Some(cluster) = conn.cluster() else {
        conn.set_response_timeout(deadline.remaining().max(Duration::from_millis(1)));
        let info = deadline
            .run(
                "redis INFO memory",
                ::redis::cmd("INFO").arg("memory").query_async::<String>(&mut conn),
            )
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .map_err(|e| info_error(&e))?;
        return parsed(&info);
    };
    let readings: Vec<Result<Memory, InfoError>> = info_on_masters(&cluster, "memory", deadline)
        .await?
        .into_iter()
        .map(|(_, text)| text.and_then(|t| parsed(&t)))
        .collect();
    // A refusal anywhere is the ACL's or a proxy's: say so. A master that
    // does not answer is left out (its writes fail on their own); none
    // answering is an unreachable cluster.
    if let Some(Err(refused)) = readings.iter().find(|r| matches!(r, Err(InfoError::Refused(_)))) {
        return Err(refused.clone());
    }
    let fullest = readings
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .max_by(|a, b| a.ratio().unwrap_or(-1.0).total_cmp(&b.ratio().unwrap_or(-1.0)))
        .copied();
    match (fullest, readings.into_iter().find_map(Result::err)) {
        (Some(m), _) => Ok(m),
        (None, Some(e)) => Err(e),
        (None, None) => Err(InfoError::Unreachable("the cluster reports no master".into())),
    }
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
    fn a_refused_reading_opens_the_gate_once_and_a_reading_brings_it_back() {
        let g = MemoryGate::new(0.9);
        g.observe(Memory { used: 950, max: 1000 });
        assert!(g.is_closed());
        assert_eq!(g.refused("NOPERM"), Some(Transition::Blind { why: "NOPERM".into() }));
        assert!(
            !g.is_closed(),
            "a Redis whose memory cannot be read is not held back forever"
        );
        assert_eq!(g.refused("NOPERM"), None, "said once");
        assert!(!g.near_mark(), "no reading inline while blind");
        assert_eq!(g.observe(Memory { used: 950, max: 1000 }), Some(Transition::Sighted));
        assert_eq!(
            g.observe(Memory { used: 950, max: 1000 }),
            Some(Transition::Closed { ratio: 0.95 })
        );
    }

    #[test]
    fn writing_half_the_room_left_makes_the_next_batch_read_first() {
        let g = MemoryGate::new(0.9);
        g.observe(Memory { used: 500, max: 1000 });
        assert!(!g.near_mark(), "400 bytes of room");
        g.wrote(150);
        assert!(!g.near_mark());
        g.wrote(50);
        assert!(g.near_mark(), "half the room written");
        g.observe(Memory { used: 600, max: 1000 });
        assert!(!g.near_mark(), "a reading starts the count again");
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
