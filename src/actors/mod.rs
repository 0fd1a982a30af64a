//! The actors of the relay, one concern each (SPEC §2), and the supervisor
//! that starts them.

pub mod counter_sync;
pub mod dead_letter;
pub mod dispatch;
pub mod health;
pub mod metrics;
pub mod supervisor;
pub mod sweep;
