//! Telemetry: structured logging, actor health records and the Prometheus
//! metrics. It sits below the actors: actors write their [`health`] and move
//! [`metrics`]; `http` and the health reporter read them. Nothing here knows
//! which actors exist.
//!
//! Events that an operator acts on are logged as sentences with fields;
//! ERROR means an operator must act or data is at risk.

pub mod catalogue;
pub mod health;
pub mod logging;
pub mod metrics;
