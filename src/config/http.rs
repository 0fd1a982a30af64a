//! `[http]`: the address of the metrics and health endpoint, with its check.

use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// address of `/healthz`, `/readyz` and `/metrics` (use `0.0.0.0:9464` in a
    /// container)
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:9464".into(),
        }
    }
}

impl HttpConfig {
    /// `http.*`.
    pub(super) fn check(&self, bad: &mut impl FnMut(&str, String)) {
        if SocketAddr::from_str(&self.listen).is_err() {
            bad(
                "http.listen",
                format!("{:?} is not an address like 127.0.0.1:9464", self.listen),
            );
        }
    }
}
