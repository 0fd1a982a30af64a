//! `bench --console`: what the console costs and how fast it answers on a
//! big outbox (#30: every page under 300 ms with 5,000,000 rows in
//! `task_outbox`; the drain unchanged while a page is refreshed every
//! second).
//!
//! With the seeded rows in place and before the drain, `outbox-relay
//! console` (no sweeping) serves every page of the scratch database; each
//! is fetched three times and the slowest is reported. During the drain the
//! relay itself serves the console (`console.listen`) and the overview is
//! fetched once a second, each answer timed.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::error::BenchError;
use super::measure::{free_port, RelayChild};
use super::report::{PageTime, Refreshes};
use crate::config::CONFIG_PATH_ENV;

/// Pages timed: every page, and the API's overview and jobs.
const PAGES: &[&str] = &[
    "/",
    "/jobs",
    "/dead-letters",
    "/set-aside",
    "/api/v1/overview",
    "/api/v1/jobs",
    "/api/v1/minutes",
];

/// `GET path` on the console: (status, milliseconds) or None.
pub(super) async fn get_timed(port: u16, path: &str) -> Option<(u16, f64)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = Instant::now();
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf[..buf.len().min(64)]).into_owned();
        text.split_whitespace().nth(1)?.parse::<u16>().ok()
    };
    let status = tokio::time::timeout(Duration::from_secs(10), ask)
        .await
        .ok()
        .flatten()?;
    Some((status, started.elapsed().as_secs_f64() * 1000.0))
}

async fn wait_answering(port: u16) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while get_timed(port, "/static/console.css").await.is_none() {
        if Instant::now() > deadline {
            return Err(BenchError::Relay(format!("the console on port {port} never answered")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Every page's time from `outbox-relay console` on the scratch database,
/// with whatever `task_outbox` holds now.
pub(super) async fn time_pages(config: Option<&str>, url: &str, prefix: &str) -> Result<Vec<PageTime>, BenchError> {
    let exe = std::env::current_exe().map_err(|e| BenchError::Relay(e.to_string()))?;
    let (port, metrics) = (free_port()?, free_port()?);
    let mut cmd = Command::new(exe);
    if let Some(path) = config {
        cmd.env(CONFIG_PATH_ENV, path);
    }
    let child = cmd
        .arg("console")
        .env("OUTBOX_RELAY_DATABASE__URL", url)
        .env("OUTBOX_RELAY_REDIS__KEY_PREFIX", prefix)
        .env("OUTBOX_RELAY_CONSOLE__LISTEN", format!("127.0.0.1:{port}"))
        .env("OUTBOX_RELAY_CONSOLE__USERS_FILE", "")
        .env("OUTBOX_RELAY_HTTP__LISTEN", format!("127.0.0.1:{metrics}"))
        .env("OUTBOX_RELAY_LOG__LEVEL", "warning")
        .stdout(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| BenchError::Relay(e.to_string()))?;
    let _console = RelayChild(child, metrics);
    wait_answering(port).await?;
    // Once unmeasured: the console opens its pool and its Redis connection
    // on first use.
    let _ = get_timed(port, "/").await;
    let mut out = Vec::new();
    for path in PAGES {
        let mut worst: Option<(u16, f64)> = None;
        for _ in 0..3 {
            let got = get_timed(port, path)
                .await
                .ok_or_else(|| BenchError::Relay(format!("the console did not answer {path}")))?;
            worst = Some(match worst {
                Some(w) if w.1 >= got.1 => w,
                _ => got,
            });
        }
        if let Some((status, ms)) = worst {
            out.push(PageTime {
                path: (*path).to_string(),
                status,
                ms,
            });
        }
    }
    Ok(out)
}

/// Fetch the overview from `port` once a second until stopped.
pub(super) struct Refresher {
    times: Arc<Mutex<Vec<Result<f64, String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Refresher {
    pub(super) fn start(port: u16) -> Refresher {
        let times = Arc::new(Mutex::new(Vec::new()));
        let sink = times.clone();
        let task = tokio::spawn(async move {
            if wait_answering(port).await.is_err() {
                return;
            }
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                every.tick().await;
                let got = match get_timed(port, "/").await {
                    Some((200, ms)) => Ok(ms),
                    Some((status, _)) => Err(status.to_string()),
                    None => Err("no answer".to_string()),
                };
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(got);
            }
        });
        Refresher { times, task }
    }

    pub(super) fn stop(self) -> Refreshes {
        self.task.abort();
        let times = self.times.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut ok: Vec<f64> = times.iter().filter_map(|t| t.as_ref().ok()).copied().collect();
        ok.sort_by(f64::total_cmp);
        Refreshes {
            fetched: ok.len(),
            failed: times.len() - ok.len(),
            failures: times.iter().filter_map(|t| t.as_ref().err().cloned()).collect(),
            p50_ms: ok.get(ok.len() / 2).copied().unwrap_or(0.0),
            max_ms: ok.last().copied().unwrap_or(0.0),
        }
    }
}
