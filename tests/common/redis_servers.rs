//! Private redis-server and Sentinel processes on free ports.

use super::*;

/// Replication settings for every test redis-server: a replica loads what
/// its primary sends straight from the socket (no RDB file, which servers
/// sharing a directory would overwrite under each other: a replica could
/// load another shard's data) and a primary starts that transfer at once
/// instead of waiting 5 s for more replicas.
pub const REDIS_REPLICATION_ARGS: &[&str] = &["--repl-diskless-load", "swapdb", "--repl-diskless-sync-delay", "0"];

/// A private `redis-server` the test can stop and start.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// The server's own directory: its AOF when durable, and where a
    /// replica puts the RDB it receives (servers must never share one).
    dir: std::path::PathBuf,
    /// AOF with fsync always.
    durable: bool,
    /// Port of the primary this server replicates.
    replica_of: Option<u16>,
    /// A TLS port beside the plain one (certificate from [`server_cert`]).
    pub tls_port: Option<u16>,
    /// More `redis-server` arguments (e.g. `--rename-command`), applied at
    /// every (re)start: change them, `stop`, `resume`.
    pub extra_args: Vec<String>,
}

impl RedisServer {
    /// Start one on a free port, in a directory of its own.
    async fn launch(durable: bool, replica_of: Option<u16>) -> RedisServer {
        Self::launch_with(durable, replica_of, false).await
    }

    async fn launch_with(durable: bool, replica_of: Option<u16>, tls: bool) -> RedisServer {
        let dir = scratch_dir("outbox-redis");
        let tls_port = tls.then(|| {
            server_cert(&dir, &dir.join("server.key"), &dir.join("server.crt"));
            free_port()
        });
        let mut s = RedisServer {
            port: free_port(),
            child: None,
            dir,
            durable,
            replica_of,
            tls_port,
            extra_args: Vec::new(),
        };
        s.resume().await;
        s
    }

    /// A server that also speaks TLS on [`RedisServer::tls_url`], with a
    /// certificate for 127.0.0.1 from the CA in [`RedisServer::ca_file`];
    /// the plain port stays open for the test's own checks.
    pub async fn start_with_tls() -> RedisServer {
        Self::launch_with(false, None, true).await
    }

    pub fn tls_url(&self) -> String {
        format!("rediss://127.0.0.1:{}/0", self.tls_port.expect("a TLS port"))
    }

    pub fn ca_file(&self) -> std::path::PathBuf {
        self.dir.join("ca.crt")
    }

    pub async fn start() -> RedisServer {
        Self::launch(false, None).await
    }

    /// A server started with more arguments (see [`RedisServer::extra_args`]).
    pub async fn start_with_args(args: &[&str]) -> RedisServer {
        let mut s = Self::launch(false, None).await;
        s.stop();
        s.extra_args = args.iter().map(|a| a.to_string()).collect();
        s.resume().await;
        s
    }

    /// A replica of the server at `primary` (`--replicaof`); `resume`
    /// brings it back as a replica again.
    pub async fn start_replica_of(primary: u16) -> RedisServer {
        Self::launch(false, Some(primary)).await
    }

