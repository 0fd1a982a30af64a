//! `DeadLetterActor`: owns the dead-letter concern.
//!
//! The move itself happens inside the sweep's tick transaction
//! ([`crate::db::outbox::move_to_dead`]), because only that transaction
//! holds the claimed rows' locks: doing it anywhere else would either wait
//! on those locks or let another relay claim the rows in between. After the
//! tick commits, the sweep reports the move with [`RowsDeadLettered`]; this
//! actor logs the operator-facing warning and keeps the running count.
//! Triage (list / requeue / purge) and retention will live here as well.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use slog::{warn, Logger};

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
}

impl DeadLetterActor {
    pub fn new(log: &Logger, moved: Arc<AtomicU64>) -> Self {
        DeadLetterActor {
            log: log.new(slog::o!("actor" => "DeadLetterActor")),
            moved,
        }
    }
}

impl Actor for DeadLetterActor {
    type Context = Context<Self>;
}

impl Supervised for DeadLetterActor {}

impl Handler<RowsDeadLettered> for DeadLetterActor {
    type Result = ();

    fn handle(&mut self, msg: RowsDeadLettered, _ctx: &mut Self::Context) {
        let total = self.moved.fetch_add(msg.count as u64, Ordering::Relaxed) + msg.count as u64;
        warn!(self.log, "rows moved to the dead-letter table";
            "count" => msg.count, "last_error" => &msg.last_error, "total_since_start" => total);
    }
}
