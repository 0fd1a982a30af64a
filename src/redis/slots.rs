//! The cluster's slot map (`CLUSTER SLOTS`): which master serves which
//! range of hash slots.

use ::redis::cluster_async::ClusterConnection;
use ::redis::Value;

use super::reply::reply_text;

/// One range of hash slots and the master serving it (`CLUSTER SLOTS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRange {
    pub start: u16,
    pub end: u16,
    /// `host:port` of the master.
    pub master: String,
    /// The master's node id (CLUSTER SLOTS gives it since Redis 4).
    pub master_id: Option<String>,
}

/// The cluster's slot map as one node reports it.
pub async fn cluster_slots(conn: &mut ClusterConnection) -> Result<Vec<SlotRange>, ::redis::RedisError> {
    let reply: Value = ::redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
    Ok(parse_cluster_slots(&reply))
}

/// `[[start, end, [host, port, id, ...], replica...], ...]` → ranges.
pub fn parse_cluster_slots(reply: &Value) -> Vec<SlotRange> {
    let Value::Array(ranges) = reply else {
        return Vec::new();
    };
    ranges
        .iter()
        .filter_map(|r| {
            let Value::Array(parts) = r else { return None };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
                (parts.first(), parts.get(1), parts.get(2))
            else {
                return None;
            };
            let host = master.first().and_then(reply_text)?;
            let Some(Value::Int(port)) = master.get(1) else {
                return None;
            };
            Some(SlotRange {
                start: u16::try_from(*start).ok()?,
                end: u16::try_from(*end).ok()?,
                master: format!("{host}:{port}"),
                master_id: master.get(2).and_then(reply_text),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn cluster_slots_keep_master_address_and_id() {
        // Two ranges as Redis 7 answers CLUSTER SLOTS: [start, end, master, replica...],
        // each node as [host, port, id, {metadata}].
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                Value::Array(vec![
                    bulk("10.0.0.1"),
                    Value::Int(7000),
                    bulk("aaa"),
                    Value::Array(vec![]),
                ]),
                Value::Array(vec![
                    bulk("10.0.0.4"),
                    Value::Int(7003),
                    bulk("ddd"),
                    Value::Array(vec![]),
                ]),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(10922),
                Value::Array(vec![bulk("10.0.0.2"), Value::Int(7001)]),
            ]),
            Value::Int(3),
        ]);
        let ranges = parse_cluster_slots(&reply);
        assert_eq!(ranges.len(), 2, "malformed entries are skipped: {ranges:?}");
        assert_eq!((ranges[0].start, ranges[0].end), (0, 5460));
        assert_eq!(ranges[0].master, "10.0.0.1:7000");
        assert_eq!(ranges[0].master_id.as_deref(), Some("aaa"));
        assert_eq!(ranges[1].master, "10.0.0.2:7001");
        assert_eq!(ranges[1].master_id, None, "pre-Redis-4 replies have no id");
        assert!(parse_cluster_slots(&Value::Nil).is_empty());
    }
}