    /// A server that keeps every write on disk (AOF, fsync always), so a
    /// restart — even `kill -9` — loses nothing it acknowledged.
    pub async fn start_durable() -> RedisServer {
        Self::launch(true, None).await
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// (Re)start the server on its port and wait until it answers PING.
    pub async fn resume(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(REDIS_REPLICATION_ARGS)
            .arg("--dir")
            .arg(&self.dir);
        if self.durable {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        if let Some(primary) = self.replica_of {
            cmd.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
        }
        if let Some(tls_port) = self.tls_port {
            cmd.args(["--tls-port", &tls_port.to_string(), "--tls-auth-clients", "no"])
                .arg("--tls-cert-file")
                .arg(self.dir.join("server.crt"))
                .arg("--tls-key-file")
                .arg(self.dir.join("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(self.dir.join("ca.crt"));
        }
        cmd.args(&self.extra_args);
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed?)");
        self.child = Some(child);
        let url = self.url();
        wait_until("private redis-server answers PING", Duration::from_secs(20), || {
            let url = url.clone();
            async move {
                match redis::Client::open(url.as_str()) {
                    Ok(c) => match c.get_multiplexed_async_connection().await {
                        Ok(mut conn) => redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok(),
                        Err(_) => false,
                    },
                    Err(_) => false,
                }
            }
        })
        .await;
    }

    /// Freeze the server (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Thaw a paused server (SIGCONT).
    pub fn unpause(&self) {
        self.signal("CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("redis-server running").id();
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} redis-server");
    }

    /// Kill the server (its data is gone: it keeps nothing on disk).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Sentinel (`redis-server FILE --sentinel`, FILE its own writable
/// config) monitoring one master as `mymaster`, quorum 1, that it takes for
/// down after 1 s.
pub struct RedisSentinel {
    pub port: u16,
    child: Child,
    dir: std::path::PathBuf,
    /// Its own `requirepass`, if any.
    password: Option<String>,
}

impl RedisSentinel {
    pub const MASTER: &'static str = "mymaster";

    pub async fn start(master_port: u16) -> RedisSentinel {
        Self::start_with_passwords(master_port, None, None).await
    }

    /// With `requirepass sentinel` and `sentinel auth-pass mymaster master`.
    pub async fn start_with_passwords(master_port: u16, sentinel: Option<&str>, master: Option<&str>) -> RedisSentinel {
        let extra = master
            .map(|p| format!("sentinel auth-pass {} {p}\n", Self::MASTER))
            .unwrap_or_default();
        Self::start_with_config(master_port, sentinel, &extra).await
    }

    /// Monitoring the master at `master_port` (plain or TLS, as `extra`
    /// says), with its own `requirepass` and more config lines. A master
    /// is down after 3 s without an answer: with 1 s, a CI rehearsal on a
    /// busy machine saw the just-promoted replica miss its pings for a
    /// second (it was syncing the returning old master) and Sentinel fail
    /// back over to the old master, restarted empty.
    pub async fn start_with_config(master_port: u16, sentinel: Option<&str>, extra: &str) -> RedisSentinel {
        let dir = scratch_dir("outbox-sentinel");
        let port = free_port();
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nlogfile {}\n\
                 sentinel monitor {m} 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds {m} 3000\n\
                 sentinel failover-timeout {m} 10000\n",
                dir.display(),
                dir.join("sentinel.log").display(),
                m = Self::MASTER
            ) + &sentinel.map(|p| format!("requirepass {p}\n")).unwrap_or_default()
                + extra,
        )
        .expect("write sentinel.conf");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server --sentinel");
        let s = RedisSentinel {
            port,
            child,
            dir,
            password: sentinel.map(str::to_string),
        };
        let url = s.url();
        wait_until("the sentinel answers", Duration::from_secs(20), || {
            let url = url.clone();
            async move {
                match redis::Client::open(url.as_str()) {
                    Ok(c) => c.get_multiplexed_async_connection().await.is_ok(),
                    Err(_) => false,
                }
            }
        })
        .await;
        s
    }

    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// The last `lines` lines of this sentinel's log (what it decided and
    /// when: +sdown, +switch-master, +convert-to-slave, +tilt), for a
    /// failing test to print.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join("sentinel.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The master's port as this sentinel names it now.
    pub async fn master_port(&self) -> Option<u16> {
        let mut c = redis_conn(&self.url()).await;
        redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(Self::MASTER)
            .query_async::<Option<(String, u16)>>(&mut c)
            .await
            .ok()
            .flatten()
            .map(|(_, port)| port)
    }

    /// How many replicas of the master this sentinel knows.
    pub async fn replicas(&self) -> usize {
        let mut c = redis_conn(&self.url()).await;
        redis::cmd("SENTINEL")
            .arg("replicas")
            .arg(Self::MASTER)
            .query_async::<Vec<redis::Value>>(&mut c)
            .await
            .map(|v| v.len())
            .unwrap_or(0)
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
