//! The watchdog: notices an actor that is wedged — running, but with no
//! sign of work of any kind for `health::WEDGE_CADENCES` of its cadences —
//! and turns that into a fault of the relay's own.
//!
//! A dependency that is down does not look like this: the actors keep
//! failing on their cadence, which is a sign of work. A wedge is the
//! relay's own bug (a future that never finishes, a lane that never comes
//! back), so it is handled like a panic: the actor is told it is
//! [`Wedged`], fails, and is restarted with fresh state; the restart counts
//! toward the restart intensity. An actor that does not even take that
//! message (its thread is stuck) cannot be restarted from inside the
//! process: the watchdog then logs why and exits non-zero, so the container
//! runtime restarts the process.
//!
//! It runs on a thread of its own, so a stuck actor thread cannot stop it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Recipient;
use slog::{crit, warn, Logger};

use super::lifecycle::Wedged;
use crate::telemetry::health::ActorHealth;

/// How often the watchdog looks.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// Exit code when a wedged actor cannot be restarted in the process.
pub const EXIT_WEDGED: i32 = 1;

/// One watched actor.
pub struct Watched {
    pub health: Arc<ActorHealth>,
    pub wedged: Recipient<Wedged>,
}

/// Start the watchdog thread; it ends when `stopping` is set.
pub fn spawn(watched: Vec<Watched>, stopping: Arc<AtomicBool>, log: Logger) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("outbox-relay-watchdog".into())
        .spawn(move || watch(watched, stopping, log))
        .map(drop)
}

fn watch(watched: Vec<Watched>, stopping: Arc<AtomicBool>, log: Logger) {
    // When each actor was told it is wedged, while it still is.
    let mut told: Vec<Option<Instant>> = vec![None; watched.len()];
    let longest = watched.iter().map(|w| w.health.wedge_limit()).max().unwrap_or_default();
    let mut last_look = Instant::now();
    let mut judge_from = last_look;
    while !stopping.load(Ordering::Relaxed) {
        std::thread::sleep(CHECK_EVERY);
        let now = Instant::now();
        // Overslept: the whole process was paused (SIGSTOP, a frozen
        // container or VM, a suspended host), so every actor looks silent.
        // Give each a whole window to show it works before judging again.
        if now - last_look > CHECK_EVERY * 8 {
            judge_from = now + longest;
            told.iter_mut().for_each(|t| *t = None);
        }
        last_look = now;
        if now < judge_from {
            continue;
        }
        for (w, told) in watched.iter().zip(told.iter_mut()) {
            let Some(silent_for) = w.health.wedged_for(now) else {
                *told = None;
                continue;
            };
            match *told {
                None => {
                    warn!(log, "actor wedged: no sign of work; restarting it";
                        "actor" => w.health.name, "silent_ms" => silent_for.as_millis() as u64,
                        "limit_ms" => w.health.wedge_limit().as_millis() as u64);
                    w.wedged.do_send(Wedged { silent_for });
                    *told = Some(now);
                }
                // Told a whole wedge limit ago (at least a second) and still
                // silent: not even the message got through.
                Some(at) if now - at >= w.health.wedge_limit().max(Duration::from_secs(1)) => {
                    if stopping.load(Ordering::Relaxed) {
                        return;
                    }
                    crit!(log, "actor wedged and not answering (its thread is stuck); exiting so the process can be restarted";
                        "actor" => w.health.name, "silent_ms" => silent_for.as_millis() as u64,
                        "exit_code" => EXIT_WEDGED);
                    eprintln!(
                        "outbox-relay: error: {} is wedged ({} ms without any sign of work) and does not answer; exiting",
                        w.health.name,
                        silent_for.as_millis()
                    );
                    // The log drain runs on its own thread: give it a moment.
                    std::thread::sleep(Duration::from_millis(200));
                    std::process::exit(EXIT_WEDGED);
                }
                Some(_) => {}
            }
        }
    }
}
