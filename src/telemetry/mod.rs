//! Telemetry: structured logging and the Prometheus metrics.
//!
//! Events that an operator acts on are logged as sentences with fields;
//! ERROR means an operator must act or data is at risk.

pub mod health;
pub mod logging;
pub mod metrics;
