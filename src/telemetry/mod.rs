//! Telemetry: structured logging now; metrics join here (MetricsActor issue).
//!
//! Events that an operator acts on are logged as sentences with fields;
//! ERROR means an operator must act or data is at risk.

pub mod logging;
