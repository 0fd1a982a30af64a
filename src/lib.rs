//! outbox-relay: drains a Postgres transactional outbox (`task_outbox`) into
//! Redis schedules (`{prefix}sched:{job_id}`), settling every row on its own:
//! delivered rows are deleted, failed rows retried with backoff, hopeless
//! rows moved to `task_outbox_dead`. See `README.md` and the spec.
//!
//! `main.rs` only parses the command line; everything else lives here, in
//! layers that import only downwards (ARCHITECTURE.md has the picture,
//! `tests/architecture.rs` keeps it true):
//! - [`cli`]: one function per subcommand;
//! - [`app`]: the run loop of `outbox-relay run`;
//! - [`console`]: the browser console and its API;
//! - [`actors`]: the actor layer and its supervisor; [`http`], [`verify`],
//!   [`cancel`];
//! - [`db`] (Postgres) and [`redis`] (Redis), which never import each other;
//! - [`domain`]: the row, the member, the outcomes and the settlement rules;
//! - [`config`], [`telemetry`], [`deadline`], [`netaddr`], [`pool`],
//!   [`redact`], [`tls`], [`users`]: what every layer above uses.

pub mod actors;
pub mod app;
pub mod cancel;
pub mod cli;
pub mod config;
pub mod console;
pub mod db;
pub mod deadline;
pub mod domain;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod http;
pub mod netaddr;
pub mod pool;
pub mod redact;
pub mod redis;
pub mod telemetry;
pub mod tls;
pub mod users;
pub mod verify;
