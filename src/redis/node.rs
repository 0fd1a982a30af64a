//! Which node acknowledged a write, and what a look at the node shows: the
//! delivery journal records the first ([`NodeMark`], read from `INFO server
//! replication` at the end of a batch's pipeline), and the loss watch
//! compares the second ([`observe`]) with the look before.
//!
//! The marker key (`{prefix}journal:marker`) sits beside the schedules:
//! a node that answers as before but has lost it lost its data too
//! (`FLUSHALL`, `FLUSHDB`, an eviction).

use ::redis::aio::ConnectionLike;

use crate::domain::{NodeMark, Observation};

/// The marker key the watch keeps beside the schedules.
pub fn marker_key(prefix: &str) -> String {
    format!("{prefix}journal:marker")
}

/// `INFO server replication`: what the journal and the watch read.
pub fn info_cmd() -> ::redis::Cmd {
    ::redis::cmd("INFO").arg("server").arg("replication").to_owned()
}

fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.trim_end().strip_prefix(name)?.strip_prefix(':'))
}

/// The mark in an `INFO server replication` reply: `None` when the reply
/// lacks the fields (a proxy, a server that refuses INFO).
pub fn parse_mark(info: &str) -> Option<NodeMark> {
    Some(NodeMark {
        run_id: field(info, "run_id")?.to_string(),
        replid: field(info, "master_replid")?.to_string(),
        offset: field(info, "master_repl_offset")?.parse().ok()?,
    })
}

/// The mark in a pipeline's last reply (the [`info_cmd`] appended to it).
pub fn mark_of(reply: &::redis::Value) -> Option<NodeMark> {
    match reply {
        ::redis::Value::BulkString(b) => parse_mark(&String::from_utf8_lossy(b)),
        ::redis::Value::VerbatimString { text, .. } => parse_mark(text),
        ::redis::Value::SimpleString(s) => parse_mark(s),
        _ => None,
    }
}

/// Why a look at the node failed.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("redis did not answer the watch: {0}")]
    Unavailable(String),
    #[error("redis answered INFO server replication without run_id/master_replid/master_repl_offset")]
    NoMark,
    /// The connection reached a replica (a failover behind a fixed
    /// address): the caller drops it and connects again.
    #[error("the watch reached a replica, not the master")]
    Replica,
}

/// One look at the node behind `conn`: its mark, how it was promoted (if
/// it was), and whether the marker key is there. When it is not, it is
/// written (after the look: the caller compares first), so the next look
/// finds it.
pub async fn observe<C: ConnectionLike>(conn: &mut C, prefix: &str) -> Result<Observation, ObserveError> {
    let key = marker_key(prefix);
    let (info, marker): (String, bool) = ::redis::pipe()
        .add_command(info_cmd())
        .cmd("EXISTS")
        .arg(&key)
        .query_async(conn)
        .await
        .map_err(|e| ObserveError::Unavailable(e.to_string()))?;
    let mark = parse_mark(&info).ok_or(ObserveError::NoMark)?;
    if field(&info, "role") == Some("slave") {
        return Err(ObserveError::Replica);
    }
    if !marker {
        let _: () = ::redis::cmd("SET")
            .arg(&key)
            .arg(&mark.run_id)
            .query_async(conn)
            .await
            .map_err(|e| ObserveError::Unavailable(e.to_string()))?;
    }
    Ok(Observation {
        replid2: field(&info, "master_replid2").unwrap_or_default().to_string(),
        second_offset: field(&info, "second_repl_offset")
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1),
        mark,
        marker,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "# Server\r\nredis_version:7.0.15\r\nrun_id:2f0c7e4d\r\ntcp_port:6379\r\n\r\n# Replication\r\nrole:master\r\nconnected_slaves:0\r\nmaster_failover_state:no-failover\r\nmaster_replid:9a1b\r\nmaster_replid2:0000000000000000000000000000000000000000\r\nmaster_repl_offset:4242\r\nsecond_repl_offset:-1\r\n";

    #[test]
    fn reads_the_mark() {
        assert_eq!(
            parse_mark(INFO),
            Some(NodeMark {
                run_id: "2f0c7e4d".into(),
                replid: "9a1b".into(),
                offset: 4242
            })
        );
        assert_eq!(parse_mark("# Server\r\nrun_id:x\r\n"), None);
        assert_eq!(
            mark_of(&::redis::Value::BulkString(INFO.as_bytes().to_vec())).map(|m| m.offset),
            Some(4242)
        );
        assert_eq!(mark_of(&::redis::Value::Nil), None);
    }
}
