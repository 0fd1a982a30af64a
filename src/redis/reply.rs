//! Replies read as text.

use ::redis::Value;

/// A bulk or simple string reply as text.
pub(super) fn reply_text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}
