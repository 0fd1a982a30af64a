//! What a batch did, and how a server's error is sorted into the entry's
//! fault or Redis's: the per-entry outcomes, the counts the operator hears
//! about, and the errors for a batch that got no usable reply.

use ::redis::ServerError;

use crate::deadline::Expired;
use crate::domain::EntryOutcome;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DispatchError {
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// Redis's memory is at `redis.max_memory_ratio` of its maxmemory: the
    /// batch was not sent (see `redis::memory`); its rows simply wait.
    #[error("redis memory back-pressure: {0}")]
    BackPressure(String),
    #[error(transparent)]
    Deadline(#[from] Expired),
}

/// Error codes that are about the entry itself: retrying the same entry
/// against the same key cannot help, so they count an attempt.
const ENTRY_CODES: &[&str] = &["WRONGTYPE"];

/// Codes reported under their own name in
/// `outbox_relay_redis_refused_entries_total{code}`; any other is `other`,
/// so a server (or proxy) inventing codes cannot grow the label set.
const KNOWN_CODES: &[&str] = &[
    "ERR",
    "LOADING",
    "BUSY",
    "MASTERDOWN",
    "READONLY",
    "OOM",
    "NOREPLICAS",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MOVED",
    "ASK",
    "MISCONF",
    "NOAUTH",
    "NOPERM",
    "EXECABORT",
    "CROSSSLOT",
];

/// The metric label of a refusal's code.
pub fn refusal_label(err: &ServerError) -> &'static str {
    KNOWN_CODES
        .iter()
        .find(|c| **c == err.code())
        .copied()
        .unwrap_or("other")
}

fn describe(err: &ServerError) -> String {
    match err.details() {
        Some(detail) => format!("{} {}", err.code(), detail),
        None => err.code().to_string(),
    }
}

/// Sort one server error into the row's fault or Redis's.
pub fn classify(err: &ServerError) -> EntryOutcome {
    let text = describe(err);
    if ENTRY_CODES.contains(&err.code()) {
        EntryOutcome::Rejected(text)
    } else {
        EntryOutcome::Deferred(text)
    }
}

/// What one batch did: an outcome per entry, and what the operator should
/// hear about (the dispatch actor logs and counts these).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchOutcome {
    /// One per entry, in order.
    pub outcomes: Vec<EntryOutcome>,
    /// `WAIT` came back with fewer replicas than asked (pipelines affected,
    /// and the reason of the last one).
    pub wait_shortfalls: u32,
    pub wait_shortfall: Option<String>,
    /// Cluster: entries whose node did not answer (down, failing over).
    pub unreachable: usize,
    pub unreachable_reason: Option<String>,
    /// Entries Redis refused for a reason that is not theirs, by code label.
    pub refused: std::collections::BTreeMap<&'static str, u64>,
    /// The node that acknowledged the batch, when the journal asked
    /// (standalone and Sentinel only).
    pub node: Option<crate::domain::NodeMark>,
}

impl BatchOutcome {
    /// Why nothing of the batch was written, when Redis refused (or a WAIT
    /// shortfall kept back) every entry for a reason that is not theirs:
    /// the batch "succeeded" as a round trip and delivered nothing.
    pub fn refused_every_entry(&self) -> Option<&str> {
        let mut why = None;
        for o in &self.outcomes {
            match o {
                EntryOutcome::Deferred(w) => why = Some(w.as_str()),
                _ => return None,
            }
        }
        why
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::redis::Value;

    fn server_error(wire: &str) -> ServerError {
        match ::redis::parse_redis_value(wire.as_bytes()) {
            Ok(Value::ServerError(e)) => e,
            other => panic!("not a server error: {other:?}"),
        }
    }

    #[test]
    fn wrongtype_is_the_rows_fault() {
        let e = server_error("-WRONGTYPE Operation against a key holding the wrong kind of value\r\n");
        assert_eq!(
            classify(&e),
            EntryOutcome::Rejected("WRONGTYPE Operation against a key holding the wrong kind of value".into())
        );
    }

    #[test]
    fn every_other_error_is_deferred_and_labelled_boundedly() {
        for (wire, label) in [
            ("-OOM command not allowed when used memory > 'maxmemory'.\r\n", "OOM"),
            ("-READONLY You can't write against a read only replica.\r\n", "READONLY"),
            ("-LOADING Redis is loading the dataset in memory\r\n", "LOADING"),
            ("-MASTERDOWN Link with MASTER is down\r\n", "MASTERDOWN"),
            ("-ERR unknown command 'ZADD', with args beginning with: \r\n", "ERR"),
            (
                "-NOPERM User relay has no permissions to run the 'zadd' command\r\n",
                "NOPERM",
            ),
            ("-ERR proxy refused\r\n", "ERR"),
            ("-WEIRDNEWCODE something a module says\r\n", "other"),
        ] {
            let e = server_error(wire);
            assert!(matches!(classify(&e), EntryOutcome::Deferred(_)), "{wire}");
            assert_eq!(refusal_label(&e), label, "{wire}");
        }
    }
}
