//! How `bench` measures: the relay as a subprocess (its CPU and RSS from
//! /proc), members counted in the schedules, drain waits that fail on a
//! stall, VACUUM sampling, latency percentiles, and the latency rows' job
//! ids with the keyspace watch that times them.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::error::{rd, BenchError};
use super::report::Latency;
use crate::config::CONFIG_PATH_ENV;
use crate::db;
use crate::deadline::STARTUP_TIMEOUT;
use crate::redis::keys::per_key;
use crate::redis::DirectConn;

/// A relay subprocess and the port of its `/metrics`.
pub(super) struct RelayChild(pub(super) Child, pub(super) u16);

impl Drop for RelayChild {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

/// The settings `bench` sets on every relay it starts: where (the scratch
/// database and prefix, a free HTTP port) and how loud, never how fast.
const ISOLATION: &[&str] = &[
    "OUTBOX_RELAY_DATABASE__URL",
    "OUTBOX_RELAY_REDIS__KEY_PREFIX",
    "OUTBOX_RELAY_HTTP__LISTEN",
    "OUTBOX_RELAY_LOG__LEVEL",
];

/// One line naming every setting the relays run with that is not a shipped
/// default: the configuration file, `OUTBOX_RELAY_*` variables inherited
/// from this process's environment, and what `bench` itself sets (`extra`:
/// a scenario's own, e.g. the scaling matrix's `sweep.concurrency`).
pub(super) fn describe_settings(config: Option<&str>, prefix: &str, extra: &[(&str, String)]) -> String {
    let mut inherited: Vec<String> = std::env::vars()
        .filter(|(k, _)| {
            (k.starts_with("OUTBOX_RELAY_") && k != CONFIG_PATH_ENV && !ISOLATION.contains(&k.as_str()))
                || k == "DATABASE_URL"
                || k == "REDIS_URL"
        })
        .map(|(k, v)| {
            if k.contains("URL") && (v.contains("://") || v.contains('=')) {
                format!("{k} (a service address)")
            } else {
                format!("{k}={v}")
            }
        })
        .collect();
    inherited.sort();
    let tuned: Vec<String> = extra.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(
        "bench: relay settings: the shipped defaults{}{}; bench sets database.url (the scratch database), \
         redis.key_prefix ({prefix}), http.listen (a free port) and log.level; overridden by this scenario: {}",
        config
            .map(|c| format!(", then the config file {c}"))
            .unwrap_or_default(),
        if inherited.is_empty() {
            String::new()
        } else {
            format!(", then this environment's {}", inherited.join(", "))
        },
        if tuned.is_empty() {
            "nothing".to_string()
        } else {
            tuned.join(", ")
        }
    )
}

/// A port nothing listens on now.
pub(super) fn free_port() -> Result<u16, BenchError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| BenchError::Relay(format!("no free port on 127.0.0.1: {e}")))
}

/// This binary as `outbox-relay run` on the scratch database and prefix;
/// `env` adds settings (the rest comes from the benchmark's own environment
/// and config file: see [`describe_settings`]).
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
    let port = free_port()?;
    let mut cmd = Command::new(exe);
    if let Some(path) = config {
        cmd.env(CONFIG_PATH_ENV, path);
    }
    cmd.arg("run")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("OUTBOX_RELAY_DATABASE__URL", url)
        .env("OUTBOX_RELAY_REDIS__KEY_PREFIX", prefix)
        .env("OUTBOX_RELAY_HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env("OUTBOX_RELAY_LOG__LEVEL", level)
        .stdout(stdout)
        .stdin(Stdio::null())
        .spawn()
        .map(|c| RelayChild(c, port))
        .map_err(|e| BenchError::Relay(e.to_string()))
}

/// The relay's `/metrics` text (None while nothing answers). HTTP/1.0, so
/// the body comes whole, not chunked.
pub(super) async fn scrape(port: u16) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), ask).await.ok().flatten()
}

