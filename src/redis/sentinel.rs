//! Redis Sentinel (`redis.mode = "sentinel"`): every new connection first
//! asks the sentinels where the master is (`SENTINEL
//! get-master-addr-by-name`), then checks with `ROLE` that the server there
//! is a master before anything is written to it. A failover is followed by
//! new connections: the old master's connections end (Sentinel kills its
//! clients when it turns it into a replica, or it is gone), a `READONLY`
//! reply discards the connection it came on (see `pipeline`), and the
//! next checkout asks the sentinels again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::{Client, ConnectionAddr, ConnectionInfo, ErrorKind, RedisError, RedisResult, Value};

use super::reply::reply_text;
use crate::redact::redact_url;

/// The master the process last connected to, and how often that changed.
static LAST_MASTER: Mutex<Option<String>> = Mutex::new(None);
static SWITCHES: AtomicU64 = AtomicU64::new(0);

/// Times this process found the sentinels naming a new master.
pub fn master_switches() -> u64 {
    SWITCHES.load(Ordering::Relaxed)
}

/// Remember `at` as the master; a change from another one is a switch.
fn note_master(at: &str) {
    if let Ok(mut last) = LAST_MASTER.lock() {
        if last.as_deref().is_some_and(|l| l != at) {
            SWITCHES.fetch_add(1, Ordering::Relaxed);
        }
        *last = Some(at.to_string());
    }
}

/// The sentinels, the monitored name and how to reach the master.
#[derive(Clone, Debug)]
pub struct Sentinels {
    /// Each sentinel as shown in messages (password redacted) and reached.
    nodes: Vec<(String, ConnectionInfo)>,
    /// The name the sentinels monitor the master under.
    master: String,
    /// `redis.url`'s user, password, database and TLS; its address is
    /// replaced by the one the sentinels name.
    template: ConnectionInfo,
    /// How long one sentinel, or the master's `ROLE`, may take to answer.
    ask_timeout: Duration,
}

impl Sentinels {
    pub fn new(
        nodes: Vec<(String, ConnectionInfo)>,
        master: String,
        template: ConnectionInfo,
        ask_timeout: Duration,
    ) -> Sentinels {
        Sentinels {
            nodes,
            master,
            template,
            ask_timeout,
        }
    }

    /// For messages: `sentinel mymaster via redis://s1:26379,redis://s2:26379`.
    pub fn describe(master: &str, urls: &[String]) -> String {
        format!(
            "sentinel {master} via {}",
            urls.iter().map(|u| redact_url(u)).collect::<Vec<_>>().join(",")
        )
    }

    /// The master's address, as the first sentinel that answers names it.
    pub async fn master_addr(&self) -> RedisResult<(String, u16)> {
        let mut why = Vec::new();
        for (shown, info) in &self.nodes {
            let ask = async {
                let mut conn = Client::open(info.clone())?.get_multiplexed_async_connection().await?;
                ::redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(&self.master)
                    .query_async::<Option<(String, u16)>>(&mut conn)
                    .await
            };
            match tokio::time::timeout(self.ask_timeout, ask).await {
                Ok(Ok(Some(addr))) => return Ok(addr),
                Ok(Ok(None)) => why.push(format!("{shown} monitors no master named {:?}", self.master)),
                Ok(Err(e)) => why.push(format!("{shown}: {e}")),
                Err(_) => why.push(format!("{shown}: no answer within {}ms", self.ask_timeout.as_millis())),
            }
        }
        Err(RedisError::from((
            ErrorKind::Io,
            "no sentinel named the master",
            why.join("; "),
        )))
    }

    /// How to reach the master at `host:port`: `redis.url`'s settings there.
    fn master_info(&self, host: String, port: u16) -> ConnectionInfo {
        let addr = match self.template.addr() {
            ConnectionAddr::TcpTls {
                insecure, tls_params, ..
            } => ConnectionAddr::TcpTls {
                host,
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host, port),
        };
        self.template.clone().set_addr(addr)
    }

    /// A connection to the master the sentinels name, once it says it is
    /// one (`ROLE`): right after a failover a sentinel may still name the
    /// old master, now a replica.
    pub async fn connect(&self) -> RedisResult<MultiplexedConnection> {
        let (host, port) = self.master_addr().await?;
        let at = format!("{host}:{port}");
        let info = self.master_info(host, port);
        let open = async {
            let mut conn = Client::open(info)?.get_multiplexed_async_connection().await?;
            let role: Value = ::redis::cmd("ROLE").query_async(&mut conn).await?;
            Ok::<_, RedisError>((conn, role))
        };
        let (conn, role) = tokio::time::timeout(self.ask_timeout, open).await.map_err(|_| {
            RedisError::from((
                ErrorKind::Io,
                "the master the sentinels name does not answer",
                format!("{at}: no answer within {}ms", self.ask_timeout.as_millis()),
            ))
        })??;
        match role_name(&role).as_deref() {
            Some("master") => {
                note_master(&at);
                Ok(conn)
            }
            other => Err(RedisError::from((
                ErrorKind::Io,
                "the server the sentinels name is not a master (a failover under way)",
                format!("{at} says it is {}", other.unwrap_or("of an unknown role")),
            ))),
        }
    }
}

/// The first element of a `ROLE` reply: `master`, `slave` or `sentinel`.
fn role_name(v: &Value) -> Option<String> {
    match v {
        Value::Array(items) => items.first().and_then(reply_text),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::redis::IntoConnectionInfo;

    fn sentinels(template: &str) -> Sentinels {
        Sentinels::new(
            Vec::new(),
            "mymaster".into(),
            template.into_connection_info().expect("url"),
            Duration::from_secs(1),
        )
    }

    #[test]
    fn the_master_keeps_the_urls_credentials_database_and_tls_at_the_named_address() {
        let s = sentinels("redis://relay:pw@ignored:1/3");
        let info = s.master_info("10.0.0.7".into(), 6380);
        assert_eq!(info.addr(), &ConnectionAddr::Tcp("10.0.0.7".into(), 6380));
        assert_eq!(info.redis_settings().db(), 3);
        assert_eq!(info.redis_settings().username(), Some("relay"));
        assert_eq!(info.redis_settings().password(), Some("pw"));
        let tls = sentinels("rediss://ignored:1/0").master_info("10.0.0.7".into(), 6380);
        assert!(matches!(tls.addr(), ConnectionAddr::TcpTls { host, port: 6380, .. } if host == "10.0.0.7"));
    }

    #[test]
    fn role_replies_are_read() {
        let reply = |r: &str| Value::Array(vec![Value::BulkString(r.as_bytes().to_vec()), Value::Int(0)]);
        assert_eq!(role_name(&reply("master")).as_deref(), Some("master"));
        assert_eq!(role_name(&reply("slave")).as_deref(), Some("slave"));
        assert_eq!(role_name(&Value::Nil), None);
    }

    #[test]
    fn the_description_hides_passwords() {
        let d = Sentinels::describe(
            "mymaster",
            &["redis://:secret@s1:26379".into(), "redis://s2:26379".into()],
        );
        assert!(d.starts_with("sentinel mymaster via ") && !d.contains("secret"), "{d}");
    }
}
