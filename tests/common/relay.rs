//! The relay as a subprocess: its environments, its log records, its metrics.

use super::*;

pub const RELAY_BIN: &str = env!("CARGO_BIN_EXE_outbox-relay");

/// The binary the tests run: this build's, or `OUTBOX_RELAY_TEST_BIN` (an
/// older build, to show that a new test fails where the behaviour is broken).
pub fn relay_bin() -> String {
    std::env::var("OUTBOX_RELAY_TEST_BIN").unwrap_or_else(|_| RELAY_BIN.to_string())
}

/// The relay binary running as a subprocess, its stdout (JSON log lines) captured.
pub struct RelayProcess {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// Where its /healthz and /readyz answer.
    pub http_port: u16,
}

/// Environment for a relay against `db` and `redis_url` with `prefix`, fast
/// ticks, LISTEN on, JSON logs at debug level; `extra` overrides or adds keys.
pub fn relay_env(db: &TestDb, redis_url: &str, prefix: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("OUTBOX_RELAY_DATABASE__URL".into(), db.url.clone()),
        // LISTEN/NOTIFY on, as in production: wake-ups and the fresh lane
        // run in every test (a test may point it elsewhere or clear it).
        ("OUTBOX_RELAY_DATABASE__LISTEN_URL".into(), db.url.clone()),
        ("OUTBOX_RELAY_REDIS__URL".into(), redis_url.into()),
        ("OUTBOX_RELAY_REDIS__KEY_PREFIX".into(), prefix.into()),
        ("OUTBOX_RELAY_SWEEP__INTERVAL".into(), "50ms".into()),
        ("OUTBOX_RELAY_LOG__FORMAT".into(), "json".into()),
        ("OUTBOX_RELAY_LOG__LEVEL".into(), "debug".into()),
    ];
    for (k, v) in extra {
        env.retain(|(ek, _)| ek != k);
        env.push((k.to_string(), v.to_string()));
    }
    env
}

/// Environment for a relay with the shipped defaults: only where the
/// services are and its own key prefix, nothing tuned for the test (no
/// config file either: the built-in defaults are `config/default.toml`'s).
pub fn shipped_env(db_url: &str, redis_url: &str, prefix: &str) -> Vec<(String, String)> {
    vec![
        ("OUTBOX_RELAY_DATABASE__URL".into(), db_url.into()),
        ("OUTBOX_RELAY_REDIS__URL".into(), redis_url.into()),
        ("OUTBOX_RELAY_REDIS__KEY_PREFIX".into(), prefix.into()),
    ]
}

/// [`relay_env`] connecting (and listening) as `db_url`, e.g. one of
/// [`TestDb::url_as`].
pub fn relay_env_as(
    db: &TestDb,
    db_url: &str,
    redis_url: &str,
    prefix: &str,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut env = relay_env(db, redis_url, prefix, extra);
    for (k, v) in env.iter_mut() {
        if k == "OUTBOX_RELAY_DATABASE__URL" || k == "OUTBOX_RELAY_DATABASE__LISTEN_URL" {
            *v = db_url.to_string();
        }
    }
    env
}

