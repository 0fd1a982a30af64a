//! The integration tests: one test binary (`cargo test --test it`), one
//! module per file beside this one, sharing `common`. One binary links once
//! instead of once per file, and its tests share one pool of test threads,
//! so a file whose last test runs long no longer holds the others back.
//! Run one file's tests with a filter: `cargo test --test it failover::`.

mod common;

mod alerts;
mod architecture;
mod bench;
mod cancel_job;
mod claim_modes;
mod cli;
mod cluster;
mod code_size;
mod console;
mod console_browser;
mod console_hostile;
mod console_load;
mod console_privileges;
mod console_sessions;
mod counter_sync;
mod dead_letter;
mod docs;
mod failover;
mod faults;
mod go_schema;
mod happy_path;
mod http_surface;
mod kubernetes;
mod listen;
mod memory_limit;
mod metrics;
mod outages;
mod partial_failure;
mod passwords;
mod pause;
mod pgbouncer;
mod poison;
mod privileges;
mod prometheus;
mod redis_acl;
mod redis_durability;
mod redis_memory;
mod redis_outage;
mod redis_refusals;
mod reference_cli;
mod reference_config;
mod scale_out;
mod secrets;
mod sentinel;
mod settle_refusals;
mod shutdown;
mod soak;
mod status;
mod supervision;
mod tls;
mod two_relays;
mod verify;
mod wake_storm;
mod wedge;
