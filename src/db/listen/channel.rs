//! The channel the trigger notifies, and the payloads that are not a new
//! row's: the listeners' own checks and the lead's backlog notice.

/// The channel the trigger notifies.
pub const CHANNEL: &str = "outbox_relay";

/// Payloads of the listeners' own check notifications start with this;
/// listeners never wake the sweep for one (another relay's check is no
/// new row).
pub const PROBE_PREFIX: &str = "outbox-relay-probe:";

/// The payload of the lead's notification that a backlog is arriving (a
/// claim for new rows found a full batch): the other relays, which do not
/// answer new-row notifications, start their drain lanes for it instead of
/// at their next poll.
pub const BACKLOG_PAYLOAD: &str = "outbox-relay-backlog";