/// A command for the relay binary with a clean environment (no stray
/// `OUTBOX_RELAY_*`, `DATABASE_URL` or `REDIS_URL` from the caller) and no
/// config file, so only `env` decides.
pub fn relay_command(args: &[&str], env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(relay_bin());
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(std::env::temp_dir());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

impl RelayProcess {
    /// Start `outbox-relay run`; unless `env` names one, the HTTP endpoint
    /// gets a free port of its own so relays can run side by side.
    pub fn spawn(env: &[(String, String)]) -> RelayProcess {
        let mut env = env.to_vec();
        let http_port = match env.iter().find(|(k, _)| k == "OUTBOX_RELAY_HTTP__LISTEN") {
            Some((_, v)) => v
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("port in OUTBOX_RELAY_HTTP__LISTEN"),
            None => {
                let port = free_port();
                env.push(("OUTBOX_RELAY_HTTP__LISTEN".into(), format!("127.0.0.1:{port}")));
                port
            }
        };
        let mut child = relay_command(&["run"], &env)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn outbox-relay");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let sink = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var_os("OUTBOX_TEST_ECHO").is_some() {
                        eprintln!("relay: {line}");
                    }
                    sink.lock().expect("log lines").push(line);
                }
            });
        }
        RelayProcess {
            child,
            lines,
            http_port,
        }
    }

    /// `GET path` on the relay's HTTP endpoint: (status, body), or None
    /// when nothing answers.
    pub async fn http_get(&self, path: &str) -> Option<(u16, String)> {
        self.http_request("GET", path).await
    }

    /// `method path` on the relay's HTTP port: the status and the whole
    /// response after the status line (headers and body).
    pub async fn http_request(&self, method: &str, path: &str) -> Option<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.http_port))
            .await
            .ok()?;
        let req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = if method == "GET" {
            text.split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default()
        } else {
            text
        };
        Some((status, body))
    }

    /// `outbox_relay_sweep_ticks_total{result="ok"}` now (0 before the
    /// first scrape answers).
    pub async fn ok_ticks(&self) -> f64 {
        match self.http_get("/metrics").await {
            Some((200, body)) => {
                metric_value(&body, "outbox_relay_sweep_ticks_total", &[("result", "ok")]).unwrap_or(0.0)
            }
            _ => 0.0,
        }
    }

    /// The value of metric `name` with `labels` in a scrape now (None when
    /// nothing answers or the series is absent).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        match self.http_get("/metrics").await {
            Some((200, body)) => metric_value(&body, name, labels),
            _ => None,
        }
    }

    /// Wait until `GET path` answers `status` (e.g. `/readyz` 200).
    pub async fn wait_http(&self, path: &str, status: u16, timeout: Duration) {
        wait_until(&format!("{path} answers {status}"), timeout, || async {
            self.http_get(path).await.is_some_and(|(s, _)| s == status)
        })
        .await;
    }

    /// Parsed `actor health` lines for `actor`, oldest first.
    pub fn health_lines(&self, actor: &str) -> Vec<serde_json::Value> {
        self.records("actor health")
            .into_iter()
            .filter(|r| r["actor"] == actor)
            .collect()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("log lines").clone()
    }

    /// Parsed JSON log records whose `msg` contains `needle`.
    pub fn records(&self, needle: &str) -> Vec<serde_json::Value> {
        self.lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["msg"].as_str().is_some_and(|m| m.contains(needle)))
            .collect()
    }

    /// Every JSON log record at `level` (`error`, `warn`, …), whatever its message.
    pub fn at_level(&self, level: &str) -> Vec<serde_json::Value> {
        self.lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["level"] == level)
            .collect()
    }

    pub fn count(&self, needle: &str) -> usize {
        self.records(needle).len()
    }

    /// Wait until the relay logged its start-up line (it is then ticking).
    pub async fn wait_started(&mut self) {
        wait_until("relay logs its start-up line", Duration::from_secs(30), || {
            let started = self.count("outbox-relay starting") > 0;
            let exited = self.child.try_wait().ok().flatten();
            if let Some(status) = exited {
                panic!("relay exited early with {status}: {:#?}", self.lines());
            }
            async move { started }
        })
        .await;
        // And its HTTP endpoint answers: a port taken between `free_port`
        // and the relay's bind (an outgoing connection can get it) shows
        // here with the relay's own words, not later as a failed scrape.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if self.http_get("/healthz").await.is_some() {
                return;
            }
            if let Some(status) = self.child.try_wait().ok().flatten() {
                panic!("relay exited early with {status}: {:#?}", self.lines());
            }
            if std::time::Instant::now() > deadline {
                panic!("relay's HTTP endpoint never answered: {:#?}", self.lines());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Wait for the process to exit; panics after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if start.elapsed() > timeout {
                panic!("relay did not exit within {timeout:?}; log: {:#?}", self.lines());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM and expect a clean exit 0.
    pub async fn stop(mut self) {
        self.signal("TERM");
        let status = self.wait_exit(Duration::from_secs(30)).await;
        assert!(status.success(), "relay exited with {status}; log: {:#?}", self.lines());
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Run one CLI command against `db`; it must succeed.
pub fn cli(db: &TestDb, args: &[&str]) {
    let env = vec![("OUTBOX_RELAY_DATABASE__URL".to_string(), db.url.clone())];
    let out = relay_command(args, &env).output().expect("run the CLI");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
