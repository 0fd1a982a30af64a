//! `DeadLetterActor`: owns the dead-letter concern.
//!
//! The move itself happens inside the sweep's tick transaction
//! ([`crate::db::outbox::move_to_dead`]), because only that transaction
//! holds the claimed rows' locks: doing it anywhere else would either wait
//! on those locks or let another relay claim the rows in between. After the
//! tick commits, the sweep reports the move with [`RowsDeadLettered`]; this
//! actor logs the operator-facing warning and keeps the running count.
//! Triage (list / requeue / purge) and retention will live here as well.
//! Failure: a panic in a handler fails the actor (restart by the supervisor).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use slog::{warn, Logger};

use super::health::ActorHealth;
use super::supervisor::{contain_sync, Supervision};

/// Rows were moved to `task_outbox_dead` by a committed tick.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct RowsDeadLettered {
    pub count: usize,
    pub last_error: String,
}

pub struct DeadLetterActor {
    log: Logger,
    /// Rows moved since the process started (survives actor restarts).
    pub moved: Arc<AtomicU64>,
    health: Arc<ActorHealth>,
    supervision: Supervision,
}

impl DeadLetterActor {
    pub fn new(
        log: &Logger,
        moved: Arc<AtomicU64>,
        health: Arc<ActorHealth>,
        supervision: Supervision,
    ) -> Self {
        DeadLetterActor {
            log: log.new(slog::o!("actor" => "DeadLetterActor")),
            moved,
            health,
            supervision,
        }
    }
}

impl Actor for DeadLetterActor {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Self::Context) {
        if !self.supervision.given_up() {
            self.health.set_running();
        }
    }
}

impl Supervised for DeadLetterActor {}

impl Handler<RowsDeadLettered> for DeadLetterActor {
    type Result = ();

    fn handle(&mut self, msg: RowsDeadLettered, ctx: &mut Self::Context) {
        let outcome = contain_sync(|| {
            let total =
                self.moved.fetch_add(msg.count as u64, Ordering::Relaxed) + msg.count as u64;
            warn!(self.log, "rows moved to the dead-letter table";
                "count" => msg.count, "last_error" => &msg.last_error, "total_since_start" => total);
        });
        match outcome {
            Ok(()) => self.health.ok(),
            Err(panic) => {
                // The rows are already safe in task_outbox_dead; only the report is lost.
                let _ = self.supervision.actor_failed(&self.health, &panic);
                ctx.stop();
            }
        }
    }
}
