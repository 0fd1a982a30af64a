//! Test-only fault injection (cargo feature `fault-injection`, enabled by
//! `scripts/test`, absent from release builds).
//!
//! `OUTBOX_FAULT_INJECT=<point>:<n>` makes the named point panic the first
//! `n` times it is reached, process-wide; e.g. `sweep.tick:1` panics the
//! sweep's tick handler once. Supervision must turn that into a restart.
//! `OUTBOX_FAULT_WEDGE=<point>:hang|block` wedges a point instead (see
//! [`wedge`]); the watchdog must notice.

use std::sync::atomic::{AtomicU64, Ordering};

static FIRED: AtomicU64 = AtomicU64::new(0);

/// Panic if `OUTBOX_FAULT_INJECT` names `point` and its count is not used up.
pub fn maybe_panic(point: &str) {
    let Ok(spec) = std::env::var("OUTBOX_FAULT_INJECT") else {
        return;
    };
    let Some((name, count)) = spec.split_once(':') else {
        return;
    };
    let limit: u64 = count.parse().unwrap_or(0);
    if name == point && FIRED.fetch_add(1, Ordering::Relaxed) < limit {
        panic!("injected fault at {point}");
    }
}

static WEDGED: AtomicU64 = AtomicU64::new(0);

/// How `OUTBOX_FAULT_WEDGE=<point>:<mode>` wedges the named point, the
/// first time it is reached: `hang` (the async work there never finishes,
/// the actor's thread stays free) or `block` (the thread itself is stuck).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wedge {
    Hang,
    Block,
}

/// The wedge `OUTBOX_FAULT_WEDGE` asks of `point`, once per process.
pub fn wedge(point: &str) -> Option<Wedge> {
    let spec = std::env::var("OUTBOX_FAULT_WEDGE").ok()?;
    let (name, mode) = spec.split_once(':')?;
    let mode = match mode {
        "hang" => Wedge::Hang,
        "block" => Wedge::Block,
        _ => return None,
    };
    (name == point && WEDGED.fetch_add(1, Ordering::Relaxed) == 0).then_some(mode)
}
