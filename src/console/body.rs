//! Request bodies, read under a deadline and a size limit, and parsed
//! strictly: a field the form or the API does not know is refused with
//! its name (a mistyped `job_id` once widened a purge to every dead
//! letter), never ignored.
//!
//! The HTTP server times out a request *head* (`http::serve`); a body
//! that trickles in a byte at a time would otherwise hold its connection
//! for as long as the client likes.

use std::time::Duration;

use actix_web::web;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

use super::error::ConsoleError;

/// A body must have arrived whole within this.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// And be at most this large.
pub const BODY_LIMIT: usize = 64 * 1024;

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the request body did not arrive within {}s", BODY_TIMEOUT.as_secs())]
    Slow,
    #[error("the request body is larger than {} KiB", BODY_LIMIT / 1024)]
    TooLarge,
    #[error("the request body broke off: {0}")]
    Broken(String),
}

/// The whole body, or why not.
pub async fn read(mut payload: web::Payload) -> Result<web::Bytes, BodyError> {
    let collect = async {
        let mut buf = web::BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| BodyError::Broken(e.to_string()))?;
            if buf.len() + chunk.len() > BODY_LIMIT {
                return Err(BodyError::TooLarge);
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    };
    tokio::time::timeout(BODY_TIMEOUT, collect)
        .await
        .map_err(|_| BodyError::Slow)?
}

/// An `application/x-www-form-urlencoded` body as `T` (whose serde
/// refuses unknown fields).
pub fn form<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ConsoleError> {
    serde_urlencoded::from_bytes(bytes).map_err(|e| ConsoleError::BadRequest(format!("the form is refused: {e}")))
}

/// A JSON body as `T`; an empty body is `{}`.
pub fn json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ConsoleError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    serde_json::from_slice(bytes).map_err(|e| ConsoleError::BadRequest(format!("the JSON body is refused: {e}")))
}

/// A query string as `T` (unknown parameters refused like fields).
pub fn query<T: DeserializeOwned>(q: &str) -> Result<T, ConsoleError> {
    serde_urlencoded::from_str(q).map_err(|e| ConsoleError::BadRequest(format!("the query is refused: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct F {
        #[serde(default)]
        job: String,
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        assert_eq!(form::<F>(b"job=a").map(|f| f.job).ok(), Some("a".into()));
        let e = form::<F>(b"job_id=a").expect_err("refused").to_string();
        assert!(e.contains("job_id"), "{e}");
        let e = json::<F>(br#"{"job_id": "a"}"#).expect_err("refused").to_string();
        assert!(e.contains("job_id"), "{e}");
        assert_eq!(json::<F>(b"").map(|f| f.job).ok(), Some(String::new()));
        let e = query::<F>("jobs=1").expect_err("refused").to_string();
        assert!(e.contains("jobs"), "{e}");
    }
}
