//! How `bench` measures: the relay as a subprocess (its CPU and RSS from
//! /proc), members counted in the schedules, drain waits that fail on a
//! stall, VACUUM sampling, and latency percentiles.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::report::Latency;
use super::{rd, BenchError};
use crate::config::CONFIG_PATH_ENV;
use crate::db;
use crate::deadline::STARTUP_TIMEOUT;
use crate::redis::keys::per_key;
use crate::redis::DirectConn;

pub(super) struct RelayChild(pub(super) Child);

impl Drop for RelayChild {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

/// This binary as `outbox-relay run` on the scratch database and prefix;
/// `env` adds settings (the rest comes from the benchmark's own environment).
pub(super) fn spawn_relay(
    config: Option<&str>,
    url: &str,
    prefix: &str,
    env: &[(&str, String)],
    log: Option<&std::path::Path>,
) -> Result<RelayChild, BenchError> {
    let exe = std::env::current_exe().map_err(|e| BenchError::Relay(e.to_string()))?;
    let (level, stdout) = match log {
        None => ("warning", Stdio::null()),
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| BenchError::Relay(format!("cannot open {}: {e}", path.display())))?;
            ("debug", Stdio::from(file))
        }
    };
    let mut cmd = Command::new(exe);
    if let Some(path) = config {
        cmd.env(CONFIG_PATH_ENV, path);
    }
    cmd.arg("run")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("OUTBOX_RELAY_DATABASE__URL", url)
        .env("OUTBOX_RELAY_DATABASE__LISTEN_URL", url)
        .env("OUTBOX_RELAY_REDIS__KEY_PREFIX", prefix)
        .env("OUTBOX_RELAY_HTTP__LISTEN", "127.0.0.1:0")
        .env("OUTBOX_RELAY_LOG__LEVEL", level)
        .stdout(stdout)
        .stdin(Stdio::null())
        .spawn()
        .map(RelayChild)
        .map_err(|e| BenchError::Relay(e.to_string()))
}

/// (CPU seconds, peak RSS in KiB) of a process, from /proc.
pub(super) fn proc_usage(pid: u32) -> (f64, u64) {
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            let utime: f64 = after.get(11)?.parse().ok()?;
            let stime: f64 = after.get(12)?.parse().ok()?;
            Some((utime + stime) / 100.0)
        })
        .unwrap_or(0.0);
    let hwm = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    (cpu, hwm)
}

/// Members in the seeded jobs' schedules, all together.
pub(super) async fn scheduled(conn: &mut DirectConn, prefix: &str, jobs: i64) -> Result<i64, BenchError> {
    let keys: Vec<String> = (0..jobs)
        .map(|j| format!("{prefix}sched:00000000-0000-4000-8000-{j:012}"))
        .collect();
    let counts: Vec<i64> = match conn {
        DirectConn::Standalone(c) => {
            let mut pipe = ::redis::pipe();
            for k in &keys {
                pipe.zcard(k);
            }
            pipe.query_async(c).await.map_err(rd)?
        }
        DirectConn::Cluster(_) => per_key::<i64>(conn, "ZCARD", &keys)
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .map_err(rd)?,
    };
    Ok(counts.iter().sum())
}

/// No new member for this long means the drain is stuck (a relay that
/// writes elsewhere, a Redis that refuses): fail instead of waiting forever.
pub(super) const STALL: Duration = Duration::from_secs(60);

/// Poll the schedules until `rows` members arrived, failing if a relay
/// exits or nothing arrives for [`STALL`]; `progress` sees each count.
/// Returns the seconds it took.
pub(super) async fn wait_scheduled(
    children: &mut [RelayChild],
    conn: &mut DirectConn,
    prefix: &str,
    jobs: i64,
    rows: i64,
    mut progress: impl FnMut(i64, f64),
) -> Result<f64, BenchError> {
    let started = Instant::now();
    let mut last = (-1, Instant::now());
    loop {
        for c in children.iter_mut() {
            if let Ok(Some(status)) = c.0.try_wait() {
                return Err(BenchError::Relay(format!("exited during the drain with {status}")));
            }
        }
        let done = scheduled(conn, prefix, jobs).await?;
        if done != last.0 {
            last = (done, Instant::now());
        } else if last.1.elapsed() > STALL {
            return Err(BenchError::Relay(format!(
                "no member arrived for {}s ({done} of {rows} scheduled): is the relay writing to this Redis?",
                STALL.as_secs()
            )));
        }
        progress(done, started.elapsed().as_secs_f64());
        if done >= rows {
            return Ok(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One latency run: the commit→schedule times (ms), how long the rows were
/// produced for, and the share of that time a VACUUM ran in the database.
pub(super) struct LatencyRun {
    pub(super) ms: Vec<f64>,
    pub(super) ran: Duration,
    pub(super) vacuum_share: f64,
}

/// A background task that stops when this is dropped.
pub(super) struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sample, every 100 ms while the returned guard lives, whether a VACUUM
/// (autovacuum included) is in progress in the database at `url`:
/// (samples, hits).
pub(super) async fn watch_vacuum(url: &str) -> Result<(AbortOnDrop, Arc<[AtomicU64; 2]>), BenchError> {
    let client = db::connect(url, STARTUP_TIMEOUT).await?;
    let counts: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let seen = counts.clone();
    let task = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(100));
        loop {
            every.tick().await;
            let q = "SELECT count(*) FROM pg_stat_progress_vacuum p JOIN pg_database d ON d.oid = p.datid \
                     WHERE d.datname = current_database()";
            if let Ok(row) = client.query_typed_one(q, &[]).await {
                seen[0].fetch_add(1, Ordering::Relaxed);
                if row.get::<_, i64>(0) > 0 {
                    seen[1].fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    Ok((AbortOnDrop(task), counts))
}

/// Percentiles of latency samples (ms), with the share of the time a VACUUM ran.
pub(super) fn summarize(mut ms: Vec<f64>, vacuum_share: f64) -> Latency {
    ms.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| -> f64 {
        if ms.is_empty() {
            return 0.0;
        }
        ms[((ms.len() as f64 * p).ceil() as usize).clamp(1, ms.len()) - 1]
    };
    Latency {
        rows: ms.len(),
        p50_ms: q(0.50),
        p95_ms: q(0.95),
        p99_ms: q(0.99),
        max_ms: ms.last().copied().unwrap_or(0.0),
        vacuum_share,
    }
}