/// The sum over every label set of a metric's samples named `name` (the
/// part before `{`), optionally only those whose labels hold `with`.
pub(super) fn metric_sum(scrape: &str, name: &str, with: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name) && l.contains(with))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A histogram's cumulative buckets summed over its label sets: (le, count).
pub(super) fn histogram(scrape: &str, name: &str) -> Vec<(f64, f64)> {
    let bucket = format!("{name}_bucket");
    let mut by_le: Vec<(f64, f64)> = Vec::new();
    for l in scrape.lines().filter(|l| l.split('{').next() == Some(bucket.as_str())) {
        let le = l.split("le=\"").nth(1).and_then(|r| r.split('"').next()).map(|v| {
            if v == "+Inf" {
                f64::INFINITY
            } else {
                v.parse().unwrap_or(f64::NAN)
            }
        });
        let value = l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let (Some(le), Some(v)) = (le, value) {
            match by_le.iter_mut().find(|(b, _)| *b == le) {
                Some(slot) => slot.1 += v,
                None => by_le.push((le, v)),
            }
        }
    }
    by_le.sort_by(|a, b| a.0.total_cmp(&b.0));
    by_le
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

impl AbortOnDrop {
    pub(super) fn spawn<F: std::future::Future<Output = ()> + Send + 'static>(task: F) -> AbortOnDrop {
        AbortOnDrop(tokio::spawn(task))
    }
}

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

/// Latency rows' job ids all start with this, so one pattern subscribes to them.
const LATENCY_JOB_PREFIX: &str = "1a7e0000-";

/// The job id of latency row `n`: `1a7e0000-0000-4000-8000-<n>`.
pub(super) fn latency_job(n: u64) -> Uuid {
    Uuid::from_u128(0x1a7e_0000_0000_4000_8000_0000_0000_0000u128 | u128::from(n))
}

/// Redis keyspace notifications of the latency rows' schedules: when each
/// latency job's key was first written. `notify-keyspace-events` is set for
/// the run and put back by [`KeyspaceWatch::finish`].
pub(super) struct KeyspaceWatch {
    admin: ::redis::aio::MultiplexedConnection,
    old: String,
    seen: Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>>,
    _task: AbortOnDrop,
}

impl KeyspaceWatch {
    pub(super) async fn start(cfg: &crate::config::Config, prefix: &str) -> Result<KeyspaceWatch, BenchError> {
        use futures_util::StreamExt;
        let client = crate::redis::standalone_client(&cfg.redis).map_err(|e| BenchError::Redis(e.to_string()))?;
        let mut admin = client.get_multiplexed_async_connection().await.map_err(rd)?;
        let old: Vec<String> = ::redis::cmd("CONFIG")
            .arg("GET")
            .arg("notify-keyspace-events")
            .query_async(&mut admin)
            .await
            .map_err(rd)?;
        let _: () = ::redis::cmd("CONFIG")
            .arg("SET")
            .arg("notify-keyspace-events")
            .arg("Kz")
            .query_async(&mut admin)
            .await
            .map_err(rd)?;
        let mut pubsub = client.get_async_pubsub().await.map_err(rd)?;
        pubsub
            .psubscribe(format!("__keyspace@*__:{prefix}sched:{}*", LATENCY_JOB_PREFIX))
            .await
            .map_err(rd)?;
        let seen = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            let mut stream = pubsub.into_on_message();
            while let Some(msg) = stream.next().await {
                let now = Instant::now();
                let channel = msg.get_channel_name().to_string();
                if let Some(job) = channel.rsplit("sched:").next() {
                    if let Ok(mut m) = sink.lock() {
                        m.entry(job.to_string()).or_insert(now);
                    }
                }
            }
        });
        Ok(KeyspaceWatch {
            admin,
            old: old.get(1).cloned().unwrap_or_default(),
            seen,
            _task: AbortOnDrop(task),
        })
    }

    /// Wait (at most `within`) until every committed latency row was seen.
    pub(super) async fn wait_all(&self, committed: &[(String, Instant)], within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let all = self
                .seen
                .lock()
                .map(|m| committed.iter().all(|(j, _)| m.contains_key(j)))
                .unwrap_or(true);
            if all || Instant::now() > deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stop watching, put the Redis setting back, and return each committed
    /// row's commit→visible time (ms), in commit order, `None` for a row
    /// never seen.
    pub(super) async fn finish(mut self, committed: &[(String, Instant)]) -> Vec<Option<f64>> {
        let _: Result<(), _> = ::redis::cmd("CONFIG")
            .arg("SET")
            .arg("notify-keyspace-events")
            .arg(&self.old)
            .query_async(&mut self.admin)
            .await;
        let seen = self.seen.lock().map(|m| m.clone()).unwrap_or_default();
        committed
            .iter()
            .map(|(j, t)| {
                seen.get(j)
                    .map(|s| s.saturating_duration_since(*t).as_secs_f64() * 1000.0)
            })
            .collect()
    }
}
