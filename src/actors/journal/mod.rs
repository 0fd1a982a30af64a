//! The delivery journal's actor and its reconcile: [`watch`] notices a
//! Redis that lost data and keeps the journal to `journal.keep`;
//! [`reconcile`] writes lost entries again (the actor, `outbox-relay
//! reconcile` and the console run it).

pub mod reconcile;
pub mod watch;

pub use watch::{JournalActor, JournalSettings, Watch};
